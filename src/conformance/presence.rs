//! Presence: when the admin service shows an agent connected, and on which
//! rung.

use std::time::Duration;

use super::peer::RawAgent;
use super::{Check, Ctx, Rung, ensure};
use crate::proto;

/// The agent `id` as `ListAgents` shows it.
async fn view(ctx: &Ctx, id: &str) -> Result<proto::AgentView, String> {
    ctx.admin
        .agents("")
        .await
        .map_err(|e| format!("ListAgents: {e}"))?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| format!("ListAgents does not list agent {id}"))
}

/// Presence (admin.proto `AgentView.connected`, `.transport`; agent.proto
/// `AgentInfo`, `Poll`): a `Poll` whose `info` is empty (a diagnostic call)
/// does not make an agent connected; an open `Subscribe` stream (when the
/// gRPC rung is tested) and a held `Poll` do, on their rung; more than 5 s
/// (7 s here) after its last call, with no stream or poll, it is shown
/// disconnected.
pub(super) async fn presence(ctx: &Ctx) -> Check {
    let mut a = RawAgent::enroll(ctx, "presence").await?;
    a.poll_anonymous()
        .await
        .map_err(|e| format!("a Poll with an empty AgentInfo: {e}"))?;
    let v = view(ctx, &a.id).await?;
    ensure(!v.connected, || {
        "a Poll with an empty AgentInfo (a diagnostic call) made the agent connected".into()
    })?;
    if ctx.rung.covers(Rung::Grpc) {
        a = a.with_grpc(ctx).await?;
        let mut s = a
            .subscribe(0)
            .await
            .map_err(|e| format!("Subscribe: {e}"))?;
        super::peer::next_frame(&mut s, Duration::from_secs(4))
            .await?
            .ok_or("no frame within 4 s of Subscribe")?;
        let v = view(ctx, &a.id).await?;
        ensure(
            v.connected && v.transport == proto::Transport::Grpc as i32,
            || {
                format!(
                    "with a stream open the agent is shown connected: {}, transport {}",
                    v.connected,
                    transport(v.transport)
                )
            },
        )?;
        drop(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if ctx.rung.covers(Rung::Longpoll) {
        let poll = a.poll(0, 2_000);
        tokio::pin!(poll);
        let v = tokio::select! {
            r = &mut poll => return Err(format!("a Poll with hold_ms 2000 answered at once: {r:?}")),
            v = async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                view(ctx, &a.id).await
            } => v?,
        };
        ensure(
            v.connected && v.transport == proto::Transport::Longpoll as i32,
            || {
                format!(
                    "with a poll held the agent is shown connected: {}, transport {}",
                    v.connected,
                    transport(v.transport)
                )
            },
        )?;
        poll.await.map_err(|e| format!("the held Poll: {e}"))?;
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let v = view(ctx, &a.id).await?;
    ensure(!v.connected, || {
        "7 s after its last call, with no stream or poll, the agent is still shown connected".into()
    })
}

fn transport(t: i32) -> &'static str {
    proto::Transport::try_from(t)
        .map(|t| t.as_str_name())
        .unwrap_or("unknown")
}
