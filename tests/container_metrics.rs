//! The container metrics source against the real Docker engine on this
//! machine: busybox containers with the agent's labels and limits, read
//! twice a second apart, while containers of another agent are ignored and
//! a container removed between scrapes is forgotten.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use uplink::metrics::containers::{ContainerConfig, ContainerCounters, ContainerSource};
use uplink::metrics::sample::{Kind, Sample};
use uplink_testkit::docker::{LOCAL_IMAGE, ensure_image, remove_containers_of};

/// Removes the containers of its agents when the test ends, however it
/// ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for agent in &self.0 {
            remove_containers_of(agent);
        }
    }
}

/// An agent id no other test or run uses.
fn agent_id(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("cm-{test}-{}-{nanos}", std::process::id())
}

/// Starts a container of `agent` in run `r1`, limited to half a CPU and
/// 64 MiB, running `script`; returns its name.
fn start(agent: &str, name: &str, script: &str) -> String {
    let out = Command::new("docker")
        .args(["run", "-d", "--name", name, "--cpus", "0.5", "-m", "64m"])
        .args(["--label", &format!("uplink.agent={agent}")])
        .args(["--label", "uplink.run=r1"])
        .args([LOCAL_IMAGE, "sh", "-c", script])
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker run {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    name.to_string()
}

fn remove(name: &str) {
    let out = Command::new("docker")
        .args(["rm", "-f", name])
        .output()
        .expect("docker runs");
    assert!(out.status.success(), "docker rm {name}");
}

async fn source(agent: &str) -> ContainerSource {
    let docker = uplink::agent::docker::connect()
        .await
        .expect("the Docker engine answers");
    ContainerSource::new(docker, agent, ContainerConfig::default())
}

async fn scrape(source: &mut ContainerSource, now: i64) -> Vec<Sample> {
    let mut out = Vec::new();
    source.scrape(now, &mut out).await.expect("scrape");
    out
}

fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
    let mut labels = s.series.labels.iter();
    labels.find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The value of `metric` for `container`, which must be there once.
fn value(samples: &[Sample], container: &str, metric: &str) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.series.name == metric && label(s, "container") == Some(container))
        .collect();
    assert_eq!(found.len(), 1, "{metric} of {container}: {samples:#?}");
    found[0].value
}

/// The containers that samples are of, sorted, each once.
fn containers_in(samples: &[Sample]) -> Vec<String> {
    let mut names: Vec<String> = samples
        .iter()
        .map(|s| label(s, "container").expect("container label").to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn busy_containers_of_this_agent_are_measured_and_others_ignored() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let (agent, other) = (agent_id("busy"), agent_id("other"));
    let _cleanup = Cleanup(vec![agent.clone(), other.clone()]);
    let busy_loop = "while :; do :; done";
    let busy = start(&agent, &format!("{agent}-busy"), busy_loop);
    let leaving = start(&agent, &format!("{agent}-leaving"), "sleep 600");
    let foreign = start(&other, &format!("{other}-foreign"), "sleep 600");

    let mut source = source(&agent).await;
    let first = scrape(&mut source, 1_000).await;
    assert_eq!(containers_in(&first), [busy.clone(), leaving.clone()]);
    assert!(
        first
            .iter()
            .all(|s| label(s, "container") != Some(&foreign))
    );
    for s in &first {
        assert_eq!(label(s, "run"), Some("r1"), "{s:?}");
        assert_eq!(label(s, "image"), Some(LOCAL_IMAGE), "{s:?}");
        assert!(s.value.is_finite() && s.value >= 0.0, "{s:?}");
        assert_eq!(s.time_unix_ms, 1_000);
    }
    let cpu = "container_cpu_usage_seconds_total";
    let cpu_before = value(&first, &busy, cpu);
    assert!(value(&first, &busy, "container_memory_usage_bytes") > 0.0);
    assert_eq!(
        value(&first, &busy, "container_memory_limit_bytes"),
        (64 << 20) as f64
    );
    assert_eq!(value(&first, &busy, "container_cpu_limit_cores"), 0.5);
    assert!(value(&first, &busy, "container_pids") >= 1.0);
    let rx = value(&first, &busy, "container_network_received_bytes_total");
    let counters: Vec<&Sample> = first
        .iter()
        .filter(|s| s.series.kind == Kind::Counter)
        .collect();
    assert!(counters.iter().all(|s| s.series.name.ends_with("_total")));

    tokio::time::sleep(Duration::from_secs(1)).await;
    remove(&leaving);
    let second = scrape(&mut source, 2_000).await;
    assert_eq!(containers_in(&second), std::slice::from_ref(&busy));
    let cpu_after = value(&second, &busy, cpu);
    // A busy loop held to half a CPU for a second uses well over 0.1 s.
    assert!(
        cpu_after - cpu_before > 0.1,
        "CPU {cpu_before} s then {cpu_after} s"
    );
    assert!(value(&second, &busy, "container_network_received_bytes_total") >= rx);
    assert_eq!(source.containers(), 1);
    assert_eq!(
        source.counters(),
        ContainerCounters {
            scrapes: 2,
            containers_scraped: 3,
            ..ContainerCounters::default()
        }
    );
    // The busy container's series are the ones of the first scrape.
    let before: HashMap<(&str, Option<&str>), &Sample> = first
        .iter()
        .map(|s| ((s.series.name.as_str(), label(s, "container")), s))
        .collect();
    for s in &second {
        let old = before[&(s.series.name.as_str(), label(s, "container"))];
        assert!(std::sync::Arc::ptr_eq(&old.series, &s.series), "{s:?}");
    }
}

/// Prints what a scrape costs for 1 and for 10 containers, with the
/// default concurrency and with every container read at once; run with
/// `--nocapture` to see it.
#[tokio::test]
async fn scrape_cost() {
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());
    let agent = agent_id("cost");
    let _cleanup = Cleanup(vec![agent.clone()]);
    let docker = uplink::agent::docker::connect()
        .await
        .expect("the Docker engine answers");
    let mut started = 0;
    for n in [1, 10] {
        while started < n {
            start(&agent, &format!("{agent}-{started}"), "sleep 600");
            started += 1;
        }
        for concurrency in [ContainerConfig::default().concurrency, 16] {
            let config = ContainerConfig {
                concurrency,
                ..ContainerConfig::default()
            };
            let mut source = ContainerSource::new(docker.clone(), &agent, config);
            let mut out = Vec::new();
            let t = Instant::now();
            source.scrape(0, &mut out).await.expect("scrape");
            let first = t.elapsed();
            const ROUNDS: u32 = 3;
            let t = Instant::now();
            for i in 1..=ROUNDS {
                source.scrape(i64::from(i), &mut out).await.expect("scrape");
            }
            let rest = t.elapsed() / ROUNDS;
            let counters = source.counters();
            assert_eq!(counters.containers_scraped, u64::from(ROUNDS + 1) * n);
            println!(
                "container scrape of {n:>2}, {concurrency:>2} at once: first {first:?} (with inspects), then {rest:?} each ({} samples)",
                out.len() / (ROUNDS as usize + 1)
            );
        }
    }
}
