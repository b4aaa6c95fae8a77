//! The agent's metrics pipeline: sources feed one batcher; every flushed
//! batch is compressed and appended to the disk spool; a sender delivers
//! spooled batches over the current rung with a window of batches in
//! flight, and a batch leaves the spool only when the backend acknowledged
//! it. While the backend is unreachable batches simply stay spooled (the
//! spool's cap drops the oldest, counted); after it comes back they are
//! replayed, oldest first, at a capped rate.
//!
//! ```text
//!  host (sysinfo) ─┐
//!  containers ─────┤  bounded    ┌─────────┐  zstd  ┌───────┐ window ┌────────┐
//!  self (facade) ──┼─ channel ──▶│ batcher │──────▶ │ spool │──────▶ │ sender │──▶ PushMetrics
//!  ingest (Graphite┘  (waits)    └─────────┘ append └───────┘  peek  └────────┘   (either rung)
//!   / Influx)                                          ▲ ack ◀───────────┘
//! ```
//!
//! Every batch carries `(epoch, seq)`: the epoch is random per agent start
//! (and renewed when the spool drops batches, so the backend never waits
//! for a gap), seq counts from 1. A spooled batch keeps its identity across
//! restarts, so a replay the backend already stored is recognised there.
//! Batches spooled more than 10 s before they are sent (a backlog) are
//! paced by a token bucket at `--metrics-replay-rate` samples per second.
//!
//! When full: the sources' channel makes them wait (the ingest endpoint
//! then pushes back on its clients); the batcher holds at most one batch;
//! the spool holds at most its cap on disk and drops its oldest batches,
//! counted in `uplink_agent_spool_dropped_samples_total`.
//!
//! What a crash loses: samples in the batcher not yet flushed (at most
//! `--metrics-batch-age` of them), and with `kill -9` nothing spooled; a
//! power loss can also take what was spooled in the last second (the
//! spool's sync interval).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};

use crate::client::{CallError, FailureKind};
use crate::metrics::batcher::{Batcher, BatcherConfig};
use crate::metrics::compress::Compression;
use crate::metrics::containers::{ContainerConfig, ContainerSource};
use crate::metrics::host::{HostConfig, HostSource};
use crate::metrics::ingest::{Ingest, IngestConfig};
use crate::metrics::sample::{Kind, Sample, Series};
use crate::metrics::spool::{Header, Position, Record, Spool, SpoolConfig, SyncPolicy};
use crate::proto;

/// Self-metric names of the pipeline.
pub const SAMPLES: &str = "uplink_agent_metric_samples_total";
pub const BATCHES_SENT: &str = "uplink_agent_metric_batches_sent_total";
pub const BYTES_SENT: &str = "uplink_agent_metric_bytes_sent_total";
pub const BATCHES_REJECTED: &str = "uplink_agent_metric_batches_rejected_total";
pub const SAMPLES_REFUSED: &str = "uplink_agent_metric_samples_refused_total";
pub const SPOOL_BYTES: &str = "uplink_agent_spool_bytes";
pub const SPOOL_RECORDS: &str = "uplink_agent_spool_batches";
pub const SPOOL_DROPPED_SAMPLES: &str = "uplink_agent_spool_dropped_samples_total";
pub const SPOOL_DROPPED_BATCHES: &str = "uplink_agent_spool_dropped_batches_total";
pub const SPOOL_CORRUPT: &str = "uplink_agent_spool_corrupt_batches_total";
pub const SPOOL_TORN_BYTES: &str = "uplink_agent_spool_torn_bytes_total";

/// A spooled batch older than this when it is sent is a replay, sent at
/// most at the replay rate.
const REPLAY_AGE: Duration = Duration::from_secs(10);

/// Largest decompressed batch read back from the spool.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Scrape interval of the host, container and self sources.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Samples per second at most of a replayed backlog.
pub const DEFAULT_REPLAY_RATE: u64 = 500_000;

