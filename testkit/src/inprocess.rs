//! Agents run in this process (`uplink::agent::run`) for the benchmarks
//! that time them: each on a [`Route`] to the backend (direct, through a
//! proxy, through a relay), with the trust and proxy settings the route
//! names, started on the caller's tokio runtime and stopped by a watch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Uri;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uplink::agent::{self, AgentConfig, AgentError, TransportMode, identity};
use uplink::net::ProxySettings;
use uplink::secret::Secret;
use uplink::tls::Trust;

use crate::bench::stopped;

/// Longest wait for an agent to enroll.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for an agent to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How an agent reaches the backend.
#[derive(Clone)]
pub struct Route {
    /// Its name in a benchmark's tables.
    pub name: &'static str,
    /// Whether HTTP/2 passes on this route.
    pub h2: bool,
    /// The backend URL the agent is given.
    pub url: Uri,
    /// The proxy it goes through (`--proxy`), if any.
    pub proxy: Option<String>,
    /// The CAs the agent trusts (and no others).
    pub ca_files: Vec<PathBuf>,
}

/// An agent running in this process, on the caller's runtime.
pub struct RunningAgent {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), AgentError>>,
    state_dir: PathBuf,
    name: String,
}

/// What differs between the agents a benchmark starts.
pub struct AgentOpts {
    /// The rung it is pinned to, or `Auto`.
    pub transport: TransportMode,
    /// Its probe interval back to gRPC (`--probe-initial` and
    /// `--probe-max`), when not the default.
    pub probe: Option<Duration>,
}

impl RunningAgent {
    /// Starts an agent named `name` with `token` on `route`, its state in
    /// `state_dir`, with a 2 s grace.
    pub fn start(
        route: &Route,
        token: &Secret,
        state_dir: PathBuf,
        name: &str,
        opts: AgentOpts,
    ) -> RunningAgent {
        let mut cfg = AgentConfig::new(route.url.clone(), state_dir.clone());
        cfg.token = Some(token.clone());
        cfg.trust = Trust {
            ca_files: route.ca_files.clone(),
            skip_os_store: true,
        };
        cfg.transport = opts.transport;
        cfg.proxy = ProxySettings {
            proxy: route.proxy.clone(),
            source: "--proxy",
            no_proxy: String::new(),
        };
        cfg.hostname = name.into();
        cfg.grace = Duration::from_secs(2);
        if let Some(p) = opts.probe {
            cfg.probe_initial = p;
            cfg.probe_max = p;
        }
        let problems = cfg.validate();
        assert!(problems.is_empty(), "agent {name}: {problems:?}");
        let (stop, rx) = watch::channel(false);
        RunningAgent {
            stop,
            task: tokio::spawn(agent::run(cfg, stopped(rx))),
            state_dir,
            name: name.into(),
        }
    }

    /// Waits until the agent has enrolled (its identity file exists);
    /// returns its id.
    pub async fn enrolled(&self) -> String {
        let start = Instant::now();
        loop {
            if let Ok(Some(id)) = identity::load(&self.state_dir) {
                return id.agent_id;
            }
            if self.task.is_finished() {
                panic!("agent {} stopped before it enrolled", self.name);
            }
            if start.elapsed() > ENROLL_TIMEOUT {
                panic!(
                    "agent {} did not enroll within {ENROLL_TIMEOUT:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The name it was started with (its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the agent and waits for it; panics when it failed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(STOP_TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("agent {} failed: {e}", self.name),
            Ok(Err(e)) => panic!("agent {} panicked: {e}", self.name),
            Err(_) => panic!("agent {} did not stop within {STOP_TIMEOUT:?}", self.name),
        }
    }
}
