//! Retention: what the store keeps of what it no longer needs, and the
//! task that prunes the rest (see [`Store::prune`]).

use std::time::Duration;

use super::Core;
use super::limits::NEW_EPOCHS;
use crate::backend::defaults::{
    DEFAULT_EPOCHS_KEPT, DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT, DEFAULT_RETAIN_COMMANDS,
    DEFAULT_RETAIN_CONTAINER_EVENTS, DEFAULT_RETAIN_RUNS,
};
use crate::backend::store::{Pruned, Retention, StoreError};
use tonic::Status;

/// Interval of the prune task.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How long finished things are kept, and how many container events and
/// epochs per agent.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionConfig {
    /// Finished, acknowledged commands and their results.
    pub commands: Duration,
    /// Runs with nothing left on any host.
    pub runs: Duration,
    /// Container events.
    pub container_events: Duration,
    /// Container events kept per agent (the newest).
    pub container_events_per_agent: u64,
    /// Epochs whose dedup cursors are kept per agent and stream.
    pub epochs_kept: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            commands: DEFAULT_RETAIN_COMMANDS,
            runs: DEFAULT_RETAIN_RUNS,
            container_events: DEFAULT_RETAIN_CONTAINER_EVENTS,
            container_events_per_agent: DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT,
            epochs_kept: DEFAULT_EPOCHS_KEPT,
        }
    }
}

impl RetentionConfig {
    /// The cutoffs at `now` (milliseconds since the Unix epoch).
    pub fn at(&self, now: i64) -> Retention {
        let before = |d: Duration| now.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64);
        Retention {
            commands_before_ms: before(self.commands),
            runs_before_ms: before(self.runs),
            container_events_before_ms: before(self.container_events),
            container_events_per_agent: self.container_events_per_agent,
            epochs_kept: self.epochs_kept,
        }
    }
}

impl Core {
    /// Prunes the store now, by the configured retention.
    pub async fn prune(&self) -> Result<Pruned, StoreError> {
        let r = self.cfg.retention.at(crate::now_unix_ms());
        let pruned = self.store.prune(&r).await?;
        if pruned != Pruned::default() {
            tracing::info!(
                commands = pruned.commands,
                runs = pruned.runs,
                container_events = pruned.container_events,
                cursors = pruned.cursors,
                "store pruned"
            );
        }
        Ok(pruned)
    }

    /// Prunes every `every` ([`PRUNE_EVERY`] in the backend) until the
    /// backend drains.
    pub async fn prune_every(&self, every: Duration) {
        let mut draining = self.draining.clone();
        loop {
            tokio::select! {
                biased;
                _ = draining.wait_for(|d| *d) => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.prune().await {
                tracing::warn!(error = %e, "pruning the store failed; retrying later");
            }
        }
    }

    /// Lets `agent` use `epoch` of `stream`: free when the epoch is known
    /// (`exists` says whether the store has anything of it), otherwise one
    /// of the agent's new-epoch budget.
    pub(super) async fn admit_epoch(
        &self,
        agent: &str,
        stream: &'static str,
        epoch: u64,
        exists: impl std::future::Future<Output = Result<bool, StoreError>>,
    ) -> Result<(), Status> {
        if self.budgets.known_epoch(agent, stream, epoch) {
            return Ok(());
        }
        if !exists.await.map_err(super::internal)? {
            self.budgets.take(agent, NEW_EPOCHS)?;
        }
        self.budgets.remember_epoch(agent, stream, epoch);
        Ok(())
    }
}
