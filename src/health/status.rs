//! The status file's format: what a running agent or backend says about
//! itself in `health-agent.json` (in its state dir) or
//! `health-backend.json` (in its data dir), and the pure changes the
//! agent's session makes to it. One format, read and written here.
//!
//! ```json
//! {"format":1,"role":"agent","pid":4242,"pid_namespace":"pid:[4026531836]",
//!  "started_unix_ms":1795938282273,"updated_unix_ms":1795938287273,
//!  "agent":{"backend":"https://backend.example.com:8443/","connected":true,
//!           "rung":"grpc","since_unix_ms":1795938282901,
//!           "last_contact_unix_ms":1795938286310}}
//! ```
//!
//! A backend writes `"backend":{"listen":"0.0.0.0:8443","serving":true}`
//! instead of `"agent"`. A clean stop adds `stopped_unix_ms` (and
//! `exit_error` when the process stops on an error).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format written; a reader takes any format and the fields it knows.
pub const FORMAT: u32 = 1;
/// A status file larger than this is not one of ours (read no further).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Longest `last_error` or `exit_error` kept, in bytes.
pub const MAX_ERROR_BYTES: usize = 300;

/// Which process keeps the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Backend,
}

impl Role {
    /// The name used in the file, in flags and in lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Backend => "backend",
        }
    }

    /// The status file's name in the role's directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Role::Agent => "health-agent.json",
            Role::Backend => "health-backend.json",
        }
    }
}

/// The status file of `role` in `dir`.
pub fn path(dir: &Path, role: Role) -> PathBuf {
    dir.join(role.file_name())
}

/// What a running agent or backend says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`FORMAT`] when written.
    pub format: u32,
    pub role: Role,
    /// The writer's process id, in its own pid namespace.
    pub pid: u32,
    /// The writer's pid namespace (`/proc/self/ns/pid`, Linux): a reader
    /// in the same namespace (the same container) can look the pid up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_namespace: Option<String>,
    /// When the process started keeping the file, Unix ms.
    pub started_unix_ms: i64,
    /// When the file was last written, Unix ms: at every change and at
    /// least every [`super::TICK`], so an old one means a process gone or
    /// hung.
    pub updated_unix_ms: i64,
    /// Set when the process stopped (cleanly, or on `exit_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_unix_ms: Option<i64>,
    /// Why the process stopped, when it stopped on an error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exit_error: String,
    /// The agent's connection, for role `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// The backend's port, for role `backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendStatus>,
}

/// The agent's connection to its backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The backend's URL.
    pub backend: String,
    /// True while a rung works: a stream delivered its first frame, or a
    /// poll was answered, and nothing failed since.
    pub connected: bool,
    /// The rung (`grpc` or `longpoll`) it is on or tried last; empty
    /// before the first attempt (enrollment).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rung: String,
    /// Since when `connected` (and `rung`) hold, Unix ms.
    pub since_unix_ms: i64,
    /// The last frame or poll answer from the backend, Unix ms; 0: none yet.
    #[serde(default)]
    pub last_contact_unix_ms: i64,
    /// The last failure (connecting, enrolling), clipped; empty once a
    /// rung works.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

/// The backend's port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The address it bound (the real port when it was asked for port 0).
    pub listen: SocketAddr,
    /// True while it accepts connections; false while it drains.
    pub serving: bool,
}

/// Text cut to at most [`MAX_ERROR_BYTES`] on a character boundary, on
/// one line.
pub fn clip(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= MAX_ERROR_BYTES {
        return one_line;
    }
    let mut cut = MAX_ERROR_BYTES - '…'.len_utf8();
    while !one_line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &one_line[..cut])
}

impl AgentStatus {
    /// A starting agent of `backend`: not connected since `now`.
    pub fn new(backend: &str, now: i64) -> Self {
        AgentStatus {
            backend: backend.to_string(),
            connected: false,
            rung: String::new(),
            since_unix_ms: now,
            last_contact_unix_ms: 0,
            last_error: String::new(),
        }
    }

    /// A rung works (a stream's first frame, a poll answered). True when
    /// this changes what the file says beyond the contact time.
    pub fn connected(&mut self, rung: &str, now: i64) -> bool {
        let changed = !self.connected || self.rung != rung || !self.last_error.is_empty();
        if !self.connected || self.rung != rung {
            self.since_unix_ms = now;
        }
        self.connected = true;
        self.rung = rung.to_string();
        self.last_error.clear();
        self.last_contact_unix_ms = now;
        changed
    }

    /// A frame or an answer from the backend.
    pub fn contact(&mut self, now: i64) {
        self.last_contact_unix_ms = now;
    }

    /// A session on `rung` (empty: enrollment) failed with `error`. True
    /// when this changes what the file says.
    pub fn failed(&mut self, rung: &str, error: &str, now: i64) -> bool {
        let error = clip(error);
        let changed = self.connected || self.rung != rung || self.last_error != error;
        if self.connected {
            self.since_unix_ms = now;
        }
        self.connected = false;
        if !rung.is_empty() {
            self.rung = rung.to_string();
        }
        self.last_error = error;
        changed
    }
}

/// Why a status file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes: not a status file")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a status file ({why})")]
    Invalid { path: PathBuf, why: String },
}

/// Reads the status file of `role` at `path`: None when there is none.
pub fn read(path: &Path, role: Role) -> Result<Option<Status>, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    parse(&bytes, role)
        .map(Some)
        .map_err(|why| ReadError::Invalid {
            path: path.to_path_buf(),
            why,
        })
}

