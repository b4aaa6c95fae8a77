//! Through proxies: the transport ladder and dispatch latency behind an
//! HTTP CONNECT proxy, a TLS-intercepting proxy, and a path that does not
//! carry HTTP/2, all on loopback.
//!
//! Three measurements, in one run, against one backend running in-process
//! (agents run in-process too, each with its own state directory):
//!
//! 1. **First command with HTTP/2 blocked.** A fresh agent
//!    (`--transport auto`, empty state dir) starts. As soon as it has
//!    enrolled (its `identity.json` appears), a `Ping` is queued for it.
//!    Measured from the agent's start until its ack, and until its result,
//!    reach the backend. Paths: through a relay that cuts every TLS
//!    connection offering only `h2` (`testkit/src/relay.rs`, mode
//!    `BlockH2`), and through Debian's squid with ssl_bump (TLS
//!    interception that speaks only HTTP/1.1; the agent trusts only the
//!    interception CA, so it cannot reach the backend unless squid
//!    intercepts). For reference, the same start directly and through
//!    squid's plain CONNECT, where HTTP/2 passes. One unmeasured warm-up
//!    start per path, then `UPLINK_BENCH_RUNS` (default 10).
//! 2. **Climb back to gRPC.** One agent with `--probe-initial 2s
//!    --probe-max 2s` behind the relay. Each round blocks h2, waits until
//!    the backend shows the agent long-polling, keeps h2 blocked for a
//!    dwell spread evenly over two probe intervals (round i of n, from 0:
//!    2i/n of one), unblocks, and measures until the backend's `ListAgents`
//!    shows the agent on gRPC. Short dwells unblock before the first probe;
//!    long ones after it has failed, while the next one is pending.
//!    `UPLINK_BENCH_CLIMBS` rounds (default 10).
//! 3. **Dispatch latency per path.** Enqueue -> ack, as in
//!    `benches/dispatch.rs`, for agents pinned to a rung: gRPC direct,
//!    through squid CONNECT and through a TLS-terminating ingress (nginx
//!    and HAProxy as `docs/ingress/` configures them); long-poll direct,
//!    through squid CONNECT, through squid ssl_bump and through each
//!    ingress. The criterion group `through_proxies`, then
//!    percentiles over `UPLINK_BENCH_DISPATCHES` dispatches per path
//!    (default 1000, after 100 warm-up), the paths taking turns so that
//!    load on the machine falls on all of them alike.
//!
//! squid needs root and the `squid-openssl` package (`tests/run.sh`
//! installs it). Everything lives in a temporary directory under
//! `UPLINK_BENCH_DIR` (default: the system's temporary directory), removed
//! at the end, after the squids have stopped. `UPLINK_LOG` (e.g. `debug`)
//! prints the agents' and backend's logs on stderr.
//!
//! Run: `cargo bench --bench ladder`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use http::Uri;
use tokio::runtime::Runtime;

use uplink::agent::TransportMode;
use uplink::proto::{
    AgentView, CommandState, CreateProviderRequest, GetCommandRequest, ListAgentsRequest,
};
use uplink::secret::Secret;
use uplink_testkit::bench::{BenchBackend, bench_dir};
use uplink_testkit::ingress::{Ingress, RunningIngress};
use uplink_testkit::inprocess::{AgentOpts, Route, RunningAgent};
use uplink_testkit::measure::{Distribution, count_from_env, load_average};
use uplink_testkit::relay::{Mode, Relay};
use uplink_testkit::squid::{Squid, SquidOpts};

/// The probe interval of the climb-back agent (`--probe-initial` and
/// `--probe-max` alike).
const PROBE: Duration = Duration::from_secs(2);
/// Goal: from start to the first command with HTTP/2 blocked.
const START_GOAL: Duration = Duration::from_secs(5);
/// Goal: from unblocking HTTP/2 to the agent back on gRPC.
const CLIMB_GOAL: Duration = Duration::from_secs(3); // PROBE + 1 s

