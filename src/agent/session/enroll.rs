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

/// The enrollment's idempotency key in the state dir, until the identity
/// is stored.
const ENROLL_KEY_FILE: &str = "enroll-key";

/// The idempotency key of this enrollment: the stored one, or a new one
/// (128 random bits) stored owner-only, synced, before it is used.
fn enroll_key(state_dir: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    let path = state_dir.join(ENROLL_KEY_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(s.to_string());
        }
    }
    let key = crate::secret::random_hex("", 16);
    let tmp = state_dir.join(format!("{ENROLL_KEY_FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(format!("{key}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(key)
}

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
    // Stored before the first attempt, so that a retry after a lost answer
    // (also after a restart) gets the same agent, not a second one.
    let key = enroll_key(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
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
                    idempotency_key: key.clone(),
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
                // The identity is stored: a later enrollment (another
                // backend, a lost identity) is a new one.
                let _ = std::fs::remove_file(cfg.state_dir.join(ENROLL_KEY_FILE));
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
    fn the_enrollment_key_is_kept_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let k = enroll_key(dir.path()).unwrap();
        assert_eq!(k.len(), 32);
        assert_eq!(
            enroll_key(dir.path()).unwrap(),
            k,
            "the same key on a retry"
        );
        std::fs::remove_file(dir.path().join(ENROLL_KEY_FILE)).unwrap();
        assert_ne!(
            enroll_key(dir.path()).unwrap(),
            k,
            "a new enrollment, a new key"
        );
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
