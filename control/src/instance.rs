//! One daemon per data directory: each writes `<data_dir>/control.pid`
//! (pid, start time, command line). A second daemon on the same directory
//! is refused, unless it comes to take over (`serve --upgrade`): then the
//! running one is asked to stop (SIGTERM), leaves its engines running, and
//! the new one adopts them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::pidfile;

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("control.pid")
}

#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("another rouse-control (pid {0}) runs on this data directory; stop it, or start this one with `serve --upgrade` to take over")]
    Running(u32),
    #[error("the running rouse-control (pid {pid}) did not stop within {waited:?}")]
    DidNotStop { pid: u32, waited: Duration },
}

/// Makes way for this daemon: with `upgrade`, stops the one running on
/// `data_dir` (waiting up to `wait`); without, refuses while one runs.
pub async fn make_way(data_dir: &Path, upgrade: bool, wait: Duration) -> Result<(), TakeOverError> {
    let Some(pid) = pidfile::live(&pid_file(data_dir)) else {
        return Ok(());
    };
    if !upgrade {
        return Err(TakeOverError::Running(pid));
    }
    tracing::info!(pid, "taking over from the running rouse-control");
    // SAFETY: kill(2) on the pid the file names, checked live just now.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let started = Instant::now();
    while pidfile::live(&pid_file(data_dir)) == Some(pid) {
        if started.elapsed() > wait {
            return Err(TakeOverError::DidNotStop {
                pid,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Records this process as the data directory's daemon.
pub fn claim(data_dir: &Path) {
    pidfile::write(&pid_file(data_dir), std::process::id());
}
