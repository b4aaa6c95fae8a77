//! The OTLP peer of uplink's metrics in the encoding and pipeline
//! benchmarks: samples as the most compact OTLP metrics request
//! ([`otlp_request`]), a minimal receiver that decodes requests and counts
//! their data points ([`OtlpReceiver`]), and an exporter that batches
//! samples and exports them with a window of requests in flight
//! ([`OtlpClient`], [`otlp_pipeline`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::transport::Channel;
use uplink::metrics::sample::{Kind, Sample};
use uplink::net::Net;
use uplink::tls::{self, ServerIdentity};

use crate::workload::T0_MS;

/// Label names that are OTLP resource attributes.
pub const RESOURCE_KEYS: [&str; 5] = [
    "container.id",
    "container.image.name",
    "container.name",
    "host.name",
    "service.name",
];

/// Largest OTLP request the receiver takes, decompressed.
pub const OTLP_MAX_MESSAGE: usize = 64 << 20;
/// The gRPC method an exporter calls.
const OTLP_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
/// How long one export may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Start time of cumulative sums, in ns.
const START_NS: u64 = (T0_MS as u64 - 864_000_000) * 1_000_000;

/// A string attribute.
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

/// Data points in an OTLP request.
pub fn data_points(req: &ExportMetricsServiceRequest) -> u64 {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.len() as u64,
            Some(metric::Data::Sum(s)) => s.data_points.len() as u64,
            _ => 0,
        })
        .sum()
}

/// The minimal OTLP receiver, running: TLS with a CA of its own, HTTP/2,
/// tonic's gRPC server with zstd, prost decoding of the whole request and
/// a count of its data points. It neither validates, deduplicates nor
/// stores: a lower bound on what an OTLP path costs.
pub struct OtlpReceiver {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The generated CA an exporter must trust.
    pub ca: PathBuf,
    points: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts a receiver on `rt`, its TLS identity generated in `dir`.
    pub fn start(rt: &Runtime, dir: &Path) -> OtlpReceiver {
        std::fs::create_dir_all(dir).expect("cannot create the receiver's directory");
        let tls = tls::server_config(&ServerIdentity::Generated {
            data_dir: dir.to_path_buf(),
            hostnames: vec!["127.0.0.1".into()],
        })
        .expect("no TLS identity for the OTLP receiver");
        let ca = tls.ca_file.clone().expect("the receiver has no CA");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let points = Arc::new(AtomicU64::new(0));
        let task = rt.spawn(serve(
            listener,
            tls.config,
            Counter {
                points: points.clone(),
            },
        ));
        OtlpReceiver {
            addr,
            ca,
            points,
            task,
        }
    }

    /// The data points it has decoded so far.
    pub fn points(&self) -> u64 {
        self.points.load(Ordering::Relaxed)
    }

    /// Stops serving.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// The receiver's service: decodes each request and counts its points.
#[derive(Clone)]
struct Counter {
    points: Arc<AtomicU64>,
}

impl tonic::server::UnaryService<ExportMetricsServiceRequest> for Counter {
    type Response = ExportMetricsServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<ExportMetricsServiceRequest>) -> Self::Future {
        self.points
            .fetch_add(data_points(request.get_ref()), Ordering::Relaxed);
        std::future::ready(Ok(tonic::Response::new(
            ExportMetricsServiceResponse::default(),
        )))
    }
}

/// Serves the receiver over TLS (HTTP/2) as the backend serves gRPC.
async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, receiver: Counter) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let mut accept = EnabledCompressionEncodings::default();
    accept.enable(CompressionEncoding::Zstd);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, builder, receiver) = (acceptor.clone(), builder.clone(), receiver.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let receiver = receiver.clone();
                    async move {
                        let codec = tonic_prost::ProstCodec::<
                            ExportMetricsServiceResponse,
                            ExportMetricsServiceRequest,
                        >::default();
                        let mut grpc = tonic::server::Grpc::new(codec)
                            .apply_compression_config(
                                accept,
                                EnabledCompressionEncodings::default(),
                            )
                            .apply_max_message_size_config(Some(OTLP_MAX_MESSAGE), None);
                        Ok::<_, Infallible>(grpc.unary(receiver, req).await)
                    }
                });
            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
        });
    }
}

/// An OTLP exporter: tonic's gRPC client with zstd, the same client stack
/// as uplink's gRPC rung.
#[derive(Clone)]
pub struct OtlpClient(tonic::client::Grpc<Channel>);

impl OtlpClient {
    /// A client of the receiver at `addr`, over `net` (which must trust
    /// the receiver's CA), with the agent's keepalive; call it on the
    /// runtime that is to run the channel's tasks.
    pub async fn connect(addr: SocketAddr, net: &Net) -> OtlpClient {
        let url = uplink::client::parse_backend_url(&format!("https://127.0.0.1:{}", addr.port()))
            .expect("receiver URL");
        let channel = uplink::client::grpc_channel(
            &url,
            net,
            Duration::from_secs(10),
            Duration::from_secs(20),
        )
        .await
        .expect("no gRPC channel to the OTLP receiver");
        OtlpClient(tonic::client::Grpc::new(channel).send_compressed(CompressionEncoding::Zstd))
    }

    /// Exports `req`, which holds `samples` data points; returns them.
    pub async fn export(
        &self,
        req: ExportMetricsServiceRequest,
        samples: u64,
    ) -> Result<u64, String> {
        let mut grpc = self.0.clone();
        grpc.ready().await.map_err(|e| e.to_string())?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(CALL_TIMEOUT);
        let codec = tonic_prost::ProstCodec::<
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        >::default();
        grpc.unary(r, PathAndQuery::from_static(OTLP_EXPORT), codec)
            .await
            .map_err(|s| s.to_string())?;
        Ok(samples)
    }
}

/// The OTLP path: the chunks from `rx` in batches of `batch_size` samples, each
/// built into a request and exported with `window` in flight. Returns the
/// samples exported; panics when an export fails.
pub async fn otlp_pipeline(
    client: OtlpClient,
    mut rx: mpsc::Receiver<Vec<Sample>>,
    batch_size: usize,
    window: usize,
) -> u64 {
    let (batches_tx, mut batches) = mpsc::channel::<(ExportMetricsServiceRequest, u64)>(window);
    let batching = tokio::spawn(async move {
        let mut batch: Vec<Sample> = Vec::with_capacity(batch_size);
        while let Some(chunk) = rx.recv().await {
            for s in chunk {
                batch.push(s);
                if batch.len() == batch_size {
                    let req = otlp_request(&batch);
                    if batches_tx.send((req, batch_size as u64)).await.is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches_tx
                .send((otlp_request(&batch), batch.len() as u64))
                .await;
        }
    });
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    let mut delivered = 0;
    loop {
        tokio::select! {
            next = batches.recv(), if open && inflight.len() < window => match next {
                Some((req, n)) => inflight.push(client.export(req, n)),
                None => open = false,
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                delivered += done.unwrap_or_else(|e| panic!("OTLP export failed: {e}"));
            }
            else => break,
        }
    }
    batching.await.expect("the OTLP batching task panicked");
    delivered
}
