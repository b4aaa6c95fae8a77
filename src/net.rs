//! Outbound connections, the same for every rung and for `ctl`/`doctor`:
//! DNS, TCP, an optional HTTP CONNECT tunnel through a proxy, then TLS with
//! the rung's ALPN, checked.
//!
//! Proxy selection uses hyper-util's [`Matcher`] (curl semantics for
//! `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY` with domains, IPs, CIDR ranges
//! and `*`; userinfo percent-decoded into Basic auth). The CONNECT
//! handshake is our own rather than hyper-util's `Tunnel`, because an
//! operator needs what `Tunnel` folds into "unsuccessful": the proxy's
//! status, and on 407 the auth scheme it asked for.
//!
//! Each failure is a [`ConnectError`] that says which hop failed, so that
//! callers can tell errors that fail every rung (DNS, proxy, trust) from
//! the one that means HTTP/2 cannot pass ([`ConnectError::NoH2`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::secret::redact_url;

/// Time allowed for DNS, TCP, CONNECT and TLS together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake of the gRPC rung once TCP (and the
/// proxy's tunnel) are up; silence past it means HTTP/2 is swallowed.
pub const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);

/// Which HTTP version a connection offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` only, and the server must pick it: the gRPC rung.
    H2,
    /// `http/1.1` only: the long-poll rung and `ctl`.
    Http1,
    /// Both, server's choice (`doctor` uses it to see what the path offers).
    Any,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Any => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// Proxy settings: flags win over the environment.
#[derive(Clone, Debug, Default)]
pub struct ProxySettings {
    /// `--proxy`, else `HTTPS_PROXY`/`https_proxy`, else `ALL_PROXY`/`all_proxy`.
    pub proxy: Option<String>,
    /// Where `proxy` came from, for messages.
    pub source: &'static str,
    /// `--no-proxy`, else `NO_PROXY`/`no_proxy`.
    pub no_proxy: String,
}

fn env_first(names: &[&'static str]) -> Option<(String, &'static str)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (v.trim().to_string(), *n))
    })
}

impl ProxySettings {
    /// From the flags, falling back to the environment.
    pub fn from_flags_and_env(proxy: Option<String>, no_proxy: Option<String>) -> Self {
        let (proxy, source) = match proxy.filter(|p| !p.trim().is_empty()) {
            Some(p) => (Some(p), "--proxy"),
            None => match env_first(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]) {
                Some((p, name)) => (Some(p), name),
                None => (None, ""),
            },
        };
        let no_proxy = no_proxy
            .or_else(|| env_first(&["NO_PROXY", "no_proxy"]).map(|(v, _)| v))
            .unwrap_or_default();
        ProxySettings {
            proxy,
            source,
            no_proxy,
        }
    }

    /// No proxy at all.
    pub fn direct() -> Self {
        ProxySettings::default()
    }

    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let Some(p) = &self.proxy else { return vec![] };
        let shown = redact_url(p);
        let with_scheme = if p.contains("://") {
            p.clone()
        } else {
            format!("http://{p}")
        };
        let uri: Uri = match with_scheme.parse() {
            Ok(u) => u,
            Err(e) => {
                return vec![format!(
                    "{}: proxy {shown:?} is not a URL: {e}",
                    self.source
                )];
            }
        };
        let mut errs = Vec::new();
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => errs.push(format!(
                "{}: proxy {shown:?} uses https://, TLS to the proxy itself, which uplink does not support; \
                 use the proxy's http:// address (the tunnel to the backend is TLS end to end anyway)",
                self.source
            )),
            Some(s) if s.starts_with("socks") => errs.push(format!(
                "{}: proxy {shown:?} is a SOCKS proxy, which uplink does not support; give an HTTP CONNECT proxy (http://host:port)",
                self.source
            )),
            Some(s) => errs.push(format!("{}: proxy {shown:?} has unknown scheme {s:?}; use http://host:port", self.source)),
            None => {}
        }
        if uri.host().is_none() {
            errs.push(format!("{}: proxy {shown:?} has no host", self.source));
        }
        errs
    }

    fn matcher(&self) -> Matcher {
        let mut b = Matcher::builder().no(self.no_proxy.clone());
        if let Some(p) = &self.proxy {
            let p = if p.contains("://") {
                p.clone()
            } else {
                format!("http://{p}")
            };
            b = b.all(p);
        }
        b.build()
    }
}

/// How a destination is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight to the destination; the reason is for `doctor` and logs.
    Direct(&'static str),
    /// Through this proxy (userinfo removed).
    Proxy(String),
}

