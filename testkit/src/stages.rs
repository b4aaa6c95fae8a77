//! Where the time goes in the pipeline benchmark: each stage of the
//! uplink path (the agent's batcher, encoding, zstd and spool; each rung's
//! request encoding; the backend's decoding, validation, store and sinks)
//! and of the OTLP path (batching, building, encoding, the receiver's
//! decoding) timed alone on one thread, and the table of them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use tokio::runtime::Runtime;
use uplink::backend::Core;
use uplink::backend::sinks::{Origin, Sinks};
use uplink::metrics::batcher::{Batcher, BatcherConfig};
use uplink::metrics::compress::Compression;
use uplink::metrics::encode;
use uplink::metrics::pipeline::MetricsConfig;
use uplink::metrics::sample::Sample;
use uplink::metrics::spool::{Header, Spool};
use uplink::proto;

use crate::otlp::{OTLP_MAX_MESSAGE, data_points, otlp_request};

/// Samples in a batch: the agent's batcher flushes on this many.
pub const BATCH: usize = uplink::metrics::batcher::DEFAULT_MAX_SAMPLES;
/// Largest decompressed batch read back from the spool, as in the agent.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Adds the time since `start` to stage `i`.
fn timed(t: &mut [Duration], i: usize, start: Instant) {
    t[i] += start.elapsed();
}

/// Time per stage, summed over the batches of one pass.
pub struct Stages {
    /// Each stage's side (`agent`, `grpc`, `longpoll`, `backend`, `otlp`,
    /// `receiver`) and name.
    names: Vec<(&'static str, &'static str)>,
    /// Per pass, each stage's time.
    passes: Vec<Vec<Duration>>,
    /// The samples each pass moved.
    samples: usize,
}

/// Times each stage of both paths alone, on this thread, `passes` times
/// over `chunks` (whole batches of [`BATCH`] samples): what the
/// throughput table's CPU time is made of, less TLS, HTTP and scheduling.
/// The backend's stages use `core`'s store, as enrolled agent `agent_id`,
/// and in-memory sinks run on `rt`; the spool lives in `dir`, removed at
/// the end.
pub fn time_stages(
    chunks: &[Vec<Sample>],
    core: &Core,
    agent_id: &str,
    rt: &Runtime,
    dir: &Path,
    passes: usize,
) -> Stages {
    let samples: usize = chunks.iter().map(Vec::len).sum();
    let store = core.store();
    let sinks = Sinks::in_memory();
    let origin = Arc::new(Origin {
        agent: agent_id.to_string(),
        provider: "default".into(),
        hostname: "bench-pipeline".into(),
    });
    let mut spool = Spool::open(MetricsConfig::default().spool_config(dir)).expect("spool");
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
        ("longpoll", "request encode + zstd-1 (call_encoded)"),
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
        for c in chunks {
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
                resent: false,
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
            rt.block_on(async {
                store
                    .ack(agent_id, 0, uplink::now_unix_ms())
                    .await
                    .expect("ack");
                store.agent(agent_id).await.expect("agent");
                let _ = store
                    .metric_batch_state(agent_id, epoch, seq)
                    .await
                    .expect("state");
                store
                    .record_metric_batch(agent_id, epoch, seq, None)
                    .await
                    .expect("record");
            });
            timed(&mut t, 13, start);
            let start = Instant::now();
            let key = uplink::backend::sinks::BatchKey {
                agent: agent_id.to_string(),
                epoch,
                seq,
            };
            rt.block_on(sinks.accept(key.clone(), origin.clone(), Arc::new(decoded), false))
                .expect("sinks");
            sinks.recorded(&key);
            timed(&mut t, 14, start);
        }

        let mut batch: Vec<Sample> = Vec::with_capacity(BATCH);
        let mut requests = Vec::new();
        let mut build = Duration::ZERO;
        let start = Instant::now();
        for c in chunks {
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
    let _ = std::fs::remove_dir_all(dir);
    Stages {
        names,
        passes: all,
        samples,
    }
}

impl Stages {
    /// Prints each stage's median in ns per sample, then the sums per side
    /// and path.
    pub fn print(&self) {
        let samples = self.samples;
        let ns = |d: Duration| d.as_nanos() as f64 / samples as f64;
        println!();
        println!(
            "Where the time goes: each stage alone, one thread, {samples} samples in batches of {BATCH} (median of {} passes), ns per sample",
            self.passes.len()
        );
        println!();
        println!("| side     | stage                                          | ns/sample |");
        println!("|----------|------------------------------------------------|----------:|");
        let mut sums: HashMap<&str, f64> = HashMap::new();
        for (i, (side, name)) in self.names.iter().enumerate() {
            let v = ns(self.median(i));
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

    /// Stage `i`'s median over the passes.
    fn median(&self, i: usize) -> Duration {
        let mut t: Vec<Duration> = self.passes.iter().map(|p| p[i]).collect();
        t.sort();
        t[t.len() / 2]
    }
}
