//! What one agent credential can make the backend keep, against a real
//! backend over real TLS: container events, new epochs, rejected metric
//! batches and huge labels stay bounded on disk, in memory and on the
//! `/metrics` page, and agent-supplied text reaches neither the store nor
//! `ctl` output raw.

use uplink::ctl::render::agents_table;
use uplink::metrics::encode::{BatchBuilder, ValueEncoding};
use uplink::metrics::sample::{Kind, Sample, Series};
use uplink::proto;
use uplink_testkit::push::{
    Agent, AgentClient, counter, enroll, enroll_with, grpc_client, push_request, push_zstd, report,
    rss_bytes, scrape, store_bytes,
};
use uplink_testkit::*;

const HOSTILE: &str =
    "web\n2026-01-01T00:00:00.000000Z  INFO uplink: forged line\u{1b}[2J\u{1b}[31m";

fn container_event(seq: u64, i: u64) -> proto::Event {
    proto::Event {
        seq,
        time_unix_ms: 1,
        kind: Some(proto::event::Kind::Container(proto::ContainerEvent {
            container_id: format!("c{i}"),
            name: HOSTILE.into(),
            kind: proto::ContainerEventKind::Exited as i32,
            ..Default::default()
        })),
    }
}

/// Reports a 3.9 MB Docker status full of escape sequences and fake rows
/// (epoch 1); the backend takes it, clipped.
async fn report_hostile_status(client: &AgentClient, agent: &Agent) {
    let status = format!(
        "27.1\nagt_fake  evil  default  yes\u{1b}[2J{}",
        "x".repeat(3_900_000)
    );
    let capacity = proto::Event {
        seq: 1,
        time_unix_ms: 1,
        kind: Some(proto::event::Kind::Capacity(proto::Capacity {
            docker_available: true,
            docker_status: status,
            ..Default::default()
        })),
    };
    let req = proto::ReportRequest {
        epoch: 1,
        events: vec![capacity],
        ..Default::default()
    };
    report(client, agent, req)
        .await
        .expect("a capacity report is taken, clipped");
}

/// 400 reports of 1000 container events with a hostile name, every one in
/// a new epoch (2 to 401): 400,000 rows and 400 cursors if nothing bounded
/// them. Returns the reports taken and refused; every refusal must be
/// RESOURCE_EXHAUSTED with a retry hint.
async fn flood_container_events(client: &AgentClient, agent: &Agent) -> (u32, u32) {
    let (mut ok, mut refused) = (0, 0);
    let mut next = 0u64;
    for epoch in 2..402u64 {
        let events = (1..=1000)
            .map(|seq| {
                next += 1;
                container_event(seq, next)
            })
            .collect();
        let req = proto::ReportRequest {
            epoch,
            events,
            ..Default::default()
        };
        match report(client, agent, req).await {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("retry later"), "{}", s.message());
                refused += 1;
            }
        }
    }
    (ok, refused)
}

