//! The latest value of every series, for Prometheus to scrape: text
//! exposition format 0.0.4, served at `GET /metrics` by the backend.
//!
//! Each series is stored under its metric name and its labels: `agent`,
//! `provider` and `hostname` (of the agent that sent it), then the series'
//! own labels. Names are sanitized to Prometheus' charset (every other
//! character becomes `_`, a leading digit gets a `_` before it); an own
//! label named like one of the three agent labels, or starting with `__`,
//! is renamed `exported_<name>`, as Prometheus does with clashing target
//! labels. Two series that become the same after sanitizing share one
//! entry.
//!
//! Memory is bounded: at most `max_series` series are kept, and at most
//! `max_bytes` of their names and label blocks (each series also counted
//! with [`SERIES_OVERHEAD`]), so the scrape page stays about that size too;
//! a sample of a new series beyond either is dropped and counted; and a
//! series not updated for `ttl` is evicted. Time is passed in, so this is plain logic.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::encode::Decoded;
use crate::metrics::sample::Kind;

/// Where a batch's samples came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The agent's id.
    pub agent: String,
    /// The agent's provider.
    pub provider: String,
    /// The agent's hostname, as it last reported it (may be empty).
    pub hostname: String,
}

/// The latest value of every series.
pub struct LatestValues {
    max_series: usize,
    max_bytes: usize,
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    /// By sanitized metric name.
    families: HashMap<String, Family>,
    /// Series in all families.
    series: usize,
    /// What those series cost, see [`cost`].
    bytes: usize,
    /// When series older than the TTL were last evicted.
    last_sweep: Option<Instant>,
    /// New series refused because `max_series` was reached.
    dropped: u64,
    /// Series evicted for age.
    evicted: u64,
}

struct Family {
    kind: Kind,
    /// Series of different kinds share this name: exposed as `untyped`.
    mixed: bool,
    /// By label block: `agent="..",provider="..",hostname="..",own="..."`,
    /// escaped, ready to print between braces.
    series: HashMap<Box<str>, Latest>,
}

#[derive(Clone, Copy)]
struct Latest {
    value: f64,
    time_ms: i64,
    /// When a sample last updated it (backend clock).
    updated: Instant,
}

/// What one update did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Series created.
    pub created: usize,
    /// Series refused because the cap was reached.
    pub dropped: usize,
}

/// Counts for the backend's own metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Series kept now.
    pub series: usize,
    /// New series refused since start.
    pub dropped: u64,
    /// Series evicted for age since start.
    pub evicted: u64,
}

/// What a series costs besides its name and labels: the map entries, the
/// value, its time and the page's punctuation, about.
pub const SERIES_OVERHEAD: usize = 64;

/// What a series of metric `name` with label block `labels` counts against
/// `max_bytes`.
fn cost(name: &str, labels: &str) -> usize {
    name.len() + labels.len() + SERIES_OVERHEAD
}

