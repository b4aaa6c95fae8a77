//! The decisions of `uplink health`, pure: which status file speaks for
//! this place ([`choose`]), what it says ([`judge`]), what the backend's
//! port answered ([`port_checked`]), and the line when there is nothing to
//! judge ([`nothing_found`]). The command (`super::run`) reads the files,
//! looks the writer's pid up and checks the port; the wording and every
//! threshold are here, with the time given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::probe::Answer;
use super::status::{Role, Status};
use crate::units::rfc3339;

/// What the reader could see of the process that wrote a status file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// Its pid runs in the reader's pid namespace.
    Alive,
    /// The file was written in the reader's pid namespace and its pid is
    /// not there (or a zombie).
    Gone,
    /// Written in another pid namespace (another container, the host), or
    /// no `/proc` to look in.
    Unknown,
}

/// A status file read.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    pub status: Status,
    /// Written from the reader's pid namespace (the same container).
    pub same_namespace: bool,
    pub process: Process,
}

/// What became of a place where a status file was looked for, when none
/// was read there.
#[derive(Clone, Debug)]
pub enum Missing {
    /// No file; `dir_exists` says whether its directory is there.
    NoFile { dir_exists: bool },
    /// A file that could not be read or is not a status file (why).
    Unreadable(String),
}

/// A place looked at with nothing read.
#[derive(Clone, Debug)]
pub struct Looked {
    pub role: Role,
    pub path: PathBuf,
    pub missing: Missing,
}

/// What a status file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Healthy(String),
    Unhealthy(String),
    /// The backend says it serves: check `target` (its port, on loopback)
    /// before saying so; `line` is what is said when the port answers.
    CheckPort {
        target: SocketAddr,
        line: String,
    },
}

/// The status file that speaks for this place, among those read: one
/// written from this pid namespace (this container) first, then one of a
/// process not stopped and not gone, then the one written last.
pub fn choose(found: Vec<Found>) -> Option<Found> {
    found.into_iter().max_by_key(|f| {
        (
            f.same_namespace,
            f.status.stopped_unix_ms.is_none() && f.process != Process::Gone,
            f.status.updated_unix_ms,
        )
    })
}

/// A span of milliseconds as an operator reads it: `4 s`, `12 min`,
/// `5 h`, `3 d` (rounded down; negative spans are `0 s`).
pub fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 120 * 60 {
        format!("{} min", s / 60)
    } else if s < 48 * 3600 {
        format!("{} h", s / 3600)
    } else {
        format!("{} d", s / 86_400)
    }
}

