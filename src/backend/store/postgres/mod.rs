//! [`PostgresStore`]: the [`Store`] in a PostgreSQL database
//! (`--database postgres://...`), which several backend processes may
//! share.
//!
//! It keeps the semantics of [`SqliteStore`](super::SqliteStore) (both
//! pass `suite.rs`), but where SQLite has one writer behind a mutex, here
//! every statement may race the same statement of another backend. So
//! each operation that reads before it writes takes its row lock first:
//!
//! - An agent's numbering is its `agents.next_seq`, taken with
//!   `UPDATE ... RETURNING` in the transaction that inserts the command:
//!   the row stays locked until commit, and a transaction that fails
//!   rolls the number back with it, so seqs have no gaps and no
//!   duplicates whatever the number of replicas.
//! - Acks lock the agent row (`SELECT ... FOR UPDATE`); a result is
//!   stored by one `UPDATE ... WHERE done_ms = 0`, so of two racing
//!   results one wins.
//! - A metric batch's `(agent, epoch)` cursor row is created if missing
//!   and locked before its state is read.
//! - Several agents' rows (a run's placement) are locked in id order, so
//!   two runs placed on the same agents cannot deadlock.
//!
//! Runs and capacities are in [`runs`], credentials in [`credentials`],
//! retention in [`retention`], the schema and its migrations in
//! [`schema`], the URL in [`url`].
//!
//! A call takes a connection from a pool ([`POOL_SIZE`]); when the
//! database is unreachable, calls fail within the pool's timeouts with
//! [`StoreError::Backend`], and the pool connects again when it answers.
//! A future dropped mid-transaction rolls it back (the client sends the
//! rollback when its transaction is dropped).

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Hook, HookError, Manager, ManagerConfig, Metrics, Pool, QueueMode,
    RecyclingMethod, Runtime,
};
use prost::Message;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{
    AgentRecord, BatchSeq, Change, CommandRecord, ContainerChange, CredentialOwner, LiveContainer,
    METRIC_SEQ_WINDOW, NewContainer, PresenceRecord, ProviderRecord, Pruned, Retention, Role,
    RunContainerRecord, RunRecord, Store, StoreError, StoreFuture, scrub_secrets,
};
use crate::proto;

mod cache;
mod changes;
mod credentials;
mod retention;
mod runs;
mod schema;
mod url;

pub use url::{CONNECT_TIMEOUT, DatabaseUrl};

/// The store's name in its errors.
const STORE: &str = "PostgreSQL";

/// Connections to the database one backend holds at most.
pub const POOL_SIZE: usize = 16;

/// How long a call waits for a free connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// A pooled connection handed out less than this long ago is handed out
/// again without a round trip to check it; one idle longer is checked
/// first (see [`check_if_idle`]).
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// The `cursors` stream of metric batch watermarks, as in SQLite.
const METRIC_BATCHES: &str = "metric_batches";

/// A client error, described on one line: the client's own `Display`
/// says only "db error"; this carries the server's message and code.
#[derive(Debug)]
struct ClientError {
    text: String,
    source: tokio_postgres::Error,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A client error on one line: the server's severity, message and
/// SQLSTATE, or the client's error with its causes.
fn describe(e: &tokio_postgres::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!(
                "{}: {}{detail} [SQLSTATE {}]",
                db.severity(),
                db.message(),
                db.code().code()
            )
        }
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            text
        }
    };
    text.replace(['\n', '\r'], " ")
}

/// The client errors of PostgreSQL, as the store's errors.
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = transient(&e);
        let source = Box::new(ClientError {
            text: describe(&e),
            source: e,
        });
        if transient {
            StoreError::Unavailable {
                store: STORE,
                source,
            }
        } else {
            StoreError::Backend {
                store: STORE,
                source,
            }
        }
    }
}

/// Whether a client error may pass when retried: the connection failed or
/// closed (no error from the server), or the server said so (connection
/// exceptions, shutting down, out of resources, a serialization conflict
/// or a deadlock).
fn transient(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            ["08", "53", "57P"].iter().any(|c| code.starts_with(c))
                || code == "40001"
                || code == "40P01"
        }
    }
}

/// The pool's errors (no connection within its timeouts, or none could
/// be made), as the store's errors.
impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            // No connection within the wait, or the pool is closing.
            e => StoreError::Unavailable {
                store: STORE,
                source: Box::new(e),
            },
        }
    }
}

