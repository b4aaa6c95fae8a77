//! InfluxDB's line protocol: [`parse_influx`] reads one line
//! (measurement, tags, fields, timestamp) without I/O, its escapes
//! included, and [`Precision`] is the unit of its timestamp.

use std::borrow::Cow;

use super::graphite::in_range;
use super::lines::{Reason, Rejection, reject, syntax};

/// The unit of Influx timestamps, from a request's `precision` parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Timestamps count nanoseconds, the line protocol's default.
    #[default]
    Nanoseconds,
    /// Timestamps count microseconds.
    Microseconds,
    /// Timestamps count milliseconds.
    Milliseconds,
    /// Timestamps count seconds.
    Seconds,
    /// Timestamps count minutes (InfluxDB 1.x only).
    Minutes,
    /// Timestamps count hours (InfluxDB 1.x only).
    Hours,
}

impl Precision {
    /// Returns the precision a `precision` parameter names, in either API
    /// version's spelling.
    pub fn from_param(s: &str) -> Option<Precision> {
        Some(match s {
            "ns" | "n" => Precision::Nanoseconds,
            "us" | "u" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            _ => return None,
        })
    }

    /// Converts `ts` in this unit to Unix milliseconds (rounded down),
    /// if the result lies within ±2^62 ms.
    pub fn to_unix_ms(self, ts: i64) -> Option<i64> {
        let ms = match self {
            Precision::Nanoseconds => Some(ts.div_euclid(1_000_000)),
            Precision::Microseconds => Some(ts.div_euclid(1_000)),
            Precision::Milliseconds => Some(ts),
            Precision::Seconds => ts.checked_mul(1_000),
            Precision::Minutes => ts.checked_mul(60_000),
            Precision::Hours => ts.checked_mul(3_600_000),
        }?;
        in_range(ms)
    }
}
/// The value of an Influx field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue {
    /// The field is a float, an integer, an unsigned integer, or a
    /// boolean read as 1 or 0.
    Number(f64),
    /// The field is a string, which is not ingested.
    Text,
}

/// A parsed line of InfluxDB's line protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct InfluxLine<'a> {
    /// The measurement, unescaped.
    pub measurement: Cow<'a, str>,
    /// The tags, in the order sent, unescaped.
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The fields, in the order sent, with their keys unescaped.
    pub fields: Vec<(Cow<'a, str>, FieldValue)>,
    /// The time in Unix milliseconds.
    pub time_unix_ms: i64,
}

