//! TLS for both ends, with rustls and the `ring` provider only.
//!
//! - The backend terminates TLS itself with ALPN `h2` and `http/1.1`, so one
//!   port serves gRPC and HTTP/1.1 long-polling. Without a certificate from
//!   the operator it keeps a CA in its data dir (`ca.pem`, `ca-key.pem`) and
//!   issues itself a server certificate for its host names at each start.
//! - The agent and `ctl` trust the OS store plus any `--ca-file` bundles.
//!   Certificates are always verified; when the issuer is unknown, the error
//!   names the issuer and the flag that adds a CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Problems with certificates, keys or trust settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no trusted CA certificates: the OS store is empty and no --ca-file was given")]
    NoRoots,
}

/// The crypto provider every configuration is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where the backend's certificate comes from.
#[derive(Clone, Debug)]
pub enum ServerIdentity {
    /// PEM files given by the operator.
    Files { cert: PathBuf, key: PathBuf },
    /// A CA kept in the data dir, and a certificate for these names.
    Generated {
        data_dir: PathBuf,
        hostnames: Vec<String>,
    },
}

/// The backend's TLS configuration, and the CA file agents should trust when
/// the certificate was generated.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub ca_file: Option<PathBuf>,
}

/// Builds the backend's TLS configuration with ALPN `h2` and `http/1.1`.
pub fn server_config(identity: &ServerIdentity) -> Result<ServerTls, TlsError> {
    let (chain, key, ca_file) = match identity {
        ServerIdentity::Files { cert, key } => (read_certs(cert)?, read_key(key)?, None),
        ServerIdentity::Generated {
            data_dir,
            hostnames,
        } => {
            let (chain, key, ca) = generated_identity(data_dir, hostnames)?;
            (chain, key, Some(ca))
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        ca_file,
    })
}

/// Loads or creates `DATA_DIR/ca.pem` + `ca-key.pem`, then issues a server
/// certificate for `hostnames` signed by that CA.
fn generated_identity(
    data_dir: &Path,
    hostnames: &[String],
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        PathBuf,
    ),
    TlsError,
> {
    let ca_path = data_dir.join("ca.pem");
    let ca_key_path = data_dir.join("ca-key.pem");
    let (ca_pem, ca_key) = if ca_path.exists() && ca_key_path.exists() {
        let pem = read_string(&ca_path)?;
        let key_pem = read_string(&ca_key_path)?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: ca_key_path.clone(),
            what: format!(
                "not a usable private key ({e}); remove ca.pem and ca-key.pem to create a new CA"
            ),
        })?;
        (pem, key)
    } else {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            format!("uplink backend CA {}", crate::secret::random_id("")),
        );
        dn.push(rcgen::DnType::OrganizationName, "uplink");
        params.distinguished_name = dn;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        // Owner-only like every file of the data dir (`owner_only`), so
        // that the first start has no mode of its own to correct.
        write_private(&ca_path, cert.pem().as_bytes())?;
        (cert.pem(), key)
    };
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::Pem {
        path: ca_path.clone(),
        what: format!(
            "not a usable CA certificate ({e}); remove ca.pem and ca-key.pem to create a new CA"
        ),
    })?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(hostnames.to_vec())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        hostnames.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: ca_path.clone(),
        what: e.to_string(),
    })?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem {
        path: data_dir.join("(server key)"),
        what: e.to_string(),
    })?;
    Ok((vec![cert.der().clone(), ca_der], key, ca_path))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })?;
    f.write_all(data).map_err(|source| TlsError::Write {
        path: path.into(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Reads every certificate of a PEM bundle; an empty bundle is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: format!("not a PEM certificate bundle: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "contains no PEM certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: format!("no usable PEM private key: {e}"),
    })
}

/// Trust settings of a client (agent, `ctl`, `doctor`).
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Extra CA bundles (`--ca-file`, `SSL_CERT_FILE`).
    pub ca_files: Vec<PathBuf>,
    /// Leave out the OS trust store (tests and the demo, which trust only
    /// the backend's own CA).
    pub skip_os_store: bool,
}

/// Builds a client configuration without ALPN (the connectors set it).
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut extra_subjects = Vec::new();
    if !trust.skip_os_store {
        // Unreadable entries of the OS store are skipped: one bad file in
        // /etc/ssl/certs should not stop the agent.
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
    }
    for path in &trust.ca_files {
        for cert in read_certs(path)? {
            if let Some(subject) = subject_of(&cert) {
                extra_subjects.push(subject);
            }
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: path.clone(),
                what: format!("certificate not usable as a trust anchor: {e}"),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let verifier = Arc::new(NamingVerifier {
        inner,
        ca_files: trust.ca_files.clone(),
        extra_subjects,
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous() // Only to install a verifier that wraps webpki's; nothing is skipped.
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The subject of a certificate, as an RFC 4514 string.
pub fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// The issuer of a certificate, as an RFC 4514 string.
pub fn issuer_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.issuer().to_string())
}

/// Verifies with webpki and, when the issuer is unknown, fails with an error
/// that names the issuer and the flag that adds a CA.
#[derive(Debug)]
struct NamingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    ca_files: Vec<PathBuf>,
    extra_subjects: Vec<String>,
}

/// The certificate chain was signed by a CA that is not trusted.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UnknownIssuer {
    /// The issuer's subject.
    pub issuer: String,
    message: String,
}

impl ServerCertVerifier for NamingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                // The top of the presented chain is the closest thing to the
                // CA the server claims.
                let top = intermediates.last().unwrap_or(end_entity);
                let issuer = issuer_of(top).unwrap_or_else(|| "(unparsable issuer)".into());
                let mut message = format!(
                    "the server's certificate was issued by \"{issuer}\", which is not trusted; \
                     add that CA with --ca-file PEM (or SSL_CERT_FILE)"
                );
                // A small bundle is a private CA the operator added; a large
                // one is a system store, where interception says nothing.
                if !self.ca_files.is_empty() && self.extra_subjects.len() <= 3 {
                    let held = self
                        .extra_subjects
                        .iter()
                        .map(|s| format!("\"{s}\""))
                        .collect::<Vec<_>>()
                        .join(", ");
                    message.push_str(&format!(
                        ". The CA file(s) given ({}) hold {held}, not that issuer; if one of them is the \
                         backend's CA, a TLS-intercepting proxy is the likely cause: add the proxy's CA with --ca-file",
                        self.ca_files
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ));
                }
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(UnknownIssuer { issuer, message })),
                )))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_is_reused_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let id = ServerIdentity::Generated {
            data_dir: dir.path().into(),
            hostnames: vec!["localhost".into(), "127.0.0.1".into()],
        };
        let first = server_config(&id).unwrap();
        let ca1 = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let second = server_config(&id).unwrap();
        let ca2 = std::fs::read(dir.path().join("ca.pem")).unwrap();
        assert_eq!(ca1, ca2);
        assert_eq!(first.ca_file, second.ca_file);
        assert_eq!(
            first.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Both owner-only from the start, as the data dir's other files.
            for file in ["ca-key.pem", "ca.pem"] {
                let mode = std::fs::metadata(dir.path().join(file))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{file} readable by others: {mode:o}");
            }
        }
    }

    #[test]
    fn bad_ca_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        let err = client_config(&Trust {
            ca_files: vec![p.clone()],
            skip_os_store: true,
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ca.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let missing = dir.path().join("missing.pem");
        let err = client_config(&Trust {
            ca_files: vec![missing],
            skip_os_store: true,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
