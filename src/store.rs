//! The backend's durable store: one SQLite file, `DATA_DIR/uplink.db`.
//!
//! It holds what must survive a restart: the admin token's hash, providers
//! and their enrollment tokens' hashes, agents with their credentials'
//! hashes and ack state, per-agent command queues, the cursors that
//! deduplicate agent events, the dedup state of metric batches (per
//! `(agent, epoch)` a contiguous watermark in `cursors` plus the seqs
//! stored above it in `metric_batches_above`, so batches may arrive in any
//! order; see [`Store::metric_batch_state`]), each agent's last reported
//! capacity, and runs with their containers ([`runs`]). Presence (who is
//! connected right now) lives in memory, in the backend's hub.
//!
//! The journal runs in WAL mode with `synchronous=NORMAL`: a committed
//! change survives a crash or `kill -9` of the backend; only a power loss
//! of the host can take the last commits with it.
//!
//! All calls are short and synchronous behind one mutex; no lock is held
//! across an `.await` (callers are async but never await inside).

use std::path::Path;
use std::sync::Mutex;

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use crate::proto;

mod runs;
pub use runs::{FollowUp, LiveContainer, NewContainer, Role, RunContainerRecord, RunRecord};

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored record {what} is corrupt: {source}")]
    Corrupt {
        what: String,
        source: prost::DecodeError,
    },
    #[error("the store's lock was poisoned by a crashed thread")]
    Poisoned,
    #[error("cannot start the checkpoint thread: {0}")]
    Thread(std::io::Error),
}

/// An enrolled agent as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentRecord {
    pub id: String,
    pub provider: String,
    pub hostname: String,
    pub version: String,
    pub enrolled_ms: i64,
    pub last_seen_ms: i64,
    pub acked_seq: u64,
    pub next_seq: u64,
    pub transport: i32,
    pub transport_reason: String,
}

/// A provider as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderRecord {
    pub name: String,
    pub created_ms: i64,
    pub agents: u32,
}

/// A command as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    pub command: proto::Command,
    pub agent_id: String,
    pub accepted_ms: i64,
    pub done_ms: i64,
    pub result: Option<proto::CommandResult>,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
    /// Stops the checkpointer thread when the store is dropped.
    checkpointer: Option<Checkpointer>,
}

/// Moves WAL checkpoints off the request path: SQLite would otherwise run
/// one inside whichever commit crosses the threshold, stalling that request
/// (and every other waiting on the store lock) for milliseconds. A thread
/// with its own connection runs a passive checkpoint every
/// [`CHECKPOINT_EVERY`], which never blocks writers.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Interval of background WAL checkpoints.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Checkpointer {
    fn start(path: std::path::PathBuf) -> Result<Self, StoreError> {
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("uplink-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "background checkpoint failed; retrying later");
                    }
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const SCHEMA: &str = "
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

/// The `cursors` stream that holds each `(agent, epoch)`'s contiguous
/// watermark of stored metric batches. (Not `metrics`: that name held a
/// high-water mark, which is not a contiguous watermark, in older stores.)
const METRIC_BATCHES: &str = "metric_batches";

/// How far above its `(agent, epoch)`'s watermark a metric batch's seq may
/// be. Seqs stored above the watermark are kept one row each until the
/// gap below them fills, so this bounds those rows per `(agent, epoch)`.
pub const METRIC_SEQ_WINDOW: u64 = 100_000;

/// Where a metric batch's `(epoch, seq)` stands, see
/// [`Store::metric_batch_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSeq {
    /// Not stored yet: store it, then [`Store::record_metric_batch`].
    New,
    /// Stored before: a duplicate.
    Seen,
    /// More than [`METRIC_SEQ_WINDOW`] above the contiguous watermark (the
    /// highest seq up to which every batch was stored): refused until the
    /// missing batches above the watermark arrive.
    TooFarAhead {
        /// The epoch's contiguous watermark.
        watermark: u64,
    },
}

