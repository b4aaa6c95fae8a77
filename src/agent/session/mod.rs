//! The agent's session: a folder of tasks, each owning its state, joined
//! by channels. This module only wires them and shuts them down.
//!
//! - [`enroll`]: the stored identity, or a new one from `Enroll`.
//! - [`rungs`]: the rung loop, which owns the `Ladder` and runs a session
//!   on its rung; through [`transport`] it opens streams and publishes the
//!   unary client of its rung in a [`transport::UnarySlot`].
//! - [`intake`]: commands through the journal (at most once), the ack, and
//!   the executor tasks; [`intake::recover`] after a restart.
//! - [`reporter`]: the one sender of events and the ack (`Report`).
//! - [`containers`]: reconciliation and container exits.
//! - [`capacity`]: the capacity reporter.
//! - [`metrics_push`]: the metrics pipeline's push on the current rung.
//!
//! The status file (`health::StatusFile`, `STATE_DIR/health-agent.json`)
//! hears from enrollment and the rung loop: connected on a rung, each
//! frame or poll answer, each failure; the session marks it stopped when
//! it ends.
//!
//! Tasks and channels:
//!
//! ```text
//!  rung loop ──(Command)──> intake ──(journal first)──> executor tasks ──┐
//!   │  │  ^                   │                                          │
//!   │  │  └──── ack watch ────┴──> reporter                  Reports     │
//!   │  │                                               (events, bounded) │
//!   │  │   recovery, reconciliation, capacity reporter ───────────────┐  │
//!   │  │                                                              v  v
//!   │  └─(Reconfigure)─ metrics interval watch ─> metrics pipeline   reporter ─> Report
//!   │
//!   └─ UnarySlot (the unary client of its rung) ─> reporter, capacity reporter,
//!                                                  metrics push
//! ```
//!
//! The events channel holds `EVENT_BUFFER` entries and the reporter keeps
//! at most `MAX_UNACKED_EVENTS` unacknowledged ones; when both are full,
//! senders wait (results are never dropped, memory stays bounded). The
//! reporter sends at most `REPORT_BATCH` events per `Report` and keeps
//! them until the backend acknowledges their seq.
//!
//! Shutdown: the rung loop stops taking commands, the metrics pipeline
//! flushes, then running commands and pending reports get the grace time;
//! what is left is settled after restart by recovery.

mod capacity;
mod containers;
mod credential;
mod enroll;
mod intake;
mod metrics_push;
mod reporter;
mod rungs;
mod transport;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::journal::Journal;
use super::{AgentConfig, AgentError, executor};
use crate::health::StatusFile;
use crate::net::Net;
use crate::proto;
use crate::secret::Secret;

/// A cloneable shutdown signal.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

/// `d` ± 25%.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Serves the self-metrics at `--metrics-listen`, when set.
async fn serve_self_metrics(
    cfg: &AgentConfig,
) -> Result<Option<tokio::task::JoinHandle<()>>, AgentError> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::MetricsListen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AgentError::MetricsListen { addr, source })?;
    match crate::telemetry::install() {
        Some(handle) => {
            tracing::info!(addr = %local, "metrics listening on http://{local}/metrics");
            Ok(Some(tokio::spawn(crate::telemetry::serve(
                listener,
                handle,
                std::future::pending(),
            ))))
        }
        None => {
            tracing::warn!(
                "another metrics recorder is installed in this process; --metrics-listen serves nothing"
            );
            Ok(None)
        }
    }
}

/// Says where the agent runs as far as containers go: the container it
/// leaves alone, or a warning when it seems to run in one it cannot name.
fn log_own_container(own: &crate::own_container::OwnContainer) {
    match &own.id {
        Some(id) => tracing::info!(container = %id,
            "running in a container: this agent never lists, reads, stops or removes it"),
        None if own.in_container => tracing::warn!(
            "running in a container whose id was not found (no runtime mount in /proc/self/mountinfo, \
             no id in /proc/self/cgroup): only its lack of this agent's label keeps it out of the agent's listings"
        ),
        None => {}
    }
}

