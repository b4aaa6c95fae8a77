//! What an agent sends back: events by `Report` (seq order, epochs) and
//! metric batches by `PushMetrics` (a window, deduplication).

use std::time::Duration;

use tonic::Code;

use super::peer::{RawAgent, capacity, code_of, commands, ordered_epoch, ping, ping_result};
use super::{Check, Ctx, Rung, ensure};
use crate::client::CallError;
use crate::proto;

/// An enrolled agent (with a gRPC connection when `rung` is gRPC) that has
/// been delivered one ping command by a poll: the command's id.
async fn agent_with_command(
    ctx: &Ctx,
    label: &str,
    rung: Rung,
) -> Result<(RawAgent, String), String> {
    let mut a = RawAgent::enroll(ctx, label).await?;
    if rung == Rung::Grpc {
        a = a.with_grpc(ctx).await?;
    }
    let cmd = ctx
        .admin
        .enqueue(&a.id, ping(0, label))
        .await
        .map_err(|e| format!("EnqueueCommand: {e}"))?;
    let r = a.poll(0, 5_000).await.map_err(|e| format!("Poll: {e}"))?;
    ensure(commands(&r.frames).iter().any(|c| c.id == cmd.id), || {
        format!(
            "a Poll with ack 0 did not deliver the queued command {}: {:?}",
            cmd.id, r.frames
        )
    })?;
    Ok((a, cmd.id))
}

/// A refusal with `code`, or a failure that names what came instead.
fn refused(
    what: &str,
    r: Result<impl std::fmt::Debug, CallError>,
    code: Code,
) -> Result<String, String> {
    match r {
        Err(e) if code_of(&e) == Some(code) => Ok(e.message),
        Err(e) => Err(format!("{what}: want {code:?}, got {e}")),
        Ok(ok) => Err(format!("{what}: want {code:?}, got an answer {ok:?}")),
    }
}

/// The message of a command's stored result, and when it was stored.
async fn stored_result(ctx: &Ctx, id: &str) -> Result<(i32, String, i64), String> {
    let v = ctx
        .admin
        .command(id, Duration::ZERO)
        .await
        .map_err(|e| format!("GetCommand {id}: {e}"))?;
    let message = v.result.map(|r| r.message).unwrap_or_default();
    Ok((v.state, message, v.done_unix_ms))
}

/// Reports (agent.proto, `ReportRequest.events`, `ReportResponse.acked_seq`),
/// on every rung tested: an event out of order (seq 2 before 1) is refused
/// with FAILED_PRECONDITION and not acknowledged; seq 0, and seqs not
/// consecutive within a request, are refused with INVALID_ARGUMENT (and
/// nothing of the request is stored); events in order are acknowledged up
/// to their seq; a request of a retried event and a new one stores the new
/// one; a Report without events answers the highest seq stored; a repeated
/// event is acknowledged again and stored once (a command result sent
/// again with another message, in the same epoch or after a restart in a
/// new one, leaves the first result in place: "keep the first").
pub(super) async fn reports(ctx: &Ctx) -> Check {
    for rung in ctx.rung.rungs() {
        reports_on(ctx, rung)
            .await
            .map_err(|e| format!("on {}: {e}", rung.name()))?;
    }
    Ok(())
}

