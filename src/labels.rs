//! The Docker labels the agent puts on every container it creates, and by
//! which it and its container source find them again. A bottom-floor
//! module: it imports nothing from the crate, so the agent's Docker
//! commands (`agent::docker`) and the container metrics source
//! (`metrics::containers`) share them without one importing the other.

/// Label with the agent's id.
pub const LABEL_AGENT: &str = "uplink.agent";
/// Label with the id of the RunContainer command.
pub const LABEL_COMMAND: &str = "uplink.command";
/// Label with the run id.
pub const LABEL_RUN: &str = "uplink.run";
