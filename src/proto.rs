//! The generated contract, `proto/uplink/v1` (package `uplink.v1`), and the
//! descriptor pool used to read and write Connect JSON bodies with the
//! canonical proto3 JSON mapping.

#![allow(
    missing_docs,
    clippy::large_enum_variant,
    clippy::doc_lazy_continuation
)]

#[cfg(feature = "json")]
use std::sync::OnceLock;

#[cfg(feature = "json")]
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

tonic::include_proto!("uplink.v1");

/// The lowest ordered event epoch (`ReportRequest.epoch`): from here up an
/// agent's epochs must increase across its process starts, and the
/// backend refuses an epoch lower than the newest it has seen from the
/// agent. Lower epochs are those of agents that chose them at random, and
/// are not ordered.
pub const ORDERED_EPOCHS: u64 = 1 << 63;

/// The encoded `FileDescriptorSet` of `proto/`.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/uplink_descriptor.bin"));

/// The schema of `proto/`, for JSON conversion.
#[cfg(feature = "json")]
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The set is produced by build.rs from our own files; a failure here
        // is a build defect, caught by the unit test below.
        DescriptorPool::decode(DESCRIPTOR_SET).unwrap_or_default()
    })
}

/// A message type that has a descriptor in [`pool`].
pub trait Named: prost::Message + Default + Sized {
    /// The fully qualified protobuf name, e.g. `uplink.v1.PollRequest`.
    const FULL_NAME: &'static str;

    /// The descriptor of this message type.
    #[cfg(feature = "json")]
    fn descriptor() -> Option<MessageDescriptor> {
        pool().get_message_by_name(Self::FULL_NAME)
    }
}

