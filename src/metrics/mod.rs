//! Metric samples on the wire. This module owns the encoding of the
//! contract's self-contained `MetricBatch` ([`encode`]: building a batch
//! from samples, and decoding and validating one, the single validator the
//! backend uses) and the compression of encoded batches ([`compress`]).
//! Where samples come from, how they are batched and spooled, and how they
//! travel are other modules' concern.

pub mod compress;
pub mod encode;
