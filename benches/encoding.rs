//! Metric encoding, uplink against OTLP, side by side in one run.
//!
//! The same samples are encoded as one uplink `MetricBatch` and as one OTLP
//! `ExportMetricsServiceRequest` (the `opentelemetry-proto` crate's prost
//! types), each sent raw, zstd-1 and gzip (level 6). The samples come from a
//! seeded generator shaped like what the agent collects in one minute:
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

mod common;

use common::T0_MS;
use common::otlp::otlp_request;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;

use uplink::metrics::compress::{Compression, ZstdEncoder};
use uplink::metrics::encode::{self, BatchBuilder};
use uplink::metrics::sample::{Kind, Sample, Series};

/// Seed of the sample generator: every run encodes the same samples.
const SEED: u64 = 0x5eed_2026;
/// Scrapes of the host and containers.
const SCRAPES: usize = 6;
/// Scrape interval.
const INTERVAL_MS: i64 = 10_000;
/// Containers monitored.
const CONTAINERS: usize = 50;
/// Containers under load among them.
const BUSY_CONTAINERS: usize = 10;
/// Timed repetitions per cell of the table; the median is reported.
const TIMED_RUNS: usize = 31;

// ---- the samples -------------------------------------------------------

/// A value that moves like the quantity it stands for.
struct Walk {
    value: f64,
}

fn gauge(name: &str) -> Series {
    Series::new(name, Kind::Gauge)
}

fn counter(name: &str) -> Series {
    Series::new(name, Kind::Counter)
}

/// One scrape's worth of series of a source, with how each value moves.
struct Source {
    series: Vec<(Arc<Series>, Step, Walk)>,
    /// Delay of this source's read after the scrape tick.
    offset_ms: i64,
}

impl Source {
    fn scrape(&mut self, rng: &mut fastrand::Rng, tick_ms: i64, out: &mut Vec<Sample>) {
        let t = tick_ms + self.offset_ms + rng.i64(0..3);
        for (series, step, walk) in &mut self.series {
            let value = step(rng, walk);
            out.push(Sample {
                series: series.clone(),
                time_unix_ms: t,
                value,
            });
        }
    }
}

type Step = Box<dyn FnMut(&mut fastrand::Rng, &mut Walk) -> f64>;

/// A counter growing by `lo..hi` per interval, in whole units.
fn grows(lo: u64, hi: u64) -> Step {
    Box::new(move |rng, w| {
        w.value += rng.u64(lo..hi.max(lo + 1)) as f64;
        w.value
    })
}

/// A whole-number gauge moving by up to `step` units of `quantum`.
fn drifts(step: i64, quantum: f64, lo: f64, hi: f64) -> Step {
    Box::new(move |rng, w| {
        w.value = (w.value + rng.i64(-step..=step) as f64 * quantum).clamp(lo, hi);
        w.value
    })
}

/// A constant.
fn fixed() -> Step {
    Box::new(|_, w| w.value)
}

/// CPU usage as sysinfo gives it: an `f32` percentage, as a ratio.
fn cpu_percent() -> Step {
    Box::new(|rng, w| {
        w.value = (w.value + (rng.f64() - 0.5) * 20.0).clamp(0.5, 99.5);
        (f64::from(w.value as f32) * 100.0).round() / 100.0
    })
}

/// A load average: two decimals.
fn load_average() -> Step {
    Box::new(|rng, w| {
        w.value = (w.value + (rng.f64() - 0.5) * 0.4).clamp(0.0, 16.0);
        (w.value * 100.0).round() / 100.0
    })
}