/// The PostgreSQL store: a pool of connections. Cheap to share behind an
/// `Arc`; any number of them (in one process or many) may use one
/// database at once.
pub struct PostgresStore {
    pool: Pool,
    /// What the change feed connects with, until [`Store::changes`]
    /// starts it: the client's configuration and the database's name for
    /// logs.
    feed: std::sync::Mutex<Option<(tokio_postgres::Config, String)>>,
    /// Agents' credentials looked up, while the change feed listens.
    credentials: std::sync::Arc<cache::CredentialCache>,
}

/// Runs `sql` (prepared once per connection) and returns its rows.
async fn query<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, params).await?)
}

/// Runs `sql` and returns its one row, if any.
async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<tokio_postgres::Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, params).await?)
}

/// Runs `sql` and returns its one row.
async fn query_one<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<tokio_postgres::Row, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, params).await?)
}

/// Runs `sql` and returns how many rows it changed.
async fn execute<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, params).await?)
}

/// Queues a command, in one statement (its own transaction, or part of
/// the caller's); None when the agent does not exist. Taking the seq
/// locks the agent's row until the transaction ends, so racing enqueues
/// (from any backend) take turns; a statement that fails (a command id
/// taken) rolls its seq back with it.
async fn enqueue_in<C: GenericClient>(
    c: &C,
    agent_id: &str,
    id: &str,
    spec: &proto::CommandSpec,
    now: i64,
) -> Result<Option<proto::Command>, StoreError> {
    // The notifications are delivered to every backend listening when,
    // and only if, the transaction commits, the one with the command
    // first; `changes` parses their payloads.
    let mut command = proto::Command {
        id: id.to_string(),
        seq: 0,
        created_unix_ms: now,
        spec: Some(spec.clone()),
    };
    let hex = changes::command_hex(agent_id, &command);
    let Some(row) = query_opt(
        c,
        "WITH taken AS (
             UPDATE agents SET next_seq = next_seq + 1 WHERE id = $1 RETURNING next_seq - 1 AS seq
         ), queued AS (
             INSERT INTO commands (id, agent_id, seq, spec, created_ms)
             SELECT $2, $1, seq, $3, $4 FROM taken RETURNING seq
         )
         SELECT seq, pg_notify($6, $1 || ' ' || seq || ' ' || $7)::TEXT,
                pg_notify($5, $1 || ' ' || seq)::TEXT
         FROM queued",
        &[
            &agent_id,
            &id,
            &spec.encode_to_vec(),
            &now,
            &changes::QUEUED,
            &changes::COMMAND,
            &hex,
        ],
    )
    .await?
    else {
        return Ok(None);
    };
    command.seq = row.try_get::<_, i64>(0)? as u64;
    Ok(Some(command))
}

/// An ack of seqs this store never issued (lost commits, or a database
/// restored from an older copy): the agent's word is taken for what it
/// accepted, and new commands are numbered above its ack, so that none is
/// mistaken for a duplicate. Returns the agent's ack as stored.
async fn renumber_above(
    mut c: deadpool_postgres::Client,
    agent_id: &str,
    ack: i64,
    now: i64,
) -> Result<u64, StoreError> {
    let tx = c.transaction().await?;
    let Some(row) = query_opt(
        &tx,
        "SELECT acked_seq, next_seq FROM agents WHERE id = $1 FOR NO KEY UPDATE",
        &[&agent_id],
    )
    .await?
    else {
        return Ok(0);
    };
    let acked: i64 = row.try_get(0)?;
    let next: i64 = row.try_get(1)?;
    if ack <= acked {
        return Ok(acked as u64);
    }
    execute(
        &tx,
        "UPDATE agents SET acked_seq = $2::BIGINT, next_seq = GREATEST(next_seq, $2::BIGINT + 1) WHERE id = $1",
        &[&agent_id, &ack],
    )
    .await?;
    execute(
        &tx,
        "UPDATE commands SET accepted_ms = $3
         WHERE agent_id = $1 AND seq > $4 AND seq <= $2 AND accepted_ms = 0",
        &[&agent_id, &ack, &now, &acked],
    )
    .await?;
    tx.commit().await?;
    if ack >= next {
        tracing::warn!(
            agent = agent_id,
            ack,
            issued = next - 1,
            "agent acknowledges seqs this store never issued (lost commits or a restored database); numbering moves on above its ack"
        );
    }
    Ok(ack as u64)
}