/// A failed connection attempt, by hop.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("DNS: cannot resolve {host}: {source}")]
    Dns { host: String, source: io::Error },
    #[error("TCP: cannot connect to {what} {addr}: {source}")]
    Tcp {
        what: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("TLS handshake with {host} failed: {}", tls_reason(.source))]
    Tls { host: String, source: io::Error },
    #[error(
        "HTTP/2 cannot pass: the server side of the TLS connection chose {}{} instead of h2",
        .got.as_deref().map(|g| format!("ALPN {g:?}")).unwrap_or_else(|| "no ALPN protocol".into()),
        if *.via_proxy { " (through the proxy: likely a TLS-intercepting proxy that speaks only HTTP/1.1)" } else { "" }
    )]
    NoH2 {
        got: Option<String>,
        via_proxy: bool,
    },
    #[error(
        "HTTP/2 cannot pass: a TLS handshake offering only h2 got no answer within {H2_HANDSHAKE_TIMEOUT:?}{}",
        if *.via_proxy { " (through the proxy)" } else { "" }
    )]
    NoH2Answer { via_proxy: bool },
    #[error(
        "HTTP/2 cannot pass: the server{} refused a TLS handshake offering only h2 (alert no_application_protocol: HTTP/2 is off there; an ingress needs `http2` on its TLS listener)",
        if *.via_proxy { " (through the proxy)" } else { "" }
    )]
    NoH2Refused { via_proxy: bool },
    #[error("no connection within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    #[error("invalid destination {0}")]
    BadUri(String),
}

/// The readable reason inside a TLS I/O error: a verifier's own message
/// rather than rustls's debug form of it.
fn tls_reason(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
            o.0.to_string()
        }
        Some(r) => r.to_string(),
        None => e.to_string(),
    }
}

/// True when a TLS handshake ended with the peer's `no_application_protocol`
/// alert: it speaks none of the protocols offered.
fn refused_h2(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// A proxy refused or failed the CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "proxy {proxy} requires authentication (407; it asks for {scheme}){}",
        if *.had_credentials { ": the user or password in the proxy URL was rejected" } else { ": put user:password in the proxy URL (http://user:pass@host:port)" }
    )]
    AuthRequired {
        proxy: String,
        scheme: String,
        had_credentials: bool,
    },
    #[error(
        "proxy {proxy} refused the tunnel to {target} (403 Forbidden): its policy does not allow this destination"
    )]
    Forbidden { proxy: String, target: String },
    #[error("proxy {proxy} could not reach {target} ({status} {reason})")]
    Upstream {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("proxy {proxy} answered the CONNECT to {target} with {status} {reason}")]
    Unexpected {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("proxy {proxy} sent an invalid answer to CONNECT: {what}")]
    Protocol { proxy: String, what: String },
}

impl ProxyError {
    /// True when only the operator can fix it (credentials, policy).
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            ProxyError::AuthRequired { .. } | ProxyError::Forbidden { .. }
        )
    }
}

/// Connection settings shared by every client of one process.
#[derive(Clone)]
pub struct Net {
    tls: Arc<rustls::ClientConfig>,
    proxy: Arc<Matcher>,
    settings: ProxySettings,
}

impl Net {
    /// Builds from a TLS configuration (without ALPN) and proxy settings.
    pub fn new(tls: rustls::ClientConfig, proxy: ProxySettings) -> Self {
        Net {
            tls: Arc::new(tls),
            proxy: Arc::new(proxy.matcher()),
            settings: proxy,
        }
    }

    /// The proxy settings.
    pub fn proxy_settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// How `dst` is reached.
    pub fn route(&self, dst: &Uri) -> Route {
        match self.proxy.intercept(dst) {
            Some(i) => Route::Proxy(redact_url(&i.uri().to_string())),
            None if self.settings.proxy.is_some() => Route::Direct("NO_PROXY matches the backend"),
            None => Route::Direct("no proxy configured"),
        }
    }

    /// A connector offering `alpn`.
    pub fn connector(&self, alpn: Alpn) -> Connector {
        let mut tls = (*self.tls).clone();
        tls.alpn_protocols = alpn.protocols();
        Connector {
            tls: Arc::new(tls),
            proxy: self.proxy.clone(),
            alpn,
        }
    }
}

/// A `tower::Service<Uri>` that opens checked TLS connections.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<rustls::ClientConfig>,
    proxy: Arc<Matcher>,
    alpn: Alpn,
}

/// An established connection.
pub struct TlsConn {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// True when tunneled through a proxy.
    pub via_proxy: bool,
}

