//! The agent's host metrics: CPU, load, memory, network interfaces and file
//! systems, read through `sysinfo` by a [`HostSource`] that the agent calls
//! on its own schedule. A scrape appends [`Sample`]s stamped with the time
//! it is given; batching and sending are other modules' concern.
//!
//! # Metrics
//!
//! Names follow `host_<noun>_<unit>`, with `_total` on counters. The unit
//! field is `percent` or `bytes` where the name says so, and empty for
//! plain numbers (load, packets, errors).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `host_cpu_usage_percent` | gauge | |
//! | `host_cpu_core_usage_percent` | gauge | `cpu` (index from 0) |
//! | `host_load_average` | gauge | `period` (`1m`, `5m`, `15m`) |
//! | `host_memory_total_bytes` | gauge | |
//! | `host_memory_used_bytes` | gauge | |
//! | `host_memory_available_bytes` | gauge | |
//! | `host_swap_total_bytes` | gauge | |
//! | `host_swap_used_bytes` | gauge | |
//! | `host_network_received_bytes_total` | counter | `interface` |
//! | `host_network_transmitted_bytes_total` | counter | `interface` |
//! | `host_network_received_packets_total` | counter | `interface` |
//! | `host_network_transmitted_packets_total` | counter | `interface` |
//! | `host_network_received_errors_total` | counter | `interface` |
//! | `host_network_transmitted_errors_total` | counter | `interface` |
//! | `host_disk_total_bytes` | gauge | `device`, `mount` |
//! | `host_disk_available_bytes` | gauge | `device`, `mount` |
//! | `host_disk_read_bytes_total` | counter | `device`, `mount` |
//! | `host_disk_written_bytes_total` | counter | `device`, `mount` |
//!
//! The whole-machine CPU usage has its own name rather than a `cpu` label
//! value, so that summing `host_cpu_core_usage_percent` never counts it.
//! Counters are the kernel's cumulative totals, so a receiver computes rates
//! from any two samples and sees a restart as a drop. A file system mounted
//! at several places (bind mounts, as in a container) is reported once,
//! under the first mount point `/proc/mounts` lists, and one without block
//! device statistics (NFS, say) has no I/O counters.
//!
//! # In a container: the host's root
//!
//! When the agent runs in a container, [`HostConfig::root`] names where the
//! host's `/` is mounted in it (`--host-root /host`, with `-v
//! /:/host:ro,rslave`), and every figure is the host's:
//!
//! - CPU, load and memory come from `/proc/stat`, `/proc/loadavg` and
//!   `/proc/meminfo`, which no container runtime scopes: they are the
//!   host's whatever the container's CPU or memory limits (the cgroup's
//!   limits are never read).
//! - Interfaces come from `<root>/proc/1/net/dev`, the counters of the
//!   host's init, so of the host's network namespace, whether or not the
//!   container shares it; when that file cannot be read (a `/proc` mounted
//!   with `hidepid`), from this process's namespace, the host's only with
//!   `--network host`.
//! - File systems are the host's mounts as they appear under `<root>` in
//!   this process's mount table (`rslave` keeps it in step with the host's),
//!   with sizes from `statvfs` of `<root><mount point>`, reported under the
//!   host's mount point (`/`, `/boot`, not `/host/...`); the container's own
//!   mounts are left out, and so are the host's under `/proc`, `/sys` and
//!   `/run` (but `/run/media`), as `sysinfo` leaves them out on a host. I/O
//!   counters come from `<root>/proc/diskstats`, matched by the device
//!   number of the mount point, or else by the device's name under
//!   `<root>/dev`.
//!
//! # Cost and timing
//!
//! A scrape refreshes only the enabled groups, and never calls
//! `refresh_all`. CPU usage is the difference between two readings of
//! `/proc/stat`, and `sysinfo` silently ignores a reading taken less than
//! [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] (200 ms) after the previous one.
//! The source therefore takes a first reading when it is created, and
//! reports CPU usage only from a scrape that comes at least that long after
//! the previous reading; a scrape right after [`HostSource::new`] has no CPU
//! samples, because its usage would not be meaningful. Network and file
//! system refreshes read several files per interface or mount; they can run
//! every Nth scrape ([`HostConfig::network_every`],
//! [`HostConfig::disk_every`]), and the scrapes in between report nothing
//! for those groups rather than repeat stale values.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sysinfo::{
    DiskRefreshKind, Disks, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind, Networks, RefreshKind,
    System,
};

