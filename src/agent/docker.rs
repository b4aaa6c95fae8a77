//! The Docker engine, through bollard on the local socket: the container
//! commands of the contract, each checked against the local policy first.
//!
//! Every container the agent creates carries its labels (`uplink.agent`,
//! `uplink.command`, `uplink.run`). The agent touches no other container:
//! stop, remove and logs refuse a container without its `uplink.agent`
//! label. A RunContainer delivered again finds its container by
//! `uplink.command` and creates nothing. The container the agent itself
//! runs in ([`Engine::with_own_container`]) is never listed, stopped or
//! removed, whatever its labels say.
//!
//! When the socket is missing or refused, every container command fails
//! with `docker: unavailable (reason)`; each command tries to connect again,
//! so an engine that comes back is noticed without restarting the agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceMapping, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions,
};
use futures_util::StreamExt;

use super::policy::{self, Ask, Policy, Refusal, Usage};
use crate::labels::{LABEL_AGENT, LABEL_COMMAND, LABEL_RUN};
use crate::proto;

/// A failed container command: the result's status and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: proto::CommandStatus,
    pub message: String,
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        status: proto::CommandStatus::Failed,
        message: message.into(),
    }
}

/// Connects to the local engine (negotiating the API version) and pings it.
pub async fn connect() -> Result<Docker, Failure> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| failed(format!("docker: unavailable ({e})")))?;
    let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
        .await
        .map_err(|_| failed("docker: unavailable (no answer from the engine within 5s)"))?
        .map_err(|e| failed(format!("docker: unavailable ({e})")))?;
    docker
        .ping()
        .await
        .map_err(|e| failed(format!("docker: unavailable ({e})")))?;
    Ok(docker)
}

/// The engine as this agent uses it.
pub struct Engine {
    docker: Docker,
    agent: String,
    /// Limits of containers being created (checked against the policy's
    /// totals but not yet listed by the engine); the lock is held while
    /// the totals are checked.
    reserved: tokio::sync::Mutex<(f64, u64)>,
    /// CPU and memory limits of this agent's live containers, by id.
    limits: std::sync::Mutex<HashMap<String, (f64, u64)>>,
    /// The engine host's figures, once asked.
    host: tokio::sync::OnceCell<(u32, u64, String)>,
    /// The id of the container this agent runs in, if any: left out of
    /// every listing and refused by every command.
    own: Option<String>,
}

fn labels_filter(agent: &str, extra: Option<(&str, &str)>) -> HashMap<String, Vec<String>> {
    let mut labels = vec![format!("{LABEL_AGENT}={agent}")];
    if let Some((k, v)) = extra {
        labels.push(format!("{k}={v}"));
    }
    HashMap::from([("label".to_string(), labels)])
}

impl Engine {
    /// Wraps a connected client for `agent`.
    pub fn new(docker: Docker, agent: &str) -> Self {
        Engine {
            docker,
            agent: agent.to_string(),
            reserved: tokio::sync::Mutex::new((0.0, 0)),
            limits: std::sync::Mutex::new(HashMap::new()),
            host: tokio::sync::OnceCell::new(),
            own: None,
        }
    }

    /// The same engine, never touching the container `id` (the one this
    /// agent runs in, found by [`crate::own_container::detect`]): it is
    /// left out of every listing (and so of reconciliation, orphan removal
    /// and capacity), and stop, remove and logs refuse it, even if it
    /// carried this agent's label.
    pub fn with_own_container(mut self, id: Option<String>) -> Self {
        self.own = id;
        self
    }

    /// Whether `id` is the container this agent runs in.
    fn is_own(&self, id: Option<&str>) -> bool {
        self.own.is_some() && self.own.as_deref() == id
    }

