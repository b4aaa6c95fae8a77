//! `uplink doctor`: walks the path from this host to the backend one hop at
//! a time and prints a verdict per step, then which rung an agent would use
//! and why. The output is meant to be pasted into a support ticket: it
//! carries no secret (proxy URLs lose their userinfo, tokens never appear).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Uri;

use crate::client::{CallError, ConnectClient, FailureKind};
use crate::grpc_path::GrpcPath;
use crate::net::{Alpn, ConnectError, Net, Route};
use crate::proto;
use crate::secret::Secret;

/// What `doctor` checks.
#[derive(Clone, Debug)]
pub struct DoctorConfig {
    /// The backend.
    pub backend: Uri,
    /// Connection settings (trust and proxy).
    pub trust: crate::tls::Trust,
    /// Proxy settings.
    pub proxy: crate::net::ProxySettings,
    /// An enrolled agent's state dir: with its credential the stream and
    /// the poll are opened for real.
    pub state_dir: Option<PathBuf>,
}

/// The verdict of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// The report: lines, and whether any rung works.
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    /// The rung an agent in auto mode would use, if any works.
    pub rung: Option<&'static str>,
}

impl Report {
    fn step(&mut self, v: Verdict, name: &str, detail: impl AsRef<str>) {
        let tag = match v {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        };
        let _ = writeln!(self.text, "  [{tag}] {name:<9} {}", detail.as_ref());
    }
}

