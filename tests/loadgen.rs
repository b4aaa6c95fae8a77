//! The load generator ingest endpoint, driven over loopback by real
//! clients: JMeter's Backend Listener (Graphite), the InfluxDB Python
//! clients for both write APIs, curl, and plain sockets for what no client
//! sends on purpose (overlong lines, floods, idle connections).
//!
//! Packages (installed by tests/run.sh): Debian's `jmeter`, `jmeter-http`,
//! `default-jdk-headless` (JMeter's launcher runs from source),
//! `python3-influxdb` and `curl`; PyPI's `influxdb-client`.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use uplink::metrics::ingest::{Ingest, IngestConfig, IngestError, IngestLimits, Reason};
use uplink_testkit::loadgen::{
    self, Endpoint, JMETER_HOME, Target, curl, labels, named, one, run_ok, summary,
};

fn config() -> IngestConfig {
    IngestConfig::default()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Writes `lines` on a new Graphite connection and closes its write half.
async fn send_graphite(endpoint: &Endpoint, lines: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(endpoint.graphite()).await.unwrap();
    tcp.write_all(lines).await.unwrap();
    tcp.shutdown().await.unwrap();
    tcp
}

/// Reads until the server closes the connection (EOF or reset), or fails
/// after `timeout`.
async fn expect_closed(tcp: &mut TcpStream, timeout: Duration, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(timeout, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: the server sent {n} bytes"),
        Err(_) => panic!("{what}: still open after {timeout:?}"),
    }
}

#[tokio::test]
async fn jmeter_backend_listener_delivers_graphite_samples() {
    let jar = format!("{JMETER_HOME}/bin/ApacheJMeter.jar");
    loadgen::require(&jar, "Debian's jmeter");
    loadgen::require(
        &format!("{JMETER_HOME}/lib/ext/ApacheJMeter_http.jar"),
        "Debian's jmeter-http",
    );
    loadgen::require("java", "Debian's default-jdk-headless");
    loadgen::require("javac", "Debian's default-jdk-headless");
    const THREADS: u32 = 3;
    const LOOPS: u32 = 7;
    let requests = f64::from(THREADS * LOOPS);

    let target = Target::start().await;
    let mut endpoint = Endpoint::start(config(), 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let plan = loadgen::jmeter_plan(target.addr, endpoint.graphite(), THREADS, LOOPS);
    std::fs::write(dir.path().join("plan.jmx"), plan).unwrap();
    let launcher = dir.path().join("JMeterLauncher.java");
    std::fs::write(&launcher, loadgen::JMETER_LAUNCHER).unwrap();
    let started_s = uplink::now_unix_ms() / 1000;

    let mut jmeter = Command::new("java");
    jmeter
        .current_dir(dir.path())
        .arg(format!("-Djmeter.home={JMETER_HOME}"))
        .args(["-cp", &jar])
        .arg(&launcher)
        .args([
            "-n",
            "-t",
            "plan.jmx",
            "-j",
            "jmeter.log",
            "-l",
            "results.jtl",
        ]);
    let out = run_ok(&mut jmeter, Duration::from_secs(180), "jmeter -n").await;
    let log = std::fs::read_to_string(dir.path().join("jmeter.log")).unwrap_or_default();
    assert!(
        out.contains("end of run") && !log.contains("ERROR"),
        "JMeter did not run cleanly:\n{out}\n{log}"
    );
    assert_eq!(target.hits(), (THREADS * LOOPS) as usize, "{out}");

    // The listener sends per-interval counts, so their sum is the total.
    // Each interval's report ends with the test's thread counts.
    let sum = |samples: &[uplink::metrics::sample::Sample], name: &str| -> f64 {
        named(samples, name).iter().map(|s| s.value).sum()
    };
    let samples = endpoint
        .collect_until(
            Duration::from_secs(20),
            "JMeter's reports of every request",
            |s| {
                sum(s, "jmeter.home.ok.count") >= requests
                    && named(s, "jmeter.test.endedT").len()
                        >= named(s, "jmeter.home.ok.count").len()
            },
        )
        .await;
    assert_eq!(sum(&samples, "jmeter.home.ok.count"), requests);
    assert_eq!(sum(&samples, "jmeter.all.ok.count"), requests);
    assert_eq!(sum(&samples, "jmeter.home.ko.count"), 0.0);
    for name in [
        "jmeter.home.ok.min",
        "jmeter.home.ok.max",
        "jmeter.home.ok.pct90",
        "jmeter.home.ok.pct99",
        "jmeter.test.startedT",
    ] {
        assert!(
            !named(&samples, name).is_empty(),
            "{name}: {}",
            summary(&samples)
        );
    }
    let now_s = uplink::now_unix_ms() / 1000;
    for s in &samples {
        assert!(s.series.name.starts_with("jmeter."), "{s:?}");
        assert!(s.series.labels.is_empty() && s.value.is_finite(), "{s:?}");
        let t = s.time_unix_ms / 1000;
        assert!(
            (started_s..=now_s).contains(&t),
            "{s:?} outside {started_s}..={now_s}"
        );
    }
    let c = endpoint.handle.counters();
    assert_eq!(c.rejected_total(), 0, "{c:?}");
    assert!(c.accepted_samples >= samples.len() as u64, "{c:?}");
    endpoint.stop().await;
}

/// Writes with the InfluxDB 1.x client (`influxdb`), as JMeter 3+ and k6
/// do: points in JSON turned into line protocol, raw lines with a
/// precision, a ping, and a bad line.
const INFLUX_V1_SCRIPT: &str = r#"
import sys
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError

client = InfluxDBClient(host="127.0.0.1", port=int(sys.argv[1]), database="loadgen", timeout=10)
print("ping", client.ping())
assert client.write_points([{
    "measurement": "http_req_duration",
    "tags": {"url": "http://127.0.0.1/a b,c", "method": "GET", "status": "200"},
    "time": 1700000000123,
    "fields": {"value": 12.5, "count": 3, "ok": True, "error": "none"},
}], time_precision="ms")
assert client.write(["vus,scenario=default value=5i 1700000001"], params={"db": "loadgen", "precision": "s"}, protocol="line")
try:
    client.write(["good value=1", "vus value=oops"], params={"db": "loadgen"}, protocol="line")
    print("no error")
except InfluxDBClientError as e:
    print("status", e.code)
    print("error", e.content)
"#;

#[tokio::test]
async fn influxdb_v1_client_pings_and_writes() {
    loadgen::require_python_module("/usr/bin/python3", "influxdb", "Debian's python3-influxdb")
        .await;
    let mut endpoint = Endpoint::start(config(), 64).await;
    let port = endpoint.influx().port().to_string();
    let mut python = Command::new("/usr/bin/python3");
    python.args(["-c", INFLUX_V1_SCRIPT, &port]);
    let out = run_ok(
        &mut python,
        Duration::from_secs(60),
        "the influxdb v1 client",
    )
    .await;
    assert!(out.contains("ping 1.8.10"), "{out}");
    assert!(out.contains("status 400"), "{out}");
    assert!(
        out.contains("line 2: a field value is not a number or boolean: 'vus value=oops'"),
        "{out}"
    );

    let samples = endpoint.collect(5, "the client's samples").await;
    let value = one(&samples, "http_req_duration_value");
    assert_eq!((value.value, value.time_unix_ms), (12.5, 1_700_000_000_123));
    assert_eq!(
        labels(value),
        [
            ("method", "GET"),
            ("status", "200"),
            ("url", "http://127.0.0.1/a b,c")
        ]
    );
    assert_eq!(one(&samples, "http_req_duration_count").value, 3.0);
    assert_eq!(one(&samples, "http_req_duration_ok").value, 1.0);
    assert!(named(&samples, "http_req_duration_error").is_empty());
    let vus = one(&samples, "vus_value");
    assert_eq!((vus.value, vus.time_unix_ms), (5.0, 1_700_000_001_000));
    assert_eq!(labels(vus), [("scenario", "default")]);
    // The good line of the write that had a bad one was kept.
    assert_eq!(one(&samples, "good_value").value, 1.0);
    let c = endpoint.handle.counters();
    assert_eq!(c.rejected(Reason::BadValue), 1, "{c:?}");
    assert_eq!(c.skipped_string_fields, 1);
    endpoint.stop().await;
}

/// Writes with the InfluxDB 2.x client (`influxdb-client`) with gzip on:
/// points and raw lines in two precisions, then a body with a bad line.
const INFLUX_V2_SCRIPT: &str = r#"
import sys
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

with InfluxDBClient(url=sys.argv[1], token="unused", org="uplink", enable_gzip=True) as client:
    write = client.write_api(write_options=SYNCHRONOUS)
    write.write(bucket="k6", record=[
        Point("http_reqs").tag("scenario", "s1").field("count", 7).time(1700000000000000000, WritePrecision.NS),
        "iterations,scenario=s1 value=2i 1700000000000000000",
    ])
    write.write(bucket="k6", record="checks,check=status\\ is\\ 200 rate=0.75 1700000002", write_precision=WritePrecision.S)
    try:
        write.write(bucket="k6", record=["good value=1", "bad value"])
        print("no error")
    except ApiException as e:
        print("status", e.status)
        print("body", e.body)
"#;

#[tokio::test]
async fn influxdb_v2_client_writes_gzip_bodies() {
    loadgen::require_python_module("python3", "influxdb_client", "PyPI's influxdb-client").await;
    let mut endpoint = Endpoint::start(config(), 64).await;
    let mut python = Command::new("python3");
    python.args(["-c", INFLUX_V2_SCRIPT, &endpoint.influx_url()]);
    let out = run_ok(
        &mut python,
        Duration::from_secs(60),
        "the influxdb v2 client",
    )
    .await;
    assert!(out.contains("status 400"), "{out}");
    let body_line = out
        .lines()
        .find_map(|l| l.strip_prefix("body "))
        .unwrap_or_else(|| panic!("no error body: {out}"));
    let body: serde_json::Value = serde_json::from_str(body_line).unwrap();
    assert_eq!(body["code"], "invalid", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("line 2: a field has no '=': 'bad value'"),
        "{message}"
    );

    let samples = endpoint.collect(4, "the client's samples").await;
    let count = one(&samples, "http_reqs_count");
    assert_eq!((count.value, count.time_unix_ms), (7.0, 1_700_000_000_000));
    assert_eq!(labels(count), [("scenario", "s1")]);
    assert_eq!(one(&samples, "iterations_value").value, 2.0);
    let rate = one(&samples, "checks_rate");
    assert_eq!((rate.value, rate.time_unix_ms), (0.75, 1_700_000_002_000));
    assert_eq!(labels(rate), [("check", "status is 200")]);
    assert_eq!(one(&samples, "good_value").value, 1.0);
    endpoint.stop().await;
}

#[tokio::test]
async fn a_bad_line_is_named_and_the_good_ones_are_kept() {
    let mut endpoint = Endpoint::start(config(), 64).await;
    let body = "a,host=x v=1 1000000000\nb v=2\nno fields here\nc v=3i\nd v=NaN\n";
    let reply = curl(&[
        "--data-binary",
        body,
        &format!("{}/write?db=loadgen&precision=ns", endpoint.influx_url()),
    ])
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = reply.json()["error"].as_str().unwrap().to_string();
    assert_eq!(
        error,
        "line 3: a field has no '=': 'no fields here' (2 of 5 lines had problems; the others were accepted)"
    );
    let samples = endpoint.collect(3, "the good lines").await;
    let names: Vec<&str> = samples.iter().map(|s| s.series.name.as_str()).collect();
    assert_eq!(names, ["a_v", "b_v", "c_v"]);
    assert_eq!(samples[0].time_unix_ms, 1_000);
    let c = endpoint.handle.counters();
    assert_eq!(
        (c.rejected(Reason::Syntax), c.rejected(Reason::NonFinite)),
        (1, 1),
        "{c:?}"
    );
    assert_eq!(c.accepted_samples, 3);

    // The v2 endpoint answers the same with InfluxDB 2's fields.
    let reply = curl(&[
        "--data-binary",
        "x v=\"unterminated\n",
        &format!(
            "{}/api/v2/write?org=o&bucket=b&precision=s",
            endpoint.influx_url()
        ),
    ])
    .await;
    assert_eq!(reply.status, 400);
    let json = reply.json();
    assert_eq!(json["code"], "invalid");
    assert_eq!(json["message"], json["error"]);
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .starts_with("line 1: a string field has no closing quote"),
        "{json}"
    );
    endpoint.stop().await;
}

#[tokio::test]
async fn gzip_bodies_and_encodings() {
    let mut endpoint = Endpoint::start(config(), 64).await;
    let dir = tempfile::tempdir().unwrap();
    let body: String = (0..1000)
        .map(|i| format!("load,worker=w{} latency={i}.5 {i}\n", i % 10))
        .collect();
    let gz = dir.path().join("body.gz");
    std::fs::write(&gz, gzip(body.as_bytes())).unwrap();
    let url = format!(
        "{}/api/v2/write?bucket=b&precision=ms",
        endpoint.influx_url()
    );
    let reply = curl(&[
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        &format!("@{}", gz.display()),
        &url,
    ])
    .await;
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.body, "");
    let samples = endpoint.collect(1000, "the gzip body's samples").await;
    assert_eq!(samples.len(), 1000);
    assert_eq!(
        (samples[999].value, samples[999].time_unix_ms),
        (999.5, 999)
    );
    assert_eq!(endpoint.handle.counters().series, 10);

    let reply = curl(&["-H", "Content-Encoding: br", "--data-binary", "m v=1", &url]).await;
    assert_eq!(reply.status, 415, "{reply:?}");
    let reply = curl(&[
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        "m v=1",
        &url,
    ])
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.json()["message"].as_str().unwrap().contains("gzip"));
    endpoint.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let config = IngestConfig {
        limits: IngestLimits {
            max_line_bytes: 4096,
            ..IngestLimits::default()
        },
        max_body_bytes: 16 * 1024,
        ..IngestConfig::default()
    };
    let mut endpoint = Endpoint::start(config, 64).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/write?db=x", endpoint.influx_url());
    let big: String = (0..2000).map(|i| format!("m v={i}\n")).collect();
    let plain = dir.path().join("big.txt");
    std::fs::write(&plain, &big).unwrap();
    let plain_arg = format!("@{}", plain.display());
    // Declared too large, and too large while streaming (chunked).
    for extra in [None, Some("Transfer-Encoding: chunked")] {
        let mut args = vec!["--data-binary", &plain_arg, &url];
        if let Some(h) = extra {
            args.splice(0..0, ["-H", h]);
        }
        let reply = curl(&args).await;
        assert_eq!(reply.status, 413, "{extra:?}: {reply:?}");
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .contains("16384 bytes")
        );
    }
    // Small when compressed, too large when not.
    let bomb = dir.path().join("bomb.gz");
    std::fs::write(&bomb, gzip(&vec![b'\n'; 1 << 20])).unwrap();
    let reply = curl(&[
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        &format!("@{}", bomb.display()),
        &url,
    ])
    .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("decompressed")
    );
    // A line over the line limit within a body that fits.
    let long = format!("m,k={} v=1\nok v=2\n", "x".repeat(5000));
    let reply = curl(&["--data-binary", &long, &url]).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("line 1: the line is too long")
    );
    let samples = endpoint.collect(1, "the line after the long one").await;
    assert_eq!(samples[0].series.name, "ok_v");
    endpoint.stop().await;
}

