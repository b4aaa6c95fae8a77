//! Executes commands. Knows `Ping`; any other kind gets an UNSUPPORTED
//! result naming this agent's version, never silence. The Docker commands
//! arrive with the executor proper.

use std::time::Duration;

use crate::proto::{self, CommandStatus};

/// Runs `command` and returns its result.
pub async fn execute(command: &proto::Command, received_ms: i64) -> proto::CommandResult {
    use proto::command_spec::Kind;
    let id = command.id.clone();
    match command.spec.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Ping(p)) => {
            if p.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(p.delay_ms.min(600_000) as u64)).await;
            }
            proto::CommandResult {
                command_id: id,
                status: CommandStatus::Ok as i32,
                message: "pong".into(),
                detail: Some(proto::command_result::Detail::Ping(proto::PingResult {
                    payload: p.payload.clone(),
                    received_unix_ms: received_ms,
                })),
            }
        }
        None => proto::CommandResult {
            command_id: id,
            status: CommandStatus::Unsupported as i32,
            message: format!(
                "command kind not supported by this agent (uplink {}); upgrade the agent",
                crate::VERSION
            ),
            detail: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_kinds_get_a_clear_failure() {
        let c = proto::Command {
            id: "c1".into(),
            seq: 1,
            created_unix_ms: 0,
            spec: Some(proto::CommandSpec { kind: None }),
        };
        let r = execute(&c, 0).await;
        assert_eq!(r.status, CommandStatus::Unsupported as i32);
        assert!(r.message.contains("not supported"));
    }

    #[tokio::test]
    async fn ping_echoes_its_payload() {
        let c = proto::Command {
            id: "c1".into(),
            seq: 1,
            created_unix_ms: 0,
            spec: Some(proto::CommandSpec {
                kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                    delay_ms: 0,
                    payload: "hi".into(),
                })),
            }),
        };
        let r = execute(&c, 5).await;
        assert_eq!(r.status, CommandStatus::Ok as i32);
        match r.detail {
            Some(proto::command_result::Detail::Ping(p)) => {
                assert_eq!((p.payload.as_str(), p.received_unix_ms), ("hi", 5))
            }
            other => panic!("unexpected detail {other:?}"),
        }
    }
}
