//! The capacity reporter: the task that sends this agent's `Capacity`
//! (measured by `agent::capacity::measure`) when it starts, on every new
//! connection, and whenever a figure changed. It measures again when woken
//! (after container commands and exits) and every [`CAPACITY_INTERVAL`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::super::executor::Executor;
use super::super::policy::Policy;
use super::reporter::Reports;
use super::transport::Unary;
use crate::proto;

/// How often capacity is measured when nothing wakes the reporter earlier
/// (it notices an engine that went or came back).
const CAPACITY_INTERVAL: Duration = Duration::from_secs(10);

/// What to do with a new measurement, given the last one sent (None: none
/// yet on this connection).
#[derive(Debug, PartialEq, Eq)]
struct Change {
    /// Send it: some figure differs.
    send: bool,
    /// Log it: the engine's availability changed.
    log: bool,
}

fn change(last: Option<&proto::Capacity>, now: &proto::Capacity) -> Change {
    let send = last != Some(now);
    Change {
        send,
        log: send && last.map(|l| l.docker_available) != Some(now.docker_available),
    }
}

/// The capacity reporter.
pub(super) struct CapacityReporter {
    pub(super) executor: Arc<Executor>,
    pub(super) policy: Policy,
    /// The host's root as mounted in the agent's container, if it runs in
    /// one (`--host-root`).
    pub(super) host_root: Option<std::path::PathBuf>,
    pub(super) reports: Reports,
    /// Wakes it: something may have changed the capacity.
    pub(super) changed: Arc<Notify>,
    /// The unary client of the current rung: a new one is a new
    /// connection, which gets the capacity again.
    pub(super) connections: watch::Receiver<Option<Unary>>,
}

impl CapacityReporter {
    /// Sends this agent's capacity when it starts, on every new connection,
    /// and whenever a figure changed; measures it after container commands
    /// and exits, and every [`CAPACITY_INTERVAL`].
    pub(super) async fn run(mut self) {
        let mut last: Option<proto::Capacity> = None;
        loop {
            let now = super::super::capacity::measure(
                &self.executor,
                &self.policy,
                self.host_root.as_deref(),
            )
            .await;
            let change = change(last.as_ref(), &now);
            if change.send {
                if change.log {
                    tracing::info!(docker = %now.docker_status, cores = now.cpu_cores, memory = now.memory_bytes, "capacity");
                }
                self.reports
                    .emit(proto::event::Kind::Capacity(now.clone()))
                    .await;
                last = Some(now);
            }
            tokio::select! {
                _ = tokio::time::sleep(CAPACITY_INTERVAL) => {}
                _ = self.changed.notified() => {}
                r = self.connections.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if self.connections.borrow_and_update().is_some() {
                        last = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(docker: bool, cores: u32) -> proto::Capacity {
        proto::Capacity {
            docker_available: docker,
            cpu_cores: cores,
            ..Default::default()
        }
    }

    #[test]
    fn the_first_measurement_is_sent_and_logged() {
        assert_eq!(
            change(None, &cap(false, 4)),
            Change {
                send: true,
                log: true
            }
        );
    }

    #[test]
    fn an_unchanged_capacity_is_not_sent_again() {
        assert_eq!(
            change(Some(&cap(true, 4)), &cap(true, 4)),
            Change {
                send: false,
                log: false
            }
        );
    }

    #[test]
    fn a_changed_figure_is_sent_and_only_the_engine_coming_or_going_is_logged() {
        assert_eq!(
            change(Some(&cap(true, 4)), &cap(true, 8)),
            Change {
                send: true,
                log: false
            }
        );
        assert_eq!(
            change(Some(&cap(true, 4)), &cap(false, 4)),
            Change {
                send: true,
                log: true
            }
        );
    }
}
