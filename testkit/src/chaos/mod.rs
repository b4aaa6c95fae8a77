//! The seeded chaos soak's parts: the seed and length from the
//! environment, the backend and agents as processes that can be killed
//! with SIGKILL and started again on the same data, a Docker engine that
//! can be made unreachable ([`docker_relay`]), a state directory on a
//! small tmpfs that can be filled, a Graphite stream whose every sample
//! is numbered ([`stream`]), and what the processes left behind (panics,
//! peak memory).
//!
//! `tests/chaos.rs` drives them. Everything started here is stopped when
//! dropped, on success and on failure alike.

pub mod docker_relay;
pub mod procs;
pub mod stream;

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// A tmpfs of a fixed size mounted on a directory, unmounted when
/// dropped; [`Tmpfs::fill`] takes every free byte, [`Tmpfs::free`] gives
/// them back.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
    filler: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on `path` (created), or says why not
    /// (no permission to mount in this environment).
    pub fn mount(path: &Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
            filler: path.join("chaos-filler"),
        })
    }

    /// Writes a file until the filesystem is full.
    pub fn fill(&self) {
        use std::io::Write as _;
        let Ok(mut f) = std::fs::File::create(&self.filler) else {
            return;
        };
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
    }

    /// Removes what [`Tmpfs::fill`] wrote.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
