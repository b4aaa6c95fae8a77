//! A TLS-terminating reverse proxy in front of a [`TestBackend`]: Debian's
//! nginx or HAProxy (HTTP mode), started per test on a loopback port with
//! the configuration the README shows (`docs/ingress/`), its addresses and
//! files put in, and stopped when dropped. Variants make the mistakes an
//! operator makes with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::backend::TestBackend;

/// The nginx configuration the README shows.
pub fn nginx_conf() -> String {
    read_doc("nginx.conf")
}

/// The HAProxy configuration the README shows.
pub fn haproxy_cfg() -> String {
    read_doc("haproxy.cfg")
}

fn read_doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/ingress")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Which server, and how it is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// nginx with `docs/ingress/nginx.conf`.
    Nginx {
        /// Changes to it: each `(from, to)` must match.
        edits: Vec<(String, String)>,
    },
    /// HAProxy with `docs/ingress/haproxy.cfg`.
    Haproxy,
}

impl Ingress {
    /// nginx as documented.
    pub fn nginx() -> Self {
        Ingress::Nginx { edits: Vec::new() }
    }

    /// nginx as documented but for one change.
    pub fn nginx_with(from: &str, to: &str) -> Self {
        Ingress::Nginx {
            edits: vec![(from.into(), to.into())],
        }
    }
}

/// A running ingress.
pub struct RunningIngress {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its configuration and logs.
    pub dir: PathBuf,
}

/// Replaces `from` (which must occur) with `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the ingress configuration has no {from:?}"
    );
    text.replace(from, to)
}

/// A certificate for 127.0.0.1 and localhost issued by the backend's CA
/// (in its data dir), as the operator's own: `(cert, key)` PEM files in
/// `dir`.
fn front_certificate(data_dir: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let ca_pem = std::fs::read_to_string(data_dir.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(data_dir.join("ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let (cert, key) = crate::certs::server_certificate(&issuer, "ingress");
    let (c, k) = (dir.join("front.crt"), dir.join("front.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

impl RunningIngress {
    /// Starts `which` in `dir` in front of `b` and waits until it listens.
    pub async fn start(which: &Ingress, b: &TestBackend, dir: &Path) -> RunningIngress {
        Self::in_front_of(which, b.addr, &b.dir, dir).await
    }

    /// Starts `which` in `dir` in front of the backend at `addr` whose
    /// generated CA is in `data_dir` (its certificate must name
    /// `localhost`), and waits until it listens.
    pub async fn in_front_of(
        which: &Ingress,
        addr: SocketAddr,
        data_dir: &Path,
        dir: &Path,
    ) -> RunningIngress {
        std::fs::create_dir_all(dir).unwrap();
        let port = crate::free_port();
        let (cert, key) = front_certificate(data_dir, dir);
        let backend = format!("127.0.0.1:{}", addr.port());
        let ca = data_dir.join("ca.pem").display().to_string();
        let d = dir.display();
        let mut cmd = match which {
            Ingress::Nginx { edits } => {
                let mut site = nginx_conf();
                for (from, to) in edits {
                    site = edit(&site, from, to);
                }
                let site = edit(&site, "listen 443 ", &format!("listen 127.0.0.1:{port} "));
                let site = edit(&site, "127.0.0.1:8443", &backend);
                let site = edit(
                    &site,
                    "/etc/nginx/tls/uplink.crt",
                    &cert.display().to_string(),
                );
                let site = edit(
                    &site,
                    "/etc/nginx/tls/uplink.key",
                    &key.display().to_string(),
                );
                let site = edit(&site, "/etc/nginx/tls/uplink-backend-ca.pem", &ca);
                std::fs::write(dir.join("uplink.conf"), site).unwrap();
                for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    std::fs::create_dir_all(dir.join("tmp").join(t)).unwrap();
                }
                let main = format!(
                    "daemon off;\n\
                     master_process on;\n\
                     worker_processes 1;\n\
                     user root;\n\
                     pid {d}/nginx.pid;\n\
                     error_log {d}/error.log info;\n\
                     events {{ worker_connections 512; }}\n\
                     http {{\n\
                       access_log {d}/access.log;\n\
                       client_body_temp_path {d}/tmp/body;\n\
                       proxy_temp_path {d}/tmp/proxy;\n\
                       fastcgi_temp_path {d}/tmp/fastcgi;\n\
                       uwsgi_temp_path {d}/tmp/uwsgi;\n\
                       scgi_temp_path {d}/tmp/scgi;\n\
                       include {d}/uplink.conf;\n\
                     }}\n"
                );
                std::fs::write(dir.join("nginx.conf"), main).unwrap();
                let mut c = Command::new("nginx");
                c.arg("-p")
                    .arg(dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(dir.join("nginx.conf"));
                c
            }
            Ingress::Haproxy => {
                let pem = dir.join("front.pem");
                std::fs::write(
                    &pem,
                    std::fs::read_to_string(&cert).unwrap()
                        + &std::fs::read_to_string(&key).unwrap(),
                )
                .unwrap();
                let cfg = haproxy_cfg();
                let cfg = edit(&cfg, "bind :443 ", &format!("bind 127.0.0.1:{port} "));
                let cfg = edit(&cfg, "127.0.0.1:8443", &backend);
                let cfg = edit(
                    &cfg,
                    "/etc/haproxy/tls/uplink.pem",
                    &pem.display().to_string(),
                );
                let cfg = edit(&cfg, "/etc/haproxy/tls/uplink-backend-ca.pem", &ca);
                std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
                let mut c = Command::new("haproxy");
                c.arg("-db").arg("-f").arg(dir.join("haproxy.cfg"));
                c
            }
        };
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the ingress starts (apt-get install nginx-light haproxy)");
        let ing = RunningIngress {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return ing;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "the ingress did not listen on {port} within 20 s:\n{}\n{}",
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Its access log so far (nginx).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for RunningIngress {
    fn drop(&mut self) {
        // nginx's master stops its workers on SIGTERM, and must have the
        // time to: killed first (`kill_on_drop`), it leaves them running.
        // HAProxy exits.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
