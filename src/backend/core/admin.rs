//! The admin service: providers and their enrollment tokens, the list of
//! agents with their presence, and commands (queue one, wait for its
//! result).

use std::time::Duration;

use tonic::Status;

use super::checks::{check_provider_name, check_spec};
use super::{Core, internal};
use crate::proto;
use crate::secret::{self, Kind, Secret};

/// Longest `GetCommand` wait.
const MAX_RESULT_WAIT: Duration = Duration::from_secs(60);

/// Largest cap of agents an enrollment token may be given.
const MAX_TOKEN_AGENTS: u32 = 1_000_000;

/// The answer to a call naming an agent the store does not know.
fn unknown_agent(id: &str) -> Status {
    Status::not_found(format!("no agent {id:?}; `uplink ctl agents` lists them"))
}

/// Checks the limits asked for a new enrollment token: a cap within
/// [`MAX_TOKEN_AGENTS`], an expiry in the future (or none).
fn check_token_limits(max_agents: u32, expires_ms: i64, now: i64) -> Result<(), Status> {
    if max_agents > MAX_TOKEN_AGENTS {
        return Err(Status::invalid_argument(format!(
            "max_agents {max_agents} is above the largest cap, {MAX_TOKEN_AGENTS} (0: no cap)"
        )));
    }
    if expires_ms != 0 && expires_ms <= now {
        return Err(Status::invalid_argument(format!(
            "token_expires_unix_ms {expires_ms} is not in the future (now is {now}; 0: never)"
        )));
    }
    Ok(())
}

