//! The agent as an operator runs it in a container: the `docker run` line
//! the backend prints, taken from `uplink ctl providers create` and run
//! unchanged through `sh`, first with a `docker` that only records its
//! arguments (what the real one would be asked), then for real against the
//! engine with an image of the binary under test, whose agent must report
//! the host (not its container) and leave its own container alone.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use uplink::backend::host_command::HostCommand;
use uplink::proto;
use uplink_testkit::image::{container_logs, docker, docker_try};
use uplink_testkit::*;

/// A proxy URL whose password has what a shell would otherwise expand or
/// end a word on.
const PROXY: &str = "http://bob:s3cr'et$HOME!&(x);*%40@proxy.corp:3128";
/// Its password's start, before the first character that gets quoted.
const PASSWORD_PART: &str = "s3cr";

/// The command printed after "run an agent with:" in `out`, lines as
/// printed (continued with a backslash).
fn printed_command(out: &str) -> String {
    let (_, after) = out
        .split_once("run an agent with:\n")
        .unwrap_or_else(|| panic!("no host command in:\n{out}"));
    let mut command = String::new();
    for line in after.lines() {
        command.push_str(line);
        command.push('\n');
        if !line.ends_with('\\') {
            break;
        }
    }
    command
}

/// Runs `command` with `sh -c`, with `bin` first on the PATH and `envs`;
/// returns its stdout, failing with its stderr.
fn run_in_sh(command: &str, bin: &Path, envs: &[(&str, &str)]) -> String {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .env("PATH", path)
        .envs(envs.iter().copied())
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "sh -c {command}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes an executable script `name` into `dir`.
fn script(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What `"$(stat -c %g /var/run/docker.sock)"` gives on this host.
fn socket_group() -> String {
    let out = std::process::Command::new("stat")
        .args(["-c", "%g", "/var/run/docker.sock"])
        .output()
        .expect("stat runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_host_command_runs_unchanged_and_asks_docker_for_what_the_agent_needs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let image = "registry.corp:5000/tools/uplink:0.1.0";
    let mut backend = Proc::spawn(
        &[
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--public-url",
            "https://backend.example.com:8443",
            "--host-command-image",
            image,
            "--host-command-no-proxy",
            "localhost,.corp",
        ],
        &[
            ("UPLINK_HOST_COMMAND_PROXY", PROXY),
            ("UPLINK_LOG", "debug"),
        ],
    );
    let banner = wait_for(Duration::from_secs(20), "backend banner", || {
        let out = backend.out();
        async move { out.contains("run an agent with").then_some(out) }
    })
    .await;
    assert!(banner.contains(PASSWORD_PART), "{banner}");
    assert!(
        banner.contains("copy it to /etc/uplink/ca.pem on each agent host"),
        "{banner}"
    );
    let admin = banner
        .split("admin token (shown once): ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let port = banner
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();

    let created = std::process::Command::new(bin())
        .args(["ctl", "--backend", &format!("https://127.0.0.1:{port}")])
        .arg("--ca-file")
        .arg(data.join("ca.pem"))
        .args(["providers", "create", "lab-1"])
        .env("UPLINK_ADMIN_TOKEN", &admin)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&created.stdout).to_string();
    assert!(
        created.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(
        out.contains("it mounts the backend's CA from /etc/uplink/ca.pem on the agent's host"),
        "{out}"
    );
    let token = out
        .split("enrollment token (shown once): ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let command = printed_command(&out);

    // A `docker` that records its arguments, one per NUL.
    let shim = dir.path().join("shim");
    script(
        &shim,
        "docker",
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > \"$UPLINK_TEST_ARGV\"\n",
    );
    let argv_file = dir.path().join("argv");
    run_in_sh(
        &command,
        &shim,
        &[("UPLINK_TEST_ARGV", argv_file.to_str().unwrap())],
    );
    let argv = std::fs::read_to_string(&argv_file).unwrap();
    let argv: Vec<&str> = argv.split_terminator('\0').collect();
    let group = socket_group();
    let backend_env = "UPLINK_BACKEND=https://backend.example.com:8443".to_string();
    let token_env = format!("UPLINK_TOKEN={token}");
    let proxy_env = format!("HTTPS_PROXY={PROXY}");
    let want = [
        "run",
        "-d",
        "--name",
        "uplink-agent",
        "--restart",
        "unless-stopped",
        // The host's interfaces, and the Docker bridge for the ingest endpoint.
        "--network",
        "host",
        // The socket's group, read on the host: the image runs as uid 10001.
        "--group-add",
        &group,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        // The host's file systems, /proc and name, read-only; `rslave`
        // only where Docker takes it.
        "-v",
        if root_is_shared_or_slave() {
            "/:/host:ro,rslave"
        } else {
            "/:/host:ro"
        },
        "-v",
        "uplink-state:/var/lib/uplink",
        "--mount",
        "type=bind,src=/etc/uplink/ca.pem,dst=/etc/uplink/ca.pem,readonly",
        "-e",
        "UPLINK_CA_FILE=/etc/uplink/ca.pem",
        "-e",
        "UPLINK_HOST_ROOT=/host",
        // The load generators' endpoint on the Docker bridge.
        "-e",
        "UPLINK_INGEST_GRAPHITE=docker-bridge:2003",
        "-e",
        &backend_env,
        "-e",
        &token_env,
        "-e",
        &proxy_env,
        "-e",
        "NO_PROXY=localhost,.corp",
        image,
        "agent",
    ];
    assert_eq!(argv, want, "{command}");

    // Printed, never logged: not at start, not for ctl's call.
    let logs = backend.logs();
    assert!(
        !logs.contains(PASSWORD_PART),
        "the proxy password in the log:\n{logs}"
    );
    assert!(!logs.contains(&token), "the token in the log:\n{logs}");
    assert!(backend.terminate(Duration::from_secs(15)).await.success());

    // Nor shown by --help, nor by the refusal of a proxy uplink cannot use.
    let help = std::process::Command::new(bin())
        .args(["backend", "--help"])
        .env("UPLINK_HOST_COMMAND_PROXY", PROXY)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--host-command-proxy"), "{help}");
    assert!(!help.contains(PASSWORD_PART), "{help}");
    let refused = std::process::Command::new(bin())
        .args(["backend", "--data-dir"])
        .arg(dir.path().join("data2"))
        .args(["--host-command-image", "Not An Image"])
        .env(
            "UPLINK_HOST_COMMAND_PROXY",
            "socks5://bob:s3cr'et@proxy:1080",
        )
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(64));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--host-command-proxy") && err.contains("SOCKS"),
        "{err}"
    );
    assert!(
        err.contains("--host-command-image \"Not An Image\""),
        "{err}"
    );
    assert!(!err.contains(PASSWORD_PART), "{err}");
}

/// One sample line of `/metrics`: its labels and value (the timestamp
/// after it left out).
struct Line {
    labels: HashMap<String, String>,
    value: f64,
}

/// The samples of `name` on a `/metrics` page.
fn samples(page: &str, name: &str) -> Vec<Line> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let mut map = HashMap::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let end = after.find('"')?;
                map.insert(
                    key.trim_start_matches(',').to_string(),
                    after[..end].to_string(),
                );
                rest = &after[end + 1..];
            }
            Some(Line {
                labels: map,
                value: value.split_whitespace().next()?.parse().ok()?,
            })
        })
        .collect()
}

