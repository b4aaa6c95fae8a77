//! The backend on PostgreSQL (`--database`, `UPLINK_DATABASE`) against a
//! real server from Debian's packages: agents on both rungs round-trip
//! commands through it and a restarted backend finds them there; bad
//! configuration is one line at start, with status 64 for a URL that is
//! not one and 1 for a database that cannot be used (unreachable, a
//! refused password, a newer schema), and never shows the password; two
//! backends on one database hear each other's changes at once; a gRPC
//! stream stays open while the database restarts; a metric batch two
//! backends wrote is left in one backend's JSON lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uplink::backend::store::DatabaseUrl;
use uplink::proto::{self, CommandStatus};
use uplink_testkit::postgres::Postgres;
use uplink_testkit::*;

/// Runs `uplink backend` with `args` and `envs` until it exits (it must,
/// within 30 s): its status, stderr and how long it ran.
async fn backend_start(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("backend")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_remove("UPLINK_DATABASE")
        // Errors only: what is left on stderr is the one line at exit.
        .env("UPLINK_LOG", "error")
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the backend exits within 30 s")
        .expect("the backend runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// `stderr` is one line, `uplink: ...`, holding every one of `needles`
/// and not `secret`.
fn one_line(stderr: &str, needles: &[&str], secret: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, not: {stderr}");
    assert!(lines[0].starts_with("uplink: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing: {stderr}");
    }
    assert!(!stderr.contains(secret), "the password is shown: {stderr}");
}

#[tokio::test]
async fn a_database_url_that_is_not_one_is_bad_configuration() {
    let (code, err, _) = backend_start(&["--database", "mysql://u:hunter22@db/uplink"], &[]).await;
    assert_eq!(code, Some(64), "{err}");
    one_line(&err, &["--database", "give a PostgreSQL URL"], "hunter22");
    let (code, err, _) = backend_start(
        &[],
        &[("UPLINK_DATABASE", "postgres://u:hunter22@db:port/uplink")],
    )
    .await;
    assert_eq!(code, Some(64), "{err}");
    one_line(&err, &["UPLINK_DATABASE", "invalid"], "hunter22");
}

#[tokio::test]
async fn an_unreachable_database_fails_the_start_in_seconds() {
    let port = free_port();
    let url = format!("postgres://uplink:hunter22@127.0.0.1:{port}/uplink");
    let (code, err, took) = backend_start(&[], &[("UPLINK_DATABASE", &url)]).await;
    assert_eq!(code, Some(1), "{err}");
    one_line(
        &err,
        &[
            &format!("cannot connect to postgres://***@127.0.0.1:{port}/uplink"),
            "refused",
        ],
        "hunter22",
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[tokio::test]
async fn a_refused_password_fails_the_start() {
    let pg = Postgres::start().await;
    let url = pg.url_with_password("postgres", "hunter22");
    let (code, err, _) = backend_start(&["--database", &url], &[]).await;
    assert_eq!(code, Some(1), "{err}");
    one_line(
        &err,
        &["cannot connect to", "password authentication failed"],
        "hunter22",
    );
}

#[tokio::test]
async fn a_database_of_a_newer_schema_is_refused() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    pg.execute(
        &db,
        "CREATE TABLE schema_version (version BIGINT NOT NULL);
         INSERT INTO schema_version (version) VALUES (999)",
    )
    .await;
    let (code, err, _) = backend_start(&[], &[("UPLINK_DATABASE", &url)]).await;
    assert_eq!(code, Some(1), "{err}");
    one_line(
        &err,
        &["schema is version 999", "run a newer uplink"],
        postgres_password(),
    );
}

fn postgres_password() -> &'static str {
    uplink_testkit::postgres::PASSWORD
}

/// Enrollment and a ping on each rung with the store in PostgreSQL; a
/// backend restarted on the same database knows the agents and answers
/// their commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_round_trip_through_a_backend_on_postgres() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.database = Some(DatabaseUrl::parse(&url, "--database").unwrap());
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    assert!(
        !b.dir.join("uplink.db").exists(),
        "no SQLite store beside PostgreSQL"
    );
    let admin = b.admin();
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for rung in ["grpc", "longpoll"] {
        let host = format!("host-{rung}");
        agents.push(agent(
            &b,
            rung,
            &dir.path().join(format!("agent-{rung}")),
            &host,
        ));
        let view = connected_agent(&admin, &host, rung).await;
        let p = admin
            .ping(&view.id, rung, Duration::from_secs(10))
            .await
            .unwrap();
        let r = p.view.result.expect("a result");
        assert_eq!(r.status, CommandStatus::Ok as i32, "{rung}");
        ids.push((view.id, rung, host));
    }
    let (cfg, addr) = b.stop().await;
    let b = TestBackend::start_with(cfg, addr).await;
    let admin = b.admin();
    for (id, rung, host) in &ids {
        let view = connected_agent(&admin, host, rung).await;
        assert_eq!(&view.id, id, "the same agent after the restart");
        let p = admin
            .ping(id, "again", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            p.view.state,
            proto::CommandState::Done as i32,
            "{rung}: {:?}",
            p.view
        );
    }
    assert_eq!(admin.agents("").await.unwrap().len(), 2);
    drop(agents);
    b.stop().await;
}

/// PostgreSQL stopped for 4 s under an agent's open gRPC stream: the
/// backend keeps the stream (its heartbeats go on, every 2 s here), and
/// once the database is back a command reaches the agent on that stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_stays_open_while_the_database_restarts() {
    let mut pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.database = Some(DatabaseUrl::parse(&url, "--database").unwrap());
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let admin = b.admin();
    let a = agent(&b, "grpc", &dir.path().join("agent"), "through");
    let view = connected_agent(&admin, "through", "grpc").await;
    let ping_done = |payload: &'static str| {
        let (admin, id) = (admin.clone(), view.id.clone());
        async move {
            let p = admin
                .ping(&id, payload, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(
                p.view.state,
                proto::CommandState::Done as i32,
                "{payload}: {:?}",
                p.view
            );
        }
    };
    ping_done("before").await;
    let streams = a.count(&["stream open"]);
    pg.stop_server();
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.start_again().await;
    ping_done("after").await;
    assert_eq!(
        a.count(&["stream open"]),
        streams,
        "the agent opened a new stream; its log:\n{}",
        a.logs()
    );
    b.stop().await;
}

