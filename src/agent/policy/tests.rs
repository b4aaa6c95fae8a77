//! The policy's rules, one by one.

use super::*;

fn ok_ask() -> Ask {
    Ask {
        image: "registry.corp:5000/loadgen/k6:0.50".into(),
        network: "bridge".into(),
        cpus: 1.0,
        memory: 512 << 20,
        ..Default::default()
    }
}

fn rule(p: &Policy, a: &Ask) -> Option<&'static str> {
    p.check(a, Usage::default()).err().map(|r| r.rule)
}

/// The rule that refuses [`ok_ask`] with `image` instead of its own.
fn image_rule(p: &Policy, image: impl Into<String>) -> Option<&'static str> {
    let image = image.into();
    rule(p, &Ask { image, ..ok_ask() })
}

#[test]
fn defaults_allow_a_limited_plain_container() {
    assert_eq!(rule(&Policy::default(), &ok_ask()), None);
    assert!(Policy::default().validate().is_empty());
}

#[test]
fn each_dangerous_setting_is_refused_by_default_and_named() {
    let p = Policy::default();
    let cases: Vec<(Ask, &str)> = vec![
        (
            Ask {
                privileged: true,
                ..ok_ask()
            },
            "privileged",
        ),
        (
            Ask {
                network: "host".into(),
                ..ok_ask()
            },
            "host_network",
        ),
        (
            Ask {
                host_pid: true,
                ..ok_ask()
            },
            "host_pid",
        ),
        (
            Ask {
                host_ipc: true,
                ..ok_ask()
            },
            "host_ipc",
        ),
        (
            Ask {
                binds: vec![("/".into(), "/host".into())],
                ..ok_ask()
            },
            "bind_mount",
        ),
        (
            Ask {
                capabilities: vec!["NET_ADMIN".into()],
                ..ok_ask()
            },
            "capability",
        ),
        (
            Ask {
                devices: vec!["/dev/kvm".into()],
                ..ok_ask()
            },
            "device",
        ),
        (
            Ask {
                cpus: 0.0,
                ..ok_ask()
            },
            "limits_required",
        ),
        (
            Ask {
                memory: 0,
                ..ok_ask()
            },
            "limits_required",
        ),
        (
            Ask {
                cpus: 64.0,
                ..ok_ask()
            },
            "cpu_per_container",
        ),
        (
            Ask {
                memory: 1 << 40,
                ..ok_ask()
            },
            "memory_per_container",
        ),
    ];
    for (ask, want) in cases {
        let r = p.check(&ask, Usage::default()).unwrap_err();
        assert_eq!(r.rule, want, "{ask:?}");
        assert!(r.to_string().contains(want), "{r}");
    }
}

#[test]
fn totals_count_what_already_runs() {
    let p = Policy {
        max_cpus_total: 2.0,
        max_memory_total: 1 << 30,
        ..Policy::default()
    };
    let a = ok_ask();
    assert!(
        p.check(
            &a,
            Usage {
                cpus: 1.0,
                memory: 512 << 20,
                ..Usage::default()
            }
        )
        .is_ok()
    );
    assert_eq!(
        p.check(
            &a,
            Usage {
                cpus: 1.5,
                memory: 0,
                ..Usage::default()
            }
        )
        .unwrap_err()
        .rule,
        "cpu_total"
    );
    assert_eq!(
        p.check(
            &a,
            Usage {
                cpus: 0.0,
                memory: 800 << 20,
                ..Usage::default()
            }
        )
        .unwrap_err()
        .rule,
        "memory_total"
    );
}

