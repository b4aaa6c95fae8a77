//! The unit every metric source produces and the pipeline carries: a
//! [`Sample`] is one value of one [`Series`] at one time, and a series is
//! a name, sorted labels, a [`Kind`] and a unit. Sources build them, the
//! batcher gathers them and `encode` turns them into a `MetricBatch`; the
//! backend's decoder gives them back as `encode::Decoded`.

use std::sync::Arc;

/// How the values of a series behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A total that only grows, except when its source restarts.
    Counter,
}

/// A metric series: its name, its labels sorted by name, its kind and unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Series {
    /// The metric's name, e.g. `host_cpu_usage_ratio`; never empty.
    pub name: String,
    /// Label pairs `(name, value)`, sorted by name, each name once and
    /// never empty. [`Series::label`] keeps them so.
    pub labels: Vec<(String, String)>,
    /// How its values behave.
    pub kind: Kind,
    /// The unit, e.g. `bytes`; empty for none.
    pub unit: String,
}

impl Series {
    /// A series without labels or unit.
    pub fn new(name: impl Into<String>, kind: Kind) -> Self {
        Series {
            name: name.into(),
            labels: Vec::new(),
            kind,
            unit: String::new(),
        }
    }

    /// Adds a label in its sorted place, replacing one of the same name.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        match self.labels.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.labels[i].1 = value,
            Err(i) => self.labels.insert(i, (name, value)),
        }
        self
    }

    /// Sets the unit.
    pub fn unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = unit.into();
        self
    }
}

/// One value of one series at one time.
///
/// The series is shared: a source keeps one `Arc<Series>` per series and
/// clones it into every sample, so that a builder recognises the series by
/// its address, without hashing its name and labels.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which series.
    pub series: Arc<Series>,
    /// When, in milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// The value.
    pub value: f64,
}

/// Where a scrape appends its samples, and the time it stamps on them:
/// the host and container sources write through it.
pub(crate) struct Out<'a>(pub(crate) &'a mut Vec<Sample>, pub(crate) i64);

impl Out<'_> {
    /// Appends a sample of `series`, unless `value` is not finite.
    pub(crate) fn push(&mut self, series: &Arc<Series>, value: f64) {
        if value.is_finite() {
            self.0.push(Sample {
                series: series.clone(),
                time_unix_ms: self.1,
                value,
            });
        }
    }
}