macro_rules! named {
    ($($t:ident),* $(,)?) => {
        $(impl Named for $t { const FULL_NAME: &'static str = concat!("uplink.v1.", stringify!($t)); })*
    };
}

named!(
    EnrollRequest,
    EnrollResponse,
    SubscribeRequest,
    SubscribeResponse,
    PollRequest,
    PollResponse,
    ReportRequest,
    ReportResponse,
    PushMetricsRequest,
    PushMetricsResponse,
    RotateCredentialRequest,
    RotateCredentialResponse,
    ListAgentsRequest,
    ListAgentsResponse,
    ListProvidersRequest,
    ListProvidersResponse,
    CreateProviderRequest,
    CreateProviderResponse,
    RotateEnrollmentTokenRequest,
    RotateEnrollmentTokenResponse,
    RevokeAgentRequest,
    RevokeAgentResponse,
    EnqueueCommandRequest,
    EnqueueCommandResponse,
    GetCommandRequest,
    GetCommandResponse,
    CreateRunRequest,
    CreateRunResponse,
    ListRunsRequest,
    ListRunsResponse,
    GetRunRequest,
    GetRunResponse,
    StopRunRequest,
    StopRunResponse,
    GetRunLogsRequest,
    GetRunLogsResponse,
    MetricBatch,
);

/// Why a JSON body could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("no schema for message {0}")]
    NoSchema(&'static str),
    #[error(
        "this uplink build reads and writes no JSON bodies (built without the `json` feature): use protobuf bodies for {0}"
    )]
    NoJson(&'static str),
    #[error("invalid JSON for {name}: {source}")]
    Parse {
        name: &'static str,
        source: serde_json::Error,
    },
    #[error("invalid message {name}: {source}")]
    Decode {
        name: &'static str,
        source: prost::DecodeError,
    },
}

/// Parses a proto3-JSON body into `T`.
#[cfg(feature = "json")]
pub fn from_json<T: Named>(body: &[u8]) -> Result<T, JsonError> {
    let desc = T::descriptor().ok_or(JsonError::NoSchema(T::FULL_NAME))?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let dynamic =
        DynamicMessage::deserialize(desc, &mut de).map_err(|source| JsonError::Parse {
            name: T::FULL_NAME,
            source,
        })?;
    de.end().map_err(|source| JsonError::Parse {
        name: T::FULL_NAME,
        source,
    })?;
    let bytes = prost::Message::encode_to_vec(&dynamic);
    T::decode(bytes.as_slice()).map_err(|source| JsonError::Decode {
        name: T::FULL_NAME,
        source,
    })
}

/// Parses a proto3-JSON body into `T`: not in this build.
#[cfg(not(feature = "json"))]
pub fn from_json<T: Named>(_body: &[u8]) -> Result<T, JsonError> {
    Err(JsonError::NoJson(T::FULL_NAME))
}

/// Writes `msg` as proto3 JSON: not in this build.
#[cfg(not(feature = "json"))]
pub fn to_json<T: Named>(_msg: &T) -> Result<Vec<u8>, JsonError> {
    Err(JsonError::NoJson(T::FULL_NAME))
}

/// Writes `msg` as proto3 JSON (camelCase names, 64-bit integers as strings,
/// enums by name, fields with default values left out).
#[cfg(feature = "json")]
pub fn to_json<T: Named>(msg: &T) -> Result<Vec<u8>, JsonError> {
    let desc = T::descriptor().ok_or(JsonError::NoSchema(T::FULL_NAME))?;
    let bytes = msg.encode_to_vec();
    let dynamic =
        DynamicMessage::decode(desc, bytes.as_slice()).map_err(|source| JsonError::Decode {
            name: T::FULL_NAME,
            source,
        })?;
    serde_json::to_vec(&dynamic).map_err(|source| JsonError::Parse {
        name: T::FULL_NAME,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_pool_knows_every_named_message() {
        assert!(PollRequest::descriptor().is_some());
        assert!(GetCommandResponse::descriptor().is_some());
        assert!(MetricBatch::descriptor().is_some());
    }

    #[test]
    fn json_round_trip_uses_canonical_mapping() {
        let req = PollRequest {
            ack: 42,
            hold_ms: 25_000,
            info: Some(AgentInfo {
                hostname: "gen-1".into(),
                transport_reason: "configured".into(),
                ..Default::default()
            }),
        };
        let json = to_json(&req).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        // uint64 travels as a string, names are camelCase.
        assert!(text.contains(r#""ack":"42""#), "{text}");
        assert!(text.contains(r#""holdMs":25000"#), "{text}");
        assert!(text.contains(r#""transportReason":"configured""#), "{text}");
        let back: PollRequest = from_json(&json).unwrap();
        assert_eq!(back, req);
        // Both forms of a field name are accepted.
        let back: PollRequest = from_json(br#"{"ack": 7, "hold_ms": 5}"#).unwrap();
        assert_eq!((back.ack, back.hold_ms), (7, 5));
    }

    #[test]
    fn json_rejects_unknown_fields_and_garbage() {
        assert!(from_json::<PollRequest>(br#"{"nope": 1}"#).is_err());
        assert!(from_json::<PollRequest>(b"{").is_err());
        assert!(from_json::<PollRequest>(br#"{"ack": "x"}"#).is_err());
    }

    #[test]
    fn metric_batch_round_trips_through_proto_and_json() {
        let batch = MetricBatch {
            symbols: vec![
                "".into(),
                "host_cpu_usage_ratio".into(),
                "core".into(),
                "0".into(),
            ],
            series: vec![Series {
                name: 1,
                labels: vec![2, 3],
                kind: MetricKind::Gauge as i32,
                unit: 0,
            }],
            base_time_unix_ms: 1_700_000_000_000,
            sample_series: vec![0, 0, 0],
            sample_time_delta_ms: vec![0, 1000, -5],
            sample_values: vec![0.25, 0.5, 1.0],
            ..Default::default()
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(MetricBatch::decode(bytes.as_slice()).unwrap(), batch);
        let json = to_json(&batch).unwrap();
        assert_eq!(from_json::<MetricBatch>(&json).unwrap(), batch);
    }
}
