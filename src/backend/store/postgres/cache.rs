//! Which agent a credential is, remembered between calls: an agent's
//! every call is authenticated, and without this each would cost a round
//! trip to the database before any work.
//!
//! Only what the database said of a current credential of an agent not
//! revoked is kept, so a caller without a credential adds nothing (a
//! wrong one is looked up in the database each time, as before). An
//! entry is dropped
//!
//! - when this backend, or another sharing the database, revokes the
//!   agent, gives it a new credential on re-enrollment, or makes its
//!   pending credential current: each notifies the change feed
//!   ([`changes`](super::changes)), which drops every entry of the agent
//!   as the notification arrives (and this backend drops them itself
//!   when the change is its own);
//! - [`ENTRY_TTL`] after the lookup that made it began, whatever was
//!   heard;
//! - all at once, when the change feed stops: while it is not listening
//!   nothing is kept or used, every lookup goes to the database.
//!
//! A lookup that raced a drop is not kept: each drop moves a generation
//! on, and an answer read before the drop is not stored after it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an entry is used at most.
pub(super) const ENTRY_TTL: Duration = Duration::from_secs(10);

/// Entries kept at most: beyond it, new lookups are not kept until old
/// ones expire.
const MAX_ENTRIES: usize = 100_000;

/// How often a full cache looks for expired entries to make room.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The credentials of agents, by credential hash.
#[derive(Default)]
pub(super) struct CredentialCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Credential hash -> (agent, when looked up).
    entries: HashMap<String, (String, Instant)>,
    /// Moves on at every drop.
    generation: u64,
    /// Whether the change feed is listening.
    live: bool,
    /// When full: expired entries are looked for again at this time, not
    /// at every lookup.
    next_sweep: Option<Instant>,
}

impl CredentialCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent `credential_hash` belongs to, when known and fresh.
    pub(super) fn get(&self, credential_hash: &str, now: Instant) -> Option<String> {
        let inner = self.lock();
        if !inner.live {
            return None;
        }
        match inner.entries.get(credential_hash) {
            Some((agent, at)) if now.saturating_duration_since(*at) < ENTRY_TTL => {
                Some(agent.clone())
            }
            _ => None,
        }
    }

    /// Where a lookup starts: None when nothing may be kept (the feed is
    /// not listening), else the generation to hand to [`Self::keep`].
    pub(super) fn begin(&self) -> Option<u64> {
        let inner = self.lock();
        inner.live.then_some(inner.generation)
    }

    /// Keeps what a lookup begun at `generation` found, unless something
    /// was dropped since.
    pub(super) fn keep(&self, generation: u64, credential_hash: &str, agent: &str, at: Instant) {
        let mut inner = self.lock();
        if !inner.live || inner.generation != generation {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES && !inner.entries.contains_key(credential_hash) {
            if inner.next_sweep.is_some_and(|t| at < t) {
                return;
            }
            inner
                .entries
                .retain(|_, (_, t)| at.saturating_duration_since(*t) < ENTRY_TTL);
            if inner.entries.len() >= MAX_ENTRIES {
                inner.next_sweep = Some(at + SWEEP_EVERY);
                return;
            }
        }
        inner
            .entries
            .insert(credential_hash.to_string(), (agent.to_string(), at));
    }

    /// Drops every entry of `agent`.
    pub(super) fn forget_agent(&self, agent: &str) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.retain(|_, (a, _)| a != agent);
    }

    /// The change feed started (true) or stopped (false) listening: every
    /// entry is dropped either way.
    pub(super) fn set_live(&self, live: bool) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
        inner.next_sweep = None;
        inner.live = live;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> CredentialCache {
        let c = CredentialCache::default();
        c.set_live(true);
        c
    }

    #[test]
    fn nothing_is_kept_or_used_while_the_feed_is_not_listening() {
        let c = CredentialCache::default();
        let now = Instant::now();
        assert_eq!(c.begin(), None);
        c.set_live(true);
        let g = c.begin().unwrap();
        c.keep(g, "h1", "a1", now);
        assert_eq!(c.get("h1", now).as_deref(), Some("a1"));
        c.set_live(false);
        assert_eq!(c.get("h1", now), None);
        assert_eq!(c.begin(), None);
        c.keep(g, "h1", "a1", now);
        c.set_live(true);
        assert_eq!(c.get("h1", now), None, "dropped when the feed stopped");
    }

    #[test]
    fn an_entry_is_used_until_its_ttl() {
        let c = live();
        let then = Instant::now();
        c.keep(c.begin().unwrap(), "h1", "a1", then);
        assert_eq!(c.get("h1", then + ENTRY_TTL / 2).as_deref(), Some("a1"));
        assert_eq!(c.get("h1", then + ENTRY_TTL), None);
        assert_eq!(c.get("h2", then), None);
    }

    #[test]
    fn forgetting_an_agent_drops_its_entries_only() {
        let c = live();
        let now = Instant::now();
        for (h, a) in [("h1", "a1"), ("h1b", "a1"), ("h2", "a2")] {
            c.keep(c.begin().unwrap(), h, a, now);
        }
        c.forget_agent("a1");
        assert_eq!(c.get("h1", now), None);
        assert_eq!(c.get("h1b", now), None);
        assert_eq!(c.get("h2", now).as_deref(), Some("a2"));
    }

    #[test]
    fn a_lookup_that_raced_a_drop_is_not_kept() {
        let c = live();
        let now = Instant::now();
        let g = c.begin().unwrap();
        // The agent is revoked while its lookup is at the database.
        c.forget_agent("a1");
        c.keep(g, "h1", "a1", now);
        assert_eq!(c.get("h1", now), None);
        // One begun after the drop is kept.
        c.keep(c.begin().unwrap(), "h1", "a1", now);
        assert_eq!(c.get("h1", now).as_deref(), Some("a1"));
    }

    #[test]
    fn the_entries_are_bounded() {
        let c = live();
        let then = Instant::now();
        for i in 0..MAX_ENTRIES {
            c.keep(c.begin().unwrap(), &format!("h{i}"), "a", then);
        }
        assert_eq!(c.len(), MAX_ENTRIES);
        c.keep(c.begin().unwrap(), "one more", "a", then);
        assert_eq!(c.get("one more", then), None, "full: not kept");
        assert_eq!(c.len(), MAX_ENTRIES);
        // Full of live entries: the next lookups do not look again at once.
        c.keep(c.begin().unwrap(), "one more", "a", then + SWEEP_EVERY / 2);
        assert_eq!(c.len(), MAX_ENTRIES);
        // Once the old ones expired, a new lookup makes room by dropping them.
        let later = then + ENTRY_TTL;
        c.keep(c.begin().unwrap(), "one more", "a", later);
        assert_eq!(c.get("one more", later).as_deref(), Some("a"));
        assert_eq!(c.len(), 1);
    }
}
