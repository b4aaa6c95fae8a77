//! Debian's squid (squid-openssl), started per test with its own
//! configuration, logs and state in a temporary directory, and stopped when
//! dropped: [`Squid`] on a loopback port of this host, [`SquidContainer`]
//! in a container on a Docker network, published on a loopback port. Both
//! take the configuration [`prepare`] writes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// What the squid should do.
#[derive(Clone, Debug, Default)]
pub struct SquidOpts {
    /// Require Basic auth with this user and password (basic_ncsa_auth).
    pub auth: Option<(String, String)>,
    /// TLS interception (ssl_bump) with a CA generated here; the backend's
    /// CA is what squid trusts upstream.
    pub bump_upstream_ca: Option<PathBuf>,
    /// `client_lifetime`: every client connection (tunnel) is cut at this age.
    pub client_lifetime: Option<Duration>,
    /// `read_timeout`: idle tunnels are cut after this long without data.
    pub read_timeout: Option<Duration>,
    /// Refuse CONNECT to any port but 443 (squid's stock policy): 403.
    pub only_port_443: bool,
    /// Listen on this port (a squid started again where the previous one
    /// listened); a free port when not set.
    pub port: Option<u16>,
}

/// A running squid.
pub struct Squid {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its configuration, logs and state.
    pub dir: PathBuf,
    /// The interception CA (PEM), when bumping.
    pub bump_ca: Option<PathBuf>,
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

impl Squid {
    /// Starts squid and waits until it accepts connections.
    pub async fn start(dir: &Path, opts: SquidOpts) -> Squid {
        let port = opts.port.unwrap_or_else(crate::free_port);
        let upstream = opts
            .bump_upstream_ca
            .as_ref()
            .map(|p| p.display().to_string());
        let bump_ca = prepare(
            dir,
            &opts,
            &Layout {
                at: &dir.display().to_string(),
                listen: &format!("127.0.0.1:{port}"),
                clients: "127.0.0.0/8",
                upstream_ca: upstream.as_deref(),
            },
        );
        let conf_path = dir.join("squid.conf");
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("squid starts (apt-get install squid-openssl)");
        let s = Squid {
            child,
            port,
            dir: dir.to_path_buf(),
            bump_ca,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return s;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "squid did not listen on {port} within 20 s; cache.log:\n{}",
                    std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The proxy URL, with credentials when given.
    pub fn url(&self, creds: Option<(&str, &str)>) -> String {
        match creds {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Stops squid with SIGTERM and waits up to 5 s for it to exit: that
    /// way it removes its shared memory segments (`/dev/shm/squid-*.shm`),
    /// which a SIGKILL leaves behind. Dropping it afterwards signals it
    /// again if it is still there. True when it exited in time.
    pub async fn stop(self) -> bool {
        let pid = std::fs::read_to_string(self.dir.join("squid.pid"))
            .map(|p| p.trim().to_string())
            .unwrap_or_default();
        let mut stopped = false;
        if !pid.is_empty() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if exited(&pid) {
                    stopped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        drop(self);
        stopped
    }
}

/// Where squid finds its files and whom it serves: the same
/// configuration for a squid on this host and one in a container.
pub struct Layout<'a> {
    /// The directory of its configuration, logs and state, as squid sees it.
    pub at: &'a str,
    /// `http_port`'s address (`127.0.0.1:PORT`, or a port alone).
    pub listen: &'a str,
    /// The source addresses it serves (`127.0.0.0/8`, or `all`).
    pub clients: &'a str,
    /// The CA squid trusts upstream when bumping, as squid sees it.
    pub upstream_ca: Option<&'a str>,
}

/// Writes `squid.conf` into `dir` (with the password file, and the
/// interception CA and certificate database when bumping), readable and
/// writable by squid's user; returns the interception CA's path in `dir`.
pub fn prepare(dir: &Path, opts: &SquidOpts, layout: &Layout) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    // squid drops root for the `proxy` user: let it write here.
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status();
    let _ = std::process::Command::new("chmod")
        .args(["a+rx"])
        .arg(dir.parent().unwrap())
        .status();
    let d = layout.at;
    let listen = layout.listen;
    let mut conf = String::new();
    let mut bump_ca = None;
    if opts.bump_upstream_ca.is_some() {
        let upstream = layout
            .upstream_ca
            .expect("the upstream CA as squid sees it");
        let ca = generate_ca(dir);
        conf.push_str(&format!(
            "http_port {listen} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB tls-cert={d}/bump-ca.pem tls-key={d}/bump-ca-key.pem\n\
             sslcrtd_program /usr/lib/squid/security_file_certgen -s {d}/ssl_db -M 4MB\n\
             sslcrtd_children 2 startup=1 idle=1\n\
             acl step1 at_step SslBump1\n\
             ssl_bump peek step1\n\
             ssl_bump bump all\n\
             tls_outgoing_options cafile={upstream}\n"
        ));
        let db = dir.join("ssl_db");
        let st = std::process::Command::new("/usr/lib/squid/security_file_certgen")
            .args(["-c", "-s"])
            .arg(&db)
            .args(["-M", "4MB"])
            .stdout(Stdio::null())
            .status()
            .expect("security_file_certgen runs");
        assert!(st.success(), "security_file_certgen -c failed");
        let _ = std::process::Command::new("chown")
            .args(["-R", "proxy:proxy"])
            .arg(&db)
            .status();
        bump_ca = Some(ca);
    } else {
        conf.push_str(&format!("http_port {listen}\n"));
    }
    conf.push_str(&format!(
        "pid_filename {d}/squid.pid\n\
         cache_log {d}/cache.log\n\
         access_log stdio:{d}/access.log\n\
         cache deny all\n\
         cache_mem 8 MB\n\
         coredump_dir {d}\n\
         visible_hostname uplink-test\n\
         shutdown_lifetime 0 seconds\n\
         acl localnet src {}\n\
         acl CONNECT method CONNECT\n",
        layout.clients
    ));
    if let Some((user, pass)) = &opts.auth {
        let out = std::process::Command::new("htpasswd")
            .args(["-b", "-c"])
            .arg(dir.join("passwd"))
            .args([user, pass])
            .output()
            .expect("htpasswd runs");
        assert!(
            out.status.success(),
            "htpasswd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        conf.push_str(&format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
             auth_param basic realm uplink-test\n\
             acl authed proxy_auth REQUIRED\n\
             http_access deny !authed\n"
        ));
    }
    if opts.only_port_443 {
        conf.push_str("acl SSL_ports port 443\nhttp_access deny CONNECT !SSL_ports\n");
    }
    conf.push_str("http_access allow localnet\nhttp_access deny all\n");
    if let Some(l) = opts.client_lifetime {
        conf.push_str(&format!("client_lifetime {} seconds\n", secs(l)));
    }
    if let Some(t) = opts.read_timeout {
        conf.push_str(&format!("read_timeout {} seconds\n", secs(t)));
    }
    std::fs::write(dir.join("squid.conf"), conf).unwrap();
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status();
    bump_ca
}

/// squid in a container on a Docker network (so it resolves the names of
/// that network), published on a loopback port of this host. No registry
/// is needed: the container is the busybox test image with this host's
/// squid and its libraries mounted read-only, run as squid's user.
pub struct SquidContainer {
    /// The container's name.
    pub name: String,
    /// Its published port on 127.0.0.1.
    pub port: u16,
    /// Its configuration, logs and state (mounted at `/squid`).
    pub dir: PathBuf,
    /// The interception CA (PEM), when bumping.
    pub bump_ca: Option<PathBuf>,
}

impl SquidContainer {
    /// Starts squid as container `name` on `network`, published on
    /// 127.0.0.1:`port`, serving any client (behind `opts.auth` when
    /// set); waits until it accepts connections.
    pub async fn start(
        dir: &Path,
        name: &str,
        network: &str,
        port: u16,
        opts: SquidOpts,
    ) -> SquidContainer {
        crate::docker::ensure_image(dir.parent().unwrap());
        std::fs::create_dir_all(dir).unwrap();
        if let Some(ca) = &opts.bump_upstream_ca {
            std::fs::copy(ca, dir.join("upstream-ca.pem")).expect("copy the upstream CA");
        }
        let bump_ca = prepare(
            dir,
            &opts,
            &Layout {
                at: "/squid",
                listen: "3128",
                clients: "all",
                upstream_ca: Some("/squid/upstream-ca.pem"),
            },
        );
        let id = |flag: &str| {
            let out = std::process::Command::new("id")
                .args([flag, "proxy"])
                .output()
                .expect("id runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let user = format!("{}:{}", id("-u"), id("-g"));
        let publish = format!("127.0.0.1:{port}:3128");
        let state = format!("{}:/squid", dir.display());
        let out = std::process::Command::new("docker")
            .args(["run", "-d", "--name", name, "--network", network])
            .args(["--user", &user, "-p", &publish, "-v", &state])
            .args([
                "-v",
                "/usr:/usr:ro",
                "-v",
                "/lib:/lib:ro",
                "-v",
                "/lib64:/lib64:ro",
            ])
            .args(["-v", "/etc/ssl:/etc/ssl:ro", crate::docker::LOCAL_IMAGE])
            .args(["/usr/sbin/squid", "-N", "-f", "/squid/squid.conf"])
            .output()
            .expect("docker runs");
        let s = SquidContainer {
            name: name.to_string(),
            port,
            dir: dir.to_path_buf(),
            bump_ca,
        };
        assert!(
            out.status.success(),
            "squid's container did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The published port accepts before squid does (Docker's proxy
        // listens): wait for squid's own word.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
            if log.contains("Accepting") && log.contains("HTTP Socket connections") {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let logs = std::process::Command::new("docker")
                    .args(["logs", name])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                panic!("squid did not accept within 20 s; cache.log:\n{log}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The access log so far (squid writes a tunnel's line when it closes).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for SquidContainer {
    fn drop(&mut self) {
        // Its shared memory segments are in the container's /dev/shm,
        // gone with it.
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// True when process `pid` has exited (gone, or a zombie not reaped yet).
fn exited(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => true,
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        // SIGTERM, so squid removes its shared memory segments in /dev/shm
        // (shutdown_lifetime is 0); SIGKILL would leave them behind.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// A CA for interception, written as `bump-ca.pem` and `bump-ca-key.pem`.
fn generate_ca(dir: &Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "Corp Intercept CA");
    dn.push(rcgen::DnType::OrganizationName, "Example Corp");
    params.distinguished_name = dn;
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.join("bump-ca.pem");
    std::fs::write(&pem, cert.pem()).unwrap();
    std::fs::write(dir.join("bump-ca-key.pem"), key.serialize_pem()).unwrap();
    pem
}
