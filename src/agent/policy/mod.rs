//! The agent's local policy: what a backend may ask of this host's Docker
//! engine, decided before any Docker call. The operator sets it on the
//! agent (flags, environment, or a JSON file); the backend cannot change it.
//!
//! Defaults: every dangerous setting is denied (privileged mode, host
//! network/PID/IPC namespaces, joining another container's network, bind
//! mounts, added capabilities, devices), and every container must carry
//! CPU and memory limits within the per-container and total caps, and a
//! process-count limit within its cap. A refusal names the rule that
//! refused.
//!
//! [`Policy::check`] is pure logic over an [`Ask`]; the host paths of bind
//! mounts in an ask are resolved first ([`real_path`]: every symlink
//! followed, as Docker would) so that the check sees what Docker mounts.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// The operator's policy.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Image patterns that may run: `*` matches any run of characters, e.g.
    /// `registry.corp:5000/loadgen/*`. A pattern ending in `@sha256:<hex>`
    /// pins the image to that digest. Empty: no image may run.
    pub allowed_images: Vec<String>,
    /// Allow `privileged: true`.
    pub allow_privileged: bool,
    /// Allow the host's network namespace (`network: host`).
    pub allow_host_network: bool,
    /// Networks a container may join besides `bridge` and `none` (Docker
    /// network names). Another container's namespace (`container:ID`)
    /// cannot be listed: it is always refused.
    pub allowed_networks: Vec<String>,
    /// Allow the host's PID namespace.
    pub allow_host_pid: bool,
    /// Allow the host's IPC namespace.
    pub allow_host_ipc: bool,
    /// Host path prefixes that may be bind-mounted. Empty: no bind mount.
    pub bind_mount_prefixes: Vec<PathBuf>,
    /// Capabilities that may be added (e.g. `NET_ADMIN`). Empty: none.
    pub allowed_capabilities: Vec<String>,
    /// Host device paths that may be passed through. Empty: none.
    pub allowed_devices: Vec<PathBuf>,
    /// Refuse containers without both a CPU and a memory limit.
    pub require_limits: bool,
    /// Largest CPU limit of one container, in cores.
    pub max_cpus_per_container: f64,
    /// Largest memory limit of one container, in bytes.
    pub max_memory_per_container: u64,
    /// Largest sum of CPU limits over this agent's running containers.
    pub max_cpus_total: f64,
    /// Largest sum of memory limits over this agent's running containers.
    pub max_memory_total: u64,
    /// Largest process-count limit of one container; also the limit of a
    /// container that asks for none, so that no container can fork
    /// without bound.
    pub max_pids_per_container: i64,
}

/// The default [`Policy::max_pids_per_container`]. Threads count as
/// processes, and a thread-per-user load generator (JMeter) runs
/// thousands; a fork bomb still stops there.
pub const DEFAULT_MAX_PIDS_PER_CONTAINER: i64 = 4096;

/// The smallest CPU limit Docker applies (a smaller one is no limit).
pub const MIN_CPUS: f64 = 0.01;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_images: vec!["*".into()],
            allow_privileged: false,
            allow_host_network: false,
            allowed_networks: Vec::new(),
            allow_host_pid: false,
            allow_host_ipc: false,
            bind_mount_prefixes: Vec::new(),
            allowed_capabilities: Vec::new(),
            allowed_devices: Vec::new(),
            require_limits: true,
            max_cpus_per_container: 4.0,
            max_memory_per_container: 8 << 30,
            max_cpus_total: 16.0,
            max_memory_total: 32 << 30,
            max_pids_per_container: DEFAULT_MAX_PIDS_PER_CONTAINER,
        }
    }
}

/// What a container asks for, as far as the policy cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ask {
    pub image: String,
    pub privileged: bool,
    /// `bridge` (default), `host`, `none`, or a network name.
    pub network: String,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// Bind mounts: host path, container path.
    pub binds: Vec<(PathBuf, PathBuf)>,
    pub capabilities: Vec<String>,
    pub devices: Vec<PathBuf>,
    /// CPU limit in cores (0: none).
    pub cpus: f64,
    /// Memory limit in bytes (0: none).
    pub memory: u64,
    /// Process-count limit (0 or less: none asked; the policy's cap applies).
    pub pids_limit: i64,
}

/// What this agent's running containers already hold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub cpus: f64,
    pub memory: u64,
    /// How many containers hold them.
    pub containers: u32,
}

/// A refusal: the rule, and a sentence for the result and the audit log.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("refused by local policy rule {rule}: {message}")]
pub struct Refusal {
    /// The rule's name, stable for tooling: e.g. `image_not_allowed`.
    pub rule: &'static str,
    pub message: String,
}

fn refuse(rule: &'static str, message: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        rule,
        message: message.into(),
    })
}

