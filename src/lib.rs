//! uplink: an outbound-only host agent, its reference backend, and the
//! protobuf contract between them.
//!
//! # Layout
//!
//! - [`proto`]: the generated contract (`proto/uplink/v1`), plus the schema
//!   used to convert Connect JSON bodies.
//! - [`connect`]: the Connect protocol's unary form (codes, errors, body
//!   encodings), shared by the backend's handlers and the clients.
//! - [`labels`]: the Docker labels on the agent's containers (bottom floor:
//!   imports nothing from the crate).
//! - [`secret`]: tokens and credentials: generation, hashing, redaction.
//! - [`tls`]: rustls configurations for both ends: the backend's generated CA,
//!   the agent's trust store, and errors that name an unknown issuer.
//! - [`backoff`]: exponential backoff with full jitter (pure, deterministic
//!   with an injected random source).
//! - [`backend`]: `uplink backend`: one TLS port serving gRPC and Connect,
//!   over its durable store (`backend::store`: SQLite in `--data-dir`).
//! - [`agent`]: `uplink agent`: enrollment, the session on its rung, the
//!   journal that makes commands run at most once, and the executor.
//! - [`metrics`]: `MetricBatch` encoding, decoding (the validator), compression.
//! - [`net`]: outbound connections: DNS, TCP, the proxy's CONNECT tunnel,
//!   TLS with the rung's ALPN, each failure named by hop.
//! - [`client`]: HTTPS clients for both rungs and for `ctl`.
//! - [`conformance`]: `uplink conformance`, the contract's rules checked
//!   against any backend (raw calls on both rungs and real agents), one
//!   line per case.
//! - [`ctl`]: `uplink ctl`, the operator's command line: the admin client
//!   and the command dispatch, with what it prints in `ctl::render`.
//! - [`demo`]: `uplink demo`, a backend and agents on this machine, with a
//!   container run through them when a Docker engine is present.
//! - [`loadgen`]: `uplink loadgen`, a tiny synthetic load generator (the
//!   demo's container).
//! - [`doctor`]: `uplink doctor`, a verdict per hop from this host to the
//!   backend, and which rung would be used.
//! - [`health`]: the status file a running agent or backend keeps in its
//!   directory, and `uplink health`, which judges it (a container's
//!   `HEALTHCHECK`).
//! - [`hostname`]: the host's name, for the agent and the backend.
//! - [`telemetry`]: the agent's self-metrics (names, recorder, endpoint).
//! - [`text`]: text from agents and containers, clipped and escaped before
//!   it is stored, logged or printed.
//! - [`cli`]: the flags, one file per subcommand, each args struct turning
//!   itself into its config; and the exit-status convention (64 on bad
//!   config).
//! - [`units`]: durations and sizes as operators write and read them
//!   (parsing and formatting); a bottom floor that imports nothing else.
//! - [`owner_only`]: owner-only directories and files (the backend's data
//!   dir, the agent's state dir); a bottom floor.
//! - [`own_container`]: the container the agent runs in, if any, found at
//!   start so that it never touches it; a bottom floor.
//!
//! # Features
//!
//! `backend` (on by default): the backend, its store and the demo; it
//! turns on `json` (Connect bodies in proto3 JSON, through `prost-reflect`).
//! Without them (`--no-default-features`, with the `agent` profile) the
//! same `uplink` binary holds the agent, `ctl`, `doctor`, `health` and
//! `loadgen`: the build for agent hosts, smaller and lighter in memory
//! (see BENCHMARKS.md, footprint).
#![forbid(unsafe_code)]

pub mod agent;
#[cfg(feature = "backend")]
pub mod backend;
/// Without the `backend` feature only the backend's defaults are built, so
/// `uplink backend --help` reads the same in every build.
#[cfg(not(feature = "backend"))]
pub mod backend {
    pub mod defaults;
}
pub mod backoff;
pub mod cli;
pub mod client;
pub mod conformance;
pub mod connect;
pub mod ctl;
#[cfg(feature = "backend")]
pub mod demo;
pub mod doctor;
pub mod grpc_path;
pub mod health;
pub mod hostname;
pub mod labels;
pub mod loadgen;
pub mod metrics;
pub mod net;
pub mod own_container;
pub mod owner_only;
pub mod proto;
pub mod secret;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod units;

/// The version of this build, reported by agents and shown by `ctl agents`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
