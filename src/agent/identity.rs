//! The agent's identity and credential, kept in `STATE_DIR/identity.json`
//! (mode 0600) after enrollment and reused after a restart.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// What enrollment gave the agent.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// The backend it enrolled with.
    pub backend: String,
    pub agent_id: String,
    pub credential: String,
    pub provider: String,
    /// When the credential was issued (enrollment or rotation), Unix ms;
    /// 0 in files written before rotation existed.
    #[serde(default)]
    pub issued_unix_ms: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("backend", &self.backend)
            .field("agent_id", &self.agent_id)
            .field("credential", &Secret::new(self.credential.clone()))
            .field("provider", &self.provider)
            .field("issued_unix_ms", &self.issued_unix_ms)
            .finish()
    }
}

/// Problems with the identity file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid identity file ({source}); remove it to enroll again")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The identity file's path in a state dir.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("identity.json")
}

/// Loads the identity, if the agent enrolled before.
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let p = path(state_dir);
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IdentityError::Read { path: p, source }),
    };
    let id: Identity = serde_json::from_slice(&data).map_err(|source| IdentityError::Parse {
        path: p.clone(),
        source,
    })?;
    if id.agent_id.is_empty() || id.credential.is_empty() {
        return Err(IdentityError::Parse {
            path: p,
            source: serde::de::Error::custom("agent_id or credential is empty"),
        });
    }
    Ok(Some(id))
}

/// Saves the identity atomically (temporary file, sync, rename).
pub fn save(state_dir: &Path, id: &Identity) -> Result<(), IdentityError> {
    let p = path(state_dir);
    let tmp = state_dir.join("identity.json.tmp");
    let write = || -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(id).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        // The rename itself durable: after a power loss the file is the
        // old one or the new one, never missing.
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|source| IdentityError::Write { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_hides_its_credential() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let id = Identity {
            backend: "https://b:1".into(),
            agent_id: "agt_1".into(),
            credential: "upl_c_secretsecret".into(),
            provider: "default".into(),
            issued_unix_ms: 1,
        };
        save(dir.path(), &id).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(back.agent_id, "agt_1");
        assert!(!format!("{back:?}").contains("secretsecret"));
        std::fs::write(path(dir.path()), "{").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("remove it to enroll again"), "{e}");
    }
}
