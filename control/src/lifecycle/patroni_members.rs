//! Patroni clusters registered by their scope: at each upkeep the
//! coordinator reads the members Patroni keeps in etcd and, when they
//! changed, records the new members and tells every node and proxy (a
//! leader event with the new endpoints), as HAProxy setups regenerate their
//! configuration from etcd with confd. While etcd cannot be read, or holds
//! no usable member, the members last recorded stay.

use rouse_control_api::*;
use tracing::{info, warn};

use super::settings::patroni_setting;
use super::Manager;
use crate::engine;
use crate::error::Result;
use crate::model::DatabaseRecord;

impl Manager {
    /// Follows the members of every registered cluster that names where
    /// Patroni keeps them. Run on the coordinator only.
    pub(super) async fn follow_patroni_members(&self, records: &[DatabaseRecord]) {
        for rec in records.iter().filter(|r| r.engine == Engine::Patroni) {
            if let Err(e) = self.follow_members(&rec.key).await {
                warn!(database = %rec.key, error = %e, "cannot follow the Patroni members in etcd: keeping the last known");
            }
        }
    }

    async fn follow_members(&self, key: &DbKey) -> Result<()> {
        let reg = self.load_patroni(key).await?;
        let Some(discovery) = &reg.discovery else {
            return Ok(());
        };
        let found = engine::patroni::discover(discovery).await?;
        let (replicas, kept) = engine::patroni::members_of(
            &found,
            &reg.admin_user,
            reg.discovery.clone(),
            &self.node_id,
        )?;
        let slot = self.slot(key);
        let _deciding = slot.deciding.lock().await;
        let rec = self.record(key).await?;
        if replicas == rec.replicas && kept.api == reg.api {
            return Ok(());
        }
        // The decision first, then what follows from it.
        self.store
            .set_setting(
                &patroni_setting(key),
                &serde_json::to_string(&kept).expect("a registration serialises"),
            )
            .await?;
        self.store.set_replicas(key, &replicas).await?;
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        info!(database = %key, members = ?names, "Patroni members changed in etcd");
        self.record_decision(key, "patroni_members", &names.join(","))
            .await;
        self.patroni
            .lock()
            .expect("patroni poisoned")
            .insert(key.clone(), kept.clone());
        let endpoints = engine::patroni::endpoints(&replicas, &kept);
        self.set_view(key, DatabaseStatus::Active, endpoints.clone());
        self.publish(Event::Leader {
            app: key.app.clone(),
            name: key.db.clone(),
            endpoints,
        });
        Ok(())
    }
}