/// The samples of `name` that agent `agent` sent.
fn of_agent(page: &str, name: &str, agent: &str) -> Vec<Line> {
    let mut v = samples(page, name);
    v.retain(|l| l.labels.get("agent").map(String::as_str) == Some(agent));
    v
}

/// The host's interfaces as the agent reports them (without loopback and
/// Docker's `veth*` pairs).
fn host_interfaces() -> BTreeSet<String> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap();
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| n != "lo" && !n.starts_with("veth"))
        .collect()
}

/// MemTotal of the host, in bytes.
fn host_memory() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024.0
}

/// The CPUs the host's `/proc/stat` lists.
fn host_cpus() -> usize {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

/// The size of the host's root file system, `statvfs` blocks times the
/// fragment size, as `stat -f` reads it.
fn host_root_size() -> f64 {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%S %b", "/"])
        .output()
        .expect("stat runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.split_whitespace().map(|n| n.parse::<f64>().unwrap());
    v.next().unwrap() * v.next().unwrap()
}

/// Whether the host's `/` is a shared or a slave mount, which Docker
/// needs for `rslave` (the printed line checks the same when it runs).
fn root_is_shared_or_slave() -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&"/")
            && f.iter()
                .skip(6)
                .take_while(|x| **x != "-")
                .any(|x| x.starts_with("shared:") || x.starts_with("master:"))
    })
}

