//! Enrollment: tokens, credentials, and the idempotency key.

use tonic::Code;

use super::peer::{self, AGENT_SERVICE, CALL_TIMEOUT, code_of, fresh, info};
use super::{Check, Ctx, ensure};
use crate::proto;
use crate::secret::Secret;

/// `Enroll` (agent.proto, `EnrollRequest`, `AgentInfo`): the enrollment
/// token given gets an agent id and a credential that the backend accepts;
/// an unknown token is refused with UNAUTHENTICATED on every rung tested;
/// an `AgentInfo` without `hostname` is refused with INVALID_ARGUMENT
/// naming the field; a retried `Enroll`
/// with the same idempotency key answers the same agent id with a new
/// credential, and the credential answered before stops working.
pub(super) async fn enrollment(ctx: &Ctx) -> Check {
    for rung in ctx.rung.rungs() {
        let bad = peer::enroll(
            ctx,
            rung,
            proto::EnrollRequest {
                enrollment_token: fresh("upl_e_not-a-token"),
                info: Some(info(&fresh("conformance-enroll"))),
                idempotency_key: String::new(),
            },
        )
        .await;
        match bad {
            Err(e) if code_of(&e) == Some(Code::Unauthenticated) => {}
            Err(e) => {
                return Err(format!(
                    "an unknown enrollment token on {}: want UNAUTHENTICATED, got {e}",
                    rung.name()
                ));
            }
            Ok(r) => {
                return Err(format!(
                    "an unknown enrollment token on {} was accepted (agent {})",
                    rung.name(),
                    r.agent_id
                ));
            }
        }
    }

    let mut nameless = info("");
    nameless.hostname.clear();
    match peer::enroll(
        ctx,
        ctx.rung.rungs()[0],
        proto::EnrollRequest {
            enrollment_token: ctx.enroll_token.expose().into(),
            info: Some(nameless),
            idempotency_key: String::new(),
        },
    )
    .await
    {
        Err(e) if code_of(&e) == Some(Code::InvalidArgument) && e.message.contains("hostname") => {}
        Err(e) => {
            return Err(format!(
                "Enroll without AgentInfo.hostname: want INVALID_ARGUMENT naming the field, got {e}"
            ));
        }
        Ok(r) => {
            return Err(format!(
                "Enroll without AgentInfo.hostname was accepted (agent {})",
                r.agent_id
            ));
        }
    }

    let key = fresh("conformance-key");
    let hostname = fresh("conformance-enroll");
    let req = proto::EnrollRequest {
        enrollment_token: ctx.enroll_token.expose().into(),
        info: Some(info(&hostname)),
        idempotency_key: key,
    };
    // The first attempt on one rung, the retry on the other (when both are
    // tested): the key is the same agent's whatever the rung.
    let rungs = ctx.rung.rungs();
    let first_rung = rungs[0];
    let retry_rung = *rungs.last().unwrap_or(&first_rung);
    let first = peer::enroll(ctx, first_rung, req.clone())
        .await
        .map_err(|e| format!("Enroll with the enrollment token given failed: {e}"))?;
    ensure(
        !first.agent_id.is_empty() && !first.credential.is_empty(),
        || format!("Enroll answered without an agent_id or credential: {first:?}"),
    )?;
    let first_cred = Secret::new(first.credential.clone());
    poll_with(ctx, &first_cred, &hostname)
        .await
        .map_err(|e| format!("the credential Enroll answered is refused by Poll: {e}"))?;

    let retry = peer::enroll(ctx, retry_rung, req)
        .await
        .map_err(|e| format!("a retried Enroll (same idempotency key) failed: {e}"))?;
    ensure(retry.agent_id == first.agent_id, || {
        format!(
            "a retried Enroll with the same idempotency key made a new agent: {} then {}",
            first.agent_id, retry.agent_id
        )
    })?;
    ensure(retry.credential != first.credential, || {
        "a retried Enroll answered the same credential again: the contract asks for a new one"
            .into()
    })?;
    let retry_cred = Secret::new(retry.credential);
    poll_with(ctx, &retry_cred, &hostname)
        .await
        .map_err(|e| format!("the credential of the retried Enroll is refused by Poll: {e}"))?;
    match poll_with(ctx, &first_cred, &hostname).await {
        Err(e) if e.starts_with("unauthenticated") => Ok(()),
        Err(e) => Err(format!(
            "the first credential after a retried Enroll: want UNAUTHENTICATED, got {e}"
        )),
        Ok(()) => Err(
            "the credential answered before a retried Enroll still works: the contract says it stops working"
                .into(),
        ),
    }
}

/// A `Poll` with `credential` that answers at once (hold 1 ms).
async fn poll_with(ctx: &Ctx, credential: &Secret, hostname: &str) -> Result<(), String> {
    let client = peer::connect_client(ctx).with_auth(credential.clone());
    let req = proto::PollRequest {
        ack: 0,
        hold_ms: 1,
        info: Some(info(hostname)),
    };
    client
        .call::<_, proto::PollResponse>(AGENT_SERVICE, "Poll", &req, CALL_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| e.message)
}
