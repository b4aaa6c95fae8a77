//! The agent's container metrics: CPU, memory, network, block I/O and
//! process counts of the containers this agent runs, read from the Docker
//! engine by a [`ContainerSource`] that the agent calls on its own
//! schedule. A scrape appends [`Sample`]s stamped with the time it is
//! given; batching and sending are other modules' concern.
//!
//! # Metrics
//!
//! Names follow `container_<noun>_<unit>`, with `_total` on counters. The
//! unit field is `seconds`, `cores` or `bytes` where the name says so, and
//! empty for plain numbers (packets, processes).
//!
//! | name | kind | from the engine's stats |
//! |---|---|---|
//! | `container_cpu_usage_seconds_total` | counter | `cpu_stats.cpu_usage.total_usage` (ns) |
//! | `container_cpu_limit_cores` | gauge | the container's `NanoCpus` or CPU quota |
//! | `container_memory_usage_bytes` | gauge | `memory_stats.usage` less inactive page cache |
//! | `container_memory_limit_bytes` | gauge | `memory_stats.limit` |
//! | `container_network_received_bytes_total` | counter | `networks.*.rx_bytes` |
//! | `container_network_transmitted_bytes_total` | counter | `networks.*.tx_bytes` |
//! | `container_network_received_packets_total` | counter | `networks.*.rx_packets` |
//! | `container_network_transmitted_packets_total` | counter | `networks.*.tx_packets` |
//! | `container_block_read_bytes_total` | counter | `blkio_stats.io_service_bytes_recursive`, op `Read` |
//! | `container_block_written_bytes_total` | counter | `blkio_stats.io_service_bytes_recursive`, op `Write` |
//! | `container_pids` | gauge | `pids_stats.current` |
//!
//! Every series carries the labels `container` (the container's name
//! without Docker's leading `/`), `image` (the image as the container was
//! created from it) and `run` (the container's `uplink.run` label, absent
//! when the container has none). A label whose value is empty is left out.
//!
//! Memory usage is computed as `docker stats` computes it: the cgroup's
//! usage less its inactive file cache (`total_inactive_file` on cgroup v1,
//! `inactive_file` on v2), the memory the kernel would reclaim before it
//! killed anything. The memory limit is what the engine reports: the
//! container's limit, or the host's memory when it has none. In the same
//! spirit the CPU limit is the container's `--cpus` (or `--cpu-quota`
//! divided by `--cpu-period`), or the host's online CPUs when it has none,
//! so that usage over limit is always a meaningful ratio.
//!
//! Network counters are summed over the container's interfaces: a container
//! almost always has one (`eth0`), and the name of an interface inside a
//! container says nothing the container's name does not, so one series per
//! counter and container is the smaller and equally useful choice. A
//! container without networking has no network samples. Block I/O counters
//! are summed over devices, and only reported when the engine lists read or
//! write entries: cgroup v2 with some storage drivers (and `fuse-overlayfs`)
//! lists none, and a missing counter is better than a counter stuck at 0.
//! Counters are the kernel's cumulative totals, so a receiver computes rates
//! from any two samples and sees a container restart as a drop.
//!
//! # Cost and timing
//!
//! A scrape lists this agent's running containers (one call, filtered by
//! the `uplink.agent` label as the executor's own listings are), then reads
//! each container's stats once, with `stream=false` and `one-shot=true`, so
//! that the engine answers from one reading instead of two. The engine
//! samples its containers once a second and answers a one-shot call with
//! the next sample (an idle engine at once), so a stats call mostly waits:
//! about a second per call on Docker 20.10, whatever the call costs, and
//! two seconds on engines before API 1.41, which ignore `one-shot`. At most
//! [`ContainerConfig::concurrency`] containers are read at once, each
//! within [`ContainerConfig::timeout`], so a scrape of `n` containers takes
//! about `ceil(n / concurrency)` seconds, and at most that many timeouts,
//! plus the list. The CPU limit needs an inspect call, made once per
//! container id (alongside its first stats call) and cached, so a limit
//! changed later with `docker update` is seen only by a new source.
//!
//! A container that stops or is removed between the list and its stats is
//! skipped, as is one whose stats time out or fail; each is counted in
//! [`ContainerCounters`] by reason and never fails the whole scrape. Only a
//! list that fails or times out does, with a [`ContainerError`].
//!
//! The source keeps one series per container id and metric, and forgets a
//! container as soon as a scrape no longer lists it or finds it gone; should
//! it come back, it gets new series. A renamed container gets new series
//! too, since its `container` label changed.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerMemoryStats, ContainerStatsResponse, ContainerSummary,
};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, StatsOptions};
use futures_util::StreamExt;

