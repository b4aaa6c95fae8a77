//! The agent's local policy: what a backend may ask of this host's Docker
//! engine, decided before any Docker call. The operator sets it on the
//! agent (flags, environment, or a JSON file); the backend cannot change it.
//!
//! Defaults: every dangerous setting is denied (privileged mode, host
//! network/PID/IPC namespaces, bind mounts, added capabilities, devices),
//! and every container must carry CPU and memory limits within the
//! per-container and total caps. A refusal names the rule that refused.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// The operator's policy.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Image patterns that may run: `*` matches any run of characters, e.g.
    /// `registry.corp:5000/loadgen/*`. A pattern ending in `@sha256:<hex>`
    /// pins the image to that digest. Empty: no image may run.
    pub allowed_images: Vec<String>,
    /// Allow `privileged: true`.
    pub allow_privileged: bool,
    /// Allow the host's network namespace (`network: host`).
    pub allow_host_network: bool,
    /// Allow the host's PID namespace.
    pub allow_host_pid: bool,
    /// Allow the host's IPC namespace.
    pub allow_host_ipc: bool,
    /// Host path prefixes that may be bind-mounted. Empty: no bind mount.
    pub bind_mount_prefixes: Vec<PathBuf>,
    /// Capabilities that may be added (e.g. `NET_ADMIN`). Empty: none.
    pub allowed_capabilities: Vec<String>,
    /// Host device paths that may be passed through. Empty: none.
    pub allowed_devices: Vec<PathBuf>,
    /// Refuse containers without both a CPU and a memory limit.
    pub require_limits: bool,
    /// Largest CPU limit of one container, in cores.
    pub max_cpus_per_container: f64,
    /// Largest memory limit of one container, in bytes.
    pub max_memory_per_container: u64,
    /// Largest sum of CPU limits over this agent's running containers.
    pub max_cpus_total: f64,
    /// Largest sum of memory limits over this agent's running containers.
    pub max_memory_total: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_images: vec!["*".into()],
            allow_privileged: false,
            allow_host_network: false,
            allow_host_pid: false,
            allow_host_ipc: false,
            bind_mount_prefixes: Vec::new(),
            allowed_capabilities: Vec::new(),
            allowed_devices: Vec::new(),
            require_limits: true,
            max_cpus_per_container: 4.0,
            max_memory_per_container: 8 << 30,
            max_cpus_total: 16.0,
            max_memory_total: 32 << 30,
        }
    }
}

/// What a container asks for, as far as the policy cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ask {
    pub image: String,
    pub privileged: bool,
    /// `bridge` (default), `host`, `none`, or a network name.
    pub network: String,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// Bind mounts: host path, container path.
    pub binds: Vec<(PathBuf, PathBuf)>,
    pub capabilities: Vec<String>,
    pub devices: Vec<PathBuf>,
    /// CPU limit in cores (0: none).
    pub cpus: f64,
    /// Memory limit in bytes (0: none).
    pub memory: u64,
}

/// What this agent's running containers already hold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub cpus: f64,
    pub memory: u64,
    /// How many containers hold them.
    pub containers: u32,
}

/// A refusal: the rule, and a sentence for the result and the audit log.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("refused by local policy rule {rule}: {message}")]
pub struct Refusal {
    /// The rule's name, stable for tooling: e.g. `image_not_allowed`.
    pub rule: &'static str,
    pub message: String,
}

fn refuse(rule: &'static str, message: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        rule,
        message: message.into(),
    })
}

/// `*`-glob match (no other metacharacters).
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The forms an image reference is known by: as written, and normalised
/// (`busybox` = `docker.io/library/busybox:latest`).
pub fn image_forms(image: &str) -> Vec<String> {
    let mut forms = vec![image.to_string()];
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    let tagged = if last.contains(':') || digest.is_some() {
        name.to_string()
    } else {
        format!("{name}:latest")
    };
    let first = tagged.split('/').next().unwrap_or("");
    let has_registry = tagged.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        tagged
    } else if tagged.contains('/') {
        format!("docker.io/{tagged}")
    } else {
        format!("docker.io/library/{tagged}")
    };
    let full = match digest {
        Some(d) => format!("{full}@{d}"),
        None => full,
    };
    if !forms.contains(&full) {
        forms.push(full);
    }
    forms
}

