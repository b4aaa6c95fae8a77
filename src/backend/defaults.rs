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
