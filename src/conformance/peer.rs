//! The suite's side of the agent service: [`RawAgent`], an enrolled
//! identity that makes single calls on either rung (so a case can break a
//! rule on purpose), and [`AgentProc`], a real `uplink agent` process with
//! its own state directory, both removed when dropped.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::{Ctx, Rung};
use crate::client::{CallError, ConnectClient, FailureKind};
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::secret::Secret;

/// The agent service's name on the Connect rung.
pub const AGENT_SERVICE: &str = "uplink.v1.AgentService";
/// The time a single unary call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The status code of a failed call, when the backend answered one.
pub fn code_of(e: &CallError) -> Option<tonic::Code> {
    match e.kind {
        FailureKind::Status(c) => Some(c),
        _ => None,
    }
}

/// A fresh name for something the suite makes (hostnames, keys): `prefix`
/// and 16 random hex digits.
pub fn fresh(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// What the suite's agents say about themselves.
pub fn info(hostname: &str) -> proto::AgentInfo {
    proto::AgentInfo {
        hostname: hostname.into(),
        version: crate::VERSION.into(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        transport_reason: "conformance".into(),
    }
}

/// A ping spec.
pub fn ping(delay_ms: u32, payload: &str) -> proto::CommandSpec {
    proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
            delay_ms,
            payload: payload.into(),
        })),
    }
}

/// An ordered event epoch (from 2^63 up) above every one used before in
/// this process, as an agent takes at its start.
pub fn ordered_epoch() -> u64 {
    proto::ORDERED_EPOCHS + crate::now_unix_ms().max(0) as u64 + fastrand::u64(0..1_000_000)
}

/// An unauthenticated Connect client of the backend.
pub fn connect_client(ctx: &Ctx) -> ConnectClient {
    ConnectClient::new(&ctx.backend, &ctx.net)
}

/// A gRPC client of the agent service on a new HTTP/2 connection.
pub async fn grpc_client(ctx: &Ctx) -> Result<AgentServiceClient<Channel>, String> {
    let channel = crate::client::grpc_channel(
        &ctx.backend,
        &ctx.net,
        Duration::from_secs(10),
        Duration::from_secs(20),
    )
    .await
    .map_err(|e| format!("cannot open a gRPC connection: {e}"))?;
    Ok(AgentServiceClient::new(channel))
}

