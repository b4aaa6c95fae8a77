//! The host command: the `docker run` line the backend prints (at first
//! start, and for `ctl providers create/rotate`) for an operator to paste
//! on a host, as it is, into `sh` or `bash`. Pure: settings in, text out.
//!
//! ```text
//! docker run -d --name uplink-agent --restart unless-stopped \
//!     --network host \
//!     --group-add "$(stat -c %g /var/run/docker.sock)" \
//!     -v /var/run/docker.sock:/var/run/docker.sock \
//!     -v /:/host:ro,rslave \
//!     -v uplink-state:/var/lib/uplink \
//!     --mount type=bind,src=/etc/uplink/ca.pem,dst=/etc/uplink/ca.pem,readonly \
//!     -e UPLINK_CA_FILE=/etc/uplink/ca.pem \
//!     -e UPLINK_HOST_ROOT=/host \
//!     -e UPLINK_BACKEND=https://backend.example.com:8443 \
//!     -e UPLINK_TOKEN=upl_e_... \
//!     -e HTTPS_PROXY=http://proxy.corp:3128 -e NO_PROXY=.corp \
//!     uplink:0.1.0 agent
//! ```
//!
//! Why each part is there:
//!
//! - `--restart unless-stopped`: the agent comes back after a crash or a
//!   reboot; its identity, journal and spool are in the volume.
//! - `--network host`: the load generators the agent starts push to its
//!   ingest endpoint (`--ingest-graphite 172.17.0.1:2003`) on the Docker
//!   bridge's address, which only the host's network namespace has; the
//!   agent reaches the backend and the proxy as the host does.
//! - `--group-add` the socket's group: the image runs as uid 10001, and
//!   the Docker socket is `root:docker` 0660. The group is read on the
//!   host when the line runs, since its number differs between hosts.
//! - the socket: the agent runs load generators as its siblings.
//! - `-v /:/host:ro,rslave` with `UPLINK_HOST_ROOT=/host`: the host's file
//!   systems, interfaces (`/host/proc/1/net/dev`), name and CPUs
//!   (`--host-root`). Read-only; `rslave` so that file systems the host
//!   mounts later appear and those it unmounts are let go (without it the
//!   container would keep them busy). Docker refuses `rslave` when the
//!   host's `/` is a private mount (rare: systemd makes it shared); drop
//!   `,rslave` there, and the agent sees the host's mounts as they were
//!   when it started.
//! - not `--pid host`: the agent reads the host's `/proc` under `/host`
//!   and needs none of the host's processes.
//! - the state volume: identity, journal and spool outlive the container.
//! - the CA, when the backend generated its own: a copy of its `ca.pem`
//!   that the operator puts on each agent host (default
//!   `/etc/uplink/ca.pem`, readable by uid 10001). `--mount` rather than
//!   `-v`, so that a missing file fails the `docker run` instead of
//!   becoming an empty directory.
//! - `HTTPS_PROXY`/`NO_PROXY` when the operator gives them to the backend:
//!   a container does not inherit the host's environment.
//!
//! Every value that is not made of plain characters is single-quoted
//! ([`sh_quote`]), so a proxy password with `$`, `!` or a quote pastes
//! unchanged.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::defaults::{DEFAULT_HOST_COMMAND_CA_FILE, DEFAULT_HOST_COMMAND_IMAGE};
use crate::secret::Secret;

/// Where the image keeps the agent's state.
const STATE_DIR: &str = "/var/lib/uplink";
/// The named volume that holds it on the host.
const STATE_VOLUME: &str = "uplink-state";
/// Where the host's `/` is mounted in the container.
const HOST_ROOT: &str = "/host";
/// Where the CA is mounted in the container.
const CA_IN_CONTAINER: &str = "/etc/uplink/ca.pem";
/// The Docker socket, on the host and in the container.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// What the printed host command holds besides the backend's URL and the
/// token. [`HostCommand::default`] is the one place of the defaults.
#[derive(Clone, Debug)]
pub struct HostCommand {
    /// The image agents run (`--host-command-image`): the project's image
    /// by default, or the operator's copy in their registry.
    pub image: String,
    /// Where agent hosts keep this backend's CA (`--host-command-ca-file`).
    /// None: [`DEFAULT_HOST_COMMAND_CA_FILE`] when the backend generated
    /// its CA, and no CA mount when it serves the operator's certificate.
    pub ca_file: Option<PathBuf>,
    /// The proxy agents go through (`--host-command-proxy`), printed as
    /// `HTTPS_PROXY`. A `Secret`, since its URL may hold a password: it is
    /// printed in the command, never logged.
    pub proxy: Option<Secret>,
    /// What agents reach without the proxy (`--host-command-no-proxy`),
    /// printed as `NO_PROXY`.
    pub no_proxy: Option<String>,
}

