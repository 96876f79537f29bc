//! Graceful upgrade: a new binary (`rouse-proxy serve --upgrade`) takes
//! over the running proxy's listening sockets through `proxy.upgrade_socket`
//! (file descriptors passed with SCM_RIGHTS). The sockets never close, so
//! no connection is refused; once the new process serves, the old one stops
//! accepting and drains its sessions for at most `proxy.drain_grace`.
//!
//! Only a process of the proxy's own user may take the sockets: the socket
//! file is 0600 and the peer's uid is checked (`SO_PEERCRED`); a peer that
//! takes the sockets but never says it serves is given up on after
//! [`READY_TIMEOUT`], and the old process keeps serving.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use sendfd::{RecvWithFd, SendWithFd};
use tracing::{info, warn};

use crate::metrics::UPGRADE_REFUSALS;

/// Sent by the new process once it serves on the sockets it took.
const READY: u8 = b'R';
/// More listeners than a proxy ever has.
const MAX_SOCKETS: usize = 256;
/// Their names, as JSON.
const MAX_NAMES: usize = 64 << 10;
/// How long a new process may take from taking the sockets to serving.
pub(crate) const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The sockets a new process took over, by name (see `Listeners`).
pub type Inherited = HashMap<String, std::net::TcpListener>;

/// The new process's side: takes the running proxy's listening sockets.
/// The returned handle tells the old process when this one serves.
pub fn take(path: &Path) -> std::io::Result<(Inherited, Handover)> {
    let stream = UnixStream::connect(path)?;
    let mut names = vec![0u8; MAX_NAMES];
    let mut fds: Vec<RawFd> = vec![-1; MAX_SOCKETS];
    let (n, received) = stream.recv_with_fd(&mut names, &mut fds)?;
    let names: Vec<String> = serde_json::from_slice(&names[..n])
        .map_err(|e| std::io::Error::other(format!("bad handover message: {e}")))?;
    let mut inherited = HashMap::new();
    for (name, fd) in names.into_iter().zip(&fds[..received]) {
        // SAFETY: the fd was just received and is owned by nothing else here.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(*fd) };
        listener.set_nonblocking(true)?;
        inherited.insert(name, listener);
    }
    info!(sockets = inherited.len(), "took over the listening sockets");
    Ok((inherited, Handover(stream)))
}

/// The connection to the old process, until this one serves.
pub struct Handover(UnixStream);

impl Handover {
    /// Tells the old process to stop accepting and drain.
    pub fn serving(mut self) {
        if let Err(e) = self.0.write_all(&[READY]) {
            warn!(error = %e, "could not tell the old process to drain");
        }
    }
}

/// The running proxy's side: offers `sockets` to the next process that
/// connects to `path`, and resolves once that process serves on them.
/// The upgrade socket at `path`, the proxy user's alone; bound before the
/// proxy reports ready, so that an upgrade may follow at once.
pub(crate) fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    // A socket file left by an earlier process is taken over, not an error.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub(crate) async fn offer(
    listener: tokio::net::UnixListener,
    sockets: Vec<(String, RawFd)>,
) -> std::io::Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    loop {
        let (stream, _) = listener.accept().await?;
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me => {}
            other => {
                UPGRADE_REFUSALS.counter([]).increment(1);
                warn!(peer = ?other.map(|c| c.uid()).ok(), "refused an upgrade from another user");
                continue;
            }
        }
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(READY_TIMEOUT))?;
        let sockets = sockets.clone();
        let handed = tokio::task::spawn_blocking(move || hand_over(stream, &sockets))
            .await
            .map_err(std::io::Error::other)?;
        match handed {
            Ok(()) => return Ok(()),
            Err(e) => warn!(error = %e, "upgrade attempt failed; still serving"),
        }
    }
}

fn hand_over(mut stream: UnixStream, sockets: &[(String, RawFd)]) -> std::io::Result<()> {
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| *fd).collect();
    let message = serde_json::to_vec(&names).map_err(std::io::Error::other)?;
    stream.send_with_fd(&message, &fds)?;
    let mut ready = [0u8; 1];
    stream.read_exact(&mut ready)?;
    if ready[0] != READY {
        return Err(std::io::Error::other("the new process did not start"));
    }
    info!("the new process serves: draining");
    Ok(())
}
