//! Cancel requests: each session gets a cancel key of the proxy's own; a
//! CancelRequest with it is sent to the backend connection that serves the
//! session at that moment (in transaction mode, the one leased, if any).
//! A key this proxy did not hand out is forwarded to the proxy that did, as
//! the fleet knows it (`fleet::cancel_keys`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::info;

use super::proto::messages;
use crate::fleet::Fleet;

/// Where a cancel for this client goes right now: a backend's address and
/// its own cancel key.
pub(crate) type CancelSlot = Arc<Mutex<Option<(SocketAddr, i32, i32)>>>;

pub(super) struct Cancels {
    slots: Mutex<HashMap<(i32, i32), CancelSlot>>,
    fleet: Arc<Fleet>,
    /// Where other proxies forward cancel requests for this one's sessions.
    advertised: OnceLock<SocketAddr>,
}

impl Cancels {
    pub(super) fn new(fleet: Arc<Fleet>) -> Cancels {
        Cancels {
            slots: Mutex::new(HashMap::new()),
            fleet,
            advertised: OnceLock::new(),
        }
    }

    /// Where this proxy takes cancel requests (the first address given).
    pub(super) fn advertise(&self, addr: SocketAddr) {
        let _ = self.advertised.set(addr);
    }

    /// Files a session's cancel key here and with the fleet, so that a
    /// cancel request arriving at any proxy reaches `slot`.
    pub(super) async fn register(&self, key: (i32, i32), slot: CancelSlot) {
        self.slots
            .lock()
            .expect("cancels poisoned")
            .insert(key, slot);
        if let Some(addr) = self.advertised.get() {
            self.fleet.share_cancel_key(key, *addr).await;
        }
    }

    /// The slot filed under `key`.
    pub(super) fn slot(&self, key: (i32, i32)) -> Option<CancelSlot> {
        self.slots
            .lock()
            .expect("cancels poisoned")
            .get(&key)
            .cloned()
    }

    /// Forgets a session's cancel key (the session ended).
    pub(super) async fn unregister(&self, key: (i32, i32)) {
        self.slots.lock().expect("cancels poisoned").remove(&key);
        self.fleet.drop_cancel_key(key).await;
    }

    /// Forwards a client's CancelRequest to the backend that holds its session.
    pub(super) async fn cancel(&self, pid: i32, secret: i32) {
        let Some(slot) = self.slot((pid, secret)) else {
            return self.forward(pid, secret).await;
        };
        let target = *slot.lock().expect("cancel poisoned");
        if let Some((addr, bpid, bsecret)) = target {
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
