//! The agent's metrics pipeline, a unit of its own: sources feed one batcher; every flushed
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
//! spool's sync interval): a timer task syncs the spool every interval
//! while it holds unsynced writes, so this holds after appends stop too.
//!
//! The transport is not the pipeline's business: it is handed a [`Push`]
//! that sends one `PushMetricsRequest` and answers with a [`PushOutcome`]
//! (the agent builds it from its unary client, `agent::push`; the pipeline
//! benchmark drives this same unit). Its rooms:
//!
//! - this module: the settings, the self-metric names, [`Pipeline::start`]
//!   and its shutdown;
//! - `batch`: the batcher task (samples into compressed, spooled batches);
//! - `send`: the sender task (window, acks, replay pacing, what the backend
//!   reads);
//! - `sources`: the scrape timer and the host, container and self-metrics
//!   tasks.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::metrics::batcher::BatcherConfig;
use crate::metrics::containers::ContainerConfig;
use crate::metrics::host::{HostConfig, HostSource};
use crate::metrics::ingest::{Ingest, IngestConfig};
use crate::metrics::sample::Sample;
use crate::metrics::spool::{Spool, SpoolConfig, SyncPolicy};
use crate::proto;

mod batch;
mod send;
mod sources;

use send::Accepts;
use sources::Every;

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

    /// The spool's settings under `state_dir`: the cap, segments of an
    /// eighth of it (4 KiB to 8 MiB), synced every `spool_sync`.
    pub fn spool_config(&self, state_dir: &std::path::Path) -> SpoolConfig {
        let mut s = SpoolConfig::new(state_dir.join("spool"));
        s.cap_bytes = self.spool_max_bytes;
        s.segment_bytes = (self.spool_max_bytes / 8).clamp(4096, 8 << 20);
        s.sync = SyncPolicy::Every(self.spool_sync);
        s
    }
}

/// Sends one `PushMetrics` on the current rung (waiting for one when there
/// is none) and says how it went; the transport is the caller's business.
pub type Push = Arc<
    dyn Fn(proto::PushMetricsRequest) -> Pin<Box<dyn Future<Output = PushOutcome> + Send>>
        + Send
        + Sync,
>;

/// The newer forms of the contract a backend said it reads, from its
/// `PushMetricsResponse`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// `reads_series_deltas`: `MetricBatch.sample_series_deltas`.
    pub series_deltas: bool,
    /// `reads_batch_zstd`: `PushMetricsRequest.batch_zstd`.
    pub batch_zstd: bool,
}

impl Reads {
    /// What a response says.
    pub fn of(r: &proto::PushMetricsResponse) -> Reads {
        Reads {
            series_deltas: r.reads_series_deltas,
            batch_zstd: r.reads_batch_zstd,
        }
    }
}

/// How one push went, as the pipeline acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The backend stored the batch; it leaves the spool.
    Stored(Reads),
    /// The backend had already stored this `(epoch, seq)` (a replay); the
    /// batch leaves the spool as if stored now.
    Duplicate(Reads),
    /// The backend refused the batch; sending it again would not help, so
    /// it leaves the spool, counted and logged.
    Rejected(String),
    /// Not delivered: the batch stays spooled and everything unacknowledged
    /// goes again after a backoff. `kind` is a short label of a bounded set
    /// (logged once per outage), `reason` the detail.
    Retry { kind: &'static str, reason: String },
}

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
pub struct Pipeline {
    pub recorder: Recorder,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    batcher: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    spool: Arc<Mutex<Spool>>,
}

