//! The rung loop: the one task that owns the `Ladder`. It runs a session
//! on the ladder's rung (a gRPC stream, kept alive and rotated make
//! before break, or long-polling, which probes gRPC when the ladder says
//! so), moves along the ladder, and backs off between failed sessions.
//! Commands go to intake, `Reconfigure` to the metrics interval; the
//! unary client of each rung is published through the transport.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::super::ladder::{Ladder, LadderConfig, Move, Rung, StreamEnd};
use super::super::{AgentConfig, TransportMode};
use super::Stop;
use super::intake::Intake;
use super::transport::{
    AGENT_SERVICE, FIRST_FRAME_TIMEOUT, Info, OpenStream, Opening, Transport, as_whom, opening,
};
use crate::backoff::{Backoff, Retry};
use crate::client::{CallError, FailureKind};
use crate::health::StatusFile;
use crate::proto;

/// How a rung session ended.
enum Outcome {
    Shutdown,
    /// A probe's stream is up: climb to gRPC with it.
    Climb(Box<OpenStream>),
    /// Reconnect after backoff.
    Failed(CallError),
    /// The stream works but the calls beside it do not (why): gRPC does
    /// not work end to end.
    Broken(String),
}

/// The settings the rung loop goes by.
pub(super) struct RungConfig {
    pub(super) transport: TransportMode,
    pub(super) probe_initial: Duration,
    pub(super) probe_max: Duration,
    pub(super) stream_max_age: Duration,
    pub(super) poll_hold: Duration,
    pub(super) backoff: Backoff,
    pub(super) operator_retry: Duration,
}

impl RungConfig {
    pub(super) fn new(cfg: &AgentConfig) -> Self {
        RungConfig {
            transport: cfg.transport,
            probe_initial: cfg.probe_initial,
            probe_max: cfg.probe_max,
            stream_max_age: cfg.stream_max_age,
            poll_hold: cfg.poll_hold,
            backoff: cfg.backoff,
            operator_retry: cfg.operator_retry,
        }
    }

    fn ladder(&self) -> LadderConfig {
        LadderConfig {
            auto: self.transport == TransportMode::Auto,
            start: match self.transport {
                TransportMode::Longpoll => Rung::Longpoll,
                _ => Rung::Grpc,
            },
            probe_initial: self.probe_initial,
            probe_max: self.probe_max,
        }
    }
}

/// The metrics interval the backend asks for in `Reconfigure`: within
/// 200 ms to 1 h; None (leave it as it is) for 0.
fn metrics_interval(r: &proto::Reconfigure) -> Option<Duration> {
    if r.metrics_interval_ms == 0 {
        return None;
    }
    Some(
        Duration::from_millis(r.metrics_interval_ms as u64)
            .clamp(Duration::from_millis(200), Duration::from_secs(3600)),
    )
}

/// How long a stream may stay silent after a heartbeat announcing
/// `interval_ms` (clamped to 100 ms to 60 s): two intervals plus a margin.
fn silence_limit(interval_ms: u32) -> Duration {
    let interval = Duration::from_millis(interval_ms.clamp(100, 60_000) as u64);
    interval * 2 + Duration::from_secs(1)
}

/// Applies the backend's settings: the metrics interval, within
/// 200 ms to 1 h (0 leaves it as it is). True when it changed.
fn reconfigure(interval: &watch::Sender<Option<Duration>>, r: &proto::Reconfigure) -> bool {
    let Some(d) = metrics_interval(r) else {
        return false;
    };
    let changed = interval.send_if_modified(|cur| {
        let new = Some(d);
        let changed = *cur != new;
        *cur = new;
        changed
    });
    if changed {
        tracing::info!(interval = ?d, "backend set the metrics interval");
    }
    changed
}

