//! The backend's durable store, behind one seam: [`Store`], the operations
//! [`Core`](super::Core) and the runs use, with the semantics each must
//! keep. Two stores implement it: [`SqliteStore`] (one SQLite file,
//! `DATA_DIR/uplink.db`, the default) and [`PostgresStore`] (a PostgreSQL
//! database, `--database postgres://...`, which several backends may
//! share). `Core` holds an `Arc<dyn Store>` and does not know which; both
//! pass the one suite of tests in `suite.rs`.
//!
//! It holds what must survive a restart: the admin token's hash, providers
//! and their enrollment tokens' hashes, agents with their credentials'
//! hashes and ack state, per-agent command queues, the cursors that
//! deduplicate agent events, the dedup state of metric batches, each
//! agent's last reported capacity, and runs with their containers
//! ([`runs`]). Presence (who is connected right now) lives in memory, in
//! the backend's hub; a store that several backends share also carries
//! what each publishes of it ([`Store::publish_presence`]) and their
//! changes to one another ([`Store::changes`]).
//!
//! # Why the trait is asynchronous
//!
//! A networked store's client (PostgreSQL's) is async, so every method
//! returns a [`StoreFuture`]: a boxed, `Send` future, which keeps the trait
//! usable as `dyn Store` (a trait with an `async fn` is not). `Core` awaits
//! each call where it makes it; a second store brings its own futures and
//! `Core` does not change.
//!
//! [`SqliteStore`] does its work when the method is called and returns a
//! ready future holding the outcome: reads inline on a reader connection
//! that never waits for the writer, writes under the writer's mutex inside
//! `block_in_place` (a write can wait for seconds on a slow disk or the
//! write lock; the runtime's other tasks go on meanwhile). So SQLite's
//! behaviour and cost are those of plain synchronous calls (plus one small
//! allocation per call for the box), and no lock is held across an await.
//!
//! A store's errors are its own: [`StoreError::Backend`] carries them with
//! the store's name, so a second store adds no variant that `Core` sees.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use crate::proto;

mod postgres;
pub mod runs;
mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

pub use postgres::{DatabaseUrl, PostgresStore};
pub use runs::{FollowUp, LiveContainer, NewContainer, Role, RunContainerRecord, RunRecord};
pub use sqlite::{CHECKPOINT_EVERY, SqliteStore};

/// What replaces a secret in a finished command's stored spec.
pub const SCRUBBED: &str = "[scrubbed]";

/// Replaces the secrets of a command spec (a pull's registry password, a
/// container's environment values) with [`SCRUBBED`]: a store keeps a
/// finished command's spec only in this form, so the secrets it carried
/// are not readable in the store once the agent no longer needs them.
/// Names (of variables, of the registry user) stay, so an operator can
/// still see what was asked. True when anything was replaced.
pub fn scrub_secrets(spec: &mut proto::CommandSpec) -> bool {
    use proto::command_spec::Kind;
    let mut changed = false;
    let mut scrub = |v: &mut String| {
        if !v.is_empty() && v != SCRUBBED {
            *v = SCRUBBED.to_string();
            changed = true;
        }
    };
    match &mut spec.kind {
        Some(Kind::PullImage(p)) => {
            if let Some(a) = &mut p.auth {
                scrub(&mut a.password);
            }
        }
        Some(Kind::RunContainer(r)) => r.env.values_mut().for_each(scrub),
        _ => {}
    }
    changed
}

/// What every [`Store`] method returns: the future of its outcome, boxed
/// so the trait stays usable as `dyn Store`, and `Send` so `Core`'s
/// futures can move between the runtime's workers. It may borrow the
/// method's arguments.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// How [`Store::change_container`] edits a container: called once with the
/// run and the container, it may ask for a command to queue.
pub type ContainerChange<'a> =
    dyn FnMut(&RunRecord, &mut RunContainerRecord) -> Option<FollowUp> + Send + 'a;

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's database failed (an SQL error, a lost connection):
    /// `store` names the store, `source` is its client's error.
    #[error("{store} database: {source}")]
    Backend {
        store: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store's database cannot answer now (unreachable, restarting,
    /// busy past the wait, out of space): the call may work when retried.
    /// Callers answer UNAVAILABLE.
    #[error("{store} database unavailable: {source}")]
    Unavailable {
        store: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("stored record {what} is corrupt: {source}")]
    Corrupt {
        what: String,
        source: prost::DecodeError,
    },
    #[error("the store's lock was poisoned by a crashed thread")]
    Poisoned,
    #[error(
        "the store's schema is version {found}, newer than this backend's {known}: run a newer uplink"
    )]
    Version { found: i64, known: i64 },
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
    /// When the agent was revoked (0: it is not).
    pub revoked_ms: i64,
    /// The hash of its enrollment's idempotency key, written by
    /// [`Store::insert_agent`] (None: enrolled without one). Reads leave it
    /// None.
    pub enroll_key_hash: Option<String>,
}