/// The pipeline's settings, with the container source told which container
/// to leave alone.
fn with_own_container(
    m: &crate::metrics::pipeline::MetricsConfig,
    own: Option<String>,
) -> crate::metrics::pipeline::MetricsConfig {
    let mut m = m.clone();
    m.containers.own_container = own;
    m
}

/// The pipeline's settings with the ingest listeners asked for on the
/// Docker bridge (`docker-bridge:PORT`) at the bridge's gateway, asked of
/// the engine now. Without an answer the agent runs without them and says
/// why: it does everything else without Docker too.
async fn on_bridge(
    mut m: crate::metrics::pipeline::MetricsConfig,
    bridge: &super::BridgeIngest,
) -> crate::metrics::pipeline::MetricsConfig {
    if !bridge.any() {
        return m;
    }
    let gateway = match super::docker::connect().await {
        Ok(docker) => super::docker::bridge_gateway(&docker).await,
        Err(e) => Err(e.message),
    };
    match gateway {
        Ok(ip) => {
            m.ingest.graphite = bridge
                .graphite
                .map(|p| (ip, p).into())
                .or(m.ingest.graphite);
            m.ingest.influx = bridge.influx.map(|p| (ip, p).into()).or(m.ingest.influx);
        }
        Err(why) => tracing::error!(
            "the load generators' endpoint on the Docker bridge is not started: its address is unknown ({why}); \
             load generators cannot push samples until the agent starts again with Docker reachable"
        ),
    }
    m
}

pub(super) async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // Owner-only: it holds the credential, the journal and the spool.
    crate::owner_only::secure(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let status = StatusFile::agent(&cfg.state_dir, &cfg.backend.to_string());
    let r = serve(cfg, shutdown, status.clone()).await;
    status.close(r.as_ref().err().map(|e| e.to_string())).await;
    r
}

