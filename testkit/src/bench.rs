//! The in-process backend that the dispatch and ladder benchmarks measure
//! against, and the ping they time: a backend on `127.0.0.1:0` with a
//! generated CA, enrollment and admin tokens and a 2 s grace, run on the
//! caller's runtime until [`BenchBackend::shutdown`]; and the temporary
//! directory a benchmark keeps its state in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uplink::backend::store::DatabaseUrl;
use uplink::backend::{BackendConfig, BackendError, Core, Server};
use uplink::proto::{CommandSpec, EnqueueCommandRequest, Ping, command_spec};
use uplink::secret::{Kind, Secret};

/// The environment variable naming the directory that holds a benchmark's
/// state (default: the system's temporary directory).
pub const DIR_ENV: &str = "UPLINK_BENCH_DIR";

/// A new temporary directory named `prefix`… under `UPLINK_BENCH_DIR`, or
/// the system's temporary directory; removed when dropped.
pub fn bench_dir(prefix: &str) -> tempfile::TempDir {
    let parent = std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .unwrap_or_else(|e| {
            panic!(
                "cannot create a temporary directory in {}: {e}",
                parent.display()
            )
        })
}

/// Resolves once `rx` says stop: the shutdown future a server or an agent
/// is run with.
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The settings of a benchmark's backend with its state in `dir`: a
/// generated CA for `127.0.0.1` and `localhost` (for an ingress in front,
/// which verifies it by name), generated admin and enrollment tokens, a
/// 2 s grace, defaults otherwise; its store on `database` when given.
pub fn backend_config(dir: &Path, database: Option<&str>) -> BackendConfig {
    let mut cfg = BackendConfig::new(dir);
    cfg.hostnames = vec!["127.0.0.1".into(), "localhost".into()];
    cfg.admin_token = Some(Secret::generate(Kind::Admin));
    cfg.enroll_token = Some(Secret::generate(Kind::Enrollment));
    cfg.grace = Duration::from_secs(2);
    cfg.database =
        database.map(|url| DatabaseUrl::parse(url, "--database").expect("a database URL"));
    cfg
}

/// A backend running in this process, with default heartbeat and poll
/// hold.
pub struct BenchBackend {
    /// Its core, for enqueueing and reading state without a client.
    pub core: Arc<Core>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The URL agents use.
    pub url: String,
    /// The generated CA agents must trust.
    pub ca: PathBuf,
    /// The default provider's enrollment token.
    pub enroll_token: Secret,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), BackendError>>,
}

impl BenchBackend {
    /// Starts a backend with its state in `dir`.
    pub async fn start(dir: &Path) -> BenchBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind 127.0.0.1:0");
        let cfg = backend_config(dir, None);
        let enroll_token = cfg.enroll_token.clone().expect("an enrollment token");
        let server = Server::new(cfg, listener)
            .await
            .expect("backend does not start");
        let info = server.info().clone();
        let core = server.core();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(server.run(stopped(rx)));
        BenchBackend {
            core,
            addr: info.addr,
            url: info.url,
            ca: info.ca_file.expect("the backend generated no CA file"),
            enroll_token,
            stop,
            task,
        }
    }

    /// Queues a ping for `agent`; returns its id and seq.
    pub async fn enqueue_ping(&self, agent: &str) -> (String, u64) {
        let c = self
            .core
            .enqueue(EnqueueCommandRequest {
                agent_id: agent.to_string(),
                spec: Some(CommandSpec {
                    kind: Some(command_spec::Kind::Ping(Ping::default())),
                }),
                request_id: String::new(),
            })
            .await
            .expect("enqueue failed")
            .command
            .expect("enqueue returned no command");
        (c.id, c.seq)
    }

    /// Stops the backend and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("backend task panicked")
            .expect("backend failed");
    }
}
