//! The `uplink` binary: parses flags and calls the library.

use std::process::ExitCode;
use std::time::Duration;

#[cfg(feature = "backend")]
use anyhow::Context;
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use uplink::agent::{AgentConfig, TransportMode};
#[cfg(feature = "backend")]
use uplink::backend::{BackendConfig, Server};
use uplink::cli::{self, Cli, Command, CtlCommand, EXIT_CONFIG, ProviderAction};
use uplink::secret::Secret;
use uplink::tls::Trust;

/// Prints to stdout; a closed pipe (`ctl agents --json | head`) is not an
/// error worth a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn config_error(problems: &[String]) -> ExitCode {
    for p in problems {
        eprintln!("uplink: {p}");
    }
    ExitCode::from(EXIT_CONFIG as u8)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

/// The log filter from `UPLINK_LOG` (`debug`, `uplink=debug,h2=warn`, ...),
/// or `default_level` with the reason when the variable is not a filter.
fn log_filter(var: Option<String>, default_level: &str) -> (Targets, Option<String>) {
    let fallback = || default_level.parse().unwrap_or_default();
    match var.filter(|v| !v.trim().is_empty()) {
        None => (fallback(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                fallback(),
                Some(format!(
                    "UPLINK_LOG={v:?} is not a log filter ({e}); logging at {default_level}. Use a level (error, warn, info, debug, trace) or targets with levels, e.g. uplink=debug,h2=warn"
                )),
            ),
        },
    }
}