/// `msg` with `authorization: Bearer <credential>`, when there is one.
pub fn authed<T>(credential: Option<&Secret>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(CALL_TIMEOUT);
    if let Some(c) = credential
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", c.expose()))
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// `Enroll` on `rung`.
pub async fn enroll(
    ctx: &Ctx,
    rung: Rung,
    req: proto::EnrollRequest,
) -> Result<proto::EnrollResponse, CallError> {
    match rung {
        Rung::Longpoll => {
            connect_client(ctx)
                .call(AGENT_SERVICE, "Enroll", &req, CALL_TIMEOUT)
                .await
        }
        Rung::Grpc => {
            let mut c = grpc_client(ctx).await.map_err(|message| CallError {
                kind: FailureKind::Other,
                message,
            })?;
            c.enroll(authed(None, req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s))
        }
    }
}

/// An agent identity the suite enrolled, making single calls.
pub struct RawAgent {
    pub id: String,
    pub credential: Secret,
    pub hostname: String,
    connect: ConnectClient,
    grpc: Option<AgentServiceClient<Channel>>,
    backend: String,
}

impl RawAgent {
    /// Enrolls a new agent over Connect with the suite's token.
    pub async fn enroll(ctx: &Ctx, label: &str) -> Result<RawAgent, String> {
        let hostname = fresh(&format!("conformance-{label}"));
        let r = enroll(
            ctx,
            Rung::Longpoll,
            proto::EnrollRequest {
                enrollment_token: ctx.enroll_token.expose().into(),
                info: Some(info(&hostname)),
                idempotency_key: fresh("key"),
            },
        )
        .await
        .map_err(|e| format!("Enroll with the enrollment token given failed: {e}"))?;
        if r.agent_id.is_empty() || r.credential.is_empty() {
            return Err(format!(
                "Enroll answered without an agent_id or a credential: {r:?}"
            ));
        }
        let credential = Secret::new(r.credential);
        Ok(RawAgent {
            id: r.agent_id,
            connect: connect_client(ctx).with_auth(credential.clone()),
            credential,
            hostname,
            grpc: None,
            backend: ctx.backend.to_string(),
        })
    }

    /// Opens the gRPC connection the gRPC calls use.
    pub async fn with_grpc(mut self, ctx: &Ctx) -> Result<RawAgent, String> {
        self.grpc = Some(grpc_client(ctx).await?);
        Ok(self)
    }

    fn grpc(&self) -> Result<AgentServiceClient<Channel>, CallError> {
        self.grpc.clone().ok_or_else(|| CallError {
            kind: FailureKind::Other,
            message: format!("no gRPC connection to {} was opened", self.backend),
        })
    }

    /// `Poll` over Connect, held up to `hold_ms`.
    pub async fn poll(&self, ack: u64, hold_ms: u32) -> Result<proto::PollResponse, CallError> {
        let req = proto::PollRequest {
            ack,
            hold_ms,
            info: Some(info(&self.hostname)),
        };
        let timeout = Duration::from_millis(hold_ms.into()) + CALL_TIMEOUT;
        self.connect
            .call(AGENT_SERVICE, "Poll", &req, timeout)
            .await
    }

    /// `Poll` over Connect with an empty `AgentInfo` (a diagnostic call, as
    /// `uplink doctor` makes), answered at once.
    pub async fn poll_anonymous(&self) -> Result<proto::PollResponse, CallError> {
        let req = proto::PollRequest {
            ack: 0,
            hold_ms: 1,
            info: None,
        };
        self.connect
            .call(AGENT_SERVICE, "Poll", &req, CALL_TIMEOUT)
            .await
    }

    /// `Report` on `rung`.
    pub async fn report(
        &self,
        rung: Rung,
        req: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, CallError> {
        match rung {
            Rung::Longpoll => {
                self.connect
                    .call(AGENT_SERVICE, "Report", &req, CALL_TIMEOUT)
                    .await
            }
            Rung::Grpc => self
                .grpc()?
                .report(authed(Some(&self.credential), req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s)),
        }
    }

    /// `PushMetrics` on `rung`, the request compressed with zstd as the
    /// reference agent sends it.
    pub async fn push(
        &self,
        rung: Rung,
        req: proto::PushMetricsRequest,
    ) -> Result<proto::PushMetricsResponse, CallError> {
        match rung {
            Rung::Longpoll => {
                self.connect
                    .call_encoded(AGENT_SERVICE, "PushMetrics", &req, CALL_TIMEOUT, true)
                    .await
            }
            Rung::Grpc => self
                .grpc()?
                .send_compressed(tonic::codec::CompressionEncoding::Zstd)
                .push_metrics(authed(Some(&self.credential), req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s)),
        }
    }

    /// `RotateCredential` on `rung`: the new credential.
    pub async fn rotate(&self, rung: Rung) -> Result<String, CallError> {
        let req = proto::RotateCredentialRequest {};
        let r: proto::RotateCredentialResponse = match rung {
            Rung::Longpoll => {
                self.connect
                    .call(AGENT_SERVICE, "RotateCredential", &req, CALL_TIMEOUT)
                    .await?
            }
            Rung::Grpc => self
                .grpc()?
                .rotate_credential(authed(Some(&self.credential), req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s))?,
        };
        Ok(r.credential)
    }

    /// Opens a `Subscribe` stream with `ack`.
    pub async fn subscribe(
        &self,
        ack: u64,
    ) -> Result<tonic::Streaming<proto::SubscribeResponse>, CallError> {
        let mut req = tonic::Request::new(proto::SubscribeRequest {
            ack,
            info: Some(info(&self.hostname)),
        });
        if let Ok(v) =
            tonic::metadata::MetadataValue::try_from(format!("Bearer {}", self.credential.expose()))
        {
            req.metadata_mut().insert("authorization", v);
        }
        self.grpc()?
            .subscribe(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| CallError::from_tonic(&s))
    }
}

/// The next frame of a stream within `within`: `Ok(None)` when none came
/// in time, `Err` when the stream failed or ended.
pub async fn next_frame(
    stream: &mut tonic::Streaming<proto::SubscribeResponse>,
    within: Duration,
) -> Result<Option<proto::server_frame::Kind>, String> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => Ok(None),
        Ok(Ok(Some(r))) => {
            Ok(Some(r.frame.and_then(|f| f.kind).ok_or_else(|| {
                "the stream carried a frame without a kind".to_string()
            })?))
        }
        Ok(Ok(None)) => Err("the stream ended".into()),
        Ok(Err(s)) => Err(format!("the stream failed: {}", CallError::from_tonic(&s))),
    }
}

