//! An operator's own TLS identity for tests: a CA and a server certificate
//! it issued for 127.0.0.1 and localhost, as `--tls-cert`/`--tls-key` (and
//! any other server) take them.

use std::path::{Path, PathBuf};

/// PEM files written by [`operator_identity`].
pub struct Identity {
    /// The CA's certificate (what agents get as `--ca-file`).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// A new CA and a server certificate it issued for 127.0.0.1 and
/// localhost, written to `dir` as `ca.pem`, `cert.pem` and `key.pem`.
pub fn operator_identity(dir: &Path) -> Identity {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let (cert, key) = server_certificate(&issuer, "uplink test server");
    std::fs::create_dir_all(dir).unwrap();
    let id = Identity {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&id.ca, ca.pem()).unwrap();
    std::fs::write(&id.cert, cert).unwrap();
    std::fs::write(&id.key, key).unwrap();
    id
}

/// A server certificate for 127.0.0.1 and localhost named `name`, issued
/// by `issuer`: `(certificate, private key)` as PEM.
pub fn server_certificate<S: rcgen::SigningKey>(
    issuer: &rcgen::Issuer<'_, S>,
    name: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
