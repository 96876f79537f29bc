//! Throwaway Redis servers: no persistence at all; a master, or a replica
//! of one, optionally with a password and a TLS port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::ServerProcess;
use crate::{binary, free_port, run_ok, temp_dir, LOCALHOST, START_TIMEOUT};

/// Certificate, key and the CA that signed them, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// A CA and a certificate for 127.0.0.1 (and `localhost`) that it signed.
    pub fn make(dir: &std::path::Path) -> TlsFiles {
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let (ca_key, csr, ext) = (
            dir.join("ca.key"),
            dir.join("server.csr"),
            dir.join("ext.cnf"),
        );
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-days", "1", "-subj", "/CN=rouse test CA"])
                .args(ec)
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&files.ca),
        );
        run_ok(
            Command::new("openssl")
                .args(["req", "-subj", "/CN=127.0.0.1"])
                .args(ec)
                .arg("-keyout")
                .arg(&files.key)
                .arg("-out")
                .arg(&csr),
        );
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&files.ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&files.cert),
        );
        // redis-server may run as another user than the one who wrote the key.
        for f in [&files.key, &files.cert, &files.ca] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
        }
        files
    }
}

/// Settings of a [`Redis`]; by default a plain master with no password.
#[derive(Default, Clone)]
pub struct RedisBuilder {
    replica_of: Option<SocketAddr>,
    password: Option<String>,
    tls: Option<TlsFiles>,
}

impl RedisBuilder {
    /// Replicates `master` (whose password, if any, is this one's too).
    pub fn replica_of(mut self, master: SocketAddr) -> Self {
        self.replica_of = Some(master);
        self
    }

    /// `requirepass`, and `masterauth` for a replica.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.into());
        self
    }

    /// A TLS port besides the plain one (clients need no certificate).
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Starts `$REDIS_SERVER` (else `redis-server` on PATH) and waits until
    /// it answers PING and, for a replica, until it is in sync.
    pub async fn start(self) -> Result<Redis> {
        let dir = temp_dir("rouse-redis-")?;
        let addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let tls_addr = self
            .tls
            .as_ref()
            .map(|_| SocketAddr::new(LOCALHOST, free_port(LOCALHOST)));
        let process = self.spawn(dir.path(), addr, tls_addr).await?;
        let redis = Redis {
            process,
            addr,
            tls_addr,
            settings: self,
            dir,
        };
        if redis.settings.replica_of.is_some() {
            redis.wait_in_sync().await?;
        }
        Ok(redis)
    }

    /// Runs the server on `addr` and waits until it answers PING.
    async fn spawn(
        &self,
        dir: &Path,
        addr: SocketAddr,
        tls_addr: Option<SocketAddr>,
    ) -> Result<ServerProcess> {
        let mut cmd = Command::new(binary("REDIS_SERVER", "redis-server"));
        cmd.current_dir(dir)
            .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir);
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password, "--masterauth", password]);
        }
        if let Some(master) = self.replica_of {
            cmd.args([
                "--replicaof",
                &master.ip().to_string(),
                &master.port().to_string(),
            ]);
        }
        if let (Some(files), Some(tls_addr)) = (&self.tls, tls_addr) {
            cmd.args(["--tls-port", &tls_addr.port().to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        let mut process = ServerProcess::spawn("redis-server", cmd, &dir.join("redis.log"))?;
        let password = self.password.clone();
        process
            .wait_ready(START_TIMEOUT, || ping(addr, password.as_deref()))
            .await?;
        Ok(process)
    }
}

pub struct Redis {
    // Declared before `dir`, so that the server dies before its directory goes.
    process: ServerProcess,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    settings: RedisBuilder,
    dir: TempDir,
}

impl Redis {
    /// A plain master; see [`Redis::builder`] for the rest.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS port's address, when started with one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Runs one command with `redis-cli` (authenticated) and returns its output.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.addr, self.settings.password.as_deref(), args).await
    }

    /// Waits until this replica's link to its master is up.
    pub async fn wait_in_sync(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let info = self.cli(&["INFO", "replication"]).await?;
            if info.contains("master_link_status:up") {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "replica {} not in sync after {START_TIMEOUT:?}:\n{info}\nits log ends with:\n{}",
                    self.addr,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the server: its clients see their connections drop.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.kill();
        self.process = self
            .settings
            .spawn(self.dir.path(), self.addr, self.tls_addr)
            .await?;
        Ok(())
    }

    /// The temporary directory holding the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// Runs `$REDIS_CLI` (else `redis-cli`) with one command against `addr`;
/// its standard output, trimmed. A Redis error reply is output, not failure.
pub async fn redis_cli(addr: SocketAddr, password: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(binary("REDIS_CLI", "redis-cli"));
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .kill_on_drop(true);
    if let Some(password) = password {
        // From the environment, so that redis-cli does not warn about it.
        cmd.env("REDISCLI_AUTH", password);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .with_context(|| format!("redis-cli {args:?} against {addr} hangs"))?
        .context("cannot run redis-cli")?;
    ensure!(
        out.status.success(),
        "redis-cli {args:?} against {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One command as RESP, so that a password may hold any byte.
fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Answers PING (after AUTH, with a password): the readiness probe of
/// servers and sentinels.
pub(crate) async fn ping(addr: SocketAddr, password: Option<&str>) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut expected = Vec::new();
    if let Some(password) = password {
        stream.write_all(&command(&["AUTH", password])).await?;
        expected.extend_from_slice(b"+OK\r\n");
    }
    stream.write_all(&command(&["PING"])).await?;
    expected.extend_from_slice(b"+PONG\r\n");
    let mut answer = vec![0; expected.len()];
    stream.read_exact(&mut answer).await?;
    ensure!(
        answer == expected,
        "PING answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}
