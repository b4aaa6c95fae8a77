//! The tests of [`PostgresStore`](super::PostgresStore) against a
//! throwaway server: the one store suite, and what only a shared database
//! has (replicas racing on one agent, starting together, a database that
//! goes away and comes back).

use std::sync::Arc;

use uplink_testkit::postgres::Postgres;

use super::*;

/// A store on a fresh database of a throwaway server, and the server.
async fn fresh() -> (PostgresStore, Postgres) {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let store = connect(&url).await;
    (store, pg)
}

async fn connect(url: &str) -> PostgresStore {
    let url = DatabaseUrl::parse(url, "--database").unwrap();
    PostgresStore::connect(&url).await.unwrap()
}

crate::backend::store::suite::store_suite!(fresh().await);

/// Enrolls agent `a1` (provider `default`, credential `ch`) through `s`.
async fn enroll_a1(s: &PostgresStore) {
    assert!(s.create_provider("default", "th", 1).await.unwrap());
    let agent = AgentRecord {
        id: "a1".into(),
        provider: "default".into(),
        enrolled_ms: 1,
        ..Default::default()
    };
    assert!(s.insert_agent(&agent, "ch").await.unwrap());
}

fn ping() -> proto::CommandSpec {
    proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
    }
}

/// Two replicas (two pools on one database) start at once, migrating
/// together, then enqueue for one agent at once: every seq is issued
/// once, and together they are 1..=N with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_number_one_agent_without_gaps_or_duplicates() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let (a, b) = tokio::join!(connect(&url), connect(&url));
    enroll_a1(&b).await;
    let replicas = [Arc::new(a), Arc::new(b)];
    const TASKS_PER_REPLICA: usize = 8;
    const PER_TASK: usize = 40;
    let mut tasks = Vec::new();
    for (r, store) in replicas.iter().enumerate() {
        for t in 0..TASKS_PER_REPLICA {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let id = format!("r{r}_t{t}_{i}");
                    let c = store.enqueue("a1", &id, &ping(), 10).await.unwrap();
                    seqs.push(c.expect("a1 exists").seq);
                }
                seqs
            }));
        }
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    let total = (2 * TASKS_PER_REPLICA * PER_TASK) as u64;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let stored = replicas[0]
        .pending("a1", 0, total as usize + 10)
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let a = replicas[1].agent("a1").await.unwrap().unwrap();
    assert_eq!(a.next_seq, total + 1);
}

/// Replicas that receive the same metric batches at once (an agent
/// failing over resends what was not acknowledged) record each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_record_each_metric_batch_once() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let (a, b) = tokio::join!(connect(&url), connect(&url));
    let replicas = [Arc::new(a), Arc::new(b)];
    const N: u64 = 200;
    let mut tasks = Vec::new();
    for store in &replicas {
        for lane in 0..4u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut won = 0u64;
                // Each lane sends the seqs in another order.
                for i in 0..N {
                    let seq = if lane % 2 == 0 { i + 1 } else { N - i };
                    if store.record_metric_batch("a1", 7, seq, None).await.unwrap() {
                        won += 1;
                    }
                }
                won
            }));
        }
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap();
    }
    assert_eq!(won, N, "each batch recorded exactly once");
    assert_eq!(replicas[0].metric_batches("a1", 7).await.unwrap(), (N, 0));
}

/// Results that race from two replicas (an agent resending after a
/// failover) are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_results_are_stored_once() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let (a, b) = tokio::join!(connect(&url), connect(&url));
    enroll_a1(&a).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    for i in 0..20 {
        a.enqueue("a1", &format!("c{i}"), &ping(), 10)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for i in 0..20 {
                let r = proto::CommandResult {
                    command_id: format!("c{i}"),
                    status: proto::CommandStatus::Ok as i32,
                    ..Default::default()
                };
                if store.complete("a1", &r, 11).await.unwrap() {
                    won += 1;
                }
            }
            won
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap();
    }
    assert_eq!(won, 20);
}

async fn current_db(s: &PostgresStore) -> String {
    let c = s.client().await.unwrap();
    query_one(&c, "SELECT current_database()", &[])
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

/// Backends starting together on an empty database: one migrates
/// under the advisory lock, the others wait and find the work done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { connect(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for s in starts {
        stores.push(s.await.unwrap());
    }
    let c = stores[0].client().await.unwrap();
    let versions: Vec<i64> = query(&c, "SELECT version FROM schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [schema::VERSION]);
}

