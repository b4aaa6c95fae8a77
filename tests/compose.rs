//! The backend as `compose.yaml` runs it (`make up`), with Debian's
//! docker-compose 1.29 and the image `make image-local` built: it serves on
//! the published port, prints its admin token once, and an upgrade to a
//! rebuilt image keeps agents, tokens and queued commands.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use uplink_testkit::agents::{Proc, bin};
use uplink_testkit::image::{docker, docker_try, image, repo_root};
use uplink_testkit::{free_port, wait_for};

/// A compose project of its own name, taken down with its volume at the end.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        let file = repo_root().join("compose.yaml");
        Command::new("docker-compose")
            .arg("-f")
            .arg(&file)
            .args(["-p", &self.name])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("docker-compose runs")
    }

    fn up(&self) {
        let out = self.compose(&["up", "-d"]);
        assert!(
            out.status.success(),
            "docker-compose up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "backend"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn container(&self) -> String {
        let out = self.compose(&["ps", "-q", "backend"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans"]);
    }
}

async fn ctl(url: &str, ca: &Path, admin: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(bin())
        .args(["ctl", "--backend", url, "--ca-file"])
        .arg(ca)
        .args(args)
        .env("UPLINK_ADMIN_TOKEN", admin)
        .output()
        .await
        .expect("uplink ctl runs")
}

/// A Connect call to the admin API with curl, its JSON answer.
fn admin_call(url: &str, ca: &Path, admin: &str, method: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("authorization: Bearer {admin}")])
        .args(["-H", "content-type: application/json", "-d", body])
        .arg(format!("{url}/uplink.v1.AdminService/{method}"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{method}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON answer")
}

/// The value after `key` in `text` (a token printed by the backend).
fn token_after(text: &str, key: &str) -> Option<String> {
    let at = text.find(key)? + key.len();
    let token: String = text[at..]
        .trim_start_matches(['\'', '"', ' '])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!token.is_empty()).then_some(token)
}

fn agent(url: &str, ca: &Path, state: &Path, token: &str) -> Proc {
    Proc::spawn(
        &[
            "agent",
            "--backend",
            url,
            "--state-dir",
            state.to_str().unwrap(),
            "--hostname",
            "compose-host",
            "--ca-file",
            ca.to_str().unwrap(),
        ],
        &[("UPLINK_TOKEN", token)],
    )
}

async fn wait_connected(url: &str, ca: &Path, admin: &str) -> String {
    wait_for(Duration::from_secs(30), "the agent connected", || async {
        let out = ctl(url, ca, admin, &["agents", "--json"]).await;
        let agents: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        agents
            .as_array()?
            .iter()
            .find(|a| a["connected"] == true)
            .and_then(|a| a["id"].as_str().map(str::to_string))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_backend_serves_and_an_upgrade_keeps_agents_tokens_and_queued_commands() {
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("https://localhost:{port}");
    let mut project = Project {
        name: format!("uplinkcompose{}", std::process::id()),
        env: Vec::new(),
    };
    project.set("UPLINK_IMAGE", image);
    project.set("UPLINK_PORT", &port.to_string());
    project.set("UPLINK_PUBLIC_URL", &url);
    project.up();

    // The admin token is printed once, in the log.
    let logs = wait_for(
        Duration::from_secs(30),
        "the backend's first log",
        || async {
            let logs = project.logs();
            logs.contains("admin token").then_some(logs)
        },
    )
    .await;
    let admin =
        token_after(&logs, "admin token (shown once): ").expect("an admin token in the log");
    let container = project.container();
    let ca = dir.path().join("ca.pem");
    docker(&[
        "cp",
        &format!("{container}:/var/lib/uplink/ca.pem"),
        ca.to_str().unwrap(),
    ]);

    // The image's HEALTHCHECK (`uplink health`) finds it serving.
    wait_for(
        Duration::from_secs(60),
        "the backend container healthy",
        || async {
            let status = docker(&[
                "inspect",
                "--format",
                "{{.State.Health.Status}}",
                &container,
            ]);
            (status == "healthy").then_some(())
        },
    )
    .await;

    // A provider of its own, an agent on it, then the agent away.
    let created = ctl(&url, &ca, &admin, &["providers", "create", "lab"]).await;
    let created = String::from_utf8_lossy(&created.stdout).into_owned();
    let token = token_after(&created, "UPLINK_TOKEN=").unwrap_or_else(|| panic!("{created}"));
    let state = dir.path().join("agent");
    let mut a = agent(&url, &ca, &state, &token);
    let id = wait_connected(&url, &ca, &admin).await;
    a.terminate(Duration::from_secs(10)).await;

    // A command queued while the agent is away.
    let queued = admin_call(
        &url,
        &ca,
        &admin,
        "EnqueueCommand",
        &format!(r#"{{"agentId":"{id}","spec":{{"ping":{{}}}}}}"#),
    );
    let command = queued["command"]["id"].as_str().unwrap().to_string();

    // The upgrade: a rebuilt image (another revision label, so another
    // image id), the container recreated on the same volume.
    let upgraded = format!("uplink-test-upgrade:{}", std::process::id());
    let rebuilt = {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "printf 'FROM {image}\\nLABEL org.opencontainers.image.revision=upgraded\\n' | docker build -q -t {upgraded} -"
                ),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        upgraded.clone()
    };
    project.set("UPLINK_IMAGE", &rebuilt);
    project.up();
    let recreated = project.container();
    assert_ne!(recreated, container, "the container was not recreated");
    assert_eq!(
        docker(&["inspect", "--format", "{{.Config.Image}}", &recreated]),
        rebuilt
    );

    // The same admin token, the same CA, the same agent and its queue.
    let mut a = agent(&url, &ca, &state, &token);
    assert_eq!(wait_connected(&url, &ca, &admin).await, id);
    let done = admin_call(
        &url,
        &ca,
        &admin,
        "GetCommand",
        &format!(r#"{{"commandId":"{command}","waitMs":10000}}"#),
    );
    assert_eq!(done["command"]["state"], "COMMAND_STATE_DONE", "{done}");
    assert_eq!(done["command"]["result"]["message"], "pong", "{done}");
    // The provider's token still enrolls a new host.
    let second = dir.path().join("agent2");
    let mut b = agent(&url, &ca, &second, &token);
    wait_for(
        Duration::from_secs(30),
        "a second host enrolled",
        || async {
            let out = ctl(&url, &ca, &admin, &["agents", "--json"]).await;
            let agents: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (agents.as_array()?.len() == 2).then_some(())
        },
    )
    .await;
    // The admin token was printed once: the upgraded backend's log (the
    // new container's) does not show it again.
    let logs = project.logs();
    assert!(logs.contains("listening"), "{logs}");
    assert!(!logs.contains("admin token (shown once)"), "{logs}");

    a.terminate(Duration::from_secs(10)).await;
    b.terminate(Duration::from_secs(10)).await;
    drop(project);
    let _ = docker_try(&["rmi", &upgraded]);
}
