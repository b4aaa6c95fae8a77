//! Commands: delivery through real agents, polls that wake up, redelivery
//! of what was not acknowledged, and the heartbeats of a stream.

use std::time::{Duration, Instant};

use super::peer::{self, AgentProc, RawAgent, commands, fresh, next_frame, ping_result};
use super::{Check, Ctx, Rung, ensure};
use crate::proto::{self, server_frame::Kind};

/// How long a real agent may take to enroll and be shown connected.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);
/// How long a ping through a real agent may take.
const PING_WITHIN: Duration = Duration::from_secs(15);

/// The command path on one rung (agent.proto, delivery semantics; admin.proto
/// `EnqueueCommand`, `GetCommand`): a real agent pinned to the rung is shown
/// connected on it by `ListAgents`, and a `Ping` queued through the admin
/// service comes back `COMMAND_STATE_DONE` with status OK and its payload
/// echoed.
pub(super) async fn ping(ctx: &Ctx, rung: Rung) -> Check {
    let mut agent = AgentProc::spawn(ctx, &format!("ping-{}", rung.name()), rung.name(), &[])?;
    let view = agent.connected(ctx, rung, CONNECT_WITHIN).await?;
    let payload = fresh("payload");
    let outcome = ctx
        .admin
        .ping(&view.id, &payload, PING_WITHIN)
        .await
        .map_err(|e| format!("pinging agent {}: {e}", view.id))?;
    check_ping(&outcome.view, &payload).map_err(|e| format!("{e}; {}", agent.tail()))
}

/// A ping's view is done, OK, with `payload` echoed.
pub(super) fn check_ping(view: &proto::CommandView, payload: &str) -> Check {
    let id = view.command.as_ref().map(|c| c.id.as_str()).unwrap_or("?");
    ensure(view.state == proto::CommandState::Done as i32, || {
        format!(
            "ping {id} is {} after {PING_WITHIN:?}, not done",
            proto::CommandState::try_from(view.state)
                .map(|s| s.as_str_name())
                .unwrap_or("unknown")
        )
    })?;
    let result = view.result.clone().unwrap_or_default();
    ensure(result.status == proto::CommandStatus::Ok as i32, || {
        format!("ping {id} ended with {result:?}, not OK")
    })?;
    match result.detail {
        Some(proto::command_result::Detail::Ping(p)) if p.payload == payload => Ok(()),
        other => Err(format!(
            "ping {id}'s result does not echo the payload {payload:?}: {other:?}"
        )),
    }
}