use crate::metrics::sample::{Kind, Out, Sample, Series};

/// A metric's name, kind and unit.
type Def = (&'static str, Kind, &'static str);

const CPU_TOTAL: Def = gauge("host_cpu_usage_percent", "percent");
const CPU_CORE: Def = gauge("host_cpu_core_usage_percent", "percent");
const LOAD: Def = gauge("host_load_average", "");
const LOAD_PERIODS: [&str; 3] = ["1m", "5m", "15m"];
const MEMORY: [Def; 5] = [
    gauge("host_memory_total_bytes", "bytes"),
    gauge("host_memory_used_bytes", "bytes"),
    gauge("host_memory_available_bytes", "bytes"),
    gauge("host_swap_total_bytes", "bytes"),
    gauge("host_swap_used_bytes", "bytes"),
];
const NETWORK: [Def; 6] = [
    counter("host_network_received_bytes_total", "bytes"),
    counter("host_network_transmitted_bytes_total", "bytes"),
    counter("host_network_received_packets_total", ""),
    counter("host_network_transmitted_packets_total", ""),
    counter("host_network_received_errors_total", ""),
    counter("host_network_transmitted_errors_total", ""),
];
/// Space first, then I/O.
const DISK: [Def; 4] = [
    gauge("host_disk_total_bytes", "bytes"),
    gauge("host_disk_available_bytes", "bytes"),
    counter("host_disk_read_bytes_total", "bytes"),
    counter("host_disk_written_bytes_total", "bytes"),
];

const fn gauge(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Gauge, unit)
}

const fn counter(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Counter, unit)
}

/// What a [`HostSource`] reports and how often. [`HostConfig::default`] is
/// the one place that sets the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Report CPU usage, whole and per core.
    pub cpu: bool,
    /// Report the 1, 5 and 15 minute load averages.
    pub load: bool,
    /// Report memory and swap.
    pub memory: bool,
    /// Report network interface counters.
    pub network: bool,
    /// Report file system space and I/O.
    pub disk: bool,
    /// Refresh and report network interfaces on every Nth scrape, starting
    /// with the first: the network refresh is the costliest one.
    pub network_every: NonZeroU32,
    /// Refresh and report file systems on every Nth scrape, starting with
    /// the first.
    pub disk_every: NonZeroU32,
    /// Interfaces not reported: a name, or a prefix followed by `*`. The
    /// default skips loopback, whose traffic never leaves the host, and
    /// Docker's `veth*` pairs, which come and go with every container and
    /// whose traffic also crosses the bridge (`docker0`), which is kept.
    pub skip_interfaces: Vec<String>,
    /// File system types not reported, as `/proc/mounts` names them.
    /// `sysinfo` already leaves out the kernel's pseudo file systems
    /// (`proc`, `sysfs`, `cgroup`, `devtmpfs`, `tmpfs` and others). The
    /// default also skips `overlay` and `fuse.fuse-overlayfs` (Docker's
    /// storage drivers), one per container (and the agent's own root when
    /// it runs in one), whose space is that of the disk beneath, and
    /// memory-backed or image file systems whose space says nothing about
    /// the host's disks.
    pub skip_file_systems: Vec<String>,
    /// Where the host's `/` is mounted when the agent runs in a container
    /// (`--host-root`): then interfaces and file systems are read as the
    /// module doc says. None: the agent runs on the host.
    pub root: Option<PathBuf>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cpu: true,
            load: true,
            memory: true,
            network: true,
            disk: true,
            network_every: NonZeroU32::MIN,
            disk_every: NonZeroU32::MIN,
            skip_interfaces: vec!["lo".into(), "veth*".into()],
            skip_file_systems: [
                "overlay",
                "fuse.fuse-overlayfs",
                "tmpfs",
                "ramfs",
                "squashfs",
                "nsfs",
            ]
            .map(String::from)
            .into(),
            root: None,
        }
    }
}

