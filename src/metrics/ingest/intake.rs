//! The pure core behind both listeners: [`Intake`] turns parsed lines
//! into samples under the limits, counts what it accepts and rejects
//! ([`IngestCounters`]), limits warnings per reason, and sums up an HTTP
//! body ([`BodyReport`]). It has no I/O and takes the time as a parameter.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::metrics::sample::{Kind, Sample, Series};

use super::graphite::parse_graphite;
use super::influx::{FieldValue, Precision, parse_influx};
use super::lines::{LineError, Reason, Rejection, excerpt, has_control, reject, syntax};
use super::series::SeriesCache;
use super::{IngestLimits, WARN_EVERY_MS};

/// The two protocols, for log fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Graphite,
    Influx,
}

impl Protocol {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Protocol::Graphite => "graphite",
            Protocol::Influx => "influx",
        }
    }
}

/// What the counters said at one moment, for self-metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestCounters {
    /// How many samples were handed to the batcher's channel.
    pub accepted_samples: u64,
    /// How many lines were rejected, one entry per reason in
    /// [`Reason::ALL`]'s order.
    pub rejected_lines: Vec<(Reason, u64)>,
    /// How many samples were dropped because the series cache was full.
    pub dropped_samples_series_cap: u64,
    /// How many Influx string fields were skipped; they are not ingested.
    pub skipped_string_fields: u64,
    /// How many connections were closed at once because their listener
    /// already had [`IngestConfig::max_connections`].
    pub refused_connections: u64,
    /// How many HTTP writes were answered 503 because the batcher's
    /// channel was full.
    pub throttled_requests: u64,
    /// How many series the cache holds.
    pub series: usize,
}

impl IngestCounters {
    /// Returns how many lines were rejected for `reason`.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected_lines
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Returns how many lines were rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_lines.iter().map(|(_, n)| n).sum()
    }
}

/// What can be warned about, each at most once per [`WARN_EVERY_MS`].
#[derive(Clone, Copy)]
enum Warning {
    Rejected(Reason),
    SeriesCap,
    ConnectionCap,
    Backpressure,
}

impl Warning {
    const COUNT: usize = Reason::ALL.len() + 3;

    fn index(self) -> usize {
        match self {
            Warning::Rejected(r) => r.index(),
            Warning::SeriesCap => Reason::ALL.len(),
            Warning::ConnectionCap => Reason::ALL.len() + 1,
            Warning::Backpressure => Reason::ALL.len() + 2,
        }
    }
}

/// At most one warning per kind per [`WARN_EVERY_MS`], counting the ones
/// held back.
struct WarnLimiter {
    last: [AtomicI64; Warning::COUNT],
    held: [AtomicU64; Warning::COUNT],
}

impl WarnLimiter {
    fn new() -> Self {
        WarnLimiter {
            last: std::array::from_fn(|_| AtomicI64::new(i64::MIN)),
            held: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// `Some(n)` when a warning of this kind may be logged now, `n` being
    /// how many were held back since the last one; `None` holds it back.
    fn allow(&self, warning: Warning, now_unix_ms: i64) -> Option<u64> {
        let i = warning.index();
        let last = self.last[i].load(Ordering::Relaxed);
        if now_unix_ms.saturating_sub(last) >= WARN_EVERY_MS
            && self.last[i]
                .compare_exchange(last, now_unix_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held[i].swap(0, Ordering::Relaxed))
        } else {
            self.held[i].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    dropped_series_cap: AtomicU64,
    skipped_strings: AtomicU64,
    refused_connections: AtomicU64,
    throttled: AtomicU64,
}

/// One bad line of a body, for the 400 answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// The line's number, from 1, counting every line of the body.
    pub number: usize,
    /// What was wrong with it.
    pub error: LineError,
    /// Its start, made printable.
    pub excerpt: String,
}

/// What became of the lines of an HTTP body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyReport {
    /// How many lines the body had, not counting blank lines and `#`
    /// comments.
    pub lines: usize,
    /// How many lines were rejected or lost samples to the series cap.
    pub bad_lines: usize,
    /// The first such line, if any.
    pub first_bad: Option<BadLine>,
}

impl BodyReport {
    /// Returns the error message for a 400, when a line was bad.
    pub fn message(&self) -> Option<String> {
        let bad = self.first_bad.as_ref()?;
        let others = if self.bad_lines > 1 {
            format!(
                "{} of {} lines had problems; the others were accepted",
                self.bad_lines, self.lines
            )
        } else {
            format!("the other {} lines were accepted", self.lines - 1)
        };
        Some(format!(
            "line {}: {}: '{}' ({others})",
            bad.number, bad.error, bad.excerpt
        ))
    }
}

/// Turns lines of either protocol into samples: checks the limits, shares
/// one `Arc<Series>` per series through a bounded cache, counts every
/// rejected line by reason and logs at most one warning per reason per
/// 10 s. Shared by all connections; the cache's lock is held only to look
/// up the series of one line.
pub struct Intake {
    limits: IngestLimits,
    cache: Mutex<SeriesCache>,
    counters: Counters,
    warnings: WarnLimiter,
}

impl fmt::Debug for Intake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intake")
            .field("limits", &self.limits)
            .field("counters", &self.counters())
            .finish()
    }
}

