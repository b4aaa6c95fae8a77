//! Metrics pipeline throughput on each rung, with the CPU time it costs,
//! against OTLP in the same run, over loopback TLS.
//!
//! One process holds a backend (`uplink::backend::Server` on `127.0.0.1:0`,
//! its own tokio runtime, threads named `backend`) and the agent side (a
//! second runtime, threads named `agent`). A thread named `source`
//! generates samples and records them, as the agent's sources do, as fast
//! as the path takes them (for uplink through the pipeline's own
//! `Recorder`, a bounded channel of 256 chunks; for OTLP through a channel
//! of the same size). CPU time is read per thread from
//! `/proc/self/task/*/schedstat` (the source thread reads its own before it
//! ends), so the cost of the pipeline (agent and backend threads) is told
//! apart from the cost of generating the samples.
//!
//! Four paths are measured:
//!
//! - **`uplink_grpc`, `uplink_longpoll`**: the agent's own pipeline,
//!   [`uplink::metrics::pipeline::Pipeline`], started for each run with the
//!   default settings (scraping off, a fresh spool): its batcher (flush on
//!   20,000 samples or 30 s), zstd and the disk spool (256 MiB cap, 8 MiB
//!   segments, synced every second), its sender with 4 batches in flight,
//!   acks, replay pacing and the negotiation of `batch_zstd` and series
//!   deltas. Its `Push` sends `PushMetrics` to the real backend over TLS on
//!   the rung (gRPC through tonic, or Connect over HTTP/1.1 with
//!   `ConnectClient::call_encoded`) as the agent's session does (the
//!   session's client is private to it), and maps the answer with the
//!   agent's own `agent::push::outcome`; any answer but "stored" fails the
//!   run. The backend decodes, validates, deduplicates in its store and
//!   updates its latest values, then answers. A run ends as the agent's
//!   shutdown does (the batcher flushes, the sender delivers what is
//!   spooled) and is over when the backend's
//!   `uplink_backend_metric_samples_total` has grown by exactly the samples
//!   recorded. Fresh batches are not paced: the replay rate applies only
//!   to batches spooled more than 10 s before they are sent.
//! - **`otlp_grpc`**: the peer. The same samples, batched by 20,000, each
//!   batch built into an OTLP `ExportMetricsServiceRequest` (the
//!   `opentelemetry-proto` types, in the shape of `benches/encoding.rs`:
//!   one resource per host, container and load generator, one metric per
//!   name) and exported with 4 in flight over gRPC with zstd (tonic, the
//!   same client stack as the gRPC rung) to a minimal OTLP receiver in the
//!   backend's runtime: TLS, HTTP/2, tonic's gRPC server with zstd, prost
//!   decoding of the whole request, a count of its data points. Like an
//!   OpenTelemetry Collector with its default in-memory queue, it keeps
//!   nothing on disk; and its receiver neither validates, deduplicates nor
//!   stores: a lower bound on what an OTLP path costs.
//! - **`e2e_grpc`, `e2e_longpoll`**: a real agent (`uplink::agent::run`,
//!   default metrics settings, scraping off) on each rung, fed Graphite
//!   plaintext over one TCP connection to its ingest endpoint, until the
//!   backend's sample counter has grown by the samples sent. This includes
//!   parsing and the agent's rate cap (`UPLINK_BENCH_E2E_REPLAY_RATE`,
//!   default 500,000 samples/s as in the agent, after a first second's
//!   worth at once).
//!
//! The samples come from `benches/common/workload.rs`, as in
//! `benches/encoding.rs`: one host (100 series at a 10 s interval), 50
//! containers (10 series each at 10 s, one chunk per scrape of all of
//! them) and a load test (84 per-second aggregates), with fresh values
//! throughout: 1,440 samples per 10 s of simulated time, in chunks of 84,
//! 100 and 500, as the sources record them.
//!
//! Output: the criterion group `pipeline` (functions `uplink_grpc`,
//! `uplink_longpoll` and `otlp_grpc`; one iteration is one batch of 20,000
//! samples through the whole path), then a table over
//! `UPLINK_BENCH_SAMPLES` samples per run (default 4,000,000) and
//! `UPLINK_BENCH_ROUNDS` rounds (default 3) in which the paths take turns,
//! with samples/s and samples per CPU-second; then the end-to-end runs
//! (`UPLINK_BENCH_E2E_SAMPLES`, default 1,000,000, rounded up to whole
//! batches; 0 skips them); then where the time goes: each stage alone, on
//! one thread, in ns per sample.
//!
//! All state lives in a temporary directory under `UPLINK_BENCH_DIR`
//! (default: the system's temporary directory).
//!
//! Run: `cargo bench --bench pipeline`.

mod common;

use common::otlp::otlp_request;
use common::workload::Workload;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;

use uplink::agent::{self, AgentConfig, AgentError, TransportMode};
use uplink::backend::sinks::{Origin, Sinks};
use uplink::backend::{BackendConfig, BackendError, Core, Server};
use uplink::client::{CallError, ConnectClient};
use uplink::metrics::batcher::{Batcher, BatcherConfig};
use uplink::metrics::compress::Compression;
use uplink::metrics::encode;
use uplink::metrics::ingest::IngestConfig;
use uplink::metrics::pipeline::{MetricsConfig, Pipeline, Push, PushOutcome};
use uplink::metrics::sample::Sample;
use uplink::metrics::spool::{Header, Spool};
use uplink::net::{Net, ProxySettings};
use uplink::proto::{self, agent_service_client::AgentServiceClient};
use uplink::secret::{Kind as SecretKind, Secret};
use uplink::tls::{self, ServerIdentity, Trust};

