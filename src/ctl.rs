//! `uplink ctl`: the operator's command line, a client of the admin service
//! (Connect unary over HTTPS), so it works against any backend that
//! implements the contract.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use http::Uri;

use crate::client::{CallError, ConnectClient};
use crate::proto::{self, Named};
use crate::secret::Secret;

const ADMIN_SERVICE: &str = "uplink.v1.AdminService";

/// A client of the admin service.
#[derive(Clone)]
pub struct Admin {
    client: ConnectClient,
}

/// A finished ping.
#[derive(Debug)]
pub struct PingOutcome {
    pub command_id: String,
    /// From the enqueue call to the result's arrival, as seen by the caller.
    pub round_trip: Duration,
    /// The command's final view (`None` when it timed out).
    pub view: proto::CommandView,
}

impl Admin {
    /// An admin client for `backend`.
    pub fn new(backend: &Uri, net: &crate::net::Net, token: Secret) -> Self {
        Admin {
            client: ConnectClient::new(backend, net).with_auth(token),
        }
    }

    async fn call<Req: Named, Resp: Named>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        self.client.call(ADMIN_SERVICE, method, req, timeout).await
    }

    /// `ListAgents`.
    pub async fn agents(&self, provider: &str) -> Result<Vec<proto::AgentView>, CallError> {
        let r: proto::ListAgentsResponse = self
            .call(
                "ListAgents",
                &proto::ListAgentsRequest {
                    provider: provider.into(),
                },
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.agents)
    }

    /// `ListProviders`.
    pub async fn providers(&self) -> Result<Vec<proto::ProviderView>, CallError> {
        let r: proto::ListProvidersResponse = self
            .call(
                "ListProviders",
                &proto::ListProvidersRequest {},
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.providers)
    }

    /// `CreateProvider`.
    pub async fn create_provider(
        &self,
        name: &str,
    ) -> Result<proto::CreateProviderResponse, CallError> {
        self.call(
            "CreateProvider",
            &proto::CreateProviderRequest { name: name.into() },
            Duration::from_secs(30),
        )
        .await
    }

    /// `RotateEnrollmentToken`.
    pub async fn rotate(
        &self,
        name: &str,
    ) -> Result<proto::RotateEnrollmentTokenResponse, CallError> {
        self.call(
            "RotateEnrollmentToken",
            &proto::RotateEnrollmentTokenRequest {
                provider: name.into(),
            },
            Duration::from_secs(30),
        )
        .await
    }

    /// `EnqueueCommand`.
    pub async fn enqueue(
        &self,
        agent: &str,
        spec: proto::CommandSpec,
    ) -> Result<proto::Command, CallError> {
        let r: proto::EnqueueCommandResponse = self
            .call(
                "EnqueueCommand",
                &proto::EnqueueCommandRequest {
                    agent_id: agent.into(),
                    spec: Some(spec),
                },
                Duration::from_secs(30),
            )
            .await?;
        r.command.ok_or_else(|| CallError {
            kind: crate::client::FailureKind::Other,
            message: "backend answered EnqueueCommand without a command".into(),
        })
    }

    /// `GetCommand`, waiting up to `wait` for the result.
    pub async fn command(&self, id: &str, wait: Duration) -> Result<proto::CommandView, CallError> {
        let r: proto::GetCommandResponse = self
            .call(
                "GetCommand",
                &proto::GetCommandRequest {
                    command_id: id.into(),
                    wait_ms: wait.as_millis().min(60_000) as u32,
                },
                wait + Duration::from_secs(10),
            )
            .await?;
        r.command.ok_or_else(|| CallError {
            kind: crate::client::FailureKind::Other,
            message: "backend answered GetCommand without a command".into(),
        })
    }

    /// `CreateRun`.
    pub async fn create_run(
        &self,
        req: proto::CreateRunRequest,
    ) -> Result<proto::RunView, CallError> {
        let r: proto::CreateRunResponse = self
            .call("CreateRun", &req, Duration::from_secs(60))
            .await?;
        r.run.ok_or_else(|| missing("CreateRun", "run"))
    }

    /// `ListRuns`.
    pub async fn runs(&self, provider: &str) -> Result<Vec<proto::RunView>, CallError> {
        let r: proto::ListRunsResponse = self
            .call(
                "ListRuns",
                &proto::ListRunsRequest {
                    provider: provider.into(),
                },
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.runs)
    }

    /// `GetRun`.
    pub async fn run(&self, run: &str) -> Result<proto::RunView, CallError> {
        let r: proto::GetRunResponse = self
            .call(
                "GetRun",
                &proto::GetRunRequest { run: run.into() },
                Duration::from_secs(30),
            )
            .await?;
        r.run.ok_or_else(|| missing("GetRun", "run"))
    }

    /// `StopRun`.
    pub async fn stop_run(
        &self,
        run: &str,
        timeout: Duration,
    ) -> Result<proto::RunView, CallError> {
        let r: proto::StopRunResponse = self
            .call(
                "StopRun",
                &proto::StopRunRequest {
                    run: run.into(),
                    timeout_s: timeout.as_secs().clamp(1, 3600) as u32,
                },
                Duration::from_secs(30),
            )
            .await?;
        r.run.ok_or_else(|| missing("StopRun", "run"))
    }

    /// `GetRunLogs`.
    pub async fn run_logs(
        &self,
        run: &str,
        tail: u32,
    ) -> Result<Vec<proto::ContainerLogLines>, CallError> {
        let r: proto::GetRunLogsResponse = self
            .call(
                "GetRunLogs",
                &proto::GetRunLogsRequest {
                    run: run.into(),
                    tail,
                    wait_ms: 30_000,
                },
                Duration::from_secs(45),
            )
            .await?;
        Ok(r.containers)
    }

    /// Reads `run` until `done` holds for it or `wait` has passed; returns
    /// the last view. Polls every 100 ms at first, then less often.
    pub async fn wait_run(
        &self,
        run: &str,
        wait: Duration,
        done: impl Fn(&proto::RunView) -> bool,
    ) -> Result<proto::RunView, CallError> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(25);
        loop {
            let v = self.run(run).await?;
            if done(&v) || Instant::now() >= deadline {
                return Ok(v);
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Queues a ping for `agent` and waits up to `timeout` for its result.
    pub async fn ping(
        &self,
        agent: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<PingOutcome, CallError> {
        let start = Instant::now();
        let cmd = self
            .enqueue(
                agent,
                proto::CommandSpec {
                    kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                        delay_ms: 0,
                        payload: payload.into(),
                    })),
                },
            )
            .await?;
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let view = self
                .command(&cmd.id, left.min(Duration::from_secs(60)))
                .await?;
            if view.state == proto::CommandState::Done as i32 || Instant::now() >= deadline {
                return Ok(PingOutcome {
                    command_id: cmd.id,
                    round_trip: start.elapsed(),
                    view,
                });
            }
        }
    }
}

