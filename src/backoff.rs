//! Exponential backoff with full jitter.
//!
//! The n-th retry waits a uniformly random time in `[0, min(cap, base·2ⁿ)]`,
//! so a fleet of agents that lost the backend at the same moment spreads its
//! reconnects instead of storming it. Pure: the random source is injected.

use std::time::Duration;

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's wait.
    pub base: Duration,
    /// Largest wait ever.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The ceiling for retry number `attempt` (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry number `attempt`; `unit` is a uniform random
    /// number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait before retry number `attempt`, with the process's RNG.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }
}

/// Counts consecutive failures and hands out the next wait.
#[derive(Debug)]
pub struct Retry {
    policy: Backoff,
    attempt: u32,
}

impl Retry {
    /// Starts with no failures.
    pub fn new(policy: Backoff) -> Self {
        Retry { policy, attempt: 0 }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.policy.delay_random(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Records a success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        let c: Vec<u64> = (0..8).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(c, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delay_is_within_zero_and_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, 1.0), b.ceiling(3));
        assert_eq!(b.delay(3, 7.0), b.ceiling(3));
    }

    /// A thousand agents losing the backend at once: with full jitter their
    /// reconnects spread over the whole window instead of landing together.
    #[tokio::test(start_paused = true)]
    async fn reconnects_of_a_fleet_spread_over_the_window() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
        };
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..1000 {
            let d = b.delay(4, rng.f64()); // the 5th retry: window of 16 s
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(d).await;
                tokio::time::Instant::now() - start
            }));
        }
        let mut per_second = [0u32; 17];
        for t in tasks {
            let at = t.await.unwrap();
            assert!(at <= Duration::from_secs(16));
            per_second[at.as_secs() as usize] += 1;
        }
        // Uniform over 16 one-second buckets: about 62 each. No bucket holds
        // more than twice its share, and every bucket is used.
        for (s, n) in per_second[..16].iter().enumerate() {
            assert!(
                *n > 20 && *n < 125,
                "second {s}: {n} reconnects: {per_second:?}"
            );
        }
    }

    #[test]
    fn retry_counts_and_resets() {
        let mut r = Retry::new(Backoff::default());
        for _ in 0..3 {
            assert!(r.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(r.failures(), 3);
        r.reset();
        assert_eq!(r.failures(), 0);
        assert!(r.next_delay() <= Duration::from_millis(500));
    }
}
