//! Tests of the batch format: round trips through the builder and the
//! decoder in both value encodings, the scale each series gets, series
//! deltas, and every way a batch is refused or rejected, hostile bytes
//! included.

use super::*;
use prost::Message;

fn series(name: &str, labels: &[(&str, &str)]) -> Arc<Series> {
    let mut s = Series::new(name, Kind::Gauge);
    for (n, v) in labels {
        s = s.label(*n, *v);
    }
    Arc::new(s)
}

fn sample(series: &Arc<Series>, time_unix_ms: i64, value: f64) -> Sample {
    Sample {
        series: series.clone(),
        time_unix_ms,
        value,
    }
}

fn build(samples: &[Sample], encoding: ValueEncoding) -> proto::MetricBatch {
    let mut b = BatchBuilder::with_encoding(encoding);
    for s in samples {
        b.add(s).unwrap();
    }
    b.finish()
}

/// Decodes the protobuf bytes of `batch` and checks that they give back
/// `samples` exactly: same series, same times, same value bits.
fn assert_round_trip(batch: &proto::MetricBatch, samples: &[Sample]) {
    let decoded = decode_bytes(&batch.encode_to_vec()).unwrap();
    assert_eq!(decoded.points.len(), samples.len());
    for (i, (got, want)) in decoded.samples().zip(samples).enumerate() {
        assert_eq!(*got.series, *want.series, "sample {i}");
        assert_eq!(got.time_unix_ms, want.time_unix_ms, "sample {i}");
        assert_eq!(
            got.value.to_bits(),
            want.value.to_bits(),
            "sample {i}: {} != {}",
            got.value,
            want.value
        );
    }
}

/// A value of one of the shapes metrics take, and some they should not.
fn random_value(rng: &mut fastrand::Rng) -> f64 {
    match rng.u8(0..10) {
        0 => rng.i64(-1000..1000) as f64,
        1 => rng.i64(-MAX_DECIMAL_INTEGER..=MAX_DECIMAL_INTEGER) as f64,
        2 => rng.i64(-1_000_000..1_000_000) as f64 / POW10[rng.usize(1..7)],
        3 => f64::from(rng.f32() * 100.0) / 100.0,
        4 => rng.f64() * 1e300,
        5 => f64::from_bits(rng.u64(..)),
        6 => [
            0.0,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE / 3.0,
        ][rng.usize(0..6)],
        7 => 9_007_199_254_740_994.0 * if rng.bool() { 1.0 } else { -1.0 },
        _ => rng.u64(0..1 << 40) as f64 * 4096.0,
    }
}

fn random_series(rng: &mut fastrand::Rng) -> Series {
    const WORDS: [&str; 8] = [
        "cpu",
        "mem",
        "net",
        "disk",
        "a",
        "b",
        "\u{e9}t\u{e9}",
        "x y",
    ];
    let mut s = Series::new(
        format!("m_{}", WORDS[rng.usize(0..WORDS.len())]),
        if rng.bool() {
            Kind::Gauge
        } else {
            Kind::Counter
        },
    );
    for _ in 0..rng.usize(0..4) {
        let value = if rng.u8(0..5) == 0 {
            String::new()
        } else {
            WORDS[rng.usize(0..8)].to_string()
        };
        s = s.label(WORDS[rng.usize(0..WORDS.len())], value);
    }
    if rng.bool() {
        s = s.unit(["bytes", "s", "1"][rng.usize(0..3)]);
    }
    s
}

