//! The contract's `MetricBatch`, both ways: [`BatchBuilder`] turns samples
//! into a self-contained batch, [`decode`] turns a batch back into samples
//! and is the one place that decides whether a batch is valid.
//!
//! A batch is a string table (`symbols`, index 0 is ""), series defined by
//! symbol indexes, and one entry per sample in each of three columns: the
//! series index, the time as a delta from the previous sample, and the
//! value. Samples keep the order in which they were pushed.
//!
//! Values use one of two encodings, one per batch
//! (`proto/uplink/v1/metrics.proto` specifies both):
//!
//! - **integers** ([`ValueEncoding::Integers`], the default): each series
//!   has a scale, and each sample sends the difference between its integer
//!   and the previous integer of its series (`sample_value_deltas`, zigzag
//!   varints). Scale `d` in 0..=22: the value is the integer divided by
//!   10^d, which holds every whole number and every short decimal exactly; a
//!   byte counter that grew by 2,000 costs two bytes, a constant one byte.
//!   Scale [`RAW_BITS`]: the integers are the values' IEEE 754 bit patterns,
//!   for the series whose values are no short decimal (CPU ratios computed
//!   in floating point, NaN, -0.0). The builder picks the smallest scale
//!   that is exact for every value of a series, so decoding gives back every
//!   value bit for bit.
//! - **doubles** ([`ValueEncoding::Doubles`]): `sample_values`, eight bytes
//!   each: the contract's first encoding, for backends that predate the
//!   integer encoding.
//!
//! The file is long because it is one format, both ways: the builder and
//! the decoder must agree on every field, so they stay together. Their
//! tests are in `tests`. The samples it carries are defined in
//! `metrics::sample`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use crate::metrics::sample::{Kind, Sample, Series};
use crate::proto;

/// Times must lie within ±2^62 ms (146 million years) of the epoch, so that
/// the difference of any two fits in an `i64`.
pub const MAX_ABS_TIME_MS: i64 = 1 << 62;

/// The largest number of decimal digits a series may declare: 10^22 is the
/// largest power of ten that a double holds exactly.
pub const MAX_DECIMALS: u32 = 22;

/// Integers of the decimal scales lie within ±2^53, where every integer
/// converts to a double exactly.
pub const MAX_DECIMAL_INTEGER: i64 = 1 << 53;

/// The scale that marks a series whose integers are the 64-bit patterns of
/// its doubles (IEEE 754 binary64), for values that are no short decimal.
pub const RAW_BITS: u32 = 255;