/// Samples per batch: the batcher's default flush size.
const BATCH: usize = uplink::metrics::batcher::DEFAULT_MAX_SAMPLES;
/// Chunks the OTLP path's channel holds, as the pipeline's recorder does.
const RECORDER_CHUNKS: usize = 256;
/// Largest decompressed batch read back from the spool, as in the agent.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Timeout of one push, as the agent's unary calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest OTLP request the receiver takes, decompressed.
const OTLP_MAX_MESSAGE: usize = 64 << 20;
/// The OTLP export method.
const OTLP_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
/// The agent service, for Connect calls.
const AGENT_SERVICE: &str = "uplink.v1.AgentService";
/// Longest a run may take before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the agents to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const DEFAULT_SAMPLES: u64 = 4_000_000;
const DEFAULT_ROUNDS: usize = 3;
const DEFAULT_E2E_SAMPLES: u64 = 1_000_000;
/// Batches timed per stage in the breakdown.
const STAGE_BATCHES: usize = 20;
/// Passes over them; the median pass is reported.
const STAGE_PASSES: usize = 5;

const SAMPLES_ENV: &str = "UPLINK_BENCH_SAMPLES";
const ROUNDS_ENV: &str = "UPLINK_BENCH_ROUNDS";
const E2E_ENV: &str = "UPLINK_BENCH_E2E_SAMPLES";
const E2E_RATE_ENV: &str = "UPLINK_BENCH_E2E_REPLAY_RATE";
const DIR_ENV: &str = "UPLINK_BENCH_DIR";

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// What a source thread hands back: the workload for the next run, and the
/// CPU time it spent (its own, since it ends before the run is measured).
type Fed = std::thread::JoinHandle<(Workload, Duration)>;

/// Records exactly `samples` samples with `record` (whole chunks, the last
/// one cut to fit) from a thread named `source`, as fast as the pipeline
/// takes them; `record` is false when the pipeline stopped taking them.
fn feed(
    mut w: Workload,
    mut record: impl FnMut(Vec<Sample>) -> bool + Send + 'static,
    samples: u64,
) -> Fed {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut left = samples as usize;
            let mut chunks = Vec::new();
            while left > 0 {
                w.next_second(&mut chunks);
                for mut chunk in chunks.drain(..) {
                    if left == 0 {
                        break;
                    }
                    chunk.truncate(left);
                    left -= chunk.len();
                    if !record(chunk) {
                        panic!("the pipeline stopped taking samples");
                    }
                }
            }
            (w, thread_cpu())
        })
        .expect("cannot start the source thread")
}

/// Writes exactly `samples` samples as Graphite plaintext lines to the
/// agent's ingest endpoint at `addr`, from a thread named `source`.
fn feed_graphite(mut w: Workload, addr: SocketAddr, samples: u64) -> Fed {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("cannot connect to the ingest endpoint {addr}: {e}"));
            let _ = sock.set_nodelay(true);
            let mut left = samples as usize;
            let mut chunks = Vec::new();
            let mut text = String::with_capacity(1 << 20);
            while left > 0 {
                w.next_second(&mut chunks);
                text.clear();
                for chunk in chunks.drain(..) {
                    for s in chunk.iter().take(left) {
                        graphite_line(s, &mut text);
                    }
                    left -= chunk.len().min(left);
                }
                sock.write_all(text.as_bytes())
                    .unwrap_or_else(|e| panic!("the ingest endpoint {addr} went away: {e}"));
            }
            (w, thread_cpu())
        })
        .expect("cannot start the source thread")
}

/// `name;label=value;... value seconds.millis`. Graphite separates fields
/// with spaces, so a space in a label value becomes `_`, as Graphite
/// senders such as JMeter's do.
fn graphite_line(s: &Sample, out: &mut String) {
    use std::fmt::Write as _;
    out.push_str(&s.series.name);
    for (k, v) in &s.series.labels {
        let _ = write!(out, ";{k}=");
        out.extend(v.chars().map(|c| if c == ' ' { '_' } else { c }));
    }
    let t = s.time_unix_ms;
    let _ = writeln!(out, " {} {}.{:03}", s.value, t / 1000, t % 1000);
}

// ---- OTLP ----------------------------------------------------------------

/// Data points in an OTLP request.
fn data_points(req: &ExportMetricsServiceRequest) -> u64 {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.len() as u64,
            Some(metric::Data::Sum(s)) => s.data_points.len() as u64,
            _ => 0,
        })
        .sum()
}

/// The minimal OTLP receiver: decodes each request and counts its points.
#[derive(Clone)]
struct OtlpReceiver {
    points: Arc<AtomicU64>,
}

impl tonic::server::UnaryService<ExportMetricsServiceRequest> for OtlpReceiver {
    type Response = ExportMetricsServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<ExportMetricsServiceRequest>) -> Self::Future {
        self.points
            .fetch_add(data_points(request.get_ref()), Ordering::Relaxed);
        std::future::ready(Ok(tonic::Response::new(
            ExportMetricsServiceResponse::default(),
        )))
    }
}

/// Serves the OTLP receiver over TLS (HTTP/2) as the backend serves gRPC.
async fn serve_otlp(listener: TcpListener, tls: Arc<rustls::ServerConfig>, receiver: OtlpReceiver) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let mut accept = EnabledCompressionEncodings::default();
    accept.enable(CompressionEncoding::Zstd);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, builder, receiver) = (acceptor.clone(), builder.clone(), receiver.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let receiver = receiver.clone();
                    async move {
                        let codec = tonic_prost::ProstCodec::<
                            ExportMetricsServiceResponse,
                            ExportMetricsServiceRequest,
                        >::default();
                        let mut grpc = tonic::server::Grpc::new(codec)
                            .apply_compression_config(
                                accept,
                                EnabledCompressionEncodings::default(),
                            )
                            .apply_max_message_size_config(Some(OTLP_MAX_MESSAGE), None);
                        Ok::<_, Infallible>(grpc.unary(receiver, req).await)
                    }
                });
            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
        });
    }
}

/// An OTLP exporter: tonic's gRPC client with zstd.
#[derive(Clone)]
struct OtlpClient(tonic::client::Grpc<Channel>);

impl OtlpClient {
    async fn export(&self, req: ExportMetricsServiceRequest, samples: u64) -> Result<u64, String> {
        let mut grpc = self.0.clone();
        grpc.ready().await.map_err(|e| e.to_string())?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(CALL_TIMEOUT);
        let codec = tonic_prost::ProstCodec::<
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        >::default();
        grpc.unary(r, PathAndQuery::from_static(OTLP_EXPORT), codec)
            .await
            .map_err(|s| s.to_string())?;
        Ok(samples)
    }
}