/// The agent a credential belongs to, see [`Store::agent_by_credential`].
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialOwner {
    pub agent_id: String,
    /// When the agent was revoked (0: it is not).
    pub revoked_ms: i64,
    /// True when this lookup made the credential the agent's current one
    /// (its first use after [`Store::set_pending_credential`]).
    pub promoted: bool,
}

/// A provider as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderRecord {
    pub name: String,
    pub created_ms: i64,
    /// Agents enrolled with the provider, with any of its tokens.
    pub agents: u32,
    /// How many agents the current enrollment token may enroll (0: no cap).
    pub max_agents: u32,
    /// When the current enrollment token stops enrolling (0: never).
    pub expires_ms: i64,
    /// Agents the current enrollment token enrolled.
    pub token_enrolled: u32,
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

/// How long a store that backends share keeps a metric batch's writer
/// ([`Store::metric_batch_writer`]): 7 days.
pub const WRITERS_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;

/// How far above its `(agent, epoch)`'s watermark a metric batch's seq may
/// be. Seqs stored above the watermark are kept one row each until the
/// gap below them fills, so this bounds those rows per `(agent, epoch)`.
pub const METRIC_SEQ_WINDOW: u64 = 100_000;

/// What [`Store::prune`] deletes: times are milliseconds since the Unix
/// epoch; anything older than its cutoff may go, but never what delivery
/// still needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// Finished commands (with their results) done before this, whose seq
    /// the agent acknowledged.
    pub commands_before_ms: i64,
    /// Runs created before this whose every container failed to start or
    /// was removed, with no stop or remove in flight.
    pub runs_before_ms: i64,
    /// Container events recorded before this.
    pub container_events_before_ms: i64,
    /// Container events kept per agent at most (the newest).
    pub container_events_per_agent: u64,
    /// Epochs whose cursors are kept per `(agent, stream)`: the newest,
    /// by when their cursor was made. An older epoch is superseded: a
    /// replay of it (an agent restarted that many times with events or
    /// batches of it still unsent) is taken as new.
    pub epochs_kept: u64,
}

/// How many rows [`Store::prune`] deleted, by table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pruned {
    pub commands: u64,
    pub runs: u64,
    pub container_events: u64,
    /// Cursors and the metric batch seqs stored above their watermark.
    pub cursors: u64,
}

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

/// The operations of a durable store, with the semantics every
/// implementation must keep. Times are milliseconds since the Unix epoch,
/// given by the caller. Each method is atomic: it either happens whole or
/// not at all, also across a crash of the backend or a future dropped
/// before it completes, and once its future yields `Ok` its change
/// survives a restart. Callers await each future where they make the call
/// and hold no lock across it.
pub trait Store: Send + Sync {
    /// A value of the key/value table (the admin token's hash lives there).
    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Sets (inserts or replaces) a value of the key/value table.
    fn set_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()>;