#[test]
fn random_batches_round_trip_bit_for_bit() {
    let mut rng = fastrand::Rng::with_seed(0x0b5e_55ed);
    // One builder across many batches, as in an agent; and fresh ones.
    let mut long_lived = BatchBuilder::new();
    for round in 0..400 {
        let pool: Vec<Arc<Series>> = (0..rng.usize(1..40))
            .map(|_| Arc::new(random_series(&mut rng)))
            .collect();
        let mut time = rng.i64(-1 << 50..1 << 50);
        let samples: Vec<Sample> = (0..rng.usize(0..300))
            .map(|_| {
                time = (time + rng.i64(-100_000..100_000)).clamp(-MAX_ABS_TIME_MS, MAX_ABS_TIME_MS);
                if rng.u8(0..50) == 0 {
                    time = rng.i64(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS);
                }
                // Now and then an equal series in another `Arc`.
                let s = &pool[rng.usize(0..pool.len())];
                let s = if rng.u8(0..10) == 0 {
                    Arc::new((**s).clone())
                } else {
                    s.clone()
                };
                Sample {
                    series: s,
                    time_unix_ms: time,
                    value: random_value(&mut rng),
                }
            })
            .collect();
        let encoding = if rng.u8(0..4) == 0 {
            ValueEncoding::Doubles
        } else {
            ValueEncoding::Integers
        };
        let batch = if round % 2 == 0 {
            // Both series columns, switched as an agent switches them.
            long_lived.set_series_deltas(round % 4 == 0);
            for s in &samples {
                long_lived.add(s).unwrap();
            }
            long_lived.finish()
        } else {
            build(&samples, encoding)
        };
        if batch.series_value_scales.len() + batch.sample_values.len() > 0 {
            let deltas = !batch.sample_series_deltas.is_empty();
            assert_eq!(deltas, round % 4 == 0 && !samples.is_empty());
            assert_eq!(batch.sample_series.is_empty(), deltas);
        }
        assert_round_trip(&batch, &samples);
        // Series are defined once, however many `Arc`s carry them.
        let distinct: std::collections::HashSet<&Series> =
            samples.iter().map(|s| &*s.series).collect();
        assert_eq!(batch.series.len(), distinct.len());
    }
}

#[test]
fn values_take_the_fewest_decimals_or_their_bits() {
    let (a, b, c, d) = (
        series("a", &[]),
        series("b", &[]),
        series("c", &[]),
        series("d", &[]),
    );
    let samples = [
        sample(&a, 0, 1.5),
        sample(&b, 0, 1e12),
        sample(&c, 0, f64::from(0.3f32)),
        sample(&d, 0, 7.0),
        sample(&a, 10, 2.25),
        sample(&b, 10, 1e12 + 2000.0),
        sample(&c, 10, f64::NAN),
        sample(&d, 10, -0.0),
    ];
    let batch = build(&samples, ValueEncoding::Integers);
    assert_eq!(batch.series_value_scales, vec![2, 0, RAW_BITS, RAW_BITS]);
    assert!(batch.sample_values.is_empty());
    assert_eq!(batch.sample_value_deltas[0], 150);
    assert_eq!(batch.sample_value_deltas[4], 75);
    assert_eq!(batch.sample_value_deltas[1], 1_000_000_000_000);
    assert_eq!(batch.sample_value_deltas[5], 2000);
    assert_eq!(batch.sample_time_delta_ms, vec![0, 0, 0, 0, 10, 0, 0, 0]);
    assert_round_trip(&batch, &samples);
}

#[test]
fn integers_beyond_2_pow_53_use_bits() {
    let a = series("a", &[]);
    let samples = [
        sample(&a, 0, 9_007_199_254_740_992.0),
        sample(&a, 1, 9_007_199_254_740_994.0),
    ];
    let batch = build(&samples, ValueEncoding::Integers);
    assert_eq!(batch.series_value_scales, vec![RAW_BITS]);
    assert_round_trip(&batch, &samples);
}

#[test]
fn the_doubles_encoding_is_the_first_contract() {
    let a = series("host_load_average", &[("period", "1m")]);
    let samples = [sample(&a, 1_000, 0.25), sample(&a, 11_000, 0.5)];
    let batch = build(&samples, ValueEncoding::Doubles);
    assert_eq!(batch.sample_values, vec![0.25, 0.5]);
    assert!(batch.series_value_scales.is_empty() && batch.sample_value_deltas.is_empty());
    assert_eq!(batch.symbols, vec!["", "host_load_average", "period", "1m"]);
    assert_eq!(batch.series[0].labels, vec![2, 3]);
    assert_eq!(
        (batch.base_time_unix_ms, batch.sample_time_delta_ms.clone()),
        (1_000, vec![0, 10_000])
    );
    assert_round_trip(&batch, &samples);
}

#[test]
fn an_empty_batch_is_valid() {
    let batch = BatchBuilder::new().finish();
    assert_eq!(batch, proto::MetricBatch::default());
    assert_eq!(decode(&batch).unwrap(), Decoded::default());
}

