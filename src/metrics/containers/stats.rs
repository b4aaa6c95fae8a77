//! From one stats reading to samples: the metric definitions, the series
//! a container's identity (name, image, run) labels, and the arithmetic
//! the module doc of `containers` describes (memory less inactive cache,
//! CPU limits, sums over interfaces and devices). Pure: no I/O, no clock.

use std::sync::Arc;

use bollard::models::{
    ContainerInspectResponse, ContainerMemoryStats, ContainerStatsResponse, ContainerSummary,
};

use crate::labels::LABEL_RUN;
use crate::metrics::sample::{Kind, Out, Series};

use super::ContainerConfig;

/// A metric's name, kind and unit.
type Def = (&'static str, Kind, &'static str);

/// Usage, then limit.
pub(super) const CPU: [Def; 2] = [
    counter("container_cpu_usage_seconds_total", "seconds"),
    gauge("container_cpu_limit_cores", "cores"),
];
/// Usage, then limit.
const MEMORY: [Def; 2] = [
    gauge("container_memory_usage_bytes", "bytes"),
    gauge("container_memory_limit_bytes", "bytes"),
];
const NETWORK: [Def; 4] = [
    counter("container_network_received_bytes_total", "bytes"),
    counter("container_network_transmitted_bytes_total", "bytes"),
    counter("container_network_received_packets_total", ""),
    counter("container_network_transmitted_packets_total", ""),
];
/// Read, then written.
const BLOCK: [Def; 2] = [
    counter("container_block_read_bytes_total", "bytes"),
    counter("container_block_written_bytes_total", "bytes"),
];
const PIDS: Def = gauge("container_pids", "");

pub(super) const fn gauge(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Gauge, unit)
}

pub(super) const fn counter(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Counter, unit)
}

/// What identifies a container in its samples' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    pub(super) container: String,
    pub(super) image: String,
    pub(super) run: String,
}

impl Identity {
    pub(super) fn of(summary: &ContainerSummary) -> Self {
        let name = summary.names.as_ref().and_then(|n| n.first());
        let run = summary.labels.as_ref().and_then(|l| l.get(LABEL_RUN));
        Identity {
            container: name.map_or("", |n| n.trim_start_matches('/')).to_string(),
            image: summary.image.clone().unwrap_or_default(),
            run: run.cloned().unwrap_or_default(),
        }
    }
}

/// A container's series, one per metric.
pub(super) struct SeriesSet {
    cpu: [Arc<Series>; 2],
    memory: [Arc<Series>; 2],
    network: [Arc<Series>; 4],
    block: [Arc<Series>; 2],
    pids: Arc<Series>,
}

impl SeriesSet {
    pub(super) fn new(identity: &Identity) -> Self {
        let labels = [
            ("container", identity.container.as_str()),
            ("image", identity.image.as_str()),
            ("run", identity.run.as_str()),
        ];
        let s = |d| series(d, &labels);
        SeriesSet {
            cpu: CPU.map(s),
            memory: MEMORY.map(s),
            network: NETWORK.map(s),
            block: BLOCK.map(s),
            pids: s(PIDS),
        }
    }
}

/// A container's CPU limit, as its host configuration sets it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum CpuLimit {
    /// `--cpus`, or the quota over the period.
    Cores(f64),
    /// No limit: the host's online CPUs, which each reading states.
    Host,
}

/// Whether a reading comes from a running container. The engine answers
/// for a container that stopped with a reading without memory usage or
/// system CPU time, every counter zero.
pub(super) fn is_running(stats: &ContainerStatsResponse) -> bool {
    let system = stats.cpu_stats.as_ref().and_then(|c| c.system_cpu_usage);
    let memory = stats.memory_stats.as_ref().and_then(|m| m.usage);
    system.is_some() || memory.is_some()
}

/// The CPU limit that an inspected container's host configuration sets.
pub(super) fn cpu_limit(inspected: &ContainerInspectResponse) -> CpuLimit {
    let host = inspected.host_config.as_ref();
    let nano = host.and_then(|h| h.nano_cpus).unwrap_or(0);
    let quota = host.and_then(|h| h.cpu_quota).unwrap_or(0);
    // The kernel's default period, which Docker uses when none is set.
    let period = host
        .and_then(|h| h.cpu_period)
        .filter(|&p| p > 0)
        .unwrap_or(100_000);
    if nano > 0 {
        CpuLimit::Cores(nano as f64 / 1e9)
    } else if quota > 0 {
        CpuLimit::Cores(quota as f64 / period as f64)
    } else {
        CpuLimit::Host
    }
}

