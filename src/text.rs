//! Text that came from elsewhere (an agent, a container, the Docker
//! engine), made safe to store, log and print: [`clip`] bounds its length
//! at intake, [`escape`] turns every control character (newlines, ANSI
//! escape sequences, C1 controls) and bidirectional override into a
//! visible escape, so such text cannot start a new log line, colour or
//! move a terminal's cursor, or fake a row of `ctl` output.

use std::borrow::Cow;

/// True for a character [`escape`] rewrites: every Unicode control
/// character (C0, DEL, C1) but the tab, and the bidirectional controls that
/// reorder what a terminal shows.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character written as an escape (`\n`, `\r`,
/// `\e` for ESC, `\u{..}` otherwise); borrowed when there is none. A tab
/// stays: it can neither start a line nor drive a terminal.
/// A backslash is left alone: the result is for people to read, not to
/// parse back.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// What [`clip`] appends to text it shortened.
pub const CLIPPED: &str = "…";

/// `s` escaped and at most `max` bytes long: cut at a character boundary
/// and ended with [`CLIPPED`] when longer. For text an agent sends that is
/// stored or shown, where refusing it would lose what comes with it.
pub fn clip(s: &str, max: usize) -> String {
    let escaped = escape(s);
    if escaped.len() <= max {
        return escaped.into_owned();
    }
    let mut end = max.saturating_sub(CLIPPED.len());
    while !escaped.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = escaped[..end].to_string();
    out.push_str(CLIPPED);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(escape("web-1 (Docker 27.1)"), Cow::Borrowed(_)));
        assert_eq!(escape("café ünïcode"), "café ünïcode");
        assert_eq!(escape("a\tb"), "a\tb");
    }

    #[test]
    fn newlines_and_ansi_cannot_start_a_line_or_reach_a_terminal() {
        let hostile = "x\n2026-01-01T00:00:00Z  INFO forged\r\u{1b}[31mred\u{1b}[0m\u{9b}2J\u{202e}abc\u{7f}\0";
        let e = escape(hostile);
        assert!(!e.chars().any(unsafe_char), "{e}");
        assert_eq!(
            e,
            "x\\n2026-01-01T00:00:00Z  INFO forged\\r\\e[31mred\\e[0m\\u{9b}2J\\u{202e}abc\\u{7f}\\u{0}"
        );
    }

    #[test]
    fn clipping_bounds_bytes_at_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(1_000_000);
        let c = clip(&long, 256);
        assert!(c.len() <= 256, "{}", c.len());
        assert!(c.ends_with(CLIPPED));
        // Escaping happens before the cut, so an escape never grows past it.
        let c = clip(&"\u{1b}".repeat(1000), 64);
        assert!(c.len() <= 64 && c.starts_with("\\e\\e"), "{c}");
        assert!(!c.contains('\u{1b}'));
    }
}
