//! Credentials and data at rest, with the real binary as agent and a real
//! TLS backend on loopback: revoking agents on both rungs, caps and expiry
//! of enrollment tokens, and owner-only files on both sides.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use uplink::client::{CallError, ConnectClient, FailureKind};
use uplink::proto;
use uplink::secret::Secret;
use uplink_testkit::*;

/// The stored credential of the agent whose state dir is `state`.
fn credential(state: &Path) -> Secret {
    let id = uplink::agent::identity::load(state)
        .unwrap()
        .expect("enrolled");
    Secret::new(id.credential)
}

/// A `Report` over Connect (the long-poll rung's unary call) with
/// `credential`.
async fn report_with(
    b: &TestBackend,
    credential: &Secret,
) -> Result<proto::ReportResponse, CallError> {
    ConnectClient::new(&b.url, &b.net())
        .with_auth(credential.clone())
        .call(
            "uplink.v1.AgentService",
            "Report",
            &proto::ReportRequest::default(),
            Duration::from_secs(10),
        )
        .await
}

/// A `Subscribe` over gRPC with `credential`: the status it is refused
/// with (None when a stream opens).
async fn subscribe_with(b: &TestBackend, credential: &Secret) -> Option<tonic::Status> {
    let mut req = tonic::Request::new(proto::SubscribeRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", credential.expose()).parse().unwrap(),
    );
    b.agent_grpc().await.subscribe(req).await.err()
}

