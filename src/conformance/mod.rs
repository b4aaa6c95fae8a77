//! `uplink conformance`: the contract's rules, checked against any backend.
//!
//! A backend author runs it against their backend with its admin token and
//! an enrollment token. Each case checks one rule of `proto/uplink/v1` (and
//! `docs/PROTOCOL.md`), within a time bound, with the crate's own clients:
//! [`crate::ctl::Admin`] for the admin service, raw agent calls over
//! Connect and gRPC ([`peer::RawAgent`]), and real `uplink agent`
//! processes ([`peer::AgentProc`]) where a case needs a whole agent. Every
//! process and temporary directory a case makes is removed when the case
//! ends, pass, fail or timeout (they are dropped with the case's future).
//!
//! Cases live by group: [`enrollment`] (and the credential's life),
//! [`commands`] (delivery, polls, streams), [`presence`], [`events`]
//! (reports, epochs, metric batches), [`errors`] (malformed and oversized
//! requests) and [`ladder`] (a rung switch).
//! [`run`] prints one line per case (`PASS name`, `FAIL name: why`, `SKIP
//! name: why`) and a summary.

mod commands;
mod enrollment;
mod errors;
mod events;
mod ladder;
mod peer;
mod presence;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Uri;

use crate::ctl::Admin;
use crate::net::Net;
use crate::secret::Secret;

/// Which rungs a run of the suite covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RungChoice {
    /// The gRPC rung only.
    Grpc,
    /// The long-poll rung only.
    Longpoll,
    /// Both.
    Both,
}

impl RungChoice {
    /// True when the run covers `rung`.
    pub fn covers(self, rung: Rung) -> bool {
        matches!(
            (self, rung),
            (RungChoice::Both, _)
                | (RungChoice::Grpc, Rung::Grpc)
                | (RungChoice::Longpoll, Rung::Longpoll)
        )
    }

    /// The rungs covered, gRPC first.
    pub fn rungs(self) -> Vec<Rung> {
        [Rung::Grpc, Rung::Longpoll]
            .into_iter()
            .filter(|r| self.covers(*r))
            .collect()
    }
}

/// A rung of the ladder: how a raw call or an agent reaches the backend
/// (gRPC over HTTP/2, or Connect unary over HTTP/1.1 for long-poll).
pub use crate::agent::ladder::Rung;

/// What `uplink conformance` needs.
pub struct ConformanceConfig {
    /// The backend under test, `https://host[:port]`.
    pub backend: Uri,
    /// Trust and proxy for every connection of the suite.
    pub net: Net,
    /// The CA files given (passed on to the agents the suite starts).
    pub ca_files: Vec<PathBuf>,
    /// The admin token.
    pub admin_token: Secret,
    /// An enrollment token of the backend.
    pub enroll_token: Secret,
    /// The rungs to test.
    pub rung: RungChoice,
    /// Only the cases whose name contains one of these (empty: all).
    pub cases: Vec<String>,
}

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend kept the rule.
    Pass,
    /// It did not; why.
    Fail(String),
    /// The case did not run; why.
    Skip(String),
}

/// The counts of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// What every case gets: the backend, its clients and the run's settings.
pub(crate) struct Ctx {
    pub backend: Uri,
    pub net: Net,
    pub ca_files: Vec<PathBuf>,
    pub enroll_token: Secret,
    pub admin: Admin,
    pub rung: RungChoice,
}

/// A case's result: `Err` carries why it failed.
pub(crate) type Check = Result<(), String>;

/// Fails the case with a message unless `cond` holds.
pub(crate) fn ensure(cond: bool, why: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(why()) }
}

/// The cases, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    AdminService,
    Enrollment,
    Rotation,
    Revocation,
    PingGrpc,
    PingLongpoll,
    PollWakeup,
    PollOrder,
    Redelivery,
    Heartbeats,
    Presence,
    Reports,
    Epochs,
    Metrics,
    Malformed,
    RungSwitch,
}

