//! The semantics of [`Store`], as tests any implementation must pass:
//! each function takes an empty store. [`SqliteStore`](super::SqliteStore)
//! runs them on in-memory databases with `store_suite!`; a second store
//! runs them the same way with its own constructor.

use super::{AgentRecord, BatchSeq, METRIC_SEQ_WINDOW, Store};
use crate::proto;

/// Defines every test of the suite as a `#[test]` of its own, each on a
/// fresh empty store made by `$make` (an expression that yields a value
/// implementing [`Store`]).
macro_rules! store_suite {
    ($make:expr) => {
        $crate::backend::store::suite::store_suite!(
            $make;
            seqs_are_contiguous_and_pending_follows_acks,
            an_ack_beyond_issued_seqs_moves_numbering_on,
            results_are_stored_once_and_only_for_the_owner,
            cursors_only_move_forward,
            metric_batches_are_stored_once_in_any_order,
            metric_batches_far_above_the_watermark_are_refused,
        );
    };
    ($make:expr; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                let store = $make;
                $crate::backend::store::suite::$name(&store);
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
fn add_agent(s: &dyn Store) {
    assert!(s.create_provider("default", "th", 1).unwrap());
    s.insert_agent(
        &AgentRecord {
            id: "a1".into(),
            provider: "default".into(),
            enrolled_ms: 1,
            ..Default::default()
        },
        "ch",
    )
    .unwrap();
}

pub(crate) fn seqs_are_contiguous_and_pending_follows_acks(s: &dyn Store) {
    add_agent(s);
    for i in 1..=3 {
        let c = s
            .enqueue("a1", &format!("c{i}"), &ping(), 10)
            .unwrap()
            .unwrap();
        assert_eq!(c.seq, i);
    }
    assert_eq!(s.pending("a1", 0, 100).unwrap().len(), 3);
    assert_eq!(s.ack("a1", 2, 20).unwrap(), 2);
    let p = s.pending("a1", 2, 100).unwrap();
    assert_eq!(p.iter().map(|c| c.seq).collect::<Vec<_>>(), [3]);
    // Acks never go backwards.
    assert_eq!(s.ack("a1", 1, 30).unwrap(), 2);
    assert_eq!(s.command("c1").unwrap().unwrap().accepted_ms, 20);
    assert_eq!(s.ack("a1", 3, 30).unwrap(), 3);
    assert!(s.enqueue("nobody", "x", &ping(), 1).unwrap().is_none());
}

pub(crate) fn an_ack_beyond_issued_seqs_moves_numbering_on(s: &dyn Store) {
    add_agent(s);
    s.enqueue("a1", "c1", &ping(), 10).unwrap();
    s.enqueue("a1", "c2", &ping(), 10).unwrap();
    // The agent saw seqs up to 5 before this store lost commits.
    assert_eq!(s.ack("a1", 5, 20).unwrap(), 5);
    for id in ["c1", "c2"] {
        let c = s.command(id).unwrap().unwrap();
        assert_eq!(
            (c.accepted_ms, c.done_ms),
            (20, 0),
            "{id}: its result may still come"
        );
    }
    let c = s.enqueue("a1", "c3", &ping(), 30).unwrap().unwrap();
    assert_eq!(c.seq, 6);
    assert!(s.pending("a1", 5, 10).unwrap().iter().all(|c| c.id == "c3"));
}

pub(crate) fn results_are_stored_once_and_only_for_the_owner(s: &dyn Store) {
    add_agent(s);
    s.enqueue("a1", "c1", &ping(), 10).unwrap();
    let r = proto::CommandResult {
        command_id: "c1".into(),
        status: proto::CommandStatus::Ok as i32,
        ..Default::default()
    };
    assert!(!s.complete("a2", &r, 11).unwrap());
    assert!(s.complete("a1", &r, 11).unwrap());
    assert!(!s.complete("a1", &r, 12).unwrap());
    let c = s.command("c1").unwrap().unwrap();
    assert_eq!((c.done_ms, c.result), (11, Some(r)));
}

pub(crate) fn cursors_only_move_forward(s: &dyn Store) {
    add_agent(s);
    assert!(s.advance_cursor("a1", "events", 7, 1).unwrap());
    assert!(s.advance_cursor("a1", "events", 7, 2).unwrap());
    assert!(!s.advance_cursor("a1", "events", 7, 2).unwrap());
    assert!(!s.advance_cursor("a1", "events", 7, 1).unwrap());
    assert!(s.advance_cursor("a1", "events", 8, 1).unwrap());
    assert_eq!(s.cursor("a1", "events", 7).unwrap(), 2);
}

pub(crate) fn metric_batches_are_stored_once_in_any_order(s: &dyn Store) {
    add_agent(s);
    let new = |seq| s.metric_batch_state("a1", 9, seq).unwrap();
    let record = |seq| s.record_metric_batch("a1", 9, seq).unwrap();
    // In order.
    for seq in 1..=3 {
        assert_eq!(new(seq), BatchSeq::New);
        assert!(record(seq));
        assert_eq!(new(seq), BatchSeq::Seen);
    }
    assert_eq!(s.metric_batches("a1", 9).unwrap(), (3, 0));
    // Out of order: 6 and 5 before 4; a lower seq after a higher one
    // is still new.
    assert!(record(6));
    assert!(record(5));
    assert_eq!(s.metric_batches("a1", 9).unwrap(), (3, 2));
    assert_eq!(new(4), BatchSeq::New);
    assert_eq!(new(5), BatchSeq::Seen);
    assert!(!record(5), "a duplicate above the watermark");
    assert!(record(4));
    // 4 closed the gap: the watermark moves over 5 and 6, their rows go.
    assert_eq!(s.metric_batches("a1", 9).unwrap(), (6, 0));
    for seq in 1..=6 {
        assert_eq!(new(seq), BatchSeq::Seen, "{seq}");
        assert!(!record(seq), "{seq}");
    }
    // A gap that stays open keeps what is above it, and only that.
    assert!(record(8));
    assert!(record(10));
    assert!(record(7));
    assert_eq!(s.metric_batches("a1", 9).unwrap(), (8, 1));
    assert_eq!(new(9), BatchSeq::New);
    // Epochs and agents are independent.
    assert_eq!(s.metric_batch_state("a1", 10, 1).unwrap(), BatchSeq::New);
    assert_eq!(s.metric_batch_state("a2", 9, 1).unwrap(), BatchSeq::New);
    // The event cursors are another stream.
    assert_eq!(s.cursor("a1", "events", 9).unwrap(), 0);
}

pub(crate) fn metric_batches_far_above_the_watermark_are_refused(s: &dyn Store) {
    add_agent(s);
    assert!(s.record_metric_batch("a1", 1, 1).unwrap());
    let edge = 1 + METRIC_SEQ_WINDOW;
    assert_eq!(s.metric_batch_state("a1", 1, edge).unwrap(), BatchSeq::New);
    assert_eq!(
        s.metric_batch_state("a1", 1, edge + 1).unwrap(),
        BatchSeq::TooFarAhead { watermark: 1 }
    );
    assert!(!s.record_metric_batch("a1", 1, edge + 1).unwrap());
    assert!(s.record_metric_batch("a1", 1, edge).unwrap());
    assert_eq!(s.metric_batches("a1", 1).unwrap(), (1, 1));
}
