//! `uplink ctl`: the operator's command line, a client of the admin service
//! (Connect unary over HTTPS), so it works against any backend that
//! implements the contract. This module holds the client ([`Admin`]) and
//! [`run`], which carries out one parsed command; [`render`] holds what
//! the commands print.

pub mod render;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::Uri;

pub use self::render::*;
use crate::cli::{AgentAction, CtlCommand, ProviderAction, TokenLimits};
use crate::client::{CallError, ConnectClient};
use crate::proto::{self, Named};
use crate::secret::Secret;
use crate::text::escape;
use crate::units::rfc3339;

/// Prints to stdout; a closed pipe (`ctl agents --json | head`) is not an
/// error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`out!`] without the line end.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

const ADMIN_SERVICE: &str = "uplink.v1.AdminService";

/// The admin calls that may be made twice: those that only read, and
/// `EnqueueCommand`, which carries a request id. Made again after a
/// failure that may pass ([`worth_retrying`]), after each of
/// [`RETRY_WAITS`].
const IDEMPOTENT: [&str; 7] = [
    "EnqueueCommand",
    "ListAgents",
    "ListProviders",
    "GetCommand",
    "ListRuns",
    "GetRun",
    "GetRunLogs",
];
const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(1)];

/// A failure another attempt may not meet: the connection was refused,
/// broke or could not be made, or the backend was unavailable.
fn worth_retrying(e: &CallError) -> bool {
    use crate::client::FailureKind as F;
    matches!(
        e.kind,
        F::Refused | F::Unreachable | F::Other | F::Status(tonic::Code::Unavailable)
    )
}

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
        if !IDEMPOTENT.contains(&method) {
            return self.client.call(ADMIN_SERVICE, method, req, timeout).await;
        }
        // A call that may be made twice is made again when its connection
        // broke or the backend could not answer now: behind a load
        // balancer the new connection reaches another replica.
        let mut waits = RETRY_WAITS.iter();
        loop {
            match self.client.call(ADMIN_SERVICE, method, req, timeout).await {
                Err(e) if worth_retrying(&e) => match waits.next() {
                    Some(wait) => {
                        tracing::debug!(method, error = %e.message, ?wait, "making a call again");
                        tokio::time::sleep(*wait).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
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

    /// `CreateProvider`, its token within `limits`.
    pub async fn create_provider(
        &self,
        name: &str,
        limits: &TokenLimits,
    ) -> Result<proto::CreateProviderResponse, CallError> {
        self.call(
            "CreateProvider",
            &proto::CreateProviderRequest {
                name: name.into(),
                max_agents: limits.max_agents,
                token_expires_unix_ms: limits.expires_unix_ms(),
            },
            Duration::from_secs(30),
        )
        .await
    }

    /// `RotateEnrollmentToken`, the new token within `limits`.
    pub async fn rotate(
        &self,
        name: &str,
        limits: &TokenLimits,
    ) -> Result<proto::RotateEnrollmentTokenResponse, CallError> {
        self.call(
            "RotateEnrollmentToken",
            &proto::RotateEnrollmentTokenRequest {
                provider: name.into(),
                max_agents: limits.max_agents,
                token_expires_unix_ms: limits.expires_unix_ms(),
            },
            Duration::from_secs(30),
        )
        .await
    }

    /// `RevokeAgent`: when the agent was revoked.
    pub async fn revoke_agent(&self, agent: &str) -> Result<i64, CallError> {
        let r: proto::RevokeAgentResponse = self
            .call(
                "RevokeAgent",
                &proto::RevokeAgentRequest {
                    agent_id: agent.into(),
                },
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.revoked_unix_ms)
    }

    /// `EnqueueCommand`, made again (with the same request id) after a
    /// failure that may pass.
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
                    // The same for every attempt of this call.
                    request_id: crate::secret::random_id("req_"),
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

/// What `uplink ctl` needs: where the admin service is, how to reach it,
/// the admin token, and the command to carry out.
pub struct CtlConfig {
    /// The backend, `https://host[:port]`.
    pub backend: Uri,
    /// Trust and proxy for the connection.
    pub net: crate::net::Net,
    /// The admin token.
    pub admin_token: Secret,
    /// The command.
    pub command: CtlCommand,
}

/// Carries out one `ctl` command and prints its output; the exit status is
/// a failure when the command did not reach its goal (a ping unanswered, a
/// run not started, a container's logs unreadable). A call that fails is
/// the error.
pub async fn run(cfg: CtlConfig) -> Result<ExitCode, CallError> {
    let admin = Admin::new(&cfg.backend, &cfg.net, cfg.admin_token);
    match cfg.command {
        CtlCommand::Agents {
            action: Some(AgentAction::Revoke { agent }),
            ..
        } => {
            let at = admin.revoke_agent(&agent).await?;
            out!(
                "agent {agent} revoked at {}: its connections are closed and its credential is refused; \
                 to bring the host back, remove its state dir and enroll it again",
                rfc3339(at)
            );
        }
        CtlCommand::Agents {
            action: None,
            json,
            provider,
        } => {
            let agents = admin.agents(provider.as_deref().unwrap_or("")).await?;
            if json {
                out!("{}", agents_json(&agents));
            } else {
                out_raw!("{}", agents_table(&agents));
            }
        }
        CtlCommand::Ping {
            agent,
            timeout,
            count,
        } => {
            let timeout = Duration::from(timeout);
            let mut failed = 0;
            for i in 0..count.max(1) {
                let p = admin.ping(&agent, &format!("ctl {i}"), timeout).await?;
                let state = proto::CommandState::try_from(p.view.state)
                    .unwrap_or(proto::CommandState::Unspecified);
                if state == proto::CommandState::Done {
                    let r = p.view.result.unwrap_or_default();
                    out!(
                        "{} from {agent}: {} in {:.2} ms",
                        escape(&r.message),
                        p.command_id,
                        p.round_trip.as_secs_f64() * 1000.0
                    );
                } else {
                    failed += 1;
                    eprintln!(
                        "no answer from {agent} within {timeout:?} (command {} is {}); is the agent connected? see `uplink ctl agents`",
                        p.command_id,
                        state.as_str_name()
                    );
                }
            }
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        CtlCommand::Providers { action: None } => {
            out_raw!("{}", providers_table(&admin.providers().await?));
        }
        CtlCommand::Providers {
            action: Some(ProviderAction::Create { name, limits }),
        } => {
            let r = admin.create_provider(&name, &limits).await?;
            out!("provider {name} created");
            out!("{}", token_limits(&limits));
            out!("enrollment token (shown once): {}", r.enrollment_token);
            out_raw!("{}", host_command(&r.host_command));
        }
        CtlCommand::Providers {
            action: Some(ProviderAction::Rotate { name, limits }),
        } => {
            let r = admin.rotate(&name, &limits).await?;
            out!("enrollment token of {name} rotated; the old one enrolls no new agent");
            out!("{}", token_limits(&limits));
            out!("new enrollment token (shown once): {}", r.enrollment_token);
            out_raw!("{}", host_command(&r.host_command));
        }
        CtlCommand::Run {
            provider,
            image,
            count,
            env,
            cpus,
            memory,
            name,
            wait,
            json,
            command,
        } => {
            let wait = Duration::from(wait);
            let start = Instant::now();
            let run = admin
                .create_run(proto::CreateRunRequest {
                    provider,
                    image,
                    count,
                    env: env.into_iter().collect(),
                    cpus,
                    memory_bytes: memory.into(),
                    name: name.unwrap_or_default(),
                    command,
                })
                .await?;
            if !json {
                out!(
                    "run {} ({}) created: {}",
                    run.id,
                    run.name,
                    run_placement(&run)
                );
            }
            let run = if wait.is_zero() {
                run
            } else {
                admin.wait_run(&run.id, wait, run_started).await?
            };
            let failed = run
                .containers
                .iter()
                .filter(|c| c.state == proto::RunContainerState::Failed as i32)
                .count();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&run_json(&run)).unwrap_or_default()
                );
            } else if !wait.is_zero() {
                out!(
                    "{} after {:.2} s: {}",
                    if run_started(&run) {
                        "started"
                    } else {
                        "still starting"
                    },
                    start.elapsed().as_secs_f64(),
                    run_counts(&run)
                );
                for c in run.containers.iter().filter(|c| !c.message.is_empty()) {
                    out!("  {} on {}: {}", c.name, c.agent_id, c.message);
                }
            }
            if failed > 0 || (!wait.is_zero() && !run_started(&run)) {
                return Ok(ExitCode::FAILURE);
            }
        }
        CtlCommand::Runs { json, provider } => {
            let runs = admin.runs(provider.as_deref().unwrap_or("")).await?;
            if json {
                let arr: Vec<_> = runs.iter().map(run_json).collect();
                out!("{}", serde_json::to_string_pretty(&arr).unwrap_or_default());
            } else {
                out_raw!("{}", runs_table(&runs));
            }
        }
        CtlCommand::RunStatus { run, json } => {
            let run = admin.run(&run).await?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&run_json(&run)).unwrap_or_default()
                );
            } else {
                out_raw!("{}", run_table(&run));
            }
        }
        CtlCommand::Stop { run, timeout, wait } => {
            let wait = Duration::from(wait);
            let start = Instant::now();
            let v = admin.stop_run(&run, timeout.into()).await?;
            out!("stopping run {} ({}): {}", v.id, v.name, run_counts(&v));
            if !wait.is_zero() {
                let v = admin.wait_run(&v.id, wait, run_stopped).await?;
                if run_stopped(&v) {
                    out!(
                        "stopped after {:.2} s: {}",
                        start.elapsed().as_secs_f64(),
                        run_counts(&v)
                    );
                } else {
                    eprintln!(
                        "not every container is removed after {wait:?} ({}); `uplink ctl run-status {}` shows which, `uplink ctl stop {}` tries again",
                        run_counts(&v),
                        v.id,
                        v.id
                    );
                    for c in v.containers.iter().filter(|c| !c.message.is_empty()) {
                        eprintln!(
                            "  {} on {}: {}",
                            escape(&c.name),
                            c.agent_id,
                            escape(&c.message)
                        );
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        CtlCommand::Logs { run, tail } => {
            let mut failed = false;
            for c in admin.run_logs(&run, tail).await? {
                if !c.error.is_empty() {
                    failed = true;
                    eprintln!("{}: {}", escape(&c.name), escape(&c.error));
                }
                // A container's output is shown, not obeyed: no escape
                // sequence of it reaches the operator's terminal.
                for line in &c.lines {
                    out!("{} | {}", escape(&c.name), escape(line));
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
