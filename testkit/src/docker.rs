//! The real Docker engine for the executor's tests: a busybox image built
//! `FROM scratch` from Debian's busybox-static, and Debian's
//! docker-registry on a loopback port to pull it from.

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
