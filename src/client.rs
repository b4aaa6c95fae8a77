//! HTTPS clients for both rungs and for `ctl`, over one [`Net`] (rustls
//! configuration and proxy settings): a tonic channel for the gRPC rung
//! (ALPN `h2`), and a Connect unary client (ALPN `http/1.1`, keep-alive)
//! for the long-poll rung and the admin API. Also the classification of
//! failures into what a person can act on.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::Code;

use crate::connect::{self, Encoding};
use crate::net::{Alpn, ConnectError, Connector, Net, ProxyError};
use crate::proto::Named;
use crate::secret::Secret;

/// Checks a backend URL: `https://host[:port]`.
pub fn parse_backend_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("backend URL {s:?} is not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("backend URL {s:?} has no host; expected https://HOST[:PORT]"))?;
    if uri
        .authority()
        .map(|a| a.as_str().contains('@'))
        .unwrap_or(false)
    {
        return Err(format!(
            "backend URL {:?} carries credentials; agents authenticate with --token instead",
            crate::secret::redact_url(s)
        ));
    }
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(format!(
                "backend URL {s:?} is plain http; the backend speaks only TLS: use https://"
            ));
        }
        _ => return Err(format!("backend URL {s:?} must start with https://")),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "backend URL {s:?} has a path; give only https://HOST[:PORT]"
        ));
    }
    let text = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map(|a| a.as_str()).unwrap_or(host)
    );
    text.parse().map_err(|e| format!("backend URL {s:?}: {e}"))
}

/// What kind of failure a call met: decides the log line and the retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The backend's name did not resolve.
    Dns,
    /// Nothing listens at the address.
    Refused,
    /// The address cannot be reached (no route, reset, no address).
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The TLS handshake failed (trust, protocol).
    Tls,
    /// The proxy refused or failed the tunnel; `operator` when only the
    /// operator can fix it (credentials, policy).
    Proxy { operator: bool },
    /// The path does not carry HTTP/2 (ALPN not h2, h2 handshake failed,
    /// stream cut before its first frame).
    NoH2,
    /// The backend answered with an error status.
    Status(Code),
    /// The connection broke or the protocol failed.
    Other,
}

/// A failed call, with a message a person can act on.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub kind: FailureKind,
    pub message: String,
}

impl CallError {
    /// From a status the backend sent.
    pub fn status(s: &tonic::Status) -> Self {
        CallError {
            kind: FailureKind::Status(s.code()),
            message: format!("{}: {}", connect::code_name(s.code()), s.message()),
        }
    }

    /// From a transport error, classified by walking its causes.
    pub fn transport(err: &(dyn StdError + 'static)) -> Self {
        let message = describe(err);
        let mut kind = FailureKind::Other;
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(c) = e.downcast_ref::<ConnectError>() {
                kind = match c {
                    ConnectError::Dns { .. } => FailureKind::Dns,
                    ConnectError::Tcp { source, .. } => match source.kind() {
                        std::io::ErrorKind::ConnectionRefused => FailureKind::Refused,
                        std::io::ErrorKind::TimedOut => FailureKind::Timeout,
                        // Unreachable hosts and networks, resets by the
                        // proxy, names without addresses: every rung
                        // meets them alike.
                        _ => FailureKind::Unreachable,
                    },
                    ConnectError::Proxy(p) => FailureKind::Proxy {
                        operator: p.needs_operator(),
                    },
                    // A certificate or protocol verdict of rustls is about
                    // trust; a connection cut in the middle of the handshake
                    // is about the path (a proxy that does not like what it
                    // sees, e.g. ALPN h2).
                    ConnectError::Tls { source, .. } => {
                        if source.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                            FailureKind::Tls
                        } else {
                            FailureKind::Other
                        }
                    }
                    ConnectError::NoH2 { .. }
                    | ConnectError::NoH2Answer { .. }
                    | ConnectError::NoH2Refused { .. } => FailureKind::NoH2,
                    ConnectError::Timeout(..) => FailureKind::Timeout,
                    ConnectError::BadUri(_) => FailureKind::Other,
                };
                return CallError { kind, message };
            }
            if e.is::<crate::grpc_path::Intermediary>() {
                // The ingress is up, the backend behind it is not: every
                // rung meets that alike.
                return CallError {
                    kind: FailureKind::Unreachable,
                    message,
                };
            }
            if let Some(p) = e.downcast_ref::<ProxyError>() {
                return CallError {
                    kind: FailureKind::Proxy {
                        operator: p.needs_operator(),
                    },
                    message,
                };
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => kind = FailureKind::Refused,
                    std::io::ErrorKind::TimedOut => kind = FailureKind::Timeout,
                    _ => {}
                }
            }
            if e.downcast_ref::<rustls::Error>().is_some() {
                kind = FailureKind::Tls;
            }
            cur = e.source();
        }
        let lower = message.to_lowercase();
        if kind == FailureKind::Other {
            if lower.contains("dns error") || lower.contains("failed to lookup address") {
                kind = FailureKind::Dns;
            } else if lower.contains("timed out") || lower.contains("deadline has elapsed") {
                kind = FailureKind::Timeout;
            }
        }
        CallError { kind, message }
    }

    /// From a tonic status: the backend's answer, or a transport failure
    /// tonic wrapped.
    pub fn from_tonic(s: &tonic::Status) -> Self {
        match s.source() {
            Some(src) => {
                let mut e = CallError::transport(src);
                if !e.message.contains(s.message()) {
                    e.message = format!("{}: {}", s.message(), e.message);
                }
                e
            }
            None => CallError::status(s),
        }
    }

    /// True for failures no retry will cure without the operator: wrong
    /// credentials or trust.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Tls
                | FailureKind::Status(Code::Unauthenticated)
                | FailureKind::Status(Code::PermissionDenied)
        )
    }

    /// A short label for logs.
    pub fn label(&self) -> &'static str {
        match self.kind {
            FailureKind::Dns => "dns",
            FailureKind::Refused => "refused",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Timeout => "timeout",
            FailureKind::Tls => "tls",
            FailureKind::Proxy { .. } => "proxy",
            FailureKind::NoH2 => "no-h2",
            FailureKind::Status(_) => "status",
            FailureKind::Other => "connection",
        }
    }
}