/// `*`-glob match (no other metacharacters).
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The forms an image reference is known by: as written, and normalised
/// (`busybox` = `docker.io/library/busybox:latest`).
pub fn image_forms(image: &str) -> Vec<String> {
    let mut forms = vec![image.to_string()];
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    let tagged = if last.contains(':') || digest.is_some() {
        name.to_string()
    } else {
        format!("{name}:latest")
    };
    let first = tagged.split('/').next().unwrap_or("");
    let has_registry = tagged.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        tagged
    } else if tagged.contains('/') {
        format!("docker.io/{tagged}")
    } else {
        format!("docker.io/library/{tagged}")
    };
    let full = match digest {
        Some(d) => format!("{full}@{d}"),
        None => full,
    };
    if !forms.contains(&full) {
        forms.push(full);
    }
    forms
}

/// The real path of host path `p`, as Docker would mount it: absolute,
/// every symlink followed. A path that does not exist (or cannot be
/// resolved) is refused, since what it will point to cannot be checked.
pub fn real_path(p: &Path) -> Result<PathBuf, Refusal> {
    let Some(clean) = clean(p) else {
        return Err(Refusal {
            rule: "bind_mount",
            message: format!(
                "bind mount source {:?} is not an absolute path without '..'",
                p.display()
            ),
        });
    };
    std::fs::canonicalize(&clean).map_err(|e| Refusal {
        rule: "bind_mount",
        message: format!(
            "bind mount source {} cannot be resolved on this host ({e}); it must exist",
            clean.display()
        ),
    })
}

/// A container-side mount path: absolute, normalised, not `/`, and with
/// no `:` or `,` that Docker would read as mount options.
fn container_path_ok(p: &Path) -> bool {
    let text = p.to_string_lossy();
    !text.contains([':', ',']) && clean(p).is_some_and(|c| c != Path::new("/"))
}