fn missing(method: &str, field: &str) -> CallError {
    CallError {
        kind: crate::client::FailureKind::Other,
        message: format!("backend answered {method} without a {field}"),
    }
}

/// True when no container of the run waits for its start any more.
pub fn run_started(v: &proto::RunView) -> bool {
    v.containers
        .iter()
        .all(|c| c.state != proto::RunContainerState::Pending as i32)
}

/// True when every container of the run is removed or never started.
pub fn run_stopped(v: &proto::RunView) -> bool {
    v.state == proto::RunState::Stopped as i32
}

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
            r.id,
            r.name,
            r.provider,
            run_state_name(r.state),
            rfc3339(r.created_unix_ms),
            r.image,
            run_counts(r)
        );
    }
    out
}

/// `ctl run-status`: the run, then a line per container.
pub fn run_table(r: &proto::RunView) -> String {
    let mut out = format!(
        "run {} ({}) on {}: {}, {} x {} ({} cores, {} each)\n",
        r.id,
        r.name,
        r.provider,
        run_state_name(r.state),
        r.count,
        r.image,
        r.cpus,
        crate::cli::human_bytes(r.memory_bytes)
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
            c.name,
            c.agent_id,
            container_state_name(c.state),
            exit,
            c.container_id.chars().take(12).collect::<String>(),
            c.message
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

/// RFC 3339 UTC time of a Unix time in milliseconds ("" for 0).
pub fn rfc3339(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
            a.id,
            a.hostname,
            a.provider,
            if a.connected { "yes" } else { "no" },
            transport_name(a.transport),
            rfc3339(a.last_seen_unix_ms),
            a.version,
            a.pending_commands,
            containers,
            docker
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

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
        ] {
            assert!(o.get(k).is_some(), "missing {k}");
        }
        assert_eq!(o["transport"], "longpoll");
        assert_eq!(o["connected"], true);
    }
}
