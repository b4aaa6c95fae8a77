//! The project's image, from the top-level `Dockerfile`, as the suite
//! builds it: `make image-local` (the binary built on this host by
//! `scripts/static-binary`, a local busybox image as the build stage), so
//! the tests run what `make image` ships with no registry at hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's top level.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the repository")
        .to_path_buf()
}

/// The crate's version, the image's tag.
pub fn version() -> &'static str {
    uplink::VERSION
}

/// `uplink:<version>`, built (or found up to date) once per test process;
/// builds by concurrent tests wait on a lock file and then find the
/// image current. Panics with the build's output when it fails.
pub fn image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let root = repo_root();
        let lock_path = root.join("target").join("image-build.lock");
        std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
        let lock = std::fs::File::create(&lock_path).unwrap();
        lock.lock().expect("lock the image build");
        let out = Command::new("make")
            .args(["-s", "image-local"])
            .current_dir(&root)
            .output()
            .expect("make runs");
        assert!(
            out.status.success(),
            "make image-local failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        drop(lock);
        format!("uplink:{}", version())
    })
}

/// Runs `docker` with `args`, its stdout on success; panics with stderr.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What container `name` wrote: its stdout, then its stderr (where
/// uplink logs), empty for a container that is gone.
pub fn container_logs(name: &str) -> String {
    let (_, out, err) = docker_try(&["logs", name]);
    format!("{out}\n{err}")
}

/// `docker` with `args`, returning (success, stdout, stderr) without
/// judging.
pub fn docker_try(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}
