//! The seeded chaos soak: a backend, agents on every rung (two through
//! squid), real containers through the real Docker engine and a numbered
//! metrics stream, under random faults drawn from a seed for a set time:
//! agents and the backend killed with SIGKILL and started again on their
//! data, tunnels cut, HTTP/2 blocked, the Docker engine unreachable, squid
//! restarted, an agent's state dir full, its disk slow. Then the invariants: every
//! command executed at most once and exactly once when it reports success,
//! every numbered sample stored exactly once or counted as dropped, no
//! panic, memory bounded. Beside it, a short test that the sample check
//! holds over more backend starts than a backend keeps JSON-lines files.
//!
//! `UPLINK_CHAOS_SEED=N` replays a run's faults and commands;
//! `UPLINK_CHAOS_SECS` sets its length (default `chaos::DEFAULT_SECS`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uplink::proto::{self, CommandStatus, command_spec::Kind};
use uplink_testkit::chaos::stream::{Stored, scrape_agent, value};
use uplink_testkit::chaos::{
    AgentProc, BackendProc, DockerRelay, SlowDisk, SmallDisk, Stream, panics, rss_bytes,
    seed_and_length,
};
use uplink_testkit::docker::{LOCAL_IMAGE, Registry, remove_containers_of};
use uplink_testkit::relay::{Mode, Relay};
use uplink_testkit::squid::{Squid, SquidOpts};
use uplink_testkit::*;

/// Peak resident memory allowed to the backend and to each agent.
const BACKEND_RSS_MAX: u64 = 256 << 20;
const AGENT_RSS_MAX: u64 = 128 << 20;
/// Numbered samples a second into each metrics agent.
const SAMPLES_PER_SECOND: u64 = 200;
/// The size of the disk under the first metrics agent's state dir.
const DISK_BYTES: u64 = 8 << 20;
/// What that disk allows the agent a second while it is slow: bytes and
/// operations, of reads and of writes (each sync takes 100 ms or more).
const SLOW_BYTES_PER_SEC: u64 = 64 << 10;
const SLOW_OPS_PER_SEC: u64 = 10;

/// Prints the seed again when the test fails, and removes the containers
/// of every agent of the run.
struct Guard {
    seed: u64,
    secs: u64,
    agent_ids: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for id in &self.agent_ids {
            remove_containers_of(id);
        }
        if std::thread::panicking() {
            eprintln!(
                "chaos soak FAILED with seed {}: replay with UPLINK_CHAOS_SEED={} UPLINK_CHAOS_SECS={}",
                self.seed, self.seed, self.secs
            );
        }
    }
}

/// A fault the soak applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of a command agent, started again on its state dir.
    KillAgent(usize),
    /// SIGKILL of the backend, started again on its port and data dir.
    KillBackend,
    /// Every open connection through the relays cut.
    CutTunnels,
    /// HTTP/2 refused by the relays for a while.
    BlockH2,
    /// The Docker engine unreachable for a while.
    DockerDown,
    /// The first metrics agent's state dir full for a while.
    DiskFull,
    /// The first metrics agent's disk throttled to a few operations a
    /// second for a while.
    SlowDisk,
    /// squid stopped and started again on its port.
    RestartSquid,
}

/// Faults that last: when each ends.
#[derive(Default)]
struct Lasting {
    h2: Option<Instant>,
    docker: Option<Instant>,
    disk: Option<Instant>,
    slow: Option<(Instant, u32)>,
    /// When m-auto went into the slow cgroup, and how long it has been in
    /// it over the whole run.
    slow_since: Option<Instant>,
    slowed: Duration,
}

impl Lasting {
    fn slow_ends(&mut self, now: Instant) {
        if let Some(since) = self.slow_since.take() {
            self.slowed += now - since;
        }
        self.slow = None;
    }
}

/// The command agents (killed by the soak) and the metrics agents (never
/// killed, so their drop counters cover the whole run).
const COMMAND_AGENTS: usize = 4;
/// The index of `m-auto`, whose state dir is on the small disk.
const M_AUTO: usize = 4;

/// A queued command: its id, what it does and the agent it went to.
struct Queued {
    id: String,
    what: &'static str,
    agent: usize,
}

