//! The backend binary as an attacker meets it: [`BackendProc`] runs
//! `uplink backend` as its own process (optionally under `prlimit`, for a
//! low open-file limit), reads its memory (VmRSS), opens raw TLS
//! connections to it and runs `ctl` and agents against it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use uplink::secret::{Kind, Secret};
use uplink::tls::{Trust, client_config};

use crate::agents::{Proc, bin};
use crate::waits::wait_for;

/// A backend process, its tokens and its CA.
pub struct BackendProc {
    /// The process.
    pub proc: Proc,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// The CA it generated.
    pub ca: PathBuf,
    /// Its admin token.
    pub admin_token: Secret,
    /// Its enrollment token.
    pub enroll_token: Secret,
}

impl BackendProc {
    /// Starts `uplink backend` on a free loopback port with its data in
    /// `dir` and extra `flags`; with `nofile`, under `prlimit` with that
    /// soft and hard open-file limit.
    pub async fn start(dir: &Path, nofile: Option<u64>, flags: &[&str]) -> BackendProc {
        let admin_token = Secret::generate(Kind::Admin);
        let enroll_token = Secret::generate(Kind::Enrollment);
        let data = dir.join("data");
        let mut args = vec![
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let envs = [
            ("UPLINK_ADMIN_TOKEN", admin_token.expose()),
            ("UPLINK_ENROLL_TOKEN", enroll_token.expose()),
        ];
        let proc = match nofile {
            None => Proc::spawn(&args, &envs),
            Some(n) => {
                let limit = format!("--nofile={n}:{n}");
                let bin = bin().to_str().unwrap();
                let mut wrapped = vec![limit.as_str(), "--", bin];
                wrapped.extend_from_slice(&args);
                Proc::spawn_program(Path::new("prlimit"), &wrapped, &envs)
            }
        };
        let port = wait_for(Duration::from_secs(60), "backend listening", || {
            let out = proc.out();
            async move {
                out.split("listening on 127.0.0.1:")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u16>()
                    .ok()
            }
        })
        .await;
        BackendProc {
            proc,
            port,
            ca: data.join("ca.pem"),
            admin_token,
            enroll_token,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Its resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.proc.child.id().expect("backend runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// A TLS connection to it offering `alpn` (`h2` or `http/1.1`), with
    /// the handshake done and nothing sent.
    pub async fn tls(&self, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
        let mut cfg = client_config(&Trust {
            ca_files: vec![self.ca.clone()],
            skip_os_store: true,
        })
        .expect("client TLS config");
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
    }

    /// Runs `uplink ctl ARGS` against it with its admin token.
    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(bin())
            .args(["ctl", "--backend", &self.url(), "--ca-file"])
            .arg(&self.ca)
            .args(args)
            .env("UPLINK_ADMIN_TOKEN", self.admin_token.expose())
            .output()
            .await
            .expect("uplink ctl runs")
    }

    /// Starts an agent against it (gRPC streams) with state in `state_dir`.
    pub fn agent(&self, state_dir: &Path, hostname: &str) -> Proc {
        self.agent_with(state_dir, hostname, &["--transport", "grpc"])
    }

    /// Starts an agent against it with state in `state_dir` and extra
    /// flags (`--transport longpoll`, `--no-metrics`...).
    pub fn agent_with(&self, state_dir: &Path, hostname: &str, flags: &[&str]) -> Proc {
        let url = self.url();
        let mut args = vec![
            "agent",
            "--backend",
            &url,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--hostname",
            hostname,
            "--ca-file",
            self.ca.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        Proc::spawn(&args, &[("UPLINK_TOKEN", self.enroll_token.expose())])
    }
}