/// Parses one line of InfluxDB's line protocol, without its newline:
/// `measurement[,tag=value...] field=value[,field=value...] [timestamp]`.
/// The timestamp is in `precision`; a missing one is `now_unix_ms`.
pub fn parse_influx(
    line: &[u8],
    precision: Precision,
    now_unix_ms: i64,
) -> Result<InfluxLine<'_>, Rejection> {
    let s = std::str::from_utf8(line).map_err(|_| reject(Reason::NotUtf8, "not UTF-8"))?;
    let b = s.as_bytes();
    let (measurement, mut i) = unescape_until(s, 0, b", ");
    if measurement.is_empty() {
        return Err(syntax("the line has no measurement"));
    }
    let mut tags = Vec::new();
    while b.get(i) == Some(&b',') {
        let (key, at) = unescape_until(s, i + 1, b"=, ");
        if b.get(at) != Some(&b'=') {
            return Err(syntax("a tag has no '='"));
        }
        if key.is_empty() {
            return Err(syntax("a tag has an empty key"));
        }
        let (value, at) = unescape_until(s, at + 1, b", ");
        if value.is_empty() {
            return Err(syntax("a tag has an empty value"));
        }
        tags.push((key, value));
        i = at;
    }
    i = skip_spaces(b, i);
    if i >= b.len() {
        return Err(syntax("the line has no fields"));
    }
    let mut fields = Vec::new();
    loop {
        let (key, at) = unescape_until(s, i, b"=, ");
        if b.get(at) != Some(&b'=') {
            return Err(syntax("a field has no '='"));
        }
        if key.is_empty() {
            return Err(syntax("a field has an empty key"));
        }
        let start = at + 1;
        let (value, end) = if b.get(start) == Some(&b'"') {
            let close =
                string_end(b, start + 1).ok_or(syntax("a string field has no closing quote"))?;
            (FieldValue::Text, close + 1)
        } else {
            let end = b[start..]
                .iter()
                .position(|&c| c == b',' || c == b' ')
                .map_or(b.len(), |p| start + p);
            (field_value(&s[start..end])?, end)
        };
        fields.push((key, value));
        match b.get(end) {
            Some(b',') => i = end + 1,
            Some(b' ') | None => {
                i = end;
                break;
            }
            Some(_) => return Err(syntax("text follows a string field's closing quote")),
        }
    }
    i = skip_spaces(b, i);
    let time_unix_ms = if i < b.len() {
        let end = b[i..]
            .iter()
            .position(|&c| c == b' ')
            .map_or(b.len(), |p| i + p);
        if skip_spaces(b, end) < b.len() {
            return Err(syntax("text follows the timestamp"));
        }
        let ts = s[i..]
            .trim_end_matches(' ')
            .parse::<i64>()
            .map_err(|_| reject(Reason::BadTimestamp, "the timestamp is not an integer"))?;
        precision.to_unix_ms(ts).ok_or(reject(
            Reason::BadTimestamp,
            "the timestamp is out of range",
        ))?
    } else {
        now_unix_ms
    };
    Ok(InfluxLine {
        measurement,
        tags,
        fields,
        time_unix_ms,
    })
}

/// The text from `start` up to the first unescaped byte of `stops` (or the
/// end), with the escapes `\,`, `\ `, `\=` and `\\` undone, and the index
/// where it stopped. Other backslashes are kept as they are.
fn unescape_until<'a>(s: &'a str, start: usize, stops: &[u8]) -> (Cow<'a, str>, usize) {
    let b = s.as_bytes();
    let mut i = start.min(b.len());
    let mut owned: Option<String> = None;
    let mut copied = i;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && matches!(b.get(i + 1), Some(b',' | b' ' | b'=' | b'\\')) {
            // Keep what came before, drop the backslash, keep the escaped
            // byte as the start of what comes next.
            owned
                .get_or_insert_with(String::new)
                .push_str(&s[copied..i]);
            copied = i + 1;
            i += 2;
            continue;
        }
        if stops.contains(&c) {
            break;
        }
        i += 1;
    }
    let text = match owned {
        None => Cow::Borrowed(&s[start.min(b.len())..i]),
        Some(mut o) => {
            o.push_str(&s[copied..i]);
            Cow::Owned(o)
        }
    };
    (text, i)
}

/// The index of the quote that closes a string field whose text starts at
/// `from`, skipping escaped characters.
fn string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    i
}

