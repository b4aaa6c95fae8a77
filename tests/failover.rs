//! Three backend replicas on one PostgreSQL database behind HAProxy in
//! TCP mode, configured as `docs/ha/haproxy.cfg` says (Debian's `haproxy`
//! and `postgresql`, real agents on both rungs, the one address for agents
//! and operator calls). Twenty agents (`UPLINK_FAILOVER_AGENTS`), each fed
//! 1,000 numbered metric samples a second (`UPLINK_FAILOVER_SAMPLES`), and a stream of numbered pings
//! run while one replica is killed (SIGKILL), then another, then both
//! start again; then each replica in turn is restarted (SIGTERM, start);
//! then PostgreSQL is stopped for 3 s. Every ping is executed once and
//! comes back DONE and OK, every sample is in the replicas' JSON lines
//! exactly once, every agent is on a live replica within 10 s of each
//! kill, and no operator call fails but those refused UNAVAILABLE while
//! the database is away (`Admin`, as `ctl`, makes a call again after a
//! broken connection, `EnqueueCommand` with its request id). And
//! Prometheus scraping the replicas as `docs/ha/prometheus.yml` says sees
//! one series per agent metric when an agent moves between replicas.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uplink::ctl::Admin;
use uplink::proto::{self, CommandStatus};
use uplink::secret::{Kind, Secret};
use uplink_testkit::certs::{Identity, operator_identity};
use uplink_testkit::chaos::Stream;
use uplink_testkit::chaos::stream::{Stored, scrape_agent, value};
use uplink_testkit::measure::count_from_env;
use uplink_testkit::postgres::Postgres;
use uplink_testkit::*;

/// The longest an agent may take to be on a live replica after a kill.
const FAILOVER_MAX: Duration = Duration::from_secs(10);

/// Samples a second fed to each agent: `UPLINK_FAILOVER_SAMPLES`, 1,000
/// when unset (lower it to measure failover with more agents than the
/// machine could feed at this rate).
fn samples_per_second() -> u64 {
    let n = count_from_env("UPLINK_FAILOVER_SAMPLES", 1_000);
    assert!(
        n >= 1,
        "UPLINK_FAILOVER_SAMPLES=0: give a number of samples a second, 1 or more"
    );
    n
}

/// How often each agent sends a batch of the samples it was fed (its
/// `--metrics-batch-age`): `UPLINK_FAILOVER_BATCH_AGE`, 200 ms when
/// unset (raise it, with `UPLINK_FAILOVER_SAMPLES`, to measure failover
/// with more agents than the machine could store batches for at this
/// pace).
fn batch_age() -> String {
    let age = std::env::var("UPLINK_FAILOVER_BATCH_AGE").unwrap_or_else(|_| "200ms".into());
    assert!(
        age.parse::<uplink::units::HumanDuration>().is_ok(),
        "UPLINK_FAILOVER_BATCH_AGE={age:?}: give a duration such as 200ms or 2s"
    );
    age
}

/// How many agents (half on each rung): `UPLINK_FAILOVER_AGENTS`, 20 when
/// unset.
fn agent_count() -> usize {
    let n = count_from_env("UPLINK_FAILOVER_AGENTS", 20);
    assert!(
        n >= 2,
        "UPLINK_FAILOVER_AGENTS={n}: give a number of agents, 2 or more (one on each rung)"
    );
    n as usize
}

/// One replica: its port, data dir, and the running process.
struct Replica {
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    /// The replica id it publishes its presence under (`AgentView.replica`).
    id: String,
}

impl Replica {
    fn jsonl(&self) -> PathBuf {
        self.dir.join("metrics")
    }
}

struct Cluster {
    db: String,
    identity: Identity,
    admin: Secret,
    enroll: Secret,
    replicas: Vec<Replica>,
    /// Batches the replicas' ended starts removed from the files of the
    /// start before them.
    copies_removed: u64,
    /// The logs of the replicas' ended starts, each under a heading.
    ended: Vec<String>,
}