/// The rung loop.
pub(super) struct Rungs {
    pub(super) cfg: RungConfig,
    pub(super) transport: Arc<Transport>,
    pub(super) info: Arc<Info>,
    pub(super) intake: Arc<Intake>,
    /// The ack, sent with every `Subscribe` and `Poll`.
    pub(super) ack: watch::Receiver<u64>,
    /// The metrics interval the backend asked for (`Reconfigure`).
    pub(super) metrics_interval: watch::Sender<Option<Duration>>,
    /// The status file: connected, contact, failures.
    pub(super) status: StatusFile,
}

impl Rungs {
    /// Applies the backend's settings.
    fn reconfigure(&self, r: &proto::Reconfigure) {
        reconfigure(&self.metrics_interval, r);
    }

    fn set_reason(&self, ladder: &Ladder) {
        self.info.set_reason(ladder.reason());
    }

    /// A stream being opened beside the current session.
    fn opening(&self) -> Opening {
        opening(&self.transport, &self.ack, &self.info)
    }

    /// Tells the status file how a session on `rung` ended.
    fn note(&self, rung: Rung, outcome: &Outcome) {
        match outcome {
            Outcome::Failed(e) => self.status.failed(rung.name(), &e.to_string()),
            Outcome::Broken(why) => self.status.failed(rung.name(), why),
            Outcome::Shutdown | Outcome::Climb(_) => {}
        }
    }

    /// Hands a delivered command to intake; a journal that cannot be
    /// written fails the session.
    fn intake(&self, c: proto::Command) -> Result<(), Outcome> {
        self.intake.accept(c).map_err(Outcome::Failed)
    }

