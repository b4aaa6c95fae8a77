//! The backend's port before any login, attacked as the network can: real
//! TLS connections on loopback against the `uplink backend` binary, its
//! memory read from /proc, and an agent and `ctl` that must keep working.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uplink_testkit::hostile::BackendProc;
use uplink_testkit::*;

const MIB: u64 = 1024;

/// Asserts the backend's memory grew by less than `max_kib` over `base`.
fn assert_rss_bounded(b: &BackendProc, base: u64, max_kib: u64, what: &str) -> u64 {
    let now = b.rss_kib();
    eprintln!(
        "{what}: backend RSS {} MiB -> {} MiB",
        base / MIB,
        now / MIB
    );
    assert!(
        now.saturating_sub(base) < max_kib,
        "{what}: the backend grew from {} MiB to {} MiB",
        base / MIB,
        now / MIB
    );
    now
}

/// `ctl providers` answers (the admin API works).
async fn assert_ctl_works(b: &BackendProc) {
    let out = b.ctl(&["providers"]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("default"),
        "ctl providers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 150 connections each send the head of a 4 MiB enrollment and 2 MiB of
/// its body, then stall. Enrollment bodies are small: the backend must not
/// hold what they send (before: every byte was buffered, 300 MiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_enrollment_bodies_do_not_fill_memory() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &["--max-connections-per-addr", "1000"]).await;
    let base = b.rss_kib();
    let chunk = vec![b'x'; 64 * 1024];
    let mut held = Vec::new();
    for _ in 0..150 {
        let mut tls = b.tls(b"http/1.1").await.expect("connects");
        let head = format!(
            "POST /uplink.v1.AgentService/Enroll HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             content-type: application/proto\r\ncontent-length: {}\r\n\r\n",
            4 * 1024 * 1024
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        // The backend may answer and close early: that is the point.
        for _ in 0..32 {
            if tls.write_all(&chunk).await.is_err() {
                break;
            }
        }
        held.push(tls);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_rss_bounded(&b, base, 64 * MIB, "150 unfinished 4 MiB enrollments");
    assert_ctl_works(&b).await;
    drop(held);
}

/// A stream body that sends `first` and then never ends (until dropped).
fn stalled_body(first: Bytes) -> (mpsc::Sender<()>, StreamBody<ReceiverStream>) {
    let (tx, rx) = mpsc::channel(1);
    (
        tx,
        StreamBody::new(ReceiverStream {
            first: Some(first),
            rx,
        }),
    )
}

/// The body stream of [`stalled_body`].
struct ReceiverStream {
    first: Option<Bytes>,
    rx: mpsc::Receiver<()>,
}

impl futures_util::Stream for ReceiverStream {
    type Item = Result<Frame<Bytes>, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(b) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(_) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// 50 HTTP/2 connections open many streams of `AdminService/ListAgents`
/// without a token, each a gRPC message announced at 4 MiB of which
/// 512 KiB is sent. The token is checked before any body is read, so the
/// backend holds none of it (before: each stream's bytes were buffered
/// for decoding, up to 1,024 streams a connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_grpc_streams_do_not_fill_memory() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &["--max-connections-per-addr", "1000"]).await;
    let base = b.rss_kib();
    let mut payload = vec![0u8; 512 * 1024 + 5];
    payload[1..5].copy_from_slice(&(4u32 * 1024 * 1024).to_be_bytes());
    let payload = Bytes::from(payload);
    let mut held = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let tls = b.tls(b"h2").await.expect("connects");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        for _ in 0..16 {
            let (tx, body) = stalled_body(payload.clone());
            held.push(tx);
            let req = http::Request::post(format!("{}/uplink.v1.AdminService/ListAgents", b.url()))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body)
                .unwrap();
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                if sender.ready().await.is_err() {
                    return None;
                }
                let resp = sender.send_request(req).await.ok()?;
                resp.headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string())
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_rss_bounded(
        &b,
        base,
        100 * MIB,
        "50 connections x 16 unauthenticated streams",
    );
    // Every refused call gets a gRPC status: unauthenticated (16) or, past
    // the failure rate, resource exhausted (8); none is served.
    let mut codes = Vec::new();
    for t in tasks.drain(..).take(20) {
        if let Ok(Ok(Some(code))) = tokio::time::timeout(Duration::from_secs(60), t).await {
            codes.push(code);
        }
    }
    assert!(
        !codes.is_empty(),
        "no refused call was answered with a status"
    );
    assert!(
        codes.iter().all(|c| c == "16" || c == "8"),
        "unexpected statuses: {codes:?}"
    );
    assert_ctl_works(&b).await;
    drop(held);
}

/// A client that completes the TLS handshake and sends nothing is closed
/// at the first-request deadline (before: never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_first_request_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &["--first-request-timeout", "2s"]).await;
    let mut tls = b.tls(b"h2").await.expect("connects");
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent connection was still open after 60 s"
    );
}

