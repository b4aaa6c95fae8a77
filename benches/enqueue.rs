//! Enqueue throughput: commands per second that `EnqueueCommand` sustains
//! through the admin API, the way `uplink ctl` queues a command (Connect
//! over HTTP/1.1, TLS on loopback, keep-alive), on SQLite and on
//! PostgreSQL, with 1 and with 16 callers at once.
//!
//! Each setup is one backend on its store with 16 agents enrolled through
//! the backend's core and never connected: commands only pile up, nothing
//! consumes them, so what is measured is the admin call and the store's
//! commit (on PostgreSQL also the `NOTIFY` that wakes other replicas).
//! Each caller is an admin client of its own (one keep-alive connection)
//! queueing `Ping {}` for an agent of its own, one call after another.
//!
//! PostgreSQL is Debian's server, started on a loopback port in a
//! temporary directory of its own (`uplink_testkit::postgres`, `fsync=off`)
//! and stopped at the end.
//!
//! Output: the criterion group `enqueue` (functions `sqlite/1`,
//! `sqlite/16`, `postgres/1`, `postgres/16`; throughput in commands), then
//! a table over `UPLINK_BENCH_ROUNDS` rounds (default 5) of
//! `UPLINK_BENCH_ENQUEUES` commands each (default 1000) per function, the
//! functions taking turns: commands per second (median, lowest and
//! highest round) and the latency of one call (p50, p99).
//!
//! The SQLite file lives in a temporary directory under `UPLINK_BENCH_DIR`
//! (default: the system's temporary directory).
//!
//! Run: `cargo bench --bench enqueue`.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use tokio::runtime::Runtime;

use uplink::ctl::Admin;
use uplink::proto::{AgentInfo, CommandSpec, EnrollRequest, Ping, command_spec};
use uplink_testkit::TestBackend;
use uplink_testkit::bench::{backend_config, bench_dir};
use uplink_testkit::measure::{Distribution, count_from_env, load_average};
use uplink_testkit::postgres::Postgres;
use uplink_testkit::throughput::median;

/// Callers at once, per function.
const CALLERS: [usize; 2] = [1, 16];
/// Rounds of the table's pass, unless overridden.
const DEFAULT_ROUNDS: u64 = 5;
/// Commands per round and function, unless overridden.
const DEFAULT_ENQUEUES: u64 = 1000;
/// Commands per function before the table's pass starts measuring.
const WARM_UP_ENQUEUES: usize = 200;
/// Environment variables overriding [`DEFAULT_ROUNDS`] and
/// [`DEFAULT_ENQUEUES`].
const ROUNDS_ENV: &str = "UPLINK_BENCH_ROUNDS";
const ENQUEUES_ENV: &str = "UPLINK_BENCH_ENQUEUES";

/// A backend on one store, its agents enrolled, its admin clients.
struct Setup {
    store: &'static str,
    backend: TestBackend,
    /// One per caller, each with an agent of its own.
    callers: Vec<(Admin, String)>,
}

impl Setup {
    /// Starts a backend with its data dir in `dir`, its store in
    /// `database` when given, and enrolls an agent per caller.
    async fn start(store: &'static str, dir: &Path, database: Option<String>) -> Setup {
        let cfg = backend_config(dir, database.as_deref());
        let backend =
            TestBackend::start_with(cfg, "127.0.0.1:0".parse().expect("an address")).await;
        let mut callers = Vec::new();
        for i in 0..CALLERS.iter().copied().max().unwrap_or(1) {
            let agent = backend
                .core
                .enroll(EnrollRequest {
                    enrollment_token: backend.enroll_token.expose().to_string(),
                    info: Some(AgentInfo {
                        hostname: format!("bench-enqueue-{i}"),
                        version: "bench".into(),
                        ..Default::default()
                    }),
                    idempotency_key: String::new(),
                })
                .await
                .expect("enroll failed")
                .agent_id;
            callers.push((backend.admin(), agent));
        }
        Setup {
            store,
            backend,
            callers,
        }
    }

