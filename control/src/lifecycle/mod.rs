//! The lifecycle of databases: create, wake, hibernate, drop, crash
//! handling, replacing replicas of dead nodes and, at start, re-adoption and
//! orphan removal.
//!
//! Decisions are made on the coordinator (see [`crate::cluster`]); every
//! other node forwards them there. The work on replicas is done by the node
//! that holds them. Each database has a slot with two async locks: one
//! serialises decisions about it, which is what coalesces concurrent wakes
//! (the first caller starts the engine, the others find it running when they
//! get the lock); the other guards this node's processes of it.

mod active_set;
mod backups;
mod capacity;
mod catalog;
mod coordinator;
mod create;
mod decisions;
mod everywhere;
mod inbound;
mod local;
mod membership;
mod nodes;
mod patroni_members;
mod pg_backups;
mod placement;
mod replace;
mod settings;
mod upkeep;

use crate::metrics::DATABASES;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use rouse_config::Config;
use rouse_control_api::*;
use tokio::sync::broadcast;

use crate::activity::ActivityTracker;
use crate::cluster::Notice;
use crate::cluster::{Peers, CLUSTER_TOPIC, EVENTS_TOPIC};
use crate::engine::{self, EngineEnv};
use crate::error::{ControlError, Result};
use crate::meta::Store;
use crate::model::{DatabaseRecord, ReplicaRecord};
use crate::ports::PortAllocator;
use crate::process::Supervised;

/// The running processes of one database.
struct Running {
    processes: Vec<Supervised>,
    ports: Vec<u16>,
    started: Instant,
    /// Counted in the active set for as long as this lives.
    _place: active_set::Place,
}

#[derive(Default)]
struct Slot {
    /// Held by a decision about the database (on the coordinator), and by
    /// the recording of a finished wake that outlives its answer.
    deciding: Arc<tokio::sync::Mutex<()>>,
    /// This node's processes of the database.
    running: tokio::sync::Mutex<Option<Running>>,
    /// Held by a backup of the database: one at a time.
    backing_up: tokio::sync::Mutex<()>,
    /// Stopped on request (a hibernation under way): the upkeep loop must
    /// not start it again before the decision is recorded.
    held_down: std::sync::atomic::AtomicBool,
    /// Readable while a lifecycle operation holds `running`.
    view: Mutex<SlotView>,
}

#[derive(Default, Clone)]
struct SlotView {
    status: Option<DatabaseStatus>,
    endpoints: Vec<Endpoint>,
}

pub struct Manager {
    config: Config,
    node_id: String,
    store: Store,
    engines: EngineEnv,
    ports: Arc<PortAllocator>,
    peers: Peers,
    events: broadcast::Sender<Event>,
    pub activity: ActivityTracker,
    slots: Mutex<HashMap<DbKey, Arc<Slot>>>,
    /// Pool modes other than the default, as stored in `_system`.
    pool_modes: Mutex<HashMap<DbKey, PoolMode>>,
    /// Registered Patroni clusters, as stored in `_system`.
    patroni: Mutex<HashMap<DbKey, engine::patroni::Registration>>,
    /// Each database's secret as last read, to seal logins into answers.
    secrets: Mutex<HashMap<DbKey, String>>,
    /// Serialises the capacity check and insert of creates.
    creating: tokio::sync::Mutex<()>,
    /// Serialises where replacement replicas go: replacements that run at
    /// once each see the load the others recorded.
    placing: tokio::sync::Mutex<()>,
    /// Per-app database count and create rate.
    quotas: crate::quota::Quotas,
    started: Instant,
    /// Each database's status as `_system` last said, for the status gauge
    /// of databases this node has not touched since it started.
    recorded: Mutex<HashMap<DbKey, DatabaseStatus>>,
    /// The background loops, watched; `/healthz` reports dead ones.
    pub tasks: rouse_runtime::tasks::Tasks,
    /// Engine starts at once, granted in turn across apps.
    starts: crate::start_gate::StartGate,
    /// How many databases run here at once.
    active: active_set::ActiveSet,
    backups: crate::backup::Backups,
    last_backups: backups::LastBackups,
    /// Peer ids recorded in `_system` as members, and when each unknown
    /// peer last made this node read them again.
    members: Mutex<Members>,
    me: Weak<Manager>,
}

/// The cluster's members as last read from `_system`.
#[derive(Default)]
struct Members {
    known: HashSet<libp2p::PeerId>,
    /// When each unknown peer last made this node read them again.
    asked: HashMap<libp2p::PeerId, Instant>,
}

