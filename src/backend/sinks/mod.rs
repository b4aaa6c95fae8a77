//! Where ingested metric batches go: the latest value of every series for
//! Prometheus ([`prometheus`], served at `GET /metrics`) and, when
//! configured, every sample as JSON lines ([`jsonl`]). Also the backend's
//! own ingest counters, kept as plain atomics here (not in a process-wide
//! `metrics` recorder, so several backends can share a process) and shown
//! in the same `/metrics` output.
//!
//! A batch is *accepted* when every sink took it: the JSON-lines writer has
//! written its lines, then the latest values were updated. `Core` records
//! the batch's seq as seen only after that, and only then acknowledges it.

pub mod jsonl;
pub mod prometheus;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub use self::jsonl::{BatchKey, JsonlConfig, JsonlError};
pub use self::prometheus::Origin;
use crate::metrics::encode::{DecodeError, Decoded};

/// Default cap on series kept for `/metrics`.
pub const DEFAULT_MAX_SERIES: usize = 1_000_000;
/// Default cap on the bytes of the series kept for `/metrics` (names and
/// labels, see [`prometheus::SERIES_OVERHEAD`]).
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Default time after which a series without updates leaves `/metrics`.
pub const DEFAULT_SERIES_TTL: Duration = Duration::from_secs(15 * 60);
/// Default size at which a JSON-lines file is closed and the next begun.
pub const DEFAULT_JSONL_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of JSON-lines files kept.
pub const DEFAULT_JSONL_KEEP: usize = 20;

/// Metric batches stored (not counting duplicates and rejected ones).
pub const BATCHES: &str = "uplink_backend_metric_batches_total";
/// Samples in stored batches.
pub const SAMPLES: &str = "uplink_backend_metric_samples_total";
/// Batches received again after they were stored.
pub const DUPLICATES: &str = "uplink_backend_metric_batches_duplicate_total";
/// Batches refused; label `reason` ([`Rejection`]).
pub const REJECTED: &str = "uplink_backend_metric_batches_rejected_total";
/// Series shown at `/metrics` now.
pub const SERIES: &str = "uplink_backend_metric_series";
/// New series refused because the cap on series or on bytes was reached.
pub const SERIES_DROPPED: &str = "uplink_backend_metric_series_dropped_total";
/// Series evicted after the TTL without an update.
pub const SERIES_EVICTED: &str = "uplink_backend_metric_series_evicted_total";
/// JSON lines written.
pub const JSONL_LINES: &str = "uplink_backend_metric_jsonl_lines_total";
/// Bytes of JSON lines written.
pub const JSONL_BYTES: &str = "uplink_backend_metric_jsonl_bytes_total";
/// JSON-lines files started.
pub const JSONL_FILES: &str = "uplink_backend_metric_jsonl_files_total";
/// JSON-lines files deleted to keep at most `--metrics-jsonl-keep`.
pub const JSONL_DELETED: &str = "uplink_backend_metric_jsonl_files_deleted_total";
/// Batches whose JSON lines could not be written.
pub const JSONL_ERRORS: &str = "uplink_backend_metric_jsonl_write_errors_total";
/// Pushes that waited for room in the JSON-lines queue.
pub const JSONL_WAITS: &str = "uplink_backend_metric_jsonl_queue_waits_total";
/// Batches sent again after their lines were written and before they were
/// recorded: recorded without being written again.
pub const JSONL_RESENT: &str = "uplink_backend_metric_jsonl_batches_resent_total";
/// Batches whose lines are written and that are not known to be recorded.
pub const JSONL_UNRECORDED: &str = "uplink_backend_metric_jsonl_unrecorded_batches";
/// Unrecorded batches forgotten at the bound (written again if resent).
pub const JSONL_FORGOTTEN: &str = "uplink_backend_metric_jsonl_unrecorded_forgotten_total";
/// Bytes cut off at start: lines of batches an earlier start never entered
/// in its ledger.
pub const JSONL_CUT: &str = "uplink_backend_metric_jsonl_cut_bytes_total";
/// Batches an earlier start wrote and did not record, that another backend
/// sharing the store wrote too: removed from this backend's files at start.
pub const JSONL_COPIES_REMOVED: &str = "uplink_backend_metric_jsonl_copies_removed_total";
/// Such batches whose lines were in an older file: left there.
pub const JSONL_COPIES_LEFT: &str = "uplink_backend_metric_jsonl_copies_left_total";

