//! `uplink demo`: a backend and two agents on this machine, one on each
//! rung, with embedded defaults; pings flow through the real command path
//! (admin API -> queue -> rung -> journal -> executor -> report) and their
//! round-trip times are printed. When a Docker engine is present, a run of
//! two small containers ([`image`]: this binary as `uplink loadgen`) is
//! placed across the agents, followed to its end, its logs shown, and
//! removed; when there is none, the demo says so.

mod image;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::{self, AgentConfig, TransportMode};
use crate::backend::{BackendConfig, Server};
use crate::ctl::{self, Admin};
use crate::proto;
use crate::secret::{Kind, Secret};
use crate::tls::Trust;

/// A failure of the demo.
#[derive(Debug, thiserror::Error)]
#[error("demo: {0}")]
pub struct DemoError(String);

fn fail(e: impl std::fmt::Display) -> DemoError {
    DemoError(e.to_string())
}

/// Settings of the demo.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Pings per agent.
    pub rounds: u32,
    /// Where to keep data; a temporary directory when `None`.
    pub data_dir: Option<PathBuf>,
    /// Run containers when a Docker engine is present.
    pub docker: bool,
}

/// Runs the demo and prints what happens.
pub async fn run(cfg: DemoConfig) -> Result<(), DemoError> {
    let (dir, temporary) = match &cfg.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(crate::secret::random_id("uplink-demo-")),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let result = run_in(&cfg, &dir).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(cfg: &DemoConfig, dir: &std::path::Path) -> Result<(), DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let admin_token = Secret::generate(Kind::Admin);
    let enroll_token = Secret::generate(Kind::Enrollment);
    let mut bcfg = BackendConfig::new(dir.join("backend"));
    bcfg.hostnames = vec!["127.0.0.1".into(), "localhost".into()];
    bcfg.admin_token = Some(admin_token.clone());
    bcfg.enroll_token = Some(enroll_token.clone());
    bcfg.heartbeat = Duration::from_secs(5);
    bcfg.grace = Duration::from_secs(2);
    let server = Server::new(bcfg, listener).await.map_err(fail)?;
    let core = server.core();
    let info = server.info().clone();
    let ca = info
        .ca_file
        .clone()
        .ok_or_else(|| fail("the backend did not generate a CA"))?;
    println!("backend   {} (CA {})", info.url, ca.display());

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let backend_task = tokio::spawn(server.run(stopped(stop_rx.clone())));

    let url = crate::client::parse_backend_url(&info.url).map_err(fail)?;
    let trust = Trust {
        ca_files: vec![ca.clone()],
        skip_os_store: true,
    };
    // Load generators in containers push their samples to the gRPC agent's
    // Graphite endpoint, bound on the Docker bridge's gateway.
    let graphite = match cfg.docker {
        true => bridge_endpoint().await,
        false => None,
    };
    let mut agents = Vec::new();
    for mode in [TransportMode::Grpc, TransportMode::Longpoll] {
        let mut acfg = AgentConfig::new(url.clone(), dir.join(format!("agent-{}", mode.name())));
        acfg.token = Some(enroll_token.clone());
        acfg.trust = trust.clone();
        acfg.transport = mode;
        acfg.proxy = crate::net::ProxySettings::direct();
        acfg.hostname = format!("demo-{}", mode.name());
        acfg.grace = Duration::from_secs(2);
        let mut metrics = crate::metrics::pipeline::MetricsConfig {
            interval: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        metrics.batcher.max_age = Duration::from_secs(1);
        if mode == TransportMode::Grpc {
            metrics.ingest.graphite = graphite;
        }
        acfg.metrics = Some(metrics);
        agents.push(tokio::spawn(agent::run(acfg, stopped(stop_rx.clone()))));
        println!("agent     demo-{} on the {} rung", mode.name(), mode.name());
    }

    let tls = crate::tls::client_config(&trust).map_err(fail)?;
    let net = crate::net::Net::new(tls, crate::net::ProxySettings::direct());
    let admin = Admin::new(&url, &net, admin_token);
    let mut outcome = exercise(&admin, cfg.rounds).await;
    if outcome.is_ok() && cfg.docker {
        outcome = containers(&admin, graphite).await;
    }
    if outcome.is_ok() {
        outcome = show_metrics(&core).await;
    }

    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    let _ = backend_task.await;
    outcome
}

async fn exercise(admin: &Admin, rounds: u32) -> Result<(), DemoError> {
    // Wait for both agents to enroll and connect.
    let start = Instant::now();
    let agents = loop {
        let list = admin.agents("").await.map_err(fail)?;
        let connected: Vec<_> = list.into_iter().filter(|a| a.connected).collect();
        if connected.len() >= 2 {
            break connected;
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(fail("agents did not connect within 20 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "connected {} agents in {:.0?}\n",
        agents.len(),
        start.elapsed()
    );
    println!(
        "{:<6} {:<9} {:<15} {:<22} {:>10}",
        "ROUND", "RUNG", "AGENT", "COMMAND", "ROUND TRIP"
    );
    let mut failures = 0;
    for round in 1..=rounds {
        for a in &agents {
            let rung = ctl::transport_name(a.transport);
            let p = admin
                .ping(&a.id, &format!("round {round}"), Duration::from_secs(10))
                .await
                .map_err(fail)?;
            let done = p.view.state == proto::CommandState::Done as i32;
            if !done {
                failures += 1;
            }
            println!(
                "{:<6} {:<9} {:<15} {:<22} {:>10}",
                round,
                rung,
                a.hostname,
                p.command_id,
                if done {
                    format!("{:.1?}", p.round_trip)
                } else {
                    "no answer".into()
                }
            );
        }
    }
    println!(
        "\n{}",
        ctl::agents_table(&admin.agents("").await.map_err(fail)?)
    );
    if failures > 0 {
        return Err(fail(format!("{failures} pings got no answer")));
    }
    Ok(())
}

/// Runs two containers of the demo image through the agents, when the
/// agents report a Docker engine.
async fn containers(
    admin: &Admin,
    graphite: Option<std::net::SocketAddr>,
) -> Result<(), DemoError> {
    // The agents report capacity right after connecting.
    let start = Instant::now();
    let agents = loop {
        let agents = admin.agents("").await.map_err(fail)?;
        if agents.iter().all(|a| a.capacity.is_some()) || start.elapsed() > Duration::from_secs(10)
        {
            break agents;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let with_docker = agents
        .iter()
        .filter(|a| a.capacity.as_ref().is_some_and(|c| c.docker_available))
        .count();
    if with_docker == 0 {
        let why = agents
            .iter()
            .find_map(|a| a.capacity.as_ref().map(|c| c.docker_status.clone()))
            .unwrap_or_else(|| "the agents did not report their capacity".into());
        println!("\ncontainers: skipped, no Docker engine here ({why})");
        return Ok(());
    }
    let docker = match crate::agent::docker::connect().await {
        Ok(d) => d,
        Err(f) => {
            println!("\ncontainers: skipped ({})", f.message);
            return Ok(());
        }
    };
    let image = match image::ensure(&docker).await {
        Ok(i) => i,
        Err(e) => {
            println!("\ncontainers: skipped, cannot build the demo image: {e}");
            return Ok(());
        }
    };
    println!("\ncontainers: a run of 2 x {image} (`uplink loadgen`) placed across the agents");
    let created = Instant::now();
    let run = admin
        .create_run(proto::CreateRunRequest {
            provider: "default".into(),
            image,
            count: 2,
            cpus: 0.25,
            memory_bytes: 64 << 20,
            name: String::new(),
            env: Default::default(),
            command: {
                let mut c: Vec<String> = ["loadgen", "--duration", "4s", "--rate", "50"]
                    .map(String::from)
                    .into();
                if let Some(g) = graphite {
                    c.extend(["--graphite".to_string(), g.to_string()]);
                }
                c
            },
        })
        .await
        .map_err(fail)?;
    let started = admin
        .wait_run(&run.id, Duration::from_secs(60), ctl::run_started)
        .await
        .map_err(fail)?;
    println!(
        "run {} ({}): {} after {:.0?}",
        run.id,
        run.name,
        ctl::run_counts(&started),
        created.elapsed()
    );
    let finished = admin
        .wait_run(&run.id, Duration::from_secs(60), |v| {
            v.state == proto::RunState::Finished as i32
        })
        .await
        .map_err(fail)?;
    print!("{}", ctl::run_table(&finished));
    for c in admin.run_logs(&run.id, 3).await.map_err(fail)? {
        for line in &c.lines {
            println!("  {} | {line}", c.name);
        }
    }
    let removed = Instant::now();
    admin
        .stop_run(&run.id, Duration::from_secs(2))
        .await
        .map_err(fail)?;
    let stopped = admin
        .wait_run(&run.id, Duration::from_secs(60), ctl::run_stopped)
        .await
        .map_err(fail)?;
    println!(
        "stopped: {} after {:.0?}",
        ctl::run_counts(&stopped),
        removed.elapsed()
    );
    let failed = finished
        .containers
        .iter()
        .filter(|c| c.state != proto::RunContainerState::Exited as i32 || c.exit_code != 0)
        .count();
    if failed > 0 || !ctl::run_stopped(&stopped) {
        return Err(fail(format!(
            "the container run did not go as expected: {}",
            ctl::run_counts(&finished)
        )));
    }
    Ok(())
}

/// An address on the Docker bridge's gateway with a free port, where the
/// containers reach the host; None when there is no such bridge.
async fn bridge_endpoint() -> Option<std::net::SocketAddr> {
    let docker = crate::agent::docker::connect().await.ok()?;
    let gateway = crate::agent::docker::bridge_gateway(&docker).await.ok()?;
    let probe = std::net::TcpListener::bind((gateway, 0)).ok()?;
    probe.local_addr().ok()
}

/// Series shown from the backend's `/metrics`, in this order.
const SHOWN: [&str; 6] = [
    "host_cpu_usage_percent",
    "host_memory_used_bytes",
    "container_cpu_usage_seconds_total",
    "loadgen_requests",
    "uplink_agent_metric_batches_sent_total",
    "uplink_backend_metric_samples_total",
];

/// Prints some of what the backend serves at `/metrics` (the operator
/// fetches it with the admin token).
async fn show_metrics(core: &crate::backend::Core) -> Result<(), DemoError> {
    // Batches are flushed every second; wait for the hosts' first ones.
    let start = Instant::now();
    let text = loop {
        let text = core.sinks().render();
        let hosts = text
            .lines()
            .filter(|l| l.starts_with("host_cpu_usage_percent{"))
            .count();
        if hosts >= 2 || start.elapsed() > Duration::from_secs(15) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "\nmetrics at the backend (GET /metrics with the admin token), a few of {} lines:",
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
    for name in SHOWN {
        for line in text.lines().filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(['{', ' ']))
        }) {
            // Drop the timestamp column, keep name, labels and value.
            let mut parts: Vec<&str> = line.rsplitn(3, ' ').collect();
            parts.reverse();
            let shown = match parts.as_slice() {
                [series, value, _time] if series.contains('{') => format!("{series} {value}"),
                _ => line.to_string(),
            };
            println!("  {shown}");
        }
    }
    if !text.contains("host_cpu_usage_percent{") {
        return Err(fail("no host metrics reached the backend within 15 s"));
    }
    Ok(())
}
