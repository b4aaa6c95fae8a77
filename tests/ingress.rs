//! The backend behind a TLS-terminating reverse proxy, with real parts:
//! Debian's nginx and HAProxy (HTTP mode) configured as the README says
//! (`docs/ingress/`), and the mistakes operators make with them, each with
//! the agent binary and `doctor`.

use std::path::Path;
use std::time::{Duration, Instant};

use uplink::proto::CommandStatus;
use uplink_testkit::ingress::{Ingress, RunningIngress, haproxy_cfg, nginx_conf};
use uplink_testkit::*;

/// A backend that writes the metric samples it stores as JSON lines.
async fn backend(dir: &Path) -> TestBackend {
    let mut cfg = TestBackend::config(&dir.join("backend"));
    cfg.metrics_jsonl_dir = Some(dir.join("jsonl"));
    TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await
}

/// Metric samples the backend stored.
fn stored_samples(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir.join("jsonl")) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum()
}

/// An agent in auto mode reaching the backend through `ing`, pushing host
/// metrics every second.
fn agent_through(b: &TestBackend, ing: &RunningIngress, dir: &Path, host: &str) -> Proc {
    agent_via(
        b,
        &ing.url(),
        &dir.join(host),
        host,
        &[
            "--transport",
            "auto",
            "--metrics-interval",
            "1s",
            "--metrics-batch-age",
            "1s",
        ],
        &[],
    )
}

/// Sends a ping to the agent on `host`, connected on `transport`, and
/// waits for its success.
async fn ping_ok(b: &TestBackend, host: &str, transport: &str) {
    let admin = b.admin();
    let a = connected_agent(&admin, host, transport).await;
    let id = admin
        .enqueue(&a.id, ping(0, "through the ingress"))
        .await
        .expect("command queued")
        .id;
    let r = result_of(&admin, &id, Duration::from_secs(60)).await;
    assert_eq!(r.result.unwrap().status, CommandStatus::Ok as i32);
}

