//! `uplink conformance` (the real binary) against the reference backend:
//! every case passes on both rungs, and a wrong admin token is a clear
//! failure with a non-zero exit.

use std::time::Duration;

use uplink_testkit::*;

/// Runs `uplink conformance ARGS` against `b` with `admin_token`: exit
/// code, stdout, stderr.
async fn conformance(
    b: &TestBackend,
    admin_token: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(["conformance", "--backend", &b.url.to_string(), "--ca-file"])
        .arg(&b.ca)
        .args(args)
        .env("UPLINK_ADMIN_TOKEN", admin_token)
        .env("UPLINK_ENROLL_TOKEN", b.enroll_token.expose())
        .kill_on_drop(true);
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "SSL_CERT_FILE",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("uplink conformance finishes within 10 min")
        .expect("uplink conformance runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The case lines of the output (`PASS`, `FAIL`, `SKIP`).
fn case_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| ["PASS ", "FAIL ", "SKIP "].iter().any(|p| l.starts_with(p)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_backend_passes_every_case_on_both_rungs() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let (code, out, err) = conformance(&b, b.admin_token.expose(), &["--rung", "both"]).await;
    let lines = case_lines(&out);
    assert_eq!(lines.len(), 16, "one line per case:\n{out}\n{err}");
    for l in &lines {
        assert!(l.starts_with("PASS "), "{l}\n---\n{out}\n{err}");
    }
    let summary = out.lines().last().unwrap_or_default();
    assert_eq!(
        summary,
        format!("{} passed, 0 failed, 0 skipped", lines.len()),
        "{out}"
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_admin_token_is_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let (code, out, err) = conformance(&b, "upl_a_wrong", &["--rung", "longpoll"]).await;
    let lines = case_lines(&out);
    let fail = lines
        .iter()
        .find(|l| l.starts_with("FAIL admin-service: "))
        .unwrap_or_else(|| panic!("a FAIL line for the admin service:\n{out}\n{err}"));
    assert!(
        fail.contains("unauthenticated") && fail.contains("--admin-token"),
        "{fail}"
    );
    // The cases that need the admin service say so instead of failing
    // one by one; those that do not still run.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("SKIP redelivery: needs the admin service")),
        "{out}"
    );
    assert!(lines.contains(&"PASS enrollment"), "{out}");
    assert!(
        out.lines().last().unwrap_or_default().contains(" 1 failed"),
        "{out}"
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_64() {
    let out = tokio::process::Command::new(bin())
        .args([
            "conformance",
            "--backend",
            "https://127.0.0.1:1",
            "--rung",
            "h3",
            "--case",
            "nope",
        ])
        .env_remove("UPLINK_ADMIN_TOKEN")
        .env_remove("UPLINK_ENROLL_TOKEN")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--rung \"h3\""), "{err}");
    assert!(err.contains("--admin-token"), "{err}");
    assert!(err.contains("--enroll-token"), "{err}");
    assert!(err.contains("--case \"nope\" matches no case"), "{err}");
}
