//! The transport ladder: which rung the agent is on, and when it moves.
//! Pure logic with injected time and randomness; the session drives it.
//!
//! - Mode `auto` starts on the gRPC stream. It falls to long-polling at once
//!   when HTTP/2 cannot pass: ALPN not `h2`, the h2 handshake failing, a
//!   stream reset or cut before its first frame, or [`EARLY_DEATHS`] streams
//!   in a row dying before [`EARLY_HEARTBEATS`] heartbeats. (Streams cut at
//!   a fixed age by a proxy live longer than that: the agent reconnects at
//!   once and stays on gRPC.) Failures that would fail
//!   every rung (DNS, refused, proxy, TLS trust, credentials) never cause a
//!   fall: they are reported as what they are.
//!   A gRPC stream that works while the calls beside it on its connection
//!   keep ending without trailers (an ingress forwarding gRPC as HTTP/1.1)
//!   is gRPC not working end to end: the ladder falls too
//!   ([`Ladder::grpc_broken`]), and each such fall in a row doubles the
//!   wait before the next probe instead of starting it over.
//! - On long-poll, gRPC is probed again after a jittered, growing interval
//!   (`probe_initial`, doubling up to `probe_max`). A probe succeeds only
//!   when its stream delivered a frame; then the ladder climbs back.
//! - Modes `grpc` and `longpoll` pin the rung.

use std::time::{Duration, Instant};

use crate::client::{CallError, FailureKind};

/// A stream that dies before delivering this many heartbeats died early.
pub const EARLY_HEARTBEATS: u32 = 3;
/// Early deaths in a row that make the ladder fall.
pub const EARLY_DEATHS: u32 = 2;

/// The two rungs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rung {
    /// The gRPC server stream over HTTP/2.
    Grpc,
    /// HTTPS long-polling.
    Longpoll,
}

impl Rung {
    /// The name used in logs, metrics and `ctl agents`.
    pub fn name(self) -> &'static str {
        match self {
            Rung::Grpc => "grpc",
            Rung::Longpoll => "longpoll",
        }
    }
}

/// Settings of the ladder.
#[derive(Clone, Copy, Debug)]
pub struct LadderConfig {
    /// False pins the starting rung (modes `grpc` and `longpoll`).
    pub auto: bool,
    /// The starting rung.
    pub start: Rung,
    /// First wait before probing gRPC again from long-poll.
    pub probe_initial: Duration,
    /// Longest wait between probes.
    pub probe_max: Duration,
}

/// How a gRPC stream ended, as the ladder needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// It failed before delivering any frame.
    BeforeFirstFrame,
    /// It delivered frames, among them this many heartbeats.
    After { heartbeats: u32 },
}

/// What the session should do after a gRPC failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// Stay on gRPC and retry with backoff.
    Stay,
    /// Switch to long-poll now, for this reason.
    Fall(String),
}

/// The ladder's state.
#[derive(Clone, Debug)]
pub struct Ladder {
    cfg: LadderConfig,
    rung: Rung,
    reason: String,
    early_deaths: u32,
    probe_interval: Duration,
    next_probe: Option<Instant>,
    switches: u64,
    code: &'static str,
    /// The last fall was [`Ladder::grpc_broken`], after this probe interval.
    broken_before: bool,
    last_broken_interval: Duration,
}

/// True when a failure says HTTP/2 itself is the problem.
fn blames_h2(e: &CallError) -> bool {
    match e.kind {
        FailureKind::NoH2 => true,
        // A stream cut or reset by something in the path before the first
        // frame: the backend always sends a heartbeat first.
        FailureKind::Other => true,
        FailureKind::Status(code) => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        ),
        FailureKind::Dns
        | FailureKind::Refused
        | FailureKind::Unreachable
        | FailureKind::Timeout
        | FailureKind::Tls
        | FailureKind::Proxy { .. } => false,
    }
}

impl Ladder {
    /// A ladder on its starting rung.
    pub fn new(cfg: LadderConfig) -> Self {
        let reason = match (cfg.auto, cfg.start) {
            (true, _) => "auto: starting on the gRPC stream".to_string(),
            (false, r) => format!("configured (--transport {})", r.name()),
        };
        Ladder {
            rung: if cfg.auto { Rung::Grpc } else { cfg.start },
            cfg,
            reason,
            early_deaths: 0,
            probe_interval: cfg.probe_initial,
            next_probe: None,
            switches: 0,
            code: if cfg.auto { "auto_start" } else { "configured" },
            broken_before: false,
            last_broken_interval: cfg.probe_initial,
        }
    }

    /// The current rung.
    pub fn rung(&self) -> Rung {
        self.rung
    }

