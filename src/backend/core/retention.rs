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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::backend::CoreConfig;
    use crate::backend::store::{AgentRecord, SqliteStore, Store};
    use crate::proto;

    fn core(store: Arc<dyn Store>, draining: watch::Receiver<bool>) -> Arc<Core> {
        let cfg = CoreConfig {
            heartbeat: Duration::from_secs(10),
            poll_hold: Duration::from_secs(10),
            public_url: "https://localhost:1".into(),
            ca_file: None,
            host_command: Default::default(),
            agent_metrics_interval: None,
            max_message_bytes: 1 << 20,
            retention: RetentionConfig {
                commands: Duration::from_secs(3600),
                ..RetentionConfig::default()
            },
        };
        Arc::new(Core::with_admin_hash(store, cfg, "h", draining))
    }

    #[test]
    fn cutoffs_are_the_retention_before_now() {
        let r = RetentionConfig::default().at(40 * 86_400_000);
        assert_eq!(r.commands_before_ms, 10 * 86_400_000);
        assert_eq!(r.container_events_before_ms, 33 * 86_400_000);
        assert_eq!(r.epochs_kept, DEFAULT_EPOCHS_KEPT);
        // Far in the past, nothing is old enough to go.
        assert!(RetentionConfig::default().at(0).runs_before_ms < 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_prune_task_prunes_on_its_own_and_stops_on_drain() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        assert!(store.create_provider("p", "t", 1).await.unwrap());
        let agent = AgentRecord {
            id: "a".into(),
            provider: "p".into(),
            ..Default::default()
        };
        store.insert_agent(&agent, "c").await.unwrap();
        let spec = proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
        };
        store.enqueue("a", "old", &spec, 1).await.unwrap();
        store.ack("a", 1, 2).await.unwrap();
        let result = proto::CommandResult {
            command_id: "old".into(),
            status: proto::CommandStatus::Ok as i32,
            ..Default::default()
        };
        // Done two hours ago, by the wall clock the store is given.
        let done = crate::now_unix_ms() - 2 * 3_600_000;
        assert!(store.complete("a", &result, done).await.unwrap());
        let (drain, draining) = watch::channel(false);
        let task = tokio::spawn({
            let core = core(store.clone(), draining);
            async move { core.prune_every(PRUNE_EVERY).await }
        });
        tokio::time::sleep(PRUNE_EVERY / 2).await;
        assert!(store.command("old").await.unwrap().is_some(), "too early");
        tokio::time::sleep(PRUNE_EVERY).await;
        assert!(store.command("old").await.unwrap().is_none());
        drain.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the prune task stops when the backend drains")
            .unwrap();
    }

    #[test]
    fn retention_flags_out_of_range_are_named() {
        let mut cfg = crate::backend::BackendConfig::new("/tmp/x");
        cfg.retention = RetentionConfig {
            commands: Duration::from_secs(1),
            runs: Duration::from_secs(400 * 86_400),
            container_events: Duration::from_secs(3600),
            container_events_per_agent: 0,
            epochs_kept: 0,
        };
        let errs = cfg.validate().join("\n");
        for flag in [
            "--retain-commands",
            "--retain-runs",
            "--max-container-events-per-agent",
            "--epochs-kept",
        ] {
            assert!(errs.contains(flag), "{flag} not named in:\n{errs}");
        }
        assert!(!errs.contains("--retain-container-events"), "{errs}");
    }
}
