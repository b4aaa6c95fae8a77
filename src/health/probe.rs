//! The backend's port checked from the same host: a TCP connection, a TLS
//! handshake (ALPN `http/1.1`) and one `GET /` whose status line comes
//! back, all within a timeout. Any HTTP status will do: the check is that
//! the port accepts, speaks TLS and answers HTTP, not what it answers.
//!
//! The handshake accepts any certificate (its signature over the
//! handshake is still checked): the check sends nothing secret, to the
//! backend's own port on this host, and must not fail because the
//! backend's certificate names a public host name or comes from a CA this
//! host does not hold. It is the one TLS client in uplink that does not
//! verify the certificate chain, and it only ever says "answered".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Most bytes read looking for the status line and headers.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the port answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// From the connection's start to the status line.
    pub elapsed: Duration,
}

/// Accepts any certificate chain and checks the handshake's signatures
/// with the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration of the check.
fn client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = crate::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous() // The check accepts any certificate: see the module doc.
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![crate::tls::ALPN_HTTP1.to_vec()];
    Ok(cfg)
}

/// Connects to `target`, shakes hands and sends `GET /`, within
/// `timeout`: the answer's status, or what failed, as the end of a
/// sentence that starts with the address ("refused the connection").
pub async fn check(target: SocketAddr, timeout: Duration) -> Result<Answer, String> {
    let started = Instant::now();
    match tokio::time::timeout(timeout, exchange(target, started)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "did not answer within {}",
            crate::units::format_duration(timeout)
        )),
    }
}

async fn exchange(target: SocketAddr, started: Instant) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "refused the connection".to_string(),
            _ => format!("could not be reached: {e}"),
        })?;
    let _ = tcp.set_nodelay(true);
    let cfg = client_config().map_err(|e| format!("(TLS settings: {e})"))?;
    let name = ServerName::IpAddress(target.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("accepted the connection but the TLS handshake failed: {e}"))?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {target}\r\nUser-Agent: uplink-health/{}\r\nConnection: close\r\n\r\n",
        crate::VERSION
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("took the TLS handshake but not the request: {e}"))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = tls
            .read(&mut buf)
            .await
            .map_err(|e| format!("took the request but its answer failed: {e}"))?;
        if n == 0 {
            return Err("closed the connection without an HTTP answer".into());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(Answer {
                    status: resp.code.unwrap_or(0),
                    elapsed: started.elapsed(),
                });
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!(
                    "answered more than {MAX_HEAD_BYTES} bytes without ending its headers"
                ));
            }
            Err(e) => return Err(format!("answered something that is not HTTP: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_a_silent_one_times_out() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = check(addr, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(e, "refused the connection");

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let conn = silent.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(conn);
        });
        let e = check(addr, Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(e, "did not answer within 300ms");
        hold.abort();
    }

    #[tokio::test]
    async fn a_port_that_is_not_tls_fails_the_handshake() {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = plain.accept().await.unwrap();
            let _ = conn
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let e = check(addr, Duration::from_secs(2)).await.unwrap_err();
        assert!(e.contains("TLS handshake failed"), "{e}");
        let _ = server.await;
    }
}
