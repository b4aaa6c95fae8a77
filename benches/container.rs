//! The image: its size, and an agent's cold start to connected, in its
//! container beside the same static binary started on the host.
//!
//! A backend runs in this process on loopback. Each start has a fresh
//! state directory, so it includes the enrollment: "connected" is the
//! moment the backend lists the agent as connected on the gRPC rung
//! (polled every few milliseconds through the admin API). The container
//! runs as the documented line does (host network, the image's user); its
//! clock starts just before `docker run`, so it includes the engine's
//! container creation and start. The host peer is `build/uplink`, the
//! binary the image holds, started directly.
//!
//! Run: `make image-local && cargo bench --bench container`
//! (`UPLINK_BENCH_STARTS`, default 10, starts of each kind).

use std::time::{Duration, Instant};

use uplink::ctl::Admin;
use uplink::proto;
use uplink_testkit::backend::TestBackend;
use uplink_testkit::image::{docker, docker_try, image, repo_root};
use uplink_testkit::measure::Distribution;

async fn connected(admin: &Admin, hostname: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(agents) = admin.agents("").await
            && agents.iter().any(|a: &proto::AgentView| {
                a.hostname == hostname
                    && a.connected
                    && uplink::ctl::transport_name(a.transport) == "grpc"
            })
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{hostname} never connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    let starts: usize = std::env::var("UPLINK_BENCH_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let image = image();
    let binary = repo_root().join("build/uplink");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // The container's user reads the CA.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let b = TestBackend::start(&dir.path().join("backend")).await;
        let ca = dir.path().join("ca.pem");
        std::fs::copy(&b.ca, &ca).unwrap();
        std::fs::set_permissions(&ca, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let admin = b.admin();
        let url = b.url.to_string();
        let token = b.enroll_token.expose().to_string();
        let mut host = Vec::new();
        let mut container = Vec::new();
        for i in 0..starts {
            // On the host.
            let state = dir.path().join(format!("host-{i}"));
            let name = format!("host-{i}");
            let t0 = Instant::now();
            let mut child = tokio::process::Command::new(&binary)
                .args(["agent", "--backend", &url, "--ca-file"])
                .arg(&ca)
                .args(["--state-dir", state.to_str().unwrap(), "--hostname", &name])
                .env("UPLINK_TOKEN", &token)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            host.push(connected(&admin, &name).await - t0);
            let _ = child.kill().await;

            // In its container.
            let name = format!("ctr-{i}");
            let cname = format!("uplink-bench-{}-{i}", std::process::id());
            let t0 = Instant::now();
            docker(&[
                "run",
                "-d",
                "--rm",
                "--name",
                &cname,
                "--network",
                "host",
                "-v",
                &format!("{}:/etc/uplink/ca.pem:ro", ca.display()),
                "-e",
                "UPLINK_CA_FILE=/etc/uplink/ca.pem",
                "-e",
                &format!("UPLINK_BACKEND={url}"),
                "-e",
                &format!("UPLINK_TOKEN={token}"),
                "-e",
                &format!("UPLINK_HOSTNAME={name}"),
                image,
                "agent",
            ]);
            let took = connected(&admin, &name).await - t0;
            container.push(took);
            let _ = docker_try(&["rm", "-f", "-v", &cname]);
        }
        let size: u64 = docker(&["image", "inspect", "--format", "{{.Size}}", image])
            .parse()
            .unwrap();
        let binary_size = std::fs::metadata(&binary).unwrap().len();
        println!(
            "image {image}: {:.1} MB ({binary_size} bytes of binary)",
            size as f64 / 1e6
        );
        println!(
            "cold start to connected, {starts} starts each (fresh state: enrollment included)"
        );
        println!("{:<28} {:>9} {:>9} {:>9}", "", "p50", "min", "max");
        for (what, d) in [
            ("static binary on the host", &host),
            ("image (docker run -d)", &container),
        ] {
            let d = Distribution::new(d.clone());
            println!(
                "{what:<28} {:>7.0}ms {:>7.0}ms {:>7.0}ms",
                d.percentile(50.0).as_secs_f64() * 1e3,
                d.min().as_secs_f64() * 1e3,
                d.max().as_secs_f64() * 1e3
            );
        }
    });
}
