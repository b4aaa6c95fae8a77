//! `uplink loadgen`: a tiny synthetic load generator for trying uplink
//! without a real load-testing tool. It prints a line per second and, when
//! given a Graphite address (an agent's ingest endpoint), sends the
//! samples a load generator would: requests, errors and latency.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Settings of the generator.
#[derive(Clone, Debug)]
pub struct LoadgenConfig {
    /// How long to run.
    pub duration: Duration,
    /// Simulated requests per second.
    pub rate: u32,
    /// Where to send Graphite plaintext samples, if anywhere.
    pub graphite: Option<String>,
    /// The prefix of the metric paths.
    pub prefix: String,
}

/// Runs the generator.
pub async fn run(cfg: LoadgenConfig) -> Result<(), String> {
    let mut sink = match &cfg.graphite {
        Some(addr) => Some(
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot reach the Graphite endpoint {addr}: {e}"))?,
        ),
        None => None,
    };
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "loadgen".into());
    let seconds = cfg.duration.as_secs().max(1);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let (mut requests, mut errors) = (0u64, 0u64);
    for second in 1..=seconds {
        tick.tick().await;
        let rate = cfg.rate as u64;
        requests += rate;
        errors += rate / 100;
        // A latency that wanders between 20 and 60 ms.
        let latency = 40.0 + 20.0 * ((second as f64) / 3.0).sin();
        println!(
            "loadgen {host}: second {second}: {requests} requests, {errors} errors, latency {latency:.1} ms"
        );
        if let Some(s) = sink.as_mut() {
            let now = crate::now_unix_ms() / 1000;
            let p = &cfg.prefix;
            let lines = format!(
                "{p}.requests;host={host} {requests} {now}\n{p}.errors;host={host} {errors} {now}\n{p}.latency_ms;host={host} {latency:.1} {now}\n"
            );
            s.write_all(lines.as_bytes())
                .await
                .map_err(|e| format!("Graphite endpoint closed the connection: {e}"))?;
        }
    }
    println!("loadgen {host}: done after {seconds} s");
    Ok(())
}
