//! The agent's event epoch (`ReportRequest.epoch`), kept in
//! `STATE_DIR/events-epoch` so that it increases across restarts.
//!
//! An epoch is `ORDERED_EPOCHS + n` where `n` is the larger of the clock in
//! Unix ms and the last `n` plus one. The new value is written (synced,
//! renamed) before it is used, so a restart never reuses an epoch: not
//! after a clock step backwards (the file carries it on), nor after a lost
//! file (the clock does, unless both happen at once).

use std::io::Write;
use std::path::Path;

use crate::proto::ORDERED_EPOCHS;

/// The epoch file's name in the state dir.
const FILE: &str = "events-epoch";

/// Takes the next epoch and records it in `state_dir` before returning it.
/// `now_ms` is the clock in Unix ms. An unreadable file counts as absent;
/// a write that fails is an error (the epoch cannot be made safe).
pub fn next(state_dir: &Path, now_ms: i64) -> std::io::Result<u64> {
    let path = state_dir.join(FILE);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&e| e >= ORDERED_EPOCHS)
        .map(|e| e - ORDERED_EPOCHS);
    let clock = u64::try_from(now_ms).unwrap_or(0);
    let n = match last {
        Some(l) => clock.max(l.saturating_add(1)),
        None => clock.max(1),
    }
    .min(u64::MAX - ORDERED_EPOCHS);
    let epoch = ORDERED_EPOCHS + n;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        // Owner-only, as everything in the state dir.
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(format!("{epoch}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase_across_starts_even_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = next(dir.path(), 1_000).unwrap();
        assert_eq!(a, ORDERED_EPOCHS + 1_000);
        // The same millisecond, and a clock stepped back an hour.
        let b = next(dir.path(), 1_000).unwrap();
        let c = next(dir.path(), 1_000 - 3_600_000).unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        // The clock moving on is followed.
        assert_eq!(
            next(dir.path(), 5_000_000).unwrap(),
            ORDERED_EPOCHS + 5_000_000
        );
        // A lost or damaged file falls back to the clock.
        std::fs::write(dir.path().join(FILE), "junk").unwrap();
        assert_eq!(
            next(dir.path(), 6_000_000).unwrap(),
            ORDERED_EPOCHS + 6_000_000
        );
    }
}
