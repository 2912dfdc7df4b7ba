//! Throw-away Postgres for tests (feature `testing`): a private cluster started with
//! `initdb`/`pg_ctl`, or the server named by `DATABASE_URL`, handing out fresh databases.
//!
//! Never used by production code. It must never leave a running postgres behind, however the
//! test process ends; see [`PgCluster`] for how.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// Where Debian puts the Postgres server binaries: `/usr/lib/postgresql/<major>/bin`.
const PG_LIB: &str = "/usr/lib/postgresql";
/// The user `initdb` and the server run as (`initdb` refuses to run as root).
const PG_USER: &str = "postgres";

/// Runs once the write end of its stdin closes: when [`PgCluster`] is dropped, or when the test
/// process dies in any way (the kernel closes its descriptors, even after SIGKILL). It ignores
/// the terminal's signals so that a Ctrl-C, which reaches the whole process group, cannot kill
/// it before it has stopped the server. $1: cluster directory, $2: postgres bin directory.
const GUARD_SCRIPT: &str = r#"
trap '' INT TERM HUP QUIT
cat >/dev/null
if [ -f "$1/data/postmaster.pid" ]; then
    runuser -u postgres -- "$2/pg_ctl" -D "$1/data" -m immediate -w -t 30 stop >/dev/null 2>&1
fi
rm -rf -- "$1"
"#;

/// A Postgres server for tests, handing out fresh databases.
///
/// A private cluster lives in a fresh directory under `/tmp` owned by `postgres` (the server
/// needs to reach it, so not under `$TMPDIR`, which may be inside root's home), listens on
/// 127.0.0.1 on a free port and on a unix socket in that directory, and runs without fsync.
///
/// Stopping it does not rely on `Drop`, since a cluster kept in a `static` (one per test
/// process, the usual use) is never dropped: at start a small guard shell is spawned with a
/// pipe as stdin, and stops the server and removes the directory when the pipe closes. Drop
/// closes the pipe and waits for the guard; if the process dies instead, the kernel closes the
/// pipe and the guard does the same on its own a moment later.
pub struct PgCluster {
    /// A database to connect to when creating others.
    admin_url: String,
    first_url: String,
    next: AtomicU64,
    kind: Kind,
}

enum Kind {
    Local {
        port: u16,
        /// The cluster directory, the server binaries and the server's options, to stop and
        /// start it again on the same port.
        dir: PathBuf,
        bin: PathBuf,
        server_options: String,
        guard: Child,
        /// Held open for the guard; closing it stops the cluster.
        guard_stdin: Option<ChildStdin>,
    },
    External {
        /// The names of the databases this cluster created, dropped again on Drop.
        created: std::sync::Mutex<Vec<String>>,
    },
}

