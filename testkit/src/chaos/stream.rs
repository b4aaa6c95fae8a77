//! A metrics stream whose every sample can be found again: Graphite lines
//! `chaos_seq;src=<source> <n> <time>` with `n` counting up from 1, sent
//! to an agent's ingest endpoint at a steady rate, and the backend's JSON
//! lines read back into how many times each `n` was stored.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The metric name of the numbered samples.
pub const NAME: &str = "chaos_seq";

/// A running stream into one agent's Graphite endpoint.
pub struct Stream {
    /// The `src` label of its samples.
    pub source: String,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    /// Sends `per_second` samples a second to `addr` in lines of ten,
    /// until stopped. A sample counts as sent once its line was written
    /// whole to the socket; on a write error it reconnects and goes on
    /// with the next number.
    pub fn start(source: &str, addr: SocketAddr, per_second: u64) -> Stream {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, src) = (sent.clone(), stop.clone(), source.to_string());
        let thread = std::thread::Builder::new()
            .name("chaos-stream".into())
            .spawn(move || {
                let pause = Duration::from_millis(1000 * 10 / per_second.max(10));
                let mut sock: Option<std::net::TcpStream> = None;
                while !st.load(Ordering::SeqCst) {
                    let Some(w) = sock.as_mut() else {
                        sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            .ok();
                        std::thread::sleep(pause);
                        continue;
                    };
                    let first = s.load(Ordering::SeqCst) + 1;
                    let now = uplink::now_unix_ms();
                    let mut text = String::new();
                    for n in first..first + 10 {
                        text.push_str(&format!(
                            "{NAME};src={src} {n} {}.{:03}\n",
                            now / 1000,
                            now % 1000
                        ));
                    }
                    if w.write_all(text.as_bytes()).is_ok() {
                        s.store(first + 9, Ordering::SeqCst);
                    } else {
                        sock = None;
                    }
                    std::thread::sleep(pause);
                }
            })
            .expect("cannot start the stream's thread");
        Stream {
            source: source.into(),
            sent,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sending; returns how many samples were sent.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the backend's JSON lines hold of the numbered samples.
#[derive(Debug, Default)]
pub struct Stored {
    /// For each source, each number's copies: the index of the file each
    /// copy is in (each backend start writes files of its own).
    pub copies: HashMap<String, HashMap<u64, Vec<usize>>>,
    /// Lines that are not whole JSON (a write cut short).
    pub torn_lines: usize,
    /// The files read, by the index `copies` gives.
    pub files: Vec<std::path::PathBuf>,
}

impl Stored {
    /// Reads every `.jsonl` file in `dir`.
    pub fn read(dir: &Path) -> Stored {
        Stored::read_dirs(&[dir])
    }

    /// Reads every `.jsonl` file in each of `dirs` (the JSON-lines
    /// directories of backends that share a store).
    pub fn read_dirs(dirs: &[&Path]) -> Stored {
        let mut st = Stored::default();
        let files = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten());
        for e in files {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let file = st.files.len();
            st.files.push(p.clone());
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    st.torn_lines += 1;
                    continue;
                };
                if v["name"] != NAME {
                    continue;
                }
                let src = v["labels"]["src"].as_str().unwrap_or("").to_string();
                let n = v["value"].as_f64().unwrap_or(0.0) as u64;
                st.copies
                    .entry(src)
                    .or_default()
                    .entry(n)
                    .or_default()
                    .push(file);
            }
        }
        st
    }

    /// Of numbers `1..=sent` of `source`: how many were stored once, are
    /// missing, were stored again by a later backend start, and were
    /// stored twice by one start.
    ///
    /// Copies in files of different backend starts would be a batch
    /// written again after a crash; copies in one file, a batch written
    /// twice by one start. Both are failures of exactly once, told apart
    /// to say where to look.
    pub fn tally(&self, source: &str, sent: u64) -> Tally {
        let empty = HashMap::new();
        let c = self.copies.get(source).unwrap_or(&empty);
        let mut t = Tally::default();
        for n in 1..=sent {
            match c.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
                [] => t.missing += 1,
                [_] => t.once += 1,
                files => {
                    let mut distinct = files.to_vec();
                    distinct.sort_unstable();
                    distinct.dedup();
                    if distinct.len() == files.len() {
                        t.again_after_a_crash += 1;
                    } else {
                        t.twice_in_one_start += 1;
                    }
                }
            }
        }
        t
    }
}

/// What [`Stored::tally`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Stored once.
    pub once: u64,
    /// Not stored.
    pub missing: u64,
    /// Stored by one backend start and again by a later one.
    pub again_after_a_crash: u64,
    /// Stored twice in one file: a bug.
    pub twice_in_one_start: u64,
}

/// `GET /metrics` of an agent's self-metrics at `addr`.
pub async fn scrape_agent(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

/// The value of metric `name` (no labels) on a Prometheus page, 0 when
/// the page does not have it yet.
pub fn value(page: &str, name: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
