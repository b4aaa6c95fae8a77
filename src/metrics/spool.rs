//! The agent's disk spool: metric batches that could not be delivered while
//! the backend was unreachable, kept in a bounded directory until the
//! backend acknowledges them, and read back oldest first for replay. A
//! record is an opaque payload (an encoded, compressed `MetricBatch`) with
//! its delivery identity `(epoch, seq)`, its sample count and its creation
//! time. The code is synchronous `std::fs`, to be run on a blocking thread.
//!
//! The file is long because it is one on-disk format and the state machine
//! over it (append, peek, ack, cap, recovery at open), with its tests: the
//! writer and the reader must agree on every byte, so they stay together.
//!
//! # Files
//!
//! Records are appended to segments named by a 20-digit number that only
//! grows (`00000000000000000042.seg`). A new segment starts when a record
//! would take the current one past [`SpoolConfig::segment_bytes`], after
//! every open, so a file written before a crash is never appended to, and
//! after an append failed (a full disk), so no failed write sits before
//! good data. The sidecar `00000000000000000042.ack` lists the identities
//! acknowledged in that segment. Other names, and directories, are ignored
//! and never deleted; a sidecar whose segment is gone (an interrupted
//! delete) is removed at open.
//!
//! A record is a 44-byte header, integers little endian, then the payload:
//!
//! | bytes  | field                                    |
//! |--------|------------------------------------------|
//! | 0..4   | [`RECORD_MAGIC`]                         |
//! | 4..8   | payload length (u32)                     |
//! | 8..16  | epoch (u64)                              |
//! | 16..24 | seq (u64)                                |
//! | 24..28 | samples (u32)                            |
//! | 28..36 | creation time, Unix ms (i64)             |
//! | 36..40 | CRC-32 of bytes 0..36                    |
//! | 40..44 | CRC-32 of bytes 0..40 and of the payload |
//!
//! An ack entry in a sidecar is a record with an empty payload.
//!
//! # Acknowledgment and the cap
//!
//! [`Spool::ack`] appends an entry to the sidecar of each segment holding a
//! pending record with that identity. Acks may come in any order; an
//! acknowledged record is never returned by [`Spool::peek`] again, also
//! after a reopen. A segment with nothing pending is deleted with its
//! sidecar: at once, or for the segment being appended to, when it is
//! rolled, when an append to it fails, or at the next open.
//!
//! The segment files never hold more than [`SpoolConfig::cap_bytes`]
//! together (sidecars, 44 bytes per ack, are not counted). When an append
//! would go over, the oldest segments are deleted whole until it fits, and
//! their pending records are counted as dropped (records, samples, bytes)
//! in [`Appended::dropped`] and [`SpoolStats`]. Nothing else unacknowledged
//! is ever deleted. A record larger than the cap is refused and counted.
//!
//! # Damage
//!
//! Open never fails because of what a file holds, and nothing here panics
//! on it. Where a record's magic, length or checksums are wrong, the scan
//! searches forward for the next magic that starts a record with valid
//! checksums; the skipped region (one or more records) is counted and the
//! records after it are kept. Whatever follows the last valid record of a
//! segment (a record torn by a crash) is truncated away and counted.
//! Damaged ack entries are skipped and counted: their records are replayed.
//! [`Spool::peek`] checks each record again as it reads it, and skips and
//! counts one damaged since open.
//!
//! # Durability
//!
//! Every append and ack is written to its file before it returns, so it is
//! in the operating system's page cache:
//!
//! - **kill -9** (the process alone dies) loses nothing that returned. A
//!   record or ack being written at that moment may be torn; open cuts the
//!   torn record and skips the torn ack.
//! - **Power loss** (or a kernel crash) loses what was not yet synced. With
//!   [`SyncPolicy::Always`], each append and ack is synced (`fdatasync`,
//!   and the directory after a file was created or deleted) before it
//!   returns: nothing that returned is lost. With [`SyncPolicy::Every`]`(d)`,
//!   the first append or ack at least `d` after the last sync syncs, as do
//!   [`Spool::sync`] and rolling a segment. What was appended since the last
//!   sync may be lost: at most `d` worth while appends keep coming, all of
//!   it since the last sync once they stop, so the caller also calls `sync`
//!   on a timer while [`Spool::unsynced`] (the agent's pipeline does, every
//!   `d`) and before shutdown. A lost ack, or a deletion undone, only
//!   means records are replayed again; the backend deduplicates them by
//!   `(agent, epoch, seq)`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Default [`SpoolConfig::cap_bytes`].
pub const DEFAULT_CAP_BYTES: u64 = 256 * MIB;
/// Default [`SpoolConfig::segment_bytes`]: 32 segments under the default cap.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 * MIB;
/// Default interval of [`SyncPolicy::Every`].
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// The smallest cap: a spool holding only a few batches is no use.
pub const MIN_CAP_BYTES: u64 = 64 * KIB;
/// The smallest segment.
pub const MIN_SEGMENT_BYTES: u64 = 4 * KIB;
/// The longest sync interval, which bounds what a power loss costs while
/// appends keep coming.
pub const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// The first four bytes of every record and ack entry.
pub const RECORD_MAGIC: [u8; 4] = *b"USR\x01";
/// Bytes of a record before its payload.
pub const HEADER_BYTES: usize = 44;

/// When appends and acks reach the disk itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Sync before every append and ack returns.
    Always,
    /// Sync once the last sync is older than this, checked on every append
    /// and ack, and on [`Spool::sync`].
    Every(Duration),
}

