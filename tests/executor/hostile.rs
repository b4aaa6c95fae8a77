//! What a compromised or mistaken backend may ask, against the real
//! engine: refused by the agent's local policy before it reaches Docker
//! (networks of other containers, symlinks out of the bind mount prefixes,
//! mount options in paths, NaN CPUs, pulls of images the policy refuses),
//! bounded (process counts), cleaned up (a container that cannot start),
//! and containers uplink did not create left untouched by every command.

use super::*;

/// A container this test created with `docker run` (not through uplink),
/// removed when dropped.
struct Foreign(String);

impl Foreign {
    /// Starts `sleep 300` in the test image with `args` before the image.
    fn start(args: &[&str]) -> Foreign {
        let mut all = vec!["run", "-d"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[LOCAL_IMAGE, "sleep", "300"]);
        let id = docker_out(&all);
        assert_eq!(id.len(), 64, "docker run {all:?} gave {id:?}");
        Foreign(id)
    }

    /// `docker inspect -f FORMAT` of this container.
    fn inspect(&self, format: &str) -> String {
        docker_out(&["inspect", "-f", format, &self.0])
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        docker_out(&["rm", "-f", &self.0]);
    }
}

/// A Docker network this test created, removed when dropped (after the
/// containers on it).
struct Network(String);

impl Network {
    fn create() -> Network {
        let name = format!("uplink-test-net-{}", std::process::id());
        assert!(
            !docker_out(&["network", "create", &name]).is_empty(),
            "docker network create {name}"
        );
        Network(name)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        docker_out(&["network", "rm", &self.0]);
    }
}

/// Writes `json` as the policy file in `dir`; the agent flags to use it.
fn policy_file(dir: &std::path::Path, json: &str) -> [String; 2] {
    let path = dir.join("policy.json");
    std::fs::write(&path, json).unwrap();
    ["--policy".into(), path.display().to_string()]
}

