//! The harness that uplink's integration tests (`tests/`) and benchmarks
//! (`benches/`) share: real parts on loopback, started and stopped by the
//! test, and waits that always have a timeout and a message.
//!
//! It is a dev-only crate of the workspace: the `uplink` package lists it
//! under `[dev-dependencies]`, and it depends on the `uplink` library, so
//! the types it hands out (`uplink::proto`, `uplink::backend`) are the very
//! types the tests use. Nothing here is published or built into `uplink`.
//!
//! # Layout
//!
//! - [`waits`]: [`wait_for`], polling a condition until a timeout.
//! - [`ports`]: [`free_port`], a loopback port for a part the test starts.
//! - [`backend`]: [`TestBackend`], a backend in this process on a port
//!   bound before it starts, and the command helpers used against it
//!   ([`connected_agent`], [`ping`], [`result_of`]).
//! - [`bench`]: [`bench::BenchBackend`], the in-process backend the
//!   dispatch and ladder benchmarks measure against.
//! - [`agents`]: [`Proc`], the `uplink` binary ([`bin`]) run as an agent,
//!   a backend or `ctl`, its output collected; [`agent`], [`agent_via`]
//!   and [`ctl`] start it against a [`TestBackend`]; [`health`] runs
//!   `uplink health`.
//! - [`relay`]: a TCP relay that turns into the faults of real networks
//!   (a path that cuts HTTP/2, a half-open line, connections cut at an
//!   age).
//! - [`squid`]: Debian's squid on a loopback port or in a container
//!   (CONNECT, Basic auth, TLS interception, tunnel lifetimes).
//! - [`postgres`]: Debian's PostgreSQL in a temporary directory on a
//!   loopback port, a database per test, stopped and removed when dropped.
//! - [`docker`]: the real Docker engine (a busybox image built `FROM
//!   scratch`, a registry on loopback, an image of the `uplink` binary
//!   under test laid out as the project's) and cleanup of an agent's
//!   containers.
//! - [`image`]: the project's image as `make image-local` builds it, and
//!   `docker` run from a test.
//! - [`deploy`]: [`deploy::Site`], the mission on the real engine: the
//!   backend from the image on a network of its own, a squid container,
//!   the agent from the line the backend prints; all removed when dropped.
//! - [`hostile`]: [`hostile::BackendProc`], the backend binary as its own
//!   process (under `prlimit` if asked), its memory, raw TLS connections
//!   to it, `ctl` and agents against it.
//! - [`loadgen`]: the load generators' side of the ingest endpoint
//!   (JMeter, the InfluxDB clients, curl) and an HTTP target for them.
//! - [`push`]: a client of a [`TestBackend`]'s metrics path: an enrolled
//!   agent, pushes over gRPC and Connect, `/metrics` and the JSON-lines
//!   files.
//!
//! - [`chaos`]: the seeded chaos soak's parts (`tests/chaos.rs`): the
//!   backend and agents as processes killed and started again on their
//!   data, a Docker engine that can be cut, a state dir on a tmpfs that
//!   can be filled, a numbered metrics stream.
//!
//! For the benchmarks:
//!
//! - [`inprocess`]: agents run in this process on a route to the backend
//!   (direct, through a proxy or a relay).
//! - [`measure`]: [`measure::Distribution`] (latency percentiles), the
//!   load average, counts from the environment.
//! - [`workload`]: the one seeded workload generator (a host, 50
//!   containers, a load test) of the encoding and pipeline benchmarks.
//! - [`otlp`]: the OTLP peer: samples as an OTLP request, a minimal
//!   receiver, an exporter with a window in flight.
//! - [`rung_push`]: the metrics pipeline's push on each rung, as the agent's
//!   session sends it.
//! - [`feed`]: the source thread that feeds a workload to a pipeline or
//!   to an agent's Graphite endpoint.
//! - [`throughput`]: CPU time per thread group from `/proc`, what one
//!   throughput run measured and its table.
//! - [`stages`]: each stage of the uplink and OTLP paths timed alone.
//!
//! Everything here panics with a message instead of returning errors: a
//! harness failure is a test failure.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agents;
pub mod backend;
pub mod bench;
pub mod certs;
pub mod chaos;
pub mod deploy;
pub mod docker;
pub mod feed;
pub mod hostile;
pub mod image;
pub mod ingress;
pub mod inprocess;
pub mod loadgen;
pub mod measure;
pub mod otlp;
pub mod ports;
pub mod postgres;
pub mod push;
pub mod relay;
pub mod rung_push;
pub mod squid;
pub mod stages;
pub mod store_lock;
pub mod throughput;
pub mod waits;
pub mod workload;

pub use agents::{Proc, agent, agent_at, agent_via, bin, ctl, health};
pub use backend::{TestBackend, connected_agent, ping, result_of};
pub use ports::free_port;
pub use waits::wait_for;
