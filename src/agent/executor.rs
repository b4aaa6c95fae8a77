//! Executes commands: `Ping` here, container commands through the Docker
//! engine after the local policy agreed. A kind this agent does not know
//! gets an UNSUPPORTED result naming its version, never silence.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::docker::{self, Engine, Failure};
use super::policy::Policy;
use crate::proto::{self, CommandStatus, command_result::Detail, command_spec::Kind};

/// Runs commands for one agent.
pub struct Executor {
    agent: String,
    policy: Policy,
    engine: Mutex<Option<Arc<Engine>>>,
    /// The container this agent runs in, never touched.
    own_container: Option<String>,
}

fn result(
    id: &str,
    status: CommandStatus,
    message: impl Into<String>,
    detail: Option<Detail>,
) -> proto::CommandResult {
    proto::CommandResult {
        command_id: id.to_string(),
        status: status as i32,
        message: message.into(),
        detail,
    }
}

fn from_failure(id: &str, f: Failure) -> proto::CommandResult {
    result(id, f.status, f.message, None)
}

/// A short name of a command's kind, for logs.
pub fn kind_name(c: &proto::Command) -> &'static str {
    match c.spec.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Ping(_)) => "ping",
        Some(Kind::PullImage(_)) => "pull_image",
        Some(Kind::RunContainer(_)) => "run_container",
        Some(Kind::StopContainer(_)) => "stop_container",
        Some(Kind::RemoveContainer(_)) => "remove_container",
        Some(Kind::ListContainers(_)) => "list_containers",
        Some(Kind::ContainerLogs(_)) => "container_logs",
        None => "unknown",
    }
}

impl Executor {
    /// An executor for `agent` under `policy`.
    pub fn new(agent: &str, policy: Policy) -> Self {
        Executor {
            agent: agent.to_string(),
            policy: policy.with_real_prefixes(),
            engine: Mutex::new(None),
            own_container: None,
        }
    }

    /// The same executor, whose engine never lists, stops or removes the
    /// container `id` (the one this agent runs in).
    pub fn with_own_container(mut self, id: Option<String>) -> Self {
        self.own_container = id;
        self
    }

    /// The Docker engine, connecting when needed (so an engine that comes
    /// back is noticed without a restart).
    pub async fn engine(&self) -> Result<Arc<Engine>, Failure> {
        let mut slot = self.engine.lock().await;
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let e = Engine::new(docker::connect().await?, &self.agent)
            .with_own_container(self.own_container.clone());
        let e = Arc::new(e);
        *slot = Some(e.clone());
        Ok(e)
    }

