//! The change feed of [`PostgresStore`](super::PostgresStore): what one
//! backend changes, every backend sharing the database hears of at once,
//! through PostgreSQL's `LISTEN`/`NOTIFY` (no table is polled).
//!
//! The statement that queues a command notifies [`COMMAND`] with
//! `<agent> <seq> <command>` (the command itself, when small, so that the
//! backend holding the agent need not read it back), then [`QUEUED`] with
//! `<agent> <seq>` (what backends of earlier releases listen to), inside
//! its transaction, so the notifications go out when, and only if, the
//! command is committed; a stored result notifies
//! [`DONE`] with the command's id, the same way; a revocation notifies
//! [`REVOKED`] with the agent's id; a credential replaced (re-enrollment,
//! a pending credential made current) notifies [`CREDENTIAL`] with the
//! agent's id. Each backend listens on a connection of its own (outside
//! the pool), turns notifications into [`Change`]s for its hub, drops what
//! its [`CredentialCache`] holds of an agent revoked or whose credential
//! was replaced as soon as it hears of it, and checks every [`LIVENESS`]
//! that the connection still answers. The cache is used only while the
//! connection listens. When the connection is lost it connects again with a backoff
//! and, once listening again, sends [`Change::Missed`]: whatever was
//! queued meanwhile is found by every stream and held poll looking at the
//! store again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::super::Change;
use super::cache::CredentialCache;

/// The channel of commands queued: payload `<agent> <seq>`.
pub(super) const QUEUED: &str = "uplink_queued";
/// The channel of commands queued, with the command: payload `<agent>
/// <seq> <hex>`, `<hex>` the command (its seq left out) in protobuf, in
/// lower-case hex, or empty when too large to notify ([`command_hex`]).
pub(super) const COMMAND: &str = "uplink_command";
/// PostgreSQL's bound on a notification's payload is 8000 bytes.
const PAYLOAD_MAX: usize = 7900;
/// The channel of agents revoked: payload `<agent>`.
pub(super) const REVOKED: &str = "uplink_revoked";
/// The channel of credentials replaced: payload `<agent>`.
pub(super) const CREDENTIAL: &str = "uplink_credential";
/// The channel of results stored: payload `<command>`.
pub(super) const DONE: &str = "uplink_done";
/// How often the listening connection is asked to answer.
const LIVENESS: Duration = Duration::from_secs(10);
/// How long it has to answer, and to connect.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Waits between attempts to listen again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Changes held for the hub before the listener waits for it.
const BUFFER: usize = 4096;

/// The payload of a [`QUEUED`] notification, as the store's enqueue
/// statement writes it (`agent || ' ' || seq`).
#[cfg(test)]
pub(super) fn queued_payload(agent: &str, seq: i64) -> String {
    format!("{agent} {seq}")
}

/// The `<hex>` of a [`COMMAND`] notification for `command` queued for
/// `agent`: empty when the payload would be too large, or when the
/// command carries a secret (a registry password, environment values):
/// any role that can connect to the database may `LISTEN`, so a secret
/// goes only into the table, which the store scrubs once the command is
/// done.
pub(super) fn command_hex(agent: &str, command: &crate::proto::Command) -> String {
    use prost::Message;
    if let Some(spec) = &command.spec
        && crate::backend::store::scrub_secrets(&mut spec.clone())
    {
        return String::new();
    }
    let len = command.encoded_len();
    if len > crate::backend::hub::RECENT_MAX_BYTES || agent.len() + 2 * len + 24 > PAYLOAD_MAX {
        return String::new();
    }
    crate::secret::hex(&command.encode_to_vec())
}

/// The command a [`COMMAND`] payload's `<hex>` carries, with its seq;
/// None when there is none or it does not decode.
fn command_from_hex(hex: &str, seq: u64) -> Option<Box<crate::proto::Command>> {
    use prost::Message;
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    let bytes = hex
        .as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? << 4 | digit(p[1])?) as u8))
        .collect::<Option<Vec<u8>>>()?;
    let mut c = crate::proto::Command::decode(bytes.as_slice()).ok()?;
    c.seq = seq;
    Some(Box::new(c))
}