fn pick_command(rng: &mut fastrand::Rng, image: &str) -> (&'static str, Kind) {
    match rng.u32(0..20) {
        0..10 => (
            "ping",
            Kind::Ping(proto::Ping {
                delay_ms: rng.u32(0..1500),
                payload: "chaos".into(),
            }),
        ),
        10..17 => (
            "run",
            Kind::RunContainer(proto::RunContainer {
                image: LOCAL_IMAGE.into(),
                command: vec!["sh".into(), "-c".into(), "sleep 1".into()],
                cpus: 0.2,
                memory_bytes: 32 << 20,
                ..Default::default()
            }),
        ),
        _ => (
            "pull",
            Kind::PullImage(proto::PullImage {
                image: image.into(),
                auth: None,
            }),
        ),
    }
}

/// Enqueues a command every 0.3-0.9 s on a random agent until `stop`;
/// enqueues the backend refused or did not answer are not counted.
fn queue_commands(
    admin: uplink::ctl::Admin,
    ids: Vec<String>,
    image: String,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Queued>> {
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x00c0_ffee);
        let mut queued = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let agent = rng.usize(0..ids.len());
            let (what, kind) = pick_command(&mut rng, &image);
            let spec = proto::CommandSpec { kind: Some(kind) };
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_secs(10), admin.enqueue(&ids[agent], spec))
                    .await
            {
                queued.push(Queued {
                    id: c.id,
                    what,
                    agent,
                });
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(300..900))).await;
        }
        queued
    })
}

/// For each agent id, how many containers carry each command id.
fn containers_per_command(agent_ids: &[String]) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for id in agent_ids {
        let out = std::process::Command::new("docker")
            .args(["ps", "-a", "--filter"])
            .arg(format!("label=uplink.agent={id}"))
            .args(["--format", "{{.Label \"uplink.command\"}}"])
            .output()
            .expect("docker ps runs");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            *per.entry(line.trim().to_string()).or_insert(0) += 1;
        }
    }
    per
}

