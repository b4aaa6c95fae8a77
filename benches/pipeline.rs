//! Metrics pipeline throughput on each rung, with the CPU time it costs,
//! against OTLP in the same run, over loopback TLS.
//!
//! One process holds a backend (`uplink::backend::Server` on `127.0.0.1:0`,
//! its own tokio runtime, threads named `backend`) and the agent side (a
//! second runtime, threads named `agent`). A thread named `source`
//! generates samples and records them, as the agent's sources do, into a
//! bounded channel of `Vec<Sample>` (256 chunks, the size of the agent's
//! `Recorder` channel), as fast as the pipeline takes them. CPU time is read
//! per thread from `/proc/self/task/*/schedstat` (the source thread reads
//! its own before it ends), so the cost of the pipeline (agent and backend
//! threads) is told apart from the cost of generating the samples.
//!
//! Four paths are measured:
//!
//! - **`uplink_grpc`, `uplink_longpoll`**: the agent's pipeline, rebuilt
//!   from its public parts as `agent::metrics` wires them (the pipeline's
//!   tasks are private to the agent's session): a task runs a
//!   [`Batcher`] (flush on 20,000 samples or 30 s, the defaults), encodes
//!   each flushed `MetricBatch`, compresses it with zstd and appends it to a
//!   [`Spool`] on disk (defaults: 256 MiB cap, 8 MiB segments, synced every
//!   second); a sender reads spooled batches back with 4 in flight (the
//!   default window), decompresses and decodes each, sends it as
//!   `PushMetrics` to the real backend over TLS on the rung (gRPC with
//!   zstd through tonic, or Connect over HTTP/1.1 with
//!   `ConnectClient::call_zstd`, as the session does) and acks it in the
//!   spool when the backend answers. The backend decodes, validates,
//!   deduplicates in its store and updates its latest values, then
//!   answers. Samples count as delivered when the backend acknowledged
//!   them, and the backend's `uplink_backend_metric_samples_total` must
//!   have grown by exactly as many. The sender applies no rate cap; the
//!   agent's `--metrics-replay-rate` (500,000 samples/s by default) caps
//!   every send in the product, replays or not.
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
//! The samples follow `benches/encoding.rs`: one host (100 series at a
//! 10 s interval), 50 containers (10 series each at 10 s, one chunk per
//! scrape of all of them) and a load test (84 per-second aggregates),
//! with fresh values throughout: 1,440 samples per 10 s of simulated time,
//! in chunks of 84, 100 and 500, as the sources record them.
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

use common::T0_MS;
use common::otlp::otlp_request;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;

use uplink::agent::metrics::MetricsConfig;
use uplink::agent::{self, AgentConfig, AgentError, TransportMode};
use uplink::backend::sinks::{Origin, Sinks};
use uplink::backend::{BackendConfig, BackendError, Core, Server};
use uplink::client::ConnectClient;
use uplink::metrics::batcher::{Batcher, BatcherConfig, Flushed};
use uplink::metrics::compress::Compression;
use uplink::metrics::encode::{self, Kind, Sample, Series};
use uplink::metrics::ingest::IngestConfig;
use uplink::metrics::spool::{Header, Position, Record, Spool, SpoolConfig};
use uplink::net::{Net, ProxySettings};
use uplink::proto::{self, agent_service_client::AgentServiceClient};
use uplink::secret::{Kind as SecretKind, Secret};
use uplink::tls::{self, ServerIdentity, Trust};

/// Samples per batch: the batcher's default flush size.
const BATCH: usize = uplink::metrics::batcher::DEFAULT_MAX_SAMPLES;
/// Chunks the recorder's channel holds, as in the agent.
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

// ---- the samples -------------------------------------------------------

/// Seed of the sample generator.
const SEED: u64 = 0x5eed_2026;
/// Containers monitored.
const CONTAINERS: usize = 50;
/// Containers under load among them.
const BUSY_CONTAINERS: usize = 10;
/// Scrape interval of the host and containers, in seconds.
const INTERVAL_S: i64 = 10;

