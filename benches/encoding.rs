//! Metric encoding, uplink against OTLP, side by side in one run.
//!
//! The same samples are encoded as one uplink `MetricBatch` and as one OTLP
//! `ExportMetricsServiceRequest` (the `opentelemetry-proto` crate's prost
//! types), each sent raw, zstd-1 and gzip (level 6). The samples are the
//! first minute of the seeded generator in `testkit/src/workload.rs`,
//! shaped like what the agent collects:
//!
//! - one host at a 10 s interval, 100 series: CPU per core and in total (as
//!   sysinfo reports it: an `f32` percentage, turned into a ratio), core
//!   frequencies, load averages, memory and swap, six interfaces (bytes,
//!   packets, errors, drops), six mounts, three disks' I/O, processes, uptime;
//! - 50 containers at a 10 s interval, 10 series each (Docker stats: CPU
//!   seconds from nanoseconds, memory and its limit, network, block I/O,
//!   pids), ten of them busy, each read a few ms after the previous;
//! - a load test pushing per-second aggregates for 60 s (JMeter's Backend
//!   Listener, k6): 12 request labels, each with response-time p50, p90 and
//!   p99 (ms, three decimals), max (whole ms), and requests per status code.
//!
//! Six scrapes (60 s): 3,600 host and container samples and 5,040 load-test
//! samples. Every sample carries the same facts in both formats: in OTLP the
//! host, container and load generator are resources (`host.name`,
//! `container.id`, `container.name`, `container.image.name`,
//! `service.name`) and the rest are data point attributes; in uplink they are
//! all labels. OTLP gets its most compact shape: one `ResourceMetrics` per
//! resource, one `Metric` per name holding every data point of the minute,
//! integers as `as_int`, counters as cumulative monotonic sums with a start
//! time.
//!
//! The encoders are used as an agent uses them: one long-lived uplink
//! `BatchBuilder` (it remembers the series of its last two batches; sources
//! keep one `Arc<Series>` per series), one reused zstd context. An OTLP
//! request is built afresh each time, as SDKs and collectors do; it gets
//! the same shortcut for series seen before within a request (found by the
//! address of their `Arc`). The timings include building the message from
//! the samples, protobuf encoding and compression.
//!
//! Output, first a table in Markdown:
//!
//! - bytes per sample on the wire for four batchings: everything in one
//!   batch; host and containers ("steady") in one batch; the same in one
//!   batch per scrape; the load test alone in one batch;
//! - ns per sample to encode and compress, for everything in one batch and
//!   for one batch per scrape (median of 31 runs);
//! - a last row with uplink zstd against OTLP zstd;
//!
//! then three figures in ns per sample (an uplink builder with nothing
//! remembered, OTLP marshalling of a request already built, uplink decoding
//! and validating), then the criterion groups `encoding` (each format and
//! compression on everything in one batch, and uplink decoding) and
//! `encoding_per_scrape` (each format with zstd, one batch per scrape).
//!
//! Run: `cargo bench --bench encoding`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;

use uplink::metrics::compress::{Compression, ZstdEncoder};
use uplink::metrics::encode::{self, BatchBuilder};
use uplink::metrics::sample::Sample;
use uplink_testkit::otlp::otlp_request;
use uplink_testkit::workload::{Minute, SCRAPES};

/// Timed repetitions per cell of the table; the median is reported.
const TIMED_RUNS: usize = 31;

// ---- the two encoders ----------------------------------------------------

fn uplink_encode(b: &mut BatchBuilder, samples: &[Sample]) -> Vec<u8> {
    for s in samples {
        b.add(s).expect("generated samples are valid");
    }
    b.finish().encode_to_vec()
}

fn otlp_encode(samples: &[Sample]) -> Vec<u8> {
    otlp_request(samples).encode_to_vec()
}

// ---- measuring -------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Uplink,
    Otlp,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Uplink => "uplink",
            Format::Otlp => "OTLP",
        }
    }
}

