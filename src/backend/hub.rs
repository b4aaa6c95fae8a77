//! Presence and wake-ups, in memory: which agents are connected and how,
//! and a watch per agent that streams and held polls wait on, with the
//! commands just queued for an agent connected here, so that a stream or
//! held poll woken for them can send them without reading them back from
//! the store (see [`Hub::queued_after`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use crate::proto::{self, Transport};

/// Commands held per agent for [`Hub::queued_after`], at most.
const RECENT_MAX: usize = 32;
/// A command larger than this (encoded) is not held: it is read from the
/// store.
pub const RECENT_MAX_BYTES: usize = 4096;

/// What the hub knows of one agent.
struct Slot {
    /// Highest seq heard of as queued; streams and polls wait for it to
    /// change.
    queued: watch::Sender<u64>,
    /// Commands heard of as queued, by seq, while a stream or poll of the
    /// agent is open here (at most [`RECENT_MAX`]).
    recent: BTreeMap<u64, proto::Command>,
    /// Highest seq acknowledged.
    acked: watch::Sender<u64>,
    /// Set when the agent is revoked: its streams and held polls end.
    revoked: watch::Sender<bool>,
    streams: u32,
    polls: u32,
    last_seen_ms: i64,
    transport: Transport,
    reason: String,
    /// Open `Subscribe` streams, oldest first, each with what ends it.
    stream_tickets: VecDeque<(u64, Arc<Notify>)>,
    next_ticket: u64,
}

impl Slot {
    /// Its presence at `now`; None when never heard from.
    fn presence(&self, now: i64) -> Option<Presence> {
        if self.last_seen_ms == 0 {
            return None;
        }
        let connected = self.streams > 0
            || self.polls > 0
            || (self.transport == Transport::Longpoll && now - self.last_seen_ms < POLL_GRACE_MS);
        Some(Presence {
            connected,
            transport: self.transport as i32,
            reason: self.reason.clone(),
            last_seen_ms: self.last_seen_ms,
        })
    }

    fn new() -> Self {
        Slot {
            queued: watch::channel(0).0,
            recent: BTreeMap::new(),
            acked: watch::channel(0).0,
            revoked: watch::channel(false).0,
            streams: 0,
            polls: 0,
            last_seen_ms: 0,
            transport: Transport::Unspecified,
            reason: String::new(),
            stream_tickets: VecDeque::new(),
            next_ticket: 0,
        }
    }
}

/// Presence of one agent, as shown to operators.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Presence {
    pub connected: bool,
    pub transport: i32,
    pub reason: String,
    pub last_seen_ms: i64,
}

/// The hub. Its lock guards only short map operations.
#[derive(Default)]
pub struct Hub {
    slots: Mutex<HashMap<String, Slot>>,
    /// Signalled when a stream or poll opens or closes, so a shared
    /// store hears of it at once (see `Core::publish_presence`).
    opened_or_closed: Notify,
}

/// How long after its last poll a long-polling agent still counts as
/// connected (it is between two polls).
const POLL_GRACE_MS: i64 = 5_000;

impl Hub {
    fn with<T>(&self, agent: &str, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(agent.to_string()).or_insert_with(Slot::new);
        f(slot)
    }

    /// A receiver that changes whenever a command is queued for `agent`.
    pub fn queued(&self, agent: &str) -> watch::Receiver<u64> {
        self.with(agent, |s| s.queued.subscribe())
    }

    /// Wakes every stream and held poll of `agent` after `seq` was queued
    /// for it, holding `command` (the one queued, when known) for them
    /// while one is open. A second notice of a command held wakes nobody;
    /// any other does, even below the highest seq heard of (a database
    /// restored from an older copy numbers again from there).
    pub fn notify_queued(&self, agent: &str, seq: u64, command: Option<&proto::Command>) {
        self.with(agent, |s| {
            let again = match command {
                Some(c) => s.recent.get(&seq) == Some(c),
                None => s.recent.contains_key(&seq),
            };
            if let Some(c) = command
                && !again
                && c.seq == seq
                && s.streams + s.polls > 0
                && prost::Message::encoded_len(c) <= RECENT_MAX_BYTES
            {
                s.recent.insert(seq, c.clone());
                while s.recent.len() > RECENT_MAX {
                    s.recent.pop_first();
                }
            }
            s.queued.send_if_modified(|heard| {
                *heard = (*heard).max(seq);
                !again
            });
        })
    }

