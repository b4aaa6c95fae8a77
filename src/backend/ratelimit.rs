//! Token buckets in memory, one per key (a source address, a provider),
//! in a map of bounded size: what the backend uses to slow down guessing
//! and mass enrollment.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `burst` at once, then one more every `refill`.
pub struct Buckets<K> {
    burst: f64,
    refill: Duration,
    max_keys: usize,
    map: Mutex<HashMap<K, Bucket>>,
    limited: AtomicU64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `burst` tokens refilled one per `refill`, for at most
    /// `max_keys` keys (beyond, full buckets are forgotten first, and all
    /// of them if none is full: the map never grows past the bound).
    pub fn new(burst: u32, refill: Duration, max_keys: usize) -> Self {
        Buckets {
            burst: f64::from(burst.max(1)),
            refill,
            max_keys: max_keys.max(1),
            map: Mutex::new(HashMap::new()),
            limited: AtomicU64::new(0),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let per = self.refill.as_secs_f64();
        let gained = if per > 0.0 {
            now.duration_since(b.at).as_secs_f64() / per
        } else {
            self.burst
        };
        (b.tokens + gained).min(self.burst)
    }

    fn wait_for(&self, tokens: f64) -> u64 {
        ((1.0 - tokens) * self.refill.as_secs_f64()).ceil().max(1.0) as u64
    }

    /// Seconds until `key` has a token; None when it has one now. Counts a
    /// refusal when it has none.
    pub fn check(&self, key: &K) -> Option<u64> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.level(map.get(key)?, Instant::now());
        (tokens < 1.0).then(|| {
            self.limited.fetch_add(1, Ordering::Relaxed);
            self.wait_for(tokens)
        })
    }

    /// Takes a token of `key`: Err(seconds to wait) when it has none (and
    /// counts the refusal).
    pub fn take(&self, key: &K) -> Result<(), u64> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max_keys && !map.contains_key(key) {
            map.retain(|_, b| self.level(b, now) < self.burst);
            if map.len() >= self.max_keys {
                map.clear();
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = self.level(b, now);
        b.at = now;
        if tokens < 1.0 {
            b.tokens = tokens;
            self.limited.fetch_add(1, Ordering::Relaxed);
            return Err(self.wait_for(tokens));
        }
        b.tokens = tokens - 1.0;
        Ok(())
    }

    /// Refusals so far.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

/// Appends counter `name` with `help` and value `v` as Prometheus text.
pub fn counter_text(out: &mut String, name: &str, help: &str, v: u64) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill_per_key() {
        let b = Buckets::new(3, Duration::from_secs(3600), 10);
        for _ in 0..3 {
            assert_eq!(b.take(&"a"), Ok(()));
        }
        let wait = b.take(&"a").unwrap_err();
        assert!((3500..=3600).contains(&wait), "{wait}");
        assert!(b.check(&"a").is_some());
        assert_eq!(b.check(&"b"), None);
        assert_eq!(b.take(&"b"), Ok(()));
        assert_eq!(b.limited(), 2);
    }

    #[test]
    fn the_map_stays_within_its_bound() {
        let b = Buckets::new(1, Duration::from_secs(3600), 4);
        for k in 0..100 {
            let _ = b.take(&k);
            assert!(b.map.lock().unwrap().len() <= 4);
        }
    }
}