#[test]
fn bad_series_and_samples_are_refused_by_the_builder() {
    let mut b = BatchBuilder::new();
    assert_eq!(b.series(&series("", &[])), Err(EncodeError::EmptyName));
    let unsorted = Arc::new(Series {
        labels: vec![("b".into(), "1".into()), ("a".into(), "2".into())],
        ..Series::new("m", Kind::Gauge)
    });
    assert!(matches!(
        b.series(&unsorted),
        Err(EncodeError::UnsortedLabels { .. })
    ));
    let twice = Arc::new(Series {
        labels: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        ..Series::new("m", Kind::Gauge)
    });
    assert!(matches!(
        b.series(&twice),
        Err(EncodeError::UnsortedLabels { .. })
    ));
    assert!(matches!(
        b.series(&series("m", &[("", "x")])),
        Err(EncodeError::EmptyLabelName { .. })
    ));
    let m = b.series(&series("m", &[])).unwrap();
    assert_eq!(
        b.push(m, MAX_ABS_TIME_MS + 1, 0.0),
        Err(EncodeError::TimeOutOfRange(MAX_ABS_TIME_MS + 1))
    );
    b.push(m, 5, 1.0).unwrap();
    let batch = b.finish();
    assert_eq!(decode(&batch).unwrap().points.len(), 1);
    // An id is valid until `finish`.
    assert_eq!(b.push(m, 6, 1.0), Err(EncodeError::UnknownSeries(0)));
    assert!(b.is_empty());
}

#[test]
fn the_builder_remembers_the_last_two_batches_of_series() {
    let (a, b) = (series("a", &[("k", "v")]), series("b", &[]));
    let mut builder = BatchBuilder::new();
    builder.add(&sample(&a, 0, 1.0)).unwrap();
    builder.add(&sample(&b, 0, 1.0)).unwrap();
    builder.finish();
    builder.add(&sample(&a, 10, 2.0)).unwrap();
    let second = builder.finish();
    // Each batch stands alone.
    assert_eq!(second.symbols, vec!["", "a", "k", "v"]);
    assert_round_trip(&second, &[sample(&a, 10, 2.0)]);
    assert_eq!(builder.known.len(), 2);
    builder.add(&sample(&a, 20, 3.0)).unwrap();
    builder.finish();
    // `b` was last used two batches ago.
    assert_eq!(builder.known.len(), 1);
}

fn valid() -> proto::MetricBatch {
    let a = series("m", &[("a", "1"), ("b", "2")]);
    build(
        &[sample(&a, 100, 1.0), sample(&a, 110, 2.5)],
        ValueEncoding::Integers,
    )
}

#[test]
fn inconsistent_batches_are_rejected_with_the_reason() {
    fn err(f: impl FnOnce(&mut proto::MetricBatch)) -> DecodeError {
        let mut b = valid();
        f(&mut b);
        decode(&b).unwrap_err()
    }
    assert!(decode(&valid()).is_ok());
    assert!(matches!(
        err(|b| b.sample_series.push(0)),
        DecodeError::ColumnLengths { series: 3, .. }
    ));
    assert!(matches!(
        err(|b| {
            b.sample_time_delta_ms.pop();
        }),
        DecodeError::ColumnLengths { times: 1, .. }
    ));
    assert!(matches!(
        err(|b| b.sample_values = vec![1.0, 2.0]),
        DecodeError::MixedValueEncodings
    ));
    assert!(matches!(
        err(|b| b.series_value_scales.push(0)),
        DecodeError::ScalesLength {
            scales: 2,
            series: 1
        }
    ));
    assert!(matches!(
        err(|b| b.series_value_scales[0] = 23),
        DecodeError::BadScale { scale: 23, .. }
    ));
    assert!(matches!(
        err(|b| b.symbols[0] = "x".into()),
        DecodeError::FirstSymbolNotEmpty
    ));
    assert!(matches!(
        err(|b| b.series[0].name = 99),
        DecodeError::SymbolOutOfRange {
            field: "name",
            symbol: 99,
            ..
        }
    ));
    assert!(matches!(
        err(|b| b.series[0].labels[3] = 99),
        DecodeError::SymbolOutOfRange {
            field: "labels",
            ..
        }
    ));
    assert!(matches!(
        err(|b| b.series[0].unit = 99),
        DecodeError::SymbolOutOfRange { field: "unit", .. }
    ));
    assert!(matches!(
        err(|b| b.series[0].name = 0),
        DecodeError::EmptyName { series: 0 }
    ));
    assert!(matches!(
        err(|b| {
            b.series[0].labels.pop();
        }),
        DecodeError::OddLabels { series: 0 }
    ));
    assert!(matches!(
        err(|b| b.series[0].labels[0] = 0),
        DecodeError::EmptyLabelName { series: 0 }
    ));
    assert!(matches!(
        err(|b| b.series[0].labels.swap(0, 2)),
        DecodeError::UnsortedLabels { .. }
    ));
    assert!(matches!(
        err(|b| b.series[0].kind = 7),
        DecodeError::UnknownKind { kind: 7, .. }
    ));
    assert!(matches!(
        err(|b| b.sample_series[1] = 1),
        DecodeError::SeriesOutOfRange {
            sample: 1,
            index: 1,
            series: 1
        }
    ));
    assert!(matches!(
        err(|b| b.sample_time_delta_ms[1] = i64::MAX),
        DecodeError::TimeOutOfRange { sample: 1 }
    ));
    assert!(matches!(
        err(|b| b.base_time_unix_ms = i64::MIN),
        DecodeError::TimeOutOfRange { sample: 0 }
    ));
    assert!(matches!(
        err(|b| b.sample_value_deltas[1] = MAX_DECIMAL_INTEGER),
        DecodeError::IntegerOutOfRange { sample: 1 }
    ));
    assert!(matches!(
        err(|b| b.sample_value_deltas[1] = i64::MIN),
        DecodeError::IntegerOutOfRange { sample: 1 }
    ));
    // Messages name what is wrong.
    let e = err(|b| b.sample_series[1] = 1).to_string();
    assert!(e.contains("sample 1 refers to series 1"), "{e}");
    // Series as deltas: one column or the other, every running index
    // in range, overflow included.
    let deltas = |d: Vec<i64>| {
        move |b: &mut proto::MetricBatch| {
            b.sample_series.clear();
            b.sample_series_deltas = d;
        }
    };
    let mut b = valid();
    deltas(vec![0, 0])(&mut b);
    assert_eq!(decode(&b).unwrap(), decode(&valid()).unwrap());
    assert!(matches!(
        err(|b| b.sample_series_deltas = vec![0, 0]),
        DecodeError::MixedSeriesColumns
    ));
    assert!(matches!(
        err(deltas(vec![0])),
        DecodeError::ColumnLengths { series: 1, .. }
    ));
    assert!(matches!(
        err(deltas(vec![0, 1])),
        DecodeError::SeriesOutOfRange {
            sample: 1,
            index: 1,
            series: 1
        }
    ));
    assert!(matches!(
        err(deltas(vec![-1, 1])),
        DecodeError::SeriesOutOfRange {
            sample: 0,
            index: -1,
            ..
        }
    ));
    assert!(matches!(
        err(deltas(vec![i64::MAX, i64::MAX])),
        DecodeError::SeriesOutOfRange { sample: 0, .. }
    ));
}