/// While the database is down, calls fail within bounded time with an
/// error that names PostgreSQL; when it is back, the pool connects
/// again and what was committed before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_in_bounded_time_while_the_database_is_down_and_work_after() {
    let mut pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let s = connect(&url).await;
    enroll_a1(&s).await;
    s.enqueue("a1", "c1", &ping(), 10).await.unwrap().unwrap();
    pg.stop_server();
    let asked = std::time::Instant::now();
    let e = s
        .enqueue("a1", "c2", &ping(), 20)
        .await
        .expect_err("the database is down");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    let text = e.to_string();
    // Worth a retry: callers answer UNAVAILABLE, not INTERNAL.
    assert!(
        matches!(e, StoreError::Unavailable { .. }),
        "a database that is down is a transient failure: {text}"
    );
    assert!(
        text.starts_with("PostgreSQL database unavailable: "),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    pg.start_again().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let c2 = loop {
        match s.enqueue("a1", "c2", &ping(), 30).await {
            Ok(c) => break c.unwrap(),
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("the store did not reconnect within 10 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(c2.seq, 2, "numbering goes on where it was, without a gap");
    assert_eq!(s.pending("a1", 0, 10).await.unwrap().len(), 2);
}

/// A second start finds the schema current and changes nothing; a
/// database of a newer schema is refused with the versions named.
#[tokio::test]
async fn migrations_run_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let s = connect(&url).await;
    s.set_meta("k", "v").await.unwrap();
    drop(s);
    let s = connect(&url).await;
    assert_eq!(s.meta("k").await.unwrap().as_deref(), Some("v"));
    let db = current_db(&s).await;
    drop(s);
    pg.execute(&db, "UPDATE schema_version SET version = 99")
        .await;
    let e = PostgresStore::connect(&DatabaseUrl::parse(&url, "--database").unwrap())
        .await
        .err()
        .expect("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "the store's schema is version 99, newer than this backend's {}: run a newer uplink",
            schema::VERSION
        )
    );
}

/// A server that refuses the login is named, on one line, without
/// the password.
#[tokio::test]
async fn a_refused_login_is_one_line_without_the_password() {
    let pg = Postgres::start().await;
    let url = pg.url_with_password("postgres", "wrong-pw-5150");
    let e = PostgresStore::connect(&DatabaseUrl::parse(&url, "--database").unwrap())
        .await
        .err()
        .expect("refused");
    let text = e.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(
        text.contains("cannot connect to postgres://***@127.0.0.1:"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-pw-5150") && !text.contains('\n'),
        "{text}"
    );
}

/// Waits up to `limit` for `done`, else fails with `what`.
async fn within(limit: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `store` still takes `credential` for `agent` (not revoked).
async fn accepts(store: &PostgresStore, credential: &str, agent: &str) -> bool {
    match store.agent_by_credential(credential).await.unwrap() {
        Some(o) => o.agent_id == agent && o.revoked_ms == 0,
        None => false,
    }
}

/// Credentials looked up are remembered by a backend only while its
/// change feed listens, and whatever makes one stop working on another
/// backend (a revocation, a re-enrollment, a pending credential made
/// current) makes this one refuse it within moments, not when its entry
/// expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_another_backend_ends_is_refused_here_at_once() {
    // Well before an entry expires of itself.
    let soon = cache::ENTRY_TTL / 4;
    // The feed listens again after its backoff.
    let feed = Duration::from_secs(20);
    let mut pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let (a, b) = tokio::join!(connect(&url), connect(&url));
    assert!(a.create_provider("default", "th", 1).await.unwrap());
    for (id, credential, key) in [("a1", "c1", "k1"), ("a2", "c2", "k2"), ("a3", "c3", "k3")] {
        let agent = AgentRecord {
            id: id.into(),
            provider: "default".into(),
            enrolled_ms: 1,
            enroll_key_hash: Some(key.into()),
            ..Default::default()
        };
        assert!(a.insert_agent(&agent, credential).await.unwrap());
    }

    // Without the feed, nothing is kept.
    assert!(accepts(&b, "c1", "a1").await);
    assert_eq!(b.credentials.get("c1", std::time::Instant::now()), None);
    let _feed = b.changes().expect("a feed");
    within(feed, "b's feed listens", async || {
        b.credentials.begin().is_some()
    })
    .await;
    for (c, id) in [("c1", "a1"), ("c2", "a2"), ("c3", "a3")] {
        assert!(accepts(&b, c, id).await);
        assert_eq!(
            b.credentials.get(c, std::time::Instant::now()).as_deref(),
            Some(id),
            "kept once looked up"
        );
    }

    // Revoked through a.
    a.revoke_agent("a1", 5).await.unwrap();
    within(soon, "b refuses a1's credential", async || {
        !accepts(&b, "c1", "a1").await
    })
    .await;
    let owner = b.agent_by_credential("c1").await.unwrap().unwrap();
    assert_eq!(owner.revoked_ms, 5, "refused as revoked");

    // A new credential made current through a: the one before is refused.
    assert!(a.set_pending_credential("a2", "c2b").await.unwrap());
    assert!(
        accepts(&b, "c2", "a2").await,
        "both work while one is pending"
    );
    assert!(
        a.agent_by_credential("c2b")
            .await
            .unwrap()
            .unwrap()
            .promoted
    );
    within(soon, "b refuses a2's previous credential", async || {
        !accepts(&b, "c2", "a2").await
    })
    .await;
    assert!(accepts(&b, "c2b", "a2").await);

    // Re-enrolled through a: the credential before is refused.
    assert_eq!(
        a.reenroll("default", "k3", 1, "c3b")
            .await
            .unwrap()
            .as_deref(),
        Some("a3")
    );
    within(soon, "b refuses a3's previous credential", async || {
        !accepts(&b, "c3", "a3").await
    })
    .await;
    assert!(accepts(&b, "c3b", "a3").await);

    // The feed stops with the database: what was kept is dropped, and
    // nothing is kept until it listens again.
    assert!(
        b.credentials
            .get("c3b", std::time::Instant::now())
            .is_some()
    );
    pg.stop_server();
    within(feed, "b's feed stops", async || {
        b.credentials.begin().is_none()
    })
    .await;
    assert_eq!(b.credentials.get("c3b", std::time::Instant::now()), None);
    pg.start_again().await;
    within(feed, "b's feed listens again", async || {
        b.credentials.begin().is_some()
    })
    .await;
    assert_eq!(b.credentials.get("c3b", std::time::Instant::now()), None);
    assert!(accepts(&b, "c3b", "a3").await);
}

/// The next change on `feed` that is a queued command, within 10 s.
async fn next_queued(feed: &mut tokio::sync::mpsc::Receiver<Change>) -> Change {
    loop {
        let c = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("a change within 10 s")
            .expect("the feed is open");
        if matches!(c, Change::Queued { .. }) {
            return c;
        }
    }
}

/// A command queued through one backend reaches another's feed with the
/// command itself, as the store reads it back, so that the backend
/// holding the agent can send it without a read; one too large for a
/// notification comes with its seq alone. Each is heard of once more
/// without the command (the notice backends of earlier releases read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_command_reaches_the_other_backends_with_its_body() {
    let pg = Postgres::start().await;
    let url = pg.fresh_database().await;
    let (a, b) = tokio::join!(connect(&url), connect(&url));
    enroll_a1(&a).await;
    let mut feed = b.changes().expect("a feed");
    within(Duration::from_secs(20), "b's feed listens", async || {
        b.credentials.begin().is_some()
    })
    .await;
    let large = proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping {
            delay_ms: 0,
            payload: "x".repeat(5000),
        })),
    };
    let small = a.enqueue("a1", "c1", &ping(), 10).await.unwrap().unwrap();
    let big = a.enqueue("a1", "c2", &large, 20).await.unwrap().unwrap();
    let stored = b.pending("a1", 0, 10).await.unwrap();
    assert_eq!(stored, [small.clone(), big.clone()]);
    let heard = [
        next_queued(&mut feed).await,
        next_queued(&mut feed).await,
        next_queued(&mut feed).await,
        next_queued(&mut feed).await,
    ];
    let queued = |seq, command: Option<&proto::Command>| Change::Queued {
        agent: "a1".into(),
        seq,
        command: command.map(|c| Box::new(c.clone())),
    };
    assert_eq!(
        heard,
        [
            queued(1, Some(&stored[0])),
            queued(1, None),
            queued(2, None),
            queued(2, None),
        ]
    );
}