/// The OTLP path: batches of [`BATCH`] samples, each built into a request
/// and exported with `window` in flight. Returns the samples exported.
async fn otlp_pipeline(
    client: OtlpClient,
    mut rx: mpsc::Receiver<Vec<Sample>>,
    window: usize,
) -> u64 {
    let (batches_tx, mut batches) = mpsc::channel::<(ExportMetricsServiceRequest, u64)>(window);
    let batching = tokio::spawn(async move {
        let mut batch: Vec<Sample> = Vec::with_capacity(BATCH);
        while let Some(chunk) = rx.recv().await {
            for s in chunk {
                batch.push(s);
                if batch.len() == BATCH {
                    let req = otlp_request(&batch);
                    if batches_tx.send((req, BATCH as u64)).await.is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches_tx
                .send((otlp_request(&batch), batch.len() as u64))
                .await;
        }
    });
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    let mut delivered = 0;
    loop {
        tokio::select! {
            next = batches.recv(), if open && inflight.len() < window => match next {
                Some((req, n)) => inflight.push(client.export(req, n)),
                None => open = false,
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                delivered += done.unwrap_or_else(|e| panic!("OTLP export failed: {e}"));
            }
            else => break,
        }
    }
    batching.await.expect("the OTLP batching task panicked");
    delivered
}

// ---- the uplink pipeline's push ------------------------------------------------

/// What the pushes saw that a healthy backend never answers (a duplicate, a
/// rejection, a failure); a run fails on the first.
type Unexpected = Arc<Mutex<Vec<String>>>;

/// The answer of one `PushMetrics` as the pipeline takes it, mapped as the
/// agent's session maps it ([`uplink::agent::push::outcome`]); anything but
/// `Stored` is noted in `unexpected`.
fn checked(
    r: Result<proto::PushMetricsResponse, CallError>,
    unexpected: &Unexpected,
) -> PushOutcome {
    let outcome = uplink::agent::push::outcome(r);
    if !matches!(outcome, PushOutcome::Stored(_)) {
        unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{outcome:?}"));
    }
    outcome
}

/// The pipeline's push on the gRPC rung, as the agent's session sends it:
/// a request whose batch is already a zstd frame (`batch_zstd`) goes as it
/// is, another is compressed by the transport.
fn grpc_push(
    client: AgentServiceClient<Channel>,
    authorization: AsciiMetadataValue,
    unexpected: Unexpected,
) -> Push {
    Arc::new(move |req: proto::PushMetricsRequest| {
        let (mut client, authorization) = (client.clone(), authorization.clone());
        let unexpected = unexpected.clone();
        Box::pin(async move {
            if req.batch_zstd.is_empty() {
                client = client.send_compressed(CompressionEncoding::Zstd);
            }
            let mut r = tonic::Request::new(req);
            r.set_timeout(CALL_TIMEOUT);
            r.metadata_mut().insert("authorization", authorization);
            let answer = client
                .push_metrics(r)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s));
            checked(answer, &unexpected)
        })
    })
}

/// The pipeline's push on the long-poll rung (Connect over HTTP/1.1), as
/// the agent's session sends it.
fn longpoll_push(client: ConnectClient, unexpected: Unexpected) -> Push {
    Arc::new(move |req: proto::PushMetricsRequest| {
        let client = client.clone();
        let unexpected = unexpected.clone();
        Box::pin(async move {
            let zstd = req.batch_zstd.is_empty();
            let answer = client
                .call_encoded(AGENT_SERVICE, "PushMetrics", &req, CALL_TIMEOUT, zstd)
                .await;
            checked(answer, &unexpected)
        })
    })
}

// ---- CPU time ----------------------------------------------------------------

/// CPU time consumed so far, by thread group, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// Threads of the agent's runtime (workers and blocking threads).
    agent: Duration,
    /// Threads of the backend's runtime, and its store's checkpointer.
    backend: Duration,
    /// The thread that generates samples (as it reported itself).
    source: Duration,
    /// Every other thread (the main thread, which only waits).
    other: Duration,
    /// The whole process, threads that exited included (`/proc/self/stat`,
    /// in clock ticks of 10 ms).
    process: Duration,
}

impl Cpu {
    fn now() -> Cpu {
        let mut c = Cpu::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let p = task.path();
                let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                // The first field of schedstat is the time on a CPU, in ns.
                let Some(ns) = std::fs::read_to_string(p.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                else {
                    continue;
                };
                let d = Duration::from_nanos(ns);
                match comm.trim() {
                    "agent" => c.agent += d,
                    // It reports its own time: it ends before the run does.
                    "source" => {}
                    n if n == "backend" || n.starts_with("uplink-") => c.backend += d,
                    _ => c.other += d,
                }
            }
        }
        // utime and stime are fields 14 and 15; the name (field 2) may hold
        // spaces, so count from the parenthesis that closes it.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|f| f.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        // USER_HZ is 100 on Linux.
        c.process = Duration::from_millis(ticks * 10);
        c
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            agent: self.agent.saturating_sub(before.agent),
            backend: self.backend.saturating_sub(before.backend),
            source: Duration::ZERO,
            other: self.other.saturating_sub(before.other),
            process: self.process.saturating_sub(before.process),
        }
    }

    /// The pipeline's share: agent and backend threads.
    fn pipeline(&self) -> Duration {
        self.agent + self.backend
    }
}

// ---- the bench -----------------------------------------------------------------

/// The paths measured side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKind {
    UplinkGrpc,
    UplinkLongpoll,
    Otlp,
}

impl PathKind {
    const ALL: [PathKind; 3] = [
        PathKind::UplinkGrpc,
        PathKind::UplinkLongpoll,
        PathKind::Otlp,
    ];

