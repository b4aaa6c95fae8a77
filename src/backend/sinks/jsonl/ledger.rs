//! The batch ledger beside the JSON lines: which batches the lines hold,
//! so that a batch written but not recorded in the store (the backend was
//! killed between the two, or the store failed) is not written again when
//! its agent sends it again.
//!
//! Each `metrics-<stamp>-<n>.jsonl` has a `metrics-<stamp>-<n>.batches`,
//! one entry per line, fields separated by tabs:
//!
//! - `u <epoch> <seq> <agent>`: a batch written earlier (into an earlier
//!   file, maybe by an earlier backend start) and not recorded when this
//!   ledger opened. A ledger opens with these, written into a temporary
//!   file renamed into place, so it is whole or absent.
//! - `w <end> <epoch> <seq> <agent>`: the batch's lines were written; they
//!   end at byte `end` of this ledger's file (they may begin in the
//!   previous file). Appended after the lines, before the batch is
//!   recorded, so a recorded batch always has its entry.
//! - `r <epoch> <seq> <agent>`: the batch came in a push marked `resent`
//!   (see `PushMetricsRequest.resent`). Just before its `w` entry, or after
//!   the `u` entries for a carried batch. A backend that wrote a resent
//!   batch records it with its writer id, so a batch recorded without one
//!   was recorded by the backend its first push went to: such lines here
//!   are a copy. An `r` of a batch with no `u` or `w` entry means nothing.
//!
//! At start, [`recover`] reads the newest ledgers: lines after the last
//! `w` belong to a batch that was never recorded (its agent still holds
//! it) and are cut off; every `u` and `w` of the newest ledger is a batch
//! that may be unrecorded, kept until the store says it is recorded, and
//! not written again meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Most batches remembered as written but not recorded. Beyond it the
/// oldest is forgotten (and counted): if its agent ever sends it again,
/// it is written again.
pub const MAX_UNRECORDED: usize = 65_536;

/// Longest agent id a ledger line carries (the backend makes them far
/// shorter).
const MAX_AGENT: usize = 256;

/// A metric batch: `(agent, epoch, seq)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    /// The agent's id.
    pub agent: String,
    /// The agent's epoch.
    pub epoch: u64,
    /// The batch's seq within the epoch.
    pub seq: u64,
}

impl BatchKey {
    fn fields(&self) -> String {
        format!("{}\t{}\t{}", self.epoch, self.seq, self.agent)
    }