/// Settings of the pipeline.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Scrape interval of the host, container and self sources (None: no
    /// scraping; ingest still works).
    pub interval: Option<Duration>,
    /// When batches are flushed.
    pub batcher: BatcherConfig,
    /// Largest spool on disk, in bytes.
    pub spool_max_bytes: u64,
    /// How often the spool is synced to disk.
    pub spool_sync: Duration,
    /// Batches in flight at once.
    pub window: usize,
    /// Samples per second at most of batches replayed after an outage
    /// (spooled more than 10 s before they are sent); live batches are not
    /// paced.
    pub replay_rate: u64,
    /// The host source's settings.
    pub host: HostConfig,
    /// The container source's settings.
    pub containers: ContainerConfig,
    /// The load generators' ingest endpoint.
    pub ingest: IngestConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval: Some(DEFAULT_INTERVAL),
            batcher: BatcherConfig::default(),
            spool_max_bytes: crate::metrics::spool::DEFAULT_CAP_BYTES,
            spool_sync: Duration::from_secs(1),
            window: 4,
            replay_rate: DEFAULT_REPLAY_RATE,
            host: HostConfig::default(),
            containers: ContainerConfig::default(),
            ingest: IngestConfig::default(),
        }
    }
}

impl MetricsConfig {
    /// Every problem with the settings.
    pub fn validate(&self, state_dir: &std::path::Path) -> Vec<String> {
        let mut p = self.batcher.validate();
        if let Some(i) = self.interval
            && !(Duration::from_millis(200)..=Duration::from_secs(3600)).contains(&i)
        {
            p.push(format!(
                "--metrics-interval {i:?} is not between 200ms and 1h (0 turns scraping off)"
            ));
        }
        if !(1..=64).contains(&self.window) {
            p.push(format!(
                "--metrics-window {} is not between 1 and 64",
                self.window
            ));
        }
        if self.replay_rate < 100 {
            p.push(format!(
                "--metrics-replay-rate {} is below 100 samples/s",
                self.replay_rate
            ));
        }
        if self.spool_max_bytes < crate::metrics::spool::MIN_CAP_BYTES {
            p.push(format!(
                "--spool-max-bytes {} is below the minimum of {} (64k)",
                self.spool_max_bytes,
                crate::metrics::spool::MIN_CAP_BYTES
            ));
        } else {
            p.extend(
                self.spool_config(state_dir)
                    .validate()
                    .into_iter()
                    .map(|e| format!("spool: {e} (--spool-max-bytes)")),
            );
        }
        p.extend(self.ingest.validate());
        p.extend(self.containers.validate());
        p
    }

    fn spool_config(&self, state_dir: &std::path::Path) -> SpoolConfig {
        let mut s = SpoolConfig::new(state_dir.join("spool"));
        s.cap_bytes = self.spool_max_bytes;
        s.segment_bytes = (self.spool_max_bytes / 8).clamp(4096, 8 << 20);
        s.sync = SyncPolicy::Every(self.spool_sync);
        s
    }
}

/// Sends one `PushMetrics` on the current rung (waiting for one when there
/// is none); the transport is the session's business.
pub(super) type Push = Arc<
    dyn Fn(
            proto::PushMetricsRequest,
        )
            -> Pin<Box<dyn Future<Output = Result<proto::PushMetricsResponse, CallError>> + Send>>
        + Send
        + Sync,
>;

/// A cloneable handle to record samples.
#[derive(Clone)]
pub struct Recorder(mpsc::Sender<Vec<Sample>>);

impl Recorder {
    /// Records samples; waits while the pipeline is full. False when the
    /// pipeline has stopped.
    pub async fn record(&self, samples: Vec<Sample>) -> bool {
        samples.is_empty() || self.0.send(samples).await.is_ok()
    }
}

fn spool_error(e: impl std::fmt::Display) -> String {
    format!("metrics spool: {e}")
}

