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
//! The samples come from `testkit/src/workload.rs`, as in
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
//! The parts live in the testkit: the OTLP receiver and exporter
//! (`uplink_testkit::otlp`), the pushes on each rung (`push`), the source
//! thread (`feed`), the CPU accounting and the throughput table
//! (`throughput`) and the stage timings (`stages`). This file holds what
//! is measured: the set-up, the runs and their order.
//!
//! Run: `cargo bench --bench pipeline`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};

use uplink::agent::{self, AgentConfig, AgentError, TransportMode};
use uplink::backend::{BackendConfig, BackendError, Core, Server};
use uplink::client::ConnectClient;
use uplink::metrics::ingest::IngestConfig;
use uplink::metrics::pipeline::{MetricsConfig, Pipeline, Push};
use uplink::net::{Net, ProxySettings};
use uplink::proto::{self, agent_service_client::AgentServiceClient};
use uplink::secret::{Kind as SecretKind, Secret};
use uplink::tls::{self, Trust};
use uplink_testkit::bench::{bench_dir, stopped};
use uplink_testkit::feed::{feed, feed_graphite};
use uplink_testkit::free_port;
use uplink_testkit::measure::{count_from_env, load_average};
use uplink_testkit::otlp::{OtlpClient, OtlpReceiver, otlp_pipeline};
use uplink_testkit::rung_push::{Unexpected, grpc_push, longpoll_push};
use uplink_testkit::stages::{BATCH, time_stages};
use uplink_testkit::throughput::{Cpu, Run, median, print_runs, runtime};
use uplink_testkit::workload::Workload;

/// Chunks the OTLP path's channel holds, as the pipeline's recorder does.
const RECORDER_CHUNKS: usize = 256;
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
    receiver: OtlpReceiver,
    window: usize,
    workload: Option<Workload>,
    runs: u64,
    e2e: Vec<IngestAgent>,
    stop_agents: watch::Sender<bool>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    stop_backend: watch::Sender<bool>,
    backend_task: JoinHandle<Result<(), BackendError>>,
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
        let receiver = OtlpReceiver::start(&backend_rt, &dir.join("otlp"));

        // The identity the pipeline sends as.
        let enrolled = backend_rt
            .block_on(core.enroll(proto::EnrollRequest {
                enrollment_token: enroll_token.expose().to_string(),
                idempotency_key: String::new(),
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
            let (url, backend_net, otlp_net) = (url.clone(), net(&ca), net(&receiver.ca));
            let otlp_addr = receiver.addr;
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
                    let otlp = OtlpClient::connect(otlp_addr, &otlp_net).await;
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
            receiver,
            window: MetricsConfig::default().window,
            workload: Some(Workload::new()),
            runs: 0,
            e2e,
            stop_agents,
            agent_tasks,
            stop_backend,
            backend_task,
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
        let points_before = self.receiver.points();
        let cpu = Cpu::now();
        let start = Instant::now();
        let task = self
            .agent_rt
            .spawn(otlp_pipeline(self.otlp.clone(), rx, BATCH, self.window));
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
            self.receiver.points() - points_before,
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
        self.receiver.stop();
        let _ = self.stop_backend.send(true);
        self.backend_rt
            .block_on(self.backend_task)
            .expect("backend task panicked")
            .expect("backend failed");
        self.agent_rt.shutdown_timeout(Duration::from_secs(2));
        self.backend_rt.shutdown_timeout(Duration::from_secs(2));
    }
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
            count_from_env(SAMPLES_ENV, DEFAULT_SAMPLES),
            count_from_env(ROUNDS_ENV, DEFAULT_ROUNDS as u64) as usize,
            count_from_env(E2E_ENV, DEFAULT_E2E_SAMPLES),
            STAGE_BATCHES,
            STAGE_PASSES,
        )
    } else {
        (100_000, 1, 2 * BATCH as u64, 2, 1)
    };
    // Whole batches, so that the agent's batcher flushes the last one on
    // size rather than after its 30 s age.
    let e2e_samples = e2e_samples.div_ceil(BATCH as u64) * BATCH as u64;

    let dir = bench_dir("uplink-bench-");
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let load_before = load_average();
    let e2e_rate = count_from_env(E2E_RATE_ENV, MetricsConfig::default().replay_rate);
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
        let chunks = bench
            .workload
            .as_mut()
            .expect("the workload is back")
            .take(stage_batches * BATCH);
        time_stages(
            &chunks,
            &bench.core,
            &bench.agent_id,
            &bench.agent_rt,
            &bench.dir.join("stages"),
            stage_passes,
        )
        .print();
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