/// Memory in use as `docker stats` shows it: usage less the inactive file
/// cache, which the kernel reclaims first.
fn memory_usage(memory: &ContainerMemoryStats) -> Option<u64> {
    let usage = memory.usage?;
    let stat = |key: &str| memory.stats.as_ref().and_then(|s| s.get(key)).copied();
    // cgroup v1 names the hierarchy's total; v2 has only `inactive_file`.
    for key in ["total_inactive_file", "inactive_file"] {
        if let Some(inactive) = stat(key)
            && inactive < usage
        {
            return Some(usage - inactive);
        }
    }
    Some(usage)
}

/// Appends the samples of one reading that `config` enables, with the
/// series of `set`. A field the engine left out gives no sample.
pub(super) fn push_samples(
    stats: &ContainerStatsResponse,
    cpu_limit: Option<CpuLimit>,
    config: &ContainerConfig,
    set: &SeriesSet,
    out: &mut Out<'_>,
) {
    if config.cpu {
        let cpu = stats.cpu_stats.as_ref();
        let usage = cpu.and_then(|c| c.cpu_usage.as_ref()?.total_usage);
        if let Some(ns) = usage {
            out.push(&set.cpu[0], ns as f64 / 1e9);
        }
        let limit = match cpu_limit {
            Some(CpuLimit::Cores(cores)) => Some(cores),
            Some(CpuLimit::Host) => cpu.and_then(|c| c.online_cpus).map(f64::from),
            None => None,
        };
        if let Some(cores) = limit {
            out.push(&set.cpu[1], cores);
        }
    }
    if config.memory
        && let Some(memory) = &stats.memory_stats
    {
        if let Some(usage) = memory_usage(memory) {
            out.push(&set.memory[0], usage as f64);
        }
        if let Some(limit) = memory.limit {
            out.push(&set.memory[1], limit as f64);
        }
    }
    if config.network
        && let Some(networks) = stats.networks.as_ref().filter(|n| !n.is_empty())
    {
        let mut sums = [0u64; 4];
        for n in networks.values() {
            let values = [n.rx_bytes, n.tx_bytes, n.rx_packets, n.tx_packets];
            for (sum, v) in sums.iter_mut().zip(values) {
                *sum = sum.saturating_add(v.unwrap_or(0));
            }
        }
        for (s, v) in set.network.iter().zip(sums) {
            out.push(s, v as f64);
        }
    }
    if config.block_io {
        let entries = stats.blkio_stats.as_ref();
        let entries = entries.and_then(|b| b.io_service_bytes_recursive.as_deref());
        // cgroup v1 spells the operations `Read` and `Write`, v2 `read`
        // and `write`.
        let mut sums: [Option<u64>; 2] = [None, None];
        for e in entries.unwrap_or_default() {
            let op = e.op.as_deref().unwrap_or_default();
            let slot = if op.eq_ignore_ascii_case("read") {
                &mut sums[0]
            } else if op.eq_ignore_ascii_case("write") {
                &mut sums[1]
            } else {
                continue;
            };
            *slot = Some(slot.unwrap_or(0).saturating_add(e.value.unwrap_or(0)));
        }
        for (s, v) in set.block.iter().zip(sums) {
            if let Some(v) = v {
                out.push(s, v as f64);
            }
        }
    }
    if config.pids
        && let Some(current) = stats.pids_stats.as_ref().and_then(|p| p.current)
    {
        out.push(&set.pids, current as f64);
    }
}

