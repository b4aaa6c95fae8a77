//! The samples the encoding and pipeline benchmarks measure, from one seeded generator shaped
//! like what an agent collects:
//!
//! - one host at a 10 s interval, 100 series: CPU per core and in total (as
//!   sysinfo reports it: an `f32` percentage), core frequencies, load
//!   averages, memory and swap, six interfaces (bytes, packets, errors,
//!   drops), six mounts, three disks' I/O, processes, uptime;
//! - 50 containers at a 10 s interval, 10 series each (Docker stats: CPU
//!   seconds from nanoseconds, memory and its limit, network, block I/O,
//!   pids), ten of them busy, each read a few ms after the previous;
//! - a load test pushing per-second aggregates (JMeter's Backend Listener,
//!   k6): 12 request labels, each with response-time p50, p90 and p99 (ms,
//!   three decimals), max (whole ms), and requests per status code: 84
//!   samples a second.
//!
//! [`Workload::minute`] gives one minute at once, scrapes apart from the
//! load test (`benches/encoding.rs`); [`Workload::next_second`] gives an
//! endless stream, second by second, in the chunks the sources record
//! (`benches/pipeline.rs`). Values are fresh throughout.

use std::sync::Arc;

use uplink::metrics::sample::{Kind, Sample, Series};

/// The benchmarks' clock starts here (Unix ms): sample times are reproducible.
pub const T0_MS: i64 = 1_790_000_000_000;
/// Seed of the sample generator: every run sees the same samples.
const SEED: u64 = 0x5eed_2026;
/// Scrapes of the host and containers in a minute.
pub const SCRAPES: usize = 6;
/// Scrape interval.
pub const INTERVAL_MS: i64 = 10_000;
/// Containers monitored.
pub const CONTAINERS: usize = 50;
/// Containers under load among them.
const BUSY_CONTAINERS: usize = 10;

/// A value that moves like the quantity it stands for.
pub struct Walk {
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

type Step = Box<dyn FnMut(&mut fastrand::Rng, &mut Walk) -> f64 + Send>;

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

/// One host's 100 series, as the host source reads them.
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

/// One container's 10 series, as Docker's stats give them.
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

/// The load test's series, and the running totals of its counters.
struct LoadTest {
    requests: Vec<Request>,
}

/// The series of one request label.
struct Request {
    quantiles: Vec<Arc<Series>>,
    max: Arc<Series>,
    statuses: Vec<Arc<Series>>,
    totals: Vec<f64>,
}

const QUANTILES: [(&str, f64); 3] = [("0.5", 1.0), ("0.9", 2.2), ("0.99", 4.5)];
const STATUSES: [(&str, f64); 3] = [("200", 0.97), ("404", 0.02), ("500", 0.01)];

impl LoadTest {
    fn new() -> Self {
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
        let requests = requests
            .iter()
            .map(|req| Request {
                quantiles: QUANTILES
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
                statuses: STATUSES
                    .iter()
                    .map(|(st, _)| l(counter("loadtest_requests_total").label("status", *st), req))
                    .collect(),
                totals: vec![0.0; STATUSES.len()],
            })
            .collect();
        LoadTest { requests }
    }

