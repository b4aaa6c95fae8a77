//! The semantics of [`Store`], as tests any implementation must pass:
//! each async function takes an empty store. Every store runs all of them
//! with `store_suite!` and its own constructor:
//! [`SqliteStore`](super::SqliteStore) on in-memory databases,
//! [`PostgresStore`](super::PostgresStore) on a database of its own per
//! test in a throwaway server.

use super::{
    AgentRecord, BatchSeq, METRIC_SEQ_WINDOW, NewContainer, Pruned, Retention, RunRecord, SCRUBBED,
    Store,
};
use crate::proto;

/// Defines every test of the suite as a `#[tokio::test]` of its own, each
/// on a fresh empty store made by `$make`: an expression, evaluated inside
/// the test's runtime (it may `.await`), that yields a pair of a value
/// implementing [`Store`] and a guard that keeps what the store needs (a
/// database server) until the test ends, `()` when there is none.
macro_rules! store_suite {
    ($make:expr) => {
        $crate::backend::store::suite::store_suite!(
            $make;
            seqs_are_contiguous_and_pending_follows_acks,
            an_ack_beyond_issued_seqs_moves_numbering_on,
            results_are_stored_once_and_only_for_the_owner,
            cursors_only_move_forward,
            the_newest_epoch_is_the_highest_as_unsigned,
            metric_batches_are_stored_once_in_any_order,
            metric_batches_far_above_the_watermark_are_refused,
            a_metric_batch_keeps_the_writer_it_was_recorded_with,
            pruning_keeps_what_delivery_needs,
            pruning_bounds_container_events_and_epochs,
            pruning_keeps_runs_with_anything_left_on_a_host,
            revoked_agents_stay_revoked_and_keep_their_record,
            a_pending_credential_replaces_the_current_one_at_first_use,
            token_caps_count_enrollments_until_the_token_is_rotated,
            an_enrollment_key_finds_its_agent_within_the_window,
            finished_commands_keep_no_secrets,
        );
    };
    ($make:expr; $($name:ident,)*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, _guard) = $make;
                $crate::backend::store::suite::$name(&store).await;
            }
        )*
    };
}
pub(crate) use store_suite;

fn ping() -> proto::CommandSpec {
    proto::CommandSpec {
        kind: Some(proto::command_spec::Kind::Ping(proto::Ping::default())),
    }
}

/// Adds provider `default` and its agent `a1`.
async fn add_agent(s: &dyn Store) {
    assert!(s.create_provider("default", "th", 1).await.unwrap());
    assert!(enroll(s, "a1", "ch").await);
}

/// Enrolls agent `id` with provider `default` and credential hash `ch`.
async fn enroll(s: &dyn Store, id: &str, ch: &str) -> bool {
    s.insert_agent(
        &AgentRecord {
            id: id.into(),
            provider: "default".into(),
            enrolled_ms: 1,
            ..Default::default()
        },
        ch,
    )
    .await
    .unwrap()
}

