//! `examples/python-backend/`, a backend written in Python from `proto/`
//! and docs/PROTOCOL.md alone (connectrpc on hypercorn, one TLS port for
//! both rungs), against the real `uplink`: `uplink conformance` passes
//! every case on both rungs, and a real agent on each rung is listed by
//! `ctl agents`, answers `ctl ping`, and its samples reach the backend's
//! `/metrics` with their exact values.
//!
//! tests/run.sh makes the example's virtual environment
//! (`examples/python-backend/.venv`, from its requirements.txt); the test
//! generates the code from `proto/` itself, so it always serves the
//! contract as it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use uplink_testkit::*;

const ADMIN_TOKEN: &str = "admin-token-of-the-python-backend";
const ENROLL_TOKEN: &str = "enroll-token-of-the-python-backend";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-backend")
}

/// The Python backend on a free port, its code generated from `proto/`
/// first: the process and its URL.
async fn python_backend(dir: &Path) -> (Proc, String, PathBuf) {
    let venv_python = example().join(".venv/bin/python");
    assert!(
        venv_python.exists(),
        "{} is missing: tests/run.sh makes it (python3 -m venv, then pip install -r requirements.txt)",
        venv_python.display()
    );
    // Each test generates its own copy (tests run at once).
    let code = dir.join("gen");
    let generated = std::process::Command::new(example().join("gen.sh"))
        .arg(&code)
        .output()
        .expect("gen.sh runs");
    assert!(
        generated.status.success(),
        "gen.sh failed: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let uplink_testkit::certs::Identity { ca, cert, key } =
        uplink_testkit::certs::operator_identity(dir);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pythonpath = example();
    let p = Proc::spawn_program(
        &venv_python,
        &[
            "-m",
            "uplink_backend",
            "--listen",
            &listen,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--heartbeat-interval-ms",
            "5000",
        ],
        &[
            ("UPLINK_ADMIN_TOKEN", ADMIN_TOKEN),
            ("UPLINK_ENROLL_TOKEN", ENROLL_TOKEN),
            ("PYTHONPATH", pythonpath.to_str().unwrap()),
            ("UPLINK_BACKEND_GEN", code.to_str().unwrap()),
        ],
    );
    p.wait_log(&["backend listening"], Duration::from_secs(60))
        .await;
    (p, format!("https://127.0.0.1:{port}"), ca)
}

/// `uplink ARGS` with the admin token and no proxy: exit code and output.
async fn uplink(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(args)
        .env("UPLINK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("UPLINK_ENROLL_TOKEN", ENROLL_TOKEN)
        .kill_on_drop(true);
    for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("uplink finishes within 10 min")
        .expect("uplink runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_backend_passes_every_conformance_case_on_both_rungs() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, url, ca) = python_backend(dir.path()).await;
    let ca = ca.to_str().unwrap();
    let (code, out) = uplink(&[
        "conformance",
        "--backend",
        &url,
        "--ca-file",
        ca,
        "--rung",
        "both",
    ])
    .await;
    eprintln!("{out}");
    let cases: Vec<&str> = out
        .lines()
        .filter(|l| ["PASS ", "FAIL ", "SKIP "].iter().any(|p| l.starts_with(p)))
        .collect();
    assert_eq!(
        cases.len(),
        16,
        "one line per case:\n{out}\n{}",
        backend.logs()
    );
    for l in &cases {
        assert!(l.starts_with("PASS "), "{l}\n---\n{}", backend.logs());
    }
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("16 passed, 0 failed, 0 skipped"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_and_pings_real_agents_on_each_rung_of_the_python_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, url, ca) = python_backend(dir.path()).await;
    let ca = ca.to_str().unwrap();
    let mut agents = Vec::new();
    for rung in ["grpc", "longpoll"] {
        let state = dir.path().join(rung);
        let host = format!("py-{rung}");
        let graphite = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let a = agent_at(
            &url,
            std::path::Path::new(ca),
            &state,
            &host,
            &[
                "--transport",
                rung,
                "--ingest-graphite",
                &graphite.to_string(),
                "--metrics-interval",
                "0s",
                "--metrics-batch-age",
                "200ms",
            ],
            &[("UPLINK_TOKEN", ENROLL_TOKEN)],
        );
        let file = state.join("identity.json");
        let identity: serde_json::Value =
            wait_for(Duration::from_secs(60), "the agent's identity", || {
                let text = std::fs::read_to_string(&file).ok();
                async move { serde_json::from_str(&text?).ok() }
            })
            .await;
        let id = identity["agent_id"].as_str().unwrap().to_string();
        agents.push((rung, id, a, graphite));
    }
    let listed = wait_for(
        Duration::from_secs(30),
        "both agents listed connected",
        || {
            let url = url.clone();
            async move {
                let (code, out) = uplink(&[
                    "ctl",
                    "--backend",
                    &url,
                    "--ca-file",
                    ca,
                    "agents",
                    "--json",
                ])
                .await;
                let views: serde_json::Value = serde_json::from_str(&out).ok()?;
                let connected = views
                    .as_array()?
                    .iter()
                    .filter(|v| v["connected"] == true)
                    .count();
                (code == Some(0) && connected == 2).then_some(views)
            }
        },
    )
    .await;
    for (rung, id, _, graphite) in &agents {
        let view = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
        assert_eq!(view["transport"], *rung, "{view}");
        let (code, out) = uplink(&["ctl", "--backend", &url, "--ca-file", ca, "ping", id]).await;
        assert_eq!(
            code,
            Some(0),
            "ctl ping {id} ({rung}): {out}\n{}",
            backend.logs()
        );
        eprintln!("ctl ping over {rung}: {}", out.trim());
        // Samples through the agent's ingest reach the backend's
        // `/metrics` with their exact values: the batch forms it
        // advertises (series deltas, integer values, zstd) decode right.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // A first sample, so the checked ones go in the forms the
        // backend's first answer advertised.
        let warm = format!("py_warm;rung={rung} 1 {now}\n");
        metrics_after(
            graphite,
            &warm,
            &url,
            ca,
            &format!("py_warm{{agent=\"{id}\""),
        )
        .await;
        let lines = format!(
            "py_whole;rung={rung} 1048576 {now}\npy_ratio;rung={rung} 0.30000000000000004 {now}\npy_short;rung={rung} 0.25 {now}\n"
        );
        let page = metrics_after(
            graphite,
            &lines,
            &url,
            ca,
            &format!("py_short{{agent=\"{id}\""),
        )
        .await;
        for (name, value) in [
            ("py_whole", "1048576.0"),
            ("py_ratio", "0.30000000000000004"),
            ("py_short", "0.25"),
        ] {
            let line = page
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{agent=\"{id}\"")))
                .unwrap_or_else(|| panic!("no {name} of {id} in:\n{page}"));
            assert!(line.contains(&format!("rung=\"{rung}\"")), "{line}");
            let got = line.split(' ').nth(1).unwrap_or("");
            assert_eq!(got, value, "{line}");
        }
    }
}

/// Sends `lines` to a Graphite ingest at `graphite`, then waits until the
/// backend's `/metrics` has a line starting with `needle`; the page.
async fn metrics_after(
    graphite: &std::net::SocketAddr,
    lines: &str,
    url: &str,
    ca: &str,
    needle: &str,
) -> String {
    let mut conn = tokio::net::TcpStream::connect(graphite).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, lines.as_bytes())
        .await
        .unwrap();
    drop(conn);
    wait_for(Duration::from_secs(30), needle, || {
        let url = format!("{url}/metrics");
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--cacert", ca, "-H"])
                .arg(format!("authorization: Bearer {ADMIN_TOKEN}"))
                .arg(&url)
                .output()
                .await
                .ok()?;
            let page = String::from_utf8_lossy(&out.stdout).into_owned();
            page.lines().any(|l| l.starts_with(needle)).then_some(page)
        }
    })
    .await
}