fn host(rng: &mut fastrand::Rng) -> Source {
    let h = |s: Series| s.label("host.name", "lab-host-01");
    let mut series: Vec<(Series, Step, Walk)> = Vec::new();
    let mut add =
        |s: Series, step: Step, start: f64| series.push((h(s), step, Walk { value: start }));
    add(
        gauge("host_cpu_usage_percent").unit("percent"),
        cpu_percent(),
        30.0,
    );
    for cpu in 0..8 {
        add(
            gauge("host_cpu_core_usage_percent")
                .label("cpu", cpu.to_string())
                .unit("percent"),
            cpu_percent(),
            30.0,
        );
    }
    for cpu in 0..8 {
        let start = 2_800_000_000.0;
        add(
            gauge("host_cpu_frequency_hertz")
                .label("cpu", cpu.to_string())
                .unit("Hz"),
            drifts(3, 100_000_000.0, 1_200_000_000.0, 3_600_000_000.0),
            start,
        );
    }
    for period in ["1m", "5m", "15m"] {
        add(
            gauge("host_load_average").label("period", period),
            load_average(),
            1.5,
        );
    }
    let gib = 1024.0 * 1024.0 * 1024.0;
    add(
        gauge("host_memory_total_bytes").unit("By"),
        fixed(),
        32.0 * gib,
    );
    for (name, start) in [
        ("host_memory_used_bytes", 11.0 * gib),
        ("host_memory_available_bytes", 20.0 * gib),
        ("host_memory_free_bytes", 6.0 * gib),
    ] {
        add(
            gauge(name).unit("By"),
            drifts(12_000, 1024.0, 0.0, 32.0 * gib),
            start,
        );
    }
    add(
        gauge("host_swap_total_bytes").unit("By"),
        fixed(),
        8.0 * gib,
    );
    add(
        gauge("host_swap_used_bytes").unit("By"),
        drifts(2, 4096.0, 0.0, 8.0 * gib),
        0.3 * gib,
    );
    // (interface, bytes per interval, packets per interval)
    for (iface, bytes, packets) in [
        ("lo", 2_000_000u64, 3_000u64),
        ("eth0", 60_000_000, 60_000),
        ("eth1", 400_000, 900),
        ("docker0", 30_000_000, 25_000),
        ("br-3f2a1c9e", 1_500_000, 2_000),
        ("wg0", 20_000, 60),
    ] {
        let n = |s: &str| counter(s).label("interface", iface);
        let start = rng.u64(1 << 30..1 << 40) as f64;
        add(
            n("host_network_receive_bytes_total").unit("By"),
            grows(bytes / 2, bytes),
            start,
        );
        add(
            n("host_network_transmit_bytes_total").unit("By"),
            grows(bytes / 3, bytes),
            start / 2.0,
        );
        add(
            n("host_network_receive_packets_total"),
            grows(packets / 2, packets),
            start / 900.0,
        );
        add(
            n("host_network_transmit_packets_total"),
            grows(packets / 3, packets),
            start / 1800.0,
        );
        add(
            n("host_network_receive_errors_total"),
            grows(0, if iface == "eth1" { 2 } else { 0 }),
            3.0,
        );
        add(n("host_network_transmit_errors_total"), fixed(), 0.0);
        add(n("host_network_receive_dropped_total"), grows(0, 2), 17.0);
        add(n("host_network_transmit_dropped_total"), fixed(), 0.0);
    }
    for (mount, size) in [
        ("/", 100.0 * gib),
        ("/boot", 1.0 * gib),
        ("/var/lib/docker", 500.0 * gib),
        ("/home", 200.0 * gib),
        ("/data", 2000.0 * gib),
        ("/tmp", 16.0 * gib),
    ] {
        add(
            gauge("host_filesystem_size_bytes")
                .label("mountpoint", mount)
                .unit("By"),
            fixed(),
            size,
        );
        add(
            gauge("host_filesystem_available_bytes")
                .label("mountpoint", mount)
                .unit("By"),
            drifts(20_000, 4096.0, 0.0, size),
            (size * 0.4 / 4096.0).round() * 4096.0,
        );
    }
    for (disk, bytes) in [
        ("vda", 40_000_000u64),
        ("vdb", 3_000_000),
        ("nvme0n1", 90_000_000),
    ] {
        let d = |s: &str| counter(s).label("device", disk);
        let start = rng.u64(1 << 32..1 << 42) as f64;
        let sectors = |b: u64| (b / 512).max(2);
        let grows_sectors = move |lo: u64, hi: u64| -> Step {
            Box::new(move |rng, w| {
                w.value += (rng.u64(sectors(lo)..sectors(hi)) * 512) as f64;
                w.value
            })
        };
        add(
            d("host_disk_read_bytes_total").unit("By"),
            grows_sectors(bytes / 4, bytes),
            (start / 512.0).round() * 512.0,
        );
        add(
            d("host_disk_written_bytes_total").unit("By"),
            grows_sectors(bytes / 3, bytes),
            (start / 1024.0).round() * 512.0,
        );
        add(
            d("host_disk_reads_total"),
            grows(bytes / 80_000, bytes / 20_000),
            start / 30_000.0,
        );
        add(
            d("host_disk_writes_total"),
            grows(bytes / 60_000, bytes / 15_000),
            start / 20_000.0,
        );
    }
    add(
        gauge("host_processes"),
        drifts(6, 1.0, 100.0, 2000.0),
        412.0,
    );
    add(
        counter("host_uptime_seconds").unit("s"),
        grows(10, 11),
        864_000.0,
    );
    let series = series
        .into_iter()
        .map(|(s, step, w)| {
            (
                Arc::new(s),
                step,
                Walk {
                    value: w.value.round(),
                },
            )
        })
        .collect();
    Source {
        series,
        offset_ms: 0,
    }
}

