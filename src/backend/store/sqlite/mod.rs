//! [`SqliteStore`]: the [`Store`] in one SQLite file, `DATA_DIR/uplink.db`.
//!
//! The dedup state of metric batches is, per `(agent, epoch)`, a contiguous
//! watermark in `cursors` (stream `metric_batches`) plus the seqs stored
//! above it in `metric_batches_above`. Runs and capacities are in [`runs`].
//!
//! The journal runs in WAL mode with `synchronous=NORMAL`: a committed
//! change survives a crash or `kill -9` of the backend; only a power loss
//! of the host can take the last commits with it.
//!
//! Every call is short and runs inline, when the method is called, behind
//! one mutex, and returns a ready future with its outcome: plain
//! synchronous work at the call site, and the lock is released before the
//! caller awaits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AgentRecord, BatchSeq, CommandRecord, ContainerChange, CredentialOwner, LiveContainer,
    METRIC_SEQ_WINDOW, NewContainer, ProviderRecord, Pruned, Retention, Role, RunContainerRecord,
    RunRecord, Store, StoreError, StoreFuture, scrub_secrets,
};
use crate::proto;

mod checkpoint;
mod credentials;
mod retention;
mod runs;
mod schema;

pub use checkpoint::CHECKPOINT_EVERY;
use checkpoint::Checkpointer;

/// The client errors of SQLite, as the store's errors.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        let source = Box::new(e);
        match source.sqlite_error_code() {
            // Another writer held the lock past the wait, the disk is full
            // or failing: worth a retry, not a bug.
            Some(DatabaseBusy | DatabaseLocked | DiskFull | SystemIoFailure) => {
                StoreError::Unavailable {
                    store: "SQLite",
                    source,
                }
            }
            _ => StoreError::Backend {
                store: "SQLite",
                source,
            },
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    /// The one writer: every change goes through it.
    conn: Mutex<Connection>,
    /// A second connection for reads (a file's store only): in WAL mode a
    /// read sees the last commit and never waits for the writer, so a
    /// write that waits on the disk or on the write lock holds up no
    /// authentication and no delivery.
    reader: Option<Mutex<Connection>>,
    /// Stops the checkpointer thread when the store is dropped.
    checkpointer: Option<Checkpointer>,
}

/// The `cursors` stream that holds each `(agent, epoch)`'s contiguous
/// watermark of stored metric batches. (Not `metrics`: that name held a
/// high-water mark, which is not a contiguous watermark, in older stores.)
const METRIC_BATCHES: &str = "metric_batches";

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

/// Runs `f`, which may block its thread for seconds, without holding up
/// the runtime: on a multi-threaded tokio runtime the worker hands its
/// other tasks to another thread for the length of the call
/// (`block_in_place`); elsewhere (a current-thread runtime, no runtime) it
/// is a plain call.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/uplink.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("uplink.db");
        crate::owner_only::create_private(&path).map_err(|e| StoreError::Backend {
            store: "SQLite",
            source: Box::new(e),
        })?;
        let mut store = Self::from_connection(Connection::open(&path)?)?;
        store.with(|c| {
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
            c.pragma_update(None, "journal_size_limit", checkpoint::WAL_SIZE_LIMIT)?;
            Ok(())
        })?;
        let reader = Connection::open(&path)?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", "ON")?;
        store.reader = Some(Mutex::new(reader));
        store.checkpointer = Some(Checkpointer::start(path)?);
        Ok(store)
    }

    /// An in-memory store, for unit tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Freed and overwritten content (a finished command's scrubbed
        // secrets) is zeroed in the file, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Transactions take the write lock when they begin (BEGIN
        // IMMEDIATE), under the busy timeout: a deferred one reads first,
        // and when the checkpointer's TRUNCATE has reset the WAL since, it
        // cannot become a writer and fails at once with SQLITE_BUSY. This
        // connection is the only writer, so nothing waits longer for it.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        schema::migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: None,
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

    /// Runs `f` on the writer now, under its lock, and returns its outcome
    /// as a ready future: the lock is released before the caller awaits,
    /// and the work is done whether or not the future is polled.
    ///
    /// A write can wait for seconds (a sync on a slow disk, the write lock
    /// held by a checkpoint or by another process, up to the busy
    /// timeout). On a multi-threaded runtime it waits off the runtime
    /// ([`off_runtime`]): the worker's other tasks move to another thread,
    /// so heartbeats, TLS handshakes and first frames of every other
    /// connection go on meanwhile.
    fn ready<'a, T: Send + 'a>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> StoreFuture<'a, T> {
        Box::pin(std::future::ready(off_runtime(|| self.with(f))))
    }

    /// Runs a read-only `f` now on the reader (the writer for an
    /// in-memory store), and returns its outcome as a ready future. A read
    /// sees every change committed before it starts and does not wait for
    /// the writer.
    fn read<'a, T: Send + 'a>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> StoreFuture<'a, T> {
        Box::pin(std::future::ready(self.read_now(f)))
    }

    /// What [`SqliteStore::read`] does, as a plain call.
    fn read_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.reader {
            Some(reader) => f(&mut *reader.lock().map_err(|_| StoreError::Poisoned)?),
            None => off_runtime(|| self.with(f)),
        }
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
            revoked_ms: r.get(10)?,
            enroll_key_hash: None,
        })
    }

    const AGENT_COLUMNS: &str = "id, provider, hostname, version, enrolled_ms, last_seen_ms, acked_seq, next_seq, transport, transport_reason, revoked_ms";
}

