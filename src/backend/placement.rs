//! Placement of a run's containers across a provider's agents: pure logic,
//! no I/O.
//!
//! An agent can take a container when it is connected, its Docker engine
//! is available, the container's limits are within its policy's
//! per-container caps, and the limits it already holds plus the
//! container's stay within its CPU and memory (the smaller of the host's
//! figure and the policy's total cap). Containers go one at a time to the
//! least loaded agent that can take one: fewest containers, then the
//! smallest share of its CPUs in use, then the agent id, so that equal
//! agents get equal shares. All or nothing: when some container finds no
//! agent, nothing is placed and the shortfall says why, agent by agent.

use crate::proto;
use crate::units::human_bytes;

/// Slack for sums of fractional CPU limits.
const CPU_EPSILON: f64 = 1e-9;

/// An agent as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub agent_id: String,
    pub connected: bool,
    /// Its last capacity report (None: never reported).
    pub capacity: Option<proto::Capacity>,
    /// Containers placed on it that its last report does not count yet.
    pub unreported_containers: u32,
    pub unreported_cpus: f64,
    pub unreported_memory: u64,
}

/// What each container of a run holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    pub count: u32,
    pub cpus: f64,
    pub memory: u64,
}

/// Why a run does not fit.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the provider can take {placed} of {count} containers of {cpus} cores and {memory} each: {}", reasons.join("; "))]
pub struct Shortfall {
    pub placed: u32,
    pub count: u32,
    pub cpus: f64,
    pub memory: String,
    /// One sentence per agent (or about the provider as a whole).
    pub reasons: Vec<String>,
}

#[derive(Clone)]
struct Slot {
    containers: u32,
    cpus: f64,
    memory: u64,
    cpu_limit: f64,
    memory_limit: u64,
}

