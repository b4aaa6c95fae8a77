//! Units an operator writes and reads: durations (`500ms`, `10s`, `2m`,
//! `1h`) and sizes (`512m`, `2g`, `1048576`), parsed from flags and
//! formatted for output, and instants in RFC 3339 UTC. This module is a
//! bottom floor: it imports nothing from the rest of the crate, so the
//! flags, the backend, `ctl` and `health` can all use it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Parses `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=366.0 * 86400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration in the largest unit [`parse_duration`] reads that writes it
/// exactly (`1h`, `15m`, `10s`, `500ms`), so it parses back to itself; a
/// minute or less is written in seconds (`60s`, as operators write it).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs > 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Bytes in the units an operator reads (GiB, MiB, KiB, bytes).
pub fn human_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= MIB {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    } else if b >= KIB {
        format!("{:.0} KiB", b as f64 / KIB as f64)
    } else {
        format!("{b} bytes")
    }
}

/// Parses a size: bytes, or a number with k/m/g (powers of 1024, with or
/// without "i"/"b": 512m, 512MiB, 1.5G).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 512m, 2g or 1048576"))?;
    let unit = unit.to_ascii_lowercase();
    let mult = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1u64,
        "k" => KIB,
        "m" => MIB,
        "g" => GIB,
        "t" => TIB,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use k, m, g or t")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || !(1.0..=(1u64 << 52) as f64).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// A size in the largest unit [`parse_bytes`] reads that writes it exactly
/// (`256m`, `2g`, `4k`, `1000`), so it parses back to itself.
pub fn format_bytes(b: u64) -> String {
    for (unit, mult) in [("t", TIB), ("g", GIB), ("m", MIB), ("k", KIB)] {
        if b != 0 && b.is_multiple_of(mult) {
            return format!("{}{unit}", b / mult);
        }
    }
    b.to_string()
}

/// A duration that reads and writes in operator units; a flag of this type
/// can take its default from a `Duration` constant
/// (`default_value_t = HumanDuration(DEFAULT_X)`), and the help shows it as
/// [`format_duration`] writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(HumanDuration)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// A size in bytes that reads and writes in operator units, the
/// [`HumanDuration`] of sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_bytes(s).map(ByteSize)
    }
}

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

/// RFC 3339 UTC time of a Unix time in milliseconds ("" for 0).
pub fn rfc3339(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn durations_format_in_the_largest_exact_unit_and_parse_back() {
        for (d, s) in [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(60), "60s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(15 * 60), "15m"),
            (Duration::from_secs(3600), "1h"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(HumanDuration(d).to_string(), s);
            assert_eq!(s.parse::<HumanDuration>(), Ok(HumanDuration(d)));
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(8 << 30), "8.00 GiB");
        assert_eq!(human_bytes(100), "100 bytes");
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        for bad in ["", "x", "5 parsecs", "-1m", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_format_in_the_largest_exact_unit_and_parse_back() {
        for (b, s) in [
            (256 << 20, "256m"),
            (3 << 29, "1536m"),
            (2 << 30, "2g"),
            (4096, "4k"),
            (1000, "1000"),
        ] {
            assert_eq!(format_bytes(b), s);
            assert_eq!(ByteSize(b).to_string(), s);
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(b)));
        }
    }
}
