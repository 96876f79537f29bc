//! One engine process as the supervisor holds it: a child this daemon
//! spawned, or a process an earlier daemon spawned and this one adopted.
//! An adopted process is not our child, so its exit is seen through a
//! pidfd (readable once the process has exited) and its status is unknown.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::process::Child;

pub enum Handle {
    Child(Child),
    Adopted { pid: u32, exited: AsyncFd<OwnedFd> },
}

impl Handle {
    /// Watches a process this daemon did not spawn.
    pub fn adopt(pid: u32) -> std::io::Result<Handle> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
        // same descriptor until the AsyncFd is dropped.
        let exited = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Handle::Adopted { pid, exited })
    }

    pub fn pid(&self) -> u32 {
        match self {
            Handle::Child(c) => c.id().unwrap_or(0),
            Handle::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to exit; how it exited, as far as is known.
    pub async fn wait(&mut self) -> String {
        match self {
            Handle::Child(c) => match c.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            },
            Handle::Adopted { exited, .. } => match exited.readable().await {
                Ok(_) => "exited (adopted: status unknown)".to_string(),
                Err(e) => e.to_string(),
            },
        }
    }

    /// Its stop signal, then SIGKILL if it has not exited after `grace`.
    pub async fn terminate(&mut self, stop_signal: i32, grace: Duration) {
        let pid = self.pid();
        signal(pid, stop_signal);
        if tokio::time::timeout(grace, self.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, grace = ?grace, "process did not stop in time, killing it");
        match self {
            Handle::Child(c) => {
                let _ = c.kill().await;
            }
            Handle::Adopted { .. } => {
                signal(pid, libc::SIGKILL);
                self.wait().await;
            }
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain syscall on a pid we started or adopted.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}