/// Where the spool lives and how large it may grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The spool's own directory, created if missing.
    pub dir: PathBuf,
    /// The most bytes the segment files may hold together.
    pub cap_bytes: u64,
    /// A segment is rolled before a record would take it past this size.
    /// It is what the cap drops at once, so it is at most half the cap.
    pub segment_bytes: u64,
    /// How often files are synced: what a power loss can cost.
    pub sync: SyncPolicy,
}

impl SpoolConfig {
    /// The defaults, in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            cap_bytes: DEFAULT_CAP_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            sync: SyncPolicy::Every(DEFAULT_SYNC_INTERVAL),
        }
    }

    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.dir.as_os_str().is_empty() {
            errs.push("spool dir must not be empty".into());
        }
        if self.cap_bytes < MIN_CAP_BYTES {
            errs.push(format!(
                "spool cap {} bytes is below the minimum of {MIN_CAP_BYTES}",
                self.cap_bytes
            ));
        }
        let half = self.cap_bytes / 2;
        if self.segment_bytes < MIN_SEGMENT_BYTES || self.segment_bytes > half {
            errs.push(format!(
                "spool segment size {} bytes is out of range: {MIN_SEGMENT_BYTES} to half the cap ({half})",
                self.segment_bytes
            ));
        }
        if let SyncPolicy::Every(d) = self.sync
            && d > MAX_SYNC_INTERVAL
        {
            errs.push(format!(
                "spool sync interval {d:?} is above the maximum of {MAX_SYNC_INTERVAL:?}"
            ));
        }
        errs
    }
}

/// Failures of the spool, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool config: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("spool {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("spool {dir}: a record of {bytes} bytes is larger than the cap of {cap} bytes")]
    TooLarge { dir: PathBuf, bytes: u64, cap: u64 },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// What the spool keeps about a record besides its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// With `seq`, the delivery identity the backend deduplicates on.
    pub epoch: u64,
    pub seq: u64,
    /// Samples in the payload, so that drops are counted in samples.
    pub samples: u32,
    pub created_unix_ms: i64,
}

/// Where a record lies; positions sort in append order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// A pending record, read for replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub header: Header,
    pub position: Position,
    pub payload: Vec<u8>,
}

/// Pending records deleted to stay under the cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub records: u64,
    pub samples: u64,
    /// Header and payload bytes.
    pub bytes: u64,
}

/// The outcome of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub position: Position,
    /// What this append dropped to make room.
    pub dropped: Dropped,
}

/// What [`Spool::open`] found on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Pending records found, and their samples and bytes.
    pub records: u64,
    pub samples: u64,
    pub bytes: u64,
    /// Records found already acknowledged.
    pub acked_records: u64,
    /// Damaged regions skipped in segments (each one or more records), and
    /// their bytes.
    pub corrupt_records_skipped: u64,
    pub corrupt_bytes_skipped: u64,
    /// Bytes truncated from the ends of segments: records torn by a crash.
    pub torn_bytes_cut: u64,
    /// Damaged regions in sidecars; the records they named are replayed.
    pub ack_damage: u64,
    /// Segments deleted because nothing in them was pending.
    pub segments_deleted: u64,
    /// Directory entries that are not the spool's, left alone.
    pub foreign_files: u64,
}

/// What the spool holds now, and counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Pending records, their samples and their bytes (header and payload).
    pub records: u64,
    pub samples: u64,
    pub bytes: u64,
    /// Bytes of the segment files: what the cap limits.
    pub disk_bytes: u64,
    pub segments: u64,
    /// Records appended and acknowledged since open.
    pub appended_records: u64,
    pub appended_samples: u64,
    pub acked_records: u64,
    pub acked_samples: u64,
    /// Pending records deleted by the cap.
    pub dropped_records: u64,
    pub dropped_samples: u64,
    pub dropped_bytes: u64,
    /// Records refused because they are larger than the cap.
    pub refused_records: u64,
    pub refused_samples: u64,
    /// Damaged regions skipped, at open and by peek.
    pub corrupt_records_skipped: u64,
    /// Bytes truncated at open.
    pub torn_bytes_cut: u64,
}

/// A valid record in a segment.
struct Entry {
    offset: u64,
    header: Header,
    payload_len: u32,
    pending: bool,
}

impl Entry {
    fn bytes(&self) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.payload_len)
    }
}

#[derive(Default)]
struct Segment {
    size: u64,
    /// In offset order.
    entries: Vec<Entry>,
    pending: usize,
    ack_file: Option<File>,
    ack_dirty: bool,
}

/// The spool: see the module documentation.
pub struct Spool {
    config: SpoolConfig,
    segments: BTreeMap<u64, Segment>,
    /// Pending records by `(epoch, seq)`.
    index: HashMap<(u64, u64), Vec<Position>>,
    /// The segment appended to; none yet after open.
    active: Option<(u64, File)>,
    next_segment: u64,
    data_dirty: bool,
    dir_dirty: bool,
    last_sync: Instant,
    stats: SpoolStats,
    report: OpenReport,
}

fn file_path(dir: &Path, id: u64, ext: &str) -> PathBuf {
    dir.join(format!("{id:020}.{ext}"))
}

