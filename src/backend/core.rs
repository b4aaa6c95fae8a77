//! The backend's logic, independent of transport: the gRPC service and the
//! Connect handlers both call these methods, so every rung carries the same
//! messages with the same meaning.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::hub::Hub;
use super::sinks::{Origin, Rejection, Sinks};
use crate::proto::{self, Transport};
use crate::secret::{self, Kind, Secret};
use super::store::{AgentRecord, BatchSeq, METRIC_SEQ_WINDOW, Store, StoreError};

/// Commands sent in one `PollResponse` at most; the agent polls again.
const MAX_COMMANDS_PER_POLL: usize = 256;
/// Longest `GetCommand` wait.
const MAX_RESULT_WAIT: Duration = Duration::from_secs(60);
/// Longest a `PushMetrics` call waits for its batch to be stored. Storing
/// goes on after that (see [`Core::push_metrics`]); the agent's retry then
/// learns the outcome.
const MAX_PUSH_WAIT: Duration = Duration::from_secs(30);
/// Metric batches with more samples are decoded on a blocking thread
/// (about a millisecond of work), not on an async worker.
const DECODE_INLINE_SAMPLES: usize = 20_000;

/// Why a pushed batch cannot be read.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("the request sets both batch and batch_zstd: set one of them")]
    BothForms,
    #[error("batch_zstd is not a zstd frame of a MetricBatch within {limit} bytes: {why}")]
    Zstd { limit: usize, why: String },
    #[error(transparent)]
    Invalid(crate::metrics::encode::DecodeError),
}

impl BatchError {
    fn reason(&self) -> Rejection {
        match self {
            BatchError::BothForms => Rejection::BothBatchForms,
            BatchError::Zstd { .. } => Rejection::BatchZstd,
            BatchError::Invalid(e) => Rejection::of(e),
        }
    }
}

/// Decompresses (at most `limit` bytes) and decodes a `batch_zstd`.
fn decode_batch_zstd(
    zstd: &[u8],
    limit: usize,
) -> Result<crate::metrics::encode::Decoded, BatchError> {
    let bytes = crate::metrics::compress::Compression::Zstd
        .decompress(zstd, limit)
        .map_err(|e| BatchError::Zstd {
            limit,
            why: e.to_string(),
        })?;
    crate::metrics::encode::decode_bytes(&bytes).map_err(BatchError::Invalid)
}

/// Settings the core needs.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Interval of heartbeat frames on streams.
    pub heartbeat: Duration,
    /// Longest hold of a poll.
    pub poll_hold: Duration,
    /// The URL agents use to reach this backend.
    pub public_url: String,
    /// The CA file agents must trust, when the backend generated its own.
    pub ca_file: Option<std::path::PathBuf>,
    /// The metrics interval agents are asked to use (`Reconfigure`);
    /// None leaves it to each agent.
    pub agent_metrics_interval: Option<Duration>,
    /// Largest message accepted; also the largest `batch_zstd` once
    /// decompressed.
    pub max_message_bytes: usize,
}

/// The backend's state and logic.
pub struct Core {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hub: Arc<Hub>,
    cfg: CoreConfig,
    admin_hash: String,
    pub(super) results: watch::Sender<u64>,
    draining: watch::Receiver<bool>,
    /// Where ingested metric batches go.
    sinks: Sinks,
    /// `(agent, epoch, seq)` of metric batches being stored right now, so a
    /// retry that arrives meanwhile cannot store the same batch again.
    metric_batches_in_flight: Mutex<HashSet<(String, u64, u64)>>,
}

/// A metric batch's place in `metric_batches_in_flight`, given back on
/// drop (also when the storing task is cancelled or panics).
struct InFlight {
    core: Arc<Core>,
    key: (String, u64, u64),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.core
            .metric_batches_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

pub(super) fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::internal(format!("backend store failure: {e}"))
}

/// Checks a free-text field an agent or operator sends.
fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

