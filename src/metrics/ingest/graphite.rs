//! The Graphite plaintext protocol: [`parse_graphite`] reads one line
//! (`path[;tag=value...] value [timestamp]`) without I/O, taking the time
//! as a parameter.

use crate::metrics::encode::MAX_ABS_TIME_MS;

use super::lines::{Reason, Rejection, reject, syntax};

pub(super) fn in_range(ms: i64) -> Option<i64> {
    (-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS)
        .contains(&ms)
        .then_some(ms)
}

/// A parsed Graphite line.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphiteLine<'a> {
    /// The metric path, e.g. `jmeter.all.ok.count`.
    pub path: &'a str,
    /// The Graphite 1.1 tags, in the order sent.
    pub tags: Vec<(&'a str, &'a str)>,
    /// The value, which is finite.
    pub value: f64,
    /// The time in Unix milliseconds.
    pub time_unix_ms: i64,
}

/// Parses one line of the Graphite plaintext protocol, without its
/// newline: `path[;tag=value...] value [timestamp]`, separated by spaces or
/// tabs. A missing timestamp or `-1` is `now_unix_ms`.
pub fn parse_graphite(line: &[u8], now_unix_ms: i64) -> Result<GraphiteLine<'_>, Rejection> {
    let s = std::str::from_utf8(line).map_err(|_| reject(Reason::NotUtf8, "not UTF-8"))?;
    let mut parts = s.split_ascii_whitespace();
    let path_and_tags = parts.next().ok_or(syntax("the line is empty"))?;
    let value = parts.next().ok_or(syntax("the line has no value"))?;
    let time = parts.next();
    if parts.next().is_some() {
        return Err(syntax("the line has more than three fields"));
    }
    let mut segments = path_and_tags.split(';');
    let path = segments.next().unwrap_or_default();
    if path.is_empty() {
        return Err(syntax("the metric path is empty"));
    }
    let mut tags = Vec::new();
    for segment in segments {
        let (name, value) = segment.split_once('=').ok_or(syntax("a tag has no '='"))?;
        if name.is_empty() {
            return Err(syntax("a tag has an empty name"));
        }
        if value.is_empty() {
            return Err(syntax("a tag has an empty value"));
        }
        tags.push((name, value));
    }
    let value = match value.parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        Ok(_) => return Err(reject(Reason::NonFinite, "the value is NaN or infinite")),
        Err(_) => return Err(reject(Reason::BadValue, "the value is not a number")),
    };
    let time_unix_ms = match time {
        None | Some("-1") => now_unix_ms,
        Some(t) => graphite_time(t)?,
    };
    Ok(GraphiteLine {
        path,
        tags,
        value,
        time_unix_ms,
    })
}

/// Seconds since the epoch, whole or with a fraction, as milliseconds.
fn graphite_time(t: &str) -> Result<i64, Rejection> {
    let out_of_range = reject(Reason::BadTimestamp, "the timestamp is out of range");
    if let Ok(secs) = t.parse::<i64>() {
        return secs
            .checked_mul(1_000)
            .and_then(in_range)
            .ok_or(out_of_range);
    }
    match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() => {
            let ms = (secs * 1_000.0).round();
            if ms.abs() <= MAX_ABS_TIME_MS as f64 {
                Ok(ms as i64)
            } else {
                Err(out_of_range)
            }
        }
        _ => Err(reject(
            Reason::BadTimestamp,
            "the timestamp is not a number of seconds",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ingest::testing::{NOW, graphite};

    #[test]
    fn graphite_lines_with_tags_and_every_kind_of_timestamp() {
        let l = graphite("jmeter.all.ok.count 10 1700000000").unwrap();
        assert_eq!(
            (l.path, l.value, l.time_unix_ms),
            ("jmeter.all.ok.count", 10.0, 1_700_000_000_000)
        );
        assert!(l.tags.is_empty());
        let l = graphite("disk.used;rack=a1;datacenter=dc1 9.5 1700000000.25").unwrap();
        assert_eq!(l.path, "disk.used");
        assert_eq!(l.tags, vec![("rack", "a1"), ("datacenter", "dc1")]);
        assert_eq!((l.value, l.time_unix_ms), (9.5, 1_700_000_000_250));
        assert_eq!(graphite("a 1 -1").unwrap().time_unix_ms, NOW);
        assert_eq!(graphite("a 1").unwrap().time_unix_ms, NOW);
        assert_eq!(graphite("  a\t-2.5e3 \t 0 ").unwrap().value, -2500.0);
        assert_eq!(graphite("a 1 0").unwrap().time_unix_ms, 0);
        // A tag value may hold '='.
        assert_eq!(graphite("a;k=v=w 1").unwrap().tags, vec![("k", "v=w")]);
    }

    #[test]
    fn hostile_graphite_lines_are_rejected_with_their_reason() {
        use Reason::*;
        let cases: &[(&[u8], Reason)] = &[
            (b"", Syntax),
            (b"   ", Syntax),
            (b"a", Syntax),
            (b"a 1 2 3", Syntax),
            (b";k=v 1", Syntax),
            (b"a; 1", Syntax),
            (b"a;k 1", Syntax),
            (b"a;=v 1", Syntax),
            (b"a;k= 1", Syntax),
            (b"a;k=v; 1", Syntax),
            (b"a x", BadValue),
            (b"a 1i", BadValue),
            (b"a 0x10", BadValue),
            (b"a 1,5", BadValue),
            (b"a nan", NonFinite),
            (b"a NaN 1", NonFinite),
            (b"a inf", NonFinite),
            (b"a -infinity", NonFinite),
            (b"a 1e400", NonFinite),
            (b"a 1 x", BadTimestamp),
            (b"a 1 nan", BadTimestamp),
            (b"a 1 1e300", BadTimestamp),
            (b"a 1 9223372036854775807", BadTimestamp),
            (b"a 1 -9223372036854775808", BadTimestamp),
            (b"a 1 4611686018427388", BadTimestamp),
            (b"\xff 1 1", NotUtf8),
            (b"a\xc3 1", NotUtf8),
        ];
        for (line, want) in cases {
            let got = parse_graphite(line, NOW);
            assert_eq!(
                got.as_ref().map_err(|e| e.reason),
                Err(*want),
                "{:?}: {got:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Just within the range.
        assert!(graphite("a 1 4611686018427387").is_ok());
    }
}
