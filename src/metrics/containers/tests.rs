//! Tests of the container source: its configuration, and scrapes against
//! a fake Docker engine on a Unix socket that answers the list, inspect and
//! stats calls as a test scripts them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::metrics::sample::{Sample, Series};

use super::stats::CPU;
use super::stats::tests::{CGROUP_V1, STOPPED, label};
use super::{ContainerConfig, ContainerCounters, ContainerError, ContainerSource};

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
async fn the_container_the_agent_runs_in_is_never_read() {
    // It carries this agent's label (as if an operator copied it), yet
    // neither its stats nor its limit are asked for.
    let engine = FakeEngine::start(vec![fake("own", running()), fake("b", running())]).await;
    let config = ContainerConfig {
        own_container: Some("own".into()),
        ..ContainerConfig::default()
    };
    let mut source = ContainerSource::new(engine.docker(), "a1", config);
    let samples = scrape(&mut source).await;
    assert_eq!(containers_in(&samples), ["c-b"]);
    assert_eq!(source.containers(), 1);
    let state = engine.state();
    assert!(
        state
            .targets
            .iter()
            .all(|t| !t.contains("/containers/own/")),
        "{:?}",
        state.targets
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
