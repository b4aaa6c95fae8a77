//! The backend before any login, over real TLS on loopback: refusals reach
//! HTTP/2 clients as the documented JSON error, failed authentication is
//! rate-limited per source address and counted on /metrics, connections
//! that send nothing are closed, and the pre-auth connection caps (per
//! address, and in total with the oldest replaced) leave room for an
//! operator.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use uplink_testkit::*;

/// curl against `b`'s admin API from source address `from`, with `auth`
/// and `extra` arguments; (exit code, `<status> <body>` as text).
/// `ListAgents` with the admin token from the address `from`: curl's
/// output and the HTTP status it printed last.
async fn list_agents(b: &TestBackend, from: &str) -> String {
    let args = [
        "-H",
        "content-type: application/json",
        "-d",
        "{}",
        &admin_url(b, "ListAgents"),
    ];
    curl(b, from, b.admin_token.expose(), &args).await.1
}

async fn curl(b: &TestBackend, from: &str, auth: &str, extra: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "30", "--interface", from])
        .arg("--cacert")
        .arg(&b.ca)
        .args(["-H", &format!("authorization: Bearer {auth}")])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn admin_url(b: &TestBackend, method: &str) -> String {
    format!(
        "https://127.0.0.1:{}/uplink.v1.AdminService/{method}",
        b.addr.port()
    )
}

async fn start(
    edit: impl FnOnce(&mut uplink::backend::BackendConfig),
) -> (tempfile::TempDir, TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    edit(&mut cfg);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    (dir, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_error_to_a_call_with_a_body_reaches_http2_clients_as_json() {
    let (dir, b) = start(|_| {}).await;
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b' '; 1 << 20]).unwrap();
    let data = format!("@{}", body.display());
    let (code, out) = curl(
        &b,
        "127.0.0.1",
        "not-the-admin-token",
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
            &admin_url(&b, "ListAgents"),
        ],
    )
    .await;
    assert_eq!(
        code, 0,
        "curl exit code (92 is an HTTP/2 stream error): {out}"
    );
    assert!(out.contains("\"code\":\"unauthenticated\""), "{out}");
    assert!(out.ends_with("401"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_rate_limited_per_address_and_counted() {
    let (_dir, b) = start(|c| {
        c.edge.auth_failure_burst = 3;
        c.edge.auth_failure_refill = Duration::from_secs(3600);
    })
    .await;
    let list = admin_url(&b, "ListAgents");
    let call = |from: &'static str, token: String| {
        let list = list.clone();
        let b = &b;
        async move {
            curl(
                b,
                from,
                &token,
                &["-H", "content-type: application/json", "-d", "{}", &list],
            )
            .await
            .1
        }
    };
    for _ in 0..3 {
        let out = call("127.0.0.1", "wrong-token".into()).await;
        assert!(out.ends_with("401"), "{out}");
    }
    // Past the burst: refused before the token is even looked at.
    let out = call("127.0.0.1", b.admin_token.expose().to_string()).await;
    assert!(out.ends_with("429"), "{out}");
    assert!(
        out.contains("resource_exhausted") && out.contains("retry in"),
        "{out}"
    );
    // Another address is not affected, and /metrics counts both.
    let out = call("127.0.0.2", b.admin_token.expose().to_string()).await;
    assert!(out.ends_with("200"), "{out}");
    let (_, metrics) = curl(
        &b,
        "127.0.0.2",
        b.admin_token.expose(),
        &[&format!("https://127.0.0.1:{}/metrics", b.addr.port())],
    )
    .await;
    assert!(
        metrics.contains("uplink_backend_auth_failures_total 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("uplink_backend_auth_rate_limited_total 1\n"),
        "{metrics}"
    );
}

/// Waits (generously) until the backend closes `s`.
async fn closed_by_backend(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await;
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: backend sent {n} bytes instead of closing"),
        Err(_) => panic!("{what}: still open after 60 s"),
    }
}

async fn open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_capped_per_address() {
    let (_dir, b) = start(|c| {
        c.edge.max_connections_per_addr = 5;
        c.edge.first_request_timeout = Duration::from_secs(1);
    })
    .await;
    let mut held = open(b.addr, 5).await;
    // The sixth from the same address is closed at once...
    let mut sixth = TcpStream::connect(b.addr).await.unwrap();
    closed_by_backend(&mut sixth, "sixth connection").await;
    // ...while another address still gets in.
    let out = list_agents(&b, "127.0.0.2").await;
    assert!(out.ends_with("200"), "{out}");
    // The silent ones are closed after the first-request deadline.
    for (i, s) in held.iter_mut().enumerate() {
        closed_by_backend(s, &format!("silent connection {i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_preauth_cap_the_oldest_connection_makes_room_for_an_operator() {
    let (_dir, b) = start(|c| {
        c.edge.max_preauth_connections = Some(4);
        c.edge.first_request_timeout = Duration::from_secs(600);
    })
    .await;
    let mut held = open(b.addr, 4).await;
    let out = list_agents(&b, "127.0.0.1").await;
    assert!(out.ends_with("200"), "{out}");
    closed_by_backend(&mut held[0], "oldest silent connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reads_the_admin_token_from_a_file_so_it_stays_out_of_ps() {
    let (dir, b) = start(|_| {}).await;
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{}\n", b.admin_token.expose())).unwrap();
    let run = |extra: &'static [&'static str]| {
        let (url, ca, file) = (b.url.to_string(), b.ca.clone(), file.clone());
        async move {
            tokio::process::Command::new(bin())
                .args(["ctl", "--backend", &url, "--ca-file"])
                .arg(&ca)
                .arg("--admin-token-file")
                .arg(&file)
                .args(extra)
                .arg("agents")
                .env_remove("UPLINK_ADMIN_TOKEN")
                .output()
                .await
                .expect("uplink ctl runs")
        }
    };
    let out = run(&[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--admin-token", "upl_a_given_twice_here"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin-token and --admin-token-file both given"),
        "{err}"
    );
}
