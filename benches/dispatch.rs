//! Command dispatch latency on each rung, over loopback TLS: one backend
//! on SQLite, one backend on PostgreSQL, and two backends sharing one
//! PostgreSQL database with the command queued on one and the agent on
//! the other.
//!
//! One dispatch: a backend enqueues a `Ping` for an agent and waits until
//! that agent's ack for it reaches the backend holding the agent. The
//! measured path is
//!
//! ```text
//! enqueue (store commit) -> wake the agent's stream / held poll -> TLS
//!   -> agent -> journal append + fsync -> ack in a Report (and,
//!   long-polling, in the next Poll) -> TLS -> backend stores the ack
//! ```
//!
//! Three setups, each with two agents (one on the gRPC rung, one
//! long-polling) and its own state:
//!
//! - `sqlite`: one backend on its SQLite file (criterion functions `grpc`
//!   and `longpoll`);
//! - `postgres`: one backend on a PostgreSQL database (`pg_grpc`,
//!   `pg_longpoll`);
//! - `replicas`: backends A and B on another database of the same server,
//!   the agents connected to B, every command queued through A
//!   (`pg_cross_grpc`, `pg_cross_longpoll`). B hears of the command through
//!   the database's `LISTEN`/`NOTIFY`; the ack is awaited on B.
//!
//! PostgreSQL is Debian's server, started on a loopback port in a
//! temporary directory of its own (`uplink_testkit::postgres`, `fsync=off`)
//! and stopped at the end. Backends and agents run in-process on one
//! multi-thread tokio runtime, each with its own state in a temporary
//! directory.
//!
//! Output: the criterion group `dispatch`, then a percentile table
//! (criterion reports no percentiles) over `UPLINK_BENCH_DISPATCHES`
//! dispatches per function (default 2000) after a warm-up of 200, the
//! functions taking turns by blocks of 100 (each after 5 unmeasured) so
//! that load on the machine falls on all of them alike, each p99 also as
//! a multiple of the SQLite p99 on its rung, with the time the enqueue
//! call alone took (its part of the dispatch); and, for comparison, the
//! cost of the journal's append + fsync alone on the same filesystem.
//!
//! `UPLINK_BENCH_SETUPS` (comma-separated, default
//! `sqlite,postgres,replicas`) picks the setups. All state lives in a
//! temporary directory under `UPLINK_BENCH_DIR` (default: the system's
//! temporary directory).
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
use uplink::backend::{BackendConfig, Core};
use uplink::proto::{CommandSpec, EnqueueCommandRequest, Ping, command_spec};
use uplink_testkit::TestBackend;
use uplink_testkit::bench::{backend_config, bench_dir, stopped};
use uplink_testkit::measure::{Distribution, count_from_env, load_average};
use uplink_testkit::postgres::Postgres;

/// Dispatches per function in the percentile pass, unless overridden.
const DEFAULT_DISPATCHES: usize = 2000;
/// Dispatches per function before the percentile pass starts measuring.
const WARM_UP_DISPATCHES: usize = 200;
/// Measured dispatches of one function before the next takes its turn.
const BLOCK: usize = 100;
/// Unmeasured dispatches at the start of each block.
const SETTLE: usize = 5;
/// Appends measured for the journal fsync baseline.
const FSYNC_SAMPLES: usize = 500;
/// Longest wait for one ack before the benchmark gives up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for both agents of a setup to enroll and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable overriding [`DEFAULT_DISPATCHES`].
const DISPATCHES_ENV: &str = "UPLINK_BENCH_DISPATCHES";
/// Environment variable naming the setups to measure.
const SETUPS_ENV: &str = "UPLINK_BENCH_SETUPS";

/// The rungs, in the order they are measured.
const RUNGS: [TransportMode; 2] = [TransportMode::Grpc, TransportMode::Longpoll];