/// The commands among `frames`.
pub fn commands(frames: &[proto::ServerFrame]) -> Vec<&proto::Command> {
    frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(proto::server_frame::Kind::Command(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// The result event of a ping command, `seq` in its epoch.
pub fn ping_result(seq: u64, command_id: &str, message: &str) -> proto::Event {
    proto::Event {
        seq,
        time_unix_ms: crate::now_unix_ms(),
        kind: Some(proto::event::Kind::Result(proto::CommandResult {
            command_id: command_id.into(),
            status: proto::CommandStatus::Ok as i32,
            message: message.into(),
            detail: Some(proto::command_result::Detail::Ping(proto::PingResult {
                payload: "conformance".into(),
                received_unix_ms: crate::now_unix_ms(),
            })),
        })),
    }
}

/// A capacity event, `seq` in its epoch.
pub fn capacity(seq: u64) -> proto::Event {
    proto::Event {
        seq,
        time_unix_ms: crate::now_unix_ms(),
        kind: Some(proto::event::Kind::Capacity(proto::Capacity {
            cpu_cores: 1,
            memory_bytes: 1 << 30,
            ..Default::default()
        })),
    }
}

/// A real `uplink agent` process with a state directory of its own; killed
/// and its directory removed when dropped.
pub struct AgentProc {
    child: Child,
    pub hostname: String,
    log: Arc<Mutex<VecDeque<String>>>,
    // Dropped after the child is killed and reaped (fields drop in order,
    // after `Drop::drop`).
    _state: tempfile::TempDir,
}

impl AgentProc {
    /// Starts `uplink agent --transport TRANSPORT EXTRA...` against the
    /// backend with the suite's enrollment token.
    pub fn spawn(ctx: &Ctx, label: &str, transport: &str, extra: &[&str]) -> Result<Self, String> {
        let state = tempfile::Builder::new()
            .prefix("uplink-conformance-")
            .tempdir()
            .map_err(|e| format!("cannot make a state dir: {e}"))?;
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the uplink binary to start an agent: {e}"))?;
        let hostname = fresh(&format!("conformance-{label}"));
        let mut cmd = Command::new(exe);
        cmd.arg("agent")
            .arg("--backend")
            .arg(ctx.backend.to_string())
            .arg("--state-dir")
            .arg(state.path())
            .arg("--hostname")
            .arg(&hostname)
            .arg("--transport")
            .arg(transport)
            .arg("--no-metrics");
        for f in &ctx.ca_files {
            cmd.arg("--ca-file").arg(f);
        }
        cmd.args(extra)
            .env("UPLINK_TOKEN", ctx.enroll_token.expose())
            .env_remove("UPLINK_TOKEN_FILE")
            .env_remove("UPLINK_STATE_DIR")
            .env_remove("UPLINK_TRANSPORT")
            .env_remove("UPLINK_METRICS_LISTEN")
            .env("UPLINK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start an agent: {e}"))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let Ok(mut l) = log.lock() else { break };
                    if l.len() == 5 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        Ok(AgentProc {
            child,
            hostname,
            log,
            _state: state,
        })
    }

    /// The agent's last log lines, for a failure message.
    pub fn tail(&self) -> String {
        let lines: Vec<String> = self
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        format!("agent {} logged: {}", self.hostname, lines.join(" | "))
    }

    /// The agent as the admin service shows it, once it is connected on
    /// `rung`, within `within`.
    pub async fn connected(
        &mut self,
        ctx: &Ctx,
        rung: Rung,
        within: Duration,
    ) -> Result<proto::AgentView, String> {
        let deadline = Instant::now() + within;
        let mut last = String::from("not listed by ListAgents");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the agent exited ({status}); {}", self.tail()));
            }
            match ctx.admin.agents("").await {
                Ok(agents) => {
                    if let Some(a) = agents.into_iter().find(|a| a.hostname == self.hostname) {
                        let on = crate::ctl::transport_name(a.transport);
                        if a.connected && on == rung.name() {
                            return Ok(a);
                        }
                        last = format!("listed with connected: {}, transport: {on:?}", a.connected);
                    }
                }
                Err(e) => last = format!("ListAgents failed: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the agent was not shown connected on {} within {within:?} ({last}); {}",
                    rung.name(),
                    self.tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