/// The change a notification says, or None for one this build does not
/// know (a newer backend's channel or payload).
fn parse(channel: &str, payload: &str) -> Option<Change> {
    match channel {
        QUEUED => {
            let (agent, seq) = payload.rsplit_once(' ')?;
            Some(Change::Queued {
                agent: agent.to_string(),
                seq: seq.parse().ok()?,
                command: None,
            })
        }
        COMMAND => {
            let mut parts = payload.rsplitn(3, ' ');
            let (hex, seq, agent) = (parts.next()?, parts.next()?, parts.next()?);
            let seq = seq.parse().ok()?;
            Some(Change::Queued {
                agent: agent.to_string(),
                seq,
                command: command_from_hex(hex, seq),
            })
        }
        REVOKED if !payload.is_empty() => Some(Change::Revoked {
            agent: payload.to_string(),
        }),
        DONE if !payload.is_empty() => Some(Change::Done {
            command: payload.to_string(),
        }),
        _ => None,
    }
}

/// The agent whose credentials a notification says to forget.
fn forgets<'a>(channel: &str, payload: &'a str) -> Option<&'a str> {
    (matches!(channel, REVOKED | CREDENTIAL) && !payload.is_empty()).then_some(payload)
}

/// Starts listening with `config` (the store's, password included) until
/// the receiver is dropped, keeping `cache` to what was heard. `shown`
/// names the database in logs.
pub(super) fn spawn(
    config: tokio_postgres::Config,
    shown: String,
    cache: Arc<CredentialCache>,
) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut wait = RETRY_FIRST;
        let mut first = true;
        loop {
            let listened = listen(&config, &tx, first, &cache).await;
            cache.set_live(false);
            match listened {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    database = %shown,
                    "the database's change feed stopped ({e}); listening again in {wait:?}, \
                     commands queued through other backends meanwhile wait until then"
                ),
            }
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    });
    rx
}

