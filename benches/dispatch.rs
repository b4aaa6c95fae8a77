//! Command dispatch latency on each rung, over loopback TLS.
//!
//! One dispatch: the backend enqueues a `Ping` for an agent and waits until
//! that agent's ack for it reaches the backend. The measured path is
//!
//! ```text
//! enqueue (SQLite) -> wake the agent's stream / held poll -> TLS -> agent
//!   -> journal append + fsync -> ack in a Report (and, long-polling, in
//!   the next Poll) -> TLS -> backend stores the ack (SQLite)
//! ```
//!
//! The backend and two agents (one on the gRPC rung, one long-polling) run
//! in-process on one multi-thread tokio runtime, each with its own state in
//! a temporary directory.
//!
//! Output: the criterion group `dispatch` (functions `grpc` and `longpoll`),
//! then a percentile table (criterion reports no percentiles) over
//! `UPLINK_BENCH_DISPATCHES` dispatches per rung (default 2000) after a
//! warm-up of 200, and, for comparison, the cost of the journal's
//! append + fsync alone on the same filesystem.
//!
//! All state lives in a temporary directory under `UPLINK_BENCH_DIR`
//! (default: the system's temporary directory).
//!
//! Run: `cargo bench --bench dispatch`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::Criterion;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use uplink::agent::{self, AgentConfig, AgentError, TransportMode};
use uplink::tls::Trust;
use uplink_testkit::bench::{BenchBackend, bench_dir, stopped};
use uplink_testkit::measure::{Distribution, count_from_env};

/// Dispatches per rung in the percentile pass, unless overridden.
const DEFAULT_DISPATCHES: usize = 2000;
/// Dispatches per rung before the percentile pass starts measuring.
const WARM_UP_DISPATCHES: usize = 200;
/// Appends measured for the journal fsync baseline.
const FSYNC_SAMPLES: usize = 500;
/// Longest wait for one ack before the benchmark gives up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for both agents to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable overriding [`DEFAULT_DISPATCHES`].
const DISPATCHES_ENV: &str = "UPLINK_BENCH_DISPATCHES";

/// The rungs, in the order they are measured.
const RUNGS: [TransportMode; 2] = [TransportMode::Grpc, TransportMode::Longpoll];

/// A backend and one agent per rung, running.
struct Bench {
    backend: BenchBackend,
    /// Agent ids, in the order of [`RUNGS`].
    agents: Vec<String>,
    stop_agents: watch::Sender<bool>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
}

fn hostname(mode: TransportMode) -> String {
    format!("bench-{}", mode.name())
}

