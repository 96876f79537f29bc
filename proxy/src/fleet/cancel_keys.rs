//! Which proxy holds the session a cancel key belongs to
//! (`rouse:cancel:<pid>:<secret>`), so that a CancelRequest reaching any
//! proxy is forwarded to the one that can act on it.

use std::net::SocketAddr;
use std::time::Duration;

use redis::AsyncCommands;

use super::{keys, Fleet};

/// How long a cancel key stays in Redis should its session's end go unnoticed.
const CANCEL_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

impl Fleet {
    /// Files `owner` (where this proxy takes cancel requests) as the holder
    /// of `cancel`.
    pub(crate) async fn share_cancel_key(&self, cancel: (i32, i32), owner: SocketAddr) {
        let key = keys::cancel(cancel);
        let sealed = self.seal(&key, owner.to_string().as_bytes());
        let _ = self
            .call("cancel_key", |mut c| async move {
                c.set_ex::<_, _, ()>(key, sealed, CANCEL_KEY_TTL.as_secs())
                    .await
            })
            .await;
    }

    /// Forgets `cancel` (its session ended).
    pub(crate) async fn drop_cancel_key(&self, cancel: (i32, i32)) {
        if !self.enabled() {
            return;
        }
        let key = keys::cancel(cancel);
        let _ = self
            .call(
                "cancel_key",
                |mut c| async move { c.del::<_, ()>(key).await },
            )
            .await;
    }

    /// The proxy that holds `cancel`'s session. Only an owner this fleet
    /// filed counts: a forged one would have a proxy send bytes anywhere.
    pub(crate) async fn cancel_key_owner(&self, cancel: (i32, i32)) -> Option<SocketAddr> {
        let key = keys::cancel(cancel);
        let sealed = self.get("cancel_key", &key).await.ok().flatten();
        let owner = sealed.and_then(|s| self.open_str("cancel_key", &key, &s))?;
        owner.parse().ok()
    }
}