fn assert_refused_as_revoked(e: &CallError) {
    assert_eq!(
        e.kind,
        FailureKind::Status(tonic::Code::Unauthenticated),
        "{e}"
    );
    assert!(
        e.message.contains("was revoked") && e.message.contains("enroll it again"),
        "the refusal says what happened and what to do: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_at_once_on_both_rungs_and_refused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    // Long enough that only the revocation can end a stream or a held
    // poll within the test's bounds (no heartbeat check, no hold expiry).
    cfg.heartbeat = Duration::from_secs(120);
    cfg.poll_hold = Duration::from_secs(120);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let admin = b.admin();
    let mut agents = Vec::new();
    for rung in ["grpc", "longpoll"] {
        let state = dir.path().join(format!("agent-{rung}"));
        let host = format!("host-{rung}");
        let a = agent(&b, rung, &state, &host);
        let view = connected_agent(&admin, &host, rung).await;
        agents.push((rung, state, a, view));
    }
    // A bystander of the same provider keeps working throughout.
    let other_state = dir.path().join("agent-other");
    let _other = agent(&b, "grpc", &other_state, "host-other");
    let other = connected_agent(&admin, "host-other", "grpc").await;

    for (rung, _, _, view) in &agents {
        let out = ctl(&b, &["agents", "revoke", &view.id]).await;
        assert!(out.status.success(), "{rung}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("revoked"), "{text}");
    }
    // Both connections end now, not at a heartbeat or a hold's end.
    for (rung, _, a, _) in &agents {
        a.wait_log(
            &["cannot connect", "was revoked by the operator"],
            Duration::from_secs(20),
        )
        .await;
        eprintln!("{rung}: cut");
    }
    let listed = ctl(&b, &["agents"]).await;
    let table = String::from_utf8_lossy(&listed.stdout);
    for (rung, _, _, view) in &agents {
        let line = table
            .lines()
            .find(|l| l.starts_with(&view.id))
            .unwrap_or_else(|| panic!("{rung}: {table}"));
        assert!(line.contains("revoked"), "{line}");
    }
    let json = ctl(&b, &["agents", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let revoked = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["revoked_unix_ms"].as_i64().unwrap() > 0)
        .count();
    assert_eq!(revoked, 2, "{json}");

    // Every later call with their credentials is refused, on both faces,
    // and after a restart of the backend too.
    let b = {
        let (cfg, addr) = b.stop().await;
        TestBackend::start_with(cfg, addr).await
    };
    for (rung, state, _, _) in &agents {
        let c = credential(state);
        let e = report_with(&b, &c).await.expect_err("refused");
        assert_refused_as_revoked(&e);
        let s = subscribe_with(&b, &c).await.expect("refused");
        assert_refused_as_revoked(&CallError::from_tonic(&s));
        eprintln!("{rung}: refused after restart");
    }
    // The bystander is served.
    report_with(&b, &credential(&other_state))
        .await
        .expect("another agent keeps working");
    let p = b
        .admin()
        .ping(&other.id, "still here", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(p.view.state, proto::CommandState::Done as i32);
    // Revoking an unknown agent says so.
    let out = ctl(&b, &["agents", "revoke", "agt_nobody"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent"),
        "{out:?}"
    );
    b.stop().await;
}

/// Enrolls directly with `token`; the status of a refusal.
async fn enroll_with(b: &TestBackend, token: &str) -> Result<proto::EnrollResponse, tonic::Status> {
    enroll_as(b, token, "", "h", "1").await
}

/// Enrolls directly with `token`, idempotency key `key` and this hostname
/// and version; the status of a refusal.
async fn enroll_as(
    b: &TestBackend,
    token: &str,
    key: &str,
    hostname: &str,
    version: &str,
) -> Result<proto::EnrollResponse, tonic::Status> {
    b.agent_grpc()
        .await
        .enroll(proto::EnrollRequest {
            enrollment_token: token.into(),
            idempotency_key: key.into(),
            info: Some(proto::AgentInfo {
                hostname: hostname.into(),
                version: version.into(),
                ..Default::default()
            }),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The enrollment token `ctl providers create|rotate` printed.
fn printed_token(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    text.lines()
        .find_map(|l| l.split("(shown once): ").nth(1))
        .unwrap_or_else(|| panic!("no token in {text}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_stop_at_their_cap_and_at_their_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;

    // A cap of 2.
    let out = ctl(&b, &["providers", "create", "capped", "--max-agents", "2"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("at most 2 agents"),
        "{out:?}"
    );
    let token = printed_token(&out);
    for _ in 0..2 {
        enroll_with(&b, &token).await.expect("within the cap");
    }
    let s = enroll_with(&b, &token).await.expect_err("past the cap");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("as many agents as it may") && s.message().contains("rotate"),
        "{s:?}"
    );
    let table = ctl(&b, &["providers"]).await;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let line = table.lines().find(|l| l.starts_with("capped")).unwrap();
    assert!(line.contains("2/2"), "{table}");
    // A new token starts a new count.
    let out = ctl(&b, &["providers", "rotate", "capped", "--max-agents", "1"]).await;
    let token = printed_token(&out);
    enroll_with(&b, &token)
        .await
        .expect("the new token's first");
    assert!(enroll_with(&b, &token).await.is_err());

    // An expiry.
    let out = ctl(&b, &["providers", "create", "brief", "--expires-in", "3s"]).await;
    let token = printed_token(&out);
    enroll_with(&b, &token).await.expect("before the expiry");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = enroll_with(&b, &token).await.expect_err("after the expiry");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("expired"), "{s:?}");
    let table = ctl(&b, &["providers"]).await;
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let line = table.lines().find(|l| l.starts_with("brief")).unwrap();
    assert!(line.contains("(expired)"), "{table}");

    // Limits that make no sense are refused before a token exists.
    let out = ctl(
        &b,
        &["providers", "create", "odd", "--max-agents", "2000000"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_agents"),
        "{out:?}"
    );
    b.stop().await;
}

/// Every entry under `dir` whose mode lets others in, with its mode.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        // A running process replaces its status file by a rename: its
        // temporary file may be gone by now.
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            found.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_and_state_dir_are_owner_only_even_when_made_open_before() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("backend");
    let b = TestBackend::start(&data).await;
    let state = dir.path().join("agent");
    let mut a = agent(&b, "grpc", &state, "host-modes");
    let view = connected_agent(&b.admin(), "host-modes", "grpc").await;
    let p = b
        .admin()
        .ping(&view.id, "x", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(p.view.state, proto::CommandState::Done as i32);
    for d in [&data, &state] {
        let open = open_to_others(d);
        assert!(open.is_empty(), "readable by others: {open:?}");
    }
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in ["uplink.db", "uplink.db-wal", "ca-key.pem"] {
        assert!(names.iter().any(|n| n == f), "{f} in {names:?}");
    }

    // Opened up by hand (or by an older build) while stopped: both sides
    // close them again at start.
    assert!(a.terminate(Duration::from_secs(10)).await.success());
    let (cfg, addr) = b.stop().await;
    for d in [&data, &state] {
        let mut todo = vec![d.to_path_buf()];
        while let Some(p) = todo.pop() {
            let meta = std::fs::metadata(&p).unwrap();
            let mode = if meta.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            if meta.is_dir() {
                todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        assert!(!open_to_others(d).is_empty());
    }
    let b = TestBackend::start_with(cfg, addr).await;
    let _a = agent(&b, "grpc", &state, "host-modes");
    connected_agent(&b.admin(), "host-modes", "grpc").await;
    for d in [&data, &state] {
        let open = open_to_others(d);
        assert!(
            open.is_empty(),
            "readable by others after a restart: {open:?}"
        );
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_rotate_their_credentials_under_traffic_without_losing_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    for rung in ["grpc", "longpoll"] {
        let state = dir.path().join(format!("agent-{rung}"));
        let host = format!("rot-{rung}");
        let start = |state: &Path| {
            agent_via(
                &b,
                &b.url.to_string(),
                state,
                &host,
                &["--transport", rung, "--credential-max-age", "1s"],
                &[],
            )
        };
        let mut a = start(&state);
        let view = connected_agent(&admin, &host, rung).await;
        let first = credential(&state);

        // Pings one after another while the credential changes about
        // every second: each is answered once, none is lost.
        let mut ids = Vec::new();
        let began = std::time::Instant::now();
        while began.elapsed() < Duration::from_secs(6) || a.count(&["credential rotated"]) < 3 {
            assert!(
                began.elapsed() < Duration::from_secs(90),
                "{rung}: fewer than 3 rotations in 90 s:\n{}",
                a.logs()
            );
            let p = admin
                .ping(&view.id, "under rotation", Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(
                p.view.state,
                proto::CommandState::Done as i32,
                "{rung}: {:?}\n{}",
                p.view,
                a.logs()
            );
            assert_eq!(
                p.view.result.unwrap().status,
                proto::CommandStatus::Ok as i32
            );
            ids.push(p.command_id);
        }
        assert!(ids.len() >= 3, "{rung}: {ids:?}");
        // The first credential is gone; the stored one works.
        let now = credential(&state);
        assert_ne!(now.expose(), first.expose(), "{rung}");
        let e = report_with(&b, &first)
            .await
            .expect_err("the old one is refused");
        assert_eq!(
            e.kind,
            FailureKind::Status(tonic::Code::Unauthenticated),
            "{e}"
        );

        // A crash at any moment of a rotation leaves a credential that
        // works: kill -9 at spread offsets, restart, and get an answer.
        for i in 0..4u64 {
            tokio::time::sleep(Duration::from_millis(250 * i + 100)).await;
            a.kill9().await;
            a = start(&state);
            let again = connected_agent(&admin, &host, rung).await;
            assert_eq!(
                again.id, view.id,
                "{rung}: the same agent, not a new enrollment"
            );
            let p = admin
                .ping(&view.id, "after a crash", Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(
                p.view.state,
                proto::CommandState::Done as i32,
                "{rung} crash {i}: {:?}\n{}",
                p.view,
                a.logs()
            );
        }
        let logs = a.logs();
        assert!(!logs.contains(now.expose()), "credential leaked:\n{logs}");
    }
    assert_eq!(admin.agents("").await.unwrap().len(), 2);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_backend_ends_a_stream_held_by_another_sharing_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("backend");
    let b1 = TestBackend::start(&data).await;
    // A second backend over the same store, as a replica would be.
    let b2 = TestBackend::start_with(b1.config.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let state = dir.path().join("agent");
    let a = agent(&b2, "grpc", &state, "host-replica");
    let view = connected_agent(&b2.admin(), "host-replica", "grpc").await;
    let out = ctl(&b1, &["agents", "revoke", &view.id]).await;
    assert!(out.status.success(), "{out:?}");
    // b2's hub heard nothing: its stream ends at its next heartbeat (2 s
    // in tests), when it reads the store.
    a.wait_log(
        &["cannot connect", "was revoked by the operator"],
        Duration::from_secs(30),
    )
    .await;
    let e = report_with(&b2, &credential(&state))
        .await
        .expect_err("refused by the other backend too");
    assert_refused_as_revoked(&e);
    b2.stop().await;
    b1.stop().await;
}

/// An enrollment without a hostname or version is refused, naming the
/// field (before: accepted, and the agent was taken for anonymous ever
/// after: never shown connected, no runs placed on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_without_hostname_or_version_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let token = b.enroll_token.expose().to_string();
    let cases = [
        ("", "1", "info.hostname"),
        ("h", "", "info.version"),
        ("", "", "info.hostname"),
    ];
    for (hostname, version, field) in cases {
        let s = enroll_as(&b, &token, "", hostname, version)
            .await
            .expect_err("an agent the backend cannot show is refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(field), "{s:?}");
    }
    // A bad token is still told apart first.
    let s = enroll_with(&b, "upl_e_nope")
        .await
        .expect_err("unknown token");
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    enroll_with(&b, &token)
        .await
        .expect("a complete AgentInfo enrolls");
    b.stop().await;
}

/// `Enroll` retried with the same idempotency key (its answer lost on the
/// way) gives the same agent and a new credential, the earlier one dead;
/// without a key every enrollment is a new agent, as before (before the
/// key: each retry left an orphan agent behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_retried_with_its_key_is_the_same_agent() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let token = b.enroll_token.expose().to_string();
    let enroll = |key: &str| {
        let (b, token, key) = (&b, token.clone(), key.to_string());
        async move { enroll_as(b, &token, &key, "h", "1").await }
    };
    let key = "k".repeat(32);
    let first = enroll(&key).await.expect("enrolls");
    let again = enroll(&key).await.expect("enrolls again");
    assert_eq!(again.agent_id, first.agent_id, "the same agent");
    assert_ne!(again.credential, first.credential);
    let old = report_with(&b, &Secret::new(first.credential)).await;
    assert!(old.is_err(), "the first credential, never stored, is dead");
    report_with(&b, &Secret::new(again.credential))
        .await
        .expect("the new credential works");
    // Another key, and no key: new agents.
    let other = enroll(&"o".repeat(32)).await.unwrap();
    let plain = enroll("").await.unwrap();
    assert_ne!(other.agent_id, first.agent_id);
    assert_ne!(plain.agent_id, enroll("").await.unwrap().agent_id);
    assert_eq!(b.admin().agents("").await.unwrap().len(), 4);
    // A key that is no random id is refused.
    let s = enroll("short").await.expect_err("too short");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("idempotency_key"), "{s:?}");
    b.stop().await;
}

/// The real agent sends a key and forgets it once its identity is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_forgets_its_enrollment_key_once_enrolled() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let state = dir.path().join("agent");
    let _a = agent(&b, "grpc", &state, "host-key");
    connected_agent(&b.admin(), "host-key", "grpc").await;
    assert!(state.join("identity.json").exists());
    assert!(!state.join("enroll-key").exists());
    b.stop().await;
}
