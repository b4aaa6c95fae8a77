//! The replicated backend as `compose.ha.yaml` runs it (`make up-ha`):
//! PostgreSQL, three replicas and HAProxy in TCP mode on one published
//! port, under Debian's docker-compose 1.29, with the image `make
//! image-local` builds and, in place of `postgres:15` and `haproxy:2.6`,
//! the images `scripts/stand-in-images` makes from Debian's packages.
//! An agent enrolls and `uplink ctl` works through the one port, the
//! agent on gRPC (ALPN passes through HAProxy); when the replica holding
//! it is killed it is on another within 10 s and a ping runs once; the
//! killed replica, started again, takes it when the other two are killed.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use uplink::secret::{Kind, Secret, random_hex};
use uplink_testkit::agents::{Proc, agent_at, bin};
use uplink_testkit::image::{docker, docker_try, image, repo_root};
use uplink_testkit::{free_port, wait_for};

/// The longest an agent may take to be on a live replica after a kill.
const FAILOVER_MAX: Duration = Duration::from_secs(10);
const REPLICAS: [&str; 3] = ["backend-1", "backend-2", "backend-3"];
const POSTGRES_IMAGE: &str = "uplink-stand-in/postgres:15";
const HAPROXY_IMAGE: &str = "uplink-stand-in/haproxy:2.6";