impl Case {
    const ALL: [Case; 16] = [
        Case::AdminService,
        Case::Enrollment,
        Case::Rotation,
        Case::Revocation,
        Case::PingGrpc,
        Case::PingLongpoll,
        Case::PollWakeup,
        Case::PollOrder,
        Case::Redelivery,
        Case::Heartbeats,
        Case::Presence,
        Case::Reports,
        Case::Epochs,
        Case::Metrics,
        Case::Malformed,
        Case::RungSwitch,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::AdminService => "admin-service",
            Case::Enrollment => "enrollment",
            Case::Rotation => "credential-rotation",
            Case::Revocation => "revocation",
            Case::PingGrpc => "ping-grpc",
            Case::PingLongpoll => "ping-longpoll",
            Case::PollWakeup => "poll-wakeup",
            Case::PollOrder => "poll-order",
            Case::Redelivery => "redelivery",
            Case::Heartbeats => "heartbeats",
            Case::Presence => "presence",
            Case::Reports => "reports",
            Case::Epochs => "epochs",
            Case::Metrics => "metrics",
            Case::Malformed => "malformed",
            Case::RungSwitch => "rung-switch",
        }
    }

    /// The longest the case may take; past it, it fails as hung.
    fn bound(self) -> Duration {
        Duration::from_secs(match self {
            Case::AdminService => 20,
            Case::Enrollment | Case::Rotation => 30,
            Case::Revocation => 45,
            Case::PingGrpc | Case::PingLongpoll => 60,
            Case::PollWakeup => 30,
            Case::PollOrder => 90,
            Case::Redelivery => 45,
            Case::Heartbeats => 45,
            Case::Presence => 45,
            Case::Reports | Case::Epochs | Case::Metrics => 45,
            Case::Malformed => 60,
            Case::RungSwitch => 120,
        })
    }

    /// The rungs the case needs the run to cover (empty: any).
    fn needs(self) -> &'static [Rung] {
        match self {
            Case::PingGrpc | Case::Heartbeats => &[Rung::Grpc],
            Case::PingLongpoll | Case::PollWakeup | Case::PollOrder => &[Rung::Longpoll],
            Case::RungSwitch => &[Rung::Grpc, Rung::Longpoll],
            _ => &[],
        }
    }

    /// True when the case queues commands or reads results through the
    /// admin service.
    fn needs_admin(self) -> bool {
        !matches!(
            self,
            Case::AdminService
                | Case::Enrollment
                | Case::Rotation
                | Case::Heartbeats
                | Case::Metrics
                | Case::Malformed
        )
    }

    async fn run(self, ctx: &Ctx) -> Check {
        match self {
            Case::AdminService => admin_service(ctx).await,
            Case::Enrollment => enrollment::enrollment(ctx).await,
            Case::Rotation => enrollment::rotation(ctx).await,
            Case::Revocation => enrollment::revocation(ctx).await,
            Case::PingGrpc => commands::ping(ctx, Rung::Grpc).await,
            Case::PingLongpoll => commands::ping(ctx, Rung::Longpoll).await,
            Case::PollWakeup => commands::poll_wakeup(ctx).await,
            Case::PollOrder => commands::poll_order(ctx).await,
            Case::Redelivery => commands::redelivery(ctx).await,
            Case::Heartbeats => commands::heartbeats(ctx).await,
            Case::Presence => presence::presence(ctx).await,
            Case::Reports => events::reports(ctx).await,
            Case::Epochs => events::epochs(ctx).await,
            Case::Metrics => events::metrics(ctx).await,
            Case::Malformed => errors::malformed(ctx).await,
            Case::RungSwitch => ladder::rung_switch(ctx).await,
        }
    }
}

/// The names of every case, in the order they run.
pub fn case_names() -> Vec<&'static str> {
    Case::ALL.iter().map(|c| c.name()).collect()
}

/// The admin service answers with the token given: `ListAgents` works
/// (every later case that queues commands depends on it).
async fn admin_service(ctx: &Ctx) -> Check {
    ctx.admin.agents("").await.map(|_| ()).map_err(|e| {
        format!("ListAgents with the admin token given failed: {e} (check --admin-token)")
    })
}

/// Runs the suite against `cfg.backend`, writing one line per case and the
/// summary to `out`.
pub async fn run(cfg: ConformanceConfig, out: &mut impl Write) -> Summary {
    let ctx = Ctx {
        admin: Admin::new(&cfg.backend, &cfg.net, cfg.admin_token),
        backend: cfg.backend,
        net: cfg.net,
        ca_files: cfg.ca_files,
        enroll_token: cfg.enroll_token,
        rung: cfg.rung,
    };
    let mut summary = Summary::default();
    let mut admin_ok = true;
    for case in Case::ALL {
        let name = case.name();
        if !cfg.cases.is_empty()
            && case != Case::AdminService
            && !cfg.cases.iter().any(|c| name.contains(c.as_str()))
        {
            continue;
        }
        let outcome = if let Some(r) = case.needs().iter().find(|r| !ctx.rung.covers(**r)) {
            Outcome::Skip(format!("needs the {} rung (--rung)", r.name()))
        } else if case.needs_admin() && !admin_ok {
            Outcome::Skip("needs the admin service (see admin-service)".into())
        } else {
            let started = Instant::now();
            match tokio::time::timeout(case.bound(), case.run(&ctx)).await {
                Ok(Ok(())) => Outcome::Pass,
                Ok(Err(why)) if why.starts_with(SKIP) => {
                    Outcome::Skip(why.trim_start_matches(SKIP).to_string())
                }
                Ok(Err(why)) => Outcome::Fail(why),
                Err(_) => Outcome::Fail(format!(
                    "did not finish within {:?} (hung after {:.1} s)",
                    case.bound(),
                    started.elapsed().as_secs_f64()
                )),
            }
        };
        if case == Case::AdminService && outcome != Outcome::Pass {
            admin_ok = false;
        }
        let line = match &outcome {
            Outcome::Pass => {
                summary.passed += 1;
                format!("PASS {name}")
            }
            Outcome::Fail(why) => {
                summary.failed += 1;
                format!("FAIL {name}: {}", one_line(why))
            }
            Outcome::Skip(why) => {
                summary.skipped += 1;
                format!("SKIP {name}: {}", one_line(why))
            }
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    let _ = writeln!(
        out,
        "{} passed, {} failed, {} skipped",
        summary.passed, summary.failed, summary.skipped
    );
    summary
}

/// A case's `Err` that starts with this is a skip, not a failure.
pub(crate) const SKIP: &str = "skip: ";

/// Text on one line: escaped, line ends as spaces.
fn one_line(s: &str) -> String {
    crate::text::escape(&s.replace(['\n', '\r'], " ")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rung_choices_cover_their_rungs() {
        assert_eq!(RungChoice::Both.rungs(), vec![Rung::Grpc, Rung::Longpoll]);
        assert_eq!(RungChoice::Grpc.rungs(), vec![Rung::Grpc]);
        assert_eq!(RungChoice::Longpoll.rungs(), vec![Rung::Longpoll]);
    }

    #[test]
    fn case_names_are_unique_and_cases_need_admin_only_when_they_queue() {
        let mut names: Vec<_> = Case::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Case::ALL.len());
        assert!(!Case::AdminService.needs_admin());
        assert!(Case::Redelivery.needs_admin());
    }

    #[test]
    fn failure_text_stays_on_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
    }
}
