//! What `uplink ctl` prints: the tables of agents, providers and runs,
//! their JSON forms, and the names and times in them. Pure functions of the
//! admin service's views, so the output is tested without a backend.

use std::fmt::Write as _;

use crate::proto;
use crate::text::escape;
use crate::units::{human_bytes, rfc3339};

/// A run's state in `ctl` output.
pub fn run_state_name(s: i32) -> &'static str {
    match proto::RunState::try_from(s).unwrap_or_default() {
        proto::RunState::Starting => "starting",
        proto::RunState::Running => "running",
        proto::RunState::Finished => "finished",
        proto::RunState::Stopping => "stopping",
        proto::RunState::Stopped => "stopped",
        proto::RunState::Unspecified => "",
    }
}

/// A run container's state in `ctl` output.
pub fn container_state_name(s: i32) -> &'static str {
    match proto::RunContainerState::try_from(s).unwrap_or_default() {
        proto::RunContainerState::Pending => "pending",
        proto::RunContainerState::Running => "running",
        proto::RunContainerState::Exited => "exited",
        proto::RunContainerState::Failed => "failed",
        proto::RunContainerState::Stopping => "stopping",
        proto::RunContainerState::Removed => "removed",
        proto::RunContainerState::Unspecified => "",
    }
}

/// How many containers of a run are in each state, e.g. "2 running, 1 failed".
pub fn run_counts(v: &proto::RunView) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for c in &v.containers {
        let name = container_state_name(c.state);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => *k += 1,
            None => counts.push((name, 1)),
        }
    }
    counts
        .iter()
        .map(|(n, k)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A run as JSON.
pub fn run_json(v: &proto::RunView) -> serde_json::Value {
    serde_json::json!({
        "id": v.id,
        "name": v.name,
        "provider": v.provider,
        "image": v.image,
        "count": v.count,
        "state": run_state_name(v.state),
        "created": rfc3339(v.created_unix_ms),
        "created_unix_ms": v.created_unix_ms,
        "stop_unix_ms": v.stop_unix_ms,
        "cpus": v.cpus,
        "memory_bytes": v.memory_bytes,
        "containers": v.containers.iter().map(|c| serde_json::json!({
            "index": c.index,
            "name": c.name,
            "agent_id": c.agent_id,
            "container_id": c.container_id,
            "state": container_state_name(c.state),
            "exit_code": c.exit_code,
            "oom_killed": c.oom_killed,
            "message": c.message,
            "started_unix_ms": c.started_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

/// `ctl runs`: a table.
pub fn runs_table(runs: &[proto::RunView]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:<12} {:<9} {:<21} {:<30} {}\n",
        "ID", "NAME", "PROVIDER", "STATE", "CREATED", "IMAGE", "CONTAINERS"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<12} {:<9} {:<21} {:<30} {}",
            escape(&r.id),
            escape(&r.name),
            escape(&r.provider),
            run_state_name(r.state),
            rfc3339(r.created_unix_ms),
            escape(&r.image),
            run_counts(r)
        );
    }
    out
}

/// `ctl run-status`: the run, then a line per container.
pub fn run_table(r: &proto::RunView) -> String {
    let mut out = format!(
        "run {} ({}) on {}: {}, {} x {} ({} cores, {} each)\n",
        escape(&r.id),
        escape(&r.name),
        escape(&r.provider),
        run_state_name(r.state),
        r.count,
        escape(&r.image),
        r.cpus,
        human_bytes(r.memory_bytes)
    );
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<22} {:<9} {:<6} {:<14} MESSAGE",
        "INDEX", "NAME", "AGENT", "STATE", "EXIT", "CONTAINER"
    );
    for c in &r.containers {
        let exit = match proto::RunContainerState::try_from(c.state).unwrap_or_default() {
            proto::RunContainerState::Exited if c.oom_killed => format!("{} oom", c.exit_code),
            proto::RunContainerState::Exited => c.exit_code.to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<9} {:<6} {:<14} {}",
            c.index,
            escape(&c.name),
            escape(&c.agent_id),
            container_state_name(c.state),
            exit,
            escape(&c.container_id.chars().take(12).collect::<String>()),
            escape(&c.message)
        );
    }
    out
}

/// The name of a transport in `ctl` output.
pub fn transport_name(t: i32) -> &'static str {
    match proto::Transport::try_from(t).unwrap_or(proto::Transport::Unspecified) {
        proto::Transport::Grpc => "grpc",
        proto::Transport::Longpoll => "longpoll",
        proto::Transport::Unspecified => "",
    }
}

