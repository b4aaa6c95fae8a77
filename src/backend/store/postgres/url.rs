//! The database URL of `--database` / `UPLINK_DATABASE`: checked when the
//! flags are read (a bad one is a configuration error, status 64), and
//! kept as a [`Secret`] because it may hold a password. Whatever is shown
//! of it (logs, errors) goes through [`DatabaseUrl::redacted`].

use std::str::FromStr as _;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};

use crate::secret::{Secret, redact_url};

/// How long connecting (TCP, then the server's answer) may take, at start
/// and for every connection the pool opens later: a database that does
/// not answer is an error in seconds, never a start that hangs.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle time after which the kernel probes a connection to the database,
/// so one to a database host that vanished is noticed in about a minute
/// rather than the system default of two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// A PostgreSQL URL that was parsed and found usable. `Debug` shows it
/// without its password.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: Secret,
    /// The client's settings parsed from it (their `Debug` hides the
    /// password too).
    parsed: tokio_postgres::Config,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl DatabaseUrl {
    /// Checks `url` (`postgres://user:password@host:port/db`); the problem
    /// with it otherwise, naming `source` (the flag) and never the
    /// password.
    pub fn parse(url: &str, source: &str) -> Result<DatabaseUrl, String> {
        let shown = redact_url(url);
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{source} {shown:?}: a URL has no spaces or control characters"
            ));
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "{source} {shown:?}: give a PostgreSQL URL, postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ));
        }
        let config = tokio_postgres::Config::from_str(url).map_err(|e| {
            format!(
                "{source} {shown:?}: {}",
                scrub(&super::describe(&e), url_password(url))
            )
        })?;
        let mut problems = Vec::new();
        if config.get_hosts().is_empty() {
            problems.push("it names no host");
        }
        if config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(name) if name.is_empty()))
        {
            problems.push("a host name is empty");
        }
        if config.get_user().is_none_or(str::is_empty) {
            problems.push("it names no user (postgres://USER:PASSWORD@HOST/DATABASE)");
        }
        if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
            problems.push(
                "TLS to the database is not supported by this build: use sslmode=disable \
                 (or leave sslmode out) and reach the database over a trusted network",
            );
        }
        if !problems.is_empty() {
            return Err(format!("{source} {shown:?}: {}", problems.join("; ")));
        }
        Ok(DatabaseUrl {
            url: Secret::new(url),
            parsed: config,
        })
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(self.url.expose())
    }

    /// The client's configuration: the URL's settings, with a bounded
    /// connect timeout and TCP keepalives unless the URL set them, and the
    /// application name `uplink` (shown in `pg_stat_activity`).
    pub(super) fn config(&self) -> tokio_postgres::Config {
        let mut config = self.parsed.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true);
        config.keepalives_idle(KEEPALIVE_IDLE);
        if config.get_application_name().is_none() {
            config.application_name("uplink");
        }
        // Without a TLS connector, `prefer` would try TLS first and fall
        // back; say plainly that the connection is not encrypted.
        config.ssl_mode(SslMode::Disable);
        config
    }

    /// The password in the URL, if any, to keep out of messages.
    pub(super) fn password(&self) -> Option<&str> {
        url_password(self.url.expose())
    }
}

/// The password part of a URL's userinfo, if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// `text` with every occurrence of `password` replaced.
pub(super) fn scrub(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls_parse_and_never_show_their_password() {
        let u = DatabaseUrl::parse(
            "postgres://uplink:hunter22@db.lab:5433/uplink",
            "--database",
        )
        .unwrap();
        assert_eq!(u.redacted(), "postgres://***@db.lab:5433/uplink");
        assert!(!format!("{u:?}").contains("hunter22"));
        let c = u.config();
        assert_eq!(c.get_user(), Some("uplink"));
        assert_eq!(c.get_dbname(), Some("uplink"));
        assert_eq!(c.get_ports(), [5433]);
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(!format!("{c:?}").contains("hunter22"));
        assert_eq!(u.password(), Some("hunter22"));
        DatabaseUrl::parse("postgresql://u@localhost/db?sslmode=disable", "--database").unwrap();
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        for (url, expect) in [
            ("mysql://u:pw1234@h/db", "give a PostgreSQL URL"),
            ("/var/lib/uplink", "give a PostgreSQL URL"),
            ("postgres://u:pw1234@h:notaport/db", "invalid"),
            ("postgres://:pw1234@h/db", "names no user"),
            ("postgres://u:pw1234@/db", "no host"),
            (
                "postgres://u:pw1234@h/db?sslmode=require",
                "TLS to the database is not supported",
            ),
            ("postgres://u:pw 1234@h/db", "no spaces"),
        ] {
            let e = DatabaseUrl::parse(url, "--database").expect_err(url);
            assert!(e.starts_with("--database "), "{url}: {e}");
            assert!(e.contains(expect), "{url}: {e}");
            assert!(!e.contains("pw1234"), "{url}: {e}");
            assert!(!e.contains('\n'), "{url}: {e}");
        }
    }
}