/// A host path without `..` tricks: absolute, normalised.
fn clean(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

impl Policy {
    /// Every problem with the policy itself, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (name, v) in [
            ("max_cpus_per_container", self.max_cpus_per_container),
            ("max_cpus_total", self.max_cpus_total),
        ] {
            if !v.is_finite() || v <= 0.0 {
                errs.push(format!(
                    "policy {name} must be a positive number of cores, not {v}"
                ));
            }
        }
        for p in self.bind_mount_prefixes.iter().chain(&self.allowed_devices) {
            if clean(p).is_none() {
                errs.push(format!(
                    "policy path {} must be absolute, without '..'",
                    p.display()
                ));
            }
        }
        if self.bind_mount_prefixes.iter().any(|p| p == Path::new("/")) {
            errs.push("policy bind_mount_prefixes contains '/': that allows mounting the whole host; list narrower paths".into());
        }
        errs
    }

    /// Decides whether `ask` may run, given what already runs.
    pub fn check(&self, ask: &Ask, running: Usage) -> Result<(), Refusal> {
        // Image.
        let forms = image_forms(&ask.image);
        let allowed =
            self.allowed_images
                .iter()
                .any(|pattern| match pattern.split_once("@sha256:") {
                    Some((name, digest)) => {
                        ask.image.ends_with(&format!("@sha256:{digest}"))
                            && forms.iter().any(|f| {
                                glob(&format!("{name}@sha256:{digest}"), f)
                                    || glob(name, f.split('@').next().unwrap_or(f))
                            })
                    }
                    None => forms.iter().any(|f| glob(pattern, f)),
                });
        if !allowed {
            return refuse(
                "image_not_allowed",
                format!(
                    "image {:?} matches none of the allowed patterns {:?}",
                    ask.image, self.allowed_images
                ),
            );
        }
        if ask.privileged && !self.allow_privileged {
            return refuse("privileged", "privileged mode is not allowed on this host");
        }
        if ask.network == "host" && !self.allow_host_network {
            return refuse(
                "host_network",
                "the host's network namespace is not allowed on this host",
            );
        }
        if ask.host_pid && !self.allow_host_pid {
            return refuse(
                "host_pid",
                "the host's PID namespace is not allowed on this host",
            );
        }
        if ask.host_ipc && !self.allow_host_ipc {
            return refuse(
                "host_ipc",
                "the host's IPC namespace is not allowed on this host",
            );
        }
        for (host, _) in &ask.binds {
            let Some(h) = clean(host) else {
                return refuse(
                    "bind_mount",
                    format!(
                        "bind mount source {:?} is not an absolute path without '..'",
                        host.display()
                    ),
                );
            };
            if !self
                .bind_mount_prefixes
                .iter()
                .filter_map(|p| clean(p))
                .any(|p| h.starts_with(&p))
            {
                return refuse(
                    "bind_mount",
                    format!(
                        "bind mount of {} is not allowed (allowed prefixes: {:?})",
                        h.display(),
                        self.bind_mount_prefixes
                    ),
                );
            }
        }
        for cap in &ask.capabilities {
            let c = cap.trim_start_matches("CAP_").to_ascii_uppercase();
            if !self
                .allowed_capabilities
                .iter()
                .any(|a| a.trim_start_matches("CAP_").eq_ignore_ascii_case(&c))
            {
                return refuse(
                    "capability",
                    format!("adding capability {cap} is not allowed on this host"),
                );
            }
        }
        for dev in &ask.devices {
            let ok = clean(dev).is_some_and(|d| {
                self.allowed_devices
                    .iter()
                    .filter_map(|p| clean(p))
                    .any(|p| d == p)
            });
            if !ok {
                return refuse(
                    "device",
                    format!("device {} is not allowed on this host", dev.display()),
                );
            }
        }
        if self.require_limits && (ask.cpus <= 0.0 || ask.memory == 0) {
            return refuse(
                "limits_required",
                "this host requires a CPU limit and a memory limit on every container (set cpus and memory)",
            );
        }
        if ask.cpus > self.max_cpus_per_container {
            return refuse(
                "cpu_per_container",
                format!(
                    "{} cores asked; at most {} per container",
                    ask.cpus, self.max_cpus_per_container
                ),
            );
        }
        if ask.memory > self.max_memory_per_container {
            return refuse(
                "memory_per_container",
                format!(
                    "{} bytes asked; at most {} per container",
                    ask.memory, self.max_memory_per_container
                ),
            );
        }
        if running.cpus + ask.cpus > self.max_cpus_total {
            return refuse(
                "cpu_total",
                format!(
                    "{} cores asked with {} already in use; at most {} in total",
                    ask.cpus, running.cpus, self.max_cpus_total
                ),
            );
        }
        if running.memory.saturating_add(ask.memory) > self.max_memory_total {
            return refuse(
                "memory_total",
                format!(
                    "{} bytes asked with {} already in use; at most {} in total",
                    ask.memory, running.memory, self.max_memory_total
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
}
