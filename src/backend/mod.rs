//! `uplink backend`: one TLS port (ALPN `h2` and `http/1.1`) serving the
//! agent and admin services as gRPC (requests with `content-type:
//! application/grpc*`) and as Connect unary (everything else), over a
//! durable embedded store. The same port serves `GET /metrics` (Prometheus
//! text, admin token required): the latest value of every ingested series
//! and the backend's own ingest counters. While it runs, it keeps
//! `DATA_DIR/health-backend.json` (`health::StatusFile`) for `uplink
//! health`.

pub mod core;
pub mod defaults;
pub mod edge;
pub mod grpc;
pub mod host_command;
pub mod hub;
pub mod placement;
pub mod ratelimit;
pub mod runs;
pub mod sinks;
pub mod store;
pub mod unary;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codec::CompressionEncoding;
use tower::ServiceExt;

pub use self::core::{Core, CoreConfig, PRUNE_EVERY, RetentionConfig};
pub use self::defaults::*;
use self::store::{PostgresStore, SqliteStore, Store};
use crate::proto::{
    admin_service_server::AdminServiceServer, agent_service_server::AgentServiceServer,
};
use crate::secret::{Kind, Secret};
use crate::tls::{self, ServerIdentity};

/// The name of the provider created at first start.
pub const DEFAULT_PROVIDER: &str = "default";

/// Settings of `uplink backend`.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Where the store, the generated CA and tokens live.
    pub data_dir: PathBuf,
    /// The PostgreSQL database that holds the store instead of SQLite in
    /// `data_dir` (the CA and the status file stay in `data_dir`).
    pub database: Option<store::DatabaseUrl>,
    /// Names in the generated certificate; the first is also used in the
    /// public URL when none is given. Default: this host's name,
    /// `localhost`, `127.0.0.1`.
    pub hostnames: Vec<String>,
    /// Operator-provided certificate chain and key (PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Admin token; generated at first start when absent.
    pub admin_token: Option<Secret>,
    /// The default provider's enrollment token; generated at first start
    /// when absent.
    pub enroll_token: Option<Secret>,
    /// Heartbeat interval on streams.
    pub heartbeat: Duration,
    /// Longest hold of a poll.
    pub poll_hold: Duration,
    /// The URL agents use; default `https://<first hostname>:<port>`.
    pub public_url: Option<String>,
    /// Largest request or response message, on both rungs.
    pub max_message_bytes: usize,
    /// Time given to open connections to finish on shutdown.
    pub grace: Duration,
    /// Most series whose latest value `/metrics` keeps; samples of new
    /// series beyond it are dropped and counted, so memory stays bounded
    /// whatever agents send.
    pub metrics_max_series: usize,
    /// Most bytes of series (names and labels) `/metrics` keeps; new series
    /// beyond it are dropped and counted, like beyond `metrics_max_series`.
    pub metrics_max_bytes: usize,
    /// A series not updated for this long leaves `/metrics` (a stopped
    /// container's series should not be scraped forever).
    pub metrics_series_ttl: Duration,
    /// Write every ingested sample as JSON lines into this directory; off
    /// when None.
    pub metrics_jsonl_dir: Option<PathBuf>,
    /// Size at which a JSON-lines file is closed and the next begun.
    pub metrics_jsonl_max_bytes: u64,
    /// JSON-lines files kept; the oldest are deleted beyond it.
    pub metrics_jsonl_keep: usize,
    /// The metrics interval agents are asked to use (`Reconfigure`); None
    /// leaves it to each agent's flags.
    pub agent_metrics_interval: Option<Duration>,
    /// What the store keeps of finished commands, runs, container events
    /// and old epochs' cursors; pruned every [`PRUNE_EVERY`].
    pub retention: RetentionConfig,
    /// Bounds on connections and on calls before they authenticate.
    pub edge: edge::Limits,
    /// What the printed host command holds (image, CA path, proxy).
    pub host_command: host_command::HostCommand,
}

