//! The WAL checkpointer of [`SqliteStore`](super::SqliteStore): a thread
//! with its own connection that keeps checkpoints off the request path.

use rusqlite::Connection;

use crate::backend::store::StoreError;

/// Moves WAL checkpoints off the request path: SQLite would otherwise run
/// one inside whichever commit crosses the threshold, stalling that request
/// (and every other waiting on the store lock) for milliseconds. A thread
/// with its own connection runs a passive checkpoint every
/// [`CHECKPOINT_EVERY`], which never blocks writers, and every
/// [`TRUNCATE_EVERY`] a truncating one, which waits (at most its busy
/// timeout) for the writer of the moment and then empties the WAL file, so
/// a burst of writes does not leave a large WAL behind. Between those,
/// `journal_size_limit` ([`WAL_SIZE_LIMIT`]) cuts the WAL back whenever a
/// writer starts it over.
pub(super) struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Interval of background WAL checkpoints.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Interval of the checkpoints that truncate the WAL file to zero bytes.
pub const TRUNCATE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Size the WAL file is cut back to when a writer starts it over.
pub const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

impl Checkpointer {
    pub(super) fn start(path: std::path::PathBuf) -> Result<Self, StoreError> {
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("uplink-checkpoint".into())
            .spawn(move || {
                let mut last_truncate = std::time::Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(CHECKPOINT_EVERY)
                {
                    let mode = if last_truncate.elapsed() >= TRUNCATE_EVERY {
                        last_truncate = std::time::Instant::now();
                        "PRAGMA wal_checkpoint(TRUNCATE)"
                    } else {
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    };
                    if let Err(e) = conn.query_row(mode, [], |_| Ok(())) {
                        tracing::debug!(error = %e, "background checkpoint failed; retrying later");
                    }
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