    fn parse(epoch: &str, seq: &str, agent: &str) -> Option<BatchKey> {
        let ok = !agent.is_empty()
            && agent.len() <= MAX_AGENT
            && agent.bytes().all(|b| b.is_ascii_graphic());
        Some(BatchKey {
            agent: ok.then(|| agent.to_string())?,
            epoch: epoch.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// Whether the ledger can carry it (a backend's own agent ids always).
    pub fn writable(&self) -> bool {
        !self.agent.is_empty()
            && self.agent.len() <= MAX_AGENT
            && self.agent.bytes().all(|b| b.is_ascii_graphic())
    }
}

/// Batches written and not (yet) known to be recorded, oldest first.
#[derive(Debug, Default)]
pub struct Unrecorded {
    order: BTreeMap<u64, BatchKey>,
    keys: HashMap<BatchKey, u64>,
    next: u64,
    /// Those written from a push marked `resent`.
    resent: std::collections::HashSet<BatchKey>,
    /// Batches forgotten at [`MAX_UNRECORDED`].
    pub forgotten: u64,
}

impl Unrecorded {
    /// Remembers `key`, forgetting the oldest beyond the bound.
    pub fn insert(&mut self, key: BatchKey) {
        if self.keys.contains_key(&key) {
            return;
        }
        while self.keys.len() >= MAX_UNRECORDED {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.keys.remove(&old);
            self.resent.remove(&old);
            self.forgotten += 1;
        }
        self.next += 1;
        self.order.insert(self.next, key.clone());
        self.keys.insert(key, self.next);
    }

    /// Remembers `key`, written from a push marked `resent` (or not).
    pub fn insert_written(&mut self, key: BatchKey, resent: bool) {
        self.insert(key.clone());
        if resent {
            self.resent.insert(key);
        }
    }

    /// Forgets `key` (it is recorded).
    pub fn remove(&mut self, key: &BatchKey) {
        if let Some(n) = self.keys.remove(key) {
            self.order.remove(&n);
        }
        self.resent.remove(key);
    }

    /// Whether `key` is remembered as written from a push marked `resent`.
    pub fn was_resent(&self, key: &BatchKey) -> bool {
        self.resent.contains(key)
    }

    /// Whether `key` was written and is not known to be recorded.
    pub fn contains(&self, key: &BatchKey) -> bool {
        self.keys.contains_key(key)
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// All of them, oldest first.
    pub fn keys(&self) -> impl Iterator<Item = &BatchKey> {
        self.order.values()
    }
}

/// The ledger of the JSON-lines file at `jsonl`.
pub fn ledger_path(jsonl: &Path) -> PathBuf {
    jsonl.with_extension("batches")
}

/// Creates the ledger of `jsonl`, opening with `carried` as `u` entries,
/// and opens it for appending.
pub fn create(jsonl: &Path, carried: &Unrecorded) -> io::Result<std::fs::File> {
    let path = ledger_path(jsonl);
    let tmp = path.with_extension("batches.tmp");
    let mut text = String::with_capacity(carried.len() * 48);
    for k in carried.keys() {
        text.push_str("u\t");
        text.push_str(&k.fields());
        text.push('\n');
    }
    for k in carried.keys().filter(|k| carried.was_resent(k)) {
        text.push_str("r\t");
        text.push_str(&k.fields());
        text.push('\n');
    }
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    OpenOptions::new().append(true).open(&path)
}

/// Appends that `key`'s lines were written and end at byte `end`, and
/// (first) whether its push was marked `resent`.
pub fn append_written(
    ledger: &mut std::fs::File,
    end: u64,
    key: &BatchKey,
    resent: bool,
) -> io::Result<()> {
    let fields = key.fields();
    let entry = if resent {
        format!("r\t{fields}\nw\t{end}\t{fields}\n")
    } else {
        format!("w\t{end}\t{fields}\n")
    };
    ledger.write_all(entry.as_bytes())
}

/// What one ledger says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Entries {
    carried: Vec<BatchKey>,
    written: Vec<BatchKey>,
    /// Batches of `r` entries.
    resent: Vec<BatchKey>,
    /// Where the last `w` entry's lines end.
    last_end: Option<u64>,
    /// Lines that are not entries (a torn last line, damage).
    bad: usize,
}

fn read_entries(text: &str) -> Entries {
    let mut e = Entries::default();
    for line in text.split_inclusive('\n') {
        // A line without its newline was cut short by a crash.
        let Some(line) = line.strip_suffix('\n') else {
            e.bad += 1;
            continue;
        };
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["u", epoch, seq, agent] => match BatchKey::parse(epoch, seq, agent) {
                Some(k) => e.carried.push(k),
                None => e.bad += 1,
            },
            ["r", epoch, seq, agent] => match BatchKey::parse(epoch, seq, agent) {
                Some(k) => e.resent.push(k),
                None => e.bad += 1,
            },
            ["w", end, epoch, seq, agent] => {
                match (end.parse::<u64>(), BatchKey::parse(epoch, seq, agent)) {
                    (Ok(end), Some(k)) => {
                        e.written.push(k);
                        e.last_end = Some(end);
                    }
                    _ => e.bad += 1,
                }
            }
            _ => e.bad += 1,
        }
    }
    e
}

/// What [`drop_batches`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Batches whose lines were removed.
    pub removed: Vec<BatchKey>,
    /// Bytes removed.
    pub bytes: u64,
    /// Batches asked for whose lines begin in the file before: left as
    /// they are.
    pub left: Vec<BatchKey>,
    /// Batches asked for that the ledger carries from an earlier file.
    pub carried: Vec<BatchKey>,
}

/// Whether the first batch of `jsonl`'s ledger begins in it: `previous`
/// (the file written before it) is gone or ends where its ledger's last
/// entry does. A batch that filled a file goes on in the next, and its
/// entry is there: its first lines are after the last entry of the file
/// before.
pub fn first_batch_begins_in(previous: &Path) -> bool {
    let Ok(len) = std::fs::metadata(previous).map(|m| m.len()) else {
        return true;
    };
    match std::fs::read(ledger_path(previous)) {
        Ok(text) => {
            read_entries(&String::from_utf8_lossy(&text))
                .last_end
                .unwrap_or(0)
                == len
        }
        Err(_) => false,
    }
}

/// Removes from `jsonl` the lines of the batches in `drop` (copies that
/// another backend wrote too), and their ledger entries; the ends of the
/// entries after them move back. `begins_here`: the file's first batch
/// begins in it (see [`first_batch_begins_in`]); when it does not, that
/// batch is left.
///
/// Crash-safe: the new file and the new ledger are written whole beside
/// them (`.jsonl.new`, `.batches.new`) and renamed in that order;
/// [`finish_rewrites`] completes or undoes a rewrite a crash cut short.
pub fn drop_batches(
    jsonl: &Path,
    drop: &std::collections::HashSet<BatchKey>,
    begins_here: bool,
) -> io::Result<Dropped> {
    let ledger = ledger_path(jsonl);
    let text = String::from_utf8_lossy(&std::fs::read(&ledger)?).into_owned();
    let lines = std::fs::read(jsonl)?;
    let mut out = Dropped::default();
    let (mut kept, mut new_ledger) = (Vec::with_capacity(lines.len()), String::new());
    let mut prev_end = 0u64;
    let mut first = true;
    for line in text.split_inclusive('\n') {
        let f: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        let entry = match f.as_slice() {
            ["w", end, epoch, seq, agent] => end
                .parse::<u64>()
                .ok()
                .zip(BatchKey::parse(epoch, seq, agent)),
            _ => None,
        };
        let Some((end, key)) = entry else {
            if let ["u", epoch, seq, agent] = f.as_slice()
                && let Some(k) = BatchKey::parse(epoch, seq, agent)
                && drop.contains(&k)
            {
                out.carried.push(k);
            }
            new_ledger.push_str(line);
            continue;
        };
        let (start, stop) = (prev_end.min(end) as usize, (end as usize).min(lines.len()));
        let whole = !first || begins_here;
        first = false;
        prev_end = end;
        if drop.contains(&key) && whole && start <= stop {
            out.bytes += (stop - start) as u64;
            out.removed.push(key);
            continue;
        }
        if drop.contains(&key) {
            out.left.push(key.clone());
        }
        kept.extend_from_slice(&lines[start.min(stop)..stop]);
        new_ledger.push_str(&format!("w\t{}\t{}\n", kept.len(), key.fields()));
    }
    if out.removed.is_empty() {
        return Ok(out);
    }
    // Bytes after the last entry (none once `recover` ran) stay.
    kept.extend_from_slice(&lines[(prev_end as usize).min(lines.len())..]);
    let (jsonl_new, ledger_new) = (
        jsonl.with_extension("jsonl.new"),
        ledger.with_extension("batches.new"),
    );
    write_synced(&jsonl_new, &kept)?;
    write_synced(&ledger_new, new_ledger.as_bytes())?;
    std::fs::rename(&jsonl_new, jsonl)?;
    std::fs::rename(&ledger_new, &ledger)?;
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Completes the rewrites of [`drop_batches`] in `dir` that a crash cut
/// short: a new ledger whose file was renamed into place is renamed too;
/// a rewrite that had not renamed its file is thrown away.
pub fn finish_rewrites(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".batches.new") else {
            continue;
        };
        let jsonl_new = dir.join(format!("{stem}.jsonl.new"));
        if jsonl_new.exists() {
            std::fs::remove_file(&jsonl_new)?;
            std::fs::remove_file(&path)?;
        } else {
            std::fs::rename(&path, dir.join(format!("{stem}.batches")))?;
        }
    }
    Ok(())
}

