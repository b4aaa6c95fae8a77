//! The README's main job, `uplink demo`, as a newcomer runs it: pings on
//! both rungs, then a run of two containers through the agents on this
//! machine's Docker engine, followed to their exit and removed, and the
//! metrics that reached the backend (hosts, containers, load generators).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_commands_on_both_rungs_and_runs_containers_through_docker() {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new(uplink_testkit::bin())
            .args(["demo", "--rounds", "2"])
            .output(),
    )
    .await
    .expect("the demo ends within 3 minutes")
    .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for rung in ["grpc", "longpoll"] {
        let rows = stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(rung) && l.contains("cmd_"))
            .count();
        assert_eq!(rows, 2, "two pings on {rung}:\n{stdout}");
    }
    assert!(
        stdout.contains("containers: a run of 2 x uplink-demo:"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(" exited    0 ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("| loadgen "),
        "logs of the containers:\n{stdout}"
    );
    assert!(stdout.contains("stopped: 2 removed"), "{stdout}");
    // Metrics reached the backend: both hosts, the containers, and the
    // load generators' own samples through the agent's Graphite endpoint.
    assert!(stdout.contains("metrics at the backend"), "{stdout}");
    for host in ["demo-grpc", "demo-longpoll"] {
        assert!(
            stdout.lines().any(|l| l.contains("host_cpu_usage_percent{")
                && l.contains(&format!("hostname=\"{host}\""))),
            "no host metrics of {host}:\n{stdout}"
        );
    }
    assert!(stdout.contains("  loadgen_requests{"), "{stdout}");
    // Nothing is left behind.
    let image = stdout
        .split_whitespace()
        .find(|w| w.starts_with("uplink-demo:"))
        .unwrap();
    let left = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("ancestor={image}")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "containers left: {left:?}"
    );
}
