//! The agent service: `Enroll`, the `Subscribe` stream and the task that
//! feeds it, held `Poll`s, and `Report` (results, container events,
//! capacity), each event stored once by its `(epoch, seq)` cursor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::checks::check_info;
use super::{Core, internal};
use crate::backend::defaults::MAX_STREAMS_PER_AGENT;
use crate::backend::store::AgentRecord;
use crate::proto::{self, Transport};
use crate::secret::{self, Kind, Secret};

/// Commands sent in one `PollResponse` at most; the agent polls again.
const MAX_COMMANDS_PER_POLL: usize = 256;

impl Core {
    /// `Enroll`.
    pub async fn enroll(&self, req: proto::EnrollRequest) -> Result<proto::EnrollResponse, Status> {
        let info = req.info.unwrap_or_default();
        check_info(&info)?;
        if req.enrollment_token.is_empty() || req.enrollment_token.len() > 256 {
            return Err(Status::unauthenticated(
                "enrollment token rejected by backend",
            ));
        }
        let provider = self
            .store
            .provider_by_token(&secret::hash(&req.enrollment_token))
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                tracing::warn!(hostname = %info.hostname, "enrollment with an unknown or revoked token");
                Status::unauthenticated(
                    "enrollment token rejected by backend: unknown or revoked; ask the operator for the provider's current token",
                )
            })?;
        if let Err(wait) = self.enrolls.take(&provider) {
            tracing::warn!(%provider, hostname = %info.hostname, "enrollment refused: too many with this token");
            return Err(Status::resource_exhausted(format!(
                "too many enrollments with this token: retry in {wait} s"
            )));
        }
        let id = secret::random_id("agt_");
        let credential = Secret::generate(Kind::Credential);
        let now = crate::now_unix_ms();
        self.store
            .insert_agent(
                &AgentRecord {
                    id: id.clone(),
                    provider: provider.clone(),
                    hostname: info.hostname.clone(),
                    version: info.version.clone(),
                    enrolled_ms: now,
                    ..Default::default()
                },
                &credential.hash(),
            )
            .await
            .map_err(internal)?;
        tracing::info!(agent = %id, %provider, hostname = %info.hostname, "agent enrolled");
        Ok(proto::EnrollResponse {
            agent_id: id,
            credential: credential.expose().to_string(),
            provider,
        })
    }

    pub(super) async fn apply_ack(&self, agent: &str, ack: u64) -> Result<u64, Status> {
        if ack > 1 << 53 {
            return Err(Status::invalid_argument(format!(
                "ack {ack} is out of range"
            )));
        }
        let now = crate::now_unix_ms();
        let acked = self.store.ack(agent, ack, now).await.map_err(internal)?;
        self.hub.notify_acked(agent, acked);
        self.hub.touch(agent, now);
        Ok(acked)
    }

    /// Records what the agent says about itself; a request without a
    /// hostname and version (`doctor` with the agent's credential) keeps
    /// the stored values.
    async fn record_info(
        &self,
        agent: &str,
        info: &proto::AgentInfo,
        transport: Transport,
    ) -> Result<(), Status> {
        if info.hostname.is_empty() && info.version.is_empty() {
            return self
                .store
                .touch_agent(agent, crate::now_unix_ms())
                .await
                .map_err(internal);
        }
        self.store
            .update_agent_info(
                agent,
                &info.hostname,
                &info.version,
                transport as i32,
                &info.transport_reason,
                crate::now_unix_ms(),
            )
            .await
            .map_err(internal)
    }

    fn heartbeat(&self) -> proto::ServerFrame {
        proto::ServerFrame {
            kind: Some(proto::server_frame::Kind::Heartbeat(proto::Heartbeat {
                server_time_unix_ms: crate::now_unix_ms(),
                interval_ms: self.cfg.heartbeat.as_millis() as u32,
            })),
        }
    }

    /// The `Reconfigure` frame for agents, when the backend sets anything.
    fn reconfigure(&self) -> Option<proto::ServerFrame> {
        let metrics = self.cfg.agent_metrics_interval?;
        Some(proto::ServerFrame {
            kind: Some(proto::server_frame::Kind::Reconfigure(proto::Reconfigure {
                heartbeat_interval_ms: self.cfg.heartbeat.as_millis() as u32,
                metrics_interval_ms: metrics.as_millis().min(u32::MAX as u128) as u32,
            })),
        })
    }

    fn command_frame(c: proto::Command) -> proto::ServerFrame {
        proto::ServerFrame {
            kind: Some(proto::server_frame::Kind::Command(c)),
        }
    }

    /// `Subscribe`: returns the receiving end of the stream. A task feeds it
    /// until the agent goes away or the backend drains.
    pub async fn subscribe(
        self: &Arc<Self>,
        agent: String,
        req: proto::SubscribeRequest,
    ) -> Result<mpsc::Receiver<Result<proto::SubscribeResponse, Status>>, Status> {
        let info = req.info.unwrap_or_default();
        check_info(&info)?;
        let acked = self.apply_ack(&agent, req.ack).await?;
        self.record_info(&agent, &info, Transport::Grpc).await?;
        let (tx, rx) = mpsc::channel(64);
        let core = self.clone();
        let anonymous = info.hostname.is_empty() && info.version.is_empty();
        let conn = (!anonymous).then(|| {
            self.hub.open(
                &agent,
                Transport::Grpc,
                &info.transport_reason,
                crate::now_unix_ms(),
            )
        });
        let ticket = self.hub.admit_stream(&agent, MAX_STREAMS_PER_AGENT);
        tracing::info!(%agent, ack = req.ack, "stream opened");
        tokio::spawn(async move {
            let _conn = conn;
            let r = tokio::select! {
                r = core.feed_stream(&agent, acked.max(req.ack), &tx) => r,
                _ = ticket.replaced() => {
                    let rotate = proto::ServerFrame {
                        kind: Some(proto::server_frame::Kind::Rotate(proto::Rotate {
                            reason: "replaced by a newer stream of this agent".into(),
                        })),
                    };
                    let _ = tx.send(Ok(proto::SubscribeResponse { frame: Some(rotate) })).await;
                    Ok("replaced by a newer stream of this agent")
                }
            };
            let _ = core.store.touch_agent(&agent, crate::now_unix_ms()).await;
            match r {
                Ok(reason) => tracing::info!(%agent, reason, "stream closed"),
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "stream failed");
                    let _ = tx.send(Err(e)).await;
                }
            }
        });
        Ok(rx)
    }

    async fn feed_stream(
        &self,
        agent: &str,
        mut sent: u64,
        tx: &mpsc::Sender<Result<proto::SubscribeResponse, Status>>,
    ) -> Result<&'static str, Status> {
        let frame = |f| Ok(proto::SubscribeResponse { frame: Some(f) });
        let mut queued = self.hub.queued(agent);
        let mut draining = self.draining.clone();
        // The first tick fires at once: the agent sees a heartbeat right
        // after opening the stream, which proves the path works end to end.
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconfigure = self.reconfigure();
        loop {
            queued.borrow_and_update();
            let batch = self
                .store
                .pending(agent, sent, MAX_COMMANDS_PER_POLL)
                .await
                .map_err(internal)?;
            let full = batch.len() == MAX_COMMANDS_PER_POLL;
            for c in batch {
                sent = c.seq;
                if tx.send(frame(Self::command_frame(c))).await.is_err() {
                    return Ok("agent went away");
                }
            }
            if full {
                // A backlog: keep sending (the channel paces it) rather than
                // waiting for the next wake-up.
                continue;
            }
            tokio::select! {
                biased;
                _ = tx.closed() => return Ok("agent went away"),
                _ = async { let _ = draining.wait_for(|d| *d).await; } => {
                    let rotate = proto::ServerFrame {
                        kind: Some(proto::server_frame::Kind::Rotate(proto::Rotate {
                            reason: "backend is shutting down".into(),
                        })),
                    };
                    let _ = tx.send(frame(rotate)).await;
                    return Ok("backend draining");
                }
                r = queued.changed() => if r.is_err() { return Ok("hub closed") },
                _ = heartbeat.tick() => {
                    if tx.send(frame(self.heartbeat())).await.is_err() {
                        return Ok("agent went away");
                    }
                    // Right after the first heartbeat: the backend's
                    // settings for this agent.
                    if let Some(r) = reconfigure.take()
                        && tx.send(frame(r)).await.is_err()
                    {
                        return Ok("agent went away");
                    }
                }
            }
        }
    }

    /// `Poll`: held until a command is queued or the hold time passes.
    pub async fn poll(
        &self,
        agent: String,
        req: proto::PollRequest,
    ) -> Result<proto::PollResponse, Status> {
        let info = req.info.unwrap_or_default();
        check_info(&info)?;
        let acked = self.apply_ack(&agent, req.ack).await?;
        let presence = self
            .hub
            .presence(&agent, crate::now_unix_ms())
            .unwrap_or_default();
        if presence.transport != Transport::Longpoll as i32
            || presence.reason != info.transport_reason
        {
            self.record_info(&agent, &info, Transport::Longpoll).await?;
        }
        // A request without AgentInfo (`doctor` with the agent's
        // credential) is not the agent's connection: leave presence alone.
        let anonymous = info.hostname.is_empty() && info.version.is_empty();
        let _conn = (!anonymous).then(|| {
            self.hub.open(
                &agent,
                Transport::Longpoll,
                &info.transport_reason,
                crate::now_unix_ms(),
            )
        });
        let hold = match req.hold_ms {
            0 => self.cfg.poll_hold,
            ms => Duration::from_millis(ms as u64).min(self.cfg.poll_hold),
        };
        let deadline = tokio::time::Instant::now() + hold;
        let mut queued = self.hub.queued(&agent);
        let mut draining = self.draining.clone();
        let after = acked.max(req.ack);
        loop {
            queued.borrow_and_update();
            let cmds = self
                .store
                .pending(&agent, after, MAX_COMMANDS_PER_POLL)
                .await
                .map_err(internal)?;
            if !cmds.is_empty() {
                return Ok(proto::PollResponse {
                    frames: cmds.into_iter().map(Self::command_frame).collect(),
                });
            }
            tokio::select! {
                biased;
                _ = async { let _ = draining.wait_for(|d| *d).await; } => break,
                r = queued.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        Ok(proto::PollResponse {
            frames: std::iter::once(self.heartbeat())
                .chain(self.reconfigure())
                .collect(),
        })
    }

    /// `Report`.
    pub async fn report(
        &self,
        agent: String,
        req: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, Status> {
        if req.events.len() > 10_000 {
            return Err(Status::invalid_argument(format!(
                "{} events in one report; at most 10000 are allowed",
                req.events.len()
            )));
        }
        self.apply_ack(&agent, req.ack).await?;
        let mut stored = self
            .store
            .cursor(&agent, "events", req.epoch)
            .await
            .map_err(internal)?;
        let mut any_result = false;
        for ev in req.events {
            if ev.seq <= stored {
                continue; // A retried event: already stored.
            }
            match ev.kind {
                Some(proto::event::Kind::Result(mut r)) => {
                    if proto::CommandStatus::try_from(r.status).unwrap_or_default()
                        == proto::CommandStatus::Unspecified
                    {
                        tracing::warn!(%agent, command = %r.command_id, status = r.status, "result without a known status; stored as failed");
                        r.message = format!(
                            "agent sent status {} (not in the contract): {}",
                            r.status, r.message
                        );
                        r.status = proto::CommandStatus::Failed as i32;
                    }
                    match self
                        .store
                        .complete(&agent, &r, crate::now_unix_ms())
                        .await
                        .map_err(internal)?
                    {
                        true => {
                            any_result = true;
                            self.run_result(&r).await?;
                        }
                        false => {
                            tracing::debug!(%agent, command = %r.command_id, "result for an unknown or finished command ignored")
                        }
                    }
                }
                Some(proto::event::Kind::Container(c)) => {
                    let new = self
                        .store
                        .container_event(&agent, &c, crate::now_unix_ms())
                        .await
                        .map_err(internal)?;
                    if new {
                        let kind = proto::ContainerEventKind::try_from(c.kind)
                            .map(|k| k.as_str_name())
                            .unwrap_or("CONTAINER_EVENT_KIND_UNSPECIFIED");
                        tracing::info!(%agent, container = %c.name, command = %c.command_id, run = %c.run_id,
                            kind, exit_code = c.exit_code, oom_killed = c.oom_killed, "container event");
                        self.run_container_event(&agent, &c).await?;
                    }
                }
                Some(proto::event::Kind::Capacity(c)) => {
                    tracing::debug!(%agent, cores = c.cpu_cores, running = c.running_containers, docker = %c.docker_status, "capacity");
                    self.store
                        .set_capacity(&agent, &c, crate::now_unix_ms())
                        .await
                        .map_err(internal)?;
                }
                Some(proto::event::Kind::Progress(p)) => {
                    tracing::debug!(%agent, command = %p.command_id, percent = p.percent, "progress");
                }
                None => {}
            }
            stored = ev.seq;
            self.store
                .advance_cursor(&agent, "events", req.epoch, ev.seq)
                .await
                .map_err(internal)?;
        }
        if any_result {
            self.results.send_modify(|n| *n += 1);
        }
        Ok(proto::ReportResponse { acked_seq: stored })
    }
}