/// Listens on a new connection and forwards changes until the connection
/// fails (Err) or the receiver is dropped (Ok). After the first time,
/// sends [`Change::Missed`] once listening. `cache` is live from when the
/// connection listens until it fails.
async fn listen(
    config: &tokio_postgres::Config,
    tx: &mpsc::Sender<Change>,
    first: bool,
    cache: &Arc<CredentialCache>,
) -> Result<(), String> {
    let (client, mut connection) = tokio::time::timeout(ANSWER_WITHIN, config.connect(NoTls))
        .await
        .map_err(|_| format!("no answer to the login within {ANSWER_WITHIN:?}"))?
        .map_err(|e| super::describe(&e))?;
    // The connection delivers notifications as it is polled.
    let (notes, mut noted) = mpsc::unbounded_channel();
    let driver_cache = cache.clone();
    // Set by the connection's task when the connection fails, before it
    // turns the cache off, so that turning it on below cannot come last.
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver_failed = failed.clone();
    let driver = tokio::spawn(async move {
        let (cache, failed) = (driver_cache, driver_failed);
        loop {
            let m = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
            let end = match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Before anything queued ahead of it is passed on.
                    if let Some(agent) = forgets(n.channel(), n.payload()) {
                        cache.forget_agent(agent);
                    }
                    notes.send(Ok(parse(n.channel(), n.payload()))).is_err()
                }
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    cache.set_live(false);
                    let _ = notes.send(Err(super::describe(&e)));
                    true
                }
                None => {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    cache.set_live(false);
                    let _ = notes.send(Err("the server closed the connection".into()));
                    true
                }
            };
            if end {
                return;
            }
        }
    });
    let _driver = AbortOnDrop(driver);
    tokio::time::timeout(
        ANSWER_WITHIN,
        client.batch_execute(&format!(
            "LISTEN {COMMAND}; LISTEN {QUEUED}; LISTEN {REVOKED}; LISTEN {CREDENTIAL}; \
             LISTEN {DONE}"
        )),
    )
    .await
    .map_err(|_| format!("LISTEN not answered within {ANSWER_WITHIN:?}"))?
    .map_err(|e| super::describe(&e))?;
    cache.set_live(true);
    if failed.load(std::sync::atomic::Ordering::SeqCst) {
        cache.set_live(false);
    }
    if !first {
        tracing::info!("listening to the database's change feed again");
        if tx.send(Change::Missed).await.is_err() {
            return Ok(());
        }
    }
    let mut liveness = tokio::time::interval(LIVENESS);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = noted.recv() => match note {
                Some(Ok(Some(change))) => {
                    if tx.send(change).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(None)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err("the connection ended".into()),
            },
            _ = liveness.tick() => {
                tokio::time::timeout(ANSWER_WITHIN, client.simple_query("SELECT 1"))
                    .await
                    .map_err(|_| format!("no answer within {ANSWER_WITHIN:?}"))?
                    .map_err(|e| super::describe(&e))?;
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Aborts the connection's task when the listener ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_become_changes() {
        assert_eq!(
            parse(QUEUED, &queued_payload("agt_1", 42)),
            Some(Change::Queued {
                agent: "agt_1".into(),
                seq: 42,
                command: None,
            })
        );
        let command = crate::proto::Command {
            id: "cmd_1".into(),
            seq: 0,
            created_unix_ms: 7,
            spec: Some(crate::proto::CommandSpec {
                kind: Some(crate::proto::command_spec::Kind::Ping(crate::proto::Ping {
                    delay_ms: 3,
                    payload: "p q".into(),
                })),
            }),
        };
        let hex = command_hex("agt 1", &command);
        assert!(!hex.is_empty());
        assert_eq!(
            parse(COMMAND, &format!("agt 1 42 {hex}")),
            Some(Change::Queued {
                agent: "agt 1".into(),
                seq: 42,
                command: Some(Box::new(crate::proto::Command {
                    seq: 42,
                    ..command.clone()
                })),
            })
        );
        // Too large to notify: the seq alone, the command read from the store.
        let mut big = command.clone();
        big.id = "x".repeat(crate::backend::hub::RECENT_MAX_BYTES);
        assert_eq!(command_hex("agt_1", &big), "");
        // A secret is never notified: the command is read from the store.
        let run_with_env = |name: &str, value: &str| crate::proto::Command {
            spec: Some(crate::proto::CommandSpec {
                kind: Some(crate::proto::command_spec::Kind::RunContainer(
                    crate::proto::RunContainer {
                        image: "img".into(),
                        env: [(name.to_string(), value.to_string())].into(),
                        ..Default::default()
                    },
                )),
            }),
            ..command.clone()
        };
        assert_eq!(command_hex("agt_1", &run_with_env("TOKEN", "s3cret")), "");
        assert!(!command_hex("agt_1", &run_with_env("EMPTY", "")).is_empty());
        for (payload, seq) in [
            ("agt_1 42 ", 42),
            ("agt_1 43 zz", 43),
            ("agt_1 44 abc", 44),
            ("agt_1 45 00ff", 45),
        ] {
            assert_eq!(
                parse(COMMAND, payload),
                Some(Change::Queued {
                    agent: "agt_1".into(),
                    seq,
                    command: None,
                }),
                "{payload}"
            );
        }
        assert_eq!(
            parse(DONE, "cmd_1"),
            Some(Change::Done {
                command: "cmd_1".into()
            })
        );
        assert_eq!(
            parse(REVOKED, "agt_1"),
            Some(Change::Revoked {
                agent: "agt_1".into()
            })
        );
        for (channel, payload) in [
            (QUEUED, "agt_1"),
            (QUEUED, "agt_1 x"),
            (QUEUED, "agt_1 -1"),
            (COMMAND, "agt_1 1"),
            (COMMAND, "agt_1 x 00"),
            (REVOKED, ""),
            (DONE, ""),
            (CREDENTIAL, "agt_1"),
            ("uplink_other", "agt_1 1"),
        ] {
            assert_eq!(parse(channel, payload), None, "{channel} {payload:?}");
        }
    }

    #[test]
    fn revocations_and_replaced_credentials_forget_the_agent() {
        assert_eq!(forgets(REVOKED, "agt_1"), Some("agt_1"));
        assert_eq!(forgets(CREDENTIAL, "agt_1"), Some("agt_1"));
        for (channel, payload) in [
            (REVOKED, ""),
            (CREDENTIAL, ""),
            (QUEUED, "agt_1 1"),
            (DONE, "cmd_1"),
        ] {
            assert_eq!(forgets(channel, payload), None, "{channel} {payload:?}");
        }
    }
}
