//! A throwaway PostgreSQL from Debian's packages (`postgresql`), started
//! by a test on a loopback port: [`Postgres::start`] runs `initdb` into a
//! temporary directory and starts the server there; each test then takes
//! a database of its own ([`Postgres::fresh_database`]), so tests share no
//! state. Dropping it stops the server and removes the directory, whether
//! the test passed or panicked.
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and the server run
//! as the `postgres` user the package creates (the directory is handed to
//! it); as anyone else, as that user. The server is tuned for tests, not
//! durability (`fsync=off`): what a test checks is the store's logic, and
//! a crash of this machine ends the test anyway.

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates, whose password is [`PASSWORD`].
pub const USER: &str = "uplink";
/// The superuser's password (the server asks for it: scram-sha-256).
pub const PASSWORD: &str = "pg-test-secret-7c1d";

/// A running PostgreSQL server, stopped and removed when dropped.
pub struct Postgres {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
}

/// Where Debian installs the server's programs: the newest major version
/// under `/usr/lib/postgresql`.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    })
}

/// The user and group the server runs as: `postgres` when this process is
/// root, else this process's own.
fn server_owner() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    let uid = id(&["-u", "postgres"])
        .unwrap_or_else(|| panic!("running as root and there is no `postgres` user to run PostgreSQL as (apt-get install postgresql creates it)"));
    let gid = id(&["-g", "postgres"]).unwrap_or_else(|| panic!("no group of user `postgres`"));
    Some((uid, gid))
}

/// `program` run as the server's owner.
fn as_owner(program: &Path, owner: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    // The server reads no locale or home of the test's user.
    cmd.env_remove("PGDATA").env("LC_ALL", "C");
    cmd
}

/// Starts the server of the cluster in `dir/data` on `port`, its socket
/// in `dir`, its log appended to `dir/server.log`.
fn spawn_server(bin: &Path, owner: Option<(u32, u32)>, dir: &Path, port: u16) -> Child {
    let log_path = dir.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("open {log_path:?}: {e}"));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("{log_path:?}: {e}"));
    as_owner(&bin.join("postgres"), owner)
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-k")
        .arg(dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
        .args(["-c", "max_connections=200"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .unwrap_or_else(|e| panic!("postgres does not start: {e}"))
}

impl Postgres {
    /// Makes a cluster in a temporary directory and starts the server on a
    /// free loopback port; returns once it accepts connections.
    pub async fn start() -> Postgres {
        let bin = bin_dir();
        let owner = server_owner();
        let mut dir = tempfile::Builder::new()
            .prefix("uplink-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("no temporary directory for PostgreSQL: {e}"));
        if let Some((uid, gid)) = owner {
            chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap_or_else(|e| panic!("write {pwfile:?}: {e}"));
        if let Some((uid, gid)) = owner {
            chown(&pwfile, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {pwfile:?}: {e}"));
        }
        let data = dir.path().join("data");
        let out = as_owner(&bin.join("initdb"), owner)
            .arg("-D")
            .arg(&data)
            .args(["--no-sync", "--auth=scram-sha-256", "--username", USER])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap_or_else(|e| panic!("initdb does not start: {e}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port taken between `free_port` and the server's bind is
        // retried on another.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = crate::free_port();
            let child = spawn_server(&bin, owner, dir.path(), port);
            let mut pg = Postgres {
                child,
                port,
                dir,
                bin: bin.clone(),
                owner,
            };
            match pg.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return pg,
                Err(why) => {
                    last_log = format!("{why}; server log:\n{}", pg.log());
                    // Stopped on drop; its directory is kept for the retry.
                    dir = pg.take_dir();
                }
            }
        }
        panic!("PostgreSQL did not start: {last_log}")
    }

    /// Stops the server (a fast shutdown: its sessions are cut) and starts
    /// it again on the same port and data; returns once it accepts logins.
    pub async fn restart(&mut self) {
        self.stop_server();
        self.start_again().await;
    }

    /// Stops the server; [`Postgres::start_again`] brings it back.
    pub fn stop_server(&mut self) {
        self.stop();
    }

    /// Starts the stopped server again on its port and data.
    pub async fn start_again(&mut self) {
        self.child = spawn_server(&self.bin, self.owner, self.dir.path(), self.port);
        if let Err(why) = self.wait_ready(Duration::from_secs(30)).await {
            panic!(
                "PostgreSQL did not start again: {why}; server log:\n{}",
                self.log()
            );
        }
    }

    /// Waits until the server answers a login, or it exits, or `timeout`.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the server exited ({status})"));
            }
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    drop(client);
                    let _ = conn.await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no login within {timeout:?}: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of database `db` with another password (refused).
    pub fn url_with_password(&self, db: &str, password: &str) -> String {
        format!("postgres://{USER}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database of its own for the caller; its URL.
    pub async fn fresh_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.execute("postgres", &format!("CREATE DATABASE {name}"))
            .await;
        self.url(&name)
    }

    /// Runs `sql` (one or more statements) in database `db`.
    pub async fn execute(&self, db: &str, sql: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db} on port {}: {e}", self.port));
        let conn = tokio::spawn(conn);
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        drop(client);
        let _ = conn.await;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server and hands over its directory (for a retry).
    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop();
        let placeholder =
            tempfile::tempdir().unwrap_or_else(|e| panic!("no temporary directory: {e}"));
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Fast shutdown (SIGINT: sessions are ended, the server exits), then
    /// SIGKILL if it is still there after 10 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        // The directory (owned by postgres) goes with `self.dir`.
    }
}

/// The replica id in a backend's "publishing presence" log line
/// (`AgentView.replica` of the agents it holds).
pub fn replica_in_log(line: &str) -> String {
    line.split("replica=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the replica id in the log")
        .trim_matches('"')
        .to_string()
}