/// A unary body trickled a byte at a time is cut at the body deadline with
/// 408 and the Connect error (before: held for as long as the client
/// liked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_at_the_body_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &["--body-timeout", "2s"]).await;
    let mut tls = b.tls(b"http/1.1").await.expect("connects");
    let head = format!(
        "POST /uplink.v1.AdminService/ListAgents HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         authorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
        b.admin_token.expose()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let trickle = tokio::spawn(async move {
        for _ in 0..120 {
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(50), async {
        while !String::from_utf8_lossy(&answer).contains("deadline_exceeded") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "no answer within 50 s to a trickled body");
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("deadline_exceeded"),
        "{answer}"
    );
}

/// Hundreds of idle TLS connections under a low open-file limit (256) do
/// not lock out operators and agents: the backend raised what it could,
/// logged the limits, keeps unauthenticated connections under a cap sized
/// from the limit, and an authenticated agent keeps its stream while the
/// idle ones churn (before: `accept` failed with EMFILE for everyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_under_a_low_file_limit_leave_room_for_agents_and_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(
        dir.path(),
        Some(256),
        &[
            "--max-connections-per-addr",
            "10000",
            "--first-request-timeout",
            "1h",
        ],
    )
    .await;
    b.proc
        .wait_log(&["open-file limit", "hard=256"], Duration::from_secs(20))
        .await;
    let caps = b
        .proc
        .wait_log(&["max_preauth_connections="], Duration::from_secs(20))
        .await;
    assert!(caps.contains("max_preauth_connections=96"), "{caps}");

    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(c) = b.tls(b"h2").await {
            idle.push(c);
        }
    }
    assert_ctl_works(&b).await;
    let state = dir.path().join("agent");
    let _agent = b.agent(&state, "edge-host");
    wait_for(
        Duration::from_secs(60),
        "agent connected over gRPC",
        || async {
            let out = b.ctl(&["agents"]).await;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            (text.contains("edge-host") && text.contains("grpc")).then_some(())
        },
    )
    .await;
    // More idle connections: the agent's authenticated connection is not
    // among those they replace.
    for _ in 0..400 {
        if let Ok(c) = b.tls(b"h2").await {
            idle.push(c);
        }
    }
    assert_ctl_works(&b).await;
    let out = b.ctl(&["agents"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("edge-host") && text.contains("grpc"),
        "{text}"
    );
    drop(idle);
}

/// Errors reach curl over HTTP/2 as the documented status and JSON body
/// for requests with a body: a wrong admin token (401) and a wrong content
/// type (415). Before, curl failed with a framing error (exit 92).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_curl_over_http2_for_requests_with_a_body() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &[]).await;
    let body = dir.path().join("body.json");
    std::fs::write(&body, vec![b'{'; 256 * 1024]).unwrap();
    let wrong = "authorization: Bearer upl_a_wrong".to_string();
    let right = format!("authorization: Bearer {}", b.admin_token.expose());
    for (auth, content_type, status, code) in [
        (&wrong, "application/json", "401", "unauthenticated"),
        (&right, "text/plain", "415", "unimplemented"),
    ] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(&b.ca)
            .args(["-H", auth, "-H", &format!("content-type: {content_type}")])
            .args(["--data-binary", &format!("@{}", body.display())])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{}/uplink.v1.AdminService/ListAgents", b.url()))
            .output()
            .await
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "curl {:?}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.ends_with(status), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(text.rsplit_once('\n').unwrap().0).expect("a JSON error");
        assert_eq!(json["code"], code, "{json}");
    }
}

