//! Owner-only directories: the backend's data dir (the store and its WAL
//! hold token hashes and queued commands' secrets; the CA key signs the
//! server's certificates) and the agent's state dir (its credential, its
//! journal, its spool) are 0700, and every file in them 0600.
//! [`secure`] creates such a directory and fixes the modes of what is
//! there at start (a dir made by an older build, or copied in by hand);
//! [`create_private`] creates a file owner-only from its first byte;
//! [`replace_private`] rewrites one atomically. A bottom floor: it
//! imports nothing from the crate.

use std::path::Path;

/// Mode of an owner-only directory and of every directory in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in an owner-only directory.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (owner-only) when missing, then makes it and everything
/// in it owner-only, logging each mode it changes. Symbolic links are left
/// as they are and not followed. A shared directory (sticky bit, as
/// `/tmp`) is refused rather than closed to its other users.
pub fn secure(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(dir)?.permissions().mode() & 0o1000 != 0 {
            return Err(std::io::Error::other(
                "a shared directory (sticky bit set, like /tmp); give a directory of its own, \
                 which is made owner-only",
            ));
        }
    }
    fix_modes(dir)
}

#[cfg(unix)]
fn fix_modes(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    let want = if meta.is_dir() {
        DIR_MODE
    } else if meta.is_file() {
        FILE_MODE
    } else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
        tracing::warn!(path = %path.display(), from = format!("{mode:o}"), to = format!("{want:o}"),
            "readable by others; made owner-only");
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            match fix_modes(&entry?.path()) {
                // Gone while the walk went on (a temporary file renamed
                // over its target by a process sharing the directory):
                // nothing left to fix.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r?,
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn fix_modes(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Creates `path` owner-only when missing (SQLite gives its `-wal` and
/// `-shm` files the mode of the database file, so creating the database
/// this way first keeps them owner-only too). An existing file is left as
/// it is.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    opts.open(path).map(drop)
}

/// Replaces `path` with `bytes`, owner-only, atomically: the bytes go to
/// `<path>.tmp` (created owner-only, or made so), which is then renamed
/// over `path`, so a reader sees the old content or the new, never a
/// part. Nothing is synced: for files rewritten every few seconds whose
/// loss in a power cut costs nothing (the health status file).
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE);
    }
    let mut f = opts.open(&tmp)?;
    #[cfg(unix)]
    {
        // A temporary file left by someone else keeps its mode on open.
        use std::os::unix::fs::PermissionsExt;
        if f.metadata()?.permissions().mode() & 0o7777 != FILE_MODE {
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        }
    }
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_existing_open_data_dir_is_made_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("uplink.db"), b"x").unwrap();
        std::fs::write(dir.join("sub/f"), b"x").unwrap();
        for p in [&dir, &dir.join("sub")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [dir.join("uplink.db"), dir.join("sub/f")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        secure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert_eq!(mode(&dir.join("uplink.db")), 0o600);
        assert_eq!(mode(&dir.join("sub/f")), 0o600);
    }

    #[test]
    fn a_replaced_file_is_owner_only_and_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("health-agent.json");
        std::fs::write(tmp.path().join("health-agent.json.tmp"), b"left over").unwrap();
        std::fs::set_permissions(
            tmp.path().join("health-agent.json.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        replace_private(&p, b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}");
        assert_eq!(mode(&p), 0o600);
        replace_private(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        assert!(!tmp.path().join("health-agent.json.tmp").exists());
    }

    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = secure(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("directory of its own"), "{e}");
        assert_eq!(mode(tmp.path()), 0o1777);
    }
}
