//! Per-database and per-cluster settings kept in `_system`'s settings table:
//! the replication target, pool modes and Patroni registrations.

use rouse_control_api::*;
use tracing::info;

use super::Manager;
use crate::engine;
use crate::error::{ControlError, Result};

pub(super) const REPLICATION_TARGET: &str = "replication_target";

/// A database's pool mode, when it is not the default.
pub(super) fn pool_mode_setting(key: &DbKey) -> String {
    format!("db.{key}.pool_mode")
}

/// The members' REST APIs and admin user of a registered Patroni cluster.
pub(super) fn patroni_setting(key: &DbKey) -> String {
    format!("db.{key}.patroni")
}

/// The setting that turns off creation on first access for one app.
pub(super) fn first_access_setting(app: &Name) -> String {
    format!("app.{app}.create_on_first_access")
}

impl Manager {
    pub(super) async fn default_replication(&self) -> Result<u32> {
        Ok(match self.store.setting(REPLICATION_TARGET).await? {
            Some(v) => v.parse().unwrap_or(self.config.database.replication_factor),
            None => self.config.database.replication_factor,
        })
    }

    pub(super) fn patroni_registration(
        &self,
        key: &DbKey,
    ) -> Option<engine::patroni::Registration> {
        self.patroni
            .lock()
            .expect("patroni poisoned")
            .get(key)
            .cloned()
    }

    /// The stored registration of a Patroni cluster, also kept in memory.
    pub(super) async fn load_patroni(&self, key: &DbKey) -> Result<engine::patroni::Registration> {
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
}
