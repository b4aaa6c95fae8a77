//! What this agent can take: the host's CPUs and memory (from the Docker
//! engine, which runs the containers; from the local system when the
//! engine is unavailable, and then from the host's `/proc` when the agent
//! runs in a container), the engine's availability, the limits its
//! containers hold now, and the local policy's caps. Sent to the backend as
//! a `Capacity` event when the agent connects and whenever a figure
//! changes; the backend places containers within it.

use std::path::Path;

use super::executor::Executor;
use super::policy::Policy;
use crate::proto;

/// The host's logical CPUs and physical memory. On the host itself, the
/// CPUs this process may use; in a container (`host_root`), those the
/// host's `/proc/stat` lists, since the container's CPU quota or set is not
/// the host's. Memory is `/proc/meminfo`'s total, the host's either way
/// (no container runtime scopes it).
fn local_host(host_root: Option<&Path>) -> (u32, u64) {
    let cores = host_root
        .and_then(|root| std::fs::read_to_string(root.join("proc/stat")).ok())
        .map(|stat| cpus_in_stat(&stat))
        .filter(|n| *n > 0)
        .or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .ok()
        })
        .unwrap_or(1);
    let memory = sysinfo::System::new_with_specifics(
        sysinfo::RefreshKind::nothing()
            .with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram()),
    )
    .map(|s| s.total_memory())
    .unwrap_or(0);
    (cores, memory)
}

/// The CPUs a `/proc/stat` lists: its `cpuN` lines.
fn cpus_in_stat(stat: &str) -> u32 {
    let per_cpu = |l: &&str| {
        l.strip_prefix("cpu")
            .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
    };
    stat.lines().filter(per_cpu).count() as u32
}

/// Measures the capacity now. Asks the engine (a ping, `info`, and a
/// listing of this agent's containers); never fails: an engine that does
/// not answer is reported as unavailable with its reason. `host_root` is
/// `--host-root`.
pub async fn measure(
    executor: &Executor,
    policy: &Policy,
    host_root: Option<&Path>,
) -> proto::Capacity {
    let mut c = proto::Capacity {
        max_cpus_total: policy.max_cpus_total,
        max_memory_total: policy.max_memory_total,
        max_cpus_per_container: policy.max_cpus_per_container,
        max_memory_per_container: policy.max_memory_per_container,
        limits_required: policy.require_limits,
        ..Default::default()
    };
    let engine = match executor.live_engine().await {
        Ok(e) => e,
        Err(f) => {
            let (cores, memory) = local_host(host_root);
            c.cpu_cores = cores;
            c.memory_bytes = memory;
            c.docker_status = f.message;
            return c;
        }
    };
    match (engine.host().await, engine.usage().await) {
        (Ok((cores, memory, version)), Ok(usage)) => {
            c.cpu_cores = cores;
            c.memory_bytes = memory;
            c.docker_available = true;
            c.docker_status = format!("docker {version}");
            c.running_containers = usage.containers;
            c.cpus_in_use = usage.cpus;
            c.memory_in_use = usage.memory;
        }
        (Err(f), _) | (_, Err(f)) => {
            let (cores, memory) = local_host(host_root);
            c.cpu_cores = cores;
            c.memory_bytes = memory;
            c.docker_status = if f.message.starts_with("docker: unavailable") {
                f.message
            } else {
                format!("docker: unavailable ({})", f.message)
            };
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_host_has_cores_and_memory() {
        let (cores, memory) = local_host(None);
        assert!(cores >= 1);
        assert!(memory > 64 << 20, "memory {memory}");
        // Through a host root, every CPU the host's /proc/stat lists.
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        assert_eq!(local_host(Some(Path::new("/"))).0, cpus_in_stat(&stat));
    }

    #[test]
    fn cpus_are_the_numbered_cpu_lines() {
        let stat = "cpu  10 0 5 100\ncpu0 5 0 2 50\ncpu1 5 0 3 50\nintr 1 2\nctxt 9\ncpufreq 1\n";
        assert_eq!(cpus_in_stat(stat), 2);
    }
}
