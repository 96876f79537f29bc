//! Who is connected to the PostgreSQL front: every session while it lives,
//! filed under the cancel key it was given, so that one record serves the
//! admin console (SHOW CLIENTS, SHOW SERVERS, KILL) and cancel requests;
//! and which databases are paused (PAUSE holds new sessions as a wake
//! does).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rouse_control_api::DbKey;
use tokio::sync::{watch, Notify};

use crate::net::park::{self, Ticket};

/// A cancel key: the process id and secret of a BackendKeyData.
pub(crate) type CancelKey = (i32, i32);

/// Where a cancel request goes: a backend's address and its own key.
pub(crate) type BackendKey = (SocketAddr, i32, i32);

/// One client session. Ten thousand idle clients each keep one of these,
/// so it holds no more than the console and cancel requests need.
pub(crate) struct Client {
    pub(crate) id: u64,
    /// What its CancelRequests name; its key in [`Clients`].
    pub(crate) cancel_key: CancelKey,
    pub(crate) key: DbKey,
    /// The role, a NUL, then the application name: one allocation for
    /// both (neither can hold a NUL: they come from C strings).
    names: Box<str>,
    pub(crate) addr: SocketAddr,
    /// Unix seconds (what the console shows).
    connected_at: u32,
    pub(crate) tls: bool,
    /// A backend of its own for the whole session (session pooling).
    pub(crate) session_pooled: bool,
    /// Where its cancel requests go now: its own backend in session
    /// pooling; in transaction pooling the one lent to it, if any.
    pub(crate) cancel_to: Mutex<Option<Arc<BackendKey>>>,
    /// Notified to end the session (KILL).
    pub(crate) kill: Notify,
    /// The ticket of its last parking (0: never parked), or [`KILLED`].
    pub(crate) parked: AtomicU64,
}

/// What a session is registered with; [`Clients::register`] adds its id
/// and cancel key.
pub(crate) struct NewClient<'a> {
    pub(crate) key: DbKey,
    pub(crate) role: &'a str,
    pub(crate) addr: SocketAddr,
    pub(crate) tls: bool,
    pub(crate) application_name: &'a str,
    /// Session pooling: its own backend, where its cancels go.
    pub(crate) own_backend: Option<Arc<BackendKey>>,
}

/// In [`Client::parked`] once KILL came.
const KILLED: u64 = u64::MAX;

impl Client {
    /// `<role>.<app>`, as the client logged in.
    pub(crate) fn user(&self) -> String {
        format!("{}.{}", self.role(), self.key.app)
    }

    pub(crate) fn role(&self) -> &str {
        self.names.split('\0').next().unwrap_or_default()
    }

    pub(crate) fn application_name(&self) -> &str {
        self.names.split_once('\0').map_or("", |(_, name)| name)
    }

    /// Unix ms.
    pub(crate) fn connected_at(&self) -> u64 {
        u64::from(self.connected_at) * 1000
    }

    /// The backend of its own, in session pooling.
    pub(crate) fn backend(&self) -> Option<SocketAddr> {
        self.session_pooled
            .then(|| self.cancel_target().map(|(addr, ..)| addr))
            .flatten()
    }

    pub(crate) fn cancel_target(&self) -> Option<BackendKey> {
        self.cancel_to
            .lock()
            .expect("cancel target poisoned")
            .as_deref()
            .copied()
    }

    /// The session was parked with `ticket`: KILL must unpark it. A KILL
    /// that came while it was parking unparks it at once.
    pub(crate) fn parked(&self, ticket: Ticket) {
        if self.parked.swap(ticket.get(), Ordering::SeqCst) == KILLED {
            park::unpark(ticket);
        }
    }

    /// Ends the session: at once when it runs; a parked one is unparked
    /// to hear it. A stale ticket unparks nothing.
    fn kill(&self) {
        self.kill.notify_one();
        match self.parked.swap(KILLED, Ordering::SeqCst) {
            0 | KILLED => {}
            ticket => park::unpark(Ticket::from_raw(ticket)),
        }
    }
}

#[derive(Default, Clone)]
struct Paused {
    all: bool,
    databases: BTreeSet<DbKey>,
}

impl Paused {
    fn holds(&self, key: &DbKey) -> bool {
        self.all || self.databases.contains(key)
    }
}

#[derive(Default)]
pub(crate) struct Clients {
    next: AtomicU64,
    /// By cancel key.
    live: Mutex<HashMap<CancelKey, Arc<Client>>>,
    paused: watch::Sender<Paused>,
}

/// A session's place in [`Clients`]; it leaves when dropped.
pub(crate) struct Registered {
    clients: Arc<Clients>,
    pub(crate) client: Arc<Client>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients
            .live
            .lock()
            .expect("clients poisoned")
            .remove(&self.client.cancel_key);
    }
}

impl Clients {
    /// Registers a session under a new id and a cancel key that no live
    /// session has.
    pub(crate) fn register(self: &Arc<Self>, new: NewClient<'_>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut live = self.live.lock().expect("clients poisoned");
        let cancel_key = loop {
            let drawn = (rand::random::<i32>(), rand::random::<i32>());
            if !live.contains_key(&drawn) {
                break drawn;
            }
        };
        let client = Arc::new(Client {
            id,
            cancel_key,
            key: new.key,
            names: format!("{}\0{}", new.role, new.application_name).into(),
            addr: new.addr,
            connected_at: (rouse_runtime::clock::now_ms() / 1000) as u32,
            tls: new.tls,
            session_pooled: new.own_backend.is_some(),
            cancel_to: Mutex::new(new.own_backend),
            kill: Notify::new(),
            parked: AtomicU64::new(0),
        });
        live.insert(cancel_key, client.clone());
        drop(live);
        Registered {
            clients: self.clone(),
            client,
        }
    }

