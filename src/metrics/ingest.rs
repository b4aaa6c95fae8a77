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

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::metrics::encode::MAX_ABS_TIME_MS;
use crate::metrics::sample::{Kind, Sample, Series};

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

/// Why a line was rejected: a bounded set, for counters and log fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The line is longer than [`IngestLimits::max_line_bytes`].
    LineTooLong,
    /// The line is not UTF-8.
    NotUtf8,
    /// The line does not have the protocol's shape: a part is missing, a
    /// key is empty, a string is unterminated, or a name holds a control
    /// character.
    Syntax,
    /// A value is not a number.
    BadValue,
    /// A value is NaN or infinite.
    NonFinite,
    /// The timestamp is not an integer (Influx) or a number (Graphite), or
    /// it lies beyond ±2^62 ms.
    BadTimestamp,
    /// A series name is longer than [`IngestLimits::max_name_bytes`].
    NameTooLong,
    /// The series has more than [`IngestLimits::max_labels`] labels.
    TooManyLabels,
    /// A label name or value is over its limit.
    LabelTooLong,
}

impl Reason {
    /// This lists every reason, in a fixed order.
    pub const ALL: [Reason; 9] = [
        Reason::LineTooLong,
        Reason::NotUtf8,
        Reason::Syntax,
        Reason::BadValue,
        Reason::NonFinite,
        Reason::BadTimestamp,
        Reason::NameTooLong,
        Reason::TooManyLabels,
        Reason::LabelTooLong,
    ];

    /// Returns a short code for a metric label or a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::LineTooLong => "line_too_long",
            Reason::NotUtf8 => "not_utf8",
            Reason::Syntax => "syntax",
            Reason::BadValue => "bad_value",
            Reason::NonFinite => "non_finite",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::NameTooLong => "name_too_long",
            Reason::TooManyLabels => "too_many_labels",
            Reason::LabelTooLong => "label_too_long",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected line: the reason, and what exactly is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The reason it is counted under.
    pub reason: Reason,
    /// What is wrong, worded for a person.
    pub detail: &'static str,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail)
    }
}

impl std::error::Error for Rejection {}

const fn reject(reason: Reason, detail: &'static str) -> Rejection {
    Rejection { reason, detail }
}

const fn syntax(detail: &'static str) -> Rejection {
    reject(Reason::Syntax, detail)
}

/// What went wrong with one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line was rejected whole.
    Rejected(Rejection),
    /// The series cache was full: the samples of new series were dropped,
    /// those of known series were kept.
    SeriesCap {
        /// This many samples were dropped.
        dropped: usize,
        /// This limit was reached.
        max_series: usize,
    },
}

impl From<Rejection> for LineError {
    fn from(r: Rejection) -> Self {
        LineError::Rejected(r)
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::Rejected(r) => r.fmt(f),
            LineError::SeriesCap {
                dropped,
                max_series,
            } => write!(
                f,
                "the limit of {max_series} series is reached: {dropped} samples of new series were dropped"
            ),
        }
    }
}

impl std::error::Error for LineError {}

/// The unit of Influx timestamps, from a request's `precision` parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Timestamps count nanoseconds, the line protocol's default.
    #[default]
    Nanoseconds,
    /// Timestamps count microseconds.
    Microseconds,
    /// Timestamps count milliseconds.
    Milliseconds,
    /// Timestamps count seconds.
    Seconds,
    /// Timestamps count minutes (InfluxDB 1.x only).
    Minutes,
    /// Timestamps count hours (InfluxDB 1.x only).
    Hours,
}

impl Precision {
    /// Returns the precision a `precision` parameter names, in either API
    /// version's spelling.
    pub fn from_param(s: &str) -> Option<Precision> {
        Some(match s {
            "ns" | "n" => Precision::Nanoseconds,
            "us" | "u" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            _ => return None,
        })
    }

    /// Converts `ts` in this unit to Unix milliseconds (rounded down),
    /// if the result lies within ±2^62 ms.
    pub fn to_unix_ms(self, ts: i64) -> Option<i64> {
        let ms = match self {
            Precision::Nanoseconds => Some(ts.div_euclid(1_000_000)),
            Precision::Microseconds => Some(ts.div_euclid(1_000)),
            Precision::Milliseconds => Some(ts),
            Precision::Seconds => ts.checked_mul(1_000),
            Precision::Minutes => ts.checked_mul(60_000),
            Precision::Hours => ts.checked_mul(3_600_000),
        }?;
        in_range(ms)
    }
}

fn in_range(ms: i64) -> Option<i64> {
    (-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS)
        .contains(&ms)
        .then_some(ms)
}

/// A parsed Graphite line.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphiteLine<'a> {
    /// The metric path, e.g. `jmeter.all.ok.count`.
    pub path: &'a str,
    /// The Graphite 1.1 tags, in the order sent.
    pub tags: Vec<(&'a str, &'a str)>,
    /// The value, which is finite.
    pub value: f64,
    /// The time in Unix milliseconds.
    pub time_unix_ms: i64,
}

/// Parses one line of the Graphite plaintext protocol, without its
/// newline: `path[;tag=value...] value [timestamp]`, separated by spaces or
/// tabs. A missing timestamp or `-1` is `now_unix_ms`.
pub fn parse_graphite(line: &[u8], now_unix_ms: i64) -> Result<GraphiteLine<'_>, Rejection> {
    let s = std::str::from_utf8(line).map_err(|_| reject(Reason::NotUtf8, "not UTF-8"))?;
    let mut parts = s.split_ascii_whitespace();
    let path_and_tags = parts.next().ok_or(syntax("the line is empty"))?;
    let value = parts.next().ok_or(syntax("the line has no value"))?;
    let time = parts.next();
    if parts.next().is_some() {
        return Err(syntax("the line has more than three fields"));
    }
    let mut segments = path_and_tags.split(';');
    let path = segments.next().unwrap_or_default();
    if path.is_empty() {
        return Err(syntax("the metric path is empty"));
    }
    let mut tags = Vec::new();
    for segment in segments {
        let (name, value) = segment.split_once('=').ok_or(syntax("a tag has no '='"))?;
        if name.is_empty() {
            return Err(syntax("a tag has an empty name"));
        }
        if value.is_empty() {
            return Err(syntax("a tag has an empty value"));
        }
        tags.push((name, value));
    }
    let value = match value.parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        Ok(_) => return Err(reject(Reason::NonFinite, "the value is NaN or infinite")),
        Err(_) => return Err(reject(Reason::BadValue, "the value is not a number")),
    };
    let time_unix_ms = match time {
        None | Some("-1") => now_unix_ms,
        Some(t) => graphite_time(t)?,
    };
    Ok(GraphiteLine {
        path,
        tags,
        value,
        time_unix_ms,
    })
}

/// Seconds since the epoch, whole or with a fraction, as milliseconds.
fn graphite_time(t: &str) -> Result<i64, Rejection> {
    let out_of_range = reject(Reason::BadTimestamp, "the timestamp is out of range");
    if let Ok(secs) = t.parse::<i64>() {
        return secs
            .checked_mul(1_000)
            .and_then(in_range)
            .ok_or(out_of_range);
    }
    match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() => {
            let ms = (secs * 1_000.0).round();
            if ms.abs() <= MAX_ABS_TIME_MS as f64 {
                Ok(ms as i64)
            } else {
                Err(out_of_range)
            }
        }
        _ => Err(reject(
            Reason::BadTimestamp,
            "the timestamp is not a number of seconds",
        )),
    }
}

