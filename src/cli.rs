//! Command-line flags. The flags of `backend` and `agent`, and the
//! connection flags of `ctl` and `doctor`, have `UPLINK_*` environment
//! fallbacks (and the ecosystem's names where they exist: `HTTPS_PROXY`,
//! `NO_PROXY`, `SSL_CERT_FILE`), so a `docker run -e ...` line configures
//! everything. Bad settings exit with
//! status 64 and one line per problem.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit status for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Parses `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || !(0.0..=366.0 * 86400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Bytes in the units an operator reads (GiB, MiB, KiB, bytes).
pub fn human_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= MIB {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    } else if b >= 1024 {
        format!("{:.0} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} bytes")
    }
}

/// Parses a size: bytes, or a number with k/m/g (powers of 1024, with or
/// without "i"/"b": 512m, 512MiB, 1.5G).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 512m, 2g or 1048576"))?;
    let unit = unit.to_ascii_lowercase();
    let mult = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use k, m, g or t")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || !(1.0..=(1u64 << 52) as f64).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses `NAME=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "uplink",
    version,
    about = "Outbound-only host agent, its backend, and the tools around them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the backend: one TLS port for agents (gRPC and long-poll) and operators.
    Backend(BackendArgs),
    /// Run the agent on this host: connects out to the backend and executes its commands.
    Agent(AgentArgs),
    /// Operate a backend: list agents, ping them, manage providers.
    Ctl(CtlArgs),
    /// Run a backend and two agents (one per rung) on this machine and show commands flowing.
    Demo(DemoArgs),
    /// Walk the path to the backend hop by hop (DNS, proxy, TLS, ALPN, both rungs) and say what works.
    Doctor(DoctorArgs),
    /// Generate synthetic load-test samples (a tiny load generator for trying uplink).
    Loadgen(LoadgenArgs),
}

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Simulated requests per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Send Graphite plaintext samples to HOST:PORT (an agent's ingest endpoint).
    #[arg(long, env = "UPLINK_LOADGEN_GRAPHITE")]
    pub graphite: Option<String>,
    /// Prefix of the metric paths.
    #[arg(long, default_value = "loadgen")]
    pub prefix: String,
}