fn container(rng: &mut fastrand::Rng, i: usize) -> Source {
    let busy = i < BUSY_CONTAINERS;
    let id: String = (0..64)
        .map(|_| {
            rng.choice(b"0123456789abcdef".iter())
                .map_or('0', |&c| c as char)
        })
        .collect();
    let name = format!("lab-{}-{i:02}", if busy { "target" } else { "worker" });
    let image = if busy {
        "registry.lab.local/shop/api:2.14.1"
    } else {
        "registry.lab.local/lab/worker:1.4.2"
    };
    let c = |s: Series| {
        s.label("container.id", &id)
            .label("container.image.name", image)
            .label("container.name", &name)
    };
    let scale = if busy { 1 } else { 200 };
    let mib = 1024.0 * 1024.0;
    let limit = if busy { 2048.0 * mib } else { 512.0 * mib };
    // Docker reports CPU time in nanoseconds; Prometheus' convention is
    // seconds.
    let mut cpu_ns = rng.u64(1_000_000_000..5_000_000_000_000);
    let cpu: Step = Box::new(move |rng, _| {
        cpu_ns += rng.u64(4_000_000_000 / scale..20_000_000_000 / scale);
        cpu_ns as f64 / 1e9
    });
    let series: Vec<(Series, Step, Walk)> = vec![
        (
            c(counter("container_cpu_usage_seconds_total").unit("s")),
            cpu,
            Walk { value: 0.0 },
        ),
        (
            c(gauge("container_memory_usage_bytes").unit("By")),
            drifts(if busy { 2_500 } else { 25 }, 4096.0, 8.0 * mib, limit),
            Walk {
                value: (limit * 0.3 / 4096.0).round() * 4096.0,
            },
        ),
        (
            c(gauge("container_memory_limit_bytes").unit("By")),
            fixed(),
            Walk { value: limit },
        ),
        (
            c(counter("container_network_receive_bytes_total").unit("By")),
            grows(8_000_000 / scale, 40_000_000 / scale),
            Walk {
                value: rng.u64(1 << 20..1 << 34) as f64,
            },
        ),
        (
            c(counter("container_network_transmit_bytes_total").unit("By")),
            grows(20_000_000 / scale, 90_000_000 / scale),
            Walk {
                value: rng.u64(1 << 20..1 << 35) as f64,
            },
        ),
        (
            c(counter("container_network_receive_packets_total")),
            grows(9_000 / scale, 40_000 / scale),
            Walk {
                value: rng.u64(1 << 10..1 << 24) as f64,
            },
        ),
        (
            c(counter("container_network_transmit_packets_total")),
            grows(9_000 / scale, 50_000 / scale),
            Walk {
                value: rng.u64(1 << 10..1 << 24) as f64,
            },
        ),
        (
            c(counter("container_blkio_read_bytes_total").unit("By")),
            grows(0, if busy { 2_000_000 } else { 1 }),
            Walk {
                value: (rng.u64(0..1 << 20) * 4096) as f64,
            },
        ),
        (
            c(counter("container_blkio_write_bytes_total").unit("By")),
            Box::new(move |rng, w| {
                w.value += (rng.u64(0..if busy { 1200 } else { 3 }) * 4096) as f64;
                w.value
            }),
            Walk {
                value: (rng.u64(0..1 << 22) * 4096) as f64,
            },
        ),
        (
            c(gauge("container_pids")),
            drifts(if busy { 4 } else { 0 }, 1.0, 1.0, 500.0),
            Walk {
                value: if busy { 48.0 } else { 3.0 },
            },
        ),
    ];
    // Docker stats are read one container after the other.
    let series = series
        .into_iter()
        .map(|(s, step, w)| (Arc::new(s), step, w))
        .collect();
    Source {
        series,
        offset_ms: 40 + 7 * i as i64,
    }
}

