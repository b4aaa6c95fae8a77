//! Runs and capacities in PostgreSQL: the bodies of the run operations of
//! [`Store`](crate::backend::store::Store) for
//! [`PostgresStore`](super::PostgresStore). A run's creation, and every
//! change of a container with the command it leads to, is one
//! transaction. Locks are taken in one order (run, then container, then
//! agents by id), so backends changing the same runs wait for one another
//! instead of deadlocking.

use std::collections::HashMap;

use deadpool_postgres::{Client, GenericClient};
use prost::Message;

use super::{decode, enqueue_in, execute, query, query_opt};
use crate::backend::store::{
    FollowUp, LiveContainer, NewContainer, Role, RunContainerRecord, RunRecord, StoreError,
};
use crate::proto::{self, RunContainerState};

const RUN_COLUMNS: &str =
    "id, name, provider, image, count, cpus, memory, created_ms, stop_ms, stop_timeout_s";
const CONTAINER_COLUMNS: &str = "run_id, idx, agent_id, name, command_id, container_id, state, exit_code, oom, message, started_ms, pending_command";

fn run_from_row(r: &tokio_postgres::Row) -> Result<RunRecord, StoreError> {
    Ok(RunRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        provider: r.try_get(2)?,
        image: r.try_get(3)?,
        count: r.try_get::<_, i64>(4)? as u32,
        cpus: r.try_get(5)?,
        memory: r.try_get::<_, i64>(6)? as u64,
        created_ms: r.try_get(7)?,
        stop_ms: r.try_get(8)?,
        stop_timeout_s: r.try_get::<_, i64>(9)? as u32,
    })
}

fn state_of(v: i32) -> RunContainerState {
    RunContainerState::try_from(v).unwrap_or(RunContainerState::Unspecified)
}

fn container_from_row(r: &tokio_postgres::Row) -> Result<RunContainerRecord, StoreError> {
    Ok(RunContainerRecord {
        run_id: r.try_get(0)?,
        index: r.try_get::<_, i64>(1)? as u32,
        agent_id: r.try_get(2)?,
        name: r.try_get(3)?,
        command_id: r.try_get(4)?,
        container_id: r.try_get(5)?,
        state: state_of(r.try_get(6)?),
        exit_code: r.try_get(7)?,
        oom_killed: r.try_get(8)?,
        message: r.try_get(9)?,
        started_ms: r.try_get(10)?,
        pending_command: r.try_get(11)?,
    })
}

async fn containers_of<C: GenericClient>(
    c: &C,
    run_id: &str,
) -> Result<Vec<RunContainerRecord>, StoreError> {
    let sql =
        format!("SELECT {CONTAINER_COLUMNS} FROM run_containers WHERE run_id = $1 ORDER BY idx");
    query(c, &sql, &[&run_id])
        .await?
        .iter()
        .map(container_from_row)
        .collect()
}

