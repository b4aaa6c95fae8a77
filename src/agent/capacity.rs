//! What this agent can take: the host's CPUs and memory (from the Docker
//! engine, which runs the containers; from the local system when the
//! engine is unavailable), the engine's availability, the limits its
//! containers hold now, and the local policy's caps. Sent to the backend as
//! a `Capacity` event when the agent connects and whenever a figure
//! changes; the backend places containers within it.

use super::executor::Executor;
use super::policy::Policy;
use crate::proto;

/// The host's logical CPUs and physical memory, as this process sees them.
fn local_host() -> (u32, u64) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory = sysinfo::System::new_with_specifics(
        sysinfo::RefreshKind::nothing()
            .with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram()),
    )
    .map(|s| s.total_memory())
    .unwrap_or(0);
    (cores, memory)
}

/// Measures the capacity now. Asks the engine (a ping, `info`, and a
/// listing of this agent's containers); never fails: an engine that does
/// not answer is reported as unavailable with its reason.
pub async fn measure(executor: &Executor, policy: &Policy) -> proto::Capacity {
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
            let (cores, memory) = local_host();
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
            let (cores, memory) = local_host();
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
        let (cores, memory) = local_host();
        assert!(cores >= 1);
        assert!(memory > 64 << 20, "memory {memory}");
    }
}