/// Places `demand.count` containers; returns the index into `candidates`
/// of each container's agent, in container order.
pub fn place(candidates: &[Candidate], demand: Demand) -> Result<Vec<usize>, Shortfall> {
    let mut reasons = Vec::new();
    let mut slots: Vec<Option<Slot>> = Vec::with_capacity(candidates.len());
    for c in candidates {
        let slot = match (&c.capacity, c.connected) {
            (_, false) => {
                reasons.push(format!("{} is not connected", c.agent_id));
                None
            }
            (None, true) => {
                reasons.push(format!("{} has not reported its capacity yet", c.agent_id));
                None
            }
            (Some(cap), true) if !cap.docker_available => {
                reasons.push(format!("{}: {}", c.agent_id, cap.docker_status));
                None
            }
            (Some(cap), true) if demand.cpus > cap.max_cpus_per_container + CPU_EPSILON => {
                reasons.push(format!(
                    "{}: its policy allows at most {} cores per container",
                    c.agent_id, cap.max_cpus_per_container
                ));
                None
            }
            (Some(cap), true) if demand.memory > cap.max_memory_per_container => {
                reasons.push(format!(
                    "{}: its policy allows at most {} per container",
                    c.agent_id,
                    human_bytes(cap.max_memory_per_container)
                ));
                None
            }
            (Some(cap), true) => Some(Slot {
                containers: cap.running_containers + c.unreported_containers,
                cpus: cap.cpus_in_use + c.unreported_cpus,
                memory: cap.memory_in_use.saturating_add(c.unreported_memory),
                cpu_limit: (cap.cpu_cores as f64).min(cap.max_cpus_total),
                memory_limit: cap.memory_bytes.min(cap.max_memory_total),
            }),
        };
        slots.push(slot);
    }
    let before = slots.clone();
    let fits = |s: &Slot| {
        s.cpus + demand.cpus <= s.cpu_limit + CPU_EPSILON
            && s.memory.saturating_add(demand.memory) <= s.memory_limit
    };
    let mut placed = Vec::with_capacity(demand.count as usize);
    for _ in 0..demand.count {
        let best = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| fits(s)).map(|s| (i, s)))
            .min_by(|(i, a), (j, b)| {
                a.containers
                    .cmp(&b.containers)
                    .then((a.cpus / a.cpu_limit).total_cmp(&(b.cpus / b.cpu_limit)))
                    .then(candidates[*i].agent_id.cmp(&candidates[*j].agent_id))
            })
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        if let Some(s) = slots[i].as_mut() {
            s.containers += 1;
            s.cpus += demand.cpus;
            s.memory = s.memory.saturating_add(demand.memory);
        }
        placed.push(i);
    }
    if placed.len() == demand.count as usize {
        return Ok(placed);
    }
    if candidates.is_empty() {
        reasons.push("it has no agents; enroll one with the provider's host command".into());
    }
    for (c, s) in candidates.iter().zip(&before) {
        if let Some(s) = s {
            reasons.push(format!(
                "{} holds {:.2} of {} cores and {} of {}",
                c.agent_id,
                s.cpus,
                s.cpu_limit,
                human_bytes(s.memory),
                human_bytes(s.memory_limit)
            ));
        }
    }
    Err(Shortfall {
        placed: placed.len() as u32,
        count: demand.count,
        cpus: demand.cpus,
        memory: human_bytes(demand.memory),
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, cores: u32, running: u32) -> Candidate {
        Candidate {
            agent_id: id.into(),
            connected: true,
            capacity: Some(proto::Capacity {
                cpu_cores: cores,
                memory_bytes: 8 << 30,
                docker_available: true,
                docker_status: "docker 27".into(),
                running_containers: running,
                cpus_in_use: running as f64 * 0.5,
                memory_in_use: running as u64 * (256 << 20),
                max_cpus_total: 16.0,
                max_memory_total: 32 << 30,
                max_cpus_per_container: 4.0,
                max_memory_per_container: 8 << 30,
                limits_required: true,
            }),
            unreported_containers: 0,
            unreported_cpus: 0.0,
            unreported_memory: 0,
        }
    }

    fn demand(count: u32, cpus: f64) -> Demand {
        Demand {
            count,
            cpus,
            memory: 256 << 20,
        }
    }

    fn per_agent(placed: &[usize], n: usize) -> Vec<usize> {
        let mut v = vec![0; n];
        for &i in placed {
            v[i] += 1;
        }
        v
    }

    #[test]
    fn equal_agents_get_equal_shares() {
        let a = [agent("a", 2, 0), agent("b", 2, 0), agent("c", 2, 0)];
        let p = place(&a, demand(6, 0.25)).unwrap();
        assert_eq!(per_agent(&p, 3), vec![2, 2, 2]);
    }

    #[test]
    fn the_least_loaded_agent_goes_first() {
        let a = [agent("a", 8, 3), agent("b", 8, 0), agent("c", 8, 1)];
        let p = place(&a, demand(4, 0.5)).unwrap();
        // b (0 containers) first, then b and c alternate as they tie,
        // b first by id; a (3) is never the least loaded.
        assert_eq!(p, vec![1, 1, 2, 1]);
        assert_eq!(per_agent(&p, 3), vec![0, 3, 1]);
    }

    #[test]
    fn never_beyond_capacity_and_all_or_nothing() {
        // 2 cores each with 1 core in use: room for 2 containers of 0.5 each.
        let a = [agent("a", 2, 2), agent("b", 2, 2)];
        assert_eq!(
            per_agent(&place(&a, demand(4, 0.5)).unwrap(), 2),
            vec![2, 2]
        );
        let e = place(&a, demand(5, 0.5)).unwrap_err();
        assert_eq!((e.placed, e.count), (4, 5));
        assert!(e.to_string().contains("can take 4 of 5"), "{e}");
        assert!(e.to_string().contains("a holds 1.00 of 2 cores"), "{e}");
    }

    #[test]
    fn unreported_placements_count_as_load() {
        let mut a = [agent("a", 2, 0), agent("b", 2, 0)];
        // a is full with containers its last report does not show yet.
        a[0].unreported_containers = 4;
        a[0].unreported_cpus = 2.0;
        let p = place(&a, demand(3, 0.5)).unwrap();
        assert_eq!(per_agent(&p, 2), vec![0, 3]);
        assert_eq!(place(&a, demand(5, 0.5)).unwrap_err().placed, 4);
    }

    #[test]
    fn policy_caps_and_memory_bound_the_placement() {
        let mut a = [agent("a", 64, 0)];
        if let Some(c) = a[0].capacity.as_mut() {
            c.max_cpus_total = 1.0;
        }
        assert_eq!(place(&a, demand(2, 0.5)).unwrap().len(), 2);
        assert!(place(&a, demand(3, 0.5)).is_err());
        let e = place(&a, demand(1, 8.0)).unwrap_err();
        assert!(
            e.to_string().contains("at most 4 cores per container"),
            "{e}"
        );
        let mut m = [agent("m", 64, 0)];
        if let Some(c) = m[0].capacity.as_mut() {
            c.memory_bytes = 1 << 30;
        }
        assert_eq!(place(&m, demand(4, 0.1)).unwrap().len(), 4);
        assert!(place(&m, demand(5, 0.1)).is_err());
    }

    #[test]
    fn agents_that_cannot_run_containers_are_named() {
        let mut off = agent("off", 4, 0);
        off.connected = false;
        let mut silent = agent("silent", 4, 0);
        silent.capacity = None;
        let mut nodocker = agent("nodocker", 4, 0);
        if let Some(c) = nodocker.capacity.as_mut() {
            c.docker_available = false;
            c.docker_status = "docker: unavailable (socket not found)".into();
        }
        let e = place(&[off, silent, nodocker], demand(1, 0.5)).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("off is not connected"), "{s}");
        assert!(s.contains("silent has not reported its capacity"), "{s}");
        assert!(
            s.contains("nodocker: docker: unavailable (socket not found)"),
            "{s}"
        );
        let e = place(&[], demand(1, 0.5)).unwrap_err();
        assert!(e.to_string().contains("no agents"), "{e}");
    }

    #[test]
    fn bytes_read_as_operators_write_them() {
        // Two agents with 8 GiB: a's policy allows 4 GiB per container, b
        // holds 512 MiB. Two 6 GiB containers: b takes one, nothing takes
        // the second; the refusal speaks in sizes an operator can read (and
        // type back as flags), never in raw byte counts.
        let mut a = [agent("a", 8, 0), agent("b", 8, 2)];
        if let Some(c) = a[0].capacity.as_mut() {
            c.max_memory_per_container = 4 << 30;
        }
        let mut d = demand(2, 0.5);
        d.memory = 6 << 30;
        let e = place(&a, d).unwrap_err();
        assert_eq!(e.placed, 1);
        assert_eq!(e.memory, "6.00 GiB");
        let text = e.to_string();
        assert!(
            text.contains("a: its policy allows at most 4.00 GiB per container"),
            "{text}"
        );
        assert!(
            text.contains("b holds 1.00 of 8 cores and 512 MiB of 8.00 GiB"),
            "{text}"
        );
        assert!(!text.contains(&(6u64 << 30).to_string()), "{text}");
        assert_eq!(crate::units::parse_bytes(&e.memory), Ok(6 << 30));
    }
}
