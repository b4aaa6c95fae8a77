//! Samples as the most compact OTLP metrics request, the peer of uplink's
//! batches in the encoding and pipeline benchmarks.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use uplink::metrics::sample::{Kind, Sample};

use super::T0_MS;

/// Label names that are OTLP resource attributes.
pub const RESOURCE_KEYS: [&str; 5] = [
    "container.id",
    "container.image.name",
    "container.name",
    "host.name",
    "service.name",
];

/// Start time of cumulative sums, in ns.
const START_NS: u64 = (T0_MS as u64 - 864_000_000) * 1_000_000;

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
    }
}

/// Samples to the most compact OTLP request: grouped by resource, then by
/// metric name.
pub fn otlp_request(samples: &[Sample]) -> ExportMetricsServiceRequest {
    // As in the uplink builder, a series seen before is found by the
    // address of its `Arc`.
    let mut seen: HashMap<
        usize,
        (usize, usize),
        BuildHasherDefault<uplink::metrics::encode::WordHasher>,
    > = HashMap::default();
    let mut resources: HashMap<Vec<(&str, &str)>, usize> = HashMap::new();
    let mut metrics: HashMap<(usize, &str), usize> = HashMap::new();
    let mut out: Vec<ResourceMetrics> = Vec::new();
    let mut key: Vec<(&str, &str)> = Vec::new();
    for s in samples {
        let address = Arc::as_ptr(&s.series) as usize;
        let (r, m) = match seen.get(&address) {
            Some(&found) => found,
            None => {
                let found = otlp_place(s, &mut resources, &mut metrics, &mut out, &mut key);
                seen.insert(address, found);
                found
            }
        };
        otlp_point(s, &mut out[r].scope_metrics[0].metrics[m]);
    }
    ExportMetricsServiceRequest {
        resource_metrics: out,
    }
}

/// The resource and metric of a series not seen before, created if need be.
fn otlp_place<'a>(
    s: &'a Sample,
    resources: &mut HashMap<Vec<(&'a str, &'a str)>, usize>,
    metrics: &mut HashMap<(usize, &'a str), usize>,
    out: &mut Vec<ResourceMetrics>,
    key: &mut Vec<(&'a str, &'a str)>,
) -> (usize, usize) {
    {
        key.clear();
        key.extend(
            s.series
                .labels
                .iter()
                .filter(|(k, _)| RESOURCE_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let r = match resources.get(key.as_slice()) {
            Some(&r) => r,
            None => {
                let r = out.len();
                out.push(ResourceMetrics {
                    resource: Some(Resource {
                        attributes: key.iter().map(|(k, v)| kv(k, v)).collect(),
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "uplink".into(),
                            version: uplink::VERSION.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                resources.insert(key.clone(), r);
                r
            }
        };
        let scope = &mut out[r].scope_metrics[0];
        let m = *metrics
            .entry((r, s.series.name.as_str()))
            .or_insert_with(|| {
                let data = match s.series.kind {
                    Kind::Gauge => metric::Data::Gauge(Gauge {
                        data_points: Vec::new(),
                    }),
                    Kind::Counter => metric::Data::Sum(Sum {
                        data_points: Vec::new(),
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    }),
                };
                scope.metrics.push(Metric {
                    name: s.series.name.clone(),
                    unit: s.series.unit.clone(),
                    data: Some(data),
                    ..Default::default()
                });
                scope.metrics.len() - 1
            });
        (r, m)
    }
}

/// Appends the sample's data point to its metric.
fn otlp_point(s: &Sample, metric: &mut Metric) {
    let v = s.value;
    let value = if v.fract() == 0.0 && v.abs() < 9.0e15 {
        number_data_point::Value::AsInt(v as i64)
    } else {
        number_data_point::Value::AsDouble(v)
    };
    let point = NumberDataPoint {
        attributes: s
            .series
            .labels
            .iter()
            .filter(|(k, _)| !RESOURCE_KEYS.contains(&k.as_str()))
            .map(|(k, v)| kv(k, v))
            .collect(),
        time_unix_nano: s.time_unix_ms as u64 * 1_000_000,
        value: Some(value),
        ..Default::default()
    };
    match &mut metric.data {
        Some(metric::Data::Gauge(g)) => g.data_points.push(point),
        Some(metric::Data::Sum(sum)) => sum.data_points.push(NumberDataPoint {
            start_time_unix_nano: START_NS,
            ..point
        }),
        _ => unreachable!("only gauges and sums are built"),
    }
}
