//! What the benchmarks report besides criterion's figures: latency
//! percentiles ([`Distribution`]), the machine's load average, and the
//! counts a benchmark reads from its environment.

use std::time::Duration;

/// Latencies, sorted.
pub struct Distribution {
    sorted: Vec<Duration>,
}

impl Distribution {
    /// Sorts `samples`; there must be at least one.
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

    /// How many latencies it holds.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The shortest latency.
    pub fn min(&self) -> Duration {
        self.sorted[0]
    }

    /// The longest latency.
    pub fn max(&self) -> Duration {
        self.sorted[self.sorted.len() - 1]
    }

    /// The mean latency.
    pub fn mean(&self) -> Duration {
        self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32
    }
}

/// The system's load averages over 1, 5 and 15 minutes, for the record:
/// other work on the machine moves every figure a benchmark prints.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The count in the environment variable `name`, or `default` when it is
/// not set; panics when it is set to anything but a non-negative integer.
pub fn count_from_env(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a count (a non-negative integer)")),
        Err(_) => default,
    }
}
