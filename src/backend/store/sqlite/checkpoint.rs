//! The WAL checkpointer of [`SqliteStore`](super::SqliteStore): a thread
//! with its own connection that keeps checkpoints off the request path.

use rusqlite::Connection;

use crate::backend::store::StoreError;

/// Moves WAL checkpoints off the request path: SQLite would otherwise run
/// one inside whichever commit crosses the threshold, stalling that request
/// (and every other waiting on the store lock) for milliseconds. A thread
/// with its own connection runs a passive checkpoint every
/// [`CHECKPOINT_EVERY`], which never blocks writers.
pub(super) struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Interval of background WAL checkpoints.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Checkpointer {
    pub(super) fn start(path: std::path::PathBuf) -> Result<Self, StoreError> {
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("uplink-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
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