#[test]
fn series_deltas_are_differences_of_indexes() {
    let (a, b, c) = (series("a", &[]), series("b", &[]), series("c", &[]));
    let samples: Vec<Sample> = (0..3)
        .flat_map(|k| [&a, &b, &c].map(|s| sample(s, 10 * k, k as f64)))
        .collect();
    let mut builder = BatchBuilder::new();
    assert!(!builder.series_deltas());
    builder.set_series_deltas(true);
    for s in &samples {
        builder.add(s).unwrap();
    }
    let batch = builder.finish();
    assert!(batch.sample_series.is_empty());
    assert_eq!(
        batch.sample_series_deltas,
        vec![0, 1, 1, -2, 1, 1, -2, 1, 1]
    );
    assert_round_trip(&batch, &samples);
}

#[test]
fn bit_patterns_wrap_around() {
    let mut b = valid();
    b.series_value_scales[0] = RAW_BITS;
    b.sample_value_deltas = vec![i64::MAX, i64::MAX];
    // The second total wraps to -2: the bits 0xffff_ffff_ffff_fffe.
    let d = decode(&b).unwrap();
    assert_eq!(d.points[1].value.to_bits(), 0xffff_ffff_ffff_fffe);
}

#[test]
fn truncated_and_garbled_bytes_are_errors_not_panics() {
    let bytes = valid().encode_to_vec();
    for cut in 0..bytes.len() {
        // A cut at a field boundary can leave a shorter valid message;
        // any other cut is a protobuf error. Neither panics.
        let _ = decode_bytes(&bytes[..cut]);
    }
    assert!(matches!(
        decode_bytes(&bytes[..bytes.len() - 1]),
        Err(DecodeError::Protobuf(_))
    ));
    let mut rng = fastrand::Rng::with_seed(42);
    for _ in 0..5000 {
        let mut garbled = bytes.clone();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(0..garbled.len());
            garbled[i] ^= 1 << rng.u8(0..8);
        }
        let _ = decode_bytes(&garbled);
        let junk: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
        let _ = decode_bytes(&junk);
    }
}

