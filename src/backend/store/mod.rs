//! The backend's durable store, behind one seam: [`Store`], the operations
//! [`Core`](super::Core) and the runs use, with the semantics each must
//! keep; [`SqliteStore`] (one SQLite file, `DATA_DIR/uplink.db`) is the
//! one implementation today. `Core` holds an `Arc<dyn Store>`, so a second
//! store (PostgreSQL, for a highly available backend) is a new module here
//! that implements the trait and passes the tests of `suite.rs`, without a
//! change to `Core`.
//!
//! It holds what must survive a restart: the admin token's hash, providers
//! and their enrollment tokens' hashes, agents with their credentials'
//! hashes and ack state, per-agent command queues, the cursors that
//! deduplicate agent events, the dedup state of metric batches, each
//! agent's last reported capacity, and runs with their containers
//! ([`runs`]). Presence (who is connected right now) lives in memory, in
//! the backend's hub.
//!
//! # Why the trait is synchronous
//!
//! Every call is short (well under a millisecond on SQLite) and runs
//! inline on the async worker that serves the request, behind one mutex
//! that is never held across an `.await`. A synchronous trait keeps exactly
//! that: the same calls, at the same places, with the same cost, and the
//! same tests (`tests/` reach the store through `core.store()`). An async
//! trait would turn every `Core` method that touches the store into an
//! `async fn` and every SQLite call into a boxed future or a hop to a
//! blocking thread, for no gain until a networked store exists. When
//! PostgreSQL arrives, its client is async: the trait then becomes async
//! (methods returning `Pin<Box<dyn Future + Send>>`), `SqliteStore` wraps
//! its bodies in ready futures so its behaviour does not change, and the
//! call sites in `Core` gain an `.await`; the semantics written here, and
//! the suite that checks them, stay as they are.

use std::collections::HashMap;

use crate::proto;

pub mod runs;
mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

pub use runs::{FollowUp, LiveContainer, NewContainer, Role, RunContainerRecord, RunRecord};
pub use sqlite::{CHECKPOINT_EVERY, SqliteStore};

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

/// The operations of a durable store, with the semantics every
/// implementation must keep. Times are milliseconds since the Unix epoch,
/// given by the caller. Each method is atomic: it either happens whole or
/// not at all, also across a crash of the backend, and once it returns
/// `Ok` its change survives a restart.
pub trait Store: Send + Sync {
    /// A value of the key/value table (the admin token's hash lives there).
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Sets (inserts or replaces) a value of the key/value table.
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Creates a provider with its enrollment token's hash; false, and
    /// nothing changed, when the name is taken. Token hashes are unique
    /// across providers.
    fn create_provider(&self, name: &str, token_hash: &str, now: i64) -> Result<bool, StoreError>;

    /// Replaces a provider's token hash (the old token is revoked at once);
    /// false when there is no such provider.
    fn set_provider_token(&self, name: &str, token_hash: &str) -> Result<bool, StoreError>;

    /// The provider whose current enrollment token hashes to `token_hash`.
    fn provider_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError>;

    /// Every provider with its agent count, ordered by name.
    fn providers(&self) -> Result<Vec<ProviderRecord>, StoreError>;

    /// Stores a newly enrolled agent: its ack is 0, its next seq 1, and it
    /// was last seen when it enrolled. Credential hashes are unique; the
    /// provider must exist.
    fn insert_agent(&self, a: &AgentRecord, credential_hash: &str) -> Result<(), StoreError>;

    /// The agent whose credential hashes to `credential_hash`.
    fn agent_by_credential(&self, credential_hash: &str) -> Result<Option<String>, StoreError>;

    /// One agent.
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;

    /// Every agent (of `provider`, when not empty), ordered by id.
    fn agents(&self, provider: &str) -> Result<Vec<AgentRecord>, StoreError>;

