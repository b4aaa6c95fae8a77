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