const OWN: [&str; 19] = [
    BATCHES,
    SAMPLES,
    DUPLICATES,
    REJECTED,
    SERIES,
    SERIES_DROPPED,
    SERIES_EVICTED,
    JSONL_LINES,
    JSONL_BYTES,
    JSONL_FILES,
    JSONL_DELETED,
    JSONL_ERRORS,
    JSONL_WAITS,
    JSONL_RESENT,
    JSONL_UNRECORDED,
    JSONL_FORGOTTEN,
    JSONL_CUT,
    JSONL_COPIES_REMOVED,
    JSONL_COPIES_LEFT,
];

/// Why a metric batch was refused: the `reason` label of
/// `uplink_backend_metric_batches_rejected_total`, and the word in
/// parentheses in the error the agent gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The request sets both `batch` and `batch_zstd`.
    BothBatchForms,
    /// `batch_zstd` does not decompress within the limit.
    BatchZstd,
    /// Invalid batch ([`DecodeError`] variants, one reason each).
    MixedSeriesColumns,
    ColumnLengths,
    MixedValueEncodings,
    ScalesLength,
    BadScale,
    FirstSymbol,
    SymbolOutOfRange,
    EmptyName,
    OddLabels,
    EmptyLabelName,
    UnsortedLabels,
    /// A name or label beyond the decoder's length limits.
    TooLong,
    /// More labels on a series than the decoder allows.
    TooManyLabels,
    UnknownKind,
    SeriesOutOfRange,
    TimeOutOfRange,
    IntegerOutOfRange,
    /// A decode error this list does not name yet.
    Invalid,
    /// `seq` is 0 or beyond 2^63 - 1.
    BadSeq,
    /// `seq` is too far above its epoch's watermark.
    SeqTooFarAhead,
    /// The same `(epoch, seq)` is being stored by another request.
    InFlight,
    /// The JSON-lines queue stayed full.
    SinkBehind,
    /// The JSON lines could not be written.
    SinkError,
    /// The backend is stopping.
    Stopping,
    /// The store failed.
    Store,
}

impl Rejection {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Rejection; 27] = [
        Rejection::BothBatchForms,
        Rejection::BatchZstd,
        Rejection::MixedSeriesColumns,
        Rejection::ColumnLengths,
        Rejection::MixedValueEncodings,
        Rejection::ScalesLength,
        Rejection::BadScale,
        Rejection::FirstSymbol,
        Rejection::SymbolOutOfRange,
        Rejection::EmptyName,
        Rejection::OddLabels,
        Rejection::EmptyLabelName,
        Rejection::UnsortedLabels,
        Rejection::TooLong,
        Rejection::TooManyLabels,
        Rejection::UnknownKind,
        Rejection::SeriesOutOfRange,
        Rejection::TimeOutOfRange,
        Rejection::IntegerOutOfRange,
        Rejection::Invalid,
        Rejection::BadSeq,
        Rejection::SeqTooFarAhead,
        Rejection::InFlight,
        Rejection::SinkBehind,
        Rejection::SinkError,
        Rejection::Stopping,
        Rejection::Store,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BothBatchForms => "both_batch_forms",
            Rejection::BatchZstd => "batch_zstd",
            Rejection::MixedSeriesColumns => "mixed_series_columns",
            Rejection::ColumnLengths => "column_lengths",
            Rejection::MixedValueEncodings => "mixed_value_encodings",
            Rejection::ScalesLength => "scales_length",
            Rejection::BadScale => "bad_scale",
            Rejection::FirstSymbol => "first_symbol",
            Rejection::SymbolOutOfRange => "symbol_out_of_range",
            Rejection::EmptyName => "empty_name",
            Rejection::OddLabels => "odd_labels",
            Rejection::EmptyLabelName => "empty_label_name",
            Rejection::UnsortedLabels => "unsorted_labels",
            Rejection::TooLong => "too_long",
            Rejection::TooManyLabels => "too_many_labels",
            Rejection::UnknownKind => "unknown_kind",
            Rejection::SeriesOutOfRange => "series_out_of_range",
            Rejection::TimeOutOfRange => "time_out_of_range",
            Rejection::IntegerOutOfRange => "integer_out_of_range",
            Rejection::Invalid => "invalid",
            Rejection::BadSeq => "bad_seq",
            Rejection::SeqTooFarAhead => "seq_too_far_ahead",
            Rejection::InFlight => "in_flight",
            Rejection::SinkBehind => "sink_behind",
            Rejection::SinkError => "sink_error",
            Rejection::Stopping => "stopping",
            Rejection::Store => "store",
        }
    }

    /// The reason of a decode error.
    pub fn of(e: &DecodeError) -> Rejection {
        match e {
            DecodeError::MixedSeriesColumns => Rejection::MixedSeriesColumns,
            DecodeError::ColumnLengths { .. } => Rejection::ColumnLengths,
            DecodeError::MixedValueEncodings => Rejection::MixedValueEncodings,
            DecodeError::ScalesLength { .. } => Rejection::ScalesLength,
            DecodeError::BadScale { .. } => Rejection::BadScale,
            DecodeError::FirstSymbolNotEmpty => Rejection::FirstSymbol,
            DecodeError::SymbolOutOfRange { .. } => Rejection::SymbolOutOfRange,
            DecodeError::EmptyName { .. } => Rejection::EmptyName,
            DecodeError::OddLabels { .. } => Rejection::OddLabels,
            DecodeError::EmptyLabelName { .. } => Rejection::EmptyLabelName,
            DecodeError::UnsortedLabels { .. } => Rejection::UnsortedLabels,
            DecodeError::TooLong { .. } => Rejection::TooLong,
            DecodeError::TooManyLabels { .. } => Rejection::TooManyLabels,
            DecodeError::UnknownKind { .. } => Rejection::UnknownKind,
            DecodeError::SeriesOutOfRange { .. } => Rejection::SeriesOutOfRange,
            DecodeError::TimeOutOfRange { .. } => Rejection::TimeOutOfRange,
            DecodeError::IntegerOutOfRange { .. } => Rejection::IntegerOutOfRange,
            DecodeError::Protobuf(_) => Rejection::Invalid,
            // Variants added to the decoder later.
            #[allow(unreachable_patterns)]
            _ => Rejection::Invalid,
        }
    }
}

