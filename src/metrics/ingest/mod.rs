//! The agent's local ingest endpoint for load generators. JMeter's Backend
//! Listener, Gatling, k6 and anything else that speaks the Graphite
//! plaintext protocol or InfluxDB's line protocol push their samples here,
//! and they travel on with the agent's own metrics: [`Ingest::start`]
//! hands them to the batcher's channel as `Vec<`[`Sample`]`>`s.
//!
//! The module has a pure core and a thin async shell. The core
//! ([`parse_graphite`], [`parse_influx`], [`LineSplitter`] and [`Intake`])
//! has no I/O and takes the time as a parameter; the shell binds the
//! listeners, moves bytes and answers HTTP requests.
//!
//! # Protocols and series
//!
//! | listener | protocol | series name | labels |
//! |---|---|---|---|
//! | Graphite, TCP (carbon's port 2003) | `path value [timestamp]` | `path` as sent, e.g. `jmeter.all.ok.count` | Graphite 1.1 tags: `path;tag=value;...` |
//! | Influx, HTTP `POST /write`, `POST /api/v2/write` | line protocol | `<measurement>_<field>`, one per numeric field | the tags |
//!
//! Every ingested series is a gauge without a unit: neither protocol says
//! more, and what load generators send per interval (counts, percentiles,
//! active threads) goes up and down. Label names are sorted by
//! [`Series::label`]; a name given twice keeps its last value. Names and
//! labels are kept as sent, dots included, but a control character
//! anywhere in them rejects the line.
//!
//! Graphite: the timestamp is in seconds, with or without a fraction (kept
//! to the millisecond); `-1` or no timestamp means now. Influx: integer
//! fields (`12i`), unsigned ones (`12u`) and floats become values (integers
//! beyond 2^53 lose precision as doubles); booleans become 1 and 0, so that
//! a flag such as `ok=true` can be graphed; string fields are skipped and
//! counted (a line with only string fields, such as an annotation, is
//! accepted and yields nothing). The timestamp's unit is the request's
//! `precision` parameter: `ns` (the default, also `n`), `us` (also `u`),
//! `ms`, `s`, and InfluxDB 1.x's `m` and `h`; no timestamp means now.
//! Escapes follow the line protocol: `\,`, `\ `, `\=` and `\\` in the
//! measurement, tag keys and values and field keys; `\"` and `\\` inside
//! string fields. `db`, `bucket`, `org` and credentials are accepted and
//! ignored: the agent has one destination.
//!
//! Values must be finite. The batch encoding could carry NaN and the
//! infinities bit for bit, but the backend's JSON lines cannot, InfluxDB
//! itself refuses them, and a load generator sends them only by mistake
//! (a mean of no samples): such a line is rejected as `non_finite`.
//!
//! # Limits
//!
//! [`IngestConfig::default`] and [`IngestLimits::default`] set every limit;
//! the `DEFAULT_*` constants name them. A line longer than
//! [`IngestLimits::max_line_bytes`] (64 KiB), a name longer than
//! [`IngestLimits::max_name_bytes`] (256), more than
//! [`IngestLimits::max_labels`] labels (32), a label name or value longer
//! than [`IngestLimits::max_label_name_bytes`] (128) or
//! [`IngestLimits::max_label_value_bytes`] (1 KiB) rejects the line.
//! Every rejected line is counted by its [`Reason`], and at most one
//! warning per reason per 10 s is logged, with the start of the offending
//! line and the number of rejections it stands for.
//!
//! The series cache holds at most [`IngestLimits::max_series`] (10,000)
//! series, shared by both listeners. Once full, a sample of a new series is
//! dropped and counted, while known series go on; a series unused for
//! [`IngestLimits::series_idle`] (1 h) makes room when the cache is full.
//! Each listener accepts at most [`IngestConfig::max_connections`] (64)
//! connections at once and closes one that has been idle for
//! [`IngestConfig::idle_timeout`] (2 min); an HTTP body is at most
//! [`IngestConfig::max_body_bytes`] (8 MiB), before and after gzip, and
//! must arrive within the idle timeout. Memory is therefore bounded by
//! about two bodies (compressed and not) per connection, plus the series
//! cache.
//!
//! # Answers and backpressure
//!
//! HTTP: 204 when every line was accepted. A body with bad lines still
//! delivers its good ones, as InfluxDB does with a partial write, and is
//! answered 400 with `{"error": "..."}` naming the first bad line (its
//! number, what is wrong, its start) and how many lines were bad; the
//! client should not resend it. Samples dropped by the series cap make a
//! 400 the same way. A body over the cap is 413; a `Content-Encoding`
//! other than `gzip` or `identity` is 415. `GET /ping` answers 204, as
//! clients probe it. v2 error bodies also carry InfluxDB 2's `code` and
//! `message`.
//!
//! When the batcher's channel is full, an HTTP write is answered 503 with
//! `Retry-After` and nothing of it is kept, so the client backs off and
//! resends the whole body. A Graphite connection instead waits for room
//! before it reads on: the client's writes block once the socket buffers
//! fill, which is the only backpressure a protocol without answers has.
//!
//! There is no authentication: the listeners are off by default and are
//! meant to be bound to an address only the load generators reach (the
//! Docker bridge, say). On shutdown, listeners stop accepting at once;
//! connections are closed after at most [`IngestConfig::grace`], and lines
//! read but not yet handed over are lost.

