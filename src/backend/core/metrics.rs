//! `PushMetrics`: a batch is decoded (the one validator), deduplicated by
//! `(agent, epoch, seq)` against the store, given to the sinks, and only
//! then recorded and acknowledged.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::limits::REJECTED_BATCHES;
use super::{Core, internal};
use crate::backend::sinks::{Accepted, BatchKey, Origin, Rejection};
use crate::backend::store::{BatchSeq, METRIC_SEQ_WINDOW};
use crate::proto;

/// Longest a `PushMetrics` call waits for its batch to be stored. Storing
/// goes on after that (see [`Core::push_metrics`]); the agent's retry then
/// learns the outcome.
const MAX_PUSH_WAIT: Duration = Duration::from_secs(30);
/// How long a written batch's record is tried again while the store is
/// unavailable (below [`MAX_PUSH_WAIT`]).
const RECORD_RETRY_FOR: Duration = Duration::from_secs(20);
/// How often the batches written here and not known to be recorded are
/// settled (see [`Core::settle_held_batches`]).
const SETTLE_EVERY: Duration = Duration::from_secs(10);
/// Metric batches with more samples are decoded on a blocking thread
/// (about a millisecond of work), not on an async worker.
const DECODE_INLINE_SAMPLES: usize = 20_000;

/// Why a pushed batch cannot be read.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("the request sets both batch and batch_zstd: set one of them")]
    BothForms,
    #[error("batch_zstd is not a zstd frame of a MetricBatch within {limit} bytes: {why}")]
    Zstd { limit: usize, why: String },
    #[error(transparent)]
    Invalid(crate::metrics::encode::DecodeError),
}

impl BatchError {
    fn reason(&self) -> Rejection {
        match self {
            BatchError::BothForms => Rejection::BothBatchForms,
            BatchError::Zstd { .. } => Rejection::BatchZstd,
            BatchError::Invalid(e) => Rejection::of(e),
        }
    }
}

/// Decompresses (at most `limit` bytes) and decodes a `batch_zstd`.
fn decode_batch_zstd(
    zstd: &[u8],
    limit: usize,
) -> Result<crate::metrics::encode::Decoded, BatchError> {
    let bytes = crate::metrics::compress::Compression::Zstd
        .decompress(zstd, limit)
        .map_err(|e| BatchError::Zstd {
            limit,
            why: e.to_string(),
        })?;
    crate::metrics::encode::decode_bytes(&bytes).map_err(BatchError::Invalid)
}

/// What [`Core::settle_written_batch`] found.
enum Settled {
    /// Recorded now, as written here.
    RecordedNow,
    /// Recorded, as written here.
    Recorded,
    /// Recorded by another backend that wrote it too: the lines here are a
    /// copy.
    Copy,
    /// The store cannot say yet (the seq is beyond the epoch's window).
    Open,
}

