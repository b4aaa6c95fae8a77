//! The Connect face of the backend: every unary method of both services as
//! a Connect unary endpoint (POST `/uplink.v1.<Service>/<Method>`, body
//! `application/proto` or `application/json`). This is the long-poll rung,
//! and what `ctl` and `curl` use.

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
    if let Some(ce) = req.headers().get(header::CONTENT_ENCODING)
        && ce.as_bytes() != b"identity"
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::Unimplemented,
            &format!("content-encoding {ce:?} is not supported: send identity"),
        );
    }
    let authorization = auth(req.headers());
    // Refuse unauthenticated calls before buffering their bodies.
    let needs = match (service.as_str(), method.as_str()) {
        ("uplink.v1.AgentService", "Enroll") => None,
        ("uplink.v1.AgentService", _) => Some(
            st.core
                .authenticate_agent(authorization.as_deref())
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
    let core = st.core;
    let a = authorization.as_deref();
    match (service.as_str(), method.as_str()) {
        ("uplink.v1.AgentService", "Enroll") => {
            call(enc, body, |r| async move { core.enroll(r) }).await
        }
        ("uplink.v1.AgentService", "Poll") => {
            let agent = match core.authenticate_agent(a) {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move { core.poll(agent, r).await }).await
        }
        ("uplink.v1.AgentService", "Report") => {
            let agent = match core.authenticate_agent(a) {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move { core.report(agent, r) }).await
        }
        ("uplink.v1.AgentService", "PushMetrics") => {
            let agent = match core.authenticate_agent(a) {
                Ok(id) => id,
                Err(s) => return status_response(&s),
            };
            call(enc, body, |r| async move { core.push_metrics(agent, r) }).await
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
                "ListAgents" => call(enc, body, |r| async move { core.list_agents(r) }).await,
                "ListProviders" => {
                    call(enc, body, |_: proto::ListProvidersRequest| async move {
                        core.list_providers()
                    })
                    .await
                }
                "CreateProvider" => {
                    call(enc, body, |r| async move { core.create_provider(r) }).await
                }
                "RotateEnrollmentToken" => {
                    call(enc, body, |r| async move { core.rotate_token(r) }).await
                }
                "EnqueueCommand" => call(enc, body, |r| async move { core.enqueue(r) }).await,
                "GetCommand" => call(enc, body, |r| async move { core.get_command(r).await }).await,
                "CreateRun" => call(enc, body, |r| async move { core.create_run(r) }).await,
                "ListRuns" => call(enc, body, |r| async move { core.list_runs(r) }).await,
                "GetRun" => call(enc, body, |r| async move { core.get_run(r) }).await,
                "StopRun" => call(enc, body, |r| async move { core.stop_run(r) }).await,
                "GetRunLogs" => call(enc, body, |r| async move { core.run_logs(r).await }).await,
                other => unknown(&service, other),
            }
        }
        (s, m) => unknown(s, m),
    }
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