/// How a series' value moves from one reading to the next.
#[derive(Clone, Copy)]
enum Model {
    /// A counter growing by `lo..hi` units of `quantum`.
    Grows { lo: u64, hi: u64, quantum: f64 },
    /// A gauge moving by up to `step` units of `quantum`, within `lo..=hi`.
    Drifts {
        step: i64,
        quantum: f64,
        lo: f64,
        hi: f64,
    },
    /// A constant.
    Fixed,
    /// CPU usage as sysinfo reports it: an `f32` percentage, as a ratio.
    CpuRatio,
    /// A load average: two decimals.
    LoadAverage,
    /// CPU seconds of a nanosecond counter growing by `lo..hi`.
    CpuSeconds { lo: u64, hi: u64 },
    /// A response time within 10% of `base` ms, to the microsecond.
    Millis { base: f64 },
    /// A largest response time between `base` and twice it, whole ms.
    MaxMillis { base: f64 },
}

fn grows(lo: u64, hi: u64) -> Model {
    Model::Grows {
        lo,
        hi,
        quantum: 1.0,
    }
}

/// One series and its current value.
struct Track {
    series: Arc<Series>,
    model: Model,
    value: f64,
}

impl Track {
    fn read(&mut self, rng: &mut fastrand::Rng) -> f64 {
        match self.model {
            Model::Grows { lo, hi, quantum } => {
                self.value += rng.u64(lo..hi.max(lo + 1)) as f64 * quantum;
                self.value
            }
            Model::Drifts {
                step,
                quantum,
                lo,
                hi,
            } => {
                self.value = (self.value + rng.i64(-step..=step) as f64 * quantum).clamp(lo, hi);
                self.value
            }
            Model::Fixed => self.value,
            Model::CpuRatio => {
                self.value = (self.value + (rng.f64() - 0.5) * 20.0).clamp(0.5, 99.5);
                f64::from(self.value as f32) / 100.0
            }
            Model::LoadAverage => {
                self.value = (self.value + (rng.f64() - 0.5) * 0.4).clamp(0.0, 16.0);
                (self.value * 100.0).round() / 100.0
            }
            Model::CpuSeconds { lo, hi } => {
                self.value += rng.u64(lo..hi) as f64;
                self.value / 1e9
            }
            Model::Millis { base } => (base * (0.9 + 0.2 * rng.f64()) * 1000.0).round() / 1000.0,
            Model::MaxMillis { base } => (base * (1.0 + rng.f64())).round(),
        }
    }
}

/// The series a source reads together, and the delay of its reading after
/// the tick.
struct Source {
    tracks: Vec<Track>,
    offset_ms: i64,
}

impl Source {
    fn new(offset_ms: i64) -> Self {
        Source {
            tracks: Vec::new(),
            offset_ms,
        }
    }

    fn add(&mut self, series: Series, model: Model, start: f64) {
        self.tracks.push(Track {
            series: Arc::new(series),
            model,
            value: start,
        });
    }

    fn read(&mut self, rng: &mut fastrand::Rng, tick_ms: i64, out: &mut Vec<Sample>) {
        let time_unix_ms = tick_ms + self.offset_ms;
        for t in &mut self.tracks {
            let value = t.read(rng);
            out.push(Sample {
                series: t.series.clone(),
                time_unix_ms,
                value,
            });
        }
    }
}

fn gauge(name: &str) -> Series {
    Series::new(name, Kind::Gauge)
}

fn counter(name: &str) -> Series {
    Series::new(name, Kind::Counter)
}