/// Asserts that `r` is a refusal by `rule`.
fn assert_refused(r: &proto::CommandResult, rule: &str) {
    assert_eq!(r.status, CommandStatus::Refused as i32, "{rule}: {r:?}");
    assert!(
        r.message.contains(&format!("rule {rule}:")),
        "{rule}: {}",
        r.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_backend_cannot_get_past_the_local_policy() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    // The allowed prefix holds a file, a link to a directory outside it,
    // and a link to the host's root.
    let allowed = dir.path().join("allowed");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(allowed.join("data")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(allowed.join("data/f"), "inside").unwrap();
    std::fs::write(outside.join("f"), "outside").unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("out")).unwrap();
    std::os::unix::fs::symlink("/", allowed.join("root")).unwrap();
    let args = policy_file(
        dir.path(),
        &format!(
            r#"{{"allowed_images": ["uplink-test/*"], "bind_mount_prefixes": [{:?}], "max_pids_per_container": 64}}"#,
            allowed.display().to_string()
        ),
    );
    let net = Network::create();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--allow-network", &net.0]);
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(dir.path(), "hostile", &args, &[]).await;
    // A host-networked container that uplink did not create.
    let host_net = Foreign::start(&["--network", "host"]);
    let bind = |host: &std::path::Path, container: &str| proto::BindMount {
        host_path: host.display().to_string(),
        container_path: container.into(),
        read_only: true,
    };
    let ok = run(LOCAL_IMAGE, &["true"]);
    let cases: Vec<(proto::RunContainer, &str)> = vec![
        (
            proto::RunContainer {
                network: format!("container:{}", host_net.0),
                ..ok.clone()
            },
            "network",
        ),
        (
            proto::RunContainer {
                network: "some-other-net".into(),
                ..ok.clone()
            },
            "network",
        ),
        (
            proto::RunContainer {
                binds: vec![bind(&allowed.join("out"), "/x")],
                ..ok.clone()
            },
            "bind_mount",
        ),
        (
            proto::RunContainer {
                binds: vec![bind(&allowed.join("root"), "/x")],
                ..ok.clone()
            },
            "bind_mount",
        ),
        (
            proto::RunContainer {
                binds: vec![bind(&allowed.join("root/etc"), "/x")],
                ..ok.clone()
            },
            "bind_mount",
        ),
        (
            proto::RunContainer {
                binds: vec![bind(&allowed.join("data"), "/x:rshared")],
                ..ok.clone()
            },
            "bind_mount",
        ),
        (
            proto::RunContainer {
                pids_limit: 100_000,
                ..ok.clone()
            },
            "pids_per_container",
        ),
    ];
    for (rc, rule) in cases {
        let r = exec(&b, &v.id, Kind::RunContainer(rc), Duration::from_secs(30)).await;
        assert_refused(&r, rule);
    }
    assert!(
        containers_of(&v.id).is_empty(),
        "a refused command created a container"
    );

    // A pull of an image the policy would not run is refused, and the
    // engine pulls nothing.
    let pull = Kind::PullImage(proto::PullImage {
        image: reg.image(),
        auth: None,
    });
    let r = exec(&b, &v.id, pull, Duration::from_secs(60)).await;
    assert_refused(&r, "image_not_allowed");
    assert!(
        docker_out(&["image", "inspect", "-f", "{{.Id}}", &reg.image()]).is_empty(),
        "the refused image was pulled"
    );

    // The operator's network may be joined.
    let on_net = proto::RunContainer {
        network: net.0.clone(),
        ..ok.clone()
    };
    let (c, r) = run_container(&b, &v.id, on_net).await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    assert_eq!(exit_of(&b, &v.id, &c).await.exit_code, 0);

    // An allowed bind mount reaches the file inside the prefix.
    let mut reads = run(LOCAL_IMAGE, &["sh", "-c", "test \"$(cat /x/f)\" = inside"]);
    reads.binds = vec![bind(&allowed.join("data"), "/x")];
    let (c, r) = run_container(&b, &v.id, reads).await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    assert_eq!(exit_of(&b, &v.id, &c).await.exit_code, 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nan_cpu_limit_is_refused_whatever_the_backend_sent() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let agent = format!("agt_nan{}", std::process::id());
    let _cleanup = Cleanup(agent.clone());
    let engine = uplink::agent::docker::Engine::new(
        uplink::agent::docker::connect().await.expect("docker"),
        &agent,
    );
    let lax = uplink::agent::policy::Policy {
        require_limits: false,
        ..Default::default()
    };
    for cpus in [f64::NAN, f64::INFINITY, -2.0, 1e-12] {
        let rc = proto::RunContainer {
            cpus,
            ..run(LOCAL_IMAGE, &["true"])
        };
        let f = engine.run(&lax, "cmd_nan", &rc).await.unwrap_err();
        assert_eq!(f.status, CommandStatus::Refused, "{cpus}: {f:?}");
        assert!(f.message.contains("rule cpus:"), "{cpus}: {}", f.message);
    }
    assert!(containers_of(&agent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_bounded_by_the_policys_process_cap() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let args = policy_file(dir.path(), r#"{"max_pids_per_container": 16}"#);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(dir.path(), "forky", &args, &[]).await;
    // No pids_limit asked: the policy's cap applies. The shell prints how
    // many processes it started; busybox's shell ends at the first fork
    // the kernel refuses.
    let bomb = run(
        LOCAL_IMAGE,
        &[
            "sh",
            "-c",
            "for i in $(seq 200); do sleep 300 & echo $i; done; echo all-started",
        ],
    );
    let (c, r) = run_container(&b, &v.id, bomb).await;
    let rc = started(r);
    exit_of(&b, &v.id, &c).await;
    assert_eq!(
        docker_out(&[
            "inspect",
            "-f",
            "{{.HostConfig.PidsLimit}}",
            &rc.container_id
        ]),
        "16"
    );
    let logs = std::process::Command::new("docker")
        .args(["logs", &rc.container_id])
        .output()
        .expect("docker logs");
    let text =
        String::from_utf8_lossy(&logs.stdout).to_string() + &String::from_utf8_lossy(&logs.stderr);
    assert!(text.contains("can't fork"), "{text}");
    assert!(!text.contains("all-started"), "{text}");
    let most = text
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!((1..16).contains(&most), "{most} processes started: {text}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_cannot_start_is_removed_and_stops_counting() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let args = policy_file(dir.path(), r#"{"max_cpus_total": 1.0}"#);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(dir.path(), "nostart", &args, &[]).await;
    let whole_core = |cmd: &[&str]| proto::RunContainer {
        cpus: 1.0,
        ..run(LOCAL_IMAGE, cmd)
    };
    // Twice: a failed start that kept counting would refuse the second
    // on the policy's total.
    for _ in 0..2 {
        let (_, r) = run_container(&b, &v.id, whole_core(&["/no/such/binary"])).await;
        assert_eq!(r.status, CommandStatus::Failed as i32, "{r:?}");
        assert!(r.message.contains("no such file"), "{}", r.message);
        assert!(
            r.message.contains("the container was removed"),
            "{}",
            r.message
        );
        assert!(
            containers_of(&v.id).is_empty(),
            "{:?}",
            containers_of(&v.id)
        );
    }
    let (_, r) = run_container(&b, &v.id, whole_core(&["sleep", "60"])).await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_uplink_did_not_create_are_refused_by_every_command_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(dir.path(), "neighbours", &[], &[]).await;
    let unlabelled = Foreign::start(&[]);
    let other_agent = Foreign::start(&["--label", "uplink.agent=agt_someone_else"]);
    for foreign in [&unlabelled, &other_agent] {
        let started_at = foreign.inspect("{{.State.StartedAt}}");
        let name = foreign.inspect("{{.Name}}");
        let name = name.trim_start_matches('/');
        for target in [foreign.0.as_str(), &foreign.0[..12], name] {
            let commands = [
                Kind::StopContainer(proto::StopContainer {
                    container: target.into(),
                    timeout_s: 1,
                }),
                Kind::RemoveContainer(proto::RemoveContainer {
                    container: target.into(),
                    force: true,
                }),
                Kind::ContainerLogs(proto::ContainerLogs {
                    container: target.into(),
                    tail: 10,
                }),
            ];
            for kind in commands {
                let what = format!("{kind:?}");
                let r = exec(&b, &v.id, kind, Duration::from_secs(30)).await;
                assert_eq!(r.status, CommandStatus::Refused as i32, "{what}: {r:?}");
                assert!(
                    r.message.contains("not created by this agent"),
                    "{what}: {}",
                    r.message
                );
            }
        }
        // Joining its network namespace is refused too.
        let join = proto::RunContainer {
            network: format!("container:{}", foreign.0),
            ..run(LOCAL_IMAGE, &["true"])
        };
        let r = exec(&b, &v.id, Kind::RunContainer(join), Duration::from_secs(30)).await;
        assert_refused(&r, "network");
        // Untouched: still running, never restarted.
        assert_eq!(foreign.inspect("{{.State.Running}}"), "true");
        assert_eq!(foreign.inspect("{{.State.StartedAt}}"), started_at);
    }
    // And not listed as this agent's.
    let r = exec(
        &b,
        &v.id,
        Kind::ListContainers(proto::ListContainers {}),
        Duration::from_secs(30),
    )
    .await;
    let Some(proto::command_result::Detail::ListContainers(list)) = r.detail else {
        panic!("{r:?}")
    };
    assert!(list.containers.is_empty(), "{list:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_the_agent_runs_in_is_never_listed_or_touched_even_with_its_label() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let agent = format!("agt_own{}", std::process::id());
    let _cleanup = Cleanup(agent.clone());
    // The worst case: the agent's own container carries its label, so
    // only the own-container rule keeps it out.
    let own = Foreign::start(&["--label", &format!("uplink.agent={agent}")]);
    let docker = || async { uplink::agent::docker::connect().await.expect("docker") };
    let unaware = uplink::agent::docker::Engine::new(docker().await, &agent);
    let listed = unaware.list().await.unwrap();
    assert_eq!(listed.len(), 1, "the label matches: {listed:?}");
    let engine = uplink::agent::docker::Engine::new(docker().await, &agent)
        .with_own_container(Some(own.0.clone()));
    let started_at = own.inspect("{{.State.StartedAt}}");
    assert!(engine.list().await.unwrap().is_empty());
    assert_eq!(engine.usage().await.unwrap().containers, 0);
    let name = own.inspect("{{.Name}}");
    for target in [own.0.as_str(), &own.0[..12], name.trim_start_matches('/')] {
        let refusals = [
            engine.stop(target, 1).await.unwrap_err(),
            engine.remove(target, true).await.unwrap_err(),
            engine.logs(target, 10).await.unwrap_err(),
        ];
        for f in refusals {
            assert_eq!(f.status, CommandStatus::Refused, "{target}: {f:?}");
            assert!(f.message.contains("never touches its own"), "{}", f.message);
        }
    }
    assert_eq!(own.inspect("{{.State.Running}}"), "true");
    assert_eq!(own.inspect("{{.State.StartedAt}}"), started_at);
}
