//! The PostgreSQL schema of [`PostgresStore`](super::PostgresStore) and
//! its migrations, run at start.
//!
//! The version a database has is the one row of `schema_version`
//! (version 0: an empty database). Several backends may start at once
//! against one database: each takes the session advisory lock
//! [`MIGRATION_LOCK`] before it reads the version, so one migrates while
//! the others wait, then find the work done. A database whose version is
//! newer than this build's is refused, never misread.
//!
//! Nothing in the schema belongs to one backend process: numbering
//! (`agents.next_seq`), dedup cursors and run state are rows that any
//! replica changes under row locks. Presence is shared the same way:
//! `presence` says which replica holds each agent's connection, and
//! `replicas` when each replica last said it is alive.

use std::time::Duration;

use tokio_postgres::NoTls;

use super::{CONNECT_TIMEOUT, STORE, describe};
use crate::backend::store::StoreError;

/// The key of the advisory lock held while migrating ("uplink" in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x75_70_6c_69_6e_6b;

/// The longest wait for another backend's migration (the lock), or for a
/// migration of our own, before the start fails.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The steps from each version to the next: `MIGRATIONS[i]` turns version
/// `i` into `i + 1`. Append new steps; never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store holds at its version 3.
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE providers (
        name TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        created_ms BIGINT NOT NULL,
        max_agents BIGINT NOT NULL DEFAULT 0,
        expires_ms BIGINT NOT NULL DEFAULT 0,
        token_enrolled BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        provider TEXT NOT NULL REFERENCES providers(name),
        credential_hash TEXT NOT NULL UNIQUE,
        pending_credential_hash TEXT UNIQUE,
        enroll_key_hash TEXT,
        hostname TEXT NOT NULL DEFAULT '',
        version TEXT NOT NULL DEFAULT '',
        enrolled_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL DEFAULT 0,
        acked_seq BIGINT NOT NULL DEFAULT 0,
        next_seq BIGINT NOT NULL DEFAULT 1,
        transport INTEGER NOT NULL DEFAULT 0,
        transport_reason TEXT NOT NULL DEFAULT '',
        revoked_ms BIGINT NOT NULL DEFAULT 0,
        UNIQUE (provider, enroll_key_hash)
    );
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL REFERENCES agents(id),
        seq BIGINT NOT NULL,
        spec BYTEA NOT NULL,
        created_ms BIGINT NOT NULL,
        accepted_ms BIGINT NOT NULL DEFAULT 0,
        done_ms BIGINT NOT NULL DEFAULT 0,
        result BYTEA,
        UNIQUE (agent_id, seq)
    );
    CREATE TABLE container_events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        agent_id TEXT NOT NULL,
        container_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        time_ms BIGINT NOT NULL,
        event BYTEA NOT NULL,
        UNIQUE (agent_id, container_id, kind)
    );
    CREATE INDEX container_events_agent ON container_events (agent_id, time_ms);
    CREATE TABLE capacities (
        agent_id TEXT PRIMARY KEY REFERENCES agents(id),
        capacity BYTEA NOT NULL,
        time_ms BIGINT NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        ord BIGINT GENERATED ALWAYS AS IDENTITY,
        name TEXT NOT NULL,
        provider TEXT NOT NULL,
        image TEXT NOT NULL,
        count BIGINT NOT NULL,
        cpus DOUBLE PRECISION NOT NULL,
        memory BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        stop_ms BIGINT NOT NULL DEFAULT 0,
        stop_timeout_s BIGINT NOT NULL DEFAULT 10
    );
    CREATE INDEX runs_name ON runs (name);
    CREATE INDEX runs_created ON runs (created_ms, ord);
    CREATE TABLE run_containers (
        run_id TEXT NOT NULL REFERENCES runs(id),
        idx BIGINT NOT NULL,
        agent_id TEXT NOT NULL REFERENCES agents(id),
        name TEXT NOT NULL,
        command_id TEXT NOT NULL,
        container_id TEXT NOT NULL DEFAULT '',
        state INTEGER NOT NULL,
        exit_code BIGINT NOT NULL DEFAULT 0,
        oom BOOLEAN NOT NULL DEFAULT FALSE,
        message TEXT NOT NULL DEFAULT '',
        started_ms BIGINT NOT NULL DEFAULT 0,
        pending_command TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (run_id, idx)
    );
    CREATE INDEX run_containers_state ON run_containers (state);
    CREATE TABLE run_commands (
        command_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        role BIGINT NOT NULL
    );
    CREATE INDEX run_commands_run ON run_commands (run_id);
    CREATE TABLE cursors (
        id BIGINT GENERATED ALWAYS AS IDENTITY,
        agent_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (agent_id, stream, epoch)
    );
    CREATE TABLE metric_batches_above (
        agent_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (agent_id, epoch, seq)
    );",
    // 2: presence across backends: which backend holds each agent's
    // connection, and when each backend last said it is alive.
    "CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        beat_ms BIGINT NOT NULL
    );
    CREATE TABLE presence (
        agent_id TEXT PRIMARY KEY,
        replica TEXT NOT NULL,
        connected BOOLEAN NOT NULL,
        transport INTEGER NOT NULL,
        reason TEXT NOT NULL,
        seen_ms BIGINT NOT NULL
    );",
    // 3: which backend's JSON lines a metric batch sent again was written
    // to, for the backend that wrote it before and was killed.
    "CREATE TABLE metric_batch_writers (
        agent_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        writer TEXT NOT NULL,
        recorded_ms BIGINT NOT NULL,
        PRIMARY KEY (agent_id, epoch, seq)
    );
    CREATE INDEX metric_batch_writers_recorded ON metric_batch_writers (recorded_ms);",
];