/// One host's 100 series, as the host source reads them.
fn host_source(rng: &mut fastrand::Rng) -> Source {
    let mut s = Source::new(0);
    let h = |x: Series| x.label("host.name", "lab-host-01");
    let gib = (1u64 << 30) as f64;
    for cpu in std::iter::once("total".to_string()).chain((0..8).map(|c| c.to_string())) {
        let series = gauge("host_cpu_usage_ratio").label("cpu", cpu).unit("1");
        s.add(h(series), Model::CpuRatio, 30.0);
    }
    for cpu in 0..8 {
        let series = gauge("host_cpu_frequency_hertz")
            .label("cpu", cpu.to_string())
            .unit("Hz");
        let model = Model::Drifts {
            step: 3,
            quantum: 1e8,
            lo: 1.2e9,
            hi: 3.6e9,
        };
        s.add(h(series), model, 2.8e9);
    }
    for period in ["1m", "5m", "15m"] {
        let series = gauge("host_load_average").label("period", period);
        s.add(h(series), Model::LoadAverage, 1.5);
    }
    s.add(
        h(gauge("host_memory_total_bytes").unit("By")),
        Model::Fixed,
        32.0 * gib,
    );
    for (name, start) in [
        ("host_memory_used_bytes", 11.0),
        ("host_memory_available_bytes", 20.0),
        ("host_memory_free_bytes", 6.0),
    ] {
        let model = Model::Drifts {
            step: 12_000,
            quantum: 1024.0,
            lo: 0.0,
            hi: 32.0 * gib,
        };
        s.add(h(gauge(name).unit("By")), model, start * gib);
    }
    s.add(
        h(gauge("host_swap_total_bytes").unit("By")),
        Model::Fixed,
        8.0 * gib,
    );
    let swap = Model::Drifts {
        step: 2,
        quantum: 4096.0,
        lo: 0.0,
        hi: 8.0 * gib,
    };
    s.add(
        h(gauge("host_swap_used_bytes").unit("By")),
        swap,
        0.25 * gib,
    );
    for (iface, bytes, packets) in [
        ("lo", 2_000_000u64, 3_000u64),
        ("eth0", 60_000_000, 60_000),
        ("eth1", 400_000, 900),
        ("docker0", 30_000_000, 25_000),
        ("br-3f2a1c9e", 1_500_000, 2_000),
        ("wg0", 20_000, 60),
    ] {
        let n = |name: &str| h(counter(name).label("interface", iface));
        let start = rng.u64(1 << 30..1 << 40) as f64;
        let errors = if iface == "eth1" { 2 } else { 0 };
        let by = |x: Series| x.unit("By");
        s.add(
            by(n("host_network_receive_bytes_total")),
            grows(bytes / 2, bytes),
            start,
        );
        s.add(
            by(n("host_network_transmit_bytes_total")),
            grows(bytes / 3, bytes),
            (start / 2.0).round(),
        );
        s.add(
            n("host_network_receive_packets_total"),
            grows(packets / 2, packets),
            (start / 900.0).round(),
        );
        s.add(
            n("host_network_transmit_packets_total"),
            grows(packets / 3, packets),
            (start / 1800.0).round(),
        );
        s.add(
            n("host_network_receive_errors_total"),
            grows(0, errors),
            3.0,
        );
        s.add(n("host_network_transmit_errors_total"), Model::Fixed, 0.0);
        s.add(n("host_network_receive_dropped_total"), grows(0, 2), 17.0);
        s.add(n("host_network_transmit_dropped_total"), Model::Fixed, 0.0);
    }
    for (mount, size) in [
        ("/", 100.0),
        ("/boot", 1.0),
        ("/var/lib/docker", 500.0),
        ("/home", 200.0),
        ("/data", 2000.0),
        ("/tmp", 16.0),
    ] {
        let size = size * gib;
        let m = |name: &str| h(gauge(name).label("mountpoint", mount).unit("By"));
        s.add(m("host_filesystem_size_bytes"), Model::Fixed, size);
        let free = Model::Drifts {
            step: 20_000,
            quantum: 4096.0,
            lo: 0.0,
            hi: size,
        };
        s.add(
            m("host_filesystem_available_bytes"),
            free,
            (size * 0.4 / 4096.0).round() * 4096.0,
        );
    }
    for (disk, bytes) in [
        ("vda", 40_000_000u64),
        ("vdb", 3_000_000),
        ("nvme0n1", 90_000_000),
    ] {
        let d = |name: &str| h(counter(name).label("device", disk));
        let start = rng.u64(1 << 32..1 << 42) as f64;
        let sectors = |lo: u64, hi: u64| Model::Grows {
            lo: lo / 512,
            hi: hi / 512,
            quantum: 512.0,
        };
        s.add(
            d("host_disk_read_bytes_total").unit("By"),
            sectors(bytes / 4, bytes),
            (start / 512.0).round() * 512.0,
        );
        s.add(
            d("host_disk_written_bytes_total").unit("By"),
            sectors(bytes / 3, bytes),
            (start / 1024.0).round() * 512.0,
        );
        s.add(
            d("host_disk_reads_total"),
            grows(bytes / 80_000, bytes / 20_000),
            (start / 30_000.0).round(),
        );
        s.add(
            d("host_disk_writes_total"),
            grows(bytes / 60_000, bytes / 15_000),
            (start / 20_000.0).round(),
        );
    }
    let processes = Model::Drifts {
        step: 6,
        quantum: 1.0,
        lo: 100.0,
        hi: 2000.0,
    };
    s.add(h(gauge("host_processes")), processes, 412.0);
    s.add(
        h(counter("host_uptime_seconds").unit("s")),
        grows(10, 11),
        864_000.0,
    );
    s
}

