//! Health: the status file a running agent or backend keeps in its
//! directory, and `uplink health`, which reads it and answers with one
//! line and an exit status (0 healthy, 1 not), as a container's
//! `HEALTHCHECK CMD ["/uplink", "health"]` wants: the same command for
//! either role, with nothing but the binary in the image.
//!
//! - [`status`]: the file's format (`health-agent.json` in the agent's
//!   state dir, `health-backend.json` in the backend's data dir), read
//!   bounded and checked.
//! - [`keeper`]: [`StatusFile`], the task that writes it atomically at
//!   every change and every [`TICK`], and marks it stopped at the end.
//! - [`verdict`]: the decisions, pure: which file speaks for this place,
//!   stale or not, connected or not, and the line that says so.
//! - [`probe`]: the backend's port checked on loopback (TCP, TLS, one
//!   HTTP answer) within a timeout.
//!
//! ```text
//!  agent session ──(connected, contact, failed)──┐
//!  backend server ──(serving)────────────────────┤
//!                                                v
//!                  StatusFile task ── every change, every 5 s ──> DIR/health-<role>.json
//!                                                                     │
//!  uplink health: read both places ─> choose ─> judge ─(backend)─> probe ─> line, 0 or 1
//! ```
//!
//! `run` looks in the agent's state dir and the backend's data dir
//! (unless `--role` picks one), so in an image where both default to one
//! volume, whichever process runs there is judged: a file written from
//! this pid namespace first (the same container), a running writer before
//! a stopped or gone one, then the freshest. A writer's pid is looked up
//! only in its own pid namespace (a stale file whose process is gone is
//! said at once); elsewhere the file's age decides.

pub mod keeper;
pub mod probe;
pub mod status;
pub mod verdict;

use std::path::PathBuf;
use std::time::Duration;

pub use self::keeper::StatusFile;
use self::status::{Role, Status};
use self::verdict::{Found, Looked, Missing, Process, Verdict};

/// How often a running process rewrites its status file, changed or not.
pub const TICK: Duration = Duration::from_secs(5);
/// A status file older than this is stale (the process is gone or hung):
/// six ticks, so a busy host never looks dead.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30);
/// How long the backend's port may take to answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Which status file `uplink health` judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleChoice {
    /// Whichever is there (both places are read; see the module doc).
    Auto,
    Only(Role),
}

/// Settings of `uplink health`.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// The agent's state dir.
    pub state_dir: PathBuf,
    /// The backend's data dir.
    pub data_dir: PathBuf,
    pub role: RoleChoice,
    /// A status file older than this is stale.
    pub max_age: Duration,
    /// Time given to the backend's port to answer.
    pub timeout: Duration,
}

impl HealthConfig {
    /// Defaults for these directories.
    pub fn new(state_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        HealthConfig {
            state_dir: state_dir.into(),
            data_dir: data_dir.into(),
            role: RoleChoice::Auto,
            max_age: DEFAULT_MAX_AGE,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (flag, dir) in [
            ("--state-dir", &self.state_dir),
            ("--data-dir", &self.data_dir),
        ] {
            if dir.as_os_str().is_empty() {
                errs.push(format!("{flag} is empty: give the directory"));
            }
        }
        let min_age = TICK * 2;
        if self.max_age < min_age || self.max_age > Duration::from_secs(86_400) {
            errs.push(format!(
                "--max-age {} is out of range: {} (two status writes) to 24h",
                crate::units::format_duration(self.max_age),
                crate::units::format_duration(min_age)
            ));
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(60) {
            errs.push(format!(
                "--timeout {} is out of range: 100ms to 60s",
                crate::units::format_duration(self.timeout)
            ));
        }
        errs
    }
}

/// What `uplink health` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub healthy: bool,
    /// One line, without its newline.
    pub line: String,
}

/// The writer of `status`, as seen from here (see [`Process`]).
fn process_of(status: &Status, ours: Option<&str>) -> (bool, Process) {
    let same = ours.is_some() && status.pid_namespace.as_deref() == ours;
    if !same {
        return (false, Process::Unknown);
    }
    match std::fs::read_to_string(format!("/proc/{}/stat", status.pid)) {
        // The state follows the command's closing parenthesis; a zombie
        // has exited already.
        Ok(stat) => match stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()) {
            Some(rest) if rest.starts_with('Z') || rest.starts_with('X') => (true, Process::Gone),
            _ => (true, Process::Alive),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, Process::Gone),
        Err(_) => (true, Process::Unknown),
    }
}

