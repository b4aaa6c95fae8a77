//! Retention in SQLite: the body of [`Store::prune`](crate::backend::store::Store::prune)
//! for [`SqliteStore`](super::SqliteStore), one transaction per table so a
//! long prune never holds the lock for all of them at once.

use rusqlite::{Connection, params};

use crate::backend::store::{Pruned, Retention, StoreError};
use crate::proto::RunContainerState;

pub(super) fn prune(c: &mut Connection, r: &Retention) -> Result<Pruned, StoreError> {
    // Finished commands the agent acknowledged: nothing will redeliver them
    // or wait for their result. Numbering lives in `agents.next_seq`, so
    // deleting them never reuses a seq.
    let commands = c.execute(
        "DELETE FROM commands WHERE done_ms > 0 AND done_ms < ?1
         AND seq <= (SELECT acked_seq FROM agents WHERE agents.id = commands.agent_id)",
        [r.commands_before_ms],
    )? as u64;
    let mut out = Pruned {
        commands,
        ..Pruned::default()
    };
    // Runs with nothing left on any host: every container failed to start
    // or was removed, and no stop or remove is in flight.
    let tx = c.transaction()?;
    tx.execute(
        "CREATE TEMP TABLE IF NOT EXISTS prune_runs (id TEXT PRIMARY KEY)",
        [],
    )?;
    tx.execute("DELETE FROM prune_runs", [])?;
    tx.execute(
        "INSERT INTO prune_runs SELECT id FROM runs WHERE created_ms < ?1 AND NOT EXISTS (
            SELECT 1 FROM run_containers c WHERE c.run_id = runs.id
            AND (c.state NOT IN (?2, ?3) OR c.pending_command != ''))",
        params![
            r.runs_before_ms,
            RunContainerState::Failed as i32,
            RunContainerState::Removed as i32
        ],
    )?;
    tx.execute(
        "DELETE FROM run_commands WHERE run_id IN (SELECT id FROM prune_runs)",
        [],
    )?;
    tx.execute(
        "DELETE FROM run_containers WHERE run_id IN (SELECT id FROM prune_runs)",
        [],
    )?;
    out.runs = tx.execute(
        "DELETE FROM runs WHERE id IN (SELECT id FROM prune_runs)",
        [],
    )? as u64;
    tx.execute("DELETE FROM prune_runs", [])?;
    tx.commit()?;
    // Container events: older than the retention, and beyond the newest
    // `container_events_per_agent` of each agent.
    out.container_events = c.execute(
        "DELETE FROM container_events WHERE time_ms < ?1",
        [r.container_events_before_ms],
    )? as u64;
    out.container_events += c.execute(
        "DELETE FROM container_events WHERE rowid IN (
            SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER (
                PARTITION BY agent_id ORDER BY time_ms DESC, rowid DESC) AS n
                FROM container_events) WHERE n > ?1)",
        [r.container_events_per_agent as i64],
    )? as u64;
    // Cursors of superseded epochs: each `(agent, stream)` keeps the
    // `epochs_kept` newest epochs (by when their cursor was made), and
    // the seqs stored above a forgotten metric epoch's watermark go with it.
    let tx = c.transaction()?;
    tx.execute(
        "CREATE TEMP TABLE IF NOT EXISTS prune_cursors (id INTEGER PRIMARY KEY)",
        [],
    )?;
    tx.execute("DELETE FROM prune_cursors", [])?;
    tx.execute(
        "INSERT INTO prune_cursors SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER (
            PARTITION BY agent_id, stream ORDER BY rowid DESC) AS n FROM cursors) WHERE n > ?1",
        [r.epochs_kept as i64],
    )?;
    out.cursors = tx.execute(
        "DELETE FROM metric_batches_above WHERE EXISTS (
            SELECT 1 FROM cursors k JOIN prune_cursors p ON p.id = k.rowid
            WHERE k.stream = ?1 AND k.agent_id = metric_batches_above.agent_id
            AND k.epoch = metric_batches_above.epoch)",
        [super::METRIC_BATCHES],
    )? as u64;
    out.cursors += tx.execute(
        "DELETE FROM cursors WHERE rowid IN (SELECT id FROM prune_cursors)",
        [],
    )? as u64;
    tx.execute("DELETE FROM prune_cursors", [])?;
    tx.commit()?;
    Ok(out)
}