/// One container's 10 series, as Docker's stats give them.
fn container_source(rng: &mut fastrand::Rng, i: usize) -> Source {
    let busy = i < BUSY_CONTAINERS;
    let id: String = (0..64)
        .map(|_| char::from(b"0123456789abcdef"[rng.usize(0..16)]))
        .collect();
    let name = format!("lab-{}-{i:02}", if busy { "target" } else { "worker" });
    let image = if busy {
        "registry.lab.local/shop/api:2.14.1"
    } else {
        "registry.lab.local/lab/worker:1.4.2"
    };
    let c = |x: Series| {
        x.label("container.id", &id)
            .label("container.image.name", image)
            .label("container.name", &name)
    };
    let scale = if busy { 1 } else { 200 };
    let mib = (1u64 << 20) as f64;
    let limit = if busy { 2048.0 * mib } else { 512.0 * mib };
    let mut s = Source::new(40 + 7 * i as i64);
    s.add(
        c(counter("container_cpu_usage_seconds_total").unit("s")),
        Model::CpuSeconds {
            lo: 4_000_000_000 / scale,
            hi: 20_000_000_000 / scale,
        },
        rng.u64(1_000_000_000..5_000_000_000_000) as f64,
    );
    let memory = Model::Drifts {
        step: if busy { 2_500 } else { 25 },
        quantum: 4096.0,
        lo: 8.0 * mib,
        hi: limit,
    };
    s.add(
        c(gauge("container_memory_usage_bytes").unit("By")),
        memory,
        (limit * 0.3 / 4096.0).round() * 4096.0,
    );
    s.add(
        c(gauge("container_memory_limit_bytes").unit("By")),
        Model::Fixed,
        limit,
    );
    for (name, lo, hi, start_bits) in [
        (
            "container_network_receive_bytes_total",
            8_000_000,
            40_000_000,
            34,
        ),
        (
            "container_network_transmit_bytes_total",
            20_000_000,
            90_000_000,
            35,
        ),
        ("container_network_receive_packets_total", 9_000, 40_000, 24),
        (
            "container_network_transmit_packets_total",
            9_000,
            50_000,
            24,
        ),
    ] {
        let series = counter(name);
        let series = if name.ends_with("bytes_total") {
            series.unit("By")
        } else {
            series
        };
        s.add(
            c(series),
            grows(lo / scale, hi / scale),
            rng.u64(1 << 10..1 << start_bits) as f64,
        );
    }
    for name in [
        "container_blkio_read_bytes_total",
        "container_blkio_write_bytes_total",
    ] {
        let blocks = Model::Grows {
            lo: 0,
            hi: if busy { 1200 } else { 3 },
            quantum: 4096.0,
        };
        s.add(
            c(counter(name).unit("By")),
            blocks,
            (rng.u64(0..1 << 22) * 4096) as f64,
        );
    }
    let pids = Model::Drifts {
        step: if busy { 4 } else { 0 },
        quantum: 1.0,
        lo: 1.0,
        hi: 500.0,
    };
    s.add(
        c(gauge("container_pids")),
        pids,
        if busy { 48.0 } else { 3.0 },
    );
    s
}

