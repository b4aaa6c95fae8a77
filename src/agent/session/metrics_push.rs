//! The metrics pipeline's wiring to the session: the pipeline is started
//! with a push that sends each batch as `PushMetrics` on the current
//! rung's unary client (waiting for one), and follows the metrics interval
//! the backend sets. The one place where the session meets the pipeline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::super::AgentError;
use super::credential::Credential;
use super::transport::UnarySlot;
use crate::client::{CallError, FailureKind};
use crate::metrics::pipeline::{MetricsConfig, Pipeline, Push};
use crate::proto;

/// Starts the metrics pipeline, pushing on the current rung.
pub(super) async fn start_pipeline(
    m: &MetricsConfig,
    state_dir: PathBuf,
    agent_id: &str,
    slot: UnarySlot,
    credential: Credential,
    interval: watch::Receiver<Option<Duration>>,
) -> Result<Pipeline, AgentError> {
    let sender = Arc::new((slot, credential));
    let push: Push = Arc::new(move |req| {
        let sender = sender.clone();
        Box::pin(async move {
            super::super::push::outcome(push_metrics(&sender.0, &sender.1, req).await)
        })
    });
    Pipeline::start(m, state_dir, push, agent_id, interval)
        .await
        .map_err(AgentError::Metrics)
}

/// Sends a metric batch on the current rung, waiting for one.
async fn push_metrics(
    slot: &UnarySlot,
    credential: &Credential,
    req: proto::PushMetricsRequest,
) -> Result<proto::PushMetricsResponse, CallError> {
    let mut rx = slot.subscribe();
    let unary = match rx.wait_for(|u| u.is_some()).await {
        Ok(u) => u.clone(),
        Err(_) => None,
    };
    let Some(unary) = unary else {
        return Err(CallError {
            kind: FailureKind::Other,
            message: "the agent is stopping".into(),
        });
    };
    unary.push_metrics(&credential.get(), req).await
}
