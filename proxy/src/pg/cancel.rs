//! Cancel requests: each session gets a cancel key of the proxy's own (its
//! record in [`Clients`]); a CancelRequest with it is sent to the backend
//! connection that serves the session at that moment (in transaction mode,
//! the one leased, if any). A key this proxy did not hand out is forwarded
//! to the proxy that did, as the fleet knows it (`fleet::cancel_keys`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::info;

use super::clients::{CancelKey, Clients};
use super::proto::messages;
use crate::fleet::Fleet;

pub(super) struct Cancels {
    clients: Arc<Clients>,
    fleet: Arc<Fleet>,
    /// Where other proxies forward cancel requests for this one's sessions.
    advertised: OnceLock<SocketAddr>,
}

impl Cancels {
    pub(super) fn new(clients: Arc<Clients>, fleet: Arc<Fleet>) -> Cancels {
        Cancels {
            clients,
            fleet,
            advertised: OnceLock::new(),
        }
    }

    /// Where this proxy takes cancel requests (the first address given).
    pub(super) fn advertise(&self, addr: SocketAddr) {
        let _ = self.advertised.set(addr);
    }

    /// Tells the fleet that a session's cancel key is this proxy's, so that
    /// a cancel request arriving at any proxy reaches it.
    pub(super) async fn share(&self, key: CancelKey) {
        if let Some(addr) = self.advertised.get() {
            self.fleet.share_cancel_key(key, *addr).await;
        }
    }

    /// Tells the fleet that a session's cancel key is gone (the session
    /// ended; its record left [`Clients`] with it).
    pub(super) async fn unshare(&self, key: CancelKey) {
        self.fleet.drop_cancel_key(key).await;
    }

    /// Forwards a client's CancelRequest to the backend that holds its session.
    pub(super) async fn cancel(&self, pid: i32, secret: i32) {
        let Some(client) = self.clients.by_cancel_key((pid, secret)) else {
            return self.forward(pid, secret).await;
        };
        if let Some((addr, bpid, bsecret)) = client.cancel_target() {
            if send_cancel(addr, bpid, bsecret).await {
                info!(backend = %addr, "query cancelled");
            }
        }
    }

    /// A cancel key this proxy did not hand out: the proxy that did, as
    /// the fleet knows it, gets the request.
    async fn forward(&self, pid: i32, secret: i32) {
        let Some(owner) = self.fleet.cancel_key_owner((pid, secret)).await else {
            return;
        };
        if Some(&owner) == self.advertised.get() {
            return;
        }
        if send_cancel(owner, pid, secret).await {
            info!(proxy = %owner, "cancel request forwarded to the proxy that holds the session");
        }
    }
}

/// Sends a CancelRequest to `addr`; false when it cannot be reached.
async fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = s.write_all(&messages::cancel_request(pid, secret)).await;
    let _ = s.shutdown().await;
    true
}