/// A new shared series of `def` with the non-empty ones of `labels`.
pub(super) fn series((name, kind, unit): Def, labels: &[(&str, &str)]) -> Arc<Series> {
    let mut s = Series::new(name, kind).unit(unit);
    for &(n, v) in labels {
        if !v.is_empty() {
            s = s.label(n, v);
        }
    }
    Arc::new(s)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::metrics::encode::{BatchBuilder, decode};
    use crate::metrics::sample::Sample;
    use std::collections::HashMap;

    /// `GET /containers/<id>/stats?stream=false&one-shot=true` from Docker
    /// 20.10 (API 1.41, cgroup v1) for a busybox busy loop started with
    /// `--cpus 0.5 -m 64m`, after two seconds. Block I/O is empty: the
    /// engine runs on `fuse-overlayfs`.
    pub(crate) const CGROUP_V1: &str = r#"{"read":"2026-11-29T10:47:44.731878803Z","preread":"0001-01-01T00:00:00Z","pids_stats":{"current":1},"blkio_stats":{"io_service_bytes_recursive":[],"io_serviced_recursive":[],"io_queue_recursive":[],"io_service_time_recursive":[],"io_wait_time_recursive":[],"io_merged_recursive":[],"io_time_recursive":[],"sectors_recursive":[]},"num_procs":0,"storage_stats":{},"cpu_stats":{"cpu_usage":{"total_usage":1060723056,"percpu_usage":[22728560,1037994496],"usage_in_kernelmode":0,"usage_in_usermode":1050000000},"system_cpu_usage":5278730000000,"online_cpus":2,"throttling_data":{"periods":22,"throttled_periods":20,"throttled_time":990602919}},"precpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"memory_stats":{"usage":2125824,"max_usage":4079616,"stats":{"active_anon":4096,"active_file":0,"cache":1605632,"dirty":0,"hierarchical_memory_limit":67108864,"hierarchical_memsw_limit":134217728,"inactive_anon":49152,"inactive_file":1503232,"mapped_file":1347584,"pgfault":1169,"pgmajfault":24,"pgpgin":1230,"pgpgout":823,"rss":61440,"rss_huge":0,"total_active_anon":4096,"total_active_file":0,"total_cache":1605632,"total_dirty":0,"total_inactive_anon":49152,"total_inactive_file":1503232,"total_mapped_file":1347584,"total_pgfault":1169,"total_pgmajfault":24,"total_pgpgin":1230,"total_pgpgout":823,"total_rss":61440,"total_rss_huge":0,"total_unevictable":0,"total_writeback":0,"unevictable":0,"writeback":0},"limit":67108864},"name":"/cranky_leakey","id":"e919972e075184f0e09ec33aeb25de1497e2f2eacaac4c116132cfa979afb2ac","networks":{"eth0":{"rx_bytes":736,"rx_packets":8,"rx_errors":0,"rx_dropped":0,"tx_bytes":0,"tx_packets":0,"tx_errors":0,"tx_dropped":0}}}"#;

    /// The same engine's answer for that container once it had stopped.
    pub(crate) const STOPPED: &str = r#"{"read":"0001-01-01T00:00:00Z","preread":"0001-01-01T00:00:00Z","pids_stats":{},"blkio_stats":{"io_service_bytes_recursive":null,"io_serviced_recursive":null,"io_queue_recursive":null,"io_service_time_recursive":null,"io_wait_time_recursive":null,"io_merged_recursive":null,"io_time_recursive":null,"sectors_recursive":null},"num_procs":0,"storage_stats":{},"cpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"precpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"memory_stats":{},"name":"/cranky_leakey","id":"e919972e075184f0e09ec33aeb25de1497e2f2eacaac4c116132cfa979afb2ac"}"#;

    /// A reading in the engine's cgroup v2 format (no per-CPU usage, v2
    /// `memory.stat` keys, lower-case block I/O operations, a pids limit),
    /// for a container on two networks with two block devices.
    const CGROUP_V2: &str = r#"{"read":"2026-11-29T10:50:00.000000001Z","preread":"0001-01-01T00:00:00Z",
        "pids_stats":{"current":3,"limit":4915},
        "blkio_stats":{"io_service_bytes_recursive":[
            {"major":8,"minor":0,"op":"read","value":4096},
            {"major":8,"minor":0,"op":"write","value":8192},
            {"major":8,"minor":16,"op":"read","value":1000},
            {"major":8,"minor":16,"op":"write","value":0}],
            "io_serviced_recursive":null,"io_queue_recursive":null,"io_service_time_recursive":null,
            "io_wait_time_recursive":null,"io_merged_recursive":null,"io_time_recursive":null,"sectors_recursive":null},
        "num_procs":0,"storage_stats":{},
        "cpu_stats":{"cpu_usage":{"total_usage":2500000000,"usage_in_kernelmode":500000000,"usage_in_usermode":2000000000},
            "system_cpu_usage":9000000000000,"online_cpus":4,
            "throttling_data":{"periods":10,"throttled_periods":2,"throttled_time":3000000}},
        "precpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},
            "throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},
        "memory_stats":{"usage":10485760,"stats":{"anon":4194304,"file":6291456,"active_file":4194304,
            "inactive_file":2097152,"kernel":131072,"shmem":0,"pgfault":900,"pgmajfault":1},"limit":67108864},
        "name":"/web-1","id":"aa11",
        "networks":{"eth0":{"rx_bytes":1000,"rx_packets":10,"rx_errors":0,"rx_dropped":0,"tx_bytes":2000,"tx_packets":20,"tx_errors":0,"tx_dropped":0},
                    "eth1":{"rx_bytes":5,"rx_packets":1,"rx_errors":0,"rx_dropped":0,"tx_bytes":7,"tx_packets":2,"tx_errors":0,"tx_dropped":0}}}"#;

    const MIB: f64 = 1024.0 * 1024.0;

    fn parse(json: &str) -> ContainerStatsResponse {
        serde_json::from_str(json).unwrap()
    }

    fn identity(container: &str, run: &str) -> Identity {
        Identity {
            container: container.into(),
            image: "uplink-test/busybox:1".into(),
            run: run.into(),
        }
    }

    /// The samples of one reading, stamped 1000.
    fn samples_of(
        stats: &ContainerStatsResponse,
        limit: Option<CpuLimit>,
        config: &ContainerConfig,
    ) -> Vec<Sample> {
        let set = SeriesSet::new(&identity("web-1", "r1"));
        let mut out = Vec::new();
        push_samples(stats, limit, config, &set, &mut Out(&mut out, 1_000));
        out
    }

    /// The value of each metric, by name; each name once.
    fn values(samples: &[Sample]) -> HashMap<&str, f64> {
        let mut by_name = HashMap::new();
        for s in samples {
            let old = by_name.insert(s.series.name.as_str(), s.value);
            assert!(old.is_none(), "{} twice", s.series.name);
        }
        by_name
    }

    fn names(samples: &[Sample]) -> Vec<&str> {
        samples.iter().map(|s| s.series.name.as_str()).collect()
    }

    pub(crate) fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
        let mut labels = s.series.labels.iter();
        labels.find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_cgroup_v1_reading_gives_every_metric_it_holds() {
        let config = ContainerConfig::default();
        let samples = samples_of(&parse(CGROUP_V1), Some(CpuLimit::Cores(0.5)), &config);
        let v = values(&samples);
        assert_eq!(v["container_cpu_usage_seconds_total"], 1.060_723_056);
        assert_eq!(v["container_cpu_limit_cores"], 0.5);
        // usage 2125824 less total_inactive_file 1503232.
        assert_eq!(v["container_memory_usage_bytes"], 622_592.0);
        assert_eq!(v["container_memory_limit_bytes"], 64.0 * MIB);
        assert_eq!(v["container_network_received_bytes_total"], 736.0);
        assert_eq!(v["container_network_received_packets_total"], 8.0);
        assert_eq!(v["container_network_transmitted_bytes_total"], 0.0);
        assert_eq!(v["container_network_transmitted_packets_total"], 0.0);
        assert_eq!(v["container_pids"], 1.0);
        // The engine listed no block I/O: no counters stuck at 0.
        assert_eq!(v.len(), 9, "{:?}", names(&samples));
        for s in &samples {
            assert_eq!(s.time_unix_ms, 1_000);
            let kind = if s.series.name.ends_with("_total") {
                Kind::Counter
            } else {
                Kind::Gauge
            };
            assert_eq!(s.series.kind, kind, "{:?}", s.series);
            let unit = ["seconds", "cores", "bytes"]
                .into_iter()
                .find(|u| s.series.name.contains(&format!("_{u}")))
                .unwrap_or("");
            assert_eq!(s.series.unit, unit, "{:?}", s.series);
        }
    }

    #[test]
    fn a_cgroup_v2_reading_sums_interfaces_and_devices() {
        let config = ContainerConfig::default();
        let samples = samples_of(&parse(CGROUP_V2), Some(CpuLimit::Host), &config);
        let v = values(&samples);
        assert_eq!(v["container_cpu_usage_seconds_total"], 2.5);
        // No limit of its own: the host's online CPUs.
        assert_eq!(v["container_cpu_limit_cores"], 4.0);
        // usage 10 MiB less inactive_file 2 MiB.
        assert_eq!(v["container_memory_usage_bytes"], 8.0 * MIB);
        assert_eq!(v["container_memory_limit_bytes"], 64.0 * MIB);
        assert_eq!(v["container_network_received_bytes_total"], 1_005.0);
        assert_eq!(v["container_network_transmitted_bytes_total"], 2_007.0);
        assert_eq!(v["container_network_received_packets_total"], 11.0);
        assert_eq!(v["container_network_transmitted_packets_total"], 22.0);
        assert_eq!(v["container_block_read_bytes_total"], 5_096.0);
        assert_eq!(v["container_block_written_bytes_total"], 8_192.0);
        assert_eq!(v["container_pids"], 3.0);
        assert_eq!(v.len(), 11);
    }

    #[test]
    fn missing_fields_give_no_samples() {
        let all = ContainerConfig::default();
        let limits = [None, Some(CpuLimit::Host), Some(CpuLimit::Cores(1.0))];
        let empty = parse("{}");
        assert!(samples_of(&empty, None, &all).is_empty());
        assert!(samples_of(&empty, Some(CpuLimit::Host), &all).is_empty());
        assert_eq!(
            names(&samples_of(&empty, Some(CpuLimit::Cores(1.0)), &all)),
            ["container_cpu_limit_cores"]
        );

        // CPU usage without online CPUs; the limit only once known.
        let cpu = parse(r#"{"cpu_stats":{"cpu_usage":{"total_usage":7}}}"#);
        let counts: Vec<usize> = limits
            .iter()
            .map(|&l| samples_of(&cpu, l, &all).len())
            .collect();
        assert_eq!(counts, [1, 1, 2]);
        assert_eq!(samples_of(&cpu, None, &all)[0].value, 7e-9);

        // Memory without `stats` is the raw usage; so is memory whose
        // inactive cache is not below the usage.
        let memory = |json: &str| -> HashMap<String, f64> {
            let samples = samples_of(&parse(json), None, &all);
            let v = values(&samples);
            v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        };
        let raw = memory(r#"{"memory_stats":{"usage":4096}}"#);
        assert_eq!(raw["container_memory_usage_bytes"], 4096.0);
        assert!(!raw.contains_key("container_memory_limit_bytes"));
        let v1 = memory(
            r#"{"memory_stats":{"usage":4096,"limit":8192,"stats":{"total_inactive_file":5000,"inactive_file":96}}}"#,
        );
        // v1's total is too large: the v2 key is tried next, as `docker stats` does.
        assert_eq!(v1["container_memory_usage_bytes"], 4000.0);
        assert_eq!(v1["container_memory_limit_bytes"], 8192.0);
        let over = memory(r#"{"memory_stats":{"usage":4096,"stats":{"inactive_file":4096}}}"#);
        assert_eq!(over["container_memory_usage_bytes"], 4096.0);

        // No interfaces, or interfaces without counters.
        let none = parse(r#"{"networks":{}}"#);
        assert!(samples_of(&none, None, &all).is_empty());
        let bare = parse(r#"{"networks":{"eth0":{}}}"#);
        let bare = samples_of(&bare, None, &all);
        assert_eq!(bare.len(), 4);
        assert!(bare.iter().all(|s| s.value == 0.0));

        // Only the operations listed, in either spelling; others ignored.
        let block = parse(
            r#"{"blkio_stats":{"io_service_bytes_recursive":[
                {"op":"Read","value":10},{"op":"Sync","value":99},{"op":"READ"},{"op":"Total","value":10}]}}"#,
        );
        let block = samples_of(&block, None, &all);
        assert_eq!(names(&block), ["container_block_read_bytes_total"]);
        assert_eq!(block[0].value, 10.0);
        let null = parse(r#"{"blkio_stats":{"io_service_bytes_recursive":null},"pids_stats":{}}"#);
        assert!(samples_of(&null, None, &all).is_empty());
    }

    #[test]
    fn disabled_groups_report_nothing() {
        let stats = parse(CGROUP_V2);
        let limit = Some(CpuLimit::Cores(2.0));
        let only = |f: fn(&mut ContainerConfig)| {
            let mut c = ContainerConfig {
                cpu: false,
                memory: false,
                network: false,
                block_io: false,
                pids: false,
                ..ContainerConfig::default()
            };
            f(&mut c);
            let samples = samples_of(&stats, limit, &c);
            let mut prefixes: Vec<String> = samples
                .iter()
                .map(|s| {
                    s.series
                        .name
                        .split('_')
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("_")
                })
                .collect();
            prefixes.dedup();
            prefixes
        };
        assert!(only(|_| {}).is_empty());
        assert_eq!(only(|c| c.cpu = true), ["container_cpu"]);
        assert_eq!(only(|c| c.memory = true), ["container_memory"]);
        assert_eq!(only(|c| c.network = true), ["container_network"]);
        assert_eq!(only(|c| c.block_io = true), ["container_block"]);
        assert_eq!(only(|c| c.pids = true), ["container_pids"]);
    }

    #[test]
    fn values_that_are_not_finite_are_left_out() {
        let set = SeriesSet::new(&identity("a", ""));
        let mut samples = Vec::new();
        let mut out = Out(&mut samples, 5);
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.5] {
            out.push(&set.pids, v);
        }
        let stats = parse(r#"{"cpu_stats":{"cpu_usage":{"total_usage":1}}}"#);
        let config = ContainerConfig::default();
        push_samples(
            &stats,
            Some(CpuLimit::Cores(f64::NAN)),
            &config,
            &set,
            &mut out,
        );
        assert_eq!(samples.len(), 2, "{samples:?}");
        assert_eq!(samples[0].value, 1.5);
        assert_eq!(samples[1].value, 1e-9);
    }

    #[test]
    fn a_stopped_container_reads_as_not_running() {
        assert!(is_running(&parse(CGROUP_V1)));
        assert!(is_running(&parse(CGROUP_V2)));
        assert!(!is_running(&parse(STOPPED)));
        assert!(!is_running(&parse("{}")));
    }

    #[test]
    fn cpu_limits_come_from_nano_cpus_or_the_quota() {
        let limit = |json: &str| cpu_limit(&serde_json::from_str(json).unwrap());
        assert_eq!(
            limit(r#"{"HostConfig":{"NanoCpus":500000000,"CpuQuota":0,"CpuPeriod":0}}"#),
            CpuLimit::Cores(0.5)
        );
        assert_eq!(
            limit(r#"{"HostConfig":{"CpuQuota":150000,"CpuPeriod":100000}}"#),
            CpuLimit::Cores(1.5)
        );
        assert_eq!(
            limit(r#"{"HostConfig":{"CpuQuota":25000}}"#),
            CpuLimit::Cores(0.25)
        );
        assert_eq!(
            limit(r#"{"HostConfig":{"NanoCpus":0,"CpuQuota":-1}}"#),
            CpuLimit::Host
        );
        assert_eq!(limit("{}"), CpuLimit::Host);
    }

    #[test]
    fn labels_name_the_container_its_image_and_run() {
        let summary: ContainerSummary = serde_json::from_str(
            r#"{"Id":"e919","Names":["/cranky_leakey"],"Image":"uplink-test/busybox:1",
                "Labels":{"uplink.agent":"a1","uplink.run":"r1","other":"x"},"State":"running"}"#,
        )
        .unwrap();
        let id = Identity::of(&summary);
        assert_eq!(id, identity("cranky_leakey", "r1"));
        let set = SeriesSet::new(&id);
        let labels: Vec<(&str, &str)> = set.cpu[0]
            .labels
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("container", "cranky_leakey"),
                ("image", "uplink-test/busybox:1"),
                ("run", "r1")
            ]
        );
        // Without a run label, or anything else, the label is left out.
        let bare = Identity::of(&serde_json::from_str(r#"{"Id":"e919"}"#).unwrap());
        assert!(SeriesSet::new(&bare).pids.labels.is_empty());
        let no_run = SeriesSet::new(&identity("c", ""));
        let names: Vec<&str> = no_run.memory[0]
            .labels
            .iter()
            .map(|l| l.0.as_str())
            .collect();
        assert_eq!(names, ["container", "image"]);
    }

    #[test]
    fn samples_round_trip_through_a_batch() {
        let config = ContainerConfig::default();
        let mut samples = samples_of(&parse(CGROUP_V1), Some(CpuLimit::Cores(0.5)), &config);
        samples.extend(samples_of(&parse(CGROUP_V2), Some(CpuLimit::Host), &config));
        let mut builder = BatchBuilder::new();
        for s in &samples {
            builder.add(s).unwrap();
        }
        let batch = builder.finish();
        let back: Vec<Sample> = decode(&batch).unwrap().samples().collect();
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!(*a.series, *b.series);
            assert_eq!(a.value.to_bits(), b.value.to_bits(), "{a:?}");
        }
    }
}