fn check_info(info: &proto::AgentInfo) -> Result<(), Status> {
    check_len("info.hostname", &info.hostname, 255)?;
    check_len("info.version", &info.version, 64)?;
    check_len("info.os", &info.os, 64)?;
    check_len("info.arch", &info.arch, 64)?;
    check_len("info.transport_reason", &info.transport_reason, 256)
}

/// A valid provider name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_provider_name(name: &str) -> Result<(), Status> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Status::invalid_argument(format!(
            "provider name {name:?} is not valid: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

/// Checks a command before it is queued.
pub fn check_spec(spec: &proto::CommandSpec) -> Result<(), Status> {
    use proto::command_spec::Kind as K;
    match &spec.kind {
        None => Err(Status::invalid_argument(
            "command spec is empty: set one kind, e.g. {\"ping\": {}}",
        )),
        Some(K::Ping(p)) => {
            if p.delay_ms > 600_000 {
                return Err(Status::invalid_argument(format!(
                    "ping.delay_ms is {}; at most 600000 is allowed",
                    p.delay_ms
                )));
            }
            if p.payload.len() > 1024 {
                return Err(Status::invalid_argument(format!(
                    "ping.payload is {} bytes; at most 1024 are allowed",
                    p.payload.len()
                )));
            }
            Ok(())
        }
        Some(K::PullImage(p)) => check_image("pull_image.image", &p.image),
        Some(K::RunContainer(r)) => {
            check_image("run_container.image", &r.image)?;
            check_name("run_container.name", &r.name, true)?;
            if !r.cpus.is_finite() || r.cpus < 0.0 {
                return Err(Status::invalid_argument(format!(
                    "run_container.cpus {} is not a non-negative number of cores",
                    r.cpus
                )));
            }
            if r.env.len() + r.labels.len() + r.command.len() + r.entrypoint.len() > 1000 {
                return Err(Status::invalid_argument(
                    "run_container has more than 1000 env, label, command and entrypoint entries",
                ));
            }
            Ok(())
        }
        Some(K::StopContainer(c)) => check_name("stop_container.container", &c.container, false),
        Some(K::RemoveContainer(c)) => {
            check_name("remove_container.container", &c.container, false)
        }
        Some(K::ContainerLogs(c)) => check_name("container_logs.container", &c.container, false),
        Some(K::ListContainers(_)) => Ok(()),
    }
}

pub(super) fn check_image(field: &str, image: &str) -> Result<(), Status> {
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Status::invalid_argument(format!(
            "{field} {image:?} is not an image reference (1 to 512 characters, no spaces)"
        )));
    }
    Ok(())
}

fn check_name(field: &str, name: &str, may_be_empty: bool) -> Result<(), Status> {
    if (name.is_empty() && !may_be_empty)
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(Status::invalid_argument(format!(
            "{field} {name:?} is not a container id or name (1 to 128 of A-Z a-z 0-9 . _ -)"
        )));
    }
    Ok(())
}

