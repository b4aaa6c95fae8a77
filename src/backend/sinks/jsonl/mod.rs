//! Every stored sample as one JSON object per line, for offline analysis
//! (`--metrics-jsonl-dir`):
//!
//! ```json
//! {"time_unix_ms":1700000000000,"agent":"agt_…","provider":"default","hostname":"lg-1","name":"host_cpu_usage_ratio","labels":{"cpu":"0"},"kind":"gauge","unit":"ratio","value":0.25}
//! ```
//!
//! `kind` is `"gauge"` or `"counter"`, `unit` is `""` when the series has
//! none, `labels` are the series' own labels as the agent sent them (not
//! sanitized). A finite value is a JSON number (the shortest decimal that
//! reads back as the same double); NaN and the infinities, which JSON
//! numbers cannot hold, are the strings `"NaN"`, `"+Inf"` and `"-Inf"`.
//!
//! Files are `DIR/metrics-<backend start, UTC, YYYYMMDDTHHMMSSZ>-<n>.jsonl`,
//! `n` counting from 000001. A file is closed (and synced) before a line
//! would take it past `max_bytes` (so a file is larger only when one line
//! alone is), and of the files of that pattern in `DIR` only the newest
//! `keep` are kept, older ones deleted (the file being written never is).
//!
//! One thread writes; the async side never touches the disk. A batch is
//! acknowledged only after its lines were handed to the kernel (`write(2)`;
//! no fsync per batch, as the store's commits): what an agent was told is
//! stored survives a crash of the backend process, though not of the host.
//! So "flush at least once a second" holds trivially: nothing acknowledged
//! is ever held in a buffer.
//!
//! The queue to the thread is bounded by samples ([`QUEUE_SAMPLES`]). When
//! it is full the push waits up to [`ROOM_WAIT`] for room, then fails with
//! [`JsonlError::Behind`], which the agent sees as UNAVAILABLE and retries:
//! backpressure, never silent loss. Both are counted.
//!
//! When a write fails (a full disk), the file is cut back to where the
//! batch began, so no partial line stays behind, and the batch fails (the
//! agent retries it). Only when the batch had already filled a file and
//! moved to the next are the lines in the earlier file kept: that retry
//! writes them twice.
//!
//! Exactly once across crashes: each file has a ledger of the batches
//! whose lines it holds ([`ledger`]). A batch is written, entered in the
//! ledger, and only then recorded in the store. One that was written but
//! not recorded (the backend was killed between the two, or the store
//! failed) is remembered, also by the next start, which reads the ledger
//! and cuts off lines of no entry; when its agent sends it again it is
//! recorded without being written again.
//!
//! Backends sharing a store each write their own files, and a batch is
//! in one backend's files: one that another backend recorded first (its
//! agent sent it again there before this one recorded it) is removed from
//! these files at once ([`JsonLines::remove_copies`]), or by the next
//! start when this one was killed before it could record it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

pub use self::ledger::BatchKey;
use self::ledger::Unrecorded;
use super::prometheus::Origin;
use crate::metrics::encode::Decoded;
use crate::metrics::sample::Kind;

pub mod ledger;

/// Samples waiting to be written, at most: about 40 MiB of decoded points
/// and series, and a few seconds of work for the writer.
pub const QUEUE_SAMPLES: usize = 1 << 20;

/// How long a push waits for room in a full queue before it fails with
/// [`JsonlError::Behind`].
pub const ROOM_WAIT: Duration = Duration::from_secs(5);

/// Lines are collected into chunks of this size before a `write`.
const CHUNK: usize = 256 * 1024;

/// Where and how the files are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonlConfig {
    /// The directory; created when missing.
    pub dir: PathBuf,
    /// Largest file before the next is started.
    pub max_bytes: u64,
    /// Most files of the pattern kept in `dir`.
    pub keep: usize,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// The queue stayed full for [`ROOM_WAIT`].
    #[error(
        "the metrics JSON-lines writer is behind ({QUEUE_SAMPLES} samples queued for {ROOM_WAIT:?}); the batch was not stored, retry later"
    )]
    Behind,
    /// Writing failed.
    #[error("metrics JSON lines: {0}; the batch was not stored, retry later")]
    Write(String),
    /// The backend is stopping.
    #[error("the backend is stopping; the batch was not stored, retry later")]
    Stopping,
}