#[tokio::test]
async fn a_full_channel_answers_503_with_retry_after() {
    let config = IngestConfig {
        retry_after: Duration::from_secs(3),
        ..IngestConfig::default()
    };
    let mut endpoint = Endpoint::start(config, 1).await;
    let url = format!("{}/write?db=x", endpoint.influx_url());
    let first = curl(&["--data-binary", "m v=1", &url]).await;
    assert_eq!(first.status, 204, "{first:?}");
    // Nothing reads the channel: it is full.
    for _ in 0..2 {
        let full = curl(&["--data-binary", "m v=2", &url]).await;
        assert_eq!(full.status, 503, "{full:?}");
        assert_eq!(full.header("retry-after"), Some("3"));
        assert!(
            full.json()["error"]
                .as_str()
                .unwrap()
                .contains("retry later")
        );
    }
    let c = endpoint.handle.counters();
    assert_eq!((c.throttled_requests, c.accepted_samples), (2, 1), "{c:?}");
    // Room again: the retried write goes through, and nothing was kept of
    // the refused ones.
    let samples = endpoint.collect(1, "the first write").await;
    assert_eq!(samples[0].value, 1.0);
    let retry = curl(&["--data-binary", "m v=2", &url]).await;
    assert_eq!(retry.status, 204, "{retry:?}");
    let samples = endpoint.collect(1, "the retried write").await;
    assert_eq!(samples[0].value, 2.0);
    assert!(endpoint.rx.try_recv().is_err());
    endpoint.stop().await;
}

