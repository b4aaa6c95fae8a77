//! The executor against the real Docker engine on this machine: pulls from
//! a registry on loopback, containers run to completion, stopped, OOM-killed,
//! refused by the local policy, and an engine that is not there.

use std::collections::HashMap;
use std::time::Duration;

use uplink::proto::{self, CommandStatus, command_spec::Kind};
use uplink_testkit::docker::{
    LOCAL_IMAGE, Registry, containers_of, ensure_image, remove_containers_of,
};
use uplink_testkit::*;

mod hostile;

fn spec(kind: Kind) -> proto::CommandSpec {
    proto::CommandSpec { kind: Some(kind) }
}

fn run(image: &str, cmd: &[&str]) -> proto::RunContainer {
    proto::RunContainer {
        image: image.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        cpus: 0.5,
        memory_bytes: 64 << 20,
        ..Default::default()
    }
}

async fn exec(b: &TestBackend, agent: &str, kind: Kind, timeout: Duration) -> proto::CommandResult {
    exec_command(b, agent, kind, timeout).await.1
}

/// Enqueues `kind` on `agent` and waits for its result: the command's id
/// and the result.
async fn exec_command(
    b: &TestBackend,
    agent: &str,
    kind: Kind,
    timeout: Duration,
) -> (String, proto::CommandResult) {
    let admin = b.admin();
    let c = admin.enqueue(agent, spec(kind)).await.expect("enqueue");
    let r = result_of(&admin, &c.id, timeout)
        .await
        .result
        .expect("result");
    (c.id, r)
}

/// Runs `rc` on `agent` within a minute: the command's id and its result.
async fn run_container(
    b: &TestBackend,
    agent: &str,
    rc: proto::RunContainer,
) -> (String, proto::CommandResult) {
    exec_command(b, agent, Kind::RunContainer(rc), Duration::from_secs(60)).await
}

/// The `RunContainer` detail of a result; any other result panics.
fn started(r: proto::CommandResult) -> proto::RunContainerResult {
    let Some(proto::command_result::Detail::RunContainer(rc)) = r.detail else {
        panic!("{r:?}")
    };
    rc
}

/// Waits for the first container event of `agent` the backend has stored
/// that `matches`; `what` names it in the timeout's message.
async fn event_where(
    b: &TestBackend,
    agent: &str,
    what: &str,
    matches: impl Fn(&proto::ContainerEvent) -> bool,
) -> proto::ContainerEvent {
    wait_for(Duration::from_secs(30), what, || async {
        b.core
            .store()
            .container_events(agent)
            .await
            .ok()?
            .into_iter()
            .find(|e| matches(e))
    })
    .await
}

/// Waits for the exit event of the container created by `command`.
async fn exit_of(b: &TestBackend, agent: &str, command: &str) -> proto::ContainerEvent {
    let what = format!("exit event of {command}");
    event_where(b, agent, &what, |e| e.command_id == command).await
}

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_containers_of(&self.0);
    }
}

/// A backend and one agent on it, connected over gRPC; the agent's
/// containers are removed when this is dropped (first of its parts).
struct Host {
    _cleanup: Cleanup,
    a: Proc,
    v: proto::AgentView,
    b: TestBackend,
}