use crate::labels::{LABEL_AGENT, LABEL_RUN};
use crate::metrics::sample::{Kind, Sample, Series};

/// A metric's name, kind and unit.
type Def = (&'static str, Kind, &'static str);

/// Usage, then limit.
const CPU: [Def; 2] = [
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

const fn gauge(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Gauge, unit)
}

const fn counter(name: &'static str, unit: &'static str) -> Def {
    (name, Kind::Counter, unit)
}

/// Containers read at once by default. Each stats call waits for the
/// engine's next once-a-second sample, so this many containers are read
/// per second of scrape; more calls at once cost the engine little (it
/// serves them from the same sample), and the agent a connection each.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// How long one container's stats may take by default. An engine answers
/// a one-shot call within about a second (its sampling interval), and one
/// that ignores one-shot within about two, which still fits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most containers a scrape reads at once.
pub const MAX_CONCURRENCY: usize = 64;
/// The shortest timeout [`ContainerConfig::validate`] accepts: a one-shot
/// call may wait a second for the engine's next sample.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest timeout [`ContainerConfig::validate`] accepts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// What a [`ContainerSource`] reports and how it reads it.
/// [`ContainerConfig::default`] is the one place that sets the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Report CPU usage and limit.
    pub cpu: bool,
    /// Report memory usage and limit.
    pub memory: bool,
    /// Report network counters.
    pub network: bool,
    /// Report block I/O counters.
    pub block_io: bool,
    /// Report the number of processes.
    pub pids: bool,
    /// Containers whose stats are read at once (1 to [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// How long the list, and each container's stats, may take before the
    /// scrape gives up on it ([`MIN_TIMEOUT`] to [`MAX_TIMEOUT`]).
    pub timeout: Duration,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig {
            cpu: true,
            memory: true,
            network: true,
            block_io: true,
            pids: true,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl ContainerConfig {
    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            p.push(format!(
                "container metrics concurrency {} is not between 1 and {MAX_CONCURRENCY}",
                self.concurrency
            ));
        }
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&self.timeout) {
            p.push(format!(
                "container metrics timeout {:?} is not between {MIN_TIMEOUT:?} and {MAX_TIMEOUT:?}",
                self.timeout
            ));
        }
        p
    }
}

/// Why a scrape produced nothing: the containers could not be listed.
/// Problems with single containers are counted, not returned.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The engine refused or failed the list.
    #[error("docker: cannot list containers: {0}")]
    List(#[source] bollard::errors::Error),
    /// The engine did not answer the list in time.
    #[error("docker: listing containers took longer than {0:?}")]
    ListTimedOut(Duration),
}

/// What a [`ContainerSource`] did since it was created, for the agent's
/// self-metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerCounters {
    /// Scrapes started, failed ones included.
    pub scrapes: u64,
    /// Scrapes that failed because the containers could not be listed.
    pub failed_scrapes: u64,
    /// Containers whose stats were read and turned into samples, summed
    /// over scrapes.
    pub containers_scraped: u64,
    /// Containers skipped because they stopped or were removed between the
    /// list and their stats.
    pub skipped_gone: u64,
    /// Containers skipped because their stats took longer than the
    /// timeout.
    pub skipped_timed_out: u64,
    /// Containers skipped because the engine failed their stats call.
    pub skipped_failed: u64,
}

impl ContainerCounters {
    /// Containers skipped for any reason, summed over scrapes.
    pub fn skipped(&self) -> u64 {
        self.skipped_gone + self.skipped_timed_out + self.skipped_failed
    }
}

/// Reads the stats of this agent's running containers and turns them into
/// samples, keeping one series per container and metric across scrapes.
pub struct ContainerSource {
    docker: Docker,
    agent_id: String,
    config: ContainerConfig,
    /// By container id: containers read at least once and still listed.
    known: HashMap<String, Known>,
    counters: ContainerCounters,
}