/// One token enrolls at most its burst at once (then one a second), and
/// guessed enrollment tokens count as failed authentications of their
/// address: both answer `RESOURCE_EXHAUSTED` with a retry hint and are
/// counted on /metrics (before: 500 enrollments in 0.3 s, and guesses
/// unlimited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_are_rate_limited_per_token_and_guesses_per_address() {
    use uplink::backend::defaults::{DEFAULT_AUTH_FAILURE_BURST, ENROLL_BURST_PER_TOKEN};
    use uplink::proto;
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let mut client = b.agent_grpc().await;
    let req = |token: &str| proto::EnrollRequest {
        enrollment_token: token.into(),
        idempotency_key: String::new(),
        info: Some(proto::AgentInfo {
            hostname: "mass".into(),
            version: "1".into(),
            ..Default::default()
        }),
    };
    let mut enrolled = 0u32;
    let refused = loop {
        match client.enroll(req(b.enroll_token.expose())).await {
            Ok(_) => enrolled += 1,
            Err(e) => break e,
        }
        assert!(
            enrolled < 1000,
            "1000 enrollments with one token, none refused"
        );
    };
    assert!(
        enrolled >= ENROLL_BURST_PER_TOKEN,
        "only {enrolled} enrolled"
    );
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("retry in"), "{refused:?}");

    for _ in 0..DEFAULT_AUTH_FAILURE_BURST {
        let err = client.enroll(req("upl_e_guess")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    let err = client.enroll(req("upl_e_guess")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry in"), "{err:?}");

    let out = tokio::process::Command::new("curl")
        // From another address: this one is over its failure rate.
        .args(["-sS", "--interface", "127.0.0.2", "--cacert"])
        .arg(&b.ca)
        .args([
            "-H",
            &format!("authorization: Bearer {}", b.admin_token.expose()),
        ])
        .arg(format!("https://127.0.0.1:{}/metrics", b.addr.port()))
        .output()
        .await
        .expect("curl runs");
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("uplink_backend_enrollments_rate_limited_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "uplink_backend_auth_failures_total {DEFAULT_AUTH_FAILURE_BURST}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("uplink_backend_auth_rate_limited_total 1\n"),
        "{metrics}"
    );
}

/// One agent credential holds at most `MAX_STREAMS_PER_AGENT` Subscribe
/// streams: each stream past it ends the oldest with a `Rotate` frame
/// naming why, and the newest keep receiving (before: 300 streams on one
/// credential each received every command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_per_agent_limit_replace_the_oldest() {
    use uplink::backend::defaults::MAX_STREAMS_PER_AGENT;
    use uplink::proto;
    use uplink::proto::server_frame::Kind;
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let agent = push::enroll(&b, "many-streams").await;
    let client = b.agent_grpc().await;
    let mut streams = Vec::new();
    for _ in 0..MAX_STREAMS_PER_AGENT + 2 {
        let mut req = tonic::Request::new(proto::SubscribeRequest {
            ack: 0,
            info: Some(proto::AgentInfo {
                hostname: "many-streams".into(),
                version: "test".into(),
                ..Default::default()
            }),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", agent.credential).parse().unwrap(),
        );
        let mut s = client.clone().subscribe(req).await.unwrap().into_inner();
        // The first frame (a heartbeat) proves this stream is open before
        // the next one is made, so "oldest" is well defined.
        let first = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("a first frame within 30 s");
        assert!(first.unwrap().is_some());
        streams.push(s);
    }
    // The two oldest end, each with a Rotate frame that says why.
    for s in streams.iter_mut().take(2) {
        let rotate = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match s.message().await {
                    Ok(Some(proto::SubscribeResponse {
                        frame:
                            Some(proto::ServerFrame {
                                kind: Some(Kind::Rotate(r)),
                            }),
                    })) => return r.reason,
                    Ok(Some(_)) => {}
                    other => panic!("the old stream ended without a Rotate: {other:?}"),
                }
            }
        })
        .await
        .expect("a Rotate on an old stream within 30 s");
        assert!(rotate.contains("replaced by a newer stream"), "{rotate}");
    }
    // The newest still receive frames (heartbeats).
    for s in streams.iter_mut().skip(2) {
        let next = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("a frame within 30 s");
        assert!(matches!(next, Ok(Some(_))), "{next:?}");
    }
}