    /// The rung loop: runs sessions on the ladder's rung, moves along the
    /// ladder, and backs off between failed attempts.
    pub(super) async fn run(self, mut stop: Stop) {
        let mut ladder = Ladder::new(self.cfg.ladder());
        self.set_reason(&ladder);
        crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
        tracing::info!(
            rung = ladder.rung().name(),
            reason = ladder.reason(),
            "transport"
        );
        let mut retry = Retry::new(self.cfg.backoff);
        let mut preopened: Option<OpenStream> = None;
        loop {
            let rung = ladder.rung();
            let generation = self.transport.credential.generation();
            let outcome = match rung {
                Rung::Grpc => {
                    let (outcome, end) = self
                        .grpc_session(&mut retry, stop.clone(), preopened.take())
                        .await;
                    self.note(rung, &outcome);
                    let (fall, label) = match &outcome {
                        Outcome::Failed(e) => (
                            ladder.grpc_failed(e, end, std::time::Instant::now(), fastrand::f64()),
                            e.label(),
                        ),
                        Outcome::Broken(why) => (
                            ladder.grpc_broken(why, std::time::Instant::now(), fastrand::f64()),
                            "no_trailers",
                        ),
                        _ => (Move::Stay, ""),
                    };
                    if let Move::Fall(why) = fall {
                        self.set_reason(&ladder);
                        crate::telemetry::reconnect("grpc", label);
                        crate::telemetry::switch("grpc", "longpoll");
                        crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
                        tracing::warn!(from = "grpc", to = "longpoll", reason = %why, "switching rung");
                        retry.reset();
                        continue;
                    }
                    outcome
                }
                Rung::Longpoll => {
                    let outcome = self
                        .poll_session(&mut retry, stop.clone(), &mut ladder)
                        .await;
                    self.note(rung, &outcome);
                    outcome
                }
            };
            let delay = match outcome {
                Outcome::Shutdown => return,
                Outcome::Climb(open) => {
                    self.set_reason(&ladder);
                    crate::telemetry::switch("longpoll", "grpc");
                    crate::telemetry::rung(ladder.rung().name(), ladder.reason_code());
                    tracing::info!(
                        from = "longpoll",
                        to = "grpc",
                        reason = ladder.reason(),
                        "switching rung"
                    );
                    preopened = Some(*open);
                    continue;
                }
                // Pinned to gRPC: said once, at warn level, by the session.
                Outcome::Broken(_) => retry.next_delay(),
                Outcome::Failed(e) => {
                    crate::telemetry::reconnect(rung.name(), e.label());
                    let rotated = self.transport.credential.generation() != generation;
                    if rotated
                        && e.kind
                            == crate::client::FailureKind::Status(tonic::Code::Unauthenticated)
                    {
                        // The credential was replaced during the session: the
                        // refused call may have carried the one before, which
                        // stops working at the new one's first use.
                        let d = retry.next_delay();
                        tracing::info!(
                            rung = rung.name(),
                            "a call was refused just after the credential was replaced; retrying with the new one in {d:.1?}"
                        );
                        d
                    } else if e.needs_operator() {
                        let d = super::jitter(self.cfg.operator_retry);
                        tracing::error!(
                            rung = rung.name(),
                            failure = e.label(),
                            "cannot connect: {e}; retrying in {d:.0?}"
                        );
                        d
                    } else {
                        let d = retry.next_delay();
                        tracing::warn!(
                            rung = rung.name(),
                            failure = e.label(),
                            "backend unreachable: {e}; retrying in {d:.1?}"
                        );
                        d
                    }
                }
            };
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One gRPC session: a stream (opened here, or handed over by a
    /// successful probe), kept alive and rotated make-before-break.
    async fn grpc_session(
        &self,
        retry: &mut Retry,
        mut stop: Stop,
        preopened: Option<OpenStream>,
    ) -> (Outcome, StreamEnd) {
        let open = match preopened {
            Some(o) => o,
            None => tokio::select! {
                _ = stop.wait() => return (Outcome::Shutdown, StreamEnd::BeforeFirstFrame),
                r = self.transport.open_stream(&self.ack, &self.info) => match r {
                    Ok(o) => o,
                    Err(e) => return (Outcome::Failed(e), StreamEnd::BeforeFirstFrame),
                },
            },
        };
        retry.reset();
        tracing::info!(rung = "grpc", ack = open.ack, "stream open");
        let mut live = self.transport.adopt(open);
        self.status.connected("grpc");
        let mut dead_after = FIRST_FRAME_TIMEOUT;
        let mut next: Option<Opening> = None;
        let auto = self.cfg.transport == TransportMode::Auto;
        loop {
            let heartbeats = live.heartbeats;
            let frame = match live.first.take() {
                Some(f) => f,
                None => {
                    let msg = tokio::select! {
                        biased;
                        _ = stop.wait() => return (Outcome::Shutdown, StreamEnd::After { heartbeats }),
                        _ = live.end_to_end.tripped() => {
                            let why = live.end_to_end.reason();
                            if auto {
                                return (Outcome::Broken(why), StreamEnd::After { heartbeats });
                            }
                            tracing::warn!(rung = "grpc", "{why}; staying on gRPC (--transport grpc)");
                            continue;
                        }
                        r = async { next.as_mut().expect("guarded by if").await }, if next.is_some() => {
                            next = None;
                            match r {
                                Ok(o) => {
                                    // Make before break: the new stream is up, drop the old.
                                    tracing::info!(ack = o.ack, "stream rotated");
                                    live = self.transport.adopt(o);
                                }
                                Err(e) => tracing::warn!(failure = e.label(), "could not open the replacement stream: {e}; keeping the current one"),
                            }
                            continue;
                        }
                        _ = tokio::time::sleep_until(live.rotate_at), if next.is_none() => {
                            tracing::info!(age = ?live.opened.elapsed(), "stream reached its maximum age; opening a replacement");
                            next = Some(self.opening());
                            live.rotate_at = tokio::time::Instant::now() + self.cfg.stream_max_age;
                            continue;
                        }
                        r = tokio::time::timeout(dead_after, live.stream.message()) => r,
                    };
                    let end = StreamEnd::After { heartbeats };
                    match msg {
                        Err(_) => {
                            return (
                                Outcome::Failed(CallError {
                                    kind: FailureKind::Timeout,
                                    message: format!(
                                        "no frame from the backend for {dead_after:?}; stream declared dead"
                                    ),
                                }),
                                end,
                            );
                        }
                        Ok(Err(s)) => return (Outcome::Failed(CallError::from_tonic(&s)), end),
                        Ok(Ok(None)) => match next.take() {
                            // The backend ended this stream after asking for
                            // a rotation: wait for the replacement.
                            Some(replacement) => {
                                match tokio::time::timeout(FIRST_FRAME_TIMEOUT * 2, replacement)
                                    .await
                                {
                                    Ok(Ok(o)) => {
                                        tracing::info!(ack = o.ack, "stream rotated");
                                        live = self.transport.adopt(o);
                                        continue;
                                    }
                                    Ok(Err(e)) => return (Outcome::Failed(e), end),
                                    Err(_) => {
                                        return (
                                            Outcome::Failed(CallError {
                                                kind: FailureKind::Timeout,
                                                message: "the replacement stream did not open"
                                                    .into(),
                                            }),
                                            end,
                                        );
                                    }
                                }
                            }
                            None => {
                                return (
                                    Outcome::Failed(CallError {
                                        kind: FailureKind::Other,
                                        message: "the stream ended".into(),
                                    }),
                                    end,
                                );
                            }
                        },
                        Ok(Ok(Some(resp))) => resp,
                    }
                }
            };
            self.status.contact();
            use proto::server_frame::Kind;
            match frame.frame.and_then(|f| f.kind) {
                Some(Kind::Heartbeat(h)) => {
                    live.heartbeats = live.heartbeats.saturating_add(1);
                    // Two intervals plus a margin without any frame: dead.
                    dead_after = silence_limit(h.interval_ms);
                }
                Some(Kind::Command(c)) => {
                    if let Err(o) = self.intake(c) {
                        return (o, StreamEnd::After { heartbeats });
                    }
                }
                Some(Kind::Rotate(r)) if next.is_none() => {
                    tracing::info!(reason = %r.reason, "backend asked to rotate; opening a replacement stream");
                    next = Some(self.opening());
                }
                Some(Kind::Rotate(_)) => {}
                Some(Kind::Reconfigure(r)) => self.reconfigure(&r),
                None => {}
            }
        }
    }

    /// One long-poll session. In auto mode it also probes gRPC when the
    /// ladder says so, and hands over a probe's stream that delivered a frame.
    async fn poll_session(
        &self,
        retry: &mut Retry,
        mut stop: Stop,
        ladder: &mut Ladder,
    ) -> Outcome {
        let client = self.transport.connect_longpoll();
        let hold = self.cfg.poll_hold;
        let mut first = true;
        let mut probe: Option<Opening> = None;
        loop {
            // The first poll of a session returns at once, so the rung is
            // known to work without waiting for a hold.
            let req = proto::PollRequest {
                ack: *self.ack.borrow(),
                hold_ms: if first { 1 } else { hold.as_millis() as u32 },
                info: Some(self.info.current()),
            };
            let client = as_whom(&client, &self.transport.credential.get());
            let poll = client.call(AGENT_SERVICE, "Poll", &req, hold + Duration::from_secs(15));
            tokio::pin!(poll);
            let resp: proto::PollResponse = loop {
                let probe_at = ladder.next_probe().map(tokio::time::Instant::from_std);
                tokio::select! {
                    biased;
                    _ = stop.wait() => return Outcome::Shutdown,
                    r = async { probe.as_mut().expect("guarded by if").await }, if probe.is_some() => {
                        probe = None;
                        match r {
                            Ok(open) => {
                                ladder.probe_result(true, std::time::Instant::now(), fastrand::f64());
                                // The poll in flight is dropped: commands it
                                // may carry are unacked, so the stream
                                // delivers them again (the journal drops any
                                // duplicate).
                                return Outcome::Climb(Box::new(open));
                            }
                            Err(e) => {
                                ladder.probe_result(false, std::time::Instant::now(), fastrand::f64());
                                tracing::info!(failure = e.label(), next_in = ?ladder.next_probe().map(|t| t.saturating_duration_since(std::time::Instant::now())),
                                    "gRPC probe failed: {e}; staying on long-poll");
                                self.set_reason(ladder);
                            }
                        }
                    }
                    _ = async { tokio::time::sleep_until(probe_at.expect("guarded by if")).await }, if probe_at.is_some() && probe.is_none() => {
                        tracing::debug!("probing the gRPC stream");
                        probe = Some(self.opening());
                    }
                    r = &mut poll => match r {
                        Ok(r) => break r,
                        Err(e) => return Outcome::Failed(e),
                    },
                }
            };
            if first {
                first = false;
                retry.reset();
                tracing::info!(rung = "longpoll", ack = req.ack, "long-polling");
            }
            self.status.connected("longpoll");
            for frame in resp.frames {
                use proto::server_frame::Kind;
                match frame.kind {
                    Some(Kind::Command(c)) => match self.intake(c) {
                        Ok(()) => {}
                        Err(o) => return o,
                    },
                    Some(Kind::Rotate(r)) => {
                        tracing::info!(reason = %r.reason, "backend asked to rotate")
                    }
                    Some(Kind::Reconfigure(r)) => self.reconfigure(&r),
                    Some(Kind::Heartbeat(_)) | None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(transport: TransportMode) -> RungConfig {
        let mut c = AgentConfig::new(
            "https://backend.example:8443".parse().unwrap(),
            "/nonexistent",
        );
        c.transport = transport;
        RungConfig::new(&c)
    }

    #[test]
    fn the_mode_picks_the_first_rung_and_whether_the_ladder_moves() {
        let auto = cfg(TransportMode::Auto).ladder();
        assert!(auto.auto);
        assert_eq!(auto.start, Rung::Grpc);
        let grpc = cfg(TransportMode::Grpc).ladder();
        assert!(!grpc.auto);
        assert_eq!(grpc.start, Rung::Grpc);
        let longpoll = cfg(TransportMode::Longpoll).ladder();
        assert!(!longpoll.auto);
        assert_eq!(longpoll.start, Rung::Longpoll);
        assert_eq!(auto.probe_initial, Duration::from_secs(60));
        assert_eq!(auto.probe_max, Duration::from_secs(15 * 60));
    }

    fn reconf(ms: u32) -> proto::Reconfigure {
        proto::Reconfigure {
            metrics_interval_ms: ms,
            ..Default::default()
        }
    }

    #[test]
    fn the_metrics_interval_is_kept_within_bounds_and_zero_leaves_it() {
        assert_eq!(metrics_interval(&reconf(0)), None);
        assert_eq!(
            metrics_interval(&reconf(1)),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            metrics_interval(&reconf(5_000)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            metrics_interval(&reconf(u32::MAX)),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_reconfigure_changes_the_interval_only_when_it_differs() {
        let (tx, mut rx) = watch::channel(None);
        assert!(reconfigure(&tx, &reconf(5_000)));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), Some(Duration::from_secs(5)));
        assert!(!reconfigure(&tx, &reconf(5_000)));
        assert!(!rx.has_changed().unwrap(), "the same interval wakes nobody");
        assert!(!reconfigure(&tx, &reconf(0)));
        assert_eq!(*rx.borrow(), Some(Duration::from_secs(5)));
        assert!(reconfigure(&tx, &reconf(100)));
        assert_eq!(*rx.borrow(), Some(Duration::from_millis(200)));
    }

    #[test]
    fn a_stream_is_dead_after_two_heartbeat_intervals_and_a_second() {
        assert_eq!(silence_limit(5_000), Duration::from_secs(11));
        assert_eq!(silence_limit(0), Duration::from_millis(1_200));
        assert_eq!(silence_limit(u32::MAX), Duration::from_secs(121));
    }
}