/// What identifies a container in its samples' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    container: String,
    image: String,
    run: String,
}

impl Identity {
    fn of(summary: &ContainerSummary) -> Self {
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
struct SeriesSet {
    cpu: [Arc<Series>; 2],
    memory: [Arc<Series>; 2],
    network: [Arc<Series>; 4],
    block: [Arc<Series>; 2],
    pids: Arc<Series>,
}

impl SeriesSet {
    fn new(identity: &Identity) -> Self {
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
enum CpuLimit {
    /// `--cpus`, or the quota over the period.
    Cores(f64),
    /// No limit: the host's online CPUs, which each reading states.
    Host,
}

/// What the source remembers about a container between scrapes.
struct Known {
    identity: Identity,
    series: SeriesSet,
    /// None until an inspect call answered.
    cpu_limit: Option<CpuLimit>,
}

impl Known {
    fn new(identity: Identity) -> Self {
        Known {
            series: SeriesSet::new(&identity),
            identity,
            cpu_limit: None,
        }
    }
}

/// One container's answers.
struct Reading {
    stats: ContainerStatsResponse,
    /// Present when an inspect call was made and answered.
    cpu_limit: Option<CpuLimit>,
}

/// Why a container was skipped.
#[derive(Debug)]
enum Skip {
    /// Stopped or removed since the list.
    Gone,
    /// No answer within the timeout.
    TimedOut,
    /// The engine failed the call.
    Failed(String),
}

impl From<bollard::errors::Error> for Skip {
    fn from(e: bollard::errors::Error) -> Self {
        match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            } => Skip::Gone,
            e => Skip::Failed(e.to_string()),
        }
    }
}

impl ContainerSource {
    /// A source for the containers labelled `uplink.agent=<agent_id>`,
    /// reading through `docker` (connected, e.g. by
    /// [`crate::agent::docker::connect`]) what `config` enables.
    pub fn new(docker: Docker, agent_id: &str, config: ContainerConfig) -> Self {
        ContainerSource {
            docker,
            agent_id: agent_id.to_string(),
            config,
            known: HashMap::new(),
            counters: ContainerCounters::default(),
        }
    }

    /// What the source did since it was created.
    pub fn counters(&self) -> ContainerCounters {
        self.counters
    }

    /// Containers whose series the source keeps: those read at least once
    /// and still running at the last scrape.
    pub fn containers(&self) -> usize {
        self.known.len()
    }

    /// Lists this agent's running containers, reads each one's stats and
    /// appends their samples to `out`, all stamped `now_unix_ms`. Values
    /// that are not finite are left out. A container that cannot be read
    /// is skipped and counted; only a failed list is an error, and then
    /// nothing is appended.
    pub async fn scrape(
        &mut self,
        now_unix_ms: i64,
        out: &mut Vec<Sample>,
    ) -> Result<(), ContainerError> {
        self.counters.scrapes += 1;
        let listed = match self.list().await {
            Ok(listed) => listed,
            Err(e) => {
                self.counters.failed_scrapes += 1;
                return Err(e);
            }
        };
        let running: HashSet<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        self.known.retain(|id, _| running.contains(id.as_str()));

        let readings = self.read_all(&listed).await;
        let mut out = Out(out, now_unix_ms);
        for ((id, identity), reading) in listed.into_iter().zip(readings) {
            let reading = match reading {
                Ok(reading) => reading,
                Err(Skip::Gone) => {
                    self.counters.skipped_gone += 1;
                    self.known.remove(&id);
                    continue;
                }
                Err(Skip::TimedOut) => {
                    self.counters.skipped_timed_out += 1;
                    let timeout = self.config.timeout;
                    tracing::debug!(container = %identity.container, ?timeout, "container stats timed out");
                    continue;
                }
                Err(Skip::Failed(error)) => {
                    self.counters.skipped_failed += 1;
                    tracing::debug!(container = %identity.container, %error, "container stats failed");
                    continue;
                }
            };
            let known = match self.known.entry(id) {
                Entry::Occupied(e) if e.get().identity == identity => e.into_mut(),
                Entry::Occupied(e) => {
                    // Renamed: new series; the limit is the container's.
                    let known = e.into_mut();
                    let cpu_limit = known.cpu_limit;
                    *known = Known::new(identity);
                    known.cpu_limit = cpu_limit;
                    known
                }
                Entry::Vacant(e) => e.insert(Known::new(identity)),
            };
            if reading.cpu_limit.is_some() {
                known.cpu_limit = reading.cpu_limit;
            }
            push_samples(
                &reading.stats,
                known.cpu_limit,
                &self.config,
                &known.series,
                &mut out,
            );
            self.counters.containers_scraped += 1;
        }
        Ok(())
    }

    /// This agent's running containers: id and labels, in the engine's
    /// order.
    async fn list(&self) -> Result<Vec<(String, Identity)>, ContainerError> {
        let options = ListContainersOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{LABEL_AGENT}={}", self.agent_id)],
            )])),
            ..Default::default()
        };
        let timeout = self.config.timeout;
        let list = tokio::time::timeout(timeout, self.docker.list_containers(Some(options)))
            .await
            .map_err(|_| ContainerError::ListTimedOut(timeout))?
            .map_err(ContainerError::List)?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let identity = Identity::of(&c);
                Some((c.id?, identity))
            })
            .collect())
    }

    /// Reads every listed container, at most `concurrency` at once, each
    /// within the timeout; the results are in the order of `listed`.
    async fn read_all(&self, listed: &[(String, Identity)]) -> Vec<Result<Reading, Skip>> {
        let timeout = self.config.timeout;
        // Each read owns what it uses: futures that borrow through a
        // closure's argument make the scrape's future not `Send`.
        let reads: Vec<_> = listed
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                let known = self.known.get(id);
                let inspect = self.config.cpu && known.is_none_or(|k| k.cpu_limit.is_none());
                let (docker, id) = (self.docker.clone(), id.clone());
                async move {
                    let read = tokio::time::timeout(timeout, read(&docker, &id, inspect)).await;
                    (i, read.unwrap_or(Err(Skip::TimedOut)))
                }
            })
            .collect();
        let concurrency = self.config.concurrency.max(1);
        let mut reads = futures_util::stream::iter(reads).buffer_unordered(concurrency);
        let mut results: Vec<Option<Result<Reading, Skip>>> = listed.iter().map(|_| None).collect();
        while let Some((i, result)) = reads.next().await {
            results[i] = Some(result);
        }
        // The stream ends when every read has ended, so none is missing.
        let missing = || Err(Skip::Failed("not read".into()));
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(missing))
            .collect()
    }
}

