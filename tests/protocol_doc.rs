//! The worked example of `docs/PROTOCOL.md` stays true: the bytes of its
//! `MetricBatch` decode, with the crate's one decoder, to exactly the series
//! and samples the guide lists; the agent's encoder makes exactly those
//! bytes from those samples; and the guide's zstd frame holds those bytes.
//!
//! The guide marks each block with HTML comments,
//! `<!-- metric-batch-example:NAME -->` ... `<!-- /metric-batch-example:NAME -->`.

use std::sync::Arc;

use prost::Message;
use uplink::metrics::compress::Compression;
use uplink::metrics::encode::{self, BatchBuilder, ValueEncoding};
use uplink::metrics::sample::{Kind, Sample, Series};
use uplink::proto;

fn guide() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text between the markers of block `name`.
fn block<'a>(doc: &'a str, name: &str) -> &'a str {
    let open = format!("<!-- metric-batch-example:{name} -->");
    let close = format!("<!-- /metric-batch-example:{name} -->");
    let start = doc
        .find(&open)
        .unwrap_or_else(|| panic!("docs/PROTOCOL.md has no {open}"))
        + open.len();
    let len = doc[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("docs/PROTOCOL.md has no {close}"));
    &doc[start..start + len]
}

/// The bytes of an annotated hex block: on each line, the two-digit hex
/// numbers before a `#` (the annotation); fences and blank lines skipped.
fn hex(block: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in block.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("```") {
            continue;
        }
        for tok in line.split_whitespace() {
            assert!(
                tok.len() == 2,
                "{tok:?} in {line:?} is not a two-digit hex byte"
            );
            out.push(
                u8::from_str_radix(tok, 16).unwrap_or_else(|e| panic!("{tok:?} in {line:?}: {e}")),
            );
        }
    }
    out
}

/// The rows of a Markdown table (cells trimmed, `` ` `` removed), without
/// its header and separator.
fn rows(block: &str) -> Vec<Vec<String>> {
    block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

/// The guide's series table: index, name, labels (`name="value"`, comma
/// separated, or empty), kind, unit.
fn guide_series(doc: &str) -> Vec<Series> {
    rows(block(doc, "series"))
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.len(), 5, "series row {i}: {r:?}");
            assert_eq!(r[0], i.to_string(), "series rows are in index order");
            let kind = match r[3].as_str() {
                "GAUGE" => Kind::Gauge,
                "COUNTER" => Kind::Counter,
                k => panic!("series row {i}: kind {k:?}"),
            };
            let mut s = Series::new(r[1].clone(), kind);
            for pair in r[2].split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (n, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("series row {i}: label {pair:?}"));
                s = s.label(n, v.trim_matches('"'));
            }
            let unit = if r[4] == "-" { "" } else { r[4].as_str() };
            s.unit(unit)
        })
        .collect()
}

/// The guide's samples table: index, series index, time, value.
fn guide_samples(doc: &str, series: &[Arc<Series>]) -> Vec<Sample> {
    rows(block(doc, "samples"))
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r.len(), 4, "sample row {i}: {r:?}");
            assert_eq!(r[0], i.to_string(), "sample rows are in order");
            let s: usize = r[1].parse().expect("series index");
            Sample {
                series: series[s].clone(),
                time_unix_ms: r[2].parse().expect("time"),
                value: r[3].parse().expect("value"),
            }
        })
        .collect()
}

#[test]
fn the_guides_metric_batch_decodes_to_the_samples_it_lists() {
    let doc = guide();
    let bytes = hex(block(&doc, "hex"));
    let series: Vec<Arc<Series>> = guide_series(&doc).into_iter().map(Arc::new).collect();
    let samples = guide_samples(&doc, &series);
    assert!(!samples.is_empty());

    let decoded = encode::decode_bytes(&bytes).expect("the guide's batch is valid");
    assert_eq!(decoded.series.len(), series.len(), "series count");
    for (i, (got, want)) in decoded.series.iter().zip(&series).enumerate() {
        assert_eq!(**got, **want, "series {i}");
    }
    assert_eq!(decoded.points.len(), samples.len(), "sample count");
    for (i, (got, want)) in decoded.samples().zip(&samples).enumerate() {
        assert_eq!(*got.series, *want.series, "sample {i}: series");
        assert_eq!(got.time_unix_ms, want.time_unix_ms, "sample {i}: time");
        assert_eq!(
            got.value.to_bits(),
            want.value.to_bits(),
            "sample {i}: value {} != {}",
            got.value,
            want.value
        );
    }

    // The columns the guide walks through.
    let batch = proto::MetricBatch::decode(bytes.as_slice()).expect("protobuf");
    assert!(batch.sample_series.is_empty(), "the example uses deltas");
    assert!(batch.sample_values.is_empty(), "the example uses integers");
    let scales = doc_scales(&doc);
    assert_eq!(batch.series_value_scales, scales, "series_value_scales");
}

/// The scales the guide states, from its `scales:` line.
fn doc_scales(doc: &str) -> Vec<u32> {
    let line = block(doc, "scales").trim().to_string();
    line.trim_start_matches("series_value_scales:")
        .trim()
        .trim_matches(|c| c == '[' || c == ']' || c == '`')
        .split(',')
        .map(|s| s.trim().parse().expect("scale"))
        .collect()
}

#[test]
fn the_agent_encodes_the_guides_samples_into_the_guides_bytes() {
    let doc = guide();
    let bytes = hex(block(&doc, "hex"));
    let series: Vec<Arc<Series>> = guide_series(&doc).into_iter().map(Arc::new).collect();
    let samples = guide_samples(&doc, &series);
    let mut b = BatchBuilder::with_encoding(ValueEncoding::Integers);
    b.set_series_deltas(true);
    for s in &samples {
        b.add(s).expect("sample");
    }
    let built = b.finish().encode_to_vec();
    let spaced = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        spaced(&built),
        spaced(&bytes),
        "the agent's encoder makes other bytes than the guide shows"
    );
}

#[test]
fn the_guides_zstd_frame_holds_the_batch() {
    let doc = guide();
    let bytes = hex(block(&doc, "hex"));
    let frame = hex(block(&doc, "zstd"));
    let out = Compression::Zstd
        .decompress(&frame, 1 << 20)
        .expect("the guide's zstd frame decompresses");
    assert_eq!(
        out, bytes,
        "the zstd frame holds other bytes than the batch"
    );
}

/// Prints the zstd frame of the guide's batch as the agent makes it, for
/// updating the guide: `cargo test --test protocol_doc -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn print_the_zstd_frame() {
    let doc = guide();
    let bytes = hex(block(&doc, "hex"));
    let frame = Compression::Zstd.compress(&bytes).unwrap();
    for chunk in frame.chunks(16) {
        let line: Vec<String> = chunk.iter().map(|x| format!("{x:02x}")).collect();
        println!("{}", line.join(" "));
    }
}
