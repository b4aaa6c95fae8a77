//! Command-line flags, and how each subcommand's flags become its
//! configuration: one file per subcommand ([`agent`], [`backend`],
//! [`ctl`], [`doctor`], [`demo`], [`loadgen`], [`health`],
//! [`conformance`]), each args struct with a
//! conversion into the config of the module it drives. A default the
//! config also uses is a `DEFAULT_*` constant beside that config, and the
//! flag's default is taken from it; a default only the flag has is
//! defined beside the flag. Validation stays with the configs (their
//! `validate()`).
//!
//! The flags of `backend`, `agent` and `health`, and the connection flags
//! of `ctl` and `doctor`, have `UPLINK_*` environment fallbacks (and the
//! ecosystem's names where they exist: `HTTPS_PROXY`, `NO_PROXY`,
//! `SSL_CERT_FILE`), so a `docker run -e ...` line configures everything.
//! Bad settings exit with status 64 and one line per problem; so do flags
//! clap cannot parse (an unknown flag, a value that is not a duration).

pub mod agent;
pub mod backend;
pub mod conformance;
pub mod ctl;
pub mod demo;
pub mod doctor;
pub mod health;
pub mod loadgen;

use std::fmt;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use self::agent::AgentArgs;
pub use self::backend::BackendArgs;
pub use self::conformance::ConformanceArgs;
pub use self::ctl::{AgentAction, CtlArgs, CtlCommand, ProviderAction, TokenLimits};
pub use self::demo::DemoArgs;
pub use self::doctor::DoctorArgs;
pub use self::health::HealthArgs;
pub use self::loadgen::LoadgenArgs;

/// Exit status for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Every problem found while turning flags into a configuration, one line
/// each (the binary prints them and exits with [`EXIT_CONFIG`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    /// An error of these problems.
    pub fn new(problems: Vec<String>) -> Self {
        ConfigError { problems }
    }

    /// Ok when `problems` is empty, else the error of them.
    pub fn check(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(problems))
        }
    }
}

impl From<String> for ConfigError {
    fn from(problem: String) -> Self {
        ConfigError::new(vec![problem])
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

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
    /// Say whether the agent or backend running here is healthy, from its status file (exit 0 or 1): a container's HEALTHCHECK.
    Health(HealthArgs),
    /// Check a backend against the contract: one line per case (PASS, FAIL, SKIP), exit 1 when a case failed.
    Conformance(ConformanceArgs),
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

/// A token given as `flag` (a flag or its environment variable) or read
/// from `file` (first line, surrounding whitespace dropped), so it need not
/// appear in `ps`. Both at once, or an unreadable or empty file, is a
/// problem named in `problems`.
/// `--backend` parsed, or the problem with it (also when it is missing).
fn backend_url(flag: Option<&str>, problems: &mut Vec<String>) -> Option<http::Uri> {
    match flag.map(crate::client::parse_backend_url) {
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            problems.push(format!("--backend: {e}"));
            None
        }
        None => {
            problems.push("--backend (or UPLINK_BACKEND) is required".into());
            None
        }
    }
}

/// A token that must be given, from `--NAME`, its environment variable
/// `env`, or `--NAME-file` (see [`token_from`]); a problem when it is
/// missing or empty.
fn required_token(
    flag: Option<String>,
    file: Option<PathBuf>,
    name: &str,
    env: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let missing = problems.len();
    let token = token_from(flag, file, name, problems).filter(|t| !t.is_empty());
    if token.is_none() && problems.len() == missing {
        problems.push(format!("--{name} (or {env}, or --{name}-file) is required"));
    }
    token
}

fn token_from(
    flag: Option<String>,
    file: Option<PathBuf>,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let Some(file) = file else {
        return flag;
    };
    if flag.is_some() {
        problems.push(format!("--{name} and --{name}-file both given: keep one"));
        return flag;
    }
    match std::fs::read_to_string(&file) {
        Ok(text) => match text.lines().next().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => Some(t.to_string()),
            None => {
                problems.push(format!(
                    "--{name}-file {}: the file is empty; write the token on its first line",
                    file.display()
                ));
                None
            }
        },
        Err(e) => {
            problems.push(format!("--{name}-file {}: {e}", file.display()));
            None
        }
    }
}

