//! The lifecycle of every database on this node: create, wake, hibernate,
//! drop, crash handling and, at start, re-adoption and orphan removal.
//!
//! Each database has a slot whose async lock serialises its lifecycle
//! operations, which is what coalesces concurrent wakes: the first caller
//! starts the engine, the others find it running when they get the lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rouse_control_api::config::Config;
use rouse_control_api::*;
use tokio::sync::{broadcast, mpsc};
use tracing::{error, info, warn};

use crate::activity::ActivityTracker;
use crate::engine::{self, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::peers::Peers;
use crate::ports::PortAllocator;
use crate::process::{log_tail, ProcessEvent, Supervised};
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
    running: tokio::sync::Mutex<Option<Running>>,
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
    /// Serialises the capacity check and insert of creates.
    creating: tokio::sync::Mutex<()>,
    me: Weak<Manager>,
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
        Arc::new_cyclic(|me| Manager {
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
            patroni: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
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

    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn slot(&self, key: &DbKey) -> Arc<Slot> {
        self.slots
            .lock()
            .expect("slots poisoned")
            .entry(key.clone())
            .or_default()
            .clone()
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
        let endpoints = if status == DatabaseStatus::Active {
            view.endpoints
        } else {
            Vec::new()
        };
        DatabaseInfo {
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
            backend: match rec.engine {
                Engine::Rqlite => None,
                Engine::Postgres => Some(engine::postgres::ADMIN_USER.into()),
                Engine::Patroni => self.patroni_registration(&rec.key).map(|r| r.admin_user),
            }
            .map(|user| BackendCredentials {
                user,
                password: rec.secret.clone(),
            }),
        }
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
            .insert_key(app, &id, &secrets::hash_api_key(&key), now_ms())
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
        match self.store.find_key(&secrets::hash_api_key(key)).await? {
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
            let running = slot.running.lock().await;
            if running.is_none() {
                continue;
            }
            match rec.engine {
                Engine::Rqlite => {}
                Engine::Postgres => {
                    engine::postgres::apply_users(&rec.replicas[0], &rec.secret, &users).await?
                }
                Engine::Patroni => {
                    if let Some(reg) = self.patroni_registration(&rec.key) {
                        engine::patroni::apply_users(&rec.replicas, &reg, &rec.secret, &users)
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
        let hosts = &self.config.control.replica_hosts;
        if registration.is_none() && rf as usize > hosts.len() {
            return Err(ControlError::InsufficientNodes {
                got: hosts.len() as u32,
                need: rf,
            });
        }
        self.require_app(&key.app).await?;

        let slot = self.slot(&key);
        let mut running = slot.running.lock().await;
        let rec = {
            let _creating = self.creating.lock().await;
            if self.store.database(&key).await?.is_some() {
                return Err(ControlError::AlreadyExists(format!(
                    "database {} of app {} already exists",
                    key.db, key.app
                )));
            }
            let held = self.store.databases(None).await?.len() as u32;
            let max = self.config.database.max_databases;
            if held >= max {
                return Err(ControlError::MaxDatabases { held, max });
            }
            let replicas = match &registration {
                Some((members, _)) => members.clone(),
                None => self.allocate(req.engine, rf, &[])?,
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
            rec
        };
        self.set_view(&key, DatabaseStatus::Initializing, Vec::new());
        self.publish(Event::Status {
            app: key.app.clone(),
            name: key.db.clone(),
            status: DatabaseStatus::Initializing,
            reason: None,
        });
        info!(database = %key, engine = rec.engine.as_str(), replicas = rf, "creating database");

        match self.start(&rec).await {
            Ok((run, endpoints)) => {
                *running = Some(run);
                self.activity.touch(&key, now_ms());
                self.transition(&key, DatabaseStatus::Active, None, endpoints.clone())
                    .await?;
                self.publish(Event::Leader {
                    app: key.app.clone(),
                    name: key.db.clone(),
                    endpoints,
                });
                info!(database = %key, ports = ?rec.replicas.iter().flat_map(ReplicaRecord::ports).collect::<Vec<_>>(), "database created");
                self.status(&key).await
            }
            Err(e) => {
                // Nothing half-made stays behind.
                error!(database = %key, error = %e, "create failed; removing what was made");
                self.release(&rec.replicas);
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

    /// Ports for `rf` replicas, each preferring its previous ports.
    fn allocate(
        &self,
        engine: Engine,
        rf: u32,
        previous: &[ReplicaRecord],
    ) -> Result<Vec<ReplicaRecord>> {
        if engine == Engine::Patroni {
            // The cluster's own addresses.
            return Ok(previous.to_vec());
        }
        let d = &self.config.database;
        let hosts = &self.config.control.replica_hosts;
        let mut out: Vec<ReplicaRecord> = Vec::new();
        for idx in 0..rf {
            let host = hosts[idx as usize % hosts.len()];
            let prev = previous.iter().find(|r| r.idx == idx);
            let result = (|| -> Result<ReplicaRecord> {
                let (port, raft_port) = match engine {
                    Engine::Rqlite => {
                        let http = self.ports.allocate(
                            d.port_range_http_start..=d.port_range_http_end,
                            host,
                            prev.map(|p| p.port),
                        )?;
                        let raft = self
                            .ports
                            .allocate(
                                d.port_range_raft_start..=d.port_range_raft_end,
                                host,
                                prev.and_then(|p| p.raft_port),
                            )
                            .inspect_err(|_| self.ports.release([http]))?;
                        (http, Some(raft))
                    }
                    Engine::Postgres => (
                        self.ports.allocate(
                            d.port_range_postgres_start..=d.port_range_postgres_end,
                            host,
                            prev.map(|p| p.port),
                        )?,
                        None,
                    ),
                    Engine::Patroni => unreachable!("a Patroni cluster keeps its own addresses"),
                };
                Ok(ReplicaRecord {
                    idx,
                    node_id: self.node_id.clone(),
                    host: host.to_string(),
                    port,
                    raft_port,
                })
            })();
            match result {
                Ok(r) => out.push(r),
                Err(e) => {
                    self.release(&out);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn release(&self, replicas: &[ReplicaRecord]) {
        self.ports
            .release(replicas.iter().flat_map(ReplicaRecord::ports));
    }

    /// Starts the engine on the record's replicas and waits until it answers.
    async fn start(&self, rec: &DatabaseRecord) -> Result<(Running, Vec<Endpoint>)> {
        self.start_moved(rec, false).await
    }

    async fn start_moved(
        &self,
        rec: &DatabaseRecord,
        raft_moved: bool,
    ) -> Result<(Running, Vec<Endpoint>)> {
        if rec.engine == Engine::Patroni {
            return self.attach_patroni(rec).await;
        }
        let label = rec.key.internal();
        let inst = Instance {
            label: &label,
            dir: self.db_dir(&rec.key).join(rec.engine.as_str()),
            replicas: &rec.replicas,
            secret: &rec.secret,
            first_start: false,
            raft_moved,
        };
        let inst = Instance {
            first_start: !engine::has_data(rec.engine, &inst),
            ..inst
        };
        let t0 = Instant::now();
        self.engines.prepare(rec.engine, &inst).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut processes = Vec::new();
        for r in &rec.replicas {
            let spec = self.engines.process(rec.engine, &inst, r)?;
            match Supervised::start(spec.clone(), r.idx as usize, tx.clone()).await {
                Ok(p) => {
                    info!(database = %label, pid = p.pid(), host = %r.host, port = r.port, raft_port = ?r.raft_port, "engine process started");
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
        let spawned = t0.elapsed();
        // A process that exits during the start is a failed start, not
        // something to retry quietly until the timeout.
        let ready = tokio::select! {
            ready = self.engines.wait_ready(rec.engine, &inst) => ready,
            Some(ev) = rx.recv() => Err(ControlError::Engine(match ev {
                ProcessEvent::GaveUp { reason, .. } => reason,
                ProcessEvent::Restarting { replica, status, .. } => {
                    let log = inst.dir.join(format!("node-{replica}.log"));
                    format!("{} exited during start ({status}): {}", rec.engine.as_str(), log_tail(&log, 5))
                }
                ProcessEvent::Restarted { replica } => format!("replica {replica} restarted during start"),
            })),
        };
        let users = match (&ready, rec.engine) {
            (Ok(_), Engine::Postgres) => self.store.users(&rec.key.app).await,
            _ => Ok(Vec::new()),
        };
        let ready = match (ready, users) {
            (Ok(endpoints), Ok(users)) => self
                .engines
                .after_start(rec.engine, &inst, rec.key.db.as_str(), &users)
                .await
                .map(|_| endpoints),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match ready {
            Ok(endpoints) => {
                let answered = t0.elapsed();
                let engine = rec.engine.as_str();
                metrics::histogram!("rouse_wake_duration_seconds", "engine" => engine, "phase" => "start")
                    .record(spawned.as_secs_f64());
                metrics::histogram!("rouse_wake_duration_seconds", "engine" => engine, "phase" => "first_answer")
                    .record((answered - spawned).as_secs_f64());
                self.forward_process_events(rec.key.clone(), rx);
                Ok((
                    Running {
                        processes,
                        ports: rec.replicas.iter().flat_map(ReplicaRecord::ports).collect(),
                    },
                    endpoints,
                ))
            }
            Err(e) => {
                self.stop_all(processes).await;
                Err(e)
            }
        }
    }

    /// A registered Patroni cluster "starts" when its leader takes the
    /// app's users; nothing runs here.
    async fn attach_patroni(&self, rec: &DatabaseRecord) -> Result<(Running, Vec<Endpoint>)> {
        let stored = self
            .store
            .setting(&patroni_setting(&rec.key))
            .await?
            .ok_or_else(|| ControlError::Engine("the Patroni registration is missing".into()))?;
        let reg: engine::patroni::Registration = serde_json::from_str(&stored)
            .map_err(|e| ControlError::Engine(format!("unreadable Patroni registration: {e}")))?;
        let users = self.store.users(&rec.key.app).await?;
        engine::patroni::apply_users(&rec.replicas, &reg, &rec.secret, &users).await?;
        let endpoints = engine::patroni::endpoints(&rec.replicas, &reg);
        self.patroni
            .lock()
            .expect("patroni poisoned")
            .insert(rec.key.clone(), reg);
        Ok((
            Running {
                processes: Vec::new(),
                ports: Vec::new(),
            },
            endpoints,
        ))
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
                    // The leader may have moved; proxies re-resolve on the event.
                    let deadline = tokio::time::Instant::now() + self.engines.start_timeout;
                    while tokio::time::Instant::now() < deadline {
                        if let Some(leader) = engine::rqlite::current_leader(&rec.replicas).await {
                            let endpoints = engine::rqlite::endpoints(&rec.replicas, Some(leader));
                            self.set_view(key, DatabaseStatus::Active, endpoints.clone());
                            self.publish(Event::Leader {
                                app: key.app.clone(),
                                name: key.db.clone(),
                                endpoints,
                            });
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            ProcessEvent::GaveUp { replica, reason } => {
                error!(database = %key, replica, reason = %reason, "engine keeps failing; marking the database failed");
                let slot = self.slot(key);
                let mut running = slot.running.lock().await;
                if let Some(run) = running.take() {
                    self.ports.release(run.ports.iter().copied());
                    self.stop_all(run.processes).await;
                }
                let _ = self
                    .transition(key, DatabaseStatus::Failed, Some(&reason), Vec::new())
                    .await;
            }
        }
    }

    /// Starts a database that is not running (idempotent; concurrent calls
    /// share one start). Returns once it answers queries.
    pub async fn wake(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let asked = Instant::now();
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        let rec = self.record(key).await?;
        if running.is_some() {
            return Ok(self.info(&rec));
        }
        let waited = asked.elapsed();
        self.transition(key, DatabaseStatus::Waking, None, Vec::new())
            .await?;
        info!(database = %key, "waking database");
        let result = async {
            let replicas = self.allocate(rec.engine, rec.replication_factor, &rec.replicas)?;
            let moved = replicas != rec.replicas;
            let raft_moved = replicas
                .iter()
                .zip(&rec.replicas)
                .any(|(a, b)| a.raft_port != b.raft_port || a.host != b.host);
            if moved {
                info!(database = %key, "previous ports taken; waking on new ones");
                if let Err(e) = self.store.set_replicas(key, &replicas).await {
                    self.release(&replicas);
                    return Err(e);
                }
            }
            let rec = DatabaseRecord {
                replicas,
                ..rec.clone()
            };
            match self.start_moved(&rec, raft_moved).await {
                Ok(started) => Ok((rec, started)),
                Err(e) => {
                    self.release(&rec.replicas);
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((rec, (run, endpoints))) => {
                *running = Some(run);
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

    /// Stops a running database, keeping its data. Refused while proxies
    /// report open sessions, unless `force`.
    pub async fn hibernate(&self, key: &DbKey, force: bool) -> Result<DatabaseInfo> {
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        let rec = self.record(key).await?;
        if rec.engine == Engine::Patroni {
            return Err(ControlError::BadRequest(format!(
                "database {} is a registered Patroni cluster, which rouse does not hibernate",
                key.db
            )));
        }
        let open = self.activity.open_sessions(key);
        if running.is_none() {
            return Ok(self.info(&rec));
        }
        if open > 0 && !force {
            return Err(ControlError::InUse(format!(
                "database {} of app {} has {open} open sessions; use force to hibernate anyway",
                key.db, key.app
            )));
        }
        if let Some(run) = running.take() {
            self.stop_all(run.processes).await;
            self.ports.release(run.ports);
        }
        let idle = now_ms().saturating_sub(
            self.activity
                .last_activity(key)
                .unwrap_or(rec.last_activity),
        );
        self.store
            .set_activity(key, self.activity.last_activity(key).unwrap_or(0), None)
            .await?;
        self.transition(key, DatabaseStatus::Hibernating, None, Vec::new())
            .await?;
        info!(database = %key, idle_time = ?Duration::from_millis(idle), "database hibernated");
        self.status(key).await
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

    pub async fn drop_database(&self, key: &DbKey) -> Result<()> {
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        self.record(key).await?;
        if let Some(run) = running.take() {
            self.stop_all(run.processes).await;
            self.ports.release(run.ports);
        }
        self.store.delete_database(key).await?;
        if self
            .patroni
            .lock()
            .expect("patroni poisoned")
            .remove(key)
            .is_some()
        {
            self.store.delete_setting(&patroni_setting(key)).await?;
        }
        let dir = self.db_dir(key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(database = %key, dir = %dir.display(), error = %e, "could not remove data directory");
            }
        }
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
        self.update_status_gauges();
    }

    pub async fn report_activity(&self, report: &ActivityReport) -> Result<usize> {
        let known: std::collections::HashSet<DbKey> = self
            .store
            .databases(None)
            .await?
            .into_iter()
            .map(|r| r.key)
            .collect();
        Ok(self.activity.report(report, |k| known.contains(k)))
    }

    // ---- background work ----------------------------------------------------

    /// At start: remove orphaned data directories (unless the metadata store
    /// is new) and start what should run. Metadata that cannot be read
    /// aborts this, so nothing is removed then.
    pub async fn adopt(&self, remove_orphans: bool) -> Result<()> {
        let records = self.store.databases(None).await?;
        let known: std::collections::HashSet<String> =
            records.iter().map(|r| r.key.internal()).collect();
        if let Ok(entries) = std::fs::read_dir(&self.config.node.data_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if DbKey::from_internal(&name).is_none()
                    || known.contains(&name)
                    || !entry.path().is_dir()
                {
                    continue;
                }
                if !remove_orphans {
                    warn!(dir = %entry.path().display(), "metadata store is new: keeping a data directory it does not know");
                    continue;
                }
                warn!(dir = %entry.path().display(), "removing orphaned data directory: no database in metadata");
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
        }
        let mut to_start = Vec::new();
        for rec in &records {
            let should_run = matches!(
                rec.status,
                DatabaseStatus::Active | DatabaseStatus::Waking | DatabaseStatus::Initializing
            );
            // Until its restart is done, a database that should run is waking.
            let shown = if should_run {
                DatabaseStatus::Waking
            } else {
                rec.status
            };
            self.set_view(&rec.key, shown, Vec::new());
            if should_run {
                to_start.push(rec.key.clone());
            }
        }
        info!(
            databases = records.len(),
            starting = to_start.len(),
            "adopting databases"
        );
        let limit = Arc::new(tokio::sync::Semaphore::new(4));
        for key in to_start {
            let me = self.me.clone();
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                if let Some(m) = me.upgrade() {
                    if let Err(e) = m.wake(&key).await {
                        error!(database = %key, error = %e, "could not restart database");
                    }
                }
            });
        }
        Ok(())
    }

    /// Hibernates databases idle for `hibernation_timeout` with no open session.
    pub async fn run_idle_reaper(self: Arc<Self>) {
        let timeout = self.config.database.hibernation_timeout;
        if timeout.is_zero() {
            return;
        }
        let tick = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            let now = now_ms();
            let candidates: Vec<DbKey> = {
                let slots = self.slots.lock().expect("slots poisoned");
                slots
                    .iter()
                    .filter(|(k, s)| {
                        s.view.lock().expect("view poisoned").status == Some(DatabaseStatus::Active)
                            && !self
                                .patroni
                                .lock()
                                .expect("patroni poisoned")
                                .contains_key(*k)
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            for key in candidates {
                let idle = now.saturating_sub(self.activity.last_activity(&key).unwrap_or(now));
                if idle >= timeout.as_millis() as u64 && self.activity.open_sessions(&key) == 0 {
                    info!(database = %key, idle_time = ?Duration::from_millis(idle), "database is idle");
                    if let Err(e) = self.hibernate(&key, false).await {
                        warn!(database = %key, error = %e, "idle hibernation skipped");
                    }
                }
            }
        }
    }

    /// Stops every engine, keeping each database's status so that the next
    /// start brings back what ran.
    pub async fn shutdown(&self) {
        let slots: Vec<(DbKey, Arc<Slot>)> = self
            .slots
            .lock()
            .expect("slots poisoned")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
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
        let hosts = self.config.control.replica_hosts.len() as u32;
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
        let capacity = self.config.database.max_databases;
        let mut notes = vec![format!(
            "new rqlite databases get {} replicas unless they ask otherwise",
            req.min_ha_nodes
        )];
        let fits = req.target_db_count <= capacity;
        if !fits {
            notes.push(format!(
                "{} databases exceed this node's max_databases of {capacity}: add nodes or raise the limit",
                req.target_db_count
            ));
        }
        Ok(ScalePlan {
            target_db_count: req.target_db_count,
            replication_factor: req.min_ha_nodes,
            nodes: 1,
            capacity,
            current_databases: current,
            replicas_needed: req.target_db_count.saturating_mul(req.min_ha_nodes),
            fits,
            notes,
        })
    }

    /// This node, then every peer heard from (healthy or not).
    pub async fn nodes(&self) -> Result<NodeList> {
        let local = self.local_node().await?;
        Ok(NodeList {
            nodes: self.peers.nodes(local),
        })
    }

    /// This node's capacity and load, as `/nodes` and the heartbeats say it.
    pub async fn local_node(&self) -> Result<NodeInfo> {
        let recs = self.store.databases(None).await?;
        let active = recs
            .iter()
            .filter(|r| self.info(r).status == DatabaseStatus::Active)
            .count() as u32;
        Ok(NodeInfo {
            node_id: self.node_id.clone(),
            api_addr: self.config.control.api_addr.to_string(),
            healthy: true,
            max_databases: self.config.database.max_databases,
            databases: recs.len() as u32,
            active_databases: active,
            last_seen: now_ms(),
            peer_id: String::new(),
            addresses: Vec::new(),
        })
    }
}