/// Pushes 1,026 series with 100 KiB labels, 27 per batch, in epoch 1;
/// every batch must be refused as `too_long`. Returns the batches sent.
async fn flood_huge_labels(client: &AgentClient, agent: &Agent) -> u64 {
    let mut seq = 0;
    for chunk in (0..1026u32).collect::<Vec<_>>().chunks(27) {
        let mut builder = BatchBuilder::with_encoding(ValueEncoding::Doubles);
        for &i in chunk {
            let s = std::sync::Arc::new(
                Series::new("big", Kind::Gauge).label("l", format!("{i}{}", "x".repeat(100 << 10))),
            );
            builder
                .add(&Sample {
                    series: s,
                    time_unix_ms: 1,
                    value: 1.0,
                })
                .unwrap();
        }
        seq += 1;
        let e = push_zstd(client, agent, push_request(1, seq, builder.finish()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("too_long"), "{}", e.message());
    }
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_grow_the_store_or_forge_text() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let agent = enroll(&b, "abuser").await;
    let client = grpc_client(&b).await;

    report_hostile_status(&client, &agent).await;
    let rss_before = rss_bytes(std::process::id());
    let (ok, refused) = flood_container_events(&client, &agent).await;
    // Rejected batches (an empty name) at every other seq of one epoch,
    // from another agent: each would leave a row above the watermark.
    let bad = proto::MetricBatch {
        symbols: vec!["".into()],
        series: vec![proto::Series::default()],
        sample_series: vec![0],
        sample_time_delta_ms: vec![0],
        sample_values: vec![1.0],
        ..Default::default()
    };
    let rejecter = enroll(&b, "rejecter").await;
    let mut exhausted = 0;
    for i in 0..300u64 {
        let e = push_zstd(&client, &rejecter, push_request(7, 2 * i + 2, bad.clone()))
            .await
            .unwrap_err();
        match e.code() {
            tonic::Code::ResourceExhausted => exhausted += 1,
            code => assert_eq!(code, tonic::Code::InvalidArgument, "{e:?}"),
        }
    }
    let (_, above) = b
        .core
        .store()
        .metric_batches(&rejecter.id, 7)
        .await
        .unwrap();
    assert!(above <= 110, "{above} rejected seqs recorded for one epoch");
    b.core.prune().await.expect("prune");
    let events = b.core.store().container_events(&agent.id).await.unwrap();
    let rss_growth = rss_bytes(std::process::id()).saturating_sub(rss_before);
    let disk = store_bytes(dir.path());
    println!(
        "reports taken {ok}, refused {refused}; events stored {}; pushes refused for budget {exhausted}; store {disk} bytes; RSS +{rss_growth} bytes",
        events.len()
    );
    assert!(refused > 0 && exhausted > 0, "the budgets never refused");
    assert!(
        events.len() <= 2_000,
        "{} container events kept for one agent",
        events.len()
    );
    assert!(
        disk < 24 << 20,
        "uplink.db and its WAL take {disk} bytes after the abuse"
    );
    assert!(rss_growth < 200 << 20, "RSS grew by {rss_growth} bytes");
    for e in &events {
        assert!(!e.name.chars().any(char::is_control), "{:?}", e.name);
        assert!(e.name.starts_with("web\\n2026"), "{:?}", e.name);
    }

    // `ctl agents` shows one row per agent, without escape sequences, and
    // the status clipped.
    let agents = b.admin().agents("").await.unwrap();
    let abuser = agents.iter().find(|a| a.id == agent.id).unwrap();
    let docker = &abuser.capacity.as_ref().unwrap().docker_status;
    assert!(
        docker.len() <= 256,
        "{} bytes of status stored",
        docker.len()
    );
    let table = agents_table(&agents);
    assert_eq!(table.lines().count(), 1 + agents.len(), "{table}");
    assert!(!table.contains('\u{1b}'), "{table}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_labels_are_refused_and_metrics_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(dir.path()).await;
    let agent = enroll(&b, "labels").await;
    let client = grpc_client(&b).await;
    let rss_before = rss_bytes(std::process::id());
    let seq = flood_huge_labels(&client, &agent).await;
    let page = scrape(&b).await;
    let rss_growth = rss_bytes(std::process::id()).saturating_sub(rss_before);
    println!(
        "{seq} batches refused; /metrics {} bytes; RSS +{rss_growth} bytes",
        page.len()
    );
    assert_eq!(
        counter(
            &page,
            "uplink_backend_metric_batches_rejected_total{reason=\"too_long\"}"
        ),
        seq
    );
    assert!(page.len() < 1 << 20, "/metrics is {} bytes", page.len());
    assert!(rss_growth < 100 << 20, "RSS grew by {rss_growth} bytes");
    b.stop().await;
}

/// A gRPC client of a backend process at `url` whose CA is `ca`.
async fn client_of(url: &str, ca: &std::path::Path) -> AgentClient {
    let trust = uplink::tls::Trust {
        ca_files: vec![ca.to_path_buf()],
        skip_os_store: true,
    };
    let tls = uplink::tls::client_config(&trust).expect("client TLS");
    let net = uplink::net::Net::new(tls, uplink::net::ProxySettings::direct());
    let keepalive = std::time::Duration::from_secs(10);
    let channel = uplink::client::grpc_channel(&url.parse().unwrap(), &net, keepalive, keepalive)
        .await
        .expect("gRPC channel");
    proto::agent_service_client::AgentServiceClient::new(channel)
}

/// Against the release-shaped binary: the figures the operator sees (the
/// process' RSS, `uplink.db` and its WAL), its log and `uplink ctl agents`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_binary_stays_bounded_and_logs_and_shows_agent_text_escaped() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = ports::free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin = uplink::secret::Secret::generate(uplink::secret::Kind::Admin);
    let enroll_token = uplink::secret::Secret::generate(uplink::secret::Kind::Enrollment);
    let backend = Proc::spawn(
        &[
            "backend",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[
            ("UPLINK_ADMIN_TOKEN", admin.expose()),
            ("UPLINK_ENROLL_TOKEN", enroll_token.expose()),
        ],
    );
    backend
        .wait_log(&["backend listening"], Duration::from_secs(30))
        .await;
    let pid = backend.child.id().expect("backend pid");
    let url = format!("https://127.0.0.1:{port}");
    let ca = data.join("ca.pem");
    let client = client_of(&url, &ca).await;
    let agent = enroll_with(&client, enroll_token.expose(), "abuser").await;
    let labeller = enroll_with(&client, enroll_token.expose(), "labeller").await;
    let rss_before = rss_bytes(pid);

    report_hostile_status(&client, &agent).await;
    flood_container_events(&client, &agent).await;
    flood_huge_labels(&client, &labeller).await;
    let rss_growth = rss_bytes(pid).saturating_sub(rss_before);
    let peak_disk = store_bytes(&data);

    // The log: the event's line is one line, with the name escaped in it.
    let line = backend
        .wait_log(&["container event", "forged line"], Duration::from_secs(30))
        .await;
    assert!(line.contains("web\\n2026-01-01"), "{line}");
    let logs = backend.logs();
    for l in logs.lines() {
        assert!(
            !l.starts_with("2026-01-01T00:00:00.000000Z"),
            "a forged log line:\n{l}"
        );
        assert!(!l.contains('\u{1b}'), "an escape sequence in the log:\n{l}");
    }

    // `uplink ctl agents`: the header and a row per agent, no escape
    // sequence.
    let out = tokio::process::Command::new(bin())
        .args(["ctl", "--backend", &url, "--ca-file"])
        .arg(&ca)
        .arg("agents")
        .env("UPLINK_ADMIN_TOKEN", admin.expose())
        .output()
        .await
        .expect("uplink ctl runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(!table.contains('\u{1b}'), "{table}");
    assert!(table.len() < 2048, "{} bytes of table", table.len());

    // The WAL is cut back by the truncating checkpoint.
    let settled = wait_for(Duration::from_secs(90), "the WAL truncated", || {
        let bytes = store_bytes(&data);
        async move { (bytes < 2 << 20).then_some(bytes) }
    })
    .await;
    println!(
        "backend RSS +{} KiB; uplink.db + WAL {peak_disk} bytes after the abuse, {settled} bytes once checkpointed",
        rss_growth / 1024
    );
    assert!(peak_disk < 24 << 20, "{peak_disk} bytes on disk");
    assert!(
        rss_growth < 100 << 20,
        "backend RSS grew by {rss_growth} bytes"
    );
}
