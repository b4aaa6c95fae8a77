//! What an HTTP intermediary between the agent and the backend (an
//! ingress, a TLS-terminating reverse proxy) can do to gRPC, made visible
//! to the callers:
//!
//! - an answer that is not gRPC, with status 502, 503 or 504 (the
//!   ingress's own error page while the backend behind it is down), fails
//!   the call as [`Intermediary`]: the backend is unreachable, which is not
//!   "HTTP/2 cannot pass" (tonic would read the page as a broken frame);
//! - unary answers that end without trailers (gRPC forwarded as HTTP/1.1,
//!   which drops them: every call then "fails" although the backend
//!   processed it) are counted by [`EndToEnd`]: [`TRAILERLESS_IN_A_ROW`] of them in a
//!   row trip it once, so the rung loop can say so and fall.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tonic::body::Body;
use tonic::transport::Channel;

/// Calls in a row ending without trailers that trip [`EndToEnd`].
pub const TRAILERLESS_IN_A_ROW: u32 = 3;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An intermediary answered for the backend with an HTTP error that is
/// not gRPC: the backend behind it is unreachable.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server in front of the backend answered {status} instead of gRPC: the backend behind it is unreachable (down or restarting)"
)]
pub struct Intermediary {
    pub status: http::StatusCode,
}

/// How the calls of one connection end: with trailers or without.
#[derive(Debug, Default)]
pub struct EndToEnd {
    trailerless: AtomicU32,
    tripped: Notify,
}

impl EndToEnd {
    fn with_trailers(&self) {
        self.trailerless.store(0, Ordering::Relaxed);
    }

    fn without_trailers(&self) {
        if self.trailerless.fetch_add(1, Ordering::Relaxed) + 1 == TRAILERLESS_IN_A_ROW {
            self.tripped.notify_one();
        }
    }

    /// Calls in a row that ended without trailers.
    pub fn trailerless(&self) -> u32 {
        self.trailerless.load(Ordering::Relaxed)
    }

    /// Completes once [`TRAILERLESS_IN_A_ROW`] calls in a row ended without
    /// trailers.
    pub async fn tripped(&self) {
        self.tripped.notified().await
    }

    /// Why gRPC does not work end to end, once tripped.
    pub fn reason(&self) -> String {
        format!(
            "gRPC does not work end to end: {} calls in a row ended without gRPC trailers (grpc-status), although HTTP/2 passes; something in the path forwards gRPC as HTTP/1.1 (an ingress with proxy_pass instead of grpc_pass, or HAProxy without `proto h2` to the backend)",
            self.trailerless()
        )
    }
}

/// A gRPC channel that reports what an intermediary did (see the module).
#[derive(Clone, Debug)]
pub struct GrpcPath {
    inner: Channel,
    watch: Arc<EndToEnd>,
}

impl GrpcPath {
    pub fn new(inner: Channel) -> Self {
        GrpcPath {
            inner,
            watch: Arc::default(),
        }
    }

    /// How this connection's calls end.
    pub fn end_to_end(&self) -> Arc<EndToEnd> {
        self.watch.clone()
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

impl tower::Service<http::Request<Body>> for GrpcPath {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Only unary answers are judged: a stream may be cut without
        // trailers for other reasons (an idle timeout, a restart).
        let unary = !req.uri().path().ends_with("/Subscribe");
        let answer = self.inner.call(req);
        let watch = self.watch.clone();
        Box::pin(async move {
            let resp = answer.await?;
            let status = resp.status();
            if !is_grpc(resp.headers())
                && matches!(
                    status,
                    http::StatusCode::BAD_GATEWAY
                        | http::StatusCode::SERVICE_UNAVAILABLE
                        | http::StatusCode::GATEWAY_TIMEOUT
                )
            {
                return Err(Box::new(Intermediary { status }) as BoxError);
            }
            if !unary {
                return Ok(resp);
            }
            if resp.headers().contains_key("grpc-status") {
                // Trailers-only: the status came in the headers.
                watch.with_trailers();
                return Ok(resp);
            }
            Ok(resp.map(|body| {
                Body::new(Watched {
                    inner: body,
                    watch: Some(watch),
                })
            }))
        })
    }
}

/// A response body that tells [`EndToEnd`] whether it ended with trailers.
struct Watched {
    inner: Body,
    /// Taken when the verdict is in.
    watch: Option<Arc<EndToEnd>>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_trailers() => {
                if let Some(w) = self.watch.take() {
                    w.with_trailers();
                }
            }
            None => {
                if let Some(w) = self.watch.take() {
                    w.without_trailers();
                }
            }
            // A body cut by an error is a connection problem, judged elsewhere.
            Some(Err(_)) => self.watch = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn three_trailerless_calls_in_a_row_trip_it_once() {
        let w = EndToEnd::default();
        w.without_trailers();
        w.without_trailers();
        w.with_trailers();
        w.without_trailers();
        w.without_trailers();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), w.tripped())
                .await
                .is_err(),
            "an answer with trailers in between resets the count"
        );
        w.without_trailers();
        tokio::time::timeout(std::time::Duration::from_secs(5), w.tripped())
            .await
            .expect("tripped");
        assert!(w.reason().contains("3 calls in a row"), "{}", w.reason());
        w.without_trailers();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), w.tripped())
                .await
                .is_err(),
            "it trips once"
        );
    }
}
