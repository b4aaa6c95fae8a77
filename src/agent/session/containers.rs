//! Reconciliation: the task that follows this agent's containers. It
//! reports their exits from Docker's event stream (reconnecting when the
//! engine goes and comes back), and each time it connects it looks at the
//! containers as they are and settles each against the journal
//! ([`verdict`]): adopted, exit reported, or orphaned and removed after the
//! orphan grace period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::super::docker::Engine;
use super::super::executor::Executor;
use super::super::journal::{Entry, Journal};
use super::intake::lock;
use super::reporter::Reports;
use crate::proto;

/// What reconciliation does with one of this agent's containers.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Its command still runs: leave it alone.
    Leave,
    /// Running, and its command succeeded: adopt it (not restarted).
    Adopt,
    /// Not running, and its command succeeded: report its exit (the
    /// backend keeps the first report).
    ReportExit,
    /// No successful command accounts for it: report it and remove it
    /// after the grace period.
    Orphan,
}

/// Settles a container in `state` whose command the journal knows as
/// `entry` (None: never accepted, or forgotten).
fn verdict(entry: Option<&Entry>, state: &str) -> Verdict {
    let accounted = match entry {
        // Still running (not done): None, leave it alone.
        Some(e) => e
            .done
            .as_ref()
            .map(|(status, _)| *status == proto::CommandStatus::Ok as i32),
        None => Some(false),
    };
    match accounted {
        None => Verdict::Leave,
        Some(true) if state == "running" => Verdict::Adopt,
        Some(true) => Verdict::ReportExit,
        Some(false) => Verdict::Orphan,
    }
}

/// The reconciliation task.
pub(super) struct Containers {
    pub(super) executor: Arc<Executor>,
    pub(super) journal: Arc<Mutex<Journal>>,
    pub(super) reports: Reports,
    /// Woken on every exit: capacity may have changed.
    pub(super) capacity_changed: Arc<Notify>,
    /// How long an orphan is kept before it is removed.
    pub(super) orphan_grace: Duration,
}

impl Containers {
    /// Reports the exits of this agent's containers, from Docker's event
    /// stream; reconnects when the engine goes and comes back.
    pub(super) async fn watch(self) {
        loop {
            match self.executor.engine().await {
                Ok(engine) => {
                    self.reconcile(&engine).await;
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let watch = async move {
                        engine
                            .watch_exits(move |ev| {
                                let _ = tx.send(ev);
                            })
                            .await;
                    };
                    let forward = async {
                        while let Some(ev) = rx.recv().await {
                            tracing::info!(container = %ev.name, exit_code = ev.exit_code, oom_killed = ev.oom_killed, "container exited");
                            self.reports.emit(proto::event::Kind::Container(ev)).await;
                            self.capacity_changed.notify_one();
                        }
                    };
                    tokio::join!(watch, forward);
                }
                Err(f) => tracing::debug!("not watching containers: {}", f.message),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Looks at this agent's containers as they are now and settles each
    /// by its [`verdict`].
    async fn reconcile(&self, engine: &Arc<Engine>) {
        let list = match engine.list().await {
            Ok(l) => l,
            Err(f) => {
                tracing::warn!("cannot list containers to reconcile: {}", f.message);
                return;
            }
        };
        for c in list {
            let verdict = verdict(lock(&self.journal).get(&c.command_id), &c.state);
            let event = |kind: proto::ContainerEventKind, exit_code: i64, oom: bool| {
                proto::event::Kind::Container(proto::ContainerEvent {
                    container_id: c.id.clone(),
                    name: c.name.clone(),
                    command_id: c.command_id.clone(),
                    run_id: c.run_id.clone(),
                    kind: kind as i32,
                    exit_code,
                    oom_killed: oom,
                })
            };
            match verdict {
                Verdict::Leave => {}
                Verdict::Adopt => {
                    tracing::info!(container = %c.name, "adopted a running container");
                    self.reports
                        .emit(event(proto::ContainerEventKind::Adopted, 0, false))
                        .await;
                }
                Verdict::ReportExit => {
                    if let Some((code, oom)) = engine.exit_of(&c.id).await {
                        self.reports
                            .emit(event(proto::ContainerEventKind::Exited, code, oom))
                            .await;
                    }
                }
                Verdict::Orphan => {
                    let grace = self.orphan_grace;
                    tracing::warn!(container = %c.name, command = %c.command_id, ?grace,
                        "container carries this agent's labels but no successful command accounts for it; removing it after the grace period");
                    self.reports
                        .emit(event(proto::ContainerEventKind::Orphaned, 0, false))
                        .await;
                    let (reports, engine, id) =
                        (self.reports.clone(), engine.clone(), c.id.clone());
                    let name = c.name.clone();
                    let removed = event(proto::ContainerEventKind::Removed, 0, false);
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        match engine.remove(&id, true).await {
                            Ok(_) => {
                                tracing::info!(container = %name, "removed an orphaned container");
                                reports.emit(removed).await;
                            }
                            Err(f) => {
                                tracing::warn!(container = %name, "cannot remove orphan: {}", f.message)
                            }
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(done: Option<proto::CommandStatus>) -> Entry {
        Entry {
            seq: 1,
            done: done.map(|s| (s as i32, String::new())),
            reported: false,
        }
    }

    #[test]
    fn a_container_whose_command_still_runs_is_left_alone() {
        let e = entry(None);
        assert_eq!(verdict(Some(&e), "running"), Verdict::Leave);
        assert_eq!(verdict(Some(&e), "exited"), Verdict::Leave);
    }

    #[test]
    fn a_container_of_a_successful_command_is_adopted_or_its_exit_reported() {
        let e = entry(Some(proto::CommandStatus::Ok));
        assert_eq!(verdict(Some(&e), "running"), Verdict::Adopt);
        assert_eq!(verdict(Some(&e), "exited"), Verdict::ReportExit);
        assert_eq!(verdict(Some(&e), "created"), Verdict::ReportExit);
    }

    #[test]
    fn a_container_no_successful_command_accounts_for_is_an_orphan() {
        assert_eq!(verdict(None, "running"), Verdict::Orphan);
        assert_eq!(verdict(None, "exited"), Verdict::Orphan);
        for status in [
            proto::CommandStatus::Failed,
            proto::CommandStatus::Interrupted,
        ] {
            let e = entry(Some(status));
            assert_eq!(verdict(Some(&e), "running"), Verdict::Orphan, "{status:?}");
        }
    }
}