/// Where the store is, and which backend queues the commands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// One backend on SQLite.
    Sqlite,
    /// One backend on PostgreSQL.
    Postgres,
    /// Two backends on one PostgreSQL database: queued on A, agent on B.
    Replicas,
}

const SETUPS: [Setup; 3] = [Setup::Sqlite, Setup::Postgres, Setup::Replicas];

impl Setup {
    /// Its name in `UPLINK_BENCH_SETUPS`, in its state dir and in messages.
    fn name(self) -> &'static str {
        match self {
            Setup::Sqlite => "sqlite",
            Setup::Postgres => "postgres",
            Setup::Replicas => "replicas",
        }
    }

    /// The criterion function measuring `rung` in this setup.
    fn function(self, rung: TransportMode) -> String {
        match self {
            Setup::Sqlite => rung.name().to_string(),
            Setup::Postgres => format!("pg_{}", rung.name()),
            Setup::Replicas => format!("pg_cross_{}", rung.name()),
        }
    }

    fn uses_postgres(self) -> bool {
        self != Setup::Sqlite
    }

    /// The setups `UPLINK_BENCH_SETUPS` names, in measuring order; all of
    /// them when it is not set.
    fn from_env() -> Vec<Setup> {
        let Ok(v) = std::env::var(SETUPS_ENV) else {
            return SETUPS.to_vec();
        };
        let wanted: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        for w in &wanted {
            assert!(
                SETUPS.iter().any(|s| s.name() == *w),
                "{SETUPS_ENV}={v:?}: {w:?} is not one of sqlite, postgres, replicas"
            );
        }
        SETUPS
            .into_iter()
            .filter(|s| wanted.contains(&s.name()))
            .collect()
    }
}

async fn start_backend(cfg: BackendConfig) -> TestBackend {
    TestBackend::start_with(cfg, "127.0.0.1:0".parse().expect("an address")).await
}

/// The backends of one setup and one agent per rung, running.
struct Deployment {
    setup: Setup,
    /// Commands are queued through the first; the agents are on the last
    /// (the same backend but in [`Setup::Replicas`]).
    backends: Vec<TestBackend>,
    /// Agent ids, in the order of [`RUNGS`].
    agents: Vec<String>,
    stop_agents: watch::Sender<bool>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
}

fn hostname(mode: TransportMode) -> String {
    format!("bench-{}", mode.name())
}

