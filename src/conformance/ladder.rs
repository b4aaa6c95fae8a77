//! The ladder: a rung switch under a stream of commands.

use super::{Check, Ctx, SKIP};

/// A rung switch under a command stream (agent.proto, delivery semantics:
/// "no rung switch may lose or duplicate a command"). Not built yet.
pub(super) async fn rung_switch(_ctx: &Ctx) -> Check {
    Err(format!("{SKIP}not implemented"))
}
