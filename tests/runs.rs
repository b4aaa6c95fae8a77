//! Runs across agents against the real Docker engine: capacity reports,
//! even placement, all-or-nothing refusal, status, logs and stop through
//! the `uplink ctl` binary, and a run that outlives a backend restart.

use std::collections::HashMap;
use std::time::Duration;

use uplink::proto;
use uplink_testkit::docker::{LOCAL_IMAGE, containers_of, ensure_image, remove_containers_of};
use uplink_testkit::*;

struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for a in &self.0 {
            remove_containers_of(a);
        }
    }
}

/// Waits until every agent of `hostnames` is connected and has reported a
/// capacity with Docker available; returns their ids in that order.
async fn agents_with_docker(b: &TestBackend, hostnames: &[&str]) -> Vec<String> {
    let admin = b.admin();
    wait_for(
        Duration::from_secs(30),
        "capacity reports with docker available",
        || async {
            let agents = admin.agents("").await.ok()?;
            hostnames
                .iter()
                .map(|h| {
                    agents
                        .iter()
                        .find(|a| {
                            a.hostname == *h
                                && a.connected
                                && a.capacity.as_ref().is_some_and(|c| c.docker_available)
                        })
                        .map(|a| a.id.clone())
                })
                .collect::<Option<Vec<_>>>()
        },
    )
    .await
}

/// `ctl run` of the test image on the default provider, 32 MiB per
/// container, named `name`, with more `flags` and the container's `command`
/// (none: the image's own).
async fn ctl_run(
    b: &TestBackend,
    name: &str,
    flags: &[&str],
    command: &[&str],
) -> std::process::Output {
    let mut args = vec!["run", "--provider", "default", "--image", LOCAL_IMAGE];
    args.extend_from_slice(&["--memory", "32m", "--name", name]);
    args.extend_from_slice(flags);
    if !command.is_empty() {
        args.push("--");
        args.extend_from_slice(command);
    }
    ctl(b, &args).await
}