/// The value of an Influx field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue {
    /// The field is a float, an integer, an unsigned integer, or a
    /// boolean read as 1 or 0.
    Number(f64),
    /// The field is a string, which is not ingested.
    Text,
}

/// A parsed line of InfluxDB's line protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct InfluxLine<'a> {
    /// The measurement, unescaped.
    pub measurement: Cow<'a, str>,
    /// The tags, in the order sent, unescaped.
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The fields, in the order sent, with their keys unescaped.
    pub fields: Vec<(Cow<'a, str>, FieldValue)>,
    /// The time in Unix milliseconds.
    pub time_unix_ms: i64,
}

/// Parses one line of InfluxDB's line protocol, without its newline:
/// `measurement[,tag=value...] field=value[,field=value...] [timestamp]`.
/// The timestamp is in `precision`; a missing one is `now_unix_ms`.
pub fn parse_influx(
    line: &[u8],
    precision: Precision,
    now_unix_ms: i64,
) -> Result<InfluxLine<'_>, Rejection> {
    let s = std::str::from_utf8(line).map_err(|_| reject(Reason::NotUtf8, "not UTF-8"))?;
    let b = s.as_bytes();
    let (measurement, mut i) = unescape_until(s, 0, b", ");
    if measurement.is_empty() {
        return Err(syntax("the line has no measurement"));
    }
    let mut tags = Vec::new();
    while b.get(i) == Some(&b',') {
        let (key, at) = unescape_until(s, i + 1, b"=, ");
        if b.get(at) != Some(&b'=') {
            return Err(syntax("a tag has no '='"));
        }
        if key.is_empty() {
            return Err(syntax("a tag has an empty key"));
        }
        let (value, at) = unescape_until(s, at + 1, b", ");
        if value.is_empty() {
            return Err(syntax("a tag has an empty value"));
        }
        tags.push((key, value));
        i = at;
    }
    i = skip_spaces(b, i);
    if i >= b.len() {
        return Err(syntax("the line has no fields"));
    }
    let mut fields = Vec::new();
    loop {
        let (key, at) = unescape_until(s, i, b"=, ");
        if b.get(at) != Some(&b'=') {
            return Err(syntax("a field has no '='"));
        }
        if key.is_empty() {
            return Err(syntax("a field has an empty key"));
        }
        let start = at + 1;
        let (value, end) = if b.get(start) == Some(&b'"') {
            let close =
                string_end(b, start + 1).ok_or(syntax("a string field has no closing quote"))?;
            (FieldValue::Text, close + 1)
        } else {
            let end = b[start..]
                .iter()
                .position(|&c| c == b',' || c == b' ')
                .map_or(b.len(), |p| start + p);
            (field_value(&s[start..end])?, end)
        };
        fields.push((key, value));
        match b.get(end) {
            Some(b',') => i = end + 1,
            Some(b' ') | None => {
                i = end;
                break;
            }
            Some(_) => return Err(syntax("text follows a string field's closing quote")),
        }
    }
    i = skip_spaces(b, i);
    let time_unix_ms = if i < b.len() {
        let end = b[i..]
            .iter()
            .position(|&c| c == b' ')
            .map_or(b.len(), |p| i + p);
        if skip_spaces(b, end) < b.len() {
            return Err(syntax("text follows the timestamp"));
        }
        let ts = s[i..]
            .trim_end_matches(' ')
            .parse::<i64>()
            .map_err(|_| reject(Reason::BadTimestamp, "the timestamp is not an integer"))?;
        precision.to_unix_ms(ts).ok_or(reject(
            Reason::BadTimestamp,
            "the timestamp is out of range",
        ))?
    } else {
        now_unix_ms
    };
    Ok(InfluxLine {
        measurement,
        tags,
        fields,
        time_unix_ms,
    })
}

/// The text from `start` up to the first unescaped byte of `stops` (or the
/// end), with the escapes `\,`, `\ `, `\=` and `\\` undone, and the index
/// where it stopped. Other backslashes are kept as they are.
fn unescape_until<'a>(s: &'a str, start: usize, stops: &[u8]) -> (Cow<'a, str>, usize) {
    let b = s.as_bytes();
    let mut i = start.min(b.len());
    let mut owned: Option<String> = None;
    let mut copied = i;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && matches!(b.get(i + 1), Some(b',' | b' ' | b'=' | b'\\')) {
            // Keep what came before, drop the backslash, keep the escaped
            // byte as the start of what comes next.
            owned
                .get_or_insert_with(String::new)
                .push_str(&s[copied..i]);
            copied = i + 1;
            i += 2;
            continue;
        }
        if stops.contains(&c) {
            break;
        }
        i += 1;
    }
    let text = match owned {
        None => Cow::Borrowed(&s[start.min(b.len())..i]),
        Some(mut o) => {
            o.push_str(&s[copied..i]);
            Cow::Owned(o)
        }
    };
    (text, i)
}

/// The index of the quote that closes a string field whose text starts at
/// `from`, skipping escaped characters.
fn string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    i
}

/// An unquoted Influx field value.
fn field_value(v: &str) -> Result<FieldValue, Rejection> {
    let bad = reject(Reason::BadValue, "a field value is not a number or boolean");
    let n = match v {
        "" => return Err(syntax("a field has no value")),
        "t" | "T" | "true" | "True" | "TRUE" => 1.0,
        "f" | "F" | "false" | "False" | "FALSE" => 0.0,
        _ => {
            if let Some(int) = v.strip_suffix('i') {
                int.parse::<i64>().map_err(|_| bad)? as f64
            } else if let Some(uint) = v.strip_suffix('u') {
                uint.parse::<u64>().map_err(|_| bad)? as f64
            } else {
                v.parse::<f64>().map_err(|_| bad)?
            }
        }
    };
    if n.is_finite() {
        Ok(FieldValue::Number(n))
    } else {
        Err(reject(
            Reason::NonFinite,
            "a field value is NaN or infinite",
        ))
    }
}

/// A piece of a byte stream cut by [`LineSplitter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// This is a whole line without its `\n`.
    Line(&'a [u8]),
    /// This is the start of a line over the limit; it is reported once,
    /// and the rest of it is skipped.
    TooLong(&'a [u8]),
}

/// Cuts a byte stream into lines, buffering at most one line of at most
/// the limit, so that a stream without newlines costs bounded memory.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    partial: Vec<u8>,
    /// Inside a line already reported as too long.
    skipping: bool,
}

impl LineSplitter {
    /// Creates a splitter for lines of at most `max_line_bytes` bytes.
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            max: max_line_bytes,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Passes every line that `data` completes to `emit`, and keeps the
    /// incomplete rest.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let head = &data[..nl];
            data = &data[nl + 1..];
            if self.skipping {
                self.skipping = false;
            } else if self.partial.is_empty() {
                if head.len() > self.max {
                    emit(Piece::TooLong(head));
                } else {
                    emit(Piece::Line(head));
                }
            } else if self.partial.len() + head.len() > self.max {
                emit(Piece::TooLong(&self.partial));
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(head);
                emit(Piece::Line(&self.partial));
                self.partial.clear();
            }
        }
        if self.skipping || data.is_empty() {
            return;
        }
        if self.partial.len() + data.len() > self.max {
            let start: &[u8] = if self.partial.is_empty() {
                data
            } else {
                &self.partial
            };
            emit(Piece::TooLong(start));
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(data);
        }
    }

    /// Passes the last line, which had no `\n`, to `emit` at the end of
    /// the stream.
    pub fn finish(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        if !self.skipping && !self.partial.is_empty() {
            emit(Piece::Line(&self.partial));
        }
        self.partial.clear();
        self.skipping = false;
    }
}

