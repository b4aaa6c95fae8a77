//! Corporate networks with real parts: Debian's squid (plain CONNECT, Basic
//! auth, TLS interception with ssl_bump, tunnels cut when idle or at a fixed
//! age), NO_PROXY, a half-open line, and forced rung switches, each with
//! the agent binary and `doctor`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uplink::proto::{self, CommandStatus};
use uplink_testkit::relay::{Mode, Relay};
use uplink_testkit::squid::{Squid, SquidOpts};
use uplink_testkit::*;

async fn doctor(
    b: &TestBackend,
    url: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(["doctor", "--backend", url]).args(args);
    for k in [
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
    ] {
        cmd.env_remove(k);
    }
    if !args.contains(&"--ca-file") {
        cmd.args(["--ca-file", b.ca.to_str().unwrap()]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Reads an agent's self-metrics from the address it logged.
async fn scrape(agent: &Proc) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let line = agent
        .wait_log(&["metrics listening on http://"], Duration::from_secs(10))
        .await;
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

async fn ping_ok(admin: &uplink::ctl::Admin, id: &str) {
    let p = admin.ping(id, "x", Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        p.view.state,
        proto::CommandState::Done as i32,
        "{:?}",
        p.view
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_connect_proxy_the_agent_stays_on_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let sq = Squid::start(&dir.path().join("squid"), SquidOpts::default()).await;
    let admin = b.admin();
    let url = b.url.to_string();
    let proxy = sq.url(None);
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("a"),
        "via-squid",
        &[],
        &[("HTTPS_PROXY", &proxy)],
    );
    let v = connected_agent(&admin, "via-squid", "grpc").await;
    ping_ok(&admin, &v.id).await;
    let log = sq.access_log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", b.addr.port())),
        "squid did not carry the tunnel:\n{log}"
    );
    assert_eq!(a.count(&["switching rung"]), 0, "{}", a.logs());

    let (ok, out) = doctor(&b, &url, &[], &[("HTTPS_PROXY", &proxy)]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "[ok  ] proxy     http://127.0.0.1:{}/ (from HTTPS_PROXY)",
            sq.port
        )),
        "{out}"
    );
    assert!(
        out.contains("the proxy opened a tunnel") && out.contains("chose h2"),
        "{out}"
    );
    assert!(out.contains("would use the gRPC stream"), "{out}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_basic_auth_works_and_a_wrong_password_is_named_without_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let sq = Squid::start(
        &dir.path().join("squid"),
        SquidOpts {
            auth: Some(("loadgen".into(), "p@ss:w0rd".into())),
            ..Default::default()
        },
    )
    .await;
    let admin = b.admin();
    let url = b.url.to_string();

    // Right credentials, percent-encoded in the URL.
    let good = sq.url(Some(("loadgen", "p%40ss%3Aw0rd")));
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("good"),
        "auth-good",
        &["--proxy", &good],
        &[],
    );
    let v = connected_agent(&admin, "auth-good", "grpc").await;
    ping_ok(&admin, &v.id).await;
    assert!(
        !a.logs().contains("w0rd"),
        "proxy password in the log:\n{}",
        a.logs()
    );

    // Wrong credentials: a clear 407 line naming the scheme, no fallback.
    let bad = sq.url(Some(("loadgen", "wr0ngPass99")));
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("bad"),
        "auth-bad",
        &[],
        &[("HTTPS_PROXY", &bad)],
    );
    let line = a.wait_log(&["407"], Duration::from_secs(20)).await;
    assert!(
        line.contains("Basic") && line.contains("rejected"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = a.logs();
    assert!(
        !logs.contains("wr0ngPass99"),
        "proxy password in the log:\n{logs}"
    );
    assert_eq!(a.count(&["switching rung"]), 0, "{logs}");
    assert!(!dir.path().join("bad/identity.json").exists());

    // No credentials at all: told where to put them.
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("none"),
        "auth-none",
        &[],
        &[("HTTPS_PROXY", &sq.url(None))],
    );
    let line = a.wait_log(&["407"], Duration::from_secs(20)).await;
    assert!(line.contains("user:password"), "{line}");

    let (ok, out) = doctor(&b, &url, &["--proxy", &bad], &[]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("[FAIL] connect") && out.contains("407") && out.contains("Basic"),
        "{out}"
    );
    assert!(!out.contains("wr0ngPass99"), "{out}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refusals_are_named_and_never_make_the_ladder_fall() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let url = b.url.to_string();
    // 403: the proxy's policy refuses the destination port.
    let strict = Squid::start(
        &dir.path().join("strict"),
        SquidOpts {
            only_port_443: true,
            ..Default::default()
        },
    )
    .await;
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("a"),
        "forbidden",
        &[],
        &[("HTTPS_PROXY", &strict.url(None))],
    );
    let line = a.wait_log(&["403"], Duration::from_secs(20)).await;
    assert!(
        line.contains("refused the tunnel") && line.contains("policy"),
        "{line}"
    );
    // 503: the proxy cannot reach the backend (nothing listens there).
    let open = Squid::start(&dir.path().join("open"), SquidOpts::default()).await;
    let dead = format!("https://127.0.0.1:{}", free_port());
    let c = agent_via(
        &b,
        &dead,
        &dir.path().join("c"),
        "unreachable",
        &[],
        &[("HTTPS_PROXY", &open.url(None))],
    );
    let line = c
        .wait_log(&["could not reach"], Duration::from_secs(20))
        .await;
    assert!(line.contains("503") || line.contains("502"), "{line}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for p in [&a, &c] {
        assert_eq!(p.count(&["switching rung"]), 0, "{}", p.logs());
    }
    let (ok, out) = doctor(&b, &url, &[], &[("HTTPS_PROXY", &strict.url(None))]).await;
    assert!(
        !ok && out.contains("[FAIL] connect") && out.contains("403"),
        "{out}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_rotated_make_before_break_without_losing_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.heartbeat = Duration::from_secs(1);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let admin = b.admin();
    let a = agent_via(
        &b,
        &b.url.to_string(),
        &dir.path().join("a"),
        "rotating",
        &["--stream-max-age", "5s"],
        &[],
    );
    let v = connected_agent(&admin, "rotating", "grpc").await;
    let (stop, task) = steady_pings(admin.clone(), v.id.clone(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(16)).await;
    *stop.lock().unwrap() = true;
    let ids = task.await.unwrap();
    all_exactly_once(&admin, &[&a], &ids).await;
    assert!(a.count(&["stream rotated"]) >= 2, "{}", a.logs());
    // Make before break: no stream was lost, so nothing failed and nothing
    // was reconnected.
    assert_eq!(a.count(&["failure="]), 0, "{}", a.logs());
    eprintln!(
        "{} commands across {} rotations",
        ids.len(),
        a.count(&["stream rotated"])
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let admin = b.admin();
    let url = b.url.to_string();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let _a = agent_via(
        &b,
        &url,
        &dir.path().join("env"),
        "np-env",
        &[],
        &[
            ("HTTPS_PROXY", &dead),
            ("NO_PROXY", "localhost, 127.0.0.0/8"),
        ],
    );
    connected_agent(&admin, "np-env", "grpc").await;
    let _b = agent_via(
        &b,
        &url,
        &dir.path().join("flag"),
        "np-flag",
        &["--no-proxy", "127.0.0.1"],
        &[("HTTPS_PROXY", &dead)],
    );
    connected_agent(&admin, "np-flag", "grpc").await;
    // Without the bypass, the dead proxy is what fails, and it says so.
    let c = agent_via(
        &b,
        &url,
        &dir.path().join("none"),
        "np-none",
        &[],
        &[("HTTPS_PROXY", &dead)],
    );
    let line = c
        .wait_log(&["cannot connect to proxy"], Duration::from_secs(20))
        .await;
    assert!(line.contains("refused"), "{line}");
    let (ok, out) = doctor(
        &b,
        &url,
        &["--no-proxy", "127.0.0.1"],
        &[("HTTPS_PROXY", &dead)],
    )
    .await;
    assert!(
        ok && out.contains("direct: NO_PROXY matches the backend"),
        "{out}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_interception_ends_on_longpoll_with_its_ca_and_fails_closed_without() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let sq = Squid::start(
        &dir.path().join("squid"),
        SquidOpts {
            bump_upstream_ca: Some(b.ca.clone()),
            ..Default::default()
        },
    )
    .await;
    let bump_ca = sq.bump_ca.clone().unwrap();
    let admin = b.admin();
    let url = b.url.to_string();
    let proxy = sq.url(None);

    // With the proxy's CA: HTTP/2 cannot pass, the agent ends on long-poll.
    let started = Instant::now();
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("trusted"),
        "bumped",
        &[
            "--ca-file",
            bump_ca.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("HTTPS_PROXY", &proxy)],
    );
    let v = connected_agent(&admin, "bumped", "longpoll").await;
    eprintln!("on long-poll {:.1?} after start", started.elapsed());
    assert!(v.transport_reason.contains("HTTP/2 cannot pass"), "{v:?}");
    ping_ok(&admin, &v.id).await;
    assert!(a.count(&["switching rung"]) >= 1, "{}", a.logs());
    // The rung and the reason show in the agent's self-metrics too.
    let m = scrape(&a).await;
    assert!(m.contains("uplink_agent_rung{rung=\"longpoll\"} 1"), "{m}");
    assert!(m.contains("uplink_agent_rung{rung=\"grpc\"} 0"), "{m}");
    assert!(
        m.contains("uplink_agent_rung_reason{reason=\"h2_blocked\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("uplink_agent_rung_switches_total{from=\"grpc\",to=\"longpoll\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("uplink_agent_commands_total{status=\"COMMAND_STATUS_OK\"} 1"),
        "{m}"
    );

    // Without it: fails closed, naming the issuer and the interception.
    let c = agent_via(
        &b,
        &url,
        &dir.path().join("untrusted"),
        "bumped-2",
        &[],
        &[("HTTPS_PROXY", &proxy)],
    );
    let line = c.wait_log(&["not trusted"], Duration::from_secs(20)).await;
    assert!(
        line.contains("Corp Intercept CA") && line.contains("--ca-file"),
        "{line}"
    );
    assert!(line.contains("TLS-intercepting proxy"), "{line}");
    assert!(!dir.path().join("untrusted/identity.json").exists());
    assert_eq!(c.count(&["switching rung"]), 0);

    let (ok, out) = doctor(
        &b,
        &url,
        &["--ca-file", bump_ca.to_str().unwrap()],
        &[("HTTPS_PROXY", &proxy)],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("[warn] alpn") && out.contains("TLS-intercepting proxy"),
        "{out}"
    );
    assert!(out.contains("Corp Intercept CA"), "{out}");
    assert!(out.contains("would use long-polling"), "{out}");
    let (ok, out) = doctor(&b, &url, &[], &[("HTTPS_PROXY", &proxy)]).await;
    assert!(
        !ok && out.contains("[FAIL] tls") && out.contains("Corp Intercept CA"),
        "{out}"
    );
    b.stop().await;
}

/// Enqueues a ping every `every` until stopped; returns the ids.
fn steady_pings(
    admin: uplink::ctl::Admin,
    agent: String,
    every: Duration,
) -> (Arc<Mutex<bool>>, tokio::task::JoinHandle<Vec<String>>) {
    let stop = Arc::new(Mutex::new(false));
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut n = 0;
        while !*s.lock().unwrap() {
            n += 1;
            ids.push(
                admin
                    .enqueue(&agent, ping(0, &format!("#{n}")))
                    .await
                    .expect("enqueue")
                    .id,
            );
            tokio::time::sleep(every).await;
        }
        ids
    });
    (stop, task)
}

async fn all_exactly_once(admin: &uplink::ctl::Admin, procs: &[&Proc], ids: &[String]) {
    for id in ids {
        let v = admin.command(id, Duration::from_secs(30)).await.unwrap();
        if v.state != proto::CommandState::Done as i32 {
            let logs: Vec<String> = procs.iter().map(|p| p.logs()).collect();
            panic!("{id} not done: {v:?}\n{}", logs.join("\n---\n"));
        }
        assert_eq!(v.result.unwrap().status, CommandStatus::Ok as i32, "{id}");
        let runs: usize = procs
            .iter()
            .map(|p| p.count(&["executing command", id]))
            .sum();
        assert_eq!(runs, 1, "{id} executed {runs} times");
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_cut_idle_or_old_tunnels_lose_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.heartbeat = Duration::from_secs(1);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    // squid cutting tunnels idle for 3 s.
    let idle = Squid::start(
        &dir.path().join("idle"),
        SquidOpts {
            read_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        },
    )
    .await;
    // Control: an idle tunnel through it really is cut.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", idle.port))
            .await
            .unwrap();
        let target = format!("127.0.0.1:{}", b.addr.port());
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle tunnel was not cut: {r:?}"
        );
        eprintln!(
            "control: squid cut an idle tunnel after {:.1?}",
            t.elapsed()
        );
    }
    // A relay cutting every connection at the age of 8 s.
    let aged = Relay::start_with(b.addr, Some(Duration::from_secs(8))).await;
    let admin = b.admin();
    let url = b.url.to_string();
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("a"),
        "idle-killed",
        &[],
        &[("HTTPS_PROXY", &idle.url(None))],
    );
    let c = agent_via(
        &b,
        &format!("https://127.0.0.1:{}", aged.addr.port()),
        &dir.path().join("c"),
        "age-cut",
        &[],
        &[],
    );
    let va = connected_agent(&admin, "idle-killed", "grpc").await;
    let vc = connected_agent(&admin, "age-cut", "grpc").await;
    let (stop_a, ta) = steady_pings(admin.clone(), va.id.clone(), Duration::from_millis(300));
    let (stop_c, tc) = steady_pings(admin.clone(), vc.id.clone(), Duration::from_millis(300));
    // Two minutes by default; UPLINK_SOAK_SECS changes it.
    let soak = std::env::var("UPLINK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    tokio::time::sleep(Duration::from_secs(soak)).await;
    *stop_a.lock().unwrap() = true;
    *stop_c.lock().unwrap() = true;
    let (ia, ic) = (ta.await.unwrap(), tc.await.unwrap());
    all_exactly_once(&admin, &[&a], &ia).await;
    all_exactly_once(&admin, &[&c], &ic).await;
    // Heartbeats kept the idle-killer's tunnel busy: one stream throughout.
    assert_eq!(a.count(&["stream open"]), 1, "{}", a.logs());
    // The age limit did cut (the scenario happened), and the agent stayed
    // on gRPC through it.
    // (Cut every 8 s: at least one reconnect per 10 s of soak.)
    let expected = 1 + (soak / 10) as usize;
    assert!(
        c.count(&["stream open"]) >= expected,
        "fewer than {expected} streams:\n{}",
        c.logs()
    );
    assert_eq!(c.count(&["switching rung"]), 0, "{}", c.logs());
    eprintln!("{} + {} pings, each executed once", ia.len(), ic.len());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_line_is_detected_within_keepalive_and_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    // Heartbeats as far apart as the backend allows: the stream is declared
    // dead by silence only after two intervals and a second (31 s), so a
    // detection within 15 s comes from the HTTP/2 keepalive ping.
    cfg.heartbeat = Duration::from_secs(15);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let relay = Relay::start(b.addr).await;
    let admin = b.admin();
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("a"),
        "half-open",
        // A reconnect made while the line is still silent meets a TLS
        // handshake without an answer, which in `auto` mode is also what a
        // path that swallows HTTP/2 looks like: the agent may fall to
        // long-poll then. A short probe brings it back to a stream soon
        // after the line is restored.
        &[
            "--keepalive",
            "2s",
            "--probe-initial",
            "2s",
            "--probe-max",
            "2s",
        ],
        &[],
    );
    let v = connected_agent(&admin, "half-open", "grpc").await;
    // Only failures after the cut count (a probe may have failed before).
    let failures = a.count(&["failure="]);
    let streams = a.count(&["stream open"]);
    relay.set(Mode::Blackhole);
    let cut = Instant::now();
    while a.count(&["failure="]) == failures {
        assert!(
            cut.elapsed() < Duration::from_secs(45),
            "no failure within 45 s of the cut; agent logs:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detected = cut.elapsed();
    let logs = a.logs();
    let line = logs
        .lines()
        .filter(|l| l.contains("failure="))
        .nth(failures)
        .unwrap_or_default();
    eprintln!("half-open line detected after {detected:.1?}: {line}");
    // Keepalive 2 s + its timeout 5 s; the relay holds both sides open, so
    // only the unanswered ping can tell.
    assert!(
        detected < Duration::from_secs(15),
        "detected only after {detected:?}"
    );
    assert!(
        !line.contains("declared dead"),
        "detected by heartbeat silence, not by the keepalive ping: {line}"
    );
    relay.set(Mode::Forward);
    relay.cut_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.count(&["stream open"]) <= streams {
        assert!(
            Instant::now() < deadline,
            "no new stream within 30 s after the line came back; agent logs:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ping_ok(&admin, &v.id).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_swallows_http2_silently_still_ends_on_longpoll() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let relay = Relay::start(b.addr).await;
    relay.set(Mode::SwallowH2);
    let admin = b.admin();
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let started = Instant::now();
    let a = agent_via(&b, &url, &dir.path().join("a"), "swallowed", &[], &[]);
    let v = connected_agent(&admin, "swallowed", "longpoll").await;
    eprintln!(
        "h2 swallowed: on long-poll {:.1?} after start",
        started.elapsed()
    );
    assert!(v.transport_reason.contains("no answer"), "{v:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "{}", a.logs());
    ping_ok(&admin, &v.id).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_rung_switches_under_steady_commands_run_each_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let relay = Relay::start(b.addr).await;
    relay.set(Mode::BlockH2);
    let admin = b.admin();
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let started = Instant::now();
    let a = agent_via(
        &b,
        &url,
        &dir.path().join("a"),
        "ladder",
        &["--probe-initial", "2s", "--probe-max", "4s"],
        &[],
    );
    let v = connected_agent(&admin, "ladder", "longpoll").await;
    eprintln!(
        "h2 blocked: on long-poll {:.1?} after start",
        started.elapsed()
    );
    let (stop, task) = steady_pings(admin.clone(), v.id.clone(), Duration::from_millis(100));
    let on = |rung: &'static str| {
        let admin = admin.clone();
        async move {
            let t = Instant::now();
            connected_agent(&admin, "ladder", rung).await;
            t.elapsed()
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.set(Mode::Forward);
    let t = tokio::time::timeout(Duration::from_secs(19), on("grpc")).await;
    let t = t.unwrap_or_else(|_| {
        panic!(
            "not back on gRPC 19 s after the first unblock:\n{}",
            a.logs()
        )
    });
    eprintln!("unblocked: back on gRPC after {t:.1?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.set(Mode::BlockH2);
    let t = tokio::time::timeout(Duration::from_secs(20), on("longpoll")).await;
    let t =
        t.unwrap_or_else(|_| panic!("not on long-poll 20 s after h2 was blocked:\n{}", a.logs()));
    eprintln!("blocked: on long-poll after {t:.1?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.set(Mode::Forward);
    let t = tokio::time::timeout(Duration::from_secs(19), on("grpc")).await;
    let t = t.unwrap_or_else(|_| {
        panic!(
            "not back on gRPC 19 s after h2 was let through again:\n{}",
            a.logs()
        )
    });
    eprintln!("unblocked: back on gRPC after {t:.1?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    *stop.lock().unwrap() = true;
    let ids = task.await.unwrap();
    all_exactly_once(&admin, &[&a], &ids).await;
    assert!(a.count(&["switching rung"]) >= 4, "{}", a.logs());
    eprintln!(
        "{} commands across 4 rung switches, each executed once",
        ids.len()
    );

    // doctor sees the blocked path for what it is.
    relay.set(Mode::BlockH2);
    let (ok, out) = doctor(&b, &url, &[], &[]).await;
    assert!(
        ok && out.contains("[FAIL] grpc") && out.contains("would use long-polling"),
        "{out}"
    );
    b.stop().await;
}