#[test]
fn hostile_batches_are_errors_not_panics() {
    let mut rng = fastrand::Rng::with_seed(7);
    let extreme = |rng: &mut fastrand::Rng| match rng.u8(0..4) {
        0 => i64::MIN,
        1 => i64::MAX,
        _ => rng.i64(-3..3),
    };
    for _ in 0..20_000 {
        let symbols = rng.usize(0..4);
        let series = rng.usize(0..4);
        let n = rng.usize(0..6);
        let small = |rng: &mut fastrand::Rng| rng.u32(0..5);
        let by_deltas = rng.u8(0..3);
        let b = proto::MetricBatch {
            symbols: (0..symbols)
                .map(|i| {
                    if i == 0 && rng.bool() {
                        String::new()
                    } else {
                        "s".repeat(i)
                    }
                })
                .collect(),
            series: (0..series)
                .map(|_| proto::Series {
                    name: small(&mut rng),
                    labels: (0..rng.usize(0..5)).map(|_| small(&mut rng)).collect(),
                    kind: rng.i32(-1..4),
                    unit: small(&mut rng),
                })
                .collect(),
            base_time_unix_ms: extreme(&mut rng),
            sample_series: if by_deltas != 1 {
                (0..n).map(|_| small(&mut rng)).collect()
            } else {
                Vec::new()
            },
            // Now and then both columns.
            sample_series_deltas: if by_deltas != 0 {
                (0..rng.usize(n.saturating_sub(1)..n + 2))
                    .map(|_| extreme(&mut rng))
                    .collect()
            } else {
                Vec::new()
            },
            sample_time_delta_ms: (0..rng.usize(n.saturating_sub(1)..n + 2))
                .map(|_| extreme(&mut rng))
                .collect(),
            sample_values: if rng.bool() {
                (0..n).map(|_| rng.f64()).collect()
            } else {
                Vec::new()
            },
            series_value_scales: (0..rng.usize(0..5))
                .map(|_| [0, 3, 22, 23, 254, 255, u32::MAX][rng.usize(0..7)])
                .collect(),
            sample_value_deltas: (0..rng.usize(0..n + 2))
                .map(|_| extreme(&mut rng))
                .collect(),
        };
        if let Ok(d) = decode(&b) {
            assert_eq!(d.points.len(), b.sample_time_delta_ms.len());
            let _ = d.samples().count();
        }
    }
}

#[test]
fn series_labels_stay_sorted() {
    let s = Series::new("m", Kind::Counter)
        .label("z", "1")
        .label("a", "2")
        .label("m", "3")
        .label("a", "4");
    assert_eq!(
        s.labels,
        vec![
            ("a".to_string(), "4".to_string()),
            ("m".into(), "3".into()),
            ("z".into(), "1".into())
        ]
    );
}

#[test]
fn long_names_and_labels_and_too_many_labels_are_refused() {
    let s = |name: &str, labels: Vec<(String, String)>| {
        let mut series = Series::new(name, Kind::Gauge);
        for (n, v) in labels {
            series = series.label(n, v);
        }
        let series = Arc::new(series);
        build(&[sample(&series, 1, 1.0)], ValueEncoding::Doubles)
    };
    let at_limits = s(
        &"n".repeat(MAX_NAME_BYTES),
        (0..MAX_LABELS)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = MAX_LABEL_NAME_BYTES),
                    "v".repeat(MAX_LABEL_VALUE_BYTES),
                )
            })
            .collect(),
    );
    assert!(decode(&at_limits).is_ok());
    let long_value = s("m", vec![("k".into(), "v".repeat(100 * 1024))]);
    let e = decode(&long_value).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::TooLong {
                what: "label value",
                bytes: 102_400,
                ..
            }
        ),
        "{e}"
    );
    let long_name = s(&"n".repeat(MAX_NAME_BYTES + 1), vec![]);
    assert!(matches!(
        decode(&long_name),
        Err(DecodeError::TooLong { what: "name", .. })
    ));
    let long_label = s(
        "m",
        vec![("k".repeat(MAX_LABEL_NAME_BYTES + 1), "v".into())],
    );
    assert!(matches!(
        decode(&long_label),
        Err(DecodeError::TooLong {
            what: "label name",
            ..
        })
    ));
    let many = s(
        "m",
        (0..=MAX_LABELS)
            .map(|i| (format!("l{i:03}"), "v".into()))
            .collect(),
    );
    assert!(matches!(
        decode(&many),
        Err(DecodeError::TooManyLabels {
            labels: 65,
            max: 64,
            ..
        })
    ));
}