    /// Every live session, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Client>> {
        let mut all: Vec<_> = self
            .live
            .lock()
            .expect("clients poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_unstable_by_key(|c| c.id);
        all
    }

    /// The session that was given `cancel_key`, if it is here.
    pub(crate) fn by_cancel_key(&self, cancel_key: CancelKey) -> Option<Arc<Client>> {
        self.live
            .lock()
            .expect("clients poisoned")
            .get(&cancel_key)
            .cloned()
    }

    /// Ends every session of `key`; how many.
    pub(crate) fn kill(&self, key: &DbKey) -> usize {
        let doomed: Vec<_> = self.all().into_iter().filter(|c| &c.key == key).collect();
        for c in &doomed {
            c.kill();
        }
        doomed.len()
    }

    /// PAUSE (`None`: every database).
    pub(crate) fn pause(&self, key: Option<&DbKey>) {
        self.paused.send_modify(|p| match key {
            Some(k) => {
                p.databases.insert(k.clone());
            }
            None => p.all = true,
        });
    }

    /// RESUME (`None`: every database, including those paused by name).
    pub(crate) fn resume(&self, key: Option<&DbKey>) {
        self.paused.send_modify(|p| match key {
            Some(k) => {
                p.databases.remove(k);
            }
            None => *p = Paused::default(),
        });
    }

    pub(crate) fn is_paused(&self, key: &DbKey) -> bool {
        self.paused.borrow().holds(key)
    }

    /// Until `key` is not paused; `false` when it still is after `within`.
    pub(crate) async fn unpaused(&self, key: &DbKey, within: Duration) -> bool {
        // The common case, on every pooled transaction: no receiver, no timer.
        if !self.is_paused(key) {
            return true;
        }
        let mut rx = self.paused.subscribe();
        tokio::time::timeout(within, rx.wait_for(|p| !p.holds(key)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rouse_control_api::Name;

    fn key(db: &str) -> DbKey {
        DbKey::new(Name::new("shop").unwrap(), Name::new(db).unwrap())
    }

    #[tokio::test]
    async fn a_paused_database_holds_until_resumed_and_others_go_on() {
        let clients = Arc::new(Clients::default());
        clients.pause(Some(&key("a")));
        assert!(clients.unpaused(&key("b"), Duration::ZERO).await);
        assert!(!clients.unpaused(&key("a"), Duration::from_millis(20)).await);
        let waiting = {
            let clients = clients.clone();
            tokio::spawn(async move { clients.unpaused(&key("a"), Duration::from_secs(5)).await })
        };
        clients.resume(None);
        assert!(waiting.await.unwrap());
        clients.pause(None);
        assert!(clients.is_paused(&key("z")));
    }

    #[test]
    fn sessions_leave_when_dropped_and_kill_reaches_only_their_database() {
        let clients = Arc::new(Clients::default());
        let make = |db: &str| NewClient {
            key: key(db),
            role: "alice",
            addr: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            application_name: "",
            own_backend: None,
        };
        let a = clients.register(make("a"));
        let b = clients.register(make("b"));
        assert_ne!(a.client.cancel_key, b.client.cancel_key);
        assert_eq!(a.client.user(), "alice.shop");
        assert_eq!(a.client.application_name(), "");
        let found = clients.by_cancel_key(b.client.cancel_key).unwrap();
        assert!(Arc::ptr_eq(&found, &b.client));
        // The process id alone finds nothing: the secret must match too.
        let (pid, secret) = b.client.cancel_key;
        assert!(clients.by_cancel_key((pid, secret ^ 1)).is_none());
        assert_eq!(clients.kill(&key("a")), 1);
        let ids: Vec<_> = clients.all().iter().map(|c| c.id).collect();
        assert_eq!(ids, [a.client.id, b.client.id], "oldest first");
        let gone = a.client.cancel_key;
        drop(a);
        assert_eq!(clients.all().len(), 1);
        assert!(clients.by_cancel_key(gone).is_none());
        drop(b);
        assert!(clients.all().is_empty());
    }

    #[test]
    fn a_session_pooled_client_shows_its_own_backend_only() {
        let clients = Arc::new(Clients::default());
        let backend: BackendKey = ("127.0.0.1:5432".parse().unwrap(), 7, 8);
        let new = |own_backend| NewClient {
            key: key("a"),
            role: "alice",
            addr: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            application_name: "",
            own_backend,
        };
        let session = clients.register(NewClient {
            application_name: "psql",
            ..new(Some(Arc::new(backend)))
        });
        assert_eq!(
            (session.client.role(), session.client.application_name()),
            ("alice", "psql")
        );
        assert_eq!(session.client.backend(), Some(backend.0));
        assert_eq!(session.client.cancel_target(), Some(backend));
        // A transaction-pooled client's cancels follow its lease; it has
        // no backend of its own.
        let pooled = clients.register(new(None));
        *pooled.client.cancel_to.lock().unwrap() = Some(Arc::new(backend));
        assert_eq!(pooled.client.backend(), None);
        assert_eq!(pooled.client.cancel_target(), Some(backend));
    }
}