/// Runs every check. Never fails: problems are verdicts.
pub async fn run(cfg: DoctorConfig) -> Report {
    let mut r = Report::default();
    let _ = writeln!(
        r.text,
        "uplink doctor {} -> {}",
        crate::VERSION,
        cfg.backend
    );
    let host = cfg
        .backend
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = cfg.backend.port_u16().unwrap_or(443);

    // Trust.
    let tls = match crate::tls::client_config(&cfg.trust) {
        Ok(t) => {
            let extra = if cfg.trust.ca_files.is_empty() {
                "OS trust store".to_string()
            } else {
                format!(
                    "OS trust store + {}",
                    cfg.trust
                        .ca_files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            r.step(Verdict::Ok, "trust", extra);
            t
        }
        Err(e) => {
            r.step(Verdict::Fail, "trust", e.to_string());
            r.text
                .push_str("verdict: no rung can work until the trust settings are fixed\n");
            return r;
        }
    };
    let problems = cfg.proxy.validate();
    if !problems.is_empty() {
        r.step(Verdict::Fail, "proxy", problems.join("; "));
        r.text
            .push_str("verdict: no rung can work until the proxy settings are fixed\n");
        return r;
    }
    let net = Net::new(tls, cfg.proxy.clone());
    let route = net.route(&cfg.backend);

    // DNS, as this host sees it.
    match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            r.step(
                Verdict::Ok,
                "dns",
                format!("{host} -> {}", addrs.join(", ")),
            );
        }
        Err(e) => {
            let v = if matches!(route, Route::Proxy(_)) {
                Verdict::Warn
            } else {
                Verdict::Fail
            };
            let note = if v == Verdict::Warn {
                " (the proxy resolves it, so this may be fine)"
            } else {
                ""
            };
            r.step(v, "dns", format!("{host}: {e}{note}"));
        }
    }
    match &route {
        Route::Proxy(p) => r.step(
            Verdict::Ok,
            "proxy",
            format!("{p} (from {})", cfg.proxy.source),
        ),
        Route::Direct(why) => r.step(Verdict::Ok, "proxy", format!("direct: {why}")),
    }

    // Connect, tunnel, TLS, ALPN: one connection offering both protocols.
    let started = Instant::now();
    let conn = net.connector(Alpn::Any).connect(&cfg.backend).await;
    let h2_passes = match conn {
        Ok(c) => {
            if c.via_proxy {
                r.step(
                    Verdict::Ok,
                    "connect",
                    format!("the proxy opened a tunnel to {host}:{port}"),
                );
            } else {
                r.step(Verdict::Ok, "connect", format!("TCP to {host}:{port}"));
            }
            let chain = c.peer_certificates().unwrap_or(&[]);
            let issuer = chain
                .first()
                .and_then(crate::tls::issuer_of)
                .unwrap_or_else(|| "(unknown)".into());
            let subject = chain
                .first()
                .and_then(crate::tls::subject_of)
                .unwrap_or_else(|| "(unknown)".into());
            r.step(
                Verdict::Ok,
                "tls",
                format!(
                    "verified: certificate \"{subject}\" issued by \"{issuer}\" ({:.0?})",
                    started.elapsed()
                ),
            );
            let alpn = c
                .alpn
                .as_deref()
                .map(|a| String::from_utf8_lossy(a).into_owned());
            match alpn.as_deref() {
                Some("h2") => {
                    r.step(
                        Verdict::Ok,
                        "alpn",
                        "the server side chose h2: HTTP/2 can pass",
                    );
                    true
                }
                other => {
                    let got = other
                        .map(|g| format!("{g:?}"))
                        .unwrap_or_else(|| "no protocol".into());
                    let hint = if c.via_proxy {
                        " (a TLS-intercepting proxy that speaks only HTTP/1.1 is the likely cause)"
                    } else {
                        ""
                    };
                    r.step(
                        Verdict::Warn,
                        "alpn",
                        format!("the server side chose {got}, not h2: HTTP/2 cannot pass{hint}"),
                    );
                    false
                }
            }
        }
        Err(e) => {
            let step = match &e {
                ConnectError::Dns { .. } => "dns",
                ConnectError::Tcp { .. } | ConnectError::Timeout(..) | ConnectError::BadUri(_) => {
                    "connect"
                }
                ConnectError::Proxy(_) => "connect",
                ConnectError::Tls { .. } => "tls",
                ConnectError::NoH2 { .. }
                | ConnectError::NoH2Answer { .. }
                | ConnectError::NoH2Refused { .. } => "alpn",
            };
            r.step(Verdict::Fail, step, e.to_string());
            r.text.push_str("verdict: no rung works: the failure above happens before any HTTP, so both rungs meet it\n");
            return r;
        }
    };

    // The credential of an enrolled agent, if one was pointed at.
    let credential = cfg
        .state_dir
        .as_ref()
        .and_then(|d| crate::agent::identity::load(d).ok().flatten())
        .map(|i| Secret::new(i.credential));
    let cred_note = if credential.is_some() {
        ""
    } else {
        " (no --state-dir credential: checked up to the backend's answer)"
    };

    // gRPC rung, as the agent opens it: a handshake offering only h2, the
    // stream, and (with a credential) one `Report` and one `PushMetrics`
    // on the same connection. The handshake above offered both protocols,
    // which a server with HTTP/2 off answers differently.
    let grpc = grpc_check(&cfg.backend, &net, credential.as_ref()).await;
    match &grpc {
        Ok(d) => r.step(Verdict::Ok, "grpc", format!("{d}{cred_note}")),
        Err(d) if !h2_passes => r.step(Verdict::Warn, "grpc", d),
        Err(d) => r.step(Verdict::Fail, "grpc", d),
    }
    // Long-poll rung.
    let poll = poll_check(&cfg.backend, &net, credential.as_ref()).await;
    match &poll {
        Ok(d) => r.step(Verdict::Ok, "longpoll", format!("{d}{cred_note}")),
        Err(d) => r.step(Verdict::Fail, "longpoll", d),
    }
    let verdict = match (&grpc, &poll) {
        (Ok(_), _) => {
            r.rung = Some("grpc");
            "an agent in auto mode would use the gRPC stream: HTTP/2 passes end to end".to_string()
        }
        (Err(g), Ok(_)) => {
            r.rung = Some("longpoll");
            format!(
                "an agent in auto mode would use long-polling: the gRPC stream does not work ({g})"
            )
        }
        (Err(_), Err(_)) => "no rung works: see the failures above".to_string(),
    };
    let _ = writeln!(r.text, "verdict: {verdict}");
    r
}

