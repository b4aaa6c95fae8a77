//! Another process holding a SQLite database's write lock, as a second
//! writer (or a stuck one) would.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `python3` holding the write lock of the SQLite database `db`
/// (`BEGIN IMMEDIATE`) for `secs` seconds, then rolling back; returns once
/// the lock is held. Kill the child to release it sooner.
pub fn hold_write_lock(db: &Path, secs: u64) -> Child {
    let mut lock = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             time.sleep(float(sys.argv[2]))\n\
             c.execute('ROLLBACK')\n",
        )
        .arg(db)
        .arg(secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lock.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked", "python3 did not take the write lock");
    lock
}