/// A host path without `..` tricks: absolute, normalised.
fn clean(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

impl Policy {
    /// Every problem with the policy itself, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        for (name, v) in [
            ("max_cpus_per_container", self.max_cpus_per_container),
            ("max_cpus_total", self.max_cpus_total),
        ] {
            if !v.is_finite() || v <= 0.0 {
                errs.push(format!(
                    "policy {name} must be a positive number of cores, not {v}"
                ));
            }
        }
        for p in self.bind_mount_prefixes.iter().chain(&self.allowed_devices) {
            if clean(p).is_none() {
                errs.push(format!(
                    "policy path {} must be absolute, without '..'",
                    p.display()
                ));
            }
        }
        for n in &self.allowed_networks {
            if n.is_empty() || n == "host" || n.contains(':') {
                errs.push(format!(
                    "policy allowed_networks entry {n:?} must be a Docker network's name (use allow_host_network for the host's; another container's namespace cannot be allowed)"
                ));
            }
        }
        if self.max_pids_per_container <= 0 {
            errs.push(format!(
                "policy max_pids_per_container must be a positive number of processes, not {}",
                self.max_pids_per_container
            ));
        }
        if self.bind_mount_prefixes.iter().any(|p| p == Path::new("/")) {
            errs.push("policy bind_mount_prefixes contains '/': that allows mounting the whole host; list narrower paths".into());
        }
        errs
    }

    /// This policy with the bind mount prefixes that exist resolved to
    /// their real paths, as [`real_path`] resolves the sources asked for
    /// (a prefix through a symlink, e.g. `/var/run`, still matches).
    pub fn with_real_prefixes(mut self) -> Self {
        for p in &mut self.bind_mount_prefixes {
            if let Some(real) = clean(p).and_then(|c| std::fs::canonicalize(c).ok()) {
                *p = real;
            }
        }
        self
    }

    /// The process-count limit a container gets: what it asked for, or
    /// the policy's cap when it asked for none.
    pub fn pids_limit(&self, asked: i64) -> i64 {
        if asked > 0 {
            asked
        } else {
            self.max_pids_per_container
        }
    }

    /// Decides whether `image` may be pulled or run.
    pub fn check_image(&self, image: &str) -> Result<(), Refusal> {
        let forms = image_forms(image);
        let allowed =
            self.allowed_images
                .iter()
                .any(|pattern| match pattern.split_once("@sha256:") {
                    Some((name, digest)) => {
                        image.ends_with(&format!("@sha256:{digest}"))
                            && forms.iter().any(|f| {
                                glob(&format!("{name}@sha256:{digest}"), f)
                                    || glob(name, f.split('@').next().unwrap_or(f))
                            })
                    }
                    None => forms.iter().any(|f| glob(pattern, f)),
                });
        if !allowed {
            return refuse(
                "image_not_allowed",
                format!(
                    "image {image:?} matches none of the allowed patterns {:?}",
                    self.allowed_images
                ),
            );
        }
        Ok(())
    }

    /// Decides whether the network `network` may be joined.
    fn check_network(&self, network: &str) -> Result<(), Refusal> {
        match network {
            "bridge" | "none" => Ok(()),
            "host" if self.allow_host_network => Ok(()),
            "host" => refuse(
                "host_network",
                "the host's network namespace is not allowed on this host",
            ),
            n if n.starts_with("container:") => refuse(
                "network",
                format!("joining another container's network namespace ({n:?}) is not allowed"),
            ),
            n if self.allowed_networks.iter().any(|a| a == n) => Ok(()),
            n => refuse(
                "network",
                format!(
                    "network {n:?} is not allowed on this host (allowed: bridge, none, {:?})",
                    self.allowed_networks
                ),
            ),
        }
    }

    /// Decides whether `ask` may run, given what already runs. Bind mount
    /// sources are taken as they are: resolve them first ([`real_path`]).
    pub fn check(&self, ask: &Ask, running: Usage) -> Result<(), Refusal> {
        self.check_image(&ask.image)?;
        if ask.privileged && !self.allow_privileged {
            return refuse("privileged", "privileged mode is not allowed on this host");
        }
        self.check_network(&ask.network)?;
        if ask.host_pid && !self.allow_host_pid {
            return refuse(
                "host_pid",
                "the host's PID namespace is not allowed on this host",
            );
        }
        if ask.host_ipc && !self.allow_host_ipc {
            return refuse(
                "host_ipc",
                "the host's IPC namespace is not allowed on this host",
            );
        }
        for (host, container) in &ask.binds {
            if !container_path_ok(container) || host.to_string_lossy().contains([':', ',']) {
                return refuse(
                    "bind_mount",
                    format!(
                        "bind mount {:?} -> {:?}: both paths must be absolute, without '..', ':' or ',', and the container path not '/'",
                        host.display(),
                        container.display()
                    ),
                );
            }
            let Some(h) = clean(host) else {
                return refuse(
                    "bind_mount",
                    format!(
                        "bind mount source {:?} is not an absolute path without '..'",
                        host.display()
                    ),
                );
            };
            if !self
                .bind_mount_prefixes
                .iter()
                .filter_map(|p| clean(p))
                .any(|p| h.starts_with(&p))
            {
                return refuse(
                    "bind_mount",
                    format!(
                        "bind mount of {} is not allowed (allowed prefixes: {:?})",
                        h.display(),
                        self.bind_mount_prefixes
                    ),
                );
            }
        }
        for cap in &ask.capabilities {
            let c = cap.trim_start_matches("CAP_").to_ascii_uppercase();
            if !self
                .allowed_capabilities
                .iter()
                .any(|a| a.trim_start_matches("CAP_").eq_ignore_ascii_case(&c))
            {
                return refuse(
                    "capability",
                    format!("adding capability {cap} is not allowed on this host"),
                );
            }
        }
        for dev in &ask.devices {
            let ok = clean(dev).is_some_and(|d| {
                self.allowed_devices
                    .iter()
                    .filter_map(|p| clean(p))
                    .any(|p| d == p)
            });
            if !ok {
                return refuse(
                    "device",
                    format!("device {} is not allowed on this host", dev.display()),
                );
            }
        }
        if !ask.cpus.is_finite() || ask.cpus < 0.0 || (ask.cpus > 0.0 && ask.cpus < MIN_CPUS) {
            return refuse(
                "cpus",
                format!(
                    "cpus {} is not a CPU limit: use 0 for none or at least {MIN_CPUS} cores",
                    ask.cpus
                ),
            );
        }
        if ask.pids_limit > self.max_pids_per_container {
            return refuse(
                "pids_per_container",
                format!(
                    "a limit of {} processes asked; at most {} per container",
                    ask.pids_limit, self.max_pids_per_container
                ),
            );
        }
        if self.require_limits && (ask.cpus <= 0.0 || ask.memory == 0) {
            return refuse(
                "limits_required",
                "this host requires a CPU limit and a memory limit on every container (set cpus and memory)",
            );
        }
        if ask.cpus > self.max_cpus_per_container {
            return refuse(
                "cpu_per_container",
                format!(
                    "{} cores asked; at most {} per container",
                    ask.cpus, self.max_cpus_per_container
                ),
            );
        }
        if ask.memory > self.max_memory_per_container {
            return refuse(
                "memory_per_container",
                format!(
                    "{} bytes asked; at most {} per container",
                    ask.memory, self.max_memory_per_container
                ),
            );
        }
        if running.cpus + ask.cpus > self.max_cpus_total {
            return refuse(
                "cpu_total",
                format!(
                    "{} cores asked with {} already in use; at most {} in total",
                    ask.cpus, running.cpus, self.max_cpus_total
                ),
            );
        }
        if running.memory.saturating_add(ask.memory) > self.max_memory_total {
            return refuse(
                "memory_total",
                format!(
                    "{} bytes asked with {} already in use; at most {} in total",
                    ask.memory, running.memory, self.max_memory_total
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