/// An unquoted Influx field value.
fn field_value(v: &str) -> Result<FieldValue, Rejection> {
    let bad = reject(Reason::BadValue, "a field value is not a number or boolean");
    let n = match v {
        "" => return Err(syntax("a field has no value")),
        "t" | "T" | "true" | "True" | "TRUE" => 1.0,
        "f" | "F" | "false" | "False" | "FALSE" => 0.0,
        _ => {
            if let Some(int) = v.strip_suffix('i') {
                int.parse::<i64>().map_err(|_| bad)? as f64
            } else if let Some(uint) = v.strip_suffix('u') {
                uint.parse::<u64>().map_err(|_| bad)? as f64
            } else {
                v.parse::<f64>().map_err(|_| bad)?
            }
        }
    };
    if n.is_finite() {
        Ok(FieldValue::Number(n))
    } else {
        Err(reject(
            Reason::NonFinite,
            "a field value is NaN or infinite",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ingest::testing::{NOW, influx, reason};

    #[test]
    fn influx_lines_with_tags_fields_and_types() {
        let l = influx("cpu,host=a,region=eu usage=0.5,count=3i,big=18446744073709551615u,up=true,down=F,note=\"x y\" 1700000000123456789").unwrap();
        assert_eq!(l.measurement, "cpu");
        let tags: Vec<(&str, &str)> = l.tags.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(tags, vec![("host", "a"), ("region", "eu")]);
        let fields: Vec<(&str, FieldValue)> = l.fields.iter().map(|(k, v)| (&**k, *v)).collect();
        assert_eq!(
            fields,
            vec![
                ("usage", FieldValue::Number(0.5)),
                ("count", FieldValue::Number(3.0)),
                ("big", FieldValue::Number(18446744073709551615.0)),
                ("up", FieldValue::Number(1.0)),
                ("down", FieldValue::Number(0.0)),
                ("note", FieldValue::Text),
            ]
        );
        assert_eq!(l.time_unix_ms, 1_700_000_000_123);
        // No tags, no timestamp, extra spaces, a negative integer.
        let l = influx("mem  free=-5i  ").unwrap();
        assert_eq!(l.fields[0], ("free".into(), FieldValue::Number(-5.0)));
        assert_eq!(l.time_unix_ms, NOW);
        // Floats in every spelling the protocol allows.
        for (v, want) in [("1", 1.0), ("-1.5", -1.5), ("1e3", 1000.0), (".5", 0.5)] {
            let line = format!("m v={v}");
            assert_eq!(influx(&line).unwrap().fields[0].1, FieldValue::Number(want));
        }
    }

    #[test]
    fn influx_escapes_and_strings() {
        let l = influx(
            r#"my\ meas\,ure,t\=ag\ 1=v\,a\ l\=ue\\ f\ 1\=x=1,s="a \"quoted\", = string\\",g=2 5"#,
        )
        .unwrap();
        assert_eq!(l.measurement, "my meas,ure");
        assert_eq!(&*l.tags[0].0, "t=ag 1");
        assert_eq!(&*l.tags[0].1, r"v,a l=ue\");
        assert_eq!(&*l.fields[0].0, "f 1=x");
        assert_eq!(l.fields[1], ("s".into(), FieldValue::Text));
        assert_eq!(l.fields[2], ("g".into(), FieldValue::Number(2.0)));
        assert_eq!(l.time_unix_ms, 0);
        // A backslash before anything else is kept.
        let l = influx(r"c:\temp,path=C:\dir v=1").unwrap();
        assert_eq!((&*l.measurement, &*l.tags[0].1), (r"c:\temp", r"C:\dir"));
        // Nothing was copied where nothing was escaped.
        let l = influx("m,k=v f=1").unwrap();
        assert!(matches!(l.measurement, Cow::Borrowed(_)));
        assert!(matches!(l.tags[0].1, Cow::Borrowed(_)));
    }

    /// Escapes `s` as the line protocol wants for a measurement, tag key,
    /// tag value or field key.
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            if matches!(c, ',' | ' ' | '=' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    #[test]
    fn escaped_names_parse_back_to_themselves() {
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet = ['a', 'Z', '0', ',', ' ', '=', '\\', '"', 'é', '#', '_', ';'];
        let word = |rng: &mut fastrand::Rng| -> String {
            let n = rng.usize(1..8);
            (0..n)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect()
        };
        for _ in 0..5_000 {
            let (m, k, v, f) = (
                word(&mut rng),
                word(&mut rng),
                word(&mut rng),
                word(&mut rng),
            );
            let value = rng.i32(..);
            let line = format!(
                "{},{}={} {}={value}i",
                escape(&m),
                escape(&k),
                escape(&v),
                escape(&f)
            );
            // A measurement that starts with '#' is a comment; `parse_influx`
            // itself still reads it.
            let l = influx(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(l.measurement, m, "{line:?}");
            assert_eq!((&*l.tags[0].0, &*l.tags[0].1), (k.as_str(), v.as_str()));
            assert_eq!(
                l.fields,
                vec![(Cow::Owned(f), FieldValue::Number(f64::from(value)))]
            );
        }
    }

    #[test]
    fn influx_precisions() {
        let at = |p, ts: &str| {
            parse_influx(format!("m v=1 {ts}").as_bytes(), p, NOW).map(|l| l.time_unix_ms)
        };
        assert_eq!(at(Precision::Nanoseconds, "1500000"), Ok(1));
        assert_eq!(at(Precision::Nanoseconds, "-1"), Ok(-1));
        assert_eq!(at(Precision::Microseconds, "2500"), Ok(2));
        assert_eq!(at(Precision::Milliseconds, "-7"), Ok(-7));
        assert_eq!(at(Precision::Seconds, "3"), Ok(3_000));
        assert_eq!(at(Precision::Minutes, "2"), Ok(120_000));
        assert_eq!(at(Precision::Hours, "1"), Ok(3_600_000));
        assert_eq!(
            at(Precision::Nanoseconds, "9223372036854775807"),
            Ok(9_223_372_036_854)
        );
        for (p, ts) in [
            (Precision::Milliseconds, "9223372036854775807"),
            (Precision::Milliseconds, "-9223372036854775808"),
            (Precision::Seconds, "9223372036854775807"),
            (Precision::Hours, "-9223372036854775808"),
        ] {
            assert_eq!(reason(at(p, ts)), Reason::BadTimestamp, "{p:?} {ts}");
        }
        for (param, want) in [
            ("ns", Precision::Nanoseconds),
            ("n", Precision::Nanoseconds),
            ("us", Precision::Microseconds),
            ("u", Precision::Microseconds),
            ("ms", Precision::Milliseconds),
            ("s", Precision::Seconds),
            ("m", Precision::Minutes),
            ("h", Precision::Hours),
        ] {
            assert_eq!(Precision::from_param(param), Some(want));
        }
        for bad in ["", "NS", "sec", "µs", "1"] {
            assert_eq!(Precision::from_param(bad), None);
        }
    }

    #[test]
    fn hostile_influx_lines_are_rejected_with_their_reason() {
        use Reason::*;
        let cases: &[(&[u8], Reason)] = &[
            (b"", Syntax),
            (b"m", Syntax),
            (b"m ", Syntax),
            (b",t=v f=1", Syntax),
            (b" f=1", Syntax),
            (b"m,t f=1", Syntax),
            (b"m,=v f=1", Syntax),
            (b"m,t= f=1", Syntax),
            (b"m,t=v,f=1", Syntax),
            (b"m,t=v", Syntax),
            (b"m f", Syntax),
            (b"m =1", Syntax),
            (b"m f=", Syntax),
            (b"m f=1,", Syntax),
            (b"m f=1,,g=2", Syntax),
            (b"m f=\"open", Syntax),
            (b"m f=\"a\\\"", Syntax),
            (b"m f=\"a\"b", Syntax),
            (b"m f=1 2 3", Syntax),
            (b"m f=1 2 x", Syntax),
            (b"m f=abc", BadValue),
            (b"m f=1.5i", BadValue),
            (b"m f=-1u", BadValue),
            (b"m f=99999999999999999999i", BadValue),
            (b"m f=1x", BadValue),
            (b"m f=yes", BadValue),
            (b"m f=1,g=bad", BadValue),
            (b"m f=NaN", NonFinite),
            (b"m f=inf", NonFinite),
            (b"m f=-Infinity", NonFinite),
            (b"m f=1e309", NonFinite),
            (b"m f=1 1.5", BadTimestamp),
            (b"m f=1 x", BadTimestamp),
            (b"m f=1 99999999999999999999", BadTimestamp),
            (b"m\xff f=1", NotUtf8),
            (b"m f=\"\xc3\"", NotUtf8),
        ];
        for (line, want) in cases {
            let got = parse_influx(line, Precision::Nanoseconds, NOW);
            assert_eq!(
                got.as_ref().map(|_| ()).map_err(|e| e.reason),
                Err(*want),
                "{:?}: {got:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