/// A backend on PostgreSQL logging at debug: the database is named
/// without its password, and the client's statements (whose parameters
/// hold token hashes and commands' secrets) are not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_and_statements_stay_out_of_the_log() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("backend");
    let mut b = Proc::spawn(
        &[
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("UPLINK_DATABASE", &url), ("UPLINK_LOG", "debug")],
    );
    let ready = b
        .wait_log(&["PostgreSQL store ready"], Duration::from_secs(20))
        .await;
    let port = url.split(':').nth(3).unwrap().split('/').next().unwrap();
    assert!(
        ready.contains(&format!("postgres://***@127.0.0.1:{port}/")),
        "{ready}"
    );
    b.wait_log(&["backend listening"], Duration::from_secs(20))
        .await;
    assert!(b.terminate(Duration::from_secs(10)).await.success());
    let (logs, out) = (b.logs(), b.out());
    assert!(!logs.contains(postgres_password()), "{logs}");
    assert!(!out.contains(postgres_password()), "{out}");
    assert!(!logs.contains("with parameters"), "{logs}");
    assert!(
        logs.contains("tokio_postgres"),
        "the client logs at debug otherwise"
    );
}

/// Two backends on one database: a command queued through one reaches an
/// agent connected to the other at once, on each rung (through
/// `LISTEN`/`NOTIFY`: the agent's backend sends heartbeats and ends held
/// polls only every 30 s, so a command found on either would take that
/// long), and a revocation through one ends the agent's connection to the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_on_one_backend_reaches_an_agent_on_another_at_once() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("a"));
    cfg.database = Some(DatabaseUrl::parse(&url, "--database").unwrap());
    cfg.heartbeat = Duration::from_secs(30);
    cfg.poll_hold = Duration::from_secs(30);
    let mut cfg_b = cfg.clone();
    cfg_b.data_dir = dir.path().join("b");
    let a = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let b = TestBackend::start_with(cfg_b, "127.0.0.1:0".parse().unwrap()).await;
    let (admin_a, admin_b) = (a.admin(), b.admin());
    for rung in ["grpc", "longpoll"] {
        let host = format!("on-b-{rung}");
        let state = dir.path().join(format!("agent-{rung}"));
        let agent_proc = agent(&b, rung, &state, &host);
        let view = connected_agent(&admin_b, &host, rung).await;
        // Let the stream's first frames and the first poll settle, so the
        // command meets a connection that waits.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut took = Vec::new();
        for i in 0..5 {
            let started = Instant::now();
            let cmd = admin_a
                .enqueue(
                    &view.id,
                    proto::CommandSpec {
                        kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                            delay_ms: 0,
                            payload: format!("through a {i}"),
                        })),
                    },
                )
                .await
                .expect("queued through backend a");
            let v = result_of(&admin_a, &cmd.id, Duration::from_secs(25)).await;
            took.push(started.elapsed());
            let r = v.result.expect("a result");
            assert_eq!(r.status, CommandStatus::Ok as i32, "{rung}: {r:?}");
        }
        eprintln!("{rung}: queued on a, answered by the agent on b in {took:?}");
        let slowest = took.iter().max().unwrap();
        assert!(
            *slowest < Duration::from_secs(10),
            "{rung}: a command queued on a took {slowest:?} to reach the agent on b (b's heartbeat and poll hold are 30 s)"
        );
        // Revoked through a: b ends the agent's connection and refuses it.
        admin_a
            .revoke_agent(&view.id)
            .await
            .expect("revoked through a");
        agent_proc
            .wait_log(
                &["cannot connect", "was revoked by the operator"],
                Duration::from_secs(10),
            )
            .await;
        drop(agent_proc);
    }
    b.stop().await;
    a.stop().await;
}

