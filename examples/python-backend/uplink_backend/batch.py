"""Decoding a MetricBatch (docs/PROTOCOL.md, "Decoding a MetricBatch step
by step"). Pure functions: a batch in, a list of samples out, or
BatchError naming the rule the batch broke (the reason goes into the
INVALID_ARGUMENT message "metric batch rejected (<reason>): ...")."""

import math
import struct
from dataclasses import dataclass

MAX_NAME = 512
MAX_LABELS = 64
MAX_LABEL_NAME = 256
MAX_LABEL_VALUE = 4096
MAX_TIME = 1 << 62
MAX_TOTAL = 1 << 53
KINDS = {0: "gauge", 1: "gauge", 2: "counter"}


class BatchError(Exception):
    """The batch can never be stored: `reason` is the word the contract
    uses, the message says what was wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Series:
    name: str
    labels: tuple  # ((name, value), ...)
    kind: str
    unit: str


@dataclass(frozen=True)
class Sample:
    series: Series
    time_unix_ms: int
    value: float


def _symbol(symbols, i, what):
    if i >= len(symbols):
        raise BatchError("symbol_out_of_range", f"{what} names symbol {i}; the batch has {len(symbols)}")
    return symbols[i]


def _series(batch):
    symbols = list(batch.symbols)
    if symbols and symbols[0] != "":
        raise BatchError("first_symbol", 'symbols[0] must be ""')
    out = []
    for n, s in enumerate(batch.series):
        name = _symbol(symbols, s.name, f"series {n}'s name")
        if not name:
            raise BatchError("empty_name", f"series {n} has an empty name")
        if len(name.encode()) > MAX_NAME:
            raise BatchError("too_long", f"series {n}'s name is over {MAX_NAME} bytes")
        if len(s.labels) % 2:
            raise BatchError("odd_labels", f"series {n} has an odd number of label symbols")
        if len(s.labels) // 2 > MAX_LABELS:
            raise BatchError("too_many_labels", f"series {n} has over {MAX_LABELS} labels")
        labels, last = [], None
        for k in range(0, len(s.labels), 2):
            key = _symbol(symbols, s.labels[k], f"series {n}'s label")
            value = _symbol(symbols, s.labels[k + 1], f"series {n}'s label value")
            if not key:
                raise BatchError("empty_label_name", f"series {n} has a label with an empty name")
            if len(key.encode()) > MAX_LABEL_NAME or len(value.encode()) > MAX_LABEL_VALUE:
                raise BatchError("too_long", f"series {n} has a label over the length limits")
            if last is not None and key.encode() <= last:
                raise BatchError("unsorted_labels", f"series {n}'s label names are not in strictly increasing order")
            last = key.encode()
            labels.append((key, value))
        if s.kind not in KINDS:
            raise BatchError("unknown_kind", f"series {n} has the unknown kind {s.kind}")
        unit = _symbol(symbols, s.unit, f"series {n}'s unit")
        out.append(Series(name, tuple(labels), KINDS[s.kind], unit))
    return out


def decode(batch):
    """Every sample of `batch` (a generated uplink.v1.MetricBatch)."""
    series = _series(batch)
    n = max(len(batch.sample_series), len(batch.sample_series_deltas))
    if batch.sample_series and batch.sample_series_deltas:
        raise BatchError("mixed_series_columns", "sample_series and sample_series_deltas are both set")
    if len(batch.sample_time_delta_ms) != n:
        raise BatchError("column_lengths", "the sample columns differ in length")
    doubles = len(batch.sample_values) > 0
    if doubles and (batch.sample_value_deltas or batch.series_value_scales):
        raise BatchError("mixed_value_encodings", "sample_values and sample_value_deltas are both set")
    if doubles and len(batch.sample_values) != n:
        raise BatchError("column_lengths", "the sample columns differ in length")
    if not doubles and len(batch.sample_value_deltas) != n:
        raise BatchError("column_lengths", "the sample columns differ in length")
    if not doubles and n and len(batch.series_value_scales) != len(series):
        raise BatchError("scales_length", "series_value_scales needs one scale per series")
    for scale in batch.series_value_scales if not doubles else ():
        if not (0 <= scale <= 22 or scale == 255):
            raise BatchError("bad_scale", f"scale {scale}: use 0 to 22, or 255")
    totals = [0] * len(series)
    index, time = 0, batch.base_time_unix_ms
    out = []
    for i in range(n):
        if batch.sample_series_deltas:
            index += batch.sample_series_deltas[i]
        else:
            index = batch.sample_series[i]
        if not 0 <= index < len(series):
            raise BatchError("series_out_of_range", f"sample {i} names series {index}; the batch has {len(series)}")
        time += batch.sample_time_delta_ms[i]
        if abs(time) > MAX_TIME:
            raise BatchError("time_out_of_range", f"sample {i}'s time is out of range")
        if doubles:
            value = batch.sample_values[i]
        else:
            scale = batch.series_value_scales[index]
            if scale == 255:
                totals[index] = (totals[index] + batch.sample_value_deltas[i]) % (1 << 64)
                value = struct.unpack("<d", struct.pack("<Q", totals[index]))[0]
            else:
                totals[index] += batch.sample_value_deltas[i]
                if abs(totals[index]) > MAX_TOTAL:
                    raise BatchError("integer_out_of_range", f"sample {i}'s integer is beyond 2^53")
                value = float(totals[index]) / float(10**scale)
        out.append(Sample(series[index], time, value))
    return out


def render(value):
    """A value as the Prometheus text format writes it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