/// Settings of the sinks. The defaults are the constants above;
/// `BackendConfig` carries them from flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinksConfig {
    /// Most series kept for `/metrics`.
    pub max_series: usize,
    /// Most bytes of series kept for `/metrics`.
    pub max_bytes: usize,
    /// A series not updated for this long leaves `/metrics`.
    pub series_ttl: Duration,
    /// JSON lines, when wanted.
    pub jsonl: Option<JsonlConfig>,
}

impl Default for SinksConfig {
    fn default() -> Self {
        SinksConfig {
            max_series: DEFAULT_MAX_SERIES,
            max_bytes: DEFAULT_MAX_BYTES,
            series_ttl: DEFAULT_SERIES_TTL,
            jsonl: None,
        }
    }
}

/// Why a batch was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Jsonl(#[from] JsonlError),
}

impl SinkError {
    /// The rejection reason to count.
    pub fn reason(&self) -> Rejection {
        match self {
            SinkError::Jsonl(JsonlError::Behind) => Rejection::SinkBehind,
            SinkError::Jsonl(JsonlError::Write(_)) => Rejection::SinkError,
            SinkError::Jsonl(JsonlError::Stopping) => Rejection::Stopping,
        }
    }
}

/// What [`Sinks::accept`] did with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Its lines were written now (or it has none to write).
    Written,
    /// Its lines were written before, and it is not known to be recorded:
    /// nothing was written again.
    WrittenBefore,
}