/// The cursor of `(agent, stream, epoch)` (0 when none).
async fn cursor_in<C: GenericClient>(
    c: &C,
    agent_id: &str,
    stream: &str,
    epoch: u64,
) -> Result<u64, StoreError> {
    let row = query_opt(
        c,
        "SELECT seq FROM cursors WHERE agent_id = $1 AND stream = $2 AND epoch = $3",
        &[&agent_id, &stream, &(epoch as i64)],
    )
    .await?;
    Ok(match row {
        Some(r) => r.try_get::<_, i64>(0)? as u64,
        None => 0,
    })
}

/// Where batch `seq` stands against `watermark` and the seqs stored above
/// it.
async fn metric_batch_state_in<C: GenericClient>(
    c: &C,
    agent_id: &str,
    epoch: u64,
    seq: u64,
    watermark: u64,
) -> Result<BatchSeq, StoreError> {
    if seq <= watermark {
        return Ok(BatchSeq::Seen);
    }
    if seq - watermark > METRIC_SEQ_WINDOW {
        return Ok(BatchSeq::TooFarAhead { watermark });
    }
    let above = query_opt(
        c,
        "SELECT 1 FROM metric_batches_above WHERE agent_id = $1 AND epoch = $2 AND seq = $3",
        &[&agent_id, &(epoch as i64), &(seq as i64)],
    )
    .await?;
    Ok(if above.is_some() {
        BatchSeq::Seen
    } else {
        BatchSeq::New
    })
}

/// A command's spec or result as stored, or the record it belongs to
/// named as corrupt.
fn decode<M: Message + Default>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
}

const AGENT_COLUMNS: &str = "id, provider, hostname, version, enrolled_ms, last_seen_ms, acked_seq, next_seq, transport, transport_reason, revoked_ms";

fn agent_from_row(r: &tokio_postgres::Row) -> Result<AgentRecord, StoreError> {
    Ok(AgentRecord {
        id: r.try_get(0)?,
        provider: r.try_get(1)?,
        hostname: r.try_get(2)?,
        version: r.try_get(3)?,
        enrolled_ms: r.try_get(4)?,
        last_seen_ms: r.try_get(5)?,
        acked_seq: r.try_get::<_, i64>(6)? as u64,
        next_seq: r.try_get::<_, i64>(7)? as u64,
        transport: r.try_get(8)?,
        transport_reason: r.try_get(9)?,
        revoked_ms: r.try_get(10)?,
        enroll_key_hash: None,
    })
}

