//! Intake: a delivered command is accepted through the journal (at most
//! once per id, across restarts), the ack advances, and the command runs
//! in a task of its own, at most [`MAX_RUNNING`] at once. Its progress and
//! result go to the reporter. After a restart, [`recover`] settles what
//! the journal says was running or not yet reported.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore, mpsc, watch};

use super::super::executor::{self, Executor};
use super::super::journal::{Decision, Journal};
use super::reporter::Reports;
use crate::client::{CallError, FailureKind};
use crate::proto;

/// Commands executing at once at most.
const MAX_RUNNING: u32 = 256;

/// The message of a command the agent stopped while it ran.
const INTERRUPTED: &str =
    "the agent stopped while this command ran; it is not run again (commands run at most once)";

/// Locks the journal; a poisoned lock still holds a consistent journal
/// (every change is one call).
pub(super) fn lock(journal: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(|e| e.into_inner())
}

/// What to do with a delivered command, once the journal decided.
#[derive(Debug, PartialEq)]
enum Admission {
    /// Accepted and journaled: run it.
    Run,
    /// Not run (again); send this result instead.
    Answer(proto::CommandResult),
    /// Not run again, and no result to send yet (it is still running).
    Nothing,
}

/// Decides on a delivered command through the journal and, when it is
/// new, accepts it durably (the ack advances with it).
fn admit(j: &mut Journal, c: &proto::Command) -> std::io::Result<Admission> {
    match j.decide(c.seq, &c.id) {
        Decision::Duplicate => {
            // Delivered again: the backend has not seen our ack or
            // result. Never run it again; send the result we have.
            tracing::debug!(command = %c.id, seq = c.seq, "duplicate delivery; not executed again");
            crate::telemetry::duplicate();
            Ok(match j.get(&c.id).and_then(|e| e.done.clone()) {
                Some((status, message)) => Admission::Answer(proto::CommandResult {
                    command_id: c.id.clone(),
                    status,
                    message,
                    detail: None,
                }),
                None => Admission::Nothing,
            })
        }
        Decision::Reused => {
            let message = format!(
                "not executed: seq {} was already used by another command on this agent; the backend's \
                 store lost recent commits and reused it; queue the command again",
                c.seq
            );
            tracing::warn!(command = %c.id, seq = c.seq, "{message}");
            Ok(Admission::Answer(proto::CommandResult {
                command_id: c.id.clone(),
                status: proto::CommandStatus::Failed as i32,
                message,
                detail: None,
            }))
        }
        Decision::Execute { skipped } => {
            if skipped > 0 {
                tracing::warn!(
                    seq = c.seq,
                    skipped,
                    "the journal is behind the backend's ack (state dir lost or restored?); the skipped commands were accepted before and are not run again"
                );
            }
            j.accept(c.seq, &c.id)?;
            Ok(Admission::Run)
        }
    }
}

/// Command intake: the journal, the ack, and the commands running.
pub(super) struct Intake {
    journal: Arc<Mutex<Journal>>,
    /// The highest seq accepted: sent with every `Subscribe`, `Poll` and
    /// `Report`.
    ack: watch::Sender<u64>,
    running: Arc<Semaphore>,
    executor: Arc<Executor>,
    reports: Reports,
    /// Wakes the capacity reporter after a command that may change it.
    capacity_changed: Arc<Notify>,
}

impl Intake {
    pub(super) fn new(
        journal: Arc<Mutex<Journal>>,
        executor: Arc<Executor>,
        reports: Reports,
        capacity_changed: Arc<Notify>,
    ) -> Self {
        let ack = watch::channel(lock(&journal).ack()).0;
        Intake {
            journal,
            ack,
            running: Arc::new(Semaphore::new(MAX_RUNNING as usize)),
            executor,
            reports,
            capacity_changed,
        }
    }

    /// Follows the ack.
    pub(super) fn ack(&self) -> watch::Receiver<u64> {
        self.ack.subscribe()
    }

