//! A client of a [`TestBackend`]'s metrics path: an agent enrolled with
//! the enrollment token, batches pushed over gRPC (tonic, with message
//! compression) and over Connect unary with curl, and what the backend
//! made of them: its `/metrics` page behind the admin token and its
//! JSON-lines files.

use std::path::{Path, PathBuf};

use prost::Message;
use tonic::codec::CompressionEncoding;
use uplink::metrics::compress::Compression;
use uplink::proto;

use crate::backend::TestBackend;

/// The agent service's gRPC client.
pub type AgentClient = proto::agent_service_client::AgentServiceClient<tonic::transport::Channel>;

/// An enrolled agent: its id and credential.
pub struct Agent {
    /// The id the backend gave it.
    pub id: String,
    /// The credential it authenticates with.
    pub credential: String,
}

/// A gRPC client of the backend's agent service.
pub async fn grpc_client(b: &TestBackend) -> AgentClient {
    b.agent_grpc().await
}

/// Enrolls with the backend's enrollment token, as an agent does.
pub async fn enroll(b: &TestBackend, hostname: &str) -> Agent {
    enroll_with(&grpc_client(b).await, b.enroll_token.expose(), hostname).await
}

/// Enrolls through `client` with `token`, as an agent does.
pub async fn enroll_with(client: &AgentClient, token: &str, hostname: &str) -> Agent {
    let r = client
        .clone()
        .enroll(proto::EnrollRequest {
            enrollment_token: token.to_string(),
            idempotency_key: String::new(),
            info: Some(proto::AgentInfo {
                hostname: hostname.into(),
                version: "test".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("enroll")
        .into_inner();
    Agent {
        id: r.agent_id,
        credential: r.credential,
    }
}

/// A push of `batch` as a message, identified by `(epoch, seq)`.
pub fn push_request(epoch: u64, seq: u64, batch: proto::MetricBatch) -> proto::PushMetricsRequest {
    proto::PushMetricsRequest {
        ack: 0,
        epoch,
        seq,
        batch: Some(batch),
        batch_zstd: Vec::new(),
        resent: false,
    }
}

/// A batch as `batch_zstd` carries it: one zstd frame of its bytes.
pub fn zstd_batch(batch: &proto::MetricBatch) -> Vec<u8> {
    Compression::Zstd.compress(&batch.encode_to_vec()).unwrap()
}

/// A request with the batch as a zstd frame instead of a message.
pub fn push_request_zstd(
    epoch: u64,
    seq: u64,
    batch: proto::MetricBatch,
) -> proto::PushMetricsRequest {
    proto::PushMetricsRequest {
        batch: None,
        batch_zstd: zstd_batch(&batch),
        ..push_request(epoch, seq, batch)
    }
}

/// Pushes over gRPC with message compression.
pub async fn push_grpc(
    client: &AgentClient,
    agent: &Agent,
    encoding: CompressionEncoding,
    req: proto::PushMetricsRequest,
) -> Result<bool, tonic::Status> {
    push_grpc_response(client, agent, encoding, req)
        .await
        .map(|r| r.stored)
}

/// Pushes over gRPC with zstd message compression, as the agent does.
pub async fn push_zstd(
    client: &AgentClient,
    agent: &Agent,
    req: proto::PushMetricsRequest,
) -> Result<bool, tonic::Status> {
    push_grpc(client, agent, CompressionEncoding::Zstd, req).await
}

/// Pushes over gRPC with message compression and returns the whole
/// answer.
pub async fn push_grpc_response(
    client: &AgentClient,
    agent: &Agent,
    encoding: CompressionEncoding,
    req: proto::PushMetricsRequest,
) -> Result<proto::PushMetricsResponse, tonic::Status> {
    let mut client = client.clone().send_compressed(encoding);
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", agent.credential).parse().unwrap(),
    );
    client.push_metrics(r).await.map(|r| r.into_inner())
}

/// An HTTP answer: status and body.
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body as received.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The Connect error's code and message.
    pub fn connect_error(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not a Connect error: {}", self.text()));
        (
            v["code"].as_str().unwrap_or("").to_string(),
            v["message"].as_str().unwrap_or("").to_string(),
        )
    }
}

/// Runs curl against the backend (without blocking the runtime the
/// backend runs on); `args` go before the URL.
pub async fn curl(b: &TestBackend, path: &str, args: &[&str]) -> Answer {
    let url = format!("https://localhost:{}{path}", b.addr.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(&b.ca)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(&url)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&c| c == b'\n').expect("status line");
    let status = String::from_utf8_lossy(&body[nl + 1..]).parse().unwrap();
    body.truncate(nl);
    Answer { status, body }
}

/// POSTs a `PushMetrics` body with curl, Connect unary: `application/proto`
/// compressed with `compression` (sent as `Content-Encoding`, unless
/// `encoding_header` overrides it).
pub async fn push_curl(
    b: &TestBackend,
    agent: &Agent,
    dir: &Path,
    compression: Compression,
    encoding_header: Option<&str>,
    req: &proto::PushMetricsRequest,
) -> Answer {
    let body = compression.compress(&req.encode_to_vec()).unwrap();
    push_curl_raw(
        b,
        agent,
        dir,
        encoding_header.unwrap_or(compression.name()),
        &body,
    )
    .await
}

/// POSTs `body` as it is with curl, Connect unary, sent with
/// `Content-Encoding: <content_encoding>`.
pub async fn push_curl_raw(
    b: &TestBackend,
    agent: &Agent,
    dir: &Path,
    content_encoding: &str,
    body: &[u8],
) -> Answer {
    let file = dir.join(format!("body-{}.bin", fastrand::u64(..)));
    std::fs::write(&file, body).unwrap();
    let auth = format!("authorization: Bearer {}", agent.credential);
    let ce = format!("content-encoding: {content_encoding}");
    let data = format!("@{}", file.display());
    curl(
        b,
        "/uplink.v1.AgentService/PushMetrics",
        &[
            "-H",
            "content-type: application/proto",
            "-H",
            &ce,
            "-H",
            &auth,
            "--data-binary",
            &data,
        ],
    )
    .await
}

/// `stored` from a successful Connect answer.
pub fn stored(a: &Answer) -> bool {
    assert_eq!(a.status, 200, "{}", a.text());
    proto::PushMetricsResponse::decode(a.body.as_slice())
        .expect("a PushMetricsResponse")
        .stored
}

/// `GET /metrics` with the admin token.
pub async fn scrape(b: &TestBackend) -> String {
    let auth = format!("authorization: Bearer {}", b.admin_token.expose());
    let a = curl(b, "/metrics", &["-H", &auth]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.text()
}

/// The value of the sample line of `/metrics` that starts with `prefix`.
pub fn sample(page: &str, prefix: &str) -> Option<String> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .map(|l| l[prefix.len()..].trim().to_string())
}

/// The value of the counter `name` on a `/metrics` page, or a failure
/// naming it.
pub fn counter(page: &str, name: &str) -> u64 {
    sample(page, &format!("{name} "))
        .unwrap_or_else(|| panic!("{name} missing from:\n{page}"))
        .parse()
        .unwrap()
}

/// Every JSON line in `dir`, file by file in name order.
pub fn json_lines(dir: &Path) -> Vec<serde_json::Value> {
    jsonl_files(dir)
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "{p:?} ends with a partial line"
            );
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{p:?}: {e}: {l}")))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `.jsonl` files in `dir`, in name order.
pub fn jsonl_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    v.sort();
    v
}

/// Sends a `Report` over gRPC with the agent's credential.
pub async fn report(
    client: &AgentClient,
    agent: &Agent,
    req: proto::ReportRequest,
) -> Result<proto::ReportResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", agent.credential).parse().unwrap(),
    );
    client.clone().report(r).await.map(|r| r.into_inner())
}

/// The resident memory of process `pid` (`std::process::id()` for this
/// one, where a [`TestBackend`] runs), in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"));
    kib * 1024
}

/// Bytes of a store on disk: `uplink.db` and its WAL in `dir`.
pub fn store_bytes(dir: &Path) -> u64 {
    ["uplink.db", "uplink.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}
