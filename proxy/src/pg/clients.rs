//! Who is connected to the PostgreSQL front, for the admin console: every
//! session while it lives (SHOW CLIENTS, SHOW SERVERS, KILL), and which
//! databases are paused (PAUSE holds new sessions as a wake does).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rouse_control_api::DbKey;
use tokio::sync::{watch, Notify};

use crate::net::park::{self, Ticket};

/// One client session, as the console shows it.
pub(crate) struct Client {
    pub(crate) id: u64,
    pub(crate) key: DbKey,
    /// `<role>.<app>`, as the client logged in.
    pub(crate) user: String,
    pub(crate) addr: SocketAddr,
    /// Unix ms.
    pub(crate) connected_at: u64,
    pub(crate) tls: bool,
    pub(crate) application_name: String,
    /// The backend of its own, in session pooling.
    pub(crate) backend: Option<SocketAddr>,
    /// Notified to end the session (KILL).
    pub(crate) kill: Notify,
    /// The ticket of its last parking (0: never parked), or [`KILLED`].
    pub(crate) parked: AtomicU64,
}

/// In [`Client::parked`] once KILL came.
const KILLED: u64 = u64::MAX;

impl Client {
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
    live: Mutex<BTreeMap<u64, Arc<Client>>>,
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
            .remove(&self.client.id);
    }
}

impl Clients {
    /// Registers a session; `make` gets its id.
    pub(crate) fn register(self: &Arc<Self>, make: impl FnOnce(u64) -> Client) -> Registered {
        let client = Arc::new(make(self.next.fetch_add(1, Ordering::Relaxed) + 1));
        self.live
            .lock()
            .expect("clients poisoned")
            .insert(client.id, client.clone());
        Registered {
            clients: self.clone(),
            client,
        }
    }

    /// Every live session, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Client>> {
        self.live
            .lock()
            .expect("clients poisoned")
            .values()
            .cloned()
            .collect()
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
        let make = |db: &str| {
            let k = key(db);
            move |id| Client {
                id,
                key: k,
                user: "alice.shop".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                connected_at: 0,
                tls: false,
                application_name: String::new(),
                backend: None,
                kill: Notify::new(),
                parked: AtomicU64::new(0),
            }
        };
        let a = clients.register(make("a"));
        let b = clients.register(make("b"));
        assert_eq!(clients.kill(&key("a")), 1);
        assert_eq!(clients.all().len(), 2);
        drop(a);
        assert_eq!(clients.all().len(), 1);
        drop(b);
        assert!(clients.all().is_empty());
    }
}