#[tokio::test]
async fn ping_methods_and_unknown_paths() {
    let mut endpoint = Endpoint::start(config(), 4).await;
    let base = endpoint.influx_url();
    let ping = curl(&[&format!("{base}/ping")]).await;
    assert_eq!(ping.status, 204);
    assert_eq!(ping.header("x-influxdb-version"), Some("1.8.10"));
    let head = curl(&["-I", &format!("{base}/ping")]).await;
    assert_eq!(head.status, 204);
    let get_write = curl(&[&format!("{base}/write?db=x")]).await;
    assert_eq!(get_write.status, 405);
    assert_eq!(get_write.header("allow"), Some("POST"));
    let query = curl(&[
        "--data-binary",
        "q=show databases",
        &format!("{base}/query"),
    ])
    .await;
    assert_eq!(query.status, 404);
    assert!(query.json()["error"].as_str().unwrap().contains("/write"));
    let precision = curl(&[
        "--data-binary",
        "m v=1",
        &format!("{base}/write?precision=sec"),
    ])
    .await;
    assert_eq!(precision.status, 400);
    assert!(
        precision.json()["error"]
            .as_str()
            .unwrap()
            .contains("'sec'")
    );
    endpoint.stop().await;
}

#[tokio::test]
async fn graphite_skips_a_line_too_long_and_keeps_the_connection() {
    let config = IngestConfig {
        limits: IngestLimits {
            max_line_bytes: 1024,
            ..IngestLimits::default()
        },
        max_body_bytes: 4096,
        ..IngestConfig::default()
    };
    let mut endpoint = Endpoint::start(config, 64).await;
    let mut tcp = TcpStream::connect(endpoint.graphite()).await.unwrap();
    tcp.write_all(b"ok.before 1 1700000000\nhuge.")
        .await
        .unwrap();
    for _ in 0..20 {
        tcp.write_all(&[b'x'; 1000]).await.unwrap();
    }
    tcp.write_all(b" 5 1700000000\nok.after;k=v 2\r\nbad.value x\nno.newline 3")
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let samples = endpoint.collect(3, "the lines around the long one").await;
    let names: Vec<&str> = samples.iter().map(|s| s.series.name.as_str()).collect();
    assert_eq!(names, ["ok.before", "ok.after", "no.newline"]);
    assert_eq!(samples[0].time_unix_ms, 1_700_000_000_000);
    assert_eq!(labels(&samples[1]), [("k", "v")]);
    endpoint
        .wait_counters("the long line and the bad value counted", |c| {
            c.rejected(Reason::LineTooLong) == 1 && c.rejected(Reason::BadValue) == 1
        })
        .await;
    expect_closed(&mut tcp, Duration::from_secs(5), "after the client's EOF").await;
    endpoint.stop().await;
}

