//! A small disk under an agent's state dir: full when asked ([`SmallDisk`])
//! and slow when asked ([`SlowDisk`]).
//!
//! The disk is a real file system on a real block device where the
//! environment allows it: ext4 on a loop device of a fixed size, so the
//! agent's writes and syncs go through a journal and a block queue as on
//! a host's disk. Where loop devices cannot be used it is a tmpfs of the
//! same size, which can be filled but not slowed down.
//!
//! Slow is the kernel's block I/O throttle on that device (cgroup v1's
//! `blkio.throttle.*`, or v2's `io.max`): the agent's process is moved into
//! a cgroup that allows a few operations and kilobytes a second on the
//! device, so its syncs take hundreds of milliseconds each, and moved back
//! when the fault ends. Everything is undone when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A file system of a fixed size mounted on a directory, unmounted when
/// dropped; [`SmallDisk::fill`] takes every free byte, [`SmallDisk::free`]
/// gives them back.
pub struct SmallDisk {
    /// Where it is mounted.
    pub path: PathBuf,
    /// What it is, for the test's log.
    pub kind: &'static str,
    /// The block device's `MAJ:MIN`, for a file system on one.
    device: Option<String>,
    filler: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl SmallDisk {
    /// Ext4 of `bytes` on a loop device backed by `image` (created),
    /// mounted on `path` (created, mode 0700), or says why not.
    pub fn ext4(path: &Path, image: &Path, bytes: u64) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
        file.set_len(bytes)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        drop(file);
        // No blocks reserved for root: the agent runs as root here and
        // would otherwise write on after the filler stopped.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(image))?;
        // A loop mount frees its device when unmounted.
        run(Command::new("mount")
            .args(["-o", "loop,nodev,nosuid"])
            .arg(image)
            .arg(path))?;
        let mut disk = SmallDisk {
            path: path.to_path_buf(),
            kind: "ext4 on a loop device",
            device: None,
            filler: path.join("chaos-filler"),
        };
        let device = run(Command::new("findmnt")
            .args(["-n", "-o", "MAJ:MIN", "--mountpoint"])
            .arg(path))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        disk.device = Some(device);
        Ok(disk)
    }

    /// A tmpfs of `bytes` mounted on `path` (created), or says why not.
    pub fn tmpfs(path: &Path, bytes: u64) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(path))?;
        Ok(SmallDisk {
            path: path.to_path_buf(),
            kind: "tmpfs",
            device: None,
            filler: path.join("chaos-filler"),
        })
    }

    /// Ext4 on a loop device when the environment allows it, else a
    /// tmpfs; the reason when neither can be mounted.
    pub fn mount(path: &Path, image: &Path, bytes: u64) -> Result<SmallDisk, String> {
        SmallDisk::ext4(path, image, bytes).or_else(|e| {
            eprintln!(
                "no loop device for {}: {e}; a tmpfs instead",
                path.display()
            );
            let _ = Command::new("umount").arg(path).status();
            SmallDisk::tmpfs(path, bytes)
        })
    }

    /// The block device's `MAJ:MIN` (none for a tmpfs).
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Writes a file until the file system is full.
    pub fn fill(&self) {
        use std::io::Write as _;
        let Ok(mut f) = std::fs::File::create(&self.filler) else {
            return;
        };
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        // Blocks of a file system on a device are taken at write time
        // (delayed allocation reserves them); the sync makes them real.
        let _ = f.sync_all();
    }

    /// Removes what [`SmallDisk::fill`] wrote.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Which cgroup interface throttles block I/O here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cgroups {
    /// cgroup v1's `blkio` hierarchy.
    V1,
    /// cgroup v2's unified hierarchy with the `io` controller.
    V2,
}

const V1_ROOT: &str = "/sys/fs/cgroup/blkio";
const V2_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup whose processes may do only a little I/O a second on one
/// block device. [`SlowDisk::slow`] moves a process in, [`SlowDisk::release`]
/// moves it back where it was; dropping it moves every process still in
/// it back and removes the cgroup.
pub struct SlowDisk {
    version: Cgroups,
    dir: PathBuf,
    /// Where each process moved in was before: its pid and cgroup path.
    moved: std::sync::Mutex<Vec<(u32, String)>>,
}

