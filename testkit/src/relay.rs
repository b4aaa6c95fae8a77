//! A TCP relay in front of the backend that the test can turn into the
//! network faults users meet: a path that does not carry HTTP/2 (it cuts
//! connections whose TLS ClientHello offers only `h2`, as the gRPC rung's
//! does), and a half-open line (it stops forwarding without closing).
//! TLS stays end to end between agent and backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the relay does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Forward = 0,
    /// Cut connections that offer only h2 (and stop new ones).
    BlockH2 = 1,
    /// Stop forwarding in both directions, keep sockets open.
    Blackhole = 2,
    /// Hold connections that offer only h2 open without forwarding
    /// anything: a path that swallows HTTP/2 instead of refusing it.
    SwallowH2 = 3,
    /// Forward what the client sends, drop what the backend answers: a
    /// line that broke after the request went out.
    DropReplies = 4,
}

/// Open connections: whether each offered only h2, and its task.
type Conns = Arc<Mutex<Vec<(Arc<AtomicBool>, JoinHandle<()>)>>>;

/// A running relay.
pub struct Relay {
    /// Where agents connect instead of the backend.
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    conns: Conns,
    task: JoinHandle<()>,
}

fn offers_only_h2(hello: &[u8]) -> bool {
    let has = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    has(b"\x02h2") && !has(b"http/1.1")
}

impl Relay {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        Self::start_with(target, None).await
    }

    /// Starts relaying to `target`, cutting every connection when it
    /// reaches `max_age` (as proxies and NATs with a tunnel lifetime do).
    pub async fn start_with(target: SocketAddr, max_age: Option<std::time::Duration>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Forward as u8));
        let conns: Conns = Arc::default();
        let (m, c) = (mode.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let m = m.clone();
                let is_h2 = Arc::new(AtomicBool::new(false));
                let flag = is_h2.clone();
                let handle = tokio::spawn(async move {
                    let mut hello = vec![0u8; 16 * 1024];
                    let n = match client.read(&mut hello).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    hello.truncate(n);
                    let h2 = offers_only_h2(&hello);
                    flag.store(h2, Ordering::SeqCst);
                    if h2 && m.load(Ordering::SeqCst) == Mode::BlockH2 as u8 {
                        return; // Cut: the path does not carry HTTP/2.
                    }
                    if h2 && m.load(Ordering::SeqCst) == Mode::SwallowH2 as u8 {
                        // Silence until the client gives up.
                        let mut sink = [0u8; 1024];
                        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    if server.write_all(&hello).await.is_err() {
                        return;
                    }
                    match max_age {
                        Some(age) => {
                            let _ = tokio::time::timeout(age, pump(client, server, m)).await;
                        }
                        None => pump(client, server, m).await,
                    }
                });
                let mut conns = c.lock().unwrap();
                conns.retain(|(_, h)| !h.is_finished());
                conns.push((is_h2, handle));
            }
        });
        Relay {
            addr,
            mode,
            conns,
            task,
        }
    }

    /// Changes the mode; `BlockH2` also cuts open h2 connections.
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        if mode == Mode::BlockH2 {
            for (h2, h) in self.conns.lock().unwrap().iter() {
                if h2.load(Ordering::SeqCst) {
                    h.abort();
                }
            }
        }
    }

    /// Cuts every open connection (a proxy or NAT that dropped them).
    pub fn cut_all(&self) {
        for (_, h) in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// Copies both ways; in `Blackhole` mode it reads nothing and writes
/// nothing until the mode changes.
async fn pump(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let m1 = mode.clone();
    let up = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            while m1.load(Ordering::SeqCst) == Mode::Blackhole as u8 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while m1.load(Ordering::SeqCst) == Mode::Blackhole as u8 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            while mode.load(Ordering::SeqCst) == Mode::Blackhole as u8 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while mode.load(Ordering::SeqCst) == Mode::Blackhole as u8 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if mode.load(Ordering::SeqCst) == Mode::DropReplies as u8 {
                continue;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
