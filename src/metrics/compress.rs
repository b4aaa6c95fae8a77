//! Whole-message compression for encoded batches: zstd (level 1, the
//! default on both rungs) and gzip (for peers that only speak gzip), with
//! bounded decompression so a small hostile body cannot expand without
//! limit.

use std::io::{self, Read, Write};

/// The zstd level used for batches: level 1 compresses a batch to within a
/// few percent of level 3 at about twice the speed (see BENCHMARKS.md).
pub const ZSTD_LEVEL: i32 = 1;

/// A compression applied to a whole encoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// The bytes as they are.
    Identity,
    /// zstd at [`ZSTD_LEVEL`].
    Zstd,
    /// gzip (DEFLATE) at flate2's default level, 6.
    Gzip,
}

impl Compression {
    /// Every compression, in the order the benchmark reports them.
    pub const ALL: [Compression; 3] = [Compression::Identity, Compression::Zstd, Compression::Gzip];

    /// The name used in HTTP `Content-Encoding` and gRPC `grpc-encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Identity => "identity",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }

    /// Compresses `data`.
    pub fn compress(self, data: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Compression::Identity => Ok(data.to_vec()),
            Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
            Compression::Gzip => {
                let mut out = flate2::write::GzEncoder::new(
                    Vec::with_capacity(data.len() / 4 + 64),
                    flate2::Compression::default(),
                );
                out.write_all(data)?;
                out.finish()
            }
        }
    }

    /// Decompresses `data`, failing with `InvalidData` if the result would
    /// be longer than `limit` bytes.
    pub fn decompress(self, data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // Reading one byte past the limit tells "at the limit" from "over".
        let bound = limit as u64 + 1;
        match self {
            Compression::Identity => out.extend_from_slice(data),
            Compression::Zstd => {
                if data.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zstd body is empty",
                    ));
                }
                zstd::stream::read::Decoder::with_buffer(data)?
                    .take(bound)
                    .read_to_end(&mut out)?;
            }
            Compression::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .take(bound)
                    .read_to_end(&mut out)?;
            }
        }
        if out.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} body expands to more than {limit} bytes", self.name()),
            ));
        }
        Ok(out)
    }
}

/// A reusable zstd context at [`ZSTD_LEVEL`]: the same output as
/// [`Compression::Zstd`], without setting up a context for every batch.
pub struct ZstdEncoder {
    inner: zstd::bulk::Compressor<'static>,
}

impl ZstdEncoder {
    /// A new context.
    pub fn new() -> io::Result<Self> {
        Ok(ZstdEncoder {
            inner: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }

    /// Compresses `data`.
    pub fn compress(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        self.inner.compress(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> Vec<u8> {
        (0..2000u32)
            .flat_map(|i| format!("sample {i} of series {}\n", i % 7).into_bytes())
            .collect()
    }

    #[test]
    fn every_compression_round_trips_and_shrinks_text() {
        let data = text();
        for c in Compression::ALL {
            let packed = c.compress(&data).unwrap();
            if c != Compression::Identity {
                assert!(packed.len() * 4 < data.len(), "{}", c.name());
            }
            assert_eq!(c.decompress(&packed, data.len()).unwrap(), data);
        }
        let mut ctx = ZstdEncoder::new().unwrap();
        let packed = ctx.compress(&data).unwrap();
        assert_eq!(
            Compression::Zstd.decompress(&packed, data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn decompression_stops_at_the_limit() {
        let data = vec![0u8; 1 << 20];
        for c in Compression::ALL {
            let packed = c.compress(&data).unwrap();
            let err = c.decompress(&packed, 1000).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "{}: {err}",
                c.name()
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in [0usize, 1, 4, 17, 300] {
            let junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            for c in [Compression::Zstd, Compression::Gzip] {
                let _ = c.decompress(&junk, 1 << 16);
            }
        }
        for c in [Compression::Zstd, Compression::Gzip] {
            let packed = c.compress(&text()).unwrap();
            for cut in 0..packed.len() {
                assert!(
                    c.decompress(&packed[..cut], 1 << 20).is_err(),
                    "{} cut at {cut}",
                    c.name()
                );
            }
        }
    }
}
