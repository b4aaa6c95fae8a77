//! `uplink ctl`: the operator's command line, a client of the admin service
//! (Connect unary over HTTPS), so it works against any backend that
//! implements the contract.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use http::Uri;

use crate::client::{CallError, ConnectClient};
use crate::proto::{self, Named};
use crate::secret::Secret;

const ADMIN_SERVICE: &str = "uplink.v1.AdminService";

/// A client of the admin service.
#[derive(Clone)]
pub struct Admin {
    client: ConnectClient,
}

/// A finished ping.
#[derive(Debug)]
pub struct PingOutcome {
    pub command_id: String,
    /// From the enqueue call to the result's arrival, as seen by the caller.
    pub round_trip: Duration,
    /// The command's final view (`None` when it timed out).
    pub view: proto::CommandView,
}

impl Admin {
    /// An admin client for `backend`.
    pub fn new(backend: &Uri, net: &crate::net::Net, token: Secret) -> Self {
        Admin {
            client: ConnectClient::new(backend, net).with_auth(token),
        }
    }

    async fn call<Req: Named, Resp: Named>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        self.client.call(ADMIN_SERVICE, method, req, timeout).await
    }

    /// `ListAgents`.
    pub async fn agents(&self, provider: &str) -> Result<Vec<proto::AgentView>, CallError> {
        let r: proto::ListAgentsResponse = self
            .call(
                "ListAgents",
                &proto::ListAgentsRequest {
                    provider: provider.into(),
                },
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.agents)
    }

    /// `ListProviders`.
    pub async fn providers(&self) -> Result<Vec<proto::ProviderView>, CallError> {
        let r: proto::ListProvidersResponse = self
            .call(
                "ListProviders",
                &proto::ListProvidersRequest {},
                Duration::from_secs(30),
            )
            .await?;
        Ok(r.providers)
    }

    /// `CreateProvider`.
    pub async fn create_provider(
        &self,
        name: &str,
    ) -> Result<proto::CreateProviderResponse, CallError> {
        self.call(
            "CreateProvider",
            &proto::CreateProviderRequest { name: name.into() },
            Duration::from_secs(30),
        )
        .await
    }

    /// `RotateEnrollmentToken`.
    pub async fn rotate(
        &self,
        name: &str,
    ) -> Result<proto::RotateEnrollmentTokenResponse, CallError> {
        self.call(
            "RotateEnrollmentToken",
            &proto::RotateEnrollmentTokenRequest {
                provider: name.into(),
            },
            Duration::from_secs(30),
        )
        .await
    }

    /// `EnqueueCommand`.
    pub async fn enqueue(
        &self,
        agent: &str,
        spec: proto::CommandSpec,
    ) -> Result<proto::Command, CallError> {
        let r: proto::EnqueueCommandResponse = self
            .call(
                "EnqueueCommand",
                &proto::EnqueueCommandRequest {
                    agent_id: agent.into(),
                    spec: Some(spec),
                },
                Duration::from_secs(30),
            )
            .await?;
        r.command.ok_or_else(|| CallError {
            kind: crate::client::FailureKind::Other,
            message: "backend answered EnqueueCommand without a command".into(),
        })
    }

    /// `GetCommand`, waiting up to `wait` for the result.
    pub async fn command(&self, id: &str, wait: Duration) -> Result<proto::CommandView, CallError> {
        let r: proto::GetCommandResponse = self
            .call(
                "GetCommand",
                &proto::GetCommandRequest {
                    command_id: id.into(),
                    wait_ms: wait.as_millis().min(60_000) as u32,
                },
                wait + Duration::from_secs(10),
            )
            .await?;
        r.command.ok_or_else(|| CallError {
            kind: crate::client::FailureKind::Other,
            message: "backend answered GetCommand without a command".into(),
        })
    }

    /// Queues a ping for `agent` and waits up to `timeout` for its result.
    pub async fn ping(
        &self,
        agent: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<PingOutcome, CallError> {
        let start = Instant::now();
        let cmd = self
            .enqueue(
                agent,
                proto::CommandSpec {
                    kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                        delay_ms: 0,
                        payload: payload.into(),
                    })),
                },
            )
            .await?;
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let view = self
                .command(&cmd.id, left.min(Duration::from_secs(60)))
                .await?;
            if view.state == proto::CommandState::Done as i32 || Instant::now() >= deadline {
                return Ok(PingOutcome {
                    command_id: cmd.id,
                    round_trip: start.elapsed(),
                    view,
                });
            }
        }
    }
}

/// The name of a transport in `ctl` output.
pub fn transport_name(t: i32) -> &'static str {
    match proto::Transport::try_from(t).unwrap_or(proto::Transport::Unspecified) {
        proto::Transport::Grpc => "grpc",
        proto::Transport::Longpoll => "longpoll",
        proto::Transport::Unspecified => "",
    }
}

/// RFC 3339 UTC time of a Unix time in milliseconds ("" for 0).
pub fn rfc3339(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `ctl agents --json`: an array of objects.
pub fn agents_json(agents: &[proto::AgentView]) -> String {
    let arr: Vec<serde_json::Value> = agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "hostname": a.hostname,
                "provider": a.provider,
                "connected": a.connected,
                "transport": transport_name(a.transport),
                "transport_reason": a.transport_reason,
                "last_seen": rfc3339(a.last_seen_unix_ms),
                "last_seen_unix_ms": a.last_seen_unix_ms,
                "version": a.version,
                "acked_seq": a.acked_seq,
                "pending_commands": a.pending_commands,
            })
        })
        .collect();
    serde_json::to_string_pretty(&arr).unwrap_or_else(|_| "[]".into())
}

/// `ctl agents`: a table.
pub fn agents_table(agents: &[proto::AgentView]) -> String {
    let mut out = format!(
        "{:<22} {:<20} {:<12} {:<9} {:<9} {:<21} {:<8} {}\n",
        "ID", "HOSTNAME", "PROVIDER", "CONNECTED", "TRANSPORT", "LAST SEEN", "VERSION", "PENDING"
    );
    for a in agents {
        let _ = writeln!(
            out,
            "{:<22} {:<20} {:<12} {:<9} {:<9} {:<21} {:<8} {}",
            a.id,
            a.hostname,
            a.provider,
            if a.connected { "yes" } else { "no" },
            transport_name(a.transport),
            rfc3339(a.last_seen_unix_ms),
            a.version,
            a.pending_commands
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let a = proto::AgentView {
            id: "agt_1".into(),
            connected: true,
            transport: proto::Transport::Longpoll as i32,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&agents_json(&[a])).unwrap();
        let o = &v[0];
        for k in [
            "id",
            "hostname",
            "provider",
            "connected",
            "transport",
            "last_seen",
            "version",
            "transport_reason",
        ] {
            assert!(o.get(k).is_some(), "missing {k}");
        }
        assert_eq!(o["transport"], "longpoll");
        assert_eq!(o["connected"], true);
    }
}
