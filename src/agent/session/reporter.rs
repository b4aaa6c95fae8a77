//! The reporter: the one task that sends events (results, progress,
//! container events, capacity) and the ack to the backend, on the current
//! rung's unary client, and keeps every event until the backend
//! acknowledges its seq.
//!
//! Other tasks hand it events through a [`Reports`] handle. The events
//! channel holds [`EVENT_BUFFER`] entries and the reporter's [`Window`]
//! at most [`MAX_UNACKED_EVENTS`] unacknowledged ones; when both are
//! full, senders wait (results are never dropped, memory stays bounded).
//! A `Report` carries at most [`REPORT_BATCH`] events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::super::journal::Journal;
use super::credential::Credential;
use super::transport::Unary;
use crate::backoff::{Backoff, Retry};
use crate::proto;

/// Events buffered between their senders and the reporter.
pub(super) const EVENT_BUFFER: usize = 1024;
/// Events per `Report` at most.
const REPORT_BATCH: usize = 500;
/// Events the reporter holds unacknowledged at most; beyond, it stops
/// taking events and senders wait on the full channel.
const MAX_UNACKED_EVENTS: usize = 4096;

/// A handle to queue events for the reporter. Cloneable; it also counts
/// the events emitted and not yet acknowledged, which shutdown waits on.
#[derive(Clone)]
pub(super) struct Reports {
    events: mpsc::Sender<proto::event::Kind>,
    unacked: Arc<watch::Sender<usize>>,
}

impl Reports {
    /// A handle and the receiving end the reporter takes.
    pub(super) fn channel() -> (Reports, Events) {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let unacked = Arc::new(watch::channel(0).0);
        (
            Reports {
                events: tx,
                unacked: unacked.clone(),
            },
            Events { rx, unacked },
        )
    }