/// Why host metrics cannot be read at all.
#[derive(Debug, thiserror::Error)]
#[error("host metrics are not available on this system: {0}")]
pub struct HostError(#[from] sysinfo::Error);

/// Reads host metrics and turns them into samples, keeping one series per
/// metric, core, interface and file system across scrapes.
///
/// Series whose interface or file system disappeared are forgotten at the
/// next refresh of their group; when they come back they get new series.
pub struct HostSource {
    config: HostConfig,
    system: System,
    networks: Networks,
    disks: Disks,
    /// `<root>/proc/1/net/dev`, read instead of `networks` in a container
    /// when it can be read.
    net_dev: Option<PathBuf>,
    /// In a container: the name in `<root>/proc/diskstats` of each device
    /// (as its mounts name it) whose device number matched nothing there.
    device_names: HashMap<String, Option<String>>,
    /// Scrapes so far, for the every-Nth refreshes.
    scrapes: u64,
    /// When the last CPU reading was taken, measured after it returned, so
    /// that it is no earlier than the time `sysinfo` keeps for it.
    cpu_read_at: Instant,
    cpu_total: Arc<Series>,
    cpu_cores: Vec<Arc<Series>>,
    load: [Arc<Series>; 3],
    memory: [Arc<Series>; 5],
    /// By interface name.
    interfaces: HashMap<String, [Arc<Series>; 6]>,
    /// By device and mount point.
    file_systems: HashMap<(String, String), [Arc<Series>; 4]>,
}

impl HostSource {
    /// A source that reports what `config` enables. It takes the first CPU
    /// reading now (when CPU is enabled), so that a scrape 200 ms or more
    /// from now reports usage over that span.
    pub fn new(config: HostConfig) -> Result<Self, HostError> {
        let mut system = System::new_with_specifics(RefreshKind::nothing())?;
        if config.cpu {
            system.refresh_cpu_usage();
        }
        let net_dev = config.root.as_ref().and_then(|root| {
            let path = root.join("proc/1/net/dev");
            match std::fs::read_to_string(&path) {
                Ok(_) => Some(path),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "host metrics: the host's interfaces cannot be read; reporting those of this \
                         process's network namespace, the host's only with --network host");
                    None
                }
            }
        });
        Ok(HostSource {
            system,
            networks: Networks::new()?,
            disks: Disks::new()?,
            net_dev,
            device_names: HashMap::new(),
            scrapes: 0,
            cpu_read_at: Instant::now(),
            cpu_total: series(CPU_TOTAL, &[]),
            cpu_cores: Vec::new(),
            load: LOAD_PERIODS.map(|p| series(LOAD, &[("period", p)])),
            memory: MEMORY.map(|d| series(d, &[])),
            interfaces: HashMap::new(),
            file_systems: HashMap::new(),
            config,
        })
    }

    /// Refreshes the enabled groups that are due and appends their samples
    /// to `out`, all stamped `now_unix_ms`. Values that are not finite are
    /// left out; a group that cannot be read reports nothing.
    pub fn scrape(&mut self, now_unix_ms: i64, out: &mut Vec<Sample>) {
        let mut out = Out(out, now_unix_ms);
        let scrape = self.scrapes;
        self.scrapes += 1;
        let due = |every: NonZeroU32| scrape.is_multiple_of(u64::from(every.get()));
        if self.config.cpu && self.cpu_read_at.elapsed() >= MINIMUM_CPU_UPDATE_INTERVAL {
            self.scrape_cpu(&mut out);
        }
        if self.config.load
            && let Ok(load) = System::load_average()
        {
            for (s, v) in self.load.iter().zip([load.one, load.five, load.fifteen]) {
                out.push(s, v);
            }
        }
        if self.config.memory {
            self.scrape_memory(&mut out);
        }
        if self.config.network && due(self.config.network_every) {
            self.scrape_network(&mut out);
        }
        if self.config.disk && due(self.config.disk_every) {
            self.scrape_disks(&mut out);
        }
    }

    fn scrape_cpu(&mut self, out: &mut Out<'_>) {
        self.system.refresh_cpu_usage();
        self.cpu_read_at = Instant::now();
        out.push(&self.cpu_total, percent(self.system.global_cpu_usage()));
        let cpus = self.system.cpus();
        self.cpu_cores.truncate(cpus.len());
        for i in self.cpu_cores.len()..cpus.len() {
            let core = series(CPU_CORE, &[("cpu", &i.to_string())]);
            self.cpu_cores.push(core);
        }
        for (cpu, s) in cpus.iter().zip(&self.cpu_cores) {
            out.push(s, percent(cpu.usage()));
        }
    }

    fn scrape_memory(&mut self, out: &mut Out<'_>) {
        let sys = &mut self.system;
        sys.refresh_memory_specifics(MemoryRefreshKind::everything());
        let values = [
            sys.total_memory(),
            sys.used_memory(),
            sys.available_memory(),
            sys.total_swap(),
            sys.used_swap(),
        ];
        for (s, v) in self.memory.iter().zip(values) {
            out.push(s, v as f64);
        }
    }

    fn scrape_network(&mut self, out: &mut Out<'_>) {
        let mut known = std::mem::take(&mut self.interfaces);
        let mut report = |name: &str, values: [u64; 6]| {
            if skipped(&self.config.skip_interfaces, name) {
                return;
            }
            let set = known
                .remove(name)
                .unwrap_or_else(|| NETWORK.map(|d| series(d, &[("interface", name)])));
            for (s, v) in set.iter().zip(values) {
                out.push(s, v as f64);
            }
            self.interfaces.insert(name.to_string(), set);
        };
        if let Some(path) = &self.net_dev {
            if let Ok(text) = std::fs::read_to_string(path) {
                for (name, values) in net_dev(&text) {
                    report(name, values);
                }
            }
            return;
        }
        self.networks.refresh(true);
        for (name, data) in &self.networks {
            let values = [
                data.total_received(),
                data.total_transmitted(),
                data.total_packets_received(),
                data.total_packets_transmitted(),
                data.total_errors_on_received(),
                data.total_errors_on_transmitted(),
            ];
            report(&name.to_string_lossy(), values);
        }
    }

    fn scrape_disks(&mut self, out: &mut Out<'_>) {
        let root = self.config.root.as_deref();
        // In a container `sysinfo` cannot find the devices' statistics (the
        // host's /dev is not the container's): they are read here instead.
        let kind = match root {
            None => DiskRefreshKind::nothing().with_storage().with_io_usage(),
            Some(_) => DiskRefreshKind::nothing().with_storage(),
        };
        self.disks.refresh_specifics(true, kind);
        let stats = root.map(|r| {
            let text = std::fs::read_to_string(r.join("proc/diskstats")).unwrap_or_default();
            DiskStats::parse(&text)
        });
        let mut known = std::mem::take(&mut self.file_systems);
        let mut devices = HashSet::new();
        for disk in self.disks.iter() {
            let mount = match root {
                None => Some(disk.mount_point().to_string_lossy()),
                Some(root) => host_mount_point(root, disk.mount_point()).map(Into::into),
            };
            let Some(mount) = mount else {
                continue; // The container's own, or a pseudo file system's.
            };
            let file_system = disk.file_system().to_string_lossy();
            // A size of 0 means the file system could not be read. A device
            // mounted again (a bind mount) is the same file system.
            if skipped(&self.config.skip_file_systems, &file_system)
                || disk.total_space() == 0
                || !devices.insert(disk.name())
            {
                continue;
            }
            let key = (
                disk.name().to_string_lossy().into_owned(),
                mount.into_owned(),
            );
            let set = known.remove(&key).unwrap_or_else(|| {
                let labels = [("device", key.0.as_str()), ("mount", key.1.as_str())];
                DISK.map(|d| series(d, &labels))
            });
            out.push(&set[0], disk.total_space() as f64);
            out.push(&set[1], disk.available_space() as f64);
            let (read, written) = match (root, &stats) {
                (Some(root), Some(stats)) => {
                    let name = &key.0;
                    let by_number = disk.id().and_then(|dev| stats.by_number(dev));
                    by_number
                        .or_else(|| {
                            let resolved = self
                                .device_names
                                .entry(name.clone())
                                .or_insert_with(|| device_under(root, name));
                            stats.by_name(resolved.as_deref()?)
                        })
                        .unwrap_or((0, 0))
                }
                _ => {
                    let io = disk.usage();
                    (io.total_read_bytes, io.total_written_bytes)
                }
            };
            // Devices without block statistics (NFS, say) read as 0.
            if read > 0 || written > 0 {
                out.push(&set[2], read as f64);
                out.push(&set[3], written as f64);
            }
            self.file_systems.insert(key, set);
        }
    }
}

