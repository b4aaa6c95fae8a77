//! The flags of `uplink backend`, and the backend's settings they make.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use clap::Args;

use crate::backend::defaults::{
    DEFAULT_DATA_DIR, DEFAULT_EPOCHS_KEPT, DEFAULT_HEARTBEAT, DEFAULT_LISTEN,
    DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_HOLD,
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
    /// Enrollment token of the default provider; generated and printed once when not given.
    #[arg(long, env = "UPLINK_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Heartbeat interval on streams (at most 15s).
    #[arg(long, env = "UPLINK_HEARTBEAT_INTERVAL", default_value_t = HumanDuration(DEFAULT_HEARTBEAT), value_parser = HumanDuration::from_str)]
    pub heartbeat_interval: HumanDuration,
    /// Longest hold of a long-poll (at most 25s).
    #[arg(long, env = "UPLINK_POLL_HOLD", default_value_t = HumanDuration(DEFAULT_POLL_HOLD), value_parser = HumanDuration::from_str)]
    pub poll_hold: HumanDuration,
    /// URL agents use to reach this backend (default https://<first hostname>:<port>).
    #[arg(long, env = "UPLINK_PUBLIC_URL")]
    pub public_url: Option<String>,
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
}

#[cfg(feature = "backend")]
impl BackendArgs {
    /// The address to listen on and the backend's settings, with every
    /// problem at once when they are not valid.
    pub fn into_config(
        self,
    ) -> Result<(std::net::SocketAddr, crate::backend::BackendConfig), super::ConfigError> {
        let a = self;
        let mut cfg = crate::backend::BackendConfig::new(a.data_dir);
        if !a.hostnames.is_empty() {
            cfg.hostnames = a.hostnames;
        }
        cfg.tls_cert = a.tls_cert;
        cfg.tls_key = a.tls_key;
        cfg.admin_token = a.admin_token.map(crate::secret::Secret::new);
        cfg.enroll_token = a.enroll_token.map(crate::secret::Secret::new);
        cfg.heartbeat = a.heartbeat_interval.into();
        cfg.poll_hold = a.poll_hold.into();
        cfg.public_url = a.public_url;
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
        let mut problems = cfg.validate();
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
