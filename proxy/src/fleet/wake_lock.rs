//! One wake per database across the fleet: the proxy that sets
//! `rouse:wake:<db>` (SET NX PX, a short lease) asks control; the others
//! watch the database. Holders are proven by the seal over the holder's
//! name, and only the holder's own value is ever deleted.

use std::time::Duration;

use rouse_control_api::DbKey;

use super::{keys, Fleet};

/// How long a wake lock holds if its proxy dies mid-wake.
const WAKE_LEASE: Duration = Duration::from_secs(30);
/// Deletes a lock if its value is still ours.
const RELEASE_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A database's wake lock, as one proxy sees it.
pub(crate) struct WakeLock<'a> {
    fleet: &'a Fleet,
    name: String,
    /// The sealed value this proxy sets: its name.
    me: Vec<u8>,
}

/// Who holds a wake lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// A proxy of this fleet.
    Fleet,
    /// Someone this fleet does not know set it: no reason to wait.
    Stranger,
    /// Nobody (the wake failed or its proxy died), or Redis does not answer.
    Nobody,
}

impl Fleet {
    /// `key`'s wake lock, taken in the name `proxy_id`.
    pub(crate) fn wake_lock(&self, key: &DbKey, proxy_id: &str) -> WakeLock<'_> {
        let name = keys::wake(key);
        let me = self.seal(&name, proxy_id.as_bytes());
        WakeLock {
            fleet: self,
            name,
            me,
        }
    }
}

impl WakeLock<'_> {
    /// `Some(true)` when this proxy took the lock, `Some(false)` when
    /// another holds it, `None` without Redis (every proxy then asks
    /// control, which is idempotent).
    pub(crate) async fn take(&self) -> Option<bool> {
        self.fleet
            .call("wake_lock", |mut c| {
                let (lock, me) = (self.name.clone(), self.me.clone());
                async move {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&lock)
                        .arg(&me)
                        .arg("NX")
                        .arg("PX")
                        .arg(WAKE_LEASE.as_millis() as u64)
                        .query_async(&mut c)
                        .await?;
                    Ok(set.is_some())
                }
            })
            .await
            .ok()
            .flatten()
    }

    /// Gives the lock back, if it is still ours: a slow wake may have
    /// outlived its lease.
    pub(crate) async fn release(&self) {
        let script = redis::Script::new(RELEASE_LOCK);
        let mut release = script.prepare_invoke();
        release.key(&self.name).arg(&self.me);
        let _ = self
            .fleet
            .call("wake_lock", |mut c| async move {
                release.invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    pub(crate) async fn holder(&self) -> Holder {
        let held = self.fleet.get("wake_lock", &self.name).await.ok().flatten();
        match held {
            Some(sealed) if self.fleet.open("wake_lock", &self.name, &sealed).is_some() => {
                Holder::Fleet
            }
            Some(_) => Holder::Stranger,
            None => Holder::Nobody,
        }
    }
}
