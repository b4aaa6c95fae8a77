//! The agent's self-metrics: every name in one place, the recorder (the
//! `metrics` facade with a Prometheus exporter), and the optional local
//! endpoint (`--metrics-listen`) that serves them as text.
//!
//! Names follow `uplink_<noun>_<unit>[_total]`. Labels carry bounded sets
//! only (rung names, reason codes, failure kinds, statuses), never ids or
//! error texts.

use std::convert::Infallible;
use std::future::Future;
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// `1` for the rung in use, `0` for the other; label `rung`, and `reason`
/// (a short code: `configured`, `auto_start`, `h2_blocked`, `early_deaths`,
/// `probe_ok`).
pub const AGENT_RUNG: &str = "uplink_agent_rung";
/// Rung switches; labels `from`, `to`.
pub const AGENT_RUNG_SWITCHES: &str = "uplink_agent_rung_switches_total";
/// Failed connection attempts and streams; labels `rung`, `failure`.
pub const AGENT_RECONNECTS: &str = "uplink_agent_reconnects_total";
/// Streams that delivered their first frame.
pub const AGENT_STREAMS_OPENED: &str = "uplink_agent_streams_opened_total";
/// Commands finished; label `status`.
pub const AGENT_COMMANDS: &str = "uplink_agent_commands_total";
/// Duplicate deliveries dropped by the journal.
pub const AGENT_DUPLICATES: &str = "uplink_agent_duplicate_deliveries_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same
/// handle (None if another recorder was installed first).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// Records the rung in use.
pub fn rung(current: &'static str, reason: &'static str) {
    for r in ["grpc", "longpoll"] {
        let v = if r == current { 1.0 } else { 0.0 };
        metrics::gauge!(AGENT_RUNG, "rung" => r).set(v);
    }
    metrics::gauge!("uplink_agent_rung_reason", "reason" => reason).set(1.0);
    for other in [
        "configured",
        "auto_start",
        "h2_blocked",
        "early_deaths",
        "probe_ok",
    ] {
        if other != reason {
            metrics::gauge!("uplink_agent_rung_reason", "reason" => other).set(0.0);
        }
    }
}

/// Counts a rung switch.
pub fn switch(from: &'static str, to: &'static str) {
    metrics::counter!(AGENT_RUNG_SWITCHES, "from" => from, "to" => to).increment(1);
}

/// Counts a failed attempt or a dead stream.
pub fn reconnect(rung: &'static str, failure: &'static str) {
    metrics::counter!(AGENT_RECONNECTS, "rung" => rung, "failure" => failure).increment(1);
}

/// Counts a stream that delivered its first frame.
pub fn stream_opened() {
    metrics::counter!(AGENT_STREAMS_OPENED).increment(1);
}

/// Counts a finished command.
pub fn command(status: &'static str) {
    metrics::counter!(AGENT_COMMANDS, "status" => status).increment(1);
}

/// Counts a duplicate delivery.
pub fn duplicate() {
    metrics::counter!(AGENT_DUPLICATES).increment(1);
}

/// Serves `GET /metrics` (Prometheus text) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let handle = handle.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            (http::StatusCode::OK, handle.render())
                        } else {
                            (
                                http::StatusCode::NOT_FOUND,
                                "only /metrics is served here\n".to_string(),
                            )
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
