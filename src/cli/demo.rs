//! The flags of `uplink demo`.

use std::path::PathBuf;

use clap::Args;

/// Rounds of pings the demo sends to each agent.
pub const DEFAULT_ROUNDS: u32 = 5;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Rounds of pings to send to each agent.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub rounds: u32,
    /// Keep data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Skip the container part even when a Docker engine is present.
    #[arg(long)]
    pub no_docker: bool,
}

#[cfg(feature = "backend")]
impl From<DemoArgs> for crate::demo::DemoConfig {
    fn from(a: DemoArgs) -> Self {
        crate::demo::DemoConfig {
            rounds: a.rounds,
            data_dir: a.data_dir,
            docker: !a.no_docker,
        }
    }
}
