//! The transport: the unary client of the current rung (published in a
//! [`UnarySlot`] that the reporter, the capacity reporter and the metrics
//! push read), the gRPC stream's opening (a stream counts as open only
//! after its first frame) and its adoption, and the `AgentInfo` sent with
//! every `Subscribe` and `Poll`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Uri;
use tokio::sync::watch;
use tonic::metadata::MetadataValue;

use crate::client::{self, CallError, ConnectClient, FailureKind};
use crate::grpc_path::{EndToEnd, GrpcPath};
use crate::net::Net;
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::secret::Secret;

use super::super::ladder::jitter as ld_jitter;
use super::credential::Credential;

/// How long a new stream may take to deliver its first frame (the backend
/// sends a heartbeat at once). Short, so that a path that swallows HTTP/2
/// costs the ladder seconds, not minutes.
pub(super) const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(4);
/// After [`FIRST_FRAME_TIMEOUT`], how long a frame that may have arrived
/// in time gets to be read before the stream is judged.
const FIRST_FRAME_GRACE: Duration = Duration::from_millis(500);
/// Timeout of unary calls.
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) const AGENT_SERVICE: &str = "uplink.v1.AgentService";

/// A unary client on the current rung.
#[derive(Clone)]
pub(super) enum Unary {
    Grpc(AgentServiceClient<GrpcPath>),
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
    pub(super) async fn enroll(
        &self,
        req: proto::EnrollRequest,
    ) -> Result<proto::EnrollResponse, CallError> {
        match self {
            Unary::Grpc(c) => grpc_answer(c.clone().enroll(grpc_request(req, None)?).await),
            Unary::Connect(c) => c.call(AGENT_SERVICE, "Enroll", &req, UNARY_TIMEOUT).await,
        }
    }

