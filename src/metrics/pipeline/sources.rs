//! The sources' tasks: each scrapes its source every interval (the
//! agent's, or the one the backend set with `Reconfigure`) and records the
//! samples; a full pipeline makes it wait.

use std::time::Duration;

use tokio::sync::watch;

use super::{Recorder, stopped};
use crate::metrics::containers::{ContainerConfig, ContainerSource};
use crate::metrics::host::HostSource;
use crate::metrics::selfmetrics::SelfSource;

/// The scrape timer: the agent's interval until the backend sets another
/// (`Reconfigure`).
pub(super) struct Every {
    tick: tokio::time::Interval,
    set: watch::Receiver<Option<Duration>>,
}

impl Every {
    pub(super) fn new(interval: Duration, set: watch::Receiver<Option<Duration>>) -> Every {
        let interval = (*set.borrow()).unwrap_or(interval);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Every { tick, set }
    }

    /// Waits for the next scrape; false when the pipeline stops.
    async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            tokio::select! {
                _ = self.tick.tick() => return true,
                _ = stopped(stop) => return false,
                r = self.set.changed() => {
                    if r.is_err() {
                        // The session is gone: keep the current interval.
                        return tokio::select! {
                            _ = self.tick.tick() => true,
                            _ = stopped(stop) => false,
                        };
                    }
                    if let Some(d) = *self.set.borrow_and_update() {
                        self.tick = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                        self.tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
            }
        }
    }
}

/// Scrapes the host every interval.
pub(super) async fn host_loop(
    mut host: HostSource,
    mut every: Every,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        let scraped = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            host.scrape(crate::now_unix_ms(), &mut out);
            (host, out)
        })
        .await;
        let Ok((h, out)) = scraped else { return };
        host = h;
        if !recorder.record(out).await {
            return;
        }
    }
}

/// Scrapes this agent's containers every `interval`, connecting to the
/// engine when it is (again) available.
pub(super) async fn containers_loop(
    agent_id: String,
    cfg: ContainerConfig,
    mut every: Every,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut source: Option<ContainerSource> = None;
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        if source.is_none() {
            match crate::agent::docker::connect().await {
                Ok(d) => source = Some(ContainerSource::new(d, &agent_id, cfg.clone())),
                Err(_) => continue, // No engine: no container metrics.
            }
        }
        let Some(s) = source.as_mut() else { continue };
        let mut out = Vec::new();
        if let Err(e) = s.scrape(crate::now_unix_ms(), &mut out).await {
            tracing::debug!("container metrics: {e}");
            source = None;
        }
        if !recorder.record(out).await {
            return;
        }
    }
}

/// Sends the agent's own metrics (the `metrics` facade) every `interval`.
pub(super) async fn self_loop(
    mut every: Every,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut source) = SelfSource::install() else {
        return;
    };
    loop {
        if !every.next(&mut stop).await {
            return;
        }
        let mut out = Vec::new();
        source.scrape(crate::now_unix_ms(), &mut out);
        if !recorder.record(out).await {
            return;
        }
    }
}