/// Runs a blocking spool operation off the runtime's workers.
async fn with_spool<T: Send + 'static>(
    spool: &Arc<Mutex<Spool>>,
    f: impl FnOnce(&mut Spool) -> T + Send + 'static,
) -> T {
    let spool = spool.clone();
    match tokio::task::spawn_blocking(move || {
        let mut s = spool.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    })
    .await
    {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn publish_spool(s: &Spool) {
    let st = s.stats();
    metrics::gauge!(SPOOL_BYTES).set(st.disk_bytes as f64);
    metrics::gauge!(SPOOL_RECORDS).set(st.records as f64);
}

/// The running pipeline.
pub(super) struct Pipeline {
    pub recorder: Recorder,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    batcher: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    spool: Arc<Mutex<Spool>>,
}

impl Pipeline {
    /// Opens the spool and starts the batcher, the sender, the sources and
    /// the ingest endpoint.
    pub(super) async fn start(
        cfg: &MetricsConfig,
        state_dir: PathBuf,
        push: Push,
        agent_id: &str,
        interval_set: watch::Receiver<Option<Duration>>,
    ) -> Result<Pipeline, String> {
        let spool_cfg = cfg.spool_config(&state_dir);
        let spool = tokio::task::spawn_blocking(move || Spool::open(spool_cfg))
            .await
            .map_err(spool_error)?
            .map_err(spool_error)?;
        let report = spool.open_report().clone();
        if report.records > 0 || report.corrupt_records_skipped > 0 || report.torn_bytes_cut > 0 {
            tracing::info!(
                batches = report.records,
                samples = report.samples,
                corrupt = report.corrupt_records_skipped,
                torn_bytes = report.torn_bytes_cut,
                "metrics spool opened with batches to replay"
            );
        }
        metrics::counter!(SPOOL_CORRUPT).increment(report.corrupt_records_skipped);
        metrics::counter!(SPOOL_TORN_BYTES).increment(report.torn_bytes_cut);
        publish_spool(&spool);
        let spool = Arc::new(Mutex::new(spool));
        let (tx, rx) = mpsc::channel::<Vec<Sample>>(256);
        let recorder = Recorder(tx);
        let (stop, stop_rx) = watch::channel(false);
        let spooled = Arc::new(Notify::new());
        // What the backend said it reads, set by the sender from each
        // response; the batcher encodes series deltas when it may.
        let accepts = Arc::new(Accepts::default());
        let batcher = tokio::spawn(batch_loop(
            cfg.batcher,
            rx,
            spool.clone(),
            spooled.clone(),
            accepts.clone(),
            stop_rx.clone(),
        ));
        let mut tasks = vec![tokio::spawn(send_loop(
            cfg.window,
            cfg.replay_rate,
            spool.clone(),
            spooled,
            push,
            accepts,
            stop_rx.clone(),
        ))];
        if let Some(interval) = cfg.interval {
            match HostSource::new(cfg.host.clone()) {
                Ok(host) => tasks.push(tokio::spawn(host_loop(
                    host,
                    Every::new(interval, interval_set.clone()),
                    recorder.clone(),
                    stop_rx.clone(),
                ))),
                Err(e) => tracing::warn!("no host metrics: {e}"),
            }
            tasks.push(tokio::spawn(self_loop(
                Every::new(interval, interval_set.clone()),
                recorder.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(containers_loop(
                agent_id.to_string(),
                cfg.containers.clone(),
                Every::new(interval, interval_set.clone()),
                recorder.clone(),
                stop_rx.clone(),
            )));
        }
        if cfg.ingest.graphite.is_some() || cfg.ingest.influx.is_some() {
            let mut stopped = stop_rx.clone();
            let mut handle = Ingest::start(cfg.ingest.clone(), recorder.0.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| e.to_string())?;
            if let Some(a) = handle.graphite_addr() {
                tracing::info!(addr = %a, "load generators: Graphite plaintext accepted on {a}");
            }
            if let Some(a) = handle.influx_addr() {
                tracing::info!(addr = %a, "load generators: InfluxDB line protocol accepted on http://{a}/write");
            }
            tasks.push(tokio::spawn(async move { handle.stopped().await }));
        }
        Ok(Pipeline {
            recorder,
            tasks,
            batcher,
            stop,
            spool,
        })
    }

    /// Flushes the batcher into the spool and syncs it; the sender gets
    /// until `deadline` to deliver what is spooled.
    pub(super) async fn shutdown(self, deadline: tokio::time::Instant) {
        // Sources stop first, then the batcher flushes what it holds.
        let _ = self.stop.send(true);
        drop(self.recorder);
        let _ = tokio::time::timeout_at(deadline, self.batcher).await;
        let delivered = async {
            loop {
                let left = with_spool(&self.spool, |s| s.stats().records).await;
                if left == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, delivered).await;
        for t in self.tasks {
            t.abort();
        }
        if let Err(e) = with_spool(&self.spool, |s| s.sync()).await {
            tracing::warn!(error = %e, "metrics spool sync at shutdown failed");
        }
    }
}

/// The newer forms of the contract the backend said it reads, from its
/// last `PushMetricsResponse`. Both start off: a backend written before
/// they existed never sets them.
#[derive(Debug, Default)]
struct Accepts {
    /// `MetricBatch.sample_series_deltas`.
    series_deltas: AtomicBool,
    /// `PushMetricsRequest.batch_zstd`.
    batch_zstd: AtomicBool,
}

impl Accepts {
    /// Takes what a response says; logs each change.
    fn update(&self, r: &proto::PushMetricsResponse) {
        let on = r.reads_series_deltas;
        if self.series_deltas.swap(on, Ordering::Relaxed) != on {
            tracing::info!(
                "the backend {} series deltas: metric batches carry {} from now on",
                if on { "reads" } else { "does not read" },
                if on {
                    "sample_series_deltas"
                } else {
                    "sample_series"
                }
            );
        }
        let on = r.reads_batch_zstd;
        if self.batch_zstd.swap(on, Ordering::Relaxed) != on {
            tracing::info!(
                "the backend {} spooled zstd batches: metric batches are sent {} from now on",
                if on { "reads" } else { "does not read" },
                if on {
                    "as spooled (batch_zstd)"
                } else {
                    "decoded (batch), compressed by the transport"
                }
            );
        }
    }
}

/// Batches samples; appends each flushed batch to the spool.
async fn batch_loop(
    cfg: BatcherConfig,
    mut rx: mpsc::Receiver<Vec<Sample>>,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    accepts: Arc<Accepts>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batcher = Batcher::new(cfg);
    let mut epoch = fastrand::u64(1..u64::MAX / 2);
    let mut seq = 0u64;
    let mut flushed = Vec::new();
    let mut refused = 0;
    loop {
        batcher.set_series_deltas(accepts.series_deltas.load(Ordering::Relaxed));
        let due = batcher.due();
        let mut closing = false;
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(samples) => {
                    metrics::counter!(SAMPLES).increment(samples.len() as u64);
                    batcher.add(&samples, Instant::now(), &mut flushed);
                }
                None => closing = true,
            },
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()).await }, if due.is_some() => {
                flushed.extend(batcher.flush());
            }
            _ = stopped(&mut stop), if !*stop.borrow() => {
                // Take what the sources already sent, then close.
                rx.close();
            }
        }
        if closing {
            flushed.extend(batcher.flush());
        }
        if batcher.rejected > refused {
            metrics::counter!(SAMPLES_REFUSED).increment(batcher.rejected - refused);
            refused = batcher.rejected;
        }
        for f in flushed.drain(..) {
            seq += 1;
            let header = Header {
                epoch,
                seq,
                samples: f.samples,
                created_unix_ms: crate::now_unix_ms(),
            };
            let bytes = f.batch.encode_to_vec();
            let appended = with_spool(&spool, move |s| {
                let payload = Compression::Zstd
                    .compress(&bytes)
                    .map_err(|e| format!("cannot compress a batch: {e}"))?;
                let r = s.append(header, &payload).map_err(|e| e.to_string());
                publish_spool(s);
                r
            })
            .await;
            match appended {
                Ok(a) if a.dropped.records > 0 => {
                    metrics::counter!(SPOOL_DROPPED_BATCHES).increment(a.dropped.records);
                    metrics::counter!(SPOOL_DROPPED_SAMPLES).increment(a.dropped.samples);
                    tracing::warn!(
                        batches = a.dropped.records,
                        samples = a.dropped.samples,
                        "metrics spool full: dropped its oldest batches (raise --spool-max-bytes to keep more)"
                    );
                    // The backend waits for no batch of a gap: new epoch.
                    epoch = fastrand::u64(1..u64::MAX / 2);
                    seq = 0;
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!(SPOOL_DROPPED_BATCHES).increment(1);
                    metrics::counter!(SPOOL_DROPPED_SAMPLES).increment(header.samples as u64);
                    tracing::warn!(samples = header.samples, "metric batch lost: {e}");
                }
            }
            spooled.notify_one();
        }
        if closing {
            return;
        }
    }
}

/// Completes when the pipeline is asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A token bucket over samples per second.
struct Rate {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(per_second: u64) -> Self {
        Rate {
            per_second: per_second as f64,
            tokens: per_second as f64,
            at: Instant::now(),
        }
    }

    /// How long to wait before sending `n` samples; takes them.
    fn take(&mut self, n: u32) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_second)
            .min(self.per_second);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

enum Sent {
    Stored,
    Rejected(String),
    Failed(CallError),
}

/// Delivers spooled batches, oldest first, with up to `window` in flight.
async fn send_loop(
    window: usize,
    rate: u64,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    push: Push,
    accepts: Arc<Accepts>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rate = Rate::new(rate);
    let mut inflight = FuturesUnordered::new();
    let mut cursor: Option<Position> = None;
    let mut retry = crate::backoff::Retry::new(crate::backoff::Backoff::default());
    let mut failures = 0u32;
    let mut failing = false;
    let stopping = stop.clone();
    loop {
        if !failing && inflight.len() < window {
            let want = window - inflight.len();
            let after = cursor;
            let records: Vec<Record> =
                match with_spool(&spool, move |s| s.peek_after(after, want)).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("cannot read the metrics spool: {e}");
                        Vec::new()
                    }
                };
            for r in records {
                cursor = Some(r.position);
                // A backlog (batches spooled a while ago) is replayed at
                // the capped rate; live batches go at once.
                let age_ms = crate::now_unix_ms().saturating_sub(r.header.created_unix_ms);
                let wait = if age_ms > REPLAY_AGE.as_millis() as i64 {
                    rate.take(r.header.samples)
                } else {
                    Duration::ZERO
                };
                let push = push.clone();
                let accepts = accepts.clone();
                inflight.push(async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let h = r.header;
                    let bytes = r.payload.len();
                    let request = |batch, batch_zstd| proto::PushMetricsRequest {
                        ack: 0,
                        epoch: h.epoch,
                        seq: h.seq,
                        batch,
                        batch_zstd,
                    };
                    // A backend that reads `batch_zstd` gets the spooled
                    // bytes as they are; another gets the decoded batch.
                    let request = if accepts.batch_zstd.load(Ordering::Relaxed) {
                        Ok(request(None, r.payload))
                    } else {
                        Compression::Zstd
                            .decompress(&r.payload, MAX_BATCH_BYTES)
                            .map_err(|e| e.to_string())
                            .and_then(|b| {
                                proto::MetricBatch::decode(b.as_slice()).map_err(|e| e.to_string())
                            })
                            .map(|batch| request(Some(batch), Vec::new()))
                    };
                    let outcome = match request {
                        Err(e) => Sent::Rejected(format!("spooled batch unreadable: {e}")),
                        Ok(request) => match push(request).await {
                            Ok(r) => {
                                accepts.update(&r);
                                Sent::Stored
                            }
                            Err(e)
                                if matches!(
                                    e.kind,
                                    FailureKind::Status(tonic::Code::InvalidArgument)
                                        | FailureKind::Status(tonic::Code::FailedPrecondition)
                                ) =>
                            {
                                Sent::Rejected(e.message)
                            }
                            Err(e) => Sent::Failed(e),
                        },
                    };
                    (h, bytes, outcome)
                });
            }
        }
        tokio::select! {
            biased;
            _ = stopped(&mut stop), if !*stop.borrow() => {}
            Some((h, bytes, outcome)) = inflight.next(), if !inflight.is_empty() => {
                let settle = match outcome {
                    Sent::Stored => {
                        metrics::counter!(BATCHES_SENT).increment(1);
                        metrics::counter!(BYTES_SENT).increment(bytes as u64);
                        failures = 0;
                        retry = crate::backoff::Retry::new(crate::backoff::Backoff::default());
                        true
                    }
                    Sent::Rejected(why) => {
                        metrics::counter!(BATCHES_REJECTED).increment(1);
                        tracing::warn!(epoch = h.epoch, seq = h.seq, samples = h.samples, "metric batch rejected, not sent again: {why}");
                        true
                    }
                    Sent::Failed(e) => {
                        if failures == 0 {
                            tracing::info!(kind = e.label(), "metrics not delivered, kept in the spool: {}", e.message);
                        }
                        failing = true;
                        false
                    }
                };
                if settle {
                    let r = with_spool(&spool, move |s| {
                        let r = s.ack(h.epoch, h.seq);
                        publish_spool(s);
                        r
                    })
                    .await;
                    if let Err(e) = r {
                        tracing::warn!("cannot record a delivered batch in the spool: {e}");
                    }
                }
                if failing && inflight.is_empty() {
                    // Everything unacknowledged goes again, from the oldest.
                    failures += 1;
                    let pause = retry.next_delay();
                    let mut stopping = stopping.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopped(&mut stopping) => {}
                    }
                    cursor = None;
                    failing = false;
                }
            }
            _ = spooled.notified(), if inflight.len() < window && !failing => {}
        }
        if *stop.borrow() && inflight.is_empty() {
            // Keep delivering until the shutdown deadline aborts this task.
            if with_spool(&spool, |s| s.stats().records).await == 0 {
                spooled.notified().await;
            }
        }
    }
}

