//! The flags of `uplink backend`, and the backend's settings they make.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use clap::Args;

use crate::backend::defaults::{
    DEFAULT_AUTH_FAILURE_BURST, DEFAULT_AUTH_FAILURE_REFILL, DEFAULT_BODY_TIMEOUT,
    DEFAULT_DATA_DIR, DEFAULT_EPOCHS_KEPT, DEFAULT_FIRST_REQUEST_TIMEOUT, DEFAULT_HEARTBEAT,
    DEFAULT_HOST_COMMAND_IMAGE, DEFAULT_IDLE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS_PER_ADDR, DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT,
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_STREAMS_PER_CONNECTION, DEFAULT_POLL_HOLD,
    DEFAULT_RETAIN_COMMANDS, DEFAULT_RETAIN_CONTAINER_EVENTS, DEFAULT_RETAIN_RUNS,
};
use crate::units::{HumanDuration, parse_bytes, parse_duration};

#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Address to listen on.
    #[arg(long, env = "UPLINK_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Where the store, the generated CA and state live.
    #[arg(long, env = "UPLINK_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Keep the store in this PostgreSQL database, postgres://USER:PASSWORD@HOST:PORT/DATABASE, instead of SQLite in --data-dir (never logged; prefer the env var, which `ps` does not show).
    #[arg(long, env = "UPLINK_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Names for the generated certificate (repeatable). Default: localhost, 127.0.0.1.
    #[arg(long = "hostname", env = "UPLINK_HOSTNAMES", value_delimiter = ',')]
    pub hostnames: Vec<String>,
    /// Certificate chain (PEM) to serve instead of a generated one.
    #[arg(long, env = "UPLINK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "UPLINK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Admin token for operators; generated and printed once when not given.
    #[arg(long, env = "UPLINK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read the admin token from this file instead (keeps it out of `ps`).
    #[arg(long, env = "UPLINK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Enrollment token of the default provider; generated and printed once when not given.
    #[arg(long, env = "UPLINK_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Read the default provider's enrollment token from this file instead.
    #[arg(long, env = "UPLINK_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// Heartbeat interval on streams (at most 15s).
    #[arg(long, env = "UPLINK_HEARTBEAT_INTERVAL", default_value_t = HumanDuration(DEFAULT_HEARTBEAT), value_parser = HumanDuration::from_str)]
    pub heartbeat_interval: HumanDuration,
    /// Longest hold of a long-poll (at most 25s).
    #[arg(long, env = "UPLINK_POLL_HOLD", default_value_t = HumanDuration(DEFAULT_POLL_HOLD), value_parser = HumanDuration::from_str)]
    pub poll_hold: HumanDuration,
    /// URL agents use to reach this backend (default https://<first hostname>:<port>).
    #[arg(long, env = "UPLINK_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Image the printed host command runs (e.g. your registry's copy of uplink's image).
    #[arg(long, env = "UPLINK_HOST_COMMAND_IMAGE", default_value = DEFAULT_HOST_COMMAND_IMAGE)]
    pub host_command_image: String,
    /// Where agent hosts keep a copy of this backend's CA, mounted by the host command (default /etc/uplink/ca.pem when the backend generated its CA).
    #[arg(long, env = "UPLINK_HOST_COMMAND_CA_FILE")]
    pub host_command_ca_file: Option<PathBuf>,
    /// HTTP CONNECT proxy agents go through, printed in the host command as HTTPS_PROXY (never logged).
    #[arg(long, env = "UPLINK_HOST_COMMAND_PROXY", hide_env_values = true)]
    pub host_command_proxy: Option<String>,
    /// Hosts, domains, IPs or CIDR ranges agents reach without that proxy, printed as NO_PROXY.
    #[arg(long, env = "UPLINK_HOST_COMMAND_NO_PROXY")]
    pub host_command_no_proxy: Option<String>,
    /// Largest message accepted or sent, on both rungs.
    #[arg(long, env = "UPLINK_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Most series whose latest value /metrics keeps (default 1000000); new series beyond are dropped and counted.
    #[arg(long, env = "UPLINK_METRICS_MAX_SERIES")]
    pub metrics_max_series: Option<usize>,
    /// Most bytes of series names and labels /metrics keeps (default 256m); new series beyond are dropped and counted.
    #[arg(long, env = "UPLINK_METRICS_MAX_BYTES", value_parser = parse_bytes)]
    pub metrics_max_bytes: Option<u64>,
    /// Series not updated for this long leave /metrics (default 15m).
    #[arg(long, env = "UPLINK_METRICS_SERIES_TTL", value_parser = parse_duration)]
    pub metrics_series_ttl: Option<Duration>,
    /// Also write every ingested sample as JSON lines into this directory (default: off).
    #[arg(long, env = "UPLINK_METRICS_JSONL_DIR")]
    pub metrics_jsonl_dir: Option<PathBuf>,
    /// Start a new JSON-lines file at this size (default 64m).
    #[arg(long, env = "UPLINK_METRICS_JSONL_MAX_BYTES", value_parser = parse_bytes)]
    pub metrics_jsonl_max_bytes: Option<u64>,
    /// JSON-lines files kept; older ones are deleted (default 20).
    #[arg(long, env = "UPLINK_METRICS_JSONL_KEEP")]
    pub metrics_jsonl_keep: Option<usize>,
    /// Ask every agent to scrape its metrics at this interval (sent as Reconfigure); default: each agent's own.
    #[arg(long, env = "UPLINK_AGENT_METRICS_INTERVAL", value_parser = parse_duration)]
    pub agent_metrics_interval: Option<Duration>,
    /// Keep finished commands (and their results) this long after they finished.
    #[arg(long, env = "UPLINK_RETAIN_COMMANDS", default_value_t = HumanDuration(DEFAULT_RETAIN_COMMANDS), value_parser = HumanDuration::from_str)]
    pub retain_commands: HumanDuration,
    /// Keep runs whose containers are all gone from their hosts this long after they were created.
    #[arg(long, env = "UPLINK_RETAIN_RUNS", default_value_t = HumanDuration(DEFAULT_RETAIN_RUNS), value_parser = HumanDuration::from_str)]
    pub retain_runs: HumanDuration,
    /// Keep container events this long.
    #[arg(long, env = "UPLINK_RETAIN_CONTAINER_EVENTS", default_value_t = HumanDuration(DEFAULT_RETAIN_CONTAINER_EVENTS), value_parser = HumanDuration::from_str)]
    pub retain_container_events: HumanDuration,
    /// Keep at most this many container events per agent (the newest).
    #[arg(long, env = "UPLINK_MAX_CONTAINER_EVENTS_PER_AGENT", default_value_t = DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT)]
    pub max_container_events_per_agent: u64,
    /// Keep the dedup cursors of this many epochs (the newest) per agent and stream.
    #[arg(long, env = "UPLINK_EPOCHS_KEPT", default_value_t = DEFAULT_EPOCHS_KEPT)]
    pub epochs_kept: u64,
    /// Connections not yet authenticated, in total (default: half the open-file limit); at the cap a new one replaces the oldest.
    #[arg(long, env = "UPLINK_MAX_PREAUTH_CONNECTIONS")]
    pub max_preauth_connections: Option<usize>,
    /// Connections not yet authenticated per source address; more are closed at accept.
    #[arg(long, env = "UPLINK_MAX_CONNECTIONS_PER_ADDR", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_ADDR)]
    pub max_connections_per_addr: usize,
    /// Time a new connection has for its TLS handshake and its first request.
    #[arg(long, env = "UPLINK_FIRST_REQUEST_TIMEOUT", default_value_t = HumanDuration(DEFAULT_FIRST_REQUEST_TIMEOUT), value_parser = HumanDuration::from_str)]
    pub first_request_timeout: HumanDuration,
    /// A connection with no call in flight for this long is closed.
    #[arg(long, env = "UPLINK_IDLE_TIMEOUT", default_value_t = HumanDuration(DEFAULT_IDLE_TIMEOUT), value_parser = HumanDuration::from_str)]
    pub idle_timeout: HumanDuration,
    /// Time the body of a unary call or an enrollment has to arrive.
    #[arg(long, env = "UPLINK_BODY_TIMEOUT", default_value_t = HumanDuration(DEFAULT_BODY_TIMEOUT), value_parser = HumanDuration::from_str)]
    pub body_timeout: HumanDuration,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, env = "UPLINK_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,
    /// Bytes of unary request bodies held at once over all connections; past it calls get resource_exhausted (default 256m).
    #[arg(long, env = "UPLINK_MAX_BUFFERED_BODY_BYTES", value_parser = parse_bytes)]
    pub max_buffered_body_bytes: Option<u64>,
    /// Failed authentications one source address may make in a burst.
    #[arg(long, env = "UPLINK_AUTH_FAILURE_BURST", default_value_t = DEFAULT_AUTH_FAILURE_BURST)]
    pub auth_failure_burst: u32,
    /// After the burst, one more failed authentication per this time.
    #[arg(long, env = "UPLINK_AUTH_FAILURE_REFILL", default_value_t = HumanDuration(DEFAULT_AUTH_FAILURE_REFILL), value_parser = HumanDuration::from_str)]
    pub auth_failure_refill: HumanDuration,
}