impl Bench {
    async fn start(dir: &Path) -> Bench {
        let backend = BenchBackend::start(&dir.join("backend")).await;
        let url = uplink::client::parse_backend_url(&backend.url).expect("backend URL");
        let (stop_agents, rx) = watch::channel(false);
        let mut agent_tasks = Vec::new();
        for mode in RUNGS {
            let mut acfg =
                AgentConfig::new(url.clone(), dir.join(format!("agent-{}", mode.name())));
            acfg.token = Some(backend.enroll_token.clone());
            acfg.trust = Trust {
                ca_files: vec![backend.ca.clone()],
                skip_os_store: true,
            };
            acfg.transport = mode;
            acfg.hostname = hostname(mode);
            acfg.grace = Duration::from_secs(2);
            agent_tasks.push(tokio::spawn(agent::run(acfg, stopped(rx.clone()))));
        }

        // Both agents enroll, then open their stream or first held poll.
        let started = Instant::now();
        let agents = loop {
            let list = backend
                .core
                .list_agents(Default::default())
                .await
                .expect("list_agents failed")
                .agents;
            let ids: Vec<Option<String>> = RUNGS
                .iter()
                .map(|m| {
                    list.iter()
                        .find(|a| a.hostname == hostname(*m) && a.connected)
                        .map(|a| a.id.clone())
                })
                .collect();
            if ids.iter().all(Option::is_some) {
                break ids.into_iter().flatten().collect();
            }
            if started.elapsed() > CONNECT_TIMEOUT {
                let seen: Vec<String> = list
                    .iter()
                    .map(|a| format!("{} (connected: {})", a.hostname, a.connected))
                    .collect();
                panic!(
                    "the bench agents did not both connect within {CONNECT_TIMEOUT:?}; the backend knows: [{}]",
                    seen.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Bench {
            backend,
            agents,
            stop_agents,
            agent_tasks,
        }
    }

    /// One dispatch to `agent`: enqueue a ping, wait for its ack. Returns the
    /// time from just before the enqueue to the ack's arrival.
    async fn dispatch(&self, agent: &str) -> Duration {
        let start = Instant::now();
        let (_, seq) = self.backend.enqueue_ping(agent).await;
        if tokio::time::timeout(ACK_TIMEOUT, self.backend.core.wait_acked(agent, seq))
            .await
            .is_err()
        {
            panic!("agent {agent} did not ack command seq {seq} within {ACK_TIMEOUT:?}");
        }
        start.elapsed()
    }

    /// Stops the agents (letting their last reports through), then the
    /// backend, and waits for all of them.
    async fn shutdown(self) {
        let _ = self.stop_agents.send(true);
        for t in self.agent_tasks {
            t.await.expect("agent task panicked").expect("agent failed");
        }
        self.backend.shutdown().await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Append + fsync of a journal-sized line in `dir`, alone: the floor under
/// every dispatch, since the agent syncs its journal before it acks.
fn fsync_baseline(dir: &Path, samples: usize) -> Distribution {
    let path = dir.join("fsync-baseline.log");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("cannot create the fsync baseline file");
    let line = b"{\"a\":123456,\"id\":\"cmd_0123456789abcdef0123456789abcdef\"}\n";
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        file.write_all(line).expect("write failed");
        file.sync_data().expect("fsync failed");
        out.push(start.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    Distribution::new(out)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (and
    // `cargo bench -- --test` adds `--test`): criterion then runs each
    // function once, so keep the extra pass small. `--list` only lists.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let (dispatches, warm_up, fsync_samples) = if has("--list") {
        (0, 0, 0)
    } else if has("--bench") && !has("--test") {
        (
            count_from_env(DISPATCHES_ENV, DEFAULT_DISPATCHES as u64) as usize,
            WARM_UP_DISPATCHES,
            FSYNC_SAMPLES,
        )
    } else {
        (count_from_env(DISPATCHES_ENV, 20) as usize, 5, 20)
    };

    let runtime = Runtime::new().expect("cannot build the tokio runtime");
    // Where the backend's store and the agents' state live: the system's
    // temporary directory unless `UPLINK_BENCH_DIR` names another place
    // (e.g. a tmpfs, to see what the disk costs).
    let dir = bench_dir("uplink-bench-");
    let bench = runtime.block_on(Bench::start(dir.path()));

    let mut criterion = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("dispatch");
        for (mode, agent) in RUNGS.iter().zip(&bench.agents) {
            group.bench_function(mode.name(), |b| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += bench.dispatch(agent).await;
                        }
                        total
                    })
                })
            });
        }
        group.finish();
    }
    criterion.final_summary();

    if dispatches > 0 {
        let mut rows = Vec::new();
        for (mode, agent) in RUNGS.iter().zip(&bench.agents) {
            let samples = runtime.block_on(async {
                for _ in 0..warm_up {
                    bench.dispatch(agent).await;
                }
                let mut samples = Vec::with_capacity(dispatches);
                for _ in 0..dispatches {
                    samples.push(bench.dispatch(agent).await);
                }
                samples
            });
            rows.push((mode.name(), Distribution::new(samples)));
        }
        let fsync = fsync_baseline(dir.path(), fsync_samples);

        println!();
        println!(
            "dispatch latency, enqueue to ack at the backend: {dispatches} dispatches per rung after {warm_up} warm-up"
        );
        println!(
            "{:<10} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}",
            "rung", "n", "p50", "p90", "p99", "max", "mean"
        );
        for (name, d) in &rows {
            println!(
                "{:<10} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}",
                name,
                d.len(),
                ms(d.percentile(50.0)),
                ms(d.percentile(90.0)),
                ms(d.percentile(99.0)),
                ms(d.max()),
                ms(d.mean()),
            );
        }
        println!(
            "{:<10} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}   (journal append + fsync alone, same filesystem)",
            "fsync",
            fsync.len(),
            ms(fsync.percentile(50.0)),
            ms(fsync.percentile(90.0)),
            ms(fsync.percentile(99.0)),
            ms(fsync.max()),
            ms(fsync.mean()),
        );
    }

    runtime.block_on(bench.shutdown());
}