/// The load test's per-second aggregates over the minute.
fn load_test(rng: &mut fastrand::Rng) -> Vec<Sample> {
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
    let l = |s: Series, req: &str| {
        Arc::new(
            s.label("service.name", "jmeter")
                .label("host.name", "lab-host-01")
                .label("request", req),
        )
    };
    let quantiles = [("0.5", 1.0), ("0.9", 2.2), ("0.99", 4.5)];
    let statuses = [("200", 0.97), ("404", 0.02), ("500", 0.01)];
    /// The series of one request label.
    struct Request {
        quantiles: Vec<Arc<Series>>,
        max: Arc<Series>,
        statuses: Vec<Arc<Series>>,
        totals: Vec<f64>,
    }
    let mut series: Vec<Request> = requests
        .iter()
        .map(|req| Request {
            quantiles: quantiles
                .iter()
                .map(|(q, _)| {
                    let s = gauge("loadtest_response_time_milliseconds").label("quantile", *q);
                    l(s.unit("ms"), req)
                })
                .collect(),
            max: l(
                gauge("loadtest_response_time_max_milliseconds").unit("ms"),
                req,
            ),
            statuses: statuses
                .iter()
                .map(|(st, _)| l(counter("loadtest_requests_total").label("status", *st), req))
                .collect(),
            totals: vec![0.0; statuses.len()],
        })
        .collect();
    let mut out = Vec::new();
    let at = |series: &Arc<Series>, time_unix_ms: i64, value: f64| Sample {
        series: series.clone(),
        time_unix_ms,
        value,
    };
    for second in 0..(SCRAPES as i64 * INTERVAL_MS / 1000) {
        let t = T0_MS + second * 1000;
        for (r, req) in series.iter_mut().enumerate() {
            let base = 8.0 + 20.0 * r as f64 + rng.f64() * 15.0;
            // Response times in ms with microsecond resolution.
            let ms = |x: f64| (x * 1000.0).round() / 1000.0;
            for ((_, factor), s) in quantiles.iter().zip(&req.quantiles) {
                out.push(at(s, t, ms(base * factor * (0.9 + 0.2 * rng.f64()))));
            }
            out.push(at(&req.max, t, (base * 7.0 * (0.8 + rng.f64())).round()));
            for (((_, share), s), total) in statuses.iter().zip(&req.statuses).zip(&mut req.totals)
            {
                *total += (rng.f64() * 400.0 * share).round();
                out.push(at(s, t, *total));
            }
        }
    }
    out
}

/// The minute's samples: host and containers scrape by scrape, and the load
/// test's samples.
struct Workload {
    scrapes: Vec<Vec<Sample>>,
    burst: Vec<Sample>,
}

impl Workload {
    fn generate() -> Self {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let mut sources = vec![host(&mut rng)];
        sources.extend((0..CONTAINERS).map(|i| container(&mut rng, i)));
        let scrapes = (0..SCRAPES)
            .map(|k| {
                let tick = T0_MS + k as i64 * INTERVAL_MS + rng.i64(0..4);
                let mut out = Vec::new();
                for s in &mut sources {
                    s.scrape(&mut rng, tick, &mut out);
                }
                out
            })
            .collect();
        Workload {
            scrapes,
            burst: load_test(&mut rng),
        }
    }

    fn steady(&self) -> Vec<Sample> {
        self.scrapes.concat()
    }

    /// Everything, in the order a batcher receives it: by time.
    fn all(&self) -> Vec<Sample> {
        let mut all = self.steady();
        all.extend(self.burst.iter().cloned());
        all.sort_by_key(|s| s.time_unix_ms);
        all
    }
}

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

fn table(w: &Workload) {
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

fn bench(c: &mut Criterion, w: &Workload) {
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
    let w = Workload::generate();
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