/// What an agent keeps between batches: the uplink builder (it remembers
/// the series of the last two batches) and a zstd context. OTLP has no
/// state to keep: each request is built afresh, as SDKs and collectors do.
struct Encoder {
    builder: BatchBuilder,
    zstd: ZstdEncoder,
}

impl Encoder {
    fn new() -> Self {
        // Series indexes as deltas: what an agent sends once the backend
        // has said it reads them (the reference backend does).
        let mut builder = BatchBuilder::new();
        builder.set_series_deltas(true);
        Encoder {
            builder,
            zstd: ZstdEncoder::new().expect("zstd context"),
        }
    }

    /// One batch, encoded and compressed: the bytes on the wire.
    fn wire(&mut self, f: Format, c: Compression, samples: &[Sample]) -> Vec<u8> {
        let raw = match f {
            Format::Uplink => uplink_encode(&mut self.builder, samples),
            Format::Otlp => otlp_encode(samples),
        };
        match c {
            Compression::Identity => raw,
            Compression::Zstd => self.zstd.compress(&raw).expect("zstd"),
            other => other.compress(&raw).expect("compress"),
        }
    }
}

fn median_ns(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<Duration> = (0..TIMED_RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[TIMED_RUNS / 2].as_nanos() as f64
}

/// One way of cutting the minute into batches.
struct Batching {
    name: &'static str,
    batches: Vec<Vec<Sample>>,
}

impl Batching {
    fn samples(&self) -> f64 {
        self.batches.iter().map(Vec::len).sum::<usize>() as f64
    }
}

fn table(w: &Minute) {
    let batchings = [
        Batching {
            name: "all, 1 batch",
            batches: vec![w.all()],
        },
        Batching {
            name: "steady, 1 batch",
            batches: vec![w.steady()],
        },
        Batching {
            name: "steady, 2 batches",
            batches: w.scrapes.chunks(SCRAPES / 2).map(<[_]>::concat).collect(),
        },
        Batching {
            name: "steady, 6 batches",
            batches: w.scrapes.clone(),
        },
        Batching {
            name: "load test, 1 batch",
            batches: vec![w.burst.clone()],
        },
    ];
    // Timed: everything in one batch, and one batch per scrape.
    let timed = [0, 3];
    let mut enc = Encoder::new();
    println!();
    println!(
        "Metric encoding: {} samples in one minute: {} host and container samples in {} scrapes, {} load-test samples",
        batchings[0].samples(),
        batchings[1].samples(),
        SCRAPES,
        w.burst.len()
    );
    println!("Bytes per sample on the wire, and ns per sample to encode and compress:");
    println!();
    print!("| {:<16} |", "format");
    for b in &batchings {
        print!(" {:>18} |", b.name);
    }
    for &i in &timed {
        print!(" {:>18} |", format!("ns, {}", batchings[i].name));
    }
    println!();
    print!("|{:-<18}|", "");
    for _ in 0..batchings.len() + timed.len() {
        print!("{:->20}|", ":");
    }
    println!();
    let mut bytes = HashMap::new();
    let mut ns = HashMap::new();
    for f in [Format::Uplink, Format::Otlp] {
        for c in Compression::ALL {
            print!("| {:<16} |", format!("{} {}", f.name(), c.name()));
            for (i, b) in batchings.iter().enumerate() {
                let n: usize = b.batches.iter().map(|s| enc.wire(f, c, s).len()).sum();
                bytes.insert((f.name(), c, i), n as f64);
                print!(" {:>18} |", format!("{:.2}", n as f64 / b.samples()));
            }
            for &i in &timed {
                let b = &batchings[i];
                let t = median_ns(|| {
                    for s in &b.batches {
                        black_box(enc.wire(f, c, black_box(s)));
                    }
                }) / b.samples();
                ns.insert((f.name(), c, i), t);
                print!(" {:>18} |", format!("{t:.0}"));
            }
            println!();
        }
    }
    print!("| {:<16} |", "uplink/OTLP zstd");
    for i in 0..batchings.len() {
        let r = bytes[&("uplink", Compression::Zstd, i)] / bytes[&("OTLP", Compression::Zstd, i)];
        print!(" {:>18} |", format!("{r:.3}x"));
    }
    for &i in &timed {
        let r = ns[&("OTLP", Compression::Zstd, i)] / ns[&("uplink", Compression::Zstd, i)];
        print!(" {:>18} |", format!("{r:.1}x faster"));
    }
    println!();
    println!();

    let all = &batchings[0].batches[0];
    let n = all.len() as f64;
    let request = otlp_request(all);
    let marshal = median_ns(|| {
        black_box(black_box(&request).encode_to_vec());
    }) / n;
    let cold = median_ns(|| {
        black_box(uplink_encode(&mut BatchBuilder::new(), black_box(all)));
    }) / n;
    let raw = uplink_encode(&mut enc.builder, all);
    let decode = median_ns(|| {
        black_box(encode::decode_bytes(black_box(&raw)).expect("valid"));
    }) / n;
    // The first form of the series column, for a backend that does not
    // read deltas.
    let mut plain = Encoder::new();
    plain.builder.set_series_deltas(false);
    print!("Bytes per sample with sample_series instead of deltas, zstd:");
    for b in &batchings {
        let total: usize = b
            .batches
            .iter()
            .map(|s| plain.wire(Format::Uplink, Compression::Zstd, s).len())
            .sum();
        print!(" {} {:.2};", b.name, total as f64 / b.samples());
    }
    println!();
    println!();
    println!("Also, for all in one batch, in ns per sample:");
    println!("- uplink with a new builder (no series remembered): {cold:.0}");
    println!("- OTLP marshalling alone (request already built): {marshal:.0}");
    println!("- uplink decoding and validating: {decode:.0}");
    println!();
}

fn bench(c: &mut Criterion, w: &Minute) {
    let all = w.all();
    let mut enc = Encoder::new();
    let mut group = c.benchmark_group("encoding");
    group
        .throughput(Throughput::Elements(all.len() as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for f in [Format::Uplink, Format::Otlp] {
        for comp in Compression::ALL {
            let name = format!("{}/{}", f.name().to_lowercase(), comp.name());
            group.bench_function(name, |b| b.iter(|| enc.wire(f, comp, black_box(&all))));
        }
    }
    let raw = uplink_encode(&mut enc.builder, &all);
    group.bench_function("uplink/decode", |b| {
        b.iter(|| encode::decode_bytes(black_box(&raw)).expect("valid"))
    });
    group.finish();

    let steady: usize = w.scrapes.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("encoding_per_scrape");
    group
        .throughput(Throughput::Elements(steady as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for f in [Format::Uplink, Format::Otlp] {
        let name = format!("{}/zstd", f.name().to_lowercase());
        group.bench_function(name, |b| {
            b.iter(|| {
                for s in &w.scrapes {
                    black_box(enc.wire(f, Compression::Zstd, black_box(s)));
                }
            })
        });
    }
    group.finish();
}

fn main() {
    let w = Minute::generate();
    // Both formats must carry the same samples.
    let all = w.all();
    let decoded = encode::decode_bytes(&uplink_encode(&mut Encoder::new().builder, &all))
        .expect("valid batch");
    assert_eq!(decoded.points.len(), all.len());
    for (p, s) in decoded.points.iter().zip(&all) {
        assert_eq!(
            (p.time_unix_ms, p.value.to_bits()),
            (s.time_unix_ms, s.value.to_bits())
        );
    }
    let points: usize = otlp_request(&all)
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.len(),
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(points, all.len());
    table(&w);
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &w);
    c.final_summary();
}
