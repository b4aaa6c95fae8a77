//! The defaults of `uplink backend`'s settings, one definition each. This
//! module is compiled in every build (lib.rs declares it without the rest of
//! the backend when the `backend` feature is off), so the flags of
//! `uplink backend` read the same defaults in the agent build.

use std::time::Duration;

/// Address the backend listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Where the store, the generated CA and state live.
pub const DEFAULT_DATA_DIR: &str = "./uplink-data";
/// Heartbeat interval on streams.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest hold of a long-poll.
pub const DEFAULT_POLL_HOLD: Duration = Duration::from_secs(25);
/// Largest message accepted or sent, on both rungs.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long finished, acknowledged commands (and their results) are kept.
pub const DEFAULT_RETAIN_COMMANDS: Duration = Duration::from_secs(30 * 86_400);
/// How long runs with nothing left on any host are kept.
pub const DEFAULT_RETAIN_RUNS: Duration = Duration::from_secs(30 * 86_400);
/// How long container events are kept.
pub const DEFAULT_RETAIN_CONTAINER_EVENTS: Duration = Duration::from_secs(7 * 86_400);
/// Most container events kept per agent (the newest).
pub const DEFAULT_MAX_CONTAINER_EVENTS_PER_AGENT: u64 = 10_000;
/// Epochs whose dedup cursors are kept per agent and stream.
pub const DEFAULT_EPOCHS_KEPT: u64 = 16;

/// Connections not yet authenticated that one source address may hold.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDR: usize = 64;
/// Time a new connection has to complete its TLS handshake and send its
/// first request.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a request body that is read whole (unary calls, enrollment) has to
/// arrive.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 streams one connection may have open at once.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Failed authentications a source address may make in a burst; one more is
/// allowed every [`DEFAULT_AUTH_FAILURE_REFILL`].
pub const DEFAULT_AUTH_FAILURE_BURST: u32 = 20;
/// The time after which a source address may fail one more authentication.
pub const DEFAULT_AUTH_FAILURE_REFILL: Duration = Duration::from_secs(3);

/// Enrollments one provider's token may make in a burst; then one more
/// every [`ENROLL_REFILL_PER_TOKEN`] (3,600 an hour).
pub const ENROLL_BURST_PER_TOKEN: u32 = 100;
/// The time after which a provider's token may enroll one more agent.
pub const ENROLL_REFILL_PER_TOKEN: Duration = Duration::from_secs(1);
/// Providers whose enrollment rate is remembered at once.
pub const ENROLL_TOKENS_REMEMBERED: usize = 10_000;

/// `Subscribe` streams one agent credential may hold at once; a new stream
/// past it replaces (ends) the oldest.
pub const MAX_STREAMS_PER_AGENT: usize = 4;

/// Bytes of request bodies read whole (Connect calls, enrollments) held at
/// once over all connections.
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The image the printed host command runs: this build's version, as the
/// project's image is tagged.
pub const DEFAULT_HOST_COMMAND_IMAGE: &str = concat!("uplink:", env!("CARGO_PKG_VERSION"));
/// Where the printed host command expects agent hosts to keep the backend's
/// generated CA (a copy of `DATA_DIR/ca.pem`, readable by all).
pub const DEFAULT_HOST_COMMAND_CA_FILE: &str = "/etc/uplink/ca.pem";