pub(crate) async fn seqs_are_contiguous_and_pending_follows_acks(s: &dyn Store) {
    add_agent(s).await;
    for i in 1..=3 {
        let c = s
            .enqueue("a1", &format!("c{i}"), &ping(), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.seq, i);
    }
    assert_eq!(s.pending("a1", 0, 100).await.unwrap().len(), 3);
    assert!(enroll(s, "a2", "ch2").await);
    let counts = s.pending_counts("").await.unwrap();
    assert_eq!(counts, [("a1".to_string(), 3)].into_iter().collect());
    assert_eq!(s.ack("a1", 2, 20).await.unwrap(), 2);
    assert_eq!(s.pending_counts("default").await.unwrap()["a1"], 1);
    assert!(s.pending_counts("other").await.unwrap().is_empty());
    let p = s.pending("a1", 2, 100).await.unwrap();
    assert_eq!(p.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
    // Acks never go backwards.
    assert_eq!(s.ack("a1", 1, 30).await.unwrap(), 2);
    assert_eq!(s.command("c1").await.unwrap().unwrap().accepted_ms, 20);
    assert_eq!(s.ack("a1", 3, 30).await.unwrap(), 3);
    assert!(
        s.enqueue("nobody", "x", &ping(), 1)
            .await
            .unwrap()
            .is_none()
    );
}

pub(crate) async fn an_ack_beyond_issued_seqs_moves_numbering_on(s: &dyn Store) {
    add_agent(s).await;
    s.enqueue("a1", "c1", &ping(), 10).await.unwrap();
    s.enqueue("a1", "c2", &ping(), 10).await.unwrap();
    // The agent saw seqs up to 5 before this store lost commits.
    assert_eq!(s.ack("a1", 5, 20).await.unwrap(), 5);
    for id in ["c1", "c2"] {
        let c = s.command(id).await.unwrap().unwrap();
        assert_eq!(
            (c.accepted_ms, c.done_ms),
            (20, 0),
            "{id}: its result may still come"
        );
    }
    let c = s.enqueue("a1", "c3", &ping(), 30).await.unwrap().unwrap();
    assert_eq!(c.seq, 6);
    assert!(
        s.pending("a1", 5, 10)
            .await
            .unwrap()
            .iter()
            .all(|c| c.id == "c3")
    );
}

pub(crate) async fn results_are_stored_once_and_only_for_the_owner(s: &dyn Store) {
    add_agent(s).await;
    s.enqueue("a1", "c1", &ping(), 10).await.unwrap();
    let r = proto::CommandResult {
        command_id: "c1".into(),
        status: proto::CommandStatus::Ok as i32,
        ..Default::default()
    };
    assert!(!s.complete("a2", &r, 11).await.unwrap());
    assert!(s.complete("a1", &r, 11).await.unwrap());
    assert!(!s.complete("a1", &r, 12).await.unwrap());
    let c = s.command("c1").await.unwrap().unwrap();
    assert_eq!((c.done_ms, c.result), (11, Some(r)));
}

pub(crate) async fn cursors_only_move_forward(s: &dyn Store) {
    add_agent(s).await;
    assert!(s.advance_cursor("a1", "events", 7, 1).await.unwrap());
    assert!(s.advance_cursor("a1", "events", 7, 2).await.unwrap());
    assert!(!s.advance_cursor("a1", "events", 7, 2).await.unwrap());
    assert!(!s.advance_cursor("a1", "events", 7, 1).await.unwrap());
    assert!(s.advance_cursor("a1", "events", 8, 1).await.unwrap());
    assert_eq!(s.cursor("a1", "events", 7).await.unwrap(), 2);
}

pub(crate) async fn the_newest_epoch_is_the_highest_as_unsigned(s: &dyn Store) {
    add_agent(s).await;
    assert_eq!(s.newest_epoch("a1", "events").await.unwrap(), 0);
    assert!(s.advance_cursor("a1", "events", 9, 1).await.unwrap());
    assert!(s.advance_cursor("a1", "events", 7, 1).await.unwrap());
    assert_eq!(s.newest_epoch("a1", "events").await.unwrap(), 9);
    // Epochs from 2^63 up (the ordered ones) are above every lower one.
    let high = (1u64 << 63) + 5;
    assert!(s.advance_cursor("a1", "events", high, 1).await.unwrap());
    assert!(s.advance_cursor("a1", "events", 1 << 62, 1).await.unwrap());
    assert_eq!(s.newest_epoch("a1", "events").await.unwrap(), high);
    // Streams and agents are apart.
    assert_eq!(s.newest_epoch("a1", "metrics").await.unwrap(), 0);
    assert_eq!(s.newest_epoch("a2", "events").await.unwrap(), 0);
}

pub(crate) async fn metric_batches_are_stored_once_in_any_order(s: &dyn Store) {
    add_agent(s).await;
    let new = async |seq| s.metric_batch_state("a1", 9, seq).await.unwrap();
    let record = async |seq| s.record_metric_batch("a1", 9, seq, None).await.unwrap();
    // In order.
    for seq in 1..=3 {
        assert_eq!(new(seq).await, BatchSeq::New);
        assert!(record(seq).await);
        assert_eq!(new(seq).await, BatchSeq::Seen);
    }
    assert_eq!(s.metric_batches("a1", 9).await.unwrap(), (3, 0));
    // Out of order: 6 and 5 before 4; a lower seq after a higher one
    // is still new.
    assert!(record(6).await);
    assert!(record(5).await);
    assert_eq!(s.metric_batches("a1", 9).await.unwrap(), (3, 2));
    assert_eq!(new(4).await, BatchSeq::New);
    assert_eq!(new(5).await, BatchSeq::Seen);
    assert!(!record(5).await, "a duplicate above the watermark");
    assert!(record(4).await);
    // 4 closed the gap: the watermark moves over 5 and 6, their rows go.
    assert_eq!(s.metric_batches("a1", 9).await.unwrap(), (6, 0));
    for seq in 1..=6 {
        assert_eq!(new(seq).await, BatchSeq::Seen, "{seq}");
        assert!(!record(seq).await, "{seq}");
    }
    // A gap that stays open keeps what is above it, and only that.
    assert!(record(8).await);
    assert!(record(10).await);
    assert!(record(7).await);
    assert_eq!(s.metric_batches("a1", 9).await.unwrap(), (8, 1));
    assert_eq!(new(9).await, BatchSeq::New);
    // Epochs and agents are independent.
    assert_eq!(
        s.metric_batch_state("a1", 10, 1).await.unwrap(),
        BatchSeq::New
    );
    assert_eq!(
        s.metric_batch_state("a2", 9, 1).await.unwrap(),
        BatchSeq::New
    );
    // The event cursors are another stream.
    assert_eq!(s.cursor("a1", "events", 9).await.unwrap(), 0);
}

/// A store that backends share keeps the writer a batch was first
/// recorded with (and only then); one that a backend holds alone has no
/// other writer to tell.
pub(crate) async fn a_metric_batch_keeps_the_writer_it_was_recorded_with(s: &dyn Store) {
    add_agent(s).await;
    let shared = |w: &str| s.shares_presence().then(|| w.to_string());
    assert!(
        s.record_metric_batch("a1", 40, 1, Some("jw_a"))
            .await
            .unwrap()
    );
    assert!(
        s.record_metric_batch("a1", 40, 3, Some("jw_c"))
            .await
            .unwrap()
    );
    assert!(s.record_metric_batch("a1", 40, 2, None).await.unwrap());
    assert!(
        !s.record_metric_batch("a1", 40, 1, Some("jw_b"))
            .await
            .unwrap()
    );
    assert_eq!(s.metric_batches("a1", 40).await.unwrap(), (3, 0));
    assert_eq!(
        s.metric_batch_writer("a1", 40, 1).await.unwrap(),
        shared("jw_a")
    );
    assert_eq!(
        s.metric_batch_writer("a1", 40, 3).await.unwrap(),
        shared("jw_c")
    );
    assert_eq!(s.metric_batch_writer("a1", 40, 2).await.unwrap(), None);
    assert_eq!(s.metric_batch_writer("a1", 40, 4).await.unwrap(), None);
    assert_eq!(s.metric_batch_writer("a1", 41, 1).await.unwrap(), None);
}

pub(crate) async fn metric_batches_far_above_the_watermark_are_refused(s: &dyn Store) {
    add_agent(s).await;
    assert!(s.record_metric_batch("a1", 1, 1, None).await.unwrap());
    let edge = 1 + METRIC_SEQ_WINDOW;
    assert_eq!(
        s.metric_batch_state("a1", 1, edge).await.unwrap(),
        BatchSeq::New
    );
    assert_eq!(
        s.metric_batch_state("a1", 1, edge + 1).await.unwrap(),
        BatchSeq::TooFarAhead { watermark: 1 }
    );
    assert!(
        !s.record_metric_batch("a1", 1, edge + 1, None)
            .await
            .unwrap()
    );
    assert!(s.record_metric_batch("a1", 1, edge, None).await.unwrap());
    assert_eq!(s.metric_batches("a1", 1).await.unwrap(), (1, 1));
}

fn keep_all() -> Retention {
    Retention {
        commands_before_ms: 0,
        runs_before_ms: 0,
        container_events_before_ms: 0,
        container_events_per_agent: u64::MAX >> 1,
        epochs_kept: u64::MAX >> 1,
    }
}

pub(crate) async fn pruning_keeps_what_delivery_needs(s: &dyn Store) {
    add_agent(s).await;
    for i in 1..=4 {
        s.enqueue("a1", &format!("c{i}"), &ping(), 10)
            .await
            .unwrap();
    }
    let done = |id: &str| proto::CommandResult {
        command_id: id.into(),
        status: proto::CommandStatus::Ok as i32,
        ..Default::default()
    };
    // c1: acked and done; c2: acked, running; c3: done without an ack
    // covering it (its seq is above the ack); c4: queued.
    s.ack("a1", 2, 20).await.unwrap();
    assert!(s.complete("a1", &done("c1"), 30).await.unwrap());
    assert!(s.complete("a1", &done("c3"), 30).await.unwrap());
    assert_eq!(s.prune(&keep_all()).await.unwrap(), Pruned::default());
    let r = Retention {
        commands_before_ms: 1_000,
        ..keep_all()
    };
    assert_eq!(s.prune(&r).await.unwrap().commands, 1);
    assert!(s.command("c1").await.unwrap().is_none());
    for id in ["c2", "c3", "c4"] {
        assert!(
            s.command(id).await.unwrap().is_some(),
            "{id} is still needed"
        );
    }
    // Numbering goes on where it was; what was pending still is.
    let c = s.enqueue("a1", "c5", &ping(), 40).await.unwrap().unwrap();
    assert_eq!(c.seq, 5);
    let p = s.pending("a1", 2, 10).await.unwrap();
    assert_eq!(p.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4, 5]);
}

