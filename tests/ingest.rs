//! The backend's metrics path with real clients over real TLS: batches
//! pushed through a tonic client (zstd and gzip message compression) and
//! through Connect unary with curl (`Content-Encoding: zstd`/`gzip`),
//! exactly-once storage in any order, rejected batches, `/metrics` behind
//! the admin token, and the JSON-lines files (content, rotation, flush on
//! stop).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::codec::CompressionEncoding;
use uplink::metrics::compress::Compression;
use uplink::metrics::encode::{BatchBuilder, ValueEncoding};
use uplink::metrics::sample::{Kind, Series};
use uplink::proto;
use uplink_testkit::push::{
    counter, curl, enroll, grpc_client, json_lines, jsonl_files, push_curl, push_curl_raw,
    push_grpc, push_grpc_response, push_request, push_request_zstd, push_zstd, sample, scrape,
    stored, zstd_batch,
};
use uplink_testkit::*;

/// A batch of `n` samples of a counter with container labels and a gauge,
/// values `first..first + n` (so sums are easy to check).
fn batch(series: &[Arc<Series>], first: u64, n: u64, time: i64) -> proto::MetricBatch {
    batch_with(BatchBuilder::new(), series, first, n, time)
}

/// The same samples, with the series indexes as `sample_series_deltas`.
fn batch_with_deltas(series: &[Arc<Series>], first: u64, n: u64, time: i64) -> proto::MetricBatch {
    let mut bb = BatchBuilder::new();
    bb.set_series_deltas(true);
    let b = batch_with(bb, series, first, n, time);
    assert!(b.sample_series.is_empty() && !b.sample_series_deltas.is_empty());
    b
}

fn batch_with(
    mut bb: BatchBuilder,
    series: &[Arc<Series>],
    first: u64,
    n: u64,
    time: i64,
) -> proto::MetricBatch {
    for i in 0..n {
        let s = &series[(i % series.len() as u64) as usize];
        let id = bb.series(s).unwrap();
        bb.push(id, time + i as i64, (first + i) as f64).unwrap();
    }
    bb.finish()
}

