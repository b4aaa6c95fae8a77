//! Helpers for the integration tests: a backend in-process on a port bound
//! before it starts, agents as real `uplink` processes whose logs the test
//! reads, and waits that always have a timeout and a message.

#![allow(dead_code)]

pub mod docker;
pub mod relay;
pub mod squid;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Uri;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use uplink::backend::{BackendConfig, Core, Server};
use uplink::ctl::Admin;
use uplink::proto;
use uplink::secret::{Kind, Secret};
use uplink::tls::Trust;

/// The `uplink` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_uplink");

/// Waits until `cond` returns `Some`, polling every 50 ms, or panics with
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backend running in this process.
pub struct TestBackend {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub url: Uri,
    pub ca: PathBuf,
    pub admin_token: Secret,
    pub enroll_token: Secret,
    pub core: Arc<Core>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Settings it was started with.
    pub config: BackendConfig,
}

impl TestBackend {
    /// Settings used by tests: short heartbeats, the tokens given.
    pub fn config(dir: &Path) -> BackendConfig {
        let mut cfg = BackendConfig::new(dir);
        cfg.hostnames = vec!["127.0.0.1".into(), "localhost".into()];
        cfg.admin_token = Some(Secret::generate(Kind::Admin));
        cfg.enroll_token = Some(Secret::generate(Kind::Enrollment));
        cfg.heartbeat = Duration::from_secs(2);
        cfg.grace = Duration::from_secs(2);
        cfg
    }

    /// Starts on 127.0.0.1 with a fresh port.
    pub async fn start(dir: &Path) -> TestBackend {
        Self::start_with(Self::config(dir), "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts with `cfg` on `addr` (a previous backend's address to
    /// restart on the same port).
    pub async fn start_with(cfg: BackendConfig, addr: SocketAddr) -> TestBackend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
        let server = Server::new(cfg.clone(), listener).expect("backend starts");
        let info = server.info().clone();
        let core = server.core();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
                .expect("backend runs");
        });
        TestBackend {
            dir: cfg.data_dir.clone(),
            addr: info.addr,
            url: format!("https://127.0.0.1:{}", info.addr.port())
                .parse()
                .unwrap(),
            ca: info.ca_file.clone().expect("generated CA"),
            admin_token: cfg.admin_token.clone().unwrap(),
            enroll_token: cfg.enroll_token.clone().unwrap(),
            core,
            stop,
            task,
            config: cfg,
        }
    }

    /// Stops and waits until the port is closed.
    pub async fn stop(self) -> (BackendConfig, SocketAddr) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("backend stops within 10 s")
            .expect("backend task");
        (self.config, self.addr)
    }

    /// Trust settings for the backend's CA only.
    pub fn trust(&self) -> Trust {
        Trust {
            ca_files: vec![self.ca.clone()],
            skip_os_store: true,
        }
    }

    /// An admin client.
    pub fn admin(&self) -> Admin {
        Admin::new(&self.url, &self.net(), self.admin_token.clone())
    }

    /// Direct connections trusting the backend's CA.
    pub fn net(&self) -> uplink::net::Net {
        let tls = uplink::tls::client_config(&self.trust()).expect("client TLS");
        uplink::net::Net::new(tls, uplink::net::ProxySettings::direct())
    }
}

/// Finds the agent reporting `hostname`, waiting until it is connected on
/// `transport` ("grpc" or "longpoll").
pub async fn connected_agent(admin: &Admin, hostname: &str, transport: &str) -> proto::AgentView {
    wait_for(
        Duration::from_secs(20),
        &format!("agent {hostname} connected on {transport}"),
        || async {
            let agents = admin.agents("").await.ok()?;
            agents.into_iter().find(|a| {
                a.hostname == hostname
                    && a.connected
                    && uplink::ctl::transport_name(a.transport) == transport
            })
        },
    )
    .await
}

/// A ping spec.
pub fn ping(delay_ms: u32, payload: &str) -> proto::CommandSpec {
    proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
            delay_ms,
            payload: payload.into(),
        })),
    }
}

/// Waits for a command's result.
pub async fn result_of(admin: &Admin, id: &str, timeout: Duration) -> proto::CommandView {
    let view = admin.command(id, timeout).await.expect("GetCommand");
    assert_eq!(
        view.state,
        proto::CommandState::Done as i32,
        "command {id} not done within {timeout:?}: {view:?}"
    );
    view
}

/// An `uplink` process (agent, backend or ctl) with its output collected.
pub struct Proc {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `uplink ARGS` with `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("SSL_CERT_FILE")
            .env("UPLINK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn uplink");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("stderr");
        let out = child.stdout.take().expect("stdout");
        for (pipe, sink) in [
            (
                Box::new(err) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                stderr.clone(),
            ),
            (Box::new(out), stdout.clone()),
        ] {
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            child,
            stderr,
            stdout,
        }
    }

    /// Everything printed on stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Everything printed on stdout so far.
    pub fn out(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Lines of stderr containing every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until a stderr line contains every one of `needles`.
    pub async fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        let what = format!("a log line with {needles:?}");
        let stderr = self.stderr.clone();

        wait_for(timeout, &what, || {
            let stderr = stderr.clone();
            async move {
                stderr
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .cloned()
            }
        })
        .await
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "process did not exit within {timeout:?} of SIGTERM; logs:\n{}",
                    self.logs()
                )
            })
            .expect("wait")
    }

    /// SIGKILL, as a crash.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit on its own.
    pub async fn exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "process did not exit within {timeout:?}; logs:\n{}",
                    self.logs()
                )
            })
            .expect("wait")
    }
}

/// Starts an agent process for `b`'s enrollment token and CA, reaching the
/// backend at `url` (the backend itself, or a relay in front of it), with
/// extra flags and environment (which may override `UPLINK_TOKEN`).
pub fn agent_via(
    b: &TestBackend,
    url: &str,
    state_dir: &Path,
    hostname: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut argv = vec![
        "agent",
        "--backend",
        url,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--hostname",
        hostname,
    ];
    let ca = b.ca.to_str().unwrap().to_string();
    if !args.contains(&"--ca-file") {
        argv.extend(["--ca-file", ca.as_str()]);
    }
    argv.extend_from_slice(args);
    let mut env: Vec<(&str, &str)> = vec![("UPLINK_TOKEN", b.enroll_token.expose())];
    env.extend_from_slice(envs);
    Proc::spawn(&argv, &env)
}

/// Runs `uplink ctl ARGS` against `b` with its admin token and CA.
pub async fn ctl(b: &TestBackend, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(["ctl", "--backend", &b.url.to_string(), "--ca-file"])
        .arg(&b.ca)
        .args(args)
        .env("UPLINK_ADMIN_TOKEN", b.admin_token.expose())
        .output()
        .await
        .expect("uplink ctl runs")
}

/// Starts an agent process against `b`.
pub fn agent(b: &TestBackend, transport: &str, state_dir: &Path, hostname: &str) -> Proc {
    agent_via(
        b,
        &b.url.to_string(),
        state_dir,
        hostname,
        &["--transport", transport],
        &[],
    )
}
