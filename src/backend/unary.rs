//! The Connect face of the backend: every unary method of both services as
//! a Connect unary endpoint (POST `/uplink.v1.<Service>/<Method>`, body
//! `application/proto` or `application/json`). This is the long-poll rung,
//! and what `ctl` and `curl` use.
//!
//! A request body may be compressed (`Content-Encoding: zstd` or `gzip`, as
//! the agent sends metric batches); the size limit applies to the body as
//! sent and again to the decompressed body. Any other encoding is refused
//! with `unimplemented`, naming the supported ones.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use tonic::{Code, Status};

use super::core::Core;
use crate::connect::{self, Encoding};
use crate::metrics::compress::Compression;
use crate::proto::{self, Named};

#[derive(Clone)]
struct Shared {
    core: Arc<Core>,
    limit: usize,
}

/// The Connect router; bodies above `limit` bytes are refused.
pub fn router(core: Arc<Core>, limit: usize) -> axum::Router {
    axum::Router::new()
        .route("/{service}/{method}", axum::routing::any(handle))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                Code::Unimplemented,
                "no such endpoint: uplink serves POST /uplink.v1.AgentService/<Method> and /uplink.v1.AdminService/<Method>",
            )
        })
        .with_state(Shared { core, limit })
}

fn error(status: StatusCode, code: Code, message: &str) -> Response {
    let mut r = Response::new(Body::from(connect::error_body(code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(connect::JSON),
    );
    r
}

fn status_response(s: &Status) -> Response {
    error(connect::http_status(s.code()), s.code(), s.message())
}

fn auth(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(
    State(st): State<Shared>,
    Path((service, method)): Path<(String, String)>,
    req: Request,
) -> Response {
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            "Connect unary calls use POST",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(enc) = Encoding::from_content_type(content_type) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::Unimplemented,
            &format!(
                "content-type {content_type:?} is not supported: use application/proto or application/json"
            ),
        );
    };
    // Judged once the body is read: an answer before the body is consumed
    // makes some HTTP/2 clients (curl) report a stream error instead.
    let compression = content_encoding(req.headers());
    let authorization = auth(req.headers());
    // Refuse unauthenticated calls before buffering their bodies.
    let needs = match (service.as_str(), method.as_str()) {
        ("uplink.v1.AgentService", "Enroll") => None,
        ("uplink.v1.AgentService", _) => Some(
            st.core
                .authenticate_agent(authorization.as_deref())
                .await
                .map(|_| ()),
        ),
        ("uplink.v1.AdminService", _) => Some(st.core.authenticate_admin(authorization.as_deref())),
        _ => None,
    };
    if let Some(Err(s)) = needs {
        return status_response(&s);
    }
    let body = match http_body_util::Limited::new(req.into_body(), st.limit)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Code::ResourceExhausted,
                    &format!("request body exceeds the limit of {} bytes", st.limit),
                );
            }
            return error(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                &format!("request body could not be read: {e}"),
            );
        }
    };
    let compression = match compression {
        Ok(c) => c,
        Err(message) => {
            // Connect's answer to an encoding it cannot read, with the
            // ones it can in `Accept-Encoding`.
            let mut r = error(
                connect::http_status(Code::Unimplemented),
                Code::Unimplemented,
                &message,
            );
            r.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("zstd, gzip, identity"),
            );
            return r;
        }
    };
    let body = match compression {
        Compression::Identity => body,
        c => match decompress(c, body, st.limit).await {
            Ok(b) => Bytes::from(b),
            // compress.rs says "expands to more than" for the limit, and
            // gives the decoder's own words for a corrupt body.
            Err(e) if e.to_string().contains("expands to more than") => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Code::ResourceExhausted,
                    &format!(
                        "request body expands to more than the limit of {} bytes when decompressed ({})",
                        st.limit,
                        c.name()
                    ),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidArgument,
                    &format!(
                        "request body is not valid {} (content-encoding): {e}",
                        c.name()
                    ),
                );
            }
        },
    };
    let core = st.core;
    let a = authorization.as_deref();
    match (service.as_str(), method.as_str()) {
        ("uplink.v1.AgentService", "Enroll") => {
            call(enc, body, |r| async move { core.enroll(r).await }).await
        }
        ("uplink.v1.AgentService", "Poll") => {
            let agent = match core.authenticate_agent(a).await {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move { core.poll(agent, r).await }).await
        }
        ("uplink.v1.AgentService", "Report") => {
            let agent = match core.authenticate_agent(a).await {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move { core.report(agent, r).await }).await
        }
        ("uplink.v1.AgentService", "PushMetrics") => {
            let agent = match core.authenticate_agent(a).await {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(
                enc,
                body,
                |r| async move { core.push_metrics(agent, r).await },
            )
            .await
        }
        ("uplink.v1.AgentService", "RotateCredential") => {
            let agent = match core.authenticate_agent(a).await {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move {
                core.rotate_credential(agent, r).await
            })
            .await
        }
        ("uplink.v1.AgentService", "Subscribe") => error(
            StatusCode::NOT_IMPLEMENTED,
            Code::Unimplemented,
            "Subscribe is a server stream: call it with gRPC over HTTP/2, or use Poll (the long-poll rung)",
        ),
        ("uplink.v1.AdminService", m) => {
            if let Err(s) = core.authenticate_admin(a) {
                return status_response(&s);
            }
            match m {
                "ListAgents" => call(enc, body, |r| async move { core.list_agents(r).await }).await,
                "ListProviders" => {
                    call(enc, body, |_: proto::ListProvidersRequest| async move {
                        core.list_providers().await
                    })
                    .await
                }
                "CreateProvider" => {
                    call(enc, body, |r| async move { core.create_provider(r).await }).await
                }
                "RotateEnrollmentToken" => {
                    call(enc, body, |r| async move { core.rotate_token(r).await }).await
                }
                "RevokeAgent" => {
                    call(enc, body, |r| async move { core.revoke_agent(r).await }).await
                }
                "EnqueueCommand" => call(enc, body, |r| async move { core.enqueue(r).await }).await,
                "GetCommand" => call(enc, body, |r| async move { core.get_command(r).await }).await,
                "CreateRun" => call(enc, body, |r| async move { core.create_run(r).await }).await,
                "ListRuns" => call(enc, body, |r| async move { core.list_runs(r).await }).await,
                "GetRun" => call(enc, body, |r| async move { core.get_run(r).await }).await,
                "StopRun" => call(enc, body, |r| async move { core.stop_run(r).await }).await,
                "GetRunLogs" => call(enc, body, |r| async move { core.run_logs(r).await }).await,
                other => unknown(&service, other),
            }
        }
        (s, m) => unknown(s, m),
    }
}

