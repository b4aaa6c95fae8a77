//! The Graphite listener's connections: read, split into lines, hand the
//! samples over, and wait for room in the batcher's channel before reading
//! on (the only backpressure a protocol without answers has).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::intake::Protocol;
use super::lines::{LineSplitter, Piece};
use super::{READ_BYTES, Shared, stopping};

/// Reads Graphite lines until the client closes, goes idle, or shutdown.
/// Sending waits while the channel is full: the client is backpressured by
/// TCP.
pub(super) async fn graphite_connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let intake = &shared.intake;
    let mut splitter = LineSplitter::new(config.limits.max_line_bytes);
    let mut buf = vec![0u8; READ_BYTES];
    tracing::debug!(%peer, "Graphite connection opened");
    loop {
        let n = tokio::select! {
            biased;
            _ = stopping(&mut stop) => return,
            r = tokio::time::timeout(config.idle_timeout, tcp.read(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "Graphite connection failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "Graphite connection idle; closing it");
                    return;
                }
            },
        };
        let now = crate::now_unix_ms();
        let mut samples = Vec::new();
        let mut emit = |piece: Piece<'_>| match piece {
            Piece::Line(line) => {
                let _ = intake.graphite_line(line, now, &mut samples);
            }
            Piece::TooLong(start) => intake.reject_overlong(Protocol::Graphite, start, now),
        };
        if n == 0 {
            splitter.finish(&mut emit);
        } else {
            splitter.push(&buf[..n], &mut emit);
        }
        if !samples.is_empty() {
            let count = samples.len();
            tokio::select! {
                biased;
                _ = stopping(&mut stop) => return,
                r = shared.sender.send(samples) => {
                    if r.is_err() {
                        return;
                    }
                    intake.accepted(count);
                }
            }
        }
        if n == 0 {
            tracing::debug!(%peer, "Graphite connection closed by the client");
            return;
        }
    }
}