/// The session, from the TLS settings to the end of the grace time,
/// telling `status` how the connection goes.
async fn serve(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
    status: StatusFile,
) -> Result<(), AgentError> {
    let net = Net::new(crate::tls::client_config(&cfg.trust)?, cfg.proxy.clone());
    let metrics_task = serve_self_metrics(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stop = Stop(stop_rx);
    let body = async {
        let info = proto::AgentInfo {
            hostname: cfg.hostname.clone(),
            version: crate::VERSION.into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            transport_reason: String::new(),
        };
        let Some(ident) = enroll::enrolled(&cfg, &net, &info, &mut stop, &status).await? else {
            return Ok(());
        };
        tracing::info!(agent = %ident.agent_id, provider = %ident.provider, backend = %cfg.backend,
            transport = cfg.transport.name(), "agent starting");
        let jpath = cfg
            .state_dir
            .join(format!("journal-{}.log", ident.agent_id));
        let journal = Journal::open(&jpath).map_err(|source| AgentError::Journal {
            path: jpath.clone(),
            source,
        })?;
        if journal.skipped_lines > 0 {
            tracing::warn!(lines = journal.skipped_lines, at_bytes = ?journal.skipped_at, path = %jpath.display(), "skipped torn or corrupt journal lines");
        }
        let journal = Arc::new(Mutex::new(journal));
        let credential = credential::Credential::new(Secret::new(ident.credential.clone()));

        log_own_container(&cfg.own_container);
        let own_container = cfg.own_container.id.clone();
        let executor = executor::Executor::new(&ident.agent_id, cfg.policy.clone())
            .with_own_container(own_container.clone());
        let executor = Arc::new(executor);
        let capacity_changed = Arc::new(Notify::new());
        let slot = transport::UnarySlot::new();
        let rotator = tokio::spawn(
            credential::Rotator {
                max_age: cfg.credential_max_age,
                state_dir: cfg.state_dir.clone(),
                identity: ident.clone(),
                credential: credential.clone(),
                unary: slot.subscribe(),
            }
            .run(stop.clone()),
        );
        let (reports, events) = reporter::Reports::channel();
        let intake = Arc::new(intake::Intake::new(
            journal.clone(),
            executor.clone(),
            reports.clone(),
            capacity_changed.clone(),
        ));
        let (ack_delivered_tx, mut delivered) = watch::channel(0);
        // A new epoch per start, above every earlier one (the backend
        // refuses an older one), recorded before it is used.
        let epoch =
            crate::agent::epoch::next(&cfg.state_dir, crate::now_unix_ms()).map_err(|source| {
                AgentError::StateDir {
                    path: cfg.state_dir.clone(),
                    source,
                }
            })?;
        let reporter = tokio::spawn(
            reporter::Reporter {
                epoch,
                credential: credential.clone(),
                backoff: cfg.backoff,
                journal: journal.clone(),
                ack: intake.ack(),
                unary: slot.subscribe(),
                ack_delivered: ack_delivered_tx,
            }
            .run(events),
        );
        // Recovery reports through the reporter, which needs a rung: run it
        // beside the rung loop, never before it.
        let recovering = tokio::spawn(intake::recover(journal.clone(), reports.clone()));
        // Containers are reconciled after recovery, which settles what the
        // journal says about each command.
        let watcher = {
            let containers = containers::Containers {
                executor: executor.clone(),
                journal: journal.clone(),
                reports: reports.clone(),
                capacity_changed: capacity_changed.clone(),
                orphan_grace: cfg.orphan_grace,
            };
            tokio::spawn(async move {
                let _ = recovering.await;
                containers.watch().await
            })
        };
        let capacity = tokio::spawn(
            capacity::CapacityReporter {
                executor: executor.clone(),
                policy: cfg.policy.clone(),
                host_root: cfg.host_root.clone(),
                reports: reports.clone(),
                changed: capacity_changed.clone(),
                connections: slot.subscribe(),
            }
            .run(),
        );
        let (metrics_interval, interval_rx) = watch::channel(None);
        let pipeline = match &cfg.metrics {
            Some(m) => Some(
                metrics_push::start_pipeline(
                    &on_bridge(with_own_container(m, own_container), &cfg.ingest_on_bridge).await,
                    cfg.state_dir.clone(),
                    &ident.agent_id,
                    slot.clone(),
                    credential.clone(),
                    interval_rx,
                )
                .await?,
            ),
            None => None,
        };
        let transport = Arc::new(transport::Transport {
            backend: cfg.backend.clone(),
            net: net.clone(),
            keepalive: cfg.keepalive,
            keepalive_timeout: cfg.keepalive_timeout,
            stream_max_age: cfg.stream_max_age,
            credential,
            slot: slot.clone(),
        });
        rungs::Rungs {
            cfg: rungs::RungConfig::new(&cfg),
            transport,
            info: Arc::new(transport::Info::new(info)),
            intake: intake.clone(),
            ack: intake.ack(),
            metrics_interval,
            status: status.clone(),
        }
        .run(stop.clone())
        .await;
        if let Some(p) = pipeline {
            p.shutdown(tokio::time::Instant::now() + cfg.grace).await;
        }

        // Shutdown: let running commands finish, then pending reports. The
        // handles held here (intake, reports, slot) keep the reporter's
        // channels open until it is stopped.
        let grace = tokio::time::Instant::now() + cfg.grace;
        let all = intake.drain(grace).await;
        if all.is_none() {
            tracing::warn!(
                "commands still running at the end of the grace time; they will be reported as interrupted after restart"
            );
        }
        let ack = *intake.ack().borrow();
        let mut unacked = reports.unacked();
        let flushed = async {
            let _ = unacked.wait_for(|n| *n == 0).await;
            let _ = delivered.wait_for(|a| *a >= ack).await;
        };
        if tokio::time::timeout_at(grace, flushed).await.is_err() {
            tracing::warn!(
                "reports still pending at the end of the grace time; they are sent again after restart"
            );
        }
        reporter.abort();
        // Stopped by `stop`; a rotation under way finishes its write first.
        let _ = rotator.await;
        watcher.abort();
        capacity.abort();
        if let Some(t) = &metrics_task {
            t.abort();
        }
        drop((all, slot));
        tracing::info!("agent stopped");
        Ok(())
    };
    // The body sees the shutdown through `stop` and winds down by itself.
    tokio::pin!(body);
    tokio::pin!(shutdown);
    let mut signalled = false;
    loop {
        tokio::select! {
            r = &mut body => return r,
            _ = &mut shutdown, if !signalled => {
                signalled = true;
                let _ = stop_tx.send(true);
            }
        }
    }
}
