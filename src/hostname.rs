//! The host's name, as the agent reports it and the backend puts in its
//! certificate's names. A bottom-floor module: it imports nothing from the
//! rest of the crate, so the agent and the backend can both use it.

use std::path::Path;

/// The host's name: `$HOSTNAME`, else the kernel's.
pub fn default_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The name in `<root>/etc/hostname`, the host's configured name when
/// `root` is the host's `/` as mounted in a container (`--host-root`):
/// inside, `$HOSTNAME` and the kernel's name are the container's (its id,
/// unless it shares the host's network). The first line that is not a
/// comment, trimmed; None when the file is missing or holds no name.
pub fn hostname_under(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("etc/hostname")).ok()?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_under_a_root_is_its_etc_hostname() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(hostname_under(root.path()), None);
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let file = root.path().join("etc/hostname");
        std::fs::write(&file, "# set by the installer\n\n  gen-7.lab \n").unwrap();
        assert_eq!(hostname_under(root.path()).as_deref(), Some("gen-7.lab"));
        std::fs::write(&file, "\n# nothing\n").unwrap();
        assert_eq!(hostname_under(root.path()), None);
    }
}
