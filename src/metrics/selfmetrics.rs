//! The self-metrics source: the agent's own counters and gauges (the
//! `metrics` facade, recorded by [`crate::telemetry`]) turned into samples,
//! so they travel the pipeline beside the host's and the containers'.
//! Histograms and summaries are left out.

use std::collections::HashMap;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics::sample::{Kind, Sample, Series};

/// The agent's own metrics as samples: renders the process-wide recorder
/// and parses its Prometheus text.
pub struct SelfSource {
    handle: Option<PrometheusHandle>,
    series: HashMap<String, Arc<Series>>,
}

impl SelfSource {
    /// Installs the process-wide recorder (or takes the one installed
    /// before); None when another recorder was installed first.
    pub fn install() -> Option<SelfSource> {
        let handle = crate::telemetry::install()?;
        Some(SelfSource {
            handle: Some(handle),
            series: HashMap::new(),
        })
    }

    /// Appends the current value of every counter and gauge, at `now`.
    pub fn scrape(&mut self, now: i64, out: &mut Vec<Sample>) {
        if let Some(text) = self.handle.as_ref().map(|h| h.render()) {
            self.scrape_text(&text, now, out);
        }
    }

    /// Parses Prometheus text: counters and gauges become samples; series
    /// are kept while they appear, so their `Arc` is reused.
    fn scrape_text(&mut self, text: &str, now: i64, out: &mut Vec<Sample>) {
        let mut kinds: HashMap<&str, Kind> = HashMap::new();
        let mut seen = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    match kind {
                        "counter" => kinds.insert(name, Kind::Counter),
                        "gauge" => kinds.insert(name, Kind::Gauge),
                        _ => None,
                    };
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = key.split('{').next().unwrap_or(key);
            let Some(&kind) = kinds.get(name) else {
                continue;
            };
            let series = match self.series.get(key) {
                Some(s) => s.clone(),
                None => {
                    let mut s = Series::new(name, kind);
                    if let Some(labels) = key
                        .strip_prefix(name)
                        .and_then(|l| l.strip_prefix('{'))
                        .and_then(|l| l.strip_suffix('}'))
                    {
                        for pair in labels.split("\",") {
                            if let Some((k, v)) = pair.split_once("=\"") {
                                s = s.label(k, v.trim_end_matches('"'));
                            }
                        }
                    }
                    let s = Arc::new(s);
                    self.series.insert(key.to_string(), s.clone());
                    s
                }
            };
            seen.push(key.to_string());
            out.push(Sample {
                series,
                time_unix_ms: now,
                value,
            });
        }
        if self.series.len() > seen.len() {
            self.series.retain(|k, _| seen.contains(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_metrics_text_becomes_samples_with_kinds_and_labels() {
        let text = "# TYPE uplink_agent_commands_total counter\nuplink_agent_commands_total{status=\"COMMAND_STATUS_OK\"} 3\n\
                    # TYPE uplink_agent_spool_bytes gauge\nuplink_agent_spool_bytes 4096\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nnot a line\n";
        let mut s = SelfSource {
            handle: None,
            series: HashMap::new(),
        };
        let mut out = Vec::new();
        s.scrape_text(text, 7, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].series.name, "uplink_agent_commands_total");
        assert_eq!(out[0].series.kind, Kind::Counter);
        assert_eq!(
            out[0].series.labels,
            vec![("status".to_string(), "COMMAND_STATUS_OK".to_string())]
        );
        assert_eq!((out[0].value, out[0].time_unix_ms), (3.0, 7));
        assert_eq!(out[1].series.kind, Kind::Gauge);
        let first = out[0].series.clone();
        out.clear();
        s.scrape_text(text, 8, &mut out);
        assert!(Arc::ptr_eq(&first, &out[0].series));
    }
}
