//! The batcher task: samples from the sources into a [`Batcher`]; each
//! flushed batch is encoded, compressed with zstd and appended to the spool
//! under its `(epoch, seq)`. The epoch is renewed when the spool drops its
//! oldest batches, so the backend never waits for a gap.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use tokio::sync::{Notify, mpsc, watch};

use super::send::Accepts;
use super::{
    SAMPLES, SAMPLES_REFUSED, SPOOL_DROPPED_BATCHES, SPOOL_DROPPED_SAMPLES, publish_spool, stopped,
    with_spool,
};
use crate::metrics::batcher::{Batcher, BatcherConfig};
use crate::metrics::compress::Compression;
use crate::metrics::sample::Sample;
use crate::metrics::spool::{Header, Spool};

/// Batches samples; appends each flushed batch to the spool.
pub(super) async fn batch_loop(
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
