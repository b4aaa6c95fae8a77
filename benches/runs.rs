//! From `CreateRun` to every container started, on one agent, for N = 1
//! and N = 20 containers, with the agent's CPU time for it; beside it, the
//! same containers started by the Docker CLI alone (`docker run -d`, N in
//! parallel), the engine's own cost, in the same run.
//!
//! The backend runs in-process; the agent is the real `uplink` binary (so
//! its CPU time can be read from `/proc/<pid>/stat`), on the gRPC rung
//! over loopback TLS, talking to this machine's Docker engine. The image
//! is a busybox built `FROM scratch` from Debian's busybox-static (present
//! locally, so no pull is timed). "Started" means the backend holds every
//! container's successful `RunContainer` result (Docker's start returned);
//! the clock starts just before the `CreateRun` call (placement, store,
//! queue included). Between iterations the run is stopped and removed,
//! untimed.
//!
//! Output: the criterion group `run_start` (`uplink/1`, `uplink/20`,
//! `docker_cli/1`, `docker_cli/20`), then a table with p50/min/max of the
//! start time and the agent's CPU time per run.
//!
//! Run: `cargo bench --bench runs` (needs Docker and busybox-static).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use uplink::backend::{BackendConfig, Core, Server};
use uplink::proto;
use uplink::secret::{Kind, Secret};
use uplink_testkit::docker;
use uplink_testkit::measure::Distribution;

const BIN: &str = env!("CARGO_BIN_EXE_uplink");
/// Longest wait for a run to start or be removed.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The containers' command: exits at once on SIGTERM.
const SCRIPT: &str = "trap 'exit 0' TERM; sleep 600 & wait";

/// The agent's user + system CPU time so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

struct Bench {
    core: Arc<Core>,
    agent: tokio::process::Child,
    agent_pid: u32,
    agent_id: String,
    _stop: watch::Sender<bool>,
}

impl Bench {
    async fn start(dir: &Path) -> Bench {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let enroll = Secret::generate(Kind::Enrollment);
        let mut cfg = BackendConfig::new(dir.join("backend"));
        cfg.hostnames = vec!["127.0.0.1".into()];
        cfg.admin_token = Some(Secret::generate(Kind::Admin));
        cfg.enroll_token = Some(enroll.clone());
        let server = Server::new(cfg, listener).await.expect("backend starts");
        let info = server.info().clone();
        let core = server.core();
        let (stop, mut rx) = watch::channel(false);
        tokio::spawn(server.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        let agent = tokio::process::Command::new(BIN)
            .args(["agent", "--backend", &info.url, "--hostname", "bench-runs"])
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .arg("--ca-file")
            .arg(info.ca_file.clone().expect("generated CA"))
            .env("UPLINK_TOKEN", enroll.expose())
            // The default log level (info), so its cost is in the figures;
            // the lines themselves are not wanted here.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        let agent_pid = agent.id().expect("agent pid");
        let started = Instant::now();
        let agent_id = loop {
            let list = core.list_agents(Default::default()).await.unwrap().agents;
            if let Some(a) = list
                .iter()
                .find(|a| a.connected && a.capacity.as_ref().is_some_and(|c| c.docker_available))
            {
                break a.id.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the agent did not connect with Docker available"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Bench {
            core,
            agent,
            agent_pid,
            agent_id,
            _stop: stop,
        }
    }

    async fn wait(&self, id: &str, done: impl Fn(&proto::RunView) -> bool) -> proto::RunView {
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            let v = self
                .core
                .get_run(proto::GetRunRequest { run: id.into() })
                .await
                .unwrap()
                .run
                .unwrap();
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "run {id} stuck: {v:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// One timed start of `n` containers; returns (wall time, agent CPU).
    async fn start_run(&self, n: u32) -> (Duration, Duration) {
        let cpu0 = cpu_time(self.agent_pid);
        let t0 = Instant::now();
        let run = self
            .core
            .create_run(proto::CreateRunRequest {
                provider: "default".into(),
                image: docker::LOCAL_IMAGE.into(),
                count: n,
                cpus: 0.05,
                memory_bytes: 16 << 20,
                command: vec!["sh".into(), "-c".into(), SCRIPT.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .run
            .unwrap();
        let v = self.wait(&run.id, uplink::ctl::run_started).await;
        let took = t0.elapsed();
        // The agent's last bit of work (the final result) is done when the
        // backend holds it; read its CPU time now.
        let cpu = cpu_time(self.agent_pid).saturating_sub(cpu0);
        assert!(
            v.containers
                .iter()
                .all(|c| c.state == proto::RunContainerState::Running as i32),
            "not all started: {v:?}"
        );
        // Untimed: stop and remove, so each iteration starts from zero.
        self.core
            .stop_run(proto::StopRunRequest {
                run: run.id.clone(),
                timeout_s: 1,
            })
            .await
            .unwrap();
        self.wait(&run.id, uplink::ctl::run_stopped).await;
        (took, cpu)
    }
}

/// The engine alone: `docker run -d` N times in parallel, then removal.
fn docker_cli(n: u32) -> Duration {
    let name = format!("bench-cli-{}", fastrand::u32(..));
    let t0 = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|i| {
            std::process::Command::new("docker")
                .args([
                    "run",
                    "-d",
                    "--cpus",
                    "0.05",
                    "-m",
                    "16m",
                    "--memory-swap",
                    "16m",
                ])
                .args([
                    "--label",
                    &format!("bench={name}"),
                    "--name",
                    &format!("{name}-{i}"),
                ])
                .args([docker::LOCAL_IMAGE, "sh", "-c", SCRIPT])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("docker runs")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "docker run failed");
    }
    let took = t0.elapsed();
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "docker ps -aq --filter label=bench={name} | xargs -r docker rm -f >/dev/null"
            ),
        ])
        .status();
    took
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let dir = tempfile::tempdir().expect("temporary directory");
    docker::ensure_image(dir.path());
    let rt = Runtime::new().expect("runtime");
    let bench = rt.block_on(Bench::start(dir.path()));
    let seen: Arc<Mutex<Vec<(u32, Duration, Duration)>>> = Arc::default();

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let mut group = c.benchmark_group("run_start");
    for n in [1u32, 20] {
        group.bench_function(format!("uplink/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (took, cpu) = rt.block_on(bench.start_run(n));
                    seen.lock().unwrap().push((n, took, cpu));
                    total += took;
                }
                total
            })
        });
        group.bench_function(format!("docker_cli/{n}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| docker_cli(n)).sum())
        });
    }
    group.finish();
    c.final_summary();

    if !quick {
        println!(
            "\nrun start on one agent (create run -> every container started), agent CPU per run:"
        );
        println!(
            "{:>3} {:>6} {:>10} {:>10} {:>10} {:>14}",
            "N", "runs", "p50", "min", "max", "agent CPU p50"
        );
        for n in [1u32, 20] {
            let rows: Vec<_> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.0 == n)
                .cloned()
                .collect();
            if rows.is_empty() {
                continue;
            }
            let wall = Distribution::new(rows.iter().map(|r| r.1).collect());
            let cpu = Distribution::new(rows.iter().map(|r| r.2).collect());
            println!(
                "{n:>3} {:>6} {:>10.1?} {:>10.1?} {:>10.1?} {:>14.0?}",
                wall.len(),
                wall.percentile(50.0),
                wall.min(),
                wall.max(),
                cpu.percentile(50.0)
            );
        }
    }
    let mut agent = bench.agent;
    let _ = agent.start_kill();
    docker::remove_containers_of(&bench.agent_id);
}