/// The scrape timer: the agent's interval until the backend sets another
/// (`Reconfigure`).
struct Every {
    tick: tokio::time::Interval,
    set: watch::Receiver<Option<Duration>>,
}

impl Every {
    fn new(interval: Duration, set: watch::Receiver<Option<Duration>>) -> Every {
        let interval = (*set.borrow()).unwrap_or(interval);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Every { tick, set }
    }

    /// Waits for the next scrape; false when the pipeline stops.
    async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            tokio::select! {
                _ = self.tick.tick() => return true,
                _ = stopped(stop) => return false,
                r = self.set.changed() => {
                    if r.is_err() {
                        // The session is gone: keep the current interval.
                        return tokio::select! {
                            _ = self.tick.tick() => true,
                            _ = stopped(stop) => false,
                        };
                    }
                    if let Some(d) = *self.set.borrow_and_update() {
                        self.tick = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                        self.tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
            }
        }
    }
}

/// Scrapes the host every interval.
async fn host_loop(
    mut host: HostSource,
    mut every: Every,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        let scraped = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            host.scrape(crate::now_unix_ms(), &mut out);
            (host, out)
        })
        .await;
        let Ok((h, out)) = scraped else { return };
        host = h;
        if !recorder.record(out).await {
            return;
        }
    }
}

