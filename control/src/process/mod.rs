//! Engine processes: spawned with their output in a log file, restarted with
//! backoff when they die unexpectedly, stopped gracefully (signal, grace
//! period, SIGKILL). They outlive the daemon: a daemon that restarts (a crash,
//! an upgrade) adopts the processes its pid files name, when they are still
//! the processes it started with the command line it would use now, and
//! supervises them again without a restart.

mod handle;
pub mod pidfile;
pub mod usage;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use handle::{signal, Handle};

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

/// A running, supervised process. Dropping it without `stop` or `detach`
/// kills it.
pub struct Supervised {
    pid: Arc<AtomicU32>,
    adopted: bool,
    stop_tx: Option<oneshot::Sender<(Duration, oneshot::Sender<()>)>>,
}

const MAX_FAST_FAILURES: u32 = 5;
/// A process that ran this long before dying is not crash-looping.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

impl Supervised {
    /// Adopts the process an earlier daemon left running for this spec, or
    /// spawns it now (so a missing binary is an immediate error); then
    /// supervises it.
    pub async fn start(
        spec: ProcessSpec,
        replica: usize,
        events: mpsc::UnboundedSender<ProcessEvent>,
    ) -> std::io::Result<Supervised> {
        let adopted = match adoptable(&spec) {
            Some(pid) => Handle::adopt(pid).ok(),
            None => None,
        };
        let is_adopted = adopted.is_some();
        let handle = match adopted {
            Some(h) => h,
            None => Handle::Child(spawn(&spec).await?),
        };
        let pid = Arc::new(AtomicU32::new(handle.pid()));
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(supervise(
            spec,
            replica,
            handle,
            pid.clone(),
            stop_rx,
            events,
        ));
        Ok(Supervised {
            pid,
            adopted: is_adopted,
            stop_tx: Some(stop_tx),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Whether it was left running by an earlier daemon and adopted.
    pub fn adopted(&self) -> bool {
        self.adopted
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

    /// Leaves the process running, unsupervised, for the next daemon to adopt.
    pub fn detach(mut self) {
        // The supervisor sees its channel close without an order and returns.
        self.stop_tx.take();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.stop_tx.is_some() {
            signal(self.pid(), libc::SIGKILL);
        }
    }
}

/// The pid of a process an earlier daemon started for this spec: its pid
/// file names a live process with the recorded start time and command line,
/// and that runs the spec's program. Its arguments may be those of its first
/// start (a join) or of an older config: they apply at its next start.
/// Anything else is stopped and started afresh.
fn adoptable(spec: &ProcessSpec) -> Option<u32> {
    let pid = pidfile::live(&spec.pid_file)?;
    let program = pidfile::command_line(pid).into_iter().next()?;
    (program == spec.program.as_os_str()).then_some(pid)
}

async fn supervise(
    spec: ProcessSpec,
    replica: usize,
    mut process: Handle,
    pid: Arc<AtomicU32>,
    mut stop_rx: oneshot::Receiver<(Duration, oneshot::Sender<()>)>,
    events: mpsc::UnboundedSender<ProcessEvent>,
) {
    let mut started = Instant::now();
    let mut fast_failures = 0u32;
    loop {
        tokio::select! {
            stop = &mut stop_rx => {
                // Closed without an order: detached, or dropped (which killed it).
                let Ok((grace, done)) = stop else { return };
                process.terminate(spec.stop_signal, grace).await;
                pidfile::clear(&spec.pid_file);
                let _ = done.send(());
                return;
            }
            status = process.wait() => {
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
                        process = Handle::Child(c);
                        pid.store(process.pid(), Ordering::Relaxed);
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

async fn spawn(spec: &ProcessSpec) -> std::io::Result<tokio::process::Child> {
    stop_survivor(&spec.pid_file, spec.stop_signal).await;
    let log = File::options().create(true).append(true).open(&spec.log)?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the daemon must not
        // reach the engines, which outlive it.
        .process_group(0);
    if let Some((uid, gid)) = spec.user {
        cmd.uid(uid).gid(gid);
    }
    // A spawn waits until the child has exec'd, which takes long when a
    // storm of starting engines holds the CPUs: off the runtime's workers.
    let child = match spec.sandbox.clone() {
        Some(sandbox) => {
            cmd.env("TMPDIR", sandbox.dir());
            sandbox.spawn(cmd).await?
        }
        None => tokio::task::spawn_blocking(move || cmd.spawn())
            .await
            .map_err(std::io::Error::other)??,
    };
    if let Some(pid) = child.id() {
        pidfile::write(&spec.pid_file, pid);
    }
    Ok(child)
}

/// A process left from an earlier daemon (its pid file names a live process
/// whose command line mentions the pid file's directory) is stopped first,
/// so that it releases its ports and data directory.
pub async fn stop_survivor(pid_file: &Path, stop_signal: i32) {
    let Some(pid) = pidfile::pid(pid_file) else {
        return;
    };
    let Some(dir) = pid_file.parent().and_then(|d| d.to_str()) else {
        return;
    };
    let cmdline = pidfile::command_line(pid);
    if !cmdline.iter().any(|a| a.to_string_lossy().contains(dir)) {
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

/// Rotates an engine's log once it is larger than `max` bytes: `log.1` …
/// `log.<keep>` keep older content, and the log itself is emptied in place,
/// since the engine holds it open for appending (copy and truncate).
/// Whether it rotated.
pub fn rotate_log(log: &Path, max: u64, keep: u32) -> std::io::Result<bool> {
    if std::fs::metadata(log)?.len() <= max {
        return Ok(false);
    }
    let numbered = |i: u32| {
        let mut name = log.as_os_str().to_owned();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    };
    if keep > 0 {
        for i in (1..keep).rev() {
            if numbered(i).exists() {
                std::fs::rename(numbered(i), numbered(i + 1))?;
            }
        }
        std::fs::copy(log, numbered(1))?;
    }
    File::options().write(true).open(log)?.set_len(0)?;
    Ok(true)
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

/// The name of user `uid`, as the password database has it.
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; the
    // name is copied out at once.
    unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Lets everyone pass through directory `dir` (adds `0o711`), so that an
/// unprivileged engine reaches its own directory below it.
pub fn open_to_traversal(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_large_log_is_rotated_and_the_writer_keeps_appending() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node-0.log");
        // The engine's view: one descriptor opened for appending, kept.
        let mut engine = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        for round in 1..=4u8 {
            engine.write_all(&[b'0' + round; 100]).unwrap();
            assert!(rotate_log(&log, 50, 2).unwrap());
        }
        assert!(!rotate_log(&log, 50, 2).unwrap(), "an empty log stays");
        engine.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after");
        assert_eq!(
            std::fs::read(dir.path().join("node-0.log.1")).unwrap(),
            [b'4'; 100]
        );
        assert_eq!(
            std::fs::read(dir.path().join("node-0.log.2")).unwrap(),
            [b'3'; 100]
        );
        assert!(!dir.path().join("node-0.log.3").exists(), "only two kept");
    }
}