pub(crate) async fn pruning_bounds_container_events_and_epochs(s: &dyn Store) {
    add_agent(s).await;
    for i in 0..10 {
        let ev = proto::ContainerEvent {
            container_id: format!("k{i}"),
            kind: proto::ContainerEventKind::Exited as i32,
            ..Default::default()
        };
        assert!(s.container_event("a1", &ev, 100 + i).await.unwrap());
    }
    // Epochs 1..=5 of events and of metric batches, oldest first; epoch
    // 5's batches have a gap, so seqs are stored above its watermark.
    for epoch in 1..=5 {
        assert!(s.advance_cursor("a1", "events", epoch, 3).await.unwrap());
        assert!(s.record_metric_batch("a1", epoch, 2, None).await.unwrap());
    }
    let r = Retention {
        container_events_before_ms: 103,
        container_events_per_agent: 4,
        epochs_kept: 2,
        ..keep_all()
    };
    let pruned = s.prune(&r).await.unwrap();
    assert_eq!(pruned.container_events, 6);
    let left: Vec<String> = s
        .container_events("a1")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.container_id)
        .collect();
    assert_eq!(left, ["k6", "k7", "k8", "k9"]);
    // The newest two epochs of each stream stay whole.
    for epoch in [4, 5] {
        assert_eq!(s.cursor("a1", "events", epoch).await.unwrap(), 3);
        assert_eq!(s.metric_batches("a1", epoch).await.unwrap(), (0, 1));
        assert_eq!(
            s.metric_batch_state("a1", epoch, 2).await.unwrap(),
            BatchSeq::Seen
        );
    }
    for epoch in 1..=3 {
        assert_eq!(s.cursor("a1", "events", epoch).await.unwrap(), 0);
        assert_eq!(s.metric_batches("a1", epoch).await.unwrap(), (0, 0));
    }
    assert!(pruned.cursors >= 6, "{pruned:?}");
    // Another agent's epochs are its own.
    assert!(s.advance_cursor("a2", "events", 1, 1).await.unwrap());
    s.prune(&r).await.unwrap();
    assert_eq!(s.cursor("a2", "events", 1).await.unwrap(), 1);
}

