//! The flags of `uplink health`, and the [`HealthConfig`] they make. The
//! directories take the same flags, environment and defaults as `agent`
//! and `backend`, so the one command `uplink health` finds the status
//! file of whichever runs beside it.

use std::path::PathBuf;
use std::str::FromStr as _;

use clap::Args;

use super::ConfigError;
use crate::backend::defaults::DEFAULT_DATA_DIR;
use crate::health::status::Role;
use crate::health::{self, HealthConfig, RoleChoice};
use crate::units::HumanDuration;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The agent's state dir, where a running agent keeps health-agent.json.
    #[arg(long, env = "UPLINK_STATE_DIR", default_value = crate::agent::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The backend's data dir, where a running backend keeps health-backend.json.
    #[arg(long, env = "UPLINK_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Whose status to judge: auto (whichever runs here; both dirs are read), agent or backend.
    #[arg(long, env = "UPLINK_HEALTH_ROLE", default_value = "auto")]
    pub role: String,
    /// A status file older than this is stale: the process is gone or hung (10s to 24h).
    #[arg(long, env = "UPLINK_HEALTH_MAX_AGE", default_value_t = HumanDuration(health::DEFAULT_MAX_AGE), value_parser = HumanDuration::from_str)]
    pub max_age: HumanDuration,
    /// How long the backend's port may take to answer the local TLS check.
    #[arg(long, env = "UPLINK_HEALTH_TIMEOUT", default_value_t = HumanDuration(health::DEFAULT_TIMEOUT), value_parser = HumanDuration::from_str)]
    pub timeout: HumanDuration,
}

impl HealthArgs {
    /// The check these flags ask for, with every problem at once when they
    /// are not valid.
    pub fn into_config(self) -> Result<HealthConfig, ConfigError> {
        let mut problems = Vec::new();
        let role = match self.role.as_str() {
            "auto" => RoleChoice::Auto,
            "agent" => RoleChoice::Only(Role::Agent),
            "backend" => RoleChoice::Only(Role::Backend),
            other => {
                problems.push(format!("--role {other:?}: use auto, agent or backend"));
                RoleChoice::Auto
            }
        };
        let mut cfg = HealthConfig::new(self.state_dir, self.data_dir);
        cfg.role = role;
        cfg.max_age = self.max_age.into();
        cfg.timeout = self.timeout.into();
        problems.extend(cfg.validate());
        ConfigError::check(problems)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{Cli, Command};
    use super::*;

    fn parse(args: &[&str]) -> Result<HealthConfig, ConfigError> {
        let mut argv = vec!["uplink", "health"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Health(a) => a.into_config(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_agents_and_the_backends() {
        // The environment may name the directories (UPLINK_STATE_DIR...):
        // give them, and check the rest.
        let cfg = parse(&["--state-dir", "/s", "--data-dir", "/d"]).unwrap();
        assert_eq!(cfg.role, RoleChoice::Auto);
        assert_eq!(cfg.max_age, health::DEFAULT_MAX_AGE);
        assert_eq!(cfg.timeout, health::DEFAULT_TIMEOUT);
        assert_eq!(
            (cfg.state_dir, cfg.data_dir),
            (PathBuf::from("/s"), PathBuf::from("/d"))
        );
        let cfg = parse(&["--role", "backend", "--max-age", "1m"]).unwrap();
        assert_eq!(cfg.role, RoleChoice::Only(Role::Backend));
        assert_eq!(cfg.max_age, std::time::Duration::from_secs(60));
    }

    #[test]
    fn bad_flags_are_all_named() {
        let e = parse(&["--role", "frontend", "--max-age", "1s", "--timeout", "5m"]).unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        assert!(e.problems[0].contains("\"frontend\""), "{e}");
        assert!(e.problems[1].starts_with("--max-age 1s"), "{e}");
        assert!(e.problems[2].starts_with("--timeout 5m"), "{e}");
    }
}
