//! An agent's identity: enrollment (tokens, the idempotency key), credential
//! rotation and revocation.

use std::time::{Duration, Instant};

use tonic::Code;

use super::peer::{self, AGENT_SERVICE, CALL_TIMEOUT, RawAgent, code_of, fresh, info};
use super::{Check, Ctx, Rung, ensure};
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

/// Credential rotation (agent.proto, `RotateCredential`): the new
/// credential differs from the current one; both work until the new one is
/// first used, and from then on only the new one.
pub(super) async fn rotation(ctx: &Ctx) -> Check {
    let rung = ctx.rung.rungs()[0];
    let mut a = RawAgent::enroll(ctx, "rotation").await?;
    if rung == Rung::Grpc {
        a = a.with_grpc(ctx).await?;
    }
    let old = a.credential.clone();
    let new = a
        .rotate(rung)
        .await
        .map_err(|e| format!("RotateCredential on {}: {e}", rung.name()))?;
    ensure(!new.is_empty() && new != old.expose(), || {
        "RotateCredential answered an empty credential or the current one".into()
    })?;
    let new = Secret::new(new);
    poll_with(ctx, &old, &a.hostname)
        .await
        .map_err(|e| format!("the current credential, before the new one was used: {e}"))?;
    poll_with(ctx, &new, &a.hostname)
        .await
        .map_err(|e| format!("the new credential from RotateCredential: {e}"))?;
    match poll_with(ctx, &old, &a.hostname).await {
        Err(e) if e.starts_with("unauthenticated") => Ok(()),
        Err(e) => Err(format!(
            "the old credential after the new one was used: want UNAUTHENTICATED, got {e}"
        )),
        Ok(()) => Err("the old credential still works after the new one was used".into()),
    }
}

/// Revocation (admin.proto, `RevokeAgent`): an agent's open stream (when
/// the gRPC rung is tested) and its held poll end with UNAUTHENTICATED
/// (at once, or by the next heartbeat on a backend of several replicas);
/// every later call with its credential fails with UNAUTHENTICATED;
/// repeating it answers the first revocation's time.
pub(super) async fn revocation(ctx: &Ctx) -> Check {
    let grpc = ctx.rung.covers(Rung::Grpc);
    let mut a = RawAgent::enroll(ctx, "revocation").await?;
    let mut stream = None;
    let mut within = Duration::from_secs(3);
    if grpc {
        a = a.with_grpc(ctx).await?;
        let mut s = a
            .subscribe(0)
            .await
            .map_err(|e| format!("Subscribe: {e}"))?;
        match peer::next_frame(&mut s, Duration::from_secs(4)).await? {
            Some(proto::server_frame::Kind::Heartbeat(h)) => {
                within = within.max(
                    Duration::from_millis(u64::from(h.interval_ms) * 3 / 2)
                        + Duration::from_secs(2),
                );
            }
            other => return Err(format!("the first frame of a stream is {other:?}")),
        }
        stream = Some(s);
    }
    let poll = a.poll(0, 20_000);
    tokio::pin!(poll);
    tokio::select! {
        r = &mut poll => return Err(format!("a Poll with hold_ms 20000 answered at once: {r:?}")),
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    let at = ctx
        .admin
        .revoke_agent(&a.id)
        .await
        .map_err(|e| format!("RevokeAgent: {e}"))?;
    match tokio::time::timeout(within, &mut poll).await {
        Err(_) => {
            return Err(format!(
                "a poll held when the agent was revoked did not end within {within:?}"
            ));
        }
        Ok(Err(e)) if code_of(&e) == Some(Code::Unauthenticated) => {}
        Ok(r) => {
            return Err(format!(
                "a poll held when the agent was revoked: want UNAUTHENTICATED, got {r:?}"
            ));
        }
    }
    if let Some(mut s) = stream {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match peer::next_frame(&mut s, left).await {
                Err(e) if e.contains("unauthenticated") => break,
                Err(e) => {
                    return Err(format!(
                        "a stream open when the agent was revoked: want UNAUTHENTICATED, got {e}"
                    ));
                }
                Ok(None) => {
                    return Err(format!(
                        "a stream open when the agent was revoked did not end within {within:?}"
                    ));
                }
                Ok(Some(_)) => {}
            }
        }
    }
    match poll_with(ctx, &a.credential, &a.hostname).await {
        Err(e) if e.starts_with("unauthenticated") => {}
        other => {
            return Err(format!(
                "a Poll with a revoked agent's credential: want UNAUTHENTICATED, got {other:?}"
            ));
        }
    }
    let again = ctx
        .admin
        .revoke_agent(&a.id)
        .await
        .map_err(|e| format!("RevokeAgent repeated: {e}"))?;
    ensure(again == at, || {
        format!("RevokeAgent repeated answered {again}, not the first revocation's time {at}")
    })
}
