//! [`StatusFile`]: the status file a running agent or backend keeps, and
//! the one task that writes it.
//!
//! The owner changes the status through the handle (a short critical
//! section under a sync mutex); a change worth telling at once wakes the
//! task, and the task writes at least every [`TICK`] anyway, so the file's
//! age says whether the process still runs. Each write is one small file
//! replaced by a rename (`owner_only::replace_private`), never synced:
//! the file says what is true now, and a power cut makes it stale, which
//! is the truth too. When the last handle goes (after
//! [`StatusFile::close`], or dropped), the task writes the status once
//! more as stopped and ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::TICK;
use super::status::{self, AgentStatus, BackendStatus, Role, Status};

/// Least time between two writes woken by changes (a burst of changes is
/// one write).
const MIN_GAP: Duration = Duration::from_millis(200);
/// How long [`StatusFile::close`] waits for the last write.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the task and the handles share.
struct Shared {
    path: PathBuf,
    status: Mutex<Status>,
    wake: Notify,
    /// [`TICK`], shorter in tests.
    tick: Duration,
}

/// A handle on the status file kept by this process. Clones are handles
/// on the same file.
#[derive(Clone)]
pub struct StatusFile {
    shared: Arc<Shared>,
    /// Dropped with the last handle: the task then writes `stopped`. It
    /// carries the exit error, when there is one.
    closing: Arc<watch::Sender<Option<String>>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl StatusFile {
    /// Starts keeping `dir/health-<role>.json` for this process, with
    /// `agent` or `backend` as its first content, written at once.
    fn start(
        dir: &Path,
        role: Role,
        agent: Option<AgentStatus>,
        backend: Option<BackendStatus>,
        tick: Duration,
    ) -> StatusFile {
        let now = crate::now_unix_ms();
        let status = Status {
            format: status::FORMAT,
            role,
            pid: std::process::id(),
            pid_namespace: status::pid_namespace(),
            started_unix_ms: now,
            updated_unix_ms: now,
            stopped_unix_ms: None,
            exit_error: String::new(),
            agent,
            backend,
        };
        let shared = Arc::new(Shared {
            path: status::path(dir, role),
            status: Mutex::new(status),
            wake: Notify::new(),
            tick,
        });
        let (closing, closed) = watch::channel(None);
        let task = tokio::spawn(keep(shared.clone(), closed));
        StatusFile {
            shared,
            closing: Arc::new(closing),
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// The agent's status file in its state dir, for `backend`.
    pub fn agent(state_dir: &Path, backend: &str) -> StatusFile {
        let now = crate::now_unix_ms();
        Self::start(
            state_dir,
            Role::Agent,
            Some(AgentStatus::new(backend, now)),
            None,
            TICK,
        )
    }

    /// The backend's status file in its data dir, listening on `listen`.
    pub fn backend(data_dir: &Path, listen: std::net::SocketAddr) -> StatusFile {
        Self::start(
            data_dir,
            Role::Backend,
            None,
            Some(BackendStatus {
                listen,
                serving: true,
            }),
            TICK,
        )
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Changes the status; when `change` returns true the file is written
    /// at once, else at the next tick.
    fn update(&self, change: impl FnOnce(&mut Status) -> bool) {
        let wake = change(&mut self.shared.status.lock().unwrap_or_else(|e| e.into_inner()));
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// The agent is connected on `rung`.
    pub fn connected(&self, rung: &str) {
        let now = crate::now_unix_ms();
        self.update(|s| s.agent.as_mut().is_some_and(|a| a.connected(rung, now)));
    }

    /// The backend answered (a frame, a poll); written at the next tick.
    pub fn contact(&self) {
        let now = crate::now_unix_ms();
        self.update(|s| {
            if let Some(a) = s.agent.as_mut() {
                a.contact(now);
            }
            false
        });
    }

    /// The agent's session on `rung` (empty: enrollment) failed.
    pub fn failed(&self, rung: &str, error: &str) {
        let now = crate::now_unix_ms();
        self.update(|s| s.agent.as_mut().is_some_and(|a| a.failed(rung, error, now)));
    }

    /// The backend accepts connections, or (false) drains.
    pub fn serving(&self, serving: bool) {
        self.update(|s| match s.backend.as_mut() {
            Some(b) if b.serving != serving => {
                b.serving = serving;
                true
            }
            _ => false,
        });
    }

    /// Marks the process stopped (on `error`, when given) and waits, a
    /// little, for that last write. Other handles stay usable but write
    /// nothing more.
    pub async fn close(&self, error: Option<String>) {
        self.closing.send_replace(Some(error.unwrap_or_default()));
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(CLOSE_TIMEOUT, task).await.is_err()
        {
            tracing::warn!(path = %self.shared.path.display(), "the status file's last write did not finish in time");
        }
    }
}

/// The task: writes now, then on every change and every tick, then once
/// more as stopped when closed or when every handle is gone.
async fn keep(shared: Arc<Shared>, mut closing: watch::Receiver<Option<String>>) {
    let mut failing = false;
    loop {
        // Every handle gone is a stop too, without a word on why.
        let orphaned = closing.has_changed().is_err();
        let stop: Option<String> = closing
            .borrow_and_update()
            .clone()
            .or_else(|| orphaned.then(String::new));
        let bytes = {
            let mut s = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let now = crate::now_unix_ms();
            s.updated_unix_ms = now;
            if let Some(error) = &stop {
                s.stopped_unix_ms = Some(now);
                s.exit_error = status::clip(error);
                if let Some(b) = s.backend.as_mut() {
                    b.serving = false;
                }
            }
            serde_json::to_vec(&*s)
        };
        let written = match bytes {
            Ok(bytes) => {
                let path = shared.path.clone();
                tokio::task::spawn_blocking(move || {
                    crate::owner_only::replace_private(&path, &bytes)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        match written {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(path = %shared.path.display(), error = %e,
                    "cannot write the status file; `uplink health` will call this process stale");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!(path = %shared.path.display(), "status file written again");
            }
            _ => {}
        }
        let last = tokio::time::Instant::now();
        if stop.is_some() {
            return;
        }
        tokio::select! {
            biased;
            _ = closing.changed() => {}
            _ = shared.wake.notified() => {
                // A burst of changes is one write.
                tokio::select! {
                    biased;
                    _ = closing.changed() => {}
                    _ = tokio::time::sleep_until(last + MIN_GAP) => {}
                }
            }
            _ = tokio::time::sleep(shared.tick) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::status::read;

    async fn written(
        path: &Path,
        role: Role,
        what: &str,
        cond: impl Fn(&Status) -> bool,
    ) -> Status {
        for _ in 0..500 {
            if let Ok(Some(s)) = read(path, role)
                && cond(&s)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} never written to {}", path.display());
    }

    #[tokio::test]
    async fn the_agent_file_follows_the_connection_and_ends_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::agent(dir.path(), "https://b:8443/");
        let p = f.path().to_path_buf();
        let s = written(&p, Role::Agent, "the first status", |_| true).await;
        assert_eq!(s.pid, std::process::id());
        assert!(!s.agent.as_ref().unwrap().connected);
        f.failed("", "enrollment failed: refused");
        written(&p, Role::Agent, "the failure", |s| {
            s.agent.as_ref().unwrap().last_error == "enrollment failed: refused"
        })
        .await;
        f.connected("grpc");
        let s = written(&p, Role::Agent, "connected", |s| {
            s.agent.as_ref().unwrap().connected
        })
        .await;
        assert_eq!(s.agent.unwrap().rung, "grpc");
        f.clone().close(None).await;
        let s = read(&p, Role::Agent).unwrap().unwrap();
        assert!(
            s.stopped_unix_ms.is_some() && s.exit_error.is_empty(),
            "{s:?}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[tokio::test]
    async fn a_dropped_backend_file_ends_stopped_and_not_serving() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::backend(dir.path(), "127.0.0.1:8443".parse().unwrap());
        let p = f.path().to_path_buf();
        written(&p, Role::Backend, "serving", |s| {
            s.backend.as_ref().unwrap().serving
        })
        .await;
        f.serving(false);
        written(&p, Role::Backend, "draining", |s| {
            !s.backend.as_ref().unwrap().serving && s.stopped_unix_ms.is_none()
        })
        .await;
        drop(f);
        written(&p, Role::Backend, "stopped", |s| {
            s.stopped_unix_ms.is_some()
        })
        .await;
    }

    #[tokio::test]
    async fn an_exit_error_is_kept_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::agent(dir.path(), "https://b/");
        f.close(Some(format!("no token\n{}", "x".repeat(1000))))
            .await;
        let s = read(f.path(), Role::Agent).unwrap().unwrap();
        assert!(s.exit_error.starts_with("no token x"), "{}", s.exit_error);
        assert!(s.exit_error.len() <= status::MAX_ERROR_BYTES);
    }

    #[tokio::test]
    async fn an_idle_file_is_written_every_tick() {
        let dir = tempfile::tempdir().unwrap();
        let f = StatusFile::start(
            dir.path(),
            Role::Agent,
            Some(AgentStatus::new("https://b/", 0)),
            None,
            Duration::from_millis(50),
        );
        let p = f.path().to_path_buf();
        written(&p, Role::Agent, "the first status", |_| true).await;
        // Nothing changes, yet the file comes back within a few ticks.
        std::fs::remove_file(&p).unwrap();
        written(&p, Role::Agent, "the status again", |_| true).await;
        f.close(None).await;
    }
}