/// The two protocols, for log fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Graphite,
    Influx,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Graphite => "graphite",
            Protocol::Influx => "influx",
        }
    }
}

/// What the counters said at one moment, for self-metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestCounters {
    /// How many samples were handed to the batcher's channel.
    pub accepted_samples: u64,
    /// How many lines were rejected, one entry per reason in
    /// [`Reason::ALL`]'s order.
    pub rejected_lines: Vec<(Reason, u64)>,
    /// How many samples were dropped because the series cache was full.
    pub dropped_samples_series_cap: u64,
    /// How many Influx string fields were skipped; they are not ingested.
    pub skipped_string_fields: u64,
    /// How many connections were closed at once because their listener
    /// already had [`IngestConfig::max_connections`].
    pub refused_connections: u64,
    /// How many HTTP writes were answered 503 because the batcher's
    /// channel was full.
    pub throttled_requests: u64,
    /// How many series the cache holds.
    pub series: usize,
}

impl IngestCounters {
    /// Returns how many lines were rejected for `reason`.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected_lines
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Returns how many lines were rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_lines.iter().map(|(_, n)| n).sum()
    }
}

/// What can be warned about, each at most once per [`WARN_EVERY_MS`].
#[derive(Clone, Copy)]
enum Warning {
    Rejected(Reason),
    SeriesCap,
    ConnectionCap,
    Backpressure,
}

impl Warning {
    const COUNT: usize = Reason::ALL.len() + 3;

    fn index(self) -> usize {
        match self {
            Warning::Rejected(r) => r.index(),
            Warning::SeriesCap => Reason::ALL.len(),
            Warning::ConnectionCap => Reason::ALL.len() + 1,
            Warning::Backpressure => Reason::ALL.len() + 2,
        }
    }
}

/// At most one warning per kind per [`WARN_EVERY_MS`], counting the ones
/// held back.
struct WarnLimiter {
    last: [AtomicI64; Warning::COUNT],
    held: [AtomicU64; Warning::COUNT],
}

impl WarnLimiter {
    fn new() -> Self {
        WarnLimiter {
            last: std::array::from_fn(|_| AtomicI64::new(i64::MIN)),
            held: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// `Some(n)` when a warning of this kind may be logged now, `n` being
    /// how many were held back since the last one; `None` holds it back.
    fn allow(&self, warning: Warning, now_unix_ms: i64) -> Option<u64> {
        let i = warning.index();
        let last = self.last[i].load(Ordering::Relaxed);
        if now_unix_ms.saturating_sub(last) >= WARN_EVERY_MS
            && self.last[i]
                .compare_exchange(last, now_unix_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held[i].swap(0, Ordering::Relaxed))
        } else {
            self.held[i].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The series seen so far, each in one shared `Arc`, with the time it was
/// last used.
struct SeriesCache {
    series: HashMap<Arc<Series>, Cell<i64>>,
    max: usize,
    idle_ms: i64,
    next_sweep_ms: i64,
}

impl SeriesCache {
    fn new(limits: &IngestLimits) -> Self {
        SeriesCache {
            series: HashMap::new(),
            max: limits.max_series,
            idle_ms: i64::try_from(limits.series_idle.as_millis()).unwrap_or(i64::MAX),
            next_sweep_ms: i64::MIN,
        }
    }

    /// The shared `Arc` of `series`, added if there is room.
    fn get(&mut self, series: Series, now_unix_ms: i64) -> Option<Arc<Series>> {
        if let Some((known, used)) = self.series.get_key_value(&series) {
            used.set(now_unix_ms);
            return Some(known.clone());
        }
        if self.series.len() >= self.max {
            self.sweep(now_unix_ms);
            if self.series.len() >= self.max {
                return None;
            }
        }
        let series = Arc::new(series);
        self.series.insert(series.clone(), Cell::new(now_unix_ms));
        Some(series)
    }

    /// Forgets the series idle for too long, at most once per
    /// [`SWEEP_EVERY_MS`], so that a full cache under a flood of new series
    /// does not scan itself for every sample.
    fn sweep(&mut self, now_unix_ms: i64) {
        if now_unix_ms < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now_unix_ms.saturating_add(SWEEP_EVERY_MS);
        let idle = self.idle_ms;
        self.series
            .retain(|_, used| now_unix_ms.saturating_sub(used.get()) < idle);
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    dropped_series_cap: AtomicU64,
    skipped_strings: AtomicU64,
    refused_connections: AtomicU64,
    throttled: AtomicU64,
}

/// One bad line of a body, for the 400 answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// The line's number, from 1, counting every line of the body.
    pub number: usize,
    /// What was wrong with it.
    pub error: LineError,
    /// Its start, made printable.
    pub excerpt: String,
}

/// What became of the lines of an HTTP body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyReport {
    /// How many lines the body had, not counting blank lines and `#`
    /// comments.
    pub lines: usize,
    /// How many lines were rejected or lost samples to the series cap.
    pub bad_lines: usize,
    /// The first such line, if any.
    pub first_bad: Option<BadLine>,
}

impl BodyReport {
    /// Returns the error message for a 400, when a line was bad.
    pub fn message(&self) -> Option<String> {
        let bad = self.first_bad.as_ref()?;
        let others = if self.bad_lines > 1 {
            format!(
                "{} of {} lines had problems; the others were accepted",
                self.bad_lines, self.lines
            )
        } else {
            format!("the other {} lines were accepted", self.lines - 1)
        };
        Some(format!(
            "line {}: {}: '{}' ({others})",
            bad.number, bad.error, bad.excerpt
        ))
    }
}

/// Turns lines of either protocol into samples: checks the limits, shares
/// one `Arc<Series>` per series through a bounded cache, counts every
/// rejected line by reason and logs at most one warning per reason per
/// 10 s. Shared by all connections; the cache's lock is held only to look
/// up the series of one line.
pub struct Intake {
    limits: IngestLimits,
    cache: Mutex<SeriesCache>,
    counters: Counters,
    warnings: WarnLimiter,
}

impl fmt::Debug for Intake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intake")
            .field("limits", &self.limits)
            .field("counters", &self.counters())
            .finish()
    }
}

impl Intake {
    /// Creates an intake with an empty series cache.
    pub fn new(limits: IngestLimits) -> Self {
        Intake {
            cache: Mutex::new(SeriesCache::new(&limits)),
            limits,
            counters: Counters::default(),
            warnings: WarnLimiter::new(),
        }
    }

    /// Takes one Graphite line (without its newline) and appends its
    /// sample to `out`. Blank lines are ignored. A problem is counted and
    /// logged here, and returned for the caller to report.
    pub fn graphite_line(
        &self,
        line: &[u8],
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        self.graphite(line, now_unix_ms, out)
            .inspect_err(|e| self.note(Protocol::Graphite, line, e, now_unix_ms))
    }