/// Scrapes this agent's containers every `interval`, connecting to the
/// engine when it is (again) available.
async fn containers_loop(
    agent_id: String,
    cfg: ContainerConfig,
    mut every: Every,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut source: Option<ContainerSource> = None;
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        if source.is_none() {
            match super::docker::connect().await {
                Ok(d) => source = Some(ContainerSource::new(d, &agent_id, cfg.clone())),
                Err(_) => continue, // No engine: no container metrics.
            }
        }
        let Some(s) = source.as_mut() else { continue };
        let mut out = Vec::new();
        if let Err(e) = s.scrape(crate::now_unix_ms(), &mut out).await {
            tracing::debug!("container metrics: {e}");
            source = None;
        }
        if !recorder.record(out).await {
            return;
        }
    }
}

/// Parses the self-metrics recorder's Prometheus text into samples.
struct SelfSource {
    series: HashMap<String, Arc<Series>>,
}

impl SelfSource {
    fn scrape(&mut self, text: &str, now: i64, out: &mut Vec<Sample>) {
        let mut kinds: HashMap<&str, Kind> = HashMap::new();
        let mut seen = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    match kind {
                        "counter" => kinds.insert(name, Kind::Counter),
                        "gauge" => kinds.insert(name, Kind::Gauge),
                        _ => None,
                    };
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = key.split('{').next().unwrap_or(key);
            let Some(&kind) = kinds.get(name) else {
                continue;
            };
            let series = match self.series.get(key) {
                Some(s) => s.clone(),
                None => {
                    let mut s = Series::new(name, kind);
                    if let Some(labels) = key
                        .strip_prefix(name)
                        .and_then(|l| l.strip_prefix('{'))
                        .and_then(|l| l.strip_suffix('}'))
                    {
                        for pair in labels.split("\",") {
                            if let Some((k, v)) = pair.split_once("=\"") {
                                s = s.label(k, v.trim_end_matches('"'));
                            }
                        }
                    }
                    let s = Arc::new(s);
                    self.series.insert(key.to_string(), s.clone());
                    s
                }
            };
            seen.push(key.to_string());
            out.push(Sample {
                series,
                time_unix_ms: now,
                value,
            });
        }
        if self.series.len() > seen.len() {
            self.series.retain(|k, _| seen.contains(k));
        }
    }
}

