//! The credential side of [`SqliteStore`](super::SqliteStore): enrollment
//! tokens with their limits, agents' current and pending credentials, and
//! revocation.

use rusqlite::{Connection, OptionalExtension, params};

use crate::backend::store::{AgentRecord, CredentialOwner, ProviderRecord, StoreError};

const PROVIDER_COLUMNS: &str = "p.name, p.created_ms,
    (SELECT COUNT(*) FROM agents a WHERE a.provider = p.name),
    p.max_agents, p.expires_ms, p.token_enrolled";

fn provider_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProviderRecord> {
    Ok(ProviderRecord {
        name: r.get(0)?,
        created_ms: r.get(1)?,
        agents: r.get(2)?,
        max_agents: r.get(3)?,
        expires_ms: r.get(4)?,
        token_enrolled: r.get(5)?,
    })
}

pub(super) fn providers(c: &mut Connection) -> Result<Vec<ProviderRecord>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT {PROVIDER_COLUMNS} FROM providers p ORDER BY p.name"
    ))?;
    let rows = st.query_map([], provider_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn provider_by_token(
    c: &mut Connection,
    token_hash: &str,
) -> Result<Option<ProviderRecord>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {PROVIDER_COLUMNS} FROM providers p WHERE p.token_hash = ?1"),
        [token_hash],
        provider_from_row,
    )
    .optional()?)
}

pub(super) fn set_provider_token(
    c: &mut Connection,
    name: &str,
    token_hash: &str,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE providers SET token_hash = ?2, max_agents = 0, expires_ms = 0, token_enrolled = 0
         WHERE name = ?1",
        params![name, token_hash],
    )?;
    Ok(n == 1)
}

pub(super) fn set_token_limits(
    c: &mut Connection,
    name: &str,
    max_agents: u32,
    expires_ms: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE providers SET max_agents = ?2, expires_ms = ?3 WHERE name = ?1",
        params![name, max_agents, expires_ms],
    )?;
    Ok(n == 1)
}

pub(super) fn insert_agent(
    c: &mut Connection,
    a: &AgentRecord,
    credential_hash: &str,
) -> Result<bool, StoreError> {
    let tx = c.transaction()?;
    let counted = tx.execute(
        "UPDATE providers SET token_enrolled = token_enrolled + 1
         WHERE name = ?1 AND (max_agents = 0 OR token_enrolled < max_agents)",
        [&a.provider],
    )?;
    if counted == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO agents (id, provider, credential_hash, hostname, version, enrolled_ms, last_seen_ms, enroll_key_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
        params![a.id, a.provider, credential_hash, a.hostname, a.version, a.enrolled_ms, a.enroll_key_hash],
    )?;
    tx.commit()?;
    Ok(true)
}

pub(super) fn reenroll(
    c: &mut Connection,
    provider: &str,
    enroll_key_hash: &str,
    enrolled_since_ms: i64,
    credential_hash: &str,
) -> Result<Option<String>, StoreError> {
    let tx = c.transaction()?;
    let id: Option<String> = tx
        .query_row(
            "UPDATE agents SET credential_hash = ?4, pending_credential_hash = NULL
             WHERE provider = ?1 AND enroll_key_hash = ?2 AND enrolled_ms >= ?3 AND revoked_ms = 0
             RETURNING id",
            params![
                provider,
                enroll_key_hash,
                enrolled_since_ms,
                credential_hash
            ],
            |r| r.get(0),
        )
        .optional()?;
    if id.is_none() {
        // The key's agent is past the window or revoked: the key is free
        // for the new agent the caller enrolls.
        tx.execute(
            "UPDATE agents SET enroll_key_hash = NULL WHERE provider = ?1 AND enroll_key_hash = ?2",
            params![provider, enroll_key_hash],
        )?;
    }
    tx.commit()?;
    Ok(id)
}

/// Who holds a credential, as a read.
pub(super) enum Lookup {
    /// An agent's current credential.
    Current(CredentialOwner),
    /// An agent's pending credential: its first use makes it current, a
    /// write ([`agent_by_credential`]).
    Pending,
    /// No agent's.
    Unknown,
}

/// Who holds `credential_hash`, without writing anything.
pub(super) fn lookup_credential(
    c: &mut Connection,
    credential_hash: &str,
) -> Result<Lookup, StoreError> {
    let current = c
        .prepare_cached("SELECT id, revoked_ms FROM agents WHERE credential_hash = ?1")?
        .query_row([credential_hash], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((agent_id, revoked_ms)) = current {
        return Ok(Lookup::Current(CredentialOwner {
            agent_id,
            revoked_ms,
            promoted: false,
        }));
    }
    let pending: Option<i64> = c
        .prepare_cached("SELECT 1 FROM agents WHERE pending_credential_hash = ?1")?
        .query_row([credential_hash], |r| r.get(0))
        .optional()?;
    Ok(if pending.is_some() {
        Lookup::Pending
    } else {
        Lookup::Unknown
    })
}

pub(super) fn agent_by_credential(
    c: &mut Connection,
    credential_hash: &str,
) -> Result<Option<CredentialOwner>, StoreError> {
    let current = c
        .prepare_cached("SELECT id, revoked_ms FROM agents WHERE credential_hash = ?1")?
        .query_row([credential_hash], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((agent_id, revoked_ms)) = current {
        return Ok(Some(CredentialOwner {
            agent_id,
            revoked_ms,
            promoted: false,
        }));
    }
    let tx = c.transaction()?;
    let pending: Option<(String, i64)> = tx
        .prepare_cached("SELECT id, revoked_ms FROM agents WHERE pending_credential_hash = ?1")?
        .query_row([credential_hash], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((agent_id, revoked_ms)) = pending else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE agents SET credential_hash = pending_credential_hash, pending_credential_hash = NULL
         WHERE id = ?1",
        [&agent_id],
    )?;
    tx.commit()?;
    Ok(Some(CredentialOwner {
        agent_id,
        revoked_ms,
        promoted: true,
    }))
}

pub(super) fn set_pending_credential(
    c: &mut Connection,
    agent_id: &str,
    credential_hash: &str,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE agents SET pending_credential_hash = ?2 WHERE id = ?1 AND revoked_ms = 0",
        params![agent_id, credential_hash],
    )?;
    Ok(n == 1)
}

pub(super) fn revoke_agent(
    c: &mut Connection,
    agent_id: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    c.execute(
        "UPDATE agents SET revoked_ms = ?2, pending_credential_hash = NULL
         WHERE id = ?1 AND revoked_ms = 0",
        params![agent_id, now],
    )?;
    Ok(c.query_row(
        "SELECT revoked_ms FROM agents WHERE id = ?1",
        [agent_id],
        |r| r.get(0),
    )
    .optional()?)
}