    /// Appends one second's aggregates, stamped `t`.
    fn second(&mut self, rng: &mut fastrand::Rng, t: i64, out: &mut Vec<Sample>) {
        let at = |series: &Arc<Series>, time_unix_ms: i64, value: f64| Sample {
            series: series.clone(),
            time_unix_ms,
            value,
        };
        for (r, req) in self.requests.iter_mut().enumerate() {
            let base = 8.0 + 20.0 * r as f64 + rng.f64() * 15.0;
            // Response times in ms with microsecond resolution.
            let ms = |x: f64| (x * 1000.0).round() / 1000.0;
            for ((_, factor), s) in QUANTILES.iter().zip(&req.quantiles) {
                out.push(at(s, t, ms(base * factor * (0.9 + 0.2 * rng.f64()))));
            }
            out.push(at(&req.max, t, (base * 7.0 * (0.8 + rng.f64())).round()));
            for (((_, share), s), total) in STATUSES.iter().zip(&req.statuses).zip(&mut req.totals)
            {
                *total += (rng.f64() * 400.0 * share).round();
                out.push(at(s, t, *total));
            }
        }
    }
}

/// One minute's samples: host and containers scrape by scrape, and the
/// load test's samples.
pub struct Minute {
    /// The host's and the containers' samples, one chunk per scrape.
    pub scrapes: Vec<Vec<Sample>>,
    /// The load test's samples of the minute.
    pub burst: Vec<Sample>,
}

impl Minute {
    /// The first minute of a fresh [`Workload`].
    pub fn generate() -> Self {
        Workload::new().minute()
    }

    /// The host's and the containers' samples.
    pub fn steady(&self) -> Vec<Sample> {
        self.scrapes.concat()
    }

    /// Everything, in the order a batcher receives it: by time.
    pub fn all(&self) -> Vec<Sample> {
        let mut all = self.steady();
        all.extend(self.burst.iter().cloned());
        all.sort_by_key(|s| s.time_unix_ms);
        all
    }
}

/// One host, its containers and a load test, in simulated time.
pub struct Workload {
    rng: fastrand::Rng,
    host: Source,
    containers: Vec<Source>,
    load_test: LoadTest,
    second: i64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload::new()
    }
}

impl Workload {
    /// The workload at its start, from the fixed seed.
    pub fn new() -> Self {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let host = host(&mut rng);
        let containers = (0..CONTAINERS).map(|i| container(&mut rng, i)).collect();
        Workload {
            rng,
            host,
            containers,
            load_test: LoadTest::new(),
            second: 0,
        }
    }

    /// The next minute at once: its six scrapes of the host and the
    /// containers, then the load test's 60 seconds.
    pub fn minute(&mut self) -> Minute {
        let start = T0_MS + self.second * 1000;
        let rng = &mut self.rng;
        let scrapes = (0..SCRAPES)
            .map(|k| {
                let tick = start + k as i64 * INTERVAL_MS + rng.i64(0..4);
                let mut out = Vec::new();
                self.host.scrape(rng, tick, &mut out);
                for s in &mut self.containers {
                    s.scrape(rng, tick, &mut out);
                }
                out
            })
            .collect();
        let mut burst = Vec::new();
        for second in 0..(SCRAPES as i64 * INTERVAL_MS / 1000) {
            self.load_test
                .second(rng, start + second * 1000, &mut burst);
        }
        self.second += SCRAPES as i64 * INTERVAL_MS / 1000;
        Minute { scrapes, burst }
    }

    /// Appends the chunks of the next simulated second, as the sources
    /// record them: the load test's aggregates every second; every 10 s
    /// the host's scrape, then the containers' scrape (one chunk for all).
    pub fn next_second(&mut self, out: &mut Vec<Vec<Sample>>) {
        let tick = T0_MS + self.second * 1000;
        let mut chunk = Vec::with_capacity(84);
        self.load_test.second(&mut self.rng, tick, &mut chunk);
        out.push(chunk);
        if self.second % (INTERVAL_MS / 1000) == 0 {
            let tick = tick + self.rng.i64(0..4);
            let mut chunk = Vec::with_capacity(self.host.series.len());
            self.host.scrape(&mut self.rng, tick, &mut chunk);
            out.push(chunk);
            let mut chunk = Vec::with_capacity(CONTAINERS * 10);
            for c in &mut self.containers {
                c.scrape(&mut self.rng, tick, &mut chunk);
            }
            out.push(chunk);
        }
        self.second += 1;
    }

    /// The next chunks holding at least `samples` samples.
    pub fn take(&mut self, samples: usize) -> Vec<Vec<Sample>> {
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
