//! The backend's edge: what a client can make the backend hold before it
//! has proven who it is.
//!
//! - A connection is *pre-auth* until one of its requests carries a valid
//!   admin token or agent credential. Pre-auth connections are capped in
//!   total (half the open-file limit unless set) and per source address; at
//!   the total cap a new connection replaces the oldest pre-auth one, so an
//!   operator's `ctl` and an enrolling agent still get in while idle
//!   connections fill the cap. Authenticated connections leave both counts.
//! - A connection has [`Limits::first_request_timeout`] to send a request
//!   and is closed after [`Limits::idle_timeout`] with none in flight.
//! - On a pre-auth connection every call's credential is checked before its
//!   body is read or decoded; `Enroll`, the one call without a credential,
//!   has a small body limit, a deadline and a global bound on how many are
//!   read at once; at most [`PREAUTH_IN_FLIGHT`] calls run at once.
//! - Failed authentications are rate-limited per source address (a token
//!   bucket in a bounded map); past it calls get `RESOURCE_EXHAUSTED` / 429
//!   with `retry-after`.
//! - Every refusal is sent after the request body was read and discarded
//!   (bounded in bytes and time), so HTTP/2 clients see the error and not a
//!   reset stream.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};

use super::core::Core;
use super::defaults::{
    DEFAULT_AUTH_FAILURE_BURST, DEFAULT_AUTH_FAILURE_REFILL, DEFAULT_BODY_TIMEOUT,
    DEFAULT_FIRST_REQUEST_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BUFFERED_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS_PER_ADDR, DEFAULT_MAX_STREAMS_PER_CONNECTION,
};
use super::ratelimit::Buckets;
use crate::connect;

/// Largest `Enroll` body (it carries a token, a hostname and labels).
pub const ENROLL_MAX_BYTES: usize = 16 * 1024;
/// `Enroll` bodies read at once, over all connections.
pub const ENROLL_MAX_CONCURRENT: usize = 64;
/// Read buffer of an HTTP/1.1 connection (the largest request head).
pub const HTTP1_MAX_BUF_BYTES: usize = 64 * 1024;
/// Calls in flight at once on a connection that has not authenticated.
pub const PREAUTH_IN_FLIGHT: usize = 32;
/// Bytes of a refused request's body read and discarded before answering.
const DRAIN_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Time given to a refused request's body to end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Source addresses whose failures are remembered; the fullest buckets are
/// forgotten first beyond it.
const FAILURE_MAP_MAX: usize = 10_000;
/// File descriptors kept out of the pre-auth budget (store, logs, sinks).
const FD_RESERVE: u64 = 64;

/// The edge's settings.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Pre-auth connections in total; None: half the open-file limit.
    pub max_preauth_connections: Option<usize>,
    /// Pre-auth connections per source address.
    pub max_connections_per_addr: usize,
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub max_streams_per_connection: u32,
    /// Bytes of request bodies read whole (Connect calls, enrollments)
    /// held at once over all connections; past it calls get
    /// `resource_exhausted`.
    pub max_buffered_body_bytes: usize,
    pub auth_failure_burst: u32,
    pub auth_failure_refill: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_preauth_connections: None,
            max_connections_per_addr: DEFAULT_MAX_CONNECTIONS_PER_ADDR,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_buffered_body_bytes: DEFAULT_MAX_BUFFERED_BODY_BYTES,
            auth_failure_burst: DEFAULT_AUTH_FAILURE_BURST,
            auth_failure_refill: DEFAULT_AUTH_FAILURE_REFILL,
        }
    }
}

