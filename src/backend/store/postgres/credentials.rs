//! The credential side of [`PostgresStore`](super::PostgresStore):
//! enrollment tokens with their limits, agents' current and pending
//! credentials, and revocation. Each check-and-change is one statement or
//! a transaction over a locked row, so backends racing on one provider or
//! agent cannot both pass a check. Whatever makes a credential stop
//! working (a revocation, a re-enrollment, a pending credential made
//! current) notifies the change feed in its transaction, so that no
//! backend goes on accepting it from its [`CredentialCache`](super::cache).

use deadpool_postgres::{Client, GenericClient};

use super::{execute, query, query_opt};
use crate::backend::store::{AgentRecord, CredentialOwner, ProviderRecord, StoreError};

const PROVIDER_COLUMNS: &str = "p.name, p.created_ms,
    (SELECT COUNT(*) FROM agents a WHERE a.provider = p.name),
    p.max_agents, p.expires_ms, p.token_enrolled";

fn provider_from_row(r: &tokio_postgres::Row) -> Result<ProviderRecord, StoreError> {
    let count = |i: usize| -> Result<u32, StoreError> {
        Ok(u32::try_from(r.try_get::<_, i64>(i)?).unwrap_or(u32::MAX))
    };
    Ok(ProviderRecord {
        name: r.try_get(0)?,
        created_ms: r.try_get(1)?,
        agents: count(2)?,
        max_agents: count(3)?,
        expires_ms: r.try_get(4)?,
        token_enrolled: count(5)?,
    })
}

pub(super) async fn providers<C: GenericClient>(c: &C) -> Result<Vec<ProviderRecord>, StoreError> {
    let sql = format!("SELECT {PROVIDER_COLUMNS} FROM providers p ORDER BY p.name");
    query(c, &sql, &[])
        .await?
        .iter()
        .map(provider_from_row)
        .collect()
}

pub(super) async fn provider_by_token<C: GenericClient>(
    c: &C,
    token_hash: &str,
) -> Result<Option<ProviderRecord>, StoreError> {
    let sql = format!("SELECT {PROVIDER_COLUMNS} FROM providers p WHERE p.token_hash = $1");
    match query_opt(c, &sql, &[&token_hash]).await? {
        Some(r) => Ok(Some(provider_from_row(&r)?)),
        None => Ok(None),
    }
}

pub(super) async fn set_provider_token<C: GenericClient>(
    c: &C,
    name: &str,
    token_hash: &str,
) -> Result<bool, StoreError> {
    let n = execute(
        c,
        "UPDATE providers SET token_hash = $2, max_agents = 0, expires_ms = 0, token_enrolled = 0
         WHERE name = $1",
        &[&name, &token_hash],
    )
    .await?;
    Ok(n == 1)
}

pub(super) async fn set_token_limits<C: GenericClient>(
    c: &C,
    name: &str,
    max_agents: u32,
    expires_ms: i64,
) -> Result<bool, StoreError> {
    let n = execute(
        c,
        "UPDATE providers SET max_agents = $2, expires_ms = $3 WHERE name = $1",
        &[&name, &i64::from(max_agents), &expires_ms],
    )
    .await?;
    Ok(n == 1)
}