    /// `n` commands queued by `callers` callers at once, shared out evenly;
    /// the wall time, and each call's time when `latencies`.
    async fn enqueue(&self, callers: usize, n: u64, latencies: bool) -> (Duration, Vec<Duration>) {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(callers);
        for (i, (admin, agent)) in self.callers.iter().take(callers).enumerate() {
            let share = n / callers as u64 + u64::from((i as u64) < n % callers as u64);
            let (admin, agent) = (admin.clone(), agent.clone());
            tasks.push(tokio::spawn(async move {
                let mut took = Vec::new();
                for _ in 0..share {
                    let t = Instant::now();
                    admin
                        .enqueue(&agent, ping())
                        .await
                        .unwrap_or_else(|e| panic!("EnqueueCommand failed: {}", e.message));
                    if latencies {
                        took.push(t.elapsed());
                    }
                }
                took
            }));
        }
        let mut took = Vec::new();
        for t in tasks {
            took.extend(t.await.expect("caller panicked"));
        }
        (start.elapsed(), took)
    }
}

fn ping() -> CommandSpec {
    CommandSpec {
        kind: Some(command_spec::Kind::Ping(Ping::default())),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (and
    // `cargo bench -- --test` adds `--test`): criterion then runs each
    // function once, so keep the extra pass small. `--list` only lists.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--list") {
        for store in ["sqlite", "postgres"] {
            for callers in CALLERS {
                println!("enqueue/{store}/{callers}: benchmark");
            }
        }
        return;
    }
    let (rounds, per_round, warm_up) = if has("--bench") && !has("--test") {
        (
            count_from_env(ROUNDS_ENV, DEFAULT_ROUNDS) as usize,
            count_from_env(ENQUEUES_ENV, DEFAULT_ENQUEUES),
            WARM_UP_ENQUEUES,
        )
    } else {
        (
            count_from_env(ROUNDS_ENV, 1) as usize,
            count_from_env(ENQUEUES_ENV, 32),
            16,
        )
    };

    let runtime = Runtime::new().expect("cannot build the tokio runtime");
    let dir = bench_dir("uplink-bench-enqueue-");
    let pg = runtime.block_on(Postgres::start());
    let load_before = load_average();
    let setups = runtime.block_on(async {
        let sqlite = Setup::start("sqlite", &dir.path().join("sqlite"), None).await;
        let url = pg.fresh_database().await;
        let postgres = Setup::start("postgres", &dir.path().join("postgres"), Some(url)).await;
        vec![sqlite, postgres]
    });

    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("enqueue");
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(Throughput::Elements(1));
        for s in &setups {
            for callers in CALLERS {
                group.bench_function(BenchmarkId::new(s.store, callers), |b| {
                    b.iter_custom(|iters| runtime.block_on(s.enqueue(callers, iters, false)).0)
                });
            }
        }
        group.finish();
    }
    criterion.final_summary();

    if rounds > 0 && per_round > 0 {
        let functions: Vec<(&Setup, usize)> = setups
            .iter()
            .flat_map(|s| CALLERS.map(|c| (s, c)))
            .collect();
        let mut rates: Vec<Vec<f64>> = functions.iter().map(|_| Vec::new()).collect();
        let mut calls: Vec<Vec<Duration>> = functions.iter().map(|_| Vec::new()).collect();
        runtime.block_on(async {
            for (s, c) in &functions {
                s.enqueue(*c, warm_up as u64, false).await;
            }
            for _ in 0..rounds {
                for (i, (s, c)) in functions.iter().enumerate() {
                    let (wall, took) = s.enqueue(*c, per_round, true).await;
                    rates[i].push(per_round as f64 / wall.as_secs_f64());
                    calls[i].extend(took);
                }
            }
        });

        println!();
        println!(
            "EnqueueCommand through the admin API: {rounds} rounds of {per_round} commands per function after {warm_up} warm-up, functions taking turns"
        );
        println!(
            "{:<10} {:>7} {:>12} {:>12} {:>12} {:>11} {:>11}",
            "store", "callers", "commands/s", "lowest", "highest", "call p50", "call p99"
        );
        for (((s, c), r), d) in functions.iter().zip(rates).zip(calls) {
            let d = Distribution::new(d);
            let lowest = r.iter().copied().fold(f64::INFINITY, f64::min);
            let highest = r.iter().copied().fold(0.0, f64::max);
            println!(
                "{:<10} {:>7} {:>12.0} {:>12.0} {:>12.0} {:>11} {:>11}",
                s.store,
                c,
                median(r),
                lowest,
                highest,
                ms(d.percentile(50.0)),
                ms(d.percentile(99.0)),
            );
        }
        println!(
            "load average (1, 5, 15 min): {load_before} at the start, {} at the end",
            load_average()
        );
    }

    runtime.block_on(async {
        for s in setups {
            s.backend.stop().await;
        }
    });
    drop(pg);
}
