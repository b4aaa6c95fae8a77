//! Tokens and credentials: generation, hashing for storage, and redaction.
//!
//! Every secret is 32 random bytes from the OS, written as
//! `upl_<kind>_<64 hex digits>`, so a leaked string is recognisable and
//! `grep`-able. The backend stores only SHA-256 hashes: the secrets are
//! high-entropy, so a plain digest is enough and comparison by hash lookup
//! does not leak timing about the secret itself.

use std::fmt;

use ring::rand::SecureRandom;

/// The kinds of secret, by prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A provider's enrollment token (`upl_e_`).
    Enrollment,
    /// The operator's admin token (`upl_a_`).
    Admin,
    /// An agent's credential (`upl_c_`).
    Credential,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Enrollment => "upl_e_",
            Kind::Admin => "upl_a_",
            Kind::Credential => "upl_c_",
        }
    }
}

/// A secret string that never prints itself: `Debug` and `Display` show
/// `upl_e_…(redacted)`. Use [`Secret::expose`] where the value must travel.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret given by the user or read from disk.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Generates a fresh secret of `kind`.
    pub fn generate(kind: Kind) -> Self {
        let mut bytes = [0u8; 32];
        // SystemRandom reads the OS generator; it fails only when the OS has
        // none, in which case nothing secure can run at all.
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            panic!("the operating system's random generator is unavailable");
        }
        Secret(format!("{}{}", kind.prefix(), hex(&bytes)))
    }

    /// The secret's value, for putting on the wire or in a file.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash under which the secret is stored.
    pub fn hash(&self) -> String {
        hash(&self.0)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// A redacted form of a secret that still says what kind it was.
pub fn redact(value: &str) -> String {
    if value.is_empty() {
        return "(empty)".into();
    }
    let prefix = ["upl_e_", "upl_a_", "upl_c_"]
        .into_iter()
        .find(|p| value.starts_with(p))
        .unwrap_or("");
    format!("{prefix}…(redacted)")
}

/// SHA-256 of `value`, hex-encoded.
pub fn hash(value: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, value.as_bytes()).as_ref())
}

/// A random identifier with `prefix`, e.g. `agt_3f9a…` (8 random bytes, 16 hex digits).
pub fn random_id(prefix: &str) -> String {
    random_hex(prefix, 8)
}

/// `prefix` and `n` random bytes in lower-case hex.
pub fn random_hex(prefix: &str, n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        panic!("the operating system's random generator is unavailable");
    }
    format!("{prefix}{}", hex(&bytes))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Removes userinfo (user:password@) from a URL for logging.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        // No scheme (`user:pass@host:port`): everything before the last
        // `@` is userinfo.
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_unique_prefixed_and_redacted() {
        let a = Secret::generate(Kind::Enrollment);
        let b = Secret::generate(Kind::Enrollment);
        assert_ne!(a, b);
        assert!(a.expose().starts_with("upl_e_"));
        assert_eq!(a.expose().len(), 6 + 64);
        let shown = format!("{a} {a:?}");
        assert!(!shown.contains(&a.expose()[6..]), "{shown}");
        assert!(shown.contains("upl_e_…(redacted)"));
    }

    #[test]
    fn hash_is_stable_and_not_the_secret() {
        let s = Secret::new("upl_c_abc");
        assert_eq!(s.hash(), hash("upl_c_abc"));
        assert_eq!(s.hash().len(), 64);
        assert!(!s.hash().contains("abc"));
    }

    #[test]
    fn urls_lose_their_userinfo() {
        assert_eq!(
            redact_url("http://u:p%40ss@proxy:3128"),
            "http://***@proxy:3128"
        );
        assert_eq!(redact_url("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(redact_url("alice:pa/ss@proxy:3128"), "***@proxy:3128");
    }
}
