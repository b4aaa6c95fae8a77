//! The flags of `uplink agent`, and the [`AgentConfig`] they make.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use clap::Args;

use super::ConfigError;
use crate::agent::{self, AgentConfig, TransportMode};
use crate::metrics::pipeline::{self, MetricsConfig};
use crate::metrics::{batcher, spool};
use crate::secret::Secret;
use crate::units::{ByteSize, HumanDuration};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The backend, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND")]
    pub backend: String,
    /// The provider's enrollment token (needed until the agent has enrolled).
    #[arg(long, env = "UPLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the enrollment token from this file instead (keeps it out of `ps`).
    #[arg(long, env = "UPLINK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Extra CA bundle to trust (PEM, repeatable); SSL_CERT_FILE is read too.
    #[arg(long = "ca-file", env = "UPLINK_CA_FILE", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// Rung: auto (gRPC stream, falling back to long-polling when HTTP/2
    /// cannot pass), grpc, or longpoll.
    #[arg(long, env = "UPLINK_TRANSPORT", default_value = agent::DEFAULT_TRANSPORT.name())]
    pub transport: String,
    /// HTTP CONNECT proxy (http://[user:pass@]host:port); default HTTPS_PROXY / ALL_PROXY.
    #[arg(long, env = "UPLINK_PROXY", hide_env_values = true)]
    pub proxy: Option<String>,
    /// Hosts, domains, IPs or CIDR ranges reached without the proxy; default NO_PROXY.
    #[arg(long, env = "UPLINK_NO_PROXY")]
    pub no_proxy: Option<String>,
    /// First wait before probing gRPC again while on long-poll (auto mode).
    #[arg(long, env = "UPLINK_PROBE_INITIAL", default_value_t = HumanDuration(agent::DEFAULT_PROBE_INITIAL), value_parser = HumanDuration::from_str)]
    pub probe_initial: HumanDuration,
    /// Longest wait between probes of gRPC (auto mode).
    #[arg(long, env = "UPLINK_PROBE_MAX", default_value_t = HumanDuration(agent::DEFAULT_PROBE_MAX), value_parser = HumanDuration::from_str)]
    pub probe_max: HumanDuration,
    /// Replace a stream older than this (a new one opens before the old closes).
    #[arg(long, env = "UPLINK_STREAM_MAX_AGE", default_value_t = HumanDuration(agent::DEFAULT_STREAM_MAX_AGE), value_parser = HumanDuration::from_str)]
    pub stream_max_age: HumanDuration,
    /// Where identity and journal live.
    #[arg(long, env = "UPLINK_STATE_DIR", default_value = agent::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Name to report (default: this host's name; with --host-root, the host's /etc/hostname).
    #[arg(long, env = "UPLINK_HOSTNAME")]
    pub hostname: Option<String>,
    /// Where the host's / is mounted when the agent runs in a container (e.g. /host): host metrics, hostname and capacity are then the host's.
    #[arg(long, env = "UPLINK_HOST_ROOT")]
    pub host_root: Option<PathBuf>,
    /// How long the backend may hold a poll.
    #[arg(long, env = "UPLINK_POLL_HOLD", default_value_t = HumanDuration(agent::DEFAULT_POLL_HOLD), value_parser = HumanDuration::from_str)]
    pub poll_hold: HumanDuration,
    /// HTTP/2 keepalive ping interval on the gRPC rung.
    #[arg(long, env = "UPLINK_KEEPALIVE", default_value_t = HumanDuration(agent::DEFAULT_KEEPALIVE), value_parser = HumanDuration::from_str)]
    pub keepalive: HumanDuration,
    /// Serve the agent's own metrics (Prometheus text at /metrics) on this address, e.g. 127.0.0.1:9464.
    #[arg(long, env = "UPLINK_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Local policy for container commands, a JSON file (see README); default: dangerous settings denied, limits required.
    #[arg(long = "policy", env = "UPLINK_POLICY")]
    pub policy_file: Option<PathBuf>,
    /// Image patterns that may run (`*` wildcard; repeatable); replaces the policy's allowed_images.
    #[arg(
        long = "allow-image",
        env = "UPLINK_ALLOW_IMAGES",
        value_delimiter = ','
    )]
    pub allow_images: Vec<String>,
    /// Networks containers may join besides bridge and none (Docker network names; repeatable); added to the policy's allowed_networks.
    #[arg(
        long = "allow-network",
        env = "UPLINK_ALLOW_NETWORKS",
        value_delimiter = ','
    )]
    pub allow_networks: Vec<String>,
    /// Keep containers that no successful command accounts for this long, then remove them.
    #[arg(long, env = "UPLINK_ORPHAN_GRACE", default_value_t = HumanDuration(agent::DEFAULT_ORPHAN_GRACE), value_parser = HumanDuration::from_str)]
    pub orphan_grace: HumanDuration,
    /// Replace the agent's credential when it is this old (0: never); the old one works until the new one is used.
    #[arg(long, env = "UPLINK_CREDENTIAL_MAX_AGE", default_value_t = HumanDuration(agent::DEFAULT_CREDENTIAL_MAX_AGE), value_parser = HumanDuration::from_str)]
    pub credential_max_age: HumanDuration,
    /// Turn the metrics pipeline off (no host, container or load-generator samples are sent).
    #[arg(long, env = "UPLINK_NO_METRICS")]
    pub no_metrics: bool,
    /// Scrape host, container and self metrics this often (0: do not scrape; ingest still works).
    #[arg(long, env = "UPLINK_METRICS_INTERVAL", default_value_t = HumanDuration(pipeline::DEFAULT_INTERVAL), value_parser = HumanDuration::from_str)]
    pub metrics_interval: HumanDuration,
    /// Flush a metric batch when it holds this many samples.
    #[arg(long, env = "UPLINK_METRICS_BATCH_SAMPLES", default_value_t = batcher::DEFAULT_MAX_SAMPLES)]
    pub metrics_batch_samples: usize,
    /// Flush a metric batch when its first sample is this old.
    #[arg(long, env = "UPLINK_METRICS_BATCH_AGE", default_value_t = HumanDuration(batcher::DEFAULT_MAX_AGE), value_parser = HumanDuration::from_str)]
    pub metrics_batch_age: HumanDuration,
    /// Largest on-disk spool of metric batches (in the state dir); the oldest are dropped beyond it.
    #[arg(long, env = "UPLINK_SPOOL_MAX_BYTES", default_value_t = ByteSize(spool::DEFAULT_CAP_BYTES), value_parser = ByteSize::from_str)]
    pub spool_max_bytes: ByteSize,
    /// Replay a backlog (batches spooled more than 10 s ago) at most this many samples per second.
    #[arg(long, env = "UPLINK_METRICS_REPLAY_RATE", default_value_t = pipeline::DEFAULT_REPLAY_RATE)]
    pub metrics_replay_rate: u64,
    /// Accept Graphite plaintext from load generators on this address (TCP), e.g. 172.17.0.1:2003.
    #[arg(long, env = "UPLINK_INGEST_GRAPHITE")]
    pub ingest_graphite: Option<std::net::SocketAddr>,
    /// Accept InfluxDB line protocol from load generators on this address (HTTP /write, /api/v2/write).
    #[arg(long, env = "UPLINK_INGEST_INFLUX")]
    pub ingest_influx: Option<std::net::SocketAddr>,
}