/// How long a correct ingress is held: two minutes unless
/// `UPLINK_INGRESS_HOLD_SECS` says otherwise.
fn hold() -> Duration {
    Duration::from_secs(
        std::env::var("UPLINK_INGRESS_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    )
}

async fn a_correct_ingress_keeps_the_agent_on_grpc(which: Ingress) {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let ing = RunningIngress::start(&which, &b, &dir.path().join("ingress")).await;
    let agent = agent_through(&b, &ing, dir.path(), "behind-ingress");
    connected_agent(&b.admin(), "behind-ingress", "grpc").await;
    ping_ok(&b, "behind-ingress", "grpc").await;
    wait_for(Duration::from_secs(60), "metric samples stored", || async {
        (stored_samples(dir.path()) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(hold()).await;
    ping_ok(&b, "behind-ingress", "grpc").await;
    let a = connected_agent(&b.admin(), "behind-ingress", "grpc").await;
    assert_eq!(a.transport_reason, "auto: starting on the gRPC stream");
    let logs = agent.logs();
    assert_eq!(agent.count(&["switching rung"]), 0, "{logs}");
    assert_eq!(agent.count(&["metrics not delivered"]), 0, "{logs}");
    assert_eq!(
        agent.count(&["stream open"]),
        1,
        "one stream for the whole hold: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_nginx_as_documented_the_agent_stays_on_grpc_and_every_call_completes() {
    a_correct_ingress_keeps_the_agent_on_grpc(Ingress::nginx()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_haproxy_as_documented_the_agent_stays_on_grpc_and_every_call_completes() {
    a_correct_ingress_keeps_the_agent_on_grpc(Ingress::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_nginx_with_http2_off_the_agent_falls_to_long_poll_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let which = Ingress::nginx_with("listen 443 ssl http2;", "listen 443 ssl;");
    let ing = RunningIngress::start(&which, &b, &dir.path().join("ingress")).await;
    let started = Instant::now();
    let agent = agent_through(&b, &ing, dir.path(), "h2-off");
    let line = agent
        .wait_log(&["switching rung"], Duration::from_secs(30))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5) + enrollment_allowance(),
        "fell after {:?}",
        started.elapsed()
    );
    assert!(line.contains("no_application_protocol"), "{line}");
    let a = connected_agent(&b.admin(), "h2-off", "longpoll").await;
    assert!(a.transport_reason.contains("HTTP/2 cannot pass"), "{a:?}");
    ping_ok(&b, "h2-off", "longpoll").await;
    wait_for(Duration::from_secs(60), "metric samples stored", || async {
        (stored_samples(dir.path()) > 0).then_some(())
    })
    .await;
    assert_eq!(agent.count(&["cannot connect"]), 0, "{}", agent.logs());
}

/// Time an agent may spend enrolling (one Connect call) on a loaded host
/// before its first gRPC attempt.
fn enrollment_allowance() -> Duration {
    Duration::from_secs(10)
}

/// nginx forwarding gRPC with `proxy_pass` (HTTP/1.1 to the backend, as
/// in the location beside it) instead of `grpc_pass`.
fn grpc_as_http1() -> Ingress {
    Ingress::nginx_with(
        "grpc_pass grpcs://uplink_grpc;",
        "proxy_pass https://uplink_grpc; proxy_http_version 1.1;",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_nginx_forwarding_grpc_as_http1_the_agent_warns_once_and_falls() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let ing = RunningIngress::start(&grpc_as_http1(), &b, &dir.path().join("ingress")).await;
    let agent = agent_through(&b, &ing, dir.path(), "http1-grpc");
    let line = agent
        .wait_log(&["switching rung"], Duration::from_secs(90))
        .await;
    assert!(line.contains("forwards gRPC as HTTP/1.1"), "{line}");
    assert!(line.contains("WARN"), "{line}");
    let a = connected_agent(&b.admin(), "http1-grpc", "longpoll").await;
    assert!(a.transport_reason.contains("end to end"), "{a:?}");
    ping_ok(&b, "http1-grpc", "longpoll").await;
    // Once fallen, the metric batches are acknowledged on long-poll.
    let before = stored_samples(dir.path());
    wait_for(Duration::from_secs(60), "metric samples stored", || async {
        (stored_samples(dir.path()) > before).then_some(())
    })
    .await;
    assert_eq!(
        agent.count(&["forwards gRPC as HTTP/1.1"]),
        1,
        "{}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_restart_behind_nginx_keeps_the_agent_on_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let ing = RunningIngress::start(&Ingress::nginx(), &b, &dir.path().join("ingress")).await;
    let agent = agent_through(&b, &ing, dir.path(), "restarted");
    connected_agent(&b.admin(), "restarted", "grpc").await;
    // Enough heartbeats that the cut stream is no early death.
    tokio::time::sleep(b.config.heartbeat * 4).await;
    let (cfg, addr) = b.stop().await;
    agent
        .wait_log(&["502 Bad Gateway"], Duration::from_secs(30))
        .await;
    let b = TestBackend::start_with(cfg, addr).await;
    let back = Instant::now();
    wait_for(Duration::from_secs(60), "a second stream open", || async {
        (agent.count(&["stream open"]) >= 2).then_some(())
    })
    .await;
    // The retry backoff starts at 0.5 s: the agent is back within a few
    // seconds (bounded generously for a loaded host).
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "back on gRPC after {took:?}"
    );
    let a = connected_agent(&b.admin(), "restarted", "grpc").await;
    assert_eq!(
        agent.count(&["switching rung"]),
        0,
        "the agent left gRPC: {}",
        agent.logs()
    );
    assert!(a.transport_reason.starts_with("auto: starting"), "{a:?}");
    ping_ok(&b, "restarted", "grpc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_read_timeout_above_the_heartbeat_keeps_streams_open() {
    // The documented rule: nginx's grpc_read_timeout above the backend's
    // heartbeat (2 s here), so a quiet stream is never idle that long.
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let timeout = b.config.heartbeat * 3;
    let which = Ingress::nginx_with(
        "grpc_read_timeout 1h;",
        &format!("grpc_read_timeout {}s;", timeout.as_secs()),
    );
    let ing = RunningIngress::start(&which, &b, &dir.path().join("ingress")).await;
    let agent = agent_through(&b, &ing, dir.path(), "read-timeout");
    connected_agent(&b.admin(), "read-timeout", "grpc").await;
    tokio::time::sleep(timeout * 5).await;
    assert_eq!(agent.count(&["stream open"]), 1, "{}", agent.logs());
    assert_eq!(agent.count(&["switching rung"]), 0, "{}", agent.logs());
}

/// `uplink doctor` through `ing`, with an enrolled agent's state dir.
async fn doctor(b: &TestBackend, ing: &RunningIngress, state: &Path) -> String {
    let out = tokio::process::Command::new(bin())
        .args(["doctor", "--backend", &ing.url(), "--ca-file"])
        .arg(&b.ca)
        .arg("--state-dir")
        .arg(state)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_through_an_ingress_gives_the_agents_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    // An enrolled agent's credential, for the calls doctor makes.
    let state = dir.path().join("agent");
    let mut agent = agent(&b, "longpoll", &state, "doctor-host");
    connected_agent(&b.admin(), "doctor-host", "longpoll").await;
    agent.terminate(Duration::from_secs(10)).await;
    for (name, which, rung) in [
        ("documented", Ingress::nginx(), "gRPC stream"),
        (
            "http2 off",
            Ingress::nginx_with("listen 443 ssl http2;", "listen 443 ssl;"),
            "long-polling",
        ),
        ("grpc as http/1.1", grpc_as_http1(), "long-polling"),
    ] {
        let ing = RunningIngress::start(&which, &b, &dir.path().join(name.replace(' ', "-"))).await;
        let out = doctor(&b, &ing, &state).await;
        assert!(
            out.contains(&format!("an agent in auto mode would use the {rung}"))
                || out.contains(&format!("an agent in auto mode would use {rung}")),
            "{name}: {out}"
        );
        if name == "grpc as http/1.1" {
            assert!(out.contains("forwards gRPC as HTTP/1.1"), "{out}");
        }
    }
}

#[test]
fn the_readme_shows_the_configurations_the_tests_use() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (lang, conf) in [("nginx", nginx_conf()), ("haproxy", haproxy_cfg())] {
        let block = format!("```{lang}\n{conf}```\n");
        assert!(
            readme.contains(&block),
            "README.md must show docs/ingress/ for {lang} verbatim in a ```{lang} block"
        );
    }
}
