//! The whole mission on the real Docker engine, as an operator runs it:
//! the backend from the project's image in a container, on a network of
//! its own where it is `uplink-backend`; a squid container on that network
//! (Basic auth; or TLS interception that speaks only HTTP/1.1), published
//! on a loopback port; and the agent from the `docker run` line the
//! backend prints, pasted unchanged into `sh -c`. The line runs the agent
//! with `--network host`, where `uplink-backend` does not resolve (Docker's
//! DNS answers for that name only inside the backend's network), so the
//! agent reaches the backend through squid or not at all.
//!
//! Then what the agent is for: a run of load generators through the
//! socket, their samples and the host's and containers' metrics at the
//! backend, their exits; `docker stop`/`docker start` of the agent; a
//! restart and an upgrade of the backend with commands queued meanwhile.
//!
//! The printed line names its container and volume itself
//! (`uplink-agent`, `uplink-state`), so the tests here take those names in
//! turn (a lock file); everything else is named per run and removed at the
//! end, also on failure.

use std::time::{Duration, Instant};

use uplink::ctl::Admin;
use uplink::proto::{self, CommandState, CommandStatus};
use uplink_testkit::deploy::{AGENT_CONTAINER, AGENT_VOLUME, BACKEND_ALIAS, BACKEND_PORT, Site};
use uplink_testkit::image::{container_logs, docker, docker_try, image};
use uplink_testkit::squid::{SquidContainer, SquidOpts};
use uplink_testkit::{free_port, ping, wait_for};

/// The proxy's user and password (Basic auth).
const PROXY_USER: &str = "loadgen";
const PROXY_PASSWORD: &str = "pr0xy-pw";
/// The port load generators push Graphite plaintext to, on the bridge.
const GRAPHITE_PORT: u16 = 2003;
/// Each load generator's rate and duration: its last `requests` sample.
const RATE: u32 = 50;
const SECONDS: u32 = 4;

/// A backend, a squid and an agent from the printed line, running.
struct Mission {
    // Dropped first: squid leaves the network before the site removes it.
    squid: SquidContainer,
    site: Site,
    /// The agent's id.
    agent: String,
}

