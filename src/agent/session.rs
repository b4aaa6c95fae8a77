//! The agent's session: enrollment, the rung loop, command intake through
//! the journal, and the reporter that carries results and acks back.
//!
//! Tasks and channels:
//!
//! ```text
//!  rung loop ──(accept: journal, ack watch)──> executor tasks ──(events, bounded)──> reporter
//!      │                                                                  │
//!      └─ publishes the unary client of its rung ─────────────────────────┘
//! ```
//!
//! The events channel holds [`EVENT_BUFFER`] entries and the reporter keeps
//! at most [`MAX_UNACKED_EVENTS`] unacknowledged ones; when both are full,
//! executors wait (results are never dropped, memory stays bounded). The
//! reporter sends at most [`REPORT_BATCH`] events per `Report` and keeps
//! them until the backend acknowledges their seq.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::identity::{self, Identity};
use super::journal::{Decision, Journal};
use super::ladder::{Ladder, LadderConfig, Move, Rung, StreamEnd, jitter as ld_jitter};
use super::{AgentConfig, AgentError, TransportMode, executor};
use crate::backoff::Retry;
use crate::client::{self, CallError, ConnectClient, FailureKind};
use crate::net::Net;
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::secret::Secret;

/// Events buffered between executors and the reporter.
const EVENT_BUFFER: usize = 1024;
/// Events per `Report` at most.
const REPORT_BATCH: usize = 500;
/// Events the reporter holds unacknowledged at most; beyond, it stops
/// taking events and executors wait on the full channel.
const MAX_UNACKED_EVENTS: usize = 4096;
/// Commands executing at once at most.
const MAX_RUNNING: u32 = 256;
/// How long a new stream may take to deliver its first frame (the backend
/// sends a heartbeat at once). Short, so that a path that swallows HTTP/2
/// costs the ladder seconds, not minutes.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(4);
/// Timeout of unary calls.
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

const AGENT_SERVICE: &str = "uplink.v1.AgentService";

/// A unary client on the current rung.
#[derive(Clone)]
enum Unary {
    Grpc(AgentServiceClient<Channel>),
    Connect(Box<ConnectClient>),
}

fn grpc_request<T>(msg: T, credential: Option<&Secret>) -> Result<tonic::Request<T>, CallError> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(UNARY_TIMEOUT);
    if let Some(c) = credential {
        let v = MetadataValue::try_from(format!("Bearer {}", c.expose())).map_err(|_| CallError {
            kind: FailureKind::Other,
            message: "the stored credential is not a valid header value; remove identity.json to enroll again"
                .into(),
        })?;
        r.metadata_mut().insert("authorization", v);
    }
    Ok(r)
}

impl Unary {
    async fn enroll(&self, req: proto::EnrollRequest) -> Result<proto::EnrollResponse, CallError> {
        match self {
            Unary::Grpc(c) => c
                .clone()
                .enroll(grpc_request(req, None)?)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s)),
            Unary::Connect(c) => c.call(AGENT_SERVICE, "Enroll", &req, UNARY_TIMEOUT).await,
        }
    }

    async fn report(
        &self,
        credential: &Secret,
        req: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, CallError> {
        match self {
            Unary::Grpc(c) => c
                .clone()
                .report(grpc_request(req, Some(credential))?)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s)),
            Unary::Connect(c) => c.call(AGENT_SERVICE, "Report", &req, UNARY_TIMEOUT).await,
        }
    }

    /// `PushMetrics`, compressed with zstd on either rung: by the
    /// transport, or already (`batch_zstd`), when the request goes as it is.
    async fn push_metrics(
        &self,
        credential: &Secret,
        req: proto::PushMetricsRequest,
    ) -> Result<proto::PushMetricsResponse, CallError> {
        let compressed = !req.batch_zstd.is_empty();
        match self {
            Unary::Grpc(c) => {
                let mut c = c.clone();
                if !compressed {
                    c = c.send_compressed(tonic::codec::CompressionEncoding::Zstd);
                }
                c.push_metrics(grpc_request(req, Some(credential))?)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| CallError::from_tonic(&s))
            }
            Unary::Connect(c) => {
                c.call_encoded(
                    AGENT_SERVICE,
                    "PushMetrics",
                    &req,
                    UNARY_TIMEOUT,
                    !compressed,
                )
                .await
            }
        }
    }
}

/// A gRPC stream that delivered its first frame.
struct OpenStream {
    client: AgentServiceClient<Channel>,
    stream: tonic::Streaming<proto::SubscribeResponse>,
    first: proto::SubscribeResponse,
    /// The ack it was opened with.
    ack: u64,
}

/// The stream a gRPC session reads.
struct LiveStream {
    stream: tonic::Streaming<proto::SubscribeResponse>,
    /// Its first frame, not yet handled.
    first: Option<proto::SubscribeResponse>,
    /// Heartbeats it delivered (the ladder judges early deaths by them).
    heartbeats: u32,
    opened: tokio::time::Instant,
    /// When it is replaced, make before break.
    rotate_at: tokio::time::Instant,
}

/// A stream being opened.
type Opening = Pin<Box<dyn Future<Output = Result<OpenStream, CallError>> + Send>>;