#[tokio::test]
async fn the_series_cap_drops_samples_of_new_series() {
    let config = IngestConfig {
        limits: IngestLimits {
            max_series: 3,
            ..IngestLimits::default()
        },
        ..IngestConfig::default()
    };
    let mut endpoint = Endpoint::start(config, 64).await;
    send_graphite(&endpoint, b"s1 1\ns2 1\ns3 1\ns4 1\ns5 1\ns1 2\n").await;
    let samples = endpoint
        .collect(4, "the samples of the first three series")
        .await;
    let got: Vec<(&str, f64)> = samples
        .iter()
        .map(|s| (s.series.name.as_str(), s.value))
        .collect();
    assert_eq!(got, [("s1", 1.0), ("s2", 1.0), ("s3", 1.0), ("s1", 2.0)]);
    endpoint
        .wait_counters("two samples dropped", |c| c.dropped_samples_series_cap == 2)
        .await;
    // Over HTTP the cap makes a 400 naming the line.
    let reply = curl(&[
        "--data-binary",
        "s1 value=1\n",
        &format!("{}/write", endpoint.influx_url()),
    ])
    .await;
    assert_eq!(reply.status, 400);
    let error = reply.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.starts_with("line 1: the limit of 3 series is reached"),
        "{error}"
    );
    assert_eq!(endpoint.handle.counters().series, 3);
    endpoint.stop().await;
}

