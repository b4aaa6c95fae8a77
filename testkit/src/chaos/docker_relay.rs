//! A unix-socket relay in front of the Docker engine's socket: agents get
//! `DOCKER_HOST=unix://<path>`, and the test makes the engine unreachable
//! (open connections cut, new ones closed at once) and reachable again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// The engine's socket on this machine.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

type Conns = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// A running relay to the Docker engine.
pub struct DockerRelay {
    /// The socket agents connect to.
    pub path: PathBuf,
    up: Arc<AtomicBool>,
    conns: Conns,
    task: JoinHandle<()>,
}

impl DockerRelay {
    /// Listens on `path` and relays to [`DOCKER_SOCKET`].
    pub fn start(path: &Path) -> DockerRelay {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", path.display()));
        let up = Arc::new(AtomicBool::new(true));
        let conns: Conns = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue; // Dropped: the engine is not there.
                }
                let handle = tokio::spawn(async move {
                    let Ok(mut engine) = UnixStream::connect(DOCKER_SOCKET).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                });
                let mut conns = c.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(handle);
            }
        });
        DockerRelay {
            path: path.to_path_buf(),
            up,
            conns,
            task,
        }
    }

    /// `DOCKER_HOST` for an agent behind this relay.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Makes the engine reachable (`true`) or not (`false`: every open
    /// connection is cut, new ones are closed at once).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for h in self.conns.lock().unwrap().drain(..) {
                h.abort();
            }
        }
    }

    /// Whether the engine is reachable through the relay now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}

impl Drop for DockerRelay {
    fn drop(&mut self) {
        self.task.abort();
        self.set_up(false);
        let _ = std::fs::remove_file(&self.path);
    }
}