pub(super) async fn create_run(
    c: &mut Client,
    run: &RunRecord,
    containers: &[NewContainer],
) -> Result<Option<Vec<(String, proto::Command)>>, StoreError> {
    let tx = c.transaction().await?;
    // The agents' rows, locked in id order before any is numbered: two
    // runs placed on the same agents take turns rather than deadlock.
    let mut agents: Vec<&str> = containers.iter().map(|n| n.agent_id.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    let locked = query(
        &tx,
        "SELECT id FROM agents WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&agents],
    )
    .await?;
    if locked.len() != agents.len() {
        return Ok(None);
    }
    execute(
        &tx,
        &format!(
            "INSERT INTO runs ({RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ),
        &[
            &run.id,
            &run.name,
            &run.provider,
            &run.image,
            &i64::from(run.count),
            &run.cpus,
            &(run.memory as i64),
            &run.created_ms,
            &run.stop_ms,
            &i64::from(run.stop_timeout_s),
        ],
    )
    .await?;
    let mut queued = Vec::with_capacity(containers.len());
    for n in containers {
        let Some(cmd) =
            enqueue_in(&tx, &n.agent_id, &n.command_id, &n.spec, run.created_ms).await?
        else {
            return Ok(None);
        };
        execute(
            &tx,
            "INSERT INTO run_containers (run_id, idx, agent_id, name, command_id, state)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &run.id,
                &i64::from(n.index),
                &n.agent_id,
                &n.name,
                &n.command_id,
                &(RunContainerState::Pending as i32),
            ],
        )
        .await?;
        execute(
            &tx,
            "INSERT INTO run_commands (command_id, run_id, idx, role) VALUES ($1, $2, $3, $4)",
            &[
                &n.command_id,
                &run.id,
                &i64::from(n.index),
                &(Role::Start as i64),
            ],
        )
        .await?;
        queued.push((n.agent_id.clone(), cmd));
    }
    tx.commit().await?;
    Ok(Some(queued))
}

pub(super) async fn run<C: GenericClient>(
    c: &C,
    id_or_name: &str,
) -> Result<Option<(RunRecord, Vec<RunContainerRecord>)>, StoreError> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 OR name = $1
         ORDER BY id = $1 DESC, created_ms DESC, ord DESC LIMIT 1"
    );
    let Some(row) = query_opt(c, &sql, &[&id_or_name]).await? else {
        return Ok(None);
    };
    let run = run_from_row(&row)?;
    let containers = containers_of(c, &run.id).await?;
    Ok(Some((run, containers)))
}

pub(super) async fn runs<C: GenericClient>(
    c: &C,
    provider: &str,
    limit: usize,
) -> Result<Vec<(RunRecord, Vec<RunContainerRecord>)>, StoreError> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE $1 = '' OR provider = $1
         ORDER BY created_ms DESC, ord DESC LIMIT $2"
    );
    let rows = query(
        c,
        &sql,
        &[&provider, &i64::try_from(limit).unwrap_or(i64::MAX)],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let run = run_from_row(&row)?;
        let containers = containers_of(c, &run.id).await?;
        out.push((run, containers));
    }
    Ok(out)
}

pub(super) async fn run_name_in_use<C: GenericClient>(
    c: &C,
    name: &str,
) -> Result<bool, StoreError> {
    let row = super::query_one(
        c,
        "SELECT EXISTS (SELECT 1 FROM runs r JOIN run_containers c ON c.run_id = r.id
         WHERE r.name = $1 AND c.state NOT IN ($2, $3))",
        &[
            &name,
            &(RunContainerState::Removed as i32),
            &(RunContainerState::Failed as i32),
        ],
    )
    .await?;
    Ok(row.try_get(0)?)
}

pub(super) async fn run_command<C: GenericClient>(
    c: &C,
    command_id: &str,
) -> Result<Option<(String, u32, Role)>, StoreError> {
    let Some(r) = query_opt(
        c,
        "SELECT run_id, idx, role FROM run_commands WHERE command_id = $1",
        &[&command_id],
    )
    .await?
    else {
        return Ok(None);
    };
    let run: String = r.try_get(0)?;
    let idx: i64 = r.try_get(1)?;
    let role: i64 = r.try_get(2)?;
    Ok(Role::from_i64(role).map(|role| (run, idx as u32, role)))
}