/// What [`recover`] found and did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Batches that may be written and unrecorded.
    pub unrecorded: Unrecorded,
    /// Bytes of lines cut off (batches never recorded).
    pub cut_bytes: u64,
    /// Files those bytes were cut from.
    pub cut_files: Vec<PathBuf>,
    /// Ledger lines that were not entries.
    pub bad_lines: usize,
}

/// Reads the newest ledgers among `files` (every `(stamp, n)` of a
/// `metrics-<stamp>-<n>.jsonl` in the directory, with its path): cuts the
/// lines written after the newest `w` entry, and returns the batches that
/// may be written and unrecorded.
pub fn recover(mut files: Vec<((String, u64), PathBuf)>) -> io::Result<Recovered> {
    let mut r = Recovered::default();
    files.sort_unstable();
    // Newest first, while each file has its ledger (files of a version
    // without ledgers are left alone).
    let mut newest = true;
    for (_, jsonl) in files.iter().rev() {
        let text = match std::fs::read(ledger_path(jsonl)) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        };
        let e = read_entries(&text);
        r.bad_lines += e.bad;
        if newest {
            newest = false;
            for k in e.carried.iter().chain(&e.written) {
                r.unrecorded.insert(k.clone());
            }
            for k in &e.resent {
                if r.unrecorded.contains(k) {
                    r.unrecorded.resent.insert(k.clone());
                }
            }
        }
        let keep = e.last_end.unwrap_or(0);
        let len = std::fs::metadata(jsonl)?.len();
        if len > keep {
            OpenOptions::new().write(true).open(jsonl)?.set_len(keep)?;
            r.cut_bytes += len - keep;
            r.cut_files.push(jsonl.clone());
        }
        if e.last_end.is_some() {
            break;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> BatchKey {
        BatchKey {
            agent: "agt_1".into(),
            epoch: 7,
            seq,
        }
    }

    #[test]
    fn entries_read_back_and_damage_is_counted_not_trusted() {
        let text = "u\t7\t1\tagt_1\nw\t120\t7\t2\tagt_1\nw\t240\t7\t3\tagt_1\nw\tx\t7\t4\tagt_1\nu\t7\t5\tagt 1\nzz\nw\t300\t7\t6\tag";
        let e = read_entries(text);
        assert_eq!(e.carried, vec![key(1)]);
        assert_eq!(e.written, vec![key(2), key(3)]);
        assert_eq!(e.last_end, Some(240));
        // A bad end, a space in an agent, an unknown entry, a torn line.
        assert_eq!(e.bad, 4);
    }

    #[test]
    fn the_oldest_is_forgotten_at_the_bound() {
        let mut u = Unrecorded::default();
        for s in 0..MAX_UNRECORDED as u64 + 3 {
            u.insert(key(s));
        }
        assert_eq!(u.len(), MAX_UNRECORDED);
        assert_eq!(u.forgotten, 3);
        assert!(!u.contains(&key(2)) && u.contains(&key(3)));
        u.remove(&key(3));
        assert_eq!(u.keys().next(), Some(&key(4)));
        u.insert(key(4));
        assert_eq!(u.len(), MAX_UNRECORDED - 1);
    }

    fn jsonl(dir: &Path, stamp: &str, n: u64, body: &str) -> ((String, u64), PathBuf) {
        let p = dir.join(format!("metrics-{stamp}-{n:06}.jsonl"));
        std::fs::write(&p, body).unwrap();
        ((stamp.to_string(), n), p)
    }

    #[test]
    fn lines_after_the_newest_entry_are_cut_and_only_the_newest_ledger_counts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A file of a version without ledgers: left alone.
        let old = jsonl(d, "20000101T000000Z", 1, "old\n");
        // Start 2: file 1 holds batch 1 and the first half of batch 2;
        // file 2 the rest of batch 2 and batch 3 cut short by a crash.
        let f1 = jsonl(d, "20200101T000000Z", 1, "b1\nb2a\n");
        std::fs::write(ledger_path(&f1.1), "u\t7\t9\tagt_2\nw\t3\t7\t1\tagt_1\n").unwrap();
        let f2 = jsonl(d, "20200101T000000Z", 2, "b2b\nb3-torn");
        std::fs::write(ledger_path(&f2.1), "u\t7\t1\tagt_1\nw\t4\t7\t2\tagt_1\n").unwrap();
        let r = recover(vec![f2.clone(), old.clone(), f1.clone()]).unwrap();
        assert_eq!(std::fs::read_to_string(&f2.1).unwrap(), "b2b\n");
        assert_eq!(std::fs::read_to_string(&f1.1).unwrap(), "b1\nb2a\n");
        assert_eq!(std::fs::read_to_string(&old.1).unwrap(), "old\n");
        assert_eq!(r.cut_bytes, 7);
        assert_eq!(r.cut_files, vec![f2.1.clone()]);
        let keys: Vec<_> = r.unrecorded.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![key(1), key(2)],
            "agt_2's batch was recorded before file 2"
        );

        // A crash right after file 3 opened, in the middle of a batch
        // begun in file 2: both hold lines of no entry.
        std::fs::write(&f2.1, "b2b\nb3a\n").unwrap();
        let f3 = jsonl(d, "20200101T000000Z", 3, "b3b\n");
        std::fs::write(ledger_path(&f3.1), "u\t7\t2\tagt_1\n").unwrap();
        let r = recover(vec![f1.clone(), f2.clone(), f3.clone()]).unwrap();
        assert_eq!(std::fs::read_to_string(&f3.1).unwrap(), "");
        assert_eq!(std::fs::read_to_string(&f2.1).unwrap(), "b2b\n");
        assert_eq!(r.cut_bytes, 8);
        let keys: Vec<_> = r.unrecorded.keys().cloned().collect();
        assert_eq!(keys, vec![key(2)]);

        // Carried entries round-trip through a new ledger.
        let f4 = d.join("metrics-20210101T000000Z-000001.jsonl");
        let mut l = create(&f4, &r.unrecorded).unwrap();
        append_written(&mut l, 10, &key(3), false).unwrap();
        let e = read_entries(&std::fs::read_to_string(ledger_path(&f4)).unwrap());
        assert_eq!(
            (e.carried, e.written, e.bad),
            (vec![key(2)], vec![key(3)], 0)
        );
    }

    #[test]
    fn copies_are_cut_out_and_the_entries_after_them_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Batch 1 (began in the file before), 2, 3 and 4; a carried 9.
        let f = jsonl(d, "20200101T000000Z", 2, "1b\n2\n2\n3\n4\n");
        std::fs::write(
            ledger_path(&f.1),
            "u\t7\t9\tagt_1\nw\t3\t7\t1\tagt_1\nw\t7\t7\t2\tagt_1\nw\t9\t7\t3\tagt_1\nw\t11\t7\t4\tagt_1\n",
        )
        .unwrap();
        let drop = [key(1), key(2), key(4), key(9), key(5)]
            .into_iter()
            .collect();
        let d1 = drop_batches(&f.1, &drop, false).unwrap();
        assert_eq!((d1.removed, d1.bytes), (vec![key(2), key(4)], 6));
        // 1 began in the file before, 9 is in an older file, 5 is nowhere.
        assert_eq!((d1.left, d1.carried), (vec![key(1)], vec![key(9)]));
        assert_eq!(std::fs::read_to_string(&f.1).unwrap(), "1b\n3\n");
        let e = read_entries(&std::fs::read_to_string(ledger_path(&f.1)).unwrap());
        assert_eq!(
            (e.carried, e.written, e.last_end),
            (vec![key(9)], vec![key(1), key(3)], Some(5))
        );
        // The first file of a start holds its first batch whole.
        let d2 = drop_batches(&f.1, &[key(1)].into_iter().collect(), true).unwrap();
        assert_eq!((d2.removed, d2.bytes), (vec![key(1)], 3));
        assert_eq!(std::fs::read_to_string(&f.1).unwrap(), "3\n");
        assert!(!d.join("metrics-20200101T000000Z-000002.jsonl.new").exists());
    }

    #[test]
    fn a_rewrite_cut_short_is_finished_or_thrown_away() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Cut short after the file's rename: the new ledger goes in.
        let a = jsonl(d, "20200101T000000Z", 1, "kept\n");
        std::fs::write(ledger_path(&a.1), "w\t9\t7\t1\tagt_1\nw\t14\t7\t2\tagt_1\n").unwrap();
        std::fs::write(a.1.with_extension("batches.new"), "w\t5\t7\t2\tagt_1\n").unwrap();
        // Cut short before it: both new files go.
        let b = jsonl(d, "20200101T000000Z", 2, "old\n");
        std::fs::write(ledger_path(&b.1), "w\t4\t7\t3\tagt_1\n").unwrap();
        std::fs::write(b.1.with_extension("jsonl.new"), "").unwrap();
        std::fs::write(b.1.with_extension("batches.new"), "").unwrap();
        finish_rewrites(d).unwrap();
        assert_eq!(
            std::fs::read_to_string(ledger_path(&a.1)).unwrap(),
            "w\t5\t7\t2\tagt_1\n"
        );
        assert_eq!(
            std::fs::read_to_string(ledger_path(&b.1)).unwrap(),
            "w\t4\t7\t3\tagt_1\n"
        );
        assert_eq!(std::fs::read_to_string(&b.1).unwrap(), "old\n");
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".new"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_batch_from_a_resent_push_is_known_as_such_across_files_and_starts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Batch 1 from a first push, 2 from a resent one; 3 resent and torn.
        let f1 = d.join("metrics-20200101T000000Z-000001.jsonl");
        std::fs::write(&f1, "1\n2\n").unwrap();
        let mut l = create(&f1, &Unrecorded::default()).unwrap();
        append_written(&mut l, 2, &key(1), false).unwrap();
        append_written(&mut l, 4, &key(2), true).unwrap();
        l.write_all(b"r\t7\t3\tagt_1\n").unwrap();
        let r = recover(vec![(("20200101T000000Z".into(), 1), f1.clone())]).unwrap();
        let keys: Vec<_> = r.unrecorded.keys().cloned().collect();
        assert_eq!(keys, vec![key(1), key(2)]);
        assert!(!r.unrecorded.was_resent(&key(1)));
        assert!(r.unrecorded.was_resent(&key(2)));
        assert!(
            !r.unrecorded.was_resent(&key(3)),
            "an r of no batch means nothing"
        );
        // Carried into the next file (the next start's), it stays resent;
        // recorded, it is forgotten with its mark.
        let f2 = d.join("metrics-20200102T000000Z-000001.jsonl");
        std::fs::write(&f2, "").unwrap();
        create(&f2, &r.unrecorded).unwrap();
        let mut r2 = recover(vec![
            (("20200101T000000Z".into(), 1), f1),
            (("20200102T000000Z".into(), 1), f2),
        ])
        .unwrap();
        assert!(r2.unrecorded.was_resent(&key(2)) && !r2.unrecorded.was_resent(&key(1)));
        r2.unrecorded.remove(&key(2));
        r2.unrecorded.insert(key(2));
        assert!(!r2.unrecorded.was_resent(&key(2)));
    }

    #[test]
    fn a_file_s_first_batch_begins_in_it_unless_the_file_before_holds_lines_after_its_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_, gone) = jsonl(d, "20200101T000000Z", 1, "");
        std::fs::remove_file(&gone).unwrap();
        assert!(first_batch_begins_in(&gone), "no file before");
        let (_, whole) = jsonl(d, "20200101T000000Z", 2, "1\n");
        std::fs::write(ledger_path(&whole), "w\t2\t7\t1\tagt_1\n").unwrap();
        assert!(first_batch_begins_in(&whole));
        let (_, spans) = jsonl(d, "20200101T000000Z", 3, "1\n2a\n");
        std::fs::write(ledger_path(&spans), "w\t2\t7\t1\tagt_1\n").unwrap();
        assert!(!first_batch_begins_in(&spans), "batch 2 began in it");
        let (_, unknown) = jsonl(d, "20200101T000000Z", 4, "1\n");
        assert!(
            !first_batch_begins_in(&unknown),
            "a file without its ledger"
        );
    }
}
