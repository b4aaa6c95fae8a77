//! Three backend replicas on one PostgreSQL database behind HAProxy in
//! TCP mode, configured as `docs/ha/haproxy.cfg` says (Debian's `haproxy`
//! and `postgresql`, real agents on both rungs, the one address for agents
//! and operator calls). A stream of numbered pings runs while one replica
//! is killed (SIGKILL), then another, then both start again: every ping is
//! executed once and comes back DONE and OK, every agent is on a live
//! replica within 10 s of each kill, and an operator call fails only
//! around a kill.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uplink::ctl::Admin;
use uplink::proto::{self, CommandStatus};
use uplink::secret::{Kind, Secret};
use uplink_testkit::certs::{Identity, operator_identity};
use uplink_testkit::postgres::Postgres;
use uplink_testkit::*;

const AGENTS_PER_RUNG: usize = 3;
/// The longest an agent may take to be on a live replica after a kill.
const FAILOVER_MAX: Duration = Duration::from_secs(10);

/// One replica: its port, data dir, and the running process.
struct Replica {
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    /// The replica id it publishes its presence under (`AgentView.replica`).
    id: String,
}

struct Cluster {
    db: String,
    identity: Identity,
    admin: Secret,
    enroll: Secret,
    replicas: Vec<Replica>,
}

impl Cluster {
    async fn start_replica(&mut self, i: usize) {
        let r = &self.replicas[i];
        let listen = format!("127.0.0.1:{}", r.port);
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
        r.id.clone()
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

/// Waits until every one of `agents` is shown connected, on a replica
/// other than `not_on`; how long that took.
async fn all_on_live_replicas(admin: &Admin, agents: usize, not_on: &str) -> Duration {
    let started = Instant::now();
    wait_for(
        Duration::from_secs(60),
        &format!("{agents} agents connected on live replicas"),
        || async {
            let all = admin.agents("").await.ok()?;
            let live = all
                .iter()
                .filter(|v| v.connected && !v.replica.is_empty() && v.replica != not_on)
                .count();
            (live == agents).then_some(())
        },
    )
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_haproxy_lose_no_command_when_two_are_killed_and_come_back() {
    let pg = Postgres::start().await;
    let db = pg.fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
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
    };
    for i in 0..3 {
        c.start_replica(i).await;
    }
    let front = free_port();
    let ports: Vec<u16> = c.replicas.iter().map(|r| r.port).collect();
    let _haproxy = haproxy(dir, front, &ports);
    let url = format!("https://127.0.0.1:{front}");
    let admin = admin(&url, &c.identity, &c.admin);
    wait_for(Duration::from_secs(30), "HAProxy answers", || async {
        admin.agents("").await.ok()
    })
    .await;

    let mut agents = Vec::new();
    for rung in ["grpc", "longpoll"] {
        for n in 0..AGENTS_PER_RUNG {
            let host = format!("ha-{rung}-{n}");
            let state = dir.join(&host);
            let p = Proc::spawn(
                &[
                    "agent",
                    "--backend",
                    &url,
                    "--state-dir",
                    state.to_str().unwrap(),
                    "--hostname",
                    &host,
                    "--ca-file",
                    c.identity.ca.to_str().unwrap(),
                    "--transport",
                    rung,
                    "--no-metrics",
                ],
                &[("UPLINK_TOKEN", c.enroll.expose())],
            );
            agents.push((host, p));
        }
    }
    let total = agents.len();
    all_on_live_replicas(&admin, total, "").await;
    let views = admin.agents("").await.unwrap();
    let ids: Vec<String> = agents
        .iter()
        .map(|(host, _)| {
            views
                .iter()
                .find(|v| &v.hostname == host)
                .map(|v| v.id.clone())
                .unwrap()
        })
        .collect();
    let placed: HashMap<&str, usize> = views.iter().fold(HashMap::new(), |mut m, v| {
        *m.entry(v.replica.as_str()).or_default() += 1;
        m
    });
    eprintln!("agents per replica: {placed:?}");

    // Numbered pings, one every 100 ms, round robin over the agents.
    let queued: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = tokio::spawn({
        let (admin, ids) = (admin.clone(), ids.clone());
        let (queued, failed, stop) = (queued.clone(), failed.clone(), stop.clone());
        async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
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

    let mut kills = Vec::new();
    for victim in [0, 1] {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let id = c.kill(victim).await;
        kills.push(Instant::now());
        let took = all_on_live_replicas(&admin, total, &id).await;
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
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    stream.await.unwrap();

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
        let runs = agents[*agent].1.count(&["executing command", id]);
        assert_eq!(
            runs, 1,
            "{id} executed {runs} times by {}",
            agents[*agent].0
        );
    }
    // Operator calls failed only around a kill (in flight on the killed
    // replica, or on a kept-alive connection to it).
    let failed = failed.lock().unwrap().clone();
    for (at, e) in &failed {
        assert!(
            kills
                .iter()
                .any(|k| *at >= *k && at.duration_since(*k) < Duration::from_secs(5)),
            "an EnqueueCommand failed away from any kill: {e}"
        );
    }
    eprintln!(
        "{} pings queued, each executed once and DONE; {} EnqueueCommand calls failed around the kills",
        queued.len(),
        failed.len()
    );
}