/// Presence across backends on one database: every backend shows an agent
/// connected to another as connected, on its rung, with the backend that
/// holds it; when that backend dies (SIGKILL), the others show the agent
/// disconnected within seconds, not for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_shows_where_an_agent_is_and_forgets_a_dead_backend() {
    use uplink_testkit::hostile::BackendProc;
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("a"));
    cfg.database = Some(DatabaseUrl::parse(&url, "--database").unwrap());
    let a = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let mut b = BackendProc::start(&dir.path().join("b"), None, &["--database", &url]).await;
    let line = b
        .proc
        .wait_log(&["publishing presence"], Duration::from_secs(20))
        .await;
    let replica_b = uplink_testkit::postgres::replica_in_log(&line);
    assert_ne!(replica_b, a.core.replica());
    let agents: Vec<_> = ["grpc", "longpoll"]
        .into_iter()
        .map(|rung| {
            let state = dir.path().join(format!("agent-{rung}"));
            let p = b.agent_with(
                &state,
                &format!("on-b-{rung}"),
                &["--transport", rung, "--no-metrics"],
            );
            (rung, p)
        })
        .collect();
    let admin_a = a.admin();
    for (rung, _) in &agents {
        let host = format!("on-b-{rung}");
        let v = wait_for(
            Duration::from_secs(30),
            &format!("backend a shows {host} connected on b"),
            || async {
                admin_a
                    .agents("")
                    .await
                    .ok()?
                    .into_iter()
                    .find(|v| v.hostname == host && v.connected)
            },
        )
        .await;
        assert_eq!(v.replica, replica_b, "{v:?}");
        assert_eq!(uplink::ctl::transport_name(v.transport), *rung, "{v:?}");
    }
    b.proc.child.start_kill().unwrap();
    let killed = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "backend a shows b's agents disconnected",
        || async {
            let all = admin_a.agents("").await.ok()?;
            all.iter()
                .filter(|v| v.hostname.starts_with("on-b-"))
                .all(|v| !v.connected && v.replica.is_empty())
                .then_some(())
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("b killed: its agents shown disconnected on a after {took:?}");
    assert!(
        took < Duration::from_secs(12),
        "b's agents shown connected {took:?} after it died"
    );
    drop(agents);
    a.stop().await;
}

