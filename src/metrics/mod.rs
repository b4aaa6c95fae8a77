//! Metric samples on the wire. This module owns the encoding of the
//! contract's self-contained `MetricBatch` ([`encode`]: building a batch
//! from samples, and decoding and validating one, the single validator the
//! backend uses) and the compression of encoded batches ([`compress`]).
//! It also owns the agent's host metrics source ([`host`]: CPU, load,
//! memory, network interfaces and file systems read through `sysinfo`).
//! And it owns the agent's disk spool ([`spool`]: a bounded, segmented,
//! checksummed store of batches awaiting delivery, read back for replay and
//! deleted once acknowledged).
//! And it owns the agent's local ingest endpoint for load generators
//! ([`ingest`]: Graphite plaintext over TCP and InfluxDB line protocol over
//! HTTP, turned into samples for the batcher).
//! Container metrics, how samples are batched, and how they travel are
//! other modules' concern.

pub mod compress;
pub mod encode;
pub mod host;
pub mod ingest;
pub mod spool;
