//! Metric samples: where they come from, how they are batched, encoded,
//! compressed, spooled and sent. The agent's pipeline ([`pipeline`]) wires
//! these parts together; the backend uses [`encode`] to validate.
//!
//! - [`sample`]: [`sample::Sample`] and [`sample::Series`], the unit every
//!   source produces and the pipeline carries.
//! - [`pipeline`]: the agent's metrics pipeline as one unit
//!   (`Pipeline::start(config, dir, push, ..)`): sources, batcher, spool
//!   and the sender with its window, acks and replay pacing, over a
//!   [`pipeline::Push`] whose outcome it defines.
//! - [`host`]: the host source (CPU, load, memory, network interfaces and
//!   file systems through `sysinfo`).
//! - [`containers`]: the container source (Docker stats of this agent's
//!   containers through bollard).
//! - [`selfmetrics`]: the self-metrics source (the agent's own counters and
//!   gauges from the `metrics` facade).
//! - [`ingest`]: the local endpoint for load generators (Graphite plaintext
//!   over TCP, InfluxDB line protocol over HTTP).
//! - [`batcher`]: samples into batches, flushed on size or age.
//! - [`encode`]: the contract's self-contained `MetricBatch`: building one
//!   from samples, and decoding and validating one (the single validator
//!   the backend uses).
//! - [`compress`]: zstd and gzip with bounded decompression.
//! - [`spool`]: the bounded, segmented, checksummed on-disk store of
//!   batches awaiting the backend's acknowledgment.

pub mod batcher;
pub mod compress;
pub mod containers;
pub mod encode;
pub mod host;
pub mod ingest;
pub mod pipeline;
pub mod sample;
pub mod selfmetrics;
pub mod spool;
