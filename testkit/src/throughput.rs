//! Throughput runs and the CPU time they cost, per thread group, from
//! `/proc`: the pipeline benchmark's agent side runs on threads named
//! `agent`, its backend on threads named `backend` (and the store's
//! `uplink-*` threads), and the thread that generates samples is named
//! `source` and reports its own time ([`thread_cpu`]) before it ends.
//! [`runtime`] builds a runtime whose threads are named and stay, so that
//! their time stays countable; [`print_runs`] renders what the runs
//! measured.

use std::time::Duration;

use tokio::runtime::Runtime;

/// CPU time of the calling thread so far.
pub fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// A multi-thread runtime with `workers` threads named `name`.
pub fn runtime(name: &str, workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        // Blocking threads stay, so that their CPU time stays countable.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// CPU time consumed so far, by thread group, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Threads of the agent's runtime (workers and blocking threads).
    pub agent: Duration,
    /// Threads of the backend's runtime, and its store's checkpointer.
    pub backend: Duration,
    /// The thread that generates samples (as it reported itself).
    pub source: Duration,
    /// Every other thread (the main thread, which only waits).
    pub other: Duration,
    /// The whole process, threads that exited included (`/proc/self/stat`,
    /// in clock ticks of 10 ms).
    pub process: Duration,
}

impl Cpu {
    /// The CPU time of each group so far.
    pub fn now() -> Cpu {
        let mut c = Cpu::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let p = task.path();
                let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                // The first field of schedstat is the time on a CPU, in ns.
                let Some(ns) = std::fs::read_to_string(p.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                else {
                    continue;
                };
                let d = Duration::from_nanos(ns);
                match comm.trim() {
                    "agent" => c.agent += d,
                    // It reports its own time: it ends before the run does.
                    "source" => {}
                    n if n == "backend" || n.starts_with("uplink-") => c.backend += d,
                    _ => c.other += d,
                }
            }
        }
        // utime and stime are fields 14 and 15; the name (field 2) may hold
        // spaces, so count from the parenthesis that closes it.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|f| f.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        // USER_HZ is 100 on Linux.
        c.process = Duration::from_millis(ticks * 10);
        c
    }

    /// The time spent since `before`; `source` is left zero, for the
    /// source thread to report.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            agent: self.agent.saturating_sub(before.agent),
            backend: self.backend.saturating_sub(before.backend),
            source: Duration::ZERO,
            other: self.other.saturating_sub(before.other),
            process: self.process.saturating_sub(before.process),
        }
    }

    /// The pipeline's share: agent and backend threads.
    pub fn pipeline(&self) -> Duration {
        self.agent + self.backend
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// The samples sent.
    pub samples: u64,
    /// From the first sample recorded to the last one delivered.
    pub wall: Duration,
    /// The CPU time it cost.
    pub cpu: Cpu,
}

impl Run {
    /// Samples per second of wall time.
    pub fn rate(&self) -> f64 {
        self.samples as f64 / self.wall.as_secs_f64()
    }

    /// Samples per second of the CPU time `d`.
    pub fn per_cpu(&self, d: Duration) -> f64 {
        self.samples as f64 / d.as_secs_f64().max(1e-9)
    }
}

/// The median of `v`, which must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Prints the throughput table of `rows` (a path's name and its runs) under
/// `title`, then each run's figures.
pub fn print_runs(title: &str, rows: &[(String, Vec<Run>)]) {
    println!();
    println!("{title}");
    println!();
    println!(
        "| path            | runs |   samples/s | samples/CPU-s, pipeline | agent CPU-s | backend CPU-s | source CPU-s | process CPU-s |  wall s | samples/CPU-s, agent | samples/CPU-s, backend |"
    );
    println!(
        "|-----------------|-----:|------------:|------------------------:|------------:|--------------:|-------------:|--------------:|--------:|---------------------:|-----------------------:|"
    );
    for (name, runs) in rows {
        // The run with the median throughput per CPU-second stands for the
        // path; its other columns are its own.
        let mut sorted = runs.clone();
        sorted.sort_by(|a, b| {
            a.per_cpu(a.cpu.pipeline())
                .total_cmp(&b.per_cpu(b.cpu.pipeline()))
        });
        let m = sorted[sorted.len() / 2];
        println!(
            "| {name:<15} | {:>4} | {:>11.0} | {:>23.0} | {:>11} | {:>13} | {:>12} | {:>13} | {:>7} | {:>20.0} | {:>22.0} |",
            runs.len(),
            median(runs.iter().map(Run::rate).collect()),
            m.per_cpu(m.cpu.pipeline()),
            secs(m.cpu.agent),
            secs(m.cpu.backend),
            secs(m.cpu.source),
            secs(m.cpu.process),
            secs(m.wall),
            m.per_cpu(m.cpu.agent),
            m.per_cpu(m.cpu.backend),
        );
    }
    println!();
    for (name, runs) in rows {
        let each: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{:.0}/s, {:.0}/CPU-s",
                    r.rate(),
                    r.per_cpu(r.cpu.pipeline())
                )
            })
            .collect();
        println!("  {name}: {}", each.join("; "));
    }
}