impl Intake {
    /// Creates an intake with an empty series cache.
    pub fn new(limits: IngestLimits) -> Self {
        Intake {
            cache: Mutex::new(SeriesCache::new(&limits)),
            limits,
            counters: Counters::default(),
            warnings: WarnLimiter::new(),
        }
    }

    /// Takes one Graphite line (without its newline) and appends its
    /// sample to `out`. Blank lines are ignored. A problem is counted and
    /// logged here, and returned for the caller to report.
    pub fn graphite_line(
        &self,
        line: &[u8],
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        self.graphite(line, now_unix_ms, out)
            .inspect_err(|e| self.note(Protocol::Graphite, line, e, now_unix_ms))
    }

    fn graphite(&self, line: &[u8], now: i64, out: &mut Vec<Sample>) -> Result<(), LineError> {
        self.check_length(line)?;
        let parsed = parse_graphite(line, now)?;
        self.check_name(parsed.path)?;
        self.check_labels(parsed.tags.iter().map(|(n, v)| (*n, *v)))?;
        let mut series = Series::new(parsed.path, Kind::Gauge);
        for (n, v) in parsed.tags {
            series = series.label(n, v);
        }
        let got = self.lock().get(series, now);
        match got {
            Some(series) => {
                out.push(Sample {
                    series,
                    time_unix_ms: parsed.time_unix_ms,
                    value: parsed.value,
                });
                Ok(())
            }
            None => Err(self.series_cap(1)),
        }
    }

    /// Takes one Influx line (without its newline) and appends a sample
    /// per numeric field to `out`. Blank lines and `#` comments are
    /// ignored. A problem is counted and logged here, and returned for the
    /// caller to report.
    pub fn influx_line(
        &self,
        line: &[u8],
        precision: Precision,
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        let line = line.trim_ascii();
        if line.is_empty() || line[0] == b'#' {
            return Ok(());
        }
        self.influx(line, precision, now_unix_ms, out)
            .inspect_err(|e| self.note(Protocol::Influx, line, e, now_unix_ms))
    }

    fn influx(
        &self,
        line: &[u8],
        precision: Precision,
        now: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        self.check_length(line)?;
        let parsed = parse_influx(line, precision, now)?;
        self.check_labels(parsed.tags.iter().map(|(n, v)| (&**n, &**v)))?;
        let mut base = Series::new(String::new(), Kind::Gauge);
        for (n, v) in parsed.tags {
            base = base.label(n, v);
        }
        // Every name is checked before any sample is taken, so that a line
        // is rejected whole.
        let mut named = Vec::with_capacity(parsed.fields.len());
        let mut strings = 0;
        for (field, value) in &parsed.fields {
            match value {
                FieldValue::Number(v) => {
                    let name = format!("{}_{field}", parsed.measurement);
                    self.check_name(&name)?;
                    named.push((name, *v));
                }
                FieldValue::Text => strings += 1,
            }
        }
        if strings > 0 {
            self.counters
                .skipped_strings
                .fetch_add(strings, Ordering::Relaxed);
        }
        let mut dropped = 0;
        let mut cache = self.lock();
        for (name, value) in named {
            let series = Series {
                name,
                ..base.clone()
            };
            match cache.get(series, now) {
                Some(series) => out.push(Sample {
                    series,
                    time_unix_ms: parsed.time_unix_ms,
                    value,
                }),
                None => dropped += 1,
            }
        }
        drop(cache);
        if dropped > 0 {
            return Err(self.series_cap(dropped));
        }
        Ok(())
    }