/// How a rung session ended.
enum Outcome {
    Shutdown,
    /// A probe's stream is up: climb to gRPC with it.
    Climb(Box<OpenStream>),
    /// Reconnect after backoff.
    Failed(CallError),
}

/// A cloneable shutdown signal.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

struct Agent {
    cfg: AgentConfig,
    net: Net,
    info: proto::AgentInfo,
    /// Why the agent is on its rung, sent with every `Subscribe`/`Poll`.
    reason: Mutex<String>,
    credential: Secret,
    journal: Mutex<Journal>,
    ack: watch::Sender<u64>,
    events: mpsc::Sender<proto::event::Kind>,
    unary: watch::Sender<Option<Unary>>,
    running: Arc<Semaphore>,
    /// Events emitted and not yet acknowledged by the backend.
    unacked: watch::Sender<usize>,
    /// Runs the commands.
    executor: Arc<executor::Executor>,
    /// The last ack the backend confirmed receiving.
    ack_delivered: watch::Sender<u64>,
    /// Wakes the capacity reporter: something may have changed it.
    capacity_changed: tokio::sync::Notify,
    /// The metrics interval the backend asked for (`Reconfigure`).
    metrics_interval: watch::Sender<Option<Duration>>,
}

/// How often capacity is measured when nothing wakes the reporter earlier
/// (it notices an engine that went or came back).
const CAPACITY_INTERVAL: Duration = Duration::from_secs(10);

pub(super) async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let net = Net::new(crate::tls::client_config(&cfg.trust)?, cfg.proxy.clone());
    let metrics_task = match cfg.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            match crate::telemetry::install() {
                Some(handle) => {
                    tracing::info!(addr = %local, "metrics listening on http://{local}/metrics");
                    Some(tokio::spawn(crate::telemetry::serve(
                        listener,
                        handle,
                        std::future::pending(),
                    )))
                }
                None => {
                    tracing::warn!(
                        "another metrics recorder is installed in this process; --metrics-listen serves nothing"
                    );
                    None
                }
            }
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stop = Stop(stop_rx);
    let body = async {
        let reason = String::new();
        let info = proto::AgentInfo {
            hostname: cfg.hostname.clone(),
            version: crate::VERSION.into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            transport_reason: reason,
        };
        let Some(ident) = enrolled(&cfg, &net, &info, &mut stop).await? else {
            return Ok(());
        };
        tracing::info!(agent = %ident.agent_id, provider = %ident.provider, backend = %cfg.backend,
            transport = cfg.transport.name(), "agent starting");
        let jpath = cfg
            .state_dir
            .join(format!("journal-{}.log", ident.agent_id));
        let journal = Journal::open(&jpath).map_err(|source| AgentError::Journal {
            path: jpath.clone(),
            source,
        })?;
        if journal.skipped_lines > 0 {
            tracing::warn!(lines = journal.skipped_lines, path = %jpath.display(), "skipped torn or corrupt journal lines");
        }
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let agent = Arc::new(Agent {
            ack: watch::channel(journal.ack()).0,
            journal: Mutex::new(journal),
            credential: Secret::new(ident.credential.clone()),
            cfg: cfg.clone(),
            net: net.clone(),
            reason: Mutex::new(String::new()),
            info,
            events: events_tx,
            unary: watch::channel(None).0,
            running: Arc::new(Semaphore::new(MAX_RUNNING as usize)),
            unacked: watch::channel(0).0,
            executor: Arc::new(executor::Executor::new(&ident.agent_id, cfg.policy.clone())),
            ack_delivered: watch::channel(0).0,
            capacity_changed: tokio::sync::Notify::new(),
            metrics_interval: watch::channel(None).0,
        });
        let reporter = tokio::spawn(agent.clone().reporter(events_rx));
        // Recovery reports through the reporter, which needs a rung: run it
        // beside the rung loop, never before it.
        let recovering = {
            let a = agent.clone();
            tokio::spawn(async move { a.recover().await })
        };
        // Containers are reconciled after recovery, which settles what the
        // journal says about each command.
        let watcher = {
            let a = agent.clone();
            let recovered = recovering;
            tokio::spawn(async move {
                let _ = recovered.await;
                a.watch_containers().await
            })
        };
        let capacity = tokio::spawn(agent.clone().report_capacity());
        let pipeline = match &cfg.metrics {
            Some(m) => {
                let a = agent.clone();
                let push: crate::metrics::pipeline::Push = Arc::new(move |req| {
                    let a = a.clone();
                    Box::pin(async move { super::push::outcome(a.push_metrics(req).await) })
                });
                match crate::metrics::pipeline::Pipeline::start(
                    m,
                    cfg.state_dir.clone(),
                    push,
                    &ident.agent_id,
                    agent.metrics_interval.subscribe(),
                )
                .await
                {
                    Ok(p) => Some(p),
                    Err(e) => return Err(AgentError::Metrics(e)),
                }
            }
            None => None,
        };
        agent.rungs(stop.clone()).await;
        if let Some(p) = pipeline {
            p.shutdown(tokio::time::Instant::now() + cfg.grace).await;
        }

        // Shutdown: let running commands finish, then pending reports.
        let grace = tokio::time::Instant::now() + cfg.grace;
        let all = tokio::time::timeout_at(grace, agent.running.acquire_many(MAX_RUNNING)).await;
        if all.is_err() {
            tracing::warn!(
                "commands still running at the end of the grace time; they will be reported as interrupted after restart"
            );
        }
        let ack = *agent.ack.borrow();
        let mut unacked = agent.unacked.subscribe();
        let mut delivered = agent.ack_delivered.subscribe();
        let flushed = async {
            let _ = unacked.wait_for(|n| *n == 0).await;
            let _ = delivered.wait_for(|a| *a >= ack).await;
        };
        if tokio::time::timeout_at(grace, flushed).await.is_err() {
            tracing::warn!(
                "reports still pending at the end of the grace time; they are sent again after restart"
            );
        }
        reporter.abort();
        watcher.abort();
        capacity.abort();
        if let Some(t) = &metrics_task {
            t.abort();
        }
        tracing::info!("agent stopped");
        Ok(())
    };
    // The body sees the shutdown through `stop` and winds down by itself.
    tokio::pin!(body);
    tokio::pin!(shutdown);
    let mut signalled = false;
    loop {
        tokio::select! {
            r = &mut body => return r,
            _ = &mut shutdown, if !signalled => {
                signalled = true;
                let _ = stop_tx.send(true);
            }
        }
    }
}

