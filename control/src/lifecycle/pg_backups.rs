//! PostgreSQL backups and point-in-time restores (pgBackRest, see
//! [`crate::backup::pgbackrest`]): they run on the node that holds the
//! database's one replica.

use rouse_control_api::*;
use tracing::{info, warn};

use super::Manager;
use crate::backup::{self, pgbackrest, Reason};
use crate::engine;
use crate::error::{ControlError, Result};
use crate::model::{DatabaseRecord, ReplicaRecord};

impl Manager {
    /// This node's replica of a PostgreSQL database, which pgBackRest works on.
    fn pg_replica<'a>(&self, rec: &'a DatabaseRecord) -> Result<&'a ReplicaRecord> {
        rec.replicas
            .iter()
            .find(|r| r.node_id == self.node_id)
            .ok_or_else(|| {
                let holder = rec.replicas.first().map(|r| r.node_id.as_str()).unwrap_or("none");
                ControlError::Backup(format!(
                    "{} is held by node {holder}: back it up and restore it through that node's control API",
                    rec.key
                ))
            })
    }

    /// After a create, in the background: the new database's repository,
    /// so that archiving works before its first backup.
    pub(super) fn make_pg_repository(&self, rec: &DatabaseRecord) {
        if self.pg_replica(rec).is_err() {
            return;
        }
        let (me, rec) = (self.me.clone(), rec.clone());
        tokio::spawn(async move {
            let Some(m) = me.upgrade() else { return };
            let slot = m.slot(&rec.key);
            let _one = slot.backing_up.lock().await;
            let engine_dir = m.db_dir(&rec.key).join(Engine::Postgres.as_str());
            if let Err(e) = m.backups.pg_stanza(&engine_dir, &rec.secret).await {
                warn!(database = %rec.key, error = %e, "the backup repository could not be made yet");
            }
        });
    }

    pub(super) async fn backup_postgres(
        &self,
        rec: &DatabaseRecord,
        reason: Reason,
    ) -> Result<BackupInfo> {
        self.pg_replica(rec)?;
        if !self.is_up(&rec.key, rec) {
            // Asleep, so unchanged since it stopped: its last backup stands.
            let (list, _) = self.backups.pg_backups(&rec.key).await?;
            return list.into_iter().last().ok_or_else(|| {
                ControlError::Backup(format!(
                    "{} is hibernating and has no backup yet: wake it to back it up",
                    rec.key
                ))
            });
        }
        let engine_dir = self.db_dir(&rec.key).join(Engine::Postgres.as_str());
        self.backups
            .pg_backup(&rec.key, &engine_dir, &rec.secret, reason)
            .await
    }

    pub(super) async fn postgres_backups(
        &self,
        key: &DbKey,
    ) -> Result<(Vec<BackupInfo>, Option<String>)> {
        let (list, from) = self.backups.pg_backups(key).await?;
        Ok((list, from.map(backup::rfc3339)))
    }

    pub(super) async fn restore_postgres(
        &self,
        source: &DbKey,
        target: &DbKey,
        request: &RestoreRequest,
    ) -> Result<Restored> {
        let time_ms = request
            .time
            .as_deref()
            .map(backup::parse_rfc3339)
            .transpose()?;
        // A source running here first archives what it wrote until now.
        if let Some(rec) = self.store.database(source).await? {
            if self.is_up(source, &rec) && self.pg_replica(&rec).is_ok() {
                let engine_dir = self.db_dir(source).join(Engine::Postgres.as_str());
                self.backups.pg_flush(&engine_dir, &rec.secret).await?;
            }
        }
        let (list, _) = self.backups.pg_backups(source).await?;
        let chosen = match (&request.backup, time_ms) {
            (Some(id), _) => list
                .iter()
                .find(|b| &b.id == id)
                .ok_or_else(|| ControlError::NotFound(format!("{source} has no backup {id}")))?,
            // The newest backup finished by then; WAL replays the rest.
            (None, Some(t)) => list.iter().rev().find(|b| b.time_ms <= t).ok_or_else(|| {
                ControlError::NotFound(format!(
                    "{source} has no backup from before {}",
                    request.time.as_deref().unwrap_or_default()
                ))
            })?,
            (None, None) => list
                .last()
                .ok_or_else(|| ControlError::NotFound(format!("{source} has no backup")))?,
        };
        let (system, label) = pgbackrest::split_id(&chosen.id)
            .ok_or_else(|| ControlError::Internal(format!("malformed backup id {}", chosen.id)))?;
        let label = request.backup.as_ref().map(|_| label);
        let rec = self
            .restore_target(target, Engine::Postgres, chosen.engine)
            .await?;
        let replica = self.pg_replica(&rec)?.clone();
        if !request.force {
            self.wake(target).await?;
            if engine::postgres::has_user_tables(&replica, &rec.secret, target.db.as_str()).await? {
                return Err(ControlError::HasData(format!(
                    "database {} of app {}",
                    target.db, target.app
                )));
            }
        }
        // Stopped first (backed up as it goes, like any database that sleeps).
        self.hibernate(target, true).await?;
        {
            let slot = self.slot(target);
            let _deciding = slot.deciding.lock().await;
            let engine_dir = self.db_dir(target).join(Engine::Postgres.as_str());
            let pgdata = engine_dir.join(format!("node-{}", replica.idx));
            self.backups
                .pg_restore(
                    source,
                    pgbackrest::RestorePoint {
                        system,
                        label,
                        time_ms,
                    },
                    &engine_dir,
                    &pgdata,
                    replica.port,
                )
                .await?;
            std::fs::write(
                engine_dir.join(engine::postgres::RESTORED),
                source.db.as_str(),
            )
            .map_err(|e| ControlError::Internal(format!("cannot mark the restore: {e}")))?;
        }
        let database = self.wake(target).await?;
        self.backups
            .pg_restored(&self.db_dir(target).join(Engine::Postgres.as_str()));
        info!(database = %target, backup = %chosen.id, from = %source, time = ?request.time, "restored");
        // Its own line of backups from here (a restore into another name
        // archives into a new repository), after the answer.
        let me = self.me.clone();
        let restored = target.clone();
        tokio::spawn(async move {
            let Some(m) = me.upgrade() else { return };
            if let Ok(rec) = m.record(&restored).await {
                if let Err(e) = m.backup(&rec, Reason::Restore).await {
                    warn!(database = %restored, error = %e, "the restored database could not be backed up yet");
                }
            }
        });
        Ok(Restored {
            backup: chosen.id.clone(),
            database,
        })
    }
}