/// Sends the agent's own metrics (the `metrics` facade) every `interval`.
async fn self_loop(mut every: Every, recorder: Recorder, mut stop: watch::Receiver<bool>) {
    let Some(handle) = crate::telemetry::install() else {
        return;
    };
    let mut source = SelfSource {
        series: HashMap::new(),
    };
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        let mut out = Vec::new();
        source.scrape(&handle.render(), crate::now_unix_ms(), &mut out);
        if !recorder.record(out).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_metrics_text_becomes_samples_with_kinds_and_labels() {
        let text = "# TYPE uplink_agent_commands_total counter\nuplink_agent_commands_total{status=\"COMMAND_STATUS_OK\"} 3\n\
                    # TYPE uplink_agent_spool_bytes gauge\nuplink_agent_spool_bytes 4096\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nnot a line\n";
        let mut s = SelfSource {
            series: HashMap::new(),
        };
        let mut out = Vec::new();
        s.scrape(text, 7, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].series.name, "uplink_agent_commands_total");
        assert_eq!(out[0].series.kind, Kind::Counter);
        assert_eq!(
            out[0].series.labels,
            vec![("status".to_string(), "COMMAND_STATUS_OK".to_string())]
        );
        assert_eq!((out[0].value, out[0].time_unix_ms), (3.0, 7));
        assert_eq!(out[1].series.kind, Kind::Gauge);
        let first = out[0].series.clone();
        out.clear();
        s.scrape(text, 8, &mut out);
        assert!(Arc::ptr_eq(&first, &out[0].series));
    }

    #[test]
    fn the_rate_cap_spreads_sends() {
        let mut r = Rate::new(1000);
        assert_eq!(r.take(1000), Duration::ZERO);
        let w = r.take(500);
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }

    #[test]
    fn settings_are_checked() {
        let dir = std::path::Path::new("/tmp");
        assert!(
            MetricsConfig::default().validate(dir).is_empty(),
            "{:?}",
            MetricsConfig::default().validate(dir)
        );
        let bad = MetricsConfig {
            interval: Some(Duration::from_millis(1)),
            window: 0,
            replay_rate: 1,
            spool_max_bytes: 10,
            ..MetricsConfig::default()
        };
        assert_eq!(bad.validate(dir).len(), 4, "{:?}", bad.validate(dir));
    }
}