/// The sinks and the ingest counters.
pub struct Sinks {
    latest: prometheus::LatestValues,
    jsonl: Option<jsonl::JsonLines>,
    batches: AtomicU64,
    samples: AtomicU64,
    duplicates: AtomicU64,
    resent: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl Sinks {
    /// Opens the sinks; fails only when the JSON-lines directory cannot be
    /// written. `start_unix_ms` names the JSON-lines files.
    pub fn open(cfg: SinksConfig, start_unix_ms: i64) -> Result<Sinks, jsonl::OpenError> {
        let jsonl = cfg
            .jsonl
            .map(|j| jsonl::JsonLines::open(j, start_unix_ms))
            .transpose()?;
        Ok(Sinks {
            latest: prometheus::LatestValues::new(cfg.max_series, cfg.max_bytes, cfg.series_ttl),
            jsonl,
            batches: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// Latest values only, with the default settings.
    pub fn in_memory() -> Sinks {
        Sinks {
            latest: prometheus::LatestValues::new(
                DEFAULT_MAX_SERIES,
                DEFAULT_MAX_BYTES,
                DEFAULT_SERIES_TTL,
            ),
            jsonl: None,
            batches: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Gives `batch`, the batch `key`, to every sink: first the JSON lines
    /// (which may refuse it), then the latest values (which cannot).
    ///
    /// A batch whose lines were written before (by this start or an
    /// earlier one) and that is not known to be recorded goes to no sink
    /// again: the caller records it. Call [`Sinks::recorded`] once the
    /// store recorded it. `resent`: the push was marked so (the JSON lines
    /// remember it, see [`Sinks::was_resent`]).
    pub async fn accept(
        &self,
        key: BatchKey,
        origin: Arc<Origin>,
        batch: Arc<Decoded>,
        resent: bool,
    ) -> Result<Accepted, SinkError> {
        if let Some(j) = &self.jsonl {
            if j.holds(&key) {
                self.resent.fetch_add(1, Relaxed);
                return Ok(Accepted::WrittenBefore);
            }
            j.write(key, origin.clone(), batch.clone(), resent).await?;
        }
        self.latest.update(&origin, &batch, Instant::now());
        Ok(Accepted::Written)
    }

    /// Whether `key`, written and not known to be recorded, came in a push
    /// marked `resent`.
    pub fn was_resent(&self, key: &BatchKey) -> bool {
        self.jsonl.as_ref().is_some_and(|j| j.was_resent(key))
    }

    /// The JSON lines' writer id, when they are written.
    pub fn writer(&self) -> Option<&str> {
        self.jsonl.as_ref().map(|j| j.writer())
    }

    /// Removes the lines of `copies`, batches another backend wrote and
    /// recorded (see [`JsonLines::remove_copies`]): how many were removed
    /// and left.
    pub async fn remove_copies(&self, copies: &[BatchKey]) -> std::io::Result<(usize, usize)> {
        match &self.jsonl {
            Some(j) => j.remove_copies(copies).await,
            None => Ok((0, 0)),
        }
    }

    /// `key` is recorded in the store: the sinks need not remember it.
    pub fn recorded(&self, key: &BatchKey) {
        if let Some(j) = &self.jsonl {
            j.recorded(key);
        }
    }

    /// Batches whose lines are written and that are not known to be
    /// recorded (some may be: the start that wrote them was killed), oldest
    /// first.
    pub fn unrecorded(&self) -> Vec<BatchKey> {
        self.jsonl
            .as_ref()
            .map(|j| j.unrecorded_keys())
            .unwrap_or_default()
    }

    /// Counts a stored batch of `samples` samples.
    pub fn stored(&self, samples: usize) {
        self.batches.fetch_add(1, Relaxed);
        self.samples.fetch_add(samples as u64, Relaxed);
    }

    /// Counts a duplicate.
    pub fn duplicate(&self) {
        self.duplicates.fetch_add(1, Relaxed);
    }

    /// Counts a refused batch.
    pub fn reject(&self, reason: Rejection) {
        if let Some(i) = Rejection::ALL.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Relaxed);
        }
    }

    /// Batches refused for `reason` so far.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.rejected[i].load(Relaxed))
    }

    /// The JSON-lines directory, when configured.
    pub fn jsonl_dir(&self) -> Option<&std::path::Path> {
        self.jsonl.as_ref().map(|j| j.dir())
    }

    /// Stops the JSON-lines writer after it wrote everything queued (at
    /// most `timeout`). Later batches are refused with
    /// [`JsonlError::Stopping`].
    pub async fn close(&self, timeout: Duration) {
        if let Some(j) = &self.jsonl {
            j.close(timeout).await;
        }
    }

    /// The `/metrics` page: the backend's own ingest metrics, then the
    /// latest value of every series (text exposition format 0.0.4).
    pub fn render(&self) -> String {
        let now = Instant::now();
        let counts = self.latest.counts(now);
        let mut out = String::with_capacity(4096 + counts.series * 160);
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        one(
            BATCHES,
            "counter",
            "Metric batches stored (duplicates and rejected batches not counted).",
            self.batches.load(Relaxed),
        );
        one(
            SAMPLES,
            "counter",
            "Samples in stored metric batches.",
            self.samples.load(Relaxed),
        );
        one(
            DUPLICATES,
            "counter",
            "Metric batches received again after they were stored: acknowledged, not stored again.",
            self.duplicates.load(Relaxed),
        );
        one(
            SERIES,
            "gauge",
            "Series whose latest value this page shows.",
            counts.series as u64,
        );
        one(
            SERIES_DROPPED,
            "counter",
            "Updates of new series refused because --metrics-max-series was reached.",
            counts.dropped,
        );
        one(
            SERIES_EVICTED,
            "counter",
            "Series removed after --metrics-series-ttl without an update.",
            counts.evicted,
        );
        if let Some(j) = &self.jsonl {
            let s = &j.stats;
            one(
                JSONL_LINES,
                "counter",
                "JSON lines written.",
                s.lines.load(Relaxed),
            );
            one(
                JSONL_BYTES,
                "counter",
                "Bytes of JSON lines written.",
                s.bytes.load(Relaxed),
            );
            one(
                JSONL_FILES,
                "counter",
                "JSON-lines files started.",
                s.files.load(Relaxed),
            );
            one(
                JSONL_DELETED,
                "counter",
                "JSON-lines files deleted to keep at most --metrics-jsonl-keep.",
                s.deleted.load(Relaxed),
            );
            one(
                JSONL_ERRORS,
                "counter",
                "Metric batches whose JSON lines could not be written (refused; the agent retries).",
                s.write_errors.load(Relaxed),
            );
            one(
                JSONL_WAITS,
                "counter",
                "Pushes that found the JSON-lines queue full and waited for room.",
                s.waits.load(Relaxed),
            );
            let (unrecorded, forgotten) = j.unrecorded_counts();
            one(
                JSONL_RESENT,
                "counter",
                "Metric batches sent again after their JSON lines were written and before they were recorded: recorded without writing them again.",
                self.resent.load(Relaxed),
            );
            one(
                JSONL_UNRECORDED,
                "gauge",
                "Metric batches whose JSON lines are written and that are not known to be recorded in the store.",
                unrecorded as u64,
            );
            one(
                JSONL_FORGOTTEN,
                "counter",
                "Unrecorded metric batches forgotten at the bound; one sent again is written again.",
                forgotten,
            );
            one(
                JSONL_CUT,
                "counter",
                "Bytes of JSON lines cut off at start: lines of batches an earlier start wrote but never entered in its ledger (never recorded).",
                s.cut_bytes.load(Relaxed),
            );
            one(
                JSONL_COPIES_REMOVED,
                "counter",
                "Metric batches an earlier start wrote and did not record, that another backend sharing the store wrote too: their lines removed at start.",
                s.copies_removed.load(Relaxed),
            );
            one(
                JSONL_COPIES_LEFT,
                "counter",
                "Such batches whose lines were in an older file: left there.",
                s.copies_left.load(Relaxed),
            );
        }
        let _ = write!(
            out,
            "# HELP {REJECTED} Metric batches refused, by reason (the agent's error names it).\n# TYPE {REJECTED} counter\n"
        );
        for (i, r) in Rejection::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "{REJECTED}{{reason=\"{}\"}} {}",
                r.as_str(),
                self.rejected[i].load(Relaxed)
            );
        }
        self.latest.render(now, &OWN, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::Point;
    use crate::metrics::sample::{Kind, Series};
    use std::io::Write as _;

    #[test]
    fn every_reason_has_its_own_label() {
        let mut names: Vec<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Rejection::ALL.len());
        assert_eq!(
            Rejection::of(&DecodeError::SeriesOutOfRange {
                sample: 0,
                index: 3,
                series: 1
            }),
            Rejection::SeriesOutOfRange
        );
    }

    /// The JSON lines of every file in `dir`, in file order.
    fn jsonl_values(dir: &std::path::Path) -> Vec<f64> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["value"]
                            .as_f64()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_written_and_not_recorded_is_not_written_again_by_this_start_or_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = || SinksConfig {
            jsonl: Some(JsonlConfig {
                dir: dir.path().to_path_buf(),
                max_bytes: 1 << 20,
                keep: 10,
            }),
            ..SinksConfig::default()
        };
        let origin = Arc::new(Origin {
            agent: "agt_1".into(),
            provider: "p".into(),
            hostname: "h".into(),
        });
        let batch = |v: f64| {
            Arc::new(Decoded {
                series: vec![Arc::new(Series::new("x", Kind::Gauge))],
                points: vec![Point {
                    series: 0,
                    time_unix_ms: 5,
                    value: v,
                }],
            })
        };
        let key = |seq| BatchKey {
            agent: "agt_1".into(),
            epoch: 1,
            seq,
        };
        let first = Sinks::open(cfg(), 1_000_000).unwrap();
        // Batch 1 is recorded; batch 2's record fails, and it is sent again.
        first
            .accept(key(1), origin.clone(), batch(1.0), false)
            .await
            .unwrap();
        first.recorded(&key(1));
        first
            .accept(key(2), origin.clone(), batch(2.0), false)
            .await
            .unwrap();
        assert_eq!(
            first
                .accept(key(2), origin.clone(), batch(2.0), false)
                .await
                .unwrap(),
            Accepted::WrittenBefore
        );
        assert_eq!(first.unrecorded(), vec![key(2)]);
        assert!(first.render().contains(&format!("{JSONL_RESENT} 1\n")));
        // Batch 3 is written, then the backend is killed before its entry:
        // its lines are left without one.
        first.close(Duration::from_secs(5)).await;
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .unwrap();
        let torn = "{\"time_unix_ms\":5,\"value\":3.0}\n{\"time_unix_ms\":5,\"val";
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(torn.as_bytes())
            .unwrap();
        drop(first);

        // The next start cuts batch 3's lines off and still holds batch 2
        // (and batch 1, until the store says it is recorded).
        let next = Sinks::open(cfg(), 2_000_000).unwrap();
        assert_eq!(next.unrecorded(), vec![key(1), key(2)]);
        next.recorded(&key(1));
        next.accept(key(2), origin.clone(), batch(2.0), false)
            .await
            .unwrap();
        next.accept(key(3), origin.clone(), batch(3.0), false)
            .await
            .unwrap();
        assert!(
            next.render()
                .contains(&format!("{JSONL_CUT} {}\n", torn.len()))
        );
        // A batch from a resent push that another backend recorded first:
        // its lines go from the file being written, and writing goes on.
        next.accept(key(4), origin.clone(), batch(4.0), true)
            .await
            .unwrap();
        assert!(next.was_resent(&key(4)) && !next.was_resent(&key(3)));
        assert_eq!(next.remove_copies(&[key(4)]).await.unwrap(), (1, 0));
        assert!(!next.unrecorded().contains(&key(4)));
        next.accept(key(5), origin.clone(), batch(5.0), false)
            .await
            .unwrap();
        next.close(Duration::from_secs(5)).await;
        assert_eq!(jsonl_values(dir.path()), vec![1.0, 2.0, 3.0, 5.0]);
    }

    #[tokio::test]
    async fn the_page_has_own_metrics_then_series() {
        let s = Sinks::in_memory();
        let origin = Arc::new(Origin {
            agent: "agt_1".into(),
            provider: "p".into(),
            hostname: "h".into(),
        });
        let batch = Arc::new(Decoded {
            series: vec![
                Arc::new(Series::new("load", Kind::Gauge)),
                // An agent cannot overwrite the backend's own metrics.
                Arc::new(Series::new(SERIES, Kind::Gauge)),
            ],
            points: vec![
                Point {
                    series: 0,
                    time_unix_ms: 5,
                    value: 1.25,
                },
                Point {
                    series: 1,
                    time_unix_ms: 5,
                    value: 99.0,
                },
            ],
        });
        let key = BatchKey {
            agent: "agt_1".into(),
            epoch: 1,
            seq: 1,
        };
        s.accept(key, origin, batch, false).await.unwrap();
        s.stored(2);
        s.duplicate();
        s.reject(Rejection::SeriesOutOfRange);
        let page = s.render();
        for line in [
            "uplink_backend_metric_batches_total 1\n",
            "uplink_backend_metric_samples_total 2\n",
            "uplink_backend_metric_batches_duplicate_total 1\n",
            "uplink_backend_metric_series 2\n",
            "uplink_backend_metric_batches_rejected_total{reason=\"series_out_of_range\"} 1\n",
            "uplink_backend_metric_batches_rejected_total{reason=\"bad_seq\"} 0\n",
            "# TYPE load gauge\nload{agent=\"agt_1\",provider=\"p\",hostname=\"h\"} 1.25 5\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from:\n{page}");
        }
        assert_eq!(
            page.matches("# TYPE uplink_backend_metric_series ").count(),
            1
        );
        assert!(!page.contains("99"), "{page}");
    }
}