    pub(super) async fn report(
        &self,
        credential: &Secret,
        req: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, CallError> {
        match self {
            Unary::Grpc(c) => {
                grpc_answer(c.clone().report(grpc_request(req, Some(credential))?).await)
            }
            Unary::Connect(c) => {
                as_whom(c, credential)
                    .call(AGENT_SERVICE, "Report", &req, UNARY_TIMEOUT)
                    .await
            }
        }
    }

    /// `RotateCredential`.
    pub(super) async fn rotate_credential(
        &self,
        credential: &Secret,
    ) -> Result<proto::RotateCredentialResponse, CallError> {
        let req = proto::RotateCredentialRequest {};
        match self {
            Unary::Grpc(c) => grpc_answer(
                c.clone()
                    .rotate_credential(grpc_request(req, Some(credential))?)
                    .await,
            ),
            Unary::Connect(c) => {
                as_whom(c, credential)
                    .call(AGENT_SERVICE, "RotateCredential", &req, UNARY_TIMEOUT)
                    .await
            }
        }
    }

    /// `PushMetrics`, compressed with zstd on either rung: by the
    /// transport, or already (`batch_zstd`), when the request goes as it is.
    pub(super) async fn push_metrics(
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
                grpc_answer(c.push_metrics(grpc_request(req, Some(credential))?).await)
            }
            Unary::Connect(c) => {
                as_whom(c, credential)
                    .call_encoded(
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

/// A Connect client that sends `credential`: the one the caller read from
/// the session's [`Credential`](super::credential::Credential) for this
/// call, so a rotated credential is used from the next call on.
pub(super) fn as_whom(c: &ConnectClient, credential: &Secret) -> ConnectClient {
    c.clone().with_auth(credential.clone())
}

/// A unary gRPC answer as the session reads it: the message, or the
/// call's error.
fn grpc_answer<T>(answer: Result<tonic::Response<T>, tonic::Status>) -> Result<T, CallError> {
    answer
        .map(tonic::Response::into_inner)
        .map_err(|s| CallError::from_tonic(&s))
}

/// The unary client of the current rung: published by the rung loop,
/// read by the tasks that send (None until the first rung is up). A
/// clone is a handle on the same slot; the slot lives while any handle
/// does, so its readers never see it closed while they run.
#[derive(Clone)]
pub(super) struct UnarySlot(Arc<watch::Sender<Option<Unary>>>);

impl UnarySlot {
    pub(super) fn new() -> Self {
        UnarySlot(Arc::new(watch::channel(None).0))
    }

    /// Makes `unary` the client of the current rung.
    pub(super) fn publish(&self, unary: Unary) {
        self.0.send_replace(Some(unary));
    }

    /// Follows the slot: a change is a new connection.
    pub(super) fn subscribe(&self) -> watch::Receiver<Option<Unary>> {
        self.0.subscribe()
    }
}

/// The agent's `AgentInfo`, with the ladder's reason for its rung (sent
/// with every `Subscribe` and `Poll`).
pub(super) struct Info {
    base: proto::AgentInfo,
    /// Why the agent is on its rung; set by the rung loop.
    reason: Mutex<String>,
}

impl Info {
    pub(super) fn new(base: proto::AgentInfo) -> Self {
        Info {
            base,
            reason: Mutex::new(String::new()),
        }
    }

    /// The current `AgentInfo`, with the ladder's reason.
    pub(super) fn current(&self) -> proto::AgentInfo {
        let mut info = self.base.clone();
        info.transport_reason = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        info
    }

    /// Sets the reason sent from now on, clipped to fit the contract.
    pub(super) fn set_reason(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = clip_reason(reason);
    }
}

/// The contract allows 256 bytes of reason; error texts can be longer, so
/// a reason past 250 bytes is cut at 240 (on a character boundary) and
/// ends with `…`.
fn clip_reason(reason: &str) -> String {
    let mut reason = reason.to_string();
    if reason.len() > 250 {
        let mut cut = 240;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    reason
}

/// A gRPC stream that delivered its first frame.
pub(super) struct OpenStream {
    client: AgentServiceClient<GrpcPath>,
    end_to_end: Arc<EndToEnd>,
    stream: tonic::Streaming<proto::SubscribeResponse>,
    first: proto::SubscribeResponse,
    /// The ack it was opened with.
    pub(super) ack: u64,
}

/// The stream a gRPC session reads.
pub(super) struct LiveStream {
    pub(super) stream: tonic::Streaming<proto::SubscribeResponse>,
    /// Its first frame, not yet handled.
    pub(super) first: Option<proto::SubscribeResponse>,
    /// Heartbeats it delivered (the ladder judges early deaths by them).
    pub(super) heartbeats: u32,
    pub(super) opened: tokio::time::Instant,
    /// When it is replaced, make before break.
    pub(super) rotate_at: tokio::time::Instant,
    /// How the calls on its connection end (with trailers or without).
    pub(super) end_to_end: Arc<EndToEnd>,
}

/// A stream being opened.
pub(super) type Opening = Pin<Box<dyn Future<Output = Result<OpenStream, CallError>> + Send>>;

/// What the transport connects with: where, through what, as whom, and
/// the slot where it publishes the unary client of the current rung.
pub(super) struct Transport {
    pub(super) backend: Uri,
    pub(super) net: Net,
    pub(super) keepalive: Duration,
    pub(super) keepalive_timeout: Duration,
    /// A stream older than this is replaced.
    pub(super) stream_max_age: Duration,
    pub(super) credential: Credential,
    pub(super) slot: UnarySlot,
}

impl Transport {
    /// A Connect client for long-polling, published as the rung's unary
    /// client.
    pub(super) fn connect_longpoll(&self) -> ConnectClient {
        let client = ConnectClient::new(&self.backend, &self.net);
        self.slot.publish(Unary::Connect(Box::new(client.clone())));
        client
    }

    /// Opens a gRPC stream and waits for its first frame. The ack and the
    /// info are read once the connection is up.
    pub(super) async fn open_stream(
        &self,
        ack: &watch::Receiver<u64>,
        info: &Info,
    ) -> Result<OpenStream, CallError> {
        let channel = client::grpc_channel(
            &self.backend,
            &self.net,
            self.keepalive,
            self.keepalive_timeout,
        )
        .await?;
        let path = GrpcPath::new(channel);
        let end_to_end = path.end_to_end();
        let client = AgentServiceClient::new(path)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let ack = *ack.borrow();
        let mut req = grpc_request(
            proto::SubscribeRequest {
                ack,
                info: Some(info.current()),
            },
            Some(&self.credential.get()),
        )?;
        // A stream has no deadline; the dead-stream timer guards it.
        req.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let subscriber = client.clone();
        let first = async move {
            let mut stream = subscriber
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
        let mut first = std::pin::pin!(first);
        let no_frame = || CallError {
            kind: FailureKind::NoH2,
            message: format!(
                "the stream delivered no frame within {FIRST_FRAME_TIMEOUT:?} (the backend sends a heartbeat at once)"
            ),
        };
        let (stream, first) = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, first.as_mut()).await
        {
            Ok(r) => r?,
            // The deadline and the frame can wake this task together on a
            // busy host: the frame then still sits with the connection's
            // task, unread. Let that task run before judging the path.
            Err(_) => tokio::time::timeout(FIRST_FRAME_GRACE, first.as_mut())
                .await
                .map_err(|_| no_frame())??,
        };
        Ok(OpenStream {
            client,
            end_to_end,
            stream,
            first,
            ack,
        })
    }

    /// Makes `open` the stream in use: its client carries the unary calls,
    /// and its maximum age starts now.
    pub(super) fn adopt(&self, open: OpenStream) -> LiveStream {
        self.slot.publish(Unary::Grpc(open.client));
        crate::telemetry::stream_opened();
        let opened = tokio::time::Instant::now();
        LiveStream {
            stream: open.stream,
            first: Some(open.first),
            heartbeats: 0,
            opened,
            rotate_at: opened + ld_jitter(self.stream_max_age, fastrand::f64()),
            end_to_end: open.end_to_end,
        }
    }
}

/// Opens a stream in a task of its own making (a probe or a replacement),
/// reading the ack and the info when the connection is up.
pub(super) fn opening(
    transport: &Arc<Transport>,
    ack: &watch::Receiver<u64>,
    info: &Arc<Info>,
) -> Opening {
    let (t, ack, info) = (transport.clone(), ack.clone(), info.clone());
    Box::pin(async move { t.open_stream(&ack, &info).await })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reason_is_sent_as_it_is() {
        assert_eq!(clip_reason(""), "");
        let r = "x".repeat(250);
        assert_eq!(clip_reason(&r), r);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let clipped = clip_reason(&"x".repeat(251));
        assert_eq!(clipped, format!("{}…", "x".repeat(240)));
        assert!(clipped.len() <= 256);
        // 'é' is two bytes: byte 240 falls inside one at an odd offset.
        let clipped = clip_reason(&format!("x{}", "é".repeat(200)));
        assert!(clipped.ends_with('…'));
        assert_eq!(clipped.len(), 239 + '…'.len_utf8());
        assert!(clipped.len() <= 256);
    }

    #[test]
    fn the_info_carries_the_reason_set_last() {
        let info = Info::new(proto::AgentInfo {
            hostname: "h".into(),
            ..Default::default()
        });
        assert_eq!(info.current().transport_reason, "");
        info.set_reason(&"y".repeat(300));
        let now = info.current();
        assert_eq!(now.hostname, "h");
        assert!(now.transport_reason.ends_with('…'));
        assert!(now.transport_reason.len() <= 256);
    }

    #[test]
    fn a_credential_that_is_no_header_value_is_refused() {
        let ok = grpc_request((), Some(&Secret::new("abc"))).unwrap();
        assert_eq!(ok.metadata().get("authorization").unwrap(), "Bearer abc");
        let e = grpc_request((), Some(&Secret::new("a\nb"))).unwrap_err();
        assert_eq!(e.kind, FailureKind::Other);
        assert!(e.message.contains("identity.json"), "{}", e.message);
        let anonymous = grpc_request((), None).unwrap();
        assert!(anonymous.metadata().get("authorization").is_none());
        assert_eq!(
            anonymous.metadata().get("grpc-timeout").unwrap(),
            "30000000u"
        );
    }
}
