//! Enrollment: the identity stored for the configured backend, or a new
//! one from `Enroll` with the provider's token, retried until it succeeds
//! or the agent stops. A rejected token or a failure only the operator can
//! fix is retried at the operator's pace, anything else with backoff.

use super::super::identity::{self, Identity};
use super::super::{AgentConfig, AgentError, TransportMode};
use super::Stop;
use super::transport::Unary;
use crate::backoff::Retry;
use crate::client::{self, CallError, ConnectClient, FailureKind};
use crate::grpc_path::GrpcPath;
use crate::health::StatusFile;
use crate::net::Net;
use crate::proto::{self, agent_service_client::AgentServiceClient};

/// How a failed enrollment is retried.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// The backend rejected the token: said once as an error, then
    /// retried at the operator's pace.
    Rejected,
    /// Only the operator can fix it (trust, permission): the operator's
    /// pace.
    Operator,
    /// Anything else: backoff.
    Backoff,
}

fn wait_after(e: &CallError) -> Wait {
    if e.kind == FailureKind::Status(tonic::Code::Unauthenticated) {
        Wait::Rejected
    } else if e.needs_operator() {
        Wait::Operator
    } else {
        Wait::Backoff
    }
}

/// Loads the identity, or enrolls. None when stopped before enrolling.
pub(super) async fn enrolled(
    cfg: &AgentConfig,
    net: &Net,
    info: &proto::AgentInfo,
    stop: &mut Stop,
    status: &StatusFile,
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
                TransportMode::Grpc => Unary::Grpc(AgentServiceClient::new(GrpcPath::new(
                    client::grpc_channel(&cfg.backend, net, cfg.keepalive, cfg.keepalive_timeout)
                        .await?,
                ))),
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
        if let Err(e) = &attempt {
            status.failed("", &format!("enrollment failed: {e}"));
        }
        let delay = match attempt {
            Ok(resp) => {
                let id = Identity {
                    backend: backend.clone(),
                    agent_id: resp.agent_id,
                    credential: resp.credential,
                    provider: resp.provider,
                    issued_unix_ms: crate::now_unix_ms(),
                };
                identity::save(&cfg.state_dir, &id)?;
                tracing::info!(agent = %id.agent_id, provider = %id.provider, "enrolled");
                return Ok(Some(id));
            }
            Err(e) => match wait_after(&e) {
                Wait::Rejected => {
                    let d = super::jitter(cfg.operator_retry);
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
                wait => {
                    let d = if wait == Wait::Operator {
                        super::jitter(cfg.operator_retry)
                    } else {
                        retry.next_delay()
                    };
                    tracing::warn!(
                        failure = e.label(),
                        "enrollment failed: {e}; retrying in {d:.1?}"
                    );
                    d
                }
            },
        };
        tokio::select! {
            _ = stop.wait() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: FailureKind) -> CallError {
        CallError {
            kind,
            message: "x".into(),
        }
    }

    #[test]
    fn a_rejected_token_waits_for_the_operator_and_is_said_once() {
        assert_eq!(
            wait_after(&err(FailureKind::Status(tonic::Code::Unauthenticated))),
            Wait::Rejected
        );
    }

    #[test]
    fn trust_and_permission_wait_for_the_operator() {
        assert_eq!(wait_after(&err(FailureKind::Tls)), Wait::Operator);
        assert_eq!(
            wait_after(&err(FailureKind::Status(tonic::Code::PermissionDenied))),
            Wait::Operator
        );
    }

    #[test]
    fn the_path_and_the_backend_being_away_back_off() {
        for kind in [
            FailureKind::Dns,
            FailureKind::Refused,
            FailureKind::Unreachable,
            FailureKind::Timeout,
            FailureKind::NoH2,
            FailureKind::Other,
            FailureKind::Status(tonic::Code::Unavailable),
        ] {
            assert_eq!(wait_after(&err(kind)), Wait::Backoff, "{kind:?}");
        }
    }
}