#[test]
fn images_match_patterns_in_both_forms_and_pins() {
    let p = Policy {
        allowed_images: vec![
            "registry.corp:5000/loadgen/*".into(),
            "docker.io/library/busybox:*".into(),
        ],
        ..Policy::default()
    };
    assert_eq!(rule(&p, &ok_ask()), None);
    assert_eq!(image_rule(&p, "busybox"), None);
    assert_eq!(image_rule(&p, "busybox:1.36"), None);
    assert_eq!(image_rule(&p, "alpine"), Some("image_not_allowed"));
    assert_eq!(
        image_rule(&p, "evil.corp/loadgen/x"),
        Some("image_not_allowed")
    );
    let digest = "sha256:".to_string() + &"ab".repeat(32);
    let pinned = Policy {
        allowed_images: vec![format!("registry.corp:5000/loadgen/k6@{digest}")],
        ..Policy::default()
    };
    assert_eq!(rule(&pinned, &ok_ask()), Some("image_not_allowed"));
    assert_eq!(
        image_rule(&pinned, format!("registry.corp:5000/loadgen/k6@{digest}")),
        None
    );
    let none = Policy {
        allowed_images: vec![],
        ..Policy::default()
    };
    assert_eq!(rule(&none, &ok_ask()), Some("image_not_allowed"));
}

#[test]
fn bind_mounts_need_an_allowed_prefix_and_no_dot_dot() {
    let p = Policy {
        bind_mount_prefixes: vec!["/srv/loadgen".into()],
        ..Policy::default()
    };
    let ask = |h: &str| Ask {
        binds: vec![(h.into(), "/data".into())],
        ..ok_ask()
    };
    assert_eq!(rule(&p, &ask("/srv/loadgen/scripts")), None);
    assert_eq!(rule(&p, &ask("/srv/loadgen/../../etc")), Some("bind_mount"));
    assert_eq!(rule(&p, &ask("/srv/loadgenX")), Some("bind_mount"));
    assert_eq!(rule(&p, &ask("relative")), Some("bind_mount"));
}

#[test]
fn bad_policies_are_reported() {
    let p = Policy {
        bind_mount_prefixes: vec!["/".into(), "rel".into()],
        max_cpus_total: f64::NAN,
        ..Policy::default()
    };
    let errs = p.validate();
    assert_eq!(errs.len(), 3, "{errs:?}");
    let parsed: Result<Policy, _> =
        serde_json::from_str(r#"{"allow_privileged": true, "nope": 1}"#);
    assert!(parsed.unwrap_err().to_string().contains("nope"));
}

#[test]
fn glob_matches_like_a_shell_star() {
    assert!(glob("*", "anything"));
    assert!(glob("a*c", "abbbc"));
    assert!(glob("a*b*c", "a-b-c"));
    assert!(!glob("a*c", "ab"));
    assert!(!glob("abc", "abcd"));
}

#[test]
fn only_bridge_none_and_listed_networks_may_be_joined() {
    let p = Policy::default();
    let net = |p: &Policy, n: &str| {
        rule(
            p,
            &Ask {
                network: n.into(),
                ..ok_ask()
            },
        )
    };
    assert_eq!(net(&p, "bridge"), None);
    assert_eq!(net(&p, "none"), None);
    assert_eq!(net(&p, "host"), Some("host_network"));
    assert_eq!(net(&p, "container:abc123"), Some("network"));
    assert_eq!(net(&p, "loadgen-net"), Some("network"));
    let open = Policy {
        allow_host_network: true,
        allowed_networks: vec!["loadgen-net".into()],
        ..Policy::default()
    };
    assert_eq!(net(&open, "loadgen-net"), None);
    assert_eq!(net(&open, "host"), None);
    // No policy lets a container join another container's namespace.
    assert_eq!(net(&open, "container:abc123"), Some("network"));
    let r = open
        .check(
            &Ask {
                network: "container:abc123".into(),
                ..ok_ask()
            },
            Usage::default(),
        )
        .unwrap_err();
    assert!(r.to_string().contains("rule network"), "{r}");
    let listed = Policy {
        allowed_networks: vec!["container:abc123".into(), "host".into()],
        ..Policy::default()
    };
    assert_eq!(listed.validate().len(), 2, "{:?}", listed.validate());
}

#[test]
fn cpus_must_be_a_real_limit_whatever_the_policy() {
    let lax = Policy {
        require_limits: false,
        ..Policy::default()
    };
    for p in [Policy::default(), lax.clone()] {
        for cpus in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1e-12] {
            let ask = Ask { cpus, ..ok_ask() };
            assert_eq!(rule(&p, &ask), Some("cpus"), "{cpus}");
        }
    }
    // Zero is "none": refused only where limits are required.
    let none = Ask {
        cpus: 0.0,
        ..ok_ask()
    };
    assert_eq!(rule(&Policy::default(), &none), Some("limits_required"));
    assert_eq!(rule(&lax, &none), None);
    assert_eq!(
        rule(
            &Policy::default(),
            &Ask {
                cpus: MIN_CPUS,
                ..ok_ask()
            }
        ),
        None
    );
}