impl Limits {
    /// Every problem with the settings.
    pub fn validate(&self, errs: &mut Vec<String>) {
        if let Some(n) = self.max_preauth_connections
            && !(1..=1_000_000).contains(&n)
        {
            errs.push(format!(
                "--max-preauth-connections {n} is out of range: 1 to 1000000"
            ));
        }
        if !(1..=1_000_000).contains(&self.max_connections_per_addr) {
            errs.push(format!(
                "--max-connections-per-addr {} is out of range: 1 to 1000000",
                self.max_connections_per_addr
            ));
        }
        for (name, d) in [
            ("--first-request-timeout", self.first_request_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--body-timeout", self.body_timeout),
        ] {
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                errs.push(format!("{name} {d:?} is out of range: 1s to 1h"));
            }
        }
        if !(1024 * 1024..=1 << 40).contains(&self.max_buffered_body_bytes) {
            errs.push(format!(
                "--max-buffered-body-bytes {} is out of range: 1m to 1t",
                self.max_buffered_body_bytes
            ));
        }
        if !(1..=10_000).contains(&self.max_streams_per_connection) {
            errs.push(format!(
                "--max-streams-per-connection {} is out of range: 1 to 10000",
                self.max_streams_per_connection
            ));
        }
        if !(1..=1_000_000).contains(&self.auth_failure_burst) {
            errs.push(format!(
                "--auth-failure-burst {} is out of range: 1 to 1000000",
                self.auth_failure_burst
            ));
        }
        if self.auth_failure_refill > Duration::from_secs(3600) {
            errs.push(format!(
                "--auth-failure-refill {:?} is out of range: 0 to 1h",
                self.auth_failure_refill
            ));
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns (soft before,
/// soft now, hard); unlimited reads as u64::MAX.
pub fn raise_nofile() -> (u64, u64, u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let now = if lim.current != lim.maximum
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .is_ok()
    {
        hard
    } else {
        before
    };
    (before, now, hard)
}

/// The pre-auth cap for an open-file limit: half of what is left after a
/// reserve, so authenticated agents and operators keep the other half.
pub fn preauth_cap_for(nofile: u64) -> usize {
    (nofile.saturating_sub(FD_RESERVE) / 2).clamp(16, 1_000_000) as usize
}

/// Counters shown on `/metrics`.
#[derive(Default)]
struct Counters {
    refused_connections: AtomicU64,
    evicted_connections: AtomicU64,
    timed_out_connections: AtomicU64,
    auth_failures: AtomicU64,
    rate_limited: AtomicU64,
}

#[derive(Default)]
struct Preauth {
    next_id: u64,
    /// Pre-auth connections by age (id), each with what closes it.
    open: BTreeMap<u64, Arc<Notify>>,
    per_addr: HashMap<IpAddr, usize>,
}

/// The edge's shared state.
pub struct Edge {
    limits: Limits,
    max_preauth: usize,
    preauth: Mutex<Preauth>,
    failures: Buckets<IpAddr>,
    enrolls: Semaphore,
    /// Bytes of request bodies read whole and not yet released, over all
    /// connections.
    buffered: Arc<Semaphore>,
    counters: Counters,
}

impl Edge {
    /// The edge with `limits` and the process's open-file limit `nofile`.
    pub fn new(limits: Limits, nofile: u64) -> Arc<Edge> {
        let max_preauth = limits
            .max_preauth_connections
            .unwrap_or_else(|| preauth_cap_for(nofile));
        let limits_buffered = limits.max_buffered_body_bytes;
        let failures = Buckets::new(
            limits.auth_failure_burst,
            limits.auth_failure_refill,
            FAILURE_MAP_MAX,
        );
        Arc::new(Edge {
            limits,
            max_preauth,
            preauth: Mutex::new(Preauth::default()),
            failures,
            enrolls: Semaphore::new(ENROLL_MAX_CONCURRENT),
            buffered: Arc::new(Semaphore::new(limits_buffered.min(Semaphore::MAX_PERMITS))),
            counters: Counters::default(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The pre-auth connection cap in force.
    pub fn max_preauth(&self) -> usize {
        self.max_preauth
    }

    /// Admits a new connection from `peer`, or None when its address holds
    /// too many pre-auth connections. At the total cap the oldest pre-auth
    /// connection is told to close.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Arc<Conn>> {
        let mut p = self.preauth.lock().unwrap_or_else(|e| e.into_inner());
        let n = p.per_addr.get(&peer).copied().unwrap_or(0);
        if n >= self.limits.max_connections_per_addr {
            self.counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if p.open.len() >= self.max_preauth
            && let Some((_, close)) = p.open.pop_first()
        {
            // Its slot is given back when its task ends (Conn's drop).
            close.notify_one();
            self.counters
                .evicted_connections
                .fetch_add(1, Ordering::Relaxed);
        }
        p.next_id += 1;
        let id = p.next_id;
        let close = Arc::new(Notify::new());
        p.open.insert(id, close.clone());
        *p.per_addr.entry(peer).or_insert(0) += 1;
        Some(Arc::new(Conn {
            edge: self.clone(),
            id,
            peer,
            close,
            preauth: AtomicBool::new(true),
            seen: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
        }))
    }

    fn release(&self, id: u64, peer: IpAddr) {
        let mut p = self.preauth.lock().unwrap_or_else(|e| e.into_inner());
        p.open.remove(&id);
        if let Some(n) = p.per_addr.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                p.per_addr.remove(&peer);
            }
        }
    }

    /// Seconds until `peer` may fail authentication again; None when it may now.
    fn failure_wait(&self, peer: IpAddr) -> Option<u64> {
        self.failures.check(&peer)
    }

    fn record_failure(&self, peer: IpAddr) {
        self.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        // Empty already: the next call is refused by `failure_wait`.
        let _ = self.failures.take(&peer);
    }

    /// The edge's counters as Prometheus text.
    pub fn render(&self, out: &mut String) {
        let c = &self.counters;
        for (name, help, v) in [
            (
                "uplink_backend_connections_refused_total",
                "Connections closed at accept: their source address held too many unauthenticated connections.",
                &c.refused_connections,
            ),
            (
                "uplink_backend_connections_evicted_total",
                "Unauthenticated connections closed to make room for a new one at the cap.",
                &c.evicted_connections,
            ),
            (
                "uplink_backend_connections_timed_out_total",
                "Connections closed for sending no first request in time or staying idle.",
                &c.timed_out_connections,
            ),
            (
                "uplink_backend_auth_failures_total",
                "Calls refused for a missing or wrong credential.",
                &c.auth_failures,
            ),
            (
                "uplink_backend_auth_rate_limited_total",
                "Calls refused because their source address failed authentication too often.",
                &c.rate_limited,
            ),
        ] {
            super::ratelimit::counter_text(out, name, help, v.load(Ordering::Relaxed));
        }
    }
}

/// One connection's state at the edge.
pub struct Conn {
    edge: Arc<Edge>,
    id: u64,
    peer: IpAddr,
    close: Arc<Notify>,
    preauth: AtomicBool,
    seen: AtomicBool,
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.preauth.load(Ordering::Relaxed) {
            self.edge.release(self.id, self.peer);
        }
    }
}

impl Conn {
    fn authenticated(&self) {
        if self.preauth.swap(false, Ordering::Relaxed) {
            self.edge.release(self.id, self.peer);
        }
    }

    /// Completes when the connection should be closed: no first request in
    /// time, idle too long, or evicted at the pre-auth cap.
    pub async fn closing(&self) -> &'static str {
        let limits = &self.edge.limits;
        let watch = async {
            tokio::time::sleep(limits.first_request_timeout).await;
            if !self.seen.load(Ordering::Relaxed) {
                return "no request in time";
            }
            let tick = (limits.idle_timeout / 4).max(Duration::from_millis(250));
            loop {
                tokio::time::sleep(tick).await;
                let idle = self
                    .last_active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                if self.in_flight.load(Ordering::Relaxed) == 0 && idle >= limits.idle_timeout {
                    return "idle";
                }
            }
        };
        let reason = tokio::select! {
            r = watch => r,
            _ = self.close.notified() => return "evicted at the connection cap",
        };
        self.edge
            .counters
            .timed_out_connections
            .fetch_add(1, Ordering::Relaxed);
        reason
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight; its drop (when the response body ends) marks the
/// connection active now.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A body that holds `G` (a request in flight, buffered bytes' share of
/// the budget) until it is dropped.
struct Tracked<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> http_body::Body for Tracked<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a call needs before its body is read.
enum Needs {
    Admin,
    Agent,
    Enroll,
    Nothing,
}

fn needs(path: &str) -> Needs {
    match path {
        "/uplink.v1.AgentService/Enroll" => Needs::Enroll,
        "/metrics" => Needs::Admin,
        p if p.starts_with("/uplink.v1.AdminService/") => Needs::Admin,
        p if p.starts_with("/uplink.v1.AgentService/") => Needs::Agent,
        _ => Needs::Nothing,
    }
}

/// A refusal in the request's own protocol: gRPC status in a trailers-only
/// response, or a Connect JSON error.
fn refusal(grpc: bool, status: &Status, retry_after: Option<u64>) -> Response<Body> {
    let mut r = if grpc {
        status.clone().into_http::<Body>()
    } else {
        let mut r = Response::new(Body::from(connect::error_body(
            status.code(),
            status.message(),
        )));
        *r.status_mut() = connect::http_status(status.code());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(connect::JSON),
        );
        r
    };
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// The answer of `GET /metrics` without the admin token: plain text, as
/// Prometheus shows it, with `WWW-Authenticate`.
pub fn metrics_refusal(s: &Status) -> Response<Body> {
    let mut r = Response::new(Body::from(format!(
        "{}: /metrics needs the admin token, as `Authorization: Bearer <admin token>`\n",
        s.message()
    )));
    *r.status_mut() = connect::http_status(s.code());
    let h = r.headers_mut();
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"uplink\""),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Reads and discards what is left of a refused request's body, within
/// bounds, so that HTTP/2 clients receive the answer (an answer before the
/// body ends resets the stream, which curl reports as a framing error) and
/// HTTP/1.1 clients keep their connection. True when the body was read to
/// its end; false when it was larger or slower than the bounds (then the
/// answer must close the connection, see [`closing`]).
#[must_use]
async fn drain(body: Body) -> bool {
    let limited = http_body_util::Limited::new(body, DRAIN_MAX_BYTES);
    let mut body = std::pin::pin!(limited);
    tokio::time::timeout(DRAIN_TIMEOUT, async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Marks an answer given before its request's body was read to the end:
/// on HTTP/1.1 the connection cannot carry another request after it (the
/// rest of the body would be read as one), so the answer says
/// `Connection: close` and the server closes it, and the client knows
/// not to send its next request there. (HTTP/2 ends just that stream.)
fn closing(mut r: Response<Body>, version: http::Version) -> Response<Body> {
    if version < http::Version::HTTP_2 {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Reads a whole body within `limit` bytes, the body deadline and the
/// backend-wide `budget` of buffered bytes (the permit holds its share).
/// Err: the status, and what is left of the body when it may still be
/// drained (it was too large, not too slow).
async fn read_whole(
    body: Body,
    limit: usize,
    timeout: Duration,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), (Status, Option<Body>, StatusCode)> {
    let mut body = body;
    let mut buf = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    let read = tokio::time::timeout(timeout, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let s = Status::invalid_argument(format!("request body could not be read: {e}"));
                (s, StatusCode::BAD_REQUEST)
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    let s = Status::resource_exhausted(format!(
                        "request body exceeds the limit of {limit} bytes"
                    ));
                    return Err((s, StatusCode::PAYLOAD_TOO_LARGE));
                }
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                match budget.clone().try_acquire_many_owned(n) {
                    Ok(p) => match held.as_mut() {
                        Some(h) => h.merge(p),
                        None => held = Some(p),
                    },
                    Err(_) => {
                        let s = Status::resource_exhausted(
                            "the backend holds too many request bodies: retry in a few seconds",
                        );
                        return Err((s, StatusCode::TOO_MANY_REQUESTS));
                    }
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    })
    .await;
    match read {
        Err(_) => Err((
            Status::deadline_exceeded(format!("request body did not arrive within {timeout:?}")),
            None,
            StatusCode::REQUEST_TIMEOUT,
        )),
        Ok(Err((s, http))) if s.code() == Code::ResourceExhausted => Err((s, Some(body), http)),
        Ok(Err((s, http))) => Err((s, None, http)),
        Ok(Ok(())) => Ok((buf.freeze(), held)),
    }
}

/// Answers `status` once what is left of `body` was discarded, closing
/// the connection when it could not be (see [`closing`]).
async fn refuse(
    body: Body,
    grpc: bool,
    status: &Status,
    retry_after: Option<u64>,
    version: http::Version,
) -> Response<Body> {
    let ended = drain(body).await;
    let r = refusal(grpc, status, retry_after);
    if ended { r } else { closing(r, version) }
}

/// Checks a request at the edge: its credential before anything of its
/// body is read (on connections that have not authenticated), and the
/// bounds on its body. Ok: the request to route, with a body read whole
/// where the call is unary over Connect or an enrollment.
pub async fn gate(
    core: &Core,
    conn: &Arc<Conn>,
    req: Request<Body>,
    limit: usize,
) -> Result<Request<Body>, Response<Body>> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes().starts_with(b"application/grpc"))
        .unwrap_or(false);
    let edge = &conn.edge;
    let (parts, body) = req.into_parts();
    let path_needs = needs(parts.uri.path());
    if conn.preauth.load(Ordering::Relaxed) {
        if conn.in_flight.load(Ordering::Relaxed) > PREAUTH_IN_FLIGHT {
            let s = Status::resource_exhausted(format!(
                "at most {PREAUTH_IN_FLIGHT} calls at once before a connection authenticates"
            ));
            return Err(refuse(body, grpc, &s, Some(1), parts.version).await);
        }
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let checked = match path_needs {
            // Enrollment tokens are guessed too: `Enroll` is refused while
            // its address is over the failure rate, and counts its failures
            // when answered (see [`track`]).
            Needs::Admin | Needs::Agent | Needs::Enroll => match edge.failure_wait(conn.peer) {
                Some(wait) => {
                    edge.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    let s = Status::resource_exhausted(format!(
                        "too many failed authentications from {}: retry in {wait} s",
                        conn.peer
                    ));
                    return Err(refuse(body, grpc, &s, Some(wait), parts.version).await);
                }
                None if matches!(path_needs, Needs::Admin) => {
                    core.authenticate_admin(authorization)
                }
                None if matches!(path_needs, Needs::Enroll) => Ok(()),
                None => core.authenticate_agent(authorization).await.map(|_| ()),
            },
            Needs::Nothing => Ok(()),
        };
        match checked {
            Err(s) if parts.uri.path() == "/metrics" => {
                // Prometheus shows its scrape errors as text.
                edge.record_failure(conn.peer);
                let r = metrics_refusal(&s);
                return Err(if drain(body).await {
                    r
                } else {
                    closing(r, parts.version)
                });
            }
            Err(s) => {
                edge.record_failure(conn.peer);
                return Err(refuse(body, grpc, &s, None, parts.version).await);
            }
            Ok(()) if !matches!(path_needs, Needs::Enroll | Needs::Nothing) => conn.authenticated(),
            Ok(()) => {}
        }
    }
    // No route without a credential takes a body: what is sent is discarded
    // (the router answers 404 or serves a GET).
    let (limit, _enroll_permit) = match path_needs {
        Needs::Nothing => {
            if !drain(body).await {
                let s = Status::invalid_argument(format!(
                    "{} takes no request body, and the one sent was over {} MiB or \
                     did not end within {DRAIN_TIMEOUT:?}",
                    parts.uri.path(),
                    DRAIN_MAX_BYTES >> 20
                ));
                return Err(closing(refusal(grpc, &s, None), parts.version));
            }
            return Ok(Request::from_parts(parts, Body::empty()));
        }
        Needs::Enroll => match edge.enrolls.try_acquire() {
            Ok(p) => (limit.min(ENROLL_MAX_BYTES), Some(p)),
            Err(_) => {
                let s =
                    Status::unavailable("too many enrollments in progress: retry in a few seconds");
                return Err(refuse(body, grpc, &s, Some(2), parts.version).await);
            }
        },
        // Streams and gRPC unary calls are read by the services, message
        // by message within the message limit.
        Needs::Admin | Needs::Agent if grpc => return Ok(Request::from_parts(parts, body)),
        Needs::Admin | Needs::Agent => (limit, None),
    };
    // Bodies read whole: every Connect call, and enrollments on either rung.
    match read_whole(body, limit, edge.limits.body_timeout, &edge.buffered).await {
        Ok((b, permit)) => {
            let body = Body::new(Tracked {
                inner: Body::from(b),
                _guard: permit,
            });
            Ok(Request::from_parts(parts, body))
        }
        Err((s, rest, http)) => {
            let retry = (http == StatusCode::TOO_MANY_REQUESTS).then_some(2);
            let mut r = match rest {
                Some(rest) => refuse(rest, grpc, &s, retry, parts.version).await,
                // What is left of the body was not read (too slow, or it
                // could not be).
                None => closing(refusal(grpc, &s, None), parts.version),
            };
            if !grpc {
                *r.status_mut() = http;
            }
            Err(r)
        }
    }
}

/// Marks a request to `path` in flight on `conn` until its response body
/// ends; an enrollment answered `unauthenticated` counts as a failed
/// authentication of the connection's address.
pub fn track(
    conn: &Arc<Conn>,
    path: &str,
) -> impl FnOnce(Response<Body>) -> Response<Body> + use<> {
    let in_flight = conn.begin();
    let enroll = matches!(needs(path), Needs::Enroll);
    move |resp| {
        let unauthenticated = resp.status() == StatusCode::UNAUTHORIZED
            || resp.headers().get("grpc-status").map(|v| v.as_bytes()) == Some(b"16");
        if enroll && unauthenticated {
            in_flight.0.edge.record_failure(in_flight.0.peer);
        }
        resp.map(|inner| {
            Body::new(Tracked {
                inner,
                _guard: in_flight,
            })
        })
    }
}
