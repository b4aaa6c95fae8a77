//! The agent's own container, when it runs in one: found once at start, so
//! that the executor, reconciliation and the container metrics source
//! never list, read, stop or remove it. A bottom-floor module: it imports
//! nothing from the rest of the crate, since `agent::docker` and
//! `metrics::containers` both use it.
//!
//! The id is read from this process's own files, never from the hostname
//! (with `--network host` a container has the host's name):
//!
//! - `/proc/self/mountinfo`: Docker bind-mounts `/etc/hostname`,
//!   `/etc/hosts` and `/etc/resolv.conf` from
//!   `<data-root>/containers/<id>/`, and Podman from
//!   `.../overlay-containers/<id>/userdata/`; the mount's root names the
//!   directory. This holds with cgroup v2's private cgroup namespace, where
//!   the cgroup path says nothing.
//! - `/proc/self/cgroup`: `/docker/<id>` (cgroup v1, cgroupfs driver),
//!   `docker-<id>.scope` (systemd driver), `libpod-<id>`, `crio-<id>`,
//!   `cri-containerd-<id>`.
//!
//! An id is 64 lower-case hex digits, as Docker lists containers.

use std::path::Path;

/// Files whose presence says "this is a container" even when its id
/// cannot be found: Docker's and Podman's markers.
const MARKERS: [&str; 2] = ["/.dockerenv", "/run/.containerenv"];

/// Where this process runs, as far as containers go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnContainer {
    /// The id of the container this process runs in, when found.
    pub id: Option<String>,
    /// Whether this process seems to run in a container at all (an id was
    /// found, or a runtime's marker file exists).
    pub in_container: bool,
}

/// Looks at this process's mount table and cgroups (and the runtimes'
/// marker files). Cheap: a few small reads, done once at start.
pub fn detect() -> OwnContainer {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let id = id_in_mountinfo(&read("/proc/self/mountinfo"))
        .or_else(|| id_in_cgroup(&read("/proc/self/cgroup")));
    let in_container = id.is_some() || MARKERS.iter().any(|m| Path::new(m).exists());
    OwnContainer { id, in_container }
}

/// The container id named by the mounts a runtime makes for `/etc/hostname`,
/// `/etc/hosts` or `/etc/resolv.conf`, in the text of a
/// `/proc/<pid>/mountinfo`.
pub fn id_in_mountinfo(mountinfo: &str) -> Option<String> {
    const RUNTIME_FILES: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options ... - fs source super
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        if !RUNTIME_FILES.contains(&mount_point) {
            return None;
        }
        root.split('/')
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[0].ends_with("containers") && is_id(w[1]))
            .map(|w| w[1].to_string())
    })
}

/// The container id in the text of a `/proc/<pid>/cgroup`: the last path
/// component that is an id, bare or with a runtime's prefix and `.scope`.
pub fn id_in_cgroup(cgroup: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = [
        "docker-",
        "libpod-",
        "crio-",
        "cri-containerd-",
        "containerd-",
    ];
    cgroup.lines().find_map(|line| {
        // hierarchy-id:controllers:path
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').rev().find_map(|part| {
            let part = part.strip_suffix(".scope").unwrap_or(part);
            let part = PREFIXES
                .iter()
                .find_map(|p| part.strip_prefix(p))
                .unwrap_or(part);
            is_id(part).then(|| part.to_string())
        })
    })
}

/// 64 lower-case hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f7819106741ae4aedfd4ebfa41561da6445e31f2f0c4cfe4434a35a4c40467a";

    #[test]
    fn docker_mounts_name_the_container() {
        // As read in a container run with --network host, -v /:/host and
        // -v /var/run/docker.sock (cgroup v2, private cgroup namespace).
        let mountinfo = format!(
            "\
1204 1112 0:193 / / rw,relatime master:581 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X:/var/lib/docker/overlay2/l/Y
1205 1204 0:196 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1216 1204 254:0 / /host ro,relatime master:1 - ext4 /dev/vda rw
1217 1216 254:0 /var/lib/docker/containers/{other}/hostname /host/srv/hostname ro - ext4 /dev/vda rw
1231 1204 254:0 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda rw
1232 1204 254:0 /var/lib/docker/containers/{ID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda rw
1233 1204 254:0 /var/lib/docker/containers/{ID}/hosts /etc/hosts rw,relatime - ext4 /dev/vda rw
1234 1204 0:26 /docker.sock /var/run/docker.sock rw,nosuid,nodev - tmpfs tmpfs rw
",
            other = "a".repeat(64)
        );
        assert_eq!(id_in_mountinfo(&mountinfo).as_deref(), Some(ID));
        assert_eq!(id_in_cgroup("0::/\n"), None);
    }

    #[test]
    fn a_data_root_of_its_own_and_podman_are_found_too() {
        // /var/lib/docker on a file system of its own: the root is relative
        // to it.
        let own_fs =
            format!("88 70 8:17 /containers/{ID}/hosts /etc/hosts rw - xfs /dev/sdb1 rw\n");
        assert_eq!(id_in_mountinfo(&own_fs).as_deref(), Some(ID));
        let podman = format!(
            "601 590 0:44 /containers/storage/overlay-containers/{ID}/userdata/hostname /etc/hostname rw - tmpfs tmpfs rw\n"
        );
        assert_eq!(id_in_mountinfo(&podman).as_deref(), Some(ID));
    }

    #[test]
    fn a_host_has_no_container_id() {
        let host = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
101 27 254:0 /var/lib/docker /var/lib/docker rw,relatime - ext4 /dev/vda rw
";
        assert_eq!(id_in_mountinfo(host), None);
        let cgroup = "\
9:name=systemd:/
4:memory:/process_api/1927d996f9052b4bf380788e4d568ee2
0::/
";
        assert_eq!(id_in_cgroup(cgroup), None);
        // Not a container of the runtime: a short or upper-case name.
        let short = format!(
            "1 1 0:1 /containers/{}/hosts /etc/hosts rw - ext4 x rw\n",
            &ID[..12]
        );
        assert_eq!(id_in_mountinfo(&short), None);
        let upper = format!("0::/docker/{}\n", ID.to_uppercase());
        assert_eq!(id_in_cgroup(&upper), None);
    }

    #[test]
    fn cgroup_paths_of_each_runtime_name_the_container() {
        for text in [
            format!("12:memory:/docker/{ID}\n0::/docker/{ID}\n"),
            format!("0::/system.slice/docker-{ID}.scope\n"),
            format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
            format!("0::/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope\n"),
            format!("0::/kubepods/besteffort/pod1/cri-containerd-{ID}.scope\n"),
            format!("11:pids:/kubepods/burstable/pod0a1b/{ID}\n"),
        ] {
            assert_eq!(id_in_cgroup(&text).as_deref(), Some(ID), "{text}");
        }
    }

    #[test]
    fn this_test_process_is_looked_at_without_failing() {
        let found = detect();
        if let Some(id) = &found.id {
            assert!(is_id(id) && found.in_container);
        }
    }
}