/// One container's stats, and its CPU limit when `inspect` asks for it. A
/// failed inspect leaves the limit unknown until a later scrape; the stats
/// decide whether the container is skipped.
async fn read(docker: &Docker, id: &str, inspect: bool) -> Result<Reading, Skip> {
    let options = StatsOptions {
        stream: false,
        one_shot: true,
    };
    let stats = async { docker.stats(id, Some(options)).next().await };
    let limit = async {
        if !inspect {
            return None;
        }
        let inspected = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await;
        inspected.ok().map(|i| cpu_limit(&i))
    };
    let (stats, cpu_limit) = tokio::join!(stats, limit);
    let stats = stats.ok_or_else(|| Skip::Failed("the engine sent no stats".into()))??;
    if !is_running(&stats) {
        return Err(Skip::Gone);
    }
    Ok(Reading { stats, cpu_limit })
}

/// Whether a reading comes from a running container. The engine answers
/// for a container that stopped with a reading without memory usage or
/// system CPU time, every counter zero.
fn is_running(stats: &ContainerStatsResponse) -> bool {
    let system = stats.cpu_stats.as_ref().and_then(|c| c.system_cpu_usage);
    let memory = stats.memory_stats.as_ref().and_then(|m| m.usage);
    system.is_some() || memory.is_some()
}

/// The CPU limit that an inspected container's host configuration sets.
fn cpu_limit(inspected: &ContainerInspectResponse) -> CpuLimit {
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
fn push_samples(
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

/// Where a scrape appends its samples, and the time it stamps on them.
struct Out<'a>(&'a mut Vec<Sample>, i64);

impl Out<'_> {
    /// Appends a sample of `series`, unless `value` is not finite.
    fn push(&mut self, series: &Arc<Series>, value: f64) {
        if value.is_finite() {
            self.0.push(Sample {
                series: series.clone(),
                time_unix_ms: self.1,
                value,
            });
        }
    }
}