/// Starts per path in pass 1, unless overridden.
const DEFAULT_RUNS: usize = 10;
/// Rounds of block / unblock in pass 2, unless overridden.
const DEFAULT_CLIMBS: usize = 10;
/// Dispatches per path in the percentile pass, unless overridden.
const DEFAULT_DISPATCHES: usize = 1000;
/// Dispatches per path before the percentile pass starts measuring.
const WARM_UP_DISPATCHES: usize = 100;

/// Longest wait for a fresh agent's first ack and result.
const FIRST_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an agent to show on a rung.
const RUNG_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for one ack in the latency pass.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the backend's agent list is read while waiting for a rung.
const RUNG_POLL: Duration = Duration::from_millis(5);

const RUNS_ENV: &str = "UPLINK_BENCH_RUNS";
const CLIMBS_ENV: &str = "UPLINK_BENCH_CLIMBS";
const DISPATCHES_ENV: &str = "UPLINK_BENCH_DISPATCHES";

/// The benchmarks' backend, with the lookups the ladder's scenarios make.
struct Backend(BenchBackend);

impl std::ops::Deref for Backend {
    type Target = BenchBackend;

    fn deref(&self) -> &BenchBackend {
        &self.0
    }
}

impl Backend {
    async fn start(dir: &Path) -> Backend {
        Backend(BenchBackend::start(dir).await)
    }

    /// A provider of its own, so that listing its agents stays cheap.
    async fn provider(&self, name: &str) -> Secret {
        let r = self
            .core
            .create_provider(CreateProviderRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("create_provider failed");
        Secret::new(r.enrollment_token)
    }

    async fn view(&self, provider: &str, agent: &str) -> Option<AgentView> {
        self.core
            .list_agents(ListAgentsRequest {
                provider: provider.into(),
            })
            .await
            .expect("list_agents failed")
            .agents
            .into_iter()
            .find(|a| a.id == agent)
    }

    /// Waits until the backend shows `agent` connected on `rung`; returns
    /// how long that took.
    async fn wait_on(&self, provider: &str, agent: &str, rung: &str, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let v = self.view(provider, agent).await;
            if let Some(v) = &v
                && v.connected
                && uplink::ctl::transport_name(v.transport) == rung
            {
                return start.elapsed();
            }
            if start.elapsed() > RUNG_TIMEOUT {
                panic!(
                    "{what}: not connected on {rung} within {RUNG_TIMEOUT:?}; the backend shows {v:?}"
                );
            }
            tokio::time::sleep(RUNG_POLL).await;
        }
    }