impl Spool {
    /// Opens (creating) the spool in `config.dir`: reads every segment and
    /// sidecar, cuts torn tails, deletes segments with nothing pending.
    /// Fails on bad config and I/O errors, never on what files hold.
    pub fn open(config: SpoolConfig) -> Result<Spool, SpoolError> {
        let errs = config.validate();
        if !errs.is_empty() {
            return Err(SpoolError::Config(errs));
        }
        let dir = config.dir.clone();
        // Owner-only, as the agent's state dir it usually lives in.
        crate::owner_only::secure(&dir).map_err(io_err(&dir, "create directory"))?;
        let (mut segs, mut acks, mut foreign, mut last) =
            (BTreeSet::new(), BTreeSet::new(), 0, None);
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list directory"))? {
            let entry = entry.map_err(io_err(&dir, "list directory"))?;
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            let name = parse_name(&entry.file_name());
            // New segments are numbered after every name of this form, even
            // one taken by something else, so that creating one never fails.
            last = last.max(name.map(|(id, _)| id));
            match name {
                Some((id, "seg")) if is_file => segs.insert(id),
                Some((id, _)) if is_file => acks.insert(id),
                _ => {
                    foreign += 1;
                    false
                }
            };
        }
        let mut spool = Spool {
            config,
            segments: BTreeMap::new(),
            index: HashMap::new(),
            active: None,
            next_segment: last.map_or(0, |l| l.saturating_add(1)),
            data_dirty: false,
            dir_dirty: false,
            last_sync: Instant::now(),
            stats: SpoolStats::default(),
            report: OpenReport {
                foreign_files: foreign,
                ..OpenReport::default()
            },
        };
        for &id in &segs {
            spool.load_segment(id, acks.contains(&id))?;
        }
        for &id in acks.difference(&segs) {
            let path = file_path(&dir, id, "ack");
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete orphan spool ack file");
            }
        }
        let (r, s) = (&mut spool.report, &mut spool.stats);
        (r.records, r.samples, r.bytes) = (s.records, s.samples, s.bytes);
        s.corrupt_records_skipped = r.corrupt_records_skipped;
        s.torn_bytes_cut = r.torn_bytes_cut;
        Ok(spool)
    }

    fn load_segment(&mut self, id: u64, has_acks: bool) -> Result<(), SpoolError> {
        let path = file_path(&self.config.dir, id, "seg");
        let buf = fs::read(&path).map_err(io_err(&path, "read segment"))?;
        let found = scan(&buf);
        self.report.corrupt_records_skipped += found.corrupt_regions;
        self.report.corrupt_bytes_skipped += found.corrupt_bytes;
        if found.end < buf.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(found.end as u64).and_then(|()| f.sync_all()))
                .map_err(io_err(&path, "cut torn tail"))?;
            self.report.torn_bytes_cut += (buf.len() - found.end) as u64;
        }
        let mut acked = HashSet::new();
        if has_acks {
            let ack_path = file_path(&self.config.dir, id, "ack");
            let buf = fs::read(&ack_path).map_err(io_err(&ack_path, "read ack file"))?;
            let acks = scan(&buf);
            self.report.ack_damage += acks.corrupt_regions + u64::from(acks.end < buf.len());
            acked.extend(acks.records.iter().map(|(_, h, _)| (h.epoch, h.seq)));
        }
        let mut seg = Segment {
            size: found.end as u64,
            ..Segment::default()
        };
        for (offset, header, payload_len) in found.records {
            let pending = !acked.contains(&(header.epoch, header.seq));
            let entry = Entry {
                offset: offset as u64,
                header,
                payload_len,
                pending,
            };
            if pending {
                seg.pending += 1;
                self.add_pending(id, &entry);
            } else {
                self.report.acked_records += 1;
            }
            seg.entries.push(entry);
        }
        let empty = seg.pending == 0;
        self.stats.disk_bytes += seg.size;
        self.segments.insert(id, seg);
        if empty {
            self.delete_segment(id)?;
            self.report.segments_deleted += 1;
        }
        Ok(())
    }

    fn add_pending(&mut self, segment: u64, e: &Entry) {
        let pos = Position {
            segment,
            offset: e.offset,
        };
        self.index
            .entry((e.header.epoch, e.header.seq))
            .or_default()
            .push(pos);
        self.stats.records += 1;
        self.stats.samples += u64::from(e.header.samples);
        self.stats.bytes += e.bytes();
    }

    /// Marks the record at `pos` no longer pending; returns its header and
    /// bytes if it was.
    fn settle(&mut self, pos: Position) -> Option<(Header, u64)> {
        let seg = self.segments.get_mut(&pos.segment)?;
        let i = seg
            .entries
            .binary_search_by_key(&pos.offset, |e| e.offset)
            .ok()?;
        let e = &mut seg.entries[i];
        if !e.pending {
            return None;
        }
        e.pending = false;
        seg.pending -= 1;
        let (header, bytes) = (e.header, e.bytes());
        self.stats.records -= 1;
        self.stats.samples -= u64::from(header.samples);
        self.stats.bytes -= bytes;
        let key = (header.epoch, header.seq);
        if let Some(v) = self.index.get_mut(&key) {
            v.retain(|p| *p != pos);
            if v.is_empty() {
                self.index.remove(&key);
            }
        }
        Some((header, bytes))
    }

    /// Deletes segment `id` and its sidecar; returns what was pending in
    /// it. On error the segment stays as it was.
    fn delete_segment(&mut self, id: u64) -> Result<Dropped, SpoolError> {
        if self.active.as_ref().is_some_and(|(a, _)| *a == id) {
            self.active = None;
        }
        let path = file_path(&self.config.dir, id, "seg");
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(io_err(&path, "delete segment")(e));
        }
        // The segment first: a sidecar left alone is removed at open.
        let _ = fs::remove_file(file_path(&self.config.dir, id, "ack"));
        self.dir_dirty = true;
        let mut dropped = Dropped::default();
        let Some(seg) = self.segments.get(&id) else {
            return Ok(dropped);
        };
        let pending: Vec<u64> = seg
            .entries
            .iter()
            .filter(|e| e.pending)
            .map(|e| e.offset)
            .collect();
        for offset in pending {
            if let Some((h, bytes)) = self.settle(Position {
                segment: id,
                offset,
            }) {
                dropped.records += 1;
                dropped.samples += u64::from(h.samples);
                dropped.bytes += bytes;
            }
        }
        if let Some(seg) = self.segments.remove(&id) {
            self.stats.disk_bytes -= seg.size;
        }
        Ok(dropped)
    }

    /// Appends a record, first deleting the oldest segments if it would not
    /// fit under the cap. A record larger than the cap is refused.
    pub fn append(&mut self, header: Header, payload: &[u8]) -> Result<Appended, SpoolError> {
        let bytes = HEADER_BYTES as u64 + payload.len() as u64;
        let payload_len = match u32::try_from(payload.len()) {
            Ok(len) if bytes <= self.config.cap_bytes => len,
            _ => {
                self.stats.refused_records += 1;
                self.stats.refused_samples += u64::from(header.samples);
                return Err(SpoolError::TooLarge {
                    dir: self.config.dir.clone(),
                    bytes,
                    cap: self.config.cap_bytes,
                });
            }
        };
        let mut dropped = Dropped::default();
        while self.stats.disk_bytes + bytes > self.config.cap_bytes {
            let Some(&oldest) = self.segments.keys().next() else {
                break;
            };
            let d = self.delete_segment(oldest)?;
            dropped.records += d.records;
            dropped.samples += d.samples;
            dropped.bytes += d.bytes;
        }
        self.stats.dropped_records += dropped.records;
        self.stats.dropped_samples += dropped.samples;
        self.stats.dropped_bytes += dropped.bytes;

        let limit = self.config.segment_bytes;
        let (id, mut file) = match self.active.take() {
            Some((id, file))
                if self
                    .segments
                    .get(&id)
                    .is_some_and(|s| s.size == 0 || s.size + bytes <= limit) =>
            {
                (id, file)
            }
            rolled => {
                if let Some((old, file)) = rolled {
                    // A rolled segment is never written again: with nothing
                    // pending it goes, otherwise it is made durable now,
                    // whatever the policy.
                    if self.segments.get(&old).is_some_and(|s| s.pending == 0) {
                        self.delete_segment(old)?;
                    } else {
                        let path = file_path(&self.config.dir, old, "seg");
                        file.sync_data().map_err(io_err(&path, "sync segment"))?;
                    }
                }
                let id = self.next_segment;
                let path = file_path(&self.config.dir, id, "seg");
                let file = file_options()
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err(&path, "create segment"))?;
                self.next_segment = id.saturating_add(1);
                self.dir_dirty = true;
                (id, file)
            }
        };
        let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
        record.extend_from_slice(&encode_header(&header, payload));
        record.extend_from_slice(payload);
        let seg = self.segments.entry(id).or_default();
        let offset = seg.size;
        if let Err(e) = file.write_all(&record) {
            // Cut what was written, and leave the file: the next append
            // starts a new segment, so no failed write sits before good data.
            let _ = file.set_len(offset);
            let err = io_err(&file_path(&self.config.dir, id, "seg"), "append")(e);
            // Never appended to again, so as at a roll: a segment with
            // nothing pending (just created, or all acknowledged while it
            // was the active one) goes now. Its space is what a full disk
            // needs back, and nothing else would ever delete it.
            if seg.pending == 0
                && let Err(e) = self.delete_segment(id)
            {
                tracing::warn!(error = %e, "could not delete a spool segment after a failed append");
            }
            return Err(err);
        }
        seg.size += bytes;
        seg.pending += 1;
        let entry = Entry {
            offset,
            header,
            payload_len,
            pending: true,
        };
        self.add_pending(id, &entry);
        self.segments.entry(id).or_default().entries.push(entry);
        self.active = Some((id, file));
        self.stats.disk_bytes += bytes;
        self.stats.appended_records += 1;
        self.stats.appended_samples += u64::from(header.samples);
        self.data_dirty = true;
        self.maybe_sync()?;
        let position = Position {
            segment: id,
            offset,
        };
        Ok(Appended { position, dropped })
    }

    /// Marks every pending record with this identity delivered; returns how
    /// many there were (0 for an unknown or repeated ack).
    pub fn ack(&mut self, epoch: u64, seq: u64) -> Result<u64, SpoolError> {
        let Some(positions) = self.index.get(&(epoch, seq)).cloned() else {
            return Ok(0);
        };
        let mut segs: Vec<u64> = positions.iter().map(|p| p.segment).collect();
        segs.dedup();
        let header = Header {
            epoch,
            seq,
            samples: 0,
            created_unix_ms: 0,
        };
        let entry = encode_header(&header, &[]);
        for &id in &segs {
            // Persisted first: if this fails, nothing is marked in memory.
            let path = file_path(&self.config.dir, id, "ack");
            let Some(seg) = self.segments.get_mut(&id) else {
                continue;
            };
            let file = match &mut seg.ack_file {
                Some(f) => f,
                None => {
                    self.dir_dirty = true;
                    let f = file_options().create(true).open(&path);
                    seg.ack_file
                        .insert(f.map_err(io_err(&path, "open ack file"))?)
                }
            };
            file.write_all(&entry)
                .map_err(io_err(&path, "append ack"))?;
            seg.ack_dirty = true;
        }
        let mut n = 0;
        for p in positions {
            if let Some((h, _)) = self.settle(p) {
                n += 1;
                self.stats.acked_records += 1;
                self.stats.acked_samples += u64::from(h.samples);
            }
        }
        self.delete_settled(&segs);
        self.maybe_sync()?;
        Ok(n)
    }

    /// Deletes those of `segs` with nothing pending, except the active one.
    /// A failure is only logged: the segment is deleted at the next open.
    fn delete_settled(&mut self, segs: &[u64]) {
        for &id in segs {
            let active = self.active.as_ref().is_some_and(|(a, _)| *a == id);
            if !active
                && self.segments.get(&id).is_some_and(|s| s.pending == 0)
                && let Err(e) = self.delete_segment(id)
            {
                tracing::warn!(error = %e, "could not delete an acknowledged spool segment");
            }
        }
    }

    /// Up to `max` pending records, oldest first, without removing them.
    pub fn peek(&mut self, max: usize) -> Result<Vec<Record>, SpoolError> {
        self.peek_after(None, max)
    }

    /// Up to `max` pending records after `after` (from the oldest if none),
    /// oldest first: a sender with several batches in flight asks for those
    /// after the last one it sent.
    pub fn peek_after(
        &mut self,
        after: Option<Position>,
        max: usize,
    ) -> Result<Vec<Record>, SpoolError> {
        let (mut out, mut damaged) = (Vec::new(), Vec::new());
        'segments: for (&id, seg) in self.segments.range(after.map_or(0, |p| p.segment)..) {
            let path = file_path(&self.config.dir, id, "seg");
            let mut file = None;
            for e in seg.entries.iter().filter(|e| e.pending) {
                let position = Position {
                    segment: id,
                    offset: e.offset,
                };
                if after.is_some_and(|a| position <= a) {
                    continue;
                }
                if out.len() >= max {
                    break 'segments;
                }
                let f = match &mut file {
                    Some(f) => f,
                    None => match File::open(&path) {
                        Ok(f) => file.insert(f),
                        // Deleted behind the spool's back: its records are lost.
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {
                            damaged.push(position);
                            continue;
                        }
                        Err(err) => return Err(io_err(&path, "open segment")(err)),
                    },
                };
                match read_record(f, e).map_err(io_err(&path, "read record"))? {
                    Some(payload) => out.push(Record {
                        header: e.header,
                        position,
                        payload,
                    }),
                    None => damaged.push(position),
                }
            }
        }
        let mut segs = Vec::new();
        for p in damaged {
            if self.settle(p).is_some() {
                self.stats.corrupt_records_skipped += 1;
                segs.push(p.segment);
            }
        }
        segs.dedup();
        self.delete_settled(&segs);
        Ok(out)
    }

    fn maybe_sync(&mut self) -> Result<(), SpoolError> {
        match self.config.sync {
            SyncPolicy::Every(d) if self.last_sync.elapsed() < d => Ok(()),
            _ => self.sync(),
        }
    }

    /// Whether an append, an ack, or a file created or deleted is not yet
    /// synced: what a power loss now would take.
    pub fn unsynced(&self) -> bool {
        self.data_dirty || self.dir_dirty || self.segments.values().any(|s| s.ack_dirty)
    }

    /// Makes every append and ack so far durable, with the creation and
    /// deletion of files.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let dir = &self.config.dir;
        if let (true, Some((id, f))) = (self.data_dirty, &self.active) {
            let path = file_path(dir, *id, "seg");
            f.sync_data().map_err(io_err(&path, "sync segment"))?;
        }
        self.data_dirty = false;
        for (&id, seg) in &mut self.segments {
            if let (true, Some(f)) = (seg.ack_dirty, &seg.ack_file) {
                let path = file_path(dir, id, "ack");
                f.sync_data().map_err(io_err(&path, "sync ack file"))?;
            }
            seg.ack_dirty = false;
        }
        if self.dir_dirty {
            #[cfg(unix)]
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir, "sync directory"))?;
            self.dir_dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// What the spool holds now, and counters since open.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            segments: self.segments.len() as u64,
            ..self.stats
        }
    }

    /// What open found.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }
}

