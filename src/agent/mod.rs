//! `uplink agent`: enrolls once, then holds a session with the backend on
//! its rung (the gRPC stream or long-polling), accepts commands through the
//! journal (at most once per id, across restarts), executes them, and
//! reports results.

pub mod capacity;
pub mod docker;
pub mod epoch;
pub mod executor;
pub mod identity;
pub mod journal;
pub mod ladder;
pub mod policy;
pub mod push;
mod session;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

use crate::backoff::Backoff;
pub use crate::hostname::default_hostname;
use crate::secret::Secret;
use crate::tls::Trust;

/// Which rung the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportMode {
    /// Start on gRPC, fall to long-polling when HTTP/2 cannot pass, climb
    /// back when it can (the ladder).
    Auto,
    /// The gRPC server stream over HTTP/2.
    Grpc,
    /// HTTPS long-polling (Connect unary over HTTP/1.1).
    Longpoll,
}

impl TransportMode {
    /// The name used in flags and logs.
    pub fn name(self) -> &'static str {
        match self {
            TransportMode::Auto => "auto",
            TransportMode::Grpc => "grpc",
            TransportMode::Longpoll => "longpoll",
        }
    }
}

/// The rung used when none is chosen: the ladder.
pub const DEFAULT_TRANSPORT: TransportMode = TransportMode::Auto;
/// Where identity and journal live unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/uplink";
/// First wait before probing gRPC again from long-poll.
pub const DEFAULT_PROBE_INITIAL: Duration = Duration::from_secs(60);
/// Longest wait between probes of gRPC.
pub const DEFAULT_PROBE_MAX: Duration = Duration::from_secs(15 * 60);
/// Age at which a stream is replaced.
pub const DEFAULT_STREAM_MAX_AGE: Duration = Duration::from_secs(3600);
/// How long the backend may hold a poll.
pub const DEFAULT_POLL_HOLD: Duration = Duration::from_secs(25);
/// HTTP/2 keepalive ping interval on the gRPC rung.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
/// How long an orphaned container is kept before it is removed.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(600);
/// Age at which the agent replaces its credential (`RotateCredential`).
pub const DEFAULT_CREDENTIAL_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Settings of `uplink agent`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The backend, `https://host[:port]`.
    pub backend: Uri,
    /// The provider's enrollment token; needed until the agent enrolled.
    pub token: Option<Secret>,
    /// Which CAs to trust.
    pub trust: Trust,
    /// The rung, or `Auto` for the ladder.
    pub transport: TransportMode,
    /// The proxy to reach the backend through.
    pub proxy: crate::net::ProxySettings,
    /// First wait before probing gRPC again from long-poll.
    pub probe_initial: Duration,
    /// Longest wait between probes.
    pub probe_max: Duration,
    /// A stream older than this is replaced (make before break).
    pub stream_max_age: Duration,
    /// Where identity and journal live.
    pub state_dir: PathBuf,
    /// The name the agent reports.
    pub hostname: String,
    /// How long a poll may be held by the backend.
    pub poll_hold: Duration,
    /// HTTP/2 keepalive ping interval on the gRPC rung.
    pub keepalive: Duration,
    /// How long an HTTP/2 keepalive ping may stay unanswered.
    pub keepalive_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Wait between retries when only the operator can fix the problem
    /// (rejected token, untrusted certificate).
    pub operator_retry: Duration,
    /// Time given to running commands and pending reports on shutdown.
    pub grace: Duration,
    /// Where to serve the self-metrics (Prometheus text at `/metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// What container commands may do on this host.
    pub policy: policy::Policy,
    /// How long an orphaned container (one no successful command accounts
    /// for) is kept before the agent removes it.
    pub orphan_grace: Duration,
    /// Age at which the agent replaces its credential (zero: never).
    pub credential_max_age: Duration,
    /// The metrics pipeline (None: off).
    pub metrics: Option<crate::metrics::pipeline::MetricsConfig>,
    /// Where the host's root file system is mounted when the agent runs in
    /// a container (`--host-root`, e.g. `/host`): host metrics, the
    /// hostname and the capacity are then the host's, not the
    /// container's. None: the agent runs on the host itself.
    pub host_root: Option<PathBuf>,
    /// The container this agent runs in, if any, found at start
    /// ([`crate::own_container::detect`]); the agent never lists, reads,
    /// stops or removes it.
    pub own_container: crate::own_container::OwnContainer,
    /// Ingest listeners on the Docker bridge's gateway, whose address the
    /// agent asks the engine at start; they take the place of
    /// `metrics.ingest`'s addresses.
    pub ingest_on_bridge: BridgeIngest,
}

/// Ports of the load generators' endpoint on the Docker bridge's gateway
/// (`--ingest-graphite docker-bridge:2003`): where containers on the
/// default bridge reach the host, an address that differs between hosts,
/// so the agent asks the engine for it when it starts
/// ([`docker::bridge_gateway`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BridgeIngest {
    /// The Graphite plaintext listener's port.
    pub graphite: Option<u16>,
    /// The InfluxDB line protocol listener's port.
    pub influx: Option<u16>,
}