    /// Records what an agent said about itself and how it connects, and
    /// that it was seen at `now`.
    fn update_agent_info(
        &self,
        id: &str,
        hostname: &str,
        version: &str,
        transport: i32,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Records when the backend last heard from an agent.
    fn touch_agent(&self, id: &str, now: i64) -> Result<(), StoreError>;

    /// Queues a command for `agent_id` and gives it the agent's next seq:
    /// seqs are per agent, start at 1 and have no gaps (the agent's journal
    /// relies on it), even when enqueues race. None, and nothing stored,
    /// when the agent does not exist.
    fn enqueue(
        &self,
        agent_id: &str,
        id: &str,
        spec: &proto::CommandSpec,
        now: i64,
    ) -> Result<Option<proto::Command>, StoreError>;

    /// Commands of `agent_id` with seq above `after`, in seq order, at most
    /// `limit`.
    fn pending(
        &self,
        agent_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<proto::Command>, StoreError>;

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
    fn ack(&self, agent_id: &str, ack: u64, now: i64) -> Result<u64, StoreError>;

    /// Stores a command's result, exactly once: true only for the first
    /// result of a command that exists and belongs to `agent_id`; false,
    /// and nothing changed, for an unknown command, another agent's, or one
    /// already done. A command done without an ack counts as accepted at
    /// `now` too.
    fn complete(
        &self,
        agent_id: &str,
        result: &proto::CommandResult,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// One command, with its state and result.
    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError>;

    /// Advances the dedup cursor of `(agent, stream, epoch)` to `seq` when
    /// `seq` is above it; a cursor never goes backwards. Returns true when
    /// `seq` was new.
    fn advance_cursor(
        &self,
        agent_id: &str,
        stream: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<bool, StoreError>;

    /// The dedup cursor of `(agent, stream, epoch)` (0 when none).
    fn cursor(&self, agent_id: &str, stream: &str, epoch: u64) -> Result<u64, StoreError>;

    /// Where metric batch `seq` of `(agent_id, epoch)` stands: new, a
    /// duplicate of a stored one, or too far ahead of the watermark.
    ///
    /// The dedup state of an `(agent, epoch)` is a contiguous watermark `W`
    /// (every seq in `1..=W` was stored) and the set of seqs above `W` that
    /// were stored. So batches may arrive in any order and each is stored
    /// once; agents and epochs are independent of each other and of the
    /// event cursors.
    fn metric_batch_state(
        &self,
        agent_id: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<BatchSeq, StoreError>;

    /// Records metric batch `seq` of `(agent_id, epoch)` as stored, and
    /// moves the watermark over every contiguous seq above it (forgetting
    /// them one by one: the set above the watermark holds only what is
    /// above a gap). Returns false, and changes nothing, when the seq was
    /// recorded before or is too far ahead (see [`BatchSeq`]); so of two
    /// racing records of one seq, one wins.
    fn record_metric_batch(&self, agent_id: &str, epoch: u64, seq: u64)
    -> Result<bool, StoreError>;

    /// The dedup state of `(agent_id, epoch)`'s metric batches: the
    /// contiguous watermark and how many seqs above it are stored.
    fn metric_batches(&self, agent_id: &str, epoch: u64) -> Result<(u64, u64), StoreError>;

    /// Records a container event an agent reported; false when the same
    /// kind of event of the same container was recorded before.
    fn container_event(
        &self,
        agent_id: &str,
        ev: &proto::ContainerEvent,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// The container events of `agent_id`, oldest first (in the order
    /// recorded when times are equal).
    fn container_events(&self, agent_id: &str) -> Result<Vec<proto::ContainerEvent>, StoreError>;

    /// Number of commands of `agent_id` above `acked`.
    fn pending_count(&self, agent_id: &str, acked: u64) -> Result<u64, StoreError>;

    /// Stores a run with its containers and queues their start commands
    /// (each with its agent's next seq, as [`Store::enqueue`]), all or
    /// nothing. Returns the queued commands by agent; None, and nothing
    /// stored, when one of the agents does not exist.
    fn create_run(
        &self,
        run: &RunRecord,
        containers: &[NewContainer],
    ) -> Result<Option<Vec<(String, proto::Command)>>, StoreError>;

    /// A run by id, or else the newest run of that name, with its
    /// containers by index.
    fn run(
        &self,
        id_or_name: &str,
    ) -> Result<Option<(RunRecord, Vec<RunContainerRecord>)>, StoreError>;

    /// The newest `limit` runs (of `provider`, when not empty), newest
    /// first, each with its containers by index.
    fn runs(
        &self,
        provider: &str,
        limit: usize,
    ) -> Result<Vec<(RunRecord, Vec<RunContainerRecord>)>, StoreError>;

    /// True when a run of this name still has a container that is not
    /// removed and did not fail to start (its container names are taken).
    fn run_name_in_use(&self, name: &str) -> Result<bool, StoreError>;

    /// The run container a command belongs to, and its role.
    fn run_command(&self, command_id: &str) -> Result<Option<(String, u32, Role)>, StoreError>;

    /// Changes one container of a run, all or nothing: `change` (called
    /// once) sees the run and the container, edits the container, and may
    /// ask for a command to queue for the container's agent (with the
    /// agent's next seq, recorded as the container's pending command and as
    /// the run's command in its role). Returns the container after the
    /// change and the queued command; None when there is no such container.
    /// Two changes of one container never interleave.
    fn change_container(
        &self,
        run_id: &str,
        index: u32,
        now: i64,
        change: &mut dyn FnMut(&RunRecord, &mut RunContainerRecord) -> Option<FollowUp>,
    ) -> Result<Option<(RunContainerRecord, Option<proto::Command>)>, StoreError>;

    /// Records that a stop of the run was asked (the time of the first ask
    /// only) and the grace each container gets.
    fn stop_run(&self, run_id: &str, now: i64, timeout_s: u32) -> Result<(), StoreError>;

    /// Run containers that are queued or running, with the limits of their
    /// run.
    fn live_run_containers(&self) -> Result<Vec<LiveContainer>, StoreError>;

    /// Stores an agent's capacity report, replacing the one before.
    fn set_capacity(
        &self,
        agent_id: &str,
        capacity: &proto::Capacity,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Every agent's last capacity report, with when it arrived.
    fn capacities(&self) -> Result<HashMap<String, (proto::Capacity, i64)>, StoreError>;
}