#[test]
fn process_counts_are_capped_and_defaulted() {
    let p = Policy {
        max_pids_per_container: 64,
        ..Policy::default()
    };
    let pids = |n: i64| Ask {
        pids_limit: n,
        ..ok_ask()
    };
    assert_eq!(rule(&p, &pids(64)), None);
    assert_eq!(rule(&p, &pids(65)), Some("pids_per_container"));
    assert_eq!(rule(&p, &pids(0)), None);
    assert_eq!(rule(&p, &pids(-1)), None);
    // Asking for none (or Docker's "unlimited", -1) gets the cap.
    assert_eq!(
        (p.pids_limit(0), p.pids_limit(-1), p.pids_limit(10)),
        (64, 64, 10)
    );
    assert_eq!(
        Policy::default().pids_limit(0),
        DEFAULT_MAX_PIDS_PER_CONTAINER
    );
    let bad = Policy {
        max_pids_per_container: 0,
        ..Policy::default()
    };
    assert_eq!(bad.validate().len(), 1, "{:?}", bad.validate());
}

#[test]
fn container_paths_of_bind_mounts_carry_no_options_or_tricks() {
    let p = Policy {
        bind_mount_prefixes: vec!["/srv/loadgen".into()],
        ..Policy::default()
    };
    let to = |c: &str| Ask {
        binds: vec![("/srv/loadgen/data".into(), c.into())],
        ..ok_ask()
    };
    assert_eq!(rule(&p, &to("/data")), None);
    for bad in [
        "/x:rshared",
        "/x:ro,z",
        "relative",
        "/a/../etc",
        "/",
        "/x,y",
    ] {
        assert_eq!(rule(&p, &to(bad)), Some("bind_mount"), "{bad}");
    }
    let from = Ask {
        binds: vec![("/srv/loadgen/a:/b".into(), "/data".into())],
        ..ok_ask()
    };
    assert_eq!(rule(&p, &from), Some("bind_mount"));
}

#[test]
fn real_paths_follow_links_out_of_an_allowed_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(allowed.join("data")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("out")).unwrap();
    std::os::unix::fs::symlink("/", allowed.join("root")).unwrap();
    let p = Policy {
        bind_mount_prefixes: vec![allowed.clone()],
        ..Policy::default()
    }
    .with_real_prefixes();
    let ask = |host: &str| -> Option<&'static str> {
        let real = match real_path(&allowed.join(host)) {
            Ok(r) => r,
            Err(r) => return Some(r.rule),
        };
        rule(
            &p,
            &Ask {
                binds: vec![(real, "/data".into())],
                ..ok_ask()
            },
        )
    };
    assert_eq!(ask("data"), None);
    assert_eq!(ask("out"), Some("bind_mount"));
    assert_eq!(ask("root"), Some("bind_mount"));
    assert_eq!(ask("root/etc"), Some("bind_mount"));
    assert_eq!(ask("missing"), Some("bind_mount"));
    let r = real_path(&allowed.join("missing")).unwrap_err();
    assert!(r.message.contains("must exist"), "{r}");
}

#[test]
fn pulls_obey_the_image_rules() {
    let p = Policy {
        allowed_images: vec!["registry.corp:5000/loadgen/*".into()],
        ..Policy::default()
    };
    assert!(p.check_image("registry.corp:5000/loadgen/k6:1").is_ok());
    let r = p.check_image("evil.example/loadgen/k6:1").unwrap_err();
    assert_eq!(r.rule, "image_not_allowed");
}