    /// The commands after `after` up to the highest seq heard of as
    /// queued, when this hub holds every one of them (at least one); None
    /// when any must be read from the store. Forgets those up to `after`.
    ///
    /// Only for a stream or poll that read the store once since it opened:
    /// commands queued before were not all heard of here.
    pub fn queued_after(&self, agent: &str, after: u64) -> Option<Vec<proto::Command>> {
        self.with(agent, |s| {
            s.recent = s.recent.split_off(&(after + 1));
            let heard = *s.queued.borrow();
            if heard <= after {
                return None;
            }
            let held: Vec<_> = s.recent.range(..=heard).map(|(_, c)| c.clone()).collect();
            (held.len() as u64 == heard - after).then_some(held)
        })
    }

    /// Wakes every stream and held poll of every agent: each looks at the
    /// store again (after changes may have been missed), and what was
    /// held of the commands queued is forgotten.
    pub fn wake_all(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.values_mut() {
            s.recent.clear();
            s.queued.send_modify(|_| {});
        }
    }

    /// A receiver that turns true when `agent` is revoked.
    pub fn revoked(&self, agent: &str) -> watch::Receiver<bool> {
        self.with(agent, |s| s.revoked.subscribe())
    }

    /// Ends every stream and held poll of `agent` on this backend.
    pub fn revoke(&self, agent: &str) {
        self.with(agent, |s| {
            s.revoked.send_replace(true);
        })
    }

    /// A receiver of `agent`'s highest acknowledged seq.
    pub fn acked(&self, agent: &str) -> watch::Receiver<u64> {
        self.with(agent, |s| s.acked.subscribe())
    }

    /// Publishes `agent`'s ack.
    pub fn notify_acked(&self, agent: &str, ack: u64) {
        self.with(agent, |s| {
            s.acked.send_if_modified(|v| {
                if ack > *v {
                    *v = ack;
                    true
                } else {
                    false
                }
            });
        })
    }

    /// Marks a stream or a held poll as open until the guard drops.
    pub fn open(
        self: &Arc<Self>,
        agent: &str,
        transport: Transport,
        reason: &str,
        now: i64,
    ) -> Connection {
        self.with(agent, |s| {
            match transport {
                Transport::Grpc => s.streams += 1,
                _ => s.polls += 1,
            }
            s.transport = transport;
            s.reason = reason.to_string();
            s.last_seen_ms = now;
        });
        self.opened_or_closed.notify_one();
        Connection {
            hub: self.clone(),
            agent: agent.to_string(),
            transport,
        }
    }

    /// Registers a new `Subscribe` stream of `agent`. When the agent then
    /// holds more than `max`, the oldest is told to end (its
    /// [`StreamTicket::replaced`] completes): a reconnecting agent always
    /// gets in, and one credential cannot hold streams without bound.
    pub fn admit_stream(self: &Arc<Self>, agent: &str, max: usize) -> StreamTicket {
        let replaced = Arc::new(Notify::new());
        let id = self.with(agent, |s| {
            s.next_ticket += 1;
            s.stream_tickets
                .push_back((s.next_ticket, replaced.clone()));
            while s.stream_tickets.len() > max.max(1) {
                if let Some((_, oldest)) = s.stream_tickets.pop_front() {
                    oldest.notify_one();
                }
            }
            s.next_ticket
        });
        StreamTicket {
            hub: self.clone(),
            agent: agent.to_string(),
            id,
            replaced,
        }
    }

    /// Records that `agent` was heard from.
    pub fn touch(&self, agent: &str, now: i64) {
        self.with(agent, |s| s.last_seen_ms = s.last_seen_ms.max(now))
    }