impl TlsConn {
    /// The server's certificate chain.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.stream.get_ref().1.peer_certificates()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.alpn.as_deref() == Some(b"h2") {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsConn>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, this.connect(&dst)).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => Err(ConnectError::Timeout(
                    CONNECT_TIMEOUT,
                    "DNS, TCP, proxy and TLS together",
                )),
            }
        })
    }
}

impl Connector {
    /// Connects to `dst` (`https://host[:port]`).
    pub async fn connect(&self, dst: &Uri) -> Result<TlsConn, ConnectError> {
        let host = dst
            .host()
            .ok_or_else(|| ConnectError::BadUri(dst.to_string()))?
            .to_string();
        let port = dst.port_u16().unwrap_or(443);
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (tcp, via_proxy) = match self.proxy.intercept(dst) {
            Some(proxy) => {
                let p = proxy.uri();
                let phost = p
                    .host()
                    .ok_or_else(|| ConnectError::BadUri(p.to_string()))?;
                let pport = p.port_u16().unwrap_or(match p.scheme_str() {
                    Some("https") => 443,
                    _ => 80,
                });
                let shown = redact_url(&p.to_string());
                let tcp = dial(phost, pport, "proxy").await?;
                let tcp = tunnel(tcp, &shown, &host, port, proxy.basic_auth()).await?;
                (tcp, true)
            }
            None => (dial(&host, port, "backend").await?, false),
        };
        let name = rustls::pki_types::ServerName::try_from(bare_host.clone())
            .map_err(|_| ConnectError::BadUri(dst.to_string()))?;
        let handshake = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp);
        let stream = if self.alpn == Alpn::H2 {
            // The path carried TCP (and the tunnel); a TLS handshake that
            // offers only h2 and then hears nothing is a path that swallows
            // HTTP/2, not a slow backend.
            tokio::time::timeout(H2_HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| ConnectError::NoH2Answer { via_proxy })?
        } else {
            handshake.await
        }
        .map_err(|source| {
            // Offered only h2, a server that does not speak it (an ingress
            // with HTTP/2 off) may end the handshake with this alert: the
            // path is fine, HTTP/2 is what cannot pass.
            if self.alpn == Alpn::H2 && refused_h2(&source) {
                ConnectError::NoH2Refused { via_proxy }
            } else {
                ConnectError::Tls {
                    host: host.clone(),
                    source,
                }
            }
        })?;
        let alpn = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        if self.alpn == Alpn::H2 && alpn.as_deref() != Some(b"h2") {
            return Err(ConnectError::NoH2 {
                got: alpn.map(|a| String::from_utf8_lossy(&a).into_owned()),
                via_proxy,
            });
        }
        Ok(TlsConn {
            stream,
            alpn,
            via_proxy,
        })
    }
}

async fn dial(host: &str, port: u16, what: &'static str) -> Result<TcpStream, ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|source| ConnectError::Dns {
            host: bare.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let sock = socket2::SockRef::from(&s);
                let _ = sock.set_tcp_keepalive(
                    &socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(30))
                        .with_interval(Duration::from_secs(10)),
                );
                return Ok(s);
            }
            Err(e) => last = Some((addr.to_string(), e)),
        }
    }
    let (addr, source) = last.unwrap_or_else(|| {
        (
            format!("{bare}:{port}"),
            io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address"),
        )
    });
    Err(ConnectError::Tcp { what, addr, source })
}

