//! The agent's journal: which command ids it has accepted and finished,
//! kept on disk so that a command runs at most once, even across restarts.
//!
//! One JSON object per line, appended and synced before the agent
//! acknowledges or reports:
//!
//! - `{"a":SEQ,"id":"ID"}`: command accepted (about to execute);
//! - `{"d":"ID","s":STATUS,"m":"MESSAGE"}`: command finished;
//! - `{"r":"ID"}`: its result reached the backend (not synced: losing it
//!   only means the result is sent again, and the backend ignores that);
//! - `{"ack":SEQ}`: written first by compaction (entries below were
//!   dropped).
//!
//! A torn last line (crash in the middle of a write) or a corrupt line is
//! skipped, counted and located (byte offsets, for the open-time warning),
//! never a panic; the file is then rewritten without it, as it is when its
//! last line lacks the newline, so the next append starts a line of its
//! own. The file is compacted when it grows past [`COMPACT_BYTES`],
//! keeping the newest [`KEEP_ENTRIES`] entries; the backend never
//! redelivers a command at or below the ack, so older ids are not needed to
//! recognise duplicates.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Size past which the journal is rewritten.
pub const COMPACT_BYTES: u64 = 1024 * 1024;
/// Entries kept by compaction.
pub const KEEP_ENTRIES: usize = 4096;
/// Byte offsets of skipped lines kept for the open-time warning.
pub const MAX_SKIPPED_OFFSETS: usize = 16;

/// What the journal knows of one command id.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub seq: u64,
    /// Status and message once finished.
    pub done: Option<(i32, String)>,
    /// True once the backend stored the result.
    pub reported: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Accepted { a: u64, id: String },
    Done { d: String, s: i32, m: String },
    Reported { r: String },
    Ack { ack: u64 },
}

/// What to do with a delivered command.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// New: accept and execute. `skipped` counts seqs between the ack and
    /// this one; the backend delivers in order from the highest ack it
    /// holds, so a skip means this journal is behind what the agent once
    /// acknowledged (a lost or restored state dir), never a lost command.
    Execute { skipped: u64 },
    /// Already accepted (a redelivery): do not execute again.
    Duplicate,
    /// A seq at or below the ack under an id this journal never saw: the
    /// backend reused a seq (its store lost commits). Not executed; the
    /// command gets a failure result that says so.
    Reused,
}

/// The journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    size: u64,
    ack: u64,
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
    /// Lines skipped at open because they were torn or corrupt.
    pub skipped_lines: u64,
    /// Where the first [`MAX_SKIPPED_OFFSETS`] skipped lines started, in
    /// bytes from the start of the file as it was before open rewrote it.
    pub skipped_at: Vec<u64>,
    /// Set between a compaction's rename and the reopen of the new file.
    needs_reopen: bool,
}