impl Default for HostCommand {
    fn default() -> Self {
        HostCommand {
            image: DEFAULT_HOST_COMMAND_IMAGE.into(),
            ca_file: None,
            proxy: None,
            no_proxy: None,
        }
    }
}

impl HostCommand {
    /// Every problem with the settings, at once; a proxy URL is shown
    /// without its password.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Err(why) = check_image_reference(&self.image) {
            errs.push(format!("--host-command-image {:?}: {why}", self.image));
        }
        if let Some(ca) = &self.ca_file {
            let text = ca.to_string_lossy();
            if !ca.is_absolute() || text.contains(',') || text.chars().any(char::is_control) {
                errs.push(format!(
                    "--host-command-ca-file {text:?}: give the absolute path of the CA on agent hosts, \
                     without commas (e.g. {DEFAULT_HOST_COMMAND_CA_FILE})"
                ));
            }
        }
        if let Some(proxy) = &self.proxy {
            let url = proxy.expose();
            if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errs.push(format!(
                    "--host-command-proxy {:?}: a URL has no spaces or control characters",
                    crate::secret::redact_url(url)
                ));
            } else {
                let settings = crate::net::ProxySettings {
                    proxy: Some(url.to_string()),
                    source: "--host-command-proxy",
                    no_proxy: String::new(),
                };
                errs.extend(settings.validate());
            }
        }
        if let Some(list) = &self.no_proxy {
            if self.proxy.is_none() {
                errs.push(
                    "--host-command-no-proxy needs --host-command-proxy: without a proxy agents reach everything directly"
                        .into(),
                );
            }
            if list.trim().is_empty() || list.chars().any(char::is_control) {
                errs.push(format!(
                    "--host-command-no-proxy {list:?}: give a comma-separated list of hosts, domains, IPs or CIDR ranges"
                ));
            }
        }
        errs
    }

    /// Where the command mounts the CA from, on agent hosts: the operator's
    /// path, else the default when the backend generated its CA; None: no
    /// CA mount.
    pub fn ca_on_hosts(&self, generated_ca: bool) -> Option<&Path> {
        match (&self.ca_file, generated_ca) {
            (Some(ca), _) => Some(ca),
            (None, true) => Some(Path::new(DEFAULT_HOST_COMMAND_CA_FILE)),
            (None, false) => None,
        }
    }

    /// The command for a backend at `url`, with the enrollment `token`
    /// (None: `-e UPLINK_TOKEN` passes the operator's own
    /// `UPLINK_TOKEN`); `generated_ca` says the backend generated its CA.
    /// Lines end with ` \`, so it pastes as one command.
    pub fn render(&self, url: &str, token: Option<&str>, generated_ca: bool) -> String {
        let mut lines: Vec<String> = vec![
            "docker run -d --name uplink-agent --restart unless-stopped".into(),
            "--network host".into(),
            format!("--group-add \"$(stat -c %g {DOCKER_SOCKET})\""),
            format!("-v {DOCKER_SOCKET}:{DOCKER_SOCKET}"),
            format!("-v /:{HOST_ROOT}:ro,rslave"),
            format!("-v {STATE_VOLUME}:{STATE_DIR}"),
        ];
        if let Some(ca) = self.ca_on_hosts(generated_ca) {
            let mount = format!(
                "type=bind,src={},dst={CA_IN_CONTAINER},readonly",
                ca.display()
            );
            lines.push(format!("--mount {}", sh_quote(&mount)));
            lines.push(format!("-e UPLINK_CA_FILE={CA_IN_CONTAINER}"));
        }
        lines.push(format!("-e UPLINK_HOST_ROOT={HOST_ROOT}"));
        lines.push(env("UPLINK_BACKEND", url));
        lines.push(match token {
            Some(t) => env("UPLINK_TOKEN", t),
            None => "-e UPLINK_TOKEN".into(),
        });
        if let Some(proxy) = &self.proxy {
            let mut line = env("HTTPS_PROXY", proxy.expose());
            if let Some(list) = &self.no_proxy {
                line = format!("{line} {}", env("NO_PROXY", list));
            }
            lines.push(line);
        }
        lines.push(format!("{} agent", sh_quote(&self.image)));
        lines.join(" \\\n    ")
    }
}