/// 10^0 ..= 10^22, each exact in a double.
const POW10: [f64; MAX_DECIMALS as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

impl Kind {
    /// The contract's form of this kind.
    fn to_proto(self) -> proto::MetricKind {
        match self {
            Kind::Gauge => proto::MetricKind::Gauge,
            Kind::Counter => proto::MetricKind::Counter,
        }
    }
}

impl Series {
    /// Whether the builder can define this series: a name, and label
    /// names that are not empty, sorted and unique.
    fn check(&self) -> Result<(), EncodeError> {
        if self.name.is_empty() {
            return Err(EncodeError::EmptyName);
        }
        for (i, (name, _)) in self.labels.iter().enumerate() {
            if name.is_empty() {
                return Err(EncodeError::EmptyLabelName {
                    series: self.name.clone(),
                });
            }
            if i > 0 && self.labels[i - 1].0 >= *name {
                return Err(EncodeError::UnsortedLabels {
                    series: self.name.clone(),
                    label: name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A hasher for keys that need no protection against chosen collisions:
/// `Arc` addresses, which no sender of samples picks, and SipHash values
/// computed with the builder's random key. A multiply and a fold spread
/// them over the table.
#[derive(Default)]
pub struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type WordMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// A series of the batch being built, returned by [`BatchBuilder::series`].
/// Valid for the builder that returned it, until its next
/// [`BatchBuilder::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeriesId {
    batch: u64,
    index: u32,
}

/// How [`BatchBuilder::finish`] encodes values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ValueEncoding {
    /// `sample_value_deltas` with `series_value_scales`: after zstd, 0.5x
    /// to 0.9x the bytes of doubles (see BENCHMARKS.md).
    #[default]
    Integers,
    /// `sample_values`: what backends older than the integer encoding
    /// understand.
    Doubles,
}

/// Why a sample could not be added to a batch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A series without a name.
    #[error("a series needs a name")]
    EmptyName,
    /// A label with an empty name.
    #[error("series {series:?} has a label with an empty name")]
    EmptyLabelName {
        /// The series' name.
        series: String,
    },
    /// Labels out of order, or one name twice.
    #[error(
        "series {series:?}: labels must be sorted by name, each name once; label {label:?} breaks the order"
    )]
    UnsortedLabels {
        /// The series' name.
        series: String,
        /// The first label out of order.
        label: String,
    },
    /// A time too far from the epoch.
    #[error("time {0} ms is out of range: at most ±2^62 ms from the epoch")]
    TimeOutOfRange(i64),
    /// A [`SeriesId`] from another builder.
    #[error("series id {0} does not belong to this batch")]
    UnknownSeries(u32),
    /// More distinct strings or series than a `uint32` index can name.
    #[error("a batch holds at most 2^32 - 1 symbols and series")]
    TooLarge,
}

/// What a builder remembers about a series between batches, found by the
/// address of its `Arc`.
struct Known {
    /// Keeps the address from being reused while it is a key.
    _series: Arc<Series>,
    /// SipHash of each string: the name, label names and values in order,
    /// the unit.
    strings: Vec<u64>,
    /// SipHash of the whole series.
    hash: u64,
    /// The last batch that used it.
    batch: u64,
}

impl Known {
    fn new(series: &Arc<Series>, hasher: &RandomState, batch: u64) -> Self {
        let mut strings = Vec::with_capacity(2 + 2 * series.labels.len());
        strings.push(hasher.hash_one(series.name.as_str()));
        for (n, v) in &series.labels {
            strings.push(hasher.hash_one(n.as_str()));
            strings.push(hasher.hash_one(v.as_str()));
        }
        strings.push(hasher.hash_one(series.unit.as_str()));
        let hash = hasher.hash_one((&strings, series.kind));
        Known {
            _series: series.clone(),
            strings,
            hash,
            batch,
        }
    }
}

/// The strings of a batch, each once; index 0 is "". A string is found by
/// its SipHash; should two different strings share one (never seen in
/// practice), both are kept, which costs bytes, not correctness.
#[derive(Default)]
struct SymbolTable {
    strings: Vec<String>,
    by_hash: WordMap<u64, u32>,
}

impl SymbolTable {
    fn intern(&mut self, s: &str, hash: u64) -> Result<u32, EncodeError> {
        if self.strings.is_empty() {
            self.strings.push(String::new());
        }
        if s.is_empty() {
            return Ok(0);
        }
        if let Some(&id) = self.by_hash.get(&hash)
            && self.strings[id as usize] == s
        {
            return Ok(id);
        }
        let id = u32::try_from(self.strings.len()).map_err(|_| EncodeError::TooLarge)?;
        self.strings.push(s.to_string());
        self.by_hash.entry(hash).or_insert(id);
        Ok(id)
    }
}

/// Accumulates samples and produces self-contained [`proto::MetricBatch`]es,
/// one per [`BatchBuilder::finish`].
///
/// Series and strings are interned: each distinct string is sent once per
/// batch, each series once, and a sample costs only its three column
/// entries. A builder is meant to live as long as the batcher that uses it:
/// it remembers the series of the last two batches (by the address of
/// their `Arc`, with the hashes of their strings), so that defining them
/// again in the next batch costs a few table probes instead of hashing
/// every name and label.
#[derive(Default)]
pub struct BatchBuilder {
    encoding: ValueEncoding,
    /// Series indexes as `sample_series_deltas` rather than `sample_series`.
    series_deltas: bool,
    hasher: RandomState,
    known: WordMap<usize, Known>,
    /// The number of the batch being built.
    batch: u64,
    symbols: SymbolTable,
    series: Vec<proto::Series>,
    /// The content of each series of the batch, for comparing on a hash
    /// match.
    series_content: Vec<Arc<Series>>,
    series_by_hash: WordMap<u64, u32>,
    series_by_address: WordMap<usize, u32>,
    sample_series: Vec<u32>,
    times: Vec<i64>,
    values: Vec<f64>,
}

impl fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("encoding", &self.encoding)
            .field("series_deltas", &self.series_deltas)
            .field("batch", &self.batch)
            .field("known", &self.known.len())
            .field("symbols", &self.symbols.strings.len())
            .field("series", &self.series.len())
            .field("samples", &self.values.len())
            .finish()
    }
}

