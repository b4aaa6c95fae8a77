//! The mission on the real Docker engine, as an operator deploys it: the
//! backend from the project's image in a container, on a network of its
//! own under a DNS alias, with its data in a volume; a proxy in a container
//! on that network ([`crate::squid::SquidContainer`]); the agent from the
//! line the backend prints. [`Site`] owns the networks, volumes, containers
//! and images a test makes, names them uniquely per run (except what the
//! printed line names itself: [`AGENT_CONTAINER`], [`AGENT_VOLUME`]), and
//! removes them all when dropped, also when the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uplink::ctl::Admin;
use uplink::secret::{Kind, Secret};
use uplink::tls::Trust;

use crate::image::{container_logs, docker, docker_try};
use crate::waits::wait_for;

/// The agent's container, as the printed line names it.
pub const AGENT_CONTAINER: &str = "uplink-agent";
/// The agent's state volume, as the printed line names it.
pub const AGENT_VOLUME: &str = "uplink-state";
/// The backend's name on its network. It resolves only there (Docker's
/// embedded DNS), never on the host.
pub const BACKEND_ALIAS: &str = "uplink-backend";
/// The backend's port in its container.
pub const BACKEND_PORT: u16 = 8443;
/// The label on everything a site creates: its name.
const SITE_LABEL: &str = "uplink-test.site";

/// A deployment on the real engine, removed when dropped.
pub struct Site {
    /// Unique per run; every name the site chooses starts with it.
    pub name: String,
    /// Host files: the backend's CA, squid's configuration and logs.
    pub dir: tempfile::TempDir,
    /// The backend's network.
    pub network: String,
    /// The backend's data volume.
    pub backend_volume: String,
    /// The backend's container.
    pub backend: String,
    /// The backend's port published on 127.0.0.1 (for `ctl` and
    /// `/metrics` from this host).
    pub backend_port: u16,
    /// The image the backend runs now.
    pub backend_image: String,
    /// The backend's admin token, given in its environment.
    pub admin_token: Secret,
    /// The backend's CA, copied out of its volume.
    pub ca: PathBuf,
    /// Flags of the backend's command after `backend`.
    backend_flags: Vec<String>,
    /// The backend's environment besides the admin token, `NAME=value`.
    backend_env: Vec<String>,
    /// Images this site built (removed at the end).
    images: Vec<String>,
    /// Agents whose containers are removed at the end.
    agents: Mutex<Vec<String>>,
    /// Held while the site may run the printed line: its names are fixed.
    agent_names: Option<File>,
}

impl Site {
    /// A new site named after `tag`, with its network made.
    pub fn new(tag: &str) -> Site {
        let name = format!(
            "uplink-e2e-{tag}-{}-{:04x}",
            std::process::id(),
            fastrand::u16(..)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .unwrap();
        // Containers read what the test puts here (squid runs as its own
        // user, the agent as uid 10001).
        chmod("755", dir.path());
        let site = Site {
            network: format!("{name}-net"),
            backend_volume: format!("{name}-backend"),
            backend: format!("{name}-backend"),
            backend_port: crate::free_port(),
            backend_image: String::new(),
            admin_token: Secret::generate(Kind::Admin),
            ca: dir.path().join("backend-ca.pem"),
            backend_flags: Vec::new(),
            backend_env: Vec::new(),
            images: Vec::new(),
            agents: Mutex::new(Vec::new()),
            agent_names: None,
            name,
            dir,
        };
        let label = site.label();
        docker(&["network", "create", "--label", &label, &site.network]);
        docker(&["volume", "create", "--label", &label, &site.backend_volume]);
        site
    }

    fn label(&self) -> String {
        format!("{SITE_LABEL}={}", self.name)
    }

    /// Starts the backend from `image` as `backend FLAGS` with `envs` on
    /// the site's network under [`BACKEND_ALIAS`], its data in the site's
    /// volume and the admin token in its environment; waits until it
    /// answers `ctl` and copies its CA out of the volume. Flags and
    /// environment are kept for [`Site::recreate_backend`].
    pub async fn start_backend(&mut self, image: &str, flags: &[&str], envs: &[(&str, &str)]) {
        self.backend_flags = flags.iter().map(|f| f.to_string()).collect();
        self.backend_env = envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.run_backend(image).await;
    }

    async fn run_backend(&mut self, image: &str) {
        self.backend_image = image.to_string();
        let publish = format!("127.0.0.1:{}:{BACKEND_PORT}", self.backend_port);
        let volume = format!("{}:/var/lib/uplink", self.backend_volume);
        let admin = format!("UPLINK_ADMIN_TOKEN={}", self.admin_token.expose());
        let label = self.label();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &self.backend,
            "--label",
            &label,
            "--network",
            &self.network,
            "--network-alias",
            BACKEND_ALIAS,
            "-p",
            &publish,
            "-v",
            &volume,
            "-e",
            &admin,
            "-e",
            "UPLINK_LOG=info",
        ];
        for e in &self.backend_env {
            args.extend(["-e", e]);
        }
        args.extend([image, "backend"]);
        args.extend(self.backend_flags.iter().map(String::as_str));
        docker(&args);
        self.wait_backend().await;
    }

