//! Helpers for the load generator ingest tests: the endpoint on loopback
//! with the channel it feeds, the real tools (JMeter, the InfluxDB Python
//! clients, curl) found or failed with the package that provides them, a
//! target for JMeter to load, and waits that always have a timeout and a
//! message.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use uplink::metrics::ingest::{Ingest, IngestConfig, IngestHandle};
use uplink::metrics::sample::Sample;

/// Where Debian's `jmeter` package puts JMeter.
pub const JMETER_HOME: &str = "/usr/share/jmeter";

/// An ingest endpoint on loopback, the receiving end of its channel, and
/// the switch that shuts it down.
pub struct Endpoint {
    /// The running endpoint: its addresses and counters.
    pub handle: IngestHandle,
    /// What the endpoint parsed, as it would reach the agent's batcher.
    pub rx: mpsc::Receiver<Vec<Sample>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Endpoint {
    /// Both listeners on `127.0.0.1:0` with `config`'s limits, feeding a
    /// channel of `capacity` messages.
    pub async fn start(config: IngestConfig, capacity: usize) -> Endpoint {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = IngestConfig {
            graphite: Some(loopback),
            influx: Some(loopback),
            ..config
        };
        let (tx, rx) = mpsc::channel(capacity);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = Ingest::start(config, tx, async move {
            let _ = stopped.await;
        })
        .await
        .expect("ingest starts");
        Endpoint {
            handle,
            rx,
            stop: Some(stop),
        }
    }

    /// The address of the Graphite listener.
    pub fn graphite(&self) -> SocketAddr {
        self.handle.graphite_addr().expect("graphite listener")
    }

    /// The address of the Influx listener.
    pub fn influx(&self) -> SocketAddr {
        self.handle.influx_addr().expect("influx listener")
    }

    /// The base URL of the Influx listener.
    pub fn influx_url(&self) -> String {
        format!("http://{}", self.influx())
    }

    /// Receives samples until `done` says the ones so far are enough, or
    /// panics with `what` after `timeout`.
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&got) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(batch)) => got.extend(batch),
                Ok(None) => panic!("the ingest channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what}; got {} samples: {}",
                    got.len(),
                    summary(&got)
                ),
            }
        }
        got
    }

    /// Receives `n` samples.
    pub async fn collect(&mut self, n: usize, what: &str) -> Vec<Sample> {
        self.collect_until(Duration::from_secs(10), what, |s| s.len() >= n)
            .await
    }

    /// Waits until the counters satisfy `cond`, or panics with `what`.
    pub async fn wait_counters(
        &self,
        what: &str,
        mut cond: impl FnMut(&uplink::metrics::ingest::IngestCounters) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.handle.counters();
            if cond(&c) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; counters: {c:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts the endpoint down and waits for it, at most 10 s.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.handle.stopped())
            .await
            .expect("ingest stops within 10 s");
    }
}

/// Names, labels and values of `samples`, for failure messages.
pub fn summary(samples: &[Sample]) -> String {
    let shown: Vec<String> = samples
        .iter()
        .take(40)
        .map(|s| format!("{}{:?}={}", s.series.name, s.series.labels, s.value))
        .collect();
    shown.join(", ")
}

/// The samples of the series named `name`.
pub fn named<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.series.name == name).collect()
}

/// The one sample of the series named `name`.
pub fn one<'a>(samples: &'a [Sample], name: &str) -> &'a Sample {
    let found = named(samples, name);
    assert_eq!(found.len(), 1, "{name} in {}", summary(samples));
    found[0]
}

/// The labels of a sample as string pairs.
pub fn labels(s: &Sample) -> Vec<(&str, &str)> {
    let l = &s.series.labels;
    l.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

/// Fails, naming the package, unless `program` is on the PATH or is a
/// path that exists.
pub fn require(program: &str, package: &str) {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    };
    assert!(
        found,
        "{program} is missing: this test needs {package} (tests/run.sh installs it)"
    );
}

