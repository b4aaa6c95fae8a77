//! The Influx listener's connections: HTTP/1.1 through hyper, `GET /ping`,
//! `POST /write` and `POST /api/v2/write`, bounded and gunzipped bodies,
//! and the answers (204, 400 with the first bad line, 413, 415, 503).

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::metrics::sample::Sample;

use super::influx::Precision;
use super::intake::BodyReport;
use super::{INFLUX_API_VERSION, Shared, stopping};

/// Serves HTTP/1.1 on one connection until the client closes, goes idle,
/// or shutdown, which lets the request in progress finish within the
/// grace time.
pub(super) async fn influx_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let config = shared.config.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(respond(req, &shared).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.idle_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "Influx connection ended with an error");
            }
        }
        _ = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(config.grace, conn).await;
        }
    }
}

/// The two write APIs, which differ in their error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    V1,
    V2,
}

/// A failed write, as an HTTP answer.
#[derive(Debug)]
enum WriteError {
    BadRequest(String),
    MethodNotAllowed,
    Timeout(Duration),
    TooLarge(String),
    UnsupportedEncoding(String),
    Unavailable,
    Internal,
}

impl WriteError {
    fn into_response(self, api: Api, retry_after: Duration) -> Response<Full<Bytes>> {
        let (status, code, message) = match self {
            WriteError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid", m),
            WriteError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                "writes are POST requests".to_string(),
            ),
            WriteError::Timeout(d) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid",
                format!("the body did not arrive within {}s", d.as_secs_f64()),
            ),
            WriteError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "request too large", m),
            WriteError::UnsupportedEncoding(m) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                m,
            ),
            WriteError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the agent's metrics buffer is full; retry later".to_string(),
            ),
            WriteError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                "the body could not be processed".to_string(),
            ),
        };
        let body = match api {
            Api::V1 => serde_json::json!({ "error": message }),
            Api::V2 => serde_json::json!({ "code": code, "message": message, "error": message }),
        };
        let mut resp = json(status, &body);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = retry_after.as_secs().max(1);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        resp
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn no_content() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

async fn respond(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let api = match req.uri().path() {
        "/write" => Api::V1,
        "/api/v2/write" => Api::V2,
        "/ping" => return ping(req.method()),
        other => {
            let message =
                format!("no endpoint {other}: this agent takes writes at /write and /api/v2/write");
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({ "error": message }),
            );
        }
    };
    match write(req, shared).await {
        Ok(()) => no_content(),
        Err(e) => e.into_response(api, shared.config.retry_after),
    }
}

fn ping(method: &Method) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({ "error": "ping is a GET or HEAD request" }),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let mut resp = no_content();
    resp.headers_mut().insert(
        "X-Influxdb-Version",
        HeaderValue::from_static(INFLUX_API_VERSION),
    );
    resp.headers_mut()
        .insert("X-Influxdb-Build", HeaderValue::from_static("uplink"));
    resp
}