impl BridgeIngest {
    /// Whether any listener is asked for.
    pub fn any(&self) -> bool {
        self.graphite.is_some() || self.influx.is_some()
    }
}

impl AgentConfig {
    /// Defaults for a backend and state dir.
    pub fn new(backend: Uri, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            backend,
            token: None,
            trust: Trust::default(),
            transport: DEFAULT_TRANSPORT,
            proxy: crate::net::ProxySettings::direct(),
            probe_initial: DEFAULT_PROBE_INITIAL,
            probe_max: DEFAULT_PROBE_MAX,
            stream_max_age: DEFAULT_STREAM_MAX_AGE,
            state_dir: state_dir.into(),
            hostname: default_hostname(),
            poll_hold: DEFAULT_POLL_HOLD,
            keepalive: DEFAULT_KEEPALIVE,
            keepalive_timeout: Duration::from_secs(20),
            backoff: Backoff::default(),
            operator_retry: Duration::from_secs(60),
            grace: Duration::from_secs(5),
            metrics_listen: None,
            policy: policy::Policy::default(),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            credential_max_age: DEFAULT_CREDENTIAL_MAX_AGE,
            metrics: Some(crate::metrics::pipeline::MetricsConfig::default()),
            host_root: None,
            own_container: crate::own_container::detect(),
            ingest_on_bridge: BridgeIngest::default(),
        }
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(m) = &self.metrics {
            errs.extend(m.validate(&self.state_dir));
        }
        if let Some(t) = &self.token
            && (t.is_empty()
                || t.expose().len() > 256
                || t.expose().chars().any(|c| c.is_whitespace()))
        {
            errs.push("--token: must be 1 to 256 characters without spaces".into());
        }
        if !self.credential_max_age.is_zero() && self.credential_max_age < Duration::from_secs(1) {
            errs.push(format!(
                "--credential-max-age {:?} is out of range: at least 1s (0: never rotate)",
                self.credential_max_age
            ));
        }
        if self.poll_hold < Duration::from_secs(1) || self.poll_hold > Duration::from_secs(120) {
            errs.push(format!(
                "--poll-hold {:?} is out of range: 1s to 120s",
                self.poll_hold
            ));
        }
        if self.keepalive < Duration::from_secs(1) || self.keepalive > Duration::from_secs(300) {
            errs.push(format!(
                "--keepalive {:?} is out of range: 1s to 300s",
                self.keepalive
            ));
        }
        if self.probe_initial < Duration::from_secs(1) || self.probe_max < self.probe_initial {
            errs.push(format!(
                "--probe-initial {:?} / --probe-max {:?}: the first must be at least 1s and at most the second",
                self.probe_initial, self.probe_max
            ));
        }
        if self.stream_max_age < Duration::from_secs(5) {
            errs.push(format!(
                "--stream-max-age {:?} is too short: at least 5s",
                self.stream_max_age
            ));
        }
        errs.extend(self.proxy.validate());
        errs.extend(self.policy.validate());
        if let Some(root) = &self.host_root {
            errs.extend(check_host_root(root));
        }
        if self.hostname.is_empty() || self.hostname.len() > 255 {
            errs.push("--hostname: must be 1 to 255 characters".into());
        }
        for f in &self.trust.ca_files {
            if !f.is_file() {
                errs.push(format!(
                    "CA file {} (from --ca-file or SSL_CERT_FILE): no such file",
                    f.display()
                ));
            }
        }
        errs
    }
}

/// What is wrong with `--host-root`: it must be the host's `/` as mounted
/// in the agent's container, submounts included, so its `proc/stat` is the
/// host's.
fn check_host_root(root: &std::path::Path) -> Vec<String> {
    let shown = root.display();
    let mount = "mount the host's root file system there \
                 (docker run -v /:/host:ro,rslave -e UPLINK_HOST_ROOT=/host ...)";
    if !root.is_absolute() {
        vec![format!(
            "--host-root {shown}: give an absolute path, where the host's / is mounted (e.g. /host)"
        )]
    } else if !root.is_dir() {
        vec![format!(
            "--host-root {shown}: no such directory: {mount}, or leave the flag out when the agent runs on the host itself"
        )]
    } else if !root.join("proc/stat").is_file() {
        vec![format!(
            "--host-root {shown}: {shown}/proc is not the host's /proc (no {shown}/proc/stat): \
             mount the host's / there with its submounts, as docker run -v /:/host:ro,rslave does \
             (not with bind-recursive=disabled)"
        )]
    } else {
        Vec::new()
    }
}

/// Failures that stop the agent (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("journal {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(
        "not enrolled yet and no enrollment token: pass --token (or UPLINK_TOKEN) with the provider's token"
    )]
    NoToken,
    #[error("--metrics-listen {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
}

impl AgentError {
    /// True when the operator's settings are at fault (exit status 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AgentError::NoToken
                | AgentError::Tls(_)
                | AgentError::MetricsListen { .. }
                | AgentError::Metrics(_)
        )
    }
}

/// Runs the agent until `shutdown` completes; then stops taking commands,
/// lets running ones and pending reports finish within the grace time.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    session::run(config, shutdown).await
}