/// Sends a Connect call to ListAgents with the admin token over HTTP/1.1,
/// announcing `announced` body bytes and sending `sent` of them.
async fn partial_admin_call(
    b: &BackendProc,
    announced: usize,
    sent: usize,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = b.tls(b"http/1.1").await.expect("connects");
    let head = format!(
        "POST /uplink.v1.AdminService/ListAgents HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         authorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {announced}\r\n\r\n",
        b.admin_token.expose()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b' '; sent]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// Reads the answer's first 4 KiB.
async fn answer_of(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf))
        .await
        .expect("an answer within 30 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Bodies read whole are bounded over all connections, even for an
/// authenticated client: past `--max-buffered-body-bytes` a call gets 429
/// `resource_exhausted` with `retry-after`, and the budget comes back when
/// the held body goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_at_once_are_bounded_over_all_connections() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &["--max-buffered-body-bytes", "1m"]).await;
    let holder = partial_admin_call(&b, 900 * 1024, 800 * 1024).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut second = partial_admin_call(&b, 900 * 1024, 900 * 1024).await;
    let answer = answer_of(&mut second).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.contains("resource_exhausted")
            && answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    drop(holder);
    let answer = wait_for(Duration::from_secs(30), "the budget back", || async {
        let mut third = partial_admin_call(&b, 600 * 1024, 600 * 1024).await;
        let a = answer_of(&mut third).await;
        (!a.starts_with("HTTP/1.1 429")).then_some(a)
    })
    .await;
    // The body is spaces, not a request: decoded and refused, not limited.
    assert!(
        answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
}

/// Reads one HTTP/1.1 answer (head and a `content-length` body) from
/// `tls`: its head, lowercased, or None when the connection ended first.
async fn one_answer(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if got.len() >= end + 4 + len {
                return Some(head);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf))
            .await
            .expect("an answer within 30 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// A Connect call with a wrong token over HTTP/1.1, announcing `len` body
/// bytes and sending `sent` of them at once.
async fn wrong_token_call(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    len: usize,
    sent: usize,
) {
    let head = format!(
        "POST /uplink.v1.AdminService/ListAgents HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         authorization: Bearer not-the-token\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b' '; sent]).await.unwrap();
    tls.flush().await.unwrap();
}

/// An error answered on HTTP/1.1 before the request's body was read to its
/// end says `Connection: close` and the connection closes, so the client
/// sends its next request elsewhere; an error answered once the body was
/// read keeps the connection for the next request. (Before: a body that
/// arrived late or was too large to discard left a connection that was
/// closed without a word, and the client's next request on it failed with
/// an EOF.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_error_before_the_body_was_read_closes_the_connection_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let b = BackendProc::start(dir.path(), None, &[]).await;

    // The body comes with the head: refused, and the connection carries a
    // second request.
    let mut tls = b.tls(b"http/1.1").await.expect("connects");
    wrong_token_call(&mut tls, 2, 2).await;
    let head = one_answer(&mut tls).await.expect("an answer");
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    wrong_token_call(&mut tls, 2, 2).await;
    let head = one_answer(&mut tls)
        .await
        .expect("a second answer on the kept-alive connection");
    assert!(head.starts_with("http/1.1 401"), "{head}");

    // The body never comes (the backend discards a refused body for 5 s
    // at most): refused with `Connection: close`, then closed.
    let mut tls = b.tls(b"http/1.1").await.expect("connects");
    wrong_token_call(&mut tls, 10, 0).await;
    let head = one_answer(&mut tls).await.expect("an answer");
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(
        one_answer(&mut tls).await,
        None,
        "the connection closes after the answer"
    );

    // A body too large to discard (over 4 MiB): the same.
    let tls = b.tls(b"http/1.1").await.expect("connects");
    let (len, sent) = (6 << 20, 5 << 20);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /uplink.v1.AdminService/ListAgents HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             authorization: Bearer not-the-token\r\ncontent-type: application/json\r\n\
             content-length: {len}\r\n\r\n"
        );
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&vec![b' '; sent]).await;
        let _ = wr.flush().await;
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf))
            .await
            .expect("an answer within 30 s")
            .unwrap_or(0);
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    writer.abort();
}