/// The schema version this build writes.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`VERSION`] on a connection of its own
/// (closed at the end, which also releases the lock whatever happens),
/// under [`MIGRATION_LOCK`]; each step in a transaction with the version
/// it reaches.
pub(super) async fn migrate(
    config: &tokio_postgres::Config,
    password: Option<&str>,
    shown: &str,
) -> Result<(), StoreError> {
    // The client's connect timeout bounds reaching the server; this one
    // bounds the login too (a port that accepts and never answers).
    let login = CONNECT_TIMEOUT * 2;
    let (mut client, connection) = tokio::time::timeout(login, config.connect(NoTls))
        .await
        .map_err(|_| StoreError::Backend {
            store: STORE,
            source: format!(
                "cannot connect to {shown}: no answer to the login within {}s",
                login.as_secs()
            )
            .into(),
        })?
        .map_err(|e| connect_error(shown, &e, password))?;
    let connection = tokio::spawn(connection);
    let outcome = tokio::time::timeout(MIGRATION_TIMEOUT, async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .await?;
        let found: Option<i64> = client
            .query_one("SELECT MAX(version) FROM schema_version", &[])
            .await?
            .try_get(0)?;
        let found = found.unwrap_or(0);
        if found > VERSION {
            return Err(StoreError::Version {
                found,
                known: VERSION,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let reached = i as i64 + 1;
            let tx = client.transaction().await?;
            tx.batch_execute(step).await?;
            tx.execute("DELETE FROM schema_version", &[]).await?;
            tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&reached])
                .await?;
            tx.commit().await?;
            tracing::info!(version = reached, "PostgreSQL store schema migrated");
        }
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await?;
        Ok(())
    })
    .await
    .unwrap_or_else(|_| {
        Err(StoreError::Backend {
            store: STORE,
            source: format!(
                "the schema migration at {shown} did not finish within {}s (another backend holding its lock?)",
                MIGRATION_TIMEOUT.as_secs()
            )
            .into(),
        })
    });
    drop(client);
    // Closing politely takes a round trip; a database that stopped
    // answering does not hold the start for longer than a moment.
    let mut connection = connection;
    if tokio::time::timeout(Duration::from_secs(2), &mut connection)
        .await
        .is_err()
    {
        connection.abort();
    }
    outcome
}

/// The error of a first connection that failed: where, and why, on one
/// line without the password.
fn connect_error(shown: &str, e: &tokio_postgres::Error, password: Option<&str>) -> StoreError {
    StoreError::Backend {
        store: STORE,
        source: format!(
            "cannot connect to {shown}: {}",
            super::url::scrub(&describe(e), password)
        )
        .into(),
    }
}