    /// Accepts a delivered command through the journal and starts it. An
    /// error means the journal cannot be written: the session fails.
    pub(super) fn accept(&self, c: proto::Command) -> Result<(), CallError> {
        let received = crate::now_unix_ms();
        let ack = {
            let mut j = lock(&self.journal);
            match admit(&mut j, &c) {
                Ok(Admission::Run) => j.ack(),
                Ok(Admission::Answer(r)) => {
                    drop(j);
                    let reports = self.reports.clone();
                    tokio::spawn(async move { reports.result(r).await });
                    return Ok(());
                }
                Ok(Admission::Nothing) => return Ok(()),
                Err(e) => {
                    return Err(CallError {
                        kind: FailureKind::Other,
                        message: format!(
                            "cannot write the journal, so the command cannot be accepted: {e}"
                        ),
                    });
                }
            }
        };
        self.ack.send_replace(ack);
        let kind = executor::kind_name(&c);
        tracing::info!(command = %c.id, seq = c.seq, kind, "executing command");
        let running = self.running.clone();
        let executor = self.executor.clone();
        let journal = self.journal.clone();
        let reports = self.reports.clone();
        let capacity_changed = self.capacity_changed.clone();
        tokio::spawn(async move {
            let Ok(_permit) = running.acquire_owned().await else {
                return;
            };
            // Progress is sent as it comes; it never blocks the command.
            // Bounded: progress is advisory, so a full buffer drops an
            // update rather than holding the command up.
            let (ptx, mut prx) = mpsc::channel(64);
            let forward = {
                let reports = reports.clone();
                tokio::spawn(async move {
                    while let Some(p) = prx.recv().await {
                        reports.emit(proto::event::Kind::Progress(p)).await;
                    }
                })
            };
            let result = executor
                .execute(&c, received, |p| {
                    let _ = ptx.try_send(p);
                })
                .await;
            drop(ptx);
            let _ = forward.await;
            let finished = lock(&journal).finish(&c.id, result.status, &result.message);
            if let Err(e) = finished {
                tracing::warn!(command = %c.id, error = %e, "journal write failed");
            }
            let status = proto::CommandStatus::try_from(result.status)
                .map(|s| s.as_str_name())
                .unwrap_or("COMMAND_STATUS_UNSPECIFIED");
            crate::telemetry::command(status);
            tracing::info!(command = %c.id, status, "command finished");
            reports.result(result).await;
            if changes_capacity(kind) {
                capacity_changed.notify_one();
            }
        });
        Ok(())
    }

    /// Waits until no command runs, until `deadline`; the permits it
    /// returns keep any further command from starting while held. None
    /// when commands still ran at the deadline.
    pub(super) async fn drain(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        tokio::time::timeout_at(deadline, self.running.acquire_many(MAX_RUNNING))
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// True when a command of `kind` may change what the agent can take.
fn changes_capacity(kind: &str) -> bool {
    !matches!(kind, "ping" | "list_containers" | "container_logs")
}

/// Marks `id` interrupted in the journal and returns its result.
fn interrupt(j: &mut Journal, id: String, seq: u64) -> proto::CommandResult {
    tracing::warn!(command = %id, seq, "command interrupted by an agent restart");
    if let Err(e) = j.finish(&id, proto::CommandStatus::Interrupted as i32, INTERRUPTED) {
        tracing::warn!(error = %e, "journal write failed");
    }
    proto::CommandResult {
        command_id: id,
        status: proto::CommandStatus::Interrupted as i32,
        message: INTERRUPTED.into(),
        detail: None,
    }
}

/// After a restart: commands that were running are reported as
/// interrupted (never run again), and results that may not have reached
/// the backend are sent again.
pub(super) async fn recover(journal: Arc<Mutex<Journal>>, reports: Reports) {
    let (unfinished, unreported) = {
        let j = lock(&journal);
        (j.unfinished(), j.unreported())
    };
    for (id, seq) in unfinished {
        let r = interrupt(&mut lock(&journal), id, seq);
        reports.result(r).await;
    }
    for (id, _seq, status, message) in unreported {
        reports
            .result(proto::CommandResult {
                command_id: id,
                status,
                message,
                detail: None,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::reporter::Events;
    use super::*;

    fn command(id: &str, seq: u64) -> proto::Command {
        proto::Command {
            id: id.into(),
            seq,
            created_unix_ms: 0,
            spec: Some(proto::CommandSpec {
                kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                    delay_ms: 0,
                    payload: "p".into(),
                })),
            }),
        }
    }

    fn journal(dir: &tempfile::TempDir) -> Journal {
        Journal::open(&dir.path().join("journal.log")).unwrap()
    }

    async fn next_result(events: &mut Events) -> proto::CommandResult {
        loop {
            match events.recv().await {
                Some(proto::event::Kind::Result(r)) => return r,
                Some(_) => continue,
                None => panic!("the events channel closed"),
            }
        }
    }

    #[test]
    fn a_new_command_is_journaled_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        assert_eq!(admit(&mut j, &command("a", 1)).unwrap(), Admission::Run);
        assert_eq!(j.ack(), 1);
        assert!(j.get("a").is_some_and(|e| e.done.is_none()));
        // Durable: a journal opened again knows it.
        drop(j);
        assert_eq!(journal(&dir).ack(), 1);
    }

    #[test]
    fn a_duplicate_is_never_run_again_and_gets_its_result_once_finished() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        admit(&mut j, &command("a", 1)).unwrap();
        // Still running: nothing to send.
        assert_eq!(admit(&mut j, &command("a", 1)).unwrap(), Admission::Nothing);
        j.finish("a", proto::CommandStatus::Ok as i32, "pong")
            .unwrap();
        assert_eq!(
            admit(&mut j, &command("a", 1)).unwrap(),
            Admission::Answer(proto::CommandResult {
                command_id: "a".into(),
                status: proto::CommandStatus::Ok as i32,
                message: "pong".into(),
                detail: None,
            })
        );
        assert_eq!(j.ack(), 1);
    }

