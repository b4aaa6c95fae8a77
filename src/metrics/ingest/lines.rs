//! Line handling shared by both protocols: why a line is rejected
//! ([`Reason`], [`Rejection`], [`LineError`]), the splitter that cuts a
//! byte stream into bounded lines ([`LineSplitter`]), and the short,
//! printable excerpt of a bad line that warnings and answers quote.

use std::fmt;

use super::EXCERPT_BYTES;

/// Why a line was rejected: a bounded set, for counters and log fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The line is longer than [`IngestLimits::max_line_bytes`].
    LineTooLong,
    /// The line is not UTF-8.
    NotUtf8,
    /// The line does not have the protocol's shape: a part is missing, a
    /// key is empty, a string is unterminated, or a name holds a control
    /// character.
    Syntax,
    /// A value is not a number.
    BadValue,
    /// A value is NaN or infinite.
    NonFinite,
    /// The timestamp is not an integer (Influx) or a number (Graphite), or
    /// it lies beyond ±2^62 ms.
    BadTimestamp,
    /// A series name is longer than [`IngestLimits::max_name_bytes`].
    NameTooLong,
    /// The series has more than [`IngestLimits::max_labels`] labels.
    TooManyLabels,
    /// A label name or value is over its limit.
    LabelTooLong,
}

impl Reason {
    /// This lists every reason, in a fixed order.
    pub const ALL: [Reason; 9] = [
        Reason::LineTooLong,
        Reason::NotUtf8,
        Reason::Syntax,
        Reason::BadValue,
        Reason::NonFinite,
        Reason::BadTimestamp,
        Reason::NameTooLong,
        Reason::TooManyLabels,
        Reason::LabelTooLong,
    ];

    /// Returns a short code for a metric label or a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::LineTooLong => "line_too_long",
            Reason::NotUtf8 => "not_utf8",
            Reason::Syntax => "syntax",
            Reason::BadValue => "bad_value",
            Reason::NonFinite => "non_finite",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::NameTooLong => "name_too_long",
            Reason::TooManyLabels => "too_many_labels",
            Reason::LabelTooLong => "label_too_long",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected line: the reason, and what exactly is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The reason it is counted under.
    pub reason: Reason,
    /// What is wrong, worded for a person.
    pub detail: &'static str,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail)
    }
}

impl std::error::Error for Rejection {}

pub(super) const fn reject(reason: Reason, detail: &'static str) -> Rejection {
    Rejection { reason, detail }
}

pub(super) const fn syntax(detail: &'static str) -> Rejection {
    reject(Reason::Syntax, detail)
}

/// What went wrong with one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line was rejected whole.
    Rejected(Rejection),
    /// The series cache was full: the samples of new series were dropped,
    /// those of known series were kept.
    SeriesCap {
        /// This many samples were dropped.
        dropped: usize,
        /// This limit was reached.
        max_series: usize,
    },
}

impl From<Rejection> for LineError {
    fn from(r: Rejection) -> Self {
        LineError::Rejected(r)
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::Rejected(r) => r.fmt(f),
            LineError::SeriesCap {
                dropped,
                max_series,
            } => write!(
                f,
                "the limit of {max_series} series is reached: {dropped} samples of new series were dropped"
            ),
        }
    }
}

impl std::error::Error for LineError {}

/// A piece of a byte stream cut by [`LineSplitter`].
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// This is a whole line without its `\n`.
    Line(&'a [u8]),
    /// This is the start of a line over the limit; it is reported once,
    /// and the rest of it is skipped.
    TooLong(&'a [u8]),
}

/// Cuts a byte stream into lines, buffering at most one line of at most
/// the limit, so that a stream without newlines costs bounded memory.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    partial: Vec<u8>,
    /// Inside a line already reported as too long.
    skipping: bool,
}