pub(super) async fn change_container(
    c: &mut Client,
    run_id: &str,
    index: u32,
    now: i64,
    change: &mut (dyn FnMut(&RunRecord, &mut RunContainerRecord) -> Option<FollowUp> + Send),
) -> Result<Option<(RunContainerRecord, Option<proto::Command>)>, StoreError> {
    let tx = c.transaction().await?;
    // The run is read under a share lock (retention cannot delete it
    // meanwhile; other containers of it may change at once), the container
    // under an update lock (two changes of it take turns).
    let run = query_opt(
        &tx,
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 FOR SHARE"),
        &[&run_id],
    )
    .await?;
    let container = query_opt(
        &tx,
        &format!(
            "SELECT {CONTAINER_COLUMNS} FROM run_containers WHERE run_id = $1 AND idx = $2 FOR UPDATE"
        ),
        &[&run_id, &i64::from(index)],
    )
    .await?;
    let (Some(run), Some(container)) = (run, container) else {
        return Ok(None);
    };
    let run = run_from_row(&run)?;
    let mut container = container_from_row(&container)?;
    let follow = change(&run, &mut container);
    let mut queued = None;
    if let Some(f) = follow {
        queued = enqueue_in(&tx, &container.agent_id, &f.command_id, &f.spec, now).await?;
        if queued.is_some() {
            execute(
                &tx,
                "INSERT INTO run_commands (command_id, run_id, idx, role) VALUES ($1, $2, $3, $4)",
                &[&f.command_id, &run_id, &i64::from(index), &(f.role as i64)],
            )
            .await?;
            container.pending_command = f.command_id;
        }
    }
    execute(
        &tx,
        "UPDATE run_containers SET container_id = $3, state = $4, exit_code = $5, oom = $6,
         message = $7, started_ms = $8, pending_command = $9 WHERE run_id = $1 AND idx = $2",
        &[
            &run_id,
            &i64::from(index),
            &container.container_id,
            &(container.state as i32),
            &container.exit_code,
            &container.oom_killed,
            &container.message,
            &container.started_ms,
            &container.pending_command,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Some((container, queued)))
}

pub(super) async fn stop_run<C: GenericClient>(
    c: &C,
    run_id: &str,
    now: i64,
    timeout_s: u32,
) -> Result<(), StoreError> {
    execute(
        c,
        "UPDATE runs SET stop_ms = CASE WHEN stop_ms = 0 THEN $2 ELSE stop_ms END,
         stop_timeout_s = $3 WHERE id = $1",
        &[&run_id, &now, &i64::from(timeout_s)],
    )
    .await?;
    Ok(())
}

pub(super) async fn live_run_containers<C: GenericClient>(
    c: &C,
) -> Result<Vec<LiveContainer>, StoreError> {
    let rows = query(
        c,
        "SELECT c.agent_id, c.state, c.started_ms, r.cpus, r.memory
         FROM run_containers c JOIN runs r ON r.id = c.run_id WHERE c.state IN ($1, $2)",
        &[
            &(RunContainerState::Pending as i32),
            &(RunContainerState::Running as i32),
        ],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LiveContainer {
                agent_id: r.try_get(0)?,
                state: state_of(r.try_get(1)?),
                started_ms: r.try_get(2)?,
                cpus: r.try_get(3)?,
                memory: r.try_get::<_, i64>(4)? as u64,
            })
        })
        .collect()
}

pub(super) async fn set_capacity<C: GenericClient>(
    c: &C,
    agent_id: &str,
    capacity: &proto::Capacity,
    now: i64,
) -> Result<(), StoreError> {
    execute(
        c,
        "INSERT INTO capacities (agent_id, capacity, time_ms) VALUES ($1, $2, $3)
         ON CONFLICT (agent_id) DO UPDATE SET capacity = excluded.capacity, time_ms = excluded.time_ms",
        &[&agent_id, &capacity.encode_to_vec(), &now],
    )
    .await?;
    Ok(())
}

pub(super) async fn capacities<C: GenericClient>(
    c: &C,
) -> Result<HashMap<String, (proto::Capacity, i64)>, StoreError> {
    let rows = query(c, "SELECT agent_id, capacity, time_ms FROM capacities", &[]).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let agent: String = r.try_get(0)?;
        let cap: proto::Capacity =
            decode(r.try_get::<_, &[u8]>(1)?, || format!("capacity of {agent}"))?;
        out.insert(agent, (cap, r.try_get(2)?));
    }
    Ok(out)
}