impl Core {
    /// `ListAgents`.
    pub async fn list_agents(
        &self,
        req: proto::ListAgentsRequest,
    ) -> Result<proto::ListAgentsResponse, Status> {
        let now = crate::now_unix_ms();
        let mut capacities = self.store.capacities().await.map_err(internal)?;
        let mut placed = self.placed(now).await?;
        let mut pending = self
            .store
            .pending_counts(&req.provider)
            .await
            .map_err(internal)?;
        let mut agents = Vec::new();
        for a in self.store.agents(&req.provider).await.map_err(internal)? {
            let (presence, replica) = match placed.remove(&a.id) {
                Some(p) => (Some(p.presence), p.replica),
                None => (None, String::new()),
            };
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
            let pending_commands = pending.remove(&a.id).unwrap_or(0);
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
                pending_commands,
                enrolled_unix_ms: a.enrolled_ms,
                capacity,
                revoked_unix_ms: a.revoked_ms,
                replica: if connected { replica } else { String::new() },
            });
        }
        Ok(proto::ListAgentsResponse { agents })
    }

    /// `ListProviders`.
    pub async fn list_providers(&self) -> Result<proto::ListProvidersResponse, Status> {
        Ok(proto::ListProvidersResponse {
            providers: self
                .store
                .providers()
                .await
                .map_err(internal)?
                .into_iter()
                .map(|p| proto::ProviderView {
                    name: p.name,
                    created_unix_ms: p.created_ms,
                    agents: p.agents,
                    max_agents: p.max_agents,
                    token_expires_unix_ms: p.expires_ms,
                    token_enrolled: p.token_enrolled,
                })
                .collect(),
        })
    }

    /// `CreateProvider`.
    pub async fn create_provider(
        &self,
        req: proto::CreateProviderRequest,
    ) -> Result<proto::CreateProviderResponse, Status> {
        check_provider_name(&req.name)?;
        let now = crate::now_unix_ms();
        check_token_limits(req.max_agents, req.token_expires_unix_ms, now)?;
        let token = Secret::generate(Kind::Enrollment);
        if !self
            .store
            .create_provider(&req.name, &token.hash(), now)
            .await
            .map_err(internal)?
        {
            return Err(Status::already_exists(format!(
                "provider {:?} exists already",
                req.name
            )));
        }
        self.store
            .set_token_limits(&req.name, req.max_agents, req.token_expires_unix_ms)
            .await
            .map_err(internal)?;
        tracing::info!(provider = %req.name, max_agents = req.max_agents, expires_ms = req.token_expires_unix_ms, "provider created");
        Ok(proto::CreateProviderResponse {
            provider: Some(proto::ProviderView {
                name: req.name,
                created_unix_ms: now,
                agents: 0,
                max_agents: req.max_agents,
                token_expires_unix_ms: req.token_expires_unix_ms,
                token_enrolled: 0,
            }),
            host_command: self.host_command(Some(token.expose())),
            enrollment_token: token.expose().to_string(),
        })
    }

    /// `RotateEnrollmentToken`.
    pub async fn rotate_token(
        &self,
        req: proto::RotateEnrollmentTokenRequest,
    ) -> Result<proto::RotateEnrollmentTokenResponse, Status> {
        check_provider_name(&req.provider)?;
        check_token_limits(
            req.max_agents,
            req.token_expires_unix_ms,
            crate::now_unix_ms(),
        )?;
        let token = Secret::generate(Kind::Enrollment);
        if !self
            .store
            .set_provider_token(&req.provider, &token.hash())
            .await
            .map_err(internal)?
        {
            return Err(Status::not_found(format!("no provider {:?}", req.provider)));
        }
        // The new token is not shown to anyone before its limits are set.
        self.store
            .set_token_limits(&req.provider, req.max_agents, req.token_expires_unix_ms)
            .await
            .map_err(internal)?;
        tracing::info!(provider = %req.provider, max_agents = req.max_agents, expires_ms = req.token_expires_unix_ms,
            "enrollment token rotated; the old one is revoked");
        Ok(proto::RotateEnrollmentTokenResponse {
            host_command: self.host_command(Some(token.expose())),
            enrollment_token: token.expose().to_string(),
        })
    }

    /// `RevokeAgent`.
    pub async fn revoke_agent(
        &self,
        req: proto::RevokeAgentRequest,
    ) -> Result<proto::RevokeAgentResponse, Status> {
        let revoked = self
            .store
            .revoke_agent(&req.agent_id, crate::now_unix_ms())
            .await
            .map_err(internal)?
            .ok_or_else(|| unknown_agent(&req.agent_id))?;
        // Stored first, so a call racing this one is refused by its
        // credential lookup; then what is open on this backend ends.
        self.hub.revoke(&req.agent_id);
        tracing::warn!(agent = %req.agent_id, "agent revoked; its streams and polls end and its credential is refused");
        Ok(proto::RevokeAgentResponse {
            revoked_unix_ms: revoked,
        })
    }

    /// `EnqueueCommand`.
    pub async fn enqueue(
        &self,
        req: proto::EnqueueCommandRequest,
    ) -> Result<proto::EnqueueCommandResponse, Status> {
        let spec = req.spec.ok_or_else(|| {
            Status::invalid_argument(
                "spec is missing: say what the command is, e.g. {\"ping\": {}}",
            )
        })?;
        check_spec(&spec)?;
        let id = match req.request_id.as_str() {
            "" => secret::random_id("cmd_"),
            key => {
                let id = request_command_id(&req.agent_id, key)?;
                // Made again (its first answer was lost): the command the
                // first call queued.
                if let Some(first) = self.requested_before(&req.agent_id, &id, &spec).await? {
                    return Ok(proto::EnqueueCommandResponse {
                        command: Some(first),
                    });
                }
                id
            }
        };
        let queued = self
            .store
            .enqueue(&req.agent_id, &id, &spec, crate::now_unix_ms())
            .await;
        let command = match queued {
            Ok(c) => c.ok_or_else(|| unknown_agent(&req.agent_id))?,
            // The same request made twice at once, through two backends:
            // the other one queued it.
            Err(e) if !req.request_id.is_empty() => self
                .requested_before(&req.agent_id, &id, &spec)
                .await?
                .ok_or_else(|| internal(e))?,
            Err(e) => return Err(internal(e)),
        };
        self.hub
            .notify_queued(&req.agent_id, command.seq, Some(&command));
        tracing::debug!(agent = %req.agent_id, command = %id, seq = command.seq, "command queued");
        Ok(proto::EnqueueCommandResponse {
            command: Some(command),
        })
    }

    /// The command an `EnqueueCommand` with the same request id queued
    /// as `id`, if any; refused when it was for another spec.
    async fn requested_before(
        &self,
        agent_id: &str,
        id: &str,
        spec: &proto::CommandSpec,
    ) -> Result<Option<proto::Command>, Status> {
        let Some(rec) = self.store.command(id).await.map_err(internal)? else {
            return Ok(None);
        };
        // Secrets are scrubbed from a finished command's stored spec.
        let mut asked = spec.clone();
        let stored = rec.command.spec.clone().unwrap_or_default();
        if rec.agent_id != agent_id
            || (asked != stored
                && !(crate::backend::store::scrub_secrets(&mut asked) && asked == stored))
        {
            return Err(Status::invalid_argument(
                "request_id was already used for another command: give each new command a new request_id",
            ));
        }
        Ok(Some(rec.command))
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
                .await
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

/// Longest `EnqueueCommandRequest.request_id`.
const MAX_REQUEST_ID: usize = 128;

/// The id of the command that `EnqueueCommand` with `request_id` queues
/// for `agent_id`: the same for the same pair, so a call made again finds
/// the command of the first.
fn request_command_id(agent_id: &str, request_id: &str) -> Result<String, Status> {
    if request_id.len() > MAX_REQUEST_ID || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "request_id must be 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces (a random UUID will do)"
        )));
    }
    let digest = secret::hash(&format!("{agent_id}\n{request_id}"));
    Ok(format!("cmd_{}", &digest[..16]))
}
