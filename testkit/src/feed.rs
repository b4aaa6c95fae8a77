//! The source side of the pipeline benchmark: a thread named `source` that
//! records a [`Workload`] into a pipeline ([`feed`]) or writes it as
//! Graphite plaintext to an agent's ingest endpoint ([`feed_graphite`]), as
//! fast as the other side takes it, and reports the CPU time it spent, so
//! that the cost of generating samples is told apart from the cost of
//! moving them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use uplink::metrics::sample::Sample;

use crate::throughput::thread_cpu;
use crate::workload::Workload;

/// What a source thread hands back: the workload for the next run, and the
/// CPU time it spent (its own, since it ends before the run is measured).
pub type Fed = std::thread::JoinHandle<(Workload, Duration)>;

/// Records exactly `samples` samples with `record` (whole chunks, the last
/// one cut to fit) from a thread named `source`, as fast as the pipeline
/// takes them; `record` is false when the pipeline stopped taking them.
pub fn feed(
    mut w: Workload,
    mut record: impl FnMut(Vec<Sample>) -> bool + Send + 'static,
    samples: u64,
) -> Fed {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut left = samples as usize;
            let mut chunks = Vec::new();
            while left > 0 {
                w.next_second(&mut chunks);
                for mut chunk in chunks.drain(..) {
                    if left == 0 {
                        break;
                    }
                    chunk.truncate(left);
                    left -= chunk.len();
                    if !record(chunk) {
                        panic!("the pipeline stopped taking samples");
                    }
                }
            }
            (w, thread_cpu())
        })
        .expect("cannot start the source thread")
}

/// Writes exactly `samples` samples as Graphite plaintext lines to the
/// agent's ingest endpoint at `addr`, from a thread named `source`.
pub fn feed_graphite(mut w: Workload, addr: SocketAddr, samples: u64) -> Fed {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("cannot connect to the ingest endpoint {addr}: {e}"));
            let _ = sock.set_nodelay(true);
            let mut left = samples as usize;
            let mut chunks = Vec::new();
            let mut text = String::with_capacity(1 << 20);
            while left > 0 {
                w.next_second(&mut chunks);
                text.clear();
                for chunk in chunks.drain(..) {
                    for s in chunk.iter().take(left) {
                        graphite_line(s, &mut text);
                    }
                    left -= chunk.len().min(left);
                }
                sock.write_all(text.as_bytes())
                    .unwrap_or_else(|e| panic!("the ingest endpoint {addr} went away: {e}"));
            }
            (w, thread_cpu())
        })
        .expect("cannot start the source thread")
}

/// `name;label=value;... value seconds.millis`. Graphite separates fields
/// with spaces, so a space in a label value becomes `_`, as Graphite
/// senders such as JMeter's do.
fn graphite_line(s: &Sample, out: &mut String) {
    use std::fmt::Write as _;
    out.push_str(&s.series.name);
    for (k, v) in &s.series.labels {
        let _ = write!(out, ";{k}=");
        out.extend(v.chars().map(|c| if c == ' ' { '_' } else { c }));
    }
    let t = s.time_unix_ms;
    let _ = writeln!(out, " {} {}.{:03}", s.value, t / 1000, t % 1000);
}
