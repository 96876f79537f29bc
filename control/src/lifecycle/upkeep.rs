//! The background work: re-adoption at start, the idle reaper, the upkeep
//! loop that keeps this node's replicas as `_system` says, and shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use tracing::{debug, error, info, warn};

use super::settings::pool_mode_setting;
use super::Manager;
use crate::cluster::LocalStart;
use crate::error::Result;
use crate::metrics::PEERS;
use crate::model::DatabaseRecord;

impl Manager {
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
            PEERS.gauge(["healthy".into()]).set(healthy as f64);
            PEERS
                .gauge(["unhealthy".into()])
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
    pub(super) async fn keep_local_replicas(&self, records: &[DatabaseRecord]) {
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
    pub(super) fn needs_stop(&self, rec: Option<&DatabaseRecord>) -> Option<(&'static str, bool)> {
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
}
