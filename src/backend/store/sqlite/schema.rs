//! The SQLite schema of [`SqliteStore`](super::SqliteStore): the first
//! version's tables, created when missing at open, and the [`MIGRATIONS`]
//! that bring any database up to the current version, counted in
//! `PRAGMA user_version` (0 is a database of the first version, made before
//! the count existed).

use rusqlite::Connection;

use crate::backend::store::StoreError;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS providers (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL REFERENCES providers(name),
    credential_hash TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 1,
    transport INTEGER NOT NULL DEFAULT 0,
    transport_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    seq INTEGER NOT NULL,
    spec BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    accepted_ms INTEGER NOT NULL DEFAULT 0,
    done_ms INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    UNIQUE (agent_id, seq)
);
CREATE TABLE IF NOT EXISTS container_events (
    agent_id TEXT NOT NULL,
    container_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    event BLOB NOT NULL,
    UNIQUE (agent_id, container_id, kind)
);
CREATE INDEX IF NOT EXISTS container_events_agent ON container_events (agent_id, time_ms);
CREATE TABLE IF NOT EXISTS capacities (
    agent_id TEXT PRIMARY KEY REFERENCES agents(id),
    capacity BLOB NOT NULL,
    time_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    image TEXT NOT NULL,
    count INTEGER NOT NULL,
    cpus REAL NOT NULL,
    memory INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    stop_ms INTEGER NOT NULL DEFAULT 0,
    stop_timeout_s INTEGER NOT NULL DEFAULT 10
);
CREATE INDEX IF NOT EXISTS runs_name ON runs (name);
CREATE TABLE IF NOT EXISTS run_containers (
    run_id TEXT NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    command_id TEXT NOT NULL,
    container_id TEXT NOT NULL DEFAULT '',
    state INTEGER NOT NULL,
    exit_code INTEGER NOT NULL DEFAULT 0,
    oom INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    started_ms INTEGER NOT NULL DEFAULT 0,
    pending_command TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS run_commands (
    command_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    role INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    agent_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (agent_id, stream, epoch)
);
CREATE TABLE IF NOT EXISTS metric_batches_above (
    agent_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
) WITHOUT ROWID;
";

/// The steps from each version to the next: `MIGRATIONS[i]` turns version
/// `i + 1` into `i + 2`. A step only adds (tables, columns with defaults,
/// indexes), so a backend of the previous version's data keeps working.
/// Append new steps; never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    // 2: agent revocation and credential rotation; limits of enrollment
    // tokens.
    "ALTER TABLE agents ADD COLUMN revoked_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE agents ADD COLUMN pending_credential_hash TEXT;
     CREATE UNIQUE INDEX agents_pending_credential ON agents (pending_credential_hash);
     ALTER TABLE providers ADD COLUMN max_agents INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE providers ADD COLUMN expires_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE providers ADD COLUMN token_enrolled INTEGER NOT NULL DEFAULT 0;",
    // 3: idempotent enrollment (`EnrollRequest.idempotency_key`).
    "ALTER TABLE agents ADD COLUMN enroll_key_hash TEXT;
     CREATE UNIQUE INDEX agents_enroll_key ON agents (provider, enroll_key_hash);",
];

/// The schema version this build writes.
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64 + 1;

/// Creates the first version's tables when missing, then applies every
/// migration the database has not had, each in a transaction with the
/// version it reaches. A database newer than this build is refused rather
/// than misread.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = version.max(1);
    if version > VERSION {
        return Err(StoreError::Version {
            found: version,
            known: VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize - 1) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i as i64 + 2)?;
        tx.commit()?;
        tracing::info!(version = i + 2, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::{SCHEMA, VERSION};
    use crate::backend::store::Store;
    use crate::backend::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn a_database_of_the_first_schema_is_migrated_and_keeps_its_agents() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The first version, as backends before migrations left it.
            let c = Connection::open(dir.path().join("uplink.db")).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute_batch(
                "INSERT INTO providers (name, token_hash, created_ms) VALUES ('default', 'th', 1);
                 INSERT INTO agents (id, provider, credential_hash, enrolled_ms, acked_seq, next_seq)
                 VALUES ('a1', 'default', 'ch', 1, 4, 5);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let a = s.agent("a1").await.unwrap().unwrap();
        assert_eq!((a.acked_seq, a.next_seq, a.revoked_ms), (4, 5, 0));
        let owner = s.agent_by_credential("ch").await.unwrap().unwrap();
        assert_eq!(owner.agent_id, "a1");
        assert_eq!(s.providers().await.unwrap()[0].agents, 1);
        assert_eq!(s.revoke_agent("a1", 9).await.unwrap(), Some(9));
        drop(s);
        // Reopened at the current version: nothing is applied twice.
        let s = SqliteStore::open(dir.path()).unwrap();
        let version: i64 = s
            .with(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(version, VERSION);
        assert_eq!(s.agent("a1").await.unwrap().unwrap().revoked_ms, 9);
    }

    #[test]
    fn a_database_newer_than_this_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("uplink.db")).unwrap();
            c.pragma_update(None, "user_version", VERSION + 1).unwrap();
        }
        let e = SqliteStore::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("run a newer uplink"), "{e}");
    }
}
