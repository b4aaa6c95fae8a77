//! The ladder: a rung switch under a stream of commands.
//!
//! A real agent in `--transport auto` mode reaches the backend through
//! [`Gate`], an HTTP CONNECT proxy in this process that can swallow HTTP/2:
//! while it does, it holds every tunnel whose TLS ClientHello offers only
//! ALPN `h2` open and silent (a proxy that lets h2 through to nowhere), so
//! the agent falls to long-polling; once it lets h2 pass, the agent's next
//! probe climbs back to the gRPC stream. TLS stays end to end: the gate
//! reads the ClientHello, never decrypts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::commands::check_ping;
use super::peer::{AgentProc, fresh, ping};
use super::{Check, Ctx, Rung};
use crate::proto;

/// A CONNECT proxy on loopback that swallows HTTP/2 while told to.
struct Gate {
    port: u16,
    block_h2: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        // The accept loop owns every tunnel's task (a `JoinSet`): aborting
        // it ends them all.
        self.task.abort();
    }
}

impl Gate {
    async fn start() -> Result<Gate, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen on loopback for the proxy: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy address: {e}"))?
            .port();
        let block_h2 = Arc::new(AtomicBool::new(true));
        let block = block_h2.clone();
        let task = tokio::spawn(async move {
            let mut tunnels = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { continue };
                        tunnels.spawn(tunnel(conn, block.clone()));
                    }
                    Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
                }
            }
        });
        Ok(Gate {
            port,
            block_h2,
            task,
        })
    }
}

/// One CONNECT tunnel: the request head, the upstream connection, then the
/// ClientHello, held (h2 only, while blocked) or passed on with the rest.
async fn tunnel(mut client: TcpStream, block_h2: Arc<AtomicBool>) {
    let Some(target) = read_connect(&mut client).await else {
        return;
    };
    let Ok(Ok(mut upstream)) =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&target)).await
    else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // The first TLS record: the ClientHello (5-byte header and its body).
    let mut hello = vec![0u8; 5];
    if client.read_exact(&mut hello).await.is_err() {
        return;
    }
    let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    hello.resize(5 + len, 0);
    if client.read_exact(&mut hello[5..]).await.is_err() {
        return;
    }
    if block_h2.load(Ordering::Relaxed) && offers_only_h2(&hello) {
        // Swallowed: the handshake is never answered, as on a path that
        // does not carry HTTP/2. Held until the client gives up.
        let mut sink = [0u8; 1024];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    if upstream.write_all(&hello).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Reads a `CONNECT host:port HTTP/1.1` head (at most 8 KiB): the target.
async fn read_connect(client: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || client.read_exact(&mut byte).await.is_err() {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(m), Some(target)) if m.eq_ignore_ascii_case("CONNECT") => Some(target.to_string()),
        _ => None,
    }
}

/// True when a ClientHello's ALPN offers `h2` and not `http/1.1` (the
/// gRPC rung's connections).
fn offers_only_h2(hello: &[u8]) -> bool {
    let has = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    has(b"\x02h2") && !has(b"\x08http/1.1")
}

/// How long the agent may take to climb back to gRPC once h2 passes (its
/// probes come every 1 to 2 s, ±25%, each up to 4 s when swallowed).
const CLIMB_WITHIN: Duration = Duration::from_secs(40);

/// A rung switch under a command stream (agent.proto, delivery semantics:
/// redelivery "after a reconnect or a rung switch"; DESIGN: "no rung switch
/// may lose or duplicate a command"). A real agent on `--transport auto`
/// behind a proxy that swallows HTTP/2 is shown connected on long-poll; a
/// ping is queued every 250 ms while the proxy starts to let HTTP/2 pass
/// and the agent climbs to the gRPC stream (shown by `ListAgents`), and a
/// few more after; every ping comes back done, OK, with its payload.
pub(super) async fn rung_switch(ctx: &Ctx) -> Check {
    let gate = Gate::start().await?;
    let proxy = format!("http://127.0.0.1:{}", gate.port);
    let mut agent = AgentProc::spawn(
        ctx,
        "rung-switch",
        "auto",
        &[
            "--proxy",
            &proxy,
            "--no-proxy",
            "",
            "--probe-initial",
            "1s",
            "--probe-max",
            "2s",
        ],
    )?;
    let view = agent
        .connected(ctx, Rung::Longpoll, Duration::from_secs(40))
        .await
        .map_err(|e| format!("behind a proxy that swallows HTTP/2: {e}"))?;
    let mut sent: Vec<(String, String)> = Vec::new();
    let mut climbed_at: Option<Instant> = None;
    let mut opened_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let payload = fresh("switch");
        let cmd = ctx
            .admin
            .enqueue(&view.id, ping(0, &payload))
            .await
            .map_err(|e| format!("EnqueueCommand: {e}"))?;
        sent.push((cmd.id, payload));
        if sent.len() == 4 {
            gate.block_h2.store(false, Ordering::Relaxed);
            opened_at = Some(Instant::now());
        }
        if let Some(at) = climbed_at {
            if at.elapsed() >= Duration::from_secs(1) {
                break;
            }
        } else if let Some(opened) = opened_at {
            let agents = ctx
                .admin
                .agents("")
                .await
                .map_err(|e| format!("ListAgents: {e}"))?;
            let on_grpc = agents.iter().any(|a| {
                a.id == view.id && a.connected && a.transport == proto::Transport::Grpc as i32
            });
            if on_grpc {
                climbed_at = Some(Instant::now());
            } else if opened.elapsed() > CLIMB_WITHIN {
                return Err(format!(
                    "the agent did not climb to the gRPC stream within {CLIMB_WITHIN:?} of HTTP/2 passing; {}",
                    agent.tail()
                ));
            }
        }
    }
    for (id, payload) in &sent {
        let v = ctx
            .admin
            .command(id, Duration::from_secs(15))
            .await
            .map_err(|e| format!("GetCommand {id}: {e}"))?;
        check_ping(&v, payload).map_err(|e| {
            format!(
                "{e} (one of {} pings queued across the switch from long-poll to gRPC); {}",
                sent.len(),
                agent.tail()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::offers_only_h2;

    #[test]
    fn alpn_offers_are_told_apart() {
        let h2 = b"\x16\x03\x01..\x00\x10\x00\x05\x00\x03\x02h2";
        let h1 = b"\x16\x03\x01..\x00\x10\x00\x0b\x00\x09\x08http/1.1";
        let both = b"\x16\x03\x01..\x00\x10\x00\x0e\x00\x0c\x02h2\x08http/1.1";
        assert!(offers_only_h2(h2));
        assert!(!offers_only_h2(h1));
        assert!(!offers_only_h2(both));
    }
}