impl SlowDisk {
    /// A cgroup that allows `bytes_per_sec` and `ops_per_sec` of reads
    /// and of writes on `device` (`MAJ:MIN`), or why the environment
    /// cannot throttle.
    pub fn new(device: &str, bytes_per_sec: u64, ops_per_sec: u64) -> Result<SlowDisk, String> {
        let name = format!("uplink-chaos-{}", std::process::id());
        let write = |p: &Path, v: &str| {
            std::fs::write(p, v).map_err(|e| format!("{} <- {v:?}: {e}", p.display()))
        };
        if Path::new(V1_ROOT)
            .join("blkio.throttle.write_bps_device")
            .exists()
        {
            let dir = Path::new(V1_ROOT).join(name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let slow = SlowDisk {
                version: Cgroups::V1,
                dir,
                moved: Default::default(),
            };
            for (file, v) in [
                ("blkio.throttle.write_bps_device", bytes_per_sec),
                ("blkio.throttle.read_bps_device", bytes_per_sec),
                ("blkio.throttle.write_iops_device", ops_per_sec),
                ("blkio.throttle.read_iops_device", ops_per_sec),
            ] {
                write(&slow.dir.join(file), &format!("{device} {v}"))?;
            }
            return Ok(slow);
        }
        let controllers = std::fs::read_to_string(Path::new(V2_ROOT).join("cgroup.controllers"))
            .map_err(|e| format!("no cgroup blkio or io controller here: {e}"))?;
        if !controllers.split_whitespace().any(|c| c == "io") {
            return Err(format!(
                "cgroup v2 without the io controller ({controllers:?})"
            ));
        }
        write(&Path::new(V2_ROOT).join("cgroup.subtree_control"), "+io")?;
        let dir = Path::new(V2_ROOT).join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let slow = SlowDisk {
            version: Cgroups::V2,
            dir,
            moved: Default::default(),
        };
        write(
            &slow.dir.join("io.max"),
            &format!(
                "{device} rbps={bytes_per_sec} wbps={bytes_per_sec} riops={ops_per_sec} wiops={ops_per_sec}"
            ),
        )?;
        Ok(slow)
    }

    /// The hierarchy's root directory.
    fn root(&self) -> &'static Path {
        Path::new(match self.version {
            Cgroups::V1 => V1_ROOT,
            Cgroups::V2 => V2_ROOT,
        })
    }

    /// The cgroup of `pid` in this hierarchy ("/" when none is named).
    fn cgroup_of(&self, pid: u32) -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let ours = match self.version {
                    Cgroups::V1 => controllers.split(',').any(|c| c == "blkio"),
                    Cgroups::V2 => controllers.is_empty(),
                };
                ours.then(|| path.to_string())
            })
            .unwrap_or_else(|| "/".into())
    }

    /// Throttles process `pid` (every thread of it) until released.
    pub fn slow(&self, pid: u32) -> Result<(), String> {
        let was = self.cgroup_of(pid);
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| format!("{} <- {pid}: {e}", procs.display()))?;
        self.moved.lock().unwrap().push((pid, was));
        Ok(())
    }

    /// I/O operations done in the cgroup on the slowed device so far:
    /// proof that what was moved in met the throttle.
    pub fn ops(&self, device: &str) -> u64 {
        match self.version {
            Cgroups::V1 => std::fs::read_to_string(self.dir.join("blkio.throttle.io_serviced"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (dev, op, n) = (f.next()?, f.next()?, f.next()?);
                    (dev == device && (op == "Read" || op == "Write"))
                        .then(|| n.parse::<u64>().ok())?
                })
                .sum(),
            Cgroups::V2 => std::fs::read_to_string(self.dir.join("io.stat"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with(&format!("{device} ")))
                .flat_map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    matches!(k, "rios" | "wios").then(|| v.parse::<u64>().ok())?
                })
                .sum(),
        }
    }

    /// How long `writes` synced 4 KiB writes into `dir` (on the slowed
    /// device) take from inside the cgroup: a shell moves itself in, then
    /// runs `dd` with `oflag=dsync`.
    pub fn time_synced_writes(
        &self,
        dir: &Path,
        writes: u32,
    ) -> Result<std::time::Duration, String> {
        let script = format!(
            "echo $$ > {procs} && exec dd if=/dev/zero of={file} bs=4k count={writes} oflag=dsync",
            procs = self.dir.join("cgroup.procs").display(),
            file = dir.join("chaos-slow-check").display(),
        );
        let started = std::time::Instant::now();
        run(Command::new("sh").arg("-c").arg(&script))?;
        let took = started.elapsed();
        let _ = std::fs::remove_file(dir.join("chaos-slow-check"));
        Ok(took)
    }

    /// Moves process `pid` back to the cgroup it was in (a process gone
    /// since is forgotten).
    pub fn release(&self, pid: u32) {
        let mut moved = self.moved.lock().unwrap();
        if let Some(i) = moved.iter().position(|(p, _)| *p == pid) {
            let (_, was) = moved.remove(i);
            let back = self
                .root()
                .join(was.trim_start_matches('/'))
                .join("cgroup.procs");
            if std::fs::write(&back, pid.to_string()).is_err() {
                let _ = std::fs::write(self.root().join("cgroup.procs"), pid.to_string());
            }
        }
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.moved.lock().unwrap().iter().map(|(p, _)| *p).collect();
        pids.into_iter().for_each(|p| self.release(p));
        // Anything else in it (a child the process started) goes to the root.
        if let Ok(left) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in left.lines() {
                let _ = std::fs::write(self.root().join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