/// A new shared series of `def` with the non-empty ones of `labels`.
fn series((name, kind, unit): Def, labels: &[(&str, &str)]) -> Arc<Series> {
    let mut s = Series::new(name, kind).unit(unit);
    for &(n, v) in labels {
        if !v.is_empty() {
            s = s.label(n, v);
        }
    }
    Arc::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::{BatchBuilder, decode};
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    /// `GET /containers/<id>/stats?stream=false&one-shot=true` from Docker
    /// 20.10 (API 1.41, cgroup v1) for a busybox busy loop started with
    /// `--cpus 0.5 -m 64m`, after two seconds. Block I/O is empty: the
    /// engine runs on `fuse-overlayfs`.
    const CGROUP_V1: &str = r#"{"read":"2026-11-29T10:47:44.731878803Z","preread":"0001-01-01T00:00:00Z","pids_stats":{"current":1},"blkio_stats":{"io_service_bytes_recursive":[],"io_serviced_recursive":[],"io_queue_recursive":[],"io_service_time_recursive":[],"io_wait_time_recursive":[],"io_merged_recursive":[],"io_time_recursive":[],"sectors_recursive":[]},"num_procs":0,"storage_stats":{},"cpu_stats":{"cpu_usage":{"total_usage":1060723056,"percpu_usage":[22728560,1037994496],"usage_in_kernelmode":0,"usage_in_usermode":1050000000},"system_cpu_usage":5278730000000,"online_cpus":2,"throttling_data":{"periods":22,"throttled_periods":20,"throttled_time":990602919}},"precpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"memory_stats":{"usage":2125824,"max_usage":4079616,"stats":{"active_anon":4096,"active_file":0,"cache":1605632,"dirty":0,"hierarchical_memory_limit":67108864,"hierarchical_memsw_limit":134217728,"inactive_anon":49152,"inactive_file":1503232,"mapped_file":1347584,"pgfault":1169,"pgmajfault":24,"pgpgin":1230,"pgpgout":823,"rss":61440,"rss_huge":0,"total_active_anon":4096,"total_active_file":0,"total_cache":1605632,"total_dirty":0,"total_inactive_anon":49152,"total_inactive_file":1503232,"total_mapped_file":1347584,"total_pgfault":1169,"total_pgmajfault":24,"total_pgpgin":1230,"total_pgpgout":823,"total_rss":61440,"total_rss_huge":0,"total_unevictable":0,"total_writeback":0,"unevictable":0,"writeback":0},"limit":67108864},"name":"/cranky_leakey","id":"e919972e075184f0e09ec33aeb25de1497e2f2eacaac4c116132cfa979afb2ac","networks":{"eth0":{"rx_bytes":736,"rx_packets":8,"rx_errors":0,"rx_dropped":0,"tx_bytes":0,"tx_packets":0,"tx_errors":0,"tx_dropped":0}}}"#;

    /// The same engine's answer for that container once it had stopped.
    const STOPPED: &str = r#"{"read":"0001-01-01T00:00:00Z","preread":"0001-01-01T00:00:00Z","pids_stats":{},"blkio_stats":{"io_service_bytes_recursive":null,"io_serviced_recursive":null,"io_queue_recursive":null,"io_service_time_recursive":null,"io_wait_time_recursive":null,"io_merged_recursive":null,"io_time_recursive":null,"sectors_recursive":null},"num_procs":0,"storage_stats":{},"cpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"precpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},"throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},"memory_stats":{},"name":"/cranky_leakey","id":"e919972e075184f0e09ec33aeb25de1497e2f2eacaac4c116132cfa979afb2ac"}"#;

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

    fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
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
    fn the_defaults_are_valid_and_bad_settings_are_all_reported() {
        let config = ContainerConfig::default();
        assert_eq!(config.concurrency, 8);
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert!(config.cpu && config.memory && config.network && config.block_io && config.pids);
        assert!(config.validate().is_empty());
        let bad = ContainerConfig {
            concurrency: 0,
            timeout: Duration::ZERO,
            ..config
        };
        let problems = bad.validate();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("concurrency 0"), "{problems:?}");
        assert!(problems[1].contains("timeout 0ns"), "{problems:?}");
        // Shorter than the engine's sampling interval allows.
        let short = ContainerConfig {
            timeout: Duration::from_secs(1),
            ..ContainerConfig::default()
        };
        assert_eq!(short.validate().len(), 1);
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

    /// How the fake engine answers a call.
    #[derive(Clone, Debug)]
    enum Reply {
        Json(String),
        Status(u16),
        /// Never answers.
        Hang,
    }

    #[derive(Clone, Debug)]
    struct FakeContainer {
        id: String,
        name: String,
        stats: Reply,
    }

    fn fake(id: &str, stats: Reply) -> FakeContainer {
        FakeContainer {
            id: id.into(),
            name: format!("c-{id}"),
            stats,
        }
    }

    fn running() -> Reply {
        Reply::Json(CGROUP_V1.into())
    }

    #[derive(Debug, Default)]
    struct FakeState {
        /// The answer to the list instead of `containers`, when set.
        list: Option<Reply>,
        containers: Vec<FakeContainer>,
        /// How long each stats call takes.
        stats_delay: Duration,
        stats_in_flight: usize,
        max_stats_in_flight: usize,
        inspects: HashMap<String, usize>,
        /// Request targets (path and query), in order of arrival.
        targets: Vec<String>,
    }

    /// A Docker engine on a Unix socket that answers the three calls a
    /// scrape makes (list, inspect, stats) as its state says.
    struct FakeEngine {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        state: Arc<Mutex<FakeState>>,
    }

    impl FakeEngine {
        async fn start(containers: Vec<FakeContainer>) -> FakeEngine {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("docker.sock");
            let listener = UnixListener::bind(&socket).unwrap();
            let state = Arc::new(Mutex::new(FakeState {
                containers,
                ..FakeState::default()
            }));
            let shared = state.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(serve(conn, shared.clone()));
                }
            });
            FakeEngine {
                _dir: dir,
                socket,
                state,
            }
        }

        fn docker(&self) -> Docker {
            let path = self.socket.to_str().unwrap();
            Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION).unwrap()
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().unwrap()
        }
    }

    async fn serve(conn: UnixStream, state: Arc<Mutex<FakeState>>) {
        let (read, mut write) = conn.into_split();
        let mut read = BufReader::new(read);
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let target = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            loop {
                let mut header = String::new();
                if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
            }
            let (code, body) = match answer(&state, &target).await {
                Reply::Json(body) => (200, body),
                Reply::Status(code) => (code, r#"{"message":"no such container"}"#.into()),
                Reply::Hang => std::future::pending().await,
            };
            let response = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if write.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn answer(state: &Mutex<FakeState>, target: &str) -> Reply {
        let (reply, delay) = route(&mut state.lock().unwrap(), target);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
            state.lock().unwrap().stats_in_flight -= 1;
        }
        reply
    }

    /// The reply to `target`, and for stats, how long to wait before it.
    fn route(s: &mut FakeState, target: &str) -> (Reply, Option<Duration>) {
        let path = target.split('?').next().unwrap_or_default();
        let call = path.split_once("/containers/").map_or("", |(_, c)| c);
        s.targets.push(target.to_string());
        if call == "json" {
            if let Some(reply) = &s.list {
                return (reply.clone(), None);
            }
            let list: Vec<String> = s
                .containers
                .iter()
                .map(|c| {
                    format!(
                        r#"{{"Id":"{}","Names":["/{}"],"Image":"img:1","Labels":{{"uplink.agent":"a1","uplink.run":"r1"}},"State":"running"}}"#,
                        c.id, c.name
                    )
                })
                .collect();
            return (Reply::Json(format!("[{}]", list.join(","))), None);
        }
        let found = call
            .split_once('/')
            .and_then(|(id, what)| Some((s.containers.iter().find(|c| c.id == id)?, what)));
        let Some((container, what)) = found else {
            return (Reply::Status(404), None);
        };
        let (id, stats) = (container.id.clone(), container.stats.clone());
        if what == "json" {
            *s.inspects.entry(id.clone()).or_default() += 1;
            let inspected = format!(r#"{{"Id":"{id}","HostConfig":{{"NanoCpus":500000000}}}}"#);
            return (Reply::Json(inspected), None);
        }
        s.stats_in_flight += 1;
        s.max_stats_in_flight = s.max_stats_in_flight.max(s.stats_in_flight);
        (stats, Some(s.stats_delay))
    }

    async fn scrape(source: &mut ContainerSource) -> Vec<Sample> {
        let mut out = Vec::new();
        source.scrape(1_000, &mut out).await.unwrap();
        out
    }

    /// The containers that samples are of, sorted, each once.
    fn containers_in(samples: &[Sample]) -> Vec<String> {
        let mut names: Vec<String> = samples
            .iter()
            .map(|s| label(s, "container").unwrap().to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[tokio::test]
    async fn a_scrape_lists_by_label_and_reads_one_shot_stats() {
        let engine = FakeEngine::start(vec![fake("a", running()), fake("b", running())]).await;
        let mut source = ContainerSource::new(engine.docker(), "a1", ContainerConfig::default());
        let first = scrape(&mut source).await;
        assert_eq!(containers_in(&first), ["c-a", "c-b"]);
        assert_eq!(first.len(), 2 * 9);
        let limits: Vec<f64> = first
            .iter()
            .filter(|s| s.series.name == "container_cpu_limit_cores")
            .map(|s| s.value)
            .collect();
        assert_eq!(limits, [0.5, 0.5]);
        let second = scrape(&mut source).await;
        scrape(&mut source).await;
        // Series are kept across scrapes; the limit is inspected once.
        assert_eq!(first.len(), second.len());
        let before: HashMap<&Series, &Arc<Series>> =
            first.iter().map(|s| (&*s.series, &s.series)).collect();
        for s in &second {
            assert!(Arc::ptr_eq(before[&*s.series], &s.series), "{:?}", s.series);
        }
        let state = engine.state();
        assert_eq!(
            state.inspects,
            HashMap::from([("a".into(), 1), ("b".into(), 1)])
        );
        let list = &state.targets[0];
        assert!(list.contains("/containers/json?"), "{list}");
        assert!(list.contains("uplink.agent%3Da1"), "{list}");
        let stats: Vec<&String> = state
            .targets
            .iter()
            .filter(|t| t.contains("/stats"))
            .collect();
        assert_eq!(stats.len(), 6);
        for t in stats {
            assert!(
                t.contains("stream=false") && t.contains("one-shot=true"),
                "{t}"
            );
        }
        assert_eq!(
            source.counters(),
            ContainerCounters {
                scrapes: 3,
                containers_scraped: 6,
                ..ContainerCounters::default()
            }
        );
    }

    #[tokio::test]
    async fn gone_failed_and_slow_containers_are_skipped_and_counted() {
        let engine = FakeEngine::start(vec![
            fake("ok", running()),
            fake("removed", Reply::Status(404)),
            fake("stopped", Reply::Json(STOPPED.into())),
            fake("broken", Reply::Status(500)),
            fake("garbled", Reply::Json("{not json".into())),
            fake("slow", Reply::Hang),
        ])
        .await;
        let config = ContainerConfig {
            timeout: Duration::from_millis(300),
            ..ContainerConfig::default()
        };
        let mut source = ContainerSource::new(engine.docker(), "a1", config);
        let started = Instant::now();
        let samples = scrape(&mut source).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(containers_in(&samples), ["c-ok"]);
        assert_eq!(
            source.counters(),
            ContainerCounters {
                scrapes: 1,
                containers_scraped: 1,
                skipped_gone: 2,
                skipped_timed_out: 1,
                skipped_failed: 2,
                ..ContainerCounters::default()
            }
        );
        assert_eq!(source.counters().skipped(), 5);
        assert_eq!(source.containers(), 1);

        // A container read before and gone now is forgotten; one that
        // fails or is slow keeps its series.
        {
            let mut state = engine.state();
            state.containers[1].stats = running();
            state.containers[4].stats = running();
        }
        assert_eq!(
            containers_in(&scrape(&mut source).await),
            ["c-garbled", "c-ok", "c-removed"]
        );
        assert_eq!(source.containers(), 3);
        {
            let mut state = engine.state();
            state.containers[1].stats = Reply::Status(404);
            state.containers[4].stats = Reply::Status(500);
        }
        assert_eq!(containers_in(&scrape(&mut source).await), ["c-ok"]);
        assert_eq!(source.containers(), 2);
    }

    #[tokio::test]
    async fn containers_no_longer_listed_are_forgotten() {
        let engine = FakeEngine::start(vec![fake("a", running()), fake("b", running())]).await;
        let mut source = ContainerSource::new(engine.docker(), "a1", ContainerConfig::default());
        let first = scrape(&mut source).await;
        let b = engine.state().containers.remove(1);
        assert_eq!(containers_in(&scrape(&mut source).await), ["c-a"]);
        assert_eq!(source.containers(), 1);
        // Back again: new series, and a new inspect.
        engine.state().containers.push(b);
        let again = scrape(&mut source).await;
        assert_eq!(containers_in(&again), ["c-a", "c-b"]);
        let of_b = |samples: &[Sample]| {
            let s = samples
                .iter()
                .find(|s| label(s, "container") == Some("c-b"));
            s.unwrap().series.clone()
        };
        assert!(!Arc::ptr_eq(&of_b(&first), &of_b(&again)));
        assert_eq!(engine.state().inspects["b"], 2);
        // A renamed container gets series with its new name.
        engine.state().containers[0].name = "renamed".into();
        let renamed = scrape(&mut source).await;
        assert_eq!(containers_in(&renamed), ["c-b", "renamed"]);
        let limits = renamed.iter().filter(|s| s.series.name == CPU[1].0);
        assert_eq!(limits.count(), 2);
        assert_eq!(source.containers(), 2);
        assert_eq!(engine.state().inspects["a"], 1);
    }

    #[tokio::test]
    async fn at_most_concurrency_stats_calls_run_at_once() {
        let ids = ["a", "b", "c", "d", "e", "f"];
        let engine = FakeEngine::start(ids.map(|id| fake(id, running())).into()).await;
        engine.state().stats_delay = Duration::from_millis(100);
        let config = ContainerConfig {
            concurrency: 2,
            ..ContainerConfig::default()
        };
        let mut source = ContainerSource::new(engine.docker(), "a1", config);
        let samples = scrape(&mut source).await;
        assert_eq!(containers_in(&samples).len(), 6);
        assert_eq!(engine.state().max_stats_in_flight, 2);
        // Samples come in the engine's order, whatever order stats end in.
        let order: Vec<&str> = samples
            .iter()
            .filter(|s| s.series.name == "container_pids")
            .map(|s| label(s, "container").unwrap())
            .collect();
        assert_eq!(order, ids.map(|id| format!("c-{id}")));
    }

    #[tokio::test]
    async fn a_failed_or_slow_list_fails_the_scrape() {
        let engine = FakeEngine::start(vec![fake("a", running())]).await;
        let config = ContainerConfig {
            timeout: Duration::from_millis(200),
            ..ContainerConfig::default()
        };
        let mut source = ContainerSource::new(engine.docker(), "a1", config);
        scrape(&mut source).await;
        let mut out = Vec::new();
        engine.state().list = Some(Reply::Status(500));
        let e = source.scrape(2_000, &mut out).await.unwrap_err();
        assert!(matches!(e, ContainerError::List(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("docker: cannot list containers"),
            "{e}"
        );
        engine.state().list = Some(Reply::Hang);
        let e = source.scrape(3_000, &mut out).await.unwrap_err();
        assert!(matches!(e, ContainerError::ListTimedOut(_)), "{e:?}");
        assert!(out.is_empty());
        // The containers are kept until a list says otherwise.
        assert_eq!(source.containers(), 1);
        let counters = source.counters();
        assert_eq!((counters.scrapes, counters.failed_scrapes), (3, 2));
    }

    #[tokio::test]
    async fn a_source_and_its_scrape_can_move_to_another_thread() {
        fn send<T: Send>(_: &T) {}
        let engine = FakeEngine::start(Vec::new()).await;
        let mut source = ContainerSource::new(engine.docker(), "a1", ContainerConfig::default());
        send(&source);
        let mut out = Vec::new();
        let scrape = source.scrape(0, &mut out);
        send(&scrape);
        scrape.await.unwrap();
        assert!(out.is_empty());
    }
}