/// A load test's per-second aggregates: 12 requests, each with three
/// response-time quantiles, the largest response time and requests per
/// status code.
fn load_test_source() -> Source {
    let mut s = Source::new(0);
    let requests = [
        "GET /",
        "GET /api/products",
        "GET /api/products/{id}",
        "POST /api/cart",
        "GET /api/cart",
        "DELETE /api/cart/{id}",
        "POST /api/orders",
        "GET /api/orders/{id}",
        "POST /api/login",
        "GET /api/search",
        "GET /static/app.js",
        "GET /healthz",
    ];
    for (r, req) in requests.iter().enumerate() {
        let l = |x: Series| {
            x.label("host.name", "lab-host-01")
                .label("request", *req)
                .label("service.name", "jmeter")
        };
        let base = 8.0 + 20.0 * r as f64;
        for (q, factor) in [("0.5", 1.0), ("0.9", 2.2), ("0.99", 4.5)] {
            let series = gauge("loadtest_response_time_milliseconds")
                .label("quantile", q)
                .unit("ms");
            s.add(
                l(series),
                Model::Millis {
                    base: base * factor,
                },
                0.0,
            );
        }
        s.add(
            l(gauge("loadtest_response_time_max_milliseconds").unit("ms")),
            Model::MaxMillis { base: base * 7.0 },
            0.0,
        );
        for (status, share) in [("200", 388), ("404", 8), ("500", 4)] {
            let series = counter("loadtest_requests_total").label("status", status);
            s.add(l(series), grows(0, share), 0.0);
        }
    }
    s
}

/// An endless stream of samples from one host, its containers and a load
/// test, in simulated time.
struct Workload {
    rng: fastrand::Rng,
    host: Source,
    containers: Vec<Source>,
    load_test: Source,
    second: i64,
}

impl Workload {
    fn new() -> Self {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let host = host_source(&mut rng);
        let containers = (0..CONTAINERS)
            .map(|i| container_source(&mut rng, i))
            .collect();
        Workload {
            rng,
            host,
            containers,
            load_test: load_test_source(),
            second: 0,
        }
    }

    /// Appends the chunks of the next simulated second, as the sources
    /// record them: the load test's aggregates every second; every 10 s
    /// the host's scrape, then the containers' scrape (one chunk for all).
    fn next_second(&mut self, out: &mut Vec<Vec<Sample>>) {
        let tick = T0_MS + self.second * 1000;
        let mut chunk = Vec::with_capacity(self.load_test.tracks.len());
        self.load_test.read(&mut self.rng, tick, &mut chunk);
        out.push(chunk);
        if self.second % INTERVAL_S == 0 {
            let tick = tick + self.rng.i64(0..4);
            let mut chunk = Vec::with_capacity(self.host.tracks.len());
            self.host.read(&mut self.rng, tick, &mut chunk);
            out.push(chunk);
            let mut chunk = Vec::with_capacity(CONTAINERS * 10);
            for c in &mut self.containers {
                c.read(&mut self.rng, tick, &mut chunk);
            }
            out.push(chunk);
        }
        self.second += 1;
    }

    /// The next chunks holding at least `samples` samples.
    fn take(&mut self, samples: usize) -> Vec<Vec<Sample>> {
        let mut out = Vec::new();
        let mut n = 0;
        while n < samples {
            let before = out.len();
            self.next_second(&mut out);
            n += out[before..].iter().map(Vec::len).sum::<usize>();
        }
        out
    }
}

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