/// Batches a replica's start removed from its predecessor's files
/// (`copies_removed=N` in its account of them).
fn copies_removed(p: &Proc) -> u64 {
    for l in p.logs().lines().filter(|l| l.contains("copies_removed=")) {
        eprintln!("replica: {l}");
    }
    p.logs()
        .lines()
        .filter_map(|l| {
            l.split("copies_removed=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

impl Cluster {
    /// Three replicas on database `db`, their files under `dir`, sharing
    /// a new TLS identity and new tokens.
    async fn start(db: String, dir: &Path) -> Cluster {
        let mut c = Cluster {
            db,
            identity: operator_identity(&dir.join("tls")),
            admin: Secret::generate(Kind::Admin),
            enroll: Secret::generate(Kind::Enrollment),
            replicas: (1..=3)
                .map(|i| Replica {
                    port: free_port(),
                    dir: dir.join(format!("r{i}")),
                    proc: None,
                    id: String::new(),
                })
                .collect(),
            copies_removed: 0,
            ended: Vec::new(),
        };
        for i in 0..3 {
            c.start_replica(i).await;
        }
        c
    }

    async fn start_replica(&mut self, i: usize) {
        let r = &self.replicas[i];
        let listen = format!("127.0.0.1:{}", r.port);
        let jsonl = r.jsonl();
        let p = Proc::spawn(
            &[
                "backend",
                "--listen",
                &listen,
                "--data-dir",
                r.dir.to_str().unwrap(),
                "--database",
                &self.db,
                "--tls-cert",
                self.identity.cert.to_str().unwrap(),
                "--tls-key",
                self.identity.key.to_str().unwrap(),
                "--hostname",
                "127.0.0.1",
                "--heartbeat-interval",
                "2s",
                "--metrics-jsonl-dir",
                jsonl.to_str().unwrap(),
            ],
            &[
                ("UPLINK_ADMIN_TOKEN", self.admin.expose()),
                ("UPLINK_ENROLL_TOKEN", self.enroll.expose()),
            ],
        );
        let line = p
            .wait_log(&["publishing presence"], Duration::from_secs(60))
            .await;
        let id = uplink_testkit::postgres::replica_in_log(&line);
        p.wait_log(&["backend listening"], Duration::from_secs(60))
            .await;
        let r = &mut self.replicas[i];
        r.proc = Some(p);
        r.id = id;
    }

    async fn kill(&mut self, i: usize) -> String {
        let r = &mut self.replicas[i];
        let mut p = r.proc.take().expect("the replica runs");
        p.kill9().await;
        self.copies_removed += copies_removed(&p);
        self.ended
            .push(format!("== r{} {} (killed)\n{}", i + 1, r.id, p.logs()));
        r.id.clone()
    }

    /// SIGTERM, as a service manager stops it; its exit status.
    async fn stop(&mut self, i: usize) -> (String, std::process::ExitStatus) {
        let r = &mut self.replicas[i];
        let mut p = r.proc.take().expect("the replica runs");
        let status = p.terminate(Duration::from_secs(40)).await;
        self.copies_removed += copies_removed(&p);
        self.ended
            .push(format!("== r{} {} (stopped)\n{}", i + 1, r.id, p.logs()));
        (r.id.clone(), status)
    }

    /// Writes every start's log to a file outside the test's directory
    /// (which goes with the test) and returns its path.
    fn save_logs(&self) -> PathBuf {
        let mut text = self.ended.join("\n");
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(p) = &r.proc {
                text.push_str(&format!("\n== r{} {} (running)\n{}", i + 1, r.id, p.logs()));
            }
        }
        let path =
            std::env::temp_dir().join(format!("failover-replicas-{}.log", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn jsonl_dirs(&self) -> Vec<PathBuf> {
        self.replicas.iter().map(Replica::jsonl).collect()
    }
}

/// HAProxy with `docs/ha/haproxy.cfg`, on `port`, in front of `replicas`.
fn haproxy(dir: &Path, port: u16, replicas: &[u16]) -> Proc {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ha/haproxy.cfg");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    let bind = "bind 0.0.0.0:8443";
    assert!(cfg.contains(bind), "{} binds elsewhere", path.display());
    cfg = cfg.replace(bind, &format!("bind 127.0.0.1:{port}"));
    for (i, p) in replicas.iter().enumerate() {
        let server = format!("10.0.0.1{}:8443", i + 1);
        assert!(cfg.contains(&server), "{} lacks {server}", path.display());
        cfg = cfg.replace(&server, &format!("127.0.0.1:{p}"));
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, cfg).unwrap();
    Proc::spawn_program(
        Path::new("haproxy"),
        &["-f", file.to_str().unwrap(), "-db"],
        &[],
    )
}

fn admin(url: &str, identity: &Identity, token: &Secret) -> Admin {
    let trust = uplink::tls::Trust {
        ca_files: vec![identity.ca.clone()],
        skip_os_store: true,
    };
    let tls = uplink::tls::client_config(&trust).expect("client TLS");
    let net = uplink::net::Net::new(tls, uplink::net::ProxySettings::direct());
    Admin::new(&url.parse().unwrap(), &net, token.clone())
}

/// Waits up to `within` until every one of `agents` is shown connected,
/// on a replica other than `not_on`; how long that took.
async fn all_on_live_replicas(
    admin: &Admin,
    agents: usize,
    not_on: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let listed = admin.agents("").await;
        if let Err(e) = &listed {
            last = format!("ListAgents failed: {e}");
        }
        if let Ok(all) = listed {
            let live = all
                .iter()
                .filter(|v| v.connected && !v.replica.is_empty() && v.replica != not_on)
                .count();
            if live == agents {
                return started.elapsed();
            }
            last = all
                .iter()
                .map(|v| {
                    format!(
                        "{} connected={} replica={}",
                        v.hostname, v.connected, v.replica
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        assert!(
            started.elapsed() < within,
            "not all {agents} agents connected on live replicas within {within:?}; the last answer:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent of the test: its hostname, process, metric stream and
/// self-metrics address.
struct TestAgent {
    host: String,
    proc: Proc,
    stream: Stream,
    listen: SocketAddr,
}

/// The database outage: from its stop to its start again.
#[derive(Default)]
struct Outage(Option<(Instant, Instant)>);

impl Outage {
    /// Whether a call failing at `at` with `error` was refused UNAVAILABLE
    /// while the database was away (or while its connections came back).
    fn excuses(&self, at: Instant, error: &str) -> bool {
        self.0.is_some_and(|(from, to)| {
            at >= from && at <= to + Duration::from_secs(2) && error.contains("unavailable")
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_haproxy_lose_nothing_through_kills_a_rolling_restart_and_a_database_restart()
 {
    let mut pg = Postgres::start().await;
    let db = pg.fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = Cluster::start(db, dir).await;
    let front = free_port();
    let ports: Vec<u16> = c.replicas.iter().map(|r| r.port).collect();
    let _haproxy = haproxy(dir, front, &ports);
    let url = format!("https://127.0.0.1:{front}");
    let admin = admin(&url, &c.identity, &c.admin);
    wait_for(Duration::from_secs(30), "HAProxy answers", || async {
        admin.agents("").await.ok()
    })
    .await;

    let total = agent_count();
    let rate = samples_per_second();
    let age = batch_age();
    let mut agents = Vec::new();
    for n in 0..total {
        let rung = if n % 2 == 0 { "grpc" } else { "longpoll" };
        let host = format!("ha-{rung}-{n}");
        let state = dir.join(&host);
        let graphite = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proc = agent_at(
            &url,
            &c.identity.ca,
            &state,
            &host,
            &[
                "--transport",
                rung,
                "--metrics-interval",
                "0s",
                "--ingest-graphite",
                &graphite.to_string(),
                "--metrics-listen",
                &listen.to_string(),
                "--metrics-batch-age",
                &age,
            ],
            &[("UPLINK_TOKEN", c.enroll.expose())],
        );
        proc.wait_log(&["Graphite ingest listening"], Duration::from_secs(60))
            .await;
        let stream = Stream::start(&host, graphite, rate);
        agents.push(TestAgent {
            host,
            proc,
            stream,
            listen,
        });
    }
    all_on_live_replicas(&admin, total, "", Duration::from_secs(60)).await;
    let views = admin.agents("").await.unwrap();
    let ids: Vec<String> = agents
        .iter()
        .map(|a| {
            views
                .iter()
                .find(|v| v.hostname == a.host)
                .map(|v| v.id.clone())
                .unwrap()
        })
        .collect();
    let placed: HashMap<&str, usize> = views.iter().fold(HashMap::new(), |mut m, v| {
        *m.entry(v.replica.as_str()).or_default() += 1;
        m
    });
    eprintln!("{total} agents per replica: {placed:?}");

    // Numbered pings, one every 100 ms, round robin over the agents.
    let queued: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pings = tokio::spawn({
        let (admin, ids) = (admin.clone(), ids.clone());
        let (queued, failed, stop) = (queued.clone(), failed.clone(), stop.clone());
        async move {
            let mut n = 0usize;
            while !stop.load(SeqCst) {
                let agent = n % ids.len();
                let spec = proto::CommandSpec {
                    kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
                        delay_ms: 0,
                        payload: format!("n{n}"),
                    })),
                };
                match admin.enqueue(&ids[agent], spec).await {
                    Ok(cmd) => queued.lock().unwrap().push((cmd.id, agent)),
                    Err(e) => failed.lock().unwrap().push((Instant::now(), e.to_string())),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let mut outage = Outage::default();
    for victim in [0, 1] {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let id = c.kill(victim).await;
        let took = all_on_live_replicas(&admin, total, &id, Duration::from_secs(60)).await;
        eprintln!(
            "replica {} killed: every agent on a live replica after {took:?}",
            victim + 1
        );
        assert!(
            took <= FAILOVER_MAX,
            "agents took {took:?} to leave the killed replica {}",
            victim + 1
        );
    }
    for i in [0, 1] {
        c.start_replica(i).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    // A rolling restart: each replica stopped as a service manager stops
    // it, and started again, one after the other.
    for i in 0..3 {
        let (id, status) = c.stop(i).await;
        assert!(
            status.success(),
            "replica {} exited {status} on SIGTERM",
            i + 1
        );
        let took = all_on_live_replicas(&admin, total, &id, Duration::from_secs(60)).await;
        eprintln!(
            "replica {} stopped: every agent on another replica after {took:?}",
            i + 1
        );
        c.start_replica(i).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // PostgreSQL away for 3 s: calls made meanwhile are refused
    // UNAVAILABLE (nothing queued that is not stored); the replicas keep
    // their agents and catch up when it is back.
    pg.stop_server();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again().await;
    outage.0 = Some((stopped, Instant::now()));
    let took = all_on_live_replicas(&admin, total, "", Duration::from_secs(60)).await;
    eprintln!("PostgreSQL back: every agent shown on a live replica after {took:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, SeqCst);
    pings.await.unwrap();
    let mut sent = Vec::new();
    for a in agents.iter_mut() {
        sent.push(a.stream.stop());
    }

    // Every ping DONE and OK, executed once by its agent.
    let queued = queued.lock().unwrap().clone();
    assert!(queued.len() > 100, "only {} pings queued", queued.len());
    for (id, agent) in &queued {
        let view = admin
            .command(id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("GetCommand {id}: {e}"));
        assert_eq!(
            view.state,
            proto::CommandState::Done as i32,
            "{id} not done: {view:?}"
        );
        let status = view.result.as_ref().map(|r| r.status);
        assert_eq!(status, Some(CommandStatus::Ok as i32), "{view:?}");
        let a = &agents[*agent];
        let runs = a.proc.count(&["executing command", id]);
        assert_eq!(runs, 1, "{id} executed {runs} times by {}", a.host);
    }
    // No operator call failed but those the database's absence refused:
    // one in flight on a killed or stopping replica was made again on
    // another (`EnqueueCommand` with the same request id).
    let failed = failed.lock().unwrap().clone();
    for (at, e) in &failed {
        assert!(
            outage.excuses(*at, e),
            "an EnqueueCommand failed while the database was up: {e}"
        );
    }

    // Every sample in the replicas' JSON lines exactly once: a batch a
    // replica wrote and was killed before recording, that its agent sent
    // again to another replica, was removed from the killed replica's
    // files when it started again. Nothing dropped, every spool empty.
    let dirs = c.jsonl_dirs();
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    for a in &agents {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let page = scrape_agent(a.listen).await.unwrap_or_default();
            let dropped = value(&page, "uplink_agent_spool_dropped_samples_total")
                + value(&page, "uplink_agent_metric_samples_refused_total");
            let spooled = value(&page, "uplink_agent_spool_batches");
            assert_eq!(
                dropped, 0,
                "{}: the agent dropped or had refused samples",
                a.host
            );
            if !page.is_empty() && spooled == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {spooled} batches still spooled after 60 s",
                a.host
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let stored = Stored::read_dirs(&dirs);
    let mut samples = 0;
    for (a, sent) in agents.iter().zip(&sent) {
        assert!(*sent > 0, "{}: no sample was sent", a.host);
        let t = stored.tally(&a.host, *sent);
        if (t.missing, t.again_after_a_crash, t.twice_in_one_start) != (0, 0, 0) {
            let copies = &stored.copies[&a.host];
            let twice: Vec<_> = (1..=*sent)
                .filter_map(|n| copies.get(&n).filter(|c| c.len() > 1).map(|c| (n, c)))
                .take(3)
                .map(|(n, c)| {
                    (
                        n,
                        c.iter()
                            .map(|f| stored.files[*f].clone())
                            .collect::<Vec<_>>(),
                    )
                })
                .collect();
            panic!(
                "{}: not every sample stored once: {t:?}; first copies: {twice:?}; the replicas' logs: {}",
                a.host,
                c.save_logs().display()
            );
        }
        samples += t.once;
    }
    let removed = c.copies_removed
        + c.replicas
            .iter()
            .filter_map(|r| r.proc.as_ref())
            .map(copies_removed)
            .sum::<u64>();
    eprintln!(
        "{} pings queued, each executed once and DONE; {samples} samples sent, each stored once ({removed} batches removed from killed replicas' files at their next start); {} EnqueueCommand calls refused while the database was away",
        queued.len(),
        failed.len(),
    );
}

/// Prometheus (Debian's) scraping three replicas as `docs/ha/prometheus.yml`
/// says, while an agent's connection moves from one live replica to
/// another (the path to the first is cut; it keeps serving the agent's
/// last values): the agent's metric is one series in Prometheus, not one
/// per replica, and it goes on with the values the second replica serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_one_series_per_agent_metric_when_the_agent_moves_between_replicas() {
    uplink_testkit::loadgen::require("prometheus", "Debian's prometheus");
    let pg = Postgres::start().await;
    let db = pg.fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let c = Cluster::start(db, dir).await;
    // HAProxy reaches each replica through a relay, so that the path to
    // one can be cut while the replica lives on.
    let mut relays = Vec::new();
    for r in &c.replicas {
        relays.push(Some(
            uplink_testkit::relay::Relay::start(SocketAddr::from(([127, 0, 0, 1], r.port))).await,
        ));
    }
    let paths: Vec<u16> = relays
        .iter()
        .map(|r| r.as_ref().unwrap().addr.port())
        .collect();
    let front = free_port();
    let _haproxy = haproxy(dir, front, &paths);
    let url = format!("https://127.0.0.1:{front}");
    let admin = admin(&url, &c.identity, &c.admin);

    let graphite = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = agent_at(
        &url,
        &c.identity.ca,
        &dir.join("agent"),
        "scraped",
        &[
            "--metrics-interval",
            "0s",
            "--ingest-graphite",
            &graphite.to_string(),
            "--metrics-batch-age",
            "200ms",
        ],
        &[("UPLINK_TOKEN", c.enroll.expose())],
    );
    agent
        .wait_log(&["Graphite ingest listening"], Duration::from_secs(60))
        .await;
    let mut stream = Stream::start("scraped", graphite, 100);
    all_on_live_replicas(&admin, 1, "", Duration::from_secs(60)).await;

    // Prometheus with the documented file, scraping every second.
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let token = prom_dir.join("token");
    std::fs::write(&token, c.admin.expose()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ha/prometheus.yml");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        (
            "/etc/prometheus/uplink-ca.pem",
            c.identity.ca.display().to_string(),
        ),
        (
            "/etc/prometheus/uplink-admin-token",
            token.display().to_string(),
        ),
    ] {
        assert!(cfg.contains(from), "{} lacks {from}", path.display());
        cfg = cfg.replace(from, &to);
    }
    for (i, r) in c.replicas.iter().enumerate() {
        let target = format!("10.0.0.1{}:8443", i + 1);
        assert!(cfg.contains(&target), "{} lacks {target}", path.display());
        cfg = cfg.replace(&target, &format!("127.0.0.1:{}", r.port));
    }
    let cfg_file = prom_dir.join("prometheus.yml");
    std::fs::write(&cfg_file, cfg).unwrap();
    let web = free_port();
    let _prometheus = Proc::spawn_program(
        Path::new("prometheus"),
        &[
            &format!("--config.file={}", cfg_file.display()),
            &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{web}"),
        ],
        &[],
    );
    wait_for(Duration::from_secs(60), "Prometheus listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", web))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let query = |q: &'static str| async move {
        let url = format!("http://127.0.0.1:{web}/api/v1/query");
        let reply =
            uplink_testkit::loadgen::curl(&["-G", &url, "--data-urlencode", &format!("query={q}")])
                .await;
        let v = reply.json();
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    };
    let series = "chaos_seq{hostname=\"scraped\"}";
    let latest = |rows: &[serde_json::Value]| -> f64 {
        rows.iter()
            .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .fold(0.0, f64::max)
    };
    let before = wait_for(
        Duration::from_secs(60),
        "Prometheus has the agent's series",
        || async {
            let rows = query(series).await;
            (!rows.is_empty()).then(|| latest(&rows))
        },
    )
    .await;

    // The path to the agent's replica is cut: HAProxy takes the agent to
    // another one, and the first keeps serving what it had.
    let views = admin.agents("").await.unwrap();
    let first = views[0].replica.clone();
    let held = c
        .replicas
        .iter()
        .position(|r| r.id == first)
        .expect("a known replica");
    relays[held] = None;
    all_on_live_replicas(&admin, 1, &first, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stale = uplink_testkit::loadgen::curl(&[
        "--cacert",
        c.identity.ca.to_str().unwrap(),
        "-H",
        &format!("authorization: Bearer {}", c.admin.expose()),
        &format!("https://127.0.0.1:{}/metrics", c.replicas[held].port),
    ])
    .await;
    assert!(
        stale.body.contains("chaos_seq{"),
        "the replica the agent left no longer serves its series: nothing to merge"
    );
    let sent = stream.stop();
    let rows = wait_for(
        Duration::from_secs(30),
        "Prometheus has the latest value",
        || async {
            let rows = query(series).await;
            (latest(&rows) >= sent as f64 - 200.0).then_some(rows)
        },
    )
    .await;
    assert_eq!(
        rows.len(),
        1,
        "one series for the agent's metric, not one per replica: {rows:?}"
    );
    eprintln!(
        "Prometheus: one series for the agent across replicas; {before} before the move, {} after ({sent} sent)",
        latest(&rows)
    );
}