/// A metric batch two backends on one database both wrote (its agent sent
/// it again to the second, marked `resent`, before the first recorded it)
/// is in one backend's JSON lines: the backend whose record comes second
/// removes its lines before it answers; and one killed before it could
/// record removes them at its next start. The records wait on a lock this
/// test holds on the epoch's cursor row, so that both backends write
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_two_backends_wrote_is_left_in_the_json_lines_of_one() {
    use tonic::codec::CompressionEncoding;
    use uplink::metrics::encode::BatchBuilder;
    use uplink::metrics::sample::{Kind, Series};
    use uplink_testkit::hostile::BackendProc;
    use uplink_testkit::push::{enroll_with, json_lines, push_grpc, push_request};

    const EPOCH: u64 = 7;
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a_lines, b_lines) = (dir.path().join("a-lines"), dir.path().join("b-lines"));
    let mut cfg = TestBackend::config(&dir.path().join("a"));
    cfg.database = Some(DatabaseUrl::parse(&url, "--database").unwrap());
    cfg.metrics_jsonl_dir = Some(a_lines.clone());
    let a = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let b_flags = [
        "--database",
        &url,
        "--metrics-jsonl-dir",
        b_lines.to_str().unwrap(),
    ];
    let b_dir = dir.path().join("b");
    let b = BackendProc::start(&b_dir, None, &b_flags).await;
    let client_a = a.agent_grpc().await;
    let client_of = |b: &BackendProc| {
        let tls = uplink::tls::client_config(&uplink::tls::Trust {
            ca_files: vec![b.ca.clone()],
            skip_os_store: true,
        })
        .unwrap();
        let net = uplink::net::Net::new(tls, uplink::net::ProxySettings::direct());
        let url: tonic::transport::Uri = b.url().parse().unwrap();
        async move {
            let keepalive = Duration::from_secs(10);
            let channel = uplink::client::grpc_channel(&url, &net, keepalive, keepalive)
                .await
                .unwrap();
            proto::agent_service_client::AgentServiceClient::new(channel)
        }
    };
    let client_b = client_of(&b).await;
    // The enrollment token the last backend started with holds on all.
    let agent = Arc::new(enroll_with(&client_b, b.enroll_token.expose(), "twice").await);

    // Batch `seq` holds 5 samples, valued seq * 100 + 0..5.
    let request = |seq: u64, resent: bool| {
        let series = Arc::new(Series::new("twice", Kind::Gauge));
        let mut bb = BatchBuilder::new();
        let id = bb.series(&series).unwrap();
        for i in 0..5 {
            bb.push(id, 1_000 + i, (seq * 100 + i as u64) as f64)
                .unwrap();
        }
        proto::PushMetricsRequest {
            resent,
            ..push_request(EPOCH, seq, bb.finish())
        }
    };
    let lines_of = |seq: u64, dir: &std::path::Path| {
        if !dir.exists() {
            return 0;
        }
        json_lines(dir)
            .iter()
            .filter(|l| l["name"] == "twice")
            .filter(|l| (l["value"].as_f64().unwrap() as u64) / 100 == seq)
            .count()
    };
    // Holds the epoch's cursor row, which a backend locks to record a
    // batch of the epoch, until the transaction ends.
    let lock = || async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute("BEGIN").await.unwrap();
        c.execute(
            "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES ($1, 'metric_batches', $2, 0)
             ON CONFLICT DO NOTHING",
            &[&agent.id, &(EPOCH as i64)],
        )
        .await
        .unwrap();
        c.query_one(
            "SELECT seq FROM cursors WHERE agent_id = $1 AND stream = 'metric_batches' AND epoch = $2 FOR UPDATE",
            &[&agent.id, &(EPOCH as i64)],
        )
        .await
        .unwrap();
        c
    };
    // Pushes batch `seq` to a (its first push), waits until a wrote it,
    // then the same again to b, marked resent, and waits until b wrote it.
    let push_to_both = |seq: u64, client_b: proto::agent_service_client::AgentServiceClient<_>| {
        let (client_a, agent) = (client_a.clone(), agent.clone());
        let (a_lines, b_lines) = (a_lines.clone(), b_lines.clone());
        // A push through `client`, storing on its own.
        let spawn_push = move |client: proto::agent_service_client::AgentServiceClient<_>,
                               resent| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let req = request(seq, resent);
                push_grpc(&client, &agent, CompressionEncoding::Zstd, req).await
            })
        };
        let written = move |lines: std::path::PathBuf, what: &'static str| async move {
            wait_for(Duration::from_secs(20), what, || async {
                (lines_of(seq, &lines) == 5).then_some(())
            })
            .await
        };
        async move {
            let to_a = spawn_push(client_a, false);
            written(a_lines, "a wrote the batch").await;
            let to_b = spawn_push(client_b, true);
            written(b_lines, "b wrote the batch").await;
            (to_a, to_b)
        }
    };

    // Both backends answer: the one whose record came second removed its
    // lines before it answered.
    let held = lock().await;
    let (to_a, to_b) = push_to_both(1, client_b.clone()).await;
    held.batch_execute("ROLLBACK").await.unwrap();
    let stored_a = to_a.await.unwrap().expect("a answers");
    let stored_b = to_b.await.unwrap().expect("b answers");
    assert!(
        stored_a != stored_b,
        "one backend stored batch 1 and the other found it stored (a: {stored_a}, b: {stored_b})"
    );
    let (in_a, in_b) = (lines_of(1, &a_lines), lines_of(1, &b_lines));
    eprintln!(
        "batch 1 recorded by {}: lines in a {in_a}, in b {in_b}",
        if stored_a { "a" } else { "b" }
    );
    assert_eq!(
        in_a + in_b,
        5,
        "batch 1 in a's lines {in_a} times 5 samples, in b's {in_b}"
    );

    // b is killed while it waits to record; a records (without a writer id:
    // its push was the first). b's next start removes its copy.
    let held = lock().await;
    let (to_a, to_b) = push_to_both(2, client_b).await;
    let mut b = b;
    b.proc.child.start_kill().unwrap();
    b.proc.child.wait().await.unwrap();
    assert!(
        to_b.await.unwrap().is_err(),
        "b was killed before it answered"
    );
    held.batch_execute("ROLLBACK").await.unwrap();
    assert!(to_a.await.unwrap().expect("a answers"), "a stored batch 2");
    assert_eq!(
        lines_of(2, &b_lines),
        5,
        "b's copy is there until it starts again"
    );
    let b = BackendProc::start(&b_dir, None, &b_flags).await;
    let settled = b
        .proc
        .wait_log(
            &["metric batches written by an earlier start"],
            Duration::from_secs(30),
        )
        .await;
    eprintln!("b's next start: {settled}");
    let (in_a, in_b) = (lines_of(2, &a_lines), lines_of(2, &b_lines));
    assert_eq!(
        (in_a, in_b),
        (5, 0),
        "batch 2: b's next start removes its copy; a's lines stay"
    );
    assert_eq!(
        lines_of(1, &a_lines) + lines_of(1, &b_lines),
        5,
        "batch 1 once"
    );
    drop(b);
    a.stop().await;
}
