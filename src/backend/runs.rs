//! Runs: a number of containers of one image placed across a provider's
//! agents ([`super::placement`]), started, watched, stopped and removed
//! through ordinary commands. Everything a run is lives in the store, so a
//! run survives a backend restart; results and container events that
//! arrive later move its containers along:
//!
//! ```text
//!  PENDING ──result OK──▶ RUNNING ──EXITED event──▶ EXITED
//!     │ result failed        │ StopRun                 │ StopRun
//!     ▼                      ▼                         ▼
//!  FAILED               STOPPING ◀─────────────────────┘
//!                        (StopContainer, then RemoveContainer)
//!                            │ remove OK
//!                            ▼
//!                         REMOVED
//! ```
//!
//! A stop asked while a container is still PENDING is carried out when
//! its start result arrives.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tonic::Status;

use super::core::{Core, check_image, internal};
use super::placement::{self, Candidate, Demand};
use super::store::{FollowUp, NewContainer, Role, RunContainerRecord, RunRecord};
use crate::proto::{self, RunContainerState, RunState};
use crate::secret;

/// Most containers in one run.
pub const MAX_RUN_COUNT: u32 = 1000;
/// CPU limit of a run's containers when the request gives none.
pub const DEFAULT_CPUS: f64 = 1.0;
/// Memory limit of a run's containers when the request gives none.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Docker's smallest memory limit.
const MIN_MEMORY: u64 = 6 << 20;
/// Runs listed at most.
const MAX_LISTED: usize = 500;
/// Default and longest wait for `GetRunLogs`.
const LOGS_WAIT: Duration = Duration::from_secs(30);
const MAX_LOGS_WAIT: Duration = Duration::from_secs(60);

fn check_run_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "run name {name:?} must be 1 to 40 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )))
    }
}

fn check_env(env: &HashMap<String, String>) -> Result<(), Status> {
    if env.len() > 500 {
        return Err(Status::invalid_argument(format!(
            "{} environment variables; at most 500 are allowed",
            env.len()
        )));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "environment variable {k:?} is not NAME=VALUE (a non-empty name without '=' or NUL)"
            )));
        }
        if k.len() + v.len() > 32 * 1024 {
            return Err(Status::invalid_argument(format!(
                "environment variable {k} is longer than 32 KiB"
            )));
        }
    }
    Ok(())
}

/// The state of a run, from its containers.
pub fn run_state(run: &RunRecord, containers: &[RunContainerRecord]) -> RunState {
    let any = |s: RunContainerState| containers.iter().any(|c| c.state == s);
    if run.stop_ms > 0 {
        let done = containers.iter().all(|c| {
            matches!(
                c.state,
                RunContainerState::Removed | RunContainerState::Failed
            )
        });
        return if done {
            RunState::Stopped
        } else {
            RunState::Stopping
        };
    }
    if any(RunContainerState::Pending) {
        RunState::Starting
    } else if any(RunContainerState::Running) {
        RunState::Running
    } else {
        RunState::Finished
    }
}

fn view(run: RunRecord, containers: Vec<RunContainerRecord>) -> proto::RunView {
    let state = run_state(&run, &containers);
    proto::RunView {
        state: state as i32,
        containers: containers
            .into_iter()
            .map(|c| proto::RunContainerView {
                index: c.index,
                agent_id: c.agent_id,
                name: c.name,
                container_id: c.container_id,
                state: c.state as i32,
                command_id: c.command_id,
                exit_code: c.exit_code,
                oom_killed: c.oom_killed,
                message: c.message,
                started_unix_ms: c.started_ms,
            })
            .collect(),
        id: run.id,
        name: run.name,
        provider: run.provider,
        image: run.image,
        count: run.count,
        created_unix_ms: run.created_ms,
        stop_unix_ms: run.stop_ms,
        cpus: run.cpus,
        memory_bytes: run.memory,
    }
}

fn stop_command(c: &RunContainerRecord, timeout_s: u32) -> FollowUp {
    FollowUp {
        role: Role::Stop,
        command_id: secret::random_id("cmd_"),
        spec: proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::StopContainer(
                proto::StopContainer {
                    container: target(c),
                    timeout_s,
                },
            )),
        },
    }
}