impl LatestValues {
    /// An empty store of at most `max_series` series and `max_bytes` (see
    /// [`cost`]), each kept `ttl` after its last update.
    pub fn new(max_series: usize, max_bytes: usize, ttl: Duration) -> Self {
        LatestValues {
            max_series,
            max_bytes,
            ttl,
            state: Mutex::new(State {
                families: HashMap::new(),
                series: 0,
                bytes: 0,
                last_sweep: None,
                dropped: 0,
                evicted: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps behind (each
        // update is a single insert or assignment): keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the latest sample (by sample time) of every series of `batch`.
    pub fn update(&self, origin: &Origin, batch: &Decoded, now: Instant) -> Update {
        // The latest point of each series in this batch, and the series'
        // family and label block, computed outside the lock.
        let mut latest: Vec<Option<(i64, f64)>> = vec![None; batch.series.len()];
        for p in &batch.points {
            let slot = &mut latest[p.series as usize];
            if slot.is_none_or(|(t, _)| p.time_unix_ms >= t) {
                *slot = Some((p.time_unix_ms, p.value));
            }
        }
        let updates: Vec<(String, Kind, String, i64, f64)> = batch
            .series
            .iter()
            .zip(latest)
            .filter_map(|(s, l)| {
                let (t, v) = l?;
                Some((
                    metric_name(&s.name),
                    s.kind,
                    label_block(origin, &s.labels),
                    t,
                    v,
                ))
            })
            .collect();
        let mut out = Update::default();
        let mut guard = self.lock();
        let st = &mut *guard;
        self.sweep_if_due(st, now);
        let mut added_bytes = 0;
        for (name, kind, labels, time_ms, value) in updates {
            let bytes = cost(&name, &labels);
            let full = st.series + out.created >= self.max_series
                || st.bytes + added_bytes + bytes > self.max_bytes;
            let family = match st.families.get_mut(&name) {
                Some(f) => f,
                None if full => {
                    out.dropped += 1;
                    continue;
                }
                None => st.families.entry(name).or_insert_with(|| Family {
                    kind,
                    mixed: false,
                    series: HashMap::new(),
                }),
            };
            family.mixed |= family.kind != kind;
            let fresh = Latest {
                value,
                time_ms,
                updated: now,
            };
            match family.series.get_mut(labels.as_str()) {
                Some(l) => {
                    if time_ms >= l.time_ms {
                        *l = fresh;
                    }
                }
                None if full => out.dropped += 1,
                None => {
                    family.series.insert(labels.into_boxed_str(), fresh);
                    out.created += 1;
                    added_bytes += bytes;
                }
            }
        }
        st.series += out.created;
        st.bytes += added_bytes;
        st.dropped += out.dropped as u64;
        // Families are created only below the cap, for a series that is
        // then inserted: no empty family is left behind.
        out
    }

    /// Evicts series not updated for the TTL, at most every quarter TTL
    /// (the sweep walks every series).
    fn sweep_if_due(&self, st: &mut State, now: Instant) {
        let every = (self.ttl / 4).max(Duration::from_secs(1));
        if st
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return;
        }
        st.last_sweep = Some(now);
        let ttl = self.ttl;
        let mut evicted = 0usize;
        let mut freed = 0usize;
        st.families.retain(|name, f| {
            f.series.retain(|labels, l| {
                let keep = now.saturating_duration_since(l.updated) < ttl;
                if !keep {
                    evicted += 1;
                    freed += cost(name, labels);
                }
                keep
            });
            !f.series.is_empty()
        });
        st.series -= evicted;
        st.bytes -= freed;
        st.evicted += evicted as u64;
    }

    /// Evicts what is due, then returns the counts.
    pub fn counts(&self, now: Instant) -> Counts {
        let mut st = self.lock();
        self.sweep_if_due(&mut st, now);
        Counts {
            series: st.series,
            dropped: st.dropped,
            evicted: st.evicted,
        }
    }

    /// Appends every series as text exposition 0.0.4 to `out`: one `# TYPE`
    /// line per metric name (`gauge`, `counter`, or `untyped` when series
    /// of both kinds share the name), then `name{labels} value timestamp`
    /// lines, sorted. Families named in `skip` are left out (the backend's
    /// own metrics, printed separately). The lock is taken family by
    /// family, so a large page does not hold up ingest for its whole
    /// rendering.
    pub fn render(&self, now: Instant, skip: &[&str], out: &mut String) {
        let mut names: Vec<String> = {
            let mut st = self.lock();
            self.sweep_if_due(&mut st, now);
            st.families
                .keys()
                .filter(|n| !skip.contains(&n.as_str()))
                .cloned()
                .collect()
        };
        names.sort_unstable();
        for name in names {
            let st = self.lock();
            // Evicted since the names were taken: nothing to show.
            let Some(f) = st.families.get(&name) else {
                continue;
            };
            let kind = match (f.mixed, f.kind) {
                (true, _) => "untyped",
                (false, Kind::Gauge) => "gauge",
                (false, Kind::Counter) => "counter",
            };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let mut series: Vec<(&Box<str>, &Latest)> = f.series.iter().collect();
            series.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (labels, l) in series {
                let _ = writeln!(
                    out,
                    "{name}{{{labels}}} {} {}",
                    value_text(l.value),
                    l.time_ms
                );
            }
        }
    }
}

/// A metric name in Prometheus' charset `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn metric_name(name: &str) -> String {
    sanitize(name, true)
}

/// A label name in Prometheus' charset `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn label_name(name: &str) -> String {
    sanitize(name, false)
}

fn sanitize(name: &str, colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    out
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The labels of a series, as printed between braces: the agent's three,
/// then the series' own (sanitized; clashing names renamed
/// `exported_<name>`; a name repeated after sanitizing keeps its first
/// value).
pub fn label_block(origin: &Origin, labels: &[(String, String)]) -> String {
    const OURS: [&str; 3] = ["agent", "provider", "hostname"];
    let mut out = String::with_capacity(64 + labels.len() * 24);
    let mut seen: Vec<String> = Vec::with_capacity(labels.len());
    for (name, value) in OURS
        .iter()
        .zip([&origin.agent, &origin.provider, &origin.hostname])
    {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        escape_value(value, &mut out);
        out.push('"');
    }
    for (name, value) in labels {
        let mut n = label_name(name);
        if OURS.contains(&n.as_str()) || n.starts_with("__") {
            n = format!("exported_{n}");
        }
        if seen.contains(&n) {
            continue;
        }
        out.push(',');
        out.push_str(&n);
        out.push_str("=\"");
        escape_value(value, &mut out);
        out.push('"');
        seen.push(n);
    }
    out
}

/// A sample value as Prometheus writes it: `NaN`, `+Inf`, `-Inf`, or the
/// shortest decimal that reads back as the same double.
pub fn value_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Debug is the shortest round-trip form, with an exponent for very
        // large and very small magnitudes (`1e-7`, `1e300`).
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::encode::Point;
    use crate::metrics::sample::Series;

    fn origin() -> Origin {
        Origin {
            agent: "agt_1".into(),
            provider: "lab".into(),
            hostname: "h\"1".into(),
        }
    }

    fn batch(series: Vec<Series>, points: &[(u32, i64, f64)]) -> Decoded {
        Decoded {
            series: series.into_iter().map(Arc::new).collect(),
            points: points
                .iter()
                .map(|&(series, time_unix_ms, value)| Point {
                    series,
                    time_unix_ms,
                    value,
                })
                .collect(),
        }
    }

    fn text(v: &LatestValues, now: Instant) -> String {
        let mut s = String::new();
        v.render(now, &[], &mut s);
        s
    }

    #[test]
    fn names_are_sanitized_and_values_escaped() {
        assert_eq!(metric_name("host.cpu-usage:ratio"), "host_cpu_usage:ratio");
        assert_eq!(metric_name("9lives"), "_9lives");
        assert_eq!(label_name("com.docker/name:x"), "com_docker_name_x");
        let labels = vec![
            ("agent".to_string(), "spoofed".to_string()),
            ("a.b".into(), "first".into()),
            ("a_b".into(), "second".into()),
            ("path".into(), "C:\\x\n\"y\"".into()),
        ];
        assert_eq!(
            label_block(&origin(), &labels),
            r#"agent="agt_1",provider="lab",hostname="h\"1",exported_agent="spoofed",a_b="first",path="C:\\x\n\"y\"""#
        );
        assert_eq!(value_text(f64::NAN), "NaN");
        assert_eq!(value_text(f64::INFINITY), "+Inf");
        assert_eq!(value_text(f64::NEG_INFINITY), "-Inf");
        assert_eq!(value_text(1.5), "1.5");
        assert_eq!(value_text(1e-7), "1e-7");
        assert_eq!(value_text(42.0).parse::<f64>().unwrap(), 42.0);
    }

    #[test]
    fn the_latest_sample_by_time_wins_and_types_print_once() {
        let v = LatestValues::new(100, usize::MAX, Duration::from_secs(900));
        let now = Instant::now();
        let cpu = Series::new("cpu", Kind::Gauge).label("core", "0");
        let cpu1 = Series::new("cpu", Kind::Gauge).label("core", "1");
        let bytes = Series::new("net.bytes", Kind::Counter);
        let b = batch(
            vec![cpu.clone(), cpu1, bytes],
            &[
                (0, 2000, 0.5),
                (0, 1000, 0.9), // older, pushed later: not the latest
                (1, 1000, f64::NAN),
                (2, 1000, 7.0),
            ],
        );
        assert_eq!(
            v.update(&origin(), &b, now),
            Update {
                created: 3,
                dropped: 0
            }
        );
        // A batch from the past (a replay) does not move a value back.
        v.update(&origin(), &batch(vec![cpu], &[(0, 1500, 0.1)]), now);
        let out = text(&v, now);
        let o = r#"agent="agt_1",provider="lab",hostname="h\"1""#;
        assert_eq!(
            out,
            format!(
                "# TYPE cpu gauge\ncpu{{{o},core=\"0\"}} 0.5 2000\ncpu{{{o},core=\"1\"}} NaN 1000\n\
                 # TYPE net_bytes counter\nnet_bytes{{{o}}} 7.0 1000\n"
            )
        );
        // The same name with another kind is untyped.
        v.update(
            &origin(),
            &batch(vec![Series::new("cpu", Kind::Counter)], &[(0, 1, 1.0)]),
            now,
        );
        assert!(text(&v, now).contains("# TYPE cpu untyped\n"));
        assert_eq!(text(&v, now).matches("# TYPE").count(), 2);
    }

    #[test]
    fn series_are_capped_and_evicted_when_stale() {
        let ttl = Duration::from_secs(60);
        let v = LatestValues::new(2, usize::MAX, ttl);
        let t0 = Instant::now();
        let s = |i: u32| Series::new("m", Kind::Gauge).label("i", i.to_string());
        let up = v.update(
            &origin(),
            &batch(
                vec![s(1), s(2), s(3)],
                &[(0, 1, 1.0), (1, 1, 2.0), (2, 1, 3.0)],
            ),
            t0,
        );
        assert_eq!(
            up,
            Update {
                created: 2,
                dropped: 1
            }
        );
        // Known series still update at the cap.
        let later = t0 + Duration::from_secs(40);
        v.update(&origin(), &batch(vec![s(1)], &[(0, 2, 10.0)]), later);
        assert_eq!(
            v.counts(later),
            Counts {
                series: 2,
                dropped: 1,
                evicted: 0
            }
        );
        // Series 2 was last updated at t0: gone after the TTL; series 1
        // stays, and there is room again.
        let after = t0 + Duration::from_secs(70);
        assert_eq!(
            v.counts(after),
            Counts {
                series: 1,
                dropped: 1,
                evicted: 1
            }
        );
        let out = text(&v, after);
        assert!(out.contains("i=\"1\"} 10.0 2"), "{out}");
        assert!(!out.contains("i=\"2\""), "{out}");
        let up = v.update(&origin(), &batch(vec![s(3)], &[(0, 3, 3.0)]), after);
        assert_eq!(up.created, 1);
        // Everything stale: the family goes too.
        let much_later = after + Duration::from_secs(3600);
        assert_eq!(v.counts(much_later).series, 0);
        assert_eq!(text(&v, much_later), "");
    }

    #[test]
    fn the_bytes_of_series_are_capped_and_what_is_dropped_counted() {
        let v = LatestValues::new(1_000_000, 64 * 1024, Duration::from_secs(900));
        let now = Instant::now();
        let mut created = 0;
        for i in 0..100 {
            let series =
                Series::new("m", Kind::Gauge).label("big", format!("{i}{}", "x".repeat(4000)));
            created += v
                .update(&origin(), &batch(vec![series], &[(0, 1, 1.0)]), now)
                .created;
        }
        let counts = v.counts(now);
        assert!((10..=16).contains(&created), "{created}");
        assert_eq!(counts.dropped, 100 - created as u64);
        let mut page = String::new();
        v.render(now, &[], &mut page);
        assert!(page.len() <= 64 * 1024, "{}", page.len());
    }
}
