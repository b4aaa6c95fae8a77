//! Per-agent budgets on what one agent credential can make the store keep:
//! container events, new epochs (each makes cursor rows) and the recorded
//! seqs of rejected metric batches. Each is a token bucket; an agent past
//! one is refused with RESOURCE_EXHAUSTED, which agents retry later, so a
//! well-behaved agent only waits while a runaway or hostile one cannot grow
//! the database faster than the budgets allow. Retention (see
//! [`Core::prune`](super::Core::prune)) then bounds what is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::time::Instant;
use tonic::Status;

/// One budget: how many at once (`burst`) and how many per second after.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rate {
    pub burst: f64,
    pub per_second: f64,
    /// What is counted, for the error.
    pub what: &'static str,
}

/// Container events stored per agent.
pub(super) const CONTAINER_EVENTS: Rate = Rate {
    burst: 1000.0,
    per_second: 5.0,
    what: "container events",
};
/// New epochs (of events or of metric batches) per agent: an agent makes
/// one when it starts and when its spool drops batches.
pub(super) const NEW_EPOCHS: Rate = Rate {
    burst: 20.0,
    per_second: 1.0 / 60.0,
    what: "new epochs",
};
/// Rejected metric batches whose seq is recorded, per agent.
pub(super) const REJECTED_BATCHES: Rate = Rate {
    burst: 100.0,
    per_second: 1.0,
    what: "rejected metric batches",
};

/// Epochs of an agent known to exist, so only a new one costs a lookup.
const KNOWN_EPOCHS: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second;
        self.tokens = (self.tokens + refill).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct AgentBudget {
    buckets: HashMap<&'static str, Bucket>,
    /// `(stream, epoch)` recently seen, newest last.
    known: VecDeque<(&'static str, u64)>,
}

/// The budgets of every agent that used one since the backend started
/// (agents are authenticated, so this grows with enrolled agents only).
#[derive(Default)]
pub(super) struct Budgets {
    agents: Mutex<HashMap<String, AgentBudget>>,
}

impl Budgets {
    /// Takes one from `agent`'s `rate` budget, or says why not.
    pub(super) fn take(&self, agent: &str, rate: Rate) -> Result<(), Status> {
        let now = Instant::now();
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let budget = agents.entry(agent.to_string()).or_default();
        let bucket = budget.buckets.entry(rate.what).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        if bucket.take(rate, now) {
            return Ok(());
        }
        tracing::warn!(agent, what = rate.what, "agent over its budget; refused");
        Err(Status::resource_exhausted(format!(
            "agent {agent} sent more {what} than the backend stores for one agent \
             ({burst} at once, then {per_minute} a minute); retry later",
            what = rate.what,
            burst = rate.burst,
            per_minute = rate.per_second * 60.0,
        )))
    }

    /// True when `(stream, epoch)` of `agent` was seen recently.
    pub(super) fn known_epoch(&self, agent: &str, stream: &'static str, epoch: u64) -> bool {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .get(agent)
            .is_some_and(|b| b.known.contains(&(stream, epoch)))
    }

    /// Remembers that `(stream, epoch)` of `agent` exists.
    pub(super) fn remember_epoch(&self, agent: &str, stream: &'static str, epoch: u64) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let known = &mut agents.entry(agent.to_string()).or_default().known;
        if !known.contains(&(stream, epoch)) {
            if known.len() == KNOWN_EPOCHS {
                known.pop_front();
            }
            known.push_back((stream, epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_budget_allows_its_burst_then_its_rate() {
        let b = Budgets::default();
        let rate = Rate {
            burst: 3.0,
            per_second: 1.0,
            what: "things",
        };
        for _ in 0..3 {
            b.take("a", rate).unwrap();
        }
        let e = b.take("a", rate).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("things") && e.message().contains("retry later"));
        // Another agent has its own budget.
        b.take("b", rate).unwrap();
        tokio::time::advance(std::time::Duration::from_millis(1100)).await;
        b.take("a", rate).unwrap();
        assert!(b.take("a", rate).is_err());
    }

    #[test]
    fn known_epochs_are_the_recent_ones() {
        let b = Budgets::default();
        assert!(!b.known_epoch("a", "events", 1));
        for e in 1..=(KNOWN_EPOCHS as u64 + 1) {
            b.remember_epoch("a", "events", e);
        }
        assert!(!b.known_epoch("a", "events", 1));
        assert!(b.known_epoch("a", "events", 2));
        assert!(!b.known_epoch("a", "metrics", 2));
    }
}