async fn reports_on(ctx: &Ctx, rung: Rung) -> Check {
    let (a, id) = agent_with_command(ctx, "reports", rung).await?;
    let epoch = ordered_epoch();
    let report = |events: Vec<proto::Event>, epoch: u64| {
        a.report(
            rung,
            proto::ReportRequest {
                ack: 1,
                epoch,
                events,
            },
        )
    };
    refused(
        "a Report whose first event is seq 2 of a new epoch (a gap)",
        report(vec![capacity(2)], epoch).await,
        Code::FailedPrecondition,
    )?;
    refused(
        "a Report with an event of seq 0",
        report(vec![capacity(0)], epoch).await,
        Code::InvalidArgument,
    )?;
    refused(
        "a Report of seqs 1 and 3 (not consecutive)",
        report(vec![ping_result(1, &id, "gap"), capacity(3)], epoch).await,
        Code::InvalidArgument,
    )?;
    let r = report(vec![ping_result(1, &id, "first")], epoch)
        .await
        .map_err(|e| format!("a Report of seq 1: {e}"))?;
    ensure(r.acked_seq == 1, || {
        format!(
            "a Report of seq 1 after seq 2 was refused answered acked_seq {} (want 1: seq 2 was never stored)",
            r.acked_seq
        )
    })?;
    let (state, message, done_at) = stored_result(ctx, &id).await?;
    ensure(
        state == proto::CommandState::Done as i32 && message == "first",
        || {
            format!(
                "after its result was acknowledged, command {id} is state {state} with result {message:?}"
            )
        },
    )?;
    let r = report(vec![capacity(2)], epoch)
        .await
        .map_err(|e| format!("a Report of seq 2: {e}"))?;
    ensure(r.acked_seq == 2, || {
        format!(
            "a Report of seq 2 after seq 1 answered acked_seq {}",
            r.acked_seq
        )
    })?;
    let r = report(vec![ping_result(1, &id, "repeated"), capacity(2)], epoch)
        .await
        .map_err(|e| format!("a repeated Report of seqs 1 and 2: {e}"))?;
    ensure(r.acked_seq == 2, || {
        format!(
            "a repeated Report of seqs 1 and 2 answered acked_seq {}",
            r.acked_seq
        )
    })?;
    let r = report(vec![capacity(2), capacity(3)], epoch)
        .await
        .map_err(|e| format!("a Report of seqs 2 (a retry) and 3 (new): {e}"))?;
    ensure(r.acked_seq == 3, || {
        format!(
            "a Report of seqs 2 (a retry) and 3 (new) answered acked_seq {} (want 3)",
            r.acked_seq
        )
    })?;
    let r = report(Vec::new(), epoch)
        .await
        .map_err(|e| format!("a Report without events: {e}"))?;
    ensure(r.acked_seq == 3, || {
        format!(
            "a Report without events in an epoch stored up to seq 3 answered acked_seq {} (the highest stored is 3)",
            r.acked_seq
        )
    })?;
    let later = report(
        vec![ping_result(1, &id, "after a restart")],
        ordered_epoch() + 1_000_000,
    )
    .await
    .map_err(|e| format!("a Report of the same result in a new epoch: {e}"))?;
    ensure(later.acked_seq == 1, || {
        format!(
            "a Report of seq 1 in a new epoch answered acked_seq {}",
            later.acked_seq
        )
    })?;
    let (state, message, again_at) = stored_result(ctx, &id).await?;
    ensure(
        state == proto::CommandState::Done as i32 && message == "first" && again_at == done_at,
        || {
            format!(
                "the result of command {id} was stored more than once: after it was sent again its message is {message:?} (want \"first\"), done at {again_at} (was {done_at})"
            )
        },
    )
}

/// Epochs (agent.proto, `ReportRequest.epoch`): once an agent sent events
/// with an ordered epoch (from 2^63 up), a Report with a lower ordered
/// epoch is refused with FAILED_PRECONDITION ("must increase"), and none of
/// its events is stored (the command result it carried is not recorded).
pub(super) async fn epochs(ctx: &Ctx) -> Check {
    let rung = ctx.rung.rungs()[0];
    let (a, id) = agent_with_command(ctx, "epochs", rung).await?;
    let newer = ordered_epoch() + 1_000_000;
    let r = a
        .report(
            rung,
            proto::ReportRequest {
                ack: 1,
                epoch: newer,
                events: vec![capacity(1)],
            },
        )
        .await
        .map_err(|e| format!("a Report in epoch {newer}: {e}"))?;
    ensure(r.acked_seq == 1, || {
        format!("a Report of seq 1 answered acked_seq {}", r.acked_seq)
    })?;
    let older = newer - 1;
    let message = refused(
        "a Report with an epoch older than the agent's newest",
        a.report(
            rung,
            proto::ReportRequest {
                ack: 1,
                epoch: older,
                events: vec![ping_result(1, &id, "old epoch")],
            },
        )
        .await,
        Code::FailedPrecondition,
    )?;
    ensure(message.contains("must increase"), || {
        format!(
            "the refusal of an older epoch does not say \"must increase\" (agent.proto, ReportRequest.epoch): {message:?}"
        )
    })?;
    let (state, result, _) = stored_result(ctx, &id).await?;
    ensure(state != proto::CommandState::Done as i32, || {
        format!(
            "the result sent in a refused older epoch was stored: command {id} is done with {result:?}"
        )
    })
}