    #[test]
    fn a_reused_seq_is_answered_with_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        admit(&mut j, &command("a", 1)).unwrap();
        admit(&mut j, &command("b", 2)).unwrap();
        let Admission::Answer(r) = admit(&mut j, &command("other", 2)).unwrap() else {
            panic!("a reused seq must be answered");
        };
        assert_eq!(r.command_id, "other");
        assert_eq!(r.status, proto::CommandStatus::Failed as i32);
        assert!(
            r.message.contains("seq 2 was already used"),
            "{}",
            r.message
        );
        assert!(j.get("other").is_none());
        assert_eq!(j.ack(), 2);
    }

    #[test]
    fn a_journal_behind_the_backend_accepts_and_jumps_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        assert_eq!(admit(&mut j, &command("c", 5)).unwrap(), Admission::Run);
        assert_eq!(j.ack(), 5);
    }

    #[test]
    fn only_container_changes_wake_the_capacity_reporter() {
        for kind in ["ping", "list_containers", "container_logs"] {
            assert!(!changes_capacity(kind), "{kind}");
        }
        for kind in [
            "pull_image",
            "run_container",
            "stop_container",
            "remove_container",
            "unknown",
        ] {
            assert!(changes_capacity(kind), "{kind}");
        }
    }

    fn intake(dir: &tempfile::TempDir) -> (Intake, Events, Arc<Notify>) {
        let (reports, events) = Reports::channel();
        let notify = Arc::new(Notify::new());
        let intake = Intake::new(
            Arc::new(Mutex::new(journal(dir))),
            Arc::new(Executor::new("agent", Default::default())),
            reports,
            notify.clone(),
        );
        (intake, events, notify)
    }

    #[tokio::test]
    async fn an_accepted_command_advances_the_ack_runs_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, mut events, _) = intake(&dir);
        let ack = intake.ack();
        assert_eq!(*ack.borrow(), 0);
        intake.accept(command("a", 1)).unwrap();
        assert_eq!(*ack.borrow(), 1);
        let r = next_result(&mut events).await;
        assert_eq!(r.command_id, "a");
        assert_eq!(r.status, proto::CommandStatus::Ok as i32);
        // Finished in the journal before the result was sent.
        let done = lock(&intake.journal).get("a").and_then(|e| e.done.clone());
        assert_eq!(done, Some((proto::CommandStatus::Ok as i32, "pong".into())));

        // Delivered again: answered from the journal, not run again.
        intake.accept(command("a", 1)).unwrap();
        let again = next_result(&mut events).await;
        assert_eq!(again.command_id, "a");
        assert_eq!(again.status, proto::CommandStatus::Ok as i32);
        assert_eq!(again.detail, None, "the stored result, not a new run");
        assert_eq!(*ack.borrow(), 1);
        assert!(intake.drain(tokio::time::Instant::now()).await.is_some());
    }

    #[tokio::test]
    async fn recovery_interrupts_what_ran_and_resends_what_was_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = journal(&dir);
            j.accept(1, "ran").unwrap();
            j.accept(2, "done").unwrap();
            j.finish("done", proto::CommandStatus::Ok as i32, "ok")
                .unwrap();
            j.accept(3, "reported").unwrap();
            j.finish("reported", proto::CommandStatus::Ok as i32, "ok")
                .unwrap();
            j.mark_reported("reported").unwrap();
        }
        let journal = Arc::new(Mutex::new(journal(&dir)));
        let (reports, mut events) = Reports::channel();
        recover(journal.clone(), reports).await;
        let first = next_result(&mut events).await;
        assert_eq!(first.command_id, "ran");
        assert_eq!(first.status, proto::CommandStatus::Interrupted as i32);
        assert_eq!(first.message, INTERRUPTED);
        let second = next_result(&mut events).await;
        assert_eq!(second.command_id, "done");
        assert_eq!(second.message, "ok");
        assert!(events.recv().await.is_none(), "nothing else is sent");
        let ran = lock(&journal).get("ran").and_then(|e| e.done.clone());
        assert_eq!(
            ran,
            Some((proto::CommandStatus::Interrupted as i32, INTERRUPTED.into()))
        );
    }
}
