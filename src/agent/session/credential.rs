//! The agent's credential while it runs: [`Credential`], the one cell every
//! task reads at each call, and [`Rotator`], the task that replaces it
//! when it reaches `--credential-max-age`, without downtime.
//!
//! A rotation asks the backend for a new credential (`RotateCredential`),
//! which the backend keeps pending beside the current one until its first
//! use. The rotator writes it to `identity.json` (temporary file, fsync,
//! rename, fsync of the directory) before anything uses it, and only then
//! puts it in the cell. So a crash at any point leaves a credential that
//! works: before the write, the stored one is the current one (the pending
//! one is never used and the next rotation replaces it); after it, the
//! stored one is the new one, which the backend still accepts. A call made
//! with the old credential after the new one's first use is refused and
//! retried with the new one, as any failed call is.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::super::identity::{self, Identity};
use super::Stop;
use super::transport::Unary;
use crate::secret::Secret;

/// The credential every task sends, shared; a clone is a handle on the
/// same cell.
#[derive(Clone)]
pub(super) struct Credential(Arc<RwLock<(Secret, u64)>>);

impl Credential {
    pub(super) fn new(secret: Secret) -> Self {
        Credential(Arc::new(RwLock::new((secret, 0))))
    }

    /// The credential to send now.
    pub(super) fn get(&self) -> Secret {
        self.0.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// How many times it was replaced since start: a call refused as
    /// unauthenticated while this moved may have carried the one before.
    pub(super) fn generation(&self) -> u64 {
        self.0.read().unwrap_or_else(|e| e.into_inner()).1
    }

    fn set(&self, secret: Secret) {
        let mut cell = self.0.write().unwrap_or_else(|e| e.into_inner());
        *cell = (secret, cell.1 + 1);
    }
}

/// How long a failed rotation waits before the next try (the current
/// credential keeps working meanwhile).
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// Replaces the credential when it reaches `max_age`.
pub(super) struct Rotator {
    pub(super) max_age: Duration,
    pub(super) state_dir: PathBuf,
    pub(super) identity: Identity,
    pub(super) credential: Credential,
    /// The unary client of the current rung.
    pub(super) unary: watch::Receiver<Option<Unary>>,
}

impl Rotator {
    pub(super) async fn run(mut self, mut stop: Stop) {
        if self.max_age.is_zero() {
            return;
        }
        // A credential stored before issue times were kept counts from now.
        let started = crate::now_unix_ms();
        let mut wait = self.due_in(started);
        loop {
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let unary = tokio::select! {
                _ = stop.wait() => return,
                u = self.unary.wait_for(|u| u.is_some()) => match u {
                    Ok(u) => u.clone(),
                    Err(_) => return,
                },
            };
            let Some(unary) = unary else { return };
            wait = match self.rotate(&unary).await {
                Ok(()) => self.due_in(started),
                Err(e) => {
                    tracing::warn!(
                        "could not rotate the agent's credential: {e}; the current one keeps working, retrying in {RETRY_AFTER:?}"
                    );
                    RETRY_AFTER.min(self.max_age)
                }
            };
        }
    }

    /// How long until the stored credential reaches its maximum age.
    fn due_in(&self, started: i64) -> Duration {
        let issued = match self.identity.issued_unix_ms {
            0 => started,
            t => t,
        };
        let age = Duration::from_millis((crate::now_unix_ms() - issued).max(0) as u64);
        self.max_age.saturating_sub(age)
    }

    async fn rotate(&mut self, unary: &Unary) -> Result<(), String> {
        let resp = unary
            .rotate_credential(&self.credential.get())
            .await
            .map_err(|e| e.to_string())?;
        if resp.credential.is_empty() || resp.credential.len() > 256 {
            return Err("the backend answered without a valid credential".into());
        }
        let mut next = self.identity.clone();
        next.credential = resp.credential;
        next.issued_unix_ms = crate::now_unix_ms();
        // Stored before it is used: see the module doc.
        let (dir, id) = (self.state_dir.clone(), next.clone());
        tokio::task::spawn_blocking(move || identity::save(&dir, &id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.credential.set(Secret::new(next.credential.clone()));
        self.identity = next;
        tracing::info!(agent = %self.identity.agent_id, "credential rotated; the previous one stops working at the new one's first use");
        Ok(())
    }
}