#[tokio::test]
async fn graphite_backpressure_blocks_the_client_and_loses_nothing() {
    let mut endpoint = Endpoint::start(config(), 1).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(endpoint.graphite()).await.unwrap();
    let (blocked_tx, blocked_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let mut tcp = tcp;
        let mut blocked = Some(blocked_tx);
        let mut lines = 0u64;
        let mut written = 0usize;
        while lines < 200_000 {
            let chunk: String = (lines..lines + 1000)
                .map(|i| format!("bp.load;w=w{} {i} 1700000000\n", i % 4))
                .collect();
            lines += 1000;
            written += chunk.len();
            let mut write = std::pin::pin!(tcp.write_all(chunk.as_bytes()));
            if blocked.is_some()
                && tokio::time::timeout(Duration::from_millis(500), write.as_mut())
                    .await
                    .is_err()
            {
                let _ = blocked.take().unwrap().send(written);
                // Nothing more once blocked: finish this write and stop.
                write.await.unwrap();
                break;
            }
            write.await.unwrap();
        }
        tcp.shutdown().await.unwrap();
        (lines, blocked.is_none())
    });
    let blocked_at = tokio::time::timeout(Duration::from_secs(60), blocked_rx)
        .await
        .expect("the client blocks while the channel is full")
        .expect("the writer blocked before writing 200,000 lines");
    assert!(
        blocked_at < 20 << 20,
        "blocked only after {blocked_at} bytes"
    );
    // Draining the channel unblocks the client, and every line arrives.
    let mut received = 0u64;
    let mut values = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (lines, was_blocked) = loop {
        tokio::select! {
            batch = endpoint.rx.recv() => {
                for s in batch.expect("channel open") {
                    assert_eq!(s.series.name, "bp.load");
                    values.insert(s.value as u64);
                    received += 1;
                }
            }
            _ = tokio::time::sleep_until(deadline) => panic!("the writer never finished; {received} received"),
        }
        if writer.is_finished() {
            break writer.await.unwrap();
        }
    };
    assert!(was_blocked);
    let all = endpoint
        .collect_until(Duration::from_secs(30), "every line written", |s| {
            received + s.len() as u64 >= lines
        })
        .await;
    for s in &all {
        values.insert(s.value as u64);
    }
    assert_eq!(received + all.len() as u64, lines);
    assert_eq!(values.len() as u64, lines, "every line once");
    let c = endpoint.handle.counters();
    assert_eq!(
        (c.accepted_samples, c.rejected_total()),
        (lines, 0),
        "{c:?}"
    );
    endpoint.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_idle_ones_closed() {
    let config = IngestConfig {
        max_connections: 1,
        idle_timeout: Duration::from_millis(700),
        ..IngestConfig::default()
    };
    let mut endpoint = Endpoint::start(config, 64).await;
    let mut first = TcpStream::connect(endpoint.graphite()).await.unwrap();
    first.write_all(b"first 1\n").await.unwrap();
    endpoint.collect(1, "the first connection's line").await;
    let mut second = TcpStream::connect(endpoint.graphite()).await.unwrap();
    expect_closed(
        &mut second,
        Duration::from_secs(5),
        "a connection over the cap",
    )
    .await;
    endpoint
        .wait_counters("a refused connection", |c| c.refused_connections == 1)
        .await;
    // The first goes idle and is closed, which frees its slot.
    expect_closed(&mut first, Duration::from_secs(5), "an idle connection").await;
    let third = send_graphite(&endpoint, b"third 3\n").await;
    let samples = endpoint.collect(1, "the third connection's line").await;
    assert_eq!(samples[0].series.name, "third");
    drop(third);
    // HTTP keep-alive connections idle out too.
    let mut http = TcpStream::connect(endpoint.influx()).await.unwrap();
    http.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = http.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 204"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    expect_closed(&mut http, Duration::from_secs(5), "an idle HTTP connection").await;
    endpoint.stop().await;
}

