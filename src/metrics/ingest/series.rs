//! The bounded series cache both listeners share: one `Arc<Series>` per
//! name and labels, at most `max_series` of them, a series idle for
//! `series_idle` making room when the cache is full.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::metrics::sample::Series;

use super::{IngestLimits, SWEEP_EVERY_MS};

/// The series seen so far, each in one shared `Arc`, with the time it was
/// last used.
pub(super) struct SeriesCache {
    series: HashMap<Arc<Series>, Cell<i64>>,
    max: usize,
    idle_ms: i64,
    next_sweep_ms: i64,
}

impl SeriesCache {
    /// How many series the cache holds.
    pub(super) fn len(&self) -> usize {
        self.series.len()
    }

    pub(super) fn new(limits: &IngestLimits) -> Self {
        SeriesCache {
            series: HashMap::new(),
            max: limits.max_series,
            idle_ms: i64::try_from(limits.series_idle.as_millis()).unwrap_or(i64::MAX),
            next_sweep_ms: i64::MIN,
        }
    }

    /// The shared `Arc` of `series`, added if there is room.
    pub(super) fn get(&mut self, series: Series, now_unix_ms: i64) -> Option<Arc<Series>> {
        if let Some((known, used)) = self.series.get_key_value(&series) {
            used.set(now_unix_ms);
            return Some(known.clone());
        }
        if self.series.len() >= self.max {
            self.sweep(now_unix_ms);
            if self.series.len() >= self.max {
                return None;
            }
        }
        let series = Arc::new(series);
        self.series.insert(series.clone(), Cell::new(now_unix_ms));
        Some(series)
    }

    /// Forgets the series idle for too long, at most once per
    /// [`SWEEP_EVERY_MS`], so that a full cache under a flood of new series
    /// does not scan itself for every sample.
    fn sweep(&mut self, now_unix_ms: i64) {
        if now_unix_ms < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now_unix_ms.saturating_add(SWEEP_EVERY_MS);
        let idle = self.idle_ms;
        self.series
            .retain(|_, used| now_unix_ms.saturating_sub(used.get()) < idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ingest::{Intake, LineError, Precision};
    use std::time::Duration;

    #[test]
    fn a_full_cache_drops_new_series_until_idle_ones_are_forgotten() {
        let limits = IngestLimits {
            max_series: 3,
            series_idle: Duration::from_secs(60),
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut out = Vec::new();
        for s in ["a", "b", "c"] {
            intake
                .graphite_line(format!("{s} 1").as_bytes(), 0, &mut out)
                .unwrap();
        }
        let got = intake.graphite_line(b"d 1", 1_000, &mut out);
        assert_eq!(
            got,
            Err(LineError::SeriesCap {
                dropped: 1,
                max_series: 3
            })
        );
        // Known series go on; an Influx line keeps its known fields and
        // drops the new ones.
        intake.graphite_line(b"a 2", 30_000, &mut out).unwrap();
        intake
            .influx_line(b"m v=1", Precision::Seconds, 30_000, &mut out)
            .unwrap_err();
        assert_eq!(out.len(), 4);
        assert_eq!(intake.counters().dropped_samples_series_cap, 2);
        // 61 s after their last use, b and c make room; a was used at 30 s.
        intake.graphite_line(b"d 1", 61_000, &mut out).unwrap();
        intake.graphite_line(b"e 1", 61_000, &mut out).unwrap();
        // The sweep ran at 61 s: the next one waits a second.
        assert!(intake.graphite_line(b"f 1", 61_500, &mut out).is_err());
        assert!(intake.graphite_line(b"f 1", 91_000, &mut out).is_ok());
        let c = intake.counters();
        assert_eq!((c.series, c.dropped_samples_series_cap), (3, 3));
        let report = {
            let mut out = Vec::new();
            intake.influx_body(b"m,k=v a=1,b=2\n", Precision::Seconds, 92_000, &mut out)
        };
        let message = report.message().unwrap();
        assert!(
            message.starts_with("line 1: the limit of 3 series is reached: 2 samples"),
            "{message}"
        );
    }
}
