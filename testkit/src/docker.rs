//! The real Docker engine for the executor's tests: a busybox image built
//! `FROM scratch` from Debian's busybox-static, and Debian's
//! docker-registry on a loopback port to pull it from; and for the agent
//! in a container, an image of the binary under test ([`agent_image`]).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The local test image (built once per machine).
pub const LOCAL_IMAGE: &str = "uplink-test/busybox:1";

fn sh(cmd: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("sh runs")
}

/// Builds the busybox image unless present. Safe to call from many tests.
pub fn ensure_image(dir: &Path) {
    if sh(&format!(
        "docker image inspect {LOCAL_IMAGE} >/dev/null 2>&1"
    ))
    .status
    .success()
    {
        return;
    }
    let ctx = dir.join("busybox-image");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox-static is installed");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    let out = sh(&format!(
        "docker build -q -t {LOCAL_IMAGE} {}",
        ctx.display()
    ));
    // A concurrent build by another test is fine if the image now exists.
    assert!(
        out.status.success()
            || sh(&format!(
                "docker image inspect {LOCAL_IMAGE} >/dev/null 2>&1"
            ))
            .status
            .success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A registry on loopback holding `loadgen/busybox:1`.
pub struct Registry {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Registry {
    /// Starts a registry and pushes the test image to it under a name
    /// unique to this registry, then removes that name locally so that a
    /// pull really pulls.
    pub async fn start(dir: &Path) -> Registry {
        ensure_image(dir);
        let port = crate::free_port();
        let root = dir.join("registry");
        std::fs::create_dir_all(&root).unwrap();
        let conf = dir.join("registry.yml");
        std::fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("docker-registry starts (apt-get install docker-registry)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "registry did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = Registry { child, port };
        let name = r.image();
        let out = sh(&format!(
            "docker tag {LOCAL_IMAGE} {name} && docker push -q {name} && docker rmi {name}"
        ));
        assert!(
            out.status.success(),
            "push to the test registry failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        r
    }

    /// The image's name in this registry.
    pub fn image(&self) -> String {
        format!("127.0.0.1:{}/loadgen/busybox:1", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = sh(&format!("docker rmi -f {} >/dev/null 2>&1", self.image()));
    }
}

/// Removes every container of `agent` (cleanup after a test).
pub fn remove_containers_of(agent: &str) {
    let _ = sh(&format!(
        "docker ps -aq --filter label=uplink.agent={agent} | xargs -r docker rm -f >/dev/null 2>&1"
    ));
}

/// Names of the containers of `agent`.
pub fn containers_of(agent: &str) -> Vec<String> {
    let out = sh(&format!(
        "docker ps -a --filter label=uplink.agent={agent} --format '{{{{.Names}}}}'"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The repository of [`agent_image`]'s images.
pub const AGENT_IMAGE_REPO: &str = "uplink-test/agent";

/// An image of the `uplink` binary these tests run, laid out as the
/// project's image is (`/uplink` as the entrypoint, `agent` the default
/// command, user 10001 owning `/var/lib/uplink`, CA certificates), plus
/// the shared libraries and ELF interpreter this build needs (`ldd`), since
/// it is not static. Imported with `docker import`, tagged
/// `uplink-test/agent:<version>-<size and time of the binary>`, and built
/// only when missing; images of earlier builds are removed. Needs root
/// (the state directory is owned by uid 10001 in the image).
pub fn agent_image(dir: &Path) -> String {
    let bin = crate::agents::bin();
    let meta = std::fs::metadata(bin).expect("the uplink binary");
    let built = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let tag = format!(
        "{AGENT_IMAGE_REPO}:{}-{:x}{built:x}",
        uplink::VERSION,
        meta.len()
    );
    if sh(&format!("docker image inspect {tag} >/dev/null 2>&1"))
        .status
        .success()
    {
        return tag;
    }
    let root = dir.join("agent-image");
    let _ = std::fs::remove_dir_all(&root);
    let put = |from: &Path, inside: &str| {
        let to = root.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    // Without its debug sections the binary is a quarter of its size.
    std::fs::create_dir_all(&root).unwrap();
    let stripped = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(root.join("uplink"))
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        put(bin, "/uplink");
    }
    let ldd = std::process::Command::new("ldd")
        .arg(bin)
        .output()
        .expect("ldd runs");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the
        // interpreter: `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = match line.split_once("=>") {
            Some((_, target)) => target.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            put(Path::new(path), path);
        }
    }
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certs.is_file() {
        put(certs, "/etc/ssl/certs/ca-certificates.crt");
    }
    let state = root.join("var/lib/uplink");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(10001), Some(10001))
        .expect("chown of the image's state dir (the tests run as root)");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = sh(&format!(
        "tar --numeric-owner -C {} -c . | docker import \
         --change 'USER 10001' --change 'ENTRYPOINT [\"/uplink\"]' --change 'CMD [\"agent\"]' - {tag}",
        root.display()
    ));
    assert!(
        out.status.success(),
        "docker import of {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = sh(&format!(
        "docker images {AGENT_IMAGE_REPO} --format '{{{{.Repository}}}}:{{{{.Tag}}}}' \
         | grep -vxF '{tag}' | xargs -r docker rmi >/dev/null 2>&1"
    ));
    tag
}