/// Each interface's counters in the text of a `/proc/<pid>/net/dev`, in
/// the order of [`NETWORK`]: bytes, packets and errors, received then
/// transmitted. Lines that do not parse are skipped.
fn net_dev(text: &str) -> impl Iterator<Item = (&str, [u64; 6])> {
    // Two header lines, then `name: rx bytes packets errs drop fifo frame
    // compressed multicast tx bytes packets errs ...`.
    text.lines().skip(2).filter_map(|line| {
        let (name, counters) = line.split_once(':')?;
        let mut v = [0u64; 11];
        let mut fields = counters.split_ascii_whitespace();
        for slot in &mut v {
            *slot = fields.next()?.parse().ok()?;
        }
        Some((name.trim(), [v[0], v[8], v[1], v[9], v[2], v[10]]))
    })
}

/// The host's mount point of `mount`, a mount point in this process's
/// table: `mount` without the `root` prefix (`/host/boot` -> `/boot`).
/// None for a mount outside `root` (the container's own) and for the
/// host's pseudo file systems' places, as `sysinfo` skips them on a host.
fn host_mount_point(root: &Path, mount: &Path) -> Option<String> {
    let inside = mount.strip_prefix(root).ok()?;
    let host = Path::new("/").join(inside);
    let pseudo = ["/proc", "/sys", "/run"]
        .iter()
        .any(|p| host.starts_with(p))
        && !host.starts_with("/run/media");
    (!pseudo).then(|| host.to_string_lossy().into_owned())
}

