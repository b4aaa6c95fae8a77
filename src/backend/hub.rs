//! Presence and wake-ups, in memory: which agents are connected and how,
//! and a watch per agent that streams and held polls wait on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use crate::proto::Transport;

/// What the hub knows of one agent.
struct Slot {
    /// Highest seq queued; streams and polls wait for it to change.
    queued: watch::Sender<u64>,
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

    /// Wakes every stream and held poll of `agent`.
    pub fn notify_queued(&self, agent: &str, seq: u64) {
        self.with(agent, |s| {
            s.queued.send_replace(seq);
        })
    }

    /// Wakes every stream and held poll of every agent: each looks at the
    /// store again (after changes may have been missed).
    pub fn wake_all(&self) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.values() {
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

    #[test]
    fn acks_only_move_forward() {
        let hub = Hub::default();
        let rx = hub.acked("a");
        hub.notify_acked("a", 5);
        hub.notify_acked("a", 3);
        assert_eq!(*rx.borrow(), 5);
    }
}