fn file_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// `00000000000000000042.seg` is `(42, "seg")`; the same for `.ack`.
fn parse_name(name: &std::ffi::OsStr) -> Option<(u64, &'static str)> {
    let (stem, ext) = name.to_str()?.split_once('.')?;
    let ext = ["seg", "ack"].into_iter().find(|e| *e == ext)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

fn encode_header(h: &Header, payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..4].copy_from_slice(&RECORD_MAGIC);
    // The caller has checked that the length fits in a u32.
    b[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[8..16].copy_from_slice(&h.epoch.to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..28].copy_from_slice(&h.samples.to_le_bytes());
    b[28..36].copy_from_slice(&h.created_unix_ms.to_le_bytes());
    let head_crc = crc32fast::hash(&b[..36]);
    b[36..40].copy_from_slice(&head_crc.to_le_bytes());
    let crc = record_crc(&b[..40], payload);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    b
}

fn record_crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// The record at `pos` in `buf` if it is whole and both checksums match:
/// its header and payload length.
fn parse_at(buf: &[u8], pos: usize) -> Option<(Header, u32)> {
    let head: &[u8; HEADER_BYTES] = buf
        .get(pos..pos.checked_add(HEADER_BYTES)?)?
        .try_into()
        .ok()?;
    let u32_at =
        |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
    // The header checksum first: it rejects almost every false magic
    // cheaply, so resynchronising stays linear.
    if head[0..4] != RECORD_MAGIC || crc32fast::hash(&head[..36]) != u32_at(36) {
        return None;
    }
    let start = pos + HEADER_BYTES;
    let payload = buf.get(start..start.checked_add(u32_at(4) as usize)?)?;
    if record_crc(&head[..40], payload) != u32_at(40) {
        return None;
    }
    let header = Header {
        epoch: u64_at(8),
        seq: u64_at(16),
        samples: u32_at(24),
        created_unix_ms: u64_at(28) as i64,
    };
    Some((header, u32_at(4)))
}

/// What a file's bytes hold.
struct Scan {
    /// Offset, header and payload length of each valid record.
    records: Vec<(usize, Header, u32)>,
    corrupt_regions: u64,
    corrupt_bytes: u64,
    /// The end of the last valid record: what follows is a torn tail.
    end: usize,
}

fn scan(buf: &[u8]) -> Scan {
    let mut s = Scan {
        records: Vec::new(),
        corrupt_regions: 0,
        corrupt_bytes: 0,
        end: 0,
    };
    let mut pos = 0;
    while pos < buf.len() {
        if let Some((h, len)) = parse_at(buf, pos) {
            s.records.push((pos, h, len));
            pos += HEADER_BYTES + len as usize;
            s.end = pos;
            continue;
        }
        // The first valid record after `pos`, if any.
        let mut from = pos + 1;
        let next = loop {
            let Some(i) = buf[from..].windows(4).position(|w| w == RECORD_MAGIC) else {
                break None;
            };
            if parse_at(buf, from + i).is_some() {
                break Some(from + i);
            }
            from += i + 1;
        };
        let Some(next) = next else { break };
        s.corrupt_regions += 1;
        s.corrupt_bytes += (next - pos) as u64;
        pos = next;
    }
    s
}

/// Reads the record of `e` again; `None` if it no longer checks out.
fn read_record(f: &mut File, e: &Entry) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; HEADER_BYTES + e.payload_len as usize];
    f.seek(SeekFrom::Start(e.offset))?;
    match f.read_exact(&mut buf) {
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        r => r?,
    }
    Ok(match parse_at(&buf, 0) {
        Some((h, len)) if h == e.header && len == e.payload_len => {
            Some(buf.split_off(HEADER_BYTES))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.join("spool"),
            cap_bytes: MIN_CAP_BYTES,
            segment_bytes: 8 * KIB,
            sync: SyncPolicy::Always,
        }
    }

    fn header(seq: u64) -> Header {
        Header {
            epoch: 7,
            seq,
            samples: (seq % 50) as u32 + 1,
            created_unix_ms: 1_700_000_000_000 + seq as i64,
        }
    }

    /// A payload of 100 to 1,500 bytes, the same for the same seq.
    fn payload(seq: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seq);
        let len = rng.usize(100..1500);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    fn append(spool: &mut Spool, seqs: impl IntoIterator<Item = u64>) -> Dropped {
        let mut total = Dropped::default();
        for seq in seqs {
            let d = spool.append(header(seq), &payload(seq)).unwrap().dropped;
            total.records += d.records;
            total.samples += d.samples;
            total.bytes += d.bytes;
        }
        total
    }

    /// Every pending record, checked to be the one appended under its seq.
    fn pending_seqs(spool: &mut Spool) -> Vec<u64> {
        let records = spool.peek(usize::MAX).unwrap();
        for r in &records {
            assert_eq!(r.header, header(r.header.seq));
            assert_eq!(r.payload, payload(r.header.seq), "seq {}", r.header.seq);
        }
        assert!(records.windows(2).all(|w| w[0].position < w[1].position));
        records.iter().map(|r| r.header.seq).collect()
    }

    fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        v.sort();
        v
    }

    fn record_bytes(seq: u64) -> u64 {
        (HEADER_BYTES + payload(seq).len()) as u64
    }

    #[test]
    fn records_survive_a_reopen_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.sync = SyncPolicy::Every(Duration::from_secs(60));
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, 1..=20);
        spool.sync().unwrap();
        assert_eq!(pending_seqs(&mut spool), (1..=20).collect::<Vec<_>>());
        let first = spool.peek(3).unwrap();
        let next = spool.peek_after(Some(first[2].position), 3).unwrap();
        let seqs: Vec<u64> = first.iter().chain(&next).map(|r| r.header.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
        let before = spool.stats();
        assert!(before.segments > 1);
        drop(spool);

        let mut spool = Spool::open(cfg.clone()).unwrap();
        let report = spool.open_report().clone();
        assert_eq!((report.records, report.bytes), (20, before.bytes));
        assert_eq!(report.samples, (1..=20).map(|s| s % 50 + 1).sum::<u64>());
        assert_eq!(report.corrupt_records_skipped + report.torn_bytes_cut, 0);
        assert_eq!(pending_seqs(&mut spool), (1..=20).collect::<Vec<_>>());
        // Appends after a reopen go to a new segment, after the old ones.
        append(&mut spool, [21]);
        drop(spool);
        let mut spool = Spool::open(cfg).unwrap();
        assert_eq!(pending_seqs(&mut spool), (1..=21).collect::<Vec<_>>());
    }

    #[test]
    fn acks_persist_and_emptied_segments_are_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, 1..=30);
        let first_segment: Vec<u64> = spool
            .peek(usize::MAX)
            .unwrap()
            .iter()
            .filter(|r| r.position.segment == 0)
            .map(|r| r.header.seq)
            .collect();
        assert!(first_segment.len() > 2 && first_segment.len() < 30);
        // Out of order, repeated and unknown acks.
        assert_eq!(spool.ack(7, 2).unwrap(), 1);
        assert_eq!(spool.ack(7, 1).unwrap(), 1);
        assert_eq!(spool.ack(7, 30).unwrap(), 1);
        assert_eq!(spool.ack(7, 2).unwrap(), 0);
        assert_eq!(spool.ack(8, 3).unwrap(), 0);
        let stats = spool.stats();
        assert_eq!((stats.records, stats.acked_records), (27, 3));
        drop(spool);

        let mut spool = Spool::open(cfg.clone()).unwrap();
        assert_eq!(spool.open_report().acked_records, 3);
        let expect: Vec<u64> = (3..=29).collect();
        assert_eq!(pending_seqs(&mut spool), expect);
        let seg0 = cfg.dir.join(format!("{:020}.seg", 0));
        assert!(seg0.exists() && cfg.dir.join(format!("{:020}.ack", 0)).exists());
        for &seq in first_segment.iter().rev() {
            spool.ack(7, seq).unwrap();
        }
        assert!(!seg0.exists(), "a fully acknowledged segment is deleted");
        assert!(!cfg.dir.join(format!("{:020}.ack", 0)).exists());
        drop(spool);

        let mut spool = Spool::open(cfg.clone()).unwrap();
        let left = pending_seqs(&mut spool);
        assert_eq!(left.first(), Some(&(first_segment.len() as u64 + 1)));
        append(&mut spool, [31]);
        for seq in left.into_iter().chain([31]) {
            spool.ack(7, seq).unwrap();
        }
        assert_eq!(spool.stats().records, 0);
        // The segment being appended to stays until it is rolled.
        assert_eq!(files(&cfg.dir, "seg").len(), 1);
        drop(spool);
        // The last segment, fully acknowledged, goes at the next open.
        let spool = Spool::open(cfg.clone()).unwrap();
        assert_eq!(spool.open_report().segments_deleted, 1);
        assert_eq!(spool.stats(), SpoolStats::default());
        assert!(files(&cfg.dir, "seg").is_empty() && files(&cfg.dir, "ack").is_empty());
    }

    #[test]
    fn the_cap_drops_whole_oldest_segments_and_counts_them() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut spool = Spool::open(cfg.clone()).unwrap();
        let n = 300;
        let dropped = append(&mut spool, 1..=n);
        let stats = spool.stats();
        assert!(stats.disk_bytes <= cfg.cap_bytes);
        assert!(dropped.records > 0);
        assert_eq!(
            (
                stats.dropped_records,
                stats.dropped_samples,
                stats.dropped_bytes
            ),
            (dropped.records, dropped.samples, dropped.bytes)
        );
        let total_samples: u64 = (1..=n).map(|s| u64::from(header(s).samples)).sum();
        let total_bytes: u64 = (1..=n).map(record_bytes).sum();
        assert_eq!(stats.records + stats.dropped_records, n);
        assert_eq!(stats.samples + stats.dropped_samples, total_samples);
        assert_eq!(stats.bytes + stats.dropped_bytes, total_bytes);
        // The newest records are kept, without a gap.
        let kept = pending_seqs(&mut spool);
        assert_eq!(kept, (n - kept.len() as u64 + 1..=n).collect::<Vec<_>>());
        drop(spool);
        let mut spool = Spool::open(cfg).unwrap();
        assert_eq!(pending_seqs(&mut spool), kept);
    }

    #[test]
    fn a_record_larger_than_the_cap_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, [1]);
        let big = vec![0u8; cfg.cap_bytes as usize - HEADER_BYTES + 1];
        let err = spool.append(header(2), &big).unwrap_err();
        assert!(matches!(err, SpoolError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("larger than the cap"), "{err}");
        let stats = spool.stats();
        assert_eq!((stats.refused_records, stats.refused_samples), (1, 3));
        assert_eq!((stats.records, stats.dropped_records), (1, 0));
        // Exactly the cap fits, after dropping everything else.
        let fits = &big[1..];
        let out = spool.append(header(3), fits).unwrap();
        assert_eq!(out.dropped.records, 1);
        assert_eq!(spool.stats().disk_bytes, cfg.cap_bytes);
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, 1..=3);
        drop(spool);
        let seg = &files(&cfg.dir, "seg")[0];
        let whole = fs::metadata(seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(whole - 10).unwrap();
        drop(f);

        let mut spool = Spool::open(cfg.clone()).unwrap();
        assert_eq!(spool.open_report().torn_bytes_cut, record_bytes(3) - 10);
        assert_eq!(spool.stats().torn_bytes_cut, record_bytes(3) - 10);
        assert_eq!(spool.open_report().corrupt_records_skipped, 0);
        assert_eq!(fs::metadata(seg).unwrap().len(), whole - record_bytes(3));
        assert_eq!(pending_seqs(&mut spool), [1, 2]);
        append(&mut spool, [3]);
        drop(spool);
        let mut spool = Spool::open(cfg).unwrap();
        assert_eq!(spool.open_report().torn_bytes_cut, 0);
        assert_eq!(pending_seqs(&mut spool), [1, 2, 3]);
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, 1..=5);
        let third = spool.peek(5).unwrap()[2].position.offset as usize;
        drop(spool);
        let seg = &files(&cfg.dir, "seg")[0];
        let mut bytes = fs::read(seg).unwrap();
        bytes[third + HEADER_BYTES + 5] ^= 0x40;
        fs::write(seg, &bytes).unwrap();

        for _ in 0..2 {
            let mut spool = Spool::open(cfg.clone()).unwrap();
            let report = spool.open_report().clone();
            assert_eq!(report.corrupt_records_skipped, 1);
            assert_eq!(report.corrupt_bytes_skipped, record_bytes(3));
            assert_eq!(report.torn_bytes_cut, 0);
            assert_eq!(pending_seqs(&mut spool), [1, 2, 4, 5]);
        }

        // Damage after open is found by peek, skipped and counted.
        let mut spool = Spool::open(cfg.clone()).unwrap();
        let fourth = spool.peek(5).unwrap()[2].position.offset as usize;
        bytes[fourth + 1] ^= 0x01;
        fs::write(seg, &bytes).unwrap();
        assert_eq!(pending_seqs(&mut spool), [1, 2, 5]);
        assert_eq!(spool.stats().corrupt_records_skipped, 2);
    }

    #[test]
    fn foreign_files_are_ignored_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        fs::create_dir_all(cfg.dir.join("00000000000000000009.seg")).unwrap();
        let foreign = [
            "README",
            "1.seg",
            "0000000000000000000x.seg",
            "00000000000000000003.seg.bak",
            "99999999999999999999.seg",
        ];
        for name in foreign {
            fs::write(cfg.dir.join(name), b"not a spool file").unwrap();
        }
        // A sidecar whose segment is gone was ours: it is removed.
        fs::write(cfg.dir.join("00000000000000000004.ack"), b"").unwrap();
        let mut spool = Spool::open(cfg.clone()).unwrap();
        assert_eq!(spool.open_report().foreign_files, 6);
        assert!(!cfg.dir.join("00000000000000000004.ack").exists());
        append(&mut spool, 1..=40);
        for seq in 1..=40 {
            spool.ack(7, seq).unwrap();
        }
        drop(spool);
        let mut spool = Spool::open(cfg.clone()).unwrap();
        assert!(pending_seqs(&mut spool).is_empty());
        assert!(files(&cfg.dir, "seg").iter().all(|p| {
            p.is_dir()
                || p.file_name()
                    .is_some_and(|n| foreign.iter().any(|f| n == *f))
        }));
        for name in foreign {
            assert!(cfg.dir.join(name).exists(), "{name} was deleted");
        }
    }

    /// `unsynced` says whether a power loss now would take something:
    /// every kind of write sets it, only a sync clears it.
    #[test]
    fn unsynced_covers_appends_acks_and_new_files_until_a_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.sync = SyncPolicy::Every(Duration::from_secs(60));
        let mut spool = Spool::open(cfg).unwrap();
        spool.sync().unwrap();
        assert!(!spool.unsynced());
        append(&mut spool, [1]);
        assert!(spool.unsynced(), "an append (and its new segment file)");
        spool.sync().unwrap();
        assert!(!spool.unsynced());
        spool.ack(7, 1).unwrap();
        assert!(spool.unsynced(), "an ack");
        spool.sync().unwrap();
        assert!(!spool.unsynced());
        let mut always = config(&tmp.path().join("always"));
        always.sync = SyncPolicy::Always;
        let mut always = Spool::open(always).unwrap();
        append(&mut always, [1, 2]);
        always.ack(7, 1).unwrap();
        assert!(!always.unsynced(), "Always syncs before each write returns");
    }

    #[test]
    fn config_defaults_are_valid_and_every_problem_is_reported() {
        assert!(
            SpoolConfig::new("/var/lib/uplink/spool")
                .validate()
                .is_empty()
        );
        let bad = SpoolConfig {
            dir: PathBuf::new(),
            cap_bytes: 1000,
            segment_bytes: 100,
            sync: SyncPolicy::Every(Duration::from_secs(3600)),
        };
        assert_eq!(bad.validate().len(), 4, "{:?}", bad.validate());
        assert!(matches!(Spool::open(bad), Err(SpoolError::Config(e)) if e.len() == 4));
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    #[test]
    fn random_damage_never_panics_and_never_returns_a_wrong_record() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.sync = SyncPolicy::Every(MAX_SYNC_INTERVAL);
        let mut spool = Spool::open(cfg.clone()).unwrap();
        append(&mut spool, 1..=40);
        for seq in [3, 5, 17] {
            spool.ack(7, seq).unwrap();
        }
        let expected = pending_seqs(&mut spool);
        drop(spool);
        let pristine = cfg.dir.clone();

        let mut rng = fastrand::Rng::with_seed(0x5b001);
        for round in 0..400 {
            let dir = tmp.path().join(format!("round{round}"));
            copy_dir(&pristine, &dir);
            let segs = files(&dir, "seg");
            let all: Vec<PathBuf> = segs.iter().chain(&files(&dir, "ack")).cloned().collect();
            let single_flip = round % 2 == 0;
            let ops = if single_flip { 1 } else { rng.usize(1..6) };
            for _ in 0..ops {
                let path = if single_flip {
                    &segs[rng.usize(..segs.len())]
                } else {
                    &all[rng.usize(..all.len())]
                };
                let mut bytes = fs::read(path).unwrap();
                match if single_flip { 0 } else { rng.u8(0..5) } {
                    0 if !bytes.is_empty() => {
                        let i = rng.usize(..bytes.len());
                        bytes[i] ^= rng.u8(1..);
                    }
                    1 => bytes.truncate(rng.usize(..=bytes.len())),
                    2 => bytes.extend((0..rng.usize(..200)).map(|_| rng.u8(..))),
                    3 if !bytes.is_empty() => {
                        // Copy a run of bytes over another place in the file.
                        let (a, b) = (rng.usize(..bytes.len()), rng.usize(..bytes.len()));
                        let n = rng.usize(..100).min(bytes.len() - a.max(b));
                        bytes.copy_within(a..a + n, b);
                    }
                    _ => bytes = (0..rng.usize(..3000)).map(|_| rng.u8(..)).collect(),
                }
                fs::write(path, bytes).unwrap();
            }
            let cfg = SpoolConfig {
                dir: dir.clone(),
                ..cfg.clone()
            };
            let mut spool = Spool::open(cfg.clone()).unwrap();
            let got = pending_seqs(&mut spool);
            if single_flip {
                assert!(got.iter().all(|s| expected.contains(s)), "round {round}");
                assert!(got.len() + 1 >= expected.len(), "round {round}: {got:?}");
            }
            let stats = spool.stats();
            assert_eq!(stats.records, got.len() as u64);
            // The spool stays usable: append, deliver everything, reopen.
            append(&mut spool, [100]);
            for seq in got.iter().chain(&[100]) {
                spool.ack(7, *seq).unwrap();
            }
            drop(spool);
            let mut spool = Spool::open(cfg).unwrap();
            assert!(pending_seqs(&mut spool).is_empty(), "round {round}");
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}