/// Fails, naming the package, unless `python` can import `module`.
pub async fn require_python_module(python: &str, module: &str, package: &str) {
    require(python, package);
    let out = Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{python} cannot import {module}: this test needs {package} (tests/run.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` to completion within `timeout`, or panics with `what`; the
/// process is killed if it overruns.
pub async fn run(cmd: &mut Command, timeout: Duration, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{what} failed to run: {e}"),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// Like [`run`], and fails unless the command succeeded; returns stdout.
pub async fn run_ok(cmd: &mut Command, timeout: Duration, what: &str) -> String {
    let out = run(cmd, timeout, what).await;
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What curl got back.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// The value of the header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or a failure naming it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {:?}", self.body))
    }
}

/// Runs curl with `args` (after `-sS`, the header dump and no
/// `Expect: 100-continue`) and parses its answer.
pub async fn curl(args: &[&str]) -> Reply {
    require("curl", "Debian's curl");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-D", "-", "-H", "Expect:"])
        .args(args);
    let stdout = run_ok(&mut cmd, Duration::from_secs(30), "curl").await;
    let (head, body) = stdout
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("curl printed no header block: {stdout:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// An HTTP server on loopback for JMeter to load: `GET /` answers 200 and
/// counts the hit.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub hits: Arc<AtomicUsize>,
}

impl Target {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the target");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { "hello from the target\n" }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Target { addr, hits }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts JMeter as Debian packages it. Debian's JMeter 2.13 predates the
/// type allow-list of the XStream library Debian ships with it, which then
/// refuses to load any test plan (`ForbiddenClassException:
/// org.apache.jmeter.save.ScriptWrapper`). This launcher lets XStream load
/// JMeter's own types and then runs JMeter's usual entry point with the
/// given arguments; it is run from source by `java`, which needs a JDK.
pub const JMETER_LAUNCHER: &str = r#"
import java.lang.reflect.Field;

public class JMeterLauncher {
    public static void main(String[] args) throws Exception {
        Class<?> driver = Class.forName("org.apache.jmeter.NewDriver");
        Field loaderField = driver.getDeclaredField("loader");
        loaderField.setAccessible(true);
        ClassLoader loader = (ClassLoader) loaderField.get(null);
        String home = System.getProperty("jmeter.home");
        Class<?> utils = Class.forName("org.apache.jmeter.util.JMeterUtils", true, loader);
        utils.getMethod("setJMeterHome", String.class).invoke(null, home);
        utils.getMethod("loadJMeterProperties", String.class)
            .invoke(null, home + "/bin/jmeter.properties");
        Class<?> save = Class.forName("org.apache.jmeter.save.SaveService", true, loader);
        String[] types = {"org.apache.jmeter.**", "org.apache.jorphan.**"};
        for (String name : new String[] {"JMXSAVER", "JTLSAVER"}) {
            Field f = save.getDeclaredField(name);
            f.setAccessible(true);
            Object xstream = f.get(null);
            xstream.getClass().getMethod("allowTypesByWildcard", String[].class)
                .invoke(xstream, (Object) types);
        }
        driver.getMethod("main", String[].class).invoke(null, (Object) args);
    }
}
"#;

/// A JMeter test plan: `threads` users each send `loops` `GET /` requests
/// (a sampler named `home`) to `target`, and a Backend Listener with
/// JMeter's Graphite client reports them to `graphite` under the prefix
/// `jmeter.`, per sampler and in total, with percentiles 90 and 99.
pub fn jmeter_plan(target: SocketAddr, graphite: SocketAddr, threads: u32, loops: u32) -> String {
    let arg = |name: &str, value: &str| {
        format!(
            r#"
              <elementProp name="{name}" elementType="Argument">
                <stringProp name="Argument.name">{name}</stringProp>
                <stringProp name="Argument.value">{value}</stringProp>
                <stringProp name="Argument.metadata">=</stringProp>
              </elementProp>"#
        )
    };
    let args = [
        arg(
            "graphiteMetricsSender",
            "org.apache.jmeter.visualizers.backend.graphite.TextGraphiteMetricsSender",
        ),
        arg("graphiteHost", &graphite.ip().to_string()),
        arg("graphitePort", &graphite.port().to_string()),
        arg("rootMetricsPrefix", "jmeter."),
        arg("summaryOnly", "false"),
        arg("samplersList", "home"),
        arg("percentiles", "90;99"),
    ]
    .concat();
    let (host, port) = (target.ip(), target.port());
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<jmeterTestPlan version="1.2" properties="2.8" jmeter="2.13">
  <hashTree>
    <TestPlan guiclass="TestPlanGui" testclass="TestPlan" testname="uplink ingest" enabled="true">
      <boolProp name="TestPlan.functional_mode">false</boolProp>
      <boolProp name="TestPlan.serialize_threadgroups">false</boolProp>
      <elementProp name="TestPlan.user_defined_variables" elementType="Arguments" guiclass="ArgumentsPanel" testclass="Arguments" testname="User Defined Variables" enabled="true">
        <collectionProp name="Arguments.arguments"/>
      </elementProp>
      <stringProp name="TestPlan.user_define_classpath"></stringProp>
    </TestPlan>
    <hashTree>
      <ThreadGroup guiclass="ThreadGroupGui" testclass="ThreadGroup" testname="users" enabled="true">
        <stringProp name="ThreadGroup.on_sample_error">continue</stringProp>
        <elementProp name="ThreadGroup.main_controller" elementType="LoopController" guiclass="LoopControlPanel" testclass="LoopController" testname="Loop Controller" enabled="true">
          <boolProp name="LoopController.continue_forever">false</boolProp>
          <stringProp name="LoopController.loops">{loops}</stringProp>
        </elementProp>
        <stringProp name="ThreadGroup.num_threads">{threads}</stringProp>
        <stringProp name="ThreadGroup.ramp_time">0</stringProp>
        <boolProp name="ThreadGroup.scheduler">false</boolProp>
        <stringProp name="ThreadGroup.duration"></stringProp>
        <stringProp name="ThreadGroup.delay"></stringProp>
      </ThreadGroup>
      <hashTree>
        <HTTPSamplerProxy guiclass="HttpTestSampleGui" testclass="HTTPSamplerProxy" testname="home" enabled="true">
          <elementProp name="HTTPsampler.Arguments" elementType="Arguments" guiclass="HTTPArgumentsPanel" testclass="Arguments" enabled="true">
            <collectionProp name="Arguments.arguments"/>
          </elementProp>
          <stringProp name="HTTPSampler.domain">{host}</stringProp>
          <stringProp name="HTTPSampler.port">{port}</stringProp>
          <stringProp name="HTTPSampler.protocol">http</stringProp>
          <stringProp name="HTTPSampler.path">/</stringProp>
          <stringProp name="HTTPSampler.method">GET</stringProp>
          <boolProp name="HTTPSampler.follow_redirects">true</boolProp>
          <boolProp name="HTTPSampler.use_keepalive">true</boolProp>
        </HTTPSamplerProxy>
        <hashTree/>
        <BackendListener guiclass="BackendListenerGui" testclass="BackendListener" testname="Backend Listener" enabled="true">
          <elementProp name="arguments" elementType="Arguments" guiclass="ArgumentsPanel" testclass="Arguments" enabled="true">
            <collectionProp name="Arguments.arguments">{args}
            </collectionProp>
          </elementProp>
          <stringProp name="classname">org.apache.jmeter.visualizers.backend.graphite.GraphiteBackendListenerClient</stringProp>
        </BackendListener>
        <hashTree/>
      </hashTree>
    </hashTree>
  </hashTree>
</jmeterTestPlan>
"#
    )
}