/// Waits up to `within` until each of the numbers `1..=sent` of `source`
/// is in the backend's JSON lines (`jsonl`) exactly once or counted as
/// dropped by the agent whose self-metrics are at `listen` (as many
/// missing as counted), and its spool is empty; prints the tally, and
/// fails when it does not settle or a number was stored twice.
async fn samples_settle(
    jsonl: &std::path::Path,
    source: &str,
    sent: u64,
    listen: SocketAddr,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let page = scrape_agent(listen).await.unwrap_or_default();
        let dropped = value(&page, "uplink_agent_spool_dropped_samples_total")
            + value(&page, "uplink_agent_metric_samples_refused_total");
        let spooled = value(&page, "uplink_agent_spool_batches");
        let stored = Stored::read(jsonl);
        let t = stored.tally(source, sent);
        let missing = t.missing;
        // Exactly: a sample counted as dropped and stored as well would
        // hide one lost without a count.
        let settled = !page.is_empty() && spooled == 0 && missing == dropped;
        if settled || Instant::now() > deadline {
            eprintln!(
                "chaos: {source}: {sent} sent, {} stored once, {} stored again by the start after a backend crash, {} stored twice by one start, {missing} missing, {dropped} counted as dropped, {} torn JSON lines",
                t.once, t.again_after_a_crash, t.twice_in_one_start, stored.torn_lines
            );
            assert!(sent > 0, "{source}: no sample was sent");
            assert!(
                settled,
                "{source}: {missing} samples not stored against {dropped} counted as dropped, {spooled} batches still spooled"
            );
            assert_eq!(
                t.twice_in_one_start, 0,
                "{source}: samples stored twice by one backend start"
            );
            assert_eq!(
                t.again_after_a_crash, 0,
                "{source}: samples stored again by the backend start after a crash"
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The next fault; `slow` when the disk can be slowed down here.
fn pick_fault(rng: &mut fastrand::Rng, slow: bool) -> Fault {
    loop {
        let f = match rng.u32(0..15) {
            0..4 => Fault::KillAgent(rng.usize(0..COMMAND_AGENTS)),
            4..6 => Fault::KillBackend,
            6..8 => Fault::CutTunnels,
            8..10 => Fault::BlockH2,
            10..12 => Fault::DockerDown,
            12 => Fault::DiskFull,
            13 => Fault::SlowDisk,
            _ => Fault::RestartSquid,
        };
        if f != Fault::SlowDisk || slow {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_soak_keeps_every_invariant() {
    let (seed, length) = seed_and_length();
    eprintln!(
        "chaos seed {seed}, {} s: replay with UPLINK_CHAOS_SEED={seed} UPLINK_CHAOS_SECS={}",
        length.as_secs(),
        length.as_secs()
    );
    let mut guard = Guard {
        seed,
        secs: length.as_secs(),
        agent_ids: Vec::new(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(dir).await;
    let mut b = BackendProc::start(&dir.join("backend")).await;
    let target: SocketAddr = format!("127.0.0.1:{}", b.port).parse().unwrap();
    let relays = [Relay::start(target).await, Relay::start(target).await];
    let squid_dir = dir.join("squid");
    let mut squid = Some(Squid::start(&squid_dir, SquidOpts::default()).await);
    let squid_port = squid.as_ref().unwrap().port;
    let proxy = squid.as_ref().unwrap().url(None);
    let docker = DockerRelay::start(&dir.join("docker.sock"));
    let disk = SmallDisk::mount(&dir.join("m-auto"), &dir.join("m-auto.img"), DISK_BYTES)
        .unwrap_or_else(|e| {
            panic!("a small disk for m-auto's state dir (the soak mounts one): {e}")
        });
    let slow = match disk.device() {
        Some(dev) => SlowDisk::new(dev, SLOW_BYTES_PER_SEC, SLOW_OPS_PER_SEC)
            .map_err(|e| eprintln!("no slow disk fault: {e}"))
            .ok(),
        None => None,
    };
    match &slow {
        Some(s) => {
            let took = s
                .time_synced_writes(&disk.path, 10)
                .expect("synced writes on the slow disk");
            eprintln!(
                "chaos: m-auto's state dir on {} of {} MiB; slowed down, 10 synced 4 KiB writes take {took:?}",
                disk.kind,
                DISK_BYTES >> 20
            );
        }
        None => eprintln!(
            "chaos: m-auto's state dir on {} of {} MiB; it cannot be slowed down here",
            disk.kind,
            DISK_BYTES >> 20
        ),
    }
    let ops_before = match (&slow, disk.device()) {
        (Some(s), Some(dev)) => s.ops(dev),
        _ => 0,
    };

    // name, transport, route (relay index, or squid), metrics agent.
    let plan: [(&str, &str, Option<usize>, bool); 6] = [
        ("c-grpc", "grpc", Some(0), false),
        ("c-longpoll", "longpoll", Some(0), false),
        ("c-auto", "auto", Some(1), false),
        ("c-squid", "auto", None, false),
        ("m-auto", "auto", Some(1), true),
        ("m-squid", "longpoll", None, true),
    ];
    assert_eq!(plan[M_AUTO].0, "m-auto");
    let envs = vec![("DOCKER_HOST".to_string(), docker.docker_host())];
    let mut agents = Vec::new();
    let mut ingest = Vec::new();
    for (name, transport, route, metrics) in plan {
        let url = match route {
            Some(r) => format!("https://{}", relays[r].addr),
            None => b.url(),
        };
        let mut args: Vec<String> = [
            "--transport",
            transport,
            "--probe-initial",
            "5s",
            "--probe-max",
            "15s",
        ]
        .map(String::from)
        .to_vec();
        if route.is_none() {
            args.extend(["--proxy".to_string(), proxy.clone()]);
        }
        if metrics {
            let graphite = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            for (flag, v) in [
                ("--ingest-graphite", graphite.to_string()),
                ("--metrics-listen", listen.to_string()),
                ("--metrics-interval", "0s".into()),
                ("--metrics-batch-age", "1s".into()),
            ] {
                args.extend([flag.to_string(), v]);
            }
            ingest.push((name, graphite, listen));
        } else {
            args.push("--no-metrics".into());
        }
        let host = format!("chaos-{seed}-{name}");
        agents.push(AgentProc::start(
            &b,
            &url,
            &dir.join(name),
            &host,
            &args,
            &envs,
        ));
    }
    let admin = b.admin();
    let ids: Vec<String> = wait_for(Duration::from_secs(60), "every agent connected", || async {
        let all = admin.agents("").await.ok()?;
        agents
            .iter()
            .map(|a| {
                all.iter()
                    .find(|v| v.hostname == a.hostname && v.connected)
                    .map(|v| v.id.clone())
            })
            .collect::<Option<Vec<_>>>()
    })
    .await;
    guard.agent_ids = ids.clone();
    let mut streams: Vec<(Stream, SocketAddr)> = ingest
        .iter()
        .map(|(name, graphite, listen)| {
            (Stream::start(name, *graphite, SAMPLES_PER_SECOND), *listen)
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let queue = queue_commands(
        admin.clone(),
        ids.clone(),
        registry.image(),
        seed,
        stop.clone(),
    );

    // The faults.
    let mut rng = fastrand::Rng::with_seed(seed);
    let start = Instant::now();
    let mut lasting = Lasting::default();
    let mut log: Vec<(f64, Fault)> = Vec::new();
    let mut peak = HashMap::<String, u64>::new();
    let sample_rss = |peak: &mut HashMap<String, u64>, b: &BackendProc, agents: &[AgentProc]| {
        let procs = std::iter::once(("backend".to_string(), b.pid()))
            .chain(agents.iter().map(|a| (a.hostname.clone(), a.pid())));
        for (name, pid) in procs {
            let rss = pid.map_or(0, rss_bytes);
            let p = peak.entry(name).or_default();
            *p = (*p).max(rss);
        }
    };
    while start.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(rng.u64(2000..6000))).await;
        sample_rss(&mut peak, &b, &agents);
        let now = Instant::now();
        if lasting.h2.is_some_and(|t| t <= now) {
            relays.iter().for_each(|r| r.set(Mode::Forward));
            lasting.h2 = None;
        }
        if lasting.docker.is_some_and(|t| t <= now) {
            docker.set_up(true);
            lasting.docker = None;
        }
        if lasting.disk.is_some_and(|t| t <= now) {
            disk.free();
            lasting.disk = None;
        }
        if let (Some((t, pid)), Some(s)) = (lasting.slow, &slow)
            && t <= now
        {
            s.release(pid);
            lasting.slow_ends(now);
        }
        let fault = pick_fault(&mut rng, slow.is_some());
        let lasts = now + Duration::from_millis(rng.u64(3000..12_000));
        let at = start.elapsed().as_secs_f64();
        eprintln!("chaos +{at:6.1}s {fault:?}");
        log.push((at, fault));
        match fault {
            Fault::KillAgent(i) => agents[i].crash_and_restart().await,
            Fault::KillBackend => {
                let down = Duration::from_millis(rng.u64(0..3000));
                b.crash_and_restart(down).await
            }
            Fault::CutTunnels => relays.iter().for_each(Relay::cut_all),
            Fault::BlockH2 => {
                relays.iter().for_each(|r| r.set(Mode::BlockH2));
                lasting.h2 = Some(lasts);
            }
            Fault::DockerDown => {
                docker.set_up(false);
                lasting.docker = Some(lasts);
            }
            Fault::DiskFull => {
                disk.fill();
                lasting.disk = Some(lasts);
            }
            Fault::SlowDisk => {
                // m-auto is never killed, so its pid holds until release;
                // a fault drawn while it is slow already lengthens it.
                if let (Some(s), Some(pid)) = (&slow, agents[M_AUTO].pid()) {
                    match lasting.slow {
                        Some((_, p)) if p == pid => {}
                        _ => {
                            s.slow(pid).expect("m-auto moved into the slow cgroup");
                            lasting.slow_since = Some(now);
                        }
                    }
                    lasting.slow = Some((lasts, pid));
                }
            }
            Fault::RestartSquid => {
                if let Some(s) = squid.take() {
                    s.stop().await;
                }
                let opts = SquidOpts {
                    port: Some(squid_port),
                    ..Default::default()
                };
                squid = Some(Squid::start(&squid_dir, opts).await);
            }
        }
    }
    // Every fault ends; the commands stop.
    relays.iter().for_each(|r| r.set(Mode::Forward));
    docker.set_up(true);
    disk.free();
    if let (Some((_, pid)), Some(s)) = (lasting.slow, &slow) {
        s.release(pid);
        lasting.slow_ends(Instant::now());
    }
    stop.store(true, Ordering::SeqCst);
    let queued = queue.await.unwrap();
    let sent: Vec<(String, u64, SocketAddr)> = streams
        .iter_mut()
        .map(|(s, listen)| (s.source.clone(), s.stop(), *listen))
        .collect();
    sample_rss(&mut peak, &b, &agents);
    let count = |f: &dyn Fn(&Fault) -> bool| log.iter().filter(|(_, x)| f(x)).count();
    if let (Some(s), Some(dev)) = (&slow, disk.device()) {
        // The faults were real: m-auto did I/O on its disk while slowed.
        let ops = s.ops(dev) - ops_before;
        let slowed = lasting.slowed;
        eprintln!(
            "chaos: m-auto did {ops} I/O operations on its disk while it was slow ({slowed:.1?})"
        );
        // A fault drawn at the very end is released at once: the check
        // needs a few seconds of slowness (the agent writes a few times a
        // second while it sends samples).
        if slowed >= Duration::from_secs(3) {
            assert!(
                ops > 0,
                "m-auto did no I/O on its disk in {slowed:.1?} slowed"
            );
        }
    }
    eprintln!(
        "chaos: {} faults ({} agent kills, {} backend kills, {} tunnel cuts, {} h2 blocks, {} docker outages, {} disk full, {} slow disk, {} squid restarts), {} commands",
        log.len(),
        count(&|f| matches!(f, Fault::KillAgent(_))),
        count(&|f| *f == Fault::KillBackend),
        count(&|f| *f == Fault::CutTunnels),
        count(&|f| *f == Fault::BlockH2),
        count(&|f| *f == Fault::DockerDown),
        count(&|f| *f == Fault::DiskFull),
        count(&|f| *f == Fault::SlowDisk),
        count(&|f| *f == Fault::RestartSquid),
        queued.len()
    );

    // 1. Every command ends with a result: executed at most once, and
    //    exactly once when it reports success.
    let admin = b.admin();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut results = HashMap::new();
    for q in &queued {
        loop {
            let v = admin.command(&q.id, Duration::from_secs(5)).await;
            if let Ok(v) = v
                && v.state == proto::CommandState::Done as i32
            {
                results.insert(q.id.clone(), v.result.unwrap_or_default());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "command {} ({}) on {} has no result 180 s after the faults ended; its agent's logs:\n{}",
                q.id,
                q.what,
                agents[q.agent].hostname,
                agents[q.agent].logs()
            );
        }
    }
    let containers = containers_per_command(&ids);
    let mut statuses = HashMap::<String, usize>::new();
    for q in &queued {
        let r = &results[&q.id];
        let status = CommandStatus::try_from(r.status).unwrap_or(CommandStatus::Unspecified);
        *statuses
            .entry(format!("{} {}", q.what, status.as_str_name()))
            .or_default() += 1;
        let runs = if q.what == "run" {
            containers.get(&q.id).copied().unwrap_or(0)
        } else {
            agents[q.agent].count(&["executing command", &q.id])
        };
        assert!(
            runs <= 1,
            "command {} ({}) executed {runs} times; result {r:?}",
            q.id,
            q.what
        );
        assert!(
            runs == 1 || status != CommandStatus::Ok,
            "command {} ({}) reported success but was never executed: {r:?}",
            q.id,
            q.what
        );
    }
    eprintln!("chaos: results {statuses:?}");

    // 2. Every numbered sample is stored once or counted as dropped.
    for (source, n, listen) in &sent {
        samples_settle(&b.jsonl, source, *n, *listen, Duration::from_secs(120)).await;
    }

    // 3. No panic anywhere; memory bounded.
    let mut logs = vec![("backend".to_string(), b.logs())];
    logs.extend(agents.iter().map(|a| (a.hostname.clone(), a.logs())));
    for (name, text) in &logs {
        let p = panics(text);
        assert!(p.is_empty(), "{name} panicked:\n{}", p.join("\n"));
    }
    eprintln!("chaos: peak RSS {peak:?}");
    for (name, rss) in &peak {
        let max = if name == "backend" {
            BACKEND_RSS_MAX
        } else {
            AGENT_RSS_MAX
        };
        assert!(rss <= &max, "{name}: peak RSS {rss} above {max}");
    }
    eprintln!(
        "chaos soak passed: seed {seed}, {} s, {} faults, {} commands",
        length.as_secs(),
        log.len(),
        queued.len()
    );
}

/// The JSON-lines files in `dir` now, and whether each holds a line.
fn jsonl_files(dir: &std::path::Path) -> Vec<(String, bool)> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let written = e.metadata().ok()?.len() > 0;
                    name.ends_with(".jsonl").then_some((name, written))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The soak's sample check reads the backend's JSON lines over every
/// backend start, and each start writes a file of its own. A backend
/// deletes all but its newest `--metrics-jsonl-keep` files, so a long
/// soak (more starts than that) must not lose the early ones from its
/// count: here a metrics agent streams numbered samples while its backend
/// is killed and started again until 25 starts have each written a file,
/// and every sample is still found once or counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_check_holds_over_more_backend_starts_than_files_kept() {
    const STARTS: usize = 25;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut b = BackendProc::start(&dir.join("backend")).await;
    let graphite = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args: Vec<String> = [
        "--ingest-graphite",
        &graphite.to_string(),
        "--metrics-listen",
        &listen.to_string(),
        "--metrics-interval",
        "0s",
        "--metrics-batch-age",
        "200ms",
        "--probe-initial",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let _agent = AgentProc::start(&b, &b.url(), &dir.join("m"), "restarts-m", &args, &[]);
    let mut stream = Stream::start("m", graphite, SAMPLES_PER_SECOND);
    let mut seen = std::collections::HashSet::new();
    for start in 1..=STARTS {
        // Each start opens a file of its own; wait until the agent
        // delivered samples into it.
        wait_for(
            Duration::from_secs(60),
            &format!("samples in the JSON lines of backend start {start}"),
            || {
                let fresh = jsonl_files(&b.jsonl)
                    .into_iter()
                    .find(|(name, written)| *written && !seen.contains(name));
                async move { fresh.map(|(name, _)| name) }
            },
        )
        .await;
        seen.extend(jsonl_files(&b.jsonl).into_iter().map(|(name, _)| name));
        if start < STARTS {
            b.crash_and_restart(Duration::ZERO).await;
        }
    }
    let sent = stream.stop();
    eprintln!(
        "{STARTS} backend starts wrote {} JSON-lines files; {} are left",
        seen.len(),
        jsonl_files(&b.jsonl).len()
    );
    samples_settle(&b.jsonl, "m", sent, listen, Duration::from_secs(60)).await;
}

/// The window between a batch's JSON lines and its record in the store:
/// another process holds the store's write lock, so the backend writes the
/// next batches' lines and then waits to record them. First the record
/// fails (the lock outlasts the backend's tries) and the agent sends the
/// batch again; then the backend is killed in the window and the agent
/// sends those batches again to the next start. Each must be recorded
/// without being written again: every sample once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_writing_a_batch_and_recording_it_stores_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut b = BackendProc::start(&dir.join("backend")).await;
    let graphite = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args: Vec<String> = [
        "--ingest-graphite",
        &graphite.to_string(),
        "--metrics-listen",
        &listen.to_string(),
        "--metrics-interval",
        "0s",
        "--metrics-batch-age",
        "200ms",
    ]
    .map(String::from)
    .to_vec();
    let _agent = AgentProc::start(&b, &b.url(), &dir.join("m"), "window-m", &args, &[]);
    let mut stream = Stream::start("m", graphite, SAMPLES_PER_SECOND);
    let lines = |jsonl: &std::path::Path| -> usize {
        Stored::read(jsonl)
            .copies
            .get("m")
            .map_or(0, |c| c.values().map(Vec::len).sum())
    };
    wait_for(Duration::from_secs(60), "samples in the JSON lines", || {
        let n = lines(&b.jsonl);
        async move { (n > 0).then_some(()) }
    })
    .await;
    // Another process takes the store's write lock and keeps it.
    let db = b.dir.join("uplink.db");
    let lock_store = || uplink_testkit::store_lock::hold_write_lock(&db, 120);
    // First, longer than the backend tries to record a written batch (5 s
    // a try, tries for 20 s): the record fails, and the agent sends the
    // batch again.
    let mut lock = lock_store();
    tokio::time::sleep(Duration::from_secs(27)).await;
    lock.kill().unwrap();
    lock.wait().unwrap();
    // Then the crash: lines written while no record can be made are in
    // the window. The backend is killed there, then the lock goes.
    let mut lock = lock_store();
    let before = lines(&b.jsonl);
    wait_for(
        Duration::from_secs(4),
        "lines written while the store is locked",
        || {
            let n = lines(&b.jsonl);
            async move { (n > before).then_some(()) }
        },
    )
    .await;
    b.crash().await;
    lock.kill().unwrap();
    lock.wait().unwrap();
    let unrecorded = lines(&b.jsonl) - before;
    b.restart().await;
    // The new start found the batches the killed one wrote and did not
    // record, and its agent sends them again.
    let log = wait_for(Duration::from_secs(30), "the new start's account", || {
        let logs = b.logs();
        async move {
            logs.lines()
                .find(|l| l.contains("metric batches written by an earlier start"))
                .map(str::to_string)
        }
    })
    .await;
    eprintln!("{unrecorded} samples written in the window; the new start: {log}");
    assert!(
        !log.contains("unrecorded=0"),
        "no batch was left unrecorded by the killed backend: {log}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = stream.stop();
    samples_settle(&b.jsonl, "m", sent, listen, Duration::from_secs(60)).await;
}