/// `ctl agents --json`: an array of objects.
pub fn agents_json(agents: &[proto::AgentView]) -> String {
    let arr: Vec<serde_json::Value> = agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "hostname": a.hostname,
                "provider": a.provider,
                "connected": a.connected,
                "transport": transport_name(a.transport),
                "transport_reason": a.transport_reason,
                "last_seen": rfc3339(a.last_seen_unix_ms),
                "last_seen_unix_ms": a.last_seen_unix_ms,
                "version": a.version,
                "acked_seq": a.acked_seq,
                "pending_commands": a.pending_commands,
                "revoked": rfc3339(a.revoked_unix_ms),
                "revoked_unix_ms": a.revoked_unix_ms,
                "replica": a.replica,
                "capacity": a.capacity.as_ref().map(|c| serde_json::json!({
                    "cpu_cores": c.cpu_cores,
                    "memory_bytes": c.memory_bytes,
                    "docker_available": c.docker_available,
                    "docker_status": c.docker_status,
                    "running_containers": c.running_containers,
                    "cpus_in_use": c.cpus_in_use,
                    "memory_in_use": c.memory_in_use,
                    "max_cpus_total": c.max_cpus_total,
                    "max_memory_total": c.max_memory_total,
                })),
            })
        })
        .collect();
    serde_json::to_string_pretty(&arr).unwrap_or_else(|_| "[]".into())
}

/// `ctl agents`: a table.
pub fn agents_table(agents: &[proto::AgentView]) -> String {
    let mut out = format!(
        "{:<22} {:<20} {:<12} {:<9} {:<9} {:<21} {:<8} {:<7} {:<10} {}\n",
        "ID",
        "HOSTNAME",
        "PROVIDER",
        "CONNECTED",
        "TRANSPORT",
        "LAST SEEN",
        "VERSION",
        "PENDING",
        "CONTAINERS",
        "DOCKER"
    );
    for a in agents {
        let (containers, docker) = match &a.capacity {
            Some(c) if c.docker_available => {
                (c.running_containers.to_string(), c.docker_status.clone())
            }
            Some(c) => (String::new(), c.docker_status.clone()),
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            out,
            "{:<22} {:<20} {:<12} {:<9} {:<9} {:<21} {:<8} {:<7} {:<10} {}",
            escape(&a.id),
            escape(&a.hostname),
            escape(&a.provider),
            match (a.revoked_unix_ms, a.connected) {
                (r, _) if r > 0 => "revoked",
                (_, true) => "yes",
                _ => "no",
            },
            transport_name(a.transport),
            rfc3339(a.last_seen_unix_ms),
            escape(&a.version),
            a.pending_commands,
            containers,
            escape(&docker)
        );
    }
    out
}

/// `ctl providers`: a table. TOKEN USE is what the current enrollment
/// token enrolled, out of its cap; TOKEN EXPIRES is empty for a token that
/// does not expire.
pub fn providers_table(providers: &[proto::ProviderView]) -> String {
    let mut out = format!(
        "{:<20} {:<21} {:<7} {:<10} TOKEN EXPIRES\n",
        "NAME", "CREATED", "AGENTS", "TOKEN USE"
    );
    let now = crate::now_unix_ms();
    for p in providers {
        let used = match p.max_agents {
            0 => format!("{}", p.token_enrolled),
            max => format!("{}/{max}", p.token_enrolled),
        };
        let expires = match p.token_expires_unix_ms {
            0 => String::new(),
            t if t <= now => format!("{} (expired)", rfc3339(t)),
            t => rfc3339(t),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<21} {:<7} {:<10} {}",
            escape(&p.name),
            rfc3339(p.created_unix_ms),
            p.agents,
            used,
            expires
        );
    }
    out
}

/// What `ctl providers create`/`rotate` say of a new token's limits.
pub fn token_limits(limits: &crate::cli::TokenLimits) -> String {
    let cap = match limits.max_agents {
        0 => "any number of agents".to_string(),
        1 => "at most 1 agent".to_string(),
        n => format!("at most {n} agents"),
    };
    match limits.expires_unix_ms() {
        0 => format!("the token enrolls {cap} and does not expire"),
        t => format!("the token enrolls {cap} until {}", rfc3339(t)),
    }
}