    async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ms3(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn s(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

// ---- pass 1: first command -------------------------------------------

struct StartSample {
    enrolled: Duration,
    ack: Duration,
    result: Duration,
}

/// One fresh agent on `route`: start, enroll, first ping acked and done.
async fn first_command(b: &Backend, route: &Route, state_dir: PathBuf, name: &str) -> StartSample {
    let started = Instant::now();
    let agent = RunningAgent::start(
        route,
        &b.enroll_token,
        state_dir,
        name,
        AgentOpts {
            transport: TransportMode::Auto,
            probe: None,
        },
    );
    let id = agent.enrolled().await;
    let enrolled = started.elapsed();
    let (command, seq) = b.enqueue_ping(&id).await;
    if tokio::time::timeout(FIRST_COMMAND_TIMEOUT, b.core.wait_acked(&id, seq))
        .await
        .is_err()
    {
        panic!(
            "agent {name}: no ack for its first command within {FIRST_COMMAND_TIMEOUT:?}; the backend shows {:?}",
            b.view("", &id).await
        );
    }
    let ack = started.elapsed();
    let view = b
        .core
        .get_command(GetCommandRequest {
            command_id: command.clone(),
            wait_ms: FIRST_COMMAND_TIMEOUT.as_millis() as u32,
        })
        .await
        .expect("get_command failed")
        .command
        .expect("get_command returned no command");
    assert_eq!(
        view.state,
        CommandState::Done as i32,
        "agent {name}: no result for {command}: {view:?}"
    );
    let result = started.elapsed();
    // The rung it delivered on must be the one the route allows.
    let v = b.view("", &id).await.expect("the agent is not listed");
    let rung = uplink::ctl::transport_name(v.transport);
    let expected = if route.h2 { "grpc" } else { "longpoll" };
    assert_eq!(
        rung, expected,
        "agent {name} on {}: delivered on {rung} ({})",
        route.name, v.transport_reason
    );
    if !route.h2 {
        assert!(
            v.transport_reason.contains("HTTP/2 cannot pass"),
            "agent {name} on {}: {}",
            route.name,
            v.transport_reason
        );
    }
    agent.stop().await;
    StartSample {
        enrolled,
        ack,
        result,
    }
}

struct StartRow {
    route: &'static str,
    h2: bool,
    samples: Vec<StartSample>,
}

async fn pass_first_command(
    b: &Backend,
    routes: &[Route],
    dir: &Path,
    runs: usize,
) -> Vec<StartRow> {
    let mut rows = Vec::new();
    for route in routes {
        let _warm = first_command(
            b,
            route,
            dir.join(format!("start-{}-warm", route.name)),
            &format!("start-{}-warm", route.name),
        )
        .await;
        let mut samples = Vec::with_capacity(runs);
        for i in 1..=runs {
            let name = format!("start-{}-{i}", route.name);
            samples.push(first_command(b, route, dir.join(&name), &name).await);
        }
        rows.push(StartRow {
            route: route.name,
            h2: route.h2,
            samples,
        });
    }
    rows
}

fn print_first_command(rows: &[StartRow], runs: usize) {
    println!();
    println!(
        "1. first command of a fresh agent (--transport auto), from agent start; {runs} starts per path after 1 warm-up"
    );
    println!(
        "{:<16} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  goal <= {}",
        "path",
        "h2",
        "enrolled",
        "ack min",
        "ack p50",
        "ack max",
        "done p50",
        "done max",
        s(START_GOAL)
    );
    for r in rows {
        let enrolled = Distribution::new(r.samples.iter().map(|x| x.enrolled).collect());
        let ack = Distribution::new(r.samples.iter().map(|x| x.ack).collect());
        let done = Distribution::new(r.samples.iter().map(|x| x.result).collect());
        let goal = if r.h2 {
            "(reference)"
        } else {
            verdict(done.max() <= START_GOAL)
        };
        println!(
            "{:<16} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {goal}",
            r.route,
            if r.h2 { "passes" } else { "blocked" },
            ms(enrolled.percentile(50.0)),
            ms(ack.min()),
            ms(ack.percentile(50.0)),
            ms(ack.max()),
            ms(done.percentile(50.0)),
            ms(done.max()),
        );
    }
    println!("per start, ack (ms):");
    for r in rows {
        let each: Vec<String> = r
            .samples
            .iter()
            .map(|x| format!("{:.0}", x.ack.as_secs_f64() * 1e3))
            .collect();
        println!("  {:<16} {}", r.route, each.join(" "));
    }
}

// ---- pass 2: climb back ----------------------------------------------

struct ClimbSample {
    fall: Duration,
    dwell: Duration,
    climb: Duration,
}

async fn pass_climb(b: &Backend, dir: &Path, climbs: usize) -> Vec<ClimbSample> {
    let relay = Relay::start(b.addr).await;
    let route = Route {
        name: "relay",
        h2: true,
        url: format!("https://127.0.0.1:{}", relay.addr.port())
            .parse()
            .expect("relay URL"),
        proxy: None,
        ca_files: vec![b.ca.clone()],
    };
    let provider = "climb";
    let token = b.provider(provider).await;
    let agent = RunningAgent::start(
        &route,
        &token,
        dir.join("climb"),
        "climb",
        AgentOpts {
            transport: TransportMode::Auto,
            probe: Some(PROBE),
        },
    );
    let id = agent.enrolled().await;
    b.wait_on(provider, &id, "grpc", "climb agent at start")
        .await;
    let mut out = Vec::with_capacity(climbs);
    for i in 0..climbs {
        relay.set(Mode::BlockH2);
        let fall = b
            .wait_on(
                provider,
                &id,
                "longpoll",
                "climb agent after h2 was blocked",
            )
            .await;
        let dwell = PROBE.mul_f64(2.0 * i as f64 / climbs as f64);
        tokio::time::sleep(dwell).await;
        relay.set(Mode::Forward);
        let climb = b
            .wait_on(provider, &id, "grpc", "climb agent after h2 was unblocked")
            .await;
        out.push(ClimbSample { fall, dwell, climb });
        // Let the new stream settle before the next cut.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A command still gets through after all the switches.
    let (_, seq) = b.enqueue_ping(&id).await;
    tokio::time::timeout(ACK_TIMEOUT, b.core.wait_acked(&id, seq))
        .await
        .expect("the climb agent did not ack a ping after the rounds");
    agent.stop().await;
    out
}

fn print_climb(samples: &[ClimbSample]) {
    println!();
    println!(
        "2. climb back to gRPC after h2 is unblocked; --probe-initial {p:?} --probe-max {p:?} (each probe {lo:?} to {hi:?} after the last)",
        p = PROBE,
        lo = PROBE.mul_f64(0.75),
        hi = PROBE.mul_f64(1.25),
    );
    println!(
        "{:<5} {:>20} {:>8} {:>22}  goal <= {}",
        "round",
        "block -> longpoll",
        "dwell",
        "unblock -> grpc",
        s(CLIMB_GOAL)
    );
    for (i, c) in samples.iter().enumerate() {
        println!(
            "{:<5} {:>20} {:>8} {:>22}  {}",
            i + 1,
            s(c.fall),
            s(c.dwell),
            s(c.climb),
            verdict(c.climb <= CLIMB_GOAL)
        );
    }
    let climb = Distribution::new(samples.iter().map(|c| c.climb).collect());
    let fall = Distribution::new(samples.iter().map(|c| c.fall).collect());
    println!(
        "unblock -> grpc: min {} p50 {} max {}; block -> longpoll: min {} p50 {} max {}",
        s(climb.min()),
        s(climb.percentile(50.0)),
        s(climb.max()),
        s(fall.min()),
        s(fall.percentile(50.0)),
        s(fall.max()),
    );
}

// ---- pass 3: latency -------------------------------------------------

struct LatencyPath {
    rung: &'static str,
    route: &'static str,
    agent: String,
}

async fn start_latency_agents(
    b: &Backend,
    routes: &[(&Route, TransportMode)],
    dir: &Path,
) -> (Vec<LatencyPath>, Vec<RunningAgent>) {
    let provider = "latency";
    let token = b.provider(provider).await;
    let mut agents = Vec::new();
    for (route, mode) in routes {
        let name = format!("lat-{}-{}", mode.name(), route.name);
        agents.push(RunningAgent::start(
            route,
            &token,
            dir.join(&name),
            &name,
            AgentOpts {
                transport: *mode,
                probe: None,
            },
        ));
    }
    let mut paths = Vec::new();
    for ((route, mode), a) in routes.iter().zip(&agents) {
        let id = a.enrolled().await;
        b.wait_on(provider, &id, mode.name(), a.name()).await;
        paths.push(LatencyPath {
            rung: mode.name(),
            route: route.name,
            agent: id,
        });
    }
    (paths, agents)
}

/// One dispatch: enqueue a ping, wait for its ack at the backend.
async fn dispatch(b: &Backend, agent: &str) -> Duration {
    let start = Instant::now();
    let (_, seq) = b.enqueue_ping(agent).await;
    if tokio::time::timeout(ACK_TIMEOUT, b.core.wait_acked(agent, seq))
        .await
        .is_err()
    {
        panic!("agent {agent} did not ack command seq {seq} within {ACK_TIMEOUT:?}");
    }
    start.elapsed()
}

/// Dispatches to every path in turn, `warm_up` rounds unmeasured, then
/// `n` measured rounds.
async fn latency_percentiles(
    b: &Backend,
    paths: &[LatencyPath],
    warm_up: usize,
    n: usize,
) -> Vec<Distribution> {
    for _ in 0..warm_up {
        for p in paths {
            dispatch(b, &p.agent).await;
        }
    }
    let mut samples: Vec<Vec<Duration>> = paths.iter().map(|_| Vec::with_capacity(n)).collect();
    for _ in 0..n {
        for (p, out) in paths.iter().zip(&mut samples) {
            out.push(dispatch(b, &p.agent).await);
        }
    }
    samples.into_iter().map(Distribution::new).collect()
}

fn print_latency(paths: &[LatencyPath], dists: &[Distribution], n: usize, warm_up: usize) {
    println!();
    println!(
        "3. dispatch latency, enqueue to ack at the backend: {n} dispatches per path after {warm_up} warm-up, paths taking turns"
    );
    println!(
        "{:<9} {:<16} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "rung", "path", "n", "p50", "p90", "p99", "max", "mean", "p50 / direct"
    );
    for (p, d) in paths.iter().zip(dists) {
        let direct = paths
            .iter()
            .zip(dists)
            .find(|(q, _)| q.rung == p.rung && q.route == "direct")
            .map(|(_, d)| d.percentile(50.0));
        let ratio = direct
            .map(|base| {
                format!(
                    "{:.2}x",
                    d.percentile(50.0).as_secs_f64() / base.as_secs_f64()
                )
            })
            .unwrap_or_default();
        println!(
            "{:<9} {:<16} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            p.rung,
            p.route,
            d.len(),
            ms3(d.percentile(50.0)),
            ms3(d.percentile(90.0)),
            ms3(d.percentile(99.0)),
            ms3(d.max()),
            ms3(d.mean()),
            ratio,
        );
    }
}

// ---- setup and main --------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // `cargo bench -- --test` adds `--test`: then every pass runs small.
    // `--list` only lists the criterion functions.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let list_only = has("--list");
    let full = has("--bench") && !has("--test");
    let (runs, climbs, dispatches, warm_up) = if full {
        (
            count_from_env(RUNS_ENV, DEFAULT_RUNS as u64) as usize,
            count_from_env(CLIMBS_ENV, DEFAULT_CLIMBS as u64) as usize,
            count_from_env(DISPATCHES_ENV, DEFAULT_DISPATCHES as u64) as usize,
            WARM_UP_DISPATCHES,
        )
    } else {
        (
            count_from_env(RUNS_ENV, 2) as usize,
            count_from_env(CLIMBS_ENV, 2) as usize,
            count_from_env(DISPATCHES_ENV, 20) as usize,
            5,
        )
    };
    if list_only {
        for rung in ["grpc", "longpoll"] {
            for path in [
                "direct",
                "squid-connect",
                "ingress-nginx",
                "ingress-haproxy",
            ] {
                println!("through_proxies/{rung}/{path}: benchmark");
            }
        }
        println!("through_proxies/longpoll/squid-bump: benchmark");
        return;
    }
    if let Ok(filter) = std::env::var("UPLINK_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    if std::process::Command::new("squid")
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        panic!(
            "squid is not installed: this benchmark needs Debian's squid-openssl (tests/run.sh installs it) and root"
        );
    }

    // Dropped last: removed after the squids are killed.
    let dir = bench_dir("uplink-ladder-");
    let runtime = Runtime::new().expect("cannot build the tokio runtime");
    // Squids are killed on drop, also when a pass panics; that needs the
    // runtime's context.
    let _context = runtime.enter();
    let total = Instant::now();
    println!(
        "load average (1, 5, 15 min) at start: {}; state in {}",
        load_average(),
        dir.path().display()
    );

    let backend = runtime.block_on(Backend::start(&dir.path().join("backend")));
    let (plain, bump) = runtime.block_on(async {
        let plain = Squid::start(&dir.path().join("squid-plain"), SquidOpts::default()).await;
        let bump = Squid::start(
            &dir.path().join("squid-bump"),
            SquidOpts {
                bump_upstream_ca: Some(backend.ca.clone()),
                ..Default::default()
            },
        )
        .await;
        (plain, bump)
    });
    let blocker = runtime.block_on(Relay::start(backend.addr));
    blocker.set(Mode::BlockH2);

    let backend_url: Uri = format!("https://127.0.0.1:{}", backend.addr.port())
        .parse()
        .expect("backend URL");
    let direct = Route {
        name: "direct",
        h2: true,
        url: backend_url.clone(),
        proxy: None,
        ca_files: vec![backend.ca.clone()],
    };
    let squid_connect = Route {
        name: "squid-connect",
        h2: true,
        url: backend_url.clone(),
        proxy: Some(plain.url(None)),
        ca_files: vec![backend.ca.clone()],
    };
    let relay_block = Route {
        name: "relay-blockh2",
        h2: false,
        url: format!("https://127.0.0.1:{}", blocker.addr.port())
            .parse()
            .expect("relay URL"),
        proxy: None,
        ca_files: vec![backend.ca.clone()],
    };
    // Only the interception CA: the agent cannot get through unless squid
    // really intercepts.
    let squid_bump = Route {
        name: "squid-bump",
        h2: false,
        url: backend_url,
        proxy: Some(bump.url(None)),
        ca_files: vec![bump.bump_ca.clone().expect("the bumping squid has a CA")],
    };

    // A TLS-terminating ingress in front, configured as the README shows.
    let (nginx, haproxy) = runtime.block_on(async {
        let data_dir = dir.path().join("backend");
        (
            RunningIngress::in_front_of(
                &Ingress::nginx(),
                backend.addr,
                &data_dir,
                &dir.path().join("nginx"),
            )
            .await,
            RunningIngress::in_front_of(
                &Ingress::Haproxy,
                backend.addr,
                &data_dir,
                &dir.path().join("haproxy"),
            )
            .await,
        )
    });
    let ingress_route = |name, ing: &RunningIngress| Route {
        name,
        h2: true,
        url: ing.url().parse().expect("ingress URL"),
        proxy: None,
        ca_files: vec![backend.ca.clone()],
    };
    let via_nginx = ingress_route("ingress-nginx", &nginx);
    let via_haproxy = ingress_route("ingress-haproxy", &haproxy);

    // 1. First command with h2 blocked (and, for reference, not blocked).
    let starts = runtime.block_on(pass_first_command(
        &backend,
        &[
            direct.clone(),
            squid_connect.clone(),
            relay_block,
            squid_bump.clone(),
        ],
        dir.path(),
        runs,
    ));
    print_first_command(&starts, runs);
    drop(blocker);

    // 2. Climb back after h2 is unblocked.
    let climbs = runtime.block_on(pass_climb(&backend, dir.path(), climbs));
    print_climb(&climbs);

    // 3. Dispatch latency per rung and path.
    let (paths, agents) = runtime.block_on(start_latency_agents(
        &backend,
        &[
            (&direct, TransportMode::Grpc),
            (&squid_connect, TransportMode::Grpc),
            (&via_nginx, TransportMode::Grpc),
            (&via_haproxy, TransportMode::Grpc),
            (&direct, TransportMode::Longpoll),
            (&squid_connect, TransportMode::Longpoll),
            (&squid_bump, TransportMode::Longpoll),
            (&via_nginx, TransportMode::Longpoll),
            (&via_haproxy, TransportMode::Longpoll),
        ],
        dir.path(),
    ));
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("through_proxies");
        for p in &paths {
            group.bench_function(BenchmarkId::new(p.rung, p.route), |bencher| {
                bencher.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += dispatch(&backend, &p.agent).await;
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
        let dists = runtime.block_on(latency_percentiles(&backend, &paths, warm_up, dispatches));
        print_latency(&paths, &dists, dispatches, warm_up);
    }

    // Teardown: agents, backend, squids; then the directory.
    runtime.block_on(async {
        for a in agents {
            a.stop().await;
        }
        backend.shutdown().await;
    });
    let squids_stopped = runtime.block_on(async { plain.stop().await & bump.stop().await });
    println!();
    println!(
        "goals: first command with h2 blocked <= {}: {}; climb back <= {} (probe interval + 1 s): {}",
        s(START_GOAL),
        verdict(
            starts
                .iter()
                .filter(|r| !r.h2)
                .all(|r| r.samples.iter().all(|x| x.result <= START_GOAL))
        ),
        s(CLIMB_GOAL),
        verdict(climbs.iter().all(|c| c.climb <= CLIMB_GOAL)),
    );
    println!(
        "whole run {:.0} s; load average at the end: {}; squids {}",
        total.elapsed().as_secs_f64(),
        load_average(),
        if squids_stopped {
            "stopped"
        } else {
            "killed (they did not exit within 5 s of SIGTERM)"
        }
    );
}
