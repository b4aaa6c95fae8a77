//! Runs and capacities in SQLite: the bodies of the run operations of
//! [`Store`](crate::backend::store::Store) for [`SqliteStore`](super::SqliteStore),
//! each on the connection it holds locked. Every change of a container,
//! with the command it leads to, is one transaction.

use std::collections::HashMap;

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use super::enqueue_in;
use crate::backend::store::{
    FollowUp, LiveContainer, NewContainer, Role, RunContainerRecord, RunRecord, StoreError,
};
use crate::proto::{self, RunContainerState};

const RUN_COLUMNS: &str =
    "id, name, provider, image, count, cpus, memory, created_ms, stop_ms, stop_timeout_s";
const CONTAINER_COLUMNS: &str = "run_id, idx, agent_id, name, command_id, container_id, state, exit_code, oom, message, started_ms, pending_command";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        provider: r.get(2)?,
        image: r.get(3)?,
        count: r.get::<_, i64>(4)? as u32,
        cpus: r.get(5)?,
        memory: r.get::<_, i64>(6)? as u64,
        created_ms: r.get(7)?,
        stop_ms: r.get(8)?,
        stop_timeout_s: r.get::<_, i64>(9)? as u32,
    })
}

fn container_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunContainerRecord> {
    Ok(RunContainerRecord {
        run_id: r.get(0)?,
        index: r.get::<_, i64>(1)? as u32,
        agent_id: r.get(2)?,
        name: r.get(3)?,
        command_id: r.get(4)?,
        container_id: r.get(5)?,
        state: RunContainerState::try_from(r.get::<_, i32>(6)?)
            .unwrap_or(RunContainerState::Unspecified),
        exit_code: r.get(7)?,
        oom_killed: r.get::<_, i64>(8)? != 0,
        message: r.get(9)?,
        started_ms: r.get(10)?,
        pending_command: r.get(11)?,
    })
}

fn containers_of(
    c: &rusqlite::Connection,
    run_id: &str,
) -> Result<Vec<RunContainerRecord>, StoreError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {CONTAINER_COLUMNS} FROM run_containers WHERE run_id = ?1 ORDER BY idx"
    ))?;
    let rows = st.query_map([run_id], container_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn create_run(
    c: &mut Connection,
    run: &RunRecord,
    containers: &[NewContainer],
) -> Result<Option<Vec<(String, proto::Command)>>, StoreError> {
    let tx = c.transaction()?;
    tx.execute(
        &format!(
            "INSERT INTO runs ({RUN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ),
        params![
            run.id,
            run.name,
            run.provider,
            run.image,
            run.count,
            run.cpus,
            run.memory as i64,
            run.created_ms,
            run.stop_ms,
            run.stop_timeout_s
        ],
    )?;
    let mut queued = Vec::with_capacity(containers.len());
    for n in containers {
        let Some(cmd) = enqueue_in(&tx, &n.agent_id, &n.command_id, &n.spec, run.created_ms)?
        else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO run_containers (run_id, idx, agent_id, name, command_id, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                run.id,
                n.index,
                n.agent_id,
                n.name,
                n.command_id,
                RunContainerState::Pending as i32
            ],
        )?;
        tx.execute(
            "INSERT INTO run_commands (command_id, run_id, idx, role) VALUES (?1, ?2, ?3, ?4)",
            params![n.command_id, run.id, n.index, Role::Start as i64],
        )?;
        queued.push((n.agent_id.clone(), cmd));
    }
    tx.commit()?;
    Ok(Some(queued))
}

pub(super) fn run(
    c: &mut Connection,
    id_or_name: &str,
) -> Result<Option<(RunRecord, Vec<RunContainerRecord>)>, StoreError> {
    let run = c
        .query_row(
            &format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1 OR name = ?1
                     ORDER BY id = ?1 DESC, created_ms DESC, rowid DESC LIMIT 1"
            ),
            [id_or_name],
            run_from_row,
        )
        .optional()?;
    match run {
        Some(run) => {
            let containers = containers_of(c, &run.id)?;
            Ok(Some((run, containers)))
        }
        None => Ok(None),
    }
}

pub(super) fn runs(
    c: &mut Connection,
    provider: &str,
    limit: usize,
) -> Result<Vec<(RunRecord, Vec<RunContainerRecord>)>, StoreError> {
    let runs: Vec<RunRecord> = {
        let mut st = c.prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ?1 = '' OR provider = ?1
                 ORDER BY created_ms DESC, rowid DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![provider, limit as i64], run_from_row)?;
        rows.collect::<Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let containers = containers_of(c, &run.id)?;
        out.push((run, containers));
    }
    Ok(out)
}