/// Decompresses a request body of at most `limit` bytes into at most
/// `limit` bytes; a large one on a blocking thread (a few milliseconds of
/// work per MiB), not on an async worker.
async fn decompress(c: Compression, body: Bytes, limit: usize) -> std::io::Result<Vec<u8>> {
    if body.len() <= 16 * 1024 {
        return c.decompress(&body, limit);
    }
    tokio::task::spawn_blocking(move || c.decompress(&body, limit))
        .await
        .map_err(std::io::Error::other)?
}

/// The compression of the request body, from `Content-Encoding`; the
/// error message for an encoding this backend cannot read names the ones it
/// can.
fn content_encoding(headers: &HeaderMap) -> Result<Compression, String> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Compression::Identity);
    };
    let name = value.to_str().unwrap_or("").trim();
    [Compression::Identity, Compression::Zstd, Compression::Gzip]
        .into_iter()
        .find(|c| name.eq_ignore_ascii_case(c.name()))
        .ok_or_else(|| {
            format!(
                "content-encoding {value:?} is not supported: send zstd, gzip or identity (none)"
            )
        })
}

fn unknown(service: &str, method: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        Code::Unimplemented,
        &format!("unknown method {service}/{method}"),
    )
}

/// Decodes the request, runs `f`, encodes its answer.
async fn call<Req, Resp, F, Fut>(enc: Encoding, body: Bytes, f: F) -> Response
where
    Req: Named,
    Resp: Named,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let req = match enc {
        Encoding::Proto => Req::decode(body).map_err(|e| {
            Status::invalid_argument(format!(
                "request body is not a valid {}: {e}",
                Req::FULL_NAME
            ))
        }),
        Encoding::Json => {
            proto::from_json::<Req>(&body).map_err(|e| Status::invalid_argument(e.to_string()))
        }
    };
    let req = match req {
        Ok(r) => r,
        Err(s) => return status_response(&s),
    };
    let resp = match f(req).await {
        Ok(r) => r,
        Err(s) => return status_response(&s),
    };
    let bytes = match enc {
        Encoding::Proto => resp.encode_to_vec(),
        Encoding::Json => match proto::to_json(&resp) {
            Ok(b) => b,
            Err(e) => return status_response(&Status::internal(e.to_string())),
        },
    };
    let mut r = Response::new(Body::from(bytes));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(enc.content_type()),
    );
    r
}
