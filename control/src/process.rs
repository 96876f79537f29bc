//! Engine processes: spawned with their output in a log file, restarted with
//! backoff when they die unexpectedly, stopped gracefully (signal, grace
//! period, SIGKILL). A child also dies with the daemon (parent-death signal),
//! so a killed daemon leaves no orphans behind.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

/// How to run one engine process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub log: PathBuf,
    /// Written with the child's pid, so that a restarted daemon can stop a
    /// survivor before it starts the process again.
    pub pid_file: PathBuf,
    /// Run as this uid/gid (PostgreSQL refuses root).
    pub user: Option<(u32, u32)>,
    /// Graceful stop signal: SIGTERM for rqlited, SIGINT (fast shutdown) for
    /// PostgreSQL.
    pub stop_signal: i32,
    /// Confines the process to its data directory, which is also its TMPDIR.
    pub sandbox: Option<Arc<crate::sandbox::Sandbox>>,
}

/// Reported to the owner when a supervised process exits on its own.
#[derive(Debug)]
pub enum ProcessEvent {
    /// It exited and is started again after a backoff.
    Restarting {
        replica: usize,
        status: String,
        attempt: u32,
    },
    /// It was restarted and runs again.
    Restarted { replica: usize },
    /// It keeps dying right after start: supervision stopped.
    GaveUp { replica: usize, reason: String },
}

/// A running, supervised process. Dropping it without `stop` kills it.
pub struct Supervised {
    pid: Arc<AtomicU32>,
    stop_tx: Option<oneshot::Sender<(Duration, oneshot::Sender<()>)>>,
}

const MAX_FAST_FAILURES: u32 = 5;
/// A process that ran this long before dying is not crash-looping.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

impl Supervised {
    /// Spawns the process now (so a missing binary is an immediate error),
    /// then supervises it.
    pub async fn start(
        spec: ProcessSpec,
        replica: usize,
        events: mpsc::UnboundedSender<ProcessEvent>,
    ) -> std::io::Result<Supervised> {
        let child = spawn(&spec).await?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(supervise(
            spec,
            replica,
            child,
            pid.clone(),
            stop_rx,
            events,
        ));
        Ok(Supervised {
            pid,
            stop_tx: Some(stop_tx),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Stops the process: its stop signal, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(tx) = self.stop_tx.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send((grace, done_tx)).is_ok() {
                let _ = done_rx.await;
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.stop_tx.is_some() {
            signal(self.pid(), libc::SIGKILL);
        }
    }
}

async fn supervise(
    spec: ProcessSpec,
    replica: usize,
    mut child: Child,
    pid: Arc<AtomicU32>,
    mut stop_rx: oneshot::Receiver<(Duration, oneshot::Sender<()>)>,
    events: mpsc::UnboundedSender<ProcessEvent>,
) {
    let mut started = Instant::now();
    let mut fast_failures = 0u32;
    loop {
        tokio::select! {
            stop = &mut stop_rx => {
                let grace = stop.as_ref().map(|(g, _)| *g).unwrap_or(Duration::ZERO);
                terminate(&mut child, spec.stop_signal, grace).await;
                let _ = std::fs::remove_file(&spec.pid_file);
                if let Ok((_, done)) = stop {
                    let _ = done.send(());
                }
                return;
            }
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if started.elapsed() >= HEALTHY_RUN {
                    fast_failures = 0;
                }
                fast_failures += 1;
                if fast_failures > MAX_FAST_FAILURES {
                    let reason = format!(
                        "{} exited ({status}) {MAX_FAST_FAILURES} times in a row right after start; last log lines: {}",
                        spec.program.display(),
                        log_tail(&spec.log, 5)
                    );
                    let _ = events.send(ProcessEvent::GaveUp { replica, reason });
                    // Stay until stopped, so the owner's stop finds us.
                    if let Ok((_, done)) = stop_rx.await {
                        let _ = done.send(());
                    }
                    return;
                }
                let _ = events.send(ProcessEvent::Restarting { replica, status, attempt: fast_failures });
                let backoff = Duration::from_millis(100 * 2u64.pow(fast_failures - 1));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    stop = &mut stop_rx => {
                        if let Ok((_, done)) = stop { let _ = done.send(()); }
                        return;
                    }
                }
                match spawn(&spec).await {
                    Ok(c) => {
                        child = c;
                        pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
                        started = Instant::now();
                        let _ = events.send(ProcessEvent::Restarted { replica });
                    }
                    Err(e) => {
                        let reason = format!("cannot start {}: {e}", spec.program.display());
                        let _ = events.send(ProcessEvent::GaveUp { replica, reason });
                        if let Ok((_, done)) = stop_rx.await { let _ = done.send(()); }
                        return;
                    }
                }
            }
        }
    }
}

async fn terminate(child: &mut Child, stop_signal: i32, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, stop_signal);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, grace = ?grace, "process did not stop in time, killing it");
    }
    let _ = child.kill().await;
}

async fn spawn(spec: &ProcessSpec) -> std::io::Result<Child> {
    stop_survivor(&spec.pid_file, spec.stop_signal).await;
    let log = File::options().create(true).append(true).open(&spec.log)?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the daemon must not
        // reach the engines before the daemon stops them in order.
        .process_group(0);
    if let Some((uid, gid)) = spec.user {
        cmd.uid(uid).gid(gid);
    }
    if let Some(sandbox) = &spec.sandbox {
        cmd.env("TMPDIR", sandbox.dir());
    }
    let death_signal = spec.stop_signal;
    let sandbox = spec.sandbox.clone();
    // SAFETY: prctl and the sandbox's entry are plain syscalls; they run in
    // the child after the uid change (which would otherwise clear the
    // death signal) and before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(sandbox) = &sandbox {
                sandbox.enter()?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        let _ = std::fs::write(&spec.pid_file, pid.to_string());
    }
    Ok(child)
}

/// A process left from an earlier daemon (its pid file names a live process
/// whose command line mentions the pid file's directory) is stopped first,
/// so that it releases its ports and data directory.
async fn stop_survivor(pid_file: &Path, stop_signal: i32) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let Some(dir) = pid_file.parent().and_then(|d| d.to_str()) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains(dir) {
        return;
    }
    tracing::warn!(pid, pid_file = %pid_file.display(), "stopping a process left by an earlier run");
    signal(pid, stop_signal);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(pid, libc::SIGKILL);
}

fn signal(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain syscall on a pid we started.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// The last `n` lines of a log file, joined with " | ".
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// uid and gid of a local user.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we
    // copy the two integers out immediately.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

/// Gives `path` (recursively) to `user`.
pub fn chown_tree(path: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), (uid, gid))?;
        }
    }
    Ok(())
}
