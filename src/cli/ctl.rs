//! The flags of `uplink ctl` and its subcommands, and the connection they
//! make ([`CtlConfig`]). The defaults of the subcommands' flags are
//! defined here: no other configuration has them.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::ConfigError;
use crate::ctl::CtlConfig;
use crate::secret::Secret;
use crate::units::{ByteSize, HumanDuration};

/// How long `ctl ping` waits for the answer.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How many pings `ctl ping` sends.
pub const DEFAULT_PING_COUNT: u32 = 1;
/// How many containers `ctl run` starts.
pub const DEFAULT_RUN_COUNT: u32 = 1;
/// CPU limit of each container of `ctl run`, in cores.
pub const DEFAULT_RUN_CPUS: f64 = 1.0;
/// Memory limit of each container of `ctl run`.
pub const DEFAULT_RUN_MEMORY: u64 = 512 << 20;
/// How long `ctl run` waits for every container to start.
pub const DEFAULT_RUN_WAIT: Duration = Duration::from_secs(5 * 60);
/// Time each container gets to exit after SIGTERM (`ctl stop`).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ctl stop` waits for every container to be removed.
pub const DEFAULT_STOP_WAIT: Duration = Duration::from_secs(2 * 60);
/// Log lines per container of `ctl logs`.
pub const DEFAULT_LOGS_TAIL: u32 = 100;

/// Parses `NAME=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
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
    /// Read the admin token from this file instead (keeps it out of `ps`).
    #[arg(long, env = "UPLINK_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
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
    /// List agents, or revoke one.
    Agents {
        #[command(subcommand)]
        action: Option<AgentAction>,
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
        #[arg(long, default_value_t = HumanDuration(DEFAULT_PING_TIMEOUT), value_parser = HumanDuration::from_str)]
        timeout: HumanDuration,
        /// How many pings.
        #[arg(long, default_value_t = DEFAULT_PING_COUNT)]
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
        #[arg(long, default_value_t = DEFAULT_RUN_COUNT)]
        count: u32,
        /// Environment of every container, NAME=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// CPU limit of each container, in cores.
        #[arg(long, default_value_t = DEFAULT_RUN_CPUS)]
        cpus: f64,
        /// Memory limit of each container (e.g. 512m, 2g).
        #[arg(long, default_value_t = ByteSize(DEFAULT_RUN_MEMORY), value_parser = ByteSize::from_str)]
        memory: ByteSize,
        /// The run's name; containers are named NAME-0, NAME-1, ...
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for every container to start (0: do not wait).
        #[arg(long, default_value_t = HumanDuration(DEFAULT_RUN_WAIT), value_parser = HumanDuration::from_str)]
        wait: HumanDuration,
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
        #[arg(long, default_value_t = HumanDuration(DEFAULT_STOP_TIMEOUT), value_parser = HumanDuration::from_str)]
        timeout: HumanDuration,
        /// How long to wait for every container to be removed (0: do not
        /// wait).
        #[arg(long, default_value_t = HumanDuration(DEFAULT_STOP_WAIT), value_parser = HumanDuration::from_str)]
        wait: HumanDuration,
    },
    /// Print the last log lines of every container of a run.
    Logs {
        /// The run's id or name.
        run: String,
        /// Lines per container.
        #[arg(long, default_value_t = DEFAULT_LOGS_TAIL)]
        tail: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentAction {
    /// Revoke an agent for good: its connections end now and its
    /// credential is refused from then on (the host enrolls again to come
    /// back).
    Revoke {
        /// The agent's id.
        agent: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProviderAction {
    /// Create a provider; prints its enrollment token and host command.
    Create {
        name: String,
        #[command(flatten)]
        limits: TokenLimits,
    },
    /// Revoke a provider's enrollment token and print a new one.
    Rotate {
        name: String,
        #[command(flatten)]
        limits: TokenLimits,
    },
}

/// The limits of a new enrollment token.
#[derive(Args, Debug, Default)]
pub struct TokenLimits {
    /// How many agents the token may enroll (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub max_agents: u32,
    /// How long the token enrolls agents (e.g. 12h, 30d; default: no
    /// expiry).
    #[arg(long, value_parser = HumanDuration::from_str)]
    pub expires_in: Option<HumanDuration>,
}

impl TokenLimits {
    /// When the token expires, as the contract says it (0: never).
    pub fn expires_unix_ms(&self) -> i64 {
        self.expires_in.map_or(0, |d| {
            crate::now_unix_ms() + Duration::from(d).as_millis().min(i64::MAX as u128 / 2) as i64
        })
    }
}

impl CtlArgs {
    /// The connection to the admin service and the command to run over
    /// it, with every problem at once when the flags are not valid.
    pub fn into_config(self) -> Result<CtlConfig, ConfigError> {
        let a = self;
        let mut problems = Vec::new();
        let backend = super::backend_url(a.backend.as_deref(), &mut problems);
        let admin_token = super::required_token(
            a.admin_token,
            a.admin_token_file,
            "admin-token",
            "UPLINK_ADMIN_TOKEN",
            &mut problems,
        );
        let proxy = crate::net::ProxySettings::from_flags_and_env(a.proxy, a.no_proxy);
        problems.extend(proxy.validate());
        let net = match crate::tls::client_config(&super::trust(a.ca_files)) {
            Ok(t) => Some(crate::net::Net::new(t, proxy)),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        let (Some(backend), Some(net), true) = (backend, net, problems.is_empty()) else {
            return Err(ConfigError::new(problems));
        };
        Ok(CtlConfig {
            backend,
            net,
            admin_token: Secret::new(admin_token.unwrap_or_default()),
            command: a.command,
        })
    }
}
