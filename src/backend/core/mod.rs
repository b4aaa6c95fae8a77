//! The backend's logic, independent of transport: the gRPC service and the
//! Connect handlers both call these methods, so every rung carries the same
//! messages with the same meaning.
//!
//! [`Core`] is one struct whose `impl` is divided by concern, one module
//! each: this module holds the struct, its construction and
//! authentication; `agent.rs` the agent service (enroll, the stream, polls,
//! reports); `metrics.rs` `PushMetrics`; `admin.rs` the admin service
//! (providers, agents, commands); `checks.rs` the checks of what agents and
//! operators send; `limits.rs` the per-agent budgets on what the store
//! keeps; `retention.rs` the pruning of the rest. The runs' part is in [`super::runs`]. `Core` reaches its
//! durable state only through the [`Store`] trait, awaiting each call, so
//! it works the same over any store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use super::defaults::{ENROLL_BURST_PER_TOKEN, ENROLL_REFILL_PER_TOKEN, ENROLL_TOKENS_REMEMBERED};
use super::hub::Hub;
use super::ratelimit::Buckets;
use super::sinks::Sinks;
use super::store::{Change, Store, StoreError};
use crate::secret;

mod admin;
mod agent;
mod checks;
mod limits;
mod metrics;
pub mod presence;
mod retention;

pub(super) use checks::check_image;
pub use checks::{check_provider_name, check_spec, validate_batch};
pub use retention::{PRUNE_EVERY, RetentionConfig};

/// Settings the core needs.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Interval of heartbeat frames on streams.
    pub heartbeat: Duration,
    /// Longest hold of a poll.
    pub poll_hold: Duration,
    /// The URL agents use to reach this backend.
    pub public_url: String,
    /// The CA file agents must trust, when the backend generated its own.
    pub ca_file: Option<std::path::PathBuf>,
    /// What the printed host command holds besides the URL and the token.
    pub host_command: super::host_command::HostCommand,
    /// The metrics interval agents are asked to use (`Reconfigure`);
    /// None leaves it to each agent.
    pub agent_metrics_interval: Option<Duration>,
    /// Largest message accepted; also the largest `batch_zstd` once
    /// decompressed.
    pub max_message_bytes: usize,
    /// What the store keeps.
    pub retention: RetentionConfig,
}

/// The backend's state and logic.
pub struct Core {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hub: Arc<Hub>,
    cfg: CoreConfig,
    admin_hash: String,
    pub(super) results: watch::Sender<u64>,
    draining: watch::Receiver<bool>,
    /// Where ingested metric batches go.
    sinks: Sinks,
    /// `(agent, epoch, seq)` of metric batches being stored right now, so a
    /// retry that arrives meanwhile cannot store the same batch again.
    metric_batches_in_flight: Mutex<HashSet<(String, u64, u64)>>,
    /// What each agent may still make the store keep.
    budgets: limits::Budgets,
    /// Enrollments per provider (each provider has one token).
    pub(crate) enrolls: Buckets<String>,
    /// This backend's id among those sharing its store (presence).
    replica: String,
}

/// A store failure as the caller sees it: UNAVAILABLE (retry) when the
/// database cannot answer now, INTERNAL otherwise.
pub(super) fn internal(e: StoreError) -> Status {
    if let StoreError::Unavailable { .. } = e {
        tracing::warn!(error = %e, "store unavailable");
        return Status::unavailable(format!("{e}; retry later"));
    }
    tracing::error!(error = %e, "store failure");
    Status::internal(format!("backend store failure: {e}"))
}

/// The refusal of a revoked agent's calls: what happened and what to do.
pub(super) fn revoked(agent: &str) -> Status {
    Status::unauthenticated(format!(
        "agent {agent} was revoked by the operator: its credential is refused; to bring this host back, \
         remove the agent's state dir (identity.json) and enroll it again with a current enrollment token"
    ))
}