impl Store for SqliteStore {
    fn meta(&self, key: &str) -> StoreFuture<'_, Option<String>> {
        self.read(|c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    fn set_meta(&self, key: &str, value: &str) -> StoreFuture<'_, ()> {
        self.ready(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }

    fn create_provider(&self, name: &str, token_hash: &str, now: i64) -> StoreFuture<'_, bool> {
        self.ready(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO providers (name, token_hash, created_ms) VALUES (?1, ?2, ?3)",
                params![name, token_hash, now],
            )?;
            Ok(n == 1)
        })
    }

    fn set_provider_token(&self, name: &str, token_hash: &str) -> StoreFuture<'_, bool> {
        self.ready(|c| credentials::set_provider_token(c, name, token_hash))
    }

    fn set_token_limits(
        &self,
        name: &str,
        max_agents: u32,
        expires_ms: i64,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| credentials::set_token_limits(c, name, max_agents, expires_ms))
    }

    fn provider_by_token(&self, token_hash: &str) -> StoreFuture<'_, Option<ProviderRecord>> {
        self.read(|c| credentials::provider_by_token(c, token_hash))
    }

    fn providers(&self) -> StoreFuture<'_, Vec<ProviderRecord>> {
        self.read(credentials::providers)
    }

    fn insert_agent(&self, a: &AgentRecord, credential_hash: &str) -> StoreFuture<'_, bool> {
        self.ready(|c| credentials::insert_agent(c, a, credential_hash))
    }

    fn reenroll(
        &self,
        provider: &str,
        enroll_key_hash: &str,
        enrolled_since_ms: i64,
        credential_hash: &str,
    ) -> StoreFuture<'_, Option<String>> {
        self.ready(|c| {
            credentials::reenroll(
                c,
                provider,
                enroll_key_hash,
                enrolled_since_ms,
                credential_hash,
            )
        })
    }

    fn agent_by_credential(
        &self,
        credential_hash: &str,
    ) -> StoreFuture<'_, Option<CredentialOwner>> {
        // The common case, a current credential or none, is a read; only
        // a pending credential's first use writes (it becomes current).
        match self.read_now(|c| credentials::lookup_credential(c, credential_hash)) {
            Ok(credentials::Lookup::Current(owner)) => {
                Box::pin(std::future::ready(Ok(Some(owner))))
            }
            Ok(credentials::Lookup::Unknown) => Box::pin(std::future::ready(Ok(None))),
            Ok(credentials::Lookup::Pending) => {
                self.ready(|c| credentials::agent_by_credential(c, credential_hash))
            }
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn set_pending_credential(
        &self,
        agent_id: &str,
        credential_hash: &str,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| credentials::set_pending_credential(c, agent_id, credential_hash))
    }

    fn revoke_agent(&self, agent_id: &str, now: i64) -> StoreFuture<'_, Option<i64>> {
        self.ready(|c| credentials::revoke_agent(c, agent_id, now))
    }

    fn agent(&self, id: &str) -> StoreFuture<'_, Option<AgentRecord>> {
        self.read(|c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {} FROM agents WHERE id = ?1",
                    SqliteStore::AGENT_COLUMNS
                ),
                [id],
                SqliteStore::agent_from_row,
            )
            .optional()?)
        })
    }

    fn agents(&self, provider: &str) -> StoreFuture<'_, Vec<AgentRecord>> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM agents WHERE ?1 = '' OR provider = ?1 ORDER BY id",
                SqliteStore::AGENT_COLUMNS
            ))?;
            let rows = st.query_map([provider], SqliteStore::agent_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn update_agent_info(
        &self,
        id: &str,
        hostname: &str,
        version: &str,
        transport: i32,
        reason: &str,
        now: i64,
    ) -> StoreFuture<'_, ()> {
        self.ready(|c| {
            c.execute(
                "UPDATE agents SET hostname = ?2, version = ?3, transport = ?4, transport_reason = ?5,
                 last_seen_ms = ?6 WHERE id = ?1",
                params![id, hostname, version, transport, reason, now],
            )?;
            Ok(())
        })
    }

    fn touch_agent(&self, id: &str, now: i64) -> StoreFuture<'_, ()> {
        self.ready(|c| {
            c.execute(
                "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            Ok(())
        })
    }

    fn enqueue(
        &self,
        agent_id: &str,
        id: &str,
        spec: &proto::CommandSpec,
        now: i64,
    ) -> StoreFuture<'_, Option<proto::Command>> {
        self.ready(|c| {
            let tx = c.transaction()?;
            let command = enqueue_in(&tx, agent_id, id, spec, now)?;
            tx.commit()?;
            Ok(command)
        })
    }

    fn pending(
        &self,
        agent_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<proto::Command>> {
        self.read(|c| {
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

    fn ack(&self, agent_id: &str, ack: u64, now: i64) -> StoreFuture<'_, u64> {
        // Most acks move nothing (every call repeats the agent's last one):
        // answered by the reader, without waiting for the writer.
        let seen = self.read_now(|c| {
            Ok(c.query_row(
                "SELECT acked_seq, next_seq FROM agents WHERE id = ?1",
                [agent_id],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?)
        });
        match seen {
            Ok(None) => return Box::pin(std::future::ready(Ok(0))),
            Ok(Some((acked, next))) if i64::try_from(ack).is_ok_and(|a| a <= acked && a < next) => {
                return Box::pin(std::future::ready(Ok(acked as u64)));
            }
            _ => {}
        }
        self.ready(|c| {
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

    fn complete(
        &self,
        agent_id: &str,
        result: &proto::CommandResult,
        now: i64,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE commands SET done_ms = ?3, result = ?4,
                 accepted_ms = CASE WHEN accepted_ms = 0 THEN ?3 ELSE accepted_ms END
                 WHERE id = ?1 AND agent_id = ?2 AND done_ms = 0",
                params![result.command_id, agent_id, now, result.encode_to_vec()],
            )?;
            if n == 1 {
                let spec: Vec<u8> = tx.query_row(
                    "SELECT spec FROM commands WHERE id = ?1",
                    [&result.command_id],
                    |r| r.get(0),
                )?;
                let mut spec = proto::CommandSpec::decode(spec.as_slice()).map_err(|source| {
                    StoreError::Corrupt {
                        what: format!("command {}", result.command_id),
                        source,
                    }
                })?;
                if scrub_secrets(&mut spec) {
                    tx.execute(
                        "UPDATE commands SET spec = ?2 WHERE id = ?1",
                        params![result.command_id, spec.encode_to_vec()],
                    )?;
                }
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn command(&self, id: &str) -> StoreFuture<'_, Option<CommandRecord>> {
        self.read(|c| {
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

    fn advance_cursor(
        &self,
        agent_id: &str,
        stream: &str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| {
            let n = c.execute(
                "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent_id, stream, epoch) DO UPDATE SET seq = excluded.seq
                 WHERE excluded.seq > cursors.seq",
                params![agent_id, stream, epoch as i64, seq as i64],
            )?;
            Ok(n == 1)
        })
    }

    fn cursor(&self, agent_id: &str, stream: &str, epoch: u64) -> StoreFuture<'_, u64> {
        self.read(|c| {
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

    fn newest_epoch(&self, agent_id: &str, stream: &str) -> StoreFuture<'_, u64> {
        self.read(|c| {
            // Epochs are stored as their bits in an i64: compare them as u64.
            let mut st =
                c.prepare_cached("SELECT epoch FROM cursors WHERE agent_id = ?1 AND stream = ?2")?;
            let rows = st.query_map(params![agent_id, stream], |r| r.get::<_, i64>(0))?;
            let mut newest = 0u64;
            for e in rows {
                newest = newest.max(e? as u64);
            }
            Ok(newest)
        })
    }

    fn metric_batch_state(
        &self,
        agent_id: &str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'_, BatchSeq> {
        self.read(|c| metric_batch_state_in(c, agent_id, epoch, seq))
    }

    fn record_metric_batch(
        &self,
        agent_id: &str,
        epoch: u64,
        seq: u64,
        // One backend holds the store: no other wrote the batch.
        _writer: Option<&str>,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| {
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
                // The epoch's cursor exists from its first batch on, so
                // retention sees the epoch and its rows above the watermark.
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO cursors (agent_id, stream, epoch, seq) VALUES (?1, ?2, ?3, 0)",
                )?
                .execute(params![agent_id, METRIC_BATCHES, epoch as i64])?;
                tx.prepare_cached(
                    "INSERT INTO metric_batches_above (agent_id, epoch, seq) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![agent_id, epoch as i64, seq as i64])?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn metric_batches(&self, agent_id: &str, epoch: u64) -> StoreFuture<'_, (u64, u64)> {
        self.read(|c| {
            let watermark = cursor_in(c, agent_id, METRIC_BATCHES, epoch)?;
            let above: i64 = c.query_row(
                "SELECT COUNT(*) FROM metric_batches_above WHERE agent_id = ?1 AND epoch = ?2",
                params![agent_id, epoch as i64],
                |r| r.get(0),
            )?;
            Ok((watermark, above as u64))
        })
    }

    fn container_event(
        &self,
        agent_id: &str,
        ev: &proto::ContainerEvent,
        now: i64,
    ) -> StoreFuture<'_, bool> {
        self.ready(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO container_events (agent_id, container_id, kind, time_ms, event)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![agent_id, ev.container_id, ev.kind, now, ev.encode_to_vec()],
            )?;
            Ok(n == 1)
        })
    }

    fn container_events(&self, agent_id: &str) -> StoreFuture<'_, Vec<proto::ContainerEvent>> {
        self.read(|c| {
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

    fn pending_counts(
        &self,
        provider: &str,
    ) -> StoreFuture<'_, std::collections::HashMap<String, u64>> {
        self.read(|c| {
            // Per agent, a range of its (agent_id, seq) index.
            let mut st = c.prepare(
                "SELECT id, (SELECT COUNT(*) FROM commands WHERE agent_id = agents.id AND seq > agents.acked_seq)
                 FROM agents WHERE ?1 = '' OR provider = ?1",
            )?;
            let rows = st.query_map([provider], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut counts = std::collections::HashMap::new();
            for row in rows {
                let (id, n) = row?;
                if n > 0 {
                    counts.insert(id, n as u64);
                }
            }
            Ok(counts)
        })
    }

    fn create_run(
        &self,
        run: &RunRecord,
        containers: &[NewContainer],
    ) -> StoreFuture<'_, Option<Vec<(String, proto::Command)>>> {
        self.ready(|c| runs::create_run(c, run, containers))
    }

    fn run(
        &self,
        id_or_name: &str,
    ) -> StoreFuture<'_, Option<(RunRecord, Vec<RunContainerRecord>)>> {
        self.read(|c| runs::run(c, id_or_name))
    }

    fn runs(
        &self,
        provider: &str,
        limit: usize,
    ) -> StoreFuture<'_, Vec<(RunRecord, Vec<RunContainerRecord>)>> {
        self.read(|c| runs::runs(c, provider, limit))
    }

    fn run_name_in_use(&self, name: &str) -> StoreFuture<'_, bool> {
        self.ready(|c| runs::run_name_in_use(c, name))
    }

    fn run_command(&self, command_id: &str) -> StoreFuture<'_, Option<(String, u32, Role)>> {
        self.read(|c| runs::run_command(c, command_id))
    }

    fn change_container(
        &self,
        run_id: &str,
        index: u32,
        now: i64,
        change: &mut ContainerChange<'_>,
    ) -> StoreFuture<'_, Option<(RunContainerRecord, Option<proto::Command>)>> {
        self.ready(|c| runs::change_container(c, run_id, index, now, change))
    }

    fn stop_run(&self, run_id: &str, now: i64, timeout_s: u32) -> StoreFuture<'_, ()> {
        self.ready(|c| runs::stop_run(c, run_id, now, timeout_s))
    }

    fn live_run_containers(&self) -> StoreFuture<'_, Vec<LiveContainer>> {
        self.read(runs::live_run_containers)
    }

    fn set_capacity(
        &self,
        agent_id: &str,
        capacity: &proto::Capacity,
        now: i64,
    ) -> StoreFuture<'_, ()> {
        self.ready(|c| runs::set_capacity(c, agent_id, capacity, now))
    }

    fn capacities(&self) -> StoreFuture<'_, HashMap<String, (proto::Capacity, i64)>> {
        self.read(runs::capacities)
    }

    fn prune(&self, retention: &Retention) -> StoreFuture<'_, Pruned> {
        self.ready(|c| retention::prune(c, retention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::backend::store::suite::store_suite!((SqliteStore::in_memory().unwrap(), ()));

    /// The suite on a store in a file, as the backend opens it: reads go
    /// through the reader connection and see every write committed before.
    mod in_a_file {
        use super::*;

        crate::backend::store::suite::store_suite!({
            let dir = tempfile::tempdir().unwrap();
            (SqliteStore::open(dir.path()).unwrap(), dir)
        });
    }

    /// A write that waited its whole busy timeout for another process's
    /// write lock is a transient failure (callers answer UNAVAILABLE), and
    /// the next one after the lock goes works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_lock_held_past_the_wait_is_unavailable_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let other = Connection::open(dir.path().join("uplink.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let e = store
            .create_provider("default", "th", 1)
            .await
            .expect_err("the write lock is held");
        assert!(
            matches!(e, StoreError::Unavailable { .. }),
            "a busy database is transient: {e}"
        );
        assert!(
            e.to_string().starts_with("SQLite database unavailable: "),
            "{e}"
        );
        other.execute_batch("ROLLBACK").unwrap();
        assert!(store.create_provider("default", "th", 1).await.unwrap());
    }

    /// Write transactions read before they write; a deferred one whose
    /// snapshot a truncating checkpoint reset meanwhile cannot become a
    /// writer and fails at once ("database is locked", no busy wait). The
    /// store's transactions take the write lock when they begin.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_never_fail_beside_truncating_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert!(store.create_provider("default", "th", 1).await.unwrap());
        let agent = crate::backend::store::AgentRecord {
            id: "a1".into(),
            provider: "default".into(),
            enrolled_ms: 1,
            ..Default::default()
        };
        assert!(store.insert_agent(&agent, "ch").await.unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoints = {
            let stop = stop.clone();
            let db = dir.path().join("uplink.db");
            std::thread::spawn(move || {
                let c = Connection::open(db).unwrap();
                c.busy_timeout(std::time::Duration::from_secs(1)).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                }
            })
        };
        let spec = proto::CommandSpec {
            kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
        };
        let mut failures = Vec::new();
        for i in 0..2000 {
            if let Err(e) = store.enqueue("a1", &format!("cmd_{i}"), &spec, i).await {
                failures.push(e.to_string());
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        checkpoints.join().unwrap();
        assert!(
            failures.is_empty(),
            "{} of 2000 failed: {:?}",
            failures.len(),
            failures.first()
        );
    }

    #[tokio::test]
    async fn metric_batch_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            for seq in [1, 2, 4] {
                assert!(s.record_metric_batch("a", 3, seq, None).await.unwrap());
            }
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.metric_batches("a", 3).await.unwrap(), (2, 1));
        assert_eq!(
            s.metric_batch_state("a", 3, 4).await.unwrap(),
            BatchSeq::Seen
        );
        assert_eq!(
            s.metric_batch_state("a", 3, 3).await.unwrap(),
            BatchSeq::New
        );
    }

    #[test]
    fn sqlite_errors_say_where_they_come_from() {
        let e = StoreError::from(rusqlite::Error::QueryReturnedNoRows);
        assert_eq!(e.to_string(), "SQLite database: Query returned no rows");
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SqliteStore::open(dir.path()).unwrap();
            s.create_provider("p", "h", 1).await.unwrap();
            s.set_meta("admin_token_hash", "x").await.unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            s.provider_by_token("h")
                .await
                .unwrap()
                .map(|p| p.name)
                .as_deref(),
            Some("p")
        );
        assert_eq!(
            s.meta("admin_token_hash").await.unwrap().as_deref(),
            Some("x")
        );
    }
}