#[cfg(feature = "backend")]
impl BackendArgs {
    /// The address to listen on and the backend's settings, with every
    /// problem at once when they are not valid.
    pub fn into_config(
        self,
    ) -> Result<(std::net::SocketAddr, crate::backend::BackendConfig), super::ConfigError> {
        let a = self;
        let mut token_problems = Vec::new();
        let admin_token = super::token_from(
            a.admin_token,
            a.admin_token_file,
            "admin-token",
            &mut token_problems,
        );
        let enroll_token = super::token_from(
            a.enroll_token,
            a.enroll_token_file,
            "enroll-token",
            &mut token_problems,
        );
        let mut cfg = crate::backend::BackendConfig::new(a.data_dir);
        let mut database_problems = Vec::new();
        if let Some(url) = &a.database {
            match crate::backend::store::DatabaseUrl::parse(url, "--database (UPLINK_DATABASE)") {
                Ok(url) => cfg.database = Some(url),
                Err(problem) => database_problems.push(problem),
            }
        }
        if !a.hostnames.is_empty() {
            cfg.hostnames = a.hostnames;
        }
        cfg.tls_cert = a.tls_cert;
        cfg.tls_key = a.tls_key;
        cfg.admin_token = admin_token.map(crate::secret::Secret::new);
        cfg.enroll_token = enroll_token.map(crate::secret::Secret::new);
        cfg.heartbeat = a.heartbeat_interval.into();
        cfg.poll_hold = a.poll_hold.into();
        cfg.public_url = a.public_url;
        cfg.host_command = crate::backend::host_command::HostCommand {
            image: a.host_command_image,
            ca_file: a.host_command_ca_file,
            proxy: a.host_command_proxy.map(crate::secret::Secret::new),
            no_proxy: a.host_command_no_proxy,
        };
        cfg.max_message_bytes = a.max_message_bytes;
        if let Some(n) = a.metrics_max_series {
            cfg.metrics_max_series = n;
        }
        if let Some(n) = a.metrics_max_bytes {
            cfg.metrics_max_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(ttl) = a.metrics_series_ttl {
            cfg.metrics_series_ttl = ttl;
        }
        cfg.metrics_jsonl_dir = a.metrics_jsonl_dir;
        if let Some(n) = a.metrics_jsonl_max_bytes {
            cfg.metrics_jsonl_max_bytes = n;
        }
        if let Some(n) = a.metrics_jsonl_keep {
            cfg.metrics_jsonl_keep = n;
        }
        cfg.agent_metrics_interval = a.agent_metrics_interval;
        cfg.retention = crate::backend::RetentionConfig {
            commands: a.retain_commands.into(),
            runs: a.retain_runs.into(),
            container_events: a.retain_container_events.into(),
            container_events_per_agent: a.max_container_events_per_agent,
            epochs_kept: a.epochs_kept,
        };
        cfg.edge = crate::backend::edge::Limits {
            max_preauth_connections: a.max_preauth_connections,
            max_connections_per_addr: a.max_connections_per_addr,
            first_request_timeout: a.first_request_timeout.into(),
            idle_timeout: a.idle_timeout.into(),
            body_timeout: a.body_timeout.into(),
            max_streams_per_connection: a.max_streams_per_connection,
            max_buffered_body_bytes: a.max_buffered_body_bytes.map_or(
                crate::backend::defaults::DEFAULT_MAX_BUFFERED_BODY_BYTES,
                |n| usize::try_from(n).unwrap_or(usize::MAX),
            ),
            auth_failure_burst: a.auth_failure_burst,
            auth_failure_refill: a.auth_failure_refill.into(),
        };
        let mut problems = cfg.validate();
        problems.extend(token_problems);
        problems.extend(database_problems);
        let addr: Option<std::net::SocketAddr> = match a.listen.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "--listen {:?} is not an address like 0.0.0.0:8443",
                    a.listen
                ));
                None
            }
        };
        if let Some(u) = &cfg.public_url
            && let Err(e) = crate::client::parse_backend_url(u)
        {
            problems.push(format!("--public-url: {e}"));
        }
        match addr {
            Some(addr) if problems.is_empty() => Ok((addr, cfg)),
            _ => Err(super::ConfigError::new(problems)),
        }
    }
}