/// Caps glibc's malloc at two arenas, unless the operator set
/// `MALLOC_ARENA_MAX`. By default glibc gives threads their own arenas (up
/// to eight per core), and memory freed in one stays resident there; the
/// agent's few threads do little allocation, and with two arenas it keeps
/// about 1.5 MiB less resident with 50 containers to monitor
/// (BENCHMARKS.md, footprint).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator, and runs
        // before the runtime starts any other thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_)) {
        cap_malloc_arenas();
    }
    let default_level = match cli.command {
        Command::Demo(_) | Command::Ctl(_) | Command::Doctor(_) | Command::Loadgen(_) => "warn",
        _ => "info",
    };
    let (filter, bad_filter) = log_filter(std::env::var("UPLINK_LOG").ok(), default_level);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    if let Some(problem) = bad_filter {
        tracing::warn!("{problem}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uplink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("uplink: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        #[cfg(feature = "backend")]
        Command::Backend(a) => backend(a).await,
        #[cfg(not(feature = "backend"))]
        Command::Backend(_) | Command::Demo(_) => Ok(config_error(&[
            "this uplink build holds the agent, ctl, doctor and loadgen, not the backend or the demo (built without the `backend` feature); use a full build (`cargo build --release`) for them".into(),
        ])),
        Command::Agent(a) => agent(a).await,
        Command::Ctl(a) => ctl(a).await,
        Command::Doctor(a) => doctor(a).await,
        #[cfg(feature = "backend")]
        Command::Demo(a) => {
            uplink::demo::run(uplink::demo::DemoConfig {
                rounds: a.rounds,
                data_dir: a.data_dir,
                docker: !a.no_docker,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadgen(a) => match uplink::loadgen::run(uplink::loadgen::LoadgenConfig {
            duration: a.duration,
            rate: a.rate,
            graphite: a.graphite,
            prefix: a.prefix,
        })
        .await
        {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("uplink loadgen: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

#[cfg(feature = "backend")]
async fn backend(a: cli::BackendArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = BackendConfig::new(a.data_dir);
    if !a.hostnames.is_empty() {
        cfg.hostnames = a.hostnames;
    }
    cfg.tls_cert = a.tls_cert;
    cfg.tls_key = a.tls_key;
    cfg.admin_token = a.admin_token.map(Secret::new);
    cfg.enroll_token = a.enroll_token.map(Secret::new);
    cfg.heartbeat = a.heartbeat_interval;
    cfg.poll_hold = a.poll_hold;
    cfg.public_url = a.public_url;
    cfg.max_message_bytes = a.max_message_bytes;
    if let Some(n) = a.metrics_max_series {
        cfg.metrics_max_series = n;
    }
    if let Some(ttl) = a.metrics_series_ttl {
        cfg.metrics_series_ttl = ttl;
    }
    cfg.metrics_jsonl_dir = a.metrics_jsonl_dir;
    if let Some(n) = a.metrics_jsonl_max_bytes {
        cfg.metrics_jsonl_max_bytes = n;
    }
    if let Some(n) = a.metrics_jsonl_keep {
        cfg.metrics_jsonl_keep = n;
    }
    cfg.agent_metrics_interval = a.agent_metrics_interval;
    let mut problems = cfg.validate();
    let addr: Option<std::net::SocketAddr> = match a.listen.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.push(format!(
                "--listen {:?} is not an address like 0.0.0.0:8443",
                a.listen
            ));
            None
        }
    };
    if let Some(u) = &cfg.public_url
        && let Err(e) = uplink::client::parse_backend_url(u)
    {
        problems.push(format!("--public-url: {e}"));
    }
    let Some(addr) = addr.filter(|_| problems.is_empty()) else {
        return Ok(config_error(&problems));
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let server = match Server::new(cfg, listener) {
        Ok(s) => s,
        Err(
            e @ (uplink::backend::BackendError::Tls(_)
            | uplink::backend::BackendError::MetricsJsonl(_)),
        ) => {
            return Ok(config_error(&[e.to_string()]));
        }
        Err(e) => return Err(e.into()),
    };
    let info = server.info();
    // Secrets go to stdout once, never to the log.
    println!("uplink backend listening on {} ({})", info.addr, info.url);
    if let Some(ca) = &info.ca_file {
        println!("CA for agents and ctl: {}", ca.display());
    }
    if let Some(t) = &info.new_admin_token {
        println!("admin token (shown once): {}", t.expose());
    }
    if info.enroll_token.is_none() {
        println!(
            "enrollment token of provider 'default': stored hashed; rotate it with `uplink ctl providers rotate default`"
        );
    }
    println!("run an agent with:\n  {}", info.host_command);
    server.run(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn agent(a: cli::AgentArgs) -> anyhow::Result<ExitCode> {
    let mut problems = Vec::new();
    let backend = match uplink::client::parse_backend_url(&a.backend) {
        Ok(u) => Some(u),
        Err(e) => {
            problems.push(format!("--backend: {e}"));
            None
        }
    };
    let transport = match a.transport.as_str() {
        "auto" => TransportMode::Auto,
        "grpc" => TransportMode::Grpc,
        "longpoll" => TransportMode::Longpoll,
        other => {
            problems.push(format!("--transport {other:?}: use auto, grpc or longpoll"));
            TransportMode::Auto
        }
    };
    let Some(backend) = backend else {
        return Ok(config_error(&problems));
    };
    let mut cfg = AgentConfig::new(backend, a.state_dir);
    cfg.token = a.token.map(Secret::new);
    cfg.trust = Trust {
        ca_files: cli::ca_files_with_env(a.ca_files),
        skip_os_store: false,
    };
    cfg.transport = transport;
    cfg.proxy = uplink::net::ProxySettings::from_flags_and_env(a.proxy, a.no_proxy);
    cfg.probe_initial = a.probe_initial;
    cfg.metrics_listen = a.metrics_listen;
    cfg.orphan_grace = a.orphan_grace;
    cfg.metrics = (!a.no_metrics).then(|| {
        let mut m = uplink::metrics::pipeline::MetricsConfig {
            interval: (!a.metrics_interval.is_zero()).then_some(a.metrics_interval),
            spool_max_bytes: a.spool_max_bytes,
            replay_rate: a.metrics_replay_rate,
            ..Default::default()
        };
        m.batcher.max_samples = a.metrics_batch_samples;
        m.batcher.max_age = a.metrics_batch_age;
        m.ingest.graphite = a.ingest_graphite;
        m.ingest.influx = a.ingest_influx;
        m
    });
    if let Some(path) = &a.policy_file {
        match std::fs::read_to_string(path) {
            Ok(text) => match serde_json::from_str::<uplink::agent::policy::Policy>(&text) {
                Ok(p) => cfg.policy = p,
                Err(e) => problems.push(format!(
                    "--policy {}: not a valid policy: {e}",
                    path.display()
                )),
            },
            Err(e) => problems.push(format!("--policy {}: {e}", path.display())),
        }
    }
    if !a.allow_images.is_empty() {
        cfg.policy.allowed_images = a.allow_images.clone();
    }
    cfg.probe_max = a.probe_max;
    cfg.stream_max_age = a.stream_max_age;
    if let Some(h) = a.hostname {
        cfg.hostname = h;
    }
    cfg.poll_hold = a.poll_hold;
    cfg.keepalive = a.keepalive;
    cfg.keepalive_timeout = (a.keepalive * 2).max(Duration::from_secs(5));
    problems.extend(cfg.validate());
    if !problems.is_empty() {
        return Ok(config_error(&problems));
    }
    match uplink::agent::run(cfg, shutdown_signal()).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is_config() => Ok(config_error(&[e.to_string()])),
        Err(e) => Err(e.into()),
    }
}

async fn doctor(a: cli::DoctorArgs) -> anyhow::Result<ExitCode> {
    let backend = match uplink::client::parse_backend_url(&a.backend) {
        Ok(u) => u,
        Err(e) => return Ok(config_error(&[format!("--backend: {e}")])),
    };
    let report = uplink::doctor::run(uplink::doctor::DoctorConfig {
        backend,
        trust: Trust {
            ca_files: cli::ca_files_with_env(a.ca_files),
            skip_os_store: false,
        },
        proxy: uplink::net::ProxySettings::from_flags_and_env(a.proxy, a.no_proxy),
        state_dir: a.state_dir,
    })
    .await;
    out_raw!("{}", report.text);
    Ok(if report.rung.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn ctl(a: cli::CtlArgs) -> anyhow::Result<ExitCode> {
    let mut problems = Vec::new();
    let backend = match a.backend.as_deref().map(uplink::client::parse_backend_url) {
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            problems.push(format!("--backend: {e}"));
            None
        }
        None => {
            problems.push("--backend (or UPLINK_BACKEND) is required".into());
            None
        }
    };
    if a.admin_token.as_deref().unwrap_or("").is_empty() {
        problems.push("--admin-token (or UPLINK_ADMIN_TOKEN) is required".into());
    }
    let trust = Trust {
        ca_files: cli::ca_files_with_env(a.ca_files),
        skip_os_store: false,
    };
    let proxy = uplink::net::ProxySettings::from_flags_and_env(a.proxy, a.no_proxy);
    problems.extend(proxy.validate());
    let tls = match uplink::tls::client_config(&trust) {
        Ok(t) => Some(uplink::net::Net::new(t, proxy)),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let (Some(backend), Some(tls), true) = (backend, tls, problems.is_empty()) else {
        return Ok(config_error(&problems));
    };
    let admin = uplink::ctl::Admin::new(
        &backend,
        &tls,
        Secret::new(a.admin_token.unwrap_or_default()),
    );
    match a.command {
        CtlCommand::Agents { json, provider } => {
            let agents = admin.agents(provider.as_deref().unwrap_or("")).await?;
            if json {
                out!("{}", uplink::ctl::agents_json(&agents));
            } else {
                out_raw!("{}", uplink::ctl::agents_table(&agents));
            }
        }
        CtlCommand::Ping {
            agent,
            timeout,
            count,
        } => {
            let mut failed = 0;
            for i in 0..count.max(1) {
                let p = admin.ping(&agent, &format!("ctl {i}"), timeout).await?;
                let state = uplink::proto::CommandState::try_from(p.view.state)
                    .unwrap_or(uplink::proto::CommandState::Unspecified);
                if state == uplink::proto::CommandState::Done {
                    let r = p.view.result.unwrap_or_default();
                    out!(
                        "{} from {agent}: {} in {:.2} ms",
                        r.message,
                        p.command_id,
                        p.round_trip.as_secs_f64() * 1000.0
                    );
                } else {
                    failed += 1;
                    eprintln!(
                        "no answer from {agent} within {timeout:?} (command {} is {}); is the agent connected? see `uplink ctl agents`",
                        p.command_id,
                        state.as_str_name()
                    );
                }
            }
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        CtlCommand::Providers { action: None } => {
            out!("{:<20} {:<21} AGENTS", "NAME", "CREATED");
            for p in admin.providers().await? {
                out!(
                    "{:<20} {:<21} {}",
                    p.name,
                    uplink::ctl::rfc3339(p.created_unix_ms),
                    p.agents
                );
            }
        }
        CtlCommand::Providers {
            action: Some(ProviderAction::Create { name }),
        } => {
            let r = admin.create_provider(&name).await?;
            out!("provider {name} created");
            out!("enrollment token (shown once): {}", r.enrollment_token);
            out!("run an agent with:\n  {}", r.host_command);
        }
        CtlCommand::Providers {
            action: Some(ProviderAction::Rotate { name }),
        } => {
            let r = admin.rotate(&name).await?;
            out!("enrollment token of {name} rotated; the old one enrolls no new agent");
            out!("new enrollment token (shown once): {}", r.enrollment_token);
            out!("run an agent with:\n  {}", r.host_command);
        }
        CtlCommand::Run {
            provider,
            image,
            count,
            env,
            cpus,
            memory,
            name,
            wait,
            json,
            command,
        } => {
            let start = std::time::Instant::now();
            let run = admin
                .create_run(uplink::proto::CreateRunRequest {
                    provider,
                    image,
                    count,
                    env: env.into_iter().collect(),
                    cpus,
                    memory_bytes: memory,
                    name: name.unwrap_or_default(),
                    command,
                })
                .await?;
            if !json {
                let mut per_agent: Vec<(String, u32)> = Vec::new();
                for c in &run.containers {
                    match per_agent.iter_mut().find(|(a, _)| *a == c.agent_id) {
                        Some((_, n)) => *n += 1,
                        None => per_agent.push((c.agent_id.clone(), 1)),
                    }
                }
                let placed: Vec<String> = per_agent
                    .iter()
                    .map(|(a, n)| format!("{n} on {a}"))
                    .collect();
                out!(
                    "run {} ({}) created: {}",
                    run.id,
                    run.name,
                    placed.join(", ")
                );
            }
            let run = if wait.is_zero() {
                run
            } else {
                admin
                    .wait_run(&run.id, wait, uplink::ctl::run_started)
                    .await?
            };
            let failed = run
                .containers
                .iter()
                .filter(|c| c.state == uplink::proto::RunContainerState::Failed as i32)
                .count();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&uplink::ctl::run_json(&run)).unwrap_or_default()
                );
            } else if !wait.is_zero() {
                out!(
                    "{} after {:.2} s: {}",
                    if uplink::ctl::run_started(&run) {
                        "started"
                    } else {
                        "still starting"
                    },
                    start.elapsed().as_secs_f64(),
                    uplink::ctl::run_counts(&run)
                );
                for c in run.containers.iter().filter(|c| !c.message.is_empty()) {
                    out!("  {} on {}: {}", c.name, c.agent_id, c.message);
                }
            }
            if failed > 0 || (!wait.is_zero() && !uplink::ctl::run_started(&run)) {
                return Ok(ExitCode::FAILURE);
            }
        }
        CtlCommand::Runs { json, provider } => {
            let runs = admin.runs(provider.as_deref().unwrap_or("")).await?;
            if json {
                let arr: Vec<_> = runs.iter().map(uplink::ctl::run_json).collect();
                out!("{}", serde_json::to_string_pretty(&arr).unwrap_or_default());
            } else {
                out_raw!("{}", uplink::ctl::runs_table(&runs));
            }
        }
        CtlCommand::RunStatus { run, json } => {
            let run = admin.run(&run).await?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&uplink::ctl::run_json(&run)).unwrap_or_default()
                );
            } else {
                out_raw!("{}", uplink::ctl::run_table(&run));
            }
        }
        CtlCommand::Stop { run, timeout, wait } => {
            let start = std::time::Instant::now();
            let v = admin.stop_run(&run, timeout).await?;
            out!(
                "stopping run {} ({}): {}",
                v.id,
                v.name,
                uplink::ctl::run_counts(&v)
            );
            if !wait.is_zero() {
                let v = admin
                    .wait_run(&v.id, wait, uplink::ctl::run_stopped)
                    .await?;
                if uplink::ctl::run_stopped(&v) {
                    out!(
                        "stopped after {:.2} s: {}",
                        start.elapsed().as_secs_f64(),
                        uplink::ctl::run_counts(&v)
                    );
                } else {
                    eprintln!(
                        "not every container is removed after {wait:?} ({}); `uplink ctl run-status {}` shows which, `uplink ctl stop {}` tries again",
                        uplink::ctl::run_counts(&v),
                        v.id,
                        v.id
                    );
                    for c in v.containers.iter().filter(|c| !c.message.is_empty()) {
                        eprintln!("  {} on {}: {}", c.name, c.agent_id, c.message);
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        CtlCommand::Logs { run, tail } => {
            let mut failed = false;
            for c in admin.run_logs(&run, tail).await? {
                if !c.error.is_empty() {
                    failed = true;
                    eprintln!("{}: {}", c.name, c.error);
                }
                for line in &c.lines {
                    out!("{} | {line}", c.name);
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn uplink_log_is_a_filter_or_a_named_problem() {
        let (t, problem) = log_filter(Some("uplink=debug,h2=warn".into()), "info");
        assert!(problem.is_none());
        assert!(t.would_enable("uplink::agent", &Level::DEBUG));
        assert!(!t.would_enable("h2::proto", &Level::INFO));
        let (t, problem) = log_filter(None, "warn");
        assert!(problem.is_none());
        assert!(!t.would_enable("uplink", &Level::INFO));
        let (t, problem) = log_filter(Some("debug=x=y".into()), "info");
        let problem = problem.expect("a problem");
        assert!(
            problem.starts_with("UPLINK_LOG=\"debug=x=y\" is not a log filter")
                && problem.contains("logging at info"),
            "{problem}"
        );
        assert!(t.would_enable("uplink", &Level::INFO));
        assert!(!t.would_enable("uplink", &Level::DEBUG));
    }
}