/// The directory could not be prepared at start.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-jsonl-dir {}: {source}", path.display())]
pub struct OpenError {
    /// The directory or file.
    pub path: PathBuf,
    /// What failed.
    pub source: io::Error,
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct JsonlStats {
    /// Lines written.
    pub lines: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Files started.
    pub files: AtomicU64,
    /// Old files deleted to keep at most `keep`.
    pub deleted: AtomicU64,
    /// Batches whose write failed.
    pub write_errors: AtomicU64,
    /// Pushes that found the queue full and waited.
    pub waits: AtomicU64,
    /// Pushes refused because the queue stayed full ([`JsonlError::Behind`]).
    pub behind: AtomicU64,
    /// Bytes of lines cut off at start: batches written by an earlier start
    /// that were never recorded.
    pub cut_bytes: AtomicU64,
    /// Batches an earlier start wrote and did not record, that another
    /// backend sharing the store wrote too: removed at start.
    pub copies_removed: AtomicU64,
    /// Such batches left in place (their lines are in an older file).
    pub copies_left: AtomicU64,
}

struct Job {
    key: BatchKey,
    origin: Arc<Origin>,
    batch: Arc<Decoded>,
    /// The push was marked `resent`.
    resent: bool,
    done: oneshot::Sender<Result<(), String>>,
    /// Room in the queue, given back when the job is dropped.
    _room: OwnedSemaphorePermit,
}

/// What the writer thread is asked to do.
enum Work {
    Write(Job),
    /// Remove the lines of these batches (see [`JsonLines::remove_copies`]).
    Remove {
        keys: Vec<BatchKey>,
        done: oneshot::Sender<io::Result<(usize, usize)>>,
    },
}

/// The JSON-lines sink: a queue and the thread that writes it.
pub struct JsonLines {
    /// Taken at [`JsonLines::close`]; the semaphore bounds what it holds.
    tx: Mutex<Option<mpsc::UnboundedSender<Work>>>,
    room: Arc<Semaphore>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Counters, shared with the thread.
    pub stats: Arc<JsonlStats>,
    dir: PathBuf,
    /// Batches written and not known to be recorded.
    unrecorded: Arc<Mutex<Unrecorded>>,
    /// This directory's writer id (`writer-id` in it), the same at every
    /// start: which backend's files hold a batch, for backends sharing a
    /// store.
    writer: String,
}

/// The longest writer id read from `writer-id`.
const MAX_WRITER_ID: usize = 64;

/// Reads the directory's writer id, or makes one.
fn writer_id(dir: &Path) -> Result<String, OpenError> {
    let path = dir.join("writer-id");
    let bad = |source: io::Error| OpenError {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty()
                || id.len() > MAX_WRITER_ID
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a writer id (1 to 64 letters, digits and _); remove the file and a new one is made",
                )));
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = crate::secret::random_hex("jw_", 8);
            let tmp = dir.join("writer-id.tmp");
            std::fs::write(&tmp, format!("{id}\n")).map_err(bad)?;
            std::fs::rename(&tmp, &path).map_err(bad)?;
            Ok(id)
        }
        Err(e) => Err(bad(e)),
    }
}

