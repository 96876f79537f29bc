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

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rouse_control_api::config::Config;
use rouse_control_api::*;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};

use crate::activity::ActivityTracker;
use crate::cluster::{self, LocalStart, Membership, NodeRequest, NodeResponse, Notice};
use crate::engine::{self, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::peers::{Inbound, Peers, ACTIVITY_TOPIC, CLUSTER_TOPIC, EVENTS_TOPIC};
use crate::ports::PortAllocator;
use crate::process::{log_tail, ProcessEvent, Supervised};
use crate::rqlite::RqliteClient;
use crate::secrets;
use crate::store::{DatabaseRecord, ReplicaRecord, Store, UserRecord};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const REPLICATION_TARGET: &str = "replication_target";

/// The setting that turns off creation on first access for one app.
fn pool_mode_setting(key: &DbKey) -> String {
    format!("db.{key}.pool_mode")
}

/// The members' REST APIs and admin user of a registered Patroni cluster.
fn patroni_setting(key: &DbKey) -> String {
    format!("db.{key}.patroni")
}

/// Where the replicas of a database are, for logs and the decision log.
fn placement(replicas: &[ReplicaRecord]) -> String {
    replicas
        .iter()
        .map(|r| format!("{}@{}", engine::rqlite::node_id(r), r.node_id))
        .collect::<Vec<_>>()
        .join(",")
}

fn first_access_setting(app: &Name) -> String {
    format!("app.{app}.create_on_first_access")
}

/// The running processes of one database.
struct Running {
    processes: Vec<Supervised>,
    ports: Vec<u16>,
}

#[derive(Default)]
struct Slot {
    /// Held by a decision about the database (on the coordinator).
    deciding: tokio::sync::Mutex<()>,
    /// This node's processes of the database.
    running: tokio::sync::Mutex<Option<Running>>,
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
    /// Per-app database count and create rate.
    quotas: crate::quota::Quotas,
    started: Instant,
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
    ) -> Arc<Manager> {
        let (events, _) = broadcast::channel(4096);
        let quotas = crate::quota::Quotas::new(config.apps.clone());
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
            started: Instant::now(),
            me: me.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn store(&self) -> &Store {
        &self.store
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

    /// The cluster as this node sees it now; healthy peers not yet known
    /// as members are looked up in `_system` first (a node that just
    /// joined takes part at once).
    async fn membership(&self) -> Membership {
        let unknown = {
            let members = self.members.lock().expect("members poisoned");
            self.peers
                .peers()
                .iter()
                .any(|p| p.healthy && !members.known.contains(&p.peer_id))
        };
        if unknown {
            if let Err(e) = self.refresh_members().await {
                debug!(error = %e, "cannot read the cluster's members");
            }
        }
        let members = self.members.lock().expect("members poisoned").known.clone();
        Membership::new(
            &self.peers,
            &members,
            &self.node_id,
            self.config.database.max_databases,
            self.started,
            !self.config.discovery.bootstrap_peers.is_empty(),
        )
    }

    /// Records this node as a member of the cluster in `_system`.
    pub async fn record_membership(&self) -> Result<()> {
        self.store
            .record_member(&self.peers.peer_id().to_string(), &self.node_id, now_ms())
            .await?;
        self.refresh_members().await
    }

    async fn refresh_members(&self) -> Result<()> {
        let members: HashSet<libp2p::PeerId> = self
            .store
            .members()
            .await?
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        self.members.lock().expect("members poisoned").known = members;
        Ok(())
    }

    /// Whether `peer` is a member recorded in `_system`. An unknown peer
    /// makes this node read the members again (`eager`: always; otherwise
    /// at most once a second per peer, so that frequent messages of a
    /// stranger do not each cost a read of `_system`).
    async fn is_member(&self, peer: &libp2p::PeerId, eager: bool) -> bool {
        let read_again = {
            let mut members = self.members.lock().expect("members poisoned");
            if members.known.contains(peer) {
                return true;
            }
            let due = eager
                || members
                    .asked
                    .get(peer)
                    .is_none_or(|at| at.elapsed() > Duration::from_secs(1));
            if due {
                if members.asked.len() >= 1_000 {
                    members.asked.clear();
                }
                members.asked.insert(*peer, Instant::now());
            }
            due
        };
        if read_again {
            if let Err(e) = self.refresh_members().await {
                warn!(error = %e, "cannot read the cluster's members");
            }
        }
        self.members
            .lock()
            .expect("members poisoned")
            .known
            .contains(peer)
    }

    /// Whether to act on what `peer` sent (`what`: a request, gossip);
    /// a refusal is logged and counted. Requests are rare and someone waits
    /// for them: for those, look again (`eager`).
    async fn admits(&self, peer: &libp2p::PeerId, what: &'static str, eager: bool) -> bool {
        let member = self.is_member(peer, eager).await;
        if !member {
            metrics::counter!("rouse_peer_refusals_total", "what" => "not_a_member").increment(1);
            warn!(peer_id = %peer, what, "ignored a peer that is not a member recorded in _system");
        }
        member
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
        self.update_status_gauges();
    }

    /// Records a status in the store and the slot, and announces it.
    async fn transition(
        &self,
        key: &DbKey,
        status: DatabaseStatus,
        reason: Option<&str>,
        endpoints: Vec<Endpoint>,
    ) -> Result<()> {
        self.set_view(key, status, endpoints);
        self.publish(Event::Status {
            app: key.app.clone(),
            name: key.db.clone(),
            status,
            reason: reason.map(str::to_string),
        });
        self.store.set_status(key, status, reason).await
    }

    fn update_status_gauges(&self) {
        let slots = self.slots.lock().expect("slots poisoned");
        let mut counts: HashMap<DatabaseStatus, u64> = HashMap::new();
        for s in slots.values() {
            if let Some(st) = s.view.lock().expect("view poisoned").status {
                *counts.entry(st).or_default() += 1;
            }
        }
        for st in DatabaseStatus::ALL {
            metrics::gauge!("rouse_databases", "status" => st.as_str())
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
                    engine::endpoints(&rec.replicas, None, self.engines.engine_https.is_some())
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

    /// The engine login `role` may use on the database of `info`: the
    /// proxies' data-plane login of an rqlite database for `proxy`, the
    /// engine's superuser for `admin`, nothing otherwise.
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

    fn patroni_registration(&self, key: &DbKey) -> Option<engine::patroni::Registration> {
        self.patroni
            .lock()
            .expect("patroni poisoned")
            .get(key)
            .cloned()
    }

    async fn record(&self, key: &DbKey) -> Result<DatabaseRecord> {
        self.store.database(key).await?.ok_or_else(|| {
            ControlError::NotFound(format!(
                "database {} of app {} does not exist",
                key.db, key.app
            ))
        })
    }

    pub async fn status(&self, key: &DbKey) -> Result<DatabaseInfo> {
        Ok(self.info(&self.record(key).await?))
    }

    pub async fn list(&self, app: Option<&Name>) -> Result<Vec<DatabaseInfo>> {
        let recs = self.store.databases(app).await?;
        Ok(recs.iter().map(|r| self.info(r)).collect())
    }

    async fn require_app(&self, app: &Name) -> Result<()> {
        if self.store.app_exists(app).await? {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("app {app} does not exist")))
        }
    }

    // ---- apps, keys, users -------------------------------------------------

    pub async fn create_app(&self, req: &CreateApp) -> Result<AppInfo> {
        let app = &req.name;
        let _guard = self.creating.lock().await;
        if self.store.app_exists(app).await? {
            return Err(ControlError::AlreadyExists(format!(
                "app {app} already exists"
            )));
        }
        let now = now_ms();
        self.store.insert_app(app, now).await?;
        if !req.create_on_first_access {
            self.store
                .set_setting(&first_access_setting(app), "false")
                .await?;
        }
        info!(app = %app, create_on_first_access = req.create_on_first_access, "app created");
        Ok(AppInfo {
            name: app.clone(),
            created_at: now,
            create_on_first_access: req.create_on_first_access,
        })
    }

    pub async fn create_key(&self, app: &Name) -> Result<ApiKeyCreated> {
        self.require_app(app).await?;
        let (id, key) = secrets::new_api_key();
        self.store
            .insert_key(app, &id, &secrets::hash_bearer_secret(&key), now_ms())
            .await?;
        info!(app = %app, key_id = %id, "API key issued");
        Ok(ApiKeyCreated {
            app: app.clone(),
            id,
            key,
        })
    }

    pub async fn list_keys(&self, app: &Name) -> Result<Vec<ApiKeyInfo>> {
        self.require_app(app).await?;
        Ok(self
            .store
            .list_keys(app)
            .await?
            .into_iter()
            .map(|(id, created_at)| ApiKeyInfo { id, created_at })
            .collect())
    }

    pub async fn revoke_key(&self, app: &Name, id: &str) -> Result<()> {
        if !self.store.delete_key(app, id).await? {
            return Err(ControlError::NotFound(format!("app {app} has no key {id}")));
        }
        info!(app = %app, key_id = %id, "API key revoked");
        self.publish(Event::KeyRevoked {
            app: app.clone(),
            id: id.to_string(),
        });
        Ok(())
    }

    pub async fn verify_key(&self, key: &str) -> Result<KeyOwner> {
        match self
            .store
            .find_key(&secrets::hash_bearer_secret(key))
            .await?
        {
            Some((app, id)) => Ok(KeyOwner { app, id }),
            None => Err(ControlError::NotFound("unknown API key".into())),
        }
    }

    pub async fn upsert_user(&self, app: &Name, name: &str, password: &str) -> Result<UserInfo> {
        secrets::validate_user_name(name).map_err(ControlError::BadRequest)?;
        if password.is_empty() {
            return Err(ControlError::BadRequest(
                "password must not be empty".into(),
            ));
        }
        self.require_app(app).await?;
        let user = UserRecord {
            name: name.to_string(),
            verifier: secrets::scram_verifier(password),
        };
        self.store.upsert_user(app, &user).await?;
        // Running Postgres databases of the app learn the role now; the
        // others when they next start.
        let users = self.store.users(app).await?;
        for rec in self.store.databases(Some(app)).await? {
            let slot = self.slot(&rec.key);
            let _deciding = slot.deciding.lock().await;
            if !self.is_up(&rec.key, &rec) {
                continue;
            }
            match rec.engine {
                Engine::Rqlite => {}
                Engine::Postgres => {
                    engine::postgres::apply_users(&rec.replicas[0], &rec.secret, &users).await?
                }
                Engine::Patroni => {
                    if let Some(reg) = self.patroni_registration(&rec.key) {
                        engine::patroni::apply_users(
                            &rec.key.app,
                            &rec.replicas,
                            &reg,
                            &rec.secret,
                            &users,
                        )
                        .await?
                    }
                }
            }
        }
        info!(app = %app, user = name, "Postgres user saved");
        self.publish(Event::UserChanged {
            app: app.clone(),
            name: name.to_string(),
        });
        Ok(UserInfo {
            app: app.clone(),
            name: name.to_string(),
            scram_verifier: user.verifier,
        })
    }

    pub async fn user(&self, app: &Name, name: &str) -> Result<UserInfo> {
        self.store
            .users(app)
            .await?
            .into_iter()
            .find(|u| u.name == name)
            .map(|u| UserInfo {
                app: app.clone(),
                name: u.name,
                scram_verifier: u.verifier,
            })
            .ok_or_else(|| ControlError::NotFound(format!("app {app} has no user {name}")))
    }

    // ---- databases ----------------------------------------------------------

    async fn default_replication(&self) -> Result<u32> {
        Ok(match self.store.setting(REPLICATION_TARGET).await? {
            Some(v) => v.parse().unwrap_or(self.config.database.replication_factor),
            None => self.config.database.replication_factor,
        })
    }

    /// Creates a database; `first_access` when a proxy creates it because a
    /// client used it, which the app's policy may forbid.
    pub async fn create(&self, req: &CreateDatabase, first_access: bool) -> Result<DatabaseInfo> {
        let request = NodeRequest::Create {
            request: req.clone(),
            first_access,
        };
        self.decide_info(request, async {
            self.create_here(req, first_access).await.map(info)
        })
        .await
    }

    /// Starts a database that is not running (idempotent; concurrent calls
    /// share one start). Returns once it answers queries.
    pub async fn wake(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let request = NodeRequest::Wake { key: key.clone() };
        self.decide_info(request, async { self.wake_here(key).await.map(info) })
            .await
    }

    /// Stops a running database, keeping its data. Refused while proxies
    /// report open sessions, unless `force`.
    pub async fn hibernate(&self, key: &DbKey, force: bool) -> Result<DatabaseInfo> {
        let request = NodeRequest::Hibernate {
            key: key.clone(),
            force,
        };
        self.decide_info(request, async {
            self.hibernate_here(key, force).await.map(info)
        })
        .await
    }

    pub async fn drop_database(&self, key: &DbKey) -> Result<()> {
        let request = NodeRequest::Drop { key: key.clone() };
        self.decide(request, async {
            self.drop_here(key).await.map(|_| NodeResponse::Done)
        })
        .await
        .map(|_| ())
    }

    /// Makes a decision `here` when this node coordinates, else sends
    /// `request` to the coordinator. An answer about a database also
    /// updates this node's view.
    async fn decide(
        &self,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<NodeResponse> {
        let answer = match self.membership().await.coordinator() {
            None => here.await?,
            Some(peer) => self.ask(peer, request).await?,
        };
        if let NodeResponse::Info(info) = &answer {
            let key = DbKey::new(info.app.clone(), info.name.clone());
            self.set_view(&key, info.status, info.endpoints.clone());
        }
        Ok(answer)
    }

    /// Makes a decision that answers with the database's status.
    async fn decide_info(
        &self,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<DatabaseInfo> {
        match self.decide(request, here).await? {
            NodeResponse::Info(info) => Ok(*info),
            other => Err(ControlError::Internal(format!(
                "unexpected answer from the coordinator: {other:?}"
            ))),
        }
    }

    /// Sends `request` to `peer`. A peer that could not be dialled (so
    /// nothing was sent) is tried twice more, shortly after: a connection
    /// may be in the middle of being made (a node that just joined, a redial).
    async fn ask(&self, peer: libp2p::PeerId, request: NodeRequest) -> Result<NodeResponse> {
        let mut tries = 0;
        loop {
            match self.peers.request(peer, request.clone()).await {
                Ok(NodeResponse::Failed(e)) => return Err(e),
                Ok(answer) => return Ok(answer),
                Err(e @ crate::peers::PeersError::Dial { .. }) if tries < 2 => {
                    tries += 1;
                    debug!(peer_id = %peer, error = %e, "request to a peer failed; trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(ControlError::Peer(e.to_string())),
            }
        }
    }

    /// Runs the work of `request` on node `node_id`: `here` on this node,
    /// or `request` there over libp2p.
    async fn on_node(
        &self,
        node_id: &str,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<NodeResponse> {
        if node_id == self.node_id {
            return here.await;
        }
        let peer = self
            .membership()
            .await
            .peer_of(node_id)
            .ok_or_else(|| ControlError::Peer(format!("node {node_id} is not known here")))?;
        self.ask(peer, request).await
    }

    /// Answers a peer's request.
    pub async fn handle(&self, request: NodeRequest) -> Result<NodeResponse> {
        match request {
            NodeRequest::Create {
                request,
                first_access,
            } => self.create_here(&request, first_access).await.map(info),
            NodeRequest::Wake { key } => self.wake_here(&key).await.map(info),
            NodeRequest::Hibernate { key, force } => {
                self.hibernate_here(&key, force).await.map(info)
            }
            NodeRequest::Drop { key } => self.drop_here(&key).await.map(|_| NodeResponse::Done),
            NodeRequest::Allocate {
                key: _,
                engine,
                idx,
                previous,
            } => self
                .allocate_local(engine, idx, previous.as_ref())
                .map(NodeResponse::Replica),
            NodeRequest::Start { key, start } => self
                .start_local(&key, start)
                .await
                .map(|_| NodeResponse::Done),
            NodeRequest::Stop { key, remove_data } => {
                self.stop_local(&key, remove_data).await;
                Ok(NodeResponse::Done)
            }
        }
    }

    async fn create_here(&self, req: &CreateDatabase, first_access: bool) -> Result<DatabaseInfo> {
        let asked = Instant::now();
        let key = DbKey::new(req.app.clone(), req.name.clone());
        if first_access
            && self
                .store
                .setting(&first_access_setting(&key.app))
                .await?
                .as_deref()
                == Some("false")
        {
            return Err(ControlError::NotFound(format!(
                "database {} of app {} does not exist, and the app does not create databases on first access",
                key.db, key.app
            )));
        }
        let registration = match (req.engine, &req.patroni) {
            (Engine::Patroni, Some(reg)) => Some(engine::patroni::accept(reg, &self.node_id)?),
            (Engine::Patroni, None) => {
                return Err(ControlError::BadRequest(
                    "engine patroni registers an existing cluster: give `patroni` with its members and an admin login".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(ControlError::BadRequest(
                    "`patroni` belongs to engine patroni only".into(),
                ))
            }
            (_, None) => None,
        };
        let rf = match (req.engine, req.replication_factor) {
            (Engine::Patroni, _) => registration.as_ref().map_or(1, |(r, _)| r.len() as u32),
            (_, Some(0)) => return Err(ControlError::BadRequest("replication_factor must be at least 1".into())),
            (Engine::Postgres, Some(n)) if n > 1 => {
                return Err(ControlError::BadRequest(
                    "engine postgres runs one instance per database; register a Patroni cluster for replicas".into(),
                ))
            }
            (Engine::Postgres, _) => 1,
            (Engine::Rqlite, Some(n)) => n,
            (Engine::Rqlite, None) => self.default_replication().await?,
        };
        let membership = self.membership().await;
        let hosts = &self.config.control.replica_hosts;
        if registration.is_none() && !membership.clustered() && rf as usize > hosts.len() {
            return Err(ControlError::InsufficientNodes {
                got: hosts.len() as u32,
                need: rf,
            });
        }
        self.require_app(&key.app).await?;

        let slot = self.slot(&key);
        let _deciding = slot.deciding.lock().await;
        let rec = {
            let _creating = self.creating.lock().await;
            if self.store.database(&key).await?.is_some() {
                return Err(ControlError::AlreadyExists(format!(
                    "database {} of app {} already exists",
                    key.db, key.app
                )));
            }
            let all = self.store.databases(None).await?;
            let held_by_app = all.iter().filter(|d| d.key.app == key.app).count();
            self.quotas.admit_create(&key.app, held_by_app)?;
            let replicas = match &registration {
                Some((members, _)) => members.clone(),
                None if membership.clustered() => {
                    let placed = membership.place(rf, &cluster::load(&all), &HashSet::new())?;
                    let mut out = Vec::new();
                    for (idx, node) in placed.iter().enumerate() {
                        out.push(
                            self.allocate_on(&node.node_id, &key, req.engine, idx as u32, None)
                                .await?,
                        );
                    }
                    out
                }
                None => {
                    let held = all.len() as u32;
                    let max = self.config.database.max_databases;
                    if held >= max {
                        return Err(ControlError::MaxDatabases { held, max });
                    }
                    let mut out = Vec::new();
                    for idx in 0..rf {
                        match self.allocate_local(req.engine, idx, None) {
                            Ok(r) => out.push(r),
                            Err(e) => {
                                self.release(&out);
                                return Err(e);
                            }
                        }
                    }
                    out
                }
            };
            let now = now_ms();
            let rec = DatabaseRecord {
                key: key.clone(),
                engine: req.engine,
                replication_factor: rf,
                status: DatabaseStatus::Initializing,
                reason: None,
                created_at: now,
                last_activity: now,
                last_wake_ms: None,
                secret: match &req.patroni {
                    Some(reg) => reg.admin.password.clone(),
                    None => secrets::new_password(),
                },
                replicas,
            };
            if let Some((_, kept)) = &registration {
                let json = serde_json::to_string(kept).expect("a registration serialises");
                self.store
                    .set_setting(&patroni_setting(&key), &json)
                    .await?;
            }
            if let Err(e) = self.store.insert_database(&rec).await {
                self.release(&rec.replicas);
                return Err(e);
            }
            if membership.clustered() {
                self.record_decision(&rec.key, "place", &placement(&rec.replicas))
                    .await;
            }
            rec
        };
        self.set_view(&key, DatabaseStatus::Initializing, Vec::new());
        self.publish(Event::Status {
            app: key.app.clone(),
            name: key.db.clone(),
            status: DatabaseStatus::Initializing,
            reason: None,
        });
        info!(database = %key, engine = rec.engine.as_str(), replicas = rf, placement = %placement(&rec.replicas), "creating database");

        let start = LocalStart {
            bootstrap: true,
            raft_moved: false,
        };
        let placed = asked.elapsed();
        match self.start_everywhere(&rec, start).await {
            Ok(endpoints) => {
                self.activity.touch(&key, now_ms());
                self.transition(&key, DatabaseStatus::Active, None, endpoints.clone())
                    .await?;
                self.publish(Event::Leader {
                    app: key.app.clone(),
                    name: key.db.clone(),
                    endpoints,
                });
                info!(
                    database = %key,
                    ports = ?rec.replicas.iter().flat_map(ReplicaRecord::ports).collect::<Vec<_>>(),
                    placed_ms = placed.as_millis() as u64,
                    took_ms = asked.elapsed().as_millis() as u64,
                    "database created"
                );
                self.status(&key).await
            }
            Err(e) => {
                // Nothing half-made stays behind.
                error!(database = %key, error = %e, "create failed; removing what was made");
                self.stop_everywhere(&rec, true).await;
                let _ = std::fs::remove_dir_all(self.db_dir(&key));
                self.store.delete_database(&key).await?;
                self.forget(&key);
                self.publish(Event::Dropped {
                    app: key.app.clone(),
                    name: key.db.clone(),
                });
                Err(e)
            }
        }
    }

    /// Notes a coordinator's decision in `_system` (a failure is logged:
    /// the decision itself is already recorded in the replicas table).
    async fn record_decision(&self, key: &DbKey, kind: &str, detail: &str) {
        let by = self.peers.peer_id().to_string();
        if let Err(e) = self
            .store
            .insert_decision(now_ms(), &by, kind, key, detail)
            .await
        {
            warn!(database = %key, kind, error = %e, "could not log a decision");
        }
    }

    /// Ports for replica `idx` of a database on node `node_id`.
    async fn allocate_on(
        &self,
        node_id: &str,
        key: &DbKey,
        engine: Engine,
        idx: u32,
        previous: Option<&ReplicaRecord>,
    ) -> Result<ReplicaRecord> {
        let request = NodeRequest::Allocate {
            key: key.clone(),
            engine,
            idx,
            previous: previous.cloned(),
        };
        let here = async {
            self.allocate_local(engine, idx, previous)
                .map(NodeResponse::Replica)
        };
        match self.on_node(node_id, request, here).await? {
            NodeResponse::Replica(r) => Ok(r),
            other => Err(ControlError::Internal(format!(
                "unexpected answer to a port request: {other:?}"
            ))),
        }
    }

    /// Ports on this node for replica `idx`, preferring `previous`'s.
    fn allocate_local(
        &self,
        engine: Engine,
        idx: u32,
        previous: Option<&ReplicaRecord>,
    ) -> Result<ReplicaRecord> {
        if engine == Engine::Patroni {
            return Err(ControlError::Internal(
                "a Patroni cluster keeps its own addresses".into(),
            ));
        }
        let d = &self.config.database;
        let hosts = &self.config.control.replica_hosts;
        let host = hosts[idx as usize % hosts.len()];
        let (port, raft_port) = match engine {
            Engine::Rqlite => {
                let http = self.ports.allocate(
                    d.port_range_http_start..=d.port_range_http_end,
                    host,
                    previous.map(|p| p.port),
                )?;
                let raft = self
                    .ports
                    .allocate(
                        d.port_range_raft_start..=d.port_range_raft_end,
                        host,
                        previous.and_then(|p| p.raft_port),
                    )
                    .inspect_err(|_| self.ports.release([http]))?;
                (http, Some(raft))
            }
            _ => (
                self.ports.allocate(
                    d.port_range_postgres_start..=d.port_range_postgres_end,
                    host,
                    previous.map(|p| p.port),
                )?,
                None,
            ),
        };
        Ok(ReplicaRecord {
            idx,
            node_id: self.node_id.clone(),
            host: host.to_string(),
            port,
            raft_port,
        })
    }

    fn release(&self, replicas: &[ReplicaRecord]) {
        self.ports.release(
            replicas
                .iter()
                .filter(|r| r.node_id == self.node_id)
                .flat_map(ReplicaRecord::ports),
        );
    }

    /// Ports for a wake: each live holder allocates again, preferring the
    /// previous ones; a move is recorded. Returns the record to start and
    /// whether Raft addresses moved.
    async fn reallocate(&self, rec: &DatabaseRecord) -> Result<(DatabaseRecord, bool)> {
        if rec.engine == Engine::Patroni {
            return Ok((rec.clone(), false));
        }
        let membership = self.membership().await;
        let mut replicas = Vec::with_capacity(rec.replicas.len());
        for r in &rec.replicas {
            if !membership.is_live(&r.node_id) {
                replicas.push(r.clone());
                continue;
            }
            match self
                .allocate_on(&r.node_id, &rec.key, rec.engine, r.idx, Some(r))
                .await
            {
                Ok(new) => replicas.push(new),
                Err(e) => {
                    self.release(&replicas);
                    return Err(e);
                }
            }
        }
        let raft_moved = replicas
            .iter()
            .zip(&rec.replicas)
            .any(|(a, b)| a.raft_port != b.raft_port || a.host != b.host);
        if replicas != rec.replicas {
            info!(database = %rec.key, "previous ports taken; waking on new ones");
            if let Err(e) = self.store.set_replicas(&rec.key, &replicas).await {
                self.release(&replicas);
                return Err(e);
            }
        }
        Ok((
            DatabaseRecord {
                replicas,
                ..rec.clone()
            },
            raft_moved,
        ))
    }

    /// Has every live holder start its replicas, then waits until the
    /// database answers (leader first in the endpoints). Holders that are
    /// down are left out while the others still make a quorum.
    async fn start_everywhere(
        &self,
        rec: &DatabaseRecord,
        start: LocalStart,
    ) -> Result<Vec<Endpoint>> {
        if rec.engine == Engine::Patroni {
            return self.attach_patroni(rec).await;
        }
        let membership = self.membership().await;
        let live: Vec<ReplicaRecord> = rec
            .replicas
            .iter()
            .filter(|r| membership.is_live(&r.node_id))
            .cloned()
            .collect();
        if live.len() * 2 <= rec.replicas.len() {
            let down: Vec<&str> = rec
                .replicas
                .iter()
                .filter(|r| !membership.is_live(&r.node_id))
                .map(|r| r.node_id.as_str())
                .collect();
            return Err(ControlError::Peer(format!(
                "database {}: {} of {} replicas are on nodes that are down ({}): no quorum",
                rec.key,
                down.len(),
                rec.replicas.len(),
                down.join(", ")
            )));
        }
        let t0 = Instant::now();
        let started = futures::future::join_all(cluster::holders(&live).into_iter().map(|node| {
            let request = NodeRequest::Start {
                key: rec.key.clone(),
                start,
            };
            let here = async {
                self.start_local(&rec.key, start)
                    .await
                    .map(|_| NodeResponse::Done)
            };
            async move { self.on_node(&node, request, here).await }
        }))
        .await;
        if let Some(Err(e)) = started.into_iter().find(Result::is_err) {
            self.stop_everywhere(rec, false).await;
            return Err(e);
        }
        let spawned = t0.elapsed();
        let label = rec.key.internal();
        let inst = Instance {
            label: &label,
            dir: self.db_dir(&rec.key).join(rec.engine.as_str()),
            replicas: &live,
            node_id: &self.node_id,
            secret: &rec.secret,
            first_start: false,
            raft_moved: false,
            join: Vec::new(),
            non_voter: false,
            raft_id: None,
        };
        let ready = async {
            let endpoints = self.engines.wait_ready(rec.engine, &inst).await?;
            if rec.engine == Engine::Postgres {
                let users = self.store.users(&rec.key.app).await?;
                self.engines
                    .after_start(rec.engine, &inst, rec.key.db.as_str(), &users)
                    .await?;
            }
            Ok(endpoints)
        }
        .await;
        match ready {
            Ok(endpoints) => {
                let answered = t0.elapsed();
                let engine = rec.engine.as_str();
                metrics::histogram!("rouse_wake_duration_seconds", "engine" => engine, "phase" => "start")
                    .record(spawned.as_secs_f64());
                metrics::histogram!("rouse_wake_duration_seconds", "engine" => engine, "phase" => "first_answer")
                    .record((answered - spawned).as_secs_f64());
                Ok(endpoints)
            }
            Err(e) => {
                self.stop_everywhere(rec, false).await;
                Err(e)
            }
        }
    }

    /// Has every live holder stop its replicas (and remove their data).
    async fn stop_everywhere(&self, rec: &DatabaseRecord, remove_data: bool) {
        if rec.engine == Engine::Patroni {
            return;
        }
        let membership = self.membership().await;
        let holders: Vec<String> = cluster::holders(&rec.replicas)
            .into_iter()
            .filter(|n| membership.is_live(n))
            .collect();
        futures::future::join_all(holders.into_iter().map(|node| {
            let request = NodeRequest::Stop {
                key: rec.key.clone(),
                remove_data,
            };
            let here = async {
                self.stop_local(&rec.key, remove_data).await;
                Ok(NodeResponse::Done)
            };
            async move {
                if let Err(e) = self.on_node(&node, request, here).await {
                    warn!(database = %rec.key, node_id = %node, error = %e, "could not stop a replica");
                }
            }
        }))
        .await;
    }

    /// Starts this node's replicas of a database (idempotent) and waits
    /// until they answer. A replica without data bootstraps the cluster with
    /// the others (`start.bootstrap`) or joins the running one.
    async fn start_local(&self, key: &DbKey, start: LocalStart) -> Result<()> {
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        slot.held_down
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if running.is_some() {
            return Ok(());
        }
        let rec = self.record(key).await?;
        let label = key.internal();
        let join = if start.bootstrap || rec.engine != Engine::Rqlite {
            Vec::new()
        } else {
            rec.replicas
                .iter()
                .filter(|r| r.node_id != self.node_id)
                .map(engine::rqlite::raft_addr)
                .collect()
        };
        let inst = Instance {
            label: &label,
            dir: self.db_dir(key).join(rec.engine.as_str()),
            replicas: &rec.replicas,
            node_id: &self.node_id,
            secret: &rec.secret,
            first_start: false,
            raft_moved: start.raft_moved,
            join,
            non_voter: false,
            raft_id: None,
        };
        if inst.local().next().is_none() {
            return Err(ControlError::Internal(format!(
                "node {} holds no replica of {key}",
                self.node_id
            )));
        }
        let inst = Instance {
            first_start: !engine::has_data(rec.engine, &inst),
            ..inst
        };
        self.engines.prepare(rec.engine, &inst).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut processes = Vec::new();
        for r in inst.local() {
            let spec = self.engines.process(rec.engine, &inst, r)?;
            match Supervised::start(spec.clone(), r.idx as usize, tx.clone()).await {
                Ok(p) => {
                    info!(database = %label, pid = p.pid(), host = %r.host, port = r.port, raft_port = ?r.raft_port, joining = inst.first_start && !inst.join.is_empty(), "engine process started");
                    processes.push(p);
                }
                Err(e) => {
                    self.stop_all(processes).await;
                    return Err(ControlError::Engine(format!(
                        "cannot start {}: {e}",
                        spec.program.display()
                    )));
                }
            }
        }
        // A process that exits during the start is a failed start, not
        // something to retry quietly until the timeout.
        let alive = tokio::select! {
            alive = self.engines.wait_alive(rec.engine, &inst) => alive,
            Some(ev) = rx.recv() => Err(ControlError::Engine(match ev {
                ProcessEvent::GaveUp { reason, .. } => reason,
                ProcessEvent::Restarting { replica, status, .. } => {
                    let log = inst.dir.join(format!("node-{replica}.log"));
                    format!("{} exited during start ({status}): {}", rec.engine.as_str(), log_tail(&log, 5))
                }
                ProcessEvent::Restarted { replica } => format!("replica {replica} restarted during start"),
            })),
        };
        let ports: Vec<u16> = inst.local().flat_map(ReplicaRecord::ports).collect();
        if let Err(e) = alive {
            self.stop_all(processes).await;
            self.ports.release(ports);
            return Err(e);
        }
        self.forward_process_events(key.clone(), rx);
        *running = Some(Running { processes, ports });
        Ok(())
    }

    /// Stops this node's replicas of a database; with `remove_data`, its
    /// data directory here goes too.
    async fn stop_local(&self, key: &DbKey, remove_data: bool) {
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        self.stop_held(key, &slot, &mut running, remove_data).await;
    }

    /// [`Self::stop_local`] with the slot's process lock already held.
    async fn stop_held(
        &self,
        key: &DbKey,
        slot: &Slot,
        running: &mut Option<Running>,
        remove_data: bool,
    ) {
        slot.held_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(run) = running.take() {
            self.stop_all(run.processes).await;
            self.ports.release(run.ports);
        }
        if remove_data {
            let dir = self.db_dir(key);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(database = %key, dir = %dir.display(), error = %e, "could not remove data directory");
                }
            }
        }
    }

    /// A registered Patroni cluster "starts" when its leader takes the
    /// app's users; nothing runs here.
    async fn attach_patroni(&self, rec: &DatabaseRecord) -> Result<Vec<Endpoint>> {
        let reg = self.load_patroni(&rec.key).await?;
        let users = self.store.users(&rec.key.app).await?;
        engine::patroni::apply_users(&rec.key.app, &rec.replicas, &reg, &rec.secret, &users)
            .await?;
        Ok(engine::patroni::endpoints(&rec.replicas, &reg))
    }

    /// The stored registration of a Patroni cluster, also kept in memory.
    async fn load_patroni(&self, key: &DbKey) -> Result<engine::patroni::Registration> {
        let stored = self
            .store
            .setting(&patroni_setting(key))
            .await?
            .ok_or_else(|| ControlError::Engine("the Patroni registration is missing".into()))?;
        let reg: engine::patroni::Registration = serde_json::from_str(&stored)
            .map_err(|e| ControlError::Engine(format!("unreadable Patroni registration: {e}")))?;
        self.patroni
            .lock()
            .expect("patroni poisoned")
            .insert(key.clone(), reg.clone());
        Ok(reg)
    }

    async fn stop_all(&self, processes: Vec<Supervised>) {
        let grace = self.config.control.stop_grace;
        futures::future::join_all(processes.into_iter().map(|p| p.stop(grace))).await;
    }

    fn forward_process_events(&self, key: DbKey, mut rx: mpsc::UnboundedReceiver<ProcessEvent>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(manager) = me.upgrade() else { return };
                manager.on_process_event(&key, ev).await;
            }
        });
    }

    async fn on_process_event(&self, key: &DbKey, ev: ProcessEvent) {
        match ev {
            ProcessEvent::Restarting {
                replica,
                status,
                attempt,
            } => {
                warn!(database = %key, replica, status = %status, attempt, "engine process exited unexpectedly; restarting");
                metrics::counter!("rouse_process_restarts_total").increment(1);
            }
            ProcessEvent::Restarted { replica } => {
                info!(database = %key, replica, "engine process restarted");
                let Ok(rec) = self.record(key).await else {
                    return;
                };
                if rec.engine == Engine::Rqlite {
                    self.announce_leader(&rec).await;
                }
            }
            ProcessEvent::GaveUp { replica, reason } => {
                error!(database = %key, replica, reason = %reason, "engine keeps failing here");
                let slot = self.slot(key);
                let mut running = slot.running.lock().await;
                if let Some(run) = running.take() {
                    self.ports.release(run.ports.iter().copied());
                    self.stop_all(run.processes).await;
                }
                drop(running);
                // Replicas on other nodes may still hold a quorum: only a
                // database that runs here alone has failed.
                let alone = self
                    .record(key)
                    .await
                    .is_ok_and(|rec| rec.replicas.iter().all(|r| r.node_id == self.node_id));
                if alone {
                    let _ = self
                        .transition(key, DatabaseStatus::Failed, Some(&reason), Vec::new())
                        .await;
                }
            }
        }
    }

    /// Finds the rqlite leader (it may have moved) and tells the proxies.
    async fn announce_leader(&self, rec: &DatabaseRecord) {
        let deadline = tokio::time::Instant::now() + self.engines.start_timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(leader) =
                engine::rqlite::current_leader(&self.engines, &rec.replicas, &rec.secret).await
            {
                let endpoints = engine::endpoints(
                    &rec.replicas,
                    Some(leader),
                    self.engines.engine_https.is_some(),
                );
                self.set_view(&rec.key, DatabaseStatus::Active, endpoints.clone());
                self.publish(Event::Leader {
                    app: rec.key.app.clone(),
                    name: rec.key.db.clone(),
                    endpoints,
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wake_here(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let asked = Instant::now();
        let slot = self.slot(key);
        let _deciding = slot.deciding.lock().await;
        let rec = self.record(key).await?;
        if self.is_up(key, &rec) {
            return Ok(self.info(&rec));
        }
        let waited = asked.elapsed();
        self.transition(key, DatabaseStatus::Waking, None, Vec::new())
            .await?;
        info!(database = %key, "waking database");
        self.notify(Notice::Waking { key: key.clone() });
        let result = async {
            let (rec, raft_moved) = self.reallocate(&rec).await?;
            let start = LocalStart {
                bootstrap: false,
                raft_moved,
            };
            match self.start_everywhere(&rec, start).await {
                Ok(endpoints) => Ok((rec, endpoints)),
                Err(e) => {
                    self.release(&rec.replicas);
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((rec, endpoints)) => {
                let took = asked.elapsed();
                let now = now_ms();
                self.activity.touch(key, now);
                metrics::histogram!("rouse_wake_duration_seconds", "engine" => rec.engine.as_str(), "phase" => "wait")
                    .record(waited.as_secs_f64());
                self.store
                    .set_activity(key, now, Some(took.as_millis() as u64))
                    .await?;
                self.transition(key, DatabaseStatus::Active, None, endpoints.clone())
                    .await?;
                self.publish(Event::Leader {
                    app: key.app.clone(),
                    name: key.db.clone(),
                    endpoints,
                });
                info!(database = %key, wake_ms = took.as_millis() as u64, "database woke up");
                // Replicas left behind on dead nodes get their replacements now.
                if let Err(e) = self.replace_dead(&rec).await {
                    warn!(database = %key, error = %e, "could not replace replicas of dead nodes");
                }
                self.status(key).await
            }
            Err(e) => {
                error!(database = %key, error = %e, "wake failed");
                let reason = e.to_string();
                self.transition(key, DatabaseStatus::Failed, Some(&reason), Vec::new())
                    .await?;
                Err(e)
            }
        }
    }

    async fn hibernate_here(&self, key: &DbKey, force: bool) -> Result<DatabaseInfo> {
        let slot = self.slot(key);
        let _deciding = slot.deciding.lock().await;
        let rec = self.record(key).await?;
        if rec.engine == Engine::Patroni {
            return Err(ControlError::BadRequest(format!(
                "database {} is a registered Patroni cluster, which rouse does not hibernate",
                key.db
            )));
        }
        if !self.is_up(key, &rec) {
            return Ok(self.info(&rec));
        }
        let open = self.activity.open_sessions(key);
        if open > 0 && !force {
            return Err(ControlError::InUse(format!(
                "database {} of app {} has {open} open sessions; use force to hibernate anyway",
                key.db, key.app
            )));
        }
        self.stop_everywhere(&rec, false).await;
        let last = self
            .activity
            .last_activity(key)
            .unwrap_or(0)
            .max(rec.last_activity);
        self.store.set_activity(key, last, None).await?;
        self.transition(key, DatabaseStatus::Hibernating, None, Vec::new())
            .await?;
        let idle = now_ms().saturating_sub(last);
        info!(database = %key, idle_time = ?Duration::from_millis(idle), "database hibernated");
        self.status(key).await
    }

    /// Gives each replica of `rec` that sits on a dead node a replacement on
    /// a live node with capacity. The new placement is recorded in `_system`
    /// first; then the dead member leaves the Raft configuration and the new
    /// replica joins and syncs. Run with the database's decision lock held,
    /// on a running database.
    async fn replace_dead(&self, rec: &DatabaseRecord) -> Result<()> {
        let membership = self.membership().await;
        let dead: Vec<ReplicaRecord> = rec
            .replicas
            .iter()
            .filter(|r| !membership.is_live(&r.node_id))
            .cloned()
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        if rec.engine != Engine::Rqlite {
            warn!(database = %rec.key, "the node holding this database is down; its engine keeps one copy, so it waits for that node");
            return Ok(());
        }
        let mut load = cluster::load(&self.store.databases(None).await?);
        let mut replicas = rec.replicas.clone();
        for gone in dead {
            let holding: HashSet<String> = replicas.iter().map(|r| r.node_id.clone()).collect();
            let target = match membership.place(1, &load, &holding) {
                Ok(mut m) => m.remove(0),
                Err(e) => {
                    warn!(database = %rec.key, dead_node = %gone.node_id, error = %e, "no node can take a replacement replica");
                    metrics::counter!("rouse_replica_replacements_total", "result" => "no_capacity").increment(1);
                    continue;
                }
            };
            self.notify(Notice::ReplacementNeeded {
                key: rec.key.clone(),
                dead_node: gone.node_id.clone(),
            });
            let idx = replicas.iter().map(|r| r.idx).max().unwrap_or(0) + 1;
            let new = self
                .allocate_on(&target.node_id, &rec.key, rec.engine, idx, None)
                .await?;
            replicas.retain(|r| r.idx != gone.idx);
            replicas.push(new.clone());
            // The decision first: a node that cannot record it (cut off from
            // the `_system` quorum) does not act on it.
            self.store.set_replicas(&rec.key, &replicas).await?;
            let detail = format!(
                "{} on {} replaced by {} on {}",
                engine::rqlite::node_id(&gone),
                gone.node_id,
                engine::rqlite::node_id(&new),
                new.node_id
            );
            self.record_decision(&rec.key, "replace", &detail).await;
            *load.entry(new.node_id.clone()).or_default() += 1;
            info!(database = %rec.key, dead_node = %gone.node_id, new_node = %new.node_id, "replacing a replica of a dead node");
            // The live members keep a quorum without the dead one. They may
            // still be electing a leader when the dead node held it.
            let survivors: Vec<RqliteClient> = replicas
                .iter()
                .filter(|r| r.idx != new.idx)
                .map(|r| engine::rqlite::client(&self.engines, r, &rec.secret))
                .collect();
            let dead_member = engine::rqlite::node_id(&gone);
            engine::poll_until(
                tokio::time::Instant::now() + self.engines.start_timeout,
                "removing the dead member",
                || async {
                    let mut last = String::from("no live member");
                    for client in &survivors {
                        match client.remove_node(&dead_member).await {
                            Ok(()) => return Ok(()),
                            Err(e) => last = e.to_string(),
                        }
                    }
                    Err(last)
                },
            )
            .await?;
            let start = LocalStart {
                bootstrap: false,
                raft_moved: false,
            };
            self.on_node(
                &new.node_id,
                NodeRequest::Start {
                    key: rec.key.clone(),
                    start,
                },
                async {
                    self.start_local(&rec.key, start)
                        .await
                        .map(|_| NodeResponse::Done)
                },
            )
            .await?;
            let client = engine::rqlite::client(&self.engines, &new, &rec.secret);
            engine::poll_until(
                tokio::time::Instant::now() + self.engines.start_timeout,
                "replacement replica",
                || async {
                    if client.ready().await {
                        Ok(())
                    } else {
                        Err(format!("{} has not joined yet", client.addr()))
                    }
                },
            )
            .await?;
            metrics::counter!("rouse_replica_replacements_total", "result" => "done").increment(1);
            self.notify(Notice::Replaced {
                key: rec.key.clone(),
                dead_node: gone.node_id.clone(),
                new_node: new.node_id.clone(),
            });
            info!(database = %rec.key, new_node = %new.node_id, "replacement replica joined");
        }
        let rec = DatabaseRecord {
            replicas,
            ..rec.clone()
        };
        self.announce_leader(&rec).await;
        Ok(())
    }

    pub async fn set_pool_mode(&self, key: &DbKey, mode: PoolMode) -> Result<DatabaseInfo> {
        let rec = self.record(key).await?;
        if rec.engine == Engine::Rqlite {
            return Err(ControlError::BadRequest(format!(
                "database {} is not a PostgreSQL database",
                key.db
            )));
        }
        let text = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        self.store
            .set_setting(&pool_mode_setting(key), text)
            .await?;
        self.pool_modes
            .lock()
            .expect("pool modes poisoned")
            .insert(key.clone(), mode);
        info!(database = %key, pool_mode = text, "pool mode set");
        let info = self.info(&rec);
        // Proxies re-read the database on this event.
        self.publish(Event::Status {
            app: key.app.clone(),
            name: key.db.clone(),
            status: info.status,
            reason: None,
        });
        Ok(info)
    }

    async fn drop_here(&self, key: &DbKey) -> Result<()> {
        let slot = self.slot(key);
        let _deciding = slot.deciding.lock().await;
        let rec = self.record(key).await?;
        // Deleted first, so that no holder starts its replica again meanwhile.
        self.store.delete_database(key).await?;
        self.stop_everywhere(&rec, true).await;
        if self
            .patroni
            .lock()
            .expect("patroni poisoned")
            .remove(key)
            .is_some()
        {
            self.store.delete_setting(&patroni_setting(key)).await?;
        }
        self.stop_local(key, true).await;
        self.forget(key);
        self.publish(Event::Dropped {
            app: key.app.clone(),
            name: key.db.clone(),
        });
        info!(database = %key, "database dropped");
        Ok(())
    }

    fn forget(&self, key: &DbKey) {
        self.activity.forget(key);
        self.slots.lock().expect("slots poisoned").remove(key);
        self.secrets.lock().expect("secrets poisoned").remove(key);
        self.update_status_gauges();
    }

    /// Applies a proxy's activity report and shares it with the other
    /// nodes, so that the coordinator sees every proxy.
    pub async fn report_activity(&self, report: &ActivityReport) -> Result<usize> {
        let known: HashSet<DbKey> = self
            .store
            .databases(None)
            .await?
            .into_iter()
            .map(|r| r.key)
            .collect();
        // Checked here once; the other nodes take what is passed on as it is.
        let known_only = ActivityReport {
            proxy_id: report.proxy_id.clone(),
            databases: report
                .databases
                .iter()
                .filter(|d| known.contains(&DbKey::new(d.app.clone(), d.name.clone())))
                .cloned()
                .collect(),
        };
        self.peers.gossip(
            ACTIVITY_TOPIC,
            serde_json::to_vec(&known_only).expect("reports serialise"),
        );
        Ok(self.activity.report(&known_only, |_| true))
    }

    // ---- peers --------------------------------------------------------------

    /// Answers peers' requests and applies their gossip until the swarm stops.
    pub async fn serve_peers(self: Arc<Self>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        while let Some(message) = inbound.recv().await {
            match message {
                Inbound::Request {
                    from,
                    request,
                    reply,
                } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let answer = if me.admits(&from, "request", true).await {
                            NodeResponse::from_result(me.handle(request).await, |r| r)
                        } else {
                            NodeResponse::Failed(ControlError::Peer(
                                "this node acts only on requests of members recorded in _system"
                                    .into(),
                            ))
                        };
                        if reply.send(answer).is_err() {
                            debug!(peer_id = %from, "a request ended before its answer");
                        }
                    });
                }
                Inbound::Gossip { from, topic, data } => {
                    if self.admits(&from, "gossip", false).await {
                        self.on_gossip(&topic, &data).await
                    }
                }
            }
        }
    }

    async fn on_gossip(&self, topic: &str, data: &[u8]) {
        match topic {
            EVENTS_TOPIC => {
                let Ok(event) = serde_json::from_slice::<Event>(data) else {
                    warn!(topic, "unreadable event from a peer");
                    return;
                };
                if !self.agrees_with_system(&event).await {
                    metrics::counter!("rouse_peer_refusals_total", "what" => "event").increment(1);
                    warn!(?event, "ignored a peer's event that _system contradicts");
                    return;
                }
                match &event {
                    Event::Status {
                        app, name, status, ..
                    } => self.set_view(&DbKey::new(app.clone(), name.clone()), *status, Vec::new()),
                    Event::Leader {
                        app,
                        name,
                        endpoints,
                    } => self.set_view(
                        &DbKey::new(app.clone(), name.clone()),
                        DatabaseStatus::Active,
                        endpoints.clone(),
                    ),
                    Event::Dropped { app, name } => {
                        self.forget(&DbKey::new(app.clone(), name.clone()))
                    }
                    Event::KeyRevoked { .. } | Event::UserChanged { .. } => {}
                }
                // This node's proxies learn it too; it is not gossiped again.
                let _ = self.events.send(event);
            }
            CLUSTER_TOPIC => match serde_json::from_slice::<Notice>(data) {
                Ok(Notice::Waking { key }) => {
                    info!(database = %key, "the coordinator wakes the database")
                }
                Ok(Notice::ReplacementNeeded { key, dead_node }) => {
                    warn!(database = %key, dead_node = %dead_node, "the coordinator replaces a replica of a dead node")
                }
                Ok(Notice::Replaced {
                    key,
                    dead_node,
                    new_node,
                }) => {
                    info!(database = %key, dead_node = %dead_node, new_node = %new_node, "replica replaced")
                }
                Err(e) => warn!(topic, error = %e, "unreadable notice from a peer"),
            },
            ACTIVITY_TOPIC => match serde_json::from_slice::<ActivityReport>(data) {
                Ok(report) => {
                    self.activity.report(&report, |_| true);
                }
                Err(e) => warn!(topic, error = %e, "unreadable activity from a peer"),
            },
            _ => {}
        }
    }

    /// Whether a gossiped event fits what `_system` records, before this
    /// node and its proxies act on it: a leader among the database's own
    /// replicas, a drop of a database that is gone.
    async fn agrees_with_system(&self, event: &Event) -> bool {
        let record = |app: &Name, name: &Name| {
            let key = DbKey::new(app.clone(), name.clone());
            async move { self.store.database(&key).await }
        };
        match event {
            Event::Leader {
                app,
                name,
                endpoints,
            } => match record(app, name).await {
                Ok(Some(rec)) => cluster::endpoints_agree(&rec.replicas, endpoints),
                _ => false,
            },
            Event::Status { app, name, .. } => matches!(record(app, name).await, Ok(Some(_))),
            Event::Dropped { app, name } => matches!(record(app, name).await, Ok(None)),
            Event::KeyRevoked { .. } | Event::UserChanged { .. } => true,
        }
    }

    // ---- background work ----------------------------------------------------

    /// At start: remove orphaned data directories (unless the metadata store
    /// is new) and start what should run. Metadata that cannot be read
    /// aborts this, so nothing is removed then.
    pub async fn adopt(&self, remove_orphans: bool) -> Result<()> {
        let records = self.store.databases(None).await?;
        let mine: HashSet<String> = records
            .iter()
            .filter(|r| r.replicas.iter().any(|p| p.node_id == self.node_id))
            .map(|r| r.key.internal())
            .collect();
        let known: HashSet<String> = records.iter().map(|r| r.key.internal()).collect();
        if let Ok(entries) = std::fs::read_dir(&self.config.node.data_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if DbKey::from_internal(&name).is_none()
                    || mine.contains(&name)
                    || !entry.path().is_dir()
                {
                    continue;
                }
                if !remove_orphans {
                    warn!(dir = %entry.path().display(), "metadata store is new: keeping a data directory it does not know");
                    continue;
                }
                if known.contains(&name) {
                    warn!(dir = %entry.path().display(), "removing a stale replica: its database lives on other nodes now");
                } else {
                    warn!(dir = %entry.path().display(), "removing orphaned data directory: no database in metadata");
                }
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    error!(dir = %entry.path().display(), error = %e, "could not remove orphaned directory");
                }
            }
        }
        for rec in &records {
            if let Some(mode) = self.store.setting(&pool_mode_setting(&rec.key)).await? {
                if let Ok(mode) = mode.parse::<PoolMode>() {
                    self.pool_modes
                        .lock()
                        .expect("pool modes poisoned")
                        .insert(rec.key.clone(), mode);
                }
            }
            if rec.engine == Engine::Patroni {
                if let Err(e) = self.load_patroni(&rec.key).await {
                    warn!(database = %rec.key, error = %e, "Patroni registration not loaded");
                }
            }
        }
        let mut to_wake = Vec::new();
        let mut to_rejoin = Vec::new();
        for rec in &records {
            let should_run = matches!(
                rec.status,
                DatabaseStatus::Active | DatabaseStatus::Waking | DatabaseStatus::Initializing
            );
            if !should_run || !mine.contains(&rec.key.internal()) {
                continue;
            }
            if rec.replicas.iter().all(|r| r.node_id == self.node_id) {
                // Until its restart is done, a database that should run is waking.
                self.set_view(&rec.key, DatabaseStatus::Waking, Vec::new());
                to_wake.push(rec.key.clone());
            } else {
                // Spread over nodes: this node's replicas rejoin their cluster.
                to_rejoin.push(rec.key.clone());
            }
        }
        info!(
            databases = records.len(),
            starting = to_wake.len() + to_rejoin.len(),
            "adopting databases"
        );
        let limit = Arc::new(tokio::sync::Semaphore::new(4));
        for (key, rejoin) in to_wake
            .into_iter()
            .map(|k| (k, false))
            .chain(to_rejoin.into_iter().map(|k| (k, true)))
        {
            let me = self.me.clone();
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let Some(m) = me.upgrade() else { return };
                let result = if rejoin {
                    m.start_local(&key, LocalStart::default()).await
                } else {
                    m.wake_here(&key).await.map(|_| ())
                };
                if let Err(e) = result {
                    error!(database = %key, error = %e, "could not restart database");
                }
            });
        }
        Ok(())
    }

    /// On the coordinator: hibernates databases idle for
    /// `hibernation_timeout` with no open session on any node's proxies.
    pub async fn run_idle_reaper(self: Arc<Self>) {
        let timeout = self.config.database.hibernation_timeout;
        if timeout.is_zero() {
            return;
        }
        let tick = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            if self.membership().await.coordinator().is_some() {
                continue;
            }
            let Ok(records) = self.store.databases(None).await else {
                continue;
            };
            let now = now_ms();
            for rec in records {
                if rec.engine == Engine::Patroni || !self.is_up(&rec.key, &rec) {
                    continue;
                }
                let key = &rec.key;
                let last = self
                    .activity
                    .last_activity(key)
                    .unwrap_or(0)
                    .max(rec.last_activity);
                let idle = now.saturating_sub(last);
                if idle >= timeout.as_millis() as u64 && self.activity.open_sessions(key) == 0 {
                    info!(database = %key, idle_time = ?Duration::from_millis(idle), "database is idle on every node");
                    if let Err(e) = self.hibernate_here(key, false).await {
                        warn!(database = %key, error = %e, "idle hibernation skipped");
                    }
                }
            }
        }
    }

    /// Every health check interval: tells the peers this node's load, keeps
    /// this node's replicas as `_system` says (starts missing ones, stops
    /// and removes replaced ones) and, on the coordinator, replaces the
    /// replicas of dead nodes. Nothing happens while `_system` cannot be
    /// read (a node cut off from its quorum changes nothing).
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.peers.health_check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh_members().await {
                debug!(error = %e, "cannot read the cluster's members");
            }
            let peers = self.peers.peers();
            let healthy = peers.iter().filter(|p| p.healthy).count();
            metrics::gauge!("rouse_peers", "health" => "healthy").set(healthy as f64);
            metrics::gauge!("rouse_peers", "health" => "unhealthy")
                .set((peers.len() - healthy) as f64);
            let Ok(records) = self.store.databases(None).await else {
                continue;
            };
            let mine: Vec<&DatabaseRecord> = records
                .iter()
                .filter(|r| r.replicas.iter().any(|p| p.node_id == self.node_id))
                .collect();
            let active = mine
                .iter()
                .filter(|r| self.info(r).status == DatabaseStatus::Active)
                .count();
            self.peers.set_load(mine.len() as u32, active as u32);
            self.keep_local_replicas(&records).await;
            let membership = self.membership().await;
            if !membership.clustered() || membership.coordinator().is_some() {
                continue;
            }
            for rec in &records {
                if rec.engine != Engine::Rqlite
                    || rec.replicas.iter().all(|r| membership.is_live(&r.node_id))
                {
                    continue;
                }
                let slot = self.slot(&rec.key);
                let _deciding = slot.deciding.lock().await;
                let Ok(rec) = self.record(&rec.key).await else {
                    continue;
                };
                // Hibernating databases get their replacements at their next wake.
                if !self.is_up(&rec.key, &rec) {
                    continue;
                }
                if let Err(e) = self.replace_dead(&rec).await {
                    warn!(database = %rec.key, error = %e, "replacing replicas of a dead node failed; retrying");
                }
            }
        }
    }

    /// Makes this node's processes match `_system`: replicas of databases
    /// spread over nodes that should run are started (a replica without
    /// data joins its cluster), replicas that were replaced or whose
    /// database hibernated or went are stopped, replaced ones removed.
    async fn keep_local_replicas(&self, records: &[DatabaseRecord]) {
        let by_key: HashMap<&DbKey, &DatabaseRecord> =
            records.iter().map(|r| (&r.key, r)).collect();
        let slots = self.all_slots();
        for (key, slot) in slots {
            // Skip databases in the middle of a start or stop.
            let Ok(mut running) = slot.running.try_lock() else {
                continue;
            };
            if running.is_none() || self.needs_stop(by_key.get(&key).copied()).is_none() {
                continue;
            }
            // The snapshot may be older than a start that just happened (a
            // wake, a replacement): decide on the record as it is now, while
            // no start can run here.
            let Ok(fresh) = self.store.database(&key).await else {
                continue;
            };
            if let Some((why, remove_data)) = self.needs_stop(fresh.as_ref()) {
                warn!(database = %key, "{why}");
                self.stop_held(&key, &slot, &mut running, remove_data).await;
            }
        }
        for rec in records {
            let spread = rec.replicas.iter().any(|r| r.node_id != self.node_id);
            let here = rec.replicas.iter().any(|r| r.node_id == self.node_id);
            if !spread || !here || rec.status != DatabaseStatus::Active {
                continue;
            }
            let slot = self.slot(&rec.key);
            let idle = !slot.held_down.load(std::sync::atomic::Ordering::Relaxed)
                && slot
                    .running
                    .try_lock()
                    .map(|r| r.is_none())
                    .unwrap_or(false);
            if idle {
                if let Err(e) = self.start_local(&rec.key, LocalStart::default()).await {
                    warn!(database = %rec.key, error = %e, "could not start this node's replica");
                }
            }
        }
    }

    /// Why this node's running replica of a database (as `rec` says it is
    /// now) must stop, and whether its data goes too.
    fn needs_stop(&self, rec: Option<&DatabaseRecord>) -> Option<(&'static str, bool)> {
        match rec {
            None => Some((
                "stopping a replica of a database that no longer exists",
                true,
            )),
            Some(rec) if !rec.replicas.iter().any(|r| r.node_id == self.node_id) => Some((
                "stopping and removing a replica that was replaced while this node was away",
                true,
            )),
            Some(rec) if rec.status == DatabaseStatus::Hibernating => {
                Some(("stopping a replica of a database that hibernated", false))
            }
            Some(_) => None,
        }
    }

    /// Stops every engine, keeping each database's status so that the next
    /// start brings back what ran.
    pub async fn shutdown(&self) {
        let slots = self.all_slots();
        futures::future::join_all(slots.into_iter().map(|(key, slot)| async move {
            if let Some(run) = slot.running.lock().await.take() {
                info!(database = %key, "stopping engine for shutdown");
                self.stop_all(run.processes).await;
            }
        }))
        .await;
    }

    // ---- cluster --------------------------------------------------------------

    pub async fn scale(&self, req: &ScaleRequest) -> Result<ScalePlan> {
        if req.min_ha_nodes == 0 {
            return Err(ControlError::BadRequest(
                "min_ha_nodes must be at least 1".into(),
            ));
        }
        let membership = self.membership().await;
        let nodes = membership.live().len() as u32;
        // One node spreads replicas over its replica hosts; several nodes
        // put each on its own node.
        let hosts = if membership.clustered() {
            nodes
        } else {
            self.config.control.replica_hosts.len() as u32
        };
        if req.min_ha_nodes > hosts {
            return Err(ControlError::InsufficientNodes {
                got: hosts,
                need: req.min_ha_nodes,
            });
        }
        self.store
            .set_setting(REPLICATION_TARGET, &req.min_ha_nodes.to_string())
            .await?;
        let current = self.store.databases(None).await?.len() as u32;
        let capacity: u32 = membership.live().iter().map(|m| m.max_databases).sum();
        let mut notes = vec![format!(
            "new rqlite databases get {} replicas unless they ask otherwise",
            req.min_ha_nodes
        )];
        // Across nodes each replica takes a place on its node.
        let fits = if membership.clustered() {
            req.target_db_count.saturating_mul(req.min_ha_nodes) <= capacity
        } else {
            req.target_db_count <= capacity
        };
        if !fits {
            notes.push(format!(
                "{} databases exceed the live nodes' max_databases of {capacity} in all: add nodes or raise the limit",
                req.target_db_count
            ));
        }
        Ok(ScalePlan {
            target_db_count: req.target_db_count,
            replication_factor: req.min_ha_nodes,
            nodes,
            capacity,
            current_databases: current,
            replicas_needed: req.target_db_count.saturating_mul(req.min_ha_nodes),
            fits,
            notes,
        })
    }

    /// This node, then every peer heard from (healthy or not).
    pub async fn nodes(&self) -> Result<NodeList> {
        let local = self.local_node();
        let nodes = self.peers.nodes(local);
        let coordinator = match self.membership().await.coordinator() {
            None => self.node_id.clone(),
            Some(peer) => nodes
                .iter()
                .find(|n| n.peer_id == peer.to_string())
                .map(|n| n.node_id.clone())
                .unwrap_or_default(),
        };
        Ok(NodeList { nodes, coordinator })
    }

    /// This node's capacity and load as its heartbeats say them (kept
    /// current by the upkeep loop), so that `/nodes` answers even while
    /// `_system` has no leader.
    fn local_node(&self) -> NodeInfo {
        let beat = self.peers.local();
        NodeInfo {
            node_id: self.node_id.clone(),
            api_addr: self.config.control.api_addr.to_string(),
            healthy: true,
            max_databases: self.config.database.max_databases,
            databases: beat.databases,
            active_databases: beat.active_databases,
            last_seen: now_ms(),
            peer_id: String::new(),
            addresses: Vec::new(),
        }
    }
}

/// A database's status as an answer to a peer.
fn info(info: DatabaseInfo) -> NodeResponse {
    NodeResponse::Info(Box::new(info))
}
