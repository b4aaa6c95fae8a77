//! The host's name, as the agent reports it and the backend puts in its
//! certificate's names. A bottom-floor module: it imports nothing from the
//! rest of the crate, so the agent and the backend can both use it.

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
