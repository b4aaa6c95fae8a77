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
    /// default also skips `overlay`, one per container (and the agent's own
    /// root when it runs in one), whose space is that of the disk beneath,
    /// and memory-backed or image file systems whose space says nothing
    /// about the host's disks.
    pub skip_file_systems: Vec<String>,
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
            skip_file_systems: ["overlay", "tmpfs", "ramfs", "squashfs", "nsfs"]
                .map(String::from)
                .into(),
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
        Ok(HostSource {
            system,
            networks: Networks::new()?,
            disks: Disks::new()?,
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
        self.networks.refresh(true);
        let mut known = std::mem::take(&mut self.interfaces);
        for (name, data) in &self.networks {
            let name = name.to_string_lossy();
            if skipped(&self.config.skip_interfaces, &name) {
                continue;
            }
            let set = known
                .remove(&*name)
                .unwrap_or_else(|| NETWORK.map(|d| series(d, &[("interface", &name)])));
            let values = [
                data.total_received(),
                data.total_transmitted(),
                data.total_packets_received(),
                data.total_packets_transmitted(),
                data.total_errors_on_received(),
                data.total_errors_on_transmitted(),
            ];
            for (s, v) in set.iter().zip(values) {
                out.push(s, v as f64);
            }
            self.interfaces.insert(name.into_owned(), set);
        }
    }

    fn scrape_disks(&mut self, out: &mut Out<'_>) {
        let kind = DiskRefreshKind::nothing().with_storage().with_io_usage();
        self.disks.refresh_specifics(true, kind);
        let mut known = std::mem::take(&mut self.file_systems);
        let mut devices = HashSet::new();
        for disk in self.disks.iter() {
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
                disk.mount_point().to_string_lossy().into_owned(),
            );
            let set = known.remove(&key).unwrap_or_else(|| {
                let labels = [("device", key.0.as_str()), ("mount", key.1.as_str())];
                DISK.map(|d| series(d, &labels))
            });
            out.push(&set[0], disk.total_space() as f64);
            out.push(&set[1], disk.available_space() as f64);
            // Devices without block statistics (NFS, say) read as 0.
            let io = disk.usage();
            if io.total_read_bytes > 0 || io.total_written_bytes > 0 {
                out.push(&set[2], io.total_read_bytes as f64);
                out.push(&set[3], io.total_written_bytes as f64);
            }
            self.file_systems.insert(key, set);
        }
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
        const ROUNDS: u32 = 20;
        for group in ["all", "cpu", "load", "memory", "network", "disk"] {
            let mut c = all();
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
            println!("host scrape {group:>8}: first {first:?}, then {rest:?} each ({n} samples)");
        }
    }
}