/// Reads a bearer token from an `authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let v = header?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Core {
    /// Builds the core over an opened store; `admin_hash` is the hash of
    /// the admin token.
    pub fn with_admin_hash(
        store: Arc<dyn Store>,
        cfg: CoreConfig,
        admin_hash: &str,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Core {
            store,
            hub: Arc::new(Hub::default()),
            cfg,
            admin_hash: admin_hash.to_string(),
            results: watch::channel(0).0,
            draining,
            sinks: Sinks::in_memory(),
            metric_batches_in_flight: Mutex::new(HashSet::new()),
            budgets: limits::Budgets::default(),
            enrolls: Buckets::new(
                ENROLL_BURST_PER_TOKEN,
                ENROLL_REFILL_PER_TOKEN,
                ENROLL_TOKENS_REMEMBERED,
            ),
            replica: format!(
                "{}-{}",
                crate::hostname::default_hostname(),
                crate::secret::random_hex("", 3)
            ),
        }
    }

    /// Replaces the metric sinks (the default keeps latest values only,
    /// with the default limits).
    pub fn with_sinks(mut self, sinks: Sinks) -> Self {
        self.sinks = sinks;
        self
    }

    /// The metric sinks: `/metrics` and the ingest counters.
    pub fn sinks(&self) -> &Sinks {
        &self.sinks
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The durable store.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Carries the changes other backends sharing the store make (see
    /// [`Store::changes`]) to this one's streams and held polls, until the
    /// backend drains: a command queued through another backend reaches
    /// an agent connected here at once, a result stored through another
    /// wakes the calls and runs waiting for it here, a revocation ends the
    /// agent's streams and polls here. Nothing to do for a store this backend holds alone.
    pub fn follow_store_changes(self: &Arc<Self>) {
        let Some(mut changes) = self.store.changes() else {
            return;
        };
        let core = self.clone();
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = changes.recv() => match c {
                        Some(c) => c,
                        None => return,
                    },
                    _ = draining.wait_for(|d| *d) => return,
                };
                match change {
                    Change::Queued {
                        agent,
                        seq,
                        command,
                    } => core.hub.notify_queued(&agent, seq, command.as_deref()),
                    Change::Revoked { agent } => core.hub.revoke(&agent),
                    Change::Done { .. } => core.results.send_modify(|n| *n += 1),
                    Change::Missed => {
                        core.hub.wake_all();
                        core.results.send_modify(|n| *n += 1);
                    }
                }
            }
        });
    }

    /// Wakes the streams and held polls of `agent` after a command was
    /// queued for it directly in the store.
    pub fn wake(&self, agent: &str, seq: u64) {
        self.hub.notify_queued(agent, seq, None);
    }

    /// The agent whose credential is in `authorization`; a revoked agent's
    /// credential is refused with [`revoked`].
    pub async fn authenticate_agent(&self, authorization: Option<&str>) -> Result<String, Status> {
        let token = bearer(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "missing agent credential: send `authorization: Bearer <credential>`",
            )
        })?;
        let owner = self
            .store
            .agent_by_credential(&secret::hash(token))
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "agent credential unknown or revoked: remove the agent's state dir so it enrolls again",
                )
            })?;
        if owner.revoked_ms > 0 {
            return Err(revoked(&owner.agent_id));
        }
        if owner.promoted {
            tracing::info!(agent = %owner.agent_id, "agent switched to its new credential; the previous one is no longer accepted");
        }
        Ok(owner.agent_id)
    }

    /// Checks the admin token in `authorization`.
    pub fn authenticate_admin(&self, authorization: Option<&str>) -> Result<(), Status> {
        let token = bearer(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "missing admin token: send `authorization: Bearer <admin token>`",
            )
        })?;
        if secret::hash(token) != self.admin_hash {
            return Err(Status::unauthenticated("admin token rejected"));
        }
        Ok(())
    }

    /// The `docker run` line that runs an agent of this backend on a host
    /// (`super::host_command`), enrolled with `token` (None: the operator's
    /// `UPLINK_TOKEN`). It may hold a proxy's password: printed, never
    /// logged.
    pub fn host_command(&self, token: Option<&str>) -> String {
        let generated_ca = self.cfg.ca_file.is_some();
        self.cfg
            .host_command
            .render(&self.cfg.public_url, token, generated_ca)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }
}