#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Address to listen on.
    #[arg(long, env = "UPLINK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Where the store, the generated CA and state live.
    #[arg(long, env = "UPLINK_DATA_DIR", default_value = "./uplink-data")]
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
    #[arg(long, env = "UPLINK_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Longest hold of a long-poll (at most 25s).
    #[arg(long, env = "UPLINK_POLL_HOLD", default_value = "25s", value_parser = parse_duration)]
    pub poll_hold: Duration,
    /// URL agents use to reach this backend (default https://<first hostname>:<port>).
    #[arg(long, env = "UPLINK_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Largest message accepted or sent, on both rungs.
    #[arg(long, env = "UPLINK_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Most series whose latest value /metrics keeps (default 1000000); new series beyond are dropped and counted.
    #[arg(long, env = "UPLINK_METRICS_MAX_SERIES")]
    pub metrics_max_series: Option<usize>,
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
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The backend, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND")]
    pub backend: String,
    /// The provider's enrollment token (needed until the agent has enrolled).
    #[arg(long, env = "UPLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA bundle to trust (PEM, repeatable); SSL_CERT_FILE is read too.
    #[arg(long = "ca-file", env = "UPLINK_CA_FILE", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// Rung: auto (gRPC stream, falling back to long-polling when HTTP/2
    /// cannot pass), grpc, or longpoll.
    #[arg(long, env = "UPLINK_TRANSPORT", default_value = "auto")]
    pub transport: String,
    /// HTTP CONNECT proxy (http://[user:pass@]host:port); default HTTPS_PROXY / ALL_PROXY.
    #[arg(long, env = "UPLINK_PROXY", hide_env_values = true)]
    pub proxy: Option<String>,
    /// Hosts, domains, IPs or CIDR ranges reached without the proxy; default NO_PROXY.
    #[arg(long, env = "UPLINK_NO_PROXY")]
    pub no_proxy: Option<String>,
    /// First wait before probing gRPC again while on long-poll (auto mode).
    #[arg(long, env = "UPLINK_PROBE_INITIAL", default_value = "60s", value_parser = parse_duration)]
    pub probe_initial: Duration,
    /// Longest wait between probes of gRPC (auto mode).
    #[arg(long, env = "UPLINK_PROBE_MAX", default_value = "15m", value_parser = parse_duration)]
    pub probe_max: Duration,
    /// Replace a stream older than this (a new one opens before the old closes).
    #[arg(long, env = "UPLINK_STREAM_MAX_AGE", default_value = "1h", value_parser = parse_duration)]
    pub stream_max_age: Duration,
    /// Where identity and journal live.
    #[arg(long, env = "UPLINK_STATE_DIR", default_value = "/var/lib/uplink")]
    pub state_dir: PathBuf,
    /// Name to report (default: this host's name).
    #[arg(long, env = "UPLINK_HOSTNAME")]
    pub hostname: Option<String>,
    /// How long the backend may hold a poll.
    #[arg(long, env = "UPLINK_POLL_HOLD", default_value = "25s", value_parser = parse_duration)]
    pub poll_hold: Duration,
    /// HTTP/2 keepalive ping interval on the gRPC rung.
    #[arg(long, env = "UPLINK_KEEPALIVE", default_value = "10s", value_parser = parse_duration)]
    pub keepalive: Duration,
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
    /// Keep containers that no successful command accounts for this long, then remove them.
    #[arg(long, env = "UPLINK_ORPHAN_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub orphan_grace: Duration,
    /// Turn the metrics pipeline off (no host, container or load-generator samples are sent).
    #[arg(long, env = "UPLINK_NO_METRICS")]
    pub no_metrics: bool,
    /// Scrape host, container and self metrics this often (0: do not scrape; ingest still works).
    #[arg(long, env = "UPLINK_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_interval: Duration,
    /// Flush a metric batch when it holds this many samples.
    #[arg(long, env = "UPLINK_METRICS_BATCH_SAMPLES", default_value_t = crate::metrics::batcher::DEFAULT_MAX_SAMPLES)]
    pub metrics_batch_samples: usize,
    /// Flush a metric batch when its first sample is this old.
    #[arg(long, env = "UPLINK_METRICS_BATCH_AGE", default_value = "30s", value_parser = parse_duration)]
    pub metrics_batch_age: Duration,
    /// Largest on-disk spool of metric batches (in the state dir); the oldest are dropped beyond it.
    #[arg(long, env = "UPLINK_SPOOL_MAX_BYTES", default_value = "256m", value_parser = parse_bytes)]
    pub spool_max_bytes: u64,
    /// Replay a backlog (batches spooled more than 10 s ago) at most this many samples per second.
    #[arg(long, env = "UPLINK_METRICS_REPLAY_RATE", default_value_t = 500_000)]
    pub metrics_replay_rate: u64,
    /// Accept Graphite plaintext from load generators on this address (TCP), e.g. 172.17.0.1:2003.
    #[arg(long, env = "UPLINK_INGEST_GRAPHITE")]
    pub ingest_graphite: Option<std::net::SocketAddr>,
    /// Accept InfluxDB line protocol from load generators on this address (HTTP /write, /api/v2/write).
    #[arg(long, env = "UPLINK_INGEST_INFLUX")]
    pub ingest_influx: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The backend, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND")]
    pub backend: String,
    /// Extra CA bundle to trust (PEM, repeatable); SSL_CERT_FILE is read too.
    #[arg(long = "ca-file", env = "UPLINK_CA_FILE", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// HTTP CONNECT proxy; default HTTPS_PROXY / ALL_PROXY.
    #[arg(long, env = "UPLINK_PROXY", hide_env_values = true)]
    pub proxy: Option<String>,
    /// Reached without the proxy; default NO_PROXY.
    #[arg(long, env = "UPLINK_NO_PROXY")]
    pub no_proxy: Option<String>,
    /// State dir of an enrolled agent: its credential lets doctor open the stream and poll for real.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Rounds of pings to send to each agent.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Keep data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Skip the container part even when a Docker engine is present.
    #[arg(long)]
    pub no_docker: bool,
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The backend, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND", global = true)]
    pub backend: Option<String>,
    /// The admin token.
    #[arg(
        long,
        env = "UPLINK_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Extra CA bundle to trust (PEM); SSL_CERT_FILE is read too.
    #[arg(
        long = "ca-file",
        env = "UPLINK_CA_FILE",
        value_delimiter = ',',
        global = true
    )]
    pub ca_files: Vec<PathBuf>,
    /// HTTP CONNECT proxy; default HTTPS_PROXY / ALL_PROXY.
    #[arg(long, env = "UPLINK_PROXY", hide_env_values = true, global = true)]
    pub proxy: Option<String>,
    /// Reached without the proxy; default NO_PROXY.
    #[arg(long, env = "UPLINK_NO_PROXY", global = true)]
    pub no_proxy: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List agents.
    Agents {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only agents of this provider.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Send a ping through the command path and print its round-trip time.
    Ping {
        /// The agent's id.
        agent: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// How many pings.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// List providers, or create one / rotate its enrollment token.
    Providers {
        #[command(subcommand)]
        action: Option<ProviderAction>,
    },
    /// Start a run: COUNT containers of IMAGE placed evenly across the
    /// provider's connected agents; waits until all started.
    Run {
        /// The provider whose agents run the containers.
        #[arg(long)]
        provider: String,
        /// The image.
        #[arg(long)]
        image: String,
        /// How many containers.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Environment of every container, NAME=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// CPU limit of each container, in cores.
        #[arg(long, default_value_t = 1.0)]
        cpus: f64,
        /// Memory limit of each container (e.g. 512m, 2g).
        #[arg(long, default_value = "512m", value_parser = parse_bytes)]
        memory: u64,
        /// The run's name; containers are named NAME-0, NAME-1, ...
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for every container to start (0: do not wait).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        wait: Duration,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
        /// The command of each container (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List runs.
    Runs {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Only runs of this provider.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Show a run and each of its containers.
    RunStatus {
        /// The run's id or name.
        run: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop and remove every container of a run; waits until all are gone.
    Stop {
        /// The run's id or name.
        run: String,
        /// Time each container gets to exit after SIGTERM before SIGKILL.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// How long to wait for every container to be removed (0: do not
        /// wait).
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Print the last log lines of every container of a run.
    Logs {
        /// The run's id or name.
        run: String,
        /// Lines per container.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProviderAction {
    /// Create a provider; prints its enrollment token and host command.
    Create { name: String },
    /// Revoke a provider's enrollment token and print a new one.
    Rotate { name: String },
}

/// CA files from flags plus `SSL_CERT_FILE`.
pub fn ca_files_with_env(mut files: Vec<PathBuf>) -> Vec<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        let f = PathBuf::from(f);
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(8 << 30), "8.00 GiB");
        assert_eq!(human_bytes(100), "100 bytes");
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        for bad in ["", "x", "5 parsecs", "-1m", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }

    #[test]
    fn run_flags_parse() {
        let cli = Cli::try_parse_from([
            "uplink",
            "ctl",
            "run",
            "--provider",
            "p",
            "--image",
            "i",
            "--count",
            "6",
            "--env",
            "A=1",
            "--memory",
            "64m",
            "--",
            "sleep",
            "60",
        ])
        .unwrap();
        match cli.command {
            Command::Ctl(c) => match c.command {
                CtlCommand::Run {
                    count,
                    env,
                    memory,
                    command,
                    cpus,
                    ..
                } => {
                    assert_eq!((count, memory, cpus), (6, 64 << 20, 1.0));
                    assert_eq!(env, vec![("A".to_string(), "1".to_string())]);
                    assert_eq!(command, vec!["sleep", "60"]);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "uplink",
            "ctl",
            "--backend",
            "https://b",
            "ping",
            "agt_1",
            "--timeout",
            "2s",
        ])
        .unwrap();
        match cli.command {
            Command::Ctl(c) => match c.command {
                CtlCommand::Ping { agent, timeout, .. } => {
                    assert_eq!((agent.as_str(), timeout), ("agt_1", Duration::from_secs(2)))
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}