/// A compose project of its own name on `compose.ha.yaml`, taken down
/// with its volumes and network at the end, also when the test fails.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("-f")
            .arg(repo_root().join("compose.ha.yaml"))
            .args(["-p", &self.name])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("docker-compose runs")
    }

    fn must(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", "40"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn container(&self, service: &str) -> String {
        let id = self.must(&["ps", "-q", service]);
        assert!(!id.is_empty(), "no container for {service}");
        id
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the project's last log lines:\n{}", self.logs());
        }
        let out = self.compose(&["down", "-v", "--remove-orphans", "-t", "10"]);
        if !out.status.success() {
            eprintln!(
                "docker-compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The images in place of the official ones, made once per machine.
fn stand_in_images() {
    let out = Command::new(repo_root().join("scripts/stand-in-images"))
        .args([POSTGRES_IMAGE, HAPROXY_IMAGE])
        .output()
        .expect("scripts/stand-in-images runs");
    assert!(
        out.status.success(),
        "scripts/stand-in-images failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `uplink ctl` through HAProxy with the admin token.
struct Ctl {
    url: String,
    ca: PathBuf,
    admin: Secret,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(bin())
            .args(["ctl", "--backend", &self.url, "--ca-file"])
            .arg(&self.ca)
            .args(args)
            .env("UPLINK_ADMIN_TOKEN", self.admin.expose())
            .output()
            .await
            .expect("uplink ctl runs")
    }

    async fn agents(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.run(&["agents", "--json"]).await;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the agent is shown connected on a replica of one of
    /// `services`; that replica's id (`<hostname>-<random>`).
    async fn connected_on(&self, agent: &str, services: &[&str]) -> (String, serde_json::Value) {
        wait_for(
            Duration::from_secs(30),
            &format!("agent {agent} connected on one of {services:?}"),
            || async {
                let view = self
                    .agents()
                    .await?
                    .into_iter()
                    .find(|a| a["id"] == agent && a["connected"] == true)?;
                let replica = view["replica"].as_str()?.to_string();
                services
                    .iter()
                    .any(|s| service_of(&replica) == *s)
                    .then_some((replica, view))
            },
        )
        .await
    }

    /// `ctl ping`: DONE ("pong"), and executed by the agent; its command id.
    async fn ping(&self, agent_id: &str, agent: &Proc) -> String {
        let out = self.run(&["ping", agent_id, "--timeout", "20s"]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("pong from"),
            "ctl ping: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let command = stdout
            .split_whitespace()
            .find(|w| w.starts_with("cmd_"))
            .unwrap_or_else(|| panic!("no command id in {stdout}"))
            .to_string();
        // The agent's log is read by a task: the line may trail the answer.
        wait_for(
            Duration::from_secs(5),
            &format!("{command} in the agent's log"),
            || async { (executions(agent, &command) > 0).then_some(()) },
        )
        .await;
        command
    }
}

/// How many times the agent executed `command`.
fn executions(agent: &Proc, command: &str) -> usize {
    agent.count(&["executing command", command])
}

/// The compose service a replica id names (`backend-2-3fa9c1`).
fn service_of(replica: &str) -> &str {
    replica.rsplit_once('-').map_or("", |(host, _)| host)
}

/// Lines of the agent's log saying it reached a backend on some rung.
fn sessions(agent: &Proc) -> usize {
    agent.count(&["stream open"]) + agent.count(&["long-polling"])
}

/// Waits until the agent opened a session after `before` of them; how
/// long after `since` that was.
async fn reconnected(agent: &Proc, before: usize, since: Instant) -> Duration {
    wait_for(
        Duration::from_secs(60),
        "the agent back on a backend",
        || async { (sessions(agent) > before).then(|| since.elapsed()) },
    )
    .await
}

fn health(container: &str) -> String {
    let (_, status, _) = docker_try(&[
        "inspect",
        "--format",
        "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
        container,
    ]);
    status
}

async fn healthy(project: &Project, services: &[&str]) {
    let containers: Vec<(String, String)> = services
        .iter()
        .map(|s| (s.to_string(), project.container(s)))
        .collect();
    wait_for(
        Duration::from_secs(90),
        &format!("{services:?} healthy"),
        || async {
            containers
                .iter()
                .all(|(_, c)| health(c) == "healthy")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicated_compose_backend_fails_over_behind_one_port() {
    let image = image();
    stand_in_images();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("https://localhost:{port}");
    let admin = Secret::generate(Kind::Admin);
    let enroll = Secret::generate(Kind::Enrollment);
    let project = Project {
        name: format!("uplinkha{}", std::process::id()),
        env: [
            ("UPLINK_IMAGE", image),
            ("UPLINK_POSTGRES_IMAGE", POSTGRES_IMAGE),
            ("UPLINK_HAPROXY_IMAGE", HAPROXY_IMAGE),
            ("UPLINK_PORT", &port.to_string()),
            ("UPLINK_HOSTNAMES", "localhost"),
            ("UPLINK_PUBLIC_URL", &url),
            ("UPLINK_POSTGRES_PASSWORD", &random_hex("", 16)),
            ("UPLINK_ADMIN_TOKEN", admin.expose()),
            ("UPLINK_ENROLL_TOKEN", enroll.expose()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let started = Instant::now();
    project.must(&["up", "-d"]);
    eprintln!("up after {:?}", started.elapsed());

    // The CA every replica was given, as an operator copies it for agents.
    let ca = dir.path().join("ca.pem");
    docker(&[
        "cp",
        &format!("{}:/var/lib/uplink/ca.pem", project.container("backend-1")),
        ca.to_str().unwrap(),
    ]);
    let ctl = Ctl {
        url: url.clone(),
        ca,
        admin,
    };
    wait_for(
        Duration::from_secs(60),
        "ctl answered through HAProxy",
        || async { ctl.agents().await },
    )
    .await;

    // An agent enrolled with the shared enrollment token, through the port.
    let state = dir.path().join("agent");
    let agent = agent_at(
        &url,
        &ctl.ca,
        &state,
        "compose-ha-host",
        &["--no-metrics"],
        &[("UPLINK_TOKEN", enroll.expose())],
    );
    let id = wait_for(Duration::from_secs(30), "the agent enrolled", || async {
        ctl.agents()
            .await?
            .iter()
            .find(|a| a["hostname"] == "compose-ha-host")
            .and_then(|a| a["id"].as_str().map(str::to_string))
    })
    .await;
    let (first, view) = ctl.connected_on(&id, &REPLICAS).await;
    assert_eq!(view["transport"], "grpc", "ALPN h2 did not pass: {view}");
    let mut pings = vec![ctl.ping(&id, &agent).await];

    // `docker ps` says healthy: every replica and the database.
    healthy(
        &project,
        &["postgres", "backend-1", "backend-2", "backend-3"],
    )
    .await;

    // The replica holding the agent dies: the agent is on another within
    // FAILOVER_MAX, and a ping queued through the port runs once.
    let victim = service_of(&first).to_string();
    let before = sessions(&agent);
    let killed = Instant::now();
    docker(&["kill", &project.container(&victim)]);
    let took = reconnected(&agent, before, killed).await;
    let others: Vec<&str> = REPLICAS.into_iter().filter(|s| *s != victim).collect();
    let (second, _) = ctl.connected_on(&id, &others).await;
    eprintln!("{first} killed: the agent on {second} after {took:?}");
    assert!(
        took <= FAILOVER_MAX,
        "the agent took {took:?} to leave the killed {victim}"
    );
    pings.push(ctl.ping(&id, &agent).await);

    // The killed replica started again (HAProxy finds it by name, on
    // whatever address it has now) takes the agent when the other two
    // are killed.
    project.must(&["start", &victim]);
    healthy(&project, &[victim.as_str()]).await;
    let before = sessions(&agent);
    let killed = Instant::now();
    for s in &others {
        docker(&["kill", &project.container(s)]);
    }
    let took = reconnected(&agent, before, killed).await;
    let (third, _) = ctl.connected_on(&id, &[victim.as_str()]).await;
    eprintln!("{others:?} killed: the agent on {third} after {took:?}");
    assert_ne!(third, first, "{victim} was not started again");
    assert!(
        took <= FAILOVER_MAX,
        "the agent took {took:?} to reach the restarted {victim}"
    );
    pings.push(ctl.ping(&id, &agent).await);
    // Each ping once, after two failovers that redelivered what was
    // unacknowledged.
    for command in &pings {
        let runs = executions(&agent, command);
        assert_eq!(
            runs,
            1,
            "{command} executed {runs} times:\n{}",
            agent.logs()
        );
    }
    eprintln!("done after {:?}", started.elapsed());
    drop(agent);
    drop(project);
    assert_no_leftovers(&format!("uplinkha{}", std::process::id()));
}

/// Nothing of the project is left: containers, volumes, network.
fn assert_no_leftovers(name: &str) {
    let label = format!("label=com.docker.compose.project={name}");
    for what in [
        &["ps", "-aq", "--filter", &label][..],
        &["volume", "ls", "-q", "--filter", &label],
        &["network", "ls", "-q", "--filter", &label],
    ] {
        let left = docker(what);
        assert!(left.is_empty(), "docker {} left: {left}", what.join(" "));
    }
}