    /// Waits until the backend's CA can be copied out and it answers
    /// an admin call with that CA.
    async fn wait_backend(&self) {
        let from = format!("{}:/var/lib/uplink/ca.pem", self.backend);
        let ca = self.ca.to_str().unwrap().to_string();
        wait_for(
            Duration::from_secs(30),
            "the backend's CA in its volume",
            || async {
                let running = docker(&["inspect", "--format", "{{.State.Running}}", &self.backend]);
                assert_eq!(
                    running,
                    "true",
                    "the backend's container stopped:\n{}",
                    self.backend_logs()
                );
                docker_try(&["cp", &from, &ca]).0.then_some(())
            },
        )
        .await;
        chmod("644", &self.ca);
        let admin = self.admin();
        let logs = || self.backend_logs();
        let started = Instant::now();
        loop {
            match admin.providers().await {
                Ok(_) => return,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("the backend did not answer within 30 s: {e}\n{}", logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The backend's output so far (stdout, then the log on stderr).
    pub fn backend_logs(&self) -> String {
        container_logs(&self.backend)
    }

    /// Stops the backend's container (SIGTERM, as `docker stop` does);
    /// returns how long it took and its exit code.
    pub fn stop_backend(&self) -> (Duration, i64) {
        stop(&self.backend)
    }

    /// Starts the stopped backend container again.
    pub async fn start_backend_again(&self) {
        docker(&["start", &self.backend]);
        self.wait_backend().await;
    }

    /// Removes the backend's container and runs `image` in its place, on
    /// the same volume, network, alias, port and flags: an upgrade.
    pub async fn recreate_backend(&mut self, image: &str) {
        docker(&["rm", "-f", &self.backend]);
        self.run_backend(image).await;
    }

    /// A copy of `image` that differs from it (a label of its own, so
    /// another image id), tagged `<name>:upgrade`: what an upgrade pulls.
    /// Removed with the site.
    pub fn derived_image(&mut self, image: &str) -> String {
        let tag = format!("{}:upgrade", self.name);
        let ctx = self.dir.path().join("upgrade");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {image}\nLABEL {SITE_LABEL}.upgrade={}\n", self.name),
        )
        .unwrap();
        docker(&["build", "-q", "-t", &tag, ctx.to_str().unwrap()]);
        self.images.push(tag.clone());
        tag
    }

    /// The backend's URL from this host.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.backend_port)
    }

    /// An admin client from this host, trusting only the backend's CA.
    pub fn admin(&self) -> Admin {
        let trust = Trust {
            ca_files: vec![self.ca.clone()],
            skip_os_store: true,
        };
        let tls = uplink::tls::client_config(&trust).expect("client TLS");
        let net = uplink::net::Net::new(tls, uplink::net::ProxySettings::direct());
        Admin::new(&self.url().parse().unwrap(), &net, self.admin_token.clone())
    }

    /// `uplink ctl ARGS` (the host's binary) against the backend.
    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(crate::bin())
            .args(["ctl", "--backend", &self.url(), "--ca-file"])
            .arg(&self.ca)
            .args(args)
            .env("UPLINK_ADMIN_TOKEN", self.admin_token.expose())
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
            .await
            .expect("uplink ctl runs")
    }

    /// `GET /metrics` with the admin token.
    pub async fn metrics(&self) -> String {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.ca)
            .args([
                "-H",
                &format!("authorization: Bearer {}", self.admin_token.expose()),
                &format!("{}/metrics", self.url()),
            ])
            .output()
            .await
            .expect("curl runs");
        assert!(
            out.status.success(),
            "GET /metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Takes the names the printed line uses ([`AGENT_CONTAINER`],
    /// [`AGENT_VOLUME`]): waits for any other site on this machine to let
    /// them go (a lock file), then removes what a crashed run left.
    pub fn take_agent_names(&mut self) {
        let path = std::env::temp_dir().join("uplink-test-agent-container.lock");
        let lock = File::create(&path).expect("create the lock file");
        lock.lock().expect("lock the agent's names");
        remove_agent();
        self.agent_names = Some(lock);
    }

    /// Runs `line` with `sh -c`, as an operator pastes it; panics with
    /// its output when it fails. Needs [`Site::take_agent_names`].
    pub fn run_line(&self, line: &str) -> String {
        assert!(
            self.agent_names.is_some(),
            "take the agent's names before running the line"
        );
        let out = Command::new("sh")
            .args(["-c", line])
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "the printed line failed:\n{line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The containers of `agent` are removed with the site.
    pub fn owns_agent(&self, agent: &str) {
        self.agents.lock().unwrap().push(agent.to_string());
    }

    /// A file in the site's directory, readable by every container.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        chmod("644", &path);
        path
    }

    /// The site's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.agent_names.is_some() {
            remove_agent();
        }
        for agent in self.agents.lock().unwrap().iter() {
            crate::docker::remove_containers_of(agent);
        }
        // Its own containers, and any other on its network.
        for filter in [
            format!("label={}", self.label()),
            format!("network={}", self.network),
        ] {
            let (_, ids, _) = docker_try(&["ps", "-aq", "--filter", &filter]);
            for id in ids.lines() {
                let _ = docker_try(&["rm", "-f", id]);
            }
        }
        let _ = docker_try(&["rm", "-f", &self.backend]);
        let _ = docker_try(&["network", "rm", &self.network]);
        let _ = docker_try(&["volume", "rm", "-f", &self.backend_volume]);
        for image in &self.images {
            let _ = docker_try(&["rmi", "-f", image]);
        }
        // Last: other sites wait for the names.
        self.agent_names.take();
    }
}

/// Removes the agent's container and state volume, if there.
fn remove_agent() {
    let _ = docker_try(&["rm", "-f", AGENT_CONTAINER]);
    let _ = docker_try(&["volume", "rm", "-f", AGENT_VOLUME]);
}

/// `docker stop` (SIGTERM, SIGKILL after Docker's 10 s); how long it
/// took and the container's exit code.
pub fn stop(container: &str) -> (Duration, i64) {
    let started = Instant::now();
    docker(&["stop", container]);
    let took = started.elapsed();
    let code = docker(&["inspect", "--format", "{{.State.ExitCode}}", container]);
    (took, code.parse().unwrap_or(-1))
}

fn chmod(mode: &str, path: &Path) {
    let _ = Command::new("chmod").arg(mode).arg(path).status();
}