impl Pipeline {
    /// Opens the spool under `state_dir` and starts the batcher, the
    /// sender, the sources and the ingest endpoint. `agent_id` picks this
    /// agent's containers; `interval_set` carries the scrape interval the
    /// backend sets (None: the configured one).
    pub async fn start(
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
        let batcher = tokio::spawn(batch::batch_loop(
            cfg.batcher,
            rx,
            spool.clone(),
            spooled.clone(),
            accepts.clone(),
            stop_rx.clone(),
        ));
        let mut tasks = vec![tokio::spawn(sync_loop(
            spool.clone(),
            cfg.spool_sync,
            stop_rx.clone(),
        ))];
        tasks.push(tokio::spawn(send::send_loop(
            cfg.window,
            cfg.replay_rate,
            spool.clone(),
            spooled,
            push,
            accepts,
            stop_rx.clone(),
        )));
        if let Some(interval) = cfg.interval {
            match HostSource::new(cfg.host.clone()) {
                Ok(host) => tasks.push(tokio::spawn(sources::host_loop(
                    host,
                    Every::new(interval, interval_set.clone()),
                    recorder.clone(),
                    stop_rx.clone(),
                ))),
                Err(e) => tracing::warn!("no host metrics: {e}"),
            }
            tasks.push(tokio::spawn(sources::self_loop(
                Every::new(interval, interval_set.clone()),
                recorder.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(sources::containers_loop(
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
    pub async fn shutdown(self, deadline: tokio::time::Instant) {
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

/// Syncs the spool every `every` while it holds unsynced writes, so a
/// power loss takes at most `every` of what was spooled even once appends
/// stop (the spool itself syncs only on its next append or ack).
async fn sync_loop(spool: Arc<Mutex<Spool>>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
        let synced = with_spool(&spool, |s| if s.unsynced() { s.sync() } else { Ok(()) }).await;
        if let Err(e) = synced {
            tracing::warn!(error = %e, "metrics spool sync failed");
        }
    }
}

/// Completes when the pipeline is asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A power loss takes what is not synced. Under an interval policy the
    /// spool syncs only on its next append or ack, so after the last append
    /// before a quiet spell the write stays in the page cache until the
    /// pipeline's timer syncs it; without the timer it would stay unsynced
    /// for as long as nothing else is appended.
    #[tokio::test]
    async fn the_timer_syncs_the_last_append_once_appends_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = SpoolConfig::new(tmp.path().join("spool"));
        cfg.sync = SyncPolicy::Every(Duration::from_secs(60));
        let mut spool = Spool::open(cfg).unwrap();
        let header = |seq| crate::metrics::spool::Header {
            epoch: 1,
            seq,
            samples: 1,
            created_unix_ms: 0,
        };
        spool.append(header(1), b"first").unwrap();
        spool.sync().unwrap();
        spool
            .append(header(2), b"last before a quiet spell")
            .unwrap();
        assert!(
            spool.unsynced(),
            "an append under a 60 s policy is not synced at once"
        );
        let spool = Arc::new(Mutex::new(spool));
        let (stop, stop_rx) = watch::channel(false);
        let timer = tokio::spawn(sync_loop(spool.clone(), Duration::from_millis(50), stop_rx));
        let synced = async {
            while with_spool(&spool, |s| s.unsynced()).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), synced)
            .await
            .expect("the timer synced the spool's last append");
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), timer)
            .await
            .expect("the timer stops when the pipeline does")
            .unwrap();
    }

    /// The same through a running pipeline during an outage: one sample,
    /// one batch spooled, then nothing more is appended (every push fails,
    /// so no ack either). The spool syncs by itself only on a later append
    /// or ack; the batch becomes durable because the pipeline runs the
    /// timer.
    #[tokio::test]
    async fn a_running_pipeline_syncs_its_last_batch_during_an_outage() {
        use crate::metrics::sample::{Kind, Sample, Series};
        let tmp = tempfile::tempdir().unwrap();
        let cfg = MetricsConfig {
            interval: None,
            batcher: BatcherConfig {
                max_samples: 1000,
                max_age: Duration::from_millis(50),
            },
            spool_sync: Duration::from_secs(5),
            ..MetricsConfig::default()
        };
        let push: Push = Arc::new(|_| {
            Box::pin(async {
                PushOutcome::Retry {
                    kind: "outage",
                    reason: "the backend is unreachable".into(),
                }
            })
        });
        let (_set, interval_set) = watch::channel(None);
        let p = Pipeline::start(&cfg, tmp.path().into(), push, "agent", interval_set)
            .await
            .unwrap();
        let sample = Sample {
            series: Arc::new(Series::new("x", Kind::Gauge)),
            time_unix_ms: 1,
            value: 1.0,
        };
        assert!(p.recorder.record(vec![sample]).await);
        let durable = async {
            while !with_spool(&p.spool, |s| s.stats().records == 1 && !s.unsynced()).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), durable)
            .await
            .expect("the spooled batch was synced within 60 s");
        p.shutdown(tokio::time::Instant::now()).await;
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