/// The name in `/proc/diskstats` of `device` (as a mount names it, e.g.
/// `/dev/mapper/vg-root`), resolved in the host's `/dev` under `root`
/// (`dm-0`); None when it is not a device there.
fn device_under(root: &Path, device: &str) -> Option<String> {
    let inside = device.strip_prefix("/dev/")?;
    let dev = root.join("dev");
    let real = std::fs::canonicalize(dev.join(inside)).ok()?;
    Some(real.strip_prefix(&dev).ok()?.to_string_lossy().into_owned())
}

/// Bytes read and written per device, from `/proc/diskstats`.
struct DiskStats {
    by_number: HashMap<(u64, u64), (u64, u64)>,
    by_name: HashMap<String, (u64, u64)>,
}

impl DiskStats {
    /// The kernel counts in sectors of 512 bytes, whatever the device's.
    const SECTOR: u64 = 512;

    fn parse(text: &str) -> DiskStats {
        let mut stats = DiskStats {
            by_number: HashMap::new(),
            by_name: HashMap::new(),
        };
        for line in text.lines() {
            // major minor name reads merged sectors-read ms writes merged
            // sectors-written ...
            let f: Vec<&str> = line.split_ascii_whitespace().take(10).collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            let (Some(major), Some(minor), Some(name), Some(read), Some(written)) =
                (num(0), num(1), f.get(2), num(5), num(9))
            else {
                continue;
            };
            let bytes = (read * Self::SECTOR, written * Self::SECTOR);
            stats.by_number.insert((major, minor), bytes);
            stats.by_name.insert(name.to_string(), bytes);
        }
        stats
    }

    /// By a device number (`st_dev`), Linux's encoding of major and minor.
    fn by_number(&self, dev: u64) -> Option<(u64, u64)> {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
        let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
        self.by_number.get(&(major, minor)).copied()
    }

    fn by_name(&self, name: &str) -> Option<(u64, u64)> {
        self.by_name.get(name).copied()
    }
}

/// A new shared series of `def` with `labels`.
fn series((name, kind, unit): Def, labels: &[(&str, &str)]) -> Arc<Series> {
    let mut s = Series::new(name, kind).unit(unit);
    for &(n, v) in labels {
        s = s.label(n, v);
    }
    Arc::new(s)
}

/// A usage percentage rounded to hundredths, within 0..=100. The kernel
/// counts CPU time in ticks of 10 ms, so finer digits are noise, and a
/// short decimal encodes in a few bytes where the bits of a double take
/// eight. NaN stays NaN and is left out by the caller.
fn percent(usage: f32) -> f64 {
    ((f64::from(usage) * 100.0).round() / 100.0).clamp(0.0, 100.0)
}

