//! The flags of `uplink conformance`, and the [`ConformanceConfig`] they
//! make.

use std::path::PathBuf;

use clap::Args;

use super::ConfigError;
use crate::conformance::{ConformanceConfig, RungChoice};
use crate::secret::Secret;

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// The backend under test, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND")]
    pub backend: Option<String>,
    /// The backend's admin token (the suite queues commands and reads
    /// results through the admin service).
    #[arg(long, env = "UPLINK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read the admin token from this file instead (keeps it out of `ps`).
    #[arg(long, env = "UPLINK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// An enrollment token of a provider of the backend: the suite enrolls
    /// its own agents with it (a few dozen).
    #[arg(long, env = "UPLINK_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Read the enrollment token from this file instead.
    #[arg(long, env = "UPLINK_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// Extra CA bundle to trust (PEM, repeatable); SSL_CERT_FILE is read too.
    #[arg(long = "ca-file", env = "UPLINK_CA_FILE", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// Which rungs to test: grpc, longpoll or both.
    #[arg(long, default_value = "both")]
    pub rung: String,
    /// Run only the cases whose name contains this (repeatable).
    #[arg(long = "case")]
    pub cases: Vec<String>,
}

impl ConformanceArgs {
    /// The suite's settings, with every problem at once.
    pub fn into_config(self) -> Result<ConformanceConfig, ConfigError> {
        let a = self;
        let mut problems = Vec::new();
        let backend = super::backend_url(a.backend.as_deref(), &mut problems);
        let admin_token = super::required_token(
            a.admin_token,
            a.admin_token_file,
            "admin-token",
            "UPLINK_ADMIN_TOKEN",
            &mut problems,
        );
        let enroll_token = super::required_token(
            a.enroll_token,
            a.enroll_token_file,
            "enroll-token",
            "UPLINK_ENROLL_TOKEN",
            &mut problems,
        );
        let rung = match a.rung.as_str() {
            "grpc" => RungChoice::Grpc,
            "longpoll" => RungChoice::Longpoll,
            "both" => RungChoice::Both,
            other => {
                problems.push(format!("--rung {other:?}: use grpc, longpoll or both"));
                RungChoice::Both
            }
        };
        let names = crate::conformance::case_names();
        for c in &a.cases {
            if !names.iter().any(|n| n.contains(c.as_str())) {
                problems.push(format!(
                    "--case {c:?} matches no case; the cases are {}",
                    names.join(", ")
                ));
            }
        }
        let ca_files = super::ca_files_with_env(a.ca_files);
        for f in &ca_files {
            if !f.is_file() {
                problems.push(format!("--ca-file {}: no such file", f.display()));
            }
        }
        let proxy = crate::net::ProxySettings::from_flags_and_env(None, None);
        problems.extend(proxy.validate());
        let net = match crate::tls::client_config(&super::trust(ca_files.clone())) {
            Ok(t) => Some(crate::net::Net::new(t, proxy)),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        let (Some(backend), Some(net), Some(admin), Some(enroll), true) =
            (backend, net, admin_token, enroll_token, problems.is_empty())
        else {
            return Err(ConfigError::new(problems));
        };
        Ok(ConformanceConfig {
            backend,
            net,
            ca_files,
            admin_token: Secret::new(admin),
            enroll_token: Secret::new(enroll),
            rung,
            cases: a.cases,
        })
    }
}