/// Queues a command inside a transaction; None when the agent does not
/// exist.
fn enqueue_in(
    tx: &rusqlite::Transaction<'_>,
    agent_id: &str,
    id: &str,
    spec: &proto::CommandSpec,
    now: i64,
) -> Result<Option<proto::Command>, StoreError> {
    let seq: Option<i64> = tx
        .query_row(
            "SELECT next_seq FROM agents WHERE id = ?1",
            [agent_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = seq else { return Ok(None) };
    tx.execute(
        "INSERT INTO commands (id, agent_id, seq, spec, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, agent_id, seq, spec.encode_to_vec(), now],
    )?;
    tx.execute(
        "UPDATE agents SET next_seq = ?2 WHERE id = ?1",
        params![agent_id, seq + 1],
    )?;
    Ok(Some(proto::Command {
        id: id.to_string(),
        seq: seq as u64,
        created_unix_ms: now,
        spec: Some(spec.clone()),
    }))
}

/// The cursor of `(agent, stream, epoch)` (0 when none), on a connection
/// or inside a transaction.
fn cursor_in(c: &Connection, agent_id: &str, stream: &str, epoch: u64) -> Result<u64, StoreError> {
    let v: Option<i64> = c
        .prepare_cached(
            "SELECT seq FROM cursors WHERE agent_id = ?1 AND stream = ?2 AND epoch = ?3",
        )?
        .query_row(params![agent_id, stream, epoch as i64], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

fn metric_batch_state_in(
    c: &Connection,
    agent_id: &str,
    epoch: u64,
    seq: u64,
) -> Result<BatchSeq, StoreError> {
    let watermark = cursor_in(c, agent_id, METRIC_BATCHES, epoch)?;
    if seq <= watermark {
        return Ok(BatchSeq::Seen);
    }
    if seq - watermark > METRIC_SEQ_WINDOW {
        return Ok(BatchSeq::TooFarAhead { watermark });
    }
    let above: Option<i64> = c
        .prepare_cached(
            "SELECT 1 FROM metric_batches_above WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
        )?
        .query_row(params![agent_id, epoch as i64, seq as i64], |r| r.get(0))
        .optional()?;
    Ok(if above.is_some() {
        BatchSeq::Seen
    } else {
        BatchSeq::New
    })
}

impl Store {
    /// Opens (creating if needed) `dir/uplink.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("uplink.db");
        let mut store = Self::from_connection(Connection::open(&path)?)?;
        store.with(|c| {
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
            Ok(())
        })?;
        store.checkpointer = Some(Checkpointer::start(path)?);
        Ok(store)
    }

    /// An in-memory store, for unit tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
            checkpointer: None,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut conn)
    }

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    /// Sets a value of the `meta` table.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }

    /// Creates a provider; false when the name is taken.
    pub fn create_provider(
        &self,
        name: &str,
        token_hash: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO providers (name, token_hash, created_ms) VALUES (?1, ?2, ?3)",
                params![name, token_hash, now],
            )?;
            Ok(n == 1)
        })
    }

    /// Replaces a provider's token hash; false when there is no such provider.
    pub fn set_provider_token(&self, name: &str, token_hash: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE providers SET token_hash = ?2 WHERE name = ?1",
                params![name, token_hash],
            )?;
            Ok(n == 1)
        })
    }

    /// The provider whose enrollment token hashes to `token_hash`.
    pub fn provider_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT name FROM providers WHERE token_hash = ?1",
                [token_hash],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    /// Every provider with its agent count, by name.
    pub fn providers(&self) -> Result<Vec<ProviderRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT p.name, p.created_ms, (SELECT COUNT(*) FROM agents a WHERE a.provider = p.name)
                 FROM providers p ORDER BY p.name",
            )?;
            let rows = st.query_map([], |r| {
                Ok(ProviderRecord {
                    name: r.get(0)?,
                    created_ms: r.get(1)?,
                    agents: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Stores a newly enrolled agent.
    pub fn insert_agent(&self, a: &AgentRecord, credential_hash: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO agents (id, provider, credential_hash, hostname, version, enrolled_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![a.id, a.provider, credential_hash, a.hostname, a.version, a.enrolled_ms],
            )?;
            Ok(())
        })
    }

    /// The agent whose credential hashes to `credential_hash`.
    pub fn agent_by_credential(&self, credential_hash: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id FROM agents WHERE credential_hash = ?1",
                [credential_hash],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    fn agent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRecord> {
        Ok(AgentRecord {
            id: r.get(0)?,
            provider: r.get(1)?,
            hostname: r.get(2)?,
            version: r.get(3)?,
            enrolled_ms: r.get(4)?,
            last_seen_ms: r.get(5)?,
            acked_seq: r.get::<_, i64>(6)? as u64,
            next_seq: r.get::<_, i64>(7)? as u64,
            transport: r.get(8)?,
            transport_reason: r.get(9)?,
        })
    }

    const AGENT_COLUMNS: &str = "id, provider, hostname, version, enrolled_ms, last_seen_ms, acked_seq, next_seq, transport, transport_reason";

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {} FROM agents WHERE id = ?1", Self::AGENT_COLUMNS),
                [id],
                Self::agent_from_row,
            )
            .optional()?)
        })
    }

    /// Every agent (of `provider`, when not empty), by id.
    pub fn agents(&self, provider: &str) -> Result<Vec<AgentRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM agents WHERE ?1 = '' OR provider = ?1 ORDER BY id",
                Self::AGENT_COLUMNS
            ))?;
            let rows = st.query_map([provider], Self::agent_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Records what an agent said about itself and how it connects.
    pub fn update_agent_info(
        &self,
        id: &str,
        hostname: &str,
        version: &str,
        transport: i32,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET hostname = ?2, version = ?3, transport = ?4, transport_reason = ?5,
                 last_seen_ms = ?6 WHERE id = ?1",
                params![id, hostname, version, transport, reason, now],
            )?;
            Ok(())
        })
    }

    /// Records when the backend last heard from an agent.
    pub fn touch_agent(&self, id: &str, now: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            Ok(())
        })
    }

    /// Queues a command for `agent_id`; assigns the next seq. None when the
    /// agent does not exist.
    pub fn enqueue(
        &self,
        agent_id: &str,
        id: &str,
        spec: &proto::CommandSpec,
        now: i64,
    ) -> Result<Option<proto::Command>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let command = enqueue_in(&tx, agent_id, id, spec, now)?;
            tx.commit()?;
            Ok(command)
        })
    }

    /// Commands of `agent_id` with seq above `after`, in seq order, at most
    /// `limit`.
    pub fn pending(
        &self,
        agent_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<proto::Command>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, seq, spec, created_ms FROM commands
                 WHERE agent_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![agent_id, after as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, seq, spec, created) = row?;
                let spec = proto::CommandSpec::decode(spec.as_slice()).map_err(|source| {
                    StoreError::Corrupt {
                        what: format!("command {id}"),
                        source,
                    }
                })?;
                out.push(proto::Command {
                    id,
                    seq: seq as u64,
                    created_unix_ms: created,
                    spec: Some(spec),
                });
            }
            Ok(out)
        })
    }

    /// Applies an agent's ack: the highest contiguous seq it durably
    /// accepted. Returns the agent's ack after the update.
    ///
    /// An ack above the last issued seq means this store lost commits (a
    /// power loss, or a data dir restored from an older copy): numbering
    /// continues above the agent's ack. (Commands queued after the loss and
    /// before the agent reconnected may reuse seqs the agent saw; the agent
    /// answers those with a failure that says so.)
    pub fn ack(&self, agent_id: &str, ack: u64, now: i64) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT acked_seq, next_seq FROM agents WHERE id = ?1",
                    [agent_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((acked, next)) = row else { return Ok(0) };
            if ack as i64 > next - 1 {
                // The agent saw seqs this store no longer knows: commits
                // were lost. Take the agent's word for what it accepted and
                // number new commands above it, so none is mistaken for a
                // duplicate.
                tx.execute(
                    "UPDATE agents SET acked_seq = ?2, next_seq = ?2 + 1 WHERE id = ?1",
                    params![agent_id, ack as i64],
                )?;
                tx.execute(
                    "UPDATE commands SET accepted_ms = ?3 WHERE agent_id = ?1 AND seq > ?4 AND seq <= ?2 AND accepted_ms = 0",
                    params![agent_id, ack as i64, now, acked],
                )?;
                tx.commit()?;
                tracing::warn!(agent = agent_id, ack, issued = next - 1,
                    "agent acknowledges seqs this store never issued (lost commits or an older data dir); numbering moves on above its ack");
                return Ok(ack);
            }
            let new = ack as i64;
            if new <= acked {
                return Ok(acked as u64);
            }
            tx.execute("UPDATE agents SET acked_seq = ?2 WHERE id = ?1", params![agent_id, new])?;
            tx.execute(
                "UPDATE commands SET accepted_ms = ?3 WHERE agent_id = ?1 AND seq > ?4 AND seq <= ?2",
                params![agent_id, new, now, acked],
            )?;
            tx.commit()?;
            Ok(new as u64)
        })
    }

    /// Stores a command's result; false when the command is unknown, not
    /// the agent's, or already done.
    pub fn complete(
        &self,
        agent_id: &str,
        result: &proto::CommandResult,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE commands SET done_ms = ?3, result = ?4,
                 accepted_ms = CASE WHEN accepted_ms = 0 THEN ?3 ELSE accepted_ms END
                 WHERE id = ?1 AND agent_id = ?2 AND done_ms = 0",
                params![result.command_id, agent_id, now, result.encode_to_vec()],
            )?;
            Ok(n == 1)
        })
    }

    /// One command.
    pub fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT id, agent_id, seq, spec, created_ms, accepted_ms, done_ms, result
                     FROM commands WHERE id = ?1",
                    [id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, Option<Vec<u8>>>(7)?,
                        ))
                    },
                )
                .optional()?;
            let Some((id, agent_id, seq, spec, created, accepted, done, result)) = row else {
                return Ok(None);
            };
            let corrupt = |source| StoreError::Corrupt {
                what: format!("command {id}"),
                source,
            };
            let spec = proto::CommandSpec::decode(spec.as_slice()).map_err(corrupt)?;
            let result = match result {
                Some(bytes) => {
                    Some(proto::CommandResult::decode(bytes.as_slice()).map_err(corrupt)?)
                }
                None => None,
            };
            Ok(Some(CommandRecord {
                command: proto::Command {
                    id: id.clone(),
                    seq: seq as u64,
                    created_unix_ms: created,
                    spec: Some(spec),
                },
                agent_id,
                accepted_ms: accepted,
                done_ms: done,
                result,
            }))
        })
    }

    /// Advances the dedup cursor of `(agent, stream, epoch)` to `seq` when
    /// `seq` is above it. Returns true when `seq` was new.
    pub fn advance_cursor(
        &self,
        agent_id: &str,
        stream: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent_id, stream, epoch) DO UPDATE SET seq = excluded.seq
                 WHERE excluded.seq > cursors.seq",
                params![agent_id, stream, epoch as i64, seq as i64],
            )?;
            Ok(n == 1)
        })
    }

    /// The dedup cursor of `(agent, stream, epoch)` (0 when none).
    pub fn cursor(&self, agent_id: &str, stream: &str, epoch: u64) -> Result<u64, StoreError> {
        self.with(|c| {
            let v: Option<i64> = c
                .query_row(
                    "SELECT seq FROM cursors WHERE agent_id = ?1 AND stream = ?2 AND epoch = ?3",
                    params![agent_id, stream, epoch as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
    }

    /// Where metric batch `seq` of `(agent_id, epoch)` stands: new, a
    /// duplicate of a stored one, or too far ahead of the watermark.
    ///
    /// The dedup state of an `(agent, epoch)` is a contiguous watermark `W`
    /// (every seq in `1..=W` was stored; the `cursors` row of stream
    /// `metric_batches`) and the set of seqs above `W` that were stored
    /// (rows of `metric_batches_above`). So batches may arrive in any order
    /// and each is stored once.
    pub fn metric_batch_state(
        &self,
        agent_id: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<BatchSeq, StoreError> {
        self.with(|c| metric_batch_state_in(c, agent_id, epoch, seq))
    }

    /// Records metric batch `seq` of `(agent_id, epoch)` as stored, and
    /// moves the watermark over every contiguous seq above it (deleting
    /// their rows). Returns false, and changes nothing, when the seq was
    /// recorded before or is too far ahead (see [`BatchSeq`]).
    pub fn record_metric_batch(
        &self,
        agent_id: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if metric_batch_state_in(&tx, agent_id, epoch, seq)? != BatchSeq::New {
                return Ok(false);
            }
            let watermark = cursor_in(&tx, agent_id, METRIC_BATCHES, epoch)?;
            if seq == watermark + 1 {
                // Absorb the seqs stored above the old watermark that are
                // now contiguous with it.
                let mut top = seq;
                {
                    let mut st = tx.prepare_cached(
                        "SELECT seq FROM metric_batches_above
                         WHERE agent_id = ?1 AND epoch = ?2 AND seq > ?3 ORDER BY seq",
                    )?;
                    let mut rows = st.query(params![agent_id, epoch as i64, seq as i64])?;
                    while let Some(r) = rows.next()? {
                        let s = r.get::<_, i64>(0)? as u64;
                        if s != top + 1 {
                            break;
                        }
                        top = s;
                    }
                }
                if top > seq {
                    tx.prepare_cached(
                        "DELETE FROM metric_batches_above
                         WHERE agent_id = ?1 AND epoch = ?2 AND seq <= ?3",
                    )?
                    .execute(params![agent_id, epoch as i64, top as i64])?;
                }
                tx.prepare_cached(
                    "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (agent_id, stream, epoch) DO UPDATE SET seq = excluded.seq",
                )?
                .execute(params![
                    agent_id,
                    METRIC_BATCHES,
                    epoch as i64,
                    top as i64
                ])?;
            } else {
                tx.prepare_cached(
                    "INSERT INTO metric_batches_above (agent_id, epoch, seq) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![agent_id, epoch as i64, seq as i64])?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// The dedup state of `(agent_id, epoch)`'s metric batches: the
    /// contiguous watermark and how many seqs above it are stored.
    pub fn metric_batches(&self, agent_id: &str, epoch: u64) -> Result<(u64, u64), StoreError> {
        self.with(|c| {
            let watermark = cursor_in(c, agent_id, METRIC_BATCHES, epoch)?;
            let above: i64 = c.query_row(
                "SELECT COUNT(*) FROM metric_batches_above WHERE agent_id = ?1 AND epoch = ?2",
                params![agent_id, epoch as i64],
                |r| r.get(0),
            )?;
            Ok((watermark, above as u64))
        })
    }

    /// Records a container event an agent reported; false when the same
    /// event of the same container was recorded before.
    pub fn container_event(
        &self,
        agent_id: &str,
        ev: &proto::ContainerEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO container_events (agent_id, container_id, kind, time_ms, event)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![agent_id, ev.container_id, ev.kind, now, ev.encode_to_vec()],
            )?;
            Ok(n == 1)
        })
    }

    /// The container events of `agent_id`, oldest first.
    pub fn container_events(
        &self,
        agent_id: &str,
    ) -> Result<Vec<proto::ContainerEvent>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT event FROM container_events WHERE agent_id = ?1 ORDER BY time_ms, rowid",
            )?;
            let rows = st.query_map([agent_id], |r| r.get::<_, Vec<u8>>(0))?;
            let mut out = Vec::new();
            for row in rows {
                let bytes = row?;
                out.push(
                    proto::ContainerEvent::decode(bytes.as_slice()).map_err(|source| {
                        StoreError::Corrupt {
                            what: format!("container event of {agent_id}"),
                            source,
                        }
                    })?,
                );
            }
            Ok(out)
        })
    }

    /// Number of commands of `agent_id` above its ack.
    pub fn pending_count(&self, agent_id: &str, acked: u64) -> Result<u64, StoreError> {
        self.with(|c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM commands WHERE agent_id = ?1 AND seq > ?2",
                params![agent_id, acked as i64],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping() -> proto::CommandSpec {
        proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
        }
    }

    fn store_with_agent() -> Store {
        let s = Store::in_memory().unwrap();
        assert!(s.create_provider("default", "th", 1).unwrap());
        s.insert_agent(
            &AgentRecord {
                id: "a1".into(),
                provider: "default".into(),
                enrolled_ms: 1,
                ..Default::default()
            },
            "ch",
        )
        .unwrap();
        s
    }

    #[test]
    fn seqs_are_contiguous_and_pending_follows_acks() {
        let s = store_with_agent();
        for i in 1..=3 {
            let c = s
                .enqueue("a1", &format!("c{i}"), &ping(), 10)
                .unwrap()
                .unwrap();
            assert_eq!(c.seq, i);
        }
        assert_eq!(s.pending("a1", 0, 100).unwrap().len(), 3);
        assert_eq!(s.ack("a1", 2, 20).unwrap(), 2);
        let p = s.pending("a1", 2, 100).unwrap();
        assert_eq!(p.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
        // Acks never go backwards.
        assert_eq!(s.ack("a1", 1, 30).unwrap(), 2);
        assert_eq!(s.command("c1").unwrap().unwrap().accepted_ms, 20);
        assert_eq!(s.ack("a1", 3, 30).unwrap(), 3);
        assert!(s.enqueue("nobody", "x", &ping(), 1).unwrap().is_none());
    }

    #[test]
    fn an_ack_beyond_issued_seqs_moves_numbering_on() {
        let s = store_with_agent();
        s.enqueue("a1", "c1", &ping(), 10).unwrap();
        s.enqueue("a1", "c2", &ping(), 10).unwrap();
        // The agent saw seqs up to 5 before this store lost commits.
        assert_eq!(s.ack("a1", 5, 20).unwrap(), 5);
        for id in ["c1", "c2"] {
            let c = s.command(id).unwrap().unwrap();
            assert_eq!(
                (c.accepted_ms, c.done_ms),
                (20, 0),
                "{id}: its result may still come"
            );
        }
        let c = s.enqueue("a1", "c3", &ping(), 30).unwrap().unwrap();
        assert_eq!(c.seq, 6);
        assert!(s.pending("a1", 5, 10).unwrap().iter().all(|c| c.id == "c3"));
    }

    #[test]
    fn results_are_stored_once_and_only_for_the_owner() {
        let s = store_with_agent();
        s.enqueue("a1", "c1", &ping(), 10).unwrap();
        let r = proto::CommandResult {
            command_id: "c1".into(),
            status: proto::CommandStatus::Ok as i32,
            ..Default::default()
        };
        assert!(!s.complete("a2", &r, 11).unwrap());
        assert!(s.complete("a1", &r, 11).unwrap());
        assert!(!s.complete("a1", &r, 12).unwrap());
        let c = s.command("c1").unwrap().unwrap();
        assert_eq!((c.done_ms, c.result), (11, Some(r)));
    }

    #[test]
    fn cursors_only_move_forward() {
        let s = store_with_agent();
        assert!(s.advance_cursor("a1", "events", 7, 1).unwrap());
        assert!(s.advance_cursor("a1", "events", 7, 2).unwrap());
        assert!(!s.advance_cursor("a1", "events", 7, 2).unwrap());
        assert!(!s.advance_cursor("a1", "events", 7, 1).unwrap());
        assert!(s.advance_cursor("a1", "events", 8, 1).unwrap());
        assert_eq!(s.cursor("a1", "events", 7).unwrap(), 2);
    }

    #[test]
    fn metric_batches_are_stored_once_in_any_order() {
        let s = store_with_agent();
        let new = |seq| s.metric_batch_state("a1", 9, seq).unwrap();
        let record = |seq| s.record_metric_batch("a1", 9, seq).unwrap();
        // In order.
        for seq in 1..=3 {
            assert_eq!(new(seq), BatchSeq::New);
            assert!(record(seq));
            assert_eq!(new(seq), BatchSeq::Seen);
        }
        assert_eq!(s.metric_batches("a1", 9).unwrap(), (3, 0));
        // Out of order: 6 and 5 before 4; a lower seq after a higher one
        // is still new.
        assert!(record(6));
        assert!(record(5));
        assert_eq!(s.metric_batches("a1", 9).unwrap(), (3, 2));
        assert_eq!(new(4), BatchSeq::New);
        assert_eq!(new(5), BatchSeq::Seen);
        assert!(!record(5), "a duplicate above the watermark");
        assert!(record(4));
        // 4 closed the gap: the watermark moves over 5 and 6, their rows go.
        assert_eq!(s.metric_batches("a1", 9).unwrap(), (6, 0));
        for seq in 1..=6 {
            assert_eq!(new(seq), BatchSeq::Seen, "{seq}");
            assert!(!record(seq), "{seq}");
        }
        // A gap that stays open keeps what is above it, and only that.
        assert!(record(8));
        assert!(record(10));
        assert!(record(7));
        assert_eq!(s.metric_batches("a1", 9).unwrap(), (8, 1));
        assert_eq!(new(9), BatchSeq::New);
        // Epochs and agents are independent.
        assert_eq!(s.metric_batch_state("a1", 10, 1).unwrap(), BatchSeq::New);
        assert_eq!(s.metric_batch_state("a2", 9, 1).unwrap(), BatchSeq::New);
        // The event cursors are another stream.
        assert_eq!(s.cursor("a1", "events", 9).unwrap(), 0);
    }

    #[test]
    fn metric_batches_far_above_the_watermark_are_refused() {
        let s = store_with_agent();
        assert!(s.record_metric_batch("a1", 1, 1).unwrap());
        let edge = 1 + METRIC_SEQ_WINDOW;
        assert_eq!(s.metric_batch_state("a1", 1, edge).unwrap(), BatchSeq::New);
        assert_eq!(
            s.metric_batch_state("a1", 1, edge + 1).unwrap(),
            BatchSeq::TooFarAhead { watermark: 1 }
        );
        assert!(!s.record_metric_batch("a1", 1, edge + 1).unwrap());
        assert!(s.record_metric_batch("a1", 1, edge).unwrap());
        assert_eq!(s.metric_batches("a1", 1).unwrap(), (1, 1));
    }

    #[test]
    fn metric_batch_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            for seq in [1, 2, 4] {
                assert!(s.record_metric_batch("a", 3, seq).unwrap());
            }
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.metric_batches("a", 3).unwrap(), (2, 1));
        assert_eq!(s.metric_batch_state("a", 3, 4).unwrap(), BatchSeq::Seen);
        assert_eq!(s.metric_batch_state("a", 3, 3).unwrap(), BatchSeq::New);
    }

    #[test]
    fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.create_provider("p", "h", 1).unwrap();
            s.set_meta("admin_token_hash", "x").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.provider_by_token("h").unwrap().as_deref(), Some("p"));
        assert_eq!(s.meta("admin_token_hash").unwrap().as_deref(), Some("x"));
    }
}
