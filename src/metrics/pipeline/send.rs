//! The sender: spooled batches, oldest first, pushed with a window of
//! batches in flight; each leaves the spool when the backend answered it
//! stored, duplicate or rejected (an ack the spool cannot write yet, on a
//! full disk, is written again later). A failure keeps everything
//! unacknowledged spooled and sends it again, from the oldest, after a
//! backoff. Backlog (batches spooled more than [`REPLAY_AGE`] before they
//! are sent) is paced by a token bucket. Each answer also says which newer
//! forms of the contract the backend reads ([`Accepts`]), which the
//! batcher and the sender follow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use prost::Message;
use tokio::sync::{Notify, watch};

use super::{
    BATCHES_REJECTED, BATCHES_SENT, BYTES_SENT, Push, PushOutcome, Reads, publish_spool, stopped,
    with_spool,
};
use crate::metrics::compress::Compression;
use crate::metrics::spool::{Position, Record, Spool};
use crate::proto;

/// A spooled batch older than this when it is sent is a replay, sent at
/// most at the replay rate.
const REPLAY_AGE: Duration = Duration::from_secs(10);

/// Largest decompressed batch read back from the spool.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// How often acks that could not be written to the spool (a full disk)
/// are tried again while nothing else is settled.
const ACK_RETRY: Duration = Duration::from_secs(1);

/// The newer forms of the contract the backend said it reads, from its
/// last response. Both start off: a backend written before
/// they existed never sets them.
#[derive(Debug, Default)]
pub(super) struct Accepts {
    /// `MetricBatch.sample_series_deltas`.
    pub(super) series_deltas: AtomicBool,
    /// `PushMetricsRequest.batch_zstd`.
    pub(super) batch_zstd: AtomicBool,
}

impl Accepts {
    /// Takes what a response says; logs each change.
    fn update(&self, r: &Reads) {
        let on = r.series_deltas;
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
        let on = r.batch_zstd;
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

/// A token bucket over samples per second.
struct Rate {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(per_second: u64) -> Self {
        Rate::starting(per_second, Instant::now())
    }

    /// A full second's worth of samples at `at`.
    fn starting(per_second: u64, at: Instant) -> Self {
        Rate {
            per_second: per_second as f64,
            tokens: per_second as f64,
            at,
        }
    }

    /// How long to wait before sending `n` samples; takes them.
    fn take(&mut self, n: u32) -> Duration {
        self.take_at(n, Instant::now())
    }

    /// [`Rate::take`] at `now`, which is not before the previous call's.
    fn take_at(&mut self, n: u32, now: Instant) -> Duration {
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

/// Delivers spooled batches, oldest first, with up to `window` in flight.
pub(super) async fn send_loop(
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
    // Batches the backend settled whose ack is not yet in the spool: the
    // cursor is past them, so only writing the ack takes them out.
    let mut unrecorded: Vec<(u64, u64)> = Vec::new();
    // Batches spooled before this start, or at or below the furthest one
    // pushed, may have been sent before (`PushMetricsRequest.resent`).
    let started_ms = crate::now_unix_ms();
    let mut pushed_upto: Option<Position> = None;
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
                let resent = r.header.created_unix_ms < started_ms
                    || pushed_upto.is_some_and(|p| r.position <= p);
                pushed_upto = pushed_upto.max(Some(r.position));
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
                        resent,
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
                        Err(e) => PushOutcome::Rejected(format!("spooled batch unreadable: {e}")),
                        Ok(request) => push(request).await,
                    };
                    if let PushOutcome::Stored(reads) | PushOutcome::Duplicate(reads) = &outcome {
                        accepts.update(reads);
                    }
                    (h, bytes, outcome)
                });
            }
        }
        tokio::select! {
            biased;
            _ = stopped(&mut stop), if !*stop.borrow() => {}
            Some((h, bytes, outcome)) = inflight.next(), if !inflight.is_empty() => {
                let settle = match outcome {
                    PushOutcome::Stored(_) | PushOutcome::Duplicate(_) => {
                        metrics::counter!(BATCHES_SENT).increment(1);
                        metrics::counter!(BYTES_SENT).increment(bytes as u64);
                        failures = 0;
                        retry = crate::backoff::Retry::new(crate::backoff::Backoff::default());
                        true
                    }
                    PushOutcome::Rejected(why) => {
                        metrics::counter!(BATCHES_REJECTED).increment(1);
                        tracing::warn!(epoch = h.epoch, seq = h.seq, samples = h.samples, "metric batch rejected, not sent again: {why}");
                        true
                    }
                    PushOutcome::Retry { kind, reason } => {
                        if failures == 0 {
                            tracing::info!(kind, "metrics not delivered, kept in the spool: {reason}");
                        }
                        failing = true;
                        false
                    }
                };
                if settle {
                    if !unrecorded.contains(&(h.epoch, h.seq)) {
                        unrecorded.push((h.epoch, h.seq));
                    }
                    record_acks(&spool, &mut unrecorded).await;
                }
                if failing && inflight.is_empty() {
                    // Shutting down: what was in flight was the one flush;
                    // the rest stays spooled for the next start.
                    if *stopping.borrow() {
                        stop_sending(&spool).await;
                        return;
                    }
                    // Everything unacknowledged goes again, from the oldest.
                    failures += 1;
                    let pause = retry.next_delay();
                    let mut stopping = stopping.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopped(&mut stopping) => {
                            stop_sending(&spool).await;
                            return;
                        }
                    }
                    cursor = None;
                    failing = false;
                }
            }
            _ = spooled.notified(), if inflight.len() < window && !failing => {}
            _ = tokio::time::sleep(ACK_RETRY), if !unrecorded.is_empty() => {
                record_acks(&spool, &mut unrecorded).await;
            }
        }
        if *stop.borrow() && inflight.is_empty() {
            // Keep delivering until the shutdown deadline aborts this task.
            if with_spool(&spool, |s| s.stats().records).await == 0 {
                spooled.notified().await;
            }
        }
    }
}