/// Starts a backend in `dir/backend` and an agent reporting `hostname`
/// with its state in `dir/a`, then waits until it is connected.
async fn host(dir: &std::path::Path, hostname: &str, args: &[&str], env: &[(&str, &str)]) -> Host {
    let b = TestBackend::start(&dir.join("backend")).await;
    let a = agent_via(&b, &b.url.to_string(), &dir.join("a"), hostname, args, env);
    let v = connected_agent(&b.admin(), hostname, "grpc").await;
    Host {
        _cleanup: Cleanup(v.id.clone()),
        a,
        v,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_runs_stops_and_reports_exits_through_the_real_engine() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path()).await;
    let Host { b, a, v, _cleanup } = host(dir.path(), "docker-host", &[], &[]).await;
    let on = |kind| exec(&b, &v.id, kind, Duration::from_secs(30));
    let pull = |image| {
        let kind = Kind::PullImage(proto::PullImage { image, auth: None });
        exec(&b, &v.id, kind, Duration::from_secs(60))
    };

    // Pull from the registry on loopback, with progress.
    let r = pull(reg.image()).await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    assert!(a.count(&["pull progress"]) >= 1, "{}", a.logs());
    // A missing image is named as such.
    let missing = format!("127.0.0.1:{}/loadgen/nope:1", reg.port);
    let r = pull(missing).await;
    assert_eq!(r.status, CommandStatus::Failed as i32);
    assert!(r.message.contains("not found"), "{}", r.message);

    // Run to completion: started, then the exit code arrives as an event.
    let (c, r) = run_container(
        &b,
        &v.id,
        run(&reg.image(), &["sh", "-c", "echo hi; exit 3"]),
    )
    .await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    let rc = started(r);
    let ev = exit_of(&b, &v.id, &c).await;
    assert_eq!(
        (ev.exit_code, ev.oom_killed, ev.container_id.as_str()),
        (3, false, rc.container_id.as_str())
    );
    // Its logs come back through the command path, secrets redacted.
    let mut with_secret = run(&reg.image(), &["sh", "-c", "echo token is $API_TOKEN"]);
    with_secret.env = HashMap::from([("API_TOKEN".to_string(), "tok-123456".to_string())]);
    let (c2, r) = run_container(&b, &v.id, with_secret).await;
    let rc2 = started(r);
    exit_of(&b, &v.id, &c2).await;
    let r = on(Kind::ContainerLogs(proto::ContainerLogs {
        container: rc2.name.clone(),
        tail: 10,
    }))
    .await;
    let Some(proto::command_result::Detail::ContainerLogs(logs)) = r.detail else {
        panic!("{r:?}")
    };
    assert_eq!(logs.lines, vec!["token is [redacted]".to_string()]);

    // Stop a long-running one.
    let (c, r) = run_container(&b, &v.id, run(&reg.image(), &["sleep", "300"])).await;
    let long = started(r);
    let r = on(Kind::StopContainer(proto::StopContainer {
        container: long.name.clone(),
        timeout_s: 1,
    }))
    .await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    let ev = exit_of(&b, &v.id, &c).await;
    assert_eq!(ev.exit_code, 137, "SIGKILL after the grace time: {ev:?}");

    // OOM-killed under its memory limit.
    let mut hog = run(
        &reg.image(),
        &["sh", "-c", "x=a; while true; do x=$x$x; done"],
    );
    hog.memory_bytes = 16 << 20;
    let (c, _) = run_container(&b, &v.id, hog).await;
    let ev = exit_of(&b, &v.id, &c).await;
    assert!(ev.oom_killed, "{ev:?}");

    // List shows only this agent's containers, with their labels.
    let r = on(Kind::ListContainers(proto::ListContainers {})).await;
    let Some(proto::command_result::Detail::ListContainers(list)) = r.detail else {
        panic!("{r:?}")
    };
    assert_eq!(list.containers.len(), 4, "{list:?}");
    assert!(
        list.containers
            .iter()
            .all(|c| c.command_id.starts_with("cmd_"))
    );

    // Remove.
    let r = on(Kind::RemoveContainer(proto::RemoveContainer {
        container: long.name,
        force: true,
    }))
    .await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    assert_eq!(containers_of(&v.id).len(), 3);
    // A container that is not this agent's is refused.
    let r = on(Kind::StopContainer(proto::StopContainer {
        container: "not-ours".into(),
        timeout_s: 1,
    }))
    .await;
    assert_ne!(r.status, CommandStatus::Ok as i32);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_policy_refuses_before_any_docker_call() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(
        dir.path(),
        "strict-host",
        &["--allow-image", "uplink-test/*"],
        &[],
    )
    .await;
    let ok = run(LOCAL_IMAGE, &["true"]);
    let cases: Vec<(proto::RunContainer, &str)> = vec![
        (
            proto::RunContainer {
                privileged: true,
                ..ok.clone()
            },
            "privileged",
        ),
        (
            proto::RunContainer {
                binds: vec![proto::BindMount {
                    host_path: "/".into(),
                    container_path: "/host".into(),
                    read_only: false,
                }],
                ..ok.clone()
            },
            "bind_mount",
        ),
        (
            proto::RunContainer {
                network: "host".into(),
                ..ok.clone()
            },
            "host_network",
        ),
        (
            proto::RunContainer {
                image: "docker.io/library/alpine:3".into(),
                ..ok.clone()
            },
            "image_not_allowed",
        ),
        (
            proto::RunContainer {
                cpus: 0.0,
                memory_bytes: 0,
                ..ok.clone()
            },
            "limits_required",
        ),
    ];
    for (spec_, rule) in cases {
        let r = exec(
            &b,
            &v.id,
            Kind::RunContainer(spec_),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(r.status, CommandStatus::Refused as i32, "{rule}: {r:?}");
        assert!(r.message.contains(rule), "{rule}: {}", r.message);
    }
    assert!(
        containers_of(&v.id).is_empty(),
        "a refused command created a container"
    );
    // And an allowed one runs.
    let r = exec(&b, &v.id, Kind::RunContainer(ok), Duration::from_secs(30)).await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    b.stop().await;
}

/// Forwards connections on the unix socket `at` to the real engine's
/// socket: an engine that "comes back" at the path an agent was given.
fn docker_socket_at(at: &std::path::Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(at).expect("bind the forwarding socket");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut engine) =
                    tokio::net::UnixStream::connect("/var/run/docker.sock").await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut engine).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_docker_engine_is_named_and_the_agent_stays_connected_until_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let socket = dir.path().join("docker.sock");
    let docker_host = format!("unix://{}", socket.display());
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(
        dir.path(),
        "no-docker",
        &[],
        &[("DOCKER_HOST", docker_host.as_str())],
    )
    .await;
    let admin = b.admin();
    let run_true = || {
        let kind = Kind::RunContainer(run(LOCAL_IMAGE, &["true"]));
        exec(&b, &v.id, kind, Duration::from_secs(30))
    };
    // The agent's latest capacity report, once there is one.
    let capacity = || async {
        admin
            .agents("")
            .await
            .ok()?
            .into_iter()
            .find(|a| a.id == v.id)?
            .capacity
    };
    let r = run_true().await;
    assert_eq!(r.status, CommandStatus::Failed as i32);
    assert!(
        r.message.starts_with("docker: unavailable ("),
        "{}",
        r.message
    );
    // Its capacity says so, with the reason, and placement names it.
    let cap = wait_for(Duration::from_secs(20), "a capacity report", capacity).await;
    assert!(!cap.docker_available, "{cap:?}");
    assert!(
        cap.docker_status.starts_with("docker: unavailable ("),
        "{cap:?}"
    );
    assert!(cap.cpu_cores >= 1 && cap.memory_bytes > 0, "{cap:?}");
    let e = admin
        .create_run(proto::CreateRunRequest {
            provider: "default".into(),
            image: LOCAL_IMAGE.into(),
            count: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message.contains("docker: unavailable"), "{e:?}");
    // Still connected: pings work.
    let p = admin
        .ping(&v.id, "", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(p.view.state, proto::CommandState::Done as i32);

    // The engine appears at the agent's socket: noticed without a restart.
    let _forward = docker_socket_at(&socket);
    let cap = wait_for(
        Duration::from_secs(30),
        "docker available again",
        || async { capacity().await.filter(|c| c.docker_available) },
    )
    .await;
    assert!(cap.docker_status.starts_with("docker "), "{cap:?}");
    let r = run_true().await;
    assert_eq!(r.status, CommandStatus::Ok as i32, "{r:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_the_same_command_again_creates_no_second_container() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let agent = format!("agt_test{}", std::process::id());
    let _cleanup = Cleanup(agent.clone());
    let engine = uplink::agent::docker::Engine::new(
        uplink::agent::docker::connect().await.expect("docker"),
        &agent,
    );
    let policy = uplink::agent::policy::Policy::default();
    let spec_ = run(LOCAL_IMAGE, &["sleep", "30"]);
    let first = engine.run(&policy, "cmd_same", &spec_).await.unwrap();
    let second = engine.run(&policy, "cmd_same", &spec_).await.unwrap();
    assert!(!first.existed && second.existed);
    assert_eq!(first.container_id, second.container_id);
    assert_eq!(containers_of(&agent).len(), 1);
}

fn docker_out(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn event_of(
    b: &TestBackend,
    agent: &str,
    container: &str,
    kind: proto::ContainerEventKind,
) -> proto::ContainerEvent {
    let what = format!("{kind:?} event of {container}");
    event_where(b, agent, &what, |e| {
        e.kind == kind as i32 && (e.container_id == container || e.name == container)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_agent_adopts_running_containers_reports_exits_and_removes_orphans() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let args = ["--orphan-grace", "2s"];
    let Host {
        b,
        mut a,
        v,
        _cleanup,
    } = host(dir.path(), "crashy", &args, &[]).await;
    let state = dir.path().join("a");
    let (backend, agent) = (&b, v.id.as_str());
    let start = |cmd: &[&str]| {
        let rc = run(LOCAL_IMAGE, cmd);
        async move {
            let timeout = Duration::from_secs(30);
            started(exec(backend, agent, Kind::RunContainer(rc), timeout).await)
        }
    };
    let long = start(&["sleep", "300"]).await;
    let short = start(&["sh", "-c", "sleep 3; exit 7"]).await;
    let started_at = docker_out(&["inspect", "-f", "{{.State.StartedAt}}", &long.container_id]);
    a.kill9().await;

    // While the agent is down: the short one exits, and an orphan appears
    // (a container with this agent's labels that no command accounts for).
    let orphan = docker_out(&[
        "run",
        "-d",
        "--label",
        &format!("uplink.agent={}", v.id),
        "--label",
        "uplink.command=cmd_lost",
        LOCAL_IMAGE,
        "sleep",
        "300",
    ]);
    wait_for(
        Duration::from_secs(20),
        "the short container to exit",
        || async {
            (docker_out(&["inspect", "-f", "{{.State.Running}}", &short.container_id]) == "false")
                .then_some(())
        },
    )
    .await;

    let _a2 = agent_via(&b, &b.url.to_string(), &state, "crashy", &args, &[]);
    let ev = event_of(
        &b,
        &v.id,
        &short.container_id,
        proto::ContainerEventKind::Exited,
    )
    .await;
    assert_eq!(ev.exit_code, 7, "{ev:?}");
    event_of(
        &b,
        &v.id,
        &long.container_id,
        proto::ContainerEventKind::Adopted,
    )
    .await;
    assert_eq!(
        docker_out(&["inspect", "-f", "{{.State.StartedAt}}", &long.container_id]),
        started_at,
        "the adopted container was restarted"
    );
    event_of(&b, &v.id, &orphan, proto::ContainerEventKind::Orphaned).await;
    event_of(&b, &v.id, &orphan, proto::ContainerEventKind::Removed).await;
    assert!(
        docker_out(&["ps", "-aq", "--filter", &format!("id={orphan}")]).is_empty(),
        "orphan not removed"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_never_pass_the_policy_totals_together() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"allowed_images": ["*"], "max_cpus_total": 1.0}"#,
    )
    .unwrap();
    let Host {
        b,
        a: _a,
        v,
        _cleanup,
    } = host(
        dir.path(),
        "totals",
        &["--policy", policy.to_str().unwrap()],
        &[],
    )
    .await;
    let admin = b.admin();
    // Six containers of half a core, queued at once: two fit.
    let mut ids = Vec::new();
    for _ in 0..6 {
        let c = admin
            .enqueue(
                &v.id,
                spec(Kind::RunContainer(run(LOCAL_IMAGE, &["sleep", "60"]))),
            )
            .await
            .unwrap();
        ids.push(c.id);
    }
    let mut ok = 0;
    for id in &ids {
        let r = result_of(&admin, id, Duration::from_secs(60))
            .await
            .result
            .unwrap();
        match CommandStatus::try_from(r.status).unwrap() {
            CommandStatus::Ok => ok += 1,
            CommandStatus::Refused => assert!(r.message.contains("cpu_total"), "{}", r.message),
            other => panic!("{other:?}: {}", r.message),
        }
    }
    assert_eq!(ok, 2, "containers created past the policy's total");
    assert_eq!(containers_of(&v.id).len(), 2);
    b.stop().await;
}