/// Opens a CONNECT tunnel to `host:port` over `tcp`.
async fn tunnel(
    mut tcp: TcpStream,
    proxy: &str,
    host: &str,
    port: u16,
    auth: Option<&http::HeaderValue>,
) -> Result<TcpStream, ConnectError> {
    let target = format!("{host}:{port}");
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: uplink/{}\r\n",
        crate::VERSION
    )
    .into_bytes();
    if let Some(a) = auth {
        req.extend_from_slice(b"Proxy-Authorization: ");
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let io_err = |source| ConnectError::Tcp {
        what: "proxy",
        addr: proxy.to_string(),
        source,
    };
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    loop {
        let n = tcp.read(&mut buf[len..]).await.map_err(io_err)?;
        if n == 0 {
            return Err(ProxyError::Protocol {
                proxy: proxy.into(),
                what: "connection closed before the answer to CONNECT".into(),
            }
            .into());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let status = resp.code.unwrap_or(0);
                let reason = resp.reason.unwrap_or("").to_string();
                return match status {
                    200..=299 => Ok(tcp),
                    407 => {
                        let schemes: Vec<String> = resp
                            .headers
                            .iter()
                            .filter(|h| h.name.eq_ignore_ascii_case("proxy-authenticate"))
                            .filter_map(|h| std::str::from_utf8(h.value).ok())
                            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                            .filter(|s| !s.is_empty())
                            .collect();
                        Err(ProxyError::AuthRequired {
                            proxy: proxy.into(),
                            scheme: if schemes.is_empty() {
                                "an unnamed scheme".into()
                            } else {
                                schemes.join(" or ")
                            },
                            had_credentials: auth.is_some(),
                        }
                        .into())
                    }
                    403 => Err(ProxyError::Forbidden {
                        proxy: proxy.into(),
                        target,
                    }
                    .into()),
                    502..=504 => Err(ProxyError::Upstream {
                        proxy: proxy.into(),
                        target,
                        status,
                        reason,
                    }
                    .into()),
                    _ => Err(ProxyError::Unexpected {
                        proxy: proxy.into(),
                        target,
                        status,
                        reason,
                    }
                    .into()),
                };
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ProxyError::Protocol {
                    proxy: proxy.into(),
                    what: "answer headers longer than 8 KiB".into(),
                }
                .into());
            }
            Err(e) => {
                return Err(ProxyError::Protocol {
                    proxy: proxy.into(),
                    what: format!("{e}"),
                }
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server on loopback that speaks only HTTP/1.1 and says so with
    /// ALPN (an ingress with HTTP/2 off), and a `Net` trusting it.
    async fn http1_only_server(dir: &std::path::Path) -> (Uri, Net) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        let tls = crate::tls::client_config(&crate::tls::Trust {
            ca_files: vec![ca_file],
            skip_os_store: true,
        })
        .unwrap();
        let uri = format!("https://127.0.0.1:{}", addr.port())
            .parse()
            .unwrap();
        (uri, Net::new(tls, ProxySettings::direct()))
    }

    #[tokio::test]
    async fn a_server_refusing_h2_with_an_alert_means_http2_cannot_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (uri, net) = http1_only_server(dir.path()).await;
        // Offered only h2, it ends the handshake with no_application_protocol.
        let Err(e) = net.connector(Alpn::H2).connect(&uri).await else {
            panic!("a handshake offering only h2 succeeded");
        };
        assert!(
            matches!(e, ConnectError::NoH2Refused { via_proxy: false }),
            "{e:?}"
        );
        assert!(e.to_string().contains("HTTP/2 cannot pass"), "{e}");
        assert_eq!(
            crate::client::CallError::transport(&e).kind,
            crate::client::FailureKind::NoH2
        );
        // Offered both, it picks HTTP/1.1: the long-poll rung works.
        let c = net.connector(Alpn::Any).connect(&uri).await.unwrap();
        assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[test]
    fn proxy_urls_are_validated_with_clear_messages() {
        let s = |p: &str| ProxySettings {
            proxy: Some(p.into()),
            source: "--proxy",
            no_proxy: String::new(),
        };
        assert!(s("http://proxy:3128").validate().is_empty());
        assert!(s("proxy:3128").validate().is_empty());
        let e = s("https://u:secret@proxy:3128").validate().join(" ");
        assert!(e.contains("https://") && !e.contains("secret"), "{e}");
        assert!(s("socks5://proxy:1080").validate()[0].contains("SOCKS"));
        assert!(!s("http://").validate().is_empty());
    }

    #[test]
    fn routes_follow_no_proxy() {
        // A CA of its own, so the test does not depend on the host's store.
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::tls::server_config(&crate::tls::ServerIdentity::Generated {
            data_dir: dir.path().into(),
            hostnames: vec!["localhost".into()],
        })
        .unwrap()
        .ca_file
        .expect("a generated identity has a CA file");
        let tls = crate::tls::client_config(&crate::tls::Trust {
            ca_files: vec![ca],
            skip_os_store: true,
        })
        .unwrap();
        let net = Net::new(
            tls,
            ProxySettings {
                proxy: Some("http://u:p@proxy.corp:3128".into()),
                source: "--proxy",
                no_proxy: "internal.example, 10.0.0.0/8".into(),
            },
        );
        let r = |u: &str| net.route(&u.parse().unwrap());
        assert_eq!(
            r("https://backend.example:443"),
            Route::Proxy("http://proxy.corp:3128/".into())
        );
        assert_eq!(
            r("https://a.internal.example"),
            Route::Direct("NO_PROXY matches the backend")
        );
        assert_eq!(
            r("https://10.1.2.3:8443"),
            Route::Direct("NO_PROXY matches the backend")
        );
        let direct = Net::new(net.tls.as_ref().clone(), ProxySettings::direct());
        assert_eq!(
            direct.route(&"https://b:1".parse().unwrap()),
            Route::Direct("no proxy configured")
        );
    }
}