/// The address that reaches a port bound to `listen` from this host:
/// loopback for the unspecified addresses (`0.0.0.0`, `[::]`).
pub fn loopback(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What `f` says at `now` (Unix ms), with files older than `max_age`
/// stale.
pub fn judge(f: &Found, now: i64, max_age: Duration) -> Verdict {
    let s = &f.status;
    let role = s.role.name();
    let path = f.path.display();
    let age = now - s.updated_unix_ms;
    let max_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
    if let Some(stopped) = s.stopped_unix_ms {
        let why = if s.exit_error.is_empty() {
            String::new()
        } else {
            format!(": {}", s.exit_error)
        };
        return Verdict::Unhealthy(format!(
            "{role} (pid {}) stopped at {} ({} ago){why}",
            s.pid,
            rfc3339(stopped),
            span(now - stopped)
        ));
    }
    if f.process == Process::Gone {
        return Verdict::Unhealthy(format!(
            "stale: {role} pid {} is gone; {path} was last updated {} ago",
            s.pid,
            span(age)
        ));
    }
    if age > max_ms {
        let what = if f.process == Process::Alive {
            "the process runs but is hung"
        } else {
            "the process is gone or hung"
        };
        return Verdict::Unhealthy(format!(
            "stale: {role} pid {} last updated {path} {} ago (--max-age {}): {what}",
            s.pid,
            span(age),
            crate::units::format_duration(max_age)
        ));
    }
    if age < -max_ms {
        return Verdict::Unhealthy(format!(
            "stale: {path} was updated {} in the future: was the clock set back?",
            span(-age)
        ));
    }
    match (&s.agent, &s.backend) {
        (Some(a), _) => {
            if a.connected {
                return Verdict::Healthy(format!(
                    "agent connected on {} to {} since {} ({}), last contact {} ago",
                    a.rung,
                    a.backend,
                    rfc3339(a.since_unix_ms),
                    span(now - a.since_unix_ms),
                    span(now - a.last_contact_unix_ms)
                ));
            }
            let error = if a.last_error.is_empty() {
                String::new()
            } else {
                format!(": last error: {}", a.last_error)
            };
            if a.last_contact_unix_ms == 0 {
                return Verdict::Unhealthy(format!(
                    "agent not connected to {} yet (started {} ago){error}",
                    a.backend,
                    span(now - s.started_unix_ms)
                ));
            }
            let rung = if a.rung.is_empty() {
                String::new()
            } else {
                format!(" on {}", a.rung)
            };
            Verdict::Unhealthy(format!(
                "agent not connected to {}{rung} since {} ({} ago), last contact {} ago{error}",
                a.backend,
                rfc3339(a.since_unix_ms),
                span(now - a.since_unix_ms),
                span(now - a.last_contact_unix_ms)
            ))
        }
        (None, Some(b)) if !b.serving => Verdict::Unhealthy(format!(
            "backend not serving on {}: it is draining (shutting down)",
            b.listen
        )),
        (None, Some(b)) => Verdict::CheckPort {
            target: loopback(b.listen),
            line: format!(
                "backend serving on {} (pid {}, up {})",
                b.listen,
                s.pid,
                span(now - s.started_unix_ms)
            ),
        },
        (None, None) => Verdict::Unhealthy(format!("{path}: says neither agent nor backend")),
    }
}

/// The verdict once the backend's port at `target` answered (or not):
/// healthy with `line` and the answer, or why not.
pub fn port_checked(line: &str, target: SocketAddr, answer: Result<Answer, String>) -> Verdict {
    match answer {
        Ok(a) => Verdict::Healthy(format!(
            "{line}: {target} answered HTTP {} over TLS in {} ms",
            a.status,
            a.elapsed.as_millis()
        )),
        Err(e) => Verdict::Unhealthy(format!(
            "backend not serving: its status file says it listens, but {target} {e}"
        )),
    }
}

/// Where a role's directory comes from, for the lines that name it.
fn setting(role: Role) -> &'static str {
    match role {
        Role::Agent => "the agent's --state-dir, UPLINK_STATE_DIR",
        Role::Backend => "the backend's --data-dir, UPLINK_DATA_DIR",
    }
}