/// Whether `name` matches one of `patterns`: a name, or a prefix followed
/// by `*`.
fn skipped(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::{BatchBuilder, decode};
    use std::thread::sleep;
    use std::time::Duration;

    /// Everything enabled, no interface skipped.
    fn all() -> HostConfig {
        HostConfig {
            skip_interfaces: Vec::new(),
            ..HostConfig::default()
        }
    }

    fn scrape(source: &mut HostSource, now: i64) -> Vec<Sample> {
        let mut out = Vec::new();
        source.scrape(now, &mut out);
        out
    }

    fn named<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
        samples.iter().filter(|s| s.series.name == name).collect()
    }

    fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
        let mut labels = s.series.labels.iter();
        labels.find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn is_any(s: &Sample, prefixes: &[&str]) -> bool {
        prefixes.iter().any(|p| s.series.name.starts_with(p))
    }

    fn value(samples: &[Sample], name: &str) -> f64 {
        let found = named(samples, name);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].value
    }

    /// A scrape right after `new`, and one 250 ms later.
    fn two_scrapes(config: HostConfig) -> (HostSource, Vec<Sample>, Vec<Sample>) {
        let mut source = HostSource::new(config).unwrap();
        let first = scrape(&mut source, 1_000);
        sleep(Duration::from_millis(250));
        let second = scrape(&mut source, 1_250);
        (source, first, second)
    }

    #[test]
    fn cpu_usage_comes_only_from_a_reading_200_ms_after_the_last() {
        let (_, first, second) = two_scrapes(all());
        assert!(named(&first, CPU_TOTAL.0).is_empty(), "{first:?}");
        assert!(named(&first, CPU_CORE.0).is_empty());
        let total = value(&second, CPU_TOTAL.0);
        assert!((0.0..=100.0).contains(&total), "{total}");
        let cores = named(&second, CPU_CORE.0);
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        // One `cpu` line for the whole machine, then one per core.
        assert_eq!(
            cores.len(),
            stat.lines().filter(|l| l.starts_with("cpu")).count() - 1
        );
        for (i, s) in cores.iter().enumerate() {
            assert_eq!(label(s, "cpu"), Some(i.to_string().as_str()));
            assert!((0.0..=100.0).contains(&s.value), "{s:?}");
        }
    }

    #[test]
    fn memory_load_network_and_disks_are_reported() {
        let (_, first, second) = two_scrapes(all());
        for samples in [&first, &second] {
            let total = value(samples, "host_memory_total_bytes");
            assert!(total > 0.0);
            assert!(value(samples, "host_memory_used_bytes") <= total);
            assert!(value(samples, "host_memory_available_bytes") <= total);
            assert!(
                value(samples, "host_swap_used_bytes") <= value(samples, "host_swap_total_bytes")
            );
            let load = named(samples, LOAD.0);
            let periods: Vec<_> = load.iter().map(|s| label(s, "period").unwrap()).collect();
            assert_eq!(periods, LOAD_PERIODS);
            assert!(load.iter().all(|s| s.value >= 0.0));
            assert!(samples.iter().all(|s| s.value.is_finite()));
        }
        // Loopback is there when not skipped, with all six counters.
        let lo = second
            .iter()
            .filter(|s| label(s, "interface") == Some("lo"));
        assert_eq!(lo.count(), NETWORK.len());
        let available = named(&second, "host_disk_available_bytes");
        let totals = named(&second, "host_disk_total_bytes");
        assert_eq!(available.len(), totals.len());
        for (a, t) in available.iter().zip(totals) {
            assert_eq!(a.series.labels, t.series.labels);
            assert!(t.value > 0.0 && a.value <= t.value, "{a:?} {t:?}");
        }
    }

    #[test]
    fn counters_never_decrease_and_series_are_reused() {
        let (mut source, first, second) = two_scrapes(all());
        let third = scrape(&mut source, 1_500);
        for (a, b) in [(&first, &second), (&second, &third)] {
            let before: HashMap<&Series, &Sample> = a.iter().map(|s| (&*s.series, s)).collect();
            for s in b.iter() {
                let Some(old) = before.get(&*s.series) else {
                    // Only CPU (absent from the first scrape) and interfaces
                    // or file systems that just appeared are new.
                    assert!(
                        is_any(s, &["host_cpu", "host_network", "host_disk"]),
                        "{s:?}"
                    );
                    continue;
                };
                assert!(Arc::ptr_eq(&old.series, &s.series), "{:?}", s.series);
                if s.series.kind == Kind::Counter {
                    assert!(s.value >= old.value, "{old:?} then {s:?}");
                }
            }
        }
        assert!(third.iter().any(|s| s.series.kind == Kind::Counter));
    }

    #[test]
    fn samples_round_trip_through_a_batch() {
        let (_, first, second) = two_scrapes(all());
        let samples: Vec<Sample> = first.into_iter().chain(second).collect();
        let mut builder = BatchBuilder::new();
        for s in &samples {
            builder.add(s).unwrap();
        }
        let decoded = decode(&builder.finish()).unwrap();
        let back: Vec<Sample> = decoded.samples().collect();
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!(*a.series, *b.series);
            assert_eq!(a.time_unix_ms, b.time_unix_ms);
            assert_eq!(a.value.to_bits(), b.value.to_bits(), "{a:?}");
        }
    }

    #[test]
    fn skipped_interfaces_and_disabled_groups_report_nothing() {
        let config = HostConfig {
            cpu: false,
            disk: false,
            ..HostConfig::default()
        };
        let samples = scrape(&mut HostSource::new(config).unwrap(), 0);
        assert!(samples.iter().all(|s| label(s, "interface") != Some("lo")));
        assert!(
            !samples
                .iter()
                .any(|s| is_any(s, &["host_cpu", "host_disk"]))
        );
        let patterns = ["lo".to_string(), "veth*".to_string()];
        assert!(skipped(&patterns, "lo") && skipped(&patterns, "veth12ab"));
        assert!(!skipped(&patterns, "lo0") && !skipped(&patterns, "eth0"));
        assert!(!skipped(&patterns, "docker0"));
    }

    #[test]
    fn networks_and_disks_can_be_refreshed_every_nth_scrape() {
        let config = HostConfig {
            cpu: false,
            network_every: NonZeroU32::new(2).unwrap(),
            disk_every: NonZeroU32::new(3).unwrap(),
            ..all()
        };
        let mut source = HostSource::new(config).unwrap();
        let has = |samples: &[Sample], prefix| samples.iter().any(|s| is_any(s, &[prefix]));
        let mut seen = Vec::new();
        for i in 0..6 {
            let samples = scrape(&mut source, i);
            assert!(has(&samples, "host_memory"));
            seen.push((has(&samples, "host_network"), has(&samples, "host_disk")));
        }
        let network: Vec<bool> = seen.iter().map(|s| s.0).collect();
        assert_eq!(network, [true, false, true, false, true, false]);
        // File systems may be absent from a sandbox; when present, every third.
        if seen[0].1 {
            let disk: Vec<bool> = seen.iter().map(|s| s.1).collect();
            assert_eq!(disk, [true, false, false, true, false, false]);
        }
    }

    /// A source reading through a host root of `/`: what a container
    /// with the host's `/` mounted at its root would read.
    fn through_root(config: HostConfig) -> HostSource {
        HostSource::new(HostConfig {
            root: Some(PathBuf::from("/")),
            ..config
        })
        .unwrap()
    }

    /// The labels and value of each sample named `name`, sorted.
    fn by_labels(samples: &[Sample], name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        let mut v: Vec<_> = named(samples, name)
            .into_iter()
            .map(|s| (s.series.labels.clone(), s.value))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_host_root_of_slash_reads_the_file_systems_the_host_path_reads() {
        let config = HostConfig {
            cpu: false,
            network: false,
            ..all()
        };
        let native = scrape(&mut HostSource::new(config.clone()).unwrap(), 0);
        let rooted = scrape(&mut through_root(config), 0);
        for name in ["host_disk_total_bytes", "host_disk_read_bytes_total"] {
            let a: Vec<_> = by_labels(&native, name).into_iter().map(|s| s.0).collect();
            let b: Vec<_> = by_labels(&rooted, name).into_iter().map(|s| s.0).collect();
            assert_eq!(a, b, "{name}");
        }
        let totals = |samples| -> Vec<f64> {
            let v = by_labels(samples, "host_disk_total_bytes");
            v.into_iter().map(|s| s.1).collect()
        };
        assert_eq!(totals(&native), totals(&rooted));
        // The I/O counters come from the same kernel counters.
        for (a, b) in by_labels(&native, "host_disk_read_bytes_total")
            .iter()
            .zip(by_labels(&rooted, "host_disk_read_bytes_total"))
        {
            assert!(b.1 >= a.1, "{a:?} then {b:?}");
        }
    }

    #[test]
    fn a_host_root_reads_the_interfaces_of_the_hosts_init() {
        let Ok(text) = std::fs::read_to_string("/proc/1/net/dev") else {
            return; // A /proc with hidepid: the source falls back, as tested above.
        };
        let config = HostConfig {
            cpu: false,
            disk: false,
            ..all()
        };
        let samples = scrape(&mut through_root(config), 0);
        let mut reported: Vec<&str> = named(&samples, "host_network_received_bytes_total")
            .iter()
            .map(|s| label(s, "interface").unwrap())
            .collect();
        reported.sort();
        let mut listed: Vec<&str> = net_dev(&text).map(|(name, _)| name).collect();
        listed.sort();
        assert_eq!(reported, listed);
        assert!(reported.contains(&"lo"), "{reported:?}");
    }

    #[test]
    fn net_dev_counters_are_read_in_metric_order() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 84523393   32807    0    0    0     0          0         0 84523393   32807    0    0    0     0       0          0
  eth0:226667166    6175    3    0    0     0          0         0  1234567    4321    7    0    0     0       0          0
docker0: bad
";
        let parsed: Vec<_> = net_dev(text).collect();
        assert_eq!(
            parsed,
            [
                ("lo", [84523393, 84523393, 32807, 32807, 0, 0]),
                ("eth0", [226667166, 1234567, 6175, 4321, 3, 7]),
            ]
        );
    }

    #[test]
    fn host_mount_points_drop_the_root_and_the_pseudo_places() {
        let root = Path::new("/host");
        let host = |m: &str| host_mount_point(root, Path::new(m));
        assert_eq!(host("/host").as_deref(), Some("/"));
        assert_eq!(host("/host/boot/efi").as_deref(), Some("/boot/efi"));
        assert_eq!(
            host("/host/run/media/usb").as_deref(),
            Some("/run/media/usb")
        );
        for outside in ["/", "/etc/hostname", "/hostname", "/var/lib/uplink"] {
            assert_eq!(host(outside), None, "{outside}");
        }
        for pseudo in ["/host/proc", "/host/sys/fs/cgroup", "/host/run/user/1000"] {
            assert_eq!(host(pseudo), None, "{pseudo}");
        }
    }

    #[test]
    fn disk_stats_are_found_by_device_number_and_by_name() {
        let stats = DiskStats::parse(
            "\
 254       0 vda 1 2 100 4 5 6 300 8 9 10 11
 253       3 dm-3 1 2 10 4 5 6 20 8 9 10 11
 259  1048576 nvme9n1 1 2 7 4 5 6 9 8
garbage
",
        );
        // st_dev of 254:0, 253:3 and 259:1048576 as Linux encodes them.
        assert_eq!(stats.by_number(254 << 8), Some((100 * 512, 300 * 512)));
        assert_eq!(stats.by_number((253 << 8) | 3), Some((10 * 512, 20 * 512)));
        let big_minor = (259 << 8) | ((1_048_576 & !0xff) << 12);
        assert_eq!(stats.by_number(big_minor), Some((7 * 512, 9 * 512)));
        assert_eq!(stats.by_name("dm-3"), Some((10 * 512, 20 * 512)));
        assert_eq!(stats.by_name("sda"), None);
    }

    #[test]
    fn a_source_can_move_to_another_thread() {
        fn send<T: Send + 'static>() {}
        send::<HostSource>();
    }

    #[test]
    fn percentages_are_rounded_and_bounded() {
        assert_eq!(percent(12.345_678), 12.35);
        assert_eq!(percent(100.000_01), 100.0);
        assert_eq!(percent(-0.001), 0.0);
        assert!(percent(f32::NAN).is_nan());
    }

    /// Prints what a scrape costs here; run with `--nocapture` to see it.
    #[test]
    fn scrape_cost() {
        for group in ["all", "cpu", "load", "memory", "network", "disk"] {
            scrape_cost_of(group, None);
        }
        // Through a host root, as an agent in a container reads.
        for group in ["network", "disk"] {
            scrape_cost_of(group, Some(PathBuf::from("/")));
        }
    }

    fn scrape_cost_of(group: &str, root: Option<PathBuf>) {
        const ROUNDS: u32 = 20;
        let mut c = HostConfig {
            root: root.clone(),
            ..all()
        };
        let groups = [
            &mut c.cpu,
            &mut c.load,
            &mut c.memory,
            &mut c.network,
            &mut c.disk,
        ];
        for (on, name) in groups
            .into_iter()
            .zip(["cpu", "load", "memory", "network", "disk"])
        {
            *on = group == "all" || group == name;
        }
        let mut source = HostSource::new(c).unwrap();
        let mut out = Vec::new();
        // CPU is read only 200 ms apart: only the first scrape reads it.
        sleep(MINIMUM_CPU_UPDATE_INTERVAL);
        let started = Instant::now();
        source.scrape(0, &mut out);
        let first = started.elapsed();
        let started = Instant::now();
        for i in 1..=ROUNDS {
            source.scrape(i64::from(i), &mut out);
        }
        let rest = started.elapsed() / ROUNDS;
        let n = out.len();
        let via = if root.is_some() { " (root /)" } else { "" };
        println!("host scrape {group:>8}{via}: first {first:?}, then {rest:?} each ({n} samples)");
    }
}
