//! The flags of `uplink loadgen`.

use std::str::FromStr as _;
use std::time::Duration;

use clap::Args;

use crate::loadgen::LoadgenConfig;
use crate::units::HumanDuration;

/// How long the generator runs.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Simulated requests per second.
pub const DEFAULT_RATE: u32 = 100;
/// Prefix of the metric paths.
pub const DEFAULT_PREFIX: &str = "loadgen";

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// How long to run.
    #[arg(long, default_value_t = HumanDuration(DEFAULT_DURATION), value_parser = HumanDuration::from_str)]
    pub duration: HumanDuration,
    /// Simulated requests per second.
    #[arg(long, default_value_t = DEFAULT_RATE)]
    pub rate: u32,
    /// Send Graphite plaintext samples to HOST:PORT (an agent's ingest endpoint).
    #[arg(long, env = "UPLINK_LOADGEN_GRAPHITE")]
    pub graphite: Option<String>,
    /// Prefix of the metric paths.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
}

impl From<LoadgenArgs> for LoadgenConfig {
    fn from(a: LoadgenArgs) -> Self {
        LoadgenConfig {
            duration: a.duration.into(),
            rate: a.rate,
            graphite: a.graphite,
            prefix: a.prefix,
        }
    }
}