impl AgentArgs {
    /// The agent's settings from these flags (reading the `--policy`
    /// file), with every problem at once when they are not valid.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let a = self;
        let mut problems = Vec::new();
        let backend = match crate::client::parse_backend_url(&a.backend) {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(format!("--backend: {e}"));
                None
            }
        };
        let token = super::token_from(a.token, a.token_file, "token", &mut problems);
        let transport = match a.transport.as_str() {
            "auto" => TransportMode::Auto,
            "grpc" => TransportMode::Grpc,
            "longpoll" => TransportMode::Longpoll,
            other => {
                problems.push(format!("--transport {other:?}: use auto, grpc or longpoll"));
                TransportMode::Auto
            }
        };
        let Some(backend) = backend else {
            return Err(ConfigError::new(problems));
        };
        let mut cfg = AgentConfig::new(backend, a.state_dir);
        cfg.token = token.map(Secret::new);
        cfg.trust = super::trust(a.ca_files);
        cfg.transport = transport;
        cfg.proxy = crate::net::ProxySettings::from_flags_and_env(a.proxy, a.no_proxy);
        cfg.probe_initial = a.probe_initial.into();
        cfg.metrics_listen = a.metrics_listen;
        cfg.orphan_grace = a.orphan_grace.into();
        cfg.credential_max_age = a.credential_max_age.into();
        cfg.metrics = (!a.no_metrics).then(|| {
            let interval = Duration::from(a.metrics_interval);
            let mut m = MetricsConfig {
                interval: (!interval.is_zero()).then_some(interval),
                spool_max_bytes: a.spool_max_bytes.into(),
                replay_rate: a.metrics_replay_rate,
                ..Default::default()
            };
            m.batcher.max_samples = a.metrics_batch_samples;
            m.batcher.max_age = a.metrics_batch_age.into();
            m.ingest.graphite = a.ingest_graphite;
            m.ingest.influx = a.ingest_influx;
            m.host.root = a.host_root.clone();
            m
        });
        if let Some(path) = &a.policy_file {
            match std::fs::read_to_string(path) {
                Ok(text) => match serde_json::from_str::<agent::policy::Policy>(&text) {
                    Ok(p) => cfg.policy = p,
                    Err(e) => problems.push(format!(
                        "--policy {}: not a valid policy: {e}",
                        path.display()
                    )),
                },
                Err(e) => problems.push(format!("--policy {}: {e}", path.display())),
            }
        }
        if !a.allow_images.is_empty() {
            cfg.policy.allowed_images = a.allow_images;
        }
        cfg.policy.allowed_networks.extend(a.allow_networks);
        cfg.probe_max = a.probe_max.into();
        cfg.stream_max_age = a.stream_max_age.into();
        // The flag wins; in a container, the host's configured name.
        match (a.hostname, &a.host_root) {
            (Some(h), _) => cfg.hostname = h,
            (None, Some(root)) => {
                if let Some(h) = crate::hostname::hostname_under(root) {
                    cfg.hostname = h;
                }
            }
            (None, None) => {}
        }
        cfg.host_root = a.host_root;
        cfg.poll_hold = a.poll_hold.into();
        cfg.keepalive = a.keepalive.into();
        cfg.keepalive_timeout = (cfg.keepalive * 2).max(Duration::from_secs(5));
        problems.extend(cfg.validate());
        ConfigError::check(problems)?;
        Ok(cfg)
    }
}
