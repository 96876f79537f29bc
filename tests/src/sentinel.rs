//! Redis Sentinel processes watching one master, quorum 2, with timeouts
//! short enough for tests (down after 1 s, failover timeout 3 s). Each has its own
//! config file, which it rewrites as it learns about the deployment.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::redis::{ping, redis_cli};
use crate::{binary, free_port, temp_dir, LOCALHOST, START_TIMEOUT};

/// Settings of a [`Sentinel`].
pub struct SentinelBuilder {
    name: String,
    master: SocketAddr,
    auth_pass: Option<String>,
    requirepass: Option<String>,
}

impl SentinelBuilder {
    /// The password of the Redis servers (`sentinel auth-pass`).
    pub fn auth_pass(mut self, password: &str) -> Self {
        self.auth_pass = Some(password.into());
        self
    }

    /// The sentinel's own password, also given to the other sentinels
    /// (`requirepass` and `sentinel sentinel-pass`).
    pub fn requirepass(mut self, password: &str) -> Self {
        self.requirepass = Some(password.into());
        self
    }

    /// Starts `$REDIS_SENTINEL` (else `redis-sentinel`) and waits until it answers PING.
    pub async fn start(self) -> Result<Sentinel> {
        let dir = temp_dir("rouse-sentinel-")?;
        let addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let name = &self.name;
        let mut conf = format!(
            "port {}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {name} {} {} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 3000\n\
             sentinel parallel-syncs {name} 1\n",
            addr.port(),
            dir.path().display(),
            self.master.ip(),
            self.master.port(),
        );
        if let Some(password) = &self.auth_pass {
            conf.push_str(&format!("sentinel auth-pass {name} {password}\n"));
        }
        if let Some(password) = &self.requirepass {
            conf.push_str(&format!(
                "requirepass {password}\nsentinel sentinel-pass {password}\n"
            ));
        }
        let config = dir.path().join("sentinel.conf");
        std::fs::write(&config, conf)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut cmd = Command::new(binary("REDIS_SENTINEL", "redis-sentinel"));
        cmd.arg(&config).current_dir(dir.path());
        let mut process =
            ServerProcess::spawn("redis-sentinel", cmd, &dir.path().join("sentinel.log"))?;
        let password = self.requirepass;
        process
            .wait_ready(START_TIMEOUT, || ping(addr, password.as_deref()))
            .await?;
        Ok(Sentinel {
            process,
            addr,
            name: self.name,
            password,
            dir,
        })
    }
}

pub struct Sentinel {
    // Declared before `dir`, so that the sentinel dies before its directory goes.
    process: ServerProcess,
    addr: SocketAddr,
    name: String,
    password: Option<String>,
    dir: TempDir,
}

impl Sentinel {
    /// A sentinel monitoring `master` under `name`.
    pub fn builder(name: &str, master: SocketAddr) -> SentinelBuilder {
        SentinelBuilder {
            name: name.into(),
            master,
            auth_pass: None,
            requirepass: None,
        }
    }

    /// `count` sentinels alike.
    pub async fn start_many(
        count: usize,
        builder: impl Fn() -> SentinelBuilder,
    ) -> Result<Vec<Sentinel>> {
        let mut sentinels = Vec::with_capacity(count);
        for _ in 0..count {
            sentinels.push(builder().start().await?);
        }
        Ok(sentinels)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs one command with `redis-cli` (authenticated) and returns its output.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(self.addr, self.password.as_deref(), args).await
    }

    /// The master's address as this sentinel knows it.
    pub async fn master_addr(&self) -> Result<SocketAddr> {
        let out = self
            .cli(&["SENTINEL", "get-master-addr-by-name", &self.name])
            .await?;
        let mut lines = out.lines();
        let (Some(ip), Some(port)) = (lines.next(), lines.next()) else {
            bail!("sentinel {} answered {out:?}", self.addr);
        };
        Ok(SocketAddr::new(ip.parse()?, port.parse()?))
    }

    /// Waits until this sentinel knows `replicas` replicas and `others`
    /// other sentinels: before that a failover has no candidate or no vote.
    pub async fn wait_for_peers(&self, replicas: usize, others: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let out = self.cli(&["SENTINEL", "master", &self.name]).await?;
            let field = |key: &str| -> usize {
                let mut lines = out.lines();
                lines
                    .by_ref()
                    .find(|l| *l == key)
                    .and_then(|_| lines.next()?.parse().ok())
                    .unwrap_or(0)
            };
            let (r, o) = (field("num-slaves"), field("num-other-sentinels"));
            if r >= replicas && o >= others {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "sentinel {} knows {r} replicas and {o} sentinels after {START_TIMEOUT:?}; its log ends with:\n{}",
                    self.addr,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The temporary directory holding the config file and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