    fn graphite(&self, line: &[u8], now: i64, out: &mut Vec<Sample>) -> Result<(), LineError> {
        self.check_length(line)?;
        let parsed = parse_graphite(line, now)?;
        self.check_name(parsed.path)?;
        self.check_labels(parsed.tags.iter().map(|(n, v)| (*n, *v)))?;
        let mut series = Series::new(parsed.path, Kind::Gauge);
        for (n, v) in parsed.tags {
            series = series.label(n, v);
        }
        let got = self.lock().get(series, now);
        match got {
            Some(series) => {
                out.push(Sample {
                    series,
                    time_unix_ms: parsed.time_unix_ms,
                    value: parsed.value,
                });
                Ok(())
            }
            None => Err(self.series_cap(1)),
        }
    }

    /// Takes one Influx line (without its newline) and appends a sample
    /// per numeric field to `out`. Blank lines and `#` comments are
    /// ignored. A problem is counted and logged here, and returned for the
    /// caller to report.
    pub fn influx_line(
        &self,
        line: &[u8],
        precision: Precision,
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        let line = line.trim_ascii();
        if line.is_empty() || line[0] == b'#' {
            return Ok(());
        }
        self.influx(line, precision, now_unix_ms, out)
            .inspect_err(|e| self.note(Protocol::Influx, line, e, now_unix_ms))
    }

    fn influx(
        &self,
        line: &[u8],
        precision: Precision,
        now: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), LineError> {
        self.check_length(line)?;
        let parsed = parse_influx(line, precision, now)?;
        self.check_labels(parsed.tags.iter().map(|(n, v)| (&**n, &**v)))?;
        let mut base = Series::new(String::new(), Kind::Gauge);
        for (n, v) in parsed.tags {
            base = base.label(n, v);
        }
        // Every name is checked before any sample is taken, so that a line
        // is rejected whole.
        let mut named = Vec::with_capacity(parsed.fields.len());
        let mut strings = 0;
        for (field, value) in &parsed.fields {
            match value {
                FieldValue::Number(v) => {
                    let name = format!("{}_{field}", parsed.measurement);
                    self.check_name(&name)?;
                    named.push((name, *v));
                }
                FieldValue::Text => strings += 1,
            }
        }
        if strings > 0 {
            self.counters
                .skipped_strings
                .fetch_add(strings, Ordering::Relaxed);
        }
        let mut dropped = 0;
        let mut cache = self.lock();
        for (name, value) in named {
            let series = Series {
                name,
                ..base.clone()
            };
            match cache.get(series, now) {
                Some(series) => out.push(Sample {
                    series,
                    time_unix_ms: parsed.time_unix_ms,
                    value,
                }),
                None => dropped += 1,
            }
        }
        drop(cache);
        if dropped > 0 {
            return Err(self.series_cap(dropped));
        }
        Ok(())
    }

    /// Takes every line of an Influx body, appending their samples to
    /// `out`, and reports the bad ones.
    pub fn influx_body(
        &self,
        body: &[u8],
        precision: Precision,
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> BodyReport {
        let mut report = BodyReport::default();
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() || trimmed[0] == b'#' {
                continue;
            }
            report.lines += 1;
            if let Err(error) = self.influx_line(trimmed, precision, now_unix_ms, out) {
                report.bad_lines += 1;
                if report.first_bad.is_none() {
                    report.first_bad = Some(BadLine {
                        number: i + 1,
                        error,
                        excerpt: excerpt(trimmed),
                    });
                }
            }
        }
        report
    }