/// Checks a pooled connection idle for [`CHECK_IDLE_AFTER`] or more with
/// an empty query (bounded by [`CONNECT_TIMEOUT`]) before it is handed
/// out: after the server restarted, a call gets a live connection, not
/// one the server closed while idle, which only the call's statement
/// would find out. A connection that fails the check is dropped and the
/// pool takes another or opens one. One handed out less than a second ago
/// is handed out again unchecked: a round trip saved on every call under
/// load; the client marks a connection closed as soon as its socket
/// closes, which the pool's own recycling checks.
async fn check_if_idle(
    client: &mut deadpool_postgres::ClientWrapper,
    metrics: &Metrics,
) -> Result<(), HookError> {
    if metrics.last_used() < CHECK_IDLE_AFTER {
        return Ok(());
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %describe(&e), "an idle database connection failed its check; another is used");
            Err(HookError::Backend(e))
        }
        Err(_) => {
            tracing::warn!(within = ?CONNECT_TIMEOUT, "an idle database connection did not answer its check; another is used");
            Err(HookError::message(
                "an idle connection did not answer its check in time",
            ))
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, brings its schema up to this
    /// build's version (waiting for another backend that is migrating
    /// it), and opens the pool. Fails when the database cannot be reached
    /// within [`CONNECT_TIMEOUT`], refuses the credentials, or has a
    /// schema newer than this build knows.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, StoreError> {
        let config = url.config();
        let shown = url.redacted();
        schema::migrate(&config, url.password(), &shown).await?;
        let feed = std::sync::Mutex::new(Some((config.clone(), shown.clone())));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // Only whether the client saw its connection close; the
                // round trip that proves it alive is `check_if_idle`'s.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT * 2))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            // The connection returned last is handed out first: under a
            // steady load the same few stay busy and skip the check.
            .queue_mode(QueueMode::Lifo)
            .pre_recycle(Hook::async_fn(|client, metrics| {
                Box::pin(check_if_idle(client, metrics))
            }))
            .build()
            .map_err(|e| StoreError::Backend {
                store: STORE,
                source: Box::new(e),
            })?;
        tracing::info!(database = %shown, schema = schema::VERSION, "PostgreSQL store ready");
        Ok(PostgresStore {
            pool,
            feed,
            credentials: Default::default(),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }
}

impl Store for PostgresStore {
    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let c = self.client().await?;
            let row = query_opt(&c, "SELECT value FROM meta WHERE key = $1", &[&key]).await?;
            Ok(match row {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            })
        })
    }

    fn set_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            execute(
                &c,
                "INSERT INTO meta (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .await?;
            Ok(())
        })
    }

    fn create_provider<'a>(
        &'a self,
        name: &'a str,
        token_hash: &'a str,
        now: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            let n = execute(
                &c,
                "INSERT INTO providers (name, token_hash, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&name, &token_hash, &now],
            )
            .await?;
            Ok(n == 1)
        })
    }

    fn set_provider_token<'a>(
        &'a self,
        name: &'a str,
        token_hash: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            credentials::set_provider_token(&c, name, token_hash).await
        })
    }

    fn set_token_limits<'a>(
        &'a self,
        name: &'a str,
        max_agents: u32,
        expires_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            credentials::set_token_limits(&c, name, max_agents, expires_ms).await
        })
    }

    fn provider_by_token<'a>(
        &'a self,
        token_hash: &'a str,
    ) -> StoreFuture<'a, Option<ProviderRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            credentials::provider_by_token(&c, token_hash).await
        })
    }

    fn providers(&self) -> StoreFuture<'_, Vec<ProviderRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            credentials::providers(&c).await
        })
    }

    fn insert_agent<'a>(
        &'a self,
        a: &'a AgentRecord,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.client().await?;
            credentials::insert_agent(&mut c, a, credential_hash).await
        })
    }

    fn reenroll<'a>(
        &'a self,
        provider: &'a str,
        enroll_key_hash: &'a str,
        enrolled_since_ms: i64,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut c = self.client().await?;
            let id = credentials::reenroll(
                &mut c,
                provider,
                enroll_key_hash,
                enrolled_since_ms,
                credential_hash,
            )
            .await?;
            if let Some(id) = &id {
                self.credentials.forget_agent(id);
            }
            Ok(id)
        })
    }

    fn agent_by_credential<'a>(
        &'a self,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, Option<CredentialOwner>> {
        Box::pin(async move {
            if let Some(agent_id) = self
                .credentials
                .get(credential_hash, std::time::Instant::now())
            {
                return Ok(Some(CredentialOwner {
                    agent_id,
                    revoked_ms: 0,
                    promoted: false,
                }));
            }
            // An entry's age counts from before the database was asked.
            let asked = std::time::Instant::now();
            let generation = self.credentials.begin();
            let c = self.client().await?;
            let owner = credentials::agent_by_credential(&c, credential_hash).await?;
            match (&owner, generation) {
                (Some(o), _) if o.promoted => self.credentials.forget_agent(&o.agent_id),
                (Some(o), Some(g)) if o.revoked_ms == 0 => {
                    self.credentials
                        .keep(g, credential_hash, &o.agent_id, asked)
                }
                _ => {}
            }
            Ok(owner)
        })
    }

    fn set_pending_credential<'a>(
        &'a self,
        agent_id: &'a str,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            credentials::set_pending_credential(&c, agent_id, credential_hash).await
        })
    }

    fn revoke_agent<'a>(&'a self, agent_id: &'a str, now: i64) -> StoreFuture<'a, Option<i64>> {
        Box::pin(async move {
            let c = self.client().await?;
            let revoked = credentials::revoke_agent(&c, agent_id, now).await;
            self.credentials.forget_agent(agent_id);
            revoked
        })
    }

    fn agent<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<AgentRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1");
            match query_opt(&c, &sql, &[&id]).await? {
                Some(r) => Ok(Some(agent_from_row(&r)?)),
                None => Ok(None),
            }
        })
    }

    fn agents<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Vec<AgentRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let sql = format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE $1 = '' OR provider = $1 ORDER BY id"
            );
            query(&c, &sql, &[&provider])
                .await?
                .iter()
                .map(agent_from_row)
                .collect()
        })
    }

    fn update_agent_info<'a>(
        &'a self,
        id: &'a str,
        hostname: &'a str,
        version: &'a str,
        transport: i32,
        reason: &'a str,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            execute(
                &c,
                "UPDATE agents SET hostname = $2, version = $3, transport = $4, transport_reason = $5,
                 last_seen_ms = $6 WHERE id = $1",
                &[&id, &hostname, &version, &transport, &reason, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn touch_agent<'a>(&'a self, id: &'a str, now: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            execute(
                &c,
                "UPDATE agents SET last_seen_ms = $2 WHERE id = $1",
                &[&id, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn enqueue<'a>(
        &'a self,
        agent_id: &'a str,
        id: &'a str,
        spec: &'a proto::CommandSpec,
        now: i64,
    ) -> StoreFuture<'a, Option<proto::Command>> {
        Box::pin(async move {
            let c = self.client().await?;
            enqueue_in(&c, agent_id, id, spec, now).await
        })
    }

    fn pending<'a>(
        &'a self,
        agent_id: &'a str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<proto::Command>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = query(
                &c,
                "SELECT id, seq, spec, created_ms FROM commands
                 WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[
                    &agent_id,
                    &(after as i64),
                    &(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id: String = r.try_get(0)?;
                let spec: proto::CommandSpec =
                    decode(r.try_get::<_, &[u8]>(2)?, || format!("command {id}"))?;
                out.push(proto::Command {
                    seq: r.try_get::<_, i64>(1)? as u64,
                    created_unix_ms: r.try_get(3)?,
                    spec: Some(spec),
                    id,
                });
            }
            Ok(out)
        })
    }

    fn ack<'a>(&'a self, agent_id: &'a str, ack: u64, now: i64) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            let new = ack as i64;
            // One statement for an ack within the seqs issued: move it
            // forward and mark the commands it covers accepted. Most acks
            // move nothing (every call repeats the agent's last one): then
            // the statement writes and locks nothing. The range starts at
            // the ack read before the move, which a racing ack may have
            // moved since: the range is then wider than needed, and a
            // command marked accepted keeps its first time.
            let Some(row) = query_opt(
                &c,
                "WITH before AS (
                     SELECT acked_seq, next_seq FROM agents WHERE id = $1
                 ), moved AS (
                     UPDATE agents SET acked_seq = $2
                     WHERE id = $1 AND acked_seq < $2 AND next_seq > $2 RETURNING 1
                 ), accepted AS (
                     UPDATE commands SET accepted_ms = $3
                     WHERE agent_id = $1 AND seq > (SELECT acked_seq FROM before)
                       AND seq <= $2 AND accepted_ms = 0 AND EXISTS (SELECT 1 FROM moved)
                 )
                 SELECT acked_seq, next_seq, EXISTS (SELECT 1 FROM moved) FROM before",
                &[&agent_id, &new, &now],
            )
            .await?
            else {
                return Ok(0);
            };
            let acked: i64 = row.try_get(0)?;
            let next: i64 = row.try_get(1)?;
            let moved: bool = row.try_get(2)?;
            if moved || (new > acked && new < next) {
                // Moved here, or by a racing ack at least as far.
                return Ok(ack);
            }
            if new <= acked {
                return Ok(acked as u64);
            }
            renumber_above(c, agent_id, new, now).await
        })
    }

    fn complete<'a>(
        &'a self,
        agent_id: &'a str,
        result: &'a proto::CommandResult,
        now: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            // One statement: of two racing results, the second waits for
            // the first's row lock and then finds the command done.
            let Some(row) = query_opt(
                &tx,
                "UPDATE commands SET done_ms = $3, result = $4,
                 accepted_ms = CASE WHEN accepted_ms = 0 THEN $3 ELSE accepted_ms END
                 WHERE id = $1 AND agent_id = $2 AND done_ms = 0
                 RETURNING spec",
                &[&result.command_id, &agent_id, &now, &result.encode_to_vec()],
            )
            .await?
            else {
                return Ok(false);
            };
            let mut spec: proto::CommandSpec = decode(row.try_get::<_, &[u8]>(0)?, || {
                format!("command {}", result.command_id)
            })?;
            if scrub_secrets(&mut spec) {
                execute(
                    &tx,
                    "UPDATE commands SET spec = $2 WHERE id = $1",
                    &[&result.command_id, &spec.encode_to_vec()],
                )
                .await?;
            }
            // Whoever waits for a result on another backend looks again.
            query(
                &tx,
                "SELECT pg_notify($1, $2)",
                &[&changes::DONE, &result.command_id],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn command<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<CommandRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let Some(r) = query_opt(
                &c,
                "SELECT agent_id, seq, spec, created_ms, accepted_ms, done_ms, result
                 FROM commands WHERE id = $1",
                &[&id],
            )
            .await?
            else {
                return Ok(None);
            };
            let spec: proto::CommandSpec =
                decode(r.try_get::<_, &[u8]>(2)?, || format!("command {id}"))?;
            let result = match r.try_get::<_, Option<&[u8]>>(6)? {
                Some(bytes) => Some(decode(bytes, || format!("command {id}"))?),
                None => None,
            };
            Ok(Some(CommandRecord {
                command: proto::Command {
                    id: id.to_string(),
                    seq: r.try_get::<_, i64>(1)? as u64,
                    created_unix_ms: r.try_get(3)?,
                    spec: Some(spec),
                },
                agent_id: r.try_get(0)?,
                accepted_ms: r.try_get(4)?,
                done_ms: r.try_get(5)?,
                result,
            }))
        })
    }

    fn advance_cursor<'a>(
        &'a self,
        agent_id: &'a str,
        stream: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            let n = execute(
                &c,
                "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (agent_id, stream, epoch) DO UPDATE SET seq = excluded.seq
                 WHERE excluded.seq > cursors.seq",
                &[&agent_id, &stream, &(epoch as i64), &(seq as i64)],
            )
            .await?;
            Ok(n == 1)
        })
    }

    fn cursor<'a>(
        &'a self,
        agent_id: &'a str,
        stream: &'a str,
        epoch: u64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            cursor_in(&c, agent_id, stream, epoch).await
        })
    }

    fn newest_epoch<'a>(&'a self, agent_id: &'a str, stream: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let c = self.client().await?;
            // Epochs are stored as their bits in a BIGINT: compare them as
            // u64. (Retention keeps few epochs per stream.)
            let rows = query(
                &c,
                "SELECT epoch FROM cursors WHERE agent_id = $1 AND stream = $2",
                &[&agent_id, &stream],
            )
            .await?;
            let mut newest = 0u64;
            for r in rows {
                newest = newest.max(r.try_get::<_, i64>(0)? as u64);
            }
            Ok(newest)
        })
    }

    fn metric_batch_state<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, BatchSeq> {
        Box::pin(async move {
            let c = self.client().await?;
            let watermark = cursor_in(&c, agent_id, METRIC_BATCHES, epoch).await?;
            metric_batch_state_in(&c, agent_id, epoch, seq, watermark).await
        })
    }

    fn record_metric_batch<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
        writer: Option<&'a str>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let epoch_bits = epoch as i64;
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            // The epoch's cursor exists from its first batch on (so
            // retention sees the epoch and its rows above the watermark),
            // and its row lock makes racing records of one epoch take
            // turns. (Dropped with the transaction when nothing is
            // recorded.)
            execute(
                &tx,
                "INSERT INTO cursors (agent_id, stream, epoch, seq) VALUES ($1, $2, $3, 0)
                 ON CONFLICT DO NOTHING",
                &[&agent_id, &METRIC_BATCHES, &epoch_bits],
            )
            .await?;
            let watermark = query_one(
                &tx,
                "SELECT seq FROM cursors WHERE agent_id = $1 AND stream = $2 AND epoch = $3
                 FOR UPDATE",
                &[&agent_id, &METRIC_BATCHES, &epoch_bits],
            )
            .await?
            .try_get::<_, i64>(0)? as u64;
            if metric_batch_state_in(&tx, agent_id, epoch, seq, watermark).await? != BatchSeq::New {
                return Ok(false);
            }
            if seq == watermark + 1 {
                // Absorb the seqs stored above the old watermark that are
                // now contiguous with it.
                let rows = query(
                    &tx,
                    "SELECT seq FROM metric_batches_above
                     WHERE agent_id = $1 AND epoch = $2 AND seq > $3 ORDER BY seq",
                    &[&agent_id, &epoch_bits, &(seq as i64)],
                )
                .await?;
                let mut top = seq;
                for r in rows {
                    let s = r.try_get::<_, i64>(0)? as u64;
                    if s != top + 1 {
                        break;
                    }
                    top = s;
                }
                if top > seq {
                    execute(
                        &tx,
                        "DELETE FROM metric_batches_above
                         WHERE agent_id = $1 AND epoch = $2 AND seq <= $3",
                        &[&agent_id, &epoch_bits, &(top as i64)],
                    )
                    .await?;
                }
                execute(
                    &tx,
                    "UPDATE cursors SET seq = $4 WHERE agent_id = $1 AND stream = $2 AND epoch = $3",
                    &[&agent_id, &METRIC_BATCHES, &epoch_bits, &(top as i64)],
                )
                .await?;
            } else {
                execute(
                    &tx,
                    "INSERT INTO metric_batches_above (agent_id, epoch, seq) VALUES ($1, $2, $3)",
                    &[&agent_id, &epoch_bits, &(seq as i64)],
                )
                .await?;
            }
            if let Some(writer) = writer {
                execute(
                    &tx,
                    "INSERT INTO metric_batch_writers (agent_id, epoch, seq, writer, recorded_ms)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[
                        &agent_id,
                        &epoch_bits,
                        &(seq as i64),
                        &writer,
                        &crate::now_unix_ms(),
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    fn metric_batch_writer<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let c = self.client().await?;
            let row = query_opt(
                &c,
                "SELECT writer FROM metric_batch_writers WHERE agent_id = $1 AND epoch = $2 AND seq = $3",
                &[&agent_id, &(epoch as i64), &(seq as i64)],
            )
            .await?;
            Ok(match row {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            })
        })
    }

    fn metric_batches<'a>(&'a self, agent_id: &'a str, epoch: u64) -> StoreFuture<'a, (u64, u64)> {
        Box::pin(async move {
            let c = self.client().await?;
            let watermark = cursor_in(&c, agent_id, METRIC_BATCHES, epoch).await?;
            let above: i64 = query_one(
                &c,
                "SELECT COUNT(*) FROM metric_batches_above WHERE agent_id = $1 AND epoch = $2",
                &[&agent_id, &(epoch as i64)],
            )
            .await?
            .try_get(0)?;
            Ok((watermark, above as u64))
        })
    }

    fn container_event<'a>(
        &'a self,
        agent_id: &'a str,
        ev: &'a proto::ContainerEvent,
        now: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            let n = execute(
                &c,
                "INSERT INTO container_events (agent_id, container_id, kind, time_ms, event)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[
                    &agent_id,
                    &ev.container_id,
                    &ev.kind,
                    &now,
                    &ev.encode_to_vec(),
                ],
            )
            .await?;
            Ok(n == 1)
        })
    }

    fn container_events<'a>(
        &'a self,
        agent_id: &'a str,
    ) -> StoreFuture<'a, Vec<proto::ContainerEvent>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = query(
                &c,
                "SELECT event FROM container_events WHERE agent_id = $1 ORDER BY time_ms, id",
                &[&agent_id],
            )
            .await?;
            rows.iter()
                .map(|r| {
                    decode(r.try_get::<_, &[u8]>(0)?, || {
                        format!("container event of {agent_id}")
                    })
                })
                .collect()
        })
    }

    fn pending_counts<'a>(
        &'a self,
        provider: &'a str,
    ) -> StoreFuture<'a, std::collections::HashMap<String, u64>> {
        Box::pin(async move {
            let c = self.client().await?;
            // Per agent, a range of its (agent_id, seq) index.
            let rows = query(
                &c,
                "SELECT id, (SELECT COUNT(*) FROM commands WHERE agent_id = agents.id AND seq > agents.acked_seq)
                 FROM agents WHERE $1 = '' OR provider = $1",
                &[&provider],
            )
            .await?;
            let mut counts = std::collections::HashMap::new();
            for r in rows {
                let n: i64 = r.try_get(1)?;
                if n > 0 {
                    counts.insert(r.try_get::<_, String>(0)?, n as u64);
                }
            }
            Ok(counts)
        })
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunRecord,
        containers: &'a [NewContainer],
    ) -> StoreFuture<'a, Option<Vec<(String, proto::Command)>>> {
        Box::pin(async move {
            let mut c = self.client().await?;
            runs::create_run(&mut c, run, containers).await
        })
    }

    fn run<'a>(
        &'a self,
        id_or_name: &'a str,
    ) -> StoreFuture<'a, Option<(RunRecord, Vec<RunContainerRecord>)>> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::run(&c, id_or_name).await
        })
    }

    fn runs<'a>(
        &'a self,
        provider: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(RunRecord, Vec<RunContainerRecord>)>> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::runs(&c, provider, limit).await
        })
    }

    fn run_name_in_use<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::run_name_in_use(&c, name).await
        })
    }

    fn run_command<'a>(
        &'a self,
        command_id: &'a str,
    ) -> StoreFuture<'a, Option<(String, u32, Role)>> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::run_command(&c, command_id).await
        })
    }

    fn change_container<'a>(
        &'a self,
        run_id: &'a str,
        index: u32,
        now: i64,
        change: &'a mut ContainerChange<'a>,
    ) -> StoreFuture<'a, Option<(RunContainerRecord, Option<proto::Command>)>> {
        Box::pin(async move {
            let mut c = self.client().await?;
            runs::change_container(&mut c, run_id, index, now, change).await
        })
    }

    fn stop_run<'a>(&'a self, run_id: &'a str, now: i64, timeout_s: u32) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::stop_run(&c, run_id, now, timeout_s).await
        })
    }

    fn live_run_containers(&self) -> StoreFuture<'_, Vec<LiveContainer>> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::live_run_containers(&c).await
        })
    }

    fn set_capacity<'a>(
        &'a self,
        agent_id: &'a str,
        capacity: &'a proto::Capacity,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::set_capacity(&c, agent_id, capacity, now).await
        })
    }

    fn capacities(&self) -> StoreFuture<'_, HashMap<String, (proto::Capacity, i64)>> {
        Box::pin(async move {
            let c = self.client().await?;
            runs::capacities(&c).await
        })
    }

    fn changes(&self) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        let (config, shown) = self.feed.lock().ok()?.take()?;
        Some(changes::spawn(config, shown, self.credentials.clone()))
    }

    fn shares_presence(&self) -> bool {
        true
    }

    fn publish_presence<'a>(
        &'a self,
        replica: &'a str,
        rows: &'a [PresenceRecord],
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            execute(
                &tx,
                "INSERT INTO replicas (id, beat_ms) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET beat_ms = excluded.beat_ms",
                &[&replica, &now],
            )
            .await?;
            for r in rows {
                execute(
                    &tx,
                    "INSERT INTO presence (agent_id, replica, connected, transport, reason, seen_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (agent_id) DO UPDATE SET replica = excluded.replica,
                       connected = excluded.connected, transport = excluded.transport,
                       reason = excluded.reason, seen_ms = excluded.seen_ms
                     WHERE excluded.connected OR presence.replica = excluded.replica",
                    &[
                        &r.agent_id,
                        &replica,
                        &r.connected,
                        &r.transport,
                        &r.reason,
                        &r.seen_ms,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn presences(&self, alive_since_ms: i64) -> StoreFuture<'_, HashMap<String, PresenceRecord>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = query(
                &c,
                "SELECT p.agent_id, p.replica, p.connected, p.transport, p.reason, p.seen_ms
                 FROM presence p JOIN replicas r ON r.id = p.replica
                 WHERE r.beat_ms >= $1",
                &[&alive_since_ms],
            )
            .await?;
            let mut out = HashMap::new();
            for r in rows {
                let p = PresenceRecord {
                    agent_id: r.try_get(0)?,
                    replica: r.try_get(1)?,
                    connected: r.try_get(2)?,
                    transport: r.try_get(3)?,
                    reason: r.try_get(4)?,
                    seen_ms: r.try_get(5)?,
                };
                out.insert(p.agent_id.clone(), p);
            }
            Ok(out)
        })
    }

    fn prune<'a>(&'a self, retention: &'a Retention) -> StoreFuture<'a, Pruned> {
        Box::pin(async move {
            let mut c = self.client().await?;
            retention::prune(&mut c, retention).await
        })
    }
}

#[cfg(test)]
mod tests;