impl LineSplitter {
    /// Creates a splitter for lines of at most `max_line_bytes` bytes.
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            max: max_line_bytes,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Passes every line that `data` completes to `emit`, and keeps the
    /// incomplete rest.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let head = &data[..nl];
            data = &data[nl + 1..];
            if self.skipping {
                self.skipping = false;
            } else if self.partial.is_empty() {
                if head.len() > self.max {
                    emit(Piece::TooLong(head));
                } else {
                    emit(Piece::Line(head));
                }
            } else if self.partial.len() + head.len() > self.max {
                emit(Piece::TooLong(&self.partial));
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(head);
                emit(Piece::Line(&self.partial));
                self.partial.clear();
            }
        }
        if self.skipping || data.is_empty() {
            return;
        }
        if self.partial.len() + data.len() > self.max {
            let start: &[u8] = if self.partial.is_empty() {
                data
            } else {
                &self.partial
            };
            emit(Piece::TooLong(start));
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(data);
        }
    }

    /// Passes the last line, which had no `\n`, to `emit` at the end of
    /// the stream.
    pub fn finish(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        if !self.skipping && !self.partial.is_empty() {
            emit(Piece::Line(&self.partial));
        }
        self.partial.clear();
        self.skipping = false;
    }
}

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// The start of a line, printable: at most [`EXCERPT_BYTES`] bytes, not
/// UTF-8 replaced, control characters escaped, `…` when cut.
pub(super) fn excerpt(line: &[u8]) -> String {
    let cut = line.len() > EXCERPT_BYTES;
    let text = String::from_utf8_lossy(&line[..line.len().min(EXCERPT_BYTES)]);
    let mut out = String::with_capacity(text.len() + 3);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_printable() {
        assert_eq!(excerpt(b"plain"), "plain");
        assert_eq!(excerpt(b"a\tb\x1b[0m\x00"), "a\\tb\\u{1b}[0m\\u{0}");
        assert_eq!(excerpt(b"\xffx"), "\u{fffd}x");
        let long = excerpt(&[b'x'; 500]);
        assert_eq!(long.chars().count(), EXCERPT_BYTES + 1);
        assert!(long.ends_with('…'));
    }

    fn split_all(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, Vec<u8>>> {
        let mut s = LineSplitter::new(max);
        let mut got = Vec::new();
        let mut emit = |p: Piece<'_>| {
            got.push(match p {
                Piece::Line(l) => Ok(l.to_vec()),
                Piece::TooLong(start) => Err(start.to_vec()),
            })
        };
        for c in chunks {
            s.push(c, &mut emit);
        }
        s.finish(&mut emit);
        got
    }

    #[test]
    fn the_splitter_reports_a_long_line_once_and_goes_on() {
        let ok = |s: &str| Ok(s.as_bytes().to_vec());
        assert_eq!(
            split_all(5, &[b"ab", b"c\nde", b"", b"\n\nlast"]),
            [ok("abc"), ok("de"), ok(""), ok("last")]
        );
        // Too long within one chunk, across chunks, and at the end.
        let got = split_all(5, &[b"123456\nok\n1234", b"5678", b"9\nyes\n123456"]);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[0].is_err() && got[2].is_err() && got[4].is_err());
        assert_eq!((&got[1], &got[3]), (&ok("ok"), &ok("yes")));
        // Exactly the limit is fine.
        assert_eq!(split_all(5, &[b"12345\n"]), [ok("12345")]);
        assert_eq!(split_all(5, &[b"123", b"45\n"]), [ok("12345")]);
        assert!(split_all(5, &[b"123", b"456\n"])[0].is_err());
    }

    #[test]
    fn the_splitter_cuts_alike_however_the_stream_is_chunked() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..500 {
            let stream: Vec<u8> = (0..rng.usize(0..400))
                .map(|_| if rng.u8(0..8) == 0 { b'\n' } else { b'x' })
                .collect();
            let max = rng.usize(1..40);
            let whole = split_all(max, &[&stream]);
            let mut chunks = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len().min(50));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            let chunked = split_all(max, &chunks);
            // Lines agree exactly; a long line is reported once either way,
            // though by a start that depends on the chunks.
            assert_eq!(whole.len(), chunked.len(), "{stream:?} max {max}");
            for (a, b) in whole.iter().zip(&chunked) {
                match (a, b) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(_), Err(_)) => {}
                    _ => panic!("{a:?} vs {b:?}"),
                }
            }
            for line in whole.iter().flatten() {
                assert!(line.len() <= max && !line.contains(&b'\n'));
            }
        }
    }
}