/// Writes the acks of settled batches to the spool; keeps those that
/// cannot be written yet (a full disk) for the next try. Logs when acks
/// start failing and when they are all written again.
async fn record_acks(spool: &Arc<Mutex<Spool>>, acks: &mut Vec<(u64, u64)>) {
    let before = acks.len();
    let todo = std::mem::take(acks);
    let (left, error) = with_spool(spool, move |s| {
        let (mut left, mut error) = (Vec::new(), None);
        for (epoch, seq) in todo {
            if let Err(e) = s.ack(epoch, seq) {
                error.get_or_insert(e);
                left.push((epoch, seq));
            }
        }
        publish_spool(s);
        (left, error)
    })
    .await;
    match error {
        // The first failure of a spell: the batch being settled.
        Some(e) if before == 1 => tracing::warn!(
            "cannot record a delivered batch in the spool, tried again every {ACK_RETRY:?}: {e}"
        ),
        Some(_) => {}
        None if before > 1 => tracing::info!(
            batches = before,
            "recorded delivered batches in the spool after all"
        ),
        None => {}
    }
    *acks = left;
}

/// Logs what a shutdown leaves spooled after a failed push.
async fn stop_sending(spool: &Arc<Mutex<Spool>>) {
    let left = with_spool(spool, |s| s.stats().records).await;
    tracing::info!(
        batches = left,
        "metrics not delivered at shutdown: they stay in the spool for the next start"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::spool::{Header, SpoolConfig};
    use std::sync::atomic::AtomicU32;

    /// The send loop over `spool` (a window of 4, no rate limit, a backend
    /// that reads `batch_zstd`) whose every push answers `outcome`; the
    /// count of pushes and the loop.
    fn counting_sender(
        spool: &Arc<Mutex<Spool>>,
        outcome: PushOutcome,
        stop: watch::Receiver<bool>,
    ) -> (Arc<AtomicU32>, impl Future<Output = ()> + Send + 'static) {
        let pushes = Arc::new(AtomicU32::new(0));
        let counted = pushes.clone();
        let push: Push = Arc::new(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            let outcome = outcome.clone();
            Box::pin(async move { outcome })
        });
        let accepts = Arc::new(Accepts::default());
        accepts.batch_zstd.store(true, Ordering::Relaxed);
        let sender = send_loop(
            4,
            1_000_000,
            spool.clone(),
            Arc::new(Notify::new()),
            push,
            accepts,
            stop,
        );
        (pushes, sender)
    }

    /// A backend that fails every push, and the pipeline asked to stop:
    /// each spooled batch is tried at most once, and stays spooled.
    #[tokio::test]
    async fn a_shutdown_while_pushes_fail_flushes_once_and_keeps_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(SpoolConfig::new(dir.path().join("spool"))).unwrap();
        let batches = 20u64;
        for seq in 1..=batches {
            let header = Header {
                epoch: 1,
                seq,
                samples: 1,
                created_unix_ms: crate::now_unix_ms(),
            };
            spool
                .append(header, b"not read: the push fails first")
                .unwrap();
        }
        let spool = Arc::new(Mutex::new(spool));
        let down = PushOutcome::Retry {
            kind: "unavailable",
            reason: "backend down".into(),
        };
        let (_stop, stop_rx) = watch::channel(true);
        let (pushes, sender) = counting_sender(&spool, down, stop_rx);
        // Before the fix the sender retried without a pause until aborted.
        let _ = tokio::time::timeout(Duration::from_secs(3), sender).await;
        let n = pushes.load(Ordering::Relaxed);
        assert!(
            (1..=4).contains(&n),
            "{n} pushes after shutdown began for one window of 4"
        );
        assert_eq!(spool.lock().unwrap().stats().records, batches);
    }

    /// A batch the backend stored whose ack cannot be written to the
    /// spool (a full disk; here its sidecar's path is a directory) is not
    /// left pending: the ack is written once it can be, without waiting
    /// for a failed push to send everything again.
    #[tokio::test]
    async fn an_ack_that_cannot_be_written_is_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(SpoolConfig::new(dir.path().join("spool"))).unwrap();
        let header = Header {
            epoch: 1,
            seq: 1,
            samples: 1,
            created_unix_ms: crate::now_unix_ms(),
        };
        let at = spool.append(header, b"stored at once").unwrap().position;
        let sidecar = dir
            .path()
            .join("spool")
            .join(format!("{:020}.ack", at.segment));
        std::fs::create_dir(&sidecar).unwrap();
        let spool = Arc::new(Mutex::new(spool));
        let (stop, stop_rx) = watch::channel(false);
        let (pushes, sender) =
            counting_sender(&spool, PushOutcome::Stored(Reads::default()), stop_rx);
        let sender = tokio::spawn(sender);
        let records = || spool.lock().unwrap().stats().records;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pushes.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the batch was never pushed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(records(), 1, "the ack could not be written yet");
        std::fs::remove_dir(&sidecar).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while records() > 0 {
            assert!(
                Instant::now() < deadline,
                "the stored batch is still pending 10 s after its ack could be written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pushes.load(Ordering::Relaxed), 1, "stored once, sent once");
        let _ = stop.send(true);
        sender.abort();
    }

    #[test]
    fn the_rate_cap_spreads_sends() {
        // On a clock of its own: the answers are exact, whatever the load.
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut r = Rate::starting(1000, t0);
        assert_eq!(
            r.take_at(1000, t0),
            Duration::ZERO,
            "a second's worth at once"
        );
        assert_eq!(
            r.take_at(500, t0),
            Duration::from_millis(500),
            "then 500 more wait 500 ms"
        );
        assert_eq!(
            r.take_at(0, at(500)),
            Duration::ZERO,
            "paid off after 500 ms"
        );
        assert_eq!(
            r.take_at(250, at(750)),
            Duration::ZERO,
            "250 earned in 250 ms"
        );
        assert_eq!(r.take_at(100, at(750)), Duration::from_millis(100));
        // A long quiet spell earns no more than one second's worth.
        assert_eq!(r.take_at(1000, at(60_000)), Duration::ZERO);
        assert_eq!(r.take_at(250, at(60_000)), Duration::from_millis(250));
    }
}