fn series() -> Vec<Arc<Series>> {
    vec![
        Arc::new(
            Series::new("loadgen_requests", Kind::Counter)
                .label("com.docker.compose.service", "web")
                .label("container", "web-1"),
        ),
        Arc::new(Series::new("host_load1", Kind::Gauge).unit("ratio")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_on_both_rungs_reach_metrics_and_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jsonl");
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.metrics_jsonl_dir = Some(jsonl.clone());
    let b = TestBackend::start_with(cfg.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let agent = enroll(&b, "lg-1").await;
    let client = grpc_client(&b).await;
    let s = series();
    let t0 = 1_700_000_000_000;

    // gRPC with zstd and gzip message compression; the backend says it
    // reads series deltas, and the second batch uses them.
    let r = push_grpc_response(
        &client,
        &agent,
        CompressionEncoding::Zstd,
        push_request(7, 1, batch(&s, 1, 10, t0)),
    )
    .await
    .unwrap();
    assert!(
        r.stored && r.reads_series_deltas && r.reads_batch_zstd,
        "{r:?}"
    );
    let r = push_grpc(
        &client,
        &agent,
        CompressionEncoding::Gzip,
        push_request(7, 2, batch_with_deltas(&s, 11, 10, t0 + 100)),
    )
    .await;
    assert!(r.unwrap());
    // Connect unary with curl: a zstd body, a gzip body (series deltas),
    // a plain body (the batch as a zstd frame, as agents send it).
    for (seq, c) in [
        (3, Compression::Zstd),
        (4, Compression::Gzip),
        (5, Compression::Identity),
    ] {
        let first = (seq - 1) * 10 + 1;
        let samples = if seq == 4 { batch_with_deltas } else { batch };
        let make = if seq == 5 {
            push_request_zstd
        } else {
            push_request
        };
        let req = make(7, seq, samples(&s, first, 10, t0 + 100 * seq as i64));
        let a = push_curl(&b, &agent, dir.path(), c, None, &req).await;
        assert!(stored(&a), "{}: {}", c.name(), a.text());
    }

    // /metrics needs the admin token, and says so.
    let a = curl(&b, "/metrics", &[]).await;
    assert_eq!(a.status, 401);
    assert!(
        a.text().contains("Authorization: Bearer <admin token>"),
        "{}",
        a.text()
    );
    let a = curl(&b, "/metrics", &["-H", "authorization: Bearer upl_a_wrong"]).await;
    assert_eq!(a.status, 401);
    assert!(a.text().contains("admin token rejected"), "{}", a.text());
    let page = scrape(&b).await;
    let labels = format!(
        "agent=\"{}\",provider=\"default\",hostname=\"lg-1\"",
        agent.id
    );
    // The latest values: 49 (counter, even index) and 50 (gauge), with the
    // samples' own times.
    assert_eq!(
        sample(
            &page,
            &format!(
                "loadgen_requests{{{labels},com_docker_compose_service=\"web\",container=\"web-1\"}}"
            )
        )
        .as_deref(),
        Some(format!("49.0 {}", t0 + 500 + 8).as_str()),
        "{page}"
    );
    assert_eq!(
        sample(&page, &format!("host_load1{{{labels}}}")).as_deref(),
        Some(format!("50.0 {}", t0 + 500 + 9).as_str()),
        "{page}"
    );
    assert_eq!(page.matches("# TYPE loadgen_requests counter\n").count(), 1);
    assert_eq!(page.matches("# TYPE host_load1 gauge\n").count(), 1);
    assert_eq!(counter(&page, "uplink_backend_metric_batches_total"), 5);
    assert_eq!(counter(&page, "uplink_backend_metric_samples_total"), 50);
    assert_eq!(counter(&page, "uplink_backend_metric_series"), 2);

    // Stopping flushes and closes the files; every sample is there once.
    let (cfg, _) = b.stop().await;
    let lines = json_lines(&jsonl);
    assert_eq!(lines.len(), 50);
    let sum: f64 = lines.iter().map(|l| l["value"].as_f64().unwrap()).sum();
    assert_eq!(sum, (1..=50).sum::<u64>() as f64);
    let first = &lines[0];
    assert_eq!(first["agent"], agent.id.as_str());
    assert_eq!(first["provider"], "default");
    assert_eq!(first["hostname"], "lg-1");
    assert_eq!(first["name"], "loadgen_requests");
    assert_eq!(first["kind"], "counter");
    assert_eq!(first["unit"], "");
    assert_eq!(first["time_unix_ms"], t0);
    assert_eq!(
        first["labels"],
        serde_json::json!({"com.docker.compose.service": "web", "container": "web-1"})
    );
    assert_eq!(lines[1]["unit"], "ratio");
    assert_eq!(lines[1]["kind"], "gauge");

    // After a restart, the same batches are duplicates on either rung.
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let client = grpc_client(&b).await;
    let r = push_zstd(
        &client,
        &agent,
        push_request(7, 3, batch(&s, 21, 10, t0 + 300)),
    )
    .await;
    assert!(!r.unwrap(), "a stored batch, sent again after a restart");
    let req = push_request(7, 1, batch(&s, 1, 10, t0));
    let a = push_curl(&b, &agent, dir.path(), Compression::Zstd, None, &req).await;
    assert!(!stored(&a));
    let page = scrape(&b).await;
    assert_eq!(counter(&page, "uplink_backend_metric_batches_total"), 0);
    assert_eq!(
        counter(&page, "uplink_backend_metric_batches_duplicate_total"),
        2
    );
    b.stop().await;
    assert_eq!(json_lines(&jsonl).len(), 50, "no line written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_any_order_and_sent_twice_are_stored_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jsonl");
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.metrics_jsonl_dir = Some(jsonl.clone());
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = Arc::new(enroll(&b, "lg-2").await);
    let client = grpc_client(&b).await;
    let s = series();
    let epoch = 42;
    const N: u64 = 40;
    const PER: u64 = 25;

    // Every batch twice, seqs shuffled, all in flight at once; half on
    // each rung. A copy may meet its twin while it is being stored
    // (UNAVAILABLE, "retry"): it retries, as an agent does.
    let mut order: Vec<u64> = (1..=N).chain(1..=N).collect();
    fastrand::seed(7);
    fastrand::shuffle(&mut order);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, seq) in order.into_iter().enumerate() {
        let (client, agent, s) = (client.clone(), agent.clone(), s.clone());
        let dir = dir.path().to_path_buf();
        let ca = b.ca.clone();
        let port = b.addr.port();
        tasks.spawn(async move {
            let req = push_request(
                epoch,
                seq,
                batch(&s, (seq - 1) * PER + 1, PER, 1_000 * seq as i64),
            );
            for _ in 0..500 {
                let outcome = if i % 2 == 0 {
                    push_zstd(&client, &agent, req.clone()).await
                } else {
                    let body = Compression::Zstd.compress(&req.encode_to_vec()).unwrap();
                    let file = dir.join(format!("b-{i}.bin"));
                    std::fs::write(&file, body).unwrap();
                    let out = tokio::process::Command::new("curl")
                        .args(["-sS", "--max-time", "30", "--cacert"])
                        .arg(&ca)
                        .args([
                            "-w",
                            "\n%{http_code}",
                            "-H",
                            "content-type: application/proto",
                        ])
                        .args(["-H", "content-encoding: zstd", "-H"])
                        .arg(format!("authorization: Bearer {}", agent.credential))
                        .arg("--data-binary")
                        .arg(format!("@{}", file.display()))
                        .arg(format!(
                            "https://localhost:{port}/uplink.v1.AgentService/PushMetrics"
                        ))
                        .output()
                        .await
                        .unwrap();
                    let mut body = out.stdout;
                    let nl = body.iter().rposition(|&c| c == b'\n').unwrap();
                    let status: u16 = String::from_utf8_lossy(&body[nl + 1..]).parse().unwrap();
                    body.truncate(nl);
                    if status == 200 {
                        Ok(proto::PushMetricsResponse::decode(body.as_slice())
                            .unwrap()
                            .stored)
                    } else {
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let code =
                            uplink::connect::code_from_name(v["code"].as_str().unwrap()).unwrap();
                        Err(tonic::Status::new(code, v["message"].as_str().unwrap()))
                    }
                };
                match outcome {
                    Ok(stored) => return (seq, stored),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(s) => panic!("seq {seq}: {s:?}"),
                }
            }
            panic!("seq {seq}: still unavailable after 500 tries (10 s)")
        });
    }
    let mut stored_per_seq: HashMap<u64, u32> = HashMap::new();
    let mut answers = 0;
    while let Some(r) = tasks.join_next().await {
        let (seq, stored) = r.unwrap();
        answers += 1;
        *stored_per_seq.entry(seq).or_default() += u32::from(stored);
    }
    assert_eq!(answers, 2 * N);
    assert!(
        (1..=N).all(|seq| stored_per_seq.get(&seq) == Some(&1)),
        "each seq stored exactly once: {stored_per_seq:?}"
    );
    assert_eq!(
        watermark(&b, &agent.id, epoch).await,
        (N, 0),
        "the watermark closed over every seq"
    );
    let page = scrape(&b).await;
    assert_eq!(counter(&page, "uplink_backend_metric_batches_total"), N);
    assert_eq!(
        counter(&page, "uplink_backend_metric_samples_total"),
        N * PER
    );
    assert_eq!(
        counter(&page, "uplink_backend_metric_batches_duplicate_total"),
        N
    );

    // A lower seq arriving after higher ones (a replay of spooled
    // batches) is stored; a seq far beyond the watermark is refused.
    let other = 43;
    for seq in [3, 2] {
        let r = push_grpc(
            &client,
            &agent,
            CompressionEncoding::Zstd,
            push_request(other, seq, batch(&s, 0, 1, 0)),
        )
        .await;
        assert!(r.unwrap(), "seq {seq}");
    }
    assert_eq!(watermark(&b, &agent.id, other).await, (0, 2));
    let err = push_zstd(
        &client,
        &agent,
        push_request(other, 100_001 + 1, batch(&s, 0, 1, 0)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("send batch 1 first"), "{err:?}");
    let r = push_zstd(&client, &agent, push_request(other, 1, batch(&s, 0, 1, 0))).await;
    assert!(r.unwrap());
    assert_eq!(watermark(&b, &agent.id, other).await, (3, 0));

    b.stop().await;
    let lines = json_lines(&jsonl);
    assert_eq!(lines.len() as u64, N * PER + 3);
    let sum: f64 = lines
        .iter()
        .filter(|l| l["value"].as_f64() != Some(0.0))
        .map(|l| l["value"].as_f64().unwrap())
        .sum();
    assert_eq!(sum, (1..=N * PER).sum::<u64>() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_is_rejected_with_its_reason_and_the_next_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBackend::start(&dir.path().join("backend")).await;
    let agent = enroll(&b, "lg-3").await;
    let client = grpc_client(&b).await;
    let s = series();
    let epoch = 9;

    let r = push_zstd(&client, &agent, push_request(epoch, 1, batch(&s, 1, 4, 0))).await;
    assert!(r.unwrap());
    // A sample that refers to a series the batch does not define.
    let mut bad = batch(&s, 1, 4, 0);
    bad.sample_series[2] = 7;
    let err = push_zstd(&client, &agent, push_request(epoch, 2, bad.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with(
            "metric batch rejected (series_out_of_range): metric batch sample 2 refers to series 7"
        ),
        "{err:?}"
    );
    // The same over Connect, and a batch whose columns differ.
    let req = push_request(epoch, 2, bad);
    let a = push_curl(&b, &agent, dir.path(), Compression::Gzip, None, &req).await;
    assert_eq!(a.status, 400);
    let (code, message) = a.connect_error();
    assert_eq!(code, "invalid_argument");
    assert!(message.contains("(series_out_of_range)"), "{message}");
    let mut uneven = batch(&s, 1, 4, 0);
    uneven.sample_time_delta_ms.pop();
    let req = push_request(epoch, 3, uneven);
    let a = push_curl(&b, &agent, dir.path(), Compression::Zstd, None, &req).await;
    let (code, message) = a.connect_error();
    assert_eq!((a.status, code.as_str()), (400, "invalid_argument"));
    assert!(message.contains("(column_lengths)"), "{message}");
    // The batch as a zstd frame: not a frame, and both forms at once.
    let mut not_zstd = push_request(epoch, 4, batch(&s, 1, 4, 0));
    not_zstd.batch = None;
    not_zstd.batch_zstd = b"not zstd".to_vec();
    let err = push_grpc(&client, &agent, CompressionEncoding::Gzip, not_zstd)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("metric batch rejected (batch_zstd): batch_zstd is not a zstd frame"),
        "{err:?}"
    );
    let mut both = push_request(epoch, 4, batch(&s, 1, 4, 0));
    both.batch_zstd = zstd_batch(&batch(&s, 1, 4, 0));
    let err = push_grpc(&client, &agent, CompressionEncoding::Gzip, both)
        .await
        .unwrap_err();
    assert!(err.message().contains("(both_batch_forms)"), "{err:?}");
    // Both series columns, and a running index that leaves the series.
    let mut mixed = batch(&s, 1, 4, 0);
    mixed.sample_series_deltas = vec![0, 1, -1, 1];
    let err = push_zstd(&client, &agent, push_request(epoch, 4, mixed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("(mixed_series_columns)"), "{err:?}");
    let mut astray = batch_with_deltas(&s, 1, 4, 0);
    astray.sample_series_deltas[3] = -2;
    let err = push_zstd(&client, &agent, push_request(epoch, 5, astray))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with(
            "metric batch rejected (series_out_of_range): metric batch sample 3 refers to series -2"
        ),
        "{err:?}"
    );

    // The next good batch is stored, and the rejected seqs do not hold
    // the watermark back.
    let r = push_zstd(
        &client,
        &agent,
        push_request_zstd(epoch, 6, batch(&s, 5, 4, 10)),
    )
    .await;
    assert!(r.unwrap());
    assert_eq!(watermark(&b, &agent.id, epoch).await, (6, 0));
    let page = scrape(&b).await;
    assert_eq!(counter(&page, "uplink_backend_metric_batches_total"), 2);
    assert_eq!(counter(&page, "uplink_backend_metric_samples_total"), 8);
    assert_eq!(
        counter(
            &page,
            "uplink_backend_metric_batches_rejected_total{reason=\"series_out_of_range\"}"
        ),
        3
    );
    assert_eq!(
        counter(
            &page,
            "uplink_backend_metric_batches_rejected_total{reason=\"mixed_series_columns\"}"
        ),
        1
    );
    assert_eq!(
        counter(
            &page,
            "uplink_backend_metric_batches_rejected_total{reason=\"column_lengths\"}"
        ),
        1
    );
    // Seq 0 is not a batch number.
    let err = push_zstd(&client, &agent, push_request(epoch, 0, batch(&s, 1, 1, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("(bad_seq)"), "{err:?}");

    // A large batch (decoded, and its body decompressed, off the async
    // workers) in doubles that barely compress.
    let mut big = BatchBuilder::with_encoding(ValueEncoding::Doubles);
    big.set_series_deltas(true);
    for (i, s) in s.iter().cycle().take(30_000).enumerate() {
        let id = big.series(s).unwrap();
        big.push(id, i as i64, fastrand::f64()).unwrap();
    }
    let req = push_request(epoch, 7, big.finish());
    let packed = Compression::Gzip.compress(&req.encode_to_vec()).unwrap();
    assert!(packed.len() > 100_000, "{} bytes", packed.len());
    let a = push_curl(&b, &agent, dir.path(), Compression::Gzip, None, &req).await;
    assert!(stored(&a), "{}", a.text());
    let page = scrape(&b).await;
    assert_eq!(
        counter(&page, "uplink_backend_metric_samples_total"),
        8 + 30_000
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_unknown_encodings_corrupt_or_too_large_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.max_message_bytes = 64 * 1024;
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = enroll(&b, "lg-4").await;
    let s = series();
    let req = push_request(1, 1, batch(&s, 1, 10, 0));

    // Brotli is not something this backend reads.
    let a = push_curl(
        &b,
        &agent,
        dir.path(),
        Compression::Identity,
        Some("br"),
        &req,
    )
    .await;
    let (code, message) = a.connect_error();
    assert_eq!((a.status, code.as_str()), (501, "unimplemented"));
    assert!(
        message.contains("\"br\"") && message.contains("zstd, gzip or identity"),
        "{message}"
    );
    // Not zstd at all.
    let a = push_curl_raw(&b, &agent, dir.path(), "zstd", b"definitely not zstd").await;
    let (code, message) = a.connect_error();
    assert_eq!((a.status, code.as_str()), (400, "invalid_argument"));
    assert!(message.contains("not valid zstd"), "{message}");
    // Small on the wire, over the limit once decompressed.
    for c in [Compression::Zstd, Compression::Gzip] {
        let bomb = c.compress(&vec![0u8; 1 << 20]).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let a = push_curl_raw(&b, &agent, dir.path(), c.name(), &bomb).await;
        let (code, message) = a.connect_error();
        assert_eq!(
            (a.status, code.as_str()),
            (413, "resource_exhausted"),
            "{message}"
        );
        assert!(message.contains("65536"), "{message}");
    }
    // The same limit on the gRPC rung, applied after decompression.
    let mut big = BatchBuilder::new();
    let id = big.series(&s[0]).unwrap();
    for i in 0..40_000 {
        big.push(id, i, 0.0).unwrap();
    }
    let err = push_grpc(
        &grpc_client(&b).await,
        &agent,
        CompressionEncoding::Zstd,
        push_request(1, 2, big.finish()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("65536"), "{err:?}");
    // And a good compressed batch still goes through.
    let a = push_curl(&b, &agent, dir.path(), Compression::Zstd, None, &req).await;
    assert!(stored(&a), "{}", a.text());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_rotate_at_the_size_limit_and_keep_the_newest_files() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jsonl");
    let mut cfg = TestBackend::config(&dir.path().join("backend"));
    cfg.metrics_jsonl_dir = Some(jsonl.clone());
    cfg.metrics_jsonl_max_bytes = 8192;
    cfg.metrics_jsonl_keep = 3;
    let b = TestBackend::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let agent = enroll(&b, "lg-5").await;
    let client = grpc_client(&b).await;
    let s = series();
    const N: u64 = 30;
    const PER: u64 = 20;
    for seq in 1..=N {
        let r = push_zstd(
            &client,
            &agent,
            push_request(
                5,
                seq,
                batch(&s, (seq - 1) * PER + 1, PER, seq as i64 * 1000),
            ),
        )
        .await;
        assert!(r.unwrap());
    }
    let page = scrape(&b).await;
    assert_eq!(
        counter(&page, "uplink_backend_metric_jsonl_lines_total"),
        N * PER
    );
    let started = counter(&page, "uplink_backend_metric_jsonl_files_total");
    assert!(started > 3, "{started} files for {N} batches");
    assert_eq!(
        counter(&page, "uplink_backend_metric_jsonl_files_deleted_total"),
        started - 3
    );
    b.stop().await;

    let files = jsonl_files(&jsonl);
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 8192, "{f:?}: {len} bytes");
    }
    // What is kept is the newest lines, whole and in order, ending with
    // the last sample pushed.
    let values: Vec<f64> = json_lines(&jsonl)
        .iter()
        .map(|l| l["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values.last(), Some(&((N * PER) as f64)));
    assert!(values.windows(2).all(|w| w[1] == w[0] + 1.0), "{values:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metrics_settings_exit_64_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a dir").unwrap();
    let data = dir.path().join("data");
    let under_file = file.join("jsonl");
    let cases: [(&[&str], &[&str]); 2] = [
        (
            &["--metrics-jsonl-dir", under_file.to_str().unwrap()],
            &["--metrics-jsonl-dir", "a-file/jsonl"],
        ),
        (
            &["--metrics-jsonl-keep", "0", "--metrics-max-series", "0"],
            &[
                "--metrics-max-series 0 is out of range",
                "--metrics-jsonl-keep 0 is out of range",
            ],
        ),
    ];
    for (extra, expect) in cases {
        let mut args = vec![
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(&args, &[]);
        let status = p.exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(64), "{extra:?}: {}", p.logs());
        for e in expect {
            assert!(p.logs().contains(e), "{extra:?}: {e:?} not in {}", p.logs());
        }
    }
}

/// The backend's stored position for `(agent, epoch)`: the contiguous
/// watermark and how many batches it holds above it.
async fn watermark(b: &TestBackend, agent: &str, epoch: u64) -> (u64, u64) {
    b.core
        .store()
        .metric_batches(agent, epoch)
        .await
        .expect("the store answers")
}
