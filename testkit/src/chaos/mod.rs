//! The seeded chaos soak's parts: the seed and length from the
//! environment, the backend and agents as processes that can be killed
//! with SIGKILL and started again on the same data, a Docker engine that
//! can be made unreachable ([`docker_relay`]), a state directory on a
//! small disk that can be filled and slowed down ([`disk`]), a Graphite
//! stream whose every sample is numbered ([`stream`]), and what the
//! processes left behind (panics, peak memory).
//!
//! `tests/chaos.rs` drives them. Everything started here is stopped when
//! dropped, on success and on failure alike.

pub mod disk;
pub mod docker_relay;
pub mod procs;
pub mod stream;

use std::time::Duration;

pub use self::disk::{SlowDisk, SmallDisk};
pub use self::docker_relay::DockerRelay;
pub use self::procs::{AgentProc, BackendProc};
pub use self::stream::Stream;

/// Default length of a soak when `UPLINK_CHAOS_SECS` is not set.
pub const DEFAULT_SECS: u64 = 120;

/// The seed (`UPLINK_CHAOS_SEED`, or a fresh one) and the soak's length
/// (`UPLINK_CHAOS_SECS`, or [`DEFAULT_SECS`]).
pub fn seed_and_length() -> (u64, Duration) {
    let seed = match std::env::var("UPLINK_CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("UPLINK_CHAOS_SEED={s:?} is not a number: {e}")),
        Err(_) => fastrand::u64(1..u64::MAX / 2),
    };
    let secs = match std::env::var("UPLINK_CHAOS_SECS") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("UPLINK_CHAOS_SECS={s:?} is not a number: {e}")),
        Err(_) => DEFAULT_SECS,
    };
    (seed, Duration::from_secs(secs))
}

/// The resident memory of process `pid` in bytes (0 once it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Lines of `logs` that report a panic.
pub fn panics(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("panicked at") || l.contains("RUST_BACKTRACE"))
        .map(str::to_string)
        .collect()
}