/// What `ctl providers create`/`rotate` print with a host command: the
/// command, and where it expects the backend's CA on the agent's host
/// when it mounts one.
pub fn host_command(command: &str) -> String {
    let mut out = format!("run an agent with:\n  {command}\n");
    let ca = command
        .split_once("src=")
        .and_then(|(_, rest)| rest.split_once(",dst=/etc/uplink/ca.pem"));
    if let Some((path, _)) = ca {
        let _ = writeln!(
            out,
            "(it mounts the backend's CA from {path} on the agent's host: put a copy of the \
             backend's ca.pem there first, readable by all)"
        );
    }
    out
}

/// Where a run's containers were placed, e.g. "2 on agt_a, 1 on agt_b"
/// (agents in the order of their first container).
pub fn run_placement(run: &proto::RunView) -> String {
    let mut per_agent: Vec<(String, u32)> = Vec::new();
    for c in &run.containers {
        match per_agent.iter_mut().find(|(a, _)| *a == c.agent_id) {
            Some((_, n)) => *n += 1,
            None => per_agent.push((c.agent_id.clone(), 1)),
        }
    }
    let placed: Vec<String> = per_agent
        .iter()
        .map(|(a, n)| format!("{n} on {a}"))
        .collect();
    placed.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let a = proto::AgentView {
            id: "agt_1".into(),
            connected: true,
            transport: proto::Transport::Longpoll as i32,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&agents_json(&[a])).unwrap();
        let o = &v[0];
        for k in [
            "id",
            "hostname",
            "provider",
            "connected",
            "transport",
            "last_seen",
            "version",
            "transport_reason",
            "revoked",
            "revoked_unix_ms",
            "replica",
        ] {
            assert!(o.get(k).is_some(), "missing {k}");
        }
        assert_eq!(o["transport"], "longpoll");
        assert_eq!(o["connected"], true);
    }

    #[test]
    fn agent_text_cannot_fake_rows_or_reach_the_terminal() {
        let hostile = "27.1\nagt_fake  evil  default  yes\u{1b}[2J\u{1b}]0;title\u{7}";
        let a = proto::AgentView {
            id: "agt_1".into(),
            hostname: hostile.into(),
            version: hostile.into(),
            capacity: Some(proto::Capacity {
                docker_available: true,
                docker_status: hostile.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = agents_table(&[a]);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(
            !table.contains('\u{1b}') && !table.contains('\u{7}'),
            "{table}"
        );
        assert!(table.contains("27.1\\nagt_fake"), "{table}");
        let run = proto::RunView {
            id: "run_1".into(),
            name: hostile.into(),
            containers: vec![proto::RunContainerView {
                name: hostile.into(),
                message: hostile.into(),
                container_id: "\u{1b}[31m\n".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        for out in [runs_table(std::slice::from_ref(&run)), run_table(&run)] {
            assert_eq!(
                out.lines().count(),
                2 + usize::from(out.starts_with("run ")),
                "{out}"
            );
            assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out}");
        }
    }

    #[test]
    fn a_host_command_that_mounts_a_ca_says_where_it_goes() {
        let with_ca = "docker run -d \\\n    --mount 'type=bind,src=/srv/my ca.pem,dst=/etc/uplink/ca.pem,readonly' \\\n    x agent";
        let out = host_command(with_ca);
        assert!(
            out.starts_with(&format!("run an agent with:\n  {with_ca}\n")),
            "{out}"
        );
        assert!(
            out.contains("from /srv/my ca.pem on the agent's host"),
            "{out}"
        );
        let out = host_command("docker run -d x agent");
        assert_eq!(out, "run an agent with:\n  docker run -d x agent\n");
    }

    #[test]
    fn providers_show_their_token_use_and_expiry() {
        let now = crate::now_unix_ms();
        let p = |name: &str, max_agents, expires| proto::ProviderView {
            name: name.into(),
            agents: 3,
            max_agents,
            token_expires_unix_ms: expires,
            token_enrolled: 2,
            ..Default::default()
        };
        let t = providers_table(&[
            p("open", 0, 0),
            p("capped", 5, now + 3_600_000),
            p("gone", 0, now - 1000),
        ]);
        let line = |n: &str| t.lines().find(|l| l.starts_with(n)).unwrap().to_string();
        assert!(line("open").trim_end().ends_with(" 2"), "{t}");
        assert!(line("capped").contains("2/5"), "{t}");
        assert!(line("capped").contains(&rfc3339(now + 3_600_000)), "{t}");
        assert!(line("gone").contains("(expired)"), "{t}");
    }
}
