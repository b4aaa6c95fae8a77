//! `uplink health` against real processes: the backend binary on a
//! loopback port, agents as processes on each rung, stopped, killed and
//! hung, and the command a container image runs (`uplink health` with
//! both `UPLINK_STATE_DIR` and `UPLINK_DATA_DIR` naming one directory).

use std::path::Path;
use std::time::Duration;

use uplink_testkit::hostile::BackendProc;
use uplink_testkit::*;

/// Waits until `uplink health ARGS` (with `envs`) exits with `code`, and
/// returns its line.
async fn health_becomes(args: &[&str], envs: &[(&str, &str)], code: i32, what: &str) -> String {
    wait_for(Duration::from_secs(30), what, || async {
        let (c, line) = health(args, envs).await;
        (c == Some(code)).then_some(line)
    })
    .await
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An agent of `b` with its state in `state`, on `rung`, without metrics.
fn agent_on(b: &BackendProc, state: &Path, rung: &str) -> Proc {
    b.agent_with(
        state,
        &format!("health-{rung}"),
        &["--transport", rung, "--no-metrics"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_backend_is_healthy_until_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = BackendProc::start(dir.path(), None, &[]).await;
    let data = dir.path().join("data");
    // The image's command: both directories in the environment, one volume.
    let env = [
        ("UPLINK_STATE_DIR", path(&data)),
        ("UPLINK_DATA_DIR", path(&data)),
    ];
    let line = health_becomes(&[], &env, 0, "a healthy backend").await;
    assert!(
        line.starts_with(&format!("backend serving on 127.0.0.1:{}", b.port))
            && line.contains(&format!("127.0.0.1:{} answered HTTP", b.port))
            && line.contains("over TLS"),
        "{line}"
    );
    // Owner-only, like the rest of the data dir.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("health-backend.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // With the flag and the role, too.
    let (code, _) = health(&["--data-dir", path(&data), "--role", "backend"], &[]).await;
    assert_eq!(code, Some(0));

    assert!(b.proc.terminate(Duration::from_secs(15)).await.success());
    let (code, line) = health(&[], &env).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("backend (pid ") && line.contains("stopped at"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_is_healthy_on_each_rung_and_not_once_its_backend_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = BackendProc::start(dir.path(), None, &[]).await;
    let mut agents = Vec::new();
    for rung in ["grpc", "longpoll"] {
        let state = dir.path().join(format!("agent-{rung}"));
        let a = agent_on(&b, &state, rung);
        let env = [
            ("UPLINK_STATE_DIR", path(&state)),
            ("UPLINK_DATA_DIR", path(&state)),
        ];
        let line = health_becomes(&[], &env, 0, &format!("an agent connected on {rung}")).await;
        assert!(
            line.starts_with(&format!(
                "agent connected on {rung} to https://127.0.0.1:{}/ since ",
                b.port
            )) && line.contains("last contact"),
            "{line}\n{}",
            a.logs()
        );
        agents.push((rung, state, a));
    }

    // The backend goes: each agent says so well within the max age.
    let stopped = std::time::Instant::now();
    assert!(b.proc.terminate(Duration::from_secs(15)).await.success());
    for (rung, state, a) in &agents {
        let line = health_becomes(
            &["--state-dir", path(state), "--role", "agent"],
            &[],
            1,
            &format!("the agent on {rung} not connected"),
        )
        .await;
        assert!(
            line.starts_with("agent not connected to https://127.0.0.1:")
                && line.contains("last error: "),
            "{rung}: {line}\n{}",
            a.logs()
        );
    }
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    for (_, _, mut a) in agents {
        assert!(a.terminate(Duration::from_secs(15)).await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_stale_after_the_max_age_and_a_killed_one_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &[]).await;
    let state = dir.path().join("agent");
    let mut a = agent_on(&b, &state, "grpc");
    let args = ["--state-dir", path(&state), "--max-age", "10s"];
    health_becomes(&args, &[], 0, "a connected agent").await;
    let pid = a.child.id().unwrap().to_string();

    // Stopped, not gone: its file ages past --max-age.
    let stop = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    stop("-STOP");
    let line = health_becomes(&args, &[], 1, "a hung agent called stale").await;
    assert!(
        line.starts_with(&format!("stale: agent pid {pid} last updated "))
            && line.contains("(--max-age 10s): the process runs but is hung"),
        "{line}"
    );
    stop("-CONT");
    health_becomes(&args, &[], 0, "the agent healthy again").await;

    // Killed: the pid is gone, which is said before the file is old.
    a.kill9().await;
    let (code, line) = health(&args, &[]).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with(&format!("stale: agent pid {pid} is gone; ")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_directory_the_running_process_speaks_and_each_role_can_be_asked() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &[]).await;
    let shared = dir.path().join("data");
    let mut a = agent_on(&b, &shared, "grpc");
    let env = [
        ("UPLINK_STATE_DIR", path(&shared)),
        ("UPLINK_DATA_DIR", path(&shared)),
    ];
    let line = health_becomes(&["--role", "agent"], &env, 0, "the agent").await;
    assert!(line.starts_with("agent connected on grpc"), "{line}");
    let (code, line) = health(&["--role", "backend"], &env).await;
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("backend serving"), "{line}");
    let (code, line) = health(&[], &env).await;
    assert_eq!(code, Some(0), "{line}");

    // The agent killed: its file is the freshest, but the running backend
    // speaks for the place.
    a.kill9().await;
    let (code, line) = health(&["--role", "agent"], &env).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("is gone"), "{line}");
    let (code, line) = health(&[], &env).await;
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("backend serving"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_named_and_bad_flags_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("no-agent-here");
    let data = dir.path().join("no-backend-here");
    let (code, line) = health(
        &[],
        &[
            ("UPLINK_STATE_DIR", path(&state)),
            ("UPLINK_DATA_DIR", path(&data)),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("no status file: ")
            && line.contains(&format!("no directory {}", state.display()))
            && line.contains("UPLINK_STATE_DIR")
            && line.contains(&format!("no directory {}", data.display()))
            && line.contains("UPLINK_DATA_DIR"),
        "{line}"
    );
    // A directory without a file names the file.
    let (code, line) = health(&["--state-dir", path(dir.path()), "--role", "agent"], &[]).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.contains(&format!(
            "no {}",
            dir.path().join("health-agent.json").display()
        )),
        "{line}"
    );
    // A file that is not a status file is named with what is wrong.
    std::fs::write(dir.path().join("health-agent.json"), b"{}").unwrap();
    let (code, line) = health(&["--state-dir", path(dir.path()), "--role", "agent"], &[]).await;
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.contains("is not a status file (missing field"),
        "{line}"
    );

    for bad in [
        &["--role", "frontend"][..],
        &["--max-age", "soon"],
        &["--max-age", "1s"],
        &["--timeout", "0"],
        &["--no-such-flag"],
    ] {
        let (code, text) = health(bad, &[]).await;
        assert_eq!(code, Some(64), "{bad:?}: {text}");
    }
}