mod graphite;
mod http;
mod influx;
mod intake;
mod lines;
mod series;
mod tcp;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::metrics::sample::Sample;

pub use graphite::{GraphiteLine, parse_graphite};
pub use influx::{FieldValue, InfluxLine, Precision, parse_influx};
pub use intake::{BadLine, BodyReport, IngestCounters, Intake};
pub use lines::{LineError, LineSplitter, Piece, Reason, Rejection};

use http::influx_connection;
use intake::Protocol;
use tcp::graphite_connection;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Default [`IngestLimits::max_line_bytes`].
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * KIB;
/// Default [`IngestLimits::max_name_bytes`].
pub const DEFAULT_MAX_NAME_BYTES: usize = 256;
/// Default [`IngestLimits::max_labels`]: k6 tags a request with about a
/// dozen.
pub const DEFAULT_MAX_LABELS: usize = 32;
/// Default [`IngestLimits::max_label_name_bytes`].
pub const DEFAULT_MAX_LABEL_NAME_BYTES: usize = 128;
/// Default [`IngestLimits::max_label_value_bytes`]: room for a URL.
pub const DEFAULT_MAX_LABEL_VALUE_BYTES: usize = KIB;
/// Default [`IngestLimits::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// Default [`IngestLimits::series_idle`].
pub const DEFAULT_SERIES_IDLE: Duration = Duration::from_secs(3600);
/// Default [`IngestConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default [`IngestConfig::idle_timeout`]: load generators send every
/// second or so while a test runs.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`IngestConfig::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * MIB;
/// Default [`IngestConfig::retry_after`].
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default [`IngestConfig::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// The shortest line limit: a line of Graphite or Influx with a short name
/// and a few labels.
pub const MIN_LINE_BYTES: usize = 256;

/// At most one warning per kind of problem in this span.
const WARN_EVERY_MS: i64 = 10_000;
/// A full series cache looks for idle series at most this often.
const SWEEP_EVERY_MS: i64 = 1_000;
/// How much of an offending line a warning or an error shows.
const EXCERPT_BYTES: usize = 120;
/// The most a Graphite connection reads at once.
const READ_BYTES: usize = 64 * KIB;
/// The version `/ping` reports: the InfluxDB API level these endpoints
/// speak, which clients read from `X-Influxdb-Version`.
const INFLUX_API_VERSION: &str = "1.8.10";

/// Limits of the parsers and the series cache: what one line and all
/// lines together may cost. [`IngestLimits::default`] sets the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestLimits {
    /// A line may hold at most this many bytes without its `\n`; a longer
    /// one is rejected whole, also on a stream where it cannot be
    /// buffered.
    pub max_line_bytes: usize,
    /// A series name may hold at most this many bytes.
    pub max_name_bytes: usize,
    /// A series may have at most this many labels.
    pub max_labels: usize,
    /// A label name may hold at most this many bytes.
    pub max_label_name_bytes: usize,
    /// A label value may hold at most this many bytes.
    pub max_label_value_bytes: usize,
    /// At most this many series are kept at once, over both listeners.
    /// It bounds what a load generator with a label per request URL, say,
    /// may cost.
    pub max_series: usize,
    /// A series unused for this long is forgotten when the cache is full,
    /// so that the series of past test runs make room for the next one.
    pub series_idle: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_name_bytes: DEFAULT_MAX_NAME_BYTES,
            max_labels: DEFAULT_MAX_LABELS,
            max_label_name_bytes: DEFAULT_MAX_LABEL_NAME_BYTES,
            max_label_value_bytes: DEFAULT_MAX_LABEL_VALUE_BYTES,
            max_series: DEFAULT_MAX_SERIES,
            series_idle: DEFAULT_SERIES_IDLE,
        }
    }
}

/// Where the listeners bind and what they allow. Both are off unless an
/// address is given. [`IngestConfig::default`] sets the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestConfig {
    /// The Graphite plaintext listener (TCP), e.g. the Docker bridge's
    /// `172.17.0.1:2003`; port 0 picks a free port.
    pub graphite: Option<SocketAddr>,
    /// The InfluxDB line protocol listener (HTTP), e.g.
    /// `172.17.0.1:8086`; port 0 picks a free port.
    pub influx: Option<SocketAddr>,
    /// These limits apply to lines and series.
    pub limits: IngestLimits,
    /// Each listener serves at most this many connections at once; more
    /// are closed at once and counted, so that a runaway client cannot
    /// exhaust the agent's file descriptors or memory.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed, and an
    /// HTTP body must arrive within it.
    pub idle_timeout: Duration,
    /// An HTTP body may hold at most this many bytes, before and after
    /// gzip decompression.
    pub max_body_bytes: usize,
    /// A 503 asks the client to wait this long, in whole seconds.
    pub retry_after: Duration,
    /// Connections may finish for this long after shutdown.
    pub grace: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            graphite: None,
            influx: None,
            limits: IngestLimits::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            retry_after: DEFAULT_RETRY_AFTER,
            grace: DEFAULT_GRACE,
        }
    }
}

impl IngestConfig {
    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let l = &self.limits;
        if l.max_line_bytes < MIN_LINE_BYTES {
            errs.push(format!(
                "ingest line limit {} bytes is below the minimum of {MIN_LINE_BYTES}",
                l.max_line_bytes
            ));
        }
        for (what, n) in [
            ("name", l.max_name_bytes),
            ("label name", l.max_label_name_bytes),
            ("label value", l.max_label_value_bytes),
        ] {
            if n == 0 || n > l.max_line_bytes {
                errs.push(format!(
                    "ingest {what} limit {n} bytes is out of range: 1 to the line limit ({})",
                    l.max_line_bytes
                ));
            }
        }
        if l.max_series == 0 {
            errs.push("ingest series limit must be at least 1".into());
        }
        if l.series_idle < Duration::from_secs(1) {
            errs.push(format!(
                "ingest series idle time {:?} is below the minimum of 1s",
                l.series_idle
            ));
        }
        if self.max_connections == 0 {
            errs.push("ingest connection limit must be at least 1".into());
        }
        if self.idle_timeout.is_zero() {
            errs.push("ingest idle timeout must not be zero".into());
        }
        if self.max_body_bytes < l.max_line_bytes {
            errs.push(format!(
                "ingest body limit {} bytes is below the line limit ({})",
                self.max_body_bytes, l.max_line_bytes
            ));
        }
        if self.retry_after < Duration::from_secs(1) {
            errs.push(format!(
                "ingest Retry-After {:?} is below the minimum of 1s",
                self.retry_after
            ));
        }
        if let (Some(g), Some(i)) = (self.graphite, self.influx)
            && g == i
            && g.port() != 0
        {
            errs.push(format!(
                "ingest Graphite and Influx listeners cannot share the address {g}"
            ));
        }
        errs
    }
}

/// Why the ingest endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The settings are invalid; every problem is listed.
    #[error("ingest config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// A listener could not bind its address.
    #[error("ingest: cannot listen for {protocol} on {addr}: {source}")]
    Bind {
        /// The listener is `graphite` or `influx`.
        protocol: &'static str,
        /// This address was asked for.
        addr: SocketAddr,
        /// The system gave this reason.
        source: io::Error,
    },
}

/// The ingest endpoint: [`Ingest::start`] binds and runs its listeners.
#[derive(Debug)]
pub struct Ingest;

/// The running endpoint: its addresses and counters, and a way to wait
/// for it to stop. Dropping the handle leaves the listeners running; the
/// shutdown future given to [`Ingest::start`] stops them.
#[derive(Debug)]
pub struct IngestHandle {
    graphite: Option<SocketAddr>,
    influx: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl IngestHandle {
    /// Returns the Graphite listener's bound address, if it is enabled.
    pub fn graphite_addr(&self) -> Option<SocketAddr> {
        self.graphite
    }

    /// Returns the Influx listener's bound address, if it is enabled.
    pub fn influx_addr(&self) -> Option<SocketAddr> {
        self.influx
    }

    /// Returns the counters as they are now, for self-metrics.
    pub fn counters(&self) -> IngestCounters {
        self.shared.intake.counters()
    }

    /// Waits until both listeners and all their connections have ended,
    /// after the shutdown future completed (or the batcher's channel
    /// closed), bounded by the grace time.
    pub async fn stopped(&mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    intake: Intake,
    sender: mpsc::Sender<Vec<Sample>>,
    config: IngestConfig,
}

impl Ingest {
    /// Validates `config`, binds the enabled listeners (port 0 picks a free
    /// port, which the handle reports) and serves them until `shutdown`
    /// completes or `sender`'s receiver is dropped. Samples go to `sender`
    /// as one `Vec` per HTTP body, or per read of a Graphite connection.
    pub async fn start(
        config: IngestConfig,
        sender: mpsc::Sender<Vec<Sample>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<IngestHandle, IngestError> {
        let errs = config.validate();
        if !errs.is_empty() {
            return Err(IngestError::Config(errs));
        }
        let graphite = bind("graphite", config.graphite).await?;
        let influx = bind("influx", config.influx).await?;
        let shared = Arc::new(Shared {
            intake: Intake::new(config.limits.clone()),
            sender,
            config,
        });
        let (stop_tx, stop) = watch::channel(false);
        let mut handle = IngestHandle {
            graphite: None,
            influx: None,
            shared: shared.clone(),
            tasks: Vec::new(),
        };
        if let Some((listener, addr)) = graphite {
            tracing::info!(%addr, "Graphite ingest listening");
            handle.graphite = Some(addr);
            handle.tasks.push(tokio::spawn(accept_loop(
                Protocol::Graphite,
                listener,
                shared.clone(),
                stop.clone(),
            )));
        }
        if let Some((listener, addr)) = influx {
            tracing::info!(%addr, "Influx ingest listening");
            handle.influx = Some(addr);
            handle.tasks.push(tokio::spawn(accept_loop(
                Protocol::Influx,
                listener,
                shared.clone(),
                stop,
            )));
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                // Every listener has ended already.
                _ = stop_tx.closed() => {}
            }
            let _ = stop_tx.send(true);
        });
        Ok(handle)
    }
}

async fn bind(
    protocol: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<(TcpListener, SocketAddr)>, IngestError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let err = |source| IngestError::Bind {
        protocol,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok(Some((listener, bound)))
}

/// Resolves once shutdown was asked for.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts connections until shutdown, up to the connection limit, then
/// gives the open ones the grace time to end.
async fn accept_loop(
    protocol: Protocol,
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let max = shared.config.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stopping(&mut stop) => break,
            _ = shared.sender.closed() => {
                tracing::info!(protocol = protocol.as_str(), "the batcher is gone; ingest stops");
                break;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(protocol = protocol.as_str(), error = %e, "ingest accept failed");
                    tokio::select! {
                        _ = stopping(&mut stop) => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared
                .intake
                .refused(protocol, peer, max, crate::now_unix_ms());
            drop(tcp);
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            match protocol {
                Protocol::Graphite => graphite_connection(tcp, peer, &shared, stop).await,
                Protocol::Influx => influx_connection(tcp, peer, shared, stop).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = shared.config.grace;
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            protocol = protocol.as_str(),
            ?grace,
            "ingest connections still open after the grace time; closing them"
        );
    }
    // Dropping the set aborts what is left.
}

/// Helpers the unit tests of every part share.
#[cfg(test)]
mod testing {
    use super::*;
    use std::fmt;

    pub(super) const NOW: i64 = 1_700_000_000_123;

    pub(super) fn intake() -> Intake {
        Intake::new(IngestLimits::default())
    }

    pub(super) fn labels(s: &Sample) -> Vec<(&str, &str)> {
        let l = &s.series.labels;
        l.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
    }

    pub(super) fn graphite(line: &str) -> Result<GraphiteLine<'_>, Rejection> {
        parse_graphite(line.as_bytes(), NOW)
    }

    pub(super) fn influx(line: &str) -> Result<InfluxLine<'_>, Rejection> {
        parse_influx(line.as_bytes(), Precision::Nanoseconds, NOW)
    }

    pub(super) fn reason<T: fmt::Debug>(r: Result<T, Rejection>) -> Reason {
        match r {
            Ok(v) => panic!("expected a rejection, got {v:?}"),
            Err(e) => e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_every_problem_is_reported() {
        assert_eq!(IngestConfig::default().validate(), Vec::<String>::new());
        let addr: SocketAddr = "127.0.0.1:2003".parse().unwrap();
        let bad = IngestConfig {
            graphite: Some(addr),
            influx: Some(addr),
            limits: IngestLimits {
                max_line_bytes: 100,
                max_name_bytes: 0,
                max_label_name_bytes: 101,
                max_label_value_bytes: 1,
                max_labels: 0,
                max_series: 0,
                series_idle: Duration::ZERO,
            },
            max_connections: 0,
            idle_timeout: Duration::ZERO,
            max_body_bytes: 10,
            retry_after: Duration::from_millis(10),
            grace: Duration::ZERO,
        };
        let errs = bad.validate();
        assert_eq!(errs.len(), 10, "{errs:#?}");
        assert!(errs.iter().any(|e| e.contains("share the address")));
        // Port 0 twice is two different ports.
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let twice = IngestConfig {
            graphite: Some(any),
            influx: Some(any),
            ..IngestConfig::default()
        };
        assert!(twice.validate().is_empty());
    }
}