    /// Takes every line of an Influx body, appending their samples to
    /// `out`, and reports the bad ones.
    pub fn influx_body(
        &self,
        body: &[u8],
        precision: Precision,
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> BodyReport {
        let mut report = BodyReport::default();
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() || trimmed[0] == b'#' {
                continue;
            }
            report.lines += 1;
            if let Err(error) = self.influx_line(trimmed, precision, now_unix_ms, out) {
                report.bad_lines += 1;
                if report.first_bad.is_none() {
                    report.first_bad = Some(BadLine {
                        number: i + 1,
                        error,
                        excerpt: excerpt(trimmed),
                    });
                }
            }
        }
        report
    }

    /// Returns the counters as they are now.
    pub fn counters(&self) -> IngestCounters {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestCounters {
            accepted_samples: load(&c.accepted),
            rejected_lines: Reason::ALL
                .iter()
                .map(|r| (*r, load(&c.rejected[r.index()])))
                .collect(),
            dropped_samples_series_cap: load(&c.dropped_series_cap),
            skipped_string_fields: load(&c.skipped_strings),
            refused_connections: load(&c.refused_connections),
            throttled_requests: load(&c.throttled),
            series: self.lock().len(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeriesCache> {
        // The cache stays consistent whatever a panicking holder did: each
        // change is one insert or retain.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_length(&self, line: &[u8]) -> Result<(), Rejection> {
        if line.len() > self.limits.max_line_bytes {
            return Err(reject(Reason::LineTooLong, "the line is too long"));
        }
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<(), Rejection> {
        if name.len() > self.limits.max_name_bytes {
            return Err(reject(Reason::NameTooLong, "the series name is too long"));
        }
        if has_control(name) {
            return Err(syntax("the series name has a control character"));
        }
        Ok(())
    }

    fn check_labels<'a>(
        &self,
        labels: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), Rejection> {
        if labels.len() > self.limits.max_labels {
            return Err(reject(
                Reason::TooManyLabels,
                "the line has too many labels",
            ));
        }
        for (name, value) in labels {
            if name.len() > self.limits.max_label_name_bytes {
                return Err(reject(Reason::LabelTooLong, "a label name is too long"));
            }
            if value.len() > self.limits.max_label_value_bytes {
                return Err(reject(Reason::LabelTooLong, "a label value is too long"));
            }
            if has_control(name) || has_control(value) {
                return Err(syntax("a label has a control character"));
            }
        }
        Ok(())
    }

    fn series_cap(&self, dropped: usize) -> LineError {
        LineError::SeriesCap {
            dropped,
            max_series: self.limits.max_series,
        }
    }

    /// Counts a problem and logs it, unless one like it was logged in the
    /// last 10 s.
    fn note(&self, protocol: Protocol, line: &[u8], error: &LineError, now_unix_ms: i64) {
        let warning = match error {
            LineError::Rejected(r) => {
                self.counters.rejected[r.reason.index()].fetch_add(1, Ordering::Relaxed);
                Warning::Rejected(r.reason)
            }
            LineError::SeriesCap { dropped, .. } => {
                self.counters
                    .dropped_series_cap
                    .fetch_add(*dropped as u64, Ordering::Relaxed);
                Warning::SeriesCap
            }
        };
        if let Some(held_back) = self.warnings.allow(warning, now_unix_ms) {
            let reason = match error {
                LineError::Rejected(r) => r.reason.as_str(),
                LineError::SeriesCap { .. } => "series_cap",
            };
            tracing::warn!(
                protocol = protocol.as_str(),
                reason,
                line = %excerpt(line),
                held_back,
                "load generator line rejected: {error}"
            );
        }
    }

    /// Counts and logs a line that was too long to buffer, by its start.
    pub(super) fn reject_overlong(&self, protocol: Protocol, start: &[u8], now_unix_ms: i64) {
        let error = LineError::Rejected(reject(Reason::LineTooLong, "the line is too long"));
        self.note(protocol, start, &error, now_unix_ms);
    }

    pub(super) fn accepted(&self, samples: usize) {
        self.counters
            .accepted
            .fetch_add(samples as u64, Ordering::Relaxed);
    }

    pub(super) fn refused(
        &self,
        protocol: Protocol,
        peer: SocketAddr,
        max: usize,
        now_unix_ms: i64,
    ) {
        self.counters
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.warnings.allow(Warning::ConnectionCap, now_unix_ms) {
            tracing::warn!(
                protocol = protocol.as_str(),
                %peer,
                held_back,
                "load generator connection refused: {max} connections are open"
            );
        }
    }

    pub(super) fn throttled(&self, now_unix_ms: i64) {
        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.warnings.allow(Warning::Backpressure, now_unix_ms) {
            tracing::warn!(
                held_back,
                "the batcher is full: answering load generator writes with 503"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::BatchBuilder;
    use crate::metrics::encode::MAX_ABS_TIME_MS;
    use crate::metrics::ingest::testing::{NOW, intake, labels};
    use std::sync::Arc;

    #[test]
    fn graphite_samples_share_one_series_per_name_and_tags() {
        let intake = intake();
        let mut out = Vec::new();
        for line in [
            "a;z=1;b=2 1 10",
            "a;b=2;z=1 2 20",
            "a;b=2;z=1;b=3 3 30",
            "b 4 40",
            "",
            "   ",
        ] {
            intake
                .graphite_line(line.as_bytes(), NOW, &mut out)
                .unwrap();
        }
        assert_eq!(out.len(), 4);
        assert!(Arc::ptr_eq(&out[0].series, &out[1].series));
        assert_eq!(labels(&out[0]), vec![("b", "2"), ("z", "1")]);
        // A tag given twice keeps its last value: another series.
        assert_eq!(labels(&out[2]), vec![("b", "3"), ("z", "1")]);
        assert_eq!(out[3].series.name, "b");
        assert!(out.iter().all(|s| s.series.kind == Kind::Gauge));
        assert_eq!(out[2].time_unix_ms, 30_000);
        assert_eq!(intake.counters().series, 3);
    }

    #[test]
    fn influx_samples_are_named_measurement_field() {
        let intake = intake();
        let mut out = Vec::new();
        let body = b"# a comment\n\nhttp_reqs,url=/a,method=GET count=3i,dur=12.5,note=\"x\" 1000000000\r\nhttp_reqs,method=GET,url=/a count=4i 2000000000\nevents,title=start text=\"started\"\n";
        let report = intake.influx_body(body, Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(
            report,
            BodyReport {
                lines: 3,
                bad_lines: 0,
                first_bad: None
            }
        );
        let names: Vec<&str> = out.iter().map(|s| s.series.name.as_str()).collect();
        assert_eq!(
            names,
            ["http_reqs_count", "http_reqs_dur", "http_reqs_count"]
        );
        assert_eq!(labels(&out[0]), vec![("method", "GET"), ("url", "/a")]);
        assert!(Arc::ptr_eq(&out[0].series, &out[2].series));
        assert_eq!(
            out.iter()
                .map(|s| (s.time_unix_ms, s.value))
                .collect::<Vec<_>>(),
            [(1_000, 3.0), (1_000, 12.5), (2_000, 4.0)]
        );
        let c = intake.counters();
        assert_eq!(c.skipped_string_fields, 2);
        assert_eq!(c.rejected_total(), 0);
        assert_eq!(c.series, 2);
    }

    #[test]
    fn limits_reject_lines_whole_and_count_them() {
        let limits = IngestLimits {
            max_line_bytes: 300,
            max_name_bytes: 10,
            max_labels: 2,
            max_label_name_bytes: 3,
            max_label_value_bytes: 4,
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut out = Vec::new();
        let long = format!("a {}", "1".repeat(299));
        let cases: Vec<(String, Reason)> = vec![
            (long, Reason::LineTooLong),
            ("abcdefghijk 1".into(), Reason::NameTooLong),
            ("a;x=1;y=2;z=3 1".into(), Reason::TooManyLabels),
            ("a;long=1 1".into(), Reason::LabelTooLong),
            ("a;k=12345 1".into(), Reason::LabelTooLong),
            ("a\u{1b}[31m 1".into(), Reason::Syntax),
            ("a;k=\u{7f} 1".into(), Reason::Syntax),
        ];
        for (line, want) in &cases {
            let got = intake.graphite_line(line.as_bytes(), NOW, &mut out);
            match got {
                Err(LineError::Rejected(r)) => assert_eq!(r.reason, *want, "{line:?}"),
                other => panic!("{line:?}: {other:?}"),
            }
        }
        // Influx: the name includes the field; one bad field rejects the
        // whole line.
        let got = intake.influx_line(b"m a=1,toolongfield=2", Precision::Seconds, NOW, &mut out);
        assert!(
            matches!(got, Err(LineError::Rejected(r)) if r.reason == Reason::NameTooLong),
            "{got:?}"
        );
        let got = intake.influx_line(b"m,a=1,b=2,c=3 v=1", Precision::Seconds, NOW, &mut out);
        assert!(matches!(got, Err(LineError::Rejected(r)) if r.reason == Reason::TooManyLabels));
        assert!(out.is_empty());
        intake
            .graphite_line(b"abcdefghij;k=1234 1", NOW, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        let c = intake.counters();
        assert_eq!(c.rejected(Reason::LineTooLong), 1);
        assert_eq!(c.rejected(Reason::NameTooLong), 2);
        assert_eq!(c.rejected(Reason::TooManyLabels), 2);
        assert_eq!(c.rejected(Reason::LabelTooLong), 2);
        assert_eq!(c.rejected(Reason::Syntax), 2);
        assert_eq!(c.rejected_total(), 9);
    }

    #[test]
    fn warnings_are_limited_per_kind_and_count_what_was_held_back() {
        let w = WarnLimiter::new();
        let syntax = Warning::Rejected(Reason::Syntax);
        assert_eq!(w.allow(syntax, 0), Some(0));
        assert_eq!(w.allow(syntax, 1), None);
        assert_eq!(w.allow(syntax, 9_999), None);
        // Another kind has its own budget.
        assert_eq!(w.allow(Warning::SeriesCap, 5), Some(0));
        assert_eq!(w.allow(syntax, 10_000), Some(2));
        assert_eq!(w.allow(syntax, 10_001), None);
        assert_eq!(w.allow(syntax, 30_000), Some(1));
        // A clock that jumps back holds warnings back; it does not panic.
        assert_eq!(w.allow(syntax, i64::MIN), None);
        assert_eq!(w.allow(Warning::Backpressure, -5), Some(0));
    }

    #[test]
    fn a_body_report_names_the_first_bad_line() {
        let intake = intake();
        let mut out = Vec::new();
        let body = b"a v=1\n\nbad line here\nb v=2\nc v=x\n";
        let report = intake.influx_body(body, Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((report.lines, report.bad_lines), (4, 2));
        let message = report.message().unwrap();
        assert_eq!(
            message,
            "line 3: a field has no '=': 'bad line here' (2 of 4 lines had problems; the others were accepted)"
        );
        let one = intake.influx_body(b"x\ny v=1", Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(
            one.message().unwrap(),
            "line 1: the line has no fields: 'x' (the other 1 lines were accepted)"
        );
        let good = intake.influx_body(b"z v=1\n", Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(good.message(), None);
    }

    /// A line that is almost valid: a valid one with a few bytes changed,
    /// inserted or removed, favouring the bytes that mean something.
    fn mutate(rng: &mut fastrand::Rng, line: &str) -> Vec<u8> {
        const SPECIAL: &[u8] = b" ,=\\\";\t\r\n#-+.eEiutTfF0\x00\xff\xc3";
        let mut b = line.as_bytes().to_vec();
        for _ in 0..rng.usize(1..4) {
            let byte = if rng.bool() {
                SPECIAL[rng.usize(0..SPECIAL.len())]
            } else {
                rng.u8(..)
            };
            let at = rng.usize(0..=b.len());
            match rng.u8(0..3) {
                0 => b.insert(at, byte),
                1 if at < b.len() => b[at] = byte,
                _ if at < b.len() => {
                    b.remove(at);
                }
                _ => b.push(byte),
            }
        }
        b
    }

    #[test]
    fn random_and_mutated_input_never_panics_and_yields_encodable_samples() {
        let valid = [
            "jmeter.all.ok.count 10 1700000000",
            "a.b;tag=v;t2=w 1.5e3 -1",
            "x 1",
            "cpu,host=a\\ b,r=eu usage=0.5,n=3i,u=7u,ok=t,s=\"q\\\"x\" 1700000000000000000",
            "m\\,x f\\=1=1 5",
            "events,title=ApacheJMeter text=\"started\"",
        ];
        let limits = IngestLimits {
            max_series: 200,
            max_line_bytes: 4_096,
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut builder = BatchBuilder::new();
        let mut out = Vec::new();
        let mut produced = 0;
        for round in 0..40_000 {
            let line: Vec<u8> = if round % 3 == 0 {
                (0..rng.usize(0..60)).map(|_| rng.u8(..)).collect()
            } else {
                let base = valid[rng.usize(0..valid.len())];
                mutate(&mut rng, base)
            };
            let precision =
                [Precision::Nanoseconds, Precision::Seconds, Precision::Hours][rng.usize(0..3)];
            let now = rng.i64(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS);
            let _ = parse_graphite(&line, now);
            let _ = parse_influx(&line, precision, now);
            let _ = intake.graphite_line(&line, now, &mut out);
            let _ = intake.influx_line(&line, precision, now, &mut out);
            if round % 10 == 0 {
                let _ = intake.influx_body(&line, precision, now, &mut out);
            }
            for s in out.drain(..) {
                assert!(!s.series.name.is_empty() && s.value.is_finite(), "{s:?}");
                builder
                    .add(&s)
                    .unwrap_or_else(|e| panic!("{s:?} is not encodable: {e}"));
                produced += 1;
            }
            if builder.len() > 1_000 {
                builder.finish();
            }
        }
        assert!(
            produced > 1_000,
            "mutations left too few valid lines: {produced}"
        );
        assert!(intake.counters().rejected_total() > 10_000);
    }

    /// Prints what parsing costs here; run with `--nocapture` to see it.
    #[test]
    fn parse_cost() {
        let intake = intake();
        let graphite: Vec<String> = (0..20_000)
            .map(|i| format!("jmeter.sampler{}.ok.pct99 {i}.5 1700000000", i % 50))
            .collect();
        let influx: String = (0..20_000)
            .map(|i| {
                format!(
                    "http_req_duration,method=GET,name=/api/{},status=200 value={i}.25 1700000000000000000\n",
                    i % 50
                )
            })
            .collect();
        let mut out = Vec::with_capacity(20_000);
        let started = std::time::Instant::now();
        for line in &graphite {
            intake
                .graphite_line(line.as_bytes(), NOW, &mut out)
                .unwrap();
        }
        let g = started.elapsed();
        out.clear();
        let started = std::time::Instant::now();
        let report = intake.influx_body(influx.as_bytes(), Precision::Nanoseconds, NOW, &mut out);
        let i = started.elapsed();
        assert_eq!((report.bad_lines, out.len()), (0, 20_000));
        println!(
            "ingest: graphite {:?}/line, influx {:?}/line (debug builds are slower)",
            g / 20_000,
            i / 20_000
        );
    }
}
