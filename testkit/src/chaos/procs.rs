//! The backend and the agents as processes of the `uplink` binary that
//! the soak kills with SIGKILL and starts again on the same data (the
//! backend on the same port and data dir, an agent on the same state
//! dir). The logs of every incarnation are kept for the end's checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use uplink::ctl::Admin;
use uplink::secret::{Kind, Secret};
use uplink::tls::Trust;

use crate::agents::Proc;

/// Logs of a process and of its earlier incarnations.
fn all_logs(past: &[Proc], now: Option<&Proc>) -> String {
    past.iter()
        .chain(now)
        .map(Proc::logs)
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON-lines files the backend keeps: the most it allows, far more than
/// a soak's backend starts (one file each) and 64 MiB rotations.
const JSONL_KEEP: &str = "100000";

/// `uplink backend` as a process on a fixed loopback port.
pub struct BackendProc {
    /// Its data directory.
    pub dir: PathBuf,
    /// Where it writes every sample as JSON lines; it deletes none of
    /// them.
    pub jsonl: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The admin API's token.
    pub admin_token: Secret,
    /// The token agents enroll with.
    pub enroll_token: Secret,
    /// How many times it was killed and started again.
    pub restarts: u32,
    proc: Option<Proc>,
    past: Vec<Proc>,
}

impl BackendProc {
    /// Starts a backend with its data in `dir` on a free port and waits
    /// until it listens.
    pub async fn start(dir: &Path) -> BackendProc {
        let mut b = BackendProc {
            dir: dir.to_path_buf(),
            jsonl: dir.join("jsonl"),
            port: crate::free_port(),
            admin_token: Secret::generate(Kind::Admin),
            enroll_token: Secret::generate(Kind::Enrollment),
            restarts: 0,
            proc: None,
            past: Vec::new(),
        };
        b.spawn().await;
        b
    }

    async fn spawn(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let p = Proc::spawn(
            &[
                "backend",
                "--listen",
                &listen,
                "--data-dir",
                self.dir.to_str().unwrap(),
                "--hostname",
                "127.0.0.1",
                "--heartbeat-interval",
                "2s",
                "--metrics-jsonl-dir",
                self.jsonl.to_str().unwrap(),
                // Every start writes a file of its own and a backend keeps
                // only the newest `--metrics-jsonl-keep` (20 by default):
                // the soak counts samples over all of them, so none may go.
                "--metrics-jsonl-keep",
                JSONL_KEEP,
            ],
            &[
                ("UPLINK_ADMIN_TOKEN", self.admin_token.expose()),
                ("UPLINK_ENROLL_TOKEN", self.enroll_token.expose()),
            ],
        );
        // The port may still be held a moment by the killed process.
        p.wait_log(&["backend listening"], Duration::from_secs(60))
            .await;
        self.proc = Some(p);
    }

    /// SIGKILL, then (after `down`) a new backend on the same port and
    /// data dir.
    pub async fn crash_and_restart(&mut self, down: Duration) {
        self.crash().await;
        tokio::time::sleep(down).await;
        self.restart().await;
    }

    /// SIGKILL; [`BackendProc::restart`] starts it again.
    pub async fn crash(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9().await;
            self.past.push(p);
        }
    }

    /// A new backend on the same port and data dir, after
    /// [`BackendProc::crash`].
    pub async fn restart(&mut self) {
        self.restarts += 1;
        self.spawn().await;
    }

    /// Its process id now.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.child.id())
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA it generated in its data dir.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// An admin client on a direct connection.
    pub fn admin(&self) -> Admin {
        let trust = Trust {
            ca_files: vec![self.ca()],
            skip_os_store: true,
        };
        let tls = uplink::tls::client_config(&trust).expect("client TLS");
        let net = uplink::net::Net::new(tls, uplink::net::ProxySettings::direct());
        let url: Uri = self.url().parse().unwrap();
        Admin::new(&url, &net, self.admin_token.clone())
    }

    /// The logs of every incarnation.
    pub fn logs(&self) -> String {
        all_logs(&self.past, self.proc.as_ref())
    }
}

/// `uplink agent` as a process, started again on the same state dir
/// after each SIGKILL.
pub struct AgentProc {
    /// The hostname it reports (unique per soak).
    pub hostname: String,
    /// Its state directory.
    pub state: PathBuf,
    /// How many times it was killed and started again.
    pub restarts: u32,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    proc: Option<Proc>,
    past: Vec<Proc>,
}

impl AgentProc {
    /// Starts `uplink agent` for `b`, reaching it at `url`, with its state
    /// in `state` and more `args` and `envs`.
    pub fn start(
        b: &BackendProc,
        url: &str,
        state: &Path,
        hostname: &str,
        args: &[String],
        envs: &[(String, String)],
    ) -> AgentProc {
        let mut all = vec![
            "agent".to_string(),
            "--backend".into(),
            url.into(),
            "--state-dir".into(),
            state.to_str().unwrap().into(),
            "--hostname".into(),
            hostname.into(),
            "--ca-file".into(),
            b.ca().to_str().unwrap().into(),
        ];
        all.extend_from_slice(args);
        let mut envs = envs.to_vec();
        envs.push(("UPLINK_TOKEN".into(), b.enroll_token.expose().into()));
        let mut a = AgentProc {
            hostname: hostname.into(),
            state: state.to_path_buf(),
            restarts: 0,
            args: all,
            envs,
            proc: None,
            past: Vec::new(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.proc = Some(Proc::spawn(&args, &envs));
    }

    /// SIGKILL, then a new agent on the same state dir.
    pub async fn crash_and_restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9().await;
            self.past.push(p);
        }
        self.restarts += 1;
        self.spawn();
    }

    /// Its process id now.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.child.id())
    }

    /// The running incarnation.
    pub fn current(&self) -> &Proc {
        self.proc.as_ref().expect("the agent runs")
    }

    /// Lines containing every one of `needles`, over every incarnation.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.past
            .iter()
            .chain(self.proc.as_ref())
            .map(|p| p.count(needles))
            .sum()
    }

    /// The logs of every incarnation.
    pub fn logs(&self) -> String {
        all_logs(&self.past, self.proc.as_ref())
    }
}