    /// Why the agent is on it.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// A short code for the reason, for metrics.
    pub fn reason_code(&self) -> &'static str {
        self.code
    }

    /// Rung switches so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// When the next probe of gRPC is due (on long-poll in auto mode).
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe
    }

    /// A gRPC stream or connection attempt failed.
    pub fn grpc_failed(&mut self, e: &CallError, end: StreamEnd, now: Instant, unit: f64) -> Move {
        if !self.cfg.auto || self.rung != Rung::Grpc {
            return Move::Stay;
        }
        let reason = match end {
            StreamEnd::BeforeFirstFrame if blames_h2(e) => {
                self.code = "h2_blocked";
                Some(format!("HTTP/2 cannot pass: {e}"))
            }
            StreamEnd::BeforeFirstFrame => None,
            StreamEnd::After { heartbeats } if heartbeats < EARLY_HEARTBEATS && blames_h2(e) => {
                self.early_deaths += 1;
                if self.early_deaths >= EARLY_DEATHS {
                    self.code = "early_deaths";
                }
                (self.early_deaths >= EARLY_DEATHS).then(|| {
                    format!(
                        "{} streams in a row died before {EARLY_HEARTBEATS} heartbeats (last: {e})",
                        self.early_deaths
                    )
                })
            }
            StreamEnd::After { .. } => {
                self.early_deaths = 0;
                None
            }
        };
        match reason {
            Some(r) => {
                self.fall(r.clone(), now, unit);
                Move::Fall(r)
            }
            None => Move::Stay,
        }
    }

    /// gRPC does not work end to end although its stream does (`why`).
    pub fn grpc_broken(&mut self, why: &str, now: Instant, unit: f64) -> Move {
        if !self.cfg.auto || self.rung != Rung::Grpc {
            return Move::Stay;
        }
        // The stream will deliver frames again at the next probe: back off
        // from it rather than probing at the first interval every time.
        let again = self.code == "probe_ok" && self.broken_before;
        self.code = "grpc_broken";
        self.fall(why.to_string(), now, unit);
        if again {
            self.probe_interval = (self.last_broken_interval * 2).min(self.cfg.probe_max);
            self.next_probe = Some(now + jitter(self.probe_interval, unit));
        }
        self.broken_before = true;
        self.last_broken_interval = self.probe_interval;
        Move::Fall(why.to_string())
    }

    fn fall(&mut self, reason: String, now: Instant, unit: f64) {
        if self.code != "grpc_broken" {
            self.broken_before = false;
        }
        self.rung = Rung::Longpoll;
        self.reason = format!("auto: on long-poll since {reason}");
        self.early_deaths = 0;
        self.probe_interval = self.cfg.probe_initial;
        self.next_probe = Some(now + jitter(self.probe_interval, unit));
        self.switches += 1;
    }

    /// A probe of gRPC (from long-poll) ended.
    pub fn probe_result(&mut self, ok: bool, now: Instant, unit: f64) {
        if self.rung != Rung::Longpoll || !self.cfg.auto {
            return;
        }
        if ok {
            self.rung = Rung::Grpc;
            self.reason = "auto: back on the gRPC stream (a probe delivered a heartbeat)".into();
            self.code = "probe_ok";
            self.next_probe = None;
            self.early_deaths = 0;
            self.switches += 1;
        } else {
            self.probe_interval = (self.probe_interval * 2).min(self.cfg.probe_max);
            self.next_probe = Some(now + jitter(self.probe_interval, unit));
        }
    }
}