/// Loads the identity, or enrolls. None when stopped before enrolling.
async fn enrolled(
    cfg: &AgentConfig,
    net: &Net,
    info: &proto::AgentInfo,
    stop: &mut Stop,
) -> Result<Option<Identity>, AgentError> {
    let backend = cfg.backend.to_string();
    if let Some(id) = identity::load(&cfg.state_dir)? {
        if id.backend == backend {
            return Ok(Some(id));
        }
        tracing::warn!(stored = %id.backend, configured = %backend,
            "the stored identity belongs to another backend; enrolling with the configured one");
    }
    let token = cfg.token.clone().ok_or(AgentError::NoToken)?;
    let mut retry = Retry::new(cfg.backoff);
    let mut told_rejected = false;
    loop {
        let attempt = async {
            let unary = match cfg.transport {
                TransportMode::Grpc => Unary::Grpc(AgentServiceClient::new(
                    client::grpc_channel(&cfg.backend, net, cfg.keepalive, cfg.keepalive_timeout)
                        .await?,
                )),
                // Enrollment is one unary call: HTTP/1.1 passes everywhere.
                TransportMode::Longpoll | TransportMode::Auto => {
                    Unary::Connect(Box::new(ConnectClient::new(&cfg.backend, net)))
                }
            };
            unary
                .enroll(proto::EnrollRequest {
                    enrollment_token: token.expose().to_string(),
                    info: Some(info.clone()),
                })
                .await
        };
        let attempt = tokio::select! {
            _ = stop.wait() => return Ok(None),
            r = attempt => r,
        };
        let delay = match attempt {
            Ok(resp) => {
                let id = Identity {
                    backend: backend.clone(),
                    agent_id: resp.agent_id,
                    credential: resp.credential,
                    provider: resp.provider,
                };
                identity::save(&cfg.state_dir, &id)?;
                tracing::info!(agent = %id.agent_id, provider = %id.provider, "enrolled");
                return Ok(Some(id));
            }
            Err(e) if e.kind == FailureKind::Status(tonic::Code::Unauthenticated) => {
                let d = jitter(cfg.operator_retry);
                if !told_rejected {
                    tracing::error!(
                        "enrollment token rejected by backend ({}); check --token / UPLINK_TOKEN; retrying every {:?}",
                        e.message,
                        cfg.operator_retry
                    );
                    told_rejected = true;
                } else {
                    tracing::debug!(error = %e, "enrollment token still rejected");
                }
                d
            }
            Err(e) => {
                let d = if e.needs_operator() {
                    jitter(cfg.operator_retry)
                } else {
                    retry.next_delay()
                };
                tracing::warn!(
                    failure = e.label(),
                    "enrollment failed: {e}; retrying in {d:.1?}"
                );
                d
            }
        };
        tokio::select! {
            _ = stop.wait() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// `d` ± 25%.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

impl Agent {
    /// After a restart: commands that were running are reported as
    /// interrupted (never run again), and results that may not have reached
    /// the backend are sent again.
    async fn recover(&self) {
        let (unfinished, unreported) = {
            let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            (j.unfinished(), j.unreported())
        };
        for (id, seq) in unfinished {
            let message = "the agent stopped while this command ran; it is not run again (commands run at most once)";
            tracing::warn!(command = %id, seq, "command interrupted by an agent restart");
            if let Err(e) = self
                .journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .finish(&id, proto::CommandStatus::Interrupted as i32, message)
            {
                tracing::warn!(error = %e, "journal write failed");
            }
            self.emit_result(proto::CommandResult {
                command_id: id,
                status: proto::CommandStatus::Interrupted as i32,
                message: message.into(),
                detail: None,
            })
            .await;
        }
        for (id, _seq, status, message) in unreported {
            self.emit_result(proto::CommandResult {
                command_id: id,
                status,
                message,
                detail: None,
            })
            .await;
        }
    }

    /// Applies the backend's settings: the metrics interval, within
    /// 200 ms to 1 h (0 leaves it as it is).
    fn reconfigure(&self, r: &proto::Reconfigure) {
        if r.metrics_interval_ms == 0 {
            return;
        }
        let d = Duration::from_millis(r.metrics_interval_ms as u64)
            .clamp(Duration::from_millis(200), Duration::from_secs(3600));
        let changed = self.metrics_interval.send_if_modified(|cur| {
            let new = Some(d);
            let changed = *cur != new;
            *cur = new;
            changed
        });
        if changed {
            tracing::info!(interval = ?d, "backend set the metrics interval");
        }
    }

    /// Sends a metric batch on the current rung, waiting for one.
    async fn push_metrics(
        &self,
        req: proto::PushMetricsRequest,
    ) -> Result<proto::PushMetricsResponse, CallError> {
        let mut rx = self.unary.subscribe();
        let unary = match rx.wait_for(|u| u.is_some()).await {
            Ok(u) => u.clone(),
            Err(_) => None,
        };
        let Some(unary) = unary else {
            return Err(CallError {
                kind: FailureKind::Other,
                message: "the agent is stopping".into(),
            });
        };
        unary.push_metrics(&self.credential, req).await
    }

    /// Sends this agent's capacity when it starts, on every new connection,
    /// and whenever a figure changed; measures it after container commands
    /// and exits, and every [`CAPACITY_INTERVAL`].
    async fn report_capacity(self: Arc<Self>) {
        let mut connections = self.unary.subscribe();
        let mut last: Option<proto::Capacity> = None;
        loop {
            let now = super::capacity::measure(&self.executor, &self.cfg.policy).await;
            if last.as_ref() != Some(&now) {
                if last.as_ref().map(|l| l.docker_available) != Some(now.docker_available) {
                    tracing::info!(docker = %now.docker_status, cores = now.cpu_cores, memory = now.memory_bytes, "capacity");
                }
                self.emit(proto::event::Kind::Capacity(now.clone())).await;
                last = Some(now);
            }
            tokio::select! {
                _ = tokio::time::sleep(CAPACITY_INTERVAL) => {}
                _ = self.capacity_changed.notified() => {}
                r = connections.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if connections.borrow_and_update().is_some() {
                        last = None;
                    }
                }
            }
        }
    }

    async fn emit_result(&self, r: proto::CommandResult) {
        self.emit(proto::event::Kind::Result(r)).await;
    }

    /// Reports the exits of this agent's containers, from Docker's event
    /// stream; reconnects when the engine goes and comes back.
    async fn watch_containers(self: Arc<Self>) {
        loop {
            match self.executor.engine().await {
                Ok(engine) => {
                    self.reconcile(&engine).await;
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let watch = async move {
                        engine
                            .watch_exits(move |ev| {
                                let _ = tx.send(ev);
                            })
                            .await;
                    };
                    let forward = async {
                        while let Some(ev) = rx.recv().await {
                            tracing::info!(container = %ev.name, exit_code = ev.exit_code, oom_killed = ev.oom_killed, "container exited");
                            self.emit(proto::event::Kind::Container(ev)).await;
                            self.capacity_changed.notify_one();
                        }
                    };
                    tokio::join!(watch, forward);
                }
                Err(f) => tracing::debug!("not watching containers: {}", f.message),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Looks at this agent's containers as they are now: running ones whose
    /// command succeeded are adopted (not restarted), exited ones have their
    /// exit reported (the backend keeps the first report), and containers
    /// no successful command accounts for are reported as orphans and
    /// removed after the orphan grace period.
    async fn reconcile(self: &Arc<Self>, engine: &Arc<super::docker::Engine>) {
        let list = match engine.list().await {
            Ok(l) => l,
            Err(f) => {
                tracing::warn!("cannot list containers to reconcile: {}", f.message);
                return;
            }
        };
        for c in list {
            let accounted = {
                let j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
                match j.get(&c.command_id) {
                    // Still running (not done): None, leave it alone.
                    Some(e) => e
                        .done
                        .as_ref()
                        .map(|(status, _)| *status == proto::CommandStatus::Ok as i32),
                    None => Some(false),
                }
            };
            let event = |kind: proto::ContainerEventKind, exit_code: i64, oom: bool| {
                proto::ContainerEvent {
                    container_id: c.id.clone(),
                    name: c.name.clone(),
                    command_id: c.command_id.clone(),
                    run_id: c.run_id.clone(),
                    kind: kind as i32,
                    exit_code,
                    oom_killed: oom,
                }
            };
            match accounted {
                None => {}
                Some(true) if c.state == "running" => {
                    tracing::info!(container = %c.name, "adopted a running container");
                    self.emit(proto::event::Kind::Container(event(
                        proto::ContainerEventKind::Adopted,
                        0,
                        false,
                    )))
                    .await;
                }
                Some(true) => {
                    if let Some((code, oom)) = engine.exit_of(&c.id).await {
                        self.emit(proto::event::Kind::Container(event(
                            proto::ContainerEventKind::Exited,
                            code,
                            oom,
                        )))
                        .await;
                    }
                }
                Some(false) => {
                    let grace = self.cfg.orphan_grace;
                    tracing::warn!(container = %c.name, command = %c.command_id, ?grace,
                        "container carries this agent's labels but no successful command accounts for it; removing it after the grace period");
                    self.emit(proto::event::Kind::Container(event(
                        proto::ContainerEventKind::Orphaned,
                        0,
                        false,
                    )))
                    .await;
                    let (agent, engine, id) = (self.clone(), engine.clone(), c.id.clone());
                    let removed = event(proto::ContainerEventKind::Removed, 0, false);
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        match engine.remove(&id, true).await {
                            Ok(_) => {
                                tracing::info!(container = %removed.name, "removed an orphaned container");
                                agent.emit(proto::event::Kind::Container(removed)).await;
                            }
                            Err(f) => {
                                tracing::warn!(container = %removed.name, "cannot remove orphan: {}", f.message)
                            }
                        }
                    });
                }
            }
        }
    }

    /// Queues an event for the reporter; waits when its buffer is full.
    async fn emit(&self, kind: proto::event::Kind) {
        self.unacked.send_modify(|n| *n += 1);
        if self.events.send(kind).await.is_err() {
            self.unacked.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// The current `AgentInfo`, with the ladder's reason.
    fn info(&self) -> proto::AgentInfo {
        let mut info = self.info.clone();
        info.transport_reason = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        info
    }

    fn set_reason(&self, ladder: &Ladder) {
        // The contract allows 256 bytes; error texts can be longer.
        let mut reason = ladder.reason().to_string();
        if reason.len() > 250 {
            let mut cut = 240;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// The rung loop: runs sessions on the ladder's rung, moves along the
    /// ladder, and backs off between failed attempts.
    async fn rungs(self: &Arc<Self>, mut stop: Stop) {
        let mut ladder = Ladder::new(LadderConfig {
            auto: self.cfg.transport == TransportMode::Auto,
            start: match self.cfg.transport {
                TransportMode::Longpoll => Rung::Longpoll,
                _ => Rung::Grpc,
            },
            probe_initial: self.cfg.probe_initial,
            probe_max: self.cfg.probe_max,
        });
        self.set_reason(&ladder);
        crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
        tracing::info!(
            rung = ladder.rung().name(),
            reason = ladder.reason(),
            "transport"
        );
        let mut retry = Retry::new(self.cfg.backoff);
        let mut preopened: Option<OpenStream> = None;
        loop {
            let rung = ladder.rung();
            let outcome = match rung {
                Rung::Grpc => {
                    let (outcome, end) = self
                        .grpc_session(&mut retry, stop.clone(), preopened.take())
                        .await;
                    if let Outcome::Failed(e) = &outcome
                        && let Move::Fall(why) =
                            ladder.grpc_failed(e, end, std::time::Instant::now(), fastrand::f64())
                    {
                        self.set_reason(&ladder);
                        crate::telemetry::reconnect("grpc", e.label());
                        crate::telemetry::switch("grpc", "longpoll");
                        crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
                        tracing::warn!(from = "grpc", to = "longpoll", reason = %why, "switching rung");
                        retry.reset();
                        continue;
                    }
                    outcome
                }
                Rung::Longpoll => {
                    self.poll_session(&mut retry, stop.clone(), &mut ladder)
                        .await
                }
            };
            let delay = match outcome {
                Outcome::Shutdown => return,
                Outcome::Climb(open) => {
                    self.set_reason(&ladder);
                    crate::telemetry::switch("longpoll", "grpc");
                    crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
                    tracing::info!(
                        from = "longpoll",
                        to = "grpc",
                        reason = ladder.reason(),
                        "switching rung"
                    );
                    preopened = Some(*open);
                    continue;
                }
                Outcome::Failed(e) => {
                    crate::telemetry::reconnect(rung.name(), e.label());
                    if e.needs_operator() {
                        let d = jitter(self.cfg.operator_retry);
                        tracing::error!(
                            rung = rung.name(),
                            failure = e.label(),
                            "cannot connect: {e}; retrying in {d:.0?}"
                        );
                        d
                    } else {
                        let d = retry.next_delay();
                        tracing::warn!(
                            rung = rung.name(),
                            failure = e.label(),
                            "backend unreachable: {e}; retrying in {d:.1?}"
                        );
                        d
                    }
                }
            };
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Opens a gRPC stream and waits for its first frame.
    async fn open_stream(self: &Arc<Self>) -> Result<OpenStream, CallError> {
        let channel = client::grpc_channel(
            &self.cfg.backend,
            &self.net,
            self.cfg.keepalive,
            self.cfg.keepalive_timeout,
        )
        .await?;
        let client = AgentServiceClient::new(channel)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let ack = *self.ack.borrow();
        let mut req = grpc_request(
            proto::SubscribeRequest {
                ack,
                info: Some(self.info()),
            },
            Some(&self.credential),
        )?;
        // A stream has no deadline; the dead-stream timer guards it.
        req.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let first = async {
            let mut stream = client
                .clone()
                .subscribe(req)
                .await
                .map_err(|s| CallError::from_tonic(&s))?
                .into_inner();
            match stream.message().await {
                Ok(Some(first)) => Ok((stream, first)),
                Ok(None) => Err(CallError {
                    kind: FailureKind::Other,
                    message: "the stream ended before its first frame".into(),
                }),
                Err(s) => Err(CallError::from_tonic(&s)),
            }
        };
        let (stream, first) = tokio::time::timeout(FIRST_FRAME_TIMEOUT, first)
            .await
            .map_err(|_| CallError {
                kind: FailureKind::NoH2,
                message: format!(
                    "the stream delivered no frame within {FIRST_FRAME_TIMEOUT:?} (the backend sends a heartbeat at once)"
                ),
            })??;
        Ok(OpenStream {
            client,
            stream,
            first,
            ack,
        })
    }

    /// Makes `open` the stream in use: its client carries the unary calls,
    /// and its maximum age starts now.
    fn adopt(&self, open: OpenStream) -> LiveStream {
        self.unary.send_replace(Some(Unary::Grpc(open.client)));
        crate::telemetry::stream_opened();
        let opened = tokio::time::Instant::now();
        LiveStream {
            stream: open.stream,
            first: Some(open.first),
            heartbeats: 0,
            opened,
            rotate_at: opened + ld_jitter(self.cfg.stream_max_age, fastrand::f64()),
        }
    }

    /// One gRPC session: a stream (opened here, or handed over by a
    /// successful probe), kept alive and rotated make-before-break.
    async fn grpc_session(
        self: &Arc<Self>,
        retry: &mut Retry,
        mut stop: Stop,
        preopened: Option<OpenStream>,
    ) -> (Outcome, StreamEnd) {
        let open = match preopened {
            Some(o) => o,
            None => tokio::select! {
                _ = stop.wait() => return (Outcome::Shutdown, StreamEnd::BeforeFirstFrame),
                r = self.open_stream() => match r {
                    Ok(o) => o,
                    Err(e) => return (Outcome::Failed(e), StreamEnd::BeforeFirstFrame),
                },
            },
        };
        retry.reset();
        tracing::info!(rung = "grpc", ack = open.ack, "stream open");
        let mut live = self.adopt(open);
        let mut dead_after = FIRST_FRAME_TIMEOUT;
        let mut next: Option<Opening> = None;
        loop {
            let heartbeats = live.heartbeats;
            let frame = match live.first.take() {
                Some(f) => f,
                None => {
                    let msg = tokio::select! {
                        biased;
                        _ = stop.wait() => return (Outcome::Shutdown, StreamEnd::After { heartbeats }),
                        r = async { next.as_mut().expect("guarded by if").await }, if next.is_some() => {
                            next = None;
                            match r {
                                Ok(o) => {
                                    // Make before break: the new stream is up, drop the old.
                                    tracing::info!(ack = o.ack, "stream rotated");
                                    live = self.adopt(o);
                                }
                                Err(e) => tracing::warn!(failure = e.label(), "could not open the replacement stream: {e}; keeping the current one"),
                            }
                            continue;
                        }
                        _ = tokio::time::sleep_until(live.rotate_at), if next.is_none() => {
                            tracing::info!(age = ?live.opened.elapsed(), "stream reached its maximum age; opening a replacement");
                            let me = self.clone();
                            next = Some(Box::pin(async move { me.open_stream().await }));
                            live.rotate_at = tokio::time::Instant::now() + self.cfg.stream_max_age;
                            continue;
                        }
                        r = tokio::time::timeout(dead_after, live.stream.message()) => r,
                    };
                    let end = StreamEnd::After { heartbeats };
                    match msg {
                        Err(_) => {
                            return (
                                Outcome::Failed(CallError {
                                    kind: FailureKind::Timeout,
                                    message: format!(
                                        "no frame from the backend for {dead_after:?}; stream declared dead"
                                    ),
                                }),
                                end,
                            );
                        }
                        Ok(Err(s)) => return (Outcome::Failed(CallError::from_tonic(&s)), end),
                        Ok(Ok(None)) => match next.take() {
                            // The backend ended this stream after asking for
                            // a rotation: wait for the replacement.
                            Some(replacement) => {
                                match tokio::time::timeout(FIRST_FRAME_TIMEOUT * 2, replacement)
                                    .await
                                {
                                    Ok(Ok(o)) => {
                                        tracing::info!(ack = o.ack, "stream rotated");
                                        live = self.adopt(o);
                                        continue;
                                    }
                                    Ok(Err(e)) => return (Outcome::Failed(e), end),
                                    Err(_) => {
                                        return (
                                            Outcome::Failed(CallError {
                                                kind: FailureKind::Timeout,
                                                message: "the replacement stream did not open"
                                                    .into(),
                                            }),
                                            end,
                                        );
                                    }
                                }
                            }
                            None => {
                                return (
                                    Outcome::Failed(CallError {
                                        kind: FailureKind::Other,
                                        message: "the stream ended".into(),
                                    }),
                                    end,
                                );
                            }
                        },
                        Ok(Ok(Some(resp))) => resp,
                    }
                }
            };
            use proto::server_frame::Kind;
            match frame.frame.and_then(|f| f.kind) {
                Some(Kind::Heartbeat(h)) => {
                    live.heartbeats = live.heartbeats.saturating_add(1);
                    // Two intervals plus a margin without any frame: dead.
                    let interval = Duration::from_millis(h.interval_ms.clamp(100, 60_000) as u64);
                    dead_after = interval * 2 + Duration::from_secs(1);
                }
                Some(Kind::Command(c)) => {
                    if let Err(o) = self.intake(c) {
                        return (o, StreamEnd::After { heartbeats });
                    }
                }
                Some(Kind::Rotate(r)) if next.is_none() => {
                    tracing::info!(reason = %r.reason, "backend asked to rotate; opening a replacement stream");
                    let me = self.clone();
                    next = Some(Box::pin(async move { me.open_stream().await }));
                }
                Some(Kind::Rotate(_)) => {}
                Some(Kind::Reconfigure(r)) => self.reconfigure(&r),
                None => {}
            }
        }
    }

    /// One long-poll session. In auto mode it also probes gRPC when the
    /// ladder says so, and hands over a probe's stream that delivered a frame.
    async fn poll_session(
        self: &Arc<Self>,
        retry: &mut Retry,
        mut stop: Stop,
        ladder: &mut Ladder,
    ) -> Outcome {
        let client =
            ConnectClient::new(&self.cfg.backend, &self.net).with_auth(self.credential.clone());
        self.unary
            .send_replace(Some(Unary::Connect(Box::new(client.clone()))));
        let hold = self.cfg.poll_hold;
        let mut first = true;
        let mut probe: Option<Opening> = None;
        loop {
            // The first poll of a session returns at once, so the rung is
            // known to work without waiting for a hold.
            let req = proto::PollRequest {
                ack: *self.ack.borrow(),
                hold_ms: if first { 1 } else { hold.as_millis() as u32 },
                info: Some(self.info()),
            };
            let poll = client.call(AGENT_SERVICE, "Poll", &req, hold + Duration::from_secs(15));
            tokio::pin!(poll);
            let resp: proto::PollResponse = loop {
                let probe_at = ladder.next_probe().map(tokio::time::Instant::from_std);
                tokio::select! {
                    biased;
                    _ = stop.wait() => return Outcome::Shutdown,
                    r = async { probe.as_mut().expect("guarded by if").await }, if probe.is_some() => {
                        probe = None;
                        match r {
                            Ok(open) => {
                                ladder.probe_result(true, std::time::Instant::now(), fastrand::f64());
                                // The poll in flight is dropped: commands it
                                // may carry are unacked, so the stream
                                // delivers them again (the journal drops any
                                // duplicate).
                                return Outcome::Climb(Box::new(open));
                            }
                            Err(e) => {
                                ladder.probe_result(false, std::time::Instant::now(), fastrand::f64());
                                tracing::info!(failure = e.label(), next_in = ?ladder.next_probe().map(|t| t.saturating_duration_since(std::time::Instant::now())),
                                    "gRPC probe failed: {e}; staying on long-poll");
                                self.set_reason(ladder);
                            }
                        }
                    }
                    _ = async { tokio::time::sleep_until(probe_at.expect("guarded by if")).await }, if probe_at.is_some() && probe.is_none() => {
                        tracing::debug!("probing the gRPC stream");
                        let me = self.clone();
                        probe = Some(Box::pin(async move { me.open_stream().await }));
                    }
                    r = &mut poll => match r {
                        Ok(r) => break r,
                        Err(e) => return Outcome::Failed(e),
                    },
                }
            };
            if first {
                first = false;
                retry.reset();
                tracing::info!(rung = "longpoll", ack = req.ack, "long-polling");
            }
            for frame in resp.frames {
                use proto::server_frame::Kind;
                match frame.kind {
                    Some(Kind::Command(c)) => match self.intake(c) {
                        Ok(()) => {}
                        Err(o) => return o,
                    },
                    Some(Kind::Rotate(r)) => {
                        tracing::info!(reason = %r.reason, "backend asked to rotate")
                    }
                    Some(Kind::Reconfigure(r)) => self.reconfigure(&r),
                    Some(Kind::Heartbeat(_)) | None => {}
                }
            }
        }
    }

    /// Accepts a delivered command through the journal and starts it.
    fn intake(self: &Arc<Self>, c: proto::Command) -> Result<(), Outcome> {
        let received = crate::now_unix_ms();
        let ack = {
            let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            match j.decide(c.seq, &c.id) {
                Decision::Duplicate => {
                    // Delivered again: the backend has not seen our ack or
                    // result. Never run it again; send the result we have.
                    tracing::debug!(command = %c.id, seq = c.seq, "duplicate delivery; not executed again");
                    crate::telemetry::duplicate();
                    let done = j.get(&c.id).and_then(|e| e.done.clone());
                    drop(j);
                    if let Some((status, message)) = done {
                        let agent = self.clone();
                        tokio::spawn(async move {
                            agent
                                .emit_result(proto::CommandResult {
                                    command_id: c.id,
                                    status,
                                    message,
                                    detail: None,
                                })
                                .await;
                        });
                    }
                    return Ok(());
                }
                Decision::Reused => {
                    drop(j);
                    let message = format!(
                        "not executed: seq {} was already used by another command on this agent; the backend's \
                         store lost recent commits and reused it; queue the command again",
                        c.seq
                    );
                    tracing::warn!(command = %c.id, seq = c.seq, "{message}");
                    let agent = self.clone();
                    tokio::spawn(async move {
                        agent
                            .emit_result(proto::CommandResult {
                                command_id: c.id,
                                status: proto::CommandStatus::Failed as i32,
                                message,
                                detail: None,
                            })
                            .await;
                    });
                    return Ok(());
                }
                Decision::Execute { skipped } => {
                    if skipped > 0 {
                        tracing::warn!(
                            seq = c.seq,
                            skipped,
                            "the journal is behind the backend's ack (state dir lost or restored?); the skipped commands were accepted before and are not run again"
                        );
                    }
                }
            }
            if let Err(e) = j.accept(c.seq, &c.id) {
                return Err(Outcome::Failed(CallError {
                    kind: FailureKind::Other,
                    message: format!(
                        "cannot write the journal, so the command cannot be accepted: {e}"
                    ),
                }));
            }
            j.ack()
        };
        self.ack.send_replace(ack);
        let kind = executor::kind_name(&c);
        tracing::info!(command = %c.id, seq = c.seq, kind, "executing command");
        let agent = self.clone();
        let running = self.running.clone();
        tokio::spawn(async move {
            let Ok(_permit) = running.acquire_owned().await else {
                return;
            };
            // Progress is sent as it comes; it never blocks the command.
            // Bounded: progress is advisory, so a full buffer drops an
            // update rather than holding the command up.
            let (ptx, mut prx) = mpsc::channel(64);
            let forward = {
                let agent = agent.clone();
                tokio::spawn(async move {
                    while let Some(p) = prx.recv().await {
                        agent.emit(proto::event::Kind::Progress(p)).await;
                    }
                })
            };
            let result = agent
                .executor
                .execute(&c, received, |p| {
                    let _ = ptx.try_send(p);
                })
                .await;
            drop(ptx);
            let _ = forward.await;
            let finished = agent
                .journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .finish(&c.id, result.status, &result.message);
            if let Err(e) = finished {
                tracing::warn!(command = %c.id, error = %e, "journal write failed");
            }
            let status = proto::CommandStatus::try_from(result.status)
                .map(|s| s.as_str_name())
                .unwrap_or("COMMAND_STATUS_UNSPECIFIED");
            crate::telemetry::command(status);
            tracing::info!(command = %c.id, status, "command finished");
            agent.emit_result(result).await;
            if !matches!(kind, "ping" | "list_containers" | "container_logs") {
                agent.capacity_changed.notify_one();
            }
        });
        Ok(())
    }

    /// Sends events and acks to the backend on the current rung's unary
    /// client; keeps events until acknowledged.
    async fn reporter(self: Arc<Self>, mut events: mpsc::Receiver<proto::event::Kind>) {
        let epoch = fastrand::u64(1..u64::MAX / 2);
        let mut pending: VecDeque<proto::Event> = VecDeque::new();
        let mut next_seq = 1u64;
        let mut sent_ack = u64::MAX; // Send the ack once at start.
        let mut ack_rx = self.ack.subscribe();
        let mut unary_rx = self.unary.subscribe();
        let mut retry = Retry::new(self.cfg.backoff);
        let mut push = |pending: &mut VecDeque<proto::Event>, kind| {
            pending.push_back(proto::Event {
                seq: next_seq,
                time_unix_ms: crate::now_unix_ms(),
                kind: Some(kind),
            });
            next_seq += 1;
        };
        loop {
            while pending.len() < MAX_UNACKED_EVENTS {
                match events.try_recv() {
                    Ok(k) => push(&mut pending, k),
                    Err(_) => break,
                }
            }
            let ack = *ack_rx.borrow_and_update();
            if pending.is_empty() && ack == sent_ack {
                tokio::select! {
                    k = events.recv() => match k {
                        Some(k) => push(&mut pending, k),
                        None => return,
                    },
                    r = ack_rx.changed() => if r.is_err() { return },
                }
                continue;
            }
            let unary = unary_rx.borrow_and_update().clone();
            let Some(unary) = unary else {
                // No rung yet: keep taking events (up to the bound) so that
                // nobody waits on a full channel before the first connect.
                tokio::select! {
                    r = unary_rx.changed() => if r.is_err() { return },
                    k = events.recv(), if pending.len() < MAX_UNACKED_EVENTS => match k {
                        Some(k) => push(&mut pending, k),
                        None => return,
                    },
                }
                continue;
            };
            let req = proto::ReportRequest {
                ack,
                epoch,
                events: pending.iter().take(REPORT_BATCH).cloned().collect(),
            };
            match unary.report(&self.credential, req).await {
                Ok(resp) => {
                    retry.reset();
                    sent_ack = ack;
                    self.ack_delivered.send_replace(ack);
                    let before = pending.len();
                    while pending
                        .front()
                        .map(|e| e.seq <= resp.acked_seq)
                        .unwrap_or(false)
                    {
                        if let Some(proto::Event {
                            kind: Some(proto::event::Kind::Result(r)),
                            ..
                        }) = pending.pop_front()
                        {
                            let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
                            if let Err(e) = j.mark_reported(&r.command_id) {
                                tracing::debug!(error = %e, "journal write failed");
                            }
                        }
                    }
                    let done = before - pending.len();
                    self.unacked.send_modify(|n| *n = n.saturating_sub(done));
                    if done == 0 && !pending.is_empty() {
                        // The backend stored none of them: do not hammer it.
                        let d = retry.next_delay();
                        tracing::debug!("report stored nothing; retrying in {d:.1?}");
                        tokio::time::sleep(d).await;
                    }
                }
                Err(e) => {
                    let d = retry.next_delay();
                    tracing::debug!(
                        failure = e.label(),
                        "report failed: {e}; retrying in {d:.1?}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = unary_rx.changed() => {}
                    }
                }
            }
        }
    }
}