    /// The presence of `agent`, if the hub has seen it since start.
    pub fn presence(&self, agent: &str, now: i64) -> Option<Presence> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(agent).and_then(|s| s.presence(now))
    }

    /// The presence of every agent the hub has seen since start.
    pub fn presences(&self, now: i64) -> Vec<(String, Presence)> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(|(a, s)| Some((a.clone(), s.presence(now)?)))
            .collect()
    }

    /// Completes when a stream or poll opened or closed since the last
    /// call.
    pub async fn opened_or_closed(&self) {
        self.opened_or_closed.notified().await
    }
}

/// A `Subscribe` stream's place among its agent's streams.
pub struct StreamTicket {
    hub: Arc<Hub>,
    agent: String,
    id: u64,
    replaced: Arc<Notify>,
}

impl StreamTicket {
    /// Completes when a newer stream of the same agent replaced this one.
    pub async fn replaced(&self) {
        self.replaced.notified().await
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        self.hub.with(&self.agent, |s| {
            s.stream_tickets.retain(|(id, _)| *id != self.id)
        });
    }
}

/// An open stream or held poll; closing it updates presence.
pub struct Connection {
    hub: Arc<Hub>,
    agent: String,
    transport: Transport,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let now = crate::now_unix_ms();
        self.hub.with(&self.agent, |s| {
            match self.transport {
                Transport::Grpc => s.streams = s.streams.saturating_sub(1),
                _ => s.polls = s.polls.saturating_sub(1),
            }
            s.last_seen_ms = s.last_seen_ms.max(now);
            // Nobody here to send them to: the next stream or poll reads
            // the store first.
            if s.streams + s.polls == 0 {
                s.recent.clear();
            }
        });
        self.hub.opened_or_closed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_follows_streams_and_polls() {
        let hub = Arc::new(Hub::default());
        assert!(hub.presence("a", 0).is_none());
        let stream = hub.open("a", Transport::Grpc, "configured", 1000);
        let p = hub.presence("a", 1000).unwrap();
        assert!(p.connected);
        assert_eq!(p.transport, Transport::Grpc as i32);
        drop(stream);
        let p = hub.presence("a", crate::now_unix_ms() + 1).unwrap();
        assert!(!p.connected);

        let now = crate::now_unix_ms();
        drop(hub.open("a", Transport::Longpoll, "configured", now));
        // Between two polls the agent still counts as connected...
        assert!(hub.presence("a", now + 1000).unwrap().connected);
        // ...but not long after.
        assert!(!hub.presence("a", now + 60_000).unwrap().connected);
    }

    #[tokio::test]
    async fn a_stream_past_the_limit_replaces_the_oldest() {
        let hub = Arc::new(Hub::default());
        let first = hub.admit_stream("a", 2);
        let second = hub.admit_stream("a", 2);
        let other = hub.admit_stream("b", 2);
        let third = hub.admit_stream("a", 2);
        let ended =
            |t: &StreamTicket| futures_util::FutureExt::now_or_never(t.replaced()).is_some();
        assert!(ended(&first));
        assert!(!ended(&second) && !ended(&third) && !ended(&other));
        // A stream that ends leaves room: the next one replaces nobody.
        drop(second);
        let fourth = hub.admit_stream("a", 2);
        assert!(!ended(&third) && !ended(&fourth));
    }

    fn command(seq: u64) -> proto::Command {
        proto::Command {
            id: format!("cmd_{seq}"),
            seq,
            ..Default::default()
        }
    }

    fn seqs(held: Option<Vec<proto::Command>>) -> Option<Vec<u64>> {
        held.map(|h| h.iter().map(|c| c.seq).collect())
    }

    #[test]
    fn commands_are_held_only_for_an_agent_connected_here() {
        let hub = Arc::new(Hub::default());
        hub.notify_queued("a", 1, Some(&command(1)));
        assert_eq!(seqs(hub.queued_after("a", 0)), None, "not connected: read");
        let _stream = hub.open("a", Transport::Grpc, "configured", 1);
        hub.notify_queued("a", 2, Some(&command(2)));
        hub.notify_queued("a", 3, Some(&command(3)));
        assert_eq!(seqs(hub.queued_after("a", 1)), Some(vec![2, 3]));
        assert_eq!(seqs(hub.queued_after("a", 0)), None, "1 was not held");
        assert_eq!(seqs(hub.queued_after("a", 3)), None, "nothing after 3");
    }