pub(crate) async fn pruning_keeps_runs_with_anything_left_on_a_host(s: &dyn Store) {
    use crate::proto::RunContainerState as St;
    add_agent(s).await;
    // One run per final state of its single container, all old.
    let states = [
        St::Failed,
        St::Removed,
        St::Exited,
        St::Running,
        St::Pending,
    ];
    for (i, state) in states.iter().enumerate() {
        let run = RunRecord {
            id: format!("run{i}"),
            name: format!("r{i}"),
            provider: "default".into(),
            image: "alpine".into(),
            count: 1,
            created_ms: 10,
            ..Default::default()
        };
        let start = NewContainer {
            index: 0,
            agent_id: "a1".into(),
            name: format!("r{i}-0"),
            command_id: format!("start{i}"),
            spec: ping(),
        };
        s.create_run(&run, &[start]).await.unwrap().unwrap();
        let mut change = |_: &RunRecord, c: &mut super::RunContainerRecord| {
            c.state = *state;
            None
        };
        s.change_container(&run.id, 0, 20, &mut change)
            .await
            .unwrap()
            .unwrap();
    }
    // A removed container with a remove still in flight stays too.
    let mut pending = |_: &RunRecord, c: &mut super::RunContainerRecord| {
        c.pending_command = "rm".into();
        None
    };
    s.change_container("run1", 0, 30, &mut pending)
        .await
        .unwrap()
        .unwrap();
    let r = Retention {
        runs_before_ms: 1_000,
        ..keep_all()
    };
    assert_eq!(s.prune(&r).await.unwrap().runs, 1);
    assert!(s.run("run0").await.unwrap().is_none(), "nothing left of it");
    for id in ["run1", "run2", "run3", "run4"] {
        assert!(
            s.run(id).await.unwrap().is_some(),
            "{id} still has a container"
        );
    }
    // Runs newer than the cutoff stay whatever their state.
    let r = Retention {
        runs_before_ms: 10,
        ..keep_all()
    };
    let mut clear = |_: &RunRecord, c: &mut super::RunContainerRecord| {
        c.pending_command.clear();
        None
    };
    s.change_container("run1", 0, 40, &mut clear)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.prune(&r).await.unwrap().runs, 0);
}

