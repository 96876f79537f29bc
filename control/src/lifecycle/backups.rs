//! When databases are backed up (now, on a schedule, before they sleep) and
//! how a backup is put back; [`crate::backup`] makes and fetches them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use tracing::{info, warn};

use super::Manager;
use crate::backup::{self, Reason};
use crate::engine;
use crate::error::{ControlError, Result};
use crate::model::DatabaseRecord;
use crate::rqlite::{Level, Stmt};

impl Manager {
    /// `POST /databases/{app}/{db}/backups`.
    pub async fn backup_now(&self, key: &DbKey) -> Result<BackupInfo> {
        let rec = self.record(key).await?;
        self.backup(&rec, Reason::Manual).await
    }

    /// Backs `rec` up as it is now: through the engine while it runs, from
    /// its files while it sleeps.
    pub(super) async fn backup(&self, rec: &DatabaseRecord, reason: Reason) -> Result<BackupInfo> {
        let slot = self.slot(&rec.key);
        let _one = slot.backing_up.lock().await;
        let result = match rec.engine {
            Engine::Rqlite => self.backup_rqlite(rec, reason).await,
            Engine::Postgres => self.backup_postgres(rec, reason).await,
            Engine::Patroni => Err(ControlError::BadRequest(format!(
                "{} is a registered Patroni cluster, backed up by its own tooling",
                rec.key.db
            ))),
        };
        match &result {
            Ok(b) => {
                self.last_backups
                    .lock()
                    .expect("backups poisoned")
                    .insert(rec.key.clone(), b.time_ms);
            }
            Err(e) => {
                warn!(database = %rec.key, reason = reason.as_str(), error = %e, "backup failed");
                backup::failed(&rec.key, rec.engine, reason);
            }
        }
        result
    }

    async fn backup_rqlite(&self, rec: &DatabaseRecord, reason: Reason) -> Result<BackupInfo> {
        if self.is_up(&rec.key, rec) {
            let leader = self.rqlite_leader(rec)?;
            return self
                .backups
                .rqlite_snapshot(&rec.key, &leader, reason)
                .await;
        }
        // Asleep: the file is consistent, the engine having closed it.
        let local = rec
            .replicas
            .iter()
            .find(|r| r.node_id == self.node_id)
            .ok_or_else(|| {
                ControlError::Backup(format!(
                    "{} is hibernating and this node holds no replica of it; back it up on a node that does",
                    rec.key
                ))
            })?;
        let file = self
            .db_dir(&rec.key)
            .join("rqlite")
            .join(format!("node-{}", local.idx))
            .join("db.sqlite");
        self.backups.rqlite_file(&rec.key, &file, reason).await
    }

    /// A client of the running database's leader, logged in as control.
    fn rqlite_leader(&self, rec: &DatabaseRecord) -> Result<crate::rqlite::RqliteClient> {
        let info = self.info(rec);
        let leader = info
            .endpoints
            .iter()
            .find(|e| e.leader)
            .or(info.endpoints.first())
            .ok_or_else(|| ControlError::Engine(format!("{} has no leader", rec.key)))?;
        let replica = rec
            .replicas
            .iter()
            .find(|r| r.host == leader.host && r.port == leader.port)
            .ok_or_else(|| {
                ControlError::Engine(format!("{}'s leader is not among its replicas", rec.key))
            })?;
        Ok(engine::rqlite::client(&self.engines, replica, &rec.secret))
    }

    /// `GET /databases/{app}/{db}/backups`: also of a dropped database.
    pub async fn list_backups(&self, key: &DbKey) -> Result<BackupList> {
        let engine = match self.store.database(key).await? {
            Some(rec) => Some(rec.engine),
            None => None,
        };
        let mut backups = Vec::new();
        let mut recoverable_from = None;
        if engine != Some(Engine::Postgres) {
            backups.extend(self.backups.rqlite_backups(key).await?);
        }
        if engine != Some(Engine::Rqlite) {
            let (pg, from) = self.postgres_backups(key).await?;
            backups.extend(pg);
            recoverable_from = from;
        }
        backups.sort_by_key(|b| b.time_ms);
        Ok(BackupList {
            backups,
            recoverable_from,
        })
    }

    /// `POST /databases/{app}/{db}/restore`: puts a backup of `key` back,
    /// into `key` or into `request.as_name` (created when it does not exist).
    pub async fn restore(&self, key: &DbKey, request: &RestoreRequest) -> Result<Restored> {
        let target = DbKey::new(
            key.app.clone(),
            request.as_name.clone().unwrap_or_else(|| key.db.clone()),
        );
        let source_engine = match self.store.database(key).await? {
            Some(rec) => rec.engine,
            None => self.backed_up_engine(key).await?,
        };
        match source_engine {
            Engine::Rqlite => self.restore_rqlite(key, &target, request).await,
            Engine::Postgres => self.restore_postgres(key, &target, request).await,
            Engine::Patroni => Err(ControlError::BadRequest(format!(
                "{} is a registered Patroni cluster, restored by its own tooling",
                key.db
            ))),
        }
    }

    /// The engine of a database that no longer exists, as its backups say.
    async fn backed_up_engine(&self, key: &DbKey) -> Result<Engine> {
        let list = self.list_backups(key).await?;
        list.backups.last().map(|b| b.engine).ok_or_else(|| {
            ControlError::NotFound(format!("{key} does not exist and has no backup"))
        })
    }