/// Records exactly `samples` samples into `tx` (whole chunks, the last one
/// cut to fit) from a thread named `source`, as fast as the pipeline takes
/// them, then closes the channel.
fn feed(mut w: Workload, tx: mpsc::Sender<Vec<Sample>>, samples: u64) -> Fed {
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
                    if tx.blocking_send(chunk).is_err() {
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

// ---- the uplink pipeline, as the agent wires it ----------------------------

/// `PushMetrics` on one rung, as the agent's session sends it.
#[derive(Clone)]
enum Rung {
    Grpc {
        client: AgentServiceClient<Channel>,
        authorization: AsciiMetadataValue,
    },
    Longpoll(ConnectClient),
}

impl Rung {
    /// As the agent's session pushes: a request whose batch is already a
    /// zstd frame (`batch_zstd`) goes as it is, another is compressed by
    /// the transport.
    async fn push(&self, req: proto::PushMetricsRequest) -> Result<bool, String> {
        let compressed = !req.batch_zstd.is_empty();
        match self {
            Rung::Grpc {
                client,
                authorization,
            } => {
                let mut r = tonic::Request::new(req);
                r.set_timeout(CALL_TIMEOUT);
                r.metadata_mut()
                    .insert("authorization", authorization.clone());
                let mut client = client.clone();
                if !compressed {
                    client = client.send_compressed(CompressionEncoding::Zstd);
                }
                client
                    .push_metrics(r)
                    .await
                    .map(|r| r.into_inner().stored)
                    .map_err(|s| s.to_string())
            }
            Rung::Longpoll(c) => c
                .call_encoded::<_, proto::PushMetricsResponse>(
                    AGENT_SERVICE,
                    "PushMetrics",
                    &req,
                    CALL_TIMEOUT,
                    !compressed,
                )
                .await
                .map(|r| r.stored)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The spool settings `MetricsConfig::default()` gives the agent.
fn spool_config(dir: PathBuf) -> SpoolConfig {
    let m = MetricsConfig::default();
    let mut s = SpoolConfig::new(dir);
    s.cap_bytes = m.spool_max_bytes;
    s.segment_bytes = (m.spool_max_bytes / 8).clamp(4096, 8 << 20);
    s.sync = uplink::metrics::spool::SyncPolicy::Every(m.spool_sync);
    s
}

/// Runs a blocking spool operation off the runtime's workers, as the agent
/// does.
async fn with_spool<T: Send + 'static>(
    spool: &Arc<Mutex<Spool>>,
    f: impl FnOnce(&mut Spool) -> T + Send + 'static,
) -> T {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || f(&mut spool.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .expect("a spool operation panicked")
}

/// The batcher task: samples in, zstd-compressed batches appended to the
/// spool. Sets `done` once the channel is closed and everything is spooled.
async fn batch_loop(
    mut rx: mpsc::Receiver<Vec<Sample>>,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    done: Arc<AtomicBool>,
) {
    let mut batcher = Batcher::new(BatcherConfig::default());
    let epoch = fastrand::u64(1..u64::MAX / 2);
    let mut seq = 0u64;
    let mut flushed: Vec<Flushed> = Vec::new();
    loop {
        let due = batcher.due();
        let mut closing = false;
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(samples) => batcher.add(&samples, Instant::now(), &mut flushed),
                None => closing = true,
            },
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()).await }, if due.is_some() => {
                flushed.extend(batcher.flush());
            }
        }
        if closing {
            flushed.extend(batcher.flush());
        }
        for f in flushed.drain(..) {
            seq += 1;
            let header = Header {
                epoch,
                seq,
                samples: f.samples,
                created_unix_ms: uplink::now_unix_ms(),
            };
            let bytes = f.batch.encode_to_vec();
            with_spool(&spool, move |s| {
                let payload = Compression::Zstd.compress(&bytes).expect("zstd");
                s.append(header, &payload).expect("spool append")
            })
            .await;
            spooled.notify_one();
        }
        if closing {
            done.store(true, Ordering::SeqCst);
            spooled.notify_one();
            return;
        }
    }
}

/// One spooled batch, pushed as the agent pushes it to a backend that
/// reads `batch_zstd`: the spooled bytes as they are.
async fn send_one(rung: Rung, r: Record) -> (Header, Result<(), String>) {
    let h = r.header;
    let outcome = rung
        .push(proto::PushMetricsRequest {
            ack: 0,
            epoch: h.epoch,
            seq: h.seq,
            batch: None,
            batch_zstd: r.payload,
        })
        .await
        .and_then(|stored| {
            if stored {
                Ok(())
            } else {
                Err("the backend called it a duplicate".into())
            }
        });
    (h, outcome)
}

/// The sender: spooled batches, oldest first, `window` in flight, each
/// acked in the spool when the backend stored it. Returns the samples
/// delivered once the batcher is done and the spool is empty.
async fn send_loop(
    rung: Rung,
    window: usize,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    done: Arc<AtomicBool>,
) -> u64 {
    let mut inflight = FuturesUnordered::new();
    let mut cursor: Option<Position> = None;
    let mut delivered = 0u64;
    loop {
        // Read before peeking: once the batcher is done, this peek sees
        // every batch it appended.
        let finished = done.load(Ordering::SeqCst);
        if inflight.len() < window {
            let want = window - inflight.len();
            let after = cursor;
            let records = with_spool(&spool, move |s| s.peek_after(after, want))
                .await
                .expect("spool read");
            for r in records {
                cursor = Some(r.position);
                inflight.push(send_one(rung.clone(), r));
            }
        }
        if inflight.is_empty() {
            if finished {
                return delivered;
            }
            spooled.notified().await;
            continue;
        }
        tokio::select! {
            biased;
            Some((h, outcome)) = inflight.next() => {
                if let Err(e) = outcome {
                    panic!("batch (epoch {}, seq {}) not delivered: {e}", h.epoch, h.seq);
                }
                with_spool(&spool, move |s| s.ack(h.epoch, h.seq))
                    .await
                    .expect("spool ack");
                delivered += u64::from(h.samples);
            }
            _ = spooled.notified(), if inflight.len() < window => {}
        }
    }
}

/// The uplink pipeline on `rung` with an opened spool. Returns the samples
/// delivered.
async fn uplink_pipeline(
    rung: Rung,
    window: usize,
    spool: Spool,
    rx: mpsc::Receiver<Vec<Sample>>,
) -> u64 {
    let spool = Arc::new(Mutex::new(spool));
    let spooled = Arc::new(Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let batching = tokio::spawn(batch_loop(rx, spool.clone(), spooled.clone(), done.clone()));
    let delivered = send_loop(rung, window, spool, spooled, done).await;
    batching.await.expect("the batcher task panicked");
    delivered
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
    /// The enrolled identity the rebuilt pipeline sends as.
    agent_id: String,
    grpc: Rung,
    longpoll: Rung,
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

        // The identity the rebuilt pipeline sends as.
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
        let (grpc, longpoll, otlp) = agent_rt.block_on({
            let (url, backend_net, otlp_net) = (url.clone(), net(&ca), net(&otlp_ca));
            let credential = credential.clone();
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
                    let grpc = Rung::Grpc {
                        client: AgentServiceClient::new(channel),
                        authorization,
                    };
                    let longpoll = Rung::Longpoll(
                        ConnectClient::new(&url, &backend_net).with_auth(credential),
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
    /// sample recorded to the last one acknowledged.
    fn run(&mut self, path: PathKind, samples: u64) -> Run {
        self.runs += 1;
        let (tx, rx) = mpsc::channel(RECORDER_CHUNKS);
        let spool_dir = self.dir.join(format!("spool-{}", self.runs));
        let window = self.window;
        let stored_before = self.stored_samples();
        let points_before = self.otlp_points.load(Ordering::Relaxed);
        let task = match path {
            PathKind::UplinkGrpc | PathKind::UplinkLongpoll => {
                let spool = self
                    .agent_rt
                    .block_on(self.agent_rt.spawn_blocking({
                        let dir = spool_dir.clone();
                        move || Spool::open(spool_config(dir))
                    }))
                    .expect("spool open panicked")
                    .expect("cannot open the spool");
                let rung = if path == PathKind::UplinkGrpc {
                    self.grpc.clone()
                } else {
                    self.longpoll.clone()
                };
                let cpu = Cpu::now();
                let start = Instant::now();
                let task = self
                    .agent_rt
                    .spawn(uplink_pipeline(rung, window, spool, rx));
                (cpu, start, task)
            }
            PathKind::Otlp => {
                let cpu = Cpu::now();
                let start = Instant::now();
                let task = self
                    .agent_rt
                    .spawn(otlp_pipeline(self.otlp.clone(), rx, window));
                (cpu, start, task)
            }
        };
        let (cpu, start, task) = task;
        let feeder = feed(
            self.workload.take().expect("the workload is back"),
            tx,
            samples,
        );
        let delivered = self
            .agent_rt
            .block_on(async { tokio::time::timeout(RUN_TIMEOUT, task).await })
            .unwrap_or_else(|_| panic!("{} took longer than {RUN_TIMEOUT:?}", path.name()))
            .expect("the pipeline panicked");
        let wall = start.elapsed();
        let mut cpu = Cpu::now().since(cpu);
        let (w, source) = feeder.join().expect("the source thread panicked");
        self.workload = Some(w);
        cpu.source = source;
        let _ = std::fs::remove_dir_all(&spool_dir);
        assert_eq!(delivered, samples, "{}: samples delivered", path.name());
        match path {
            PathKind::Otlp => assert_eq!(
                self.otlp_points.load(Ordering::Relaxed) - points_before,
                samples,
                "data points the OTLP receiver decoded"
            ),
            _ => assert_eq!(
                self.stored_samples() - stored_before,
                samples,
                "samples the backend counted as stored"
            ),
        }
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
    let mut spool = Spool::open(spool_config(b.dir.join("spool-stages"))).expect("spool");
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
    let _ = std::fs::remove_dir_all(b.dir.join("spool-stages"));
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