pub(crate) async fn revoked_agents_stay_revoked_and_keep_their_record(s: &dyn Store) {
    add_agent(s).await;
    let owner = s.agent_by_credential("ch").await.unwrap().unwrap();
    assert_eq!((owner.agent_id.as_str(), owner.revoked_ms), ("a1", 0));
    assert_eq!(s.revoke_agent("a1", 50).await.unwrap(), Some(50));
    // Repeated: the first time stays.
    assert_eq!(s.revoke_agent("a1", 60).await.unwrap(), Some(50));
    assert_eq!(s.revoke_agent("nobody", 60).await.unwrap(), None);
    let owner = s.agent_by_credential("ch").await.unwrap().unwrap();
    assert_eq!(
        owner.revoked_ms, 50,
        "the lookup tells the caller to refuse it"
    );
    let a = s.agent("a1").await.unwrap().unwrap();
    assert_eq!(a.revoked_ms, 50);
    assert_eq!(s.agents("").await.unwrap().len(), 1, "the record stays");
    // A revoked agent gets no new credential.
    assert!(!s.set_pending_credential("a1", "ch2").await.unwrap());
    assert!(s.agent_by_credential("ch2").await.unwrap().is_none());
}

pub(crate) async fn a_pending_credential_replaces_the_current_one_at_first_use(s: &dyn Store) {
    add_agent(s).await;
    assert!(s.set_pending_credential("a1", "ch2").await.unwrap());
    // Replaced before use (the agent crashed before storing it): the
    // first pending one is forgotten, the current one still works.
    assert!(s.set_pending_credential("a1", "ch3").await.unwrap());
    assert!(s.agent_by_credential("ch2").await.unwrap().is_none());
    let old = s.agent_by_credential("ch").await.unwrap().unwrap();
    assert_eq!((old.agent_id.as_str(), old.promoted), ("a1", false));
    // The first use of the new one makes it current and ends the old one.
    let new = s.agent_by_credential("ch3").await.unwrap().unwrap();
    assert_eq!((new.agent_id.as_str(), new.promoted), ("a1", true));
    assert!(s.agent_by_credential("ch").await.unwrap().is_none());
    let again = s.agent_by_credential("ch3").await.unwrap().unwrap();
    assert!(!again.promoted);
    assert!(!s.set_pending_credential("nobody", "ch4").await.unwrap());
}

pub(crate) async fn token_caps_count_enrollments_until_the_token_is_rotated(s: &dyn Store) {
    assert!(s.create_provider("default", "th", 1).await.unwrap());
    assert!(s.set_token_limits("default", 2, 1_000).await.unwrap());
    assert!(!s.set_token_limits("nobody", 2, 0).await.unwrap());
    assert!(enroll(s, "a1", "c1").await);
    assert!(enroll(s, "a2", "c2").await);
    assert!(!enroll(s, "a3", "c3").await, "past the cap");
    assert!(s.agent("a3").await.unwrap().is_none());
    let p = s.provider_by_token("th").await.unwrap().unwrap();
    assert_eq!(
        (
            p.name.as_str(),
            p.max_agents,
            p.expires_ms,
            p.token_enrolled,
            p.agents
        ),
        ("default", 2, 1_000, 2, 2)
    );
    // A new token starts with no limits and no count; the agents stay.
    assert!(s.set_provider_token("default", "th2").await.unwrap());
    assert!(s.provider_by_token("th").await.unwrap().is_none());
    let p = &s.providers().await.unwrap()[0];
    assert_eq!(
        (p.max_agents, p.expires_ms, p.token_enrolled, p.agents),
        (0, 0, 0, 2)
    );
    assert!(s.set_token_limits("default", 1, 0).await.unwrap());
    assert!(enroll(s, "a3", "c3").await);
    assert!(!enroll(s, "a4", "c4").await);
}