impl Deployment {
    /// Starts `setup` with its state under `dir`, its database (if any) on
    /// `pg`.
    async fn start(setup: Setup, dir: &Path, pg: Option<&Postgres>) -> Deployment {
        let dir = dir.join(setup.name());
        let mut database = None;
        if setup.uses_postgres() {
            let pg = pg.expect("PostgreSQL is running");
            database = Some(pg.fresh_database().await);
        }
        let mut backends = Vec::new();
        match setup {
            Setup::Sqlite | Setup::Postgres => {
                let cfg = backend_config(&dir.join("backend"), database.as_deref());
                backends.push(start_backend(cfg).await);
            }
            Setup::Replicas => {
                // B shares A's tokens and database; its data dir is its own.
                let a = backend_config(&dir.join("a"), database.as_deref());
                let mut b = a.clone();
                b.data_dir = dir.join("b");
                backends.push(start_backend(a).await);
                backends.push(start_backend(b).await);
            }
        }
        let home = backends.last().expect("a backend");
        let (stop_agents, rx) = watch::channel(false);
        let mut agent_tasks = Vec::new();
        for mode in RUNGS {
            let mut acfg =
                AgentConfig::new(home.url.clone(), dir.join(format!("agent-{}", mode.name())));
            acfg.token = Some(home.enroll_token.clone());
            acfg.trust = home.trust();
            acfg.transport = mode;
            acfg.hostname = hostname(mode);
            acfg.grace = Duration::from_secs(2);
            agent_tasks.push(tokio::spawn(agent::run(acfg, stopped(rx.clone()))));
        }

        // Both agents enroll, then open their stream or first held poll.
        let started = Instant::now();
        let agents = loop {
            let list = home
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
                    "the {} bench agents did not both connect within {CONNECT_TIMEOUT:?}; the backend knows: [{}]",
                    setup.name(),
                    seen.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Deployment {
            setup,
            backends,
            agents,
            stop_agents,
            agent_tasks,
        }
    }

    /// The backend commands are queued through.
    fn queue(&self) -> &Core {
        &self.backends[0].core
    }

    /// The backend holding the agents' connections.
    fn home(&self) -> &Core {
        &self.backends[self.backends.len() - 1].core
    }

    /// One dispatch to `agent`: enqueue a ping, wait for its ack. Returns the
    /// time from just before the enqueue to the ack's arrival, and the part
    /// of it the enqueue took.
    async fn dispatch(&self, agent: &str) -> (Duration, Duration) {
        let start = Instant::now();
        let seq = enqueue_ping(self.queue(), agent).await;
        let queued = start.elapsed();
        if tokio::time::timeout(ACK_TIMEOUT, self.home().wait_acked(agent, seq))
            .await
            .is_err()
        {
            panic!(
                "{}: agent {agent} did not ack command seq {seq} within {ACK_TIMEOUT:?}",
                self.setup.name()
            );
        }
        (start.elapsed(), queued)
    }

    /// Stops the agents (letting their last reports through), then the
    /// backends, and waits for all of them.
    async fn shutdown(self) {
        let _ = self.stop_agents.send(true);
        for t in self.agent_tasks {
            t.await.expect("agent task panicked").expect("agent failed");
        }
        for b in self.backends.into_iter().rev() {
            b.stop().await;
        }
    }
}

/// Queues a ping for `agent` on `core`; returns its seq.
async fn enqueue_ping(core: &Core, agent: &str) -> u64 {
    core.enqueue(EnqueueCommandRequest {
        agent_id: agent.to_string(),
        spec: Some(CommandSpec {
            kind: Some(command_spec::Kind::Ping(Ping::default())),
        }),
        ..Default::default()
    })
    .await
    .expect("enqueue failed")
    .command
    .expect("enqueue returned no command")
    .seq
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

/// One measured path: a setup's agent on one rung.
struct Measured<'a> {
    deployment: &'a Deployment,
    rung: TransportMode,
    agent: &'a str,
}

/// Dispatches on every path, `warm_up` unmeasured, then `n` measured in
/// blocks of [`BLOCK`], the paths taking turns by block. Each block starts
/// with [`SETTLE`] unmeasured dispatches, so that what the previous path
/// left running (its last result stored, its store's notifications) is
/// not counted against this one. Per path: the dispatches, and their
/// enqueues alone.
async fn percentiles(
    paths: &[Measured<'_>],
    warm_up: usize,
    n: usize,
) -> Vec<(Distribution, Distribution)> {
    for p in paths {
        for _ in 0..warm_up {
            p.deployment.dispatch(p.agent).await;
        }
    }
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = paths
        .iter()
        .map(|_| (Vec::with_capacity(n), Vec::with_capacity(n)))
        .collect();
    let mut left = n;
    while left > 0 {
        let block = left.min(BLOCK);
        for (p, (total, queued)) in paths.iter().zip(&mut samples) {
            for _ in 0..SETTLE {
                p.deployment.dispatch(p.agent).await;
            }
            for _ in 0..block {
                let (t, q) = p.deployment.dispatch(p.agent).await;
                total.push(t);
                queued.push(q);
            }
        }
        left -= block;
    }
    samples
        .into_iter()
        .map(|(t, q)| (Distribution::new(t), Distribution::new(q)))
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (and
    // `cargo bench -- --test` adds `--test`): criterion then runs each
    // function once, so keep the extra pass small. `--list` only lists.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let setups = Setup::from_env();
    if has("--list") {
        for setup in &setups {
            for rung in RUNGS {
                println!("dispatch/{}: benchmark", setup.function(rung));
            }
        }
        return;
    }
    let (dispatches, warm_up, fsync_samples) = if has("--bench") && !has("--test") {
        (
            count_from_env(DISPATCHES_ENV, DEFAULT_DISPATCHES as u64) as usize,
            WARM_UP_DISPATCHES,
            FSYNC_SAMPLES,
        )
    } else {
        (count_from_env(DISPATCHES_ENV, 20) as usize, 5, 20)
    };

    let runtime = Runtime::new().expect("cannot build the tokio runtime");
    // Where the backends' stores and the agents' state live: the system's
    // temporary directory unless `UPLINK_BENCH_DIR` names another place
    // (e.g. a tmpfs, to see what the disk costs).
    let dir = bench_dir("uplink-bench-");
    let pg = setups
        .iter()
        .any(|s| s.uses_postgres())
        .then(|| runtime.block_on(Postgres::start()));
    let load_before = load_average();
    let deployments: Vec<Deployment> = setups
        .iter()
        .map(|s| runtime.block_on(Deployment::start(*s, dir.path(), pg.as_ref())))
        .collect();
    let paths: Vec<Measured> = deployments
        .iter()
        .flat_map(|d| {
            RUNGS
                .iter()
                .zip(&d.agents)
                .map(move |(rung, agent)| Measured {
                    deployment: d,
                    rung: *rung,
                    agent,
                })
        })
        .collect();

    let mut criterion = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("dispatch");
        for p in &paths {
            group.bench_function(p.deployment.setup.function(p.rung), |b| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += p.deployment.dispatch(p.agent).await.0;
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
        let dists = runtime.block_on(percentiles(&paths, warm_up, dispatches));
        let fsync = fsync_baseline(dir.path(), fsync_samples);

        println!();
        println!(
            "dispatch latency, enqueue to ack at the agent's backend: {dispatches} dispatches per function after {warm_up} warm-up, functions taking turns by blocks of {BLOCK}"
        );
        println!(
            "{:<18} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11} {:>13} {:>13} {:>13}",
            "function",
            "n",
            "p50",
            "p90",
            "p99",
            "max",
            "mean",
            "p99 / sqlite",
            "enqueue p50",
            "enqueue p99"
        );
        for (p, (d, queued)) in paths.iter().zip(&dists) {
            let sqlite = paths
                .iter()
                .zip(&dists)
                .find(|(q, _)| q.deployment.setup == Setup::Sqlite && q.rung == p.rung)
                .map(|(_, (d, _))| d.percentile(99.0));
            let ratio = sqlite
                .map(|base| {
                    format!(
                        "{:.2}x",
                        d.percentile(99.0).as_secs_f64() / base.as_secs_f64()
                    )
                })
                .unwrap_or_default();
            println!(
                "{:<18} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11} {:>13} {:>13} {:>13}",
                p.deployment.setup.function(p.rung),
                d.len(),
                ms(d.percentile(50.0)),
                ms(d.percentile(90.0)),
                ms(d.percentile(99.0)),
                ms(d.max()),
                ms(d.mean()),
                ratio,
                ms(queued.percentile(50.0)),
                ms(queued.percentile(99.0)),
            );
        }
        println!(
            "{:<18} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}   (journal append + fsync alone, same filesystem)",
            "fsync",
            fsync.len(),
            ms(fsync.percentile(50.0)),
            ms(fsync.percentile(90.0)),
            ms(fsync.percentile(99.0)),
            ms(fsync.max()),
            ms(fsync.mean()),
        );
        println!(
            "load average (1, 5, 15 min): {load_before} at the start, {} at the end",
            load_average()
        );
    }

    drop(paths);
    runtime.block_on(async {
        for d in deployments {
            d.shutdown().await;
        }
    });
    drop(pg);
}