fn text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_six_spreads_two_per_agent_survives_a_backend_restart_and_stop_removes_all() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let hosts = ["runs-a", "runs-b", "runs-c"];
    let _agents: Vec<Proc> = hosts
        .iter()
        .map(|h| agent_via(&b, &b.url.to_string(), &dir.path().join(h), h, &[], &[]))
        .collect();
    let ids = agents_with_docker(&b, &hosts).await;
    let _cleanup = Cleanup(ids.clone());

    // The capacity is what the engine's host has, with Docker's version.
    let agents = b.admin().agents("").await.unwrap();
    let cap = agents[0].capacity.clone().unwrap();
    assert!(cap.cpu_cores >= 1 && cap.memory_bytes > 0, "{cap:?}");
    assert!(cap.docker_status.starts_with("docker "), "{cap:?}");
    assert_eq!(cap.running_containers, 0);

    // Six containers: two on each agent, all started when `ctl run` returns.
    let name = format!("six-{}", fastrand::u32(..));
    let script = "trap 'echo bye; exit 0' TERM; echo hello from $RUN_LABEL; sleep 600 & wait";
    let out = ctl_run(
        &b,
        &name,
        &["--count", "6", "--cpus", "0.1", "--env", "RUN_LABEL=six"],
        &["sh", "-c", script],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("started after") && said.contains("6 running"),
        "{said}"
    );
    for id in &ids {
        assert!(said.contains(&format!("2 on {id}")), "{said}");
        let mut names = containers_of(id);
        names.sort();
        assert_eq!(names.len(), 2, "containers of {id}: {names:?}");
        assert!(names.iter().all(|n| n.starts_with(&name)), "{names:?}");
    }
    let status = json(&ctl(&b, &["run-status", &name, "--json"]).await);
    assert_eq!(status["state"], "running", "{status}");
    let containers = status["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 6);
    let mut per_agent: HashMap<&str, usize> = HashMap::new();
    for c in containers {
        assert_eq!(c["state"], "running", "{c}");
        assert!(!c["container_id"].as_str().unwrap().is_empty(), "{c}");
        *per_agent
            .entry(c["agent_id"].as_str().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_agent.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    let run_id = status["id"].as_str().unwrap().to_string();

    // The agents' next capacity reports count the containers.
    let admin = b.admin();
    wait_for(
        Duration::from_secs(20),
        "capacity counting 2 containers each",
        || async {
            let agents = admin.agents("").await.ok()?;
            ids.iter()
                .all(|id| {
                    agents.iter().any(|a| {
                        a.id == *id
                            && a.capacity
                                .as_ref()
                                .is_some_and(|c| c.running_containers == 2)
                    })
                })
                .then_some(())
        },
    )
    .await;

    // More than the provider can take: refused as a whole, nothing created.
    let out = ctl_run(&b, "too-many", &["--count", "40", "--cpus", "1"], &[]).await;
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("can take") && err.contains("of 40 containers"),
        "{err}"
    );
    for id in &ids {
        assert_eq!(
            containers_of(id).len(),
            2,
            "a refused run created containers"
        );
    }
    // The name of a live run is taken.
    let out = ctl_run(&b, &name, &["--cpus", "0.1"], &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still has containers"),
        "{}",
        text(&out)
    );

    // Logs of every container, by name.
    let out = ctl(&b, &["logs", &name, "--tail", "5"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let logs = String::from_utf8_lossy(&out.stdout);
    for i in 0..6 {
        assert!(
            logs.contains(&format!("{name}-{i} | hello from six")),
            "{logs}"
        );
    }

    // The backend restarts; the run is still there, and the agents come back.
    let (cfg, addr) = b.stop().await;
    let b = TestBackend::start_with(cfg, addr).await;
    agents_with_docker(&b, &hosts).await;
    let runs = json(&ctl(&b, &["runs", "--json"]).await);
    let listed = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == run_id.as_str());
    assert_eq!(
        listed.map(|r| r["state"].clone()),
        Some("running".into()),
        "{runs}"
    );

    // Stop removes every container on every agent.
    let out = ctl(&b, &["stop", &run_id]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("6 removed"),
        "{}",
        text(&out)
    );
    for id in &ids {
        assert_eq!(
            containers_of(id),
            Vec::<String>::new(),
            "containers of {id} left"
        );
    }
    let status = json(&ctl(&b, &["run-status", &run_id, "--json"]).await);
    assert_eq!(status["state"], "stopped", "{status}");
    // The name is free again.
    assert!(!b.core.store().run_name_in_use(&name).await.unwrap());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_ends_by_itself_reports_exit_codes_and_a_stop_before_start_still_removes() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let _a = agent_via(
        &b,
        &b.url.to_string(),
        &dir.path().join("a"),
        "runs-exit",
        &[],
        &[],
    );
    let ids = agents_with_docker(&b, &["runs-exit"]).await;
    let _cleanup = Cleanup(ids.clone());
    let admin = b.admin();

    // Containers that exit: the run finishes with each exit code.
    let run = admin
        .create_run(proto::CreateRunRequest {
            provider: "default".into(),
            image: LOCAL_IMAGE.into(),
            count: 2,
            cpus: 0.1,
            memory_bytes: 32 << 20,
            command: vec!["sh".into(), "-c".into(), "exit 7".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let v = admin
        .wait_run(&run.id, Duration::from_secs(60), |v| {
            v.state == proto::RunState::Finished as i32
        })
        .await
        .unwrap();
    assert_eq!(v.state, proto::RunState::Finished as i32, "{v:?}");
    // Both containers, not just "every one there is": an empty list would
    // pass an all().
    let codes: Vec<i64> = v.containers.iter().map(|c| c.exit_code).collect();
    assert_eq!(codes, vec![7, 7], "{v:?}");

    // A stop asked before the containers started is carried out once they
    // do: nothing is left behind.
    let run2 = admin
        .create_run(proto::CreateRunRequest {
            provider: "default".into(),
            image: LOCAL_IMAGE.into(),
            count: 3,
            cpus: 0.1,
            memory_bytes: 32 << 20,
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .stop_run(&run2.id, Duration::from_secs(1))
        .await
        .unwrap();
    // And the finished run is stopped too (its exited containers removed).
    admin
        .stop_run(&run.id, Duration::from_secs(1))
        .await
        .unwrap();
    for r in [&run.id, &run2.id] {
        let v = admin
            .wait_run(r, Duration::from_secs(60), uplink::ctl::run_stopped)
            .await
            .unwrap();
        assert_eq!(v.state, proto::RunState::Stopped as i32, "{v:?}");
    }
    assert_eq!(containers_of(&ids[0]), Vec::<String>::new());
    b.stop().await;
}