impl JsonLines {
    /// Creates the directory, starts the first file (proving it is
    /// writable) and the writer thread. `start_unix_ms` names the files.
    pub fn open(cfg: JsonlConfig, start_unix_ms: i64) -> Result<JsonLines, OpenError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| OpenError {
            path: cfg.dir.clone(),
            source,
        })?;
        let stats = Arc::new(JsonlStats::default());
        let dir = cfg.dir.clone();
        let writer_id = writer_id(&dir)?;
        ledger::finish_rewrites(&dir).map_err(|source| OpenError {
            path: dir.clone(),
            source,
        })?;
        let files = std::fs::read_dir(&dir)
            .map_err(|source| OpenError {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| {
                let e = e.ok()?;
                Some((file_key(e.file_name().to_str()?)?, e.path()))
            })
            .collect();
        let recovered = ledger::recover(files).map_err(|source| OpenError {
            path: dir.clone(),
            source,
        })?;
        if recovered.cut_bytes > 0 || !recovered.unrecorded.is_empty() || recovered.bad_lines > 0 {
            tracing::info!(
                dir = %dir.display(),
                unrecorded = recovered.unrecorded.len(),
                cut_bytes = recovered.cut_bytes,
                cut_files = ?recovered.cut_files,
                bad_ledger_lines = recovered.bad_lines,
                "metrics JSON lines: batches an earlier start wrote but may not have recorded are not written again; lines of no batch cut off"
            );
        }
        stats.cut_bytes.store(recovered.cut_bytes, Relaxed);
        let unrecorded = Arc::new(Mutex::new(recovered.unrecorded));
        let mut writer = Writer {
            stamp: utc_stamp(start_unix_ms),
            cfg,
            n: 0,
            current: std::collections::HashSet::new(),
            file: None,
            path: PathBuf::new(),
            size: 0,
            chunk: Vec::with_capacity(CHUNK + 4096),
            stats: stats.clone(),
            ledger: None,
            unrecorded: unrecorded.clone(),
        };
        writer.open_next().map_err(|source| OpenError {
            path: writer.path.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("uplink-jsonl".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OpenError {
                path: dir.clone(),
                source,
            })?;
        Ok(JsonLines {
            tx: Mutex::new(Some(tx)),
            room: Arc::new(Semaphore::new(QUEUE_SAMPLES)),
            thread: Mutex::new(Some(thread)),
            stats,
            dir,
            unrecorded,
            writer: writer_id,
        })
    }

    /// This directory's writer id.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// Removes the lines of `copies` (batches written here and not
    /// recorded here, that another backend sharing the store wrote and
    /// recorded) from this directory's files, newest first, and forgets
    /// them. The file being written is closed first when it holds one.
    /// Returns how many were removed, and how many were left (their lines
    /// begin in the file before the one that ends them). One found in no
    /// file is in a file pruned since, or had no lines.
    pub async fn remove_copies(&self, copies: &[BatchKey]) -> io::Result<(usize, usize)> {
        if copies.is_empty() {
            return Ok((0, 0));
        }
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("the backend is stopping"))?;
        let (done, removed) = oneshot::channel();
        tx.send(Work::Remove {
            keys: copies.to_vec(),
            done,
        })
        .map_err(|_| io::Error::other("the backend is stopping"))?;
        drop(tx);
        let (removed, left) = removed
            .await
            .map_err(|_| io::Error::other("the backend is stopping"))??;
        self.stats.copies_removed.fetch_add(removed as u64, Relaxed);
        self.stats.copies_left.fetch_add(left as u64, Relaxed);
        Ok((removed, left))
    }

    /// Whether `key`, held as written and unrecorded, came in a push
    /// marked `resent`.
    pub fn was_resent(&self, key: &BatchKey) -> bool {
        self.unrecorded().was_resent(key)
    }

    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Unrecorded> {
        self.unrecorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key`'s lines were written (by this start or an earlier
    /// one) and it is not known to be recorded: it must not be written
    /// again.
    pub fn holds(&self, key: &BatchKey) -> bool {
        self.unrecorded().contains(key)
    }

    /// `key` is recorded in the store.
    pub fn recorded(&self, key: &BatchKey) {
        self.unrecorded().remove(key);
    }

    /// Every batch written and not known to be recorded, oldest first.
    pub fn unrecorded_keys(&self) -> Vec<BatchKey> {
        self.unrecorded().keys().cloned().collect()
    }

    /// How many batches are written and not known to be recorded, and
    /// how many were forgotten at [`ledger::MAX_UNRECORDED`].
    pub fn unrecorded_counts(&self) -> (usize, u64) {
        let u = self.unrecorded();
        (u.len(), u.forgotten)
    }

    /// The directory written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes every sample of `batch`, the batch `key`; returns once the
    /// lines and the ledger entry were handed to the kernel.
    pub async fn write(
        &self,
        key: BatchKey,
        origin: Arc<Origin>,
        batch: Arc<Decoded>,
        resent: bool,
    ) -> Result<(), JsonlError> {
        if batch.points.is_empty() {
            return Ok(());
        }
        if !key.writable() {
            return Err(JsonlError::Write(format!(
                "agent id \"{}\" cannot be entered in the batch ledger",
                crate::text::escape(&key.agent)
            )));
        }
        // A batch larger than the whole queue takes all of it.
        let want = batch.points.len().min(QUEUE_SAMPLES) as u32;
        let room = match self.room.clone().try_acquire_many_owned(want) {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(JsonlError::Stopping),
            Err(TryAcquireError::NoPermits) => {
                self.stats.waits.fetch_add(1, Relaxed);
                match tokio::time::timeout(ROOM_WAIT, self.room.clone().acquire_many_owned(want))
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(JsonlError::Stopping),
                    Err(_) => {
                        self.stats.behind.fetch_add(1, Relaxed);
                        return Err(JsonlError::Behind);
                    }
                }
            }
        };
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(JsonlError::Stopping)?;
        let (done, written) = oneshot::channel();
        tx.send(Work::Write(Job {
            key,
            origin,
            batch,
            resent,
            done,
            _room: room,
        }))
        .map_err(|_| JsonlError::Stopping)?;
        drop(tx);
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(JsonlError::Write(e)),
            Err(_) => Err(JsonlError::Stopping),
        }
    }

    /// Stops taking batches, lets the thread write everything queued, sync
    /// and close its file, and waits for it (at most `timeout`).
    pub async fn close(&self, timeout: Duration) {
        self.room.close();
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let join = tokio::task::spawn_blocking(move || t.join());
            if tokio::time::timeout(timeout, join).await.is_err() {
                tracing::warn!(?timeout, "metrics JSON-lines writer still busy at shutdown");
            }
        }
    }
}

struct Writer {
    cfg: JsonlConfig,
    /// The backend's start time, in file names.
    stamp: String,
    /// Number of the current file.
    n: u64,
    /// Batches with an entry in the current file's ledger.
    current: std::collections::HashSet<BatchKey>,
    /// None after a failure that left the file unusable: the next batch
    /// starts a new one.
    file: Option<File>,
    path: PathBuf,
    size: u64,
    chunk: Vec<u8>,
    stats: Arc<JsonlStats>,
    /// The current file's ledger.
    ledger: Option<File>,
    unrecorded: Arc<Mutex<Unrecorded>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Work>) {
        while let Some(work) = rx.blocking_recv() {
            let job = match work {
                Work::Write(job) => job,
                Work::Remove { keys, done } => {
                    let _ = done.send(self.remove(&keys));
                    continue;
                }
            };
            let r = self
                .write_batch(&job.key, &job.origin, &job.batch, job.resent)
                .map_err(|e| {
                    self.stats.write_errors.fetch_add(1, Relaxed);
                    let msg = format!("{}: {e}", self.path.display());
                    tracing::warn!(error = %msg, "writing metric samples failed; the batch is refused and will be retried");
                    msg
                });
            let _ = job.done.send(r);
        }
        if let Some(f) = self.file.take()
            && let Err(e) = f.sync_all()
        {
            tracing::warn!(path = %self.path.display(), error = %e, "syncing the metrics JSON-lines file failed");
        }
    }

    fn open_next(&mut self) -> io::Result<()> {
        if let Some(old) = self.file.take() {
            // Closed files are complete on disk, not just in the page cache.
            let _ = old.sync_data();
        }
        if let Some(old) = self.ledger.take() {
            let _ = old.sync_data();
        }
        loop {
            self.n += 1;
            self.path = self
                .cfg
                .dir
                .join(format!("metrics-{}-{:06}.jsonl", self.stamp, self.n));
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&self.path)
            {
                Ok(f) => {
                    let carried = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
                    let ledger = ledger::create(&self.path, &carried);
                    drop(carried);
                    self.ledger = Some(ledger.inspect_err(|_| {
                        let _ = std::fs::remove_file(&self.path);
                    })?);
                    self.file = Some(f);
                    self.current.clear();
                    self.size = 0;
                    self.stats.files.fetch_add(1, Relaxed);
                    self.prune();
                    return Ok(());
                }
                // A backend restarted within the same second.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the lines of `keys` from the files, newest first (the
    /// current one closed first when it holds one of them). Forgets them
    /// first, so that the next file does not carry them.
    fn remove(&mut self, keys: &[BatchKey]) -> io::Result<(usize, usize)> {
        {
            let mut u = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
            for k in keys {
                u.remove(k);
            }
        }
        if keys.iter().any(|k| self.current.contains(k)) {
            self.open_next()?;
        }
        let mut todo: std::collections::HashSet<BatchKey> = keys.iter().cloned().collect();
        let mut files: Vec<((String, u64), PathBuf)> = std::fs::read_dir(&self.cfg.dir)?
            .filter_map(|e| {
                let e = e.ok()?;
                Some((file_key(e.file_name().to_str()?)?, e.path()))
            })
            .filter(|(_, p)| *p != self.path)
            .collect();
        files.sort_unstable();
        let (mut removed, mut left) = (0, 0);
        for ((stamp, n), file) in files.into_iter().rev() {
            if todo.is_empty() {
                break;
            }
            if !ledger::ledger_path(&file).exists() {
                continue;
            }
            let previous = self
                .cfg
                .dir
                .join(format!("metrics-{stamp}-{:06}.jsonl", n.saturating_sub(1)));
            let whole = n == 1 || ledger::first_batch_begins_in(&previous);
            let d = ledger::drop_batches(&file, &todo, whole)?;
            removed += d.removed.len();
            left += d.left.len();
            for k in d.removed.iter().chain(&d.left) {
                todo.remove(k);
            }
        }
        Ok((removed, left))
    }

    /// Deletes the oldest files of the pattern beyond `keep`.
    fn prune(&mut self) {
        let entries = match std::fs::read_dir(&self.cfg.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.cfg.dir.display(), error = %e, "cannot list the metrics JSON-lines dir");
                return;
            }
        };
        let mut files: Vec<((String, u64), PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let key = file_key(e.file_name().to_str()?)?;
                Some((key, e.path()))
            })
            .filter(|(_, p)| *p != self.path)
            .collect();
        // The current file counts as one of `keep`.
        let excess = (files.len() + 1).saturating_sub(self.cfg.keep.max(1));
        files.sort_unstable();
        for (_, path) in files.into_iter().take(excess) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    self.stats.deleted.fetch_add(1, Relaxed);
                    let _ = std::fs::remove_file(ledger::ledger_path(&path));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete an old metrics JSON-lines file")
                }
            }
        }
    }

    fn write_batch(
        &mut self,
        key: &BatchKey,
        origin: &Origin,
        batch: &Decoded,
        resent: bool,
    ) -> io::Result<()> {
        if self.file.is_none() {
            self.open_next()?;
        }
        let (start, n) = (self.size, self.n);
        let mut entered = false;
        let r = self.write_lines(origin, batch).and_then(|()| {
            let ledger = self
                .ledger
                .as_mut()
                .ok_or_else(|| io::Error::other("no batch ledger open"))?;
            entered = true;
            ledger::append_written(ledger, self.size, key, resent)
        });
        self.chunk.clear();
        match &r {
            Ok(()) => {
                self.current.insert(key.clone());
                self.unrecorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert_written(key.clone(), resent)
            }
            Err(_) => {
                // Cut what this batch wrote into the current file, so no
                // partial line is left; when that fails, or the ledger
                // entry failed (it may be cut short), start a new file
                // and ledger next.
                let cut = if self.n == n { start } else { 0 };
                let ok = self.file.as_ref().is_some_and(|f| f.set_len(cut).is_ok());
                if ok {
                    self.size = cut;
                }
                if !ok || entered {
                    self.file = None;
                    self.ledger = None;
                }
            }
        }
        r
    }

    fn write_lines(&mut self, origin: &Origin, batch: &Decoded) -> io::Result<()> {
        let prefixes: Vec<Vec<u8>> = batch
            .series
            .iter()
            .map(|s| {
                let mut p = Vec::with_capacity(128);
                p.extend_from_slice(b",\"agent\":");
                json_string(&mut p, &origin.agent);
                p.extend_from_slice(b",\"provider\":");
                json_string(&mut p, &origin.provider);
                p.extend_from_slice(b",\"hostname\":");
                json_string(&mut p, &origin.hostname);
                p.extend_from_slice(b",\"name\":");
                json_string(&mut p, &s.name);
                p.extend_from_slice(b",\"labels\":{");
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        p.push(b',');
                    }
                    json_string(&mut p, k);
                    p.push(b':');
                    json_string(&mut p, v);
                }
                p.extend_from_slice(match s.kind {
                    Kind::Gauge => b"},\"kind\":\"gauge\",\"unit\":",
                    Kind::Counter => b"},\"kind\":\"counter\",\"unit\":",
                });
                json_string(&mut p, &s.unit);
                p.extend_from_slice(b",\"value\":");
                p
            })
            .collect();
        let max = self.cfg.max_bytes;
        for point in &batch.points {
            let line_start = self.chunk.len();
            let _ = write!(self.chunk, "{{\"time_unix_ms\":{}", point.time_unix_ms);
            self.chunk
                .extend_from_slice(&prefixes[point.series as usize]);
            json_value(&mut self.chunk, point.value);
            self.chunk.extend_from_slice(b"}\n");
            let before = self.size + line_start as u64;
            if before > 0 && before + (self.chunk.len() - line_start) as u64 > max {
                // This line would take the file past its size: finish the
                // file with the lines before it, start the next.
                self.write_chunk(line_start)?;
                self.open_next()?;
            }
            if self.chunk.len() >= CHUNK {
                self.write_chunk(self.chunk.len())?;
            }
        }
        self.write_chunk(self.chunk.len())?;
        self.stats
            .lines
            .fetch_add(batch.points.len() as u64, Relaxed);
        Ok(())
    }

    /// Writes the first `n` bytes of the chunk and removes them from it.
    fn write_chunk(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no file open"))?;
        file.write_all(&self.chunk[..n])?;
        self.size += n as u64;
        self.stats.bytes.fetch_add(n as u64, Relaxed);
        self.chunk.drain(..n);
        Ok(())
    }
}

/// `(start stamp, n)` of a file named `metrics-<stamp>-<n>.jsonl`.
fn file_key(name: &str) -> Option<(String, u64)> {
    let middle = name.strip_prefix("metrics-")?.strip_suffix(".jsonl")?;
    let (stamp, n) = middle.rsplit_once('-')?;
    Some((stamp.to_string(), n.parse().ok()?))
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends a value: a JSON number, or `"NaN"`, `"+Inf"`, `"-Inf"`.
fn json_value(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        // Debug is the shortest round-trip form; with an exponent for very
        // large and small magnitudes (`1e-7`), which JSON allows.
        let _ = write!(out, "{v:?}");
    } else if v.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if v > 0.0 {
        out.extend_from_slice(b"\"+Inf\"");
    } else {
        out.extend_from_slice(b"\"-Inf\"");
    }
}

/// `YYYYMMDDTHHMMSSZ` of a Unix time in milliseconds (UTC).
pub fn utc_stamp(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode::Point;
    use crate::metrics::sample::Series;

    /// A new batch key.
    fn key() -> BatchKey {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        BatchKey {
            agent: "agt_1".into(),
            epoch: 1,
            seq: SEQ.fetch_add(1, Relaxed) + 1,
        }
    }

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            agent: "agt_1".into(),
            provider: "lab".into(),
            hostname: "h1".into(),
        })
    }

    fn batch(n: usize, value: impl Fn(usize) -> f64) -> Arc<Decoded> {
        let s = Series::new("m.x", Kind::Counter)
            .label("path", "a\"b\\c\n")
            .unit("bytes");
        Arc::new(Decoded {
            series: vec![Arc::new(s), Arc::new(Series::new("g", Kind::Gauge))],
            points: (0..n)
                .map(|i| Point {
                    series: (i % 2) as u32,
                    time_unix_ms: 1_700_000_000_000 + i as i64,
                    value: value(i),
                })
                .collect(),
        })
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        files(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400_000), "20000229T000000Z");
        assert_eq!(utc_stamp(1_700_000_000_999), "20231114T221320Z");
        assert_eq!(
            file_key("metrics-20231114T221320Z-000012.jsonl"),
            Some(("20231114T221320Z".into(), 12))
        );
        assert_eq!(file_key("other.jsonl"), None);
    }

    #[tokio::test]
    async fn lines_carry_every_field_and_non_finite_values_as_strings() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JsonlConfig {
            dir: dir.path().join("j"),
            max_bytes: 1 << 20,
            keep: 3,
        };
        let j = JsonLines::open(cfg, 1_700_000_000_000).unwrap();
        let special = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.1, 1e-7, 42.0];
        j.write(key(), origin(), batch(6, |i| special[i]), false)
            .await
            .unwrap();
        j.close(Duration::from_secs(5)).await;
        let names: Vec<_> = files(j.dir())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        assert_eq!(names.len(), 1);
        assert!(
            names[0]
                .to_str()
                .unwrap()
                .ends_with("metrics-20231114T221320Z-000001.jsonl")
        );
        let l = lines(j.dir());
        assert_eq!(l.len(), 6);
        assert_eq!(
            l[0],
            serde_json::json!({"time_unix_ms":1_700_000_000_000i64,"agent":"agt_1","provider":"lab",
                "hostname":"h1","name":"m.x","labels":{"path":"a\"b\\c\n"},"kind":"counter",
                "unit":"bytes","value":"NaN"})
        );
        assert_eq!(l[1]["value"], "+Inf");
        assert_eq!(l[1]["kind"], "gauge");
        assert_eq!(l[1]["unit"], "");
        assert_eq!(l[2]["value"], "-Inf");
        assert_eq!(l[3]["value"].as_f64(), Some(0.1));
        assert_eq!(l[4]["value"].as_f64(), Some(1e-7));
        assert_eq!(l[5]["value"].as_f64(), Some(42.0));
        // Closed: later batches are refused, not lost silently.
        assert!(matches!(
            j.write(key(), origin(), batch(1, |_| 1.0), false).await,
            Err(JsonlError::Stopping)
        ));
    }

    #[tokio::test]
    async fn files_rotate_at_the_size_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        // An older run's files and an unrelated file.
        std::fs::create_dir_all(dir.path()).unwrap();
        for n in 1..=2 {
            std::fs::write(
                dir.path()
                    .join(format!("metrics-20000101T000000Z-{n:06}.jsonl")),
                "",
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let cfg = JsonlConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 4096,
            keep: 4,
        };
        let j = JsonLines::open(cfg, 1_700_000_000_000).unwrap();
        for b in 0..20 {
            j.write(key(), origin(), batch(50, |i| (b * 100 + i) as f64), false)
                .await
                .unwrap();
        }
        j.close(Duration::from_secs(5)).await;
        let all = files(dir.path());
        let ours: Vec<_> = all
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        assert_eq!(ours.len(), 4, "{all:?}");
        assert!(all.iter().any(|p| p.ends_with("notes.txt")));
        assert!(
            ours.iter()
                .all(|p| p.to_str().unwrap().contains("20231114T221320Z")),
            "the older run's files go first: {ours:?}"
        );
        for p in &ours {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len <= 4096, "{p:?} has {len} bytes");
            let text = std::fs::read_to_string(p).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'));
        }
        let stats = &j.stats;
        assert_eq!(stats.lines.load(Relaxed), 1000);
        let files_started = stats.files.load(Relaxed);
        assert!(files_started > 4, "{files_started}");
        assert_eq!(stats.deleted.load(Relaxed), files_started - 4 + 2);
        // What is left is the newest lines, whole, in order.
        let values: Vec<f64> = lines(dir.path())
            .iter()
            .map(|l| l["value"].as_f64().unwrap())
            .collect();
        assert_eq!(values.last(), Some(&1949.0));
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_pushes_wait_then_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JsonlConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 20,
            keep: 2,
        };
        let j = Arc::new(JsonLines::open(cfg, 0).unwrap());
        // A writer that fell behind: every place in the queue is taken.
        let full = j
            .room
            .clone()
            .acquire_many_owned(QUEUE_SAMPLES as u32)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let err = j
            .write(key(), origin(), batch(3, |_| 1.0), false)
            .await
            .unwrap_err();
        assert!(matches!(err, JsonlError::Behind), "{err}");
        assert_eq!(started.elapsed(), ROOM_WAIT);
        assert_eq!(j.stats.waits.load(Relaxed), 1);
        assert_eq!(j.stats.behind.load(Relaxed), 1);
        assert_eq!(j.stats.lines.load(Relaxed), 0);
        // Room that frees up within the wait lets the push through.
        let push = tokio::spawn({
            let j = j.clone();
            async move { j.write(key(), origin(), batch(3, |_| 1.0), false).await }
        });
        tokio::time::sleep(ROOM_WAIT / 2).await;
        drop(full);
        push.await.unwrap().unwrap();
        assert_eq!(j.stats.waits.load(Relaxed), 2);
        assert_eq!(j.stats.behind.load(Relaxed), 1);
        j.close(Duration::from_secs(5)).await;
        assert_eq!(lines(dir.path()).len(), 3);
    }

    #[tokio::test]
    async fn an_unwritable_dir_is_an_error_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = JsonLines::open(
            JsonlConfig {
                dir: file.join("sub"),
                max_bytes: 4096,
                keep: 1,
            },
            0,
        )
        .err()
        .expect("a dir under a file cannot be created");
        assert!(err.to_string().starts_with("--metrics-jsonl-dir "), "{err}");
    }
}