/// A command queued mid-poll (agent.proto, `Poll`): a poll held with a long
/// hold is not answered while nothing is queued, and answers with the
/// command within a couple of seconds of its `EnqueueCommand`, well before
/// the hold ends.
pub(super) async fn poll_wakeup(ctx: &Ctx) -> Check {
    let a = RawAgent::enroll(ctx, "wakeup").await?;
    let started = Instant::now();
    let poll = a.poll(0, 20_000);
    tokio::pin!(poll);
    tokio::select! {
        r = &mut poll => {
            return Err(format!(
                "a Poll with hold_ms 20000 answered after {:.1} s, before any command was queued ({}): a poll is held until a command is queued or the hold passes",
                started.elapsed().as_secs_f64(),
                match r { Ok(r) => format!("{} frames", r.frames.len()), Err(e) => e.to_string() },
            ));
        }
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    let cmd = ctx
        .admin
        .enqueue(&a.id, peer::ping(0, "wakeup"))
        .await
        .map_err(|e| format!("EnqueueCommand: {e}"))?;
    let queued = Instant::now();
    let within = Duration::from_secs(3);
    let answer = tokio::time::timeout(within, poll)
        .await
        .map_err(|_| {
            format!(
                "a poll held when command {} was queued was not answered within {within:?} of the EnqueueCommand",
                cmd.id
            )
        })?
        .map_err(|e| format!("the held poll failed: {e}"))?;
    let got = commands(&answer.frames);
    ensure(got.iter().any(|c| c.id == cmd.id), || {
        format!(
            "the poll answered {:.1} s after the EnqueueCommand without command {}: {:?}",
            queued.elapsed().as_secs_f64(),
            cmd.id,
            answer.frames
        )
    })
}

/// Redelivery and no double execution (agent.proto, delivery semantics;
/// `SubscribeRequest.ack`, `PollResponse.frames`; admin.proto
/// `CommandState`): a new agent's first command has seq 1; while it is not
/// acknowledged it is delivered again on the next poll and on a new stream
/// with the earlier ack, and stays QUEUED; an ack (on a Report without
/// events) makes it ACCEPTED, its result DONE; after that it is never
/// delivered again. A poll answer with commands carries commands only, one
/// without commands a `Heartbeat` first.
pub(super) async fn redelivery(ctx: &Ctx) -> Check {
    let grpc = ctx.rung.covers(Rung::Grpc);
    let mut a = RawAgent::enroll(ctx, "redelivery").await?;
    if grpc {
        a = a.with_grpc(ctx).await?;
    }
    let cmd = ctx
        .admin
        .enqueue(&a.id, peer::ping(0, "redelivery"))
        .await
        .map_err(|e| format!("EnqueueCommand: {e}"))?;
    ensure(cmd.seq == 1, || {
        format!(
            "a new agent's first command has seq {}, not 1 (Command.seq)",
            cmd.seq
        )
    })?;
    for attempt in ["first", "second (ack still 0)"] {
        let r = a.poll(0, 5_000).await.map_err(|e| format!("Poll: {e}"))?;
        let got = commands(&r.frames);
        ensure(got.iter().any(|c| c.id == cmd.id && c.seq == 1), || {
            format!(
                "the {attempt} Poll with ack 0 did not carry command {} (seq 1): {:?}",
                cmd.id, r.frames
            )
        })?;
        ensure(got.len() == r.frames.len(), || {
            format!(
                "a Poll answer with commands carries commands only (PollResponse.frames): {:?}",
                r.frames
            )
        })?;
    }
    if grpc {
        let mut s = a
            .subscribe(0)
            .await
            .map_err(|e| format!("Subscribe: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match next_frame(&mut s, left).await? {
                Some(Kind::Command(c)) if c.id == cmd.id => break,
                Some(_) => {}
                None => {
                    return Err(format!(
                        "a new stream with ack 0 did not deliver the unacknowledged command {} within 5 s",
                        cmd.id
                    ));
                }
            }
        }
    }
    expect_state(
        ctx,
        &cmd.id,
        proto::CommandState::Queued,
        "delivered, no ack yet",
    )
    .await?;
    // The ack alone, on a Report without events (as the gRPC rung carries
    // it): the command is accepted, not done.
    let rung = ctx.rung.rungs()[0];
    let epoch = peer::ordered_epoch();
    report_acks(
        &a,
        rung,
        epoch,
        Vec::new(),
        0,
        "a Report of ack 1 without events in a new epoch (nothing stored)",
    )
    .await?;
    expect_state(
        ctx,
        &cmd.id,
        proto::CommandState::Accepted,
        "acked, no result yet",
    )
    .await?;
    report_acks(
        &a,
        rung,
        epoch,
        vec![ping_result(1, &cmd.id, "pong")],
        1,
        "a Report of ack 1 and the result as event seq 1",
    )
    .await?;
    let view = ctx
        .admin
        .command(&cmd.id, Duration::from_secs(5))
        .await
        .map_err(|e| format!("GetCommand: {e}"))?;
    ensure(view.state == proto::CommandState::Done as i32, || {
        format!(
            "after its result was acknowledged, command {} is not done: {view:?}",
            cmd.id
        )
    })?;
    let r = a
        .poll(1, 1_500)
        .await
        .map_err(|e| format!("Poll with ack 1: {e}"))?;
    ensure(commands(&r.frames).is_empty(), || {
        format!(
            "a Poll with ack 1 delivered commands again after the result: {:?}",
            r.frames
        )
    })?;
    ensure(
        matches!(
            r.frames.first().and_then(|f| f.kind.as_ref()),
            Some(Kind::Heartbeat(_))
        ),
        || {
            format!(
                "a Poll answered without commands must carry a Heartbeat first: {:?}",
                r.frames
            )
        },
    )?;
    if grpc {
        let mut s = a
            .subscribe(1)
            .await
            .map_err(|e| format!("Subscribe with ack 1: {e}"))?;
        let until = Instant::now() + Duration::from_secs(2);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Some(Kind::Command(c)) = next_frame(&mut s, left).await? {
                return Err(format!(
                    "a stream with ack 1 delivered command {} (seq {}) after its result and ack",
                    c.id, c.seq
                ));
            }
        }
    }
    Ok(())
}