impl BatchBuilder {
    /// An empty builder with the [`ValueEncoding::Integers`] encoding.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder that encodes values as `encoding` says.
    pub fn with_encoding(encoding: ValueEncoding) -> Self {
        BatchBuilder {
            encoding,
            ..Self::default()
        }
    }

    /// Whether the batches from the next [`BatchBuilder::finish`] on carry
    /// their series indexes as `sample_series_deltas` (for a backend that
    /// said it reads them) or as `sample_series` (the default, for any
    /// backend).
    pub fn set_series_deltas(&mut self, on: bool) {
        self.series_deltas = on;
    }

    /// Whether batches carry `sample_series_deltas`.
    pub fn series_deltas(&self) -> bool {
        self.series_deltas
    }

    /// Samples added to this batch so far.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when no sample was added to this batch.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Distinct series in this batch so far.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The id of `series` in this batch, defining it on first use. An `Arc`
    /// seen before costs one probe of a table keyed by its address.
    pub fn series(&mut self, series: &Arc<Series>) -> Result<SeriesId, EncodeError> {
        let address = Arc::as_ptr(series) as usize;
        let index = match self.series_by_address.get(&address) {
            Some(&index) => index,
            None => self.define(series, address)?,
        };
        Ok(SeriesId {
            batch: self.batch,
            index,
        })
    }

    fn define(&mut self, series: &Arc<Series>, address: usize) -> Result<u32, EncodeError> {
        let known = match self.known.entry(address) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                series.check()?;
                e.insert(Known::new(series, &self.hasher, self.batch))
            }
        };
        known.batch = self.batch;
        let index = match self.series_by_hash.get(&known.hash) {
            Some(&i) if self.series_content[i as usize] == *series => i,
            _ => {
                let index = u32::try_from(self.series.len()).map_err(|_| EncodeError::TooLarge)?;
                let mut hashes = known.strings.iter().copied();
                let mut next = |symbols: &mut SymbolTable, s: &str| {
                    symbols.intern(s, hashes.next().unwrap_or_default())
                };
                let name = next(&mut self.symbols, &series.name)?;
                let mut labels = Vec::with_capacity(series.labels.len() * 2);
                for (n, v) in &series.labels {
                    labels.push(next(&mut self.symbols, n)?);
                    labels.push(next(&mut self.symbols, v)?);
                }
                let unit = next(&mut self.symbols, &series.unit)?;
                self.series.push(proto::Series {
                    name,
                    labels,
                    kind: series.kind.to_proto() as i32,
                    unit,
                });
                self.series_content.push(series.clone());
                self.series_by_hash.entry(known.hash).or_insert(index);
                index
            }
        };
        // `known` holds the `Arc` until the entry is dropped, so the
        // address stays this series' for as long as it is a key.
        self.series_by_address.insert(address, index);
        Ok(index)
    }

    /// Adds a value of a series that [`BatchBuilder::series`] returned for
    /// this batch.
    pub fn push(
        &mut self,
        series: SeriesId,
        time_unix_ms: i64,
        value: f64,
    ) -> Result<(), EncodeError> {
        if series.batch != self.batch || series.index as usize >= self.series.len() {
            return Err(EncodeError::UnknownSeries(series.index));
        }
        if !(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS).contains(&time_unix_ms) {
            return Err(EncodeError::TimeOutOfRange(time_unix_ms));
        }
        self.sample_series.push(series.index);
        self.times.push(time_unix_ms);
        self.values.push(value);
        Ok(())
    }

    /// Adds a sample.
    pub fn add(&mut self, sample: &Sample) -> Result<(), EncodeError> {
        let id = self.series(&sample.series)?;
        self.push(id, sample.time_unix_ms, sample.value)
    }

    /// The batch: every sample added since the last `finish`, in order.
    /// The builder is then empty and ready for the next batch.
    pub fn finish(&mut self) -> proto::MetricBatch {
        let times = std::mem::take(&mut self.times);
        let values = std::mem::take(&mut self.values);
        let base = times.first().copied().unwrap_or(0);
        let mut prev = base;
        let sample_time_delta_ms = times
            .iter()
            .map(|&t| {
                // Both times are within ±2^62, so the difference fits.
                let d = t - prev;
                prev = t;
                d
            })
            .collect();
        let mut batch = proto::MetricBatch {
            symbols: std::mem::take(&mut self.symbols.strings),
            series: std::mem::take(&mut self.series),
            base_time_unix_ms: base,
            sample_series: std::mem::take(&mut self.sample_series),
            sample_time_delta_ms,
            ..Default::default()
        };
        match self.encoding {
            ValueEncoding::Integers => {
                let (scales, deltas) =
                    integer_columns(batch.series.len(), &batch.sample_series, &values);
                batch.series_value_scales = scales;
                batch.sample_value_deltas = deltas;
            }
            ValueEncoding::Doubles => batch.sample_values = values,
        }
        if self.series_deltas {
            let mut prev = 0i64;
            batch.sample_series_deltas = std::mem::take(&mut batch.sample_series)
                .into_iter()
                .map(|s| {
                    let d = i64::from(s) - prev;
                    prev = i64::from(s);
                    d
                })
                .collect();
        }
        self.symbols.by_hash.clear();
        self.series_content.clear();
        self.series_by_hash.clear();
        self.series_by_address.clear();
        let batch_number = self.batch;
        self.known.retain(|_, k| k.batch + 1 >= batch_number);
        self.batch += 1;
        batch
    }
}