/// A status of `role` from the file's bytes, or why they are not one.
pub fn parse(bytes: &[u8], role: Role) -> Result<Status, String> {
    let s: Status = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if s.role != role {
        return Err(format!(
            "it says role {:?} where {:?} was expected",
            s.role.name(),
            role.name()
        ));
    }
    match role {
        Role::Agent if s.agent.is_none() => Err("role agent without \"agent\"".into()),
        Role::Backend if s.backend.is_none() => Err("role backend without \"backend\"".into()),
        _ if s.pid == 0 => Err("pid 0".into()),
        _ => Ok(s),
    }
}

/// This process's pid namespace (Linux: the target of
/// `/proc/self/ns/pid`, as `pid:[4026531836]`), None where there is none
/// to read.
pub fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_status() -> Status {
        Status {
            format: FORMAT,
            role: Role::Agent,
            pid: 42,
            pid_namespace: Some("pid:[1]".into()),
            started_unix_ms: 1_000,
            updated_unix_ms: 2_000,
            stopped_unix_ms: None,
            exit_error: String::new(),
            agent: Some(AgentStatus::new("https://b:8443/", 1_000)),
            backend: None,
        }
    }

    #[test]
    fn a_status_round_trips_and_leaves_out_what_is_empty() {
        let s = agent_status();
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("stopped_unix_ms") && !text.contains("exit_error"));
        assert!(!text.contains("\"backend\":{"), "{text}");
        assert_eq!(parse(text.as_bytes(), Role::Agent).unwrap(), s);
        let b = Status {
            role: Role::Backend,
            agent: None,
            backend: Some(BackendStatus {
                listen: "[::]:8443".parse().unwrap(),
                serving: true,
            }),
            ..s
        };
        let text = serde_json::to_string(&b).unwrap();
        assert!(text.contains(r#""listen":"[::]:8443""#), "{text}");
        assert_eq!(parse(text.as_bytes(), Role::Backend).unwrap(), b);
    }

    #[test]
    fn a_file_of_another_role_or_shape_is_refused_with_the_reason() {
        let text = serde_json::to_string(&agent_status()).unwrap();
        let e = parse(text.as_bytes(), Role::Backend).unwrap_err();
        assert!(e.contains("role \"agent\""), "{e}");
        let e = parse(br#"{"format":1,"role":"agent","pid":1}"#, Role::Agent).unwrap_err();
        assert!(e.contains("missing field"), "{e}");
        let e = parse(b"{", Role::Agent).unwrap_err();
        assert!(e.contains("EOF"), "{e}");
        let mut zero = agent_status();
        zero.pid = 0;
        let text = serde_json::to_string(&zero).unwrap();
        assert_eq!(parse(text.as_bytes(), Role::Agent).unwrap_err(), "pid 0");
    }

    #[test]
    fn unknown_fields_and_newer_formats_are_read() {
        let mut v = serde_json::to_value(agent_status()).unwrap();
        v["format"] = 7.into();
        v["something_new"] = true.into();
        let s = parse(v.to_string().as_bytes(), Role::Agent).unwrap();
        assert_eq!(s.format, 7);
    }

    #[test]
    fn reading_names_the_file_and_stops_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), Role::Agent);
        assert!(read(&p, Role::Agent).unwrap().is_none());
        std::fs::write(&p, vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        let e = read(&p, Role::Agent).unwrap_err().to_string();
        assert!(
            e.contains("health-agent.json") && e.contains("larger"),
            "{e}"
        );
        std::fs::write(&p, b"[]").unwrap();
        let e = read(&p, Role::Agent).unwrap_err().to_string();
        assert!(e.contains("is not a status file"), "{e}");
        std::fs::write(&p, serde_json::to_vec(&agent_status()).unwrap()).unwrap();
        assert_eq!(read(&p, Role::Agent).unwrap(), Some(agent_status()));
    }

    #[test]
    fn the_agent_records_when_its_connection_changed() {
        let mut a = AgentStatus::new("https://b/", 10);
        assert!(a.failed("", "enrollment failed: refused", 20));
        assert_eq!((a.connected, a.since_unix_ms), (false, 10));
        assert!(
            !a.failed("", "enrollment failed: refused", 25),
            "same failure"
        );
        assert!(a.connected("grpc", 30));
        assert_eq!(
            (a.connected, a.rung.as_str(), a.since_unix_ms),
            (true, "grpc", 30)
        );
        assert!(a.last_error.is_empty());
        a.contact(40);
        assert!(!a.connected("grpc", 50), "a rotated stream changes nothing");
        assert_eq!((a.since_unix_ms, a.last_contact_unix_ms), (30, 50));
        assert!(a.failed("grpc", "the stream ended", 60));
        assert_eq!((a.connected, a.since_unix_ms), (false, 60));
        assert!(a.failed("longpoll", "refused", 70), "another rung");
        assert_eq!((a.since_unix_ms, a.rung.as_str()), (60, "longpoll"));
        assert!(a.connected("longpoll", 80));
        assert_eq!(a.since_unix_ms, 80);
        assert!(a.connected("grpc", 90), "a climb");
        assert_eq!(a.since_unix_ms, 90);
    }

    #[test]
    fn errors_are_clipped_to_one_line() {
        assert_eq!(clip("a\nb"), "a b");
        let long = clip(&"é".repeat(400));
        assert!(
            long.len() <= MAX_ERROR_BYTES && long.ends_with('…'),
            "{long}"
        );
    }
}
