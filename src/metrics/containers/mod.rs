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
//! the `uplink.agent` label as the executor's own listings are, and never
//! the container the agent itself runs in), then reads
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
//!
//! This file holds the source (configuration, the scrape, the engine
//! calls); `stats` turns one reading into samples, without I/O; `tests`
//! scrapes a fake engine on a Unix socket.

mod stats;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, StatsOptions};
use futures_util::StreamExt;

use crate::labels::LABEL_AGENT;
use crate::metrics::sample::{Out, Sample};

use stats::{CpuLimit, Identity, SeriesSet, cpu_limit, is_running, push_samples};

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
    /// The id of the container the agent runs in (found at start by
    /// [`crate::own_container::detect`]): never read, whatever its labels.
    pub own_container: Option<String>,
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
            own_container: None,
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
            .filter(|(id, _)| self.config.own_container.as_ref() != Some(id))
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

#[cfg(test)]
mod tests;
