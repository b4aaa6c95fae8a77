//! Helpers shared by the benchmarks.

#![allow(dead_code)]

use std::time::Duration;

pub mod otlp;
pub mod workload;

/// The benchmarks' clock starts here (Unix ms): sample times are reproducible.
pub const T0_MS: i64 = 1_790_000_000_000;

/// Latencies, sorted.
pub struct Distribution {
    sorted: Vec<Duration>,
}

impl Distribution {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Distribution { sorted: samples }
    }

    /// Nearest-rank percentile, `p` in (0, 100].
    pub fn percentile(&self, p: f64) -> Duration {
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn min(&self) -> Duration {
        self.sorted[0]
    }

    pub fn max(&self) -> Duration {
        self.sorted[self.sorted.len() - 1]
    }

    pub fn mean(&self) -> Duration {
        self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32
    }
}