/// `-e NAME=value`, quoted as the shell needs.
fn env(name: &str, value: &str) -> String {
    format!("-e {}", sh_quote(&format!("{name}={value}")))
}

/// `s` as one shell word: as it is when made only of characters no shell
/// treats specially, else in single quotes (a `'` inside written `'\''`).
pub fn sh_quote(s: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

/// Whether `image` has the shape of a Docker image reference:
/// `[registry[:port]/]path[:tag][@algorithm:hex]`, with a lower-case
/// path; the reason when it has not.
pub fn check_image_reference(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > 255 {
        return Err("an image reference has 1 to 255 characters".into());
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return Err(format!(
                "digest {d:?} is not algorithm:hex (e.g. sha256:<64 hex digits>)"
            ));
        }
    }
    // A tag follows the last `:` after the last `/` (a `:` before it is a
    // registry's port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let ok = t.len() <= 128
            && t.starts_with(word)
            && t.chars().all(|c| word(c) || c == '.' || c == '-');
        if !ok {
            return Err(format!(
                "tag {t:?} is not 1 to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)"
            ));
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let registry = parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost");
    if registry {
        let host = parts.remove(0);
        let (h, port) = match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        };
        let host_ok = !h.is_empty()
            && h.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
        if !host_ok || !port_ok {
            return Err(format!("registry {host:?} is not host[:port]"));
        }
    }
    for part in &parts {
        if !path_component(part) {
            return Err(format!(
                "{part:?} is not a repository path component (lower-case letters and digits, \
                 separated by one '.', one or two '_', or dashes)"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn path_component(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !part.starts_with(alnum) || !part.ends_with(alnum) {
        return false;
    }
    let mut separator = String::new();
    for c in part.chars() {
        if alnum(c) {
            let ok = matches!(separator.as_str(), "" | "." | "_" | "__")
                || separator.chars().all(|s| s == '-');
            if !ok {
                return false;
            }
            separator.clear();
        } else if ".-_".contains(c) {
            separator.push(c);
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `sh` makes of `line` (run for real), so quoting is checked
    /// by the shell that will read it.
    fn words(line: &str) -> Vec<String> {
        let script = format!("for w in {line}; do printf '%s\\0' \"$w\"; done");
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(String::from)
            .collect()
    }

    #[test]
    fn values_are_quoted_only_when_the_shell_needs_it_and_come_back_unchanged() {
        assert_eq!(sh_quote("upl_e_0123abcd"), "upl_e_0123abcd");
        assert_eq!(
            sh_quote("UPLINK_BACKEND=https://b.example.com:8443"),
            "UPLINK_BACKEND=https://b.example.com:8443"
        );
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let nasty = [
            "http://user:p%40ss@proxy:3128",
            "http://u:pa$$w0rd!`id`@proxy:3128",
            "it's \"quoted\" \\ and ; & | < > * ? ~ # $(x) ${y}",
            "tab\there",
            "localhost,127.0.0.1,.corp,10.0.0.0/8",
        ];
        for value in nasty {
            assert_eq!(words(&sh_quote(value)), [value], "{value}");
        }
    }

    #[test]
    fn the_command_is_the_documented_line() {
        let cmd =
            HostCommand::default().render("https://b.example.com:8443", Some("upl_e_abc"), true);
        assert_eq!(
            cmd,
            format!(
                "docker run -d --name uplink-agent --restart unless-stopped \\
    --network host \\
    --group-add \"$(stat -c %g /var/run/docker.sock)\" \\
    -v /var/run/docker.sock:/var/run/docker.sock \\
    -v /:/host:ro,rslave \\
    -v uplink-state:/var/lib/uplink \\
    --mount type=bind,src=/etc/uplink/ca.pem,dst=/etc/uplink/ca.pem,readonly \\
    -e UPLINK_CA_FILE=/etc/uplink/ca.pem \\
    -e UPLINK_HOST_ROOT=/host \\
    -e UPLINK_BACKEND=https://b.example.com:8443 \\
    -e UPLINK_TOKEN=upl_e_abc \\
    uplink:{} agent",
                crate::VERSION
            )
        );
        // The operator's certificate: no CA to mount; no token: the
        // operator's UPLINK_TOKEN.
        let cmd = HostCommand::default().render("https://b", None, false);
        assert!(!cmd.contains("ca.pem"), "{cmd}");
        assert!(cmd.contains("\\\n    -e UPLINK_TOKEN \\\n"), "{cmd}");
    }

    #[test]
    fn proxies_and_odd_paths_are_quoted_in_the_command() {
        let hc = HostCommand {
            image: "registry.corp:5000/tools/uplink:0.1.0".into(),
            ca_file: Some("/srv/uplink ca/ca.pem".into()),
            proxy: Some(Secret::new(
                "http://bob:s3cr't$!@proxy.corp:3128".to_string(),
            )),
            no_proxy: Some("localhost,.corp".into()),
        };
        assert!(hc.validate().is_empty(), "{:?}", hc.validate());
        let cmd = hc.render("https://b", Some("upl_e_x"), true);
        let got = words(
            &cmd.replace("\\\n", " ")
                .replace("\"$(stat -c %g /var/run/docker.sock)\"", "GID"),
        );
        let want = [
            "docker",
            "run",
            "-d",
            "--name",
            "uplink-agent",
            "--restart",
            "unless-stopped",
            "--network",
            "host",
            "--group-add",
            "GID",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            "/:/host:ro,rslave",
            "-v",
            "uplink-state:/var/lib/uplink",
            "--mount",
            "type=bind,src=/srv/uplink ca/ca.pem,dst=/etc/uplink/ca.pem,readonly",
            "-e",
            "UPLINK_CA_FILE=/etc/uplink/ca.pem",
            "-e",
            "UPLINK_HOST_ROOT=/host",
            "-e",
            "UPLINK_BACKEND=https://b",
            "-e",
            "UPLINK_TOKEN=upl_e_x",
            "-e",
            "HTTPS_PROXY=http://bob:s3cr't$!@proxy.corp:3128",
            "-e",
            "NO_PROXY=localhost,.corp",
            "registry.corp:5000/tools/uplink:0.1.0",
            "agent",
        ];
        assert_eq!(got, want);
        // The settings' Debug, which a log could print, hides the password.
        assert!(!format!("{hc:?}").contains("s3cr"), "{hc:?}");
    }

    #[test]
    fn image_references_are_checked() {
        for good in [
            "uplink:0.1.0",
            "uplink",
            "registry.corp:5000/tools/uplink:0.1.0-rc.1",
            "localhost/uplink:latest",
            "ghcr.io/acme/up_link__x/a-b--c:v1",
            &format!("uplink@sha256:{}", "a".repeat(64)),
            &format!("r.io/uplink:1@sha256:{}", "0".repeat(64)),
        ] {
            assert_eq!(check_image_reference(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Uplink:1",
            "uplink:",
            "uplink:.x",
            "uplink:a b",
            "-uplink",
            "up..link",
            "registry.corp:99999/uplink",
            "reg_istry.corp/uplink",
            "uplink@sha256:xyz",
            "uplink@md5",
            "a//b",
        ] {
            assert!(check_image_reference(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn bad_settings_are_all_reported_and_no_password_is_shown() {
        let hc = HostCommand {
            image: "Not An Image".into(),
            ca_file: Some("relative/ca.pem".into()),
            proxy: Some(Secret::new("socks5://bob:hunter2@proxy:1080".to_string())),
            no_proxy: Some(String::new()),
        };
        let problems = hc.validate();
        assert_eq!(problems.len(), 4, "{problems:?}");
        for (p, flag) in problems.iter().zip([
            "--host-command-image",
            "--host-command-ca-file",
            "--host-command-proxy",
            "--host-command-no-proxy",
        ]) {
            assert!(p.starts_with(flag), "{p}");
        }
        assert!(!problems.concat().contains("hunter2"), "{problems:?}");
        let hc = HostCommand {
            no_proxy: Some(".corp".into()),
            ..HostCommand::default()
        };
        assert!(hc.validate()[0].contains("needs --host-command-proxy"));
        let hc = HostCommand {
            proxy: Some(Secret::new("http://u:pw@proxy:3128\nx".to_string())),
            ..HostCommand::default()
        };
        let problems = hc.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(!problems[0].contains("pw@"), "{problems:?}");
    }
}