impl BackendConfig {
    /// Defaults for a data dir.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BackendConfig {
            data_dir: data_dir.into(),
            database: None,
            hostnames: default_hostnames(),
            tls_cert: None,
            tls_key: None,
            admin_token: None,
            enroll_token: None,
            heartbeat: DEFAULT_HEARTBEAT,
            poll_hold: DEFAULT_POLL_HOLD,
            public_url: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            grace: Duration::from_secs(5),
            metrics_max_series: sinks::DEFAULT_MAX_SERIES,
            metrics_max_bytes: sinks::DEFAULT_MAX_BYTES,
            metrics_series_ttl: sinks::DEFAULT_SERIES_TTL,
            metrics_jsonl_dir: None,
            metrics_jsonl_max_bytes: sinks::DEFAULT_JSONL_MAX_BYTES,
            metrics_jsonl_keep: sinks::DEFAULT_JSONL_KEEP,
            agent_metrics_interval: None,
            retention: RetentionConfig::default(),
            edge: edge::Limits::default(),
            host_command: host_command::HostCommand::default(),
        }
    }

    /// The settings of the metric sinks.
    pub fn sinks_config(&self) -> sinks::SinksConfig {
        sinks::SinksConfig {
            max_series: self.metrics_max_series,
            max_bytes: self.metrics_max_bytes,
            series_ttl: self.metrics_series_ttl,
            jsonl: self
                .metrics_jsonl_dir
                .as_ref()
                .map(|dir| sinks::JsonlConfig {
                    dir: dir.clone(),
                    max_bytes: self.metrics_jsonl_max_bytes,
                    keep: self.metrics_jsonl_keep,
                }),
        }
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(i) = self.agent_metrics_interval
            && !(Duration::from_millis(200)..=Duration::from_secs(3600)).contains(&i)
        {
            errs.push(format!(
                "--agent-metrics-interval {i:?} is out of range: 200ms to 1h"
            ));
        }
        let r = &self.retention;
        for (flag, d) in [
            ("--retain-commands", r.commands),
            ("--retain-runs", r.runs),
            ("--retain-container-events", r.container_events),
        ] {
            if d < Duration::from_secs(60) || d > Duration::from_secs(366 * 86_400) {
                errs.push(format!(
                    "{flag} {d:?} is out of range: 1m to 8784h (366 days)"
                ));
            }
        }
        if !(1..=10_000_000).contains(&r.container_events_per_agent) {
            errs.push(format!(
                "--max-container-events-per-agent {} is out of range: 1 to 10000000",
                r.container_events_per_agent
            ));
        }
        if !(1..=1000).contains(&r.epochs_kept) {
            errs.push(format!(
                "--epochs-kept {} is out of range: 1 to 1000",
                r.epochs_kept
            ));
        }
        if self.hostnames.is_empty() {
            errs.push("--hostname: at least one name is needed for the certificate".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            errs.push(
                "--tls-cert and --tls-key go together: give both, or neither to use a generated CA"
                    .into(),
            );
        }
        if self.heartbeat < Duration::from_millis(100) || self.heartbeat > Duration::from_secs(15) {
            errs.push(format!(
                "--heartbeat-interval {:?} is out of range: 100ms to 15s (proxies cut idle lines after 30 s or more)",
                self.heartbeat
            ));
        }
        if self.poll_hold < Duration::from_millis(100) || self.poll_hold > Duration::from_secs(25) {
            errs.push(format!(
                "--poll-hold {:?} is out of range: 100ms to 25s (held calls must end before proxies cut them)",
                self.poll_hold
            ));
        }
        if self.max_message_bytes < 4096 || self.max_message_bytes > 64 * 1024 * 1024 {
            errs.push(format!(
                "--max-message-bytes {} is out of range: 4096 to 67108864",
                self.max_message_bytes
            ));
        }
        if self.metrics_max_series == 0 || self.metrics_max_series > 100_000_000 {
            errs.push(format!(
                "--metrics-max-series {} is out of range: 1 to 100000000",
                self.metrics_max_series
            ));
        }
        if self.metrics_max_bytes < 1 << 20 || self.metrics_max_bytes > 1 << 40 {
            errs.push(format!(
                "--metrics-max-bytes {} is out of range: 1m to 1t",
                self.metrics_max_bytes
            ));
        }
        if self.metrics_series_ttl < Duration::from_secs(1)
            || self.metrics_series_ttl > Duration::from_secs(7 * 86_400)
        {
            errs.push(format!(
                "--metrics-series-ttl {:?} is out of range: 1s to 7 days",
                self.metrics_series_ttl
            ));
        }
        if self.metrics_jsonl_max_bytes < 4096 || self.metrics_jsonl_max_bytes > 1 << 40 {
            errs.push(format!(
                "--metrics-jsonl-max-bytes {} is out of range: 4096 (4k) to 1099511627776 (1t)",
                self.metrics_jsonl_max_bytes
            ));
        }
        if self.metrics_jsonl_keep == 0 || self.metrics_jsonl_keep > 100_000 {
            errs.push(format!(
                "--metrics-jsonl-keep {} is out of range: 1 to 100000",
                self.metrics_jsonl_keep
            ));
        }
        if let Some(dir) = &self.metrics_jsonl_dir
            && dir.as_os_str().is_empty()
        {
            errs.push("--metrics-jsonl-dir is empty: give a directory, or leave it out".into());
        }
        self.edge.validate(&mut errs);
        errs.extend(self.host_command.validate());
        for (name, token) in [
            ("--admin-token", &self.admin_token),
            ("--enroll-token", &self.enroll_token),
        ] {
            if let Some(t) = token
                && (t.expose().len() < 16
                    || t.expose().len() > 256
                    || t.expose()
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control()))
            {
                errs.push(format!(
                    "{name}: must be 16 to 256 characters without spaces"
                ));
            }
        }
        errs
    }
}

