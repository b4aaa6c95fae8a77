//! The agent's side of the metrics pipeline's [`Push`]: how the unary
//! client's answer to `PushMetrics` (a response or a [`CallError`]) becomes
//! the [`PushOutcome`] the pipeline acts on.
//!
//! [`Push`]: crate::metrics::pipeline::Push

use crate::client::{CallError, FailureKind};
use crate::metrics::pipeline::{PushOutcome, Reads};
use crate::proto;

/// Stored or duplicate by the response; rejected when the backend called
/// the batch invalid (`InvalidArgument`), which no retry mends; anything
/// else is retried. `FailedPrecondition` (the seq is too far above the
/// epoch's watermark) is retried too, as the contract says: the retry
/// sends every unacknowledged batch again from the oldest, so the ones
/// below go first and this one is stored after them.
pub fn outcome(r: Result<proto::PushMetricsResponse, CallError>) -> PushOutcome {
    match r {
        Ok(r) if r.stored => PushOutcome::Stored(Reads::of(&r)),
        Ok(r) => PushOutcome::Duplicate(Reads::of(&r)),
        Err(e) if matches!(e.kind, FailureKind::Status(tonic::Code::InvalidArgument)) => {
            PushOutcome::Rejected(e.message)
        }
        Err(e) => PushOutcome::Retry {
            kind: e.label(),
            reason: e.message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: FailureKind) -> PushOutcome {
        outcome(Err(CallError {
            kind,
            message: "why".into(),
        }))
    }

    #[test]
    fn answers_become_outcomes() {
        let reads = proto::PushMetricsResponse {
            stored: true,
            reads_series_deltas: true,
            reads_batch_zstd: false,
        };
        assert_eq!(
            outcome(Ok(reads)),
            PushOutcome::Stored(Reads {
                series_deltas: true,
                batch_zstd: false
            })
        );
        let again = proto::PushMetricsResponse {
            stored: false,
            ..reads
        };
        assert!(matches!(outcome(Ok(again)), PushOutcome::Duplicate(r) if r.series_deltas));
        assert_eq!(
            failed(FailureKind::Status(tonic::Code::InvalidArgument)),
            PushOutcome::Rejected("why".into())
        );
        // Too far ahead of the watermark: kept, and sent again after the
        // batches below it.
        assert!(matches!(
            failed(FailureKind::Status(tonic::Code::FailedPrecondition)),
            PushOutcome::Retry { .. }
        ));
        let e = CallError {
            kind: FailureKind::Status(tonic::Code::Unavailable),
            message: "why".into(),
        };
        assert_eq!(
            failed(FailureKind::Status(tonic::Code::Unavailable)),
            PushOutcome::Retry {
                kind: e.label(),
                reason: "why".into()
            }
        );
        assert!(matches!(
            failed(FailureKind::Refused),
            PushOutcome::Retry { .. }
        ));
    }
}