/// The line when no status file could be read: each place looked at and
/// what was there.
pub fn nothing_found(looked: &[Looked]) -> String {
    let parts: Vec<String> = looked
        .iter()
        .map(|l| {
            let dir = l.path.parent().unwrap_or(Path::new(""));
            match &l.missing {
                Missing::NoFile { dir_exists: true } => {
                    format!("no {} ({})", l.path.display(), setting(l.role))
                }
                Missing::NoFile { dir_exists: false } => {
                    format!("no directory {} ({})", dir.display(), setting(l.role))
                }
                Missing::Unreadable(why) => why.clone(),
            }
        })
        .collect();
    let unreadable = looked
        .iter()
        .any(|l| matches!(l.missing, Missing::Unreadable(_)));
    let hint = if unreadable {
        "run the check as the user the process runs as, in its directory"
    } else {
        "the agent or backend has not started, or keeps its files elsewhere: set the directory it uses"
    };
    format!("no status file: {}; {hint}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::status::{AgentStatus, BackendStatus, FORMAT};

    const NOW: i64 = 1_800_000_000_000;
    const MAX: Duration = Duration::from_secs(30);

    fn agent(connected: bool) -> Found {
        Found {
            path: PathBuf::from("/var/lib/uplink/health-agent.json"),
            status: Status {
                format: FORMAT,
                role: Role::Agent,
                pid: 7,
                pid_namespace: None,
                started_unix_ms: NOW - 600_000,
                updated_unix_ms: NOW - 2_000,
                stopped_unix_ms: None,
                exit_error: String::new(),
                agent: Some(AgentStatus {
                    backend: "https://b:8443/".into(),
                    connected,
                    rung: "grpc".into(),
                    since_unix_ms: NOW - 300_000,
                    last_contact_unix_ms: NOW - 2_000,
                    last_error: if connected {
                        String::new()
                    } else {
                        "tcp connect: connection refused".into()
                    },
                }),
                backend: None,
            },
            same_namespace: true,
            process: Process::Alive,
        }
    }

    fn backend(listen: &str, serving: bool) -> Found {
        let mut f = agent(true);
        f.path = PathBuf::from("/var/lib/uplink/health-backend.json");
        f.status.role = Role::Backend;
        f.status.agent = None;
        f.status.backend = Some(BackendStatus {
            listen: listen.parse().unwrap(),
            serving,
        });
        f
    }

    fn unhealthy(v: Verdict) -> String {
        match v {
            Verdict::Unhealthy(line) => line,
            other => panic!("not unhealthy: {other:?}"),
        }
    }

    #[test]
    fn a_connected_agent_is_healthy_and_says_its_rung_and_last_contact() {
        let Verdict::Healthy(line) = judge(&agent(true), NOW, MAX) else {
            panic!("not healthy");
        };
        assert_eq!(
            line,
            "agent connected on grpc to https://b:8443/ since 2027-01-15T07:55:00Z (5 min), last contact 2 s ago"
        );
    }

    #[test]
    fn a_disconnected_agent_says_since_when_and_its_last_error() {
        let line = unhealthy(judge(&agent(false), NOW, MAX));
        assert_eq!(
            line,
            "agent not connected to https://b:8443/ on grpc since 2027-01-15T07:55:00Z (5 min ago), last contact 2 s ago: last error: tcp connect: connection refused"
        );
        let mut never = agent(false);
        let a = never.status.agent.as_mut().unwrap();
        a.last_contact_unix_ms = 0;
        a.rung.clear();
        a.last_error = "enrollment failed: dns".into();
        let line = unhealthy(judge(&never, NOW, MAX));
        assert_eq!(
            line,
            "agent not connected to https://b:8443/ yet (started 10 min ago): last error: enrollment failed: dns"
        );
    }

    #[test]
    fn an_old_file_is_stale_and_a_gone_process_at_once() {
        let mut old = agent(true);
        old.status.updated_unix_ms = NOW - 31_000;
        old.process = Process::Unknown;
        let line = unhealthy(judge(&old, NOW, MAX));
        assert_eq!(
            line,
            "stale: agent pid 7 last updated /var/lib/uplink/health-agent.json 31 s ago (--max-age 30s): the process is gone or hung"
        );
        old.process = Process::Alive;
        assert!(unhealthy(judge(&old, NOW, MAX)).ends_with("the process runs but is hung"));
        // Just within the max age: still judged by what it says.
        old.status.updated_unix_ms = NOW - 30_000;
        assert!(matches!(judge(&old, NOW, MAX), Verdict::Healthy(_)));
        let mut gone = agent(true);
        gone.process = Process::Gone;
        assert_eq!(
            unhealthy(judge(&gone, NOW, MAX)),
            "stale: agent pid 7 is gone; /var/lib/uplink/health-agent.json was last updated 2 s ago"
        );
        let mut future = agent(true);
        future.status.updated_unix_ms = NOW + 3_600_000;
        assert!(unhealthy(judge(&future, NOW, MAX)).contains("in the future"));
        future.status.updated_unix_ms = NOW + 1_000;
        assert!(matches!(judge(&future, NOW, MAX), Verdict::Healthy(_)));
    }

    #[test]
    fn a_stopped_process_says_when_and_why() {
        let mut f = agent(true);
        f.status.stopped_unix_ms = Some(NOW - 90_000);
        assert_eq!(
            unhealthy(judge(&f, NOW, MAX)),
            "agent (pid 7) stopped at 2027-01-15T07:58:30Z (90 s ago)"
        );
        f.status.exit_error = "no enrollment token".into();
        assert!(unhealthy(judge(&f, NOW, MAX)).ends_with("ago): no enrollment token"));
    }

    #[test]
    fn a_serving_backend_is_checked_on_loopback() {
        match judge(&backend("0.0.0.0:8443", true), NOW, MAX) {
            Verdict::CheckPort { target, line } => {
                assert_eq!(target, "127.0.0.1:8443".parse().unwrap());
                assert_eq!(line, "backend serving on 0.0.0.0:8443 (pid 7, up 10 min)");
            }
            other => panic!("{other:?}"),
        }
        let answer = Answer {
            status: 404,
            elapsed: Duration::from_millis(3),
        };
        let target = "127.0.0.1:8443".parse().unwrap();
        assert_eq!(
            port_checked("backend serving", target, Ok(answer)),
            Verdict::Healthy(
                "backend serving: 127.0.0.1:8443 answered HTTP 404 over TLS in 3 ms".into()
            )
        );
        let line = unhealthy(port_checked(
            "backend serving",
            target,
            Err("refused the connection".into()),
        ));
        assert_eq!(
            line,
            "backend not serving: its status file says it listens, but 127.0.0.1:8443 refused the connection"
        );
        let draining = unhealthy(judge(&backend("[::]:8443", false), NOW, MAX));
        assert!(
            draining.starts_with("backend not serving on [::]:8443"),
            "{draining}"
        );
    }

    #[test]
    fn unspecified_addresses_are_reached_on_loopback_and_others_as_they_are() {
        for (listen, target) in [
            ("0.0.0.0:1", "127.0.0.1:1"),
            ("[::]:2", "[::1]:2"),
            ("10.1.2.3:3", "10.1.2.3:3"),
            ("[::1]:4", "[::1]:4"),
        ] {
            assert_eq!(loopback(listen.parse().unwrap()), target.parse().unwrap());
        }
    }

    #[test]
    fn this_containers_running_process_speaks_before_an_old_or_foreign_file() {
        let mut mine = agent(true);
        mine.status.updated_unix_ms = NOW - 4_000;
        let mut foreign = backend("0.0.0.0:8443", true);
        foreign.same_namespace = false;
        foreign.process = Process::Unknown;
        let chosen = choose(vec![foreign.clone(), mine.clone()]).unwrap();
        assert_eq!(chosen.status.role, Role::Agent);
        // In one namespace: a stopped or gone writer gives way to a running one.
        let mut stopped = backend("0.0.0.0:8443", false);
        stopped.status.stopped_unix_ms = Some(NOW);
        stopped.status.updated_unix_ms = NOW;
        assert_eq!(
            choose(vec![stopped.clone(), mine.clone()])
                .unwrap()
                .status
                .role,
            Role::Agent
        );
        let mut gone = backend("0.0.0.0:8443", true);
        gone.process = Process::Gone;
        gone.status.updated_unix_ms = NOW;
        assert_eq!(
            choose(vec![gone, mine.clone()]).unwrap().status.role,
            Role::Agent
        );
        // Otherwise the freshest.
        let mut fresher = backend("0.0.0.0:8443", true);
        fresher.status.updated_unix_ms = NOW - 1_000;
        assert_eq!(
            choose(vec![mine, fresher]).unwrap().status.role,
            Role::Backend
        );
        assert!(choose(Vec::new()).is_none());
    }

    #[test]
    fn nothing_found_names_each_path_and_the_setting_behind_it() {
        let line = nothing_found(&[
            Looked {
                role: Role::Agent,
                path: PathBuf::from("/var/lib/uplink/health-agent.json"),
                missing: Missing::NoFile { dir_exists: true },
            },
            Looked {
                role: Role::Backend,
                path: PathBuf::from("./uplink-data/health-backend.json"),
                missing: Missing::NoFile { dir_exists: false },
            },
        ]);
        assert_eq!(
            line,
            "no status file: no /var/lib/uplink/health-agent.json (the agent's --state-dir, UPLINK_STATE_DIR); no directory ./uplink-data (the backend's --data-dir, UPLINK_DATA_DIR); the agent or backend has not started, or keeps its files elsewhere: set the directory it uses"
        );
        let line = nothing_found(&[Looked {
            role: Role::Agent,
            path: PathBuf::from("/s/health-agent.json"),
            missing: Missing::Unreadable(
                "cannot read /s/health-agent.json: Permission denied".into(),
            ),
        }]);
        assert!(
            line.contains("Permission denied") && line.contains("as the user"),
            "{line}"
        );
    }

    #[test]
    fn spans_read_as_an_operator_writes_them() {
        assert_eq!(span(-5), "0 s");
        assert_eq!(span(119_999), "119 s");
        assert_eq!(span(120_000), "2 min");
        assert_eq!(span(7_200_000), "2 h");
        assert_eq!(span(49 * 3_600_000), "2 d");
    }
}