/// `GET /metrics`: the latest value of every series and the backend's own
/// ingest metrics, as Prometheus text (format 0.0.4). Needs the admin token
/// (`Authorization: Bearer <admin token>`, Prometheus' `authorization`
/// setting).
async fn metrics_page(
    core: Arc<Core>,
    edge: Arc<edge::Edge>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(s) = core.authenticate_admin(authorization) {
        return edge::metrics_refusal(&s);
    }
    // Rendering walks every series: off the async workers.
    let rendered = tokio::task::spawn_blocking(move || {
        let mut body = core.sinks().render();
        edge.render(&mut body);
        ratelimit::counter_text(
            &mut body,
            "uplink_backend_enrollments_rate_limited_total",
            "Enrollments refused because their token enrolled too many agents too fast.",
            core.enrolls.limited(),
        );
        body
    });
    match rendered.await {
        Ok(body) => (
            [(
                http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering /metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

/// This host's name (when it has one), `localhost` and `127.0.0.1`.
pub fn default_hostnames() -> Vec<String> {
    let mut names = Vec::new();
    let host = crate::hostname::default_hostname();
    if host != "unknown" && host != "localhost" {
        names.push(host);
    }
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    names
}

/// Failures that stop the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("store: {0}")]
    Store(#[from] self::store::StoreError),
    /// The JSON-lines directory cannot be written (a configuration error).
    #[error(transparent)]
    MetricsJsonl(#[from] sinks::jsonl::OpenError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
}

/// What a starting backend tells its operator.
#[derive(Clone)]
pub struct StartInfo {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The URL agents use.
    pub url: String,
    /// The CA agents must trust, when generated.
    pub ca_file: Option<PathBuf>,
    /// Where the host command expects agent hosts to keep a copy of the
    /// CA, when it mounts one.
    pub agent_ca_file: Option<PathBuf>,
    /// The admin token when it was generated now (shown once).
    pub new_admin_token: Option<Secret>,
    /// The default provider's enrollment token when it was generated now or
    /// given on the command line.
    pub enroll_token: Option<Secret>,
    /// The command that runs an agent (with the token when known). It may
    /// hold a proxy's password: printed on stdout, never logged.
    pub host_command: String,
}

/// Without the host command, which holds the enrollment token and maybe a
/// proxy's password (the tokens are `Secret`s, redacted).
impl std::fmt::Debug for StartInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartInfo")
            .field("addr", &self.addr)
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("agent_ca_file", &self.agent_ca_file)
            .field("new_admin_token", &self.new_admin_token)
            .field("enroll_token", &self.enroll_token)
            .field("host_command", &"(printed once, not shown)")
            .finish()
    }
}

/// A bound backend, ready to run.
pub struct Server {
    listener: TcpListener,
    core: Arc<Core>,
    tls: Arc<rustls::ServerConfig>,
    draining: watch::Sender<bool>,
    max_message_bytes: usize,
    grace: Duration,
    edge: Arc<edge::Edge>,
    info: StartInfo,
    /// Where the status file goes (the data dir, made absolute).
    data_dir: PathBuf,
}

impl Server {
    /// Opens the store, prepares TLS and tokens, on an already bound
    /// listener (tests bind `127.0.0.1:0` first).
    pub async fn new(config: BackendConfig, listener: TcpListener) -> Result<Server, BackendError> {
        crate::owner_only::secure(&config.data_dir).map_err(|source| BackendError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let mut config = config;
        // Absolute, so the printed host command and CA path work from anywhere.
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| BackendError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(BackendError::Listen)?;
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => ServerIdentity::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => ServerIdentity::Generated {
                data_dir: config.data_dir.clone(),
                hostnames: config.hostnames.clone(),
            },
        };
        let server_tls = tls::server_config(&identity)?;
        let (before, nofile, hard) = edge::raise_nofile();
        tracing::info!(
            soft_before = before,
            soft = nofile,
            hard,
            "open-file limit (RLIMIT_NOFILE): soft raised to the hard limit"
        );
        let edge = edge::Edge::new(config.edge.clone(), nofile);
        tracing::info!(
            max_preauth_connections = edge.max_preauth(),
            max_connections_per_addr = config.edge.max_connections_per_addr,
            "connection limits before authentication"
        );
        let store: Arc<dyn Store> = match &config.database {
            Some(url) => Arc::new(PostgresStore::connect(url).await?),
            None => Arc::new(SqliteStore::open(&config.data_dir)?),
        };
        // What TLS and the store just created, owner-only too.
        crate::owner_only::secure(&config.data_dir).map_err(|source| BackendError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let sinks = sinks::Sinks::open(config.sinks_config(), crate::now_unix_ms())?;

        // Admin token: the flag wins; otherwise the stored one; otherwise new.
        let mut new_admin_token = None;
        let admin_hash = match &config.admin_token {
            Some(t) => {
                store.set_meta("admin_token_hash", &t.hash()).await?;
                t.hash()
            }
            None => match store.meta("admin_token_hash").await? {
                Some(hash) => hash,
                None => {
                    let t = Secret::generate(Kind::Admin);
                    store.set_meta("admin_token_hash", &t.hash()).await?;
                    let hash = t.hash();
                    new_admin_token = Some(t);
                    hash
                }
            },
        };

        // The default provider and its enrollment token.
        let now = crate::now_unix_ms();
        let enroll_token = match &config.enroll_token {
            Some(t) => {
                if !store
                    .create_provider(DEFAULT_PROVIDER, &t.hash(), now)
                    .await?
                {
                    store
                        .set_provider_token(DEFAULT_PROVIDER, &t.hash())
                        .await?;
                }
                Some(t.clone())
            }
            None => {
                let t = Secret::generate(Kind::Enrollment);
                store
                    .create_provider(DEFAULT_PROVIDER, &t.hash(), now)
                    .await?
                    .then_some(t)
            }
        };

        let url = config.public_url.clone().unwrap_or_else(|| {
            let host = config
                .hostnames
                .first()
                .cloned()
                .unwrap_or_else(|| "localhost".into());
            format!("https://{host}:{}", addr.port())
        });
        let (draining, draining_rx) = watch::channel(false);
        let core = Arc::new(
            Core::with_admin_hash(
                store,
                CoreConfig {
                    heartbeat: config.heartbeat,
                    poll_hold: config.poll_hold,
                    public_url: url.clone(),
                    ca_file: server_tls.ca_file.clone(),
                    host_command: config.host_command.clone(),
                    agent_metrics_interval: config.agent_metrics_interval,
                    max_message_bytes: config.max_message_bytes,
                    retention: config.retention.clone(),
                },
                &admin_hash,
                draining_rx,
            )
            .with_sinks(sinks),
        );
        // The batches an earlier start wrote and left unrecorded, and later
        // those of this start whose record failed: settled beside serving
        // (a read or two each, up to the ledger's bound); meanwhile the
        // ledger keeps them from being written again.
        core.settle_held_batches();
        core.follow_store_changes();
        core.publish_presence();
        let host_command = core.host_command(enroll_token.as_ref().map(|t| t.expose()));
        let agent_ca_file = config
            .host_command
            .ca_on_hosts(server_tls.ca_file.is_some())
            .map(PathBuf::from);
        Ok(Server {
            listener,
            core,
            tls: server_tls.config,
            draining,
            max_message_bytes: config.max_message_bytes,
            grace: config.grace,
            edge,
            info: StartInfo {
                addr,
                url,
                ca_file: server_tls.ca_file,
                agent_ca_file,
                new_admin_token,
                enroll_token,
                host_command,
            },
            data_dir: config.data_dir.clone(),
        })
    }

    /// What the operator should be told.
    pub fn info(&self) -> &StartInfo {
        &self.info
    }

    /// The backend's core, for in-process use (demo, benchmarks).
    pub fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// Serves until `shutdown` completes, then drains: streams get a
    /// `Rotate`, held polls answer, connections close within the grace time.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BackendError> {
        let limit = self.max_message_bytes;
        let core = self.core.clone();
        let grpc = tonic::service::Routes::new(
            AgentServiceServer::new(grpc::Agents(core.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd),
        )
        .add_service(
            AdminServiceServer::new(grpc::Admin(core.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .prepare()
        .into_axum_router();
        let metrics_core = core.clone();
        let metrics_edge = self.edge.clone();
        let connect = unary::router(core.clone(), limit).route(
            "/metrics",
            axum::routing::get(move |headers: http::HeaderMap| {
                metrics_page(metrics_core.clone(), metrics_edge.clone(), headers)
            }),
        );
        let limits = self.edge.limits().clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.first_request_timeout)
            // A connection's read buffer (headers, body bytes not yet
            // consumed) stays small: hyper's default grows to ~400 KiB.
            .max_buf_size(edge::HTTP1_MAX_BUF_BYTES)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_concurrent_streams(limits.max_streams_per_connection);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tracing::info!(addr = %self.info.addr, url = %self.info.url, "backend listening");
        let status = crate::health::StatusFile::backend(&self.data_dir, self.info.addr);
        let pruner = core.clone();
        tokio::spawn(async move { pruner.prune_every(PRUNE_EVERY).await });
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(conn) = self.edge.admit(peer.ip()) else {
                tracing::debug!(%peer, "connection refused: its address holds too many unauthenticated connections");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let (grpc, connect, core) = (grpc.clone(), connect.clone(), core.clone());
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let svc = {
                    let conn = conn.clone();
                    hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let (grpc, connect, core, conn) =
                            (grpc.clone(), connect.clone(), core.clone(), conn.clone());
                        async move {
                            let done = edge::track(&conn, req.uri().path());
                            let req = req.map(axum::body::Body::new);
                            let resp = match edge::gate(&core, &conn, req, limit).await {
                                Err(refused) => refused,
                                Ok(req) => {
                                    let is_grpc = req
                                        .headers()
                                        .get(http::header::CONTENT_TYPE)
                                        .map(|v| v.as_bytes().starts_with(b"application/grpc"))
                                        .unwrap_or(false);
                                    let router = if is_grpc { grpc } else { connect };
                                    router.oneshot(req).await?
                                }
                            };
                            Ok::<_, std::convert::Infallible>(done(resp))
                        }
                    })
                };
                // The deadlines, and eviction at the pre-auth cap, hold from
                // the TLS handshake on.
                let serve = async {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    };
                    let served = builder
                        .serve_connection(TokioIo::new(tls), svc)
                        .into_owned();
                    if let Err(e) = watcher.watch(served).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                };
                tokio::select! {
                    _ = serve => {},
                    reason = conn.closing() => {
                        tracing::debug!(%peer, reason, "connection closed");
                    }
                }
            });
        }
        tracing::info!("backend draining");
        status.serving(false);
        drop(self.listener);
        let _ = self.draining.send(true);
        if tokio::time::timeout(self.grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "connections still open after the grace time; closing them");
        }
        // Every acknowledged batch is written already; this lets the writer
        // finish what is queued (batches whose callers went away), sync and
        // close its file.
        self.core
            .sinks()
            .close(self.grace.max(Duration::from_secs(5)))
            .await;
        status.close(None).await;
        tracing::info!("backend stopped");
        Ok(())
    }
}
