//! The metrics path end to end and when things go wrong: a real agent
//! process fed through its Graphite ingest endpoint at a steady rate,
//! batches spooled while the backend is away, replayed after, and counted
//! in the backend's JSON lines, exactly once. Also: a `kill -9` during an
//! outage, a spool that reaches its cap, a state dir on a tmpfs that is
//! filled and freed, damaged spool files, and the agent's memory during a
//! long outage.
//!
//! `UPLINK_OUTAGE_SECS` shortens the two-minute outage (default 120).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uplink_testkit::*;

/// Samples per second the generator sends.
const RATE: u64 = 1000;

/// A backend with JSON lines in `dir/jsonl`.
async fn backend(dir: &Path, addr: &str) -> TestBackend {
    let mut cfg = TestBackend::config(&dir.join("backend"));
    cfg.metrics_jsonl_dir = Some(dir.join("jsonl"));
    TestBackend::start_with(cfg, addr.parse().unwrap()).await
}

/// Values of the generator's samples in the backend's JSON lines.
fn delivered(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("jsonl")) else {
        return out;
    };
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // A line being written.
            };
            if v["name"] == "rel.n" {
                out.push(v["value"].as_f64().unwrap() as u64);
            }
        }
    }
    out
}

/// Where agents reach the backend, kept across its restarts.
#[derive(Clone)]
struct Target {
    url: String,
    ca: PathBuf,
    token: String,
}

impl Target {
    fn of(b: &TestBackend) -> Target {
        Target {
            url: b.url.to_string(),
            ca: b.ca.clone(),
            token: b.enroll_token.expose().to_string(),
        }
    }
}

/// Starts the agent with its ingest endpoint and self-metrics endpoint.
fn start_agent(t: &Target, state: &Path, graphite: u16, metrics: u16, extra: &[&str]) -> Proc {
    let g = format!("127.0.0.1:{graphite}");
    let m = format!("127.0.0.1:{metrics}");
    let mut args = vec![
        "agent",
        "--backend",
        t.url.as_str(),
        "--ca-file",
        t.ca.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--hostname",
        "metrics-host",
        "--ingest-graphite",
        g.as_str(),
        "--metrics-listen",
        m.as_str(),
        "--metrics-interval",
        "0",
    ];
    if !extra.contains(&"--metrics-batch-age") {
        args.extend(["--metrics-batch-age", "1s"]);
    }
    args.extend_from_slice(extra);
    Proc::spawn(&args, &[("UPLINK_TOKEN", t.token.as_str())])
}

/// Sends `rel.n <value>` lines at [`RATE`] per second, values from `next`
/// upwards, until `stop` is set; returns the values written.
struct Generator {
    written: Arc<Mutex<Vec<u64>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Generator {
    async fn start(port: u16, first: u64) -> Generator {
        let mut sock = wait_for(Duration::from_secs(20), "the ingest endpoint", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        })
        .await;
        let written = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let w = written.clone();
        let task = tokio::spawn(async move {
            let mut next = first;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|s| *s) => return next,
                }
                let mut lines = String::new();
                let n = RATE / 100;
                let values: Vec<u64> = (next..next + n).map(scramble).collect();
                let secs = now_secs();
                for v in &values {
                    lines.push_str(&format!("rel.n;k=k{} {v} {secs}\n", v % 10));
                }
                if sock.write_all(lines.as_bytes()).await.is_err() {
                    return next;
                }
                w.lock().unwrap().extend(values);
                next += n;
            }
        });
        Generator {
            written,
            stop,
            task,
        }
    }

    async fn stop(self) -> Vec<u64> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.written.lock().unwrap().clone()
    }
}