/// The integer that stands for `v` with `d` decimals, if `v` is exactly
/// that integer divided by 10^d, computed as a decoder computes it.
fn decimal_integer(v: f64, d: u32) -> Option<i64> {
    let scale = POW10[d as usize];
    let scaled = (v * scale).round();
    // NaN, infinities and integers beyond 2^53 have no decimal form.
    if scaled.is_nan() || scaled.abs() > MAX_DECIMAL_INTEGER as f64 {
        return None;
    }
    let m = scaled as i64;
    // The sign of zero is lost in an integer: -0.0 fails here.
    ((m as f64 / scale).to_bits() == v.to_bits()).then_some(m)
}

/// The integer encoding's columns: the scale of each series and, for each
/// sample, the difference from the previous integer of its series.
fn integer_columns(series: usize, sample_series: &[u32], values: &[f64]) -> (Vec<u32>, Vec<i64>) {
    // The fewest decimals that hold every value of each series, or bits.
    let mut scales = vec![0u32; series];
    for (&s, &v) in sample_series.iter().zip(values) {
        let d = &mut scales[s as usize];
        while *d != RAW_BITS && decimal_integer(v, *d).is_none() {
            *d = if *d < MAX_DECIMALS { *d + 1 } else { RAW_BITS };
        }
    }
    loop {
        match integer_deltas(&scales, sample_series, values) {
            Ok(deltas) => return (scales, deltas),
            // A value that held with fewer decimals almost always holds
            // with more; the rare one that does not (near 2^53) sends its
            // series to bits, and the deltas are computed again.
            Err(s) => scales[s] = RAW_BITS,
        }
    }
}

/// The deltas at the given scales, or the first series whose scale does not
/// hold for one of its values.
fn integer_deltas(
    scales: &[u32],
    sample_series: &[u32],
    values: &[f64],
) -> Result<Vec<i64>, usize> {
    let mut last = vec![0i64; scales.len()];
    let mut deltas = Vec::with_capacity(values.len());
    for (&s, &v) in sample_series.iter().zip(values) {
        let s = s as usize;
        let m = match scales[s] {
            RAW_BITS => v.to_bits() as i64,
            d => decimal_integer(v, d).ok_or(s)?,
        };
        // Decimal integers are within ±2^53 and never wrap; bit patterns
        // wrap modulo 2^64, as the contract says.
        deltas.push(m.wrapping_sub(last[s]));
        last[s] = m;
    }
    Ok(deltas)
}