/// A small valid batch in the contract's first form (`sample_series`,
/// `sample_values`): one gauge sample.
fn batch(value: f64) -> proto::MetricBatch {
    proto::MetricBatch {
        symbols: vec![
            "".into(),
            "conformance_probe".into(),
            "case".into(),
            "metrics".into(),
        ],
        series: vec![proto::Series {
            name: 1,
            labels: vec![2, 3],
            kind: proto::MetricKind::Gauge as i32,
            unit: 0,
        }],
        base_time_unix_ms: crate::now_unix_ms(),
        sample_series: vec![0],
        sample_time_delta_ms: vec![0],
        sample_values: vec![value],
        ..Default::default()
    }
}

/// Metric batches (agent.proto, `PushMetricsRequest.seq`,
/// `PushMetricsResponse.stored`), zstd-compressed as the reference agent
/// sends them, on every rung tested: a new `(epoch, seq)` is stored
/// (`stored: true`); the same again answers `stored: false`; a seq out of
/// order within the window is stored; a seq more than 100000 above the
/// watermark is refused with FAILED_PRECONDITION; seq 0 is refused with
/// INVALID_ARGUMENT.
pub(super) async fn metrics(ctx: &Ctx) -> Check {
    for rung in ctx.rung.rungs() {
        metrics_on(ctx, rung)
            .await
            .map_err(|e| format!("on {}: {e}", rung.name()))?;
    }
    Ok(())
}

async fn metrics_on(ctx: &Ctx, rung: Rung) -> Check {
    let mut a = RawAgent::enroll(ctx, "metrics").await?;
    if rung == Rung::Grpc {
        a = a.with_grpc(ctx).await?;
    }
    let epoch = fastrand::u64(1..1 << 62);
    for (seq, want, why) in [
        (1, true, "a new batch"),
        (1, false, "the same (epoch, seq) again"),
        (
            3,
            true,
            "seq 3 before seq 2 (out of order, within the window)",
        ),
        (2, true, "seq 2 after seq 3"),
        (3, false, "seq 3 again"),
    ] {
        let r = a
            .push(
                rung,
                proto::PushMetricsRequest {
                    ack: 0,
                    epoch,
                    seq,
                    batch: Some(batch(seq as f64)),
                    batch_zstd: Vec::new(),
                    // The one sent before.
                    resent: !want,
                },
            )
            .await
            .map_err(|e| format!("PushMetrics of {why}: {e}"))?;
        ensure(r.stored == want, || {
            format!(
                "PushMetrics of {why} answered stored: {} (want {want})",
                r.stored
            )
        })?;
    }
    refused(
        "PushMetrics with seq 200000 (more than 100000 above the watermark 3)",
        a.push(
            rung,
            proto::PushMetricsRequest {
                ack: 0,
                epoch,
                seq: 200_000,
                batch: Some(batch(0.0)),
                batch_zstd: Vec::new(),
                resent: false,
            },
        )
        .await,
        Code::FailedPrecondition,
    )?;
    refused(
        "PushMetrics with seq 0",
        a.push(
            rung,
            proto::PushMetricsRequest {
                ack: 0,
                epoch,
                seq: 0,
                batch: Some(batch(0.0)),
                batch_zstd: Vec::new(),
                resent: false,
            },
        )
        .await,
        Code::InvalidArgument,
    )
    .map(|_| ())
}
