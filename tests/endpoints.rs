//! The backend's port as clients meet it: Connect bodies in JSON and
//! protobuf (with curl), bad bodies of every kind, gRPC limits, the binary's
//! start-up output, `ctl`, and the errors an operator has to act on.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uplink::proto;
use uplink_testkit::*;

/// POSTs `body` to `path` over HTTP/1.1 + TLS; returns status and body.
async fn post(
    b: &TestBackend,
    path: &str,
    content_type: &str,
    auth: Option<&str>,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(b.net().connector(uplink::net::Alpn::Http1));
    let mut req = http::Request::post(format!("https://127.0.0.1:{}{path}", b.addr.port()))
        .header("content-type", content_type);
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

/// Posts a JSON body, the way a Connect client in JSON mode does.
async fn post_json(b: &TestBackend, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
    post(b, path, "application/json", auth, body.to_vec()).await
}

/// Creates a CA (and a server certificate for localhost) in `dir`, as a
/// backend does on first start: the CA's certificate file.
fn generate_ca(dir: &std::path::Path) -> std::path::PathBuf {
    uplink::tls::server_config(&uplink::tls::ServerIdentity::Generated {
        data_dir: dir.into(),
        hostnames: vec!["localhost".into()],
    })
    .unwrap();
    dir.join("ca.pem")
}

fn connect_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not a Connect error: {:?}", String::from_utf8_lossy(body)));
    v["code"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_4xx_with_a_reason_and_the_backend_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.max_message_bytes = 64 * 1024;
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let admin_tok = b.admin_token.expose().to_string();
    let admin = Some(admin_tok.as_str());
    let enq = "/uplink.v1.AdminService/EnqueueCommand";

    // Malformed protobuf: an invalid wire type.
    let (s, body) = post(
        &b,
        enq,
        "application/proto",
        admin,
        vec![0xff, 0xff, 0xff, 0xff],
    )
    .await;
    assert_eq!((s, connect_code(&body).as_str()), (400, "invalid_argument"));
    assert!(String::from_utf8_lossy(&body).contains("EnqueueCommandRequest"));

    // Truncated protobuf: a valid message cut in the middle of a field.
    let full = proto::EnqueueCommandRequest {
        agent_id: "agt_0123456789abcdef".into(),
        spec: Some(ping(0, "x")),
        request_id: String::new(),
    }
    .encode_to_vec();
    let (s, body) = post(
        &b,
        enq,
        "application/proto",
        admin,
        full[..full.len() / 2].to_vec(),
    )
    .await;
    assert_eq!((s, connect_code(&body).as_str()), (400, "invalid_argument"));

    // Malformed and mistyped JSON.
    let (s, body) = post_json(&b, enq, admin, b"{\"agentId\": ").await;
    assert_eq!((s, connect_code(&body).as_str()), (400, "invalid_argument"));
    let (s, body) = post_json(&b, enq, admin, br#"{"agentId": 5, "bogus": true}"#).await;
    assert_eq!((s, connect_code(&body).as_str()), (400, "invalid_argument"));

    // Oversized.
    let (s, body) = post(&b, enq, "application/proto", admin, vec![0u8; 65 * 1024]).await;
    assert_eq!(
        (s, connect_code(&body).as_str()),
        (413, "resource_exhausted")
    );
    assert!(String::from_utf8_lossy(&body).contains("65536"));

    // Wrong content type, unknown method, missing or wrong credentials.
    let (s, _) = post(&b, enq, "text/plain", admin, b"hi".to_vec()).await;
    assert_eq!(s, 415);
    let (s, body) = post_json(&b, "/uplink.v1.AdminService/Nope", admin, b"{}").await;
    assert_eq!((s, connect_code(&body).as_str()), (404, "unimplemented"));
    let (s, body) = post_json(&b, "/uplink.v1.AdminService/ListAgents", None, b"{}").await;
    assert_eq!((s, connect_code(&body).as_str()), (401, "unauthenticated"));
    let (s, _) = post_json(
        &b,
        "/uplink.v1.AgentService/Poll",
        Some("upl_c_wrong"),
        b"{}",
    )
    .await;
    assert_eq!(s, 401);

    // A body cut short of its Content-Length, then the connection closed.
    {
        let tls = uplink::tls::client_config(&b.trust()).unwrap();
        let mut tls = (*std::sync::Arc::new(tls)).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        let mut s = connector
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let head = format!(
            "POST {enq} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/proto\r\nauthorization: Bearer {admin_tok}\r\ncontent-length: 100\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&full[..10]).await.unwrap();
        s.shutdown().await.unwrap();
        // The backend must answer or close: a hang (waiting for bytes that
        // never come) fails here instead of passing as an empty answer.
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
            .await
            .expect("the backend neither answered nor closed a truncated body within 30 s");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4"),
            "unexpected answer: {text}"
        );
    }

    // gRPC: a message over the limit gets a status, not a crash.
    {
        let mut client = b.agent_grpc().await;
        let big = proto::EnrollRequest {
            enrollment_token: "x".repeat(100 * 1024),
            idempotency_key: String::new(),
            info: None,
        };
        let err = client.enroll(big).await.unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{err:?}"
        );
        // And an ordinary bad request gets its reason.
        let err = client
            .enroll(proto::EnrollRequest {
                enrollment_token: "upl_e_nope".into(),
                idempotency_key: String::new(),
                info: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(
            err.message()
                .contains("enrollment token rejected by backend"),
            "{err:?}"
        );
    }

    // Everyone else is still served.
    let _a = agent(&b, "grpc", &dir.path().join("agent"), "survivor");
    let adm = b.admin();
    let view = connected_agent(&adm, "survivor", "grpc").await;
    let p = adm
        .ping(&view.id, "", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(p.view.state, proto::CommandState::Done as i32);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_json_and_proto_both_work_with_curl() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let _a = agent(&b, "longpoll", &dir.path().join("agent"), "curl-target");
    let view = connected_agent(&b.admin(), "curl-target", "longpoll").await;
    let url = |m: &str| {
        format!(
            "https://localhost:{}/uplink.v1.AdminService/{m}",
            b.addr.port()
        )
    };
    let auth = format!("authorization: Bearer {}", b.admin_token.expose());
    // The backend runs on this test's runtime: curl runs without blocking it.
    let curl = |args: Vec<String>| {
        let ca = b.ca.clone();
        let auth = auth.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "--fail-with-body",
                    "--max-time",
                    "30",
                    "--cacert",
                    ca.to_str().unwrap(),
                    "-H",
                    &auth,
                ])
                .args(&args)
                .output()
                .await
                .expect("curl runs");
            assert!(
                out.status.success(),
                "curl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    };

    // JSON, the way a person debugs.
    let body = curl(vec![
        "-H".into(),
        "content-type: application/json".into(),
        "-d".into(),
        "{}".into(),
        url("ListAgents"),
    ])
    .await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["agents"][0]["id"], view.id.as_str(), "{v}");
    assert_eq!(v["agents"][0]["transport"], "TRANSPORT_LONGPOLL");

    let req = format!(
        r#"{{"agentId":"{}","spec":{{"ping":{{"payload":"from curl"}}}}}}"#,
        view.id
    );
    let body = curl(vec![
        "-H".into(),
        "content-type: application/json".into(),
        "-d".into(),
        req,
        url("EnqueueCommand"),
    ])
    .await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = v["command"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["command"]["seq"], "1", "uint64 travels as a string: {v}");

    // Protobuf, as generated clients send it (over HTTP/2 this time).
    let get = proto::GetCommandRequest {
        command_id: id.clone(),
        wait_ms: 10_000,
    }
    .encode_to_vec();
    let req_file = dir.path().join("get.bin");
    std::fs::write(&req_file, get).unwrap();
    let body = curl(vec![
        "--http2".into(),
        "-H".into(),
        "content-type: application/proto".into(),
        "--data-binary".into(),
        format!("@{}", req_file.display()),
        url("GetCommand"),
    ])
    .await;
    let resp = proto::GetCommandResponse::decode(body.as_slice()).unwrap();
    let view = resp.command.unwrap();
    assert_eq!(view.state, proto::CommandState::Done as i32);
    match view.result.unwrap().detail {
        Some(proto::command_result::Detail::Ping(p)) => assert_eq!(p.payload, "from curl"),
        other => panic!("{other:?}"),
    }
    b.stop().await;
}

/// The harness finds the binary beside the running test, since only the
/// tests themselves see `CARGO_BIN_EXE_uplink`: both name the same file.
#[test]
fn the_harness_runs_the_binary_cargo_built_for_these_tests() {
    let built = std::fs::canonicalize(env!("CARGO_BIN_EXE_uplink")).unwrap();
    let found = std::fs::canonicalize(bin()).unwrap();
    assert_eq!(found, built);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_binary_prints_tokens_once_and_the_host_command() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "backend",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut first = Proc::spawn(&args, &[]);
    let banner = wait_for(Duration::from_secs(20), "backend banner", || {
        let out = first.out();
        async move { out.contains("run an agent with").then_some(out) }
    })
    .await;
    assert!(
        banner.contains("admin token (shown once): upl_a_"),
        "{banner}"
    );
    assert!(banner.contains("UPLINK_TOKEN=upl_e_"), "{banner}");
    assert!(banner.contains("ca.pem"), "{banner}");
    let admin_token = banner
        .split("admin token (shown once): ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let logs = first.logs();
    assert!(
        !logs.contains(&admin_token),
        "admin token in the log:\n{logs}"
    );
    let port: u16 = banner
        .split("listening on 127.0.0.1:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // ctl against it, with the printed token.
    let backend = format!("https://127.0.0.1:{port}");
    let ca = data.join("ca.pem");
    let ctl = |args: &[&str]| {
        let mut v = vec![
            "ctl",
            "--backend",
            &backend,
            "--ca-file",
            ca.to_str().unwrap(),
        ];
        v.extend_from_slice(args);
        std::process::Command::new(bin())
            .args(&v)
            .env("UPLINK_ADMIN_TOKEN", &admin_token)
            .output()
            .unwrap()
    };
    let out = ctl(&["providers", "create", "lab-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("enrollment token (shown once): upl_e_") && text.contains("docker run"),
        "{text}"
    );
    let out = ctl(&["providers"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("default") && text.contains("lab-1"), "{text}");
    let out = std::process::Command::new(bin())
        .args([
            "ctl",
            "--backend",
            &backend,
            "--ca-file",
            ca.to_str().unwrap(),
            "agents",
        ])
        .env("UPLINK_ADMIN_TOKEN", "upl_a_wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token rejected"));

    assert!(first.terminate(Duration::from_secs(15)).await.success());

    // A second start keeps the tokens and prints no new admin token.
    let mut second = Proc::spawn(&args, &[]);
    let banner = wait_for(Duration::from_secs(20), "second banner", || {
        let out = second.out();
        async move { out.contains("run an agent with").then_some(out) }
    })
    .await;
    assert!(!banner.contains("admin token (shown once)"), "{banner}");
    assert!(!banner.contains("UPLINK_TOKEN=upl_e_"), "{banner}");
    assert!(second.terminate(Duration::from_secs(15)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_agents_json_and_ping_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let mut a = agent(&b, "grpc", &dir.path().join("agent"), "ctl-target");
    let view = connected_agent(&b.admin(), "ctl-target", "grpc").await;
    let backend = b.url.to_string();
    let ctl = |args: &[&str]| {
        let backend = backend.clone();
        let ca = b.ca.clone();
        let token = b.admin_token.expose().to_string();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::process::Command::new(bin())
                .args([
                    "ctl",
                    "--backend",
                    &backend,
                    "--ca-file",
                    ca.to_str().unwrap(),
                ])
                .args(&args)
                .env("UPLINK_ADMIN_TOKEN", token)
                .output()
                .await
                .unwrap()
        }
    };
    let out = ctl(&["agents", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a0 = &v[0];
    assert_eq!(a0["id"], view.id.as_str());
    assert_eq!(a0["hostname"], "ctl-target");
    assert_eq!(a0["provider"], "default");
    assert_eq!(a0["connected"], true);
    assert_eq!(a0["transport"], "grpc");
    assert_eq!(a0["version"], uplink::VERSION);
    assert!(a0["last_seen"].as_str().unwrap().ends_with('Z'));

    let out = ctl(&["ping", &view.id, "--count", "3"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("pong from") && l.ends_with(" ms"))
            .count(),
        3,
        "{text}"
    );

    // A stopped agent does not answer: non-zero exit, and a hint.
    assert!(a.terminate(Duration::from_secs(10)).await.success());
    let out = ctl(&["ping", &view.id, "--timeout", "1s"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("no answer") && err.contains("ctl agents"),
        "{err}"
    );
    let out = ctl(&["agents", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["connected"], false);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_enrollment_token_gets_one_clear_line_and_slow_retries() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    for rung in ["grpc", "longpoll"] {
        let bad = "upl_e_0000000000000000000000000000000000000000000000000000000000000000";
        let mut a = agent_via(
            &b,
            &b.url.to_string(),
            &dir.path().join(format!("bad-{rung}")),
            &format!("bad-{rung}"),
            &["--transport", rung],
            &[("UPLINK_TOKEN", bad)],
        );
        a.wait_log(
            &["enrollment token rejected by backend"],
            Duration::from_secs(15),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let logs = a.logs();
        assert_eq!(
            a.count(&["enrollment token rejected by backend"]),
            1,
            "{logs}"
        );
        assert!(
            logs.lines().count() < 5,
            "the agent retries too often:\n{logs}"
        );
        assert!(!logs.contains(bad), "token in the log:\n{logs}");
        assert!(
            a.child.try_wait().unwrap().is_none(),
            "the agent should keep running and retrying"
        );
        assert!(a.terminate(Duration::from_secs(10)).await.success());
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_fails_closed_and_names_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    // Another CA, as a TLS-intercepting proxy's would be from the agent's view.
    let other = tempfile::tempdir().unwrap();
    generate_ca(other.path());
    let issuer = uplink::tls::subject_of(&uplink::tls::read_certs(&b.ca).unwrap()[0]).unwrap();
    for (case, ca_args) in [
        ("no ca-file", vec![]),
        (
            "wrong ca-file",
            vec![
                "--ca-file".to_string(),
                other.path().join("ca.pem").display().to_string(),
            ],
        ),
    ] {
        let state = dir.path().join(case.replace(' ', "-"));
        let mut args: Vec<String> = [
            "agent",
            "--backend",
            &b.url.to_string(),
            "--state-dir",
            state.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(ca_args);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut a = Proc::spawn(&argv, &[("UPLINK_TOKEN", b.enroll_token.expose())]);
        let line = a.wait_log(&["not trusted"], Duration::from_secs(20)).await;
        assert!(line.contains(&issuer), "{case}: issuer not named: {line}");
        assert!(line.contains("--ca-file"), "{case}: flag not named: {line}");
        if case == "wrong ca-file" {
            assert!(line.contains("TLS-intercepting proxy"), "{line}");
        }
        assert!(
            !state.join("identity.json").exists(),
            "{case}: enrolled despite an untrusted certificate"
        );
        assert!(a.terminate(Duration::from_secs(10)).await.success());
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_is_named_in_each_retry() {
    let dir = tempfile::tempdir().unwrap();
    // A port with nothing behind it: bind, note, close.
    let port = free_port();
    let ca = generate_ca(dir.path());
    let agent = |backend: &str, state: &str| {
        let state = dir.path().join(state);
        Proc::spawn(
            &[
                "agent",
                "--backend",
                backend,
                "--ca-file",
                ca.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ],
            &[("UPLINK_TOKEN", "upl_e_whatever")],
        )
    };
    let mut a = agent(&format!("https://127.0.0.1:{port}"), "s");
    let line = a
        .wait_log(&["failure=\"refused\""], Duration::from_secs(15))
        .await;
    assert!(line.contains("retrying in"), "{line}");
    let mut b = agent("https://no-such-host.invalid:443", "s2");
    b.wait_log(&["failure=\"dns\""], Duration::from_secs(30))
        .await;
    assert!(a.terminate(Duration::from_secs(10)).await.success());
    assert!(b.terminate(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_with_every_problem_named() {
    let out = tokio::process::Command::new(bin())
        .args([
            "agent",
            "--backend",
            "http://example.com",
            "--transport",
            "pigeon",
            "--ca-file",
            "/nonexistent.pem",
        ])
        .env_remove("UPLINK_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain http") && err.contains("https://"),
        "{err}"
    );
    assert!(err.contains("pigeon"), "{err}");
    let out = tokio::process::Command::new(bin())
        .args([
            "backend",
            "--listen",
            "nope",
            "--heartbeat-interval",
            "1h",
            "--tls-cert",
            "/x.pem",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen")
            && err.contains("--heartbeat-interval")
            && err.contains("--tls-key"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(bin())
        .args([
            "agent",
            "--backend",
            "https://127.0.0.1:1",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ])
        .env_remove("UPLINK_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
}

/// `ctl`'s calls that only read are made again when their connection
/// breaks: a `GetCommand` waiting on a connection that a relay cuts comes
/// back with the command's view (behind a load balancer, the new
/// connection reaches another replica). A call that changes something is
/// not repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_call_whose_connection_breaks_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let mut client = b.agent_grpc().await;
    let enrolled = client
        .enroll(proto::EnrollRequest {
            enrollment_token: b.enroll_token.expose().into(),
            idempotency_key: String::new(),
            info: Some(proto::AgentInfo {
                hostname: "away".into(),
                version: "1.0.0".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let cmd = b
        .admin()
        .enqueue(&enrolled.agent_id, ping(0, "x"))
        .await
        .unwrap();
    let relay = uplink_testkit::relay::Relay::start(b.addr).await;
    let url: http::Uri = format!("https://127.0.0.1:{}", relay.addr.port())
        .parse()
        .unwrap();
    let admin = uplink::ctl::Admin::new(&url, &b.net(), b.admin_token.clone());
    // Nothing executes the command: the call waits its 3 s, and its
    // connection is cut in the middle.
    let call = tokio::spawn({
        let (admin, id) = (admin.clone(), cmd.id.clone());
        async move { admin.command(&id, Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut_all();
    let view = call
        .await
        .unwrap()
        .expect("GetCommand made again after its connection broke");
    assert_eq!(view.state, proto::CommandState::Queued as i32, "{view:?}");
}

/// `EnqueueCommand` with a `request_id`: made again, it answers the
/// command the first call queued and queues nothing more; the same id
/// for another spec, or a malformed id, is refused and queues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_made_again_with_its_request_id_queues_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let agent = enroll_one(&b, "twice").await;
    let admin_tok = b.admin_token.expose().to_string();
    let enq = "/uplink.v1.AdminService/EnqueueCommand";
    let call = |spec: proto::CommandSpec, request_id: &str| {
        let body = proto::EnqueueCommandRequest {
            agent_id: agent.clone(),
            spec: Some(spec),
            request_id: request_id.into(),
        }
        .encode_to_vec();
        let (b, tok) = (&b, admin_tok.clone());
        async move {
            let (s, body) = post(b, enq, "application/proto", Some(&tok), body).await;
            if s == 200 {
                Ok(proto::EnqueueCommandResponse::decode(body.as_slice())
                    .unwrap()
                    .command
                    .unwrap())
            } else {
                Err((
                    s,
                    connect_code(&body),
                    String::from_utf8_lossy(&body).into_owned(),
                ))
            }
        }
    };
    let first = call(ping(0, "a"), "r-1").await.unwrap();
    let again = call(ping(0, "a"), "r-1").await.unwrap();
    assert_eq!(
        again, first,
        "a call made again answers the first's command"
    );
    let other = call(ping(0, "b"), "r-1").await.unwrap_err();
    assert_eq!(
        (other.0, other.1.as_str()),
        (400, "invalid_argument"),
        "{other:?}"
    );
    assert!(other.2.contains("request_id"), "{other:?}");
    for bad in ["has space", "é", &"k".repeat(129)] {
        let e = call(ping(0, "a"), bad).await.unwrap_err();
        assert_eq!(
            (e.0, e.1.as_str()),
            (400, "invalid_argument"),
            "{bad:?}: {e:?}"
        );
    }
    let next = call(ping(0, "a"), "r-2").await.unwrap();
    let unkeyed = call(ping(0, "a"), "").await.unwrap();
    assert_eq!(
        (first.seq, next.seq, unkeyed.seq),
        (1, 2, 3),
        "one command per request id, none for the refused calls"
    );
}

/// `ctl`'s `EnqueueCommand` whose answer is lost (the line breaks after
/// the request went out) is made again with the same request id: the
/// caller gets the command, queued once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_whose_answer_is_lost_is_made_again_and_queued_once() {
    use uplink_testkit::relay::{Mode, Relay};
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let agent = enroll_one(&b, "lost-answer").await;
    let relay = Relay::start(b.addr).await;
    let url: http::Uri = format!("https://127.0.0.1:{}", relay.addr.port())
        .parse()
        .unwrap();
    let admin = uplink::ctl::Admin::new(&url, &b.net(), b.admin_token.clone());
    admin.agents("").await.unwrap();
    relay.set(Mode::DropReplies);
    let call = tokio::spawn({
        let (admin, agent) = (admin.clone(), agent.clone());
        async move { admin.enqueue(&agent, ping(0, "once")).await }
    });
    // The backend queues it; its answer goes nowhere; then the line breaks.
    tokio::time::sleep(Duration::from_millis(800)).await;
    relay.set(Mode::Forward);
    relay.cut_all();
    let cmd = call
        .await
        .unwrap()
        .expect("EnqueueCommand made again after its connection broke");
    let next = b.admin().enqueue(&agent, ping(0, "next")).await.unwrap();
    assert_eq!(
        (cmd.seq, next.seq),
        (1, 2),
        "the lost answer's command is queued once"
    );
}

/// Enrolls an agent named `hostname` over gRPC; its id.
async fn enroll_one(b: &TestBackend, hostname: &str) -> String {
    let mut client = b.agent_grpc().await;
    client
        .enroll(proto::EnrollRequest {
            enrollment_token: b.enroll_token.expose().into(),
            idempotency_key: String::new(),
            info: Some(proto::AgentInfo {
                hostname: hostname.into(),
                version: "1.0.0".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .agent_id
}
