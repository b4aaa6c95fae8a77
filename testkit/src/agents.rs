//! The `uplink` binary as the tests run it: agents, a backend, `ctl` or
//! `health` as real processes whose output the test reads, and where that
//! binary is.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::backend::TestBackend;

/// The `uplink` binary Cargo built for the running test or benchmark.
///
/// `CARGO_BIN_EXE_uplink` exists only while Cargo compiles the root
/// package's own tests and benches, so this crate cannot read it. It finds
/// the binary beside the running executable instead: Cargo puts a test or
/// bench in `target/<profile>/deps/` and the package's binaries, built for
/// them, in `target/<profile>/`. `tests/endpoints.rs` checks that this is
/// the path `CARGO_BIN_EXE_uplink` names.
///
/// # Panics
///
/// When the running executable cannot be found or no `uplink` binary
/// lies beside it (a caller that Cargo did not build as a test or bench of
/// the `uplink` package).
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| panic!("cannot find the running executable: {e}"));
        let mut dir = exe.parent().unwrap_or(Path::new("/"));
        if dir.ends_with("deps") {
            dir = dir.parent().unwrap_or(dir);
        }
        let bin = dir.join(format!("uplink{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "no uplink binary at {} (beside {}): run tests and benches through cargo",
            bin.display(),
            exe.display()
        );
        bin
    })
}

/// An `uplink` process (agent, backend or ctl) with its output collected.
pub struct Proc {
    /// The process, killed when dropped.
    pub child: Child,
    /// Lines of stderr so far (the logs).
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Lines of stdout so far.
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `uplink ARGS` with `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Self::spawn_program(bin(), args, envs)
    }

    /// Starts `PROGRAM ARGS` with `envs` (a wrapper such as `prlimit` that
    /// execs `uplink`).
    pub fn spawn_program(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("SSL_CERT_FILE")
            .env("UPLINK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn uplink");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("stderr");
        let out = child.stdout.take().expect("stdout");
        for (pipe, sink) in [
            (
                Box::new(err) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                stderr.clone(),
            ),
            (Box::new(out), stdout.clone()),
        ] {
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            child,
            stderr,
            stdout,
        }
    }

    /// Everything printed on stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Everything printed on stdout so far.
    pub fn out(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Lines of stderr containing every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until a stderr line contains every one of `needles`; on
    /// timeout, fails with the last lines the process printed.
    pub async fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        let started = std::time::Instant::now();
        loop {
            let found = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if started.elapsed() >= timeout {
                let tail: Vec<String> = {
                    let lines = self.stderr.lock().unwrap();
                    lines.iter().rev().take(20).rev().cloned().collect()
                };
                panic!(
                    "timed out after {timeout:?} waiting for a log line with {needles:?}; the process printed last (stderr):\n{}\nstdout:\n{}",
                    tail.join("\n"),
                    self.out()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "process did not exit within {timeout:?} of SIGTERM; logs:\n{}",
                    self.logs()
                )
            })
            .expect("wait")
    }

    /// SIGKILL, as a crash.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit on its own.
    pub async fn exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "process did not exit within {timeout:?}; logs:\n{}",
                    self.logs()
                )
            })
            .expect("wait")
    }
}

/// Starts an agent process for `b`'s enrollment token and CA, reaching the
/// backend at `url` (the backend itself, or a relay in front of it), with
/// extra flags and environment (which may override `UPLINK_TOKEN`).
pub fn agent_via(
    b: &TestBackend,
    url: &str,
    state_dir: &Path,
    hostname: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut env: Vec<(&str, &str)> = vec![("UPLINK_TOKEN", b.enroll_token.expose())];
    env.extend_from_slice(envs);
    agent_at(url, &b.ca, state_dir, hostname, args, &env)
}

/// Starts an agent process reaching a backend the testkit did not start
/// (replicas behind a load balancer, another implementation) at `url`,
/// trusting `ca` (unless `args` name their own `--ca-file`), with extra
/// flags and the environment (`UPLINK_TOKEN` among it).
pub fn agent_at(
    url: &str,
    ca: &Path,
    state_dir: &Path,
    hostname: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut argv = vec![
        "agent",
        "--backend",
        url,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--hostname",
        hostname,
    ];
    let ca = ca.to_str().unwrap().to_string();
    if !args.contains(&"--ca-file") {
        argv.extend(["--ca-file", ca.as_str()]);
    }
    argv.extend_from_slice(args);
    Proc::spawn(&argv, envs)
}

/// Runs `uplink ctl ARGS` against `b` with its admin token and CA.
pub async fn ctl(b: &TestBackend, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(bin())
        .args(["ctl", "--backend", &b.url.to_string(), "--ca-file"])
        .arg(&b.ca)
        .args(args)
        .env("UPLINK_ADMIN_TOKEN", b.admin_token.expose())
        .output()
        .await
        .expect("uplink ctl runs")
}

/// Runs `uplink health ARGS` with `envs` (and none of the `UPLINK_*`
/// variables of the test's own environment that it reads): its exit
/// code and its line.
pub async fn health(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("health").args(args);
    for var in [
        "UPLINK_STATE_DIR",
        "UPLINK_DATA_DIR",
        "UPLINK_HEALTH_ROLE",
        "UPLINK_HEALTH_MAX_AGE",
        "UPLINK_HEALTH_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("uplink health runs");
    let mut text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    }
    (out.status.code(), text)
}

/// Starts an agent process against `b`.
pub fn agent(b: &TestBackend, transport: &str, state_dir: &Path, hostname: &str) -> Proc {
    agent_via(
        b,
        &b.url.to_string(),
        state_dir,
        hostname,
        &["--transport", transport],
        &[],
    )
}