    /// Pulls `image`, calling `progress(percent, line)` at most once a second.
    pub async fn pull(
        &self,
        image: &str,
        auth: Option<&proto::RegistryAuth>,
        mut progress: impl FnMut(f32, String),
    ) -> Result<(), Failure> {
        let creds = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            ..Default::default()
        });
        let opts = CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(opts), None, creds);
        let mut layers: HashMap<String, (i64, i64)> = HashMap::new();
        let mut last = Instant::now() - Duration::from_secs(2);
        while let Some(item) = stream.next().await {
            let info =
                item.map_err(|e| failed(format!("pull {image}: {}", pull_reason(&e.to_string()))))?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(failed(format!("pull {image}: {}", pull_reason(&err))));
            }
            if let (Some(id), Some(d)) = (info.id.clone(), info.progress_detail)
                && let (Some(cur), Some(total)) = (d.current, d.total)
            {
                layers.insert(id, (cur, total));
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                tracing::info!(%image, "pull progress");
                let (cur, total) = layers
                    .values()
                    .fold((0, 0), |(c, t), (a, b)| (c + a, t + b));
                let pct = if total > 0 {
                    (cur as f32 / total as f32 * 100.0).min(100.0)
                } else {
                    0.0
                };
                progress(pct, info.status.unwrap_or_default());
            }
        }
        progress(100.0, format!("pulled {image}"));
        Ok(())
    }

    /// This agent's containers (all, or only running), optionally only
    /// those of one command.
    async fn ours_listed(
        &self,
        all: bool,
        command: Option<&str>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, Failure> {
        let opts = ListContainersOptions {
            all,
            filters: Some(labels_filter(
                &self.agent,
                command.map(|c| (LABEL_COMMAND, c)),
            )),
            ..Default::default()
        };
        let mut list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| failed(format!("docker: {e}")))?;
        list.retain(|c| !self.is_own(c.id.as_deref()));
        Ok(list)
    }

    /// The container a RunContainer command created, if any.
    async fn by_command(&self, command_id: &str) -> Result<Option<(String, String)>, Failure> {
        let list = self.ours_listed(true, Some(command_id)).await?;
        Ok(list
            .into_iter()
            .next()
            .map(|c| (c.id.unwrap_or_default(), first_name(c.names))))
    }

    /// CPU and memory limits held by this agent's containers that run or
    /// are about to (created, running, restarting, paused). A container's
    /// limits are read once (an inspect) and remembered by id, so this
    /// costs one listing.
    pub async fn usage(&self) -> Result<Usage, Failure> {
        let list = self.ours_listed(true, None).await?;
        let mut u = Usage::default();
        let mut live_ids = Vec::new();
        for c in list {
            let live = c.state.as_ref().is_some_and(|s| {
                matches!(
                    s.to_string().as_str(),
                    "created" | "running" | "restarting" | "paused"
                )
            });
            let Some(id) = c.id.filter(|_| live) else {
                continue;
            };
            let known = self
                .limits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .copied();
            let limits = match known {
                Some(l) => Some(l),
                None => self
                    .docker
                    .inspect_container(&id, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .map(|i| {
                        let hc = i.host_config.unwrap_or_default();
                        let l = (
                            hc.nano_cpus.unwrap_or(0) as f64 / 1e9,
                            hc.memory.unwrap_or(0).max(0) as u64,
                        );
                        self.limits
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id.clone(), l);
                        l
                    }),
            };
            if let Some((cpus, memory)) = limits {
                u.cpus += cpus;
                u.memory += memory;
                u.containers += 1;
            }
            live_ids.push(id);
        }
        // Forget containers that are gone or stopped.
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| live_ids.contains(id));
        Ok(u)
    }

    /// The engine's host: logical CPUs, memory in bytes, and the engine's
    /// version. Asked once per connection (`docker info` is not cheap, and
    /// an engine that restarts is connected afresh).
    pub async fn host(&self) -> Result<(u32, u64, String), Failure> {
        self.host
            .get_or_try_init(|| async {
                let info = self
                    .docker
                    .info()
                    .await
                    .map_err(|e| failed(format!("docker: unavailable ({e})")))?;
                Ok((
                    info.ncpu.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
                    info.mem_total.unwrap_or(0).max(0) as u64,
                    info.server_version.unwrap_or_default(),
                ))
            })
            .await
            .cloned()
    }

    /// Answers whether the engine still responds.
    pub async fn alive(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.docker.ping()).await,
            Ok(Ok(_))
        )
    }

    /// Creates and starts the container of `command_id`, after the policy
    /// agreed; pulls the image first when it is missing.
    pub async fn run(
        &self,
        policy: &Policy,
        command_id: &str,
        spec: &proto::RunContainer,
    ) -> Result<proto::RunContainerResult, Failure> {
        if let Some((id, name)) = self.by_command(command_id).await? {
            // Delivered again: the container exists; make sure it started.
            let _ = self
                .docker
                .start_container(&id, None::<StartContainerOptions>)
                .await;
            return Ok(proto::RunContainerResult {
                container_id: id,
                name,
                existed: true,
            });
        }
        let refuse = |r: Refusal| refused(command_id, &spec.image, r);
        let ask = ask_of(spec).map_err(refuse)?;
        // Checked before any change to the engine (a refused image is not
        // even pulled), and again when it is created: under a lock, against
        // the listed containers plus those being created (reserved until
        // their creation returns, when the listing shows them), so that
        // concurrent commands cannot together pass the total caps while
        // their creations still run in parallel.
        policy.check(&ask, self.usage().await?).map_err(refuse)?;
        if spec.image.is_empty() {
            return Err(failed("RunContainer.image is empty"));
        }
        if self.docker.inspect_image(&spec.image).await.is_err() {
            self.pull(&spec.image, None, |_, _| {}).await?;
        }
        {
            let mut reserved = self.reserved.lock().await;
            let mut usage = self.usage().await?;
            usage.cpus += reserved.0;
            usage.memory = usage.memory.saturating_add(reserved.1);
            policy.check(&ask, usage).map_err(refuse)?;
            reserved.0 += ask.cpus;
            reserved.1 = reserved.1.saturating_add(ask.memory);
        }
        let mut labels = spec.labels.clone();
        labels.retain(|k, _| !k.starts_with("uplink."));
        labels.insert(LABEL_AGENT.into(), self.agent.clone());
        labels.insert(LABEL_COMMAND.into(), command_id.into());
        if !spec.run_id.is_empty() {
            labels.insert(LABEL_RUN.into(), spec.run_id.clone());
        }
        let name = if spec.name.is_empty() {
            format!("uplink-{}", command_id.trim_start_matches("cmd_"))
        } else {
            spec.name.clone()
        };
        let host = HostConfig {
            nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
            memory: (spec.memory_bytes > 0).then_some(spec.memory_bytes as i64),
            // No swap beyond the limit: a container over it is OOM-killed,
            // as a load generator's operator expects, instead of thrashing.
            memory_swap: (spec.memory_bytes > 0).then_some(spec.memory_bytes as i64),
            pids_limit: Some(policy.pids_limit(spec.pids_limit)),
            network_mode: Some(ask.network.clone()),
            privileged: Some(spec.privileged),
            pid_mode: spec.host_pid.then(|| "host".to_string()),
            ipc_mode: spec.host_ipc.then(|| "host".to_string()),
            // The resolved host paths the policy checked, not the asked
            // ones (which may be links).
            binds: (!ask.binds.is_empty()).then(|| {
                ask.binds
                    .iter()
                    .zip(&spec.binds)
                    .map(|((host, container), b)| {
                        format!(
                            "{}:{}{}",
                            host.display(),
                            container.display(),
                            if b.read_only { ":ro" } else { "" }
                        )
                    })
                    .collect()
            }),
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            devices: (!spec.devices.is_empty()).then(|| {
                spec.devices
                    .iter()
                    .map(|d| DeviceMapping {
                        path_on_host: Some(d.clone()),
                        path_in_container: Some(d.clone()),
                        cgroup_permissions: Some("rwm".into()),
                    })
                    .collect()
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            entrypoint: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(host),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await;
        {
            let mut reserved = self.reserved.lock().await;
            reserved.0 = (reserved.0 - ask.cpus).max(0.0);
            reserved.1 = reserved.1.saturating_sub(ask.memory);
        }
        let created = created.map_err(|e| failed(format!("docker create {name}: {e}")))?;
        if let Err(e) = self
            .docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            // A container that never started holds nothing: removed, so
            // that it neither counts against the totals nor waits as an
            // orphan.
            let removed = self
                .docker
                .remove_container(
                    &created.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            self.limits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&created.id);
            let fate = match removed {
                Ok(()) => "was removed".to_string(),
                Err(r) => format!("could not be removed: {r}"),
            };
            return Err(failed(format!(
                "docker start {name}: {}; the container {fate}",
                start_reason(&e)
            )));
        }
        Ok(proto::RunContainerResult {
            container_id: created.id,
            name,
            existed: false,
        })
    }

    /// Resolves a container by id or name, insisting that it is ours.
    async fn ours(&self, container: &str) -> Result<String, Failure> {
        let i = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .map_err(|e| failed(format!("no container {container:?}: {e}")))?;
        if self.is_own(i.id.as_deref()) {
            return Err(Failure {
                status: proto::CommandStatus::Refused,
                message: format!(
                    "container {container:?} is the one this agent runs in; uplink never touches its own container"
                ),
            });
        }
        let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(LABEL_AGENT) != Some(&self.agent) {
            return Err(Failure {
                status: proto::CommandStatus::Refused,
                message: format!(
                    "container {container:?} was not created by this agent; uplink touches only its own containers"
                ),
            });
        }
        Ok(i.id.unwrap_or_else(|| container.to_string()))
    }

    /// Exit code and OOM verdict of an exited container.
    pub async fn exit_of(&self, id: &str) -> Option<(i64, bool)> {
        let i = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let s = i.state?;
        (s.running != Some(true))
            .then(|| (s.exit_code.unwrap_or(-1), s.oom_killed.unwrap_or(false)))
    }

    /// Stops a container: SIGTERM, then SIGKILL after `timeout_s`.
    pub async fn stop(&self, container: &str, timeout_s: u32) -> Result<(), Failure> {
        let id = self.ours(container).await?;
        let t = if timeout_s == 0 {
            10
        } else {
            timeout_s.min(3600)
        } as i32;
        self.docker
            .stop_container(
                &id,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
            .or_else(|e| {
                if e.to_string().contains("304") {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| failed(format!("docker stop {container}: {e}")))
    }

    /// Removes a container. A container that does not exist (any more) is
    /// not an error: the outcome the command asks for holds, and a removal
    /// delivered again must not fail.
    pub async fn remove(&self, container: &str, force: bool) -> Result<bool, Failure> {
        if let Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        {
            return Ok(false);
        }
        let id = self.ours(container).await?;
        self.docker
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force,
                    ..Default::default()
                }),
            )
            .await
            .map(|_| true)
            .map_err(|e| failed(format!("docker rm {container}: {e}")))
    }

    /// This agent's containers.
    pub async fn list(&self) -> Result<Vec<proto::ContainerView>, Failure> {
        let list = self.ours_listed(true, None).await?;
        let mut out: Vec<proto::ContainerView> = list
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                proto::ContainerView {
                    id: c.id.unwrap_or_default(),
                    name: first_name(c.names),
                    image: c.image.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                    command_id: labels.get(LABEL_COMMAND).cloned().unwrap_or_default(),
                    run_id: labels.get(LABEL_RUN).cloned().unwrap_or_default(),
                    exit_code: 0,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The last `tail` log lines, with values of secret-looking environment
    /// variables replaced.
    pub async fn logs(&self, container: &str, tail: u32) -> Result<Vec<String>, Failure> {
        let id = self.ours(container).await?;
        let env = self
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .ok()
            .and_then(|i| i.config)
            .and_then(|c| c.env)
            .unwrap_or_default();
        let secrets = secret_values(&env);
        let tail = if tail == 0 { 100 } else { tail.min(10_000) };
        let mut stream = self.docker.logs(
            &id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: tail.to_string(),
                ..Default::default()
            }),
        );
        let mut text = String::new();
        while let Some(item) = stream.next().await {
            let chunk = item.map_err(|e| failed(format!("docker logs {container}: {e}")))?;
            text.push_str(&chunk.to_string());
        }
        Ok(text.lines().map(|l| redact_line(l, &secrets)).collect())
    }

    /// Watches this agent's containers die and calls `exited` with each
    /// exit, until the engine's event stream ends.
    pub async fn watch_exits(&self, mut exited: impl FnMut(proto::ContainerEvent)) {
        let mut filters = labels_filter(&self.agent, None);
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert("event".into(), vec!["die".into()]);
        let mut events = self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        while let Some(Ok(ev)) = events.next().await {
            let Some(id) = ev.actor.and_then(|a| a.id) else {
                continue;
            };
            if self.is_own(Some(&id)) {
                continue;
            }
            let Ok(i) = self
                .docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
            else {
                continue;
            };
            let state = i.state.unwrap_or_default();
            let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
            exited(proto::ContainerEvent {
                container_id: id,
                name: i
                    .name
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                command_id: labels.get(LABEL_COMMAND).cloned().unwrap_or_default(),
                run_id: labels.get(LABEL_RUN).cloned().unwrap_or_default(),
                kind: proto::ContainerEventKind::Exited as i32,
                exit_code: state.exit_code.unwrap_or(-1),
                oom_killed: state.oom_killed.unwrap_or(false),
            });
        }
    }
}

/// The result of a command the local policy refused, and its audit line.
pub fn refused(command_id: &str, image: &str, r: Refusal) -> Failure {
    tracing::warn!(audit = true, command = %command_id, rule = r.rule, %image, "refused by local policy: {}", r.message);
    Failure {
        status: proto::CommandStatus::Refused,
        message: r.to_string(),
    }
}

/// What `spec` asks of the host, bind mount sources resolved to the real
/// paths Docker would mount.
fn ask_of(spec: &proto::RunContainer) -> Result<Ask, Refusal> {
    let binds = spec
        .binds
        .iter()
        .map(|b| {
            policy::real_path(Path::new(&b.host_path))
                .map(|host| (host, PathBuf::from(&b.container_path)))
        })
        .collect::<Result<_, _>>()?;
    Ok(Ask {
        image: spec.image.clone(),
        privileged: spec.privileged,
        network: if spec.network.is_empty() {
            "bridge".into()
        } else {
            spec.network.clone()
        },
        host_pid: spec.host_pid,
        host_ipc: spec.host_ipc,
        binds,
        capabilities: spec.cap_add.clone(),
        devices: spec.devices.iter().map(PathBuf::from).collect(),
        cpus: spec.cpus,
        memory: spec.memory_bytes,
        pids_limit: spec.pids_limit,
    })
}

/// Why Docker could not start a container, without the client's wrapping.
fn start_reason(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A container's name as listed by Docker, without the leading slash.
fn first_name(names: Option<Vec<String>>) -> String {
    names
        .and_then(|n| n.into_iter().next())
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string()
}

/// What a registry error means for an operator.
fn pull_reason(e: &str) -> String {
    let l = e.to_lowercase();
    if l.contains("not found") || l.contains("manifest unknown") {
        format!("image not found in the registry ({e})")
    } else if l.contains("unauthorized")
        || l.contains("authentication required")
        || l.contains("denied")
    {
        format!("registry authentication failed ({e})")
    } else if l.contains("connection refused")
        || l.contains("no such host")
        || l.contains("timeout")
    {
        format!("registry unreachable ({e})")
    } else {
        e.to_string()
    }
}

/// Values of environment variables whose names look secret.
fn secret_values(env: &[String]) -> Vec<String> {
    const HINTS: [&str; 7] = [
        "PASSWORD",
        "SECRET",
        "TOKEN",
        "KEY",
        "CREDENTIAL",
        "AUTH",
        "PASS",
    ];
    env.iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, v)| v.len() >= 4 && HINTS.iter().any(|h| k.to_ascii_uppercase().contains(h)))
        .map(|(_, v)| v.to_string())
        .collect()
}

fn redact_line(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "[redacted]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_values_are_redacted_in_logs() {
        let env = vec![
            "API_TOKEN=s3cr3t-value".to_string(),
            "DB_PASSWORD=hunter22".to_string(),
            "TARGET_URL=http://sut:8080".to_string(),
            "KEY=ab".to_string(),
        ];
        let s = secret_values(&env);
        assert_eq!(s, vec!["s3cr3t-value".to_string(), "hunter22".to_string()]);
        assert_eq!(
            redact_line("login with hunter22 to http://sut:8080", &s),
            "login with [redacted] to http://sut:8080"
        );
    }

    #[test]
    fn registry_errors_are_named() {
        assert!(pull_reason("manifest unknown: manifest unknown").contains("not found"));
        assert!(pull_reason("unauthorized: authentication required").contains("authentication"));
        assert!(pull_reason("dial tcp 127.0.0.1:1: connection refused").contains("unreachable"));
    }
}