/// Fails unless command `id` is in `want` (`when` says at what point).
/// Sends a `Report` of ack 1 with `events` in `epoch` on `rung`, and
/// checks that it answers `acked_seq` `want`.
async fn report_acks(
    a: &RawAgent,
    rung: Rung,
    epoch: u64,
    events: Vec<proto::Event>,
    want: u64,
    what: &str,
) -> Check {
    let r = a
        .report(
            rung,
            proto::ReportRequest {
                ack: 1,
                epoch,
                events,
            },
        )
        .await
        .map_err(|e| format!("{what} on {}: {e}", rung.name()))?;
    ensure(r.acked_seq == want, || {
        format!("{what} answered acked_seq {} (want {want})", r.acked_seq)
    })
}

async fn expect_state(ctx: &Ctx, id: &str, want: proto::CommandState, when: &str) -> Check {
    let v = ctx
        .admin
        .command(id, Duration::ZERO)
        .await
        .map_err(|e| format!("GetCommand {id}: {e}"))?;
    ensure(v.state == want as i32, || {
        format!(
            "command {id} ({when}) is {}, want {}",
            proto::CommandState::try_from(v.state)
                .map(|s| s.as_str_name())
                .unwrap_or("unknown"),
            want.as_str_name()
        )
    })
}

/// Heartbeats (agent.proto, `Subscribe` and `Heartbeat`): the first frame
/// of a stream is a `Heartbeat`, within 4 s, with a non-zero
/// `interval_ms`; the next heartbeat follows within 1.5 times that
/// interval (plus 2 s of slack).
pub(super) async fn heartbeats(ctx: &Ctx) -> Check {
    let a = RawAgent::enroll(ctx, "heartbeats")
        .await?
        .with_grpc(ctx)
        .await?;
    let opened = Instant::now();
    let mut s = a
        .subscribe(0)
        .await
        .map_err(|e| format!("Subscribe: {e}"))?;
    let left = Duration::from_secs(4).saturating_sub(opened.elapsed());
    let interval = match next_frame(&mut s, left).await? {
        Some(Kind::Heartbeat(h)) => h.interval_ms,
        Some(other) => {
            return Err(format!(
                "the first frame of a stream is {other:?}, not a Heartbeat"
            ));
        }
        None => return Err("no frame within 4 s of Subscribe".into()),
    };
    ensure(interval > 0, || {
        "the first Heartbeat has interval_ms 0".into()
    })?;
    let first = Instant::now();
    let within = Duration::from_millis(u64::from(interval) * 3 / 2) + Duration::from_secs(2);
    loop {
        let left = within.saturating_sub(first.elapsed());
        match next_frame(&mut s, left).await? {
            Some(Kind::Heartbeat(_)) => return Ok(()),
            Some(_) => {}
            None => {
                return Err(format!(
                    "no second Heartbeat within {within:?} of the first (interval_ms {interval})"
                ));
            }
        }
    }
}

/// How many commands `poll-order` queues: more than one poll answer holds.
const MANY: usize = 300;

/// Poll answers in order (agent.proto, `Command.seq`, `PollResponse.frames`):
/// with 300 commands queued, each poll answers the lowest commands above
/// its ack, in seq order without gaps, at most 256 at a time; polling again
/// with the new ack gets the next ones until every command came, each once.
pub(super) async fn poll_order(ctx: &Ctx) -> Check {
    let a = RawAgent::enroll(ctx, "order").await?;
    let mut queued = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let c = ctx
            .admin
            .enqueue(&a.id, peer::ping(0, &format!("order {i}")))
            .await
            .map_err(|e| format!("EnqueueCommand {i}: {e}"))?;
        queued.push(c.id);
    }
    let mut ack = 0u64;
    let mut got: Vec<String> = Vec::with_capacity(MANY);
    while got.len() < MANY {
        let r = a
            .poll(ack, 2_000)
            .await
            .map_err(|e| format!("Poll with ack {ack}: {e}"))?;
        let cmds = commands(&r.frames);
        ensure(!cmds.is_empty(), || {
            format!(
                "a Poll with ack {ack} answered no command, with {} of {MANY} queued commands above it",
                MANY - got.len()
            )
        })?;
        ensure(cmds.len() <= 256, || {
            format!(
                "a Poll answer carried {} commands (at most 256)",
                cmds.len()
            )
        })?;
        for c in cmds {
            ensure(c.seq == ack + 1, || {
                format!(
                    "after seq {ack} a Poll answer carried seq {} (the lowest above the ack, in order, without gaps)",
                    c.seq
                )
            })?;
            ack = c.seq;
            got.push(c.id.clone());
        }
    }
    ensure(got == queued, || {
        "the commands delivered are not the ones queued, in the order queued".into()
    })
}