    async fn restore_rqlite(
        &self,
        source: &DbKey,
        target: &DbKey,
        request: &RestoreRequest,
    ) -> Result<Restored> {
        if request.time.is_some() {
            return Err(ControlError::BadRequest(
                "a point in time is for PostgreSQL; rqlite restores a backup (backup id or the latest)".into(),
            ));
        }
        let started = std::time::Instant::now();
        // Fetched and checked before the target is touched.
        let (backup, file) = self
            .backups
            .fetch_rqlite(source, request.backup.as_deref())
            .await?;
        let rec = self
            .restore_target(target, Engine::Rqlite, backup.engine)
            .await?;
        self.wake(target).await?;
        let leader = self.rqlite_leader(&rec)?;
        if !request.force {
            let tables = leader
                .read(
                    vec![Stmt::new(
                        "SELECT name FROM sqlite_master WHERE type IN ('table','view') AND name NOT LIKE 'sqlite_%' LIMIT 1",
                    )],
                    Level::Leader,
                )
                .await
                .map_err(|e| ControlError::Engine(format!("{target}: {e}")))?;
            if tables.iter().any(|r| !r.values.is_empty()) {
                return Err(ControlError::HasData(format!(
                    "database {} of app {}",
                    target.db, target.app
                )));
            }
        }
        let sqlite = tokio::fs::File::open(file.path())
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        leader
            .load(sqlite)
            .await
            .map_err(|e| ControlError::Engine(format!("restore of {target}: {e}")))?;
        crate::metrics::BACKUP_DURATION
            .histogram(["rqlite".into(), "restore".into()])
            .record(started.elapsed().as_secs_f64());
        info!(database = %target, backup = %backup.id, from = %source, "restored");
        Ok(Restored {
            backup: backup.id,
            database: self.status(target).await?,
        })
    }

    /// The database a restore writes into: as it is, or created for it.
    pub(super) async fn restore_target(
        &self,
        target: &DbKey,
        engine: Engine,
        backed_up: Engine,
    ) -> Result<DatabaseRecord> {
        if engine != backed_up {
            return Err(ControlError::BadRequest(format!(
                "a {} backup cannot be restored into {}",
                backed_up.as_str(),
                engine.as_str()
            )));
        }
        match self.store.database(target).await? {
            Some(rec) if rec.engine != engine => Err(ControlError::BadRequest(format!(
                "{target} is a {} database; the backup is of {}",
                rec.engine.as_str(),
                engine.as_str()
            ))),
            Some(rec) => Ok(rec),
            None => {
                self.create(
                    &CreateDatabase {
                        app: target.app.clone(),
                        name: target.db.clone(),
                        engine,
                        replication_factor: None,
                        patroni: None,
                    },
                    false,
                )
                .await?;
                self.record(target).await
            }
        }
    }

    /// Before a database sleeps (`backups.on_hibernate`): its last state is
    /// saved. A failure is logged and counted; the database sleeps anyway,
    /// and the schedule saves it from its files.
    pub(super) async fn backup_before_sleep(&self, key: &DbKey) {
        if !self.backups.config().on_hibernate {
            return;
        }
        let Ok(Some(rec)) = self.store.database(key).await else {
            return;
        };
        if rec.engine == Engine::Patroni || !self.is_up(key, &rec) {
            return;
        }
        let _ = self.backup(&rec, Reason::Hibernate).await;
    }

    /// Backs up, every `backups.interval`, each database whose first
    /// replica is on this node and that changed since its last backup.
    pub async fn run_backup_schedule(self: Arc<Self>) {
        let interval = self.backups.config().interval;
        if interval.is_zero() {
            return std::future::pending().await;
        }
        let tick = (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut ticker = tokio::time::interval(tick);
        loop {
            ticker.tick().await;
            let Ok(records) = self.store.databases_local(None).await else {
                continue;
            };
            let now = now_ms();
            for rec in records {
                if rec.engine == Engine::Patroni
                    || rec.replicas.first().map(|r| r.node_id.as_str())
                        != Some(self.node_id.as_str())
                {
                    continue;
                }
                let last = self.last_backup(&rec.key).await.unwrap_or_default();
                let due = now.saturating_sub(last) >= interval.as_millis() as u64;
                let activity = self
                    .activity
                    .last_activity(&rec.key)
                    .unwrap_or(0)
                    .max(rec.last_activity);
                // A database nobody touched since its last backup has nothing new.
                if due && (last == 0 || activity > last) {
                    let _ = self.backup(&rec, Reason::Scheduled).await;
                }
            }
        }
    }

    /// When `key` was last backed up, as this daemon knows or finds out.
    async fn last_backup(&self, key: &DbKey) -> Option<u64> {
        if let Some(t) = self.last_backups.lock().expect("backups poisoned").get(key) {
            return Some(*t);
        }
        let found = self
            .list_backups(key)
            .await
            .ok()?
            .backups
            .last()
            .map(|b| b.time_ms)?;
        backup::succeeded(key, found);
        self.last_backups
            .lock()
            .expect("backups poisoned")
            .insert(key.clone(), found);
        Some(found)
    }
}

/// Each database's last backup time, as this daemon knows it.
pub(super) type LastBackups = std::sync::Mutex<HashMap<DbKey, u64>>;