/// The chain of causes of an error as one line, without repeats.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        // A verifier's own error is the whole story; rustls would print it
        // in debug form.
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) =
            e.downcast_ref::<rustls::Error>()
        {
            parts.push(format!("TLS: {}", o.0));
            break;
        }
        let s = e.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        // A connection error already tells its whole story.
        if e.downcast_ref::<ConnectError>().is_some() {
            break;
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// A Connect unary client (HTTP/1.1 with keep-alive).
#[derive(Clone)]
pub struct ConnectClient {
    client: Client<Connector, Full<Bytes>>,
    base: String,
    auth: Option<Secret>,
    encoding: Encoding,
}

impl ConnectClient {
    /// A client for the backend at `base` (HTTP/1.1, keep-alive).
    pub fn new(base: &Uri, net: &Net) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(4)
            .build(net.connector(Alpn::Http1));
        ConnectClient {
            client,
            base: base.to_string().trim_end_matches('/').to_string(),
            auth: None,
            encoding: Encoding::Proto,
        }
    }

    /// Sends `authorization: Bearer <secret>` on every call.
    pub fn with_auth(mut self, secret: Secret) -> Self {
        self.auth = Some(secret);
        self
    }

    /// Uses JSON bodies instead of binary protobuf.
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Calls `/<service>/<method>`, waiting at most `timeout`.
    pub async fn call<Req: Named, Resp: Named>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        self.call_encoded(service, method, req, timeout, false)
            .await
    }

    /// Like [`ConnectClient::call`], with the request body compressed with
    /// zstd (`Content-Encoding: zstd`) when `zstd` is set.
    pub async fn call_encoded<Req: Named, Resp: Named>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
        zstd: bool,
    ) -> Result<Resp, CallError> {
        let mut body = match self.encoding {
            Encoding::Proto => req.encode_to_vec(),
            Encoding::Json => crate::proto::to_json(req).map_err(|e| CallError {
                kind: FailureKind::Other,
                message: e.to_string(),
            })?,
        };
        let mut b = http::Request::post(format!("{}/{service}/{method}", self.base))
            .header(http::header::CONTENT_TYPE, self.encoding.content_type())
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", timeout.as_millis().to_string());
        if zstd {
            body = crate::metrics::compress::Compression::Zstd
                .compress(&body)
                .map_err(|e| CallError {
                    kind: FailureKind::Other,
                    message: format!("compressing the request: {e}"),
                })?;
            b = b.header(http::header::CONTENT_ENCODING, "zstd");
        }
        if let Some(a) = &self.auth {
            b = b.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", a.expose()),
            );
        }
        let request = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CallError {
                kind: FailureKind::Other,
                message: format!("building request: {e}"),
            })?;
        let work = async {
            let resp = self
                .client
                .request(request)
                .await
                .map_err(|e| CallError::transport(&e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::transport(&e))?
                .to_bytes();
            if status != http::StatusCode::OK {
                return Err(CallError::status(&connect::parse_error(status, &bytes)));
            }
            match self.encoding {
                Encoding::Proto => Resp::decode(bytes).map_err(|e| CallError {
                    kind: FailureKind::Other,
                    message: format!("backend sent an invalid {}: {e}", Resp::FULL_NAME),
                }),
                Encoding::Json => crate::proto::from_json(&bytes).map_err(|e| CallError {
                    kind: FailureKind::Other,
                    message: format!("backend sent invalid JSON: {e}"),
                }),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError {
                kind: FailureKind::Timeout,
                message: format!("no answer from {} within {timeout:?}", self.base),
            }),
        }
    }
}

/// Opens a gRPC channel (HTTP/2 over TLS, ALPN `h2`) with keepalive pings
/// every `keepalive`, and declares the connection dead when a ping is not
/// answered within `keepalive_timeout`.
pub async fn grpc_channel(
    base: &Uri,
    net: &Net,
    keepalive: Duration,
    keepalive_timeout: Duration,
) -> Result<tonic::transport::Channel, CallError> {
    tonic::transport::Endpoint::from(base.clone())
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_with_connector(net.connector(Alpn::H2))
        .await
        .map_err(|e| CallError::transport(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls_are_checked() {
        assert_eq!(
            parse_backend_url("https://backend.example:8443/")
                .unwrap()
                .to_string(),
            "https://backend.example:8443/"
        );
        let e = parse_backend_url("http://backend.example").unwrap_err();
        assert!(e.contains("plain http"), "{e}");
        let e = parse_backend_url("https://u:secretpw@backend.example").unwrap_err();
        assert!(!e.contains("secretpw"), "{e}");
        assert!(parse_backend_url("ftp://x").is_err());
        assert!(
            parse_backend_url("https://x/api")
                .unwrap_err()
                .contains("path")
        );
        assert!(parse_backend_url("not a url").is_err());
    }

    #[test]
    fn io_errors_are_classified() {
        let e = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(CallError::transport(&e).kind, FailureKind::Refused);
        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        assert_eq!(CallError::transport(&e).kind, FailureKind::Timeout);
    }
}