/// Why a batch is not valid. Every message names the offending sample,
/// series or field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not a protobuf `MetricBatch` at all.
    #[error("not a MetricBatch: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// Both `sample_series` and `sample_series_deltas` are set.
    #[error("metric batch sets both sample_series and sample_series_deltas: set one of them")]
    MixedSeriesColumns,
    /// The per-sample columns have different lengths.
    #[error(
        "metric batch columns differ in length: {series} series indexes, {times} time deltas, {values} values"
    )]
    ColumnLengths {
        /// Entries of `sample_series` or `sample_series_deltas`.
        series: usize,
        /// Entries of `sample_time_delta_ms`.
        times: usize,
        /// Entries of the value column in use.
        values: usize,
    },
    /// More than one value encoding is set.
    #[error(
        "metric batch uses two value encodings: set either sample_values, or sample_value_deltas with series_value_scales"
    )]
    MixedValueEncodings,
    /// `series_value_scales` does not have one entry per series.
    #[error("metric batch has {scales} series_value_scales for {series} series")]
    ScalesLength {
        /// Entries of `series_value_scales`.
        scales: usize,
        /// Entries of `series`.
        series: usize,
    },
    /// A series declares a scale that is neither 0..=22 nor 255.
    #[error(
        "metric batch series {series} declares scale {scale}: use 0 to 22 decimals, or 255 for bit patterns"
    )]
    BadScale {
        /// The series' index.
        series: usize,
        /// The declared scale.
        scale: u32,
    },
    /// The first symbol is not the empty string.
    #[error("metric batch symbol 0 must be the empty string")]
    FirstSymbolNotEmpty,
    /// A series refers to a symbol beyond the table.
    #[error(
        "metric batch series {series} refers to symbol {symbol} in its {field} but the table has {symbols}"
    )]
    SymbolOutOfRange {
        /// The series' index.
        series: usize,
        /// `name`, `labels` or `unit`.
        field: &'static str,
        /// The index found.
        symbol: u32,
        /// Entries of `symbols`.
        symbols: usize,
    },
    /// A series' name, a label name or a label value is longer than the
    /// backend keeps (see [`MAX_NAME_BYTES`] and its neighbours).
    #[error(
        "metric batch series {series}: its {what} is {bytes} bytes long; at most {max} are allowed"
    )]
    TooLong {
        /// The series' index.
        series: usize,
        /// `name`, `label name` or `label value`.
        what: &'static str,
        /// Its length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A series has more labels than [`MAX_LABELS`].
    #[error("metric batch series {series} has {labels} labels; at most {max} are allowed")]
    TooManyLabels {
        /// The series' index.
        series: usize,
        /// Its labels.
        labels: usize,
        /// The limit.
        max: usize,
    },
    /// A series' name is the empty string.
    #[error("metric batch series {series} has an empty name")]
    EmptyName {
        /// The series' index.
        series: usize,
    },
    /// A series has an odd number of label indexes.
    #[error("metric batch series {series} has an odd number of label symbols")]
    OddLabels {
        /// The series' index.
        series: usize,
    },
    /// A label's name is the empty string.
    #[error("metric batch series {series} has a label with an empty name")]
    EmptyLabelName {
        /// The series' index.
        series: usize,
    },
    /// Labels not sorted by name, or a name repeated.
    #[error(
        "metric batch series {series}: labels are not sorted by name or repeat label {label:?}"
    )]
    UnsortedLabels {
        /// The series' index.
        series: usize,
        /// The first label out of order.
        label: String,
    },
    /// A kind this decoder does not know.
    #[error("metric batch series {series} has unknown kind {kind}")]
    UnknownKind {
        /// The series' index.
        series: usize,
        /// The value found.
        kind: i32,
    },
    /// A sample refers to a series beyond `series`.
    #[error("metric batch sample {sample} refers to series {index} but the batch defines {series}")]
    SeriesOutOfRange {
        /// The sample's index.
        sample: usize,
        /// The index found (with `sample_series_deltas`, the running sum).
        index: i64,
        /// Entries of `series`.
        series: usize,
    },
    /// A sample's time is out of range.
    #[error("metric batch sample {sample}: its time is beyond ±2^62 ms")]
    TimeOutOfRange {
        /// The sample's index.
        sample: usize,
    },
    /// A decimal integer is out of range.
    #[error("metric batch sample {sample}: its decimal integer is beyond ±2^53")]
    IntegerOutOfRange {
        /// The sample's index.
        sample: usize,
    },
}