#[tokio::test]
async fn shutdown_stops_listeners_and_closes_connections() {
    let mut endpoint = Endpoint::start(config(), 64).await;
    let (graphite, influx) = (endpoint.graphite(), endpoint.influx());
    let mut open = TcpStream::connect(graphite).await.unwrap();
    open.write_all(b"before.stop 1\n").await.unwrap();
    endpoint.collect(1, "a line before shutdown").await;
    let mut idle_http = TcpStream::connect(influx).await.unwrap();
    endpoint.stop().await;
    expect_closed(&mut open, Duration::from_secs(5), "graphite after shutdown").await;
    expect_closed(
        &mut idle_http,
        Duration::from_secs(5),
        "HTTP after shutdown",
    )
    .await;
    for addr in [graphite, influx] {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts after shutdown"
        );
    }
}

#[tokio::test]
async fn bad_config_and_taken_ports_are_reported() {
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let bad = IngestConfig {
        max_connections: 0,
        max_body_bytes: 10,
        ..IngestConfig::default()
    };
    match Ingest::start(bad, tx.clone(), std::future::pending()).await {
        Err(IngestError::Config(errs)) => assert_eq!(errs.len(), 2, "{errs:?}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = IngestConfig {
        influx: Some(addr),
        ..IngestConfig::default()
    };
    match Ingest::start(config, tx, std::future::pending()).await {
        Err(e @ IngestError::Bind { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&format!("influx on {addr}")), "{message}");
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
}
