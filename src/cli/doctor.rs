//! The flags of `uplink doctor`.

use std::path::PathBuf;

use clap::Args;

use super::ConfigError;
use crate::doctor::DoctorConfig;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The backend, https://HOST[:PORT].
    #[arg(long, env = "UPLINK_BACKEND")]
    pub backend: String,
    /// Extra CA bundle to trust (PEM, repeatable); SSL_CERT_FILE is read too.
    #[arg(long = "ca-file", env = "UPLINK_CA_FILE", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// HTTP CONNECT proxy; default HTTPS_PROXY / ALL_PROXY.
    #[arg(long, env = "UPLINK_PROXY", hide_env_values = true)]
    pub proxy: Option<String>,
    /// Reached without the proxy; default NO_PROXY.
    #[arg(long, env = "UPLINK_NO_PROXY")]
    pub no_proxy: Option<String>,
    /// State dir of an enrolled agent: its credential lets doctor open the stream and poll for real.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

impl DoctorArgs {
    /// The checks these flags ask for.
    pub fn into_config(self) -> Result<DoctorConfig, ConfigError> {
        let backend = crate::client::parse_backend_url(&self.backend)
            .map_err(|e| format!("--backend: {e}"))?;
        Ok(DoctorConfig {
            backend,
            trust: super::trust(self.ca_files),
            proxy: crate::net::ProxySettings::from_flags_and_env(self.proxy, self.no_proxy),
            state_dir: self.state_dir,
        })
    }
}