    #[test]
    fn a_gap_or_a_command_heard_of_without_its_body_is_read_from_the_store() {
        let hub = Arc::new(Hub::default());
        let _poll = hub.open("a", Transport::Longpoll, "configured", 1);
        hub.notify_queued("a", 1, Some(&command(1)));
        // 3 heard of before 2 (queued through two backends).
        hub.notify_queued("a", 3, Some(&command(3)));
        assert_eq!(seqs(hub.queued_after("a", 0)), None);
        hub.notify_queued("a", 2, Some(&command(2)));
        assert_eq!(seqs(hub.queued_after("a", 0)), Some(vec![1, 2, 3]));
        // 4 without its body (too large for the notification).
        hub.notify_queued("a", 4, None);
        assert_eq!(seqs(hub.queued_after("a", 3)), None);
        // A body larger than the bound is not held.
        let mut big = command(5);
        big.id = "x".repeat(RECENT_MAX_BYTES);
        hub.notify_queued("a", 5, Some(&big));
        assert_eq!(seqs(hub.queued_after("a", 4)), None);
        // A seq whose body does not match is not held.
        hub.notify_queued("a", 6, Some(&command(7)));
        assert_eq!(seqs(hub.queued_after("a", 5)), None);
    }

    #[test]
    fn after_a_missed_change_everything_is_read_from_the_store() {
        let hub = Arc::new(Hub::default());
        let _stream = hub.open("a", Transport::Grpc, "configured", 1);
        hub.notify_queued("a", 1, Some(&command(1)));
        hub.wake_all();
        assert_eq!(seqs(hub.queued_after("a", 0)), None);
    }

    #[test]
    fn a_second_notice_of_a_held_command_wakes_nobody() {
        let hub = Arc::new(Hub::default());
        let _stream = hub.open("a", Transport::Grpc, "configured", 1);
        let mut rx = hub.queued("a");
        hub.notify_queued("a", 2, Some(&command(2)));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        hub.notify_queued("a", 2, None);
        hub.notify_queued("a", 2, Some(&command(2)));
        assert!(!rx.has_changed().unwrap());
        assert_eq!(*rx.borrow(), 2);
        // A seq below the highest, not held: a database numbering again
        // after a restore. It wakes, and is read from the store.
        hub.notify_queued("a", 1, None);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow(), 2, "the highest heard of stays");
        assert_eq!(seqs(hub.queued_after("a", 0)), None);
    }

    #[test]
    fn held_commands_are_dropped_when_the_agent_has_nothing_open_here() {
        let hub = Arc::new(Hub::default());
        let stream = hub.open("a", Transport::Grpc, "configured", 1);
        let poll = hub.open("a", Transport::Longpoll, "configured", 1);
        hub.notify_queued("a", 1, Some(&command(1)));
        drop(stream);
        assert_eq!(
            seqs(hub.queued_after("a", 0)),
            Some(vec![1]),
            "a poll is open"
        );
        hub.notify_queued("a", 2, Some(&command(2)));
        drop(poll);
        let _again = hub.open("a", Transport::Grpc, "configured", 1);
        assert_eq!(seqs(hub.queued_after("a", 1)), None);
    }

    #[test]
    fn held_commands_are_bounded() {
        let hub = Arc::new(Hub::default());
        let _stream = hub.open("a", Transport::Grpc, "configured", 1);
        for seq in 1..=(RECENT_MAX as u64 + 10) {
            hub.notify_queued("a", seq, Some(&command(seq)));
        }
        assert_eq!(
            seqs(hub.queued_after("a", 0)),
            None,
            "the oldest were dropped"
        );
        let last = RECENT_MAX as u64 + 10;
        assert_eq!(
            seqs(hub.queued_after("a", last - 2)),
            Some(vec![last - 1, last])
        );
    }

    #[test]
    fn acks_only_move_forward() {
        let hub = Hub::default();
        let rx = hub.acked("a");
        hub.notify_acked("a", 5);
        hub.notify_acked("a", 3);
        assert_eq!(*rx.borrow(), 5);
    }
}
