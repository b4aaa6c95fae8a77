//! The `uplink` binary: parses the flags, sets up logging and the runtime,
//! and hands each subcommand's configuration to the library.

use std::process::ExitCode;

#[cfg(feature = "backend")]
use anyhow::Context;
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
#[cfg(feature = "backend")]
use uplink::backend::{BackendConfig, BackendError, Server};
use uplink::cli::{Cli, Command, ConfigError, EXIT_CONFIG};

/// Prints each problem and gives the exit status of bad configuration.
fn config_error(e: ConfigError) -> ExitCode {
    for p in &e.problems {
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
/// Whatever it says, the PostgreSQL client's statement log stays off:
/// at debug it prints every statement's parameters, which hold token
/// hashes and commands' secrets before they are scrubbed.
fn log_filter(var: Option<String>, default_level: &str) -> (Targets, Option<String>) {
    let fallback = || default_level.parse().unwrap_or_default();
    let (targets, problem) = match var.filter(|v| !v.trim().is_empty()) {
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
    };
    (
        targets.with_target("tokio_postgres::query", tracing::Level::INFO),
        problem,
    )
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

/// Removes `UPLINK_*` variables whose value is empty, before the flags are
/// parsed: an empty variable means "not set" (compose files pass
/// `${UPLINK_X:-}` through as an empty string).
fn unset_empty_uplink_vars() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.to_str().is_some_and(|k| k.starts_with("UPLINK_")))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        // SAFETY: called first thing in `main`, before any other thread
        // exists that could read the environment.
        unsafe { std::env::remove_var(k) };
    }
}

fn main() -> ExitCode {
    unset_empty_uplink_vars();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with status 0; flags that do not
        // parse are bad configuration, like any other (64, not clap's 2,
        // which a container's HEALTHCHECK reserves).
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if matches!(cli.command, Command::Agent(_)) {
        cap_malloc_arenas();
    }
    let default_level = match cli.command {
        Command::Demo(_)
        | Command::Ctl(_)
        | Command::Doctor(_)
        | Command::Loadgen(_)
        | Command::Conformance(_)
        | Command::Health(_) => "warn",
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
    // A health check, run every few seconds by a container engine, starts
    // no worker threads.
    let mut builder = if matches!(cli.command, Command::Health(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
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
        Command::Backend(a) => match a.into_config() {
            Ok((addr, cfg)) => backend(addr, cfg).await,
            Err(e) => Ok(config_error(e)),
        },
        #[cfg(not(feature = "backend"))]
        Command::Backend(_) | Command::Demo(_) => Ok(config_error(ConfigError::from(
            "this uplink build holds the agent, ctl, doctor, health and loadgen, not the backend or the demo (built without the `backend` feature); use a full build (`cargo build --release`) for them".to_string(),
        ))),
        Command::Agent(a) => {
            let cfg = match a.into_config() {
                Ok(cfg) => cfg,
                Err(e) => return Ok(config_error(e)),
            };
            match uplink::agent::run(cfg, shutdown_signal()).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if e.is_config() => Ok(config_error(ConfigError::from(e.to_string()))),
                Err(e) => Err(e.into()),
            }
        }
        Command::Ctl(a) => match a.into_config() {
            Ok(cfg) => Ok(uplink::ctl::run(cfg).await?),
            Err(e) => Ok(config_error(e)),
        },
        Command::Doctor(a) => {
            let cfg = match a.into_config() {
                Ok(cfg) => cfg,
                Err(e) => return Ok(config_error(e)),
            };
            let report = uplink::doctor::run(cfg).await;
            // A closed pipe (`uplink doctor | head`) is not worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), report.text.as_bytes());
            Ok(match report.rung {
                Some(_) => ExitCode::SUCCESS,
                None => ExitCode::FAILURE,
            })
        }
        #[cfg(feature = "backend")]
        Command::Demo(a) => {
            uplink::demo::run(a.into()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health(a) => {
            let cfg = match a.into_config() {
                Ok(cfg) => cfg,
                Err(e) => return Ok(config_error(e)),
            };
            let report = uplink::health::run(&cfg).await;
            // One line for the container engine's health log; a closed
            // pipe is not worth a panic.
            let _ = std::io::Write::write_all(
                &mut std::io::stdout().lock(),
                format!("{}\n", report.line).as_bytes(),
            );
            Ok(if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Conformance(a) => {
            let cfg = match a.into_config() {
                Ok(cfg) => cfg,
                Err(e) => return Ok(config_error(e)),
            };
            let summary = uplink::conformance::run(cfg, &mut std::io::stdout()).await;
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Loadgen(a) => match uplink::loadgen::run(a.into()).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("uplink loadgen: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// Serves the backend until SIGINT or SIGTERM; its secrets go to stdout
/// once, never to the log.
#[cfg(feature = "backend")]
async fn backend(addr: std::net::SocketAddr, cfg: BackendConfig) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let server = match Server::new(cfg, listener).await {
        Ok(s) => s,
        Err(e @ (BackendError::Tls(_) | BackendError::MetricsJsonl(_))) => {
            return Ok(config_error(ConfigError::from(e.to_string())));
        }
        // A store that cannot be opened or reached (a database that does
        // not answer, refuses the login or has a newer schema): one line,
        // whose message already holds its causes.
        Err(e @ BackendError::Store(_)) => {
            eprintln!("uplink: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let info = server.info();
    println!("uplink backend listening on {} ({})", info.addr, info.url);
    if let Some(ca) = &info.ca_file {
        println!("CA for agents and ctl: {}", ca.display());
        if let Some(on_hosts) = &info.agent_ca_file {
            println!(
                "copy it to {} on each agent host, readable by all (a CA certificate holds no secret): \
                 the command below mounts it from there",
                on_hosts.display()
            );
        }
    }
    if let Some(t) = &info.new_admin_token {
        println!("admin token (shown once): {}", t.expose());
    }
    if info.enroll_token.is_none() {
        println!(
            "enrollment token of provider 'default': stored hashed; the command below passes your \
             UPLINK_TOKEN, or rotate it with `uplink ctl providers rotate default`"
        );
    }
    println!("run an agent with:\n  {}", info.host_command);
    server.run(shutdown_signal()).await?;
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

    #[test]
    fn the_database_clients_statement_log_stays_off() {
        for var in [
            "debug",
            "trace",
            "tokio_postgres=trace",
            "tokio_postgres::query=debug",
        ] {
            let (t, problem) = log_filter(Some(var.into()), "info");
            assert!(problem.is_none(), "{var}");
            assert!(
                !t.would_enable("tokio_postgres::query", &Level::DEBUG),
                "{var}"
            );
            assert!(
                t.would_enable("tokio_postgres::query", &Level::INFO),
                "{var}"
            );
        }
        let (t, _) = log_filter(Some("debug".into()), "info");
        assert!(t.would_enable("tokio_postgres::connection", &Level::DEBUG));
    }
}