/// A valid batch, decoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    /// The series, in the batch's order.
    pub series: Vec<Arc<Series>>,
    /// The samples, in the batch's order.
    pub points: Vec<Point>,
}

/// One decoded sample; `series` indexes [`Decoded::series`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Index in [`Decoded::series`].
    pub series: u32,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// The value.
    pub value: f64,
}

impl Decoded {
    /// The samples with their series, in the batch's order.
    pub fn samples(&self) -> impl Iterator<Item = Sample> + '_ {
        self.points.iter().map(|p| Sample {
            series: self.series[p.series as usize].clone(),
            time_unix_ms: p.time_unix_ms,
            value: p.value,
        })
    }
}

/// Decodes the protobuf bytes of a batch and validates it.
pub fn decode_bytes(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    decode(&<proto::MetricBatch as prost::Message>::decode(bytes)?)
}

/// Decodes a batch, checking everything the contract promises: columns of
/// equal length, one value encoding, every index in range, label order,
/// known kinds and scales, times and integers in range. Never panics,
/// whatever the input.
pub fn decode(b: &proto::MetricBatch) -> Result<Decoded, DecodeError> {
    let by_deltas = !b.sample_series_deltas.is_empty();
    if by_deltas && !b.sample_series.is_empty() {
        return Err(DecodeError::MixedSeriesColumns);
    }
    let n = if by_deltas {
        b.sample_series_deltas.len()
    } else {
        b.sample_series.len()
    };
    let integers = !b.sample_value_deltas.is_empty() || !b.series_value_scales.is_empty();
    if integers && !b.sample_values.is_empty() {
        return Err(DecodeError::MixedValueEncodings);
    }
    let values = if integers {
        b.sample_value_deltas.len()
    } else {
        b.sample_values.len()
    };
    if b.sample_time_delta_ms.len() != n || values != n {
        return Err(DecodeError::ColumnLengths {
            series: n,
            times: b.sample_time_delta_ms.len(),
            values,
        });
    }
    let series = decode_series(b)?;
    if integers && b.series_value_scales.len() != series.len() {
        return Err(DecodeError::ScalesLength {
            scales: b.series_value_scales.len(),
            series: series.len(),
        });
    }
    if let Some((i, &scale)) = b
        .series_value_scales
        .iter()
        .enumerate()
        .find(|(_, d)| **d > MAX_DECIMALS && **d != RAW_BITS)
    {
        return Err(DecodeError::BadScale { series: i, scale });
    }
    let mut points = Vec::with_capacity(n);
    let mut time = b.base_time_unix_ms;
    let mut last = vec![0i64; if integers { series.len() } else { 0 }];
    let mut index = 0i64;
    for i in 0..n {
        index = if by_deltas {
            // Saturation keeps an absurd sum absurd, and out of range.
            index.saturating_add(b.sample_series_deltas[i])
        } else {
            i64::from(b.sample_series[i])
        };
        let s = match u32::try_from(index) {
            Ok(s) if (s as usize) < series.len() => s,
            _ => {
                return Err(DecodeError::SeriesOutOfRange {
                    sample: i,
                    index,
                    series: series.len(),
                });
            }
        };
        time = time
            .checked_add(b.sample_time_delta_ms[i])
            .filter(|t| (-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS).contains(t))
            .ok_or(DecodeError::TimeOutOfRange { sample: i })?;
        let value = if integers {
            let (l, scale) = (&mut last[s as usize], b.series_value_scales[s as usize]);
            if scale == RAW_BITS {
                *l = l.wrapping_add(b.sample_value_deltas[i]);
                f64::from_bits(*l as u64)
            } else {
                *l = l
                    .checked_add(b.sample_value_deltas[i])
                    .filter(|m| m.unsigned_abs() <= MAX_DECIMAL_INTEGER as u64)
                    .ok_or(DecodeError::IntegerOutOfRange { sample: i })?;
                *l as f64 / POW10[scale as usize]
            }
        } else {
            b.sample_values[i]
        };
        points.push(Point {
            series: s,
            time_unix_ms: time,
            value,
        });
    }
    Ok(Decoded { series, points })
}