    /// The Docker engine if it answers now: a cached engine is pinged, and
    /// forgotten (then connected afresh) when it does not answer.
    pub async fn live_engine(&self) -> Result<Arc<Engine>, Failure> {
        let cached = self.engine.lock().await.clone();
        if let Some(e) = cached {
            if e.alive().await {
                return Ok(e);
            }
            let mut slot = self.engine.lock().await;
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &e)) {
                *slot = None;
            }
        }
        self.engine().await
    }

    /// Forgets the engine after a failure when it no longer answers, so the
    /// next command connects afresh. The ping runs without the slot lock.
    async fn forget_engine_if_gone(&self) {
        let _ = self.live_engine().await;
    }

    /// Runs `command`; `progress` receives intermediate progress.
    pub async fn execute(
        &self,
        command: &proto::Command,
        received_ms: i64,
        mut progress: impl FnMut(proto::CommandProgress),
    ) -> proto::CommandResult {
        let id = command.id.as_str();
        let Some(kind) = command.spec.as_ref().and_then(|s| s.kind.as_ref()) else {
            return result(
                id,
                CommandStatus::Unsupported,
                format!(
                    "command kind not supported by this agent (uplink {}); upgrade the agent",
                    crate::VERSION
                ),
                None,
            );
        };
        if let Kind::Ping(p) = kind {
            if p.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(p.delay_ms.min(600_000) as u64)).await;
            }
            return result(
                id,
                CommandStatus::Ok,
                "pong",
                Some(Detail::Ping(proto::PingResult {
                    payload: p.payload.clone(),
                    received_unix_ms: received_ms,
                })),
            );
        }
        let out = match self.engine().await {
            Ok(engine) => self.container(&engine, id, kind, &mut progress).await,
            Err(f) => Err(f),
        };
        match out {
            Ok(r) => r,
            Err(f) => {
                if f.message.contains("docker") {
                    self.forget_engine_if_gone().await;
                }
                from_failure(id, f)
            }
        }
    }

    async fn container(
        &self,
        engine: &Engine,
        id: &str,
        kind: &Kind,
        progress: &mut impl FnMut(proto::CommandProgress),
    ) -> Result<proto::CommandResult, Failure> {
        match kind {
            Kind::Ping(_) => Err(docker::Failure {
                status: CommandStatus::Failed,
                message: "ping is not a container command".into(),
            }),
            Kind::PullImage(p) => {
                self.policy
                    .check_image(&p.image)
                    .map_err(|r| docker::refused(id, &p.image, r))?;
                engine
                    .pull(&p.image, p.auth.as_ref(), |percent, message| {
                        progress(proto::CommandProgress {
                            command_id: id.to_string(),
                            percent,
                            message,
                        })
                    })
                    .await
                    .map(|()| result(id, CommandStatus::Ok, format!("pulled {}", p.image), None))
            }
            Kind::RunContainer(r) => engine.run(&self.policy, id, r).await.map(|r| {
                let msg = if r.existed {
                    format!(
                        "container {} already existed (command delivered again)",
                        r.name
                    )
                } else {
                    format!("container {} started", r.name)
                };
                result(id, CommandStatus::Ok, msg, Some(Detail::RunContainer(r)))
            }),
            Kind::StopContainer(s) => engine.stop(&s.container, s.timeout_s).await.map(|()| {
                result(
                    id,
                    CommandStatus::Ok,
                    format!("stopped {}", s.container),
                    None,
                )
            }),
            Kind::RemoveContainer(r) => engine.remove(&r.container, r.force).await.map(|existed| {
                let message = if existed {
                    format!("removed {}", r.container)
                } else {
                    format!("{} does not exist (already removed)", r.container)
                };
                result(id, CommandStatus::Ok, message, None)
            }),
            Kind::ListContainers(_) => engine.list().await.map(|containers| {
                result(
                    id,
                    CommandStatus::Ok,
                    format!("{} containers", containers.len()),
                    Some(Detail::ListContainers(proto::ListContainersResult {
                        containers,
                    })),
                )
            }),
            Kind::ContainerLogs(l) => engine.logs(&l.container, l.tail).await.map(|lines| {
                result(
                    id,
                    CommandStatus::Ok,
                    format!("{} lines", lines.len()),
                    Some(Detail::ContainerLogs(proto::ContainerLogsResult { lines })),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(kind: Option<Kind>) -> proto::Command {
        proto::Command {
            id: "c1".into(),
            seq: 1,
            created_unix_ms: 0,
            spec: Some(proto::CommandSpec { kind }),
        }
    }

    #[tokio::test]
    async fn unknown_kinds_get_a_clear_failure() {
        let r = Executor::new("a", Policy::default())
            .execute(&cmd(None), 0, |_| {})
            .await;
        assert_eq!(r.status, CommandStatus::Unsupported as i32);
        assert!(r.message.contains("not supported"));
    }

    #[tokio::test]
    async fn ping_echoes_its_payload() {
        let c = cmd(Some(Kind::Ping(proto::Ping {
            delay_ms: 0,
            payload: "hi".into(),
        })));
        let r = Executor::new("a", Policy::default())
            .execute(&c, 5, |_| {})
            .await;
        assert_eq!(r.status, CommandStatus::Ok as i32);
        match r.detail {
            Some(Detail::Ping(p)) => {
                assert_eq!((p.payload.as_str(), p.received_unix_ms), ("hi", 5))
            }
            other => panic!("unexpected detail {other:?}"),
        }
    }
}