pub(super) fn run_name_in_use(c: &mut Connection, name: &str) -> Result<bool, StoreError> {
    Ok(c.query_row(
        "SELECT EXISTS (SELECT 1 FROM runs r JOIN run_containers c ON c.run_id = r.id
             WHERE r.name = ?1 AND c.state NOT IN (?2, ?3))",
        params![
            name,
            RunContainerState::Removed as i32,
            RunContainerState::Failed as i32
        ],
        |r| r.get(0),
    )?)
}

pub(super) fn run_command(
    c: &mut Connection,
    command_id: &str,
) -> Result<Option<(String, u32, Role)>, StoreError> {
    let row: Option<(String, i64, i64)> = c
        .query_row(
            "SELECT run_id, idx, role FROM run_commands WHERE command_id = ?1",
            [command_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(row.and_then(|(run, idx, role)| Some((run, idx as u32, Role::from_i64(role)?))))
}

pub(super) fn change_container(
    c: &mut Connection,
    run_id: &str,
    index: u32,
    now: i64,
    change: &mut dyn FnMut(&RunRecord, &mut RunContainerRecord) -> Option<FollowUp>,
) -> Result<Option<(RunContainerRecord, Option<proto::Command>)>, StoreError> {
    let tx = c.transaction()?;
    let run = tx
        .query_row(
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
            [run_id],
            run_from_row,
        )
        .optional()?;
    let container = tx
        .query_row(
            &format!(
                "SELECT {CONTAINER_COLUMNS} FROM run_containers WHERE run_id = ?1 AND idx = ?2"
            ),
            params![run_id, index],
            container_from_row,
        )
        .optional()?;
    let (Some(run), Some(mut container)) = (run, container) else {
        return Ok(None);
    };
    let follow = change(&run, &mut container);
    let mut queued = None;
    if let Some(f) = follow {
        queued = enqueue_in(&tx, &container.agent_id, &f.command_id, &f.spec, now)?;
        if queued.is_some() {
            tx.execute(
                "INSERT INTO run_commands (command_id, run_id, idx, role) VALUES (?1, ?2, ?3, ?4)",
                params![f.command_id, run_id, index, f.role as i64],
            )?;
            container.pending_command = f.command_id;
        }
    }
    tx.execute(
        "UPDATE run_containers SET container_id = ?3, state = ?4, exit_code = ?5, oom = ?6,
             message = ?7, started_ms = ?8, pending_command = ?9 WHERE run_id = ?1 AND idx = ?2",
        params![
            run_id,
            index,
            container.container_id,
            container.state as i32,
            container.exit_code,
            container.oom_killed as i64,
            container.message,
            container.started_ms,
            container.pending_command
        ],
    )?;
    tx.commit()?;
    Ok(Some((container, queued)))
}

pub(super) fn stop_run(
    c: &mut Connection,
    run_id: &str,
    now: i64,
    timeout_s: u32,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE runs SET stop_ms = CASE WHEN stop_ms = 0 THEN ?2 ELSE stop_ms END,
             stop_timeout_s = ?3 WHERE id = ?1",
        params![run_id, now, timeout_s],
    )?;
    Ok(())
}

pub(super) fn live_run_containers(c: &mut Connection) -> Result<Vec<LiveContainer>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT c.agent_id, c.state, c.started_ms, r.cpus, r.memory
             FROM run_containers c JOIN runs r ON r.id = c.run_id WHERE c.state IN (?1, ?2)",
    )?;
    let rows = st.query_map(
        params![
            RunContainerState::Pending as i32,
            RunContainerState::Running as i32
        ],
        |r| {
            Ok(LiveContainer {
                agent_id: r.get(0)?,
                state: RunContainerState::try_from(r.get::<_, i32>(1)?)
                    .unwrap_or(RunContainerState::Unspecified),
                started_ms: r.get(2)?,
                cpus: r.get(3)?,
                memory: r.get::<_, i64>(4)? as u64,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn set_capacity(
    c: &mut Connection,
    agent_id: &str,
    capacity: &proto::Capacity,
    now: i64,
) -> Result<(), StoreError> {
    c.execute(
            "INSERT INTO capacities (agent_id, capacity, time_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET capacity = excluded.capacity, time_ms = excluded.time_ms",
            params![agent_id, capacity.encode_to_vec(), now],
        )?;
    Ok(())
}

pub(super) fn capacities(
    c: &mut Connection,
) -> Result<HashMap<String, (proto::Capacity, i64)>, StoreError> {
    let mut st = c.prepare_cached("SELECT agent_id, capacity, time_ms FROM capacities")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (agent, bytes, time) = row?;
        let cap =
            proto::Capacity::decode(bytes.as_slice()).map_err(|source| StoreError::Corrupt {
                what: format!("capacity of {agent}"),
                source,
            })?;
        out.insert(agent, (cap, time));
    }
    Ok(out)
}
