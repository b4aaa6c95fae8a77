//! An agent's first gRPC stream on a busy host: nothing blocks HTTP/2, so
//! no start may fall to long-polling, however loaded the CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use uplink_testkit::*;

/// Starts to make: `UPLINK_FIRST_FRAME_STARTS`, 200 unless set.
fn starts() -> usize {
    std::env::var("UPLINK_FIRST_FRAME_STARTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Agents started at once.
const AT_ONCE: usize = 8;

/// Busy threads on every core until dropped.
struct CpuLoad(Arc<AtomicBool>);

impl CpuLoad {
    fn start() -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cores * 2 {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
        CpuLoad(stop)
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_started_on_a_loaded_host_never_fall_from_a_working_grpc_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    // The default heartbeat: the first one is sent at once regardless.
    cfg.heartbeat = Duration::from_secs(10);
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    // Every start is a fresh agent: it enrolls, then opens its first stream.
    let states: Vec<_> = (0..AT_ONCE)
        .map(|i| dir.path().join(format!("agent-{i}")))
        .collect();
    let _load = CpuLoad::start();
    let total = starts();
    let mut made = 0;
    let mut falls = Vec::new();
    while made < total {
        let round: Vec<Proc> = states
            .iter()
            .enumerate()
            .take(total - made)
            .map(|(i, s)| {
                agent(
                    &b,
                    "auto",
                    &s.join(made.to_string()),
                    &format!("loaded-{i}"),
                )
            })
            .collect();
        for p in &round {
            let line = wait_for(
                Duration::from_secs(60),
                "the first stream or a fall",
                || async {
                    p.stderr
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|l| l.contains("stream open") || l.contains("switching rung"))
                        .cloned()
                },
            )
            .await;
            if line.contains("switching rung") {
                falls.push(line);
            }
        }
        made += round.len();
    }
    assert!(
        falls.is_empty(),
        "{} of {made} starts fell to long-polling:\n{}",
        falls.len(),
        falls.join("\n")
    );
}

/// A store that cannot write for a while (a slow disk's sync, a checkpoint
/// that waits, another process holding SQLite's write lock) holds no
/// stream's first frame: eight enrolled agents start again while another
/// process holds the write lock of the backend's database for longer than
/// the agents wait for a first frame, and every one of them stays on gRPC.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_write_for_seconds_holds_no_first_frame() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestBackend::config(&dir.path().join("backend"));
    let db = dir.path().join("backend").join("uplink.db");
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let states: Vec<_> = (0..AT_ONCE)
        .map(|i| dir.path().join(format!("agent-{i}")))
        .collect();
    // Enrolled and connected once, then stopped.
    let first: Vec<Proc> = states
        .iter()
        .enumerate()
        .map(|(i, s)| agent(&b, "auto", s, &format!("locked-{i}")))
        .collect();
    for p in &first {
        wait_for(Duration::from_secs(60), "the first stream", || async {
            p.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("stream open"))
                .then_some(())
        })
        .await;
    }
    drop(first);
    // Another process takes the write lock for 6 s (the agents wait 4 s
    // and a half for a first frame).
    let mut lock = uplink_testkit::store_lock::hold_write_lock(&db, 6);
    let again: Vec<Proc> = states
        .iter()
        .enumerate()
        .map(|(i, s)| agent(&b, "auto", s, &format!("locked-{i}")))
        .collect();
    let mut falls = Vec::new();
    for p in &again {
        let line = wait_for(Duration::from_secs(60), "the stream or a fall", || async {
            p.stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("stream open") || l.contains("switching rung"))
                .cloned()
        })
        .await;
        if line.contains("switching rung") {
            falls.push(line);
        }
    }
    let _ = lock.wait();
    assert!(
        falls.is_empty(),
        "{} of {AT_ONCE} agents fell to long-polling while the store could not write:\n{}",
        falls.len(),
        falls.join("\n")
    );
}