/// `d` spread uniformly over [0.75 d, 1.25 d].
pub fn jitter(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.75 + unit.clamp(0.0, 1.0) * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LadderConfig {
        LadderConfig {
            auto: true,
            start: Rung::Grpc,
            probe_initial: Duration::from_secs(60),
            probe_max: Duration::from_secs(900),
        }
    }

    fn err(kind: FailureKind) -> CallError {
        CallError {
            kind,
            message: "x".into(),
        }
    }

    #[test]
    fn h2_failures_before_the_first_frame_make_it_fall_at_once() {
        let now = Instant::now();
        for kind in [
            FailureKind::NoH2,
            FailureKind::Other,
            FailureKind::Status(tonic::Code::Unavailable),
        ] {
            let mut l = Ladder::new(cfg());
            assert_eq!(l.rung(), Rung::Grpc);
            assert!(matches!(
                l.grpc_failed(&err(kind), StreamEnd::BeforeFirstFrame, now, 0.5),
                Move::Fall(_)
            ));
            assert_eq!(l.rung(), Rung::Longpoll);
            assert!(l.reason().contains("HTTP/2 cannot pass"), "{}", l.reason());
            assert_eq!(l.next_probe(), Some(now + Duration::from_secs(60)));
        }
    }

    #[test]
    fn errors_that_fail_every_rung_never_make_it_fall() {
        let now = Instant::now();
        let mut l = Ladder::new(cfg());
        for kind in [
            FailureKind::Dns,
            FailureKind::Refused,
            FailureKind::Unreachable,
            FailureKind::Timeout,
            FailureKind::Tls,
            FailureKind::Proxy { operator: true },
            FailureKind::Proxy { operator: false },
            FailureKind::Status(tonic::Code::Unauthenticated),
        ] {
            for _ in 0..5 {
                assert_eq!(
                    l.grpc_failed(&err(kind), StreamEnd::BeforeFirstFrame, now, 0.5),
                    Move::Stay
                );
            }
        }
        assert_eq!(l.rung(), Rung::Grpc);
    }

    #[test]
    fn repeated_early_deaths_fall_but_long_lived_streams_do_not() {
        let now = Instant::now();
        let mut l = Ladder::new(cfg());
        let e = err(FailureKind::Other);
        let cut = |l: &mut Ladder, heartbeats| {
            l.grpc_failed(&e, StreamEnd::After { heartbeats }, now, 0.5)
        };
        // Streams cut at a fixed age of 60 s: healthy enough, stay.
        for _ in 0..10 {
            assert_eq!(cut(&mut l, 6), Move::Stay);
        }
        assert_eq!(cut(&mut l, 0), Move::Stay);
        // A long-lived one in between resets the count.
        assert_eq!(cut(&mut l, 60), Move::Stay);
        assert_eq!(cut(&mut l, 0), Move::Stay);
        assert!(matches!(cut(&mut l, 0), Move::Fall(_)));
    }

    #[test]
    fn probes_back_off_with_jitter_then_climb_back() {
        let t0 = Instant::now();
        let mut l = Ladder::new(cfg());
        l.grpc_failed(
            &err(FailureKind::NoH2),
            StreamEnd::BeforeFirstFrame,
            t0,
            0.0,
        );
        assert_eq!(l.next_probe(), Some(t0 + Duration::from_secs(45)));
        let mut intervals = Vec::new();
        for _ in 0..6 {
            l.probe_result(false, t0, 0.5);
            intervals.push((l.next_probe().unwrap() - t0).as_secs());
        }
        assert_eq!(intervals, [120, 240, 480, 900, 900, 900]);
        l.probe_result(true, t0, 0.5);
        assert_eq!(l.rung(), Rung::Grpc);
        assert_eq!(l.switches(), 2);
        assert!(l.next_probe().is_none());
        assert!(l.reason().contains("back on the gRPC stream"));
    }

    #[test]
    fn grpc_broken_end_to_end_falls_and_backs_off_from_probing_it_again() {
        let t0 = Instant::now();
        let mut l = Ladder::new(cfg());
        assert!(matches!(
            l.grpc_broken("no trailers", t0, 0.5),
            Move::Fall(_)
        ));
        assert_eq!(l.rung(), Rung::Longpoll);
        assert_eq!(l.reason_code(), "grpc_broken");
        assert_eq!(l.next_probe(), Some(t0 + Duration::from_secs(60)));
        // Each probe's stream works, and the calls beside it break again.
        let mut waits = Vec::new();
        for _ in 0..5 {
            l.probe_result(true, t0, 0.5);
            assert_eq!(l.rung(), Rung::Grpc);
            l.grpc_broken("no trailers", t0, 0.5);
            waits.push((l.next_probe().unwrap() - t0).as_secs());
        }
        assert_eq!(waits, [120, 240, 480, 900, 900]);
        // Another kind of fall starts over.
        l.probe_result(true, t0, 0.5);
        l.grpc_failed(
            &err(FailureKind::NoH2),
            StreamEnd::BeforeFirstFrame,
            t0,
            0.5,
        );
        assert_eq!(l.next_probe(), Some(t0 + Duration::from_secs(60)));
        // Pinned to gRPC, it stays.
        let mut pinned = Ladder::new(LadderConfig {
            auto: false,
            ..cfg()
        });
        assert_eq!(pinned.grpc_broken("no trailers", t0, 0.5), Move::Stay);
        assert_eq!(pinned.rung(), Rung::Grpc);
    }

    #[test]
    fn pinned_modes_never_move() {
        let now = Instant::now();
        for start in [Rung::Grpc, Rung::Longpoll] {
            let mut l = Ladder::new(LadderConfig {
                auto: false,
                start,
                ..cfg()
            });
            assert_eq!(
                l.grpc_failed(
                    &err(FailureKind::NoH2),
                    StreamEnd::BeforeFirstFrame,
                    now,
                    0.5
                ),
                Move::Stay
            );
            assert_eq!(l.rung(), start);
            assert!(l.reason().starts_with("configured"));
        }
    }
}