pub(super) async fn insert_agent(
    c: &mut Client,
    a: &AgentRecord,
    credential_hash: &str,
) -> Result<bool, StoreError> {
    let tx = c.transaction().await?;
    // Counting locks the provider's row until commit: racing enrollments
    // take turns, so they cannot pass the cap together.
    let counted = execute(
        &tx,
        "UPDATE providers SET token_enrolled = token_enrolled + 1
         WHERE name = $1 AND (max_agents = 0 OR token_enrolled < max_agents)",
        &[&a.provider],
    )
    .await?;
    if counted == 0 {
        return Ok(false);
    }
    execute(
        &tx,
        "INSERT INTO agents (id, provider, credential_hash, hostname, version, enrolled_ms, last_seen_ms, enroll_key_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
        &[
            &a.id,
            &a.provider,
            &credential_hash,
            &a.hostname,
            &a.version,
            &a.enrolled_ms,
            &a.enroll_key_hash,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn reenroll(
    c: &mut Client,
    provider: &str,
    enroll_key_hash: &str,
    enrolled_since_ms: i64,
    credential_hash: &str,
) -> Result<Option<String>, StoreError> {
    let tx = c.transaction().await?;
    let id: Option<String> = match query_opt(
        &tx,
        "UPDATE agents SET credential_hash = $4, pending_credential_hash = NULL
         WHERE provider = $1 AND enroll_key_hash = $2 AND enrolled_ms >= $3 AND revoked_ms = 0
         RETURNING id",
        &[
            &provider,
            &enroll_key_hash,
            &enrolled_since_ms,
            &credential_hash,
        ],
    )
    .await?
    {
        Some(r) => Some(r.try_get::<_, String>(0)?),
        None => None,
    };
    if let Some(id) = &id {
        // Every backend forgets the credential it replaced, at commit.
        query(
            &tx,
            "SELECT pg_notify($1, $2)",
            &[&super::changes::CREDENTIAL, id],
        )
        .await?;
    }
    if id.is_none() {
        // The key's agent is past the window or revoked: the key is free
        // for the new agent the caller enrolls.
        execute(
            &tx,
            "UPDATE agents SET enroll_key_hash = NULL WHERE provider = $1 AND enroll_key_hash = $2",
            &[&provider, &enroll_key_hash],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

pub(super) async fn agent_by_credential<C: GenericClient>(
    c: &C,
    credential_hash: &str,
) -> Result<Option<CredentialOwner>, StoreError> {
    let current = || async {
        let row = query_opt(
            c,
            "SELECT id, revoked_ms FROM agents WHERE credential_hash = $1",
            &[&credential_hash],
        )
        .await?;
        Ok::<_, StoreError>(match row {
            Some(r) => Some(CredentialOwner {
                agent_id: r.try_get(0)?,
                revoked_ms: r.try_get(1)?,
                promoted: false,
            }),
            None => None,
        })
    };
    if let Some(owner) = current().await? {
        return Ok(Some(owner));
    }
    // A pending credential becomes current in one statement, which tells
    // every backend to forget the one it replaced, at commit.
    let promoted = query_opt(
        c,
        "WITH promoted AS (
           UPDATE agents SET credential_hash = pending_credential_hash, pending_credential_hash = NULL
           WHERE pending_credential_hash = $1 RETURNING id, revoked_ms)
         SELECT id, revoked_ms, pg_notify($2, id)::TEXT FROM promoted",
        &[&credential_hash, &super::changes::CREDENTIAL],
    )
    .await?;
    match promoted {
        Some(r) => Ok(Some(CredentialOwner {
            agent_id: r.try_get(0)?,
            revoked_ms: r.try_get(1)?,
            promoted: true,
        })),
        // Another backend may have promoted it between the two
        // statements: then it is current now.
        None => current().await,
    }
}

pub(super) async fn set_pending_credential<C: GenericClient>(
    c: &C,
    agent_id: &str,
    credential_hash: &str,
) -> Result<bool, StoreError> {
    let n = execute(
        c,
        "UPDATE agents SET pending_credential_hash = $2 WHERE id = $1 AND revoked_ms = 0",
        &[&agent_id, &credential_hash],
    )
    .await?;
    Ok(n == 1)
}

pub(super) async fn revoke_agent<C: GenericClient>(
    c: &C,
    agent_id: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    // Every backend sharing the database ends the agent's streams and
    // held polls and forgets its credentials, told in the revocation's own
    // transaction (a repeated revocation notifies again: harmless).
    query(
        c,
        "WITH revoked AS (
           UPDATE agents SET revoked_ms = $2, pending_credential_hash = NULL
           WHERE id = $1 AND revoked_ms = 0 RETURNING id)
         SELECT pg_notify($3, $1)::TEXT",
        &[&agent_id, &now, &super::changes::REVOKED],
    )
    .await?;
    // A statement of its own, so it sees a revocation that a racing call
    // committed first: the first revocation's time.
    match query_opt(
        c,
        "SELECT revoked_ms FROM agents WHERE id = $1",
        &[&agent_id],
    )
    .await?
    {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}