/// A metric batch's place in `metric_batches_in_flight`, given back on
/// drop (also when the storing task is cancelled or panics).
struct InFlight {
    core: Arc<Core>,
    key: (String, u64, u64),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.core
            .metric_batches_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Core {
    /// Settles, at start and then every [`SETTLE_EVERY`] while any are
    /// left, the batches the JSON lines hold as written and not known to
    /// be recorded: those an earlier start left, and those of this start
    /// whose record failed or whose copy could not be removed then, that
    /// no push is storing now. Runs beside serving until the backend
    /// drains; a store that cannot answer is asked again next time.
    pub fn settle_held_batches(self: &Arc<Self>) {
        let core = self.clone();
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                // A pass over none costs nothing.
                match core.settle_unrecorded_batches(first).await {
                    Ok(()) => first = false,
                    Err(e) => {
                        tracing::warn!(error = %e, ?SETTLE_EVERY, "cannot settle the metric batches written here and not known to be recorded; they stay remembered, are not written again, and are settled later")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE_EVERY) => {}
                    _ = draining.wait_for(|d| *d) => return,
                }
            }
        });
    }

    /// One pass of [`Core::settle_held_batches`]; `first`: the pass at
    /// start, which accounts for what the earlier start left even when
    /// nothing changes.
    async fn settle_unrecorded_batches(
        self: &Arc<Self>,
        first: bool,
    ) -> Result<(), crate::backend::store::StoreError> {
        let keys = self.sinks.unrecorded();
        let (mut recorded, mut recorded_now, total) = (0usize, 0usize, keys.len());
        let mut copies = Vec::new();
        let mut reserved = Vec::new();
        for key in keys {
            // A push storing this batch now settles it itself; meanwhile
            // none starts.
            let Some(guard) = self.reserve_batch((key.agent.clone(), key.epoch, key.seq)) else {
                continue;
            };
            match self.settle_written_batch(&key).await? {
                Settled::RecordedNow => recorded_now += 1,
                Settled::Recorded => recorded += 1,
                Settled::Copy => {
                    copies.push(key);
                    reserved.push(guard);
                }
                Settled::Open => {}
            }
        }
        let (removed, left) = self.remove_copies(&copies).await;
        drop(reserved);
        if first && total > 0 || recorded_now > 0 || !copies.is_empty() {
            tracing::info!(
                recorded,
                unrecorded = total - recorded,
                recorded_now,
                copies_removed = removed,
                copies_left = left,
                "metric batches written by an earlier start, or by this one and not known to be recorded: those not recorded are recorded now, and the lines of those another backend wrote and recorded are removed"
            );
        }
        Ok(())
    }

    /// Reserves `key` in `metric_batches_in_flight`; None when a request
    /// holds it.
    fn reserve_batch(self: &Arc<Self>, key: (String, u64, u64)) -> Option<InFlight> {
        self.metric_batches_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
            .then(|| InFlight {
                core: self.clone(),
                key,
            })
    }

    /// Settles a batch whose lines are written here and that is not known
    /// to be recorded here:
    ///
    /// - Not recorded: recorded now, as written here (with this backend's
    ///   writer id), so that its agent's next try is answered as stored
    ///   wherever it lands.
    /// - Recorded, in a store no other backend writes to: by this
    ///   backend (such a store keeps no writer ids).
    /// - Recorded with this backend's writer id: by an earlier start.
    /// - Recorded with another writer id: a copy (its agent sent it again
    ///   to a backend sharing the store, which wrote and recorded it).
    /// - Recorded without a writer id: by the backend its first push went
    ///   to (a backend writing a resent batch records its writer id). The
    ///   lines here are that backend's when they came from the first push,
    ///   and a copy when they came from a resent one.
    async fn settle_written_batch(
        &self,
        key: &BatchKey,
    ) -> Result<Settled, crate::backend::store::StoreError> {
        let mine = self.sinks.writer();
        let state = self
            .store
            .metric_batch_state(&key.agent, key.epoch, key.seq)
            .await?;
        if state == BatchSeq::New
            && self
                .store
                .record_metric_batch(&key.agent, key.epoch, key.seq, mine)
                .await?
        {
            self.sinks.recorded(key);
            return Ok(Settled::RecordedNow);
        }
        if !matches!(state, BatchSeq::Seen | BatchSeq::New) {
            return Ok(Settled::Open);
        }
        if !self.store.shares_presence() {
            // No other backend writes to this store: it was recorded here.
            self.sinks.recorded(key);
            return Ok(Settled::Recorded);
        }
        let writer = self
            .store
            .metric_batch_writer(&key.agent, key.epoch, key.seq)
            .await?;
        let copy = match writer.as_deref() {
            Some(w) => Some(w) != mine,
            None => self.sinks.was_resent(key),
        };
        if copy {
            return Ok(Settled::Copy);
        }
        self.sinks.recorded(key);
        Ok(Settled::Recorded)
    }

    /// Removes the lines of `copies` from the JSON lines: how many were
    /// removed and how many left (logged, not failed: the batch is stored
    /// either way).
    async fn remove_copies(&self, copies: &[BatchKey]) -> (usize, usize) {
        match self.sinks.remove_copies(copies).await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, copies = copies.len(), "cannot remove the JSON lines of metric batches another backend wrote and recorded; they stay");
                (0, copies.len())
            }
        }
    }

    /// Records a batch whose lines are written. A store that is
    /// unavailable (a database restarting) is asked again for up to
    /// [`RECORD_RETRY_FOR`]: recorded here, the batch is known as stored
    /// to every backend sharing the store, so the agent's retry through
    /// another one is not written there again.
    async fn record_written_batch(
        &self,
        agent: &str,
        epoch: u64,
        seq: u64,
        writer: Option<&str>,
    ) -> Result<bool, crate::backend::store::StoreError> {
        let deadline = tokio::time::Instant::now() + RECORD_RETRY_FOR;
        let mut wait = Duration::from_millis(50);
        loop {
            match self
                .store
                .record_metric_batch(agent, epoch, seq, writer)
                .await
            {
                Err(e @ crate::backend::store::StoreError::Unavailable { .. })
                    if tokio::time::Instant::now() + wait < deadline
                        && !*self.draining.borrow() =>
                {
                    tracing::debug!(%agent, epoch, seq, error = %e, ?wait, "recording a written metric batch again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    /// `PushMetrics`: validates the batch, deduplicates it by `(agent,
    /// epoch, seq)`, and gives it to the sinks.
    ///
    /// Exactly once, in any order: each `(agent, epoch)` has a contiguous
    /// watermark and the set of seqs stored above it (see
    /// [`Store::metric_batch_state`](crate::backend::store::Store::metric_batch_state)), so a lower seq arriving after a
    /// higher one is still stored, and a seq stored before answers
    /// `stored: false` without reaching the sinks again. A seq more than
    /// [`METRIC_SEQ_WINDOW`] above the watermark is refused with
    /// FAILED_PRECONDITION until the missing batches below it arrive.
    ///
    /// Order: the sinks accept the batch, then its seq is recorded, then it
    /// is acknowledged. A batch the sinks took and the store did not record
    /// (a crash between the two, a store error) is remembered by the JSON
    /// lines' ledger, also across a crash: sent again, it is recorded
    /// without being written again. A batch is never acknowledged before
    /// every sink took it.
    ///
    /// Errors: INVALID_ARGUMENT (the batch can never be stored; the message
    /// starts with the reason; its seq counts as used, so the watermark
    /// moves past it), FAILED_PRECONDITION (seq too far ahead),
    /// UNAVAILABLE (a sink is behind or failing, the backend is stopping,
    /// or the same batch is being stored by another request),
    /// RESOURCE_EXHAUSTED (the agent is over its budget of new epochs or
    /// of rejected batches, see `limits.rs`): keep the batch and retry.
    ///
    /// Storing runs in its own task, so a caller that goes away (a timeout,
    /// a cut connection) does not cut it short between the sinks and the
    /// record: the retry then finds the batch stored.
    pub async fn push_metrics(
        self: &Arc<Self>,
        agent: String,
        req: proto::PushMetricsRequest,
    ) -> Result<proto::PushMetricsResponse, Status> {
        self.apply_ack(&agent, req.ack, true).await?;
        let (epoch, seq, resent) = (req.epoch, req.seq, req.resent);
        let store = &self.store;
        self.admit_epoch(&agent, "metrics", epoch, async {
            Ok(store.metric_batches(&agent, epoch).await? != (0, 0))
        })
        .await?;
        let limit = self.cfg.max_message_bytes;
        let decoded = match (req.batch, req.batch_zstd) {
            (Some(_), zstd) if !zstd.is_empty() => Err(BatchError::BothForms),
            (batch, zstd) if zstd.is_empty() => {
                let batch = batch.unwrap_or_default();
                let samples = batch
                    .sample_series
                    .len()
                    .max(batch.sample_series_deltas.len());
                if samples > DECODE_INLINE_SAMPLES {
                    tokio::task::spawn_blocking(move || {
                        crate::metrics::encode::decode(&batch).map_err(BatchError::Invalid)
                    })
                    .await
                    .map_err(|e| {
                        Status::internal(format!("decoding the metric batch failed: {e}"))
                    })?
                } else {
                    crate::metrics::encode::decode(&batch).map_err(BatchError::Invalid)
                }
            }
            (_, zstd) => tokio::task::spawn_blocking(move || decode_batch_zstd(&zstd, limit))
                .await
                .map_err(|e| Status::internal(format!("decoding the metric batch failed: {e}")))?,
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                let reason = e.reason();
                self.sinks.reject(reason);
                tracing::debug!(%agent, epoch, seq, reason = reason.as_str(), error = %e, "metric batch rejected");
                // The agent drops a batch that can never be stored: its seq
                // is used up, so the watermark can pass it. (A retry of it
                // is decoded first, so it still gets this error.)
                if (1..=i64::MAX as u64).contains(&seq) {
                    self.budgets.take(&agent, REJECTED_BATCHES)?;
                }
                if (1..=i64::MAX as u64).contains(&seq)
                    && let Err(e) = self
                        .store
                        .record_metric_batch(&agent, epoch, seq, None)
                        .await
                {
                    tracing::warn!(%agent, epoch, seq, error = %e, "cannot record the seq of a rejected metric batch");
                }
                return Err(Status::invalid_argument(format!(
                    "metric batch rejected ({}): {e}",
                    reason.as_str()
                )));
            }
        };
        if seq == 0 || seq > i64::MAX as u64 {
            self.sinks.reject(Rejection::BadSeq);
            return Err(Status::invalid_argument(format!(
                "metric batch rejected (bad_seq): seq {seq} is out of range; batches are numbered 1, 2, 3, ... within their epoch"
            )));
        }
        let Some(in_flight) = self.reserve_batch((agent.clone(), epoch, seq)) else {
            self.sinks.reject(Rejection::InFlight);
            return Err(Status::unavailable(format!(
                "metric batch (epoch {epoch}, seq {seq}) is being stored by another request; retry to learn whether it was stored"
            )));
        };
        let reject = |reason: Rejection, status: Status| {
            self.sinks.reject(reason);
            status
        };
        match self
            .store
            .metric_batch_state(&agent, epoch, seq)
            .await
            .map_err(|e| reject(Rejection::Store, internal(e)))?
        {
            BatchSeq::Seen => {
                self.sinks.duplicate();
                return Ok(proto::PushMetricsResponse {
                    stored: false,
                    reads_series_deltas: true,
                    reads_batch_zstd: true,
                });
            }
            BatchSeq::TooFarAhead { watermark } => {
                return Err(reject(
                    Rejection::SeqTooFarAhead,
                    Status::failed_precondition(format!(
                        "metric batch rejected (seq_too_far_ahead): seq {seq} of epoch {epoch} is more than {METRIC_SEQ_WINDOW} above {watermark}, \
                         the highest seq up to which every batch of the epoch arrived; send batch {} first and retry this one later, \
                         or number new batches in a new epoch",
                        watermark + 1
                    )),
                ));
            }
            BatchSeq::New => {}
        }
        let rec = self
            .store
            .agent(&agent)
            .await
            .map_err(|e| reject(Rejection::Store, internal(e)))?
            .unwrap_or_default();
        let origin = Arc::new(Origin {
            agent,
            provider: rec.provider,
            hostname: rec.hostname,
        });
        let samples = decoded.points.len();
        let core = self.clone();
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let agent = origin.agent.clone();
            let key = BatchKey {
                agent: agent.clone(),
                epoch,
                seq,
            };
            let accepted = match core
                .sinks
                .accept(key.clone(), origin, Arc::new(decoded), resent)
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    core.sinks.reject(e.reason());
                    return Err(Status::unavailable(e.to_string()));
                }
            };
            // A crash or a store error here leaves the batch written and
            // not recorded: the JSON lines' ledger keeps it from being
            // written again when it is sent again to this backend.
            // A batch sent again is recorded with the writer of the files
            // it went to: a backend that wrote it before and was killed
            // finds its copy at its next start.
            let writer = if resent { core.sinks.writer() } else { None };
            match core.record_written_batch(&agent, epoch, seq, writer).await {
                Ok(true) => core.sinks.recorded(&key),
                Ok(false) => {
                    // Another backend sharing the store wrote and recorded
                    // it meanwhile (its agent sent it there too): the
                    // lines here are a copy.
                    let copy = match accepted {
                        Accepted::Written => true,
                        Accepted::WrittenBefore => {
                            matches!(core.settle_written_batch(&key).await, Ok(Settled::Copy))
                        }
                    };
                    let (removed, left) = if copy {
                        core.remove_copies(std::slice::from_ref(&key)).await
                    } else {
                        (0, 0)
                    };
                    tracing::info!(%agent, epoch, seq, copy, removed, left, "metric batch found recorded when this backend recorded it; lines here that are a copy of another backend's are removed");
                    core.sinks.duplicate();
                    return Ok(false);
                }
                Err(e) => {
                    core.sinks.reject(Rejection::Store);
                    return Err(internal(e));
                }
            }
            core.sinks.stored(samples);
            Ok(true)
        });
        match tokio::time::timeout(MAX_PUSH_WAIT, task).await {
            Ok(Ok(Ok(stored))) => Ok(proto::PushMetricsResponse {
                stored,
                reads_series_deltas: true,
                reads_batch_zstd: true,
            }),
            Ok(Ok(Err(status))) => Err(status),
            Ok(Err(e)) => Err(Status::internal(format!(
                "storing the metric batch failed: {e}"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "metric batch (epoch {epoch}, seq {seq}) not stored within {MAX_PUSH_WAIT:?}; \
                 retry to learn whether it was stored"
            ))),
        }
    }
}