/// Reads a bearer token from an `authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let v = header?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Core {
    /// Builds the core over an opened store; `admin_hash` is the hash of
    /// the admin token.
    pub fn with_admin_hash(
        store: Arc<dyn Store>,
        cfg: CoreConfig,
        admin_hash: &str,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Core {
            store,
            hub: Arc::new(Hub::default()),
            cfg,
            admin_hash: admin_hash.to_string(),
            results: watch::channel(0).0,
            draining,
            sinks: Sinks::in_memory(),
            metric_batches_in_flight: Mutex::new(HashSet::new()),
        }
    }

    /// Replaces the metric sinks (the default keeps latest values only,
    /// with the default limits).
    pub fn with_sinks(mut self, sinks: Sinks) -> Self {
        self.sinks = sinks;
        self
    }

    /// The metric sinks: `/metrics` and the ingest counters.
    pub fn sinks(&self) -> &Sinks {
        &self.sinks
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The durable store.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Wakes the streams and held polls of `agent` after a command was
    /// queued for it directly in the store.
    pub fn wake(&self, agent: &str, seq: u64) {
        self.hub.notify_queued(agent, seq);
    }

    /// The agent whose credential is in `authorization`.
    pub fn authenticate_agent(&self, authorization: Option<&str>) -> Result<String, Status> {
        let token = bearer(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "missing agent credential: send `authorization: Bearer <credential>`",
            )
        })?;
        self.store
            .agent_by_credential(&secret::hash(token))
            .map_err(internal)?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "agent credential unknown or revoked: remove the agent's state dir so it enrolls again",
                )
            })
    }

    /// Checks the admin token in `authorization`.
    pub fn authenticate_admin(&self, authorization: Option<&str>) -> Result<(), Status> {
        let token = bearer(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "missing admin token: send `authorization: Bearer <admin token>`",
            )
        })?;
        if secret::hash(token) != self.admin_hash {
            return Err(Status::unauthenticated("admin token rejected"));
        }
        Ok(())
    }

    /// A command line that runs an agent enrolled with `token`.
    pub fn host_command(&self, token: &str) -> String {
        let url = &self.cfg.public_url;
        match &self.cfg.ca_file {
            Some(ca) => format!(
                "docker run -d --name uplink-agent --restart unless-stopped -v uplink-state:/var/lib/uplink \
                 -v {ca}:/etc/uplink/ca.pem:ro -e UPLINK_CA_FILE=/etc/uplink/ca.pem \
                 -e UPLINK_BACKEND={url} -e UPLINK_TOKEN={token} uplink:latest agent",
                ca = ca.display()
            ),
            None => format!(
                "docker run -d --name uplink-agent --restart unless-stopped -v uplink-state:/var/lib/uplink \
                 -e UPLINK_BACKEND={url} -e UPLINK_TOKEN={token} uplink:latest agent"
            ),
        }
    }

    // ---- agent service -------------------------------------------------

    /// `Enroll`.
    pub fn enroll(&self, req: proto::EnrollRequest) -> Result<proto::EnrollResponse, Status> {
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
            .map_err(internal)?
            .ok_or_else(|| {
                tracing::warn!(hostname = %info.hostname, "enrollment with an unknown or revoked token");
                Status::unauthenticated(
                    "enrollment token rejected by backend: unknown or revoked; ask the operator for the provider's current token",
                )
            })?;
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
            .map_err(internal)?;
        tracing::info!(agent = %id, %provider, hostname = %info.hostname, "agent enrolled");
        Ok(proto::EnrollResponse {
            agent_id: id,
            credential: credential.expose().to_string(),
            provider,
        })
    }

    fn apply_ack(&self, agent: &str, ack: u64) -> Result<u64, Status> {
        if ack > 1 << 53 {
            return Err(Status::invalid_argument(format!(
                "ack {ack} is out of range"
            )));
        }
        let now = crate::now_unix_ms();
        let acked = self.store.ack(agent, ack, now).map_err(internal)?;
        self.hub.notify_acked(agent, acked);
        self.hub.touch(agent, now);
        Ok(acked)
    }

    /// Records what the agent says about itself; a request without a
    /// hostname and version (`doctor` with the agent's credential) keeps
    /// the stored values.
    fn record_info(
        &self,
        agent: &str,
        info: &proto::AgentInfo,
        transport: Transport,
    ) -> Result<(), Status> {
        if info.hostname.is_empty() && info.version.is_empty() {
            return self
                .store
                .touch_agent(agent, crate::now_unix_ms())
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
    pub fn subscribe(
        self: &Arc<Self>,
        agent: String,
        req: proto::SubscribeRequest,
    ) -> Result<mpsc::Receiver<Result<proto::SubscribeResponse, Status>>, Status> {
        let info = req.info.unwrap_or_default();
        check_info(&info)?;
        let acked = self.apply_ack(&agent, req.ack)?;
        self.record_info(&agent, &info, Transport::Grpc)?;
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
        tracing::info!(%agent, ack = req.ack, "stream opened");
        tokio::spawn(async move {
            let _conn = conn;
            let r = core.feed_stream(&agent, acked.max(req.ack), &tx).await;
            let _ = core.store.touch_agent(&agent, crate::now_unix_ms());
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
        let acked = self.apply_ack(&agent, req.ack)?;
        let presence = self
            .hub
            .presence(&agent, crate::now_unix_ms())
            .unwrap_or_default();
        if presence.transport != Transport::Longpoll as i32
            || presence.reason != info.transport_reason
        {
            self.record_info(&agent, &info, Transport::Longpoll)?;
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
    pub fn report(
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
        self.apply_ack(&agent, req.ack)?;
        let mut stored = self
            .store
            .cursor(&agent, "events", req.epoch)
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
                        .map_err(internal)?
                    {
                        true => {
                            any_result = true;
                            self.run_result(&r)?;
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
                        .map_err(internal)?;
                    if new {
                        let kind = proto::ContainerEventKind::try_from(c.kind)
                            .map(|k| k.as_str_name())
                            .unwrap_or("CONTAINER_EVENT_KIND_UNSPECIFIED");
                        tracing::info!(%agent, container = %c.name, command = %c.command_id, run = %c.run_id,
                            kind, exit_code = c.exit_code, oom_killed = c.oom_killed, "container event");
                        self.run_container_event(&agent, &c)?;
                    }
                }
                Some(proto::event::Kind::Capacity(c)) => {
                    tracing::debug!(%agent, cores = c.cpu_cores, running = c.running_containers, docker = %c.docker_status, "capacity");
                    self.store
                        .set_capacity(&agent, &c, crate::now_unix_ms())
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
                .map_err(internal)?;
        }
        if any_result {
            self.results.send_modify(|n| *n += 1);
        }
        Ok(proto::ReportResponse { acked_seq: stored })
    }

    /// `PushMetrics`: validates the batch, deduplicates it by `(agent,
    /// epoch, seq)`, and gives it to the sinks.
    ///
    /// Exactly once, in any order: each `(agent, epoch)` has a contiguous
    /// watermark and the set of seqs stored above it (see
    /// [`Store::metric_batch_state`]), so a lower seq arriving after a
    /// higher one is still stored, and a seq stored before answers
    /// `stored: false` without reaching the sinks again. A seq more than
    /// [`METRIC_SEQ_WINDOW`] above the watermark is refused with
    /// FAILED_PRECONDITION until the missing batches below it arrive.
    ///
    /// Order: the sinks accept the batch, then its seq is recorded, then it
    /// is acknowledged. A backend crash between the first two leaves lines
    /// written for a batch the agent will send again: at least once across
    /// a crash of the backend, exactly once otherwise. A batch is never
    /// acknowledged before every sink took it.
    ///
    /// Errors: INVALID_ARGUMENT (the batch can never be stored; the message
    /// starts with the reason; its seq counts as used, so the watermark
    /// moves past it), FAILED_PRECONDITION (seq too far ahead),
    /// UNAVAILABLE (a sink is behind or failing, the backend is stopping,
    /// or the same batch is being stored by another request): keep the
    /// batch and retry.
    ///
    /// Storing runs in its own task, so a caller that goes away (a timeout,
    /// a cut connection) does not cut it short between the sinks and the
    /// record: the retry then finds the batch stored.
    pub async fn push_metrics(
        self: &Arc<Self>,
        agent: String,
        req: proto::PushMetricsRequest,
    ) -> Result<proto::PushMetricsResponse, Status> {
        self.apply_ack(&agent, req.ack)?;
        let (epoch, seq) = (req.epoch, req.seq);
        let limit = self.cfg.max_message_bytes;
        let decoded = match (req.batch, req.batch_zstd) {
            (Some(_), zstd) if !zstd.is_empty() => Err(BatchError::BothForms),
            (batch, zstd) if zstd.is_empty() => {
                let batch = batch.unwrap_or_default();
                let samples = batch
                    .sample_series
                    .len()
                    .max(batch.sample_series_deltas.len());
                if samples > DECODE_INLINE_SAMPLES {
                    tokio::task::spawn_blocking(move || {
                        crate::metrics::encode::decode(&batch).map_err(BatchError::Invalid)
                    })
                    .await
                    .map_err(|e| {
                        Status::internal(format!("decoding the metric batch failed: {e}"))
                    })?
                } else {
                    crate::metrics::encode::decode(&batch).map_err(BatchError::Invalid)
                }
            }
            (_, zstd) => tokio::task::spawn_blocking(move || decode_batch_zstd(&zstd, limit))
                .await
                .map_err(|e| Status::internal(format!("decoding the metric batch failed: {e}")))?,
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                let reason = e.reason();
                self.sinks.reject(reason);
                tracing::debug!(%agent, epoch, seq, reason = reason.as_str(), error = %e, "metric batch rejected");
                // The agent drops a batch that can never be stored: its seq
                // is used up, so the watermark can pass it. (A retry of it
                // is decoded first, so it still gets this error.)
                if (1..=i64::MAX as u64).contains(&seq)
                    && let Err(e) = self.store.record_metric_batch(&agent, epoch, seq)
                {
                    tracing::warn!(%agent, epoch, seq, error = %e, "cannot record the seq of a rejected metric batch");
                }
                return Err(Status::invalid_argument(format!(
                    "metric batch rejected ({}): {e}",
                    reason.as_str()
                )));
            }
        };
        if seq == 0 || seq > i64::MAX as u64 {
            self.sinks.reject(Rejection::BadSeq);
            return Err(Status::invalid_argument(format!(
                "metric batch rejected (bad_seq): seq {seq} is out of range; batches are numbered 1, 2, 3, ... within their epoch"
            )));
        }
        let key = (agent.clone(), epoch, seq);
        let reserved = self
            .metric_batches_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        if !reserved {
            self.sinks.reject(Rejection::InFlight);
            return Err(Status::unavailable(format!(
                "metric batch (epoch {epoch}, seq {seq}) is being stored by another request; retry to learn whether it was stored"
            )));
        }
        let in_flight = InFlight {
            core: self.clone(),
            key,
        };
        let reject = |reason: Rejection, status: Status| {
            self.sinks.reject(reason);
            status
        };
        match self
            .store
            .metric_batch_state(&agent, epoch, seq)
            .map_err(|e| reject(Rejection::Store, internal(e)))?
        {
            BatchSeq::Seen => {
                self.sinks.duplicate();
                return Ok(proto::PushMetricsResponse {
                    stored: false,
                    reads_series_deltas: true,
                    reads_batch_zstd: true,
                });
            }
            BatchSeq::TooFarAhead { watermark } => {
                return Err(reject(
                    Rejection::SeqTooFarAhead,
                    Status::failed_precondition(format!(
                        "metric batch rejected (seq_too_far_ahead): seq {seq} of epoch {epoch} is more than {METRIC_SEQ_WINDOW} above {watermark}, \
                         the highest seq up to which every batch of the epoch arrived; send batch {} first and retry this one later, \
                         or number new batches in a new epoch",
                        watermark + 1
                    )),
                ));
            }
            BatchSeq::New => {}
        }
        let rec = self
            .store
            .agent(&agent)
            .map_err(|e| reject(Rejection::Store, internal(e)))?
            .unwrap_or_default();
        let origin = Arc::new(Origin {
            agent,
            provider: rec.provider,
            hostname: rec.hostname,
        });
        let samples = decoded.points.len();
        let core = self.clone();
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let agent = origin.agent.clone();
            if let Err(e) = core.sinks.accept(origin, Arc::new(decoded)).await {
                core.sinks.reject(e.reason());
                return Err(Status::unavailable(e.to_string()));
            }
            // A crash here leaves the batch in the sinks but not recorded:
            // its retry is stored again (the documented at-least-once window).
            match core.store.record_metric_batch(&agent, epoch, seq) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%agent, epoch, seq, "metric batch was recorded by someone else meanwhile")
                }
                Err(e) => {
                    core.sinks.reject(Rejection::Store);
                    return Err(internal(e));
                }
            }
            core.sinks.stored(samples);
            Ok(())
        });
        match tokio::time::timeout(MAX_PUSH_WAIT, task).await {
            Ok(Ok(Ok(()))) => Ok(proto::PushMetricsResponse {
                stored: true,
                reads_series_deltas: true,
                reads_batch_zstd: true,
            }),
            Ok(Ok(Err(status))) => Err(status),
            Ok(Err(e)) => Err(Status::internal(format!(
                "storing the metric batch failed: {e}"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "metric batch (epoch {epoch}, seq {seq}) not stored within {MAX_PUSH_WAIT:?}; \
                 retry to learn whether it was stored"
            ))),
        }
    }

    // ---- admin service -------------------------------------------------

    /// `ListAgents`.
    pub fn list_agents(
        &self,
        req: proto::ListAgentsRequest,
    ) -> Result<proto::ListAgentsResponse, Status> {
        let now = crate::now_unix_ms();
        let mut capacities = self.store.capacities().map_err(internal)?;
        let mut agents = Vec::new();
        for a in self.store.agents(&req.provider).map_err(internal)? {
            let presence = self.hub.presence(&a.id, now);
            let pending = self
                .store
                .pending_count(&a.id, a.acked_seq)
                .map_err(internal)?;
            let (connected, transport, reason, last_seen) = match presence {
                Some(p) => (
                    p.connected,
                    p.transport,
                    p.reason,
                    p.last_seen_ms.max(a.last_seen_ms),
                ),
                None => (false, a.transport, a.transport_reason, a.last_seen_ms),
            };
            let capacity = capacities.remove(&a.id).map(|(c, _)| c);
            agents.push(proto::AgentView {
                id: a.id,
                hostname: a.hostname,
                provider: a.provider,
                connected,
                transport,
                transport_reason: reason,
                last_seen_unix_ms: last_seen,
                version: a.version,
                acked_seq: a.acked_seq,
                pending_commands: pending,
                enrolled_unix_ms: a.enrolled_ms,
                capacity,
            });
        }
        Ok(proto::ListAgentsResponse { agents })
    }

    /// `ListProviders`.
    pub fn list_providers(&self) -> Result<proto::ListProvidersResponse, Status> {
        Ok(proto::ListProvidersResponse {
            providers: self
                .store
                .providers()
                .map_err(internal)?
                .into_iter()
                .map(|p| proto::ProviderView {
                    name: p.name,
                    created_unix_ms: p.created_ms,
                    agents: p.agents,
                })
                .collect(),
        })
    }

    /// `CreateProvider`.
    pub fn create_provider(
        &self,
        req: proto::CreateProviderRequest,
    ) -> Result<proto::CreateProviderResponse, Status> {
        check_provider_name(&req.name)?;
        let token = Secret::generate(Kind::Enrollment);
        let now = crate::now_unix_ms();
        if !self
            .store
            .create_provider(&req.name, &token.hash(), now)
            .map_err(internal)?
        {
            return Err(Status::already_exists(format!(
                "provider {:?} exists already",
                req.name
            )));
        }
        tracing::info!(provider = %req.name, "provider created");
        Ok(proto::CreateProviderResponse {
            provider: Some(proto::ProviderView {
                name: req.name,
                created_unix_ms: now,
                agents: 0,
            }),
            host_command: self.host_command(token.expose()),
            enrollment_token: token.expose().to_string(),
        })
    }

    /// `RotateEnrollmentToken`.
    pub fn rotate_token(
        &self,
        req: proto::RotateEnrollmentTokenRequest,
    ) -> Result<proto::RotateEnrollmentTokenResponse, Status> {
        check_provider_name(&req.provider)?;
        let token = Secret::generate(Kind::Enrollment);
        if !self
            .store
            .set_provider_token(&req.provider, &token.hash())
            .map_err(internal)?
        {
            return Err(Status::not_found(format!("no provider {:?}", req.provider)));
        }
        tracing::info!(provider = %req.provider, "enrollment token rotated; the old one is revoked");
        Ok(proto::RotateEnrollmentTokenResponse {
            host_command: self.host_command(token.expose()),
            enrollment_token: token.expose().to_string(),
        })
    }

    /// `EnqueueCommand`.
    pub fn enqueue(
        &self,
        req: proto::EnqueueCommandRequest,
    ) -> Result<proto::EnqueueCommandResponse, Status> {
        let spec = req.spec.ok_or_else(|| {
            Status::invalid_argument(
                "spec is missing: say what the command is, e.g. {\"ping\": {}}",
            )
        })?;
        check_spec(&spec)?;
        let id = secret::random_id("cmd_");
        let command = self
            .store
            .enqueue(&req.agent_id, &id, &spec, crate::now_unix_ms())
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no agent {:?}; `uplink ctl agents` lists them",
                    req.agent_id
                ))
            })?;
        self.hub.notify_queued(&req.agent_id, command.seq);
        tracing::debug!(agent = %req.agent_id, command = %id, seq = command.seq, "command queued");
        Ok(proto::EnqueueCommandResponse {
            command: Some(command),
        })
    }

    /// `GetCommand`, waiting up to `wait_ms` for the result.
    pub async fn get_command(
        &self,
        req: proto::GetCommandRequest,
    ) -> Result<proto::GetCommandResponse, Status> {
        let wait = Duration::from_millis(req.wait_ms as u64).min(MAX_RESULT_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut results = self.results.subscribe();
        loop {
            results.borrow_and_update();
            let rec = self
                .store
                .command(&req.command_id)
                .map_err(internal)?
                .ok_or_else(|| Status::not_found(format!("no command {:?}", req.command_id)))?;
            if rec.done_ms > 0 || tokio::time::Instant::now() >= deadline {
                let state = if rec.done_ms > 0 {
                    proto::CommandState::Done
                } else if rec.accepted_ms > 0 {
                    proto::CommandState::Accepted
                } else {
                    proto::CommandState::Queued
                };
                return Ok(proto::GetCommandResponse {
                    command: Some(proto::CommandView {
                        command: Some(rec.command),
                        agent_id: rec.agent_id,
                        state: state as i32,
                        accepted_unix_ms: rec.accepted_ms,
                        done_unix_ms: rec.done_ms,
                        result: rec.result,
                    }),
                });
            }
            tokio::select! {
                _ = results.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Waits until `agent` has acknowledged `seq` (used by benchmarks and
    /// the demo to time dispatch without polling).
    pub async fn wait_acked(&self, agent: &str, seq: u64) {
        let mut rx = self.hub.acked(agent);
        let _ = rx.wait_for(|a| *a >= seq).await;
    }
}

/// Checks that a batch is internally consistent. The decoder in
/// [`crate::metrics::encode`] is the one validator of batches; its error
/// names the offending sample, series or field, and the message starts with
/// the reason counted in `uplink_backend_metric_batches_rejected_total`.
pub fn validate_batch(b: &proto::MetricBatch) -> Result<(), Status> {
    crate::metrics::encode::decode(b).map(|_| ()).map_err(|e| {
        Status::invalid_argument(format!(
            "metric batch rejected ({}): {e}",
            Rejection::of(&e).as_str()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn specs_are_checked() {
        assert!(check_spec(&proto::CommandSpec::default()).is_err());
        let big = proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                delay_ms: 600_001,
                payload: String::new(),
            })),
        };
        assert!(check_spec(&big).unwrap_err().message().contains("600000"));
    }

    #[test]
    fn inconsistent_batches_are_rejected_with_a_reason() {
        let mut b = proto::MetricBatch {
            symbols: vec!["".into(), "m".into()],
            series: vec![proto::Series {
                name: 1,
                ..Default::default()
            }],
            sample_series: vec![0],
            sample_time_delta_ms: vec![0],
            sample_values: vec![1.0],
            ..Default::default()
        };
        assert!(validate_batch(&b).is_ok());
        b.sample_series = vec![1];
        assert!(
            validate_batch(&b)
                .unwrap_err()
                .message()
                .contains("series 1")
        );
        b.sample_series = vec![0, 0];
        assert!(validate_batch(&b).unwrap_err().message().contains("differ"));
    }

    #[test]
    fn provider_names_are_checked() {
        assert!(check_provider_name("lab-1.eu_west").is_ok());
        assert!(check_provider_name("").is_err());
        assert!(check_provider_name("a b").is_err());
    }
}