impl Manager {
    pub fn new(
        config: Config,
        node_id: String,
        store: Store,
        engines: EngineEnv,
        ports: Arc<PortAllocator>,
        peers: Peers,
        backups: crate::backup::Backups,
    ) -> Arc<Manager> {
        let (events, _) = broadcast::channel(4096);
        let quotas = crate::quota::Quotas::new(config.apps.clone());
        let starts = crate::start_gate::StartGate::new(config.control.concurrent_starts());
        let active = active_set::ActiveSet::new(&config.database);
        Arc::new_cyclic(|me| Manager {
            quotas,
            config,
            node_id,
            store,
            engines,
            ports,
            peers,
            events,
            activity: ActivityTracker::default(),
            slots: Mutex::new(HashMap::new()),
            pool_modes: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
            members: Mutex::new(Members::default()),
            patroni: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            placing: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            recorded: Mutex::new(HashMap::new()),
            tasks: rouse_runtime::tasks::Tasks::default(),
            starts,
            active,
            backups,
            last_backups: Default::default(),
            me: me.clone(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// What keeps this node from doing its work: `_system` out of reach,
    /// background loops that died. Empty when healthy.
    pub async fn health_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .tasks
            .dead()
            .into_iter()
            .map(|t| format!("background loop {t} is not running"))
            .collect();
        if !self.store.reachable().await {
            problems.push("the metadata store (_system) does not answer or has no leader".into());
        }
        problems
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Announces an event to this node's subscribers and, over gossipsub,
    /// to every other node's.
    pub fn publish(&self, event: Event) {
        self.peers.gossip(
            EVENTS_TOPIC,
            serde_json::to_vec(&event).expect("events serialise"),
        );
        let _ = self.events.send(event);
    }

    /// Tells every other node what the coordinator is doing.
    fn notify(&self, notice: Notice) {
        self.peers.gossip(
            CLUSTER_TOPIC,
            serde_json::to_vec(&notice).expect("notices serialise"),
        );
    }

    /// Whether the database runs, as the last decision about it says.
    fn is_up(&self, key: &DbKey, rec: &DatabaseRecord) -> bool {
        let view = self.slot(key).view.lock().expect("view poisoned").status;
        view.map_or(rec.status == DatabaseStatus::Active, |s| {
            s == DatabaseStatus::Active
        })
    }

    fn slot(&self, key: &DbKey) -> Arc<Slot> {
        self.slots
            .lock()
            .expect("slots poisoned")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Every slot, so that it can be worked on without holding the map.
    fn all_slots(&self) -> Vec<(DbKey, Arc<Slot>)> {
        self.slots
            .lock()
            .expect("slots poisoned")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    fn db_dir(&self, key: &DbKey) -> PathBuf {
        self.config.node.data_dir.join(key.internal())
    }

    fn set_view(&self, key: &DbKey, status: DatabaseStatus, endpoints: Vec<Endpoint>) {
        let slot = self.slot(key);
        *slot.view.lock().expect("view poisoned") = SlotView {
            status: Some(status),
            endpoints,
        };
    }

    /// Records a status in the store and the slot, and announces it.
    async fn transition(
        &self,
        key: &DbKey,
        status: DatabaseStatus,
        reason: Option<&str>,
        endpoints: Vec<Endpoint>,
    ) -> Result<()> {
        self.announce(key, status, reason, endpoints);
        self.store.set_status(key, status, reason).await
    }

    /// A new status in the slot and to every subscriber; the caller
    /// records it in the store.
    fn announce(
        &self,
        key: &DbKey,
        status: DatabaseStatus,
        reason: Option<&str>,
        endpoints: Vec<Endpoint>,
    ) {
        self.set_view(key, status, endpoints);
        self.publish(Event::Status {
            app: key.app.clone(),
            name: key.db.clone(),
            status,
            reason: reason.map(str::to_string),
        });
    }

    /// Takes the statuses `_system` holds now, and counts them.
    fn set_recorded(&self, records: &[DatabaseRecord]) {
        *self.recorded.lock().expect("recorded poisoned") =
            records.iter().map(|r| (r.key.clone(), r.status)).collect();
    }

    /// `rouse_databases{status}`: what this node decided last, else what
    /// `_system` said. Counted when metrics are read, not at every change:
    /// a count walks every database, and a storm changes hundreds at once.
    pub fn update_status_gauges(&self) {
        let slots = self.slots.lock().expect("slots poisoned");
        let recorded = self.recorded.lock().expect("recorded poisoned");
        let view = |key: &DbKey| {
            slots
                .get(key)
                .and_then(|s| s.view.lock().expect("view poisoned").status)
        };
        let mut counts: HashMap<DatabaseStatus, u64> = HashMap::new();
        for (key, st) in recorded.iter() {
            *counts.entry(view(key).unwrap_or(*st)).or_default() += 1;
        }
        for key in slots.keys().filter(|k| !recorded.contains_key(*k)) {
            if let Some(st) = view(key) {
                *counts.entry(st).or_default() += 1;
            }
        }
        for st in DatabaseStatus::ALL {
            DATABASES
                .gauge([st.as_str().into()])
                .set(counts.get(&st).copied().unwrap_or(0) as f64);
        }
    }

    pub fn info(&self, rec: &DatabaseRecord) -> DatabaseInfo {
        let view = self
            .slots
            .lock()
            .expect("slots poisoned")
            .get(&rec.key)
            .map(|s| s.view.lock().expect("view poisoned").clone())
            .unwrap_or_default();
        let status = view.status.unwrap_or(rec.status);
        let endpoints = match status {
            DatabaseStatus::Active if !view.endpoints.is_empty() => view.endpoints,
            // Started by another node (or before this one ran): where the
            // replicas are, leader unknown (rqlite followers forward).
            DatabaseStatus::Active => match rec.engine {
                Engine::Rqlite => {
                    engine::endpoints(&rec.replicas, None, self.engines.rqlite_http.is_https())
                }
                Engine::Postgres => engine::endpoints(&rec.replicas, Some(0), false),
                Engine::Patroni => self
                    .patroni_registration(&rec.key)
                    .map(|reg| engine::patroni::endpoints(&rec.replicas, &reg))
                    .unwrap_or_default(),
            },
            _ => Vec::new(),
        };
        let info = DatabaseInfo {
            app: rec.key.app.clone(),
            name: rec.key.db.clone(),
            engine: rec.engine,
            replication_factor: rec.replication_factor,
            status,
            reason: rec
                .reason
                .clone()
                .filter(|_| status == DatabaseStatus::Failed),
            endpoints,
            ports: rec.replicas.iter().flat_map(ReplicaRecord::ports).collect(),
            created_at: rec.created_at,
            last_activity: self
                .activity
                .last_activity(&rec.key)
                .unwrap_or(0)
                .max(rec.last_activity),
            last_wake_ms: rec.last_wake_ms,
            last_backup: self
                .last_backups
                .lock()
                .expect("backups poisoned")
                .get(&rec.key)
                .copied(),
            open_sessions: self.activity.open_sessions(&rec.key),
            pool_mode: self
                .pool_modes
                .lock()
                .expect("pool modes poisoned")
                .get(&rec.key)
                .copied()
                .unwrap_or_default(),
            engine_login: None,
        };
        self.secrets
            .lock()
            .expect("secrets poisoned")
            .insert(rec.key.clone(), rec.secret.clone());
        info
    }

    /// The CA that engine certificates chain to.
    pub fn engine_ca(&self) -> &str {
        self.engines.node_tls.ca_pem()
    }

    /// Whether this node has read `key`'s record, and so can give out its
    /// engine login.
    fn knows_secret(&self, key: &DbKey) -> bool {
        self.secrets
            .lock()
            .expect("secrets poisoned")
            .contains_key(key)
    }

    /// The engine login `role` may use on the database of `info`: for
    /// `proxy` the proxies' data-plane login of an rqlite database or the
    /// API login (an app user) of a PostgreSQL one, the engine's superuser
    /// for `admin`, nothing otherwise.
    pub fn engine_login(&self, info: &DatabaseInfo, role: &Role) -> Option<BackendCredentials> {
        let key = DbKey::new(info.app.clone(), info.name.clone());
        let secret = self
            .secrets
            .lock()
            .expect("secrets poisoned")
            .get(&key)
            .cloned()?;
        let user = match (role, info.engine) {
            (Role::Proxy, Engine::Rqlite) => return Some(engine::rqlite::proxy_login(&secret)),
            (Role::Proxy, Engine::Postgres) => return Some(engine::postgres::api_login(&secret)),
            (Role::Admin, Engine::Rqlite) => engine::rqlite::ENGINE_USER.to_string(),
            (Role::Admin, Engine::Postgres) => engine::postgres::ADMIN_USER.to_string(),
            (Role::Admin, Engine::Patroni) => self.patroni_registration(&key)?.admin_user,
            _ => return None,
        };
        Some(BackendCredentials {
            user,
            password: secret,
        })
    }

    async fn record(&self, key: &DbKey) -> Result<DatabaseRecord> {
        self.store
            .database(key)
            .await?
            .ok_or_else(|| not_found(key))
    }

    pub async fn status(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let rec = self
            .store
            .database_status(key)
            .await?
            .ok_or_else(|| not_found(key))?;
        Ok(self.info(&rec))
    }

    pub async fn list(&self, app: Option<&Name>) -> Result<Vec<DatabaseInfo>> {
        let recs = self.store.databases(app).await?;
        Ok(recs.iter().map(|r| self.info(r)).collect())
    }

    fn forget(&self, key: &DbKey) {
        self.activity.forget(key);
        self.recorded.lock().expect("recorded poisoned").remove(key);
        self.slots.lock().expect("slots poisoned").remove(key);
        self.secrets.lock().expect("secrets poisoned").remove(key);
    }
}

fn not_found(key: &DbKey) -> ControlError {
    ControlError::NotFound(format!(
        "database {} of app {} does not exist",
        key.db, key.app
    ))
}