    /// Queues an event for the reporter; waits when its buffer is full.
    pub(super) async fn emit(&self, kind: proto::event::Kind) {
        self.unacked.send_modify(|n| *n += 1);
        if self.events.send(kind).await.is_err() {
            self.unacked.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Queues a command's result.
    pub(super) async fn result(&self, r: proto::CommandResult) {
        self.emit(proto::event::Kind::Result(r)).await;
    }

    /// Follows the count of events emitted and not yet acknowledged.
    pub(super) fn unacked(&self) -> watch::Receiver<usize> {
        self.unacked.subscribe()
    }
}

/// The reporter's end of the events channel.
pub(super) struct Events {
    rx: mpsc::Receiver<proto::event::Kind>,
    unacked: Arc<watch::Sender<usize>>,
}

#[cfg(test)]
impl Events {
    /// The next event, as the reporter would take it.
    pub(super) async fn recv(&mut self) -> Option<proto::event::Kind> {
        self.rx.recv().await
    }
}

/// The events sent and not yet acknowledged, numbered in order (pure: no
/// I/O, no clock of its own).
struct Window {
    pending: VecDeque<proto::Event>,
    next_seq: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            pending: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// True while it may take another event.
    fn has_room(&self) -> bool {
        self.pending.len() < MAX_UNACKED_EVENTS
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Numbers an event and keeps it.
    fn push(&mut self, kind: proto::event::Kind, time_unix_ms: i64) {
        self.pending.push_back(proto::Event {
            seq: self.next_seq,
            time_unix_ms,
            kind: Some(kind),
        });
        self.next_seq += 1;
    }

    /// The next `Report`'s events: the oldest, [`REPORT_BATCH`] at most.
    fn batch(&self) -> Vec<proto::Event> {
        self.pending.iter().take(REPORT_BATCH).cloned().collect()
    }

    /// Drops the events up to `acked_seq`; returns how many went and the
    /// command ids whose results went with them.
    fn acked(&mut self, acked_seq: u64) -> (usize, Vec<String>) {
        let before = self.pending.len();
        let mut results = Vec::new();
        while self
            .pending
            .front()
            .map(|e| e.seq <= acked_seq)
            .unwrap_or(false)
        {
            if let Some(proto::Event {
                kind: Some(proto::event::Kind::Result(r)),
                ..
            }) = self.pending.pop_front()
            {
                results.push(r.command_id);
            }
        }
        (before - self.pending.len(), results)
    }
}

/// What the reporter needs besides its events.
pub(super) struct Reporter {
    /// The epoch of this process's events (see [`crate::agent::epoch`]).
    pub(super) epoch: u64,
    pub(super) credential: Credential,
    pub(super) backoff: Backoff,
    /// The journal, told which results reached the backend.
    pub(super) journal: Arc<Mutex<Journal>>,
    /// The ack to send (intake advances it).
    pub(super) ack: watch::Receiver<u64>,
    /// The unary client of the current rung.
    pub(super) unary: watch::Receiver<Option<Unary>>,
    /// The last ack the backend confirmed receiving.
    pub(super) ack_delivered: watch::Sender<u64>,
}

impl Reporter {
    /// Sends events and acks to the backend on the current rung's unary
    /// client; keeps events until acknowledged.
    pub(super) async fn run(self, events: Events) {
        let Reporter {
            epoch,
            credential,
            backoff,
            journal,
            ack: mut ack_rx,
            unary: mut unary_rx,
            ack_delivered,
        } = self;
        let Events {
            rx: mut events,
            unacked,
        } = events;
        let mut window = Window::new();
        let mut sent_ack = u64::MAX; // Send the ack once at start.
        let mut retry = Retry::new(backoff);
        loop {
            while window.has_room() {
                match events.try_recv() {
                    Ok(k) => window.push(k, crate::now_unix_ms()),
                    Err(_) => break,
                }
            }
            let ack = *ack_rx.borrow_and_update();
            if window.is_empty() && ack == sent_ack {
                tokio::select! {
                    k = events.recv() => match k {
                        Some(k) => window.push(k, crate::now_unix_ms()),
                        None => return,
                    },
                    r = ack_rx.changed() => if r.is_err() { return },
                }
                continue;
            }
            let unary = unary_rx.borrow_and_update().clone();
            let Some(unary) = unary else {
                // No rung yet: keep taking events (up to the bound) so that
                // nobody waits on a full channel before the first connect.
                tokio::select! {
                    r = unary_rx.changed() => if r.is_err() { return },
                    k = events.recv(), if window.has_room() => match k {
                        Some(k) => window.push(k, crate::now_unix_ms()),
                        None => return,
                    },
                }
                continue;
            };
            let req = proto::ReportRequest {
                ack,
                epoch,
                events: window.batch(),
            };
            match unary.report(&credential.get(), req).await {
                Ok(resp) => {
                    retry.reset();
                    sent_ack = ack;
                    ack_delivered.send_replace(ack);
                    let (done, reported) = window.acked(resp.acked_seq);
                    for id in reported {
                        let mut j = journal.lock().unwrap_or_else(|e| e.into_inner());
                        if let Err(e) = j.mark_reported(&id) {
                            tracing::debug!(error = %e, "journal write failed");
                        }
                    }
                    unacked.send_modify(|n| *n = n.saturating_sub(done));
                    if done == 0 && !window.is_empty() {
                        // The backend stored none of them: do not hammer it.
                        let d = retry.next_delay();
                        tracing::debug!("report stored nothing; retrying in {d:.1?}");
                        tokio::time::sleep(d).await;
                    }
                }
                Err(e) => {
                    let d = retry.next_delay();
                    tracing::debug!(
                        failure = e.label(),
                        "report failed: {e}; retrying in {d:.1?}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = unary_rx.changed() => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str) -> proto::event::Kind {
        proto::event::Kind::Result(proto::CommandResult {
            command_id: id.into(),
            ..Default::default()
        })
    }

    fn capacity() -> proto::event::Kind {
        proto::event::Kind::Capacity(proto::Capacity::default())
    }

    #[test]
    fn events_are_numbered_from_one_in_order() {
        let mut w = Window::new();
        w.push(result("a"), 7);
        w.push(capacity(), 8);
        let b = w.batch();
        assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b[0].time_unix_ms, 7);
        assert_eq!(b[0].kind, Some(result("a")));
    }

    #[test]
    fn a_report_carries_the_oldest_events_up_to_the_batch_size() {
        let mut w = Window::new();
        for _ in 0..REPORT_BATCH + 10 {
            w.push(capacity(), 0);
        }
        let b = w.batch();
        assert_eq!(b.len(), REPORT_BATCH);
        assert_eq!(b.first().map(|e| e.seq), Some(1));
        assert_eq!(b.last().map(|e| e.seq), Some(REPORT_BATCH as u64));
        // Nothing is dropped by building a report: the same batch again.
        assert_eq!(w.batch(), b);
    }

    #[test]
    fn the_window_is_bounded() {
        let mut w = Window::new();
        for _ in 0..MAX_UNACKED_EVENTS - 1 {
            w.push(capacity(), 0);
        }
        assert!(w.has_room());
        w.push(capacity(), 0);
        assert!(!w.has_room());
        w.acked(1);
        assert!(w.has_room());
    }

    #[test]
    fn an_ack_drops_events_up_to_its_seq_and_names_the_results() {
        let mut w = Window::new();
        w.push(result("a"), 0);
        w.push(capacity(), 0);
        w.push(result("b"), 0);
        w.push(result("c"), 0);
        assert_eq!(w.acked(0), (0, vec![]));
        assert_eq!(w.acked(3), (3, vec!["a".to_string(), "b".to_string()]));
        assert_eq!(w.batch().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
        // An ack below what was dropped changes nothing.
        assert_eq!(w.acked(2), (0, vec![]));
        assert_eq!(w.acked(u64::MAX), (1, vec!["c".to_string()]));
        assert!(w.is_empty());
        // Numbering goes on after the window emptied.
        w.push(capacity(), 0);
        assert_eq!(w.batch()[0].seq, 5);
    }

    #[tokio::test]
    async fn emitting_counts_an_unacked_event_and_waits_when_the_buffer_is_full() {
        let (reports, mut events) = Reports::channel();
        let unacked = reports.unacked();
        for _ in 0..EVENT_BUFFER {
            reports.emit(capacity()).await;
        }
        assert_eq!(*unacked.borrow(), EVENT_BUFFER);
        let late = {
            let reports = reports.clone();
            tokio::spawn(async move { reports.emit(capacity()).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!late.is_finished(), "a full buffer makes the sender wait");
        assert!(events.rx.recv().await.is_some());
        late.await.unwrap();
        assert_eq!(*unacked.borrow(), EVENT_BUFFER + 1);
    }

    #[tokio::test]
    async fn an_event_nobody_takes_is_not_counted() {
        let (reports, events) = Reports::channel();
        drop(events);
        reports.result(proto::CommandResult::default()).await;
        assert_eq!(*reports.unacked().borrow(), 0);
    }
}