    /// Returns the counters as they are now.
    pub fn counters(&self) -> IngestCounters {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestCounters {
            accepted_samples: load(&c.accepted),
            rejected_lines: Reason::ALL
                .iter()
                .map(|r| (*r, load(&c.rejected[r.index()])))
                .collect(),
            dropped_samples_series_cap: load(&c.dropped_series_cap),
            skipped_string_fields: load(&c.skipped_strings),
            refused_connections: load(&c.refused_connections),
            throttled_requests: load(&c.throttled),
            series: self.lock().series.len(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeriesCache> {
        // The cache stays consistent whatever a panicking holder did: each
        // change is one insert or retain.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_length(&self, line: &[u8]) -> Result<(), Rejection> {
        if line.len() > self.limits.max_line_bytes {
            return Err(reject(Reason::LineTooLong, "the line is too long"));
        }
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<(), Rejection> {
        if name.len() > self.limits.max_name_bytes {
            return Err(reject(Reason::NameTooLong, "the series name is too long"));
        }
        if has_control(name) {
            return Err(syntax("the series name has a control character"));
        }
        Ok(())
    }

    fn check_labels<'a>(
        &self,
        labels: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), Rejection> {
        if labels.len() > self.limits.max_labels {
            return Err(reject(
                Reason::TooManyLabels,
                "the line has too many labels",
            ));
        }
        for (name, value) in labels {
            if name.len() > self.limits.max_label_name_bytes {
                return Err(reject(Reason::LabelTooLong, "a label name is too long"));
            }
            if value.len() > self.limits.max_label_value_bytes {
                return Err(reject(Reason::LabelTooLong, "a label value is too long"));
            }
            if has_control(name) || has_control(value) {
                return Err(syntax("a label has a control character"));
            }
        }
        Ok(())
    }

    fn series_cap(&self, dropped: usize) -> LineError {
        LineError::SeriesCap {
            dropped,
            max_series: self.limits.max_series,
        }
    }

    /// Counts a problem and logs it, unless one like it was logged in the
    /// last 10 s.
    fn note(&self, protocol: Protocol, line: &[u8], error: &LineError, now_unix_ms: i64) {
        let warning = match error {
            LineError::Rejected(r) => {
                self.counters.rejected[r.reason.index()].fetch_add(1, Ordering::Relaxed);
                Warning::Rejected(r.reason)
            }
            LineError::SeriesCap { dropped, .. } => {
                self.counters
                    .dropped_series_cap
                    .fetch_add(*dropped as u64, Ordering::Relaxed);
                Warning::SeriesCap
            }
        };
        if let Some(held_back) = self.warnings.allow(warning, now_unix_ms) {
            let reason = match error {
                LineError::Rejected(r) => r.reason.as_str(),
                LineError::SeriesCap { .. } => "series_cap",
            };
            tracing::warn!(
                protocol = protocol.as_str(),
                reason,
                line = %excerpt(line),
                held_back,
                "load generator line rejected: {error}"
            );
        }
    }

    /// Counts and logs a line that was too long to buffer, by its start.
    fn reject_overlong(&self, protocol: Protocol, start: &[u8], now_unix_ms: i64) {
        let error = LineError::Rejected(reject(Reason::LineTooLong, "the line is too long"));
        self.note(protocol, start, &error, now_unix_ms);
    }

    fn accepted(&self, samples: usize) {
        self.counters
            .accepted
            .fetch_add(samples as u64, Ordering::Relaxed);
    }

    fn refused(&self, protocol: Protocol, peer: SocketAddr, max: usize, now_unix_ms: i64) {
        self.counters
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.warnings.allow(Warning::ConnectionCap, now_unix_ms) {
            tracing::warn!(
                protocol = protocol.as_str(),
                %peer,
                held_back,
                "load generator connection refused: {max} connections are open"
            );
        }
    }

    fn throttled(&self, now_unix_ms: i64) {
        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.warnings.allow(Warning::Backpressure, now_unix_ms) {
            tracing::warn!(
                held_back,
                "the batcher is full: answering load generator writes with 503"
            );
        }
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The start of a line, printable: at most [`EXCERPT_BYTES`] bytes, not
/// UTF-8 replaced, control characters escaped, `…` when cut.
fn excerpt(line: &[u8]) -> String {
    let cut = line.len() > EXCERPT_BYTES;
    let text = String::from_utf8_lossy(&line[..line.len().min(EXCERPT_BYTES)]);
    let mut out = String::with_capacity(text.len() + 3);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut {
        out.push('…');
    }
    out
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

/// Reads Graphite lines until the client closes, goes idle, or shutdown.
/// Sending waits while the channel is full: the client is backpressured by
/// TCP.
async fn graphite_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let intake = &shared.intake;
    let mut splitter = LineSplitter::new(config.limits.max_line_bytes);
    let mut buf = vec![0u8; READ_BYTES];
    tracing::debug!(%peer, "Graphite connection opened");
    loop {
        let n = tokio::select! {
            biased;
            _ = stopping(&mut stop) => return,
            r = tokio::time::timeout(config.idle_timeout, tcp.read(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "Graphite connection failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "Graphite connection idle; closing it");
                    return;
                }
            },
        };
        let now = crate::now_unix_ms();
        let mut samples = Vec::new();
        let mut emit = |piece: Piece<'_>| match piece {
            Piece::Line(line) => {
                let _ = intake.graphite_line(line, now, &mut samples);
            }
            Piece::TooLong(start) => intake.reject_overlong(Protocol::Graphite, start, now),
        };
        if n == 0 {
            splitter.finish(&mut emit);
        } else {
            splitter.push(&buf[..n], &mut emit);
        }
        if !samples.is_empty() {
            let count = samples.len();
            tokio::select! {
                biased;
                _ = stopping(&mut stop) => return,
                r = shared.sender.send(samples) => {
                    if r.is_err() {
                        return;
                    }
                    intake.accepted(count);
                }
            }
        }
        if n == 0 {
            tracing::debug!(%peer, "Graphite connection closed by the client");
            return;
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client closes, goes idle,
/// or shutdown, which lets the request in progress finish within the
/// grace time.
async fn influx_connection(
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
    use crate::metrics::encode::BatchBuilder;

    const NOW: i64 = 1_700_000_000_123;

    fn intake() -> Intake {
        Intake::new(IngestLimits::default())
    }

    fn labels(s: &Sample) -> Vec<(&str, &str)> {
        let l = &s.series.labels;
        l.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
    }

    fn graphite(line: &str) -> Result<GraphiteLine<'_>, Rejection> {
        parse_graphite(line.as_bytes(), NOW)
    }

    fn influx(line: &str) -> Result<InfluxLine<'_>, Rejection> {
        parse_influx(line.as_bytes(), Precision::Nanoseconds, NOW)
    }

    fn reason<T: fmt::Debug>(r: Result<T, Rejection>) -> Reason {
        match r {
            Ok(v) => panic!("expected a rejection, got {v:?}"),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn graphite_lines_with_tags_and_every_kind_of_timestamp() {
        let l = graphite("jmeter.all.ok.count 10 1700000000").unwrap();
        assert_eq!(
            (l.path, l.value, l.time_unix_ms),
            ("jmeter.all.ok.count", 10.0, 1_700_000_000_000)
        );
        assert!(l.tags.is_empty());
        let l = graphite("disk.used;rack=a1;datacenter=dc1 9.5 1700000000.25").unwrap();
        assert_eq!(l.path, "disk.used");
        assert_eq!(l.tags, vec![("rack", "a1"), ("datacenter", "dc1")]);
        assert_eq!((l.value, l.time_unix_ms), (9.5, 1_700_000_000_250));
        assert_eq!(graphite("a 1 -1").unwrap().time_unix_ms, NOW);
        assert_eq!(graphite("a 1").unwrap().time_unix_ms, NOW);
        assert_eq!(graphite("  a\t-2.5e3 \t 0 ").unwrap().value, -2500.0);
        assert_eq!(graphite("a 1 0").unwrap().time_unix_ms, 0);
        // A tag value may hold '='.
        assert_eq!(graphite("a;k=v=w 1").unwrap().tags, vec![("k", "v=w")]);
    }

    #[test]
    fn hostile_graphite_lines_are_rejected_with_their_reason() {
        use Reason::*;
        let cases: &[(&[u8], Reason)] = &[
            (b"", Syntax),
            (b"   ", Syntax),
            (b"a", Syntax),
            (b"a 1 2 3", Syntax),
            (b";k=v 1", Syntax),
            (b"a; 1", Syntax),
            (b"a;k 1", Syntax),
            (b"a;=v 1", Syntax),
            (b"a;k= 1", Syntax),
            (b"a;k=v; 1", Syntax),
            (b"a x", BadValue),
            (b"a 1i", BadValue),
            (b"a 0x10", BadValue),
            (b"a 1,5", BadValue),
            (b"a nan", NonFinite),
            (b"a NaN 1", NonFinite),
            (b"a inf", NonFinite),
            (b"a -infinity", NonFinite),
            (b"a 1e400", NonFinite),
            (b"a 1 x", BadTimestamp),
            (b"a 1 nan", BadTimestamp),
            (b"a 1 1e300", BadTimestamp),
            (b"a 1 9223372036854775807", BadTimestamp),
            (b"a 1 -9223372036854775808", BadTimestamp),
            (b"a 1 4611686018427388", BadTimestamp),
            (b"\xff 1 1", NotUtf8),
            (b"a\xc3 1", NotUtf8),
        ];
        for (line, want) in cases {
            let got = parse_graphite(line, NOW);
            assert_eq!(
                got.as_ref().map_err(|e| e.reason),
                Err(*want),
                "{:?}: {got:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Just within the range.
        assert!(graphite("a 1 4611686018427387").is_ok());
    }

    #[test]
    fn influx_lines_with_tags_fields_and_types() {
        let l = influx("cpu,host=a,region=eu usage=0.5,count=3i,big=18446744073709551615u,up=true,down=F,note=\"x y\" 1700000000123456789").unwrap();
        assert_eq!(l.measurement, "cpu");
        let tags: Vec<(&str, &str)> = l.tags.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(tags, vec![("host", "a"), ("region", "eu")]);
        let fields: Vec<(&str, FieldValue)> = l.fields.iter().map(|(k, v)| (&**k, *v)).collect();
        assert_eq!(
            fields,
            vec![
                ("usage", FieldValue::Number(0.5)),
                ("count", FieldValue::Number(3.0)),
                ("big", FieldValue::Number(18446744073709551615.0)),
                ("up", FieldValue::Number(1.0)),
                ("down", FieldValue::Number(0.0)),
                ("note", FieldValue::Text),
            ]
        );
        assert_eq!(l.time_unix_ms, 1_700_000_000_123);
        // No tags, no timestamp, extra spaces, a negative integer.
        let l = influx("mem  free=-5i  ").unwrap();
        assert_eq!(l.fields[0], ("free".into(), FieldValue::Number(-5.0)));
        assert_eq!(l.time_unix_ms, NOW);
        // Floats in every spelling the protocol allows.
        for (v, want) in [("1", 1.0), ("-1.5", -1.5), ("1e3", 1000.0), (".5", 0.5)] {
            let line = format!("m v={v}");
            assert_eq!(influx(&line).unwrap().fields[0].1, FieldValue::Number(want));
        }
    }

    #[test]
    fn influx_escapes_and_strings() {
        let l = influx(
            r#"my\ meas\,ure,t\=ag\ 1=v\,a\ l\=ue\\ f\ 1\=x=1,s="a \"quoted\", = string\\",g=2 5"#,
        )
        .unwrap();
        assert_eq!(l.measurement, "my meas,ure");
        assert_eq!(&*l.tags[0].0, "t=ag 1");
        assert_eq!(&*l.tags[0].1, r"v,a l=ue\");
        assert_eq!(&*l.fields[0].0, "f 1=x");
        assert_eq!(l.fields[1], ("s".into(), FieldValue::Text));
        assert_eq!(l.fields[2], ("g".into(), FieldValue::Number(2.0)));
        assert_eq!(l.time_unix_ms, 0);
        // A backslash before anything else is kept.
        let l = influx(r"c:\temp,path=C:\dir v=1").unwrap();
        assert_eq!((&*l.measurement, &*l.tags[0].1), (r"c:\temp", r"C:\dir"));
        // Nothing was copied where nothing was escaped.
        let l = influx("m,k=v f=1").unwrap();
        assert!(matches!(l.measurement, Cow::Borrowed(_)));
        assert!(matches!(l.tags[0].1, Cow::Borrowed(_)));
    }

    /// Escapes `s` as the line protocol wants for a measurement, tag key,
    /// tag value or field key.
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            if matches!(c, ',' | ' ' | '=' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    #[test]
    fn escaped_names_parse_back_to_themselves() {
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet = ['a', 'Z', '0', ',', ' ', '=', '\\', '"', 'é', '#', '_', ';'];
        let word = |rng: &mut fastrand::Rng| -> String {
            let n = rng.usize(1..8);
            (0..n)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect()
        };
        for _ in 0..5_000 {
            let (m, k, v, f) = (
                word(&mut rng),
                word(&mut rng),
                word(&mut rng),
                word(&mut rng),
            );
            let value = rng.i32(..);
            let line = format!(
                "{},{}={} {}={value}i",
                escape(&m),
                escape(&k),
                escape(&v),
                escape(&f)
            );
            // A measurement that starts with '#' is a comment; `parse_influx`
            // itself still reads it.
            let l = influx(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(l.measurement, m, "{line:?}");
            assert_eq!((&*l.tags[0].0, &*l.tags[0].1), (k.as_str(), v.as_str()));
            assert_eq!(
                l.fields,
                vec![(Cow::Owned(f), FieldValue::Number(f64::from(value)))]
            );
        }
    }

    #[test]
    fn influx_precisions() {
        let at = |p, ts: &str| {
            parse_influx(format!("m v=1 {ts}").as_bytes(), p, NOW).map(|l| l.time_unix_ms)
        };
        assert_eq!(at(Precision::Nanoseconds, "1500000"), Ok(1));
        assert_eq!(at(Precision::Nanoseconds, "-1"), Ok(-1));
        assert_eq!(at(Precision::Microseconds, "2500"), Ok(2));
        assert_eq!(at(Precision::Milliseconds, "-7"), Ok(-7));
        assert_eq!(at(Precision::Seconds, "3"), Ok(3_000));
        assert_eq!(at(Precision::Minutes, "2"), Ok(120_000));
        assert_eq!(at(Precision::Hours, "1"), Ok(3_600_000));
        assert_eq!(
            at(Precision::Nanoseconds, "9223372036854775807"),
            Ok(9_223_372_036_854)
        );
        for (p, ts) in [
            (Precision::Milliseconds, "9223372036854775807"),
            (Precision::Milliseconds, "-9223372036854775808"),
            (Precision::Seconds, "9223372036854775807"),
            (Precision::Hours, "-9223372036854775808"),
        ] {
            assert_eq!(reason(at(p, ts)), Reason::BadTimestamp, "{p:?} {ts}");
        }
        for (param, want) in [
            ("ns", Precision::Nanoseconds),
            ("n", Precision::Nanoseconds),
            ("us", Precision::Microseconds),
            ("u", Precision::Microseconds),
            ("ms", Precision::Milliseconds),
            ("s", Precision::Seconds),
            ("m", Precision::Minutes),
            ("h", Precision::Hours),
        ] {
            assert_eq!(Precision::from_param(param), Some(want));
        }
        for bad in ["", "NS", "sec", "µs", "1"] {
            assert_eq!(Precision::from_param(bad), None);
        }
    }

    #[test]
    fn hostile_influx_lines_are_rejected_with_their_reason() {
        use Reason::*;
        let cases: &[(&[u8], Reason)] = &[
            (b"", Syntax),
            (b"m", Syntax),
            (b"m ", Syntax),
            (b",t=v f=1", Syntax),
            (b" f=1", Syntax),
            (b"m,t f=1", Syntax),
            (b"m,=v f=1", Syntax),
            (b"m,t= f=1", Syntax),
            (b"m,t=v,f=1", Syntax),
            (b"m,t=v", Syntax),
            (b"m f", Syntax),
            (b"m =1", Syntax),
            (b"m f=", Syntax),
            (b"m f=1,", Syntax),
            (b"m f=1,,g=2", Syntax),
            (b"m f=\"open", Syntax),
            (b"m f=\"a\\\"", Syntax),
            (b"m f=\"a\"b", Syntax),
            (b"m f=1 2 3", Syntax),
            (b"m f=1 2 x", Syntax),
            (b"m f=abc", BadValue),
            (b"m f=1.5i", BadValue),
            (b"m f=-1u", BadValue),
            (b"m f=99999999999999999999i", BadValue),
            (b"m f=1x", BadValue),
            (b"m f=yes", BadValue),
            (b"m f=1,g=bad", BadValue),
            (b"m f=NaN", NonFinite),
            (b"m f=inf", NonFinite),
            (b"m f=-Infinity", NonFinite),
            (b"m f=1e309", NonFinite),
            (b"m f=1 1.5", BadTimestamp),
            (b"m f=1 x", BadTimestamp),
            (b"m f=1 99999999999999999999", BadTimestamp),
            (b"m\xff f=1", NotUtf8),
            (b"m f=\"\xc3\"", NotUtf8),
        ];
        for (line, want) in cases {
            let got = parse_influx(line, Precision::Nanoseconds, NOW);
            assert_eq!(
                got.as_ref().map(|_| ()).map_err(|e| e.reason),
                Err(*want),
                "{:?}: {got:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn graphite_samples_share_one_series_per_name_and_tags() {
        let intake = intake();
        let mut out = Vec::new();
        for line in [
            "a;z=1;b=2 1 10",
            "a;b=2;z=1 2 20",
            "a;b=2;z=1;b=3 3 30",
            "b 4 40",
            "",
            "   ",
        ] {
            intake
                .graphite_line(line.as_bytes(), NOW, &mut out)
                .unwrap();
        }
        assert_eq!(out.len(), 4);
        assert!(Arc::ptr_eq(&out[0].series, &out[1].series));
        assert_eq!(labels(&out[0]), vec![("b", "2"), ("z", "1")]);
        // A tag given twice keeps its last value: another series.
        assert_eq!(labels(&out[2]), vec![("b", "3"), ("z", "1")]);
        assert_eq!(out[3].series.name, "b");
        assert!(out.iter().all(|s| s.series.kind == Kind::Gauge));
        assert_eq!(out[2].time_unix_ms, 30_000);
        assert_eq!(intake.counters().series, 3);
    }

    #[test]
    fn influx_samples_are_named_measurement_field() {
        let intake = intake();
        let mut out = Vec::new();
        let body = b"# a comment\n\nhttp_reqs,url=/a,method=GET count=3i,dur=12.5,note=\"x\" 1000000000\r\nhttp_reqs,method=GET,url=/a count=4i 2000000000\nevents,title=start text=\"started\"\n";
        let report = intake.influx_body(body, Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(
            report,
            BodyReport {
                lines: 3,
                bad_lines: 0,
                first_bad: None
            }
        );
        let names: Vec<&str> = out.iter().map(|s| s.series.name.as_str()).collect();
        assert_eq!(
            names,
            ["http_reqs_count", "http_reqs_dur", "http_reqs_count"]
        );
        assert_eq!(labels(&out[0]), vec![("method", "GET"), ("url", "/a")]);
        assert!(Arc::ptr_eq(&out[0].series, &out[2].series));
        assert_eq!(
            out.iter()
                .map(|s| (s.time_unix_ms, s.value))
                .collect::<Vec<_>>(),
            [(1_000, 3.0), (1_000, 12.5), (2_000, 4.0)]
        );
        let c = intake.counters();
        assert_eq!(c.skipped_string_fields, 2);
        assert_eq!(c.rejected_total(), 0);
        assert_eq!(c.series, 2);
    }

    #[test]
    fn limits_reject_lines_whole_and_count_them() {
        let limits = IngestLimits {
            max_line_bytes: 300,
            max_name_bytes: 10,
            max_labels: 2,
            max_label_name_bytes: 3,
            max_label_value_bytes: 4,
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut out = Vec::new();
        let long = format!("a {}", "1".repeat(299));
        let cases: Vec<(String, Reason)> = vec![
            (long, Reason::LineTooLong),
            ("abcdefghijk 1".into(), Reason::NameTooLong),
            ("a;x=1;y=2;z=3 1".into(), Reason::TooManyLabels),
            ("a;long=1 1".into(), Reason::LabelTooLong),
            ("a;k=12345 1".into(), Reason::LabelTooLong),
            ("a\u{1b}[31m 1".into(), Reason::Syntax),
            ("a;k=\u{7f} 1".into(), Reason::Syntax),
        ];
        for (line, want) in &cases {
            let got = intake.graphite_line(line.as_bytes(), NOW, &mut out);
            match got {
                Err(LineError::Rejected(r)) => assert_eq!(r.reason, *want, "{line:?}"),
                other => panic!("{line:?}: {other:?}"),
            }
        }
        // Influx: the name includes the field; one bad field rejects the
        // whole line.
        let got = intake.influx_line(b"m a=1,toolongfield=2", Precision::Seconds, NOW, &mut out);
        assert!(
            matches!(got, Err(LineError::Rejected(r)) if r.reason == Reason::NameTooLong),
            "{got:?}"
        );
        let got = intake.influx_line(b"m,a=1,b=2,c=3 v=1", Precision::Seconds, NOW, &mut out);
        assert!(matches!(got, Err(LineError::Rejected(r)) if r.reason == Reason::TooManyLabels));
        assert!(out.is_empty());
        intake
            .graphite_line(b"abcdefghij;k=1234 1", NOW, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        let c = intake.counters();
        assert_eq!(c.rejected(Reason::LineTooLong), 1);
        assert_eq!(c.rejected(Reason::NameTooLong), 2);
        assert_eq!(c.rejected(Reason::TooManyLabels), 2);
        assert_eq!(c.rejected(Reason::LabelTooLong), 2);
        assert_eq!(c.rejected(Reason::Syntax), 2);
        assert_eq!(c.rejected_total(), 9);
    }

    #[test]
    fn a_full_cache_drops_new_series_until_idle_ones_are_forgotten() {
        let limits = IngestLimits {
            max_series: 3,
            series_idle: Duration::from_secs(60),
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut out = Vec::new();
        for s in ["a", "b", "c"] {
            intake
                .graphite_line(format!("{s} 1").as_bytes(), 0, &mut out)
                .unwrap();
        }
        let got = intake.graphite_line(b"d 1", 1_000, &mut out);
        assert_eq!(
            got,
            Err(LineError::SeriesCap {
                dropped: 1,
                max_series: 3
            })
        );
        // Known series go on; an Influx line keeps its known fields and
        // drops the new ones.
        intake.graphite_line(b"a 2", 30_000, &mut out).unwrap();
        intake
            .influx_line(b"m v=1", Precision::Seconds, 30_000, &mut out)
            .unwrap_err();
        assert_eq!(out.len(), 4);
        assert_eq!(intake.counters().dropped_samples_series_cap, 2);
        // 61 s after their last use, b and c make room; a was used at 30 s.
        intake.graphite_line(b"d 1", 61_000, &mut out).unwrap();
        intake.graphite_line(b"e 1", 61_000, &mut out).unwrap();
        // The sweep ran at 61 s: the next one waits a second.
        assert!(intake.graphite_line(b"f 1", 61_500, &mut out).is_err());
        assert!(intake.graphite_line(b"f 1", 91_000, &mut out).is_ok());
        let c = intake.counters();
        assert_eq!((c.series, c.dropped_samples_series_cap), (3, 3));
        let report = {
            let mut out = Vec::new();
            intake.influx_body(b"m,k=v a=1,b=2\n", Precision::Seconds, 92_000, &mut out)
        };
        let message = report.message().unwrap();
        assert!(
            message.starts_with("line 1: the limit of 3 series is reached: 2 samples"),
            "{message}"
        );
    }

    #[test]
    fn warnings_are_limited_per_kind_and_count_what_was_held_back() {
        let w = WarnLimiter::new();
        let syntax = Warning::Rejected(Reason::Syntax);
        assert_eq!(w.allow(syntax, 0), Some(0));
        assert_eq!(w.allow(syntax, 1), None);
        assert_eq!(w.allow(syntax, 9_999), None);
        // Another kind has its own budget.
        assert_eq!(w.allow(Warning::SeriesCap, 5), Some(0));
        assert_eq!(w.allow(syntax, 10_000), Some(2));
        assert_eq!(w.allow(syntax, 10_001), None);
        assert_eq!(w.allow(syntax, 30_000), Some(1));
        // A clock that jumps back holds warnings back; it does not panic.
        assert_eq!(w.allow(syntax, i64::MIN), None);
        assert_eq!(w.allow(Warning::Backpressure, -5), Some(0));
    }

    #[test]
    fn a_body_report_names_the_first_bad_line() {
        let intake = intake();
        let mut out = Vec::new();
        let body = b"a v=1\n\nbad line here\nb v=2\nc v=x\n";
        let report = intake.influx_body(body, Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((report.lines, report.bad_lines), (4, 2));
        let message = report.message().unwrap();
        assert_eq!(
            message,
            "line 3: a field has no '=': 'bad line here' (2 of 4 lines had problems; the others were accepted)"
        );
        let one = intake.influx_body(b"x\ny v=1", Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(
            one.message().unwrap(),
            "line 1: the line has no fields: 'x' (the other 1 lines were accepted)"
        );
        let good = intake.influx_body(b"z v=1\n", Precision::Nanoseconds, NOW, &mut out);
        assert_eq!(good.message(), None);
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        assert_eq!(excerpt(b"plain"), "plain");
        assert_eq!(excerpt(b"a\tb\x1b[0m\x00"), "a\\tb\\u{1b}[0m\\u{0}");
        assert_eq!(excerpt(b"\xffx"), "\u{fffd}x");
        let long = excerpt(&[b'x'; 500]);
        assert_eq!(long.chars().count(), EXCERPT_BYTES + 1);
        assert!(long.ends_with('…'));
    }

    fn split_all(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, Vec<u8>>> {
        let mut s = LineSplitter::new(max);
        let mut got = Vec::new();
        let mut emit = |p: Piece<'_>| {
            got.push(match p {
                Piece::Line(l) => Ok(l.to_vec()),
                Piece::TooLong(start) => Err(start.to_vec()),
            })
        };
        for c in chunks {
            s.push(c, &mut emit);
        }
        s.finish(&mut emit);
        got
    }

    #[test]
    fn the_splitter_reports_a_long_line_once_and_goes_on() {
        let ok = |s: &str| Ok(s.as_bytes().to_vec());
        assert_eq!(
            split_all(5, &[b"ab", b"c\nde", b"", b"\n\nlast"]),
            [ok("abc"), ok("de"), ok(""), ok("last")]
        );
        // Too long within one chunk, across chunks, and at the end.
        let got = split_all(5, &[b"123456\nok\n1234", b"5678", b"9\nyes\n123456"]);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[0].is_err() && got[2].is_err() && got[4].is_err());
        assert_eq!((&got[1], &got[3]), (&ok("ok"), &ok("yes")));
        // Exactly the limit is fine.
        assert_eq!(split_all(5, &[b"12345\n"]), [ok("12345")]);
        assert_eq!(split_all(5, &[b"123", b"45\n"]), [ok("12345")]);
        assert!(split_all(5, &[b"123", b"456\n"])[0].is_err());
    }

    #[test]
    fn the_splitter_cuts_alike_however_the_stream_is_chunked() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..500 {
            let stream: Vec<u8> = (0..rng.usize(0..400))
                .map(|_| if rng.u8(0..8) == 0 { b'\n' } else { b'x' })
                .collect();
            let max = rng.usize(1..40);
            let whole = split_all(max, &[&stream]);
            let mut chunks = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len().min(50));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            let chunked = split_all(max, &chunks);
            // Lines agree exactly; a long line is reported once either way,
            // though by a start that depends on the chunks.
            assert_eq!(whole.len(), chunked.len(), "{stream:?} max {max}");
            for (a, b) in whole.iter().zip(&chunked) {
                match (a, b) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(_), Err(_)) => {}
                    _ => panic!("{a:?} vs {b:?}"),
                }
            }
            for line in whole.iter().flatten() {
                assert!(line.len() <= max && !line.contains(&b'\n'));
            }
        }
    }

    /// A line that is almost valid: a valid one with a few bytes changed,
    /// inserted or removed, favouring the bytes that mean something.
    fn mutate(rng: &mut fastrand::Rng, line: &str) -> Vec<u8> {
        const SPECIAL: &[u8] = b" ,=\\\";\t\r\n#-+.eEiutTfF0\x00\xff\xc3";
        let mut b = line.as_bytes().to_vec();
        for _ in 0..rng.usize(1..4) {
            let byte = if rng.bool() {
                SPECIAL[rng.usize(0..SPECIAL.len())]
            } else {
                rng.u8(..)
            };
            let at = rng.usize(0..=b.len());
            match rng.u8(0..3) {
                0 => b.insert(at, byte),
                1 if at < b.len() => b[at] = byte,
                _ if at < b.len() => {
                    b.remove(at);
                }
                _ => b.push(byte),
            }
        }
        b
    }

    #[test]
    fn random_and_mutated_input_never_panics_and_yields_encodable_samples() {
        let valid = [
            "jmeter.all.ok.count 10 1700000000",
            "a.b;tag=v;t2=w 1.5e3 -1",
            "x 1",
            "cpu,host=a\\ b,r=eu usage=0.5,n=3i,u=7u,ok=t,s=\"q\\\"x\" 1700000000000000000",
            "m\\,x f\\=1=1 5",
            "events,title=ApacheJMeter text=\"started\"",
        ];
        let limits = IngestLimits {
            max_series: 200,
            max_line_bytes: 4_096,
            ..IngestLimits::default()
        };
        let intake = Intake::new(limits);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut builder = BatchBuilder::new();
        let mut out = Vec::new();
        let mut produced = 0;
        for round in 0..40_000 {
            let line: Vec<u8> = if round % 3 == 0 {
                (0..rng.usize(0..60)).map(|_| rng.u8(..)).collect()
            } else {
                let base = valid[rng.usize(0..valid.len())];
                mutate(&mut rng, base)
            };
            let precision =
                [Precision::Nanoseconds, Precision::Seconds, Precision::Hours][rng.usize(0..3)];
            let now = rng.i64(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS);
            let _ = parse_graphite(&line, now);
            let _ = parse_influx(&line, precision, now);
            let _ = intake.graphite_line(&line, now, &mut out);
            let _ = intake.influx_line(&line, precision, now, &mut out);
            if round % 10 == 0 {
                let _ = intake.influx_body(&line, precision, now, &mut out);
            }
            for s in out.drain(..) {
                assert!(!s.series.name.is_empty() && s.value.is_finite(), "{s:?}");
                builder
                    .add(&s)
                    .unwrap_or_else(|e| panic!("{s:?} is not encodable: {e}"));
                produced += 1;
            }
            if builder.len() > 1_000 {
                builder.finish();
            }
        }
        assert!(
            produced > 1_000,
            "mutations left too few valid lines: {produced}"
        );
        assert!(intake.counters().rejected_total() > 10_000);
    }

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

    /// Prints what parsing costs here; run with `--nocapture` to see it.
    #[test]
    fn parse_cost() {
        let intake = intake();
        let graphite: Vec<String> = (0..20_000)
            .map(|i| format!("jmeter.sampler{}.ok.pct99 {i}.5 1700000000", i % 50))
            .collect();
        let influx: String = (0..20_000)
            .map(|i| {
                format!(
                    "http_req_duration,method=GET,name=/api/{},status=200 value={i}.25 1700000000000000000\n",
                    i % 50
                )
            })
            .collect();
        let mut out = Vec::with_capacity(20_000);
        let started = std::time::Instant::now();
        for line in &graphite {
            intake
                .graphite_line(line.as_bytes(), NOW, &mut out)
                .unwrap();
        }
        let g = started.elapsed();
        out.clear();
        let started = std::time::Instant::now();
        let report = intake.influx_body(influx.as_bytes(), Precision::Nanoseconds, NOW, &mut out);
        let i = started.elapsed();
        assert_eq!((report.bad_lines, out.len()), (0, 20_000));
        println!(
            "ingest: graphite {:?}/line, influx {:?}/line (debug builds are slower)",
            g / 20_000,
            i / 20_000
        );
    }
}
