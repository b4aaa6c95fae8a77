//! The agent service: `Enroll`, the `Subscribe` stream and the task that
//! feeds it, held `Poll`s, and `Report` (results, container events,
//! capacity), each event stored once by its `(epoch, seq)` cursor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::checks::{
    check_enroll_info, check_info, clean_capacity, clean_container_event, clean_result,
};
use super::limits::CONTAINER_EVENTS;
use super::{Core, internal};
use crate::backend::defaults::MAX_STREAMS_PER_AGENT;
use crate::backend::store::AgentRecord;
use crate::proto::{self, Transport};
use crate::secret::{self, Kind, Secret};

/// How long an enrollment's idempotency key finds its agent again.
const ENROLL_KEY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Commands sent in one `PollResponse` at most; the agent polls again.
const MAX_COMMANDS_PER_POLL: usize = 256;
/// How soon a stream reads its agent's commands again after the store
/// could not answer.
const STORE_RETRY: Duration = Duration::from_secs(1);

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
        let now = crate::now_unix_ms();
        if provider.expires_ms > 0 && now >= provider.expires_ms {
            tracing::warn!(provider = %provider.name, hostname = %info.hostname, "enrollment with an expired token");
            return Err(Status::permission_denied(format!(
                "enrollment token of provider {:?} expired {} s ago: ask the operator for a new one (`uplink ctl providers rotate {}`)",
                provider.name,
                (now - provider.expires_ms) / 1000,
                provider.name
            )));
        }
        // After the token, so that only a holder of a valid token learns
        // what the info lacks.
        check_enroll_info(&info)?;
        check_idempotency_key(&req.idempotency_key)?;
        if let Err(wait) = self.enrolls.take(&provider.name) {
            tracing::warn!(provider = %provider.name, hostname = %info.hostname, "enrollment refused: too many with this token");
            return Err(Status::resource_exhausted(format!(
                "too many enrollments with this token: retry in {wait} s"
            )));
        }
        let credential = Secret::generate(Kind::Credential);
        let provider = provider.name;
        let key_hash = match req.idempotency_key.as_str() {
            "" => None,
            key => Some(secret::hash(key)),
        };
        if let Some(key_hash) = &key_hash {
            // A retry of an enrollment whose answer was lost: the same
            // agent, with a new credential (the first was never stored).
            if let Some(id) = self
                .store
                .reenroll(
                    &provider,
                    key_hash,
                    now - ENROLL_KEY_WINDOW_MS,
                    &credential.hash(),
                )
                .await
                .map_err(internal)?
            {
                tracing::info!(agent = %id, %provider, hostname = %info.hostname, "enrollment retried with its idempotency key: same agent, new credential");
                return Ok(proto::EnrollResponse {
                    agent_id: id,
                    credential: credential.expose().to_string(),
                    provider,
                });
            }
        }
        let id = secret::random_id("agt_");
        let inserted = self
            .store
            .insert_agent(
                &AgentRecord {
                    id: id.clone(),
                    provider: provider.clone(),
                    hostname: info.hostname.clone(),
                    version: info.version.clone(),
                    enrolled_ms: now,
                    enroll_key_hash: key_hash,
                    ..Default::default()
                },
                &credential.hash(),
            )
            .await
            .map_err(internal)?;
        if !inserted {
            tracing::warn!(%provider, hostname = %info.hostname, "enrollment past the token's cap of agents");
            return Err(Status::permission_denied(format!(
                "enrollment token of provider {provider:?} has enrolled as many agents as it may: \
                 ask the operator for a new token (`uplink ctl providers rotate {provider} --max-agents N`)"
            )));
        }
        tracing::info!(agent = %id, %provider, hostname = %info.hostname, "agent enrolled");
        Ok(proto::EnrollResponse {
            agent_id: id,
            credential: credential.expose().to_string(),
            provider,
        })
    }

    /// `RotateCredential`: a new credential for `agent`, pending beside the
    /// current one until its first use.
    pub async fn rotate_credential(
        &self,
        agent: String,
        _req: proto::RotateCredentialRequest,
    ) -> Result<proto::RotateCredentialResponse, Status> {
        let credential = Secret::generate(Kind::Credential);
        if !self
            .store
            .set_pending_credential(&agent, &credential.hash())
            .await
            .map_err(internal)?
        {
            return Err(super::revoked(&agent));
        }
        tracing::info!(%agent, "new credential issued; the current one stays valid until the new one is used");
        Ok(proto::RotateCredentialResponse {
            credential: credential.expose().to_string(),
        })
    }

    /// Refuses an agent revoked since its call was authenticated (through
    /// this backend or another one sharing the store).
    async fn check_not_revoked(&self, agent: &str) -> Result<(), Status> {
        match self.store.agent(agent).await.map_err(internal)? {
            Some(a) if a.revoked_ms == 0 => Ok(()),
            _ => Err(super::revoked(agent)),
        }
    }

    /// Applies an agent's ack. `heard`: the call is the agent's own (not an
    /// anonymous `Poll` or `Subscribe` of `doctor` with its credential), so
    /// it counts for the agent's presence.
    pub(super) async fn apply_ack(
        &self,
        agent: &str,
        ack: u64,
        heard: bool,
    ) -> Result<u64, Status> {
        if ack > 1 << 53 {
            return Err(Status::invalid_argument(format!(
                "ack {ack} is out of range"
            )));
        }
        let now = crate::now_unix_ms();
        let acked = self.store.ack(agent, ack, now).await.map_err(internal)?;
        self.hub.notify_acked(agent, acked);
        if heard {
            self.hub.touch(agent, now);
        }
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
        let (tx, rx) = mpsc::channel(64);
        // The first heartbeat (and the agent's settings) go out before any
        // store work: the first frame tells the agent that HTTP/2 passes end
        // to end, and a store that is busy for a moment (a checkpoint, a
        // slow disk) must not read as a blocked path and send it to
        // long-polling. The channel is new, so there is room for both.
        let _ = tx.try_send(Ok(proto::SubscribeResponse {
            frame: Some(self.heartbeat()),
        }));
        if let Some(r) = self.reconfigure() {
            let _ = tx.try_send(Ok(proto::SubscribeResponse { frame: Some(r) }));
        }
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
                r = async {
                    let acked = core.apply_ack(&agent, req.ack, !anonymous).await?;
                    core.record_info(&agent, &info, Transport::Grpc).await?;
                    core.feed_stream(&agent, acked.max(req.ack), &tx).await
                } => r,
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

    /// The commands of `agent` after `after` (at most
    /// [`MAX_COMMANDS_PER_POLL`]), for a stream or held poll: read from the
    /// store until it was read once (`read_once`: what was queued before
    /// the stream or poll opened was not all heard of here), then the ones
    /// the hub holds when it holds every one ([`Hub::queued_after`]), else
    /// read again.
    ///
    /// [`Hub::queued_after`]: crate::backend::hub::Hub::queued_after
    async fn commands_after(
        &self,
        agent: &str,
        after: u64,
        read_once: &mut bool,
    ) -> Result<Vec<proto::Command>, crate::backend::store::StoreError> {
        if *read_once && let Some(held) = self.hub.queued_after(agent, after) {
            return Ok(held);
        }
        let read = self
            .store
            .pending(agent, after, MAX_COMMANDS_PER_POLL)
            .await?;
        *read_once = true;
        Ok(read)
    }

    async fn feed_stream(
        &self,
        agent: &str,
        mut sent: u64,
        tx: &mpsc::Sender<Result<proto::SubscribeResponse, Status>>,
    ) -> Result<&'static str, Status> {
        let frame = |f| Ok(proto::SubscribeResponse { frame: Some(f) });
        let mut queued = self.hub.queued(agent);
        let mut revoked = self.hub.revoked(agent);
        let mut draining = self.draining.clone();
        // `subscribe` sent the first heartbeat and the settings.
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.cfg.heartbeat,
            self.cfg.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_once = false;
        loop {
            queued.borrow_and_update();
            // Set when the store cannot answer (a database restarting): the
            // stream stays open, heartbeats go on, and the commands are
            // read again at this time.
            let mut read_again = None;
            let batch = match self.commands_after(agent, sent, &mut read_once).await {
                Ok(batch) => batch,
                Err(e @ crate::backend::store::StoreError::Unavailable { .. }) => {
                    tracing::debug!(%agent, error = %e, "cannot read the agent's commands now; the stream stays open");
                    read_again = Some(tokio::time::Instant::now() + STORE_RETRY);
                    Vec::new()
                }
                Err(e) => return Err(internal(e)),
            };
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
                _ = async { let _ = revoked.wait_for(|r| *r).await; } => return Err(super::revoked(agent)),
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
                _ = async {
                    match read_again {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = heartbeat.tick() => {
                    // A revocation made through another backend sharing
                    // the store reaches this stream by the next heartbeat
                    // (none can be stored while the store cannot answer).
                    match self.check_not_revoked(agent).await {
                        Err(s) if s.code() != tonic::Code::Unavailable => return Err(s),
                        _ => {}
                    }
                    if tx.send(frame(self.heartbeat())).await.is_err() {
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
        // Without AgentInfo (`doctor` with the agent's credential), a
        // call is not the agent's: it counts for no presence.
        let anonymous = info.hostname.is_empty() && info.version.is_empty();
        let acked = self.apply_ack(&agent, req.ack, !anonymous).await?;
        let presence = self
            .hub
            .presence(&agent, crate::now_unix_ms())
            .unwrap_or_default();
        if presence.transport != Transport::Longpoll as i32
            || presence.reason != info.transport_reason
        {
            self.record_info(&agent, &info, Transport::Longpoll).await?;
        }
        // Nor does it open a connection of the agent's.
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
        let mut revoked = self.hub.revoked(&agent);
        let mut draining = self.draining.clone();
        let after = acked.max(req.ack);
        let mut read_once = false;
        loop {
            queued.borrow_and_update();
            let cmds = self
                .commands_after(&agent, after, &mut read_once)
                .await
                .map_err(internal)?;
            if !cmds.is_empty() {
                return Ok(proto::PollResponse {
                    frames: cmds.into_iter().map(Self::command_frame).collect(),
                });
            }
            tokio::select! {
                biased;
                _ = async { let _ = revoked.wait_for(|r| *r).await; } => return Err(super::revoked(&agent)),
                _ = async { let _ = draining.wait_for(|d| *d).await; } => break,
                r = queued.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.check_not_revoked(&agent).await?;
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
        check_event_seqs(&req.events)?;
        self.apply_ack(&agent, req.ack, true).await?;
        let mut stored = self
            .store
            .cursor(&agent, "events", req.epoch)
            .await
            .map_err(internal)?;
        if let Some(first) = req.events.first() {
            if req.epoch >= proto::ORDERED_EPOCHS {
                let newest = self
                    .store
                    .newest_epoch(&agent, "events")
                    .await
                    .map_err(internal)?;
                if req.epoch < newest {
                    tracing::warn!(%agent, epoch = req.epoch, newest, "events of an epoch older than the agent's newest refused");
                    return Err(Status::failed_precondition(format!(
                        "epoch {} is older than this agent's newest epoch {newest}: \
                         an agent's epochs must increase across its starts (ReportRequest.epoch); \
                         these events are not stored",
                        req.epoch
                    )));
                }
            }
            if first.seq > stored + 1 {
                return Err(Status::failed_precondition(format!(
                    "event seq {} of epoch {} leaves a gap: the backend has stored up to seq {stored}; \
                     send events in seq order, one Report at a time per epoch, from seq {}",
                    first.seq,
                    req.epoch,
                    stored + 1
                )));
            }
            self.admit_epoch(&agent, "events", req.epoch, async { Ok(stored > 0) })
                .await?;
        }
        let mut any_result = false;
        for ev in req.events {
            if ev.seq <= stored {
                continue; // A retried event: already stored.
            }
            match ev.kind {
                Some(proto::event::Kind::Result(mut r)) => {
                    clean_result(&mut r);
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
                Some(proto::event::Kind::Container(mut c)) => {
                    clean_container_event(&mut c);
                    if let Err(e) = self.budgets.take(&agent, CONTAINER_EVENTS) {
                        // What came before is stored: the retry starts here.
                        if any_result {
                            self.results.send_modify(|n| *n += 1);
                        }
                        return Err(e);
                    }
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
                Some(proto::event::Kind::Capacity(mut c)) => {
                    clean_capacity(&mut c);
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

/// An `EnrollRequest.idempotency_key`: empty, or 16 to 128 characters of
/// `[A-Za-z0-9_-]`.
fn check_idempotency_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Ok(());
    }
    if !(16..=128).contains(&key.len())
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Status::invalid_argument(
            "idempotency_key is not valid: use 16 to 128 characters of A-Z a-z 0-9 _ - (a random id)",
        ));
    }
    Ok(())
}

/// The events of one `Report` carry consecutive seqs from 1 up (an
/// empty report carries none): a gap inside a request could never be
/// stored in order.
fn check_event_seqs(events: &[proto::Event]) -> Result<(), Status> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    if first.seq == 0 {
        return Err(Status::invalid_argument(
            "event seq 0: event seqs start at 1 in each epoch",
        ));
    }
    for (i, ev) in events.iter().enumerate() {
        if ev.seq != first.seq + i as u64 {
            return Err(Status::invalid_argument(format!(
                "event seqs of a report must be consecutive: event {i} has seq {}, expected {}",
                ev.seq,
                first.seq + i as u64
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::backend::core::{CoreConfig, RetentionConfig};
    use crate::backend::store::{AgentRecord, SqliteStore, Store};

    async fn core_with_agent() -> (tempfile::TempDir, Arc<Core>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert!(store.create_provider("default", "th", 1).await.unwrap());
        let agent = AgentRecord {
            id: "a1".into(),
            provider: "default".into(),
            enrolled_ms: 1,
            ..Default::default()
        };
        assert!(store.insert_agent(&agent, "ch").await.unwrap());
        let cfg = CoreConfig {
            heartbeat: Duration::from_secs(60),
            poll_hold: Duration::from_secs(25),
            public_url: "https://localhost".into(),
            ca_file: None,
            host_command: Default::default(),
            agent_metrics_interval: None,
            max_message_bytes: 4 << 20,
            retention: RetentionConfig::default(),
        };
        let (drain, draining) = tokio::sync::watch::channel(false);
        std::mem::forget(drain);
        let core = Arc::new(Core::with_admin_hash(Arc::new(store), cfg, "x", draining));
        (dir, core)
    }

    fn capacity(seq: u64) -> proto::Event {
        proto::Event {
            seq,
            time_unix_ms: 1,
            kind: Some(proto::event::Kind::Capacity(proto::Capacity::default())),
        }
    }

    async fn report(core: &Core, epoch: u64, seqs: &[u64]) -> Result<u64, Status> {
        let req = proto::ReportRequest {
            ack: 0,
            epoch,
            events: seqs.iter().map(|&s| capacity(s)).collect(),
        };
        core.report("a1".into(), req).await.map(|r| r.acked_seq)
    }

    /// `acked_seq` never covers an event that was not stored: an event
    /// past the next seq is refused, not skipped.
    #[tokio::test]
    async fn events_out_of_order_are_refused_not_acknowledged() {
        let (_dir, core) = core_with_agent().await;
        let e = report(&core, 5, &[3]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("from seq 1"), "{e:?}");
        assert_eq!(report(&core, 5, &[1, 2]).await.unwrap(), 2);
        assert_eq!(
            report(&core, 5, &[4]).await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(report(&core, 5, &[3, 4]).await.unwrap(), 4);
        // A retry of stored events, in part or whole, is harmless.
        assert_eq!(report(&core, 5, &[2, 3, 4, 5]).await.unwrap(), 5);
        assert_eq!(report(&core, 5, &[1]).await.unwrap(), 5);
        // An empty report answers the cursor.
        assert_eq!(report(&core, 5, &[]).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn event_seq_zero_and_gaps_inside_a_report_are_invalid() {
        let (_dir, core) = core_with_agent().await;
        let e = report(&core, 5, &[0]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = report(&core, 5, &[1, 3]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = report(&core, 5, &[2, 1]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(core.store.cursor("a1", "events", 5).await.unwrap(), 0);
    }

    /// An ordered epoch older than the agent's newest is a restarted agent
    /// reusing an epoch: refused, so its events are not taken for retries.
    #[tokio::test]
    async fn an_older_ordered_epoch_is_refused() {
        let (_dir, core) = core_with_agent().await;
        let (older, newer) = (proto::ORDERED_EPOCHS + 10, proto::ORDERED_EPOCHS + 20);
        assert_eq!(report(&core, older, &[1, 2, 3]).await.unwrap(), 3);
        assert_eq!(report(&core, newer, &[1]).await.unwrap(), 1);
        // The newest epoch goes on.
        assert_eq!(report(&core, newer, &[1, 2]).await.unwrap(), 2);
        for epoch in [older, older + 1] {
            let e = report(&core, epoch, &[1, 2, 3, 4]).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("must increase"), "{e:?}");
        }
        assert_eq!(core.store.cursor("a1", "events", older).await.unwrap(), 3);
        // Epochs below the ordered range (agents that chose them at
        // random) are not ordered.
        assert_eq!(report(&core, 7, &[1]).await.unwrap(), 1);
        assert_eq!(report(&core, 6, &[1]).await.unwrap(), 1);
        // A report without events (an ack) is never refused for its epoch.
        assert_eq!(report(&core, older, &[]).await.unwrap(), 3);
    }

    /// A store another connection holds locked (as a truncating checkpoint
    /// does while the disk syncs) delays the stream's bookkeeping, never
    /// its first frame: the agent must not read a busy store as a path
    /// that blocks HTTP/2.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_heartbeat_does_not_wait_for_the_store() {
        let (dir, core) = core_with_agent().await;

        // Another connection takes the write lock and keeps it 3 s.
        let db = dir.path().join("uplink.db");
        let released = Arc::new(AtomicBool::new(false));
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let locker = {
            let released = released.clone();
            std::thread::spawn(move || {
                let conn = rusqlite::Connection::open(db).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                locked_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(3));
                released.store(true, Ordering::SeqCst);
                conn.execute_batch("COMMIT").unwrap();
            })
        };
        locked_rx.recv().unwrap();

        let req = proto::SubscribeRequest {
            ack: 0,
            info: Some(proto::AgentInfo {
                hostname: "h".into(),
                version: "1".into(),
                ..Default::default()
            }),
        };
        let mut rx = core.subscribe("a1".into(), req).await.unwrap();
        let first = rx.recv().await.unwrap().unwrap();
        assert!(
            !released.load(Ordering::SeqCst),
            "the first frame waited for the store's lock"
        );
        assert!(
            matches!(
                first.frame.and_then(|f| f.kind),
                Some(proto::server_frame::Kind::Heartbeat(_))
            ),
            "the first frame is a heartbeat"
        );
        locker.join().unwrap();
        // Once the lock is gone the bookkeeping is done: the agent's info
        // is recorded.
        let mut recorded = false;
        for _ in 0..100 {
            if core.store.agent("a1").await.unwrap().unwrap().hostname == "h" {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(recorded, "the stream's bookkeeping is done after the lock");
    }
}
