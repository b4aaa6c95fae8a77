//! The batcher: samples in, self-contained `MetricBatch`es out, flushed on
//! size (a sample count) or on age (a timer that starts at the first
//! sample of a batch). Pure: time is passed in, nothing is sent; the
//! agent's pipeline drives it and spools what it flushes.
//!
//! Memory is bounded by the size limit: a batch never holds more than
//! [`BatcherConfig::max_samples`] samples; the sample that fills it flushes
//! it. A sample the encoder refuses (an invalid series, a time out of
//! range) is dropped and counted, never sent.

use std::time::{Duration, Instant};

use super::encode::BatchBuilder;
use super::sample::Sample;
use crate::proto;

/// Defaults, in one place.
pub const DEFAULT_MAX_SAMPLES: usize = 20_000;
/// A minute of host and container samples makes a batch that compresses to
/// well under OTLP's size; shorter ages cost bytes (the series table is
/// sent once per batch).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30);

/// When to flush.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatcherConfig {
    /// Flush when a batch holds this many samples (1 to 1,000,000).
    pub max_samples: usize,
    /// Flush when the first sample of a batch is this old (10 ms to 10 min).
    pub max_age: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_samples: DEFAULT_MAX_SAMPLES,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

impl BatcherConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=1_000_000).contains(&self.max_samples) {
            p.push(format!(
                "--metrics-batch-samples {} is not between 1 and 1000000",
                self.max_samples
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&self.max_age) {
            p.push(format!(
                "--metrics-batch-age {:?} is not between 10ms and 10m",
                self.max_age
            ));
        }
        p
    }
}

/// A flushed batch.
#[derive(Debug)]
pub struct Flushed {
    pub batch: proto::MetricBatch,
    pub samples: u32,
}

/// The batcher.
pub struct Batcher {
    cfg: BatcherConfig,
    builder: BatchBuilder,
    first_at: Option<Instant>,
    /// Samples the encoder refused.
    pub rejected: u64,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(cfg: BatcherConfig) -> Self {
        Batcher {
            cfg,
            builder: BatchBuilder::new(),
            first_at: None,
            rejected: 0,
        }
    }

    /// Adds samples; returns the batches they filled.
    pub fn add(&mut self, samples: &[Sample], now: Instant, out: &mut Vec<Flushed>) {
        for s in samples {
            match self.builder.add(s) {
                Ok(()) => {
                    self.first_at.get_or_insert(now);
                    if self.builder.len() >= self.cfg.max_samples {
                        out.extend(self.flush());
                    }
                }
                Err(e) => {
                    self.rejected += 1;
                    if self.rejected.is_power_of_two() {
                        tracing::warn!(series = %s.series.name, error = %e, rejected = self.rejected, "metric sample dropped");
                    }
                }
            }
        }
    }

    /// Whether batches flushed from now on carry `sample_series_deltas`
    /// (see [`BatchBuilder::set_series_deltas`]).
    pub fn set_series_deltas(&mut self, on: bool) {
        self.builder.set_series_deltas(on);
    }

    /// When the current batch is due by age (None when it is empty).
    pub fn due(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.cfg.max_age)
    }

    /// Samples held now.
    pub fn len(&self) -> usize {
        self.builder.len()
    }

    /// True when no sample is held.
    pub fn is_empty(&self) -> bool {
        self.builder.is_empty()
    }

    /// The current batch, if it holds anything.
    pub fn flush(&mut self) -> Option<Flushed> {
        if self.builder.is_empty() {
            return None;
        }
        self.first_at = None;
        let samples = self.builder.len() as u32;
        Some(Flushed {
            batch: self.builder.finish(),
            samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::encode::decode;
    use crate::metrics::sample::{Kind, Series};

    fn samples(n: usize, t0: i64) -> Vec<Sample> {
        let s = Arc::new(Series::new("x", Kind::Gauge).label("a", "b"));
        (0..n)
            .map(|i| Sample {
                series: s.clone(),
                time_unix_ms: t0 + i as i64,
                value: i as f64,
            })
            .collect()
    }

    #[test]
    fn flushes_on_size_with_every_sample_once() {
        let mut b = Batcher::new(BatcherConfig {
            max_samples: 100,
            max_age: Duration::from_secs(60),
        });
        let now = Instant::now();
        let mut out = Vec::new();
        b.add(&samples(250, 1_000), now, &mut out);
        assert_eq!(
            out.iter().map(|f| f.samples).collect::<Vec<_>>(),
            vec![100, 100]
        );
        assert_eq!(b.len(), 50);
        out.extend(b.flush());
        assert!(b.flush().is_none() && b.due().is_none());
        let mut values = Vec::new();
        for f in &out {
            let d = decode(&f.batch).unwrap();
            assert_eq!(d.points.len(), f.samples as usize);
            values.extend(d.points.iter().map(|p| p.value));
        }
        assert_eq!(values, (0..250).map(|i| i as f64).collect::<Vec<_>>());
    }

    #[test]
    fn the_age_timer_starts_at_the_first_sample() {
        let cfg = BatcherConfig {
            max_samples: 1000,
            max_age: Duration::from_secs(10),
        };
        let mut b = Batcher::new(cfg);
        let t0 = Instant::now();
        assert_eq!(b.due(), None);
        let mut out = Vec::new();
        b.add(&samples(1, 0), t0 + Duration::from_secs(3), &mut out);
        b.add(&samples(1, 1), t0 + Duration::from_secs(8), &mut out);
        assert_eq!(b.due(), Some(t0 + Duration::from_secs(13)));
        b.flush();
        b.add(&samples(1, 2), t0 + Duration::from_secs(20), &mut out);
        assert_eq!(b.due(), Some(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn refused_samples_are_counted_not_sent() {
        let mut b = Batcher::new(BatcherConfig::default());
        let bad = Arc::new(Series::new("", Kind::Gauge));
        let mut out = Vec::new();
        b.add(
            &[Sample {
                series: bad,
                time_unix_ms: 0,
                value: 1.0,
            }],
            Instant::now(),
            &mut out,
        );
        assert_eq!((b.rejected, b.len()), (1, 0));
        assert!(b.flush().is_none());
    }

    #[test]
    fn settings_are_checked() {
        assert!(BatcherConfig::default().validate().is_empty());
        let bad = BatcherConfig {
            max_samples: 0,
            max_age: Duration::ZERO,
        };
        assert_eq!(bad.validate().len(), 2);
    }
}
