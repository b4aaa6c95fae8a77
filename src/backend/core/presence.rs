//! Presence across backends that share a store: each backend publishes
//! which agents' connections it holds (and that it is alive), and answers
//! for every agent from its own hub and what the others published.
//!
//! A backend publishes when a stream or poll opens or closes and every
//! [`BEAT`] (the rows that changed, and its own heartbeat). A row counts
//! only while its backend's heartbeat is younger than [`ALIVE_WITHIN`]:
//! the agents of a backend that died show as disconnected within that,
//! until they reach another backend, which claims them. A store that one
//! backend holds alone (SQLite) shares nothing: the hub knows every
//! connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::{Core, internal};
use crate::backend::hub::Presence;
use crate::backend::store::PresenceRecord;

/// How often a backend publishes its heartbeat and its agents' changes.
pub const BEAT: Duration = Duration::from_secs(2);
/// How long a backend's rows count after its last heartbeat: three beats.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(6);

/// What this backend last published of an agent.
#[derive(Clone, Debug, PartialEq)]
struct Published {
    connected: bool,
    transport: i32,
    reason: String,
}

impl Published {
    fn of(p: &Presence) -> Published {
        Published {
            connected: p.connected,
            transport: p.transport,
            reason: p.reason.clone(),
        }
    }
}

/// An agent's presence and the backend that holds its connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placed {
    pub presence: Presence,
    /// The backend's replica id; empty when the store is not shared.
    pub replica: String,
}

impl Core {
    /// This backend's id among the backends sharing its store.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Publishes this backend's agents' presence in a shared store until
    /// the backend drains (nothing to do for a store not shared). Then it
    /// publishes its agents as gone, at once (other backends show them
    /// connected again as soon as they hold them).
    pub fn publish_presence(self: &Arc<Self>) {
        if !self.store.shares_presence() {
            return;
        }
        let core = self.clone();
        tracing::info!(replica = %core.replica, "publishing presence in the shared store");
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            let mut published: HashMap<String, Published> = HashMap::new();
            let mut tick = tokio::time::interval(BEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                let (beat, last) = tokio::select! {
                    _ = tick.tick() => (true, false),
                    _ = core.hub.opened_or_closed() => (false, false),
                    _ = draining.wait_for(|d| *d) => (false, true),
                };
                let now = crate::now_unix_ms();
                let mut hub: HashMap<String, Presence> =
                    core.hub.presences(now).into_iter().collect();
                if last {
                    hub.values_mut().for_each(|p| p.connected = false);
                }
                if beat {
                    core.check_published(&hub, &mut published, now).await;
                }
                let rows: Vec<PresenceRecord> = hub
                    .into_iter()
                    .filter(|(agent, p)| published.get(agent) != Some(&Published::of(p)))
                    .map(|(agent, p)| PresenceRecord {
                        agent_id: agent,
                        replica: core.replica.clone(),
                        connected: p.connected,
                        transport: p.transport,
                        reason: p.reason,
                        seen_ms: p.last_seen_ms,
                    })
                    .collect();
                match core.store.publish_presence(&core.replica, &rows, now).await {
                    Ok(()) => {
                        if failing {
                            tracing::info!("presence published in the shared store again");
                            failing = false;
                        }
                        for r in rows {
                            published.insert(
                                r.agent_id,
                                Published {
                                    connected: r.connected,
                                    transport: r.transport,
                                    reason: r.reason,
                                },
                            );
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot publish presence in the shared store; other backends show this one's agents as disconnected until it can");
                            failing = true;
                        }
                    }
                }
                if last {
                    return;
                }
            }
        });
    }

    /// Forgets what `published` says of an agent whose row in the store
    /// disagrees with this backend's hub, so that it is published again:
    /// another backend wrote the row while this one's publish failed or
    /// between two of its publishes (an agent that left and came back
    /// while the row said the other backend).
    async fn check_published(
        &self,
        hub: &HashMap<String, Presence>,
        published: &mut HashMap<String, Published>,
        now: i64,
    ) {
        let Ok(rows) = self
            .store
            .presences(now - ALIVE_WITHIN.as_millis() as i64)
            .await
        else {
            return;
        };
        for (agent, p) in hub {
            let row = rows.get(agent);
            let ours = row.is_some_and(|r| r.replica == self.replica);
            let agrees = if p.connected {
                ours && row.is_some_and(|r| r.connected)
            } else {
                !ours || row.is_some_and(|r| !r.connected)
            };
            if !agrees {
                published.remove(agent);
            }
        }
    }

    /// Every agent's presence as this backend answers for it: its own
    /// hub's, or, for an agent not connected here, what a live backend
    /// sharing the store published.
    pub(crate) async fn placed(&self, now: i64) -> Result<HashMap<String, Placed>, Status> {
        let mut out: HashMap<String, Placed> = self
            .hub
            .presences(now)
            .into_iter()
            .map(|(agent, presence)| {
                let replica = if self.store.shares_presence() {
                    self.replica.clone()
                } else {
                    String::new()
                };
                (agent, Placed { presence, replica })
            })
            .collect();
        if !self.store.shares_presence() {
            return Ok(out);
        }
        let alive_since = now - ALIVE_WITHIN.as_millis() as i64;
        for (agent, r) in self.store.presences(alive_since).await.map_err(internal)? {
            // This backend's own rows trail its hub; the hub is the truth.
            if r.replica == self.replica || !r.connected {
                continue;
            }
            if out.get(&agent).is_some_and(|p| p.presence.connected) {
                continue;
            }
            out.insert(
                agent,
                Placed {
                    presence: Presence {
                        connected: true,
                        transport: r.transport,
                        reason: r.reason,
                        last_seen_ms: r.seen_ms,
                    },
                    replica: r.replica,
                },
            );
        }
        Ok(out)
    }
}