/// Longest metric name a batch may carry.
pub const MAX_NAME_BYTES: usize = 512;
/// Longest label name a batch may carry.
pub const MAX_LABEL_NAME_BYTES: usize = 256;
/// Longest label value a batch may carry (an image reference is up to 512).
pub const MAX_LABEL_VALUE_BYTES: usize = 4096;
/// Most labels of one series.
pub const MAX_LABELS: usize = 64;

/// `text`'s length within `max`, or the error naming it.
fn within(series: usize, what: &'static str, text: &str, max: usize) -> Result<(), DecodeError> {
    if text.len() > max {
        return Err(DecodeError::TooLong {
            series,
            what,
            bytes: text.len(),
            max,
        });
    }
    Ok(())
}

fn decode_series(b: &proto::MetricBatch) -> Result<Vec<Arc<Series>>, DecodeError> {
    if b.symbols.first().is_some_and(|s| !s.is_empty()) {
        return Err(DecodeError::FirstSymbolNotEmpty);
    }
    let symbols = b.symbols.len();
    let sym = |series: usize, field: &'static str, i: u32| {
        b.symbols
            .get(i as usize)
            .map(String::as_str)
            .ok_or(DecodeError::SymbolOutOfRange {
                series,
                field,
                symbol: i,
                symbols,
            })
    };
    let mut out = Vec::with_capacity(b.series.len());
    for (i, s) in b.series.iter().enumerate() {
        let name = sym(i, "name", s.name)?;
        if name.is_empty() {
            return Err(DecodeError::EmptyName { series: i });
        }
        within(i, "name", name, MAX_NAME_BYTES)?;
        if s.labels.len() % 2 != 0 {
            return Err(DecodeError::OddLabels { series: i });
        }
        if s.labels.len() / 2 > MAX_LABELS {
            return Err(DecodeError::TooManyLabels {
                series: i,
                labels: s.labels.len() / 2,
                max: MAX_LABELS,
            });
        }
        let mut labels: Vec<(String, String)> = Vec::with_capacity(s.labels.len() / 2);
        for pair in s.labels.chunks_exact(2) {
            let (n, v) = (sym(i, "labels", pair[0])?, sym(i, "labels", pair[1])?);
            if n.is_empty() {
                return Err(DecodeError::EmptyLabelName { series: i });
            }
            within(i, "label name", n, MAX_LABEL_NAME_BYTES)?;
            within(i, "label value", v, MAX_LABEL_VALUE_BYTES)?;
            if labels.last().is_some_and(|(prev, _)| prev.as_str() >= n) {
                return Err(DecodeError::UnsortedLabels {
                    series: i,
                    label: n.to_string(),
                });
            }
            labels.push((n.to_string(), v.to_string()));
        }
        let kind = match proto::MetricKind::try_from(s.kind) {
            Ok(proto::MetricKind::Unspecified | proto::MetricKind::Gauge) => Kind::Gauge,
            Ok(proto::MetricKind::Counter) => Kind::Counter,
            Err(_) => {
                return Err(DecodeError::UnknownKind {
                    series: i,
                    kind: s.kind,
                });
            }
        };
        // Unit 0 means none, even in a batch with an empty table.
        let unit = if s.unit == 0 {
            ""
        } else {
            sym(i, "unit", s.unit)?
        };
        out.push(Arc::new(Series {
            name: name.to_string(),
            labels,
            kind,
            unit: unit.to_string(),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
