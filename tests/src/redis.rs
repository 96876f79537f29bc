//! A throwaway Redis server: no persistence at all.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::ServerProcess;
use crate::{binary, free_port, temp_dir, LOCALHOST, START_TIMEOUT};

pub struct Redis {
    // Declared before `dir`, so that the server dies before its directory goes.
    process: ServerProcess,
    addr: SocketAddr,
    dir: TempDir,
}

impl Redis {
    /// Starts `$REDIS_SERVER` (else `redis-server` on PATH) and waits until it answers PING.
    pub async fn start() -> Result<Self> {
        let dir = temp_dir("rouse-redis-")?;
        let addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let mut cmd = Command::new(binary("REDIS_SERVER", "redis-server"));
        cmd.current_dir(dir.path())
            .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path());
        let mut process = ServerProcess::spawn("redis-server", cmd, &dir.path().join("redis.log"))?;
        process.wait_ready(START_TIMEOUT, || ping(addr)).await?;
        Ok(Redis { process, addr, dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The temporary directory holding the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

async fn ping(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut answer = [0; 7];
    stream.read_exact(&mut answer).await?;
    ensure!(
        &answer == b"+PONG\r\n",
        "PING answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}