/// Reads the status files, judges the one that speaks for this place,
/// and checks the backend's port when it says it serves.
pub async fn run(cfg: &HealthConfig) -> Report {
    let places = match cfg.role {
        RoleChoice::Auto => vec![
            (Role::Agent, status::path(&cfg.state_dir, Role::Agent)),
            (Role::Backend, status::path(&cfg.data_dir, Role::Backend)),
        ],
        RoleChoice::Only(Role::Agent) => {
            vec![(Role::Agent, status::path(&cfg.state_dir, Role::Agent))]
        }
        RoleChoice::Only(Role::Backend) => {
            vec![(Role::Backend, status::path(&cfg.data_dir, Role::Backend))]
        }
    };
    let ours = status::pid_namespace();
    let mut found = Vec::new();
    let mut looked = Vec::new();
    for (role, path) in places {
        match status::read(&path, role) {
            Ok(Some(status)) => {
                let (same_namespace, process) = process_of(&status, ours.as_deref());
                found.push(Found {
                    path,
                    status,
                    same_namespace,
                    process,
                });
            }
            Ok(None) => {
                let dir_exists = path.parent().is_some_and(|d| d.is_dir());
                looked.push(Looked {
                    role,
                    path,
                    missing: Missing::NoFile { dir_exists },
                });
            }
            Err(e) => looked.push(Looked {
                role,
                path,
                missing: Missing::Unreadable(e.to_string()),
            }),
        }
    }
    let Some(chosen) = verdict::choose(found) else {
        return Report {
            healthy: false,
            line: verdict::nothing_found(&looked),
        };
    };
    let mut v = verdict::judge(&chosen, crate::now_unix_ms(), cfg.max_age);
    if let Verdict::CheckPort { target, line } = &v {
        let answer = probe::check(*target, cfg.timeout).await;
        v = verdict::port_checked(line, *target, answer);
    }
    match v {
        Verdict::Healthy(line) => Report {
            healthy: true,
            line,
        },
        Verdict::Unhealthy(line) => Report {
            healthy: false,
            line,
        },
        // `port_checked` answers either way.
        Verdict::CheckPort { line, .. } => Report {
            healthy: false,
            line,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_settings_are_all_named() {
        assert!(HealthConfig::new("/s", "/d").validate().is_empty());
        let mut c = HealthConfig::new("", "/d");
        c.max_age = Duration::from_secs(5);
        c.timeout = Duration::from_secs(0);
        let errs = c.validate();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("--state-dir is empty"), "{errs:?}");
        assert!(
            errs[1].contains("--max-age 5s is out of range: 10s"),
            "{errs:?}"
        );
        assert!(errs[2].contains("--timeout 0s"), "{errs:?}");
    }

    #[test]
    fn a_pid_is_looked_up_only_in_its_own_namespace() {
        let ours = status::pid_namespace();
        let mut s = Status {
            format: status::FORMAT,
            role: Role::Agent,
            pid: std::process::id(),
            pid_namespace: ours.clone(),
            started_unix_ms: 0,
            updated_unix_ms: 0,
            stopped_unix_ms: None,
            exit_error: String::new(),
            agent: None,
            backend: None,
        };
        if ours.is_some() {
            assert_eq!(process_of(&s, ours.as_deref()), (true, Process::Alive));
            s.pid = u32::MAX;
            assert_eq!(process_of(&s, ours.as_deref()), (true, Process::Gone));
        }
        s.pid_namespace = Some("pid:[1]".into());
        assert_eq!(process_of(&s, ours.as_deref()), (false, Process::Unknown));
        assert_eq!(process_of(&s, None), (false, Process::Unknown));
    }

    #[tokio::test]
    async fn a_missing_directory_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = HealthConfig::new(tmp.path().join("nope"), tmp.path());
        let r = run(&cfg).await;
        assert!(!r.healthy);
        assert!(
            r.line.contains(&format!(
                "no directory {}",
                tmp.path().join("nope").display()
            )),
            "{}",
            r.line
        );
    }
}