    fn name(self) -> &'static str {
        match self {
            PathKind::UplinkGrpc => "uplink_grpc",
            PathKind::UplinkLongpoll => "uplink_longpoll",
            PathKind::Otlp => "otlp_grpc",
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
struct Run {
    samples: u64,
    wall: Duration,
    cpu: Cpu,
}

impl Run {
    fn rate(&self) -> f64 {
        self.samples as f64 / self.wall.as_secs_f64()
    }

    fn per_cpu(&self, d: Duration) -> f64 {
        self.samples as f64 / d.as_secs_f64().max(1e-9)
    }
}

/// An in-process agent fed through its Graphite endpoint.
struct IngestAgent {
    mode: TransportMode,
    graphite: SocketAddr,
}

/// The backend, the OTLP receiver, the clients of each path and the
/// end-to-end agents, running.
struct Bench {
    agent_rt: Runtime,
    backend_rt: Runtime,
    dir: PathBuf,
    core: Arc<Core>,
    /// The enrolled identity the pipeline sends as.
    agent_id: String,
    grpc: Push,
    longpoll: Push,
    unexpected: Unexpected,
    otlp: OtlpClient,
    otlp_points: Arc<AtomicU64>,
    window: usize,
    workload: Option<Workload>,
    runs: u64,
    e2e: Vec<IngestAgent>,
    stop_agents: watch::Sender<bool>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    stop_backend: watch::Sender<bool>,
    backend_task: JoinHandle<Result<(), BackendError>>,
    otlp_task: JoinHandle<()>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn runtime(name: &str, workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        // Blocking threads stay, so that their CPU time stays countable.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

fn e2e_hostname(mode: TransportMode) -> String {
    format!("bench-e2e-{}", mode.name())
}

impl Bench {
    /// Starts everything; `e2e_rate` is the end-to-end agents'
    /// `--metrics-replay-rate` (None: no end-to-end agents).
    fn start(dir: PathBuf, workers: usize, e2e_rate: Option<u64>) -> Bench {
        let agent_rt = runtime("agent", workers);
        let backend_rt = runtime("backend", workers);

        // The backend, on its runtime.
        let enroll_token = Secret::generate(SecretKind::Enrollment);
        let server = {
            let _rt = backend_rt.enter();
            let listener = backend_rt
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .expect("cannot bind 127.0.0.1:0");
            let mut cfg = BackendConfig::new(dir.join("backend"));
            cfg.hostnames = vec!["127.0.0.1".into()];
            cfg.admin_token = Some(Secret::generate(SecretKind::Admin));
            cfg.enroll_token = Some(enroll_token.clone());
            cfg.grace = Duration::from_secs(2);
            backend_rt
                .block_on(Server::new(cfg, listener))
                .expect("the backend does not start")
        };
        let (stop_backend, _) = watch::channel(false);
        let info = server.info().clone();
        let core = server.core();
        let ca = info.ca_file.clone().expect("the backend generated no CA");
        let backend_task = backend_rt.spawn(server.run(stopped(stop_backend.subscribe())));

        // The OTLP receiver, on the backend's runtime, with its own CA.
        let otlp_points = Arc::new(AtomicU64::new(0));
        std::fs::create_dir_all(dir.join("otlp")).expect("cannot create the receiver's directory");
        let otlp_tls = tls::server_config(&ServerIdentity::Generated {
            data_dir: dir.join("otlp"),
            hostnames: vec!["127.0.0.1".into()],
        })
        .expect("no TLS identity for the OTLP receiver");
        let otlp_ca = otlp_tls.ca_file.clone().expect("the receiver has no CA");
        let otlp_listener = backend_rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind 127.0.0.1:0");
        let otlp_addr = otlp_listener.local_addr().expect("local address");
        let otlp_task = backend_rt.spawn(serve_otlp(
            otlp_listener,
            otlp_tls.config,
            OtlpReceiver {
                points: otlp_points.clone(),
            },
        ));

        // The identity the pipeline sends as.
        let enrolled = backend_rt
            .block_on(core.enroll(proto::EnrollRequest {
                enrollment_token: enroll_token.expose().to_string(),
                info: Some(proto::AgentInfo {
                    hostname: "bench-pipeline".into(),
                    version: uplink::VERSION.into(),
                    ..Default::default()
                }),
            }))
            .expect("enrollment failed");
        let url = uplink::client::parse_backend_url(&info.url).expect("backend URL");
        let credential = Secret::new(enrolled.credential.clone());
        let net = |ca: &Path| {
            Net::new(
                tls::client_config(&Trust {
                    ca_files: vec![ca.to_path_buf()],
                    skip_os_store: true,
                })
                .expect("TLS client settings"),
                ProxySettings::direct(),
            )
        };
        let unexpected = Unexpected::default();
        let (grpc, longpoll, otlp) = agent_rt.block_on({
            let (url, backend_net, otlp_net) = (url.clone(), net(&ca), net(&otlp_ca));
            let credential = credential.clone();
            let unexpected = unexpected.clone();
            async move {
                // Channels spawn their tasks on the runtime they are made on.
                tokio::spawn(async move {
                    let keepalive = (Duration::from_secs(10), Duration::from_secs(20));
                    let channel =
                        uplink::client::grpc_channel(&url, &backend_net, keepalive.0, keepalive.1)
                            .await
                            .expect("no gRPC channel to the backend");
                    let authorization: AsciiMetadataValue =
                        MetadataValue::try_from(format!("Bearer {}", credential.expose()))
                            .expect("credential as a header value");
                    let grpc = grpc_push(
                        AgentServiceClient::new(channel),
                        authorization,
                        unexpected.clone(),
                    );
                    let longpoll = longpoll_push(
                        ConnectClient::new(&url, &backend_net).with_auth(credential),
                        unexpected,
                    );
                    let otlp_url = uplink::client::parse_backend_url(&format!(
                        "https://127.0.0.1:{}",
                        otlp_addr.port()
                    ))
                    .expect("receiver URL");
                    let channel = uplink::client::grpc_channel(
                        &otlp_url,
                        &otlp_net,
                        keepalive.0,
                        keepalive.1,
                    )
                    .await
                    .expect("no gRPC channel to the OTLP receiver");
                    let otlp = OtlpClient(
                        tonic::client::Grpc::new(channel)
                            .send_compressed(CompressionEncoding::Zstd),
                    );
                    (grpc, longpoll, otlp)
                })
                .await
                .expect("client setup panicked")
            }
        });

        // Real agents with a Graphite endpoint, one per rung.
        let (stop_agents, _) = watch::channel(false);
        let mut agent_tasks = Vec::new();
        let mut e2e = Vec::new();
        if let Some(replay_rate) = e2e_rate {
            for mode in [TransportMode::Grpc, TransportMode::Longpoll] {
                let graphite: SocketAddr = ([127, 0, 0, 1], free_port()).into();
                let mut acfg =
                    AgentConfig::new(url.clone(), dir.join(format!("agent-{}", mode.name())));
                acfg.token = Some(enroll_token.clone());
                acfg.trust = Trust {
                    ca_files: vec![ca.clone()],
                    skip_os_store: true,
                };
                acfg.transport = mode;
                acfg.hostname = e2e_hostname(mode);
                acfg.grace = Duration::from_secs(2);
                acfg.metrics = Some(MetricsConfig {
                    interval: None,
                    ingest: IngestConfig {
                        graphite: Some(graphite),
                        ..IngestConfig::default()
                    },
                    replay_rate,
                    ..MetricsConfig::default()
                });
                agent_tasks
                    .push(agent_rt.spawn(agent::run(acfg, stopped(stop_agents.subscribe()))));
                e2e.push(IngestAgent { mode, graphite });
            }
            let started = Instant::now();
            loop {
                let list = backend_rt
                    .block_on(core.list_agents(Default::default()))
                    .expect("list_agents failed")
                    .agents;
                let connected = e2e.iter().all(|a| {
                    list.iter()
                        .any(|x| x.hostname == e2e_hostname(a.mode) && x.connected)
                });
                if connected {
                    break;
                }
                assert!(
                    started.elapsed() < CONNECT_TIMEOUT,
                    "the end-to-end agents did not connect within {CONNECT_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        Bench {
            agent_rt,
            backend_rt,
            dir,
            core,
            agent_id: enrolled.agent_id,
            grpc,
            longpoll,
            unexpected,
            otlp,
            otlp_points,
            window: MetricsConfig::default().window,
            workload: Some(Workload::new()),
            runs: 0,
            e2e,
            stop_agents,
            agent_tasks,
            stop_backend,
            backend_task,
            otlp_task,
        }
    }

    /// Samples the backend has stored, from its own counter.
    fn stored_samples(&self) -> u64 {
        self.core
            .sinks()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(concat!("uplink_backend_metric_samples_total", " ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends `samples` samples through `path`; measures from the first
    /// sample recorded to the last one stored (uplink) or exported (OTLP).
    fn run(&mut self, path: PathKind, samples: u64) -> Run {
        self.runs += 1;
        let w = self.workload.take().expect("the workload is back");
        let run = match path {
            PathKind::UplinkGrpc => self.run_uplink(self.grpc.clone(), w, samples),
            PathKind::UplinkLongpoll => self.run_uplink(self.longpoll.clone(), w, samples),
            PathKind::Otlp => self.run_otlp(w, samples),
        };
        let problems =
            std::mem::take(&mut *self.unexpected.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(
            problems.is_empty(),
            "{}: pushes not stored: {problems:?}",
            path.name()
        );
        run
    }

    /// The agent's own pipeline ([`Pipeline`], default settings, scraping
    /// off, a fresh spool) pushing over `push`. The run ends as the agent's
    /// shutdown does: once the samples are recorded, the pipeline flushes
    /// its batcher and delivers what is spooled; it is over when the
    /// backend's sample counter has grown by `samples`.
    fn run_uplink(&mut self, push: Push, w: Workload, samples: u64) -> Run {
        let state_dir = self.dir.join(format!("pipeline-{}", self.runs));
        let cfg = MetricsConfig {
            interval: None,
            ..MetricsConfig::default()
        };
        let (_interval, interval_set) = watch::channel(None);
        let target = self.stored_samples() + samples;
        let pipeline = self
            .agent_rt
            .block_on(Pipeline::start(
                &cfg,
                state_dir.clone(),
                push,
                &self.agent_id,
                interval_set,
            ))
            .unwrap_or_else(|e| panic!("the pipeline does not start: {e}"));
        let recorder = pipeline.recorder.clone();
        let rt = self.agent_rt.handle().clone();
        let cpu = Cpu::now();
        let start = Instant::now();
        let feeder = feed(w, move |chunk| rt.block_on(recorder.record(chunk)), samples);
        let (w, source) = feeder.join().expect("the source thread panicked");
        self.workload = Some(w);
        let shutdown = self
            .agent_rt
            .spawn(pipeline.shutdown(tokio::time::Instant::now() + RUN_TIMEOUT));
        loop {
            let stored = self.stored_samples();
            if stored >= target {
                break;
            }
            let problems = self
                .unexpected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            assert!(problems.is_empty(), "pushes not stored: {problems:?}");
            assert!(
                start.elapsed() < RUN_TIMEOUT,
                "{} of {samples} samples stored after {RUN_TIMEOUT:?}",
                samples - (target - stored)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let wall = start.elapsed();
        let mut cpu = Cpu::now().since(cpu);
        cpu.source = source;
        self.agent_rt
            .block_on(shutdown)
            .expect("the pipeline's shutdown panicked");
        let _ = std::fs::remove_dir_all(&state_dir);
        assert_eq!(
            self.stored_samples() - (target - samples),
            samples,
            "samples the backend counted as stored"
        );
        Run { samples, wall, cpu }
    }

    /// The OTLP peer: batched, built and exported with the same window.
    fn run_otlp(&mut self, w: Workload, samples: u64) -> Run {
        let (tx, rx) = mpsc::channel(RECORDER_CHUNKS);
        let points_before = self.otlp_points.load(Ordering::Relaxed);
        let cpu = Cpu::now();
        let start = Instant::now();
        let task = self
            .agent_rt
            .spawn(otlp_pipeline(self.otlp.clone(), rx, self.window));
        let feeder = feed(w, move |chunk| tx.blocking_send(chunk).is_ok(), samples);
        let delivered = self
            .agent_rt
            .block_on(async { tokio::time::timeout(RUN_TIMEOUT, task).await })
            .unwrap_or_else(|_| panic!("OTLP took longer than {RUN_TIMEOUT:?}"))
            .expect("the OTLP pipeline panicked");
        let wall = start.elapsed();
        let mut cpu = Cpu::now().since(cpu);
        let (w, source) = feeder.join().expect("the source thread panicked");
        self.workload = Some(w);
        cpu.source = source;
        assert_eq!(delivered, samples, "otlp_grpc: samples exported");
        assert_eq!(
            self.otlp_points.load(Ordering::Relaxed) - points_before,
            samples,
            "data points the OTLP receiver decoded"
        );
        Run { samples, wall, cpu }
    }

    /// Sends `samples` samples (a whole number of batches) as Graphite lines
    /// to the real agent on `mode`'s rung; measures until the backend
    /// counted them stored.
    fn run_e2e(&mut self, mode: TransportMode, samples: u64) -> Run {
        let addr = self
            .e2e
            .iter()
            .find(|a| a.mode == mode)
            .expect("an end-to-end agent on this rung")
            .graphite;
        let target = self.stored_samples() + samples;
        let cpu = Cpu::now();
        let start = Instant::now();
        let feeder = feed_graphite(
            self.workload.take().expect("the workload is back"),
            addr,
            samples,
        );
        let (mut last, mut progress) = (0, Instant::now());
        loop {
            let stored = self.stored_samples();
            if stored >= target {
                break;
            }
            if stored != last {
                (last, progress) = (stored, Instant::now());
            }
            // A batch waits at most its age (30 s) in the agent's batcher.
            assert!(
                !(feeder.is_finished() && progress.elapsed() > Duration::from_secs(40)),
                "end-to-end {}: {} of {samples} samples stored, none for 40 s; did the agent refuse lines?",
                mode.name(),
                samples - (target - stored)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let wall = start.elapsed();
        let mut cpu = Cpu::now().since(cpu);
        let (w, source) = feeder.join().expect("the source thread panicked");
        self.workload = Some(w);
        cpu.source = source;
        Run { samples, wall, cpu }
    }

    fn shutdown(self) {
        let _ = self.stop_agents.send(true);
        for t in self.agent_tasks {
            self.agent_rt
                .block_on(t)
                .expect("agent task panicked")
                .expect("agent failed");
        }
        self.otlp_task.abort();
        let _ = self.stop_backend.send(true);
        self.backend_rt
            .block_on(self.backend_task)
            .expect("backend task panicked")
            .expect("backend failed");
        self.agent_rt.shutdown_timeout(Duration::from_secs(2));
        self.backend_rt.shutdown_timeout(Duration::from_secs(2));
    }
}

// ---- where the time goes ---------------------------------------------------------

/// Adds the time since `start` to stage `i`.
fn timed(t: &mut [Duration], i: usize, start: Instant) {
    t[i] += start.elapsed();
}

/// Time per stage, summed over the batches of one pass.
struct Stages {
    names: Vec<(&'static str, &'static str)>,
    passes: Vec<Vec<Duration>>,
}

impl Stages {
    fn median(&self, i: usize) -> Duration {
        let mut t: Vec<Duration> = self.passes.iter().map(|p| p[i]).collect();
        t.sort();
        t[t.len() / 2]
    }
}

/// Times each stage of both paths alone, on this thread: what the
/// throughput table's CPU time is made of, less TLS, HTTP and scheduling.
fn stages(b: &mut Bench, batches: usize, passes: usize) -> (Stages, usize) {
    let w = b.workload.as_mut().expect("the workload is back");
    let chunks = w.take(batches * BATCH);
    let samples: usize = chunks.iter().map(Vec::len).sum();
    let store = b.core.store();
    let sinks = Sinks::in_memory();
    let origin = Arc::new(Origin {
        agent: b.agent_id.clone(),
        provider: "default".into(),
        hostname: "bench-pipeline".into(),
    });
    let mut spool =
        Spool::open(MetricsConfig::default().spool_config(&b.dir.join("stages"))).expect("spool");
    let names = vec![
        ("agent", "batcher: add samples, build the MetricBatch"),
        ("agent", "MetricBatch encode (prost)"),
        ("agent", "zstd-1 compress (spool payload)"),
        ("agent", "spool append"),
        ("agent", "spool read back (peek)"),
        ("agent", "zstd decompress (spool payload)"),
        ("agent", "MetricBatch decode (prost)"),
        ("agent", "spool ack"),
        ("grpc", "request encode + zstd-3 (tonic)"),
        ("longpoll", "request encode + zstd-1 (call_zstd)"),
        ("backend", "zstd decompress"),
        ("backend", "PushMetricsRequest decode (prost)"),
        ("backend", "validate (encode::decode)"),
        ("backend", "store: ack, agent, dedup (SQLite)"),
        ("backend", "sinks: latest values"),
        ("otlp", "batch: collect samples (an Arc clone each)"),
        ("otlp", "build ExportMetricsServiceRequest"),
        ("otlp", "request encode + zstd-3 (tonic)"),
        ("receiver", "zstd decompress + decode (prost)"),
    ];
    let mut all = Vec::new();
    let epoch_base = fastrand::u64(1..u64::MAX / 4);
    for pass in 0..passes {
        let mut t = vec![Duration::ZERO; names.len()];

        let mut batcher = Batcher::new(BatcherConfig::default());
        let mut flushed = Vec::new();
        let start = Instant::now();
        for c in &chunks {
            batcher.add(c, Instant::now(), &mut flushed);
        }
        flushed.extend(batcher.flush());
        timed(&mut t, 0, start);

        let epoch = epoch_base + pass as u64;
        for (k, f) in flushed.into_iter().enumerate() {
            let seq = k as u64 + 1;
            let start = Instant::now();
            let bytes = f.batch.encode_to_vec();
            timed(&mut t, 1, start);
            let start = Instant::now();
            let payload = Compression::Zstd.compress(&bytes).expect("zstd");
            timed(&mut t, 2, start);
            let header = Header {
                epoch,
                seq,
                samples: f.samples,
                created_unix_ms: uplink::now_unix_ms(),
            };
            let start = Instant::now();
            spool.append(header, &payload).expect("append");
            timed(&mut t, 3, start);
            let start = Instant::now();
            let record = spool.peek(1).expect("peek").pop().expect("a record");
            timed(&mut t, 4, start);
            let start = Instant::now();
            let raw = Compression::Zstd
                .decompress(&record.payload, MAX_BATCH_BYTES)
                .expect("unzstd");
            timed(&mut t, 5, start);
            let start = Instant::now();
            let batch = proto::MetricBatch::decode(raw.as_slice()).expect("decode");
            timed(&mut t, 6, start);
            let start = Instant::now();
            spool.ack(epoch, seq).expect("ack");
            timed(&mut t, 7, start);
            let req = proto::PushMetricsRequest {
                ack: 0,
                epoch,
                seq,
                batch: Some(batch),
                batch_zstd: Vec::new(),
            };
            let start = Instant::now();
            let wire = zstd::stream::encode_all(req.encode_to_vec().as_slice(), 3).expect("zstd");
            timed(&mut t, 8, start);
            let start = Instant::now();
            let wire_1 = Compression::Zstd
                .compress(&req.encode_to_vec())
                .expect("zstd");
            timed(&mut t, 9, start);
            std::hint::black_box(wire_1);
            let start = Instant::now();
            let raw = Compression::Zstd
                .decompress(&wire, OTLP_MAX_MESSAGE)
                .expect("unzstd");
            timed(&mut t, 10, start);
            let start = Instant::now();
            let req = proto::PushMetricsRequest::decode(raw.as_slice()).expect("decode");
            timed(&mut t, 11, start);
            let start = Instant::now();
            let decoded = encode::decode(&req.batch.unwrap_or_default()).expect("valid");
            timed(&mut t, 12, start);
            let start = Instant::now();
            b.agent_rt.block_on(async {
                store
                    .ack(&b.agent_id, 0, uplink::now_unix_ms())
                    .await
                    .expect("ack");
                store.agent(&b.agent_id).await.expect("agent");
                let _ = store
                    .metric_batch_state(&b.agent_id, epoch, seq)
                    .await
                    .expect("state");
                store
                    .record_metric_batch(&b.agent_id, epoch, seq)
                    .await
                    .expect("record");
            });
            timed(&mut t, 13, start);
            let start = Instant::now();
            b.agent_rt
                .block_on(sinks.accept(origin.clone(), Arc::new(decoded)))
                .expect("sinks");
            timed(&mut t, 14, start);
        }

        let mut batch: Vec<Sample> = Vec::with_capacity(BATCH);
        let mut requests = Vec::new();
        let mut build = Duration::ZERO;
        let start = Instant::now();
        for c in &chunks {
            for s in c {
                batch.push(s.clone());
                if batch.len() == BATCH {
                    let built = Instant::now();
                    requests.push(otlp_request(&batch));
                    build += built.elapsed();
                    batch.clear();
                }
            }
        }
        t[15] += start.elapsed().saturating_sub(build);
        t[16] += build;
        for req in requests {
            let start = Instant::now();
            let wire = zstd::stream::encode_all(req.encode_to_vec().as_slice(), 3).expect("zstd");
            timed(&mut t, 17, start);
            let start = Instant::now();
            let raw = Compression::Zstd
                .decompress(&wire, OTLP_MAX_MESSAGE)
                .expect("unzstd");
            let back = ExportMetricsServiceRequest::decode(raw.as_slice()).expect("decode");
            timed(&mut t, 18, start);
            assert_eq!(data_points(&back), BATCH as u64);
        }
        all.push(t);
    }
    let _ = std::fs::remove_dir_all(b.dir.join("stages"));
    (Stages { names, passes: all }, samples)
}

fn print_stages(st: &Stages, samples: usize) {
    let ns = |d: Duration| d.as_nanos() as f64 / samples as f64;
    println!();
    println!(
        "Where the time goes: each stage alone, one thread, {samples} samples in batches of {BATCH} (median of {} passes), ns per sample",
        st.passes.len()
    );
    println!();
    println!("| side     | stage                                          | ns/sample |");
    println!("|----------|------------------------------------------------|----------:|");
    let mut sums: HashMap<&str, f64> = HashMap::new();
    for (i, (side, name)) in st.names.iter().enumerate() {
        let v = ns(st.median(i));
        *sums.entry(*side).or_default() += v;
        println!("| {side:<8} | {name:<46} | {v:>9.1} |");
    }
    let total = |sides: &[&str]| {
        sides
            .iter()
            .map(|s| sums.get(s).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    let rows = [
        ("uplink, gRPC rung: agent", total(&["agent", "grpc"])),
        (
            "uplink, long-poll rung: agent",
            total(&["agent", "longpoll"]),
        ),
        ("uplink: backend", total(&["backend"])),
        (
            "uplink, gRPC rung: both",
            total(&["agent", "grpc", "backend"]),
        ),
        ("OTLP: exporter", total(&["otlp"])),
        ("OTLP: receiver", total(&["receiver"])),
        ("OTLP: both", total(&["otlp", "receiver"])),
    ];
    println!();
    println!("| sum of stages                      | ns/sample | samples per CPU-second |");
    println!("|------------------------------------|----------:|-----------------------:|");
    for (name, v) in rows {
        println!("| {name:<34} | {v:>9.1} | {:>22.0} |", 1e9 / v);
    }
}

// ---- output ------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn print_runs(title: &str, rows: &[(String, Vec<Run>)]) {
    println!();
    println!("{title}");
    println!();
    println!(
        "| path            | runs |   samples/s | samples/CPU-s, pipeline | agent CPU-s | backend CPU-s | source CPU-s | process CPU-s |  wall s | samples/CPU-s, agent | samples/CPU-s, backend |"
    );
    println!(
        "|-----------------|-----:|------------:|------------------------:|------------:|--------------:|-------------:|--------------:|--------:|---------------------:|-----------------------:|"
    );
    for (name, runs) in rows {
        // The run with the median throughput per CPU-second stands for the
        // path; its other columns are its own.
        let mut sorted = runs.clone();
        sorted.sort_by(|a, b| {
            a.per_cpu(a.cpu.pipeline())
                .total_cmp(&b.per_cpu(b.cpu.pipeline()))
        });
        let m = sorted[sorted.len() / 2];
        println!(
            "| {name:<15} | {:>4} | {:>11.0} | {:>23.0} | {:>11} | {:>13} | {:>12} | {:>13} | {:>7} | {:>20.0} | {:>22.0} |",
            runs.len(),
            median(runs.iter().map(Run::rate).collect()),
            m.per_cpu(m.cpu.pipeline()),
            secs(m.cpu.agent),
            secs(m.cpu.backend),
            secs(m.cpu.source),
            secs(m.cpu.process),
            secs(m.wall),
            m.per_cpu(m.cpu.agent),
            m.per_cpu(m.cpu.backend),
        );
    }
    println!();
    for (name, runs) in rows {
        let each: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{:.0}/s, {:.0}/CPU-s",
                    r.rate(),
                    r.per_cpu(r.cpu.pipeline())
                )
            })
            .collect();
        println!("  {name}: {}", each.join("; "));
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer")),
        Err(_) => default,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (and
    // `cargo bench -- --test` adds `--test`): criterion then runs each
    // function once, so keep the other passes small. `--list` only lists.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let list = has("--list");
    let full = has("--bench") && !has("--test");
    let (samples, rounds, e2e_samples, stage_batches, stage_passes) = if list {
        (0, 0, 0, 0, 0)
    } else if full {
        (
            env_u64(SAMPLES_ENV, DEFAULT_SAMPLES),
            env_u64(ROUNDS_ENV, DEFAULT_ROUNDS as u64) as usize,
            env_u64(E2E_ENV, DEFAULT_E2E_SAMPLES),
            STAGE_BATCHES,
            STAGE_PASSES,
        )
    } else {
        (100_000, 1, 2 * BATCH as u64, 2, 1)
    };
    // Whole batches, so that the agent's batcher flushes the last one on
    // size rather than after its 30 s age.
    let e2e_samples = e2e_samples.div_ceil(BATCH as u64) * BATCH as u64;

    let parent = std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("uplink-bench-")
        .tempdir_in(&parent)
        .unwrap_or_else(|e| {
            panic!(
                "cannot create a temporary directory in {}: {e}",
                parent.display()
            )
        });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let load_before = load_average();
    let e2e_rate = env_u64(E2E_RATE_ENV, MetricsConfig::default().replay_rate);
    let mut bench = Bench::start(
        dir.path().to_path_buf(),
        workers,
        (e2e_samples > 0).then_some(e2e_rate),
    );

    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("pipeline");
        group.throughput(Throughput::Elements(BATCH as u64));
        for path in PathKind::ALL {
            group.bench_function(path.name(), |b| {
                b.iter_custom(|iters| bench.run(path, iters * BATCH as u64).wall)
            });
        }
        group.finish();
    }
    criterion.final_summary();

    if samples > 0 && rounds > 0 {
        // Warm-up: connections, allocations, the backend's series.
        for path in PathKind::ALL {
            bench.run(path, 5 * BATCH as u64);
        }
        let mut rows: Vec<(String, Vec<Run>)> = PathKind::ALL
            .iter()
            .map(|p| (p.name().to_string(), Vec::new()))
            .collect();
        for _ in 0..rounds {
            for (i, path) in PathKind::ALL.iter().enumerate() {
                rows[i].1.push(bench.run(*path, samples));
            }
        }
        print_runs(
            &format!(
                "Pipeline throughput: {samples} samples per run, {rounds} rounds, paths taking turns; {workers} worker threads per runtime"
            ),
            &rows,
        );
        let grpc = median(
            rows[0]
                .1
                .iter()
                .map(|r| r.per_cpu(r.cpu.pipeline()))
                .collect(),
        );
        let longpoll = median(
            rows[1]
                .1
                .iter()
                .map(|r| r.per_cpu(r.cpu.pipeline()))
                .collect(),
        );
        let otlp = median(
            rows[2]
                .1
                .iter()
                .map(|r| r.per_cpu(r.cpu.pipeline()))
                .collect(),
        );
        println!();
        println!(
            "Goal, gRPC rung at least 1,000,000 samples per CPU-second (agent and backend together): {} ({grpc:.0})",
            if grpc >= 1e6 { "met" } else { "not met" }
        );
        println!(
            "Goal, long-poll rung at least half of that, 500,000: {} ({longpoll:.0})",
            if longpoll >= 5e5 { "met" } else { "not met" }
        );
        println!(
            "uplink per CPU-second against OTLP: gRPC {:.2}x, long-poll {:.2}x",
            grpc / otlp,
            longpoll / otlp
        );
    }

    if e2e_samples > 0 && !list {
        for mode in [TransportMode::Grpc, TransportMode::Longpoll] {
            bench.run_e2e(mode, 2 * BATCH as u64);
        }
        let mut rows: Vec<(String, Vec<Run>)> = Vec::new();
        for mode in [TransportMode::Grpc, TransportMode::Longpoll] {
            rows.push((format!("e2e_{}", mode.name()), Vec::new()));
        }
        for _ in 0..rounds.max(1) {
            for (i, mode) in [TransportMode::Grpc, TransportMode::Longpoll]
                .into_iter()
                .enumerate()
            {
                rows[i].1.push(bench.run_e2e(mode, e2e_samples));
            }
        }
        print_runs(
            &format!(
                "End to end through a real agent's Graphite endpoint (parsing included; agent defaults, --metrics-replay-rate {e2e_rate}): {e2e_samples} samples per run"
            ),
            &rows,
        );
    }

    if stage_batches > 0 {
        let (st, n) = stages(&mut bench, stage_batches, stage_passes);
        print_stages(&st, n);
    }
    if !list {
        println!();
        println!(
            "Load average (1, 5, 15 min): {load_before} at the start, {} at the end",
            load_average()
        );
    }
    bench.shutdown();
}