impl Mission {
    /// Starts the backend, squid (intercepting TLS when `bump`) and the
    /// agent from the line the backend prints for a new provider; waits
    /// until the agent is connected on `rung`.
    async fn start(tag: &str, bump: bool, rung: &str) -> Mission {
        let image = image();
        let mut site = Site::new(tag);
        let squid_port = free_port();
        // The backend's CA where the printed line mounts it from, as an
        // operator copies it to the agent's host (and, behind an
        // intercepting proxy, the proxy's CA beside it).
        let agent_ca = site.path().join("agent-ca.pem");
        let proxy = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{squid_port}");
        site.start_backend(
            image,
            &[
                "--hostname",
                BACKEND_ALIAS,
                "--hostname",
                "127.0.0.1",
                "--public-url",
                &format!("https://{BACKEND_ALIAS}:{BACKEND_PORT}"),
                "--agent-metrics-interval",
                "1s",
                "--host-command-ca-file",
                agent_ca.to_str().unwrap(),
            ],
            &[("UPLINK_HOST_COMMAND_PROXY", &proxy)],
        )
        .await;
        let squid = SquidContainer::start(
            &site.path().join("squid"),
            &format!("{}-squid", site.name),
            &site.network,
            squid_port,
            SquidOpts {
                auth: Some((PROXY_USER.into(), PROXY_PASSWORD.into())),
                bump_upstream_ca: bump.then(|| site.ca.clone()),
                ..Default::default()
            },
        )
        .await;
        let mut bundle = std::fs::read_to_string(&site.ca).unwrap();
        if let Some(ca) = &squid.bump_ca {
            bundle.push_str(&std::fs::read_to_string(ca).unwrap());
        }
        site.write("agent-ca.pem", &bundle);

        let out = site.ctl(&["providers", "create", "e2e"]).await;
        let text = output(&out);
        assert!(out.status.success(), "{text}");
        let line = printed_line(&String::from_utf8_lossy(&out.stdout));
        assert!(
            line.contains("--network host")
                && line.contains(&format!(
                    "UPLINK_BACKEND=https://{BACKEND_ALIAS}:{BACKEND_PORT}"
                ))
                && line.contains(&format!("HTTPS_PROXY={proxy}")),
            "{line}"
        );
        // The backend's name means nothing on the host.
        assert!(
            tokio::net::lookup_host((BACKEND_ALIAS, BACKEND_PORT))
                .await
                .is_err(),
            "{BACKEND_ALIAS} resolves on this host: the test would not show the proxy is needed"
        );

        site.take_agent_names();
        let started = Instant::now();
        let id = site.run_line(&line);
        assert_eq!(id.len(), 64, "docker run printed {id:?}");
        let admin = site.admin();
        let view = loop {
            let agents = admin.agents("e2e").await.unwrap_or_default();
            if let Some(a) = agents
                .into_iter()
                .find(|a| a.connected && uplink::ctl::transport_name(a.transport) == rung)
            {
                break a;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let logs = container_logs(AGENT_CONTAINER);
                let cache =
                    std::fs::read_to_string(squid.dir.join("cache.log")).unwrap_or_default();
                panic!(
                    "the agent was not connected on {rung} within 60 s; its log:\n{logs}\n\
                     squid's access log:\n{}\nsquid's cache.log:\n{cache}",
                    squid.access_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let start_to_connected = started.elapsed();
        println!("{tag}: from the printed line to connected on {rung}: {start_to_connected:?}");
        // The line opened the load generators' endpoint on the bridge.
        let graphite = format!("{}:{GRAPHITE_PORT}", bridge_gateway().await);
        let logs = container_logs(AGENT_CONTAINER);
        assert!(
            logs.lines()
                .any(|l| l.contains("Graphite plaintext accepted on") && l.contains(&graphite)),
            "{logs}"
        );
        // The image's health check, in each container: what Docker runs.
        // The agent's status file follows its connection within moments.
        health(AGENT_CONTAINER, true, &format!("agent connected on {rung}")).await;
        health(&site.backend, true, "backend serving").await;
        // Fresh volumes: neither had a mode of its own to correct.
        for logs in [logs, site.backend_logs()] {
            assert!(!logs.contains("made owner-only"), "{logs}");
        }
        site.owns_agent(&view.id);
        let listed = site.ctl(&["agents", "--json"]).await;
        let text = output(&listed);
        let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect(&text);
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == view.id.as_str()
                    && a["connected"] == true
                    && a["transport"] == rung),
            "{text}"
        );
        Mission {
            squid,
            site,
            agent: view.id,
        }
    }

    fn admin(&self) -> Admin {
        self.site.admin()
    }

    /// The agent's container's log.
    fn agent_logs(&self) -> String {
        container_logs(AGENT_CONTAINER)
    }

    /// `ctl ARGS --json`, parsed.
    async fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.site.ctl(&args).await;
        assert!(out.status.success(), "{}", output(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", output(&out)))
    }

    /// `ctl run` of `count` containers of the image running `loadgen
    /// ARGS`, named `name`; the run's id once all started.
    async fn run(&self, name: &str, count: u32, loadgen: &[&str]) -> String {
        let count = count.to_string();
        let mut args = vec![
            "run",
            "--provider",
            "e2e",
            "--image",
            image(),
            "--count",
            &count,
            "--cpus",
            "0.2",
            "--memory",
            "64m",
            "--name",
            name,
            "--",
            "loadgen",
        ];
        args.extend_from_slice(loadgen);
        let out = self.site.ctl(&args).await;
        let text = output(&out);
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&format!("{count} running")), "{text}");
        let status = self.ctl_json(&["run-status", name]).await;
        status["id"].as_str().unwrap().to_string()
    }

