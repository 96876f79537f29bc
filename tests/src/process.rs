//! One child server process: leader of its own process group, output in a
//! log file, SIGKILLed with its whole group when dropped.

use std::fs::OpenOptions;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::time::Instant;

/// Lines of log quoted in errors.
const LOG_TAIL: usize = 40;

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(50);

pub struct ServerProcess {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the group got its SIGKILL and the leader was reaped, so that
    /// a group id the kernel may have reused is never signalled again.
    killed: bool,
}

impl ServerProcess {
    /// Spawns `cmd` as the leader of a new process group (so that its
    /// children die with it), its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        redirect(&mut cmd, log)?;
        cmd.stdin(Stdio::null()).process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {name} ({})",
                cmd.get_program().to_string_lossy()
            )
        })?;
        Ok(ServerProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            killed: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        self.killed || matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The last `lines` lines of the process's output.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Polls `probe` until it succeeds. Fails, quoting the log, when the
    /// process exits first or `timeout` passes.
    pub async fn wait_ready<F, Fut>(&mut self, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            // Exit first: after a failed bind, the probe could reach
            // whichever other process owns the port.
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready; its log ends with:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL)
                );
            }
            // A probe may hang on a half-started server: bound it by the deadline too.
            let last_error = match tokio::time::timeout_at(deadline, probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => anyhow!("no answer"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {timeout:?} (last probe: {last_error:#}); its log ends with:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends SIGTERM to the leader only, so that it shuts its own children
    /// down, and waits for it to exit. After `grace`, SIGKILLs the group and fails.
    pub async fn terminate(&mut self, grace: Duration) -> Result<()> {
        // try_wait keeps answering once the leader is reaped, so a pid that
        // may have been reused is never signalled.
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        }
        if self.exit_within(grace).await?.is_none() {
            self.kill();
            bail!(
                "{} did not exit within {grace:?} of SIGTERM; its log ends with:\n{}",
                self.name,
                self.log_tail(LOG_TAIL)
            );
        }
        Ok(())
    }

    /// The leader's exit status, unless it still runs after `secs` seconds.
    pub async fn exit_within_secs(&mut self, secs: u64) -> Result<Option<ExitStatus>> {
        self.exit_within(Duration::from_secs(secs)).await
    }

    /// The leader's exit status, unless it still runs after `timeout`.
    /// Polled: std's `Child`, which Drop can reap without a runtime, has no
    /// async wait.
    async fn exit_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait()? {
                Some(status) => return Ok(Some(status)),
                None if Instant::now() >= deadline => return Ok(None),
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// SIGKILLs the whole process group and reaps the leader. The group
    /// outlives an exited leader while any member lives, so this also kills
    /// what a stopped server left behind.
    pub fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        // SAFETY: killpg(2) has no memory-safety preconditions.
        unsafe { libc::killpg(self.pid() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a one-shot command such as `initdb` to completion, its output
/// appended to `log`; fails with the tail of the log. Like a server, it runs
/// in a process group of its own, killed if the caller gives up on it (a
/// dropped future), so that it never writes into a removed directory.
pub async fn run(name: &str, cmd: Command, log: &Path, timeout: Duration) -> Result<()> {
    let mut process = ServerProcess::spawn(name, cmd, log)?;
    match process.exit_within(timeout).await? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!(
            "{name} failed ({status}); its log ends with:\n{}",
            tail(log, LOG_TAIL)
        ),
        None => bail!(
            "{name} did not finish within {timeout:?}; its log ends with:\n{}",
            tail(log, LOG_TAIL)
        ),
    }
}

/// Appends (rather than truncates) so that a restarted server keeps the log
/// of its previous runs.
fn redirect(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    Ok(())
}

fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
