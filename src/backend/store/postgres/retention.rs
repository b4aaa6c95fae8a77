//! Retention in PostgreSQL: the body of
//! [`Store::prune`](crate::backend::store::Store::prune) for
//! [`PostgresStore`](super::PostgresStore), one statement or transaction
//! per table. Any backend may prune while others work: each deletion is
//! decided on rows it holds locked or in one statement.

use deadpool_postgres::Client;

use super::{METRIC_BATCHES, execute, query, query_one};
use crate::backend::store::{Pruned, Retention, StoreError};
use crate::proto::RunContainerState;

/// `v` as a BIGINT parameter (retention counts are far below its range).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) async fn prune(c: &mut Client, r: &Retention) -> Result<Pruned, StoreError> {
    // Finished commands the agent acknowledged: nothing will redeliver them
    // or wait for their result. Numbering lives in `agents.next_seq`, so
    // deleting them never reuses a seq.
    let commands = execute(
        &*c,
        "DELETE FROM commands WHERE done_ms > 0 AND done_ms < $1
         AND seq <= (SELECT acked_seq FROM agents WHERE agents.id = commands.agent_id)",
        &[&r.commands_before_ms],
    )
    .await?;
    let mut out = Pruned {
        commands,
        ..Pruned::default()
    };
    out.runs = prune_runs(c, r).await?;
    execute(
        &*c,
        "DELETE FROM metric_batch_writers WHERE recorded_ms < $1",
        &[&(crate::now_unix_ms() - crate::backend::store::WRITERS_KEPT_MS)],
    )
    .await?;
    // Container events: older than the retention, and beyond the newest
    // `container_events_per_agent` of each agent.
    out.container_events = execute(
        &*c,
        "DELETE FROM container_events WHERE time_ms < $1",
        &[&r.container_events_before_ms],
    )
    .await?;
    out.container_events += execute(
        &*c,
        "DELETE FROM container_events WHERE id IN (
            SELECT id FROM (SELECT id, ROW_NUMBER() OVER (
                PARTITION BY agent_id ORDER BY time_ms DESC, id DESC) AS n
                FROM container_events) AS ranked WHERE n > $1)",
        &[&big(r.container_events_per_agent)],
    )
    .await?;
    // Cursors of superseded epochs: each `(agent, stream)` keeps the
    // `epochs_kept` newest epochs (by when their cursor was made), and
    // the seqs stored above a forgotten metric epoch's watermark go with
    // it, in the same statement.
    let row = query_one(
        &*c,
        "WITH doomed AS (
            DELETE FROM cursors WHERE id IN (
                SELECT id FROM (SELECT id, ROW_NUMBER() OVER (
                    PARTITION BY agent_id, stream ORDER BY id DESC) AS n FROM cursors) AS ranked
                WHERE n > $1)
            RETURNING agent_id, stream, epoch),
         above AS (
            DELETE FROM metric_batches_above m USING doomed d
            WHERE d.stream = $2 AND m.agent_id = d.agent_id AND m.epoch = d.epoch
            RETURNING 1)
         SELECT (SELECT COUNT(*) FROM doomed), (SELECT COUNT(*) FROM above)",
        &[&big(r.epochs_kept), &METRIC_BATCHES],
    )
    .await?;
    out.cursors = row.try_get::<_, i64>(0)? as u64 + row.try_get::<_, i64>(1)? as u64;
    Ok(out)
}

/// Runs with nothing left on any host: every container failed to start
/// or was removed, and no stop or remove is in flight. The candidates are
/// locked, then checked again on what is committed by then (a container
/// change holds its run's share lock until it commits), then deleted.
async fn prune_runs(c: &mut Client, r: &Retention) -> Result<u64, StoreError> {
    let gone = [
        RunContainerState::Failed as i32,
        RunContainerState::Removed as i32,
    ];
    let nothing_left = "NOT EXISTS (
        SELECT 1 FROM run_containers c WHERE c.run_id = runs.id
        AND (c.state NOT IN ($2, $3) OR c.pending_command != ''))";
    let tx = c.transaction().await?;
    let candidates: Vec<String> = query(
        &tx,
        &format!(
            "SELECT id FROM runs WHERE created_ms < $1 AND {nothing_left} ORDER BY id FOR UPDATE"
        ),
        &[&r.runs_before_ms, &gone[0], &gone[1]],
    )
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let doomed: Vec<String> = query(
        &tx,
        &format!("SELECT id FROM runs WHERE id = ANY($1) AND {nothing_left}"),
        &[&candidates, &gone[0], &gone[1]],
    )
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
    execute(
        &tx,
        "DELETE FROM run_commands WHERE run_id = ANY($1)",
        &[&doomed],
    )
    .await?;
    execute(
        &tx,
        "DELETE FROM run_containers WHERE run_id = ANY($1)",
        &[&doomed],
    )
    .await?;
    let n = execute(&tx, "DELETE FROM runs WHERE id = ANY($1)", &[&doomed]).await?;
    tx.commit().await?;
    Ok(n)
}
