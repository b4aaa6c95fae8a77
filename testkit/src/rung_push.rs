//! The metrics pipeline's [`Push`] over a real backend on each rung, sent
//! as the agent's session sends it (the session's client is private to
//! it): `PushMetrics` over gRPC through tonic ([`grpc_push`]) or Connect
//! over HTTP/1.1 ([`longpoll_push`]), the answer mapped with the agent's
//! own [`uplink::agent::push::outcome`]. Every answer but "stored" is
//! noted in an [`Unexpected`] list, which a healthy backend leaves empty.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::codec::CompressionEncoding;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use uplink::client::{CallError, ConnectClient};
use uplink::metrics::pipeline::{Push, PushOutcome};
use uplink::proto::{self, agent_service_client::AgentServiceClient};

/// How long one push may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The service the long-poll rung calls.
const AGENT_SERVICE: &str = "uplink.v1.AgentService";

/// What the pushes saw that a healthy backend never answers (a duplicate, a
/// rejection, a failure); a run fails on the first.
pub type Unexpected = Arc<Mutex<Vec<String>>>;

/// The answer of one `PushMetrics` as the pipeline takes it, mapped as the
/// agent's session maps it ([`uplink::agent::push::outcome`]); anything but
/// `Stored` is noted in `unexpected`.
fn checked(
    r: Result<proto::PushMetricsResponse, CallError>,
    unexpected: &Unexpected,
) -> PushOutcome {
    let outcome = uplink::agent::push::outcome(r);
    if !matches!(outcome, PushOutcome::Stored(_)) {
        unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{outcome:?}"));
    }
    outcome
}

/// The pipeline's push on the gRPC rung, as the agent's session sends it:
/// a request whose batch is already a zstd frame (`batch_zstd`) goes as it
/// is, another is compressed by the transport.
pub fn grpc_push(
    client: AgentServiceClient<Channel>,
    authorization: AsciiMetadataValue,
    unexpected: Unexpected,
) -> Push {
    Arc::new(move |req: proto::PushMetricsRequest| {
        let (mut client, authorization) = (client.clone(), authorization.clone());
        let unexpected = unexpected.clone();
        Box::pin(async move {
            if req.batch_zstd.is_empty() {
                client = client.send_compressed(CompressionEncoding::Zstd);
            }
            let mut r = tonic::Request::new(req);
            r.set_timeout(CALL_TIMEOUT);
            r.metadata_mut().insert("authorization", authorization);
            let answer = client
                .push_metrics(r)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| CallError::from_tonic(&s));
            checked(answer, &unexpected)
        })
    })
}

/// The pipeline's push on the long-poll rung (Connect over HTTP/1.1), as
/// the agent's session sends it.
pub fn longpoll_push(client: ConnectClient, unexpected: Unexpected) -> Push {
    Arc::new(move |req: proto::PushMetricsRequest| {
        let client = client.clone();
        let unexpected = unexpected.clone();
        Box::pin(async move {
            let zstd = req.batch_zstd.is_empty();
            let answer = client
                .call_encoded(AGENT_SERVICE, "PushMetrics", &req, CALL_TIMEOUT, zstd)
                .await;
            checked(answer, &unexpected)
        })
    })
}
