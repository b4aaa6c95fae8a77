//! Runs as the store keeps them: a run, its containers (where each was
//! placed and where it is in its life), and which queued command belongs to
//! which container in which role. The operations on them are part of
//! [`Store`](super::Store).

use crate::proto::{self, RunContainerState};

/// A run as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub image: String,
    pub count: u32,
    pub cpus: f64,
    pub memory: u64,
    pub created_ms: i64,
    /// When a stop was asked (0: not asked).
    pub stop_ms: i64,
    pub stop_timeout_s: u32,
}

/// One container of a run as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunContainerRecord {
    pub run_id: String,
    pub index: u32,
    pub agent_id: String,
    pub name: String,
    /// The `RunContainer` command.
    pub command_id: String,
    pub container_id: String,
    pub state: RunContainerState,
    pub exit_code: i64,
    pub oom_killed: bool,
    pub message: String,
    pub started_ms: i64,
    /// The stop or remove command in flight ("" when none).
    pub pending_command: String,
}

/// What a run's command does for its container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Start = 1,
    Stop = 2,
    Remove = 3,
}

impl Role {
    /// The role stored as `v`, if any.
    pub(super) fn from_i64(v: i64) -> Option<Role> {
        match v {
            1 => Some(Role::Start),
            2 => Some(Role::Stop),
            3 => Some(Role::Remove),
            _ => None,
        }
    }
}

/// A container to create with its run: where it goes and the command that
/// starts it.
#[derive(Clone, Debug)]
pub struct NewContainer {
    pub index: u32,
    pub agent_id: String,
    pub name: String,
    pub command_id: String,
    pub spec: proto::CommandSpec,
}

/// A queued or running container of a run, as placement counts it.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveContainer {
    pub agent_id: String,
    pub state: RunContainerState,
    pub started_ms: i64,
    pub cpus: f64,
    pub memory: u64,
}

/// A command to queue as part of a container's change.
pub struct FollowUp {
    pub role: Role,
    pub command_id: String,
    pub spec: proto::CommandSpec,
}