pub(crate) async fn an_enrollment_key_finds_its_agent_within_the_window(s: &dyn Store) {
    assert!(s.create_provider("default", "th", 1).await.unwrap());
    assert!(s.create_provider("other", "th2", 1).await.unwrap());
    let keyed = |id: &str, key: &str| AgentRecord {
        id: id.into(),
        provider: "default".into(),
        enrolled_ms: 100,
        enroll_key_hash: Some(key.into()),
        ..Default::default()
    };
    assert!(s.insert_agent(&keyed("a1", "k1"), "ch1").await.unwrap());
    assert!(enroll(s, "a2", "ch2").await, "agents without a key");
    assert!(enroll(s, "a3", "ch3").await, "agents without a key");
    // A second agent of the provider with the same key is refused.
    assert!(s.insert_agent(&keyed("a4", "k1"), "ch4").await.is_err());
    // The same key within the window: the same agent, a new credential.
    assert_eq!(
        s.reenroll("default", "k1", 50, "ch1b")
            .await
            .unwrap()
            .as_deref(),
        Some("a1")
    );
    assert!(s.agent_by_credential("ch1").await.unwrap().is_none());
    assert_eq!(
        s.agent_by_credential("ch1b")
            .await
            .unwrap()
            .unwrap()
            .agent_id,
        "a1"
    );
    // Another key or provider, or past the window: none.
    assert_eq!(s.reenroll("default", "k2", 50, "x1").await.unwrap(), None);
    assert_eq!(s.reenroll("other", "k1", 50, "x2").await.unwrap(), None);
    assert_eq!(s.reenroll("default", "k1", 101, "x3").await.unwrap(), None);
    // Past the window, the key is free for a new agent.
    assert!(s.insert_agent(&keyed("a5", "k1"), "ch5").await.unwrap());
    assert_eq!(
        s.reenroll("default", "k1", 50, "ch5b")
            .await
            .unwrap()
            .as_deref(),
        Some("a5")
    );
    // A revoked agent is not given a credential again.
    s.revoke_agent("a5", 200).await.unwrap();
    assert_eq!(s.reenroll("default", "k1", 50, "x4").await.unwrap(), None);
    assert_eq!(s.providers().await.unwrap()[0].agents, 4);
}

pub(crate) async fn finished_commands_keep_no_secrets(s: &dyn Store) {
    use proto::command_spec::Kind;
    add_agent(s).await;
    let pull = proto::CommandSpec {
        kind: Some(Kind::PullImage(proto::PullImage {
            image: "registry.corp/x:1".into(),
            auth: Some(proto::RegistryAuth {
                username: "deploy".into(),
                password: "hunter22".into(),
            }),
        })),
    };
    let run = proto::CommandSpec {
        kind: Some(Kind::RunContainer(proto::RunContainer {
            image: "x".into(),
            env: [("TOKEN".to_string(), "s3cret".to_string())].into(),
            ..Default::default()
        })),
    };
    s.enqueue("a1", "c1", &pull, 10).await.unwrap();
    s.enqueue("a1", "c2", &run, 10).await.unwrap();
    // Until its result is stored, the agent may need the spec as it is.
    assert_eq!(
        s.command("c1").await.unwrap().unwrap().command.spec,
        Some(pull)
    );
    for id in ["c1", "c2"] {
        let r = proto::CommandResult {
            command_id: id.into(),
            status: proto::CommandStatus::Ok as i32,
            ..Default::default()
        };
        assert!(s.complete("a1", &r, 11).await.unwrap());
    }
    let spec = |id: &'static str| async move {
        s.command(id)
            .await
            .unwrap()
            .unwrap()
            .command
            .spec
            .unwrap()
            .kind
    };
    let Some(Kind::PullImage(p)) = spec("c1").await else {
        panic!("c1 is a pull")
    };
    let auth = p.auth.unwrap();
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("deploy", SCRUBBED)
    );
    let Some(Kind::RunContainer(r)) = spec("c2").await else {
        panic!("c2 is a run")
    };
    assert_eq!(r.env.get("TOKEN").map(String::as_str), Some(SCRUBBED));
}