fn remove_command(c: &RunContainerRecord) -> FollowUp {
    FollowUp {
        role: Role::Remove,
        command_id: secret::random_id("cmd_"),
        spec: proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::RemoveContainer(
                proto::RemoveContainer {
                    container: target(c),
                    force: true,
                },
            )),
        },
    }
}

/// How a command names the container: Docker's id once known, else the
/// name the run gave it.
fn target(c: &RunContainerRecord) -> String {
    if c.container_id.is_empty() {
        c.name.clone()
    } else {
        c.container_id.clone()
    }
}

impl Core {
    fn queued(&self, agent: &str, command: Option<proto::Command>) {
        if let Some(c) = command {
            self.hub.notify_queued(agent, c.seq, Some(&c));
        }
    }

    /// `CreateRun`.
    pub async fn create_run(
        &self,
        req: proto::CreateRunRequest,
    ) -> Result<proto::CreateRunResponse, Status> {
        super::core::check_provider_name(&req.provider)?;
        check_image("image", &req.image)?;
        if req.count == 0 || req.count > MAX_RUN_COUNT {
            return Err(Status::invalid_argument(format!(
                "count {} is not between 1 and {MAX_RUN_COUNT}",
                req.count
            )));
        }
        let cpus = if req.cpus == 0.0 {
            DEFAULT_CPUS
        } else {
            req.cpus
        };
        if !cpus.is_finite() || !(0.01..=1024.0).contains(&cpus) {
            return Err(Status::invalid_argument(format!(
                "cpus {} is not between 0.01 and 1024 cores",
                req.cpus
            )));
        }
        let memory = if req.memory_bytes == 0 {
            DEFAULT_MEMORY
        } else {
            req.memory_bytes
        };
        if memory < MIN_MEMORY {
            return Err(Status::invalid_argument(format!(
                "memory {memory} bytes is below Docker's minimum of 6 MiB"
            )));
        }
        check_env(&req.env)?;
        if req.command.len() > 500 || req.command.iter().any(|a| a.contains('\0')) {
            return Err(Status::invalid_argument(
                "command has more than 500 arguments or an argument with a NUL byte",
            ));
        }
        let id = secret::random_id("run_");
        let name = if req.name.is_empty() {
            format!("r{}", &id[4..].chars().take(8).collect::<String>()).to_lowercase()
        } else {
            check_run_name(&req.name)?;
            req.name.clone()
        };
        if self.store.run_name_in_use(&name).await.map_err(internal)? {
            return Err(Status::already_exists(format!(
                "a run named {name:?} still has containers; stop it (`uplink ctl stop {name}`) or choose another --name"
            )));
        }
        let agents = self.store.agents(&req.provider).await.map_err(internal)?;
        if agents.is_empty()
            && !self
                .store
                .providers()
                .await
                .map_err(internal)?
                .iter()
                .any(|p| p.name == req.provider)
        {
            return Err(Status::not_found(format!(
                "no provider {:?}; `uplink ctl providers` lists them",
                req.provider
            )));
        }
        let candidates = self
            .candidates(agents.iter().map(|a| a.id.as_str()))
            .await?;
        let slots = placement::place(
            &candidates,
            Demand {
                count: req.count,
                cpus,
                memory,
            },
        )
        .map_err(|e| Status::failed_precondition(format!("provider {}: {e}", req.provider)))?;
        let now = crate::now_unix_ms();
        let run = RunRecord {
            id: id.clone(),
            name: name.clone(),
            provider: req.provider.clone(),
            image: req.image.clone(),
            count: req.count,
            cpus,
            memory,
            created_ms: now,
            stop_ms: 0,
            stop_timeout_s: 10,
        };
        let containers: Vec<NewContainer> = slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                let cname = format!("{name}-{i}");
                NewContainer {
                    index: i as u32,
                    agent_id: candidates[slot].agent_id.clone(),
                    name: cname.clone(),
                    command_id: secret::random_id("cmd_"),
                    spec: proto::CommandSpec {
                        kind: Some(proto::command_spec::Kind::RunContainer(
                            proto::RunContainer {
                                image: req.image.clone(),
                                name: cname,
                                command: req.command.clone(),
                                env: req.env.clone(),
                                cpus,
                                memory_bytes: memory,
                                run_id: id.clone(),
                                ..Default::default()
                            },
                        )),
                    },
                }
            })
            .collect();
        let queued = self
            .store
            .create_run(&run, &containers)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::aborted("an agent of the placement disappeared; try again"))?;
        for (agent, c) in queued {
            self.hub.notify_queued(&agent, c.seq, Some(&c));
        }
        let per_agent = containers
            .iter()
            .fold(HashMap::<&str, u32>::new(), |mut m, c| {
                *m.entry(c.agent_id.as_str()).or_default() += 1;
                m
            });
        tracing::info!(run = %id, name = %name, provider = %req.provider, image = %req.image,
            count = req.count, ?per_agent, "run created");
        let (run, containers) = self
            .store
            .run(&id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::internal("the new run is not in the store"))?;
        Ok(proto::CreateRunResponse {
            run: Some(view(run, containers)),
        })
    }

    /// Placement's view of `agents`: presence, last capacity, and what was
    /// placed on them since that report.
    async fn candidates<'a>(
        &self,
        agents: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Candidate>, Status> {
        let now = crate::now_unix_ms();
        let capacities = self.store.capacities().await.map_err(internal)?;
        let live = self.store.live_run_containers().await.map_err(internal)?;
        // Connected here or, with a shared store, to another backend.
        let placed = self.placed(now).await?;
        Ok(agents
            .map(|id| {
                let reported = capacities.get(id);
                let mut c = Candidate {
                    agent_id: id.to_string(),
                    connected: placed.get(id).is_some_and(|p| p.presence.connected),
                    capacity: reported.map(|(c, _)| c.clone()),
                    unreported_containers: 0,
                    unreported_cpus: 0.0,
                    unreported_memory: 0,
                };
                let reported_at = reported.map_or(0, |(_, t)| *t);
                for l in &live {
                    // Pending containers, and running ones that started
                    // after the agent's last report, are not in it yet.
                    if l.agent_id == id
                        && (l.state == RunContainerState::Pending || l.started_ms >= reported_at)
                    {
                        c.unreported_containers += 1;
                        c.unreported_cpus += l.cpus;
                        c.unreported_memory = c.unreported_memory.saturating_add(l.memory);
                    }
                }
                c
            })
            .collect())
    }

    /// `ListRuns`.
    pub async fn list_runs(
        &self,
        req: proto::ListRunsRequest,
    ) -> Result<proto::ListRunsResponse, Status> {
        Ok(proto::ListRunsResponse {
            runs: self
                .store
                .runs(&req.provider, MAX_LISTED)
                .await
                .map_err(internal)?
                .into_iter()
                .map(|(r, c)| view(r, c))
                .collect(),
        })
    }

    async fn find_run(&self, run: &str) -> Result<(RunRecord, Vec<RunContainerRecord>), Status> {
        if run.is_empty() || run.len() > 128 {
            return Err(Status::invalid_argument("run must be a run's id or name"));
        }
        self.store.run(run).await.map_err(internal)?.ok_or_else(|| {
            Status::not_found(format!("no run {run:?}; `uplink ctl runs` lists them"))
        })
    }

    /// `GetRun`.
    pub async fn get_run(
        &self,
        req: proto::GetRunRequest,
    ) -> Result<proto::GetRunResponse, Status> {
        let (run, containers) = self.find_run(&req.run).await?;
        Ok(proto::GetRunResponse {
            run: Some(view(run, containers)),
        })
    }

    /// `StopRun`.
    pub async fn stop_run(
        &self,
        req: proto::StopRunRequest,
    ) -> Result<proto::StopRunResponse, Status> {
        let (run, containers) = self.find_run(&req.run).await?;
        let timeout = if req.timeout_s == 0 {
            10
        } else {
            req.timeout_s.min(3600)
        };
        let now = crate::now_unix_ms();
        self.store
            .stop_run(&run.id, now, timeout)
            .await
            .map_err(internal)?;
        let mut asked = 0;
        for c in &containers {
            let changed = self
                .store
                .change_container(&run.id, c.index, now, &mut |_, c| match c.state {
                    RunContainerState::Running | RunContainerState::Exited => {
                        c.state = RunContainerState::Stopping;
                        Some(stop_command(c, timeout))
                    }
                    // Asked again: retry what is not in flight any more.
                    RunContainerState::Stopping if c.pending_command.is_empty() => {
                        Some(stop_command(c, timeout))
                    }
                    _ => None,
                })
                .await
                .map_err(internal)?;
            if let Some((c, cmd)) = changed {
                asked += cmd.is_some() as u32;
                self.queued(&c.agent_id, cmd);
            }
        }
        tracing::info!(run = %run.id, name = %run.name, containers = asked, "run stopping");
        let (run, containers) = self.find_run(&run.id).await?;
        Ok(proto::StopRunResponse {
            run: Some(view(run, containers)),
        })
    }

    /// Moves a run's container along after one of its commands finished.
    pub(super) async fn run_result(&self, r: &proto::CommandResult) -> Result<(), Status> {
        let Some((run_id, index, role)) = self
            .store
            .run_command(&r.command_id)
            .await
            .map_err(internal)?
        else {
            return Ok(());
        };
        let ok = r.status == proto::CommandStatus::Ok as i32;
        let now = crate::now_unix_ms();
        let changed = self
            .store
            .change_container(&run_id, index, now, &mut |run, c| {
                if role != Role::Start && c.pending_command == r.command_id {
                    c.pending_command.clear();
                }
                match role {
                    Role::Start if !ok => {
                        c.state = RunContainerState::Failed;
                        c.message = r.message.clone();
                        None
                    }
                    Role::Start => {
                        if let Some(proto::command_result::Detail::RunContainer(d)) = &r.detail {
                            c.container_id = d.container_id.clone();
                        }
                        c.started_ms = now;
                        if run.stop_ms > 0 {
                            c.state = RunContainerState::Stopping;
                            return Some(stop_command(c, run.stop_timeout_s));
                        }
                        if c.state == RunContainerState::Pending {
                            c.state = RunContainerState::Running;
                        }
                        None
                    }
                    Role::Stop => {
                        if !ok {
                            c.message = r.message.clone();
                        }
                        // Remove in any case: a container that would not
                        // stop is killed by the forced removal.
                        Some(remove_command(c))
                    }
                    Role::Remove if ok => {
                        c.state = RunContainerState::Removed;
                        None
                    }
                    Role::Remove => {
                        c.message = r.message.clone();
                        None
                    }
                }
            })
            .await
            .map_err(internal)?;
        if let Some((c, cmd)) = changed {
            tracing::debug!(run = %run_id, container = %c.name, state = c.state.as_str_name(), "run container");
            self.queued(&c.agent_id, cmd);
        }
        Ok(())
    }

    /// Records a container event of a run's container.
    pub(super) async fn run_container_event(
        &self,
        agent: &str,
        ev: &proto::ContainerEvent,
    ) -> Result<(), Status> {
        if ev.command_id.is_empty() {
            return Ok(());
        }
        let Some((run_id, index, Role::Start)) = self
            .store
            .run_command(&ev.command_id)
            .await
            .map_err(internal)?
        else {
            return Ok(());
        };
        let kind = proto::ContainerEventKind::try_from(ev.kind).unwrap_or_default();
        let now = crate::now_unix_ms();
        self.store
            .change_container(&run_id, index, now, &mut |_, c| {
                if c.agent_id != agent {
                    return None;
                }
                if c.container_id.is_empty() {
                    c.container_id = ev.container_id.clone();
                }
                match kind {
                    proto::ContainerEventKind::Exited => {
                        c.exit_code = ev.exit_code;
                        c.oom_killed = ev.oom_killed;
                        if matches!(
                            c.state,
                            RunContainerState::Pending | RunContainerState::Running
                        ) {
                            c.state = RunContainerState::Exited;
                        }
                    }
                    proto::ContainerEventKind::Removed => c.state = RunContainerState::Removed,
                    _ => {}
                }
                None
            })
            .await
            .map_err(internal)?;
        Ok(())
    }

    /// `GetRunLogs`: asks each existing container's agent for its last
    /// lines and waits for the answers.
    pub async fn run_logs(
        &self,
        req: proto::GetRunLogsRequest,
    ) -> Result<proto::GetRunLogsResponse, Status> {
        let (_, containers) = self.find_run(&req.run).await?;
        let tail = match req.tail {
            0 => 100,
            n => n.min(10_000),
        };
        let wait = match req.wait_ms {
            0 => LOGS_WAIT,
            n => Duration::from_millis(n as u64).min(MAX_LOGS_WAIT),
        };
        let mut asked = Vec::new();
        for c in containers.into_iter().filter(|c| {
            matches!(
                c.state,
                RunContainerState::Running
                    | RunContainerState::Exited
                    | RunContainerState::Stopping
            )
        }) {
            let cmd = self
                .enqueue(proto::EnqueueCommandRequest {
                    agent_id: c.agent_id.clone(),
                    spec: Some(proto::CommandSpec {
                        kind: Some(proto::command_spec::Kind::ContainerLogs(
                            proto::ContainerLogs {
                                container: target(&c),
                                tail,
                            },
                        )),
                    }),
                    request_id: String::new(),
                })
                .await?;
            asked.push((c, cmd.command.map(|c| c.id).unwrap_or_default()));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut results = self.results.subscribe();
        let mut answered: HashMap<String, proto::CommandResult> = HashMap::new();
        let mut waiting: HashSet<&str> = asked.iter().map(|(_, id)| id.as_str()).collect();
        loop {
            results.borrow_and_update();
            // Each read is awaited, so a loop rather than `retain`.
            let mut unanswered = HashSet::with_capacity(waiting.len());
            for id in waiting {
                if let Ok(Some(rec)) = self.store.command(id).await
                    && let Some(r) = rec.result
                {
                    answered.insert(id.to_string(), r);
                } else {
                    unanswered.insert(id);
                }
            }
            waiting = unanswered;
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                _ = results.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        let containers = asked
            .into_iter()
            .map(|(c, id)| {
                let (lines, error) = match answered.remove(&id) {
                    Some(r) if r.status == proto::CommandStatus::Ok as i32 => match r.detail {
                        Some(proto::command_result::Detail::ContainerLogs(l)) => {
                            (l.lines, String::new())
                        }
                        _ => (Vec::new(), String::new()),
                    },
                    Some(r) => (Vec::new(), r.message),
                    None => (
                        Vec::new(),
                        format!(
                            "no answer from agent {} within {wait:?}; is it connected?",
                            c.agent_id
                        ),
                    ),
                };
                proto::ContainerLogLines {
                    index: c.index,
                    name: c.name,
                    agent_id: c.agent_id,
                    lines,
                    error,
                }
            })
            .collect();
        Ok(proto::GetRunLogsResponse { containers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: RunContainerState) -> RunContainerRecord {
        RunContainerRecord {
            state,
            ..Default::default()
        }
    }

    #[test]
    fn a_run_state_follows_its_containers() {
        use RunContainerState as C;
        let run = RunRecord::default();
        assert_eq!(
            run_state(&run, &[c(C::Pending), c(C::Running)]),
            RunState::Starting
        );
        assert_eq!(
            run_state(&run, &[c(C::Running), c(C::Exited)]),
            RunState::Running
        );
        assert_eq!(
            run_state(&run, &[c(C::Failed), c(C::Exited)]),
            RunState::Finished
        );
        let stopped = RunRecord {
            stop_ms: 1,
            ..Default::default()
        };
        assert_eq!(
            run_state(&stopped, &[c(C::Removed), c(C::Stopping)]),
            RunState::Stopping
        );
        assert_eq!(
            run_state(&stopped, &[c(C::Removed), c(C::Failed)]),
            RunState::Stopped
        );
    }

    #[test]
    fn run_names_are_checked() {
        assert!(check_run_name("load-test_1.a").is_ok());
        for bad in ["", "-x", "a b", "x/y", &"a".repeat(41)] {
            assert!(check_run_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_is_checked() {
        let ok = HashMap::from([("A".to_string(), "1".to_string())]);
        assert!(check_env(&ok).is_ok());
        let bad = HashMap::from([("A=B".to_string(), "1".to_string())]);
        assert!(check_env(&bad).is_err());
        let empty = HashMap::from([(String::new(), "1".to_string())]);
        assert!(check_env(&empty).is_err());
    }
}