impl PgCluster {
    /// A throw-away cluster: initdb (as user `postgres`) into a fresh temp dir, pg_ctl start with
    /// a unix-socket dir of its own and a free loopback TCP port, a fresh database. If the
    /// environment variable DATABASE_URL is set, uses that server instead (creating a fresh
    /// database in it). Panics with a clear message when neither is possible.
    pub fn start() -> PgCluster {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => PgCluster::external(url),
            _ => PgCluster::start_local(),
        }
    }

    /// Always a private cluster, ignoring DATABASE_URL: for tests that stop the server.
    /// Needs root (to run `initdb` as `postgres`) and the Postgres server binaries.
    pub fn start_local() -> PgCluster {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PgCluster needs the Postgres server binaries in {PG_LIB}/*/bin \
                 (apt-get install postgresql), or DATABASE_URL naming a server"
            )
        });
        let dir = make_cluster_dir();
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("pg-guard")
            .arg(&dir)
            .arg(&bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("PgCluster: cannot spawn sh for the cleanup guard: {e}"));
        let guard_stdin = guard.stdin.take();
        // From here on, a panic drops `guard_stdin`, and the guard removes the directory.

        let data = dir.join("data");
        let out = as_postgres(&dir, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"])
            .output()
            .unwrap_or_else(|e| panic!("PgCluster: cannot run runuser for initdb: {e}"));
        assert!(
            out.status.success(),
            "PgCluster: initdb as user postgres failed ({}); a private cluster needs root: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // The port is free when chosen, but another process may take it before the server
        // binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let server_options = format!(
                "-k {dir} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off",
                dir = dir.display()
            );
            let started = as_postgres(&dir, &bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .arg("-o")
                .arg(&server_options)
                .args(["-w", "-t", "60", "start"])
                .output();
            match started {
                Ok(out) if out.status.success() => {
                    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    let mut cluster = PgCluster {
                        admin_url,
                        first_url: String::new(),
                        next: AtomicU64::new(0),
                        kind: Kind::Local {
                            port,
                            dir: dir.clone(),
                            bin: bin.clone(),
                            server_options,
                            guard,
                            guard_stdin,
                        },
                    };
                    cluster.first_url = cluster.new_database();
                    tracing::debug!(dir = %dir.display(), port, "test postgres cluster started");
                    return cluster;
                }
                Ok(out) => {
                    last_error = format!(
                        "pg_ctl start failed ({}): {}{}\nserver log:\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr),
                        std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                    );
                }
                Err(e) => last_error = format!("cannot run runuser/pg_ctl: {e}"),
            }
        }
        panic!(
            "PgCluster: could not start postgres in {}: {last_error}",
            dir.display()
        );
    }

    fn external(url: String) -> PgCluster {
        let mut cluster = PgCluster {
            admin_url: url,
            first_url: String::new(),
            next: AtomicU64::new(0),
            kind: Kind::External {
                created: std::sync::Mutex::new(Vec::new()),
            },
        };
        cluster.first_url = cluster.new_database();
        cluster
    }

    /// postgres:// URL of a fresh, empty database in the cluster (call as often as needed).
    pub fn new_database(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = match &self.kind {
            Kind::Local { .. } => format!("fleetscan_{n}"),
            // A shared server may hold databases of other test runs, even concurrent ones.
            Kind::External { .. } => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                format!("fleetscan_test_{}_{nanos}_{n}", std::process::id())
            }
        };
        execute_blocking(&self.admin_url, &format!("CREATE DATABASE \"{name}\"")).unwrap_or_else(
            |e| {
                panic!(
                    "PgCluster: cannot create a database via {}: {e} (a DATABASE_URL server must \
                     accept connections and grant CREATEDB)",
                    redact(&self.admin_url)
                )
            },
        );
        match &self.kind {
            Kind::Local { port, .. } => format!("postgres://postgres@127.0.0.1:{port}/{name}"),
            Kind::External { created } => {
                created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(name.clone());
                with_database(&self.admin_url, &name)
            }
        }
    }

    /// The first database created by start().
    pub fn url(&self) -> String {
        self.first_url.clone()
    }

    /// Stops the server (`pg_ctl stop -m fast`: connections are closed), keeping its data, to
    /// test what happens while the database is down. Private clusters only.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
    }

    /// Starts a server stopped by [`PgCluster::stop`] again, on the same port and data.
    pub fn start_again(&self) {
        self.pg_ctl(&["-w", "-t", "60", "start"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let Kind::Local {
            dir,
            bin,
            server_options,
            ..
        } = &self.kind
        else {
            panic!("PgCluster: only a private cluster (start_local) can be stopped and started");
        };
        let out = as_postgres(dir, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("-o")
            .arg(server_options)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("PgCluster: cannot run pg_ctl: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    /// pg_ctl stop -m immediate; remove the temp dir (a private cluster). Drops the databases
    /// it created (a DATABASE_URL server).
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::Local {
                guard, guard_stdin, ..
            } => {
                // The guard waits for end-of-file; closing its stdin is the signal.
                drop(guard_stdin.take());
                if let Err(e) = guard.wait() {
                    tracing::warn!(error = %e, "test postgres guard could not be waited for");
                }
            }
            Kind::External { created } => {
                let created = std::mem::take(created.get_mut().unwrap_or_else(|e| e.into_inner()));
                for name in created {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    if let Err(e) = execute_blocking(&self.admin_url, &sql) {
                        tracing::warn!(database = %name, error = %e, "could not drop test database");
                    }
                }
            }
        }
    }
}

/// The highest-versioned `/usr/lib/postgresql/<major>/bin` holding `initdb` and `pg_ctl`.
fn find_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_LIB)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A fresh directory under /tmp owned by `postgres`, to hold the data directory, the socket
/// and the log.
fn make_cluster_dir() -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = PathBuf::from(format!(
        "/tmp/fleetscan-pg-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir)
        .unwrap_or_else(|e| panic!("PgCluster: cannot create {}: {e}", dir.display()));
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir(&dir);
        panic!(
            "PgCluster: cannot give {} to user postgres ({e}); a private cluster needs root, \
             or set DATABASE_URL to a server",
            dir.display()
        )
    });
    dir
}

/// The uid and gid of the `postgres` user, asked of `id` rather than parsed from /etc/passwd
/// so that NSS sources other than files work too.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, PG_USER])
            .output()
            .unwrap_or_else(|e| panic!("PgCluster: cannot run id: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!(
                    "PgCluster: no user {PG_USER} (install postgresql, or set DATABASE_URL): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
    };
    (id("-u"), id("-g"))
}

/// `program` to be run as the `postgres` user, from `dir`: the server user cannot enter
/// root's home, which may be our working directory.
fn as_postgres(dir: &Path, program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", PG_USER, "--"])
        .arg(program)
        .current_dir(dir)
        .stdin(Stdio::null());
    command
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("PgCluster: cannot find a free port on 127.0.0.1: {e}"))
}

/// Runs one statement on its own connection, from synchronous code that may itself be running
/// inside a tokio runtime (a `#[tokio::test]`): hence a thread with a runtime of its own.
fn execute_blocking(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let mut conn = PgConnection::connect(url).await?;
                    sqlx::query(sql).execute(&mut conn).await?;
                    conn.close().await
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `url` with its database replaced by `name`, query parameters kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

fn redact(url: &str) -> String {
    crate::redact(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/db?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgresql://h:1/", "x"),
            "postgresql://h:1/x"
        );
    }
}