impl Journal {
    /// Opens (creating) the journal at `path`.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut ack = 0;
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut order = VecDeque::new();
        let mut skipped = 0;
        let mut skipped_at = Vec::new();
        let mut offset = 0u64;
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                let start = offset;
                offset += line.len() as u64 + 1;
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Line>(&line) {
                    Ok(Line::Ack { ack: a }) => ack = ack.max(a),
                    Ok(Line::Accepted { a, id }) => {
                        // Accepts are written in seq order: the highest is
                        // the ack, even if a line before it was damaged.
                        ack = ack.max(a);
                        if !entries.contains_key(&id) {
                            order.push_back(id.clone());
                        }
                        entries.insert(
                            id,
                            Entry {
                                seq: a,
                                done: None,
                                reported: false,
                            },
                        );
                    }
                    Ok(Line::Reported { r }) => {
                        if let Some(e) = entries.get_mut(&r) {
                            e.reported = true;
                        }
                    }
                    Ok(Line::Done { d, s, m }) => {
                        if let Some(e) = entries.get_mut(&d) {
                            e.done = Some((s, m));
                        }
                    }
                    Err(_) => {
                        skipped += 1;
                        if skipped_at.len() < MAX_SKIPPED_OFFSETS {
                            skipped_at.push(start);
                        }
                    }
                }
            }
        }
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path)?;
        let size = file.metadata()?.len();
        let mut j = Journal {
            path: path.to_path_buf(),
            file,
            size,
            ack,
            entries,
            order,
            skipped_lines: skipped,
            skipped_at,
            needs_reopen: false,
        };
        // `offset` counts a newline after every line, the last one too: a
        // file longer than that ends in a line without its newline (a
        // write torn just before it), to which an append would be glued.
        if skipped > 0 || size != offset {
            // Rewrite without the bad lines, so appends start on a clean line.
            j.compact()?;
        }
        Ok(j)
    }

    /// Highest contiguous seq accepted.
    pub fn ack(&self) -> u64 {
        self.ack
    }

    /// What is known of `id`.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Commands accepted but never finished: the agent stopped while they
    /// ran. They are not run again.
    pub fn unfinished(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| e.done.is_none())
            .map(|(id, e)| (id.clone(), e.seq))
            .collect();
        v.sort_by_key(|(_, s)| *s);
        v
    }

    /// Decides what to do with command `id` at `seq`.
    pub fn decide(&self, seq: u64, id: &str) -> Decision {
        if self.entries.contains_key(id) {
            Decision::Duplicate
        } else if seq <= self.ack {
            // Ids older than the compaction window are forgotten; those
            // seqs are far below anything the backend still delivers.
            if self.oldest_seq().is_some_and(|o| seq < o) {
                Decision::Duplicate
            } else {
                Decision::Reused
            }
        } else {
            Decision::Execute {
                skipped: seq - self.ack - 1,
            }
        }
    }

    fn oldest_seq(&self) -> Option<u64> {
        self.order
            .front()
            .and_then(|id| self.entries.get(id))
            .map(|e| e.seq)
    }

    fn append(&mut self, line: &Line) -> std::io::Result<()> {
        if self.needs_reopen {
            self.file = OpenOptions::new().append(true).open(&self.path)?;
            self.size = self.file.metadata()?.len();
            self.needs_reopen = false;
        }
        let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cut a partial line, so the next append starts clean.
            let _ = self.file.set_len(self.size);
            return Err(e);
        }
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Durably records that `id` (at `seq`, above the ack) is accepted.
    /// After this returns, the command is never executed again.
    pub fn accept(&mut self, seq: u64, id: &str) -> std::io::Result<()> {
        self.append(&Line::Accepted {
            a: seq,
            id: id.to_string(),
        })?;
        self.ack = self.ack.max(seq);
        self.entries.insert(
            id.to_string(),
            Entry {
                seq,
                done: None,
                reported: false,
            },
        );
        self.order.push_back(id.to_string());
        if self.size > COMPACT_BYTES {
            // The accept is durable already; a failed compaction only
            // leaves a longer file, and is tried again later.
            if let Err(e) = self.compact() {
                tracing::warn!(path = %self.path.display(), error = %e, "journal compaction failed; will retry");
            }
        }
        Ok(())
    }

    /// Durably records how `id` ended.
    pub fn finish(&mut self, id: &str, status: i32, message: &str) -> std::io::Result<()> {
        if let Some(e) = self.entries.get_mut(id) {
            e.done = Some((status, message.to_string()));
        } else {
            return Ok(());
        }
        self.append(&Line::Done {
            d: id.to_string(),
            s: status,
            m: message.to_string(),
        })
    }

    /// Finished commands whose result may not have reached the backend.
    pub fn unreported(&self) -> Vec<(String, u64, i32, String)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.reported)
            .filter_map(|(id, e)| {
                e.done
                    .as_ref()
                    .map(|(s, m)| (id.clone(), e.seq, *s, m.clone()))
            })
            .collect();
        v.sort_by_key(|(_, seq, _, _)| *seq);
        v
    }

    /// Records that the backend stored the result of `id`.
    pub fn mark_reported(&mut self, id: &str) -> std::io::Result<()> {
        match self.entries.get_mut(id) {
            Some(e) if !e.reported => e.reported = true,
            _ => return Ok(()),
        }
        let mut bytes = serde_json::to_vec(&Line::Reported { r: id.to_string() })
            .map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        self.file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Rewrites the journal with the newest entries only (write a temporary
    /// file, sync, rename over).
    pub fn compact(&mut self) -> std::io::Result<()> {
        // Only entries whose result reached the backend may go: anything
        // running, unfinished or unreported must survive a restart.
        while self.order.len() > KEEP_ENTRIES {
            let settled = self
                .order
                .front()
                .and_then(|id| self.entries.get(id))
                .is_some_and(|e| e.done.is_some() && e.reported);
            if !settled {
                break;
            }
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            let mut out = Vec::new();
            let mut line = |l: &Line| -> std::io::Result<()> {
                out.extend(serde_json::to_vec(l).map_err(std::io::Error::other)?);
                out.push(b'\n');
                Ok(())
            };
            // Ack first, so it is known even when its entry was dropped.
            let base = self
                .order
                .front()
                .and_then(|id| self.entries.get(id))
                .map(|e| e.seq.saturating_sub(1).min(self.ack))
                .unwrap_or(self.ack);
            line(&Line::Ack { ack: base })?;
            for id in &self.order {
                if let Some(e) = self.entries.get(id) {
                    line(&Line::Accepted {
                        a: e.seq,
                        id: id.clone(),
                    })?;
                    if let Some((s, m)) = &e.done {
                        line(&Line::Done {
                            d: id.clone(),
                            s: *s,
                            m: m.clone(),
                        })?;
                    }
                    if e.reported {
                        line(&Line::Reported { r: id.clone() })?;
                    }
                }
            }
            f.write_all(&out)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        // From here the old handle points at the replaced file: until the
        // new one is open, appends must not use it.
        self.needs_reopen = true;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.size = self.file.metadata()?.len();
        self.needs_reopen = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_commands_are_remembered_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        {
            let mut j = Journal::open(&p).unwrap();
            assert_eq!(j.decide(1, "c1"), Decision::Execute { skipped: 0 });
            j.accept(1, "c1").unwrap();
            j.finish("c1", 1, "pong").unwrap();
            j.accept(2, "c2").unwrap();
        }
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.ack(), 2);
        assert_eq!(j.decide(1, "c1"), Decision::Duplicate);
        assert_eq!(j.decide(2, "c2"), Decision::Duplicate);
        assert_eq!(j.get("c1").unwrap().done, Some((1, "pong".into())));
        assert_eq!(j.unfinished(), vec![("c2".to_string(), 2)]);
        assert_eq!(
            j.unreported(),
            vec![("c1".to_string(), 1, 1, "pong".to_string())]
        );
        assert_eq!(j.decide(3, "c3"), Decision::Execute { skipped: 0 });
        assert_eq!(j.decide(5, "c5"), Decision::Execute { skipped: 2 });
        assert_eq!(j.decide(2, "other"), Decision::Reused);
    }

    #[test]
    fn a_damaged_line_in_the_middle_keeps_the_highest_ack() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        {
            let mut j = Journal::open(&p).unwrap();
            for s in 1..=3 {
                j.accept(s, &format!("c{s}")).unwrap();
            }
        }
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"c2\"", "\"c2");
        std::fs::write(&p, text).unwrap();
        let j = Journal::open(&p).unwrap();
        assert_eq!((j.ack(), j.skipped_lines), (3, 1));
    }

    #[test]
    fn a_torn_tail_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        {
            let mut j = Journal::open(&p).unwrap();
            j.accept(1, "c1").unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"a\":2,\"id\":\"c").unwrap();
        drop(f);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(j.skipped_lines, 1);
        assert_eq!(j.ack(), 1);
        j.accept(2, "c2").unwrap();
        let j = Journal::open(&p).unwrap();
        assert_eq!((j.ack(), j.skipped_lines), (2, 0));
    }

    #[test]
    fn compaction_keeps_the_ack_and_recent_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        let n = KEEP_ENTRIES as u64 + 100;
        for seq in 1..=n {
            j.accept(seq, &format!("c{seq}")).unwrap();
            j.finish(&format!("c{seq}"), 1, "").unwrap();
            if seq > 1 {
                j.mark_reported(&format!("c{seq}")).unwrap();
            }
        }
        j.compact().unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.ack(), n);
        // c1 was never reported: it stays, and blocks dropping what follows.
        assert!(j.get("c1").is_some());
        assert!(j.get(&format!("c{n}")).is_some());
        assert_eq!(j.decide(1, "c1"), Decision::Duplicate);
        drop(j);
        let mut j = Journal::open(&p).unwrap();
        j.mark_reported("c1").unwrap();
        j.compact().unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.ack(), n);
        assert!(j.get("c1").is_none() && j.get("c2").is_none());
        // Old seqs are still duplicates by seq.
        assert_eq!(j.decide(1, "c1"), Decision::Duplicate);
    }

    /// A journal of accepts, finishes and reports, and each line of its
    /// file: where it starts and ends (without the newline) and what it says.
    fn written_journal(dir: &Path) -> (Vec<u8>, Vec<(usize, usize, Line)>) {
        let p = dir.join("pristine");
        let mut j = Journal::open(&p).unwrap();
        for seq in 1..=8 {
            let id = format!("cmd-{seq}");
            j.accept(seq, &id).unwrap();
            if seq % 3 != 0 {
                j.finish(&id, seq as i32, &format!("out {seq}")).unwrap();
            }
            if seq % 2 == 0 {
                j.mark_reported(&id).unwrap();
            }
            if seq == 4 {
                // Also an ack line, as a compaction writes first.
                j.compact().unwrap();
            }
        }
        drop(j);
        let bytes = std::fs::read(&p).unwrap();
        let mut lines = Vec::new();
        let mut start = 0;
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'\n' {
                lines.push((start, i, serde_json::from_slice(&bytes[start..i]).unwrap()));
                start = i + 1;
            }
        }
        assert_eq!(start, bytes.len());
        (bytes, lines)
    }

    /// Lines of `bytes` that are not journal lines, with their offsets.
    fn unparsable(bytes: &[u8]) -> Vec<u64> {
        let mut at = Vec::new();
        let mut start = 0;
        for line in bytes.split(|b| *b == b'\n') {
            if !line.is_empty() && serde_json::from_slice::<Line>(line).is_err() {
                at.push(start as u64);
            }
            start += line.len() + 1;
        }
        at
    }

    /// Opens `bytes` as a journal and checks what at-most-once needs: every
    /// accept in `intact` lines is a duplicate (with its outcome when
    /// `outcomes`); no accepted seq at or below the highest intact one is
    /// executed again; the skipped lines are counted and located; the
    /// journal stays usable.
    fn open_damaged(
        dir: &Path,
        bytes: &[u8],
        intact: &[&(usize, usize, Line)],
        outcomes: bool,
        what: &str,
    ) {
        let p = dir.join("damaged");
        std::fs::write(&p, bytes).unwrap();
        let mut j = Journal::open(&p).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        let bad = unparsable(bytes);
        assert_eq!(j.skipped_lines, bad.len() as u64, "{what}: skipped count");
        assert_eq!(j.skipped_at, bad, "{what}: skipped offsets");
        let accepted = |id: &str| {
            intact
                .iter()
                .any(|(_, _, l)| matches!(l, Line::Accepted { id: a, .. } if a == id))
        };
        let mut highest = 0;
        for (_, _, line) in intact {
            match line {
                Line::Accepted { a, id } => {
                    highest = highest.max(*a);
                    assert_eq!(
                        j.decide(*a, id),
                        Decision::Duplicate,
                        "{what}: {id} forgotten"
                    );
                }
                // A finish counts only after its accept.
                Line::Done { d, s, m } if outcomes && accepted(d) => {
                    let done = j.get(d).and_then(|e| e.done.clone());
                    assert_eq!(done, Some((*s, m.clone())), "{what}: outcome of {d}");
                }
                _ => {}
            }
        }
        assert!(
            j.ack() >= highest,
            "{what}: ack {} below {highest}",
            j.ack()
        );
        for seq in 1..=highest {
            let d = j.decide(seq, &format!("cmd-{seq}"));
            assert!(
                !matches!(d, Decision::Execute { .. }),
                "{what}: seq {seq} would run again"
            );
        }
        let next = j.ack() + 1;
        j.accept(next, "after").unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(
            (j.skipped_lines, j.ack()),
            (0, next),
            "{what}: after rewrite"
        );
        assert_eq!(j.decide(next, "after"), Decision::Duplicate, "{what}");
        for (_, _, line) in intact {
            if let Line::Accepted { a, id } = line {
                assert_eq!(
                    j.decide(*a, id),
                    Decision::Duplicate,
                    "{what}: {id} after rewrite"
                );
            }
        }
    }

    #[test]
    fn truncation_at_every_offset_keeps_every_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, lines) = written_journal(dir.path());
        for cut in 0..=bytes.len() {
            // A line whose text survives whole is intact, even without its
            // newline.
            let intact: Vec<_> = lines.iter().filter(|(_, end, _)| *end <= cut).collect();
            open_damaged(
                dir.path(),
                &bytes[..cut],
                &intact,
                true,
                &format!("cut at {cut}"),
            );
        }
    }

    #[test]
    fn a_flipped_byte_loses_at_most_the_lines_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, lines) = written_journal(dir.path());
        for at in 0..bytes.len() {
            for mask in [0x01, 0x20, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= mask;
                // The line holding the byte, and the next one when the byte
                // was the newline that ended it.
                let intact: Vec<_> = lines
                    .iter()
                    .filter(|(start, end, _)| !(*start..=*end).contains(&at) && *start != at + 1)
                    .collect();
                let what = format!("byte {at} ^ {mask:#x}");
                // A flip that still parses (a digit of a seq or status, a
                // letter of an id or message) cannot be told from a real
                // line: then only at-most-once is checked, not outcomes.
                let detectable = !unparsable(&damaged).is_empty();
                open_damaged(dir.path(), &damaged, &intact, detectable, &what);
            }
        }
    }

    /// A torn line followed by more appends (an older agent without the
    /// rewrite, or a copied file) is one skipped line, and nothing after
    /// it is lost.
    #[test]
    fn a_torn_line_in_the_middle_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, lines) = written_journal(dir.path());
        for (start, end, _) in &lines {
            for cut in *start + 1..*end {
                let mut damaged = bytes[..cut].to_vec();
                damaged.extend_from_slice(&bytes[*end..]);
                let intact: Vec<_> = lines.iter().filter(|(s, _, _)| s != start).collect();
                let what = format!("line at {start} torn at {cut}");
                open_damaged(dir.path(), &damaged, &intact, true, &what);
            }
        }
    }
}