async fn grpc_check(
    backend: &Uri,
    net: &Net,
    credential: Option<&Secret>,
) -> Result<String, String> {
    let started = Instant::now();
    let channel = crate::client::grpc_channel(
        backend,
        net,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.message)?;
    let path = GrpcPath::new(channel);
    let end_to_end = path.end_to_end();
    let client = proto::agent_service_client::AgentServiceClient::new(path);
    // Ack 0 changes nothing at the backend (acks never go back); commands
    // the stream may carry are ignored here and stay unacknowledged, so the
    // agent still gets them.
    let req = authed(
        credential,
        proto::SubscribeRequest {
            ack: 0,
            ..Default::default()
        },
    );
    let work = async {
        match client.clone().subscribe(req).await {
            Ok(resp) => {
                let mut s = resp.into_inner();
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err("the stream ended before its first frame".to_string()),
                    Err(st) => return Err(CallError::from_tonic(&st).message),
                }
                let first = started.elapsed();
                // The unary calls an agent makes beside its stream, which
                // store nothing: a report without events and an empty
                // metric batch, in an epoch of their own. Their answers
                // must arrive whole (with their trailers).
                let epoch = fastrand::u64(1..1 << 53);
                let report = client
                    .clone()
                    .report(authed(
                        credential,
                        proto::ReportRequest {
                            epoch,
                            ..Default::default()
                        },
                    ))
                    .await;
                let push = client
                    .clone()
                    .push_metrics(authed(
                        credential,
                        proto::PushMetricsRequest {
                            epoch,
                            seq: 1,
                            batch: Some(proto::MetricBatch::default()),
                            ..Default::default()
                        },
                    ))
                    .await;
                if end_to_end.trailerless() > 0 {
                    return Err("the stream opened, but the answers to `Report` and `PushMetrics` arrived without their gRPC trailers (grpc-status): something in the path forwards gRPC as HTTP/1.1 (an ingress with proxy_pass instead of grpc_pass); an agent would fall to long-polling".to_string());
                }
                for (call, answer) in [("Report", report.err()), ("PushMetrics", push.err())] {
                    if let Some(st) = answer {
                        return Err(format!(
                            "the stream opened, but `{call}` failed: {}",
                            CallError::from_tonic(&st)
                        ));
                    }
                }
                Ok(format!(
                    "stream opened, first heartbeat after {first:.0?}; `Report` and `PushMetrics` answered on the same connection ({:.0?})",
                    started.elapsed()
                ))
            }
            Err(st) => {
                let e = CallError::from_tonic(&st);
                if credential.is_none()
                    && e.kind == FailureKind::Status(tonic::Code::Unauthenticated)
                {
                    Ok(format!(
                        "HTTP/2 reached the backend's gRPC service ({:.0?})",
                        started.elapsed()
                    ))
                } else {
                    Err(e.message)
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(8), work)
        .await
        .unwrap_or_else(|_| Err("no answer on the stream within 8s".into()))
}

/// A request carrying `credential`, if any.
fn authed<T>(credential: Option<&Secret>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(c) = credential
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", c.expose()))
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

async fn poll_check(
    backend: &Uri,
    net: &Net,
    credential: Option<&Secret>,
) -> Result<String, String> {
    let started = Instant::now();
    let mut client = ConnectClient::new(backend, net);
    if let Some(c) = credential {
        client = client.with_auth(c.clone());
    }
    let req = proto::PollRequest {
        ack: 0,
        hold_ms: 1,
        info: None,
    };
    match client
        .call::<_, proto::PollResponse>(
            "uplink.v1.AgentService",
            "Poll",
            &req,
            Duration::from_secs(10),
        )
        .await
    {
        Ok(_) => Ok(format!("Poll round trip in {:.0?}", started.elapsed())),
        Err(e)
            if credential.is_none()
                && e.kind == FailureKind::Status(tonic::Code::Unauthenticated) =>
        {
            Ok(format!(
                "HTTP/1.1 reached the backend's Connect endpoint ({:.0?})",
                started.elapsed()
            ))
        }
        Err(e) => Err(e.message),
    }
}