/// The container and volume one run of the printed line made, removed when
/// dropped.
struct Started {
    name: String,
    volume: String,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", &self.volume])
            .output();
    }
}

/// Runs an agent in a container from `image` with the line a backend
/// prints, against `b`, and checks that it reports this host (memory,
/// CPUs, interfaces, the root file system's size, the hostname) and never
/// touches its own container, even labelled as its own. Works for any image
/// laid out as the project's: the one built from the binary under test
/// now, the project's image later.
async fn agent_in_a_container_reports_the_host(dir: &Path, image: &str) {
    // The backend's CA as an operator copies it to an agent host.
    let host_dir = dir.join("agent-host");
    std::fs::create_dir_all(&host_dir).unwrap();
    let mut cfg = TestBackend::config(&dir.join("backend"));
    cfg.host_command = HostCommand {
        image: image.into(),
        ca_file: Some(host_dir.join("ca.pem")),
        proxy: None,
        no_proxy: None,
    };
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    std::fs::copy(&b.ca, host_dir.join("ca.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        host_dir.join("ca.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = ctl(&b, &["providers", "create", "in-containers"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let command = printed_command(&String::from_utf8_lossy(&out.stdout));

    // The real docker, behind a shim that gives the container and volume
    // names of this test and a free port for the load generators' endpoint
    // (the printed ones are the same on every host) and adds what the
    // test asks: limits that make a container-sized answer
    // differ from the host's, and fast metrics.
    let nonce = format!("{}-{}", std::process::id(), fastrand::u32(..));
    let started = Started {
        name: format!("uplink-agent-test-{nonce}"),
        volume: format!("uplink-state-test-{nonce}"),
    };
    let real = which_docker().display().to_string();
    let shim = dir.join("shim");
    script(
        &shim,
        "docker",
        &format!(
            r#"#!/bin/sh
n=$#
for a in "$@"; do
  case "$a" in
    run) set -- "$@" run $UPLINK_TEST_EXTRA; continue ;;
    uplink-agent) a={name} ;;
    uplink-state:/var/lib/uplink) a={volume}:/var/lib/uplink ;;
    UPLINK_INGEST_GRAPHITE=docker-bridge:2003) a=UPLINK_INGEST_GRAPHITE=docker-bridge:0 ;;
  esac
  set -- "$@" "$a"
done
shift $n
exec {real} "$@"
"#,
            name = started.name,
            volume = started.volume,
        ),
    );
    let extra = "--memory 256m --cpuset-cpus 0 -e UPLINK_METRICS_INTERVAL=1s \
                 -e UPLINK_METRICS_BATCH_AGE=1s -e UPLINK_LOG=info";
    let id = run_in_sh(&command, &shim, &[("UPLINK_TEST_EXTRA", extra)]);
    assert_eq!(id.len(), 64, "docker run printed {id:?}");

    let hostname = uplink::hostname::hostname_under(Path::new("/"))
        .unwrap_or_else(uplink::hostname::default_hostname);
    let admin = b.admin();
    let view = wait_for(
        Duration::from_secs(60),
        "the agent in its container connected",
        || async {
            let agents = admin.agents("").await.ok()?;
            agents.into_iter().find(|a| a.connected)
        },
    )
    .await;
    assert_eq!(
        view.hostname, hostname,
        "the host's name, not the container's"
    );
    let agent = view.id.clone();

    let interfaces_before = host_interfaces();
    let wanted = [
        "host_cpu_core_usage_percent",
        "host_network_received_bytes_total",
        "host_disk_total_bytes",
        "host_memory_total_bytes",
    ];
    let mut page = String::new();
    for _ in 0..60 {
        page = push::scrape(&b).await;
        if wanted
            .iter()
            .all(|n| !of_agent(&page, n, &agent).is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|n| of_agent(&page, n, &agent).is_empty())
        .collect();
    assert!(
        missing.is_empty(),
        "no {missing:?} from the agent within 60 s; its log:\n{}\n/metrics:\n{page}",
        container_logs(&started.name)
    );
    let interfaces_after = host_interfaces();
    let logs = container_logs(&started.name);

    // Memory: the host's, not the container's 256 MiB.
    let memory = of_agent(&page, "host_memory_total_bytes", &agent);
    assert_eq!(memory[0].value, host_memory(), "memory; agent log:\n{logs}");
    // CPUs: every CPU of the host, not the container's one.
    let cores: BTreeSet<String> = of_agent(&page, "host_cpu_core_usage_percent", &agent)
        .into_iter()
        .map(|l| l.labels["cpu"].clone())
        .collect();
    assert_eq!(cores.len(), host_cpus(), "{cores:?}");
    // Interfaces: the host's (docker0 among them), not the container's.
    let reported: BTreeSet<String> = of_agent(&page, "host_network_received_bytes_total", &agent)
        .into_iter()
        .map(|l| l.labels["interface"].clone())
        .collect();
    let steady: BTreeSet<String> = interfaces_before
        .intersection(&interfaces_after)
        .cloned()
        .collect();
    let any: BTreeSet<String> = interfaces_before
        .union(&interfaces_after)
        .cloned()
        .collect();
    assert!(
        steady.is_subset(&reported),
        "host {steady:?}, reported {reported:?}"
    );
    assert!(
        reported.is_subset(&any),
        "host {any:?}, reported {reported:?}"
    );
    // File systems: under the host's mount points, with the host's sizes.
    let disks = of_agent(&page, "host_disk_total_bytes", &agent);
    let mounts: Vec<&str> = disks.iter().map(|l| l.labels["mount"].as_str()).collect();
    assert!(
        mounts
            .iter()
            .all(|m| !m.starts_with("/host") && !m.starts_with("/etc/")),
        "{mounts:?}"
    );
    let root = disks
        .iter()
        .find(|l| l.labels["mount"] == "/")
        .unwrap_or_else(|| panic!("no / among {mounts:?}; agent log:\n{logs}"));
    assert_eq!(root.value, host_root_size(), "size of /");
    // The capacity counts the host's CPUs.
    let capacity = wait_for(Duration::from_secs(30), "the agent's capacity", || async {
        let agents = admin.agents("").await.ok()?;
        agents.into_iter().find(|a| a.id == agent)?.capacity
    })
    .await;
    assert_eq!(capacity.cpu_cores as usize, host_cpus());
    assert!(
        logs.contains("running in a container") && logs.contains(&id),
        "{logs}"
    );

    // Its own container, labelled as its own: without the own-container
    // rule reconciliation would take it for an orphan and remove it after
    // the grace period, and the container source would read its stats.
    docker_try(&["rm", "-f", &started.name]);
    let extra = format!(
        "--label uplink.agent={agent} -e UPLINK_ORPHAN_GRACE=1s -e UPLINK_METRICS_INTERVAL=1s \
         -e UPLINK_METRICS_BATCH_AGE=1s"
    );
    let id = run_in_sh(&command, &shim, &[("UPLINK_TEST_EXTRA", &extra)]);
    let started_at = docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]);
    wait_for(
        Duration::from_secs(60),
        "the agent back, with the same identity",
        || async {
            let agents = admin.agents("").await.ok()?;
            let logs = container_logs(&id);
            (agents.iter().any(|a| a.id == agent && a.connected) && logs.contains("agent starting"))
                .then_some(())
        },
    )
    .await;
    let listed = admin
        .enqueue(
            &agent,
            proto::CommandSpec {
                kind: Some(proto::command_spec::Kind::ListContainers(
                    proto::ListContainers {},
                )),
            },
        )
        .await
        .unwrap();
    let r = result_of(&admin, &listed.id, Duration::from_secs(30)).await;
    let Some(proto::command_result::Detail::ListContainers(list)) = r.result.and_then(|r| r.detail)
    else {
        panic!("no list")
    };
    assert!(list.containers.iter().all(|c| c.id != id), "{list:?}");
    // Past the orphan grace and several scrapes: still running, never read.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.StartedAt}}",
            &id
        ]),
        format!("true {started_at}")
    );
    let page = push::scrape(&b).await;
    assert!(of_agent(&page, "container_cpu_usage_seconds_total", &agent).is_empty());
    let logs = container_logs(&id);
    assert!(!logs.contains("orphan"), "{logs}");
    drop(started);
    b.stop().await;
}

/// The real `docker`, before the test's shim comes first on the PATH.
fn which_docker() -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v docker"])
        .output()
        .expect("sh runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The project's image, as `make image-local` builds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_a_container_reports_the_host_and_leaves_its_container_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = uplink_testkit::image::image();
    agent_in_a_container_reports_the_host(dir.path(), image).await;
}