/// Reads, decodes and takes one write. A full channel fails it whole, so
/// that the client's retry loses and repeats nothing.
async fn write(req: Request<Incoming>, shared: &Arc<Shared>) -> Result<(), WriteError> {
    if req.method() != Method::POST {
        return Err(WriteError::MethodNotAllowed);
    }
    let config = &shared.config;
    let precision = match query_param(req.uri().query(), "precision") {
        None => Precision::default(),
        Some(p) => Precision::from_param(p).ok_or_else(|| {
            WriteError::BadRequest(format!("precision '{p}' is not one of ns, us, ms, s, m, h"))
        })?,
    };
    let gzip = match req.headers().get(header::CONTENT_ENCODING) {
        None => false,
        Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()) {
            Ok(e) if e.is_empty() || e == "identity" => false,
            Ok(e) if e == "gzip" || e == "x-gzip" => true,
            _ => {
                return Err(WriteError::UnsupportedEncoding(format!(
                    "Content-Encoding {v:?} is not supported: send gzip or identity"
                )));
            }
        },
    };
    let max = config.max_body_bytes;
    let too_large = || WriteError::TooLarge(format!("the body is larger than {max} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    // When the channel is full, say so before reading the body.
    if shared.sender.capacity() == 0 || shared.sender.is_closed() {
        shared.intake.throttled(crate::now_unix_ms());
        return Err(WriteError::Unavailable);
    }
    let limited = Limited::new(req.into_body(), max).collect();
    let body = match tokio::time::timeout(config.idle_timeout, limited).await {
        Err(_) => return Err(WriteError::Timeout(config.idle_timeout)),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(WriteError::BadRequest(
                "the body could not be read".to_string(),
            ));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let (samples, report) = take_body(body, gzip, precision, shared).await?;
    if !samples.is_empty() {
        let count = samples.len();
        match shared.sender.try_send(samples) {
            Ok(()) => shared.intake.accepted(count),
            Err(_) => {
                shared.intake.throttled(crate::now_unix_ms());
                return Err(WriteError::Unavailable);
            }
        }
    }
    match report.message() {
        Some(m) => Err(WriteError::BadRequest(m)),
        None => Ok(()),
    }
}

/// Decompresses and parses a body on a blocking thread: a body of
/// megabytes costs milliseconds of CPU that the runtime's workers should
/// not spend.
async fn take_body(
    body: Bytes,
    gzip: bool,
    precision: Precision,
    shared: &Arc<Shared>,
) -> Result<(Vec<Sample>, BodyReport), WriteError> {
    let shared = shared.clone();
    let work = move || {
        let decompressed;
        let text: &[u8] = if gzip {
            decompressed = gunzip(&body, shared.config.max_body_bytes)?;
            &decompressed
        } else {
            &body
        };
        let mut samples = Vec::new();
        let now = crate::now_unix_ms();
        let report = shared
            .intake
            .influx_body(text, precision, now, &mut samples);
        Ok((samples, report))
    };
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Err(WriteError::Internal))
}

/// A gzip body (one or more members), decompressed to at most `max` bytes.
fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, WriteError> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(body).take(max as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| WriteError::BadRequest(format!("the body is not valid gzip: {e}")))?;
    if out.len() > max {
        return Err(WriteError::TooLarge(format!(
            "the decompressed body is larger than {max} bytes"
        )));
    }
    Ok(out)
}

/// The value of the first `name=value` pair of a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_bodies_are_bounded_after_decompression() {
        use flate2::{Compression, write::GzEncoder};
        use std::io::Write;
        let gz = |data: &[u8]| {
            let mut e = GzEncoder::new(Vec::new(), Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(gunzip(&gz(b"m v=1\n"), 100).unwrap(), b"m v=1\n");
        // Two members, as some clients append them.
        let mut two = gz(b"a v=1\n");
        two.extend(gz(b"b v=2\n"));
        assert_eq!(gunzip(&two, 100).unwrap(), b"a v=1\nb v=2\n");
        let bomb = gz(&vec![b'x'; 1_000_000]);
        assert!(bomb.len() < 2_000);
        assert!(matches!(
            gunzip(&bomb, 999_999),
            Err(WriteError::TooLarge(_))
        ));
        assert!(gunzip(&bomb, 1_000_000).is_ok());
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(WriteError::BadRequest(_))
        ));
        let cut = gz(b"m v=1\n");
        assert!(gunzip(&cut[..cut.len() - 4], 100).is_err());
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            query_param(Some("db=x&precision=ms"), "precision"),
            Some("ms")
        );
        assert_eq!(
            query_param(Some("precision=s&precision=ms"), "precision"),
            Some("s")
        );
        assert_eq!(query_param(Some("precision"), "precision"), None);
        assert_eq!(query_param(Some(""), "precision"), None);
        assert_eq!(query_param(None, "precision"), None);
    }
}