/// The trust of a client: the CA files given plus `SSL_CERT_FILE`, on top
/// of the system's store.
fn trust(ca_files: Vec<PathBuf>) -> crate::tls::Trust {
    crate::tls::Trust {
        ca_files: ca_files_with_env(ca_files),
        skip_os_store: false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::units::{ByteSize, HumanDuration};

    #[test]
    fn env_pairs_parse() {
        assert_eq!(ctl::parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(ctl::parse_env("=x").is_err());
        assert!(ctl::parse_env("novalue").is_err());
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
                    assert_eq!((count, memory, cpus), (6, ByteSize(64 << 20), 1.0));
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
                CtlCommand::Ping { agent, timeout, .. } => assert_eq!(
                    (agent.as_str(), timeout),
                    ("agt_1", HumanDuration(Duration::from_secs(2)))
                ),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// The `UPLINK_*` variables of a subcommand's own flags, in the order
    /// of its flags, as the README's environment table lists them.
    fn env_column(sub: &str) -> String {
        use clap::CommandFactory as _;
        let cli = Cli::command();
        let cmd = cli
            .get_subcommands()
            .find(|c| c.get_name() == sub)
            .unwrap_or_else(|| panic!("no subcommand {sub}"));
        cmd.get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?;
                let list = if a.get_value_delimiter().is_some() {
                    " (comma-separated)"
                } else {
                    ""
                };
                Some(format!("`{env}`{list}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn the_readmes_environment_table_is_the_flags() {
        let readme = include_str!("../../README.md");
        let header = "| backend | agent | ctl | health |";
        let mut lines = readme.lines().skip_while(|l| *l != header);
        assert_eq!(lines.next(), Some(header), "the README's environment table");
        let row = lines.nth(1).unwrap_or_default();
        let want = format!(
            "| {} |",
            ["backend", "agent", "ctl", "health"]
                .map(env_column)
                .join(" | ")
        );
        assert_eq!(
            row, want,
            "README.md: replace the table's row with the second"
        );
    }

    #[test]
    fn ingest_listens_at_an_address_or_on_the_docker_bridge() {
        let config = |flags: &[&str]| {
            let mut argv = vec!["uplink", "agent", "--backend", "https://b"];
            argv.extend_from_slice(flags);
            let Command::Agent(a) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not the agent");
            };
            a.into_config().unwrap()
        };
        let cfg = config(&[
            "--ingest-graphite",
            "docker-bridge:2003",
            "--ingest-influx",
            "127.0.0.1:8086",
        ]);
        let m = cfg.metrics.as_ref().unwrap();
        assert_eq!(m.ingest.graphite, None);
        assert_eq!(m.ingest.influx, Some("127.0.0.1:8086".parse().unwrap()));
        assert_eq!(
            cfg.ingest_on_bridge,
            crate::agent::BridgeIngest {
                graphite: Some(2003),
                influx: None
            }
        );
        let cfg = config(&["--ingest-graphite", "172.17.0.1:2003"]);
        assert_eq!(
            cfg.metrics.unwrap().ingest.graphite,
            Some("172.17.0.1:2003".parse().unwrap())
        );
        assert!(!cfg.ingest_on_bridge.any());
        for bad in [
            "docker-bridge",
            "docker-bridge:70000",
            "localhost:2003",
            "2003",
        ] {
            let err = Cli::try_parse_from([
                "uplink",
                "agent",
                "--backend",
                "https://b",
                "--ingest-graphite",
                bad,
            ])
            .unwrap_err()
            .to_string();
            assert!(err.contains("docker-bridge:"), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults_come_from_the_configs() {
        let cli = Cli::try_parse_from(["uplink", "agent", "--backend", "https://b"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent");
        };
        let cfg = a.into_config().unwrap();
        let m = cfg.metrics.as_ref().unwrap();
        let d = crate::metrics::pipeline::MetricsConfig::default();
        assert_eq!(m.batcher, d.batcher);
        assert_eq!(
            (m.interval, m.spool_max_bytes, m.replay_rate),
            (d.interval, d.spool_max_bytes, d.replay_rate)
        );
        let new = crate::agent::AgentConfig::new(cfg.backend.clone(), &cfg.state_dir);
        assert_eq!(cfg.transport, new.transport);
        assert_eq!(
            (cfg.probe_initial, cfg.probe_max, cfg.stream_max_age),
            (new.probe_initial, new.probe_max, new.stream_max_age)
        );
        assert_eq!(
            (
                cfg.poll_hold,
                cfg.keepalive,
                cfg.keepalive_timeout,
                cfg.orphan_grace
            ),
            (
                new.poll_hold,
                new.keepalive,
                new.keepalive_timeout,
                new.orphan_grace
            )
        );
        assert_eq!(cfg.host_root, None);
        assert_eq!(cfg.metrics.unwrap().host.root, None);
    }

    /// `uplink agent --backend https://b ARGS` made into its settings.
    fn agent_config(args: &[&str]) -> Result<crate::agent::AgentConfig, ConfigError> {
        let mut all = vec!["uplink", "agent", "--backend", "https://b"];
        all.extend_from_slice(args);
        let Command::Agent(a) = Cli::try_parse_from(all).unwrap().command else {
            panic!("not agent");
        };
        a.into_config()
    }

    #[test]
    fn a_host_root_feeds_host_metrics_and_the_hostname_and_is_checked() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/hostname"), "gen-7\n").unwrap();
        let shown = r.display().to_string();

        // A directory whose proc/ is not a /proc: named, with what to do.
        let problems = agent_config(&["--host-root", &shown]).unwrap_err().problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("--host-root {shown}: ")),
            "{problems:?}"
        );
        assert!(problems[0].contains("-v /:/host:ro,rslave"), "{problems:?}");

        std::fs::write(r.join("proc/stat"), "cpu  1 2 3\ncpu0 1 2 3\n").unwrap();
        let cfg = agent_config(&["--host-root", &shown]).unwrap();
        assert_eq!(cfg.host_root.as_deref(), Some(r));
        assert_eq!(cfg.metrics.as_ref().unwrap().host.root.as_deref(), Some(r));
        assert_eq!(cfg.hostname, "gen-7");
        // --hostname still wins.
        let cfg = agent_config(&["--host-root", &shown, "--hostname", "h"]).unwrap();
        assert_eq!(cfg.hostname, "h");

        for (root, needle) in [
            ("/no/such/dir", "no such directory"),
            ("host", "absolute path"),
        ] {
            let problems = agent_config(&["--host-root", root]).unwrap_err().problems;
            assert!(problems[0].contains(needle), "{root}: {problems:?}");
            assert!(problems[0].starts_with("--host-root "), "{problems:?}");
        }
    }
}