/// Counters as irregular values below 2^53 (exact in JSON), so that batches
/// compress like real data: SplitMix64's finalizer, a bijection of u64,
/// cut to 53 bits (a collision among a million values is about as likely
/// as 1 in 10^4).
fn scramble(v: u64) -> u64 {
    let mut z = v.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 11
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The agent's self-metric `name` (summed over labels), or `None` when the
/// endpoint does not answer or has no sample of it: a wait for "0" must
/// not pass on a metric that is not there.
async fn self_metric(port: u16, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// [`self_metric`], or a failure naming the metric.
async fn present_metric(port: u16, name: &str) -> f64 {
    self_metric(port, name)
        .await
        .unwrap_or_else(|| panic!("{name} missing from the agent's /metrics on port {port}"))
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until every value in `want` was delivered; returns what was.
async fn wait_delivered(dir: &Path, want: usize, timeout: Duration) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = delivered(dir);
        if got.len() >= want || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn exactly_once(got: &[u64]) -> HashSet<u64> {
    let set: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(
        set.len(),
        got.len(),
        "{} values delivered more than once",
        got.len() - set.len()
    );
    set
}

fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("UPLINK_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_outage_at_1000_samples_per_second_loses_nothing_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), "127.0.0.1:0").await;
    let t = Target::of(&b);
    let (graphite, metrics) = (free_port(), free_port());
    let agent = start_agent(&t, &dir.path().join("agent"), graphite, metrics, &[]);
    let pid = agent.child.id().unwrap();
    let load = Generator::start(graphite, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let (cfg, addr) = b.stop().await;
    let outage = outage();
    let rss_start = rss_kib(pid);
    let mut rss_max = rss_start;
    let until = tokio::time::Instant::now() + outage;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_max = rss_max.max(rss_kib(pid));
    }
    let spooled = present_metric(metrics, "uplink_agent_spool_batches").await;
    let b = TestBackend::start_with(cfg, addr).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let written = load.stop().await;

    let got = wait_delivered(dir.path(), written.len(), Duration::from_secs(90)).await;
    let set = exactly_once(&got);
    let missing = written.iter().filter(|v| !set.contains(v)).count();
    let sum_written: u128 = written.iter().map(|&v| v as u128).sum();
    let sum_got: u128 = got.iter().map(|&v| v as u128).sum();
    println!(
        "outage {outage:?} at {RATE}/s: {} samples written, {} delivered, {} batches spooled at the end of the outage; agent RSS {} KiB at the start of the outage, at most {} KiB during it",
        written.len(),
        got.len(),
        spooled,
        rss_start,
        rss_max
    );
    assert_eq!(
        missing,
        0,
        "{missing} samples never arrived; agent logs:\n{}",
        agent.logs()
    );
    assert_eq!((got.len(), sum_got), (written.len(), sum_written));
    assert!(spooled >= 1.0, "nothing was spooled during the outage");
    assert!(
        rss_max < rss_start + 32 * 1024,
        "agent memory grew from {rss_start} KiB to {rss_max} KiB during the outage"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_an_outage_keeps_what_was_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), "127.0.0.1:0").await;
    let t = Target::of(&b);
    let (graphite, metrics) = (free_port(), free_port());
    let state = dir.path().join("agent");
    let mut agent = start_agent(&t, &state, graphite, metrics, &[]);
    let load = Generator::start(graphite, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cfg, addr) = b.stop().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    agent.kill9().await;
    let before = load.stop().await;
    // The agent comes back while the backend is still away.
    let agent = start_agent(&t, &state, graphite, metrics, &[]);
    let load = Generator::start(graphite, 10_000_000).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = TestBackend::start_with(cfg, addr).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = load.stop().await;

    let want = before.len() + after.len();
    let got = wait_delivered(dir.path(), want, Duration::from_secs(60)).await;
    let set = exactly_once(&got);
    let lost: Vec<u64> = before
        .iter()
        .copied()
        .filter(|v| !set.contains(v))
        .collect();
    let lost_after = after.iter().filter(|v| !set.contains(v)).count();
    println!(
        "kill -9 during the outage: {} written before, {} lost (sync window: --metrics-batch-age 1s at {RATE}/s), {} written after, {} lost",
        before.len(),
        lost.len(),
        after.len(),
        lost_after
    );
    // Only what the batcher held at the kill (at most about a batch age of
    // samples, plus what was in flight to the endpoint) may be lost, and
    // only from the end.
    let mut counters = String::new();
    for n in [
        "uplink_agent_metric_samples_total",
        "uplink_agent_metric_batches_sent_total",
        "uplink_agent_metric_batches_rejected_total",
        "uplink_agent_spool_batches",
    ] {
        let v = self_metric(metrics, n).await;
        let v = v.map_or_else(|| "missing".to_string(), |v| v.to_string());
        counters.push_str(&format!("{n} {v}\n"));
    }
    let backend_metrics = std::process::Command::new("curl")
        .args([
            "-s",
            "--cacert",
            t.ca.to_str().unwrap(),
            "-H",
            &format!("Authorization: Bearer {}", b.admin_token.expose()),
        ])
        .arg(format!("{}metrics", t.url))
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&backend_metrics.stdout)
        .lines()
        .filter(|l| l.starts_with("uplink_backend") && !l.ends_with(" 0"))
    {
        counters.push_str(l);
        counters.push('\n');
    }
    assert_eq!(lost_after, 0, "{counters}agent logs:\n{}", agent.logs());
    assert!(lost.len() as u64 <= 2 * RATE, "{} samples lost", lost.len());
    let tail: HashSet<u64> = before
        .iter()
        .rev()
        .take(2 * RATE as usize)
        .copied()
        .collect();
    let early = lost.iter().filter(|v| !tail.contains(v)).count();
    assert_eq!(
        early, 0,
        "{early} lost samples are older than the sync window"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_its_oldest_batches_and_counts_every_sample() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), "127.0.0.1:0").await;
    let t = Target::of(&b);
    let (graphite, metrics) = (free_port(), free_port());
    let agent = start_agent(
        &t,
        &dir.path().join("agent"),
        graphite,
        metrics,
        &["--spool-max-bytes", "64k"],
    );
    let load = Generator::start(graphite, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cfg, addr) = b.stop().await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let b = TestBackend::start_with(cfg, addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = load.stop().await;
    // Everything still spooled is delivered.
    wait_for(Duration::from_secs(60), "the spool to empty", || async {
        (self_metric(metrics, "uplink_agent_spool_batches").await == Some(0.0)
            && self_metric(metrics, "uplink_agent_metric_samples_total")
                .await
                .is_some_and(|n| n >= written.len() as f64))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = delivered(dir.path());
    exactly_once(&got);
    let dropped =
        present_metric(metrics, "uplink_agent_spool_dropped_samples_total").await as usize;
    println!(
        "spool capped at 64 KiB: {} written = {} delivered + {} dropped",
        written.len(),
        got.len(),
        dropped
    );
    assert!(dropped > 0, "the spool never reached its cap");
    assert_eq!(
        written.len(),
        got.len() + dropped,
        "agent logs:\n{}",
        agent.logs()
    );
    b.stop().await;
}

/// Fill and free periods of [`a_state_dir_that_fills_and_frees_counts_every_sample`].
const FILL_PERIODS: usize = 8;

/// The chaos soak's metrics agent in small: its state dir on a 4 MiB
/// tmpfs, filled to the last byte for 4 s and freed for 2 s, eight times,
/// the backend away during two of the fills, while the soak's numbered
/// stream comes in (200 samples a second in batches of 250 ms: small
/// records, which go on fitting into the last page of a segment for a
/// while after the fill, and appends that fail part-way). Every sample is
/// in the backend's JSON lines exactly once, or counted by the agent as
/// dropped, and by nothing else: sent = stored + dropped, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_that_fills_and_frees_counts_every_sample() {
    use uplink_testkit::chaos::stream::{Stored, scrape_agent, value};
    use uplink_testkit::chaos::{SmallDisk, Stream};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    let fs = SmallDisk::tmpfs(&state, 4 << 20)
        .unwrap_or_else(|e| panic!("a tmpfs for the agent's state dir (the test mounts one): {e}"));
    let mut b = backend(dir.path(), "127.0.0.1:0").await;
    let t = Target::of(&b);
    let (graphite, metrics) = (free_port(), free_port());
    let agent = start_agent(
        &t,
        &state,
        graphite,
        metrics,
        &["--metrics-batch-age", "250ms"],
    );
    connected_agent(&b.admin(), "metrics-host", "grpc").await;
    let mut stream = Stream::start("full", ([127, 0, 0, 1], graphite).into(), 200);
    for period in 0..FILL_PERIODS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        fs.fill();
        if period % 4 == 1 {
            let (cfg, addr) = b.stop().await;
            tokio::time::sleep(Duration::from_secs(4)).await;
            b = TestBackend::start_with(cfg, addr).await;
        } else {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        fs.free();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = stream.stop();
    let counted = || async {
        let page = scrape_agent(([127, 0, 0, 1], metrics).into()).await?;
        let total = value(&page, "uplink_agent_metric_samples_total");
        let spooled = value(&page, "uplink_agent_spool_batches");
        let dropped = value(&page, "uplink_agent_spool_dropped_samples_total")
            + value(&page, "uplink_agent_metric_samples_refused_total");
        (total >= sent && spooled == 0).then_some(dropped)
    };
    wait_for(Duration::from_secs(60), "the spool to empty", counted).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dropped = counted().await.expect("the spool stays empty");
    let t = Stored::read(&dir.path().join("jsonl")).tally("full", sent);
    // The backend is stopped, never killed: no copy is allowed.
    let (once, missing, dup) = (
        t.once,
        t.missing,
        t.again_after_a_crash + t.twice_in_one_start,
    );
    println!(
        "state dir full {FILL_PERIODS} times: {sent} sent, {once} stored once, {dup} stored more than once, {missing} missing, {dropped} counted as dropped"
    );
    assert!(dropped > 0, "no append failed: the fills missed the spool");
    assert_eq!(
        (missing, dup),
        (dropped, 0),
        "sent = stored once + dropped, exactly; agent logs:\n{}",
        agent.logs()
    );
    // Nothing is pending: only the segment appended to may stay. One that
    // a failed append left behind, empty or all acknowledged, is space
    // the full disk never gets back.
    let segments = spool_segments(&state);
    assert!(
        segments.len() <= 1,
        "segments left with nothing pending: {segments:?}"
    );
    b.stop().await;
}

fn spool_segments(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_spool_files_lose_only_the_damaged_batches() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path(), "127.0.0.1:0").await;
    let t = Target::of(&b);
    let (graphite, metrics) = (free_port(), free_port());
    let state = dir.path().join("agent");
    // Batches of exactly 1000 samples, flushed by size only.
    let flags = [
        "--metrics-batch-samples",
        "1000",
        "--metrics-batch-age",
        "10m",
    ];
    let mut agent = start_agent(&t, &state, graphite, metrics, &flags);
    connected_agent(&b.admin(), "metrics-host", "grpc").await;
    let (cfg, addr) = b.stop().await;
    let load = Generator::start(graphite, 1).await;
    wait_for(Duration::from_secs(60), "20 spooled batches", || async {
        self_metric(metrics, "uplink_agent_spool_batches")
            .await
            .is_some_and(|n| n >= 20.0)
            .then_some(())
    })
    .await;
    let mut written = load.stop().await;
    written.truncate(written.len() / 1000 * 1000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill9().await;
    let segments = spool_segments(&state);
    let seg = segments.last().unwrap();
    let mut bytes = std::fs::read(seg).unwrap();
    let len = bytes.len();
    assert!(len > 10_000, "segment {} holds {len} bytes", seg.display());
    // A flipped byte in the middle, and a torn tail.
    bytes[len / 2] ^= 0x5a;
    bytes.truncate(len - 7);
    std::fs::write(seg, &bytes).unwrap();

    let b = TestBackend::start_with(cfg, addr).await;
    let agent = start_agent(&t, &state, graphite, metrics, &flags);
    wait_for(Duration::from_secs(60), "the spool to empty", || async {
        (self_metric(metrics, "uplink_agent_spool_batches").await == Some(0.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = delivered(dir.path());
    let set = exactly_once(&got);
    let corrupt = present_metric(metrics, "uplink_agent_spool_corrupt_batches_total").await;
    let torn = present_metric(metrics, "uplink_agent_spool_torn_bytes_total").await;
    let missing = written.iter().filter(|v| !set.contains(v)).count();
    println!(
        "damaged spool: {} written, {} delivered, {missing} missing; {corrupt} damaged batches skipped, {torn} torn bytes cut",
        written.len(),
        got.len()
    );
    assert!(
        corrupt >= 1.0 && torn > 0.0,
        "agent logs:\n{}",
        agent.logs()
    );
    // Whole batches only: the damaged one and the torn one.
    assert!(
        missing > 0 && missing % 1000 == 0 && missing <= 3000,
        "{missing} missing"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sets_the_agents_metrics_interval_on_the_stream() {
    backend_sets_the_interval("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sets_the_agents_metrics_interval_on_long_polls() {
    backend_sets_the_interval("longpoll").await;
}

async fn backend_sets_the_interval(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.agent_metrics_interval = Some(Duration::from_secs(1));
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    // The agent's own interval is a minute; the backend asks for a second.
    let agent = agent_via(
        &b,
        &b.url.to_string(),
        &dir.path().join("agent"),
        "reconfigured",
        &[
            "--metrics-interval",
            "1m",
            "--metrics-batch-age",
            "500ms",
            "--transport",
            transport,
        ],
        &[],
    );
    agent
        .wait_log(
            &["backend set the metrics interval"],
            Duration::from_secs(20),
        )
        .await;
    // The reference backend reads series deltas: after the first stored
    // batch the agent encodes with them, and what follows still arrives.
    agent
        .wait_log(
            &["the backend reads series deltas: metric batches carry sample_series_deltas"],
            Duration::from_secs(20),
        )
        .await;
    // It also reads spooled zstd batches: they go as they are.
    agent
        .wait_log(
            &["the backend reads spooled zstd batches: metric batches are sent as spooled"],
            Duration::from_secs(20),
        )
        .await;
    // Host samples now arrive about every second: several distinct
    // timestamps of the same series within a few seconds.
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 4 && tokio::time::Instant::now() < deadline {
        let text = b.core.sinks().render();
        if let Some(line) = text.lines().find(|l| {
            l.starts_with("host_memory_used_bytes{") && l.contains("hostname=\"reconfigured\"")
        }) {
            seen.insert(line.rsplit(' ').next().unwrap_or("").to_string());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.len() >= 4,
        "host samples at {} distinct times in 15 s with a 1 s interval; agent logs:\n{}",
        seen.len(),
        agent.logs()
    );
    b.stop().await;
}