    /// Creates a provider with its enrollment token's hash; false, and
    /// nothing changed, when the name is taken. Token hashes are unique
    /// across providers.
    fn create_provider<'a>(
        &'a self,
        name: &'a str,
        token_hash: &'a str,
        now: i64,
    ) -> StoreFuture<'a, bool>;

    /// Replaces a provider's token hash (the old token is revoked at once),
    /// with no limits and no agents enrolled by it yet; false when there is
    /// no such provider.
    fn set_provider_token<'a>(
        &'a self,
        name: &'a str,
        token_hash: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// Sets the limits of a provider's current enrollment token: how many
    /// agents it may enroll (0: no cap) and when it stops (0: never); false
    /// when there is no such provider.
    fn set_token_limits<'a>(
        &'a self,
        name: &'a str,
        max_agents: u32,
        expires_ms: i64,
    ) -> StoreFuture<'a, bool>;

    /// The provider whose current enrollment token hashes to `token_hash`,
    /// with that token's limits and count.
    fn provider_by_token<'a>(
        &'a self,
        token_hash: &'a str,
    ) -> StoreFuture<'a, Option<ProviderRecord>>;

    /// Every provider with its agent count, ordered by name.
    fn providers(&self) -> StoreFuture<'_, Vec<ProviderRecord>>;

    /// Stores a newly enrolled agent: its ack is 0, its next seq 1, and it
    /// was last seen when it enrolled; it counts against the provider's
    /// current token. False, and nothing stored, when that token has
    /// enrolled its `max_agents` already (checked and counted atomically, so
    /// racing enrollments cannot pass the cap together). Credential hashes
    /// are unique; the provider must exist. Stores the agent's enrollment idempotency key hash as well, when
    /// set; two agents of one provider never share one.
    fn insert_agent<'a>(
        &'a self,
        a: &'a AgentRecord,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// An enrollment retried with the idempotency key of an earlier one:
    /// the agent of `provider` enrolled with `enroll_key_hash` at or after
    /// `enrolled_since_ms` and not revoked gets `credential_hash` as its
    /// current credential (the one before and any pending one stop
    /// working). Its id, or None when there is no such agent; then the key
    /// is taken from the provider's older or revoked agent that had it, so
    /// that a new agent may be inserted with it.
    fn reenroll<'a>(
        &'a self,
        provider: &'a str,
        enroll_key_hash: &'a str,
        enrolled_since_ms: i64,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, Option<String>>;

    /// The agent whose current or pending credential hashes to
    /// `credential_hash`, revoked or not (the caller refuses a revoked
    /// one). The first lookup of a pending credential makes it the
    /// current one and forgets the one before, atomically.
    fn agent_by_credential<'a>(
        &'a self,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, Option<CredentialOwner>>;

    /// Gives an agent a pending credential beside its current one (replacing
    /// an earlier pending one): both are accepted until the pending one is
    /// first used. False when the agent does not exist or is revoked.
    fn set_pending_credential<'a>(
        &'a self,
        agent_id: &'a str,
        credential_hash: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// Revokes an agent for good: from then on its credentials are refused
    /// by every backend that shares this store. Returns when it was revoked
    /// (the first revocation's time when repeated); None when there is no
    /// such agent.
    fn revoke_agent<'a>(&'a self, agent_id: &'a str, now: i64) -> StoreFuture<'a, Option<i64>>;

    /// One agent.
    fn agent<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<AgentRecord>>;

    /// Every agent (of `provider`, when not empty), ordered by id.
    fn agents<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Vec<AgentRecord>>;

    /// Records what an agent said about itself and how it connects, and
    /// that it was seen at `now`.
    fn update_agent_info<'a>(
        &'a self,
        id: &'a str,
        hostname: &'a str,
        version: &'a str,
        transport: i32,
        reason: &'a str,
        now: i64,
    ) -> StoreFuture<'a, ()>;

    /// Records when the backend last heard from an agent.
    fn touch_agent<'a>(&'a self, id: &'a str, now: i64) -> StoreFuture<'a, ()>;

    /// Queues a command for `agent_id` and gives it the agent's next seq:
    /// seqs are per agent, start at 1 and have no gaps (the agent's journal
    /// relies on it), even when enqueues race. None, and nothing stored,
    /// when the agent does not exist.
    fn enqueue<'a>(
        &'a self,
        agent_id: &'a str,
        id: &'a str,
        spec: &'a proto::CommandSpec,
        now: i64,
    ) -> StoreFuture<'a, Option<proto::Command>>;

    /// Commands of `agent_id` with seq above `after`, in seq order, at most
    /// `limit`.
    fn pending<'a>(
        &'a self,
        agent_id: &'a str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<proto::Command>>;

    /// Applies an agent's ack: the highest contiguous seq it durably
    /// accepted. The ack never goes backwards (a lower ack leaves it as it
    /// is); the commands it newly covers are marked accepted at `now`.
    /// Returns the agent's ack after the update (0 for an unknown agent).
    ///
    /// An ack above the last issued seq means the store lost commits (a
    /// power loss, or a data dir restored from an older copy): the store
    /// takes the agent's word, and numbering continues above its ack, so no
    /// new command is mistaken for a duplicate. (Commands queued after the
    /// loss and before the agent reconnected may reuse seqs the agent saw;
    /// the agent answers those with a failure that says so.)
    fn ack<'a>(&'a self, agent_id: &'a str, ack: u64, now: i64) -> StoreFuture<'a, u64>;

    /// Stores a command's result, exactly once: true only for the first
    /// result of a command that exists and belongs to `agent_id`; false,
    /// and nothing changed, for an unknown command, another agent's, or one
    /// already done. A command done without an ack counts as accepted at
    /// `now` too. The secrets of its spec (registry passwords, environment
    /// values) are scrubbed in the same change, see [`scrub_secrets`].
    fn complete<'a>(
        &'a self,
        agent_id: &'a str,
        result: &'a proto::CommandResult,
        now: i64,
    ) -> StoreFuture<'a, bool>;

    /// One command, with its state and result.
    fn command<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<CommandRecord>>;

    /// Advances the dedup cursor of `(agent, stream, epoch)` to `seq` when
    /// `seq` is above it; a cursor never goes backwards. Returns true when
    /// `seq` was new.
    fn advance_cursor<'a>(
        &'a self,
        agent_id: &'a str,
        stream: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, bool>;

    /// The dedup cursor of `(agent, stream, epoch)` (0 when none).
    fn cursor<'a>(&'a self, agent_id: &'a str, stream: &'a str, epoch: u64)
    -> StoreFuture<'a, u64>;

    /// The highest epoch (compared as unsigned) with a cursor of `(agent,
    /// stream)`, 0 when none: the agent's newest stream of events, against
    /// which an older epoch is refused.
    fn newest_epoch<'a>(&'a self, agent_id: &'a str, stream: &'a str) -> StoreFuture<'a, u64>;

    /// Where metric batch `seq` of `(agent_id, epoch)` stands: new, a
    /// duplicate of a stored one, or too far ahead of the watermark.
    ///
    /// The dedup state of an `(agent, epoch)` is a contiguous watermark `W`
    /// (every seq in `1..=W` was stored) and the set of seqs above `W` that
    /// were stored. So batches may arrive in any order and each is stored
    /// once; agents and epochs are independent of each other and of the
    /// event cursors.
    fn metric_batch_state<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, BatchSeq>;

    /// Records metric batch `seq` of `(agent_id, epoch)` as stored, and
    /// moves the watermark over every contiguous seq above it (forgetting
    /// them one by one: the set above the watermark holds only what is
    /// above a gap). Returns false, and changes nothing, when the seq was
    /// recorded before or is too far ahead (see [`BatchSeq`]); so of two
    /// racing records of one seq, one wins.
    ///
    /// `writer`: the JSON-lines writer of the backend that wrote the batch
    /// (a batch its agent sent again), kept with the record in a store that
    /// backends share, for [`Store::metric_batch_writer`].
    fn record_metric_batch<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
        writer: Option<&'a str>,
    ) -> StoreFuture<'a, bool>;

    /// The writer a recorded batch was recorded with, for [`WRITERS_KEPT_MS`]
    /// after; None when recorded without one, not recorded, or in a store
    /// one backend holds alone. A backend that wrote a batch and was killed
    /// before recording it learns so, at its next start, that another
    /// backend wrote it too.
    fn metric_batch_writer<'a>(
        &'a self,
        agent_id: &'a str,
        epoch: u64,
        seq: u64,
    ) -> StoreFuture<'a, Option<String>> {
        let _ = (agent_id, epoch, seq);
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The dedup state of `(agent_id, epoch)`'s metric batches: the
    /// contiguous watermark and how many seqs above it are stored.
    fn metric_batches<'a>(&'a self, agent_id: &'a str, epoch: u64) -> StoreFuture<'a, (u64, u64)>;

    /// Records a container event an agent reported; false when the same
    /// kind of event of the same container was recorded before.
    fn container_event<'a>(
        &'a self,
        agent_id: &'a str,
        ev: &'a proto::ContainerEvent,
        now: i64,
    ) -> StoreFuture<'a, bool>;

    /// The container events of `agent_id`, oldest first (in the order
    /// recorded when times are equal).
    fn container_events<'a>(
        &'a self,
        agent_id: &'a str,
    ) -> StoreFuture<'a, Vec<proto::ContainerEvent>>;

    /// The number of commands above its ack of every agent (of
    /// `provider`, when not empty) that has any, in one read.
    fn pending_counts<'a>(
        &'a self,
        provider: &'a str,
    ) -> StoreFuture<'a, std::collections::HashMap<String, u64>>;

    /// Stores a run with its containers and queues their start commands
    /// (each with its agent's next seq, as [`Store::enqueue`]), all or
    /// nothing. Returns the queued commands by agent; None, and nothing
    /// stored, when one of the agents does not exist.
    fn create_run<'a>(
        &'a self,
        run: &'a RunRecord,
        containers: &'a [NewContainer],
    ) -> StoreFuture<'a, Option<Vec<(String, proto::Command)>>>;

    /// A run by id, or else the newest run of that name, with its
    /// containers by index.
    fn run<'a>(
        &'a self,
        id_or_name: &'a str,
    ) -> StoreFuture<'a, Option<(RunRecord, Vec<RunContainerRecord>)>>;

    /// The newest `limit` runs (of `provider`, when not empty), newest
    /// first, each with its containers by index.
    fn runs<'a>(
        &'a self,
        provider: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(RunRecord, Vec<RunContainerRecord>)>>;

    /// True when a run of this name still has a container that is not
    /// removed and did not fail to start (its container names are taken).
    fn run_name_in_use<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool>;

    /// The run container a command belongs to, and its role.
    fn run_command<'a>(
        &'a self,
        command_id: &'a str,
    ) -> StoreFuture<'a, Option<(String, u32, Role)>>;

    /// Changes one container of a run, all or nothing: `change` (called
    /// once) sees the run and the container, edits the container, and may
    /// ask for a command to queue for the container's agent (with the
    /// agent's next seq, recorded as the container's pending command and as
    /// the run's command in its role). Returns the container after the
    /// change and the queued command; None when there is no such container.
    /// Two changes of one container never interleave.
    fn change_container<'a>(
        &'a self,
        run_id: &'a str,
        index: u32,
        now: i64,
        change: &'a mut ContainerChange<'a>,
    ) -> StoreFuture<'a, Option<(RunContainerRecord, Option<proto::Command>)>>;

    /// Records that a stop of the run was asked (the time of the first ask
    /// only) and the grace each container gets.
    fn stop_run<'a>(&'a self, run_id: &'a str, now: i64, timeout_s: u32) -> StoreFuture<'a, ()>;

    /// Run containers that are queued or running, with the limits of their
    /// run.
    fn live_run_containers(&self) -> StoreFuture<'_, Vec<LiveContainer>>;

    /// Stores an agent's capacity report, replacing the one before.
    fn set_capacity<'a>(
        &'a self,
        agent_id: &'a str,
        capacity: &'a proto::Capacity,
        now: i64,
    ) -> StoreFuture<'a, ()>;

    /// Every agent's last capacity report, with when it arrived.
    fn capacities(&self) -> StoreFuture<'_, HashMap<String, (proto::Capacity, i64)>>;

    /// Deletes what `retention` lets go, and nothing delivery still needs:
    /// commands not finished or not acknowledged, runs with a container
    /// that may still exist on a host, the newest epochs' cursors (so the
    /// current epoch's).
    fn prune<'a>(&'a self, retention: &'a Retention) -> StoreFuture<'a, Pruned>;

    /// The changes other backends sharing this store make that this one's
    /// streams, held polls and waiting calls must hear of at once (a
    /// command queued for an agent connected here, a result stored, an
    /// agent revoked), as they commit: taken
    /// once, by the backend at start. None for a store that one backend
    /// holds alone (SQLite), where every change is made here.
    fn changes(&self) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        None
    }

    /// True when several backends share this store, so each publishes its
    /// agents' presence in it ([`Store::publish_presence`]); false for a
    /// store one backend holds alone, whose hub knows every connection.
    fn shares_presence(&self) -> bool {
        false
    }

    /// Publishes what backend `replica` knows of its agents' connections
    /// and that it is alive at `now`. A row replaces the agent's row when
    /// it says connected, or when the agent's row is `replica`'s own (so a
    /// backend the agent left never overwrites the one it went to).
    fn publish_presence<'a>(
        &'a self,
        replica: &'a str,
        rows: &'a [PresenceRecord],
        now: i64,
    ) -> StoreFuture<'a, ()> {
        let _ = (replica, rows, now);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Every agent's published presence whose backend said it was alive
    /// at or after `alive_since_ms`, by agent id.
    fn presences(&self, alive_since_ms: i64) -> StoreFuture<'_, HashMap<String, PresenceRecord>> {
        let _ = alive_since_ms;
        Box::pin(std::future::ready(Ok(HashMap::new())))
    }
}

/// Which backend holds an agent's connection, as that backend published
/// it (see [`Store::publish_presence`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresenceRecord {
    pub agent_id: String,
    /// The backend that published it.
    pub replica: String,
    /// A stream or a poll is open there, or a long-polling agent was heard
    /// from within the poll grace.
    pub connected: bool,
    /// The rung (a `Transport`), and why.
    pub transport: i32,
    pub reason: String,
    /// When that backend last heard from the agent.
    pub seen_ms: i64,
}

/// A change made through another backend sharing the store (see
/// [`Store::changes`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A command was queued for `agent` with `seq`: `command`, when the
    /// notice carried it.
    Queued {
        agent: String,
        seq: u64,
        command: Option<Box<proto::Command>>,
    },
    /// `agent` was revoked.
    Revoked { agent: String },
    /// The result of `command` was stored.
    Done { command: String },
    /// Changes may have been missed (the store's feed was cut and is back):
    /// every stream and held poll looks at the store again.
    Missed,
}
