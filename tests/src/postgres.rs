//! A PostgreSQL server started from `initdb`, password authentication only.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::process::{run, ServerProcess};
use crate::{free_port, temp_dir, LOCALHOST, START_TIMEOUT};

const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "rouse-test-superuser";

pub struct Postgres {
    // Declared before `dir`, so that the server dies before its directory goes.
    process: ServerProcess,
    port: u16,
    dir: TempDir,
}

impl Postgres {
    /// Runs `initdb`, then `postgres` on a free port of 127.0.0.1, and waits
    /// until `SELECT 1` succeeds.
    pub async fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let run_as = RunAs::when_root()?;
        let dir = temp_dir("rouse-postgres-")?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        let log = dir.path().join("postgres.log");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if let Some(user) = run_as {
            // initdb creates the data directory and postgres its socket and
            // lock files in here.
            user.chown(dir.path())?;
            user.chown(&pwfile)?;
        }
        let command = |program: &str| {
            let mut cmd = Command::new(bin.join(program));
            cmd.current_dir(dir.path());
            if let Some(user) = run_as {
                user.apply(&mut cmd);
            }
            cmd
        };

        let mut initdb = command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            // A fixed locale, whatever the environment's; no fsync of a throwaway cluster.
            .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
        run("initdb", initdb, &log, START_TIMEOUT).await?;

        let port = free_port(LOCALHOST);
        let mut postgres = command("postgres");
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-p", &port.to_string()])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()));
        let mut process = ServerProcess::spawn("postgres", postgres, &log)?;
        process
            .wait_ready(START_TIMEOUT, || async move {
                let client = connect(port, SUPERUSER, SUPERUSER_PASSWORD, "postgres").await?;
                client.simple_query("SELECT 1").await?;
                Ok(())
            })
            .await?;
        Ok(Postgres { process, port, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn superuser_password(&self) -> &str {
        SUPERUSER_PASSWORD
    }

    /// A connection over TCP; its driving task runs on the current runtime.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client> {
        connect(self.port, user, password, db).await
    }

    /// The temporary directory holding the cluster, the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect(NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL on port {port} as {user}"))?;
    // Connection errors also fail the client's calls, where tests see them.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `$POSTGRES_BIN_DIR`, else the directory of `initdb` on PATH, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
/// `$POSTGRES_BIN_DIR`, else the directory of `initdb` on PATH, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("POSTGRES_BIN_DIR") {
        return Ok(dir.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path)
        .map(|dir| dir.join("initdb"))
        .find(|initdb| initdb.is_file())
        // The link target's directory: `postgres` lies beside the real
        // initdb, not beside a link such as /usr/local/bin/initdb.
        .and_then(|initdb| initdb.canonicalize().ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
    if let Some(dir) = on_path {
        return Ok(dir);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            Some((
                entry.file_name().to_str()?.parse::<u32>().ok()?,
                entry.path(),
            ))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, dir)| dir.join("bin"));
    newest.context("no PostgreSQL: set POSTGRES_BIN_DIR or put initdb on PATH")
}

/// The user PostgreSQL runs as, which it requires not to be root.
#[derive(Clone, Copy)]
pub struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    /// `postgres` when we are root, nobody else.
    pub fn when_root() -> Result<Option<RunAs>> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        // getpwnam returns static storage, unsafe to share between the
        // threads of parallel tests: look the user up once.
        static POSTGRES: OnceLock<Option<RunAs>> = OnceLock::new();
        let user = *POSTGRES.get_or_init(|| {
            // SAFETY: a NUL-terminated name; the result is copied out at once.
            let entry = unsafe { libc::getpwnam(c"postgres".as_ptr()).as_ref() }?;
            Some(RunAs {
                uid: entry.pw_uid,
                gid: entry.pw_gid,
            })
        });
        ensure!(
            user.is_some(),
            "running as root, but there is no user `postgres` to run PostgreSQL as"
        );
        Ok(user)
    }

    /// Makes `cmd` run as this user.
    pub fn apply(self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }

    /// Gives `path` and what is directly in it to this user.
    pub fn chown_path(self, path: &Path) -> Result<()> {
        self.chown(path)?;
        for entry in std::fs::read_dir(path)? {
            self.chown(&entry?.path())?;
        }
        Ok(())
    }

    fn chown(self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("cannot chown {} to postgres", path.display()))
    }
}