    /// Two load generators, run `lg`, pushing the numbered Graphite
    /// stream to the agent's endpoint on the bridge for [`SECONDS`] at
    /// [`RATE`]; the run's id once both started.
    async fn load_generators(&self) -> String {
        let graphite = format!("{}:{GRAPHITE_PORT}", bridge_gateway().await);
        let duration = format!("{SECONDS}s");
        let rate = RATE.to_string();
        let args = [
            "--graphite",
            &graphite,
            "--duration",
            &duration,
            "--rate",
            &rate,
        ];
        self.run("lg", 2, &args).await
    }

    /// Waits until every container of run `name` exited; returns the
    /// run's status.
    async fn exited(&self, name: &str, timeout: Duration) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let status = self.ctl_json(&["run-status", name]).await;
            let containers = status["containers"].as_array().unwrap();
            if containers.iter().all(|c| c["state"] == "exited") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "run {name} did not end within {timeout:?}: {status}\n{}",
                self.agent_logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the backend's `/metrics` has, from this agent, the
    /// host's CPU, the CPU of every container of `run`, and each load
    /// generator's last `requests` sample (`RATE * SECONDS`).
    async fn metrics_of(&self, run: &serde_json::Value, timeout: Duration) -> String {
        let agent = format!("agent=\"{}\"", self.agent);
        let run_label = format!("run=\"{}\"", run["id"].as_str().unwrap());
        let names: Vec<&str> = run["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        let started = Instant::now();
        loop {
            let page = self.site.metrics().await;
            let line = |name: &str, labels: &[&str]| {
                page.lines()
                    .find(|l| {
                        l.starts_with(&format!("{name}{{"))
                            && l.contains(&agent)
                            && labels.iter().all(|x| l.contains(x))
                    })
                    .map(str::to_string)
            };
            let host = line("host_cpu_usage_percent", &[]);
            let cpu = names.iter().all(|name| {
                line(
                    "container_cpu_usage_seconds_total",
                    &[&format!("container=\"{name}\""), &run_label],
                )
                .is_some()
            });
            let samples = last_samples_in(&page, run, &self.agent);
            if host.is_some() && cpu && samples {
                return page;
            }
            assert!(
                started.elapsed() < timeout,
                "within {timeout:?}, /metrics had host {host:?}, every container's CPU {cpu}, \
                 every load generator's last sample {samples}:\n{}\n{}",
                page.lines()
                    .filter(|l| l.contains(&agent)
                        && (l.starts_with("loadgen_") || l.starts_with("container_cpu")))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.agent_logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Queues `n` pings; their ids.
    async fn queue_pings(&self, n: usize) -> Vec<String> {
        let admin = self.admin();
        let mut ids = Vec::new();
        for i in 0..n {
            let c = admin
                .enqueue(&self.agent, ping(0, &format!("queued-{i}")))
                .await
                .expect("EnqueueCommand");
            ids.push(c.id);
        }
        ids
    }

    /// Waits for each command's result: all `OK`.
    async fn all_ok(&self, ids: &[String], wait: Duration) {
        let admin = self.admin();
        for id in ids {
            let view = admin.command(id, wait).await.expect("GetCommand");
            assert_done_ok(&view, &self.agent_logs());
        }
    }

    /// The agent as `uplink ctl agents --json` shows it.
    async fn listed(&self) -> serde_json::Value {
        let agents = self.ctl_json(&["agents"]).await;
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == self.agent.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{} not listed: {agents}", self.agent))
    }

    /// Restarts the backend by `restart` while squid is frozen (`docker
    /// pause`), so that the agent cannot be back before pings are queued:
    /// they wait for it, then reach it once squid thaws. Returns their ids.
    async fn restart_backend_with_queued_pings(
        &mut self,
        what: &str,
        restart: impl AsyncFnOnce(&mut Site),
    ) -> Vec<String> {
        let (took, code) = self.site.stop_backend();
        println!("docker stop (backend, {what}): {took:?}, exit code {code}");
        assert_eq!(code, 0, "{}", self.site.backend_logs());
        docker(&["pause", &self.squid.name]);
        restart(&mut self.site).await;
        let ids = self.queue_pings(3).await;
        let away = self.listed().await;
        assert_eq!(away["connected"], false, "{away}");
        assert_eq!(away["pending_commands"], 3, "{away}");
        // The agent's health check says so too.
        health(AGENT_CONTAINER, false, "not connected").await;
        docker(&["unpause", &self.squid.name]);
        let thawed = Instant::now();
        self.all_ok(&ids, Duration::from_secs(60)).await;
        println!(
            "backend {what}: 3 pings queued while the agent was away, all done {:?} after squid thawed",
            thawed.elapsed()
        );
        let back = self.listed().await;
        assert_eq!(back["connected"], true, "{back}");
        assert_eq!(back["pending_commands"], 0, "{back}");
        ids
    }
}

/// Waits (10 s at most) until `/uplink health` in `container`, as
/// Docker's health check runs it, succeeds (or fails, when not `healthy`)
/// and prints `says`; panics with what it last printed.
async fn health(container: &str, healthy: bool, says: &str) {
    let started = Instant::now();
    loop {
        let (ok, out, err) = docker_try(&["exec", container, "/uplink", "health"]);
        if ok == healthy && out.contains(says) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "`uplink health` in {container}: exit {}, not {healthy} with {says:?}:\n{out}\n{err}",
            if ok { "0" } else { "non-zero" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The command after "run an agent with:" in `ctl`'s output, as printed
/// (lines continued with a backslash).
fn printed_line(out: &str) -> String {
    let (_, after) = out
        .split_once("run an agent with:\n")
        .unwrap_or_else(|| panic!("no agent line in:\n{out}"));
    let mut line = String::new();
    for l in after.lines() {
        line.push_str(l);
        line.push('\n');
        if !l.ends_with('\\') {
            break;
        }
    }
    line
}

fn output(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_done_ok(view: &proto::CommandView, logs: &str) {
    let ok = view.state == CommandState::Done as i32
        && view
            .result
            .as_ref()
            .is_some_and(|r| r.status == CommandStatus::Ok as i32);
    assert!(ok, "not done with OK: {view:?}\n{logs}");
}

/// The Docker bridge's gateway, where containers reach the host (and the
/// agent, on the host's network, listens for load generators), as the
/// agent finds it.
async fn bridge_gateway() -> String {
    let docker = uplink::agent::docker::connect()
        .await
        .expect("the Docker engine");
    uplink::agent::docker::bridge_gateway(&docker)
        .await
        .expect("the bridge's gateway")
        .to_string()
}

/// The host's CPUs (as /proc/stat counts them, whatever the cgroup says).
fn host_cpus() -> u32 {
    std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32
}

/// The host's memory, from /proc/meminfo.
fn host_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Whether `page` (the backend's `/metrics`) has, from `agent`, the last
/// `requests` sample (`RATE * SECONDS`) of every load generator of `run`
/// (its status as JSON; a generator names itself by its container's short
/// id, its `HOSTNAME`).
fn last_samples_in(page: &str, run: &serde_json::Value, agent: &str) -> bool {
    let agent = format!("agent=\"{agent}\"");
    let last = format!("{}.0", RATE * SECONDS);
    run["containers"].as_array().unwrap().iter().all(|c| {
        let short = &c["container_id"].as_str().unwrap()[..12];
        page.lines().any(|l| {
            l.starts_with("loadgen_requests{")
                && l.contains(&agent)
                && l.contains(&format!("host=\"{short}\""))
                && l.split(' ').nth(1) == Some(last.as_str())
        })
    })
}

/// Lines of the agent's log that say it executes `command`.
fn executions(logs: &str, command: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("executing command") && l.contains(&format!("command={command} ")))
        .count()
}

/// Id and start time of each container of `run`, from Docker.
fn containers_of_run(run: &str) -> Vec<(String, String)> {
    let filter = format!("label=uplink.run={run}");
    let ids = docker(&["ps", "-aq", "--no-trunc", "--filter", &filter]);
    let mut out: Vec<(String, String)> = ids
        .lines()
        .map(|id| {
            let started = docker(&["inspect", "--format", "{{.State.StartedAt}}", id]);
            (id.to_string(), started)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_squid_the_printed_agent_runs_load_generators_survives_docker_stop_and_a_backend_upgrade()
 {
    let mut m = Mission::start("grpc", false, "grpc").await;
    let admin = m.admin();

    // The agent's traffic went through squid, authenticated, to the alias.
    let squid = &m.squid;
    wait_for(
        Duration::from_secs(30),
        "squid's log of a tunnel to the backend's alias",
        || async {
            squid
                .access_log()
                .contains(&format!(
                    "CONNECT {BACKEND_ALIAS}:{BACKEND_PORT} {PROXY_USER} "
                ))
                .then_some(())
        },
    )
    .await;

    // The agent reports the host, not its container, and leaves its own
    // container out of what it runs.
    let view = admin
        .agents("e2e")
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == m.agent)
        .unwrap();
    let hostname = uplink::hostname::hostname_under(std::path::Path::new("/"))
        .unwrap_or_else(uplink::hostname::default_hostname);
    assert_eq!(view.hostname, hostname, "{view:?}");
    let cap = wait_for(Duration::from_secs(30), "a capacity report", || async {
        admin
            .agents("e2e")
            .await
            .ok()?
            .into_iter()
            .find(|a| a.id == m.agent)?
            .capacity
            .filter(|c| c.docker_available)
    })
    .await;
    assert_eq!(cap.cpu_cores, host_cpus(), "{cap:?}");
    assert_eq!(cap.memory_bytes, host_memory(), "{cap:?}");
    assert_eq!(cap.running_containers, 0, "{cap:?}");

    // Two load generators pushing to the agent on the bridge, and two
    // that outlive the agent's restart.
    let lg = m.load_generators().await;
    let idle = m.run("idle", 2, &["--duration", "40s"]).await;
    let idle_before = containers_of_run(&idle);
    assert_eq!(idle_before.len(), 2, "{idle_before:?}");
    let lg_status = m.exited("lg", Duration::from_secs(30)).await;
    for c in lg_status["containers"].as_array().unwrap() {
        assert_eq!(c["exit_code"], 0, "{lg_status}");
    }

    // `docker stop` with a command in flight: a ping that takes 3 s.
    let slow = admin
        .enqueue(&m.agent, ping(3000, "in flight at stop"))
        .await
        .unwrap()
        .id;
    wait_for(
        Duration::from_secs(10),
        "the slow ping accepted",
        || async {
            let v = admin.command(&slow, Duration::ZERO).await.ok()?;
            (v.state != CommandState::Queued as i32).then_some(())
        },
    )
    .await;
    let before_stop = last_samples_in(&m.site.metrics().await, &lg_status, &m.agent);
    let (took, code) = uplink_testkit::deploy::stop(AGENT_CONTAINER);
    println!("docker stop {AGENT_CONTAINER}: {took:?}, exit code {code}");
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to stop"
    );
    assert_eq!(code, 0, "{}", m.agent_logs());
    let view = admin.command(&slow, Duration::ZERO).await.unwrap();
    assert_done_ok(&view, &m.agent_logs());

    // Stopped: the load generators' last samples are at the backend
    // already, or in the spool in the agent's volume.
    let page = m.site.metrics().await;
    let at_backend = last_samples_in(&page, &lg_status, &m.agent);
    let spool = docker(&[
        "run",
        "--rm",
        "-v",
        &format!("{AGENT_VOLUME}:/state:ro"),
        uplink_testkit::docker::LOCAL_IMAGE,
        "sh",
        "-c",
        "ls -l /state/spool",
    ]);
    // Not at the backend yet: only the spool can still hold them (the
    // load generators are gone, and so is the agent's memory); they must
    // arrive after the start below.
    println!(
        "the load generators' last samples: at the backend before docker stop: {before_stop}, \
         after: {at_backend}; the agent's spool after:\n{spool}"
    );

    // `docker start`: the same agent, its containers adopted as they run.
    let started = Instant::now();
    docker(&["start", AGENT_CONTAINER]);
    wait_for(
        Duration::from_secs(60),
        "the agent connected again",
        || async {
            let agents = admin.agents("e2e").await.ok()?;
            (agents.len() == 1 && agents[0].id == m.agent && agents[0].connected).then_some(())
        },
    )
    .await;
    println!(
        "docker start {AGENT_CONTAINER}: connected after {:?}",
        started.elapsed()
    );
    let logs = m.agent_logs();
    for i in 0..2 {
        assert!(
            logs.contains(&format!("adopted a running container container=idle-{i}")),
            "{logs}"
        );
    }
    assert_eq!(
        containers_of_run(&idle),
        idle_before,
        "idle's containers were recreated or restarted"
    );
    m.metrics_of(&lg_status, Duration::from_secs(60)).await;

    // The backend restarts, then is upgraded: another image, the container
    // made again on the same volume. Pings queued while the agent is away
    // reach it when it is back.
    let mut pings = m
        .restart_backend_with_queued_pings("restarted", async |site: &mut Site| {
            site.start_backend_again().await
        })
        .await;
    let upgraded = m.site.derived_image(image());
    let to = upgraded.clone();
    pings.extend(
        m.restart_backend_with_queued_pings("upgraded", async move |site: &mut Site| {
            site.recreate_backend(&to).await
        })
        .await,
    );
    assert_eq!(
        docker(&["inspect", "--format", "{{.Config.Image}}", &m.site.backend]),
        upgraded
    );
    let listed = m.listed().await;
    assert_eq!(listed["transport"], "grpc", "{listed}");

    // The runs outlived all of it; idle's exits reach the upgraded backend.
    let idle_status = m.exited("idle", Duration::from_secs(60)).await;
    for c in idle_status["containers"].as_array().unwrap() {
        assert_eq!(c["exit_code"], 0, "{idle_status}");
    }
    // Nothing ran twice: each ping once, four containers created in all.
    let logs = m.agent_logs();
    pings.push(slow);
    for id in &pings {
        assert_eq!(executions(&logs, id), 1, "command {id}:\n{logs}");
    }
    let creates = logs
        .lines()
        .filter(|l| l.contains("executing command") && l.contains("kind=\"run_container\""))
        .count();
    assert_eq!(creates, 4, "{logs}");
    assert_eq!(containers_of_run(&lg).len(), 2);
    assert_eq!(containers_of_run(&idle), idle_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_intercepting_http1_squid_the_printed_agent_long_polls_runs_load_generators_and_doctor_names_it()
 {
    let m = Mission::start("bump", true, "longpoll").await;
    let admin = m.admin();
    let view = admin
        .agents("e2e")
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == m.agent)
        .unwrap();
    println!("transport reason: {}", view.transport_reason);
    // squid opened the TLS and saw the long-poll calls inside it.
    let squid = &m.squid;
    wait_for(
        Duration::from_secs(30),
        "squid's log of the agent's calls inside the tunnel",
        || async {
            squid
                .access_log()
                .contains(&format!(
                    "POST https://{BACKEND_ALIAS}:{BACKEND_PORT}/uplink.v1.AgentService/"
                ))
                .then_some(())
        },
    )
    .await;

    m.load_generators().await;
    let status = m.exited("lg", Duration::from_secs(30)).await;
    for c in status["containers"].as_array().unwrap() {
        assert_eq!(c["exit_code"], 0, "{status}");
    }
    // Batches leave the agent at least every 30 s (the default batch age).
    m.metrics_of(&status, Duration::from_secs(60)).await;
    let pings = m.queue_pings(2).await;
    m.all_ok(&pings, Duration::from_secs(30)).await;

    // doctor, in the agent's container, with the agent's environment.
    let (ok, out, err) = docker_try(&["exec", AGENT_CONTAINER, "/uplink", "doctor"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("Corp Intercept CA") && out.contains("TLS-intercepting"),
        "{out}"
    );
    assert!(out.contains("would use long-polling"), "{out}");
    println!("{out}");
}
