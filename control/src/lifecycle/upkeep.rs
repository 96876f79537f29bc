//! The background work: re-adoption at start, the idle reaper, the upkeep
//! loop that keeps this node's replicas as `_system` says, and shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use tracing::{debug, error, info, warn};

use super::settings::pool_mode_setting;
use super::Manager;
use crate::cluster::LocalStart;
use crate::engine;
use crate::error::Result;
use crate::metrics::PEERS;
use crate::model::DatabaseRecord;
use crate::process::{self, Supervised};

impl Manager {
    /// At start: remove orphaned data directories (unless the metadata store
    /// is new), adopt the engines an earlier daemon left running, stop those
    /// that should not run, and start what should run and does not.
    /// Metadata that cannot be read aborts this, so nothing is removed then.
    pub async fn adopt(&self, remove_orphans: bool) -> Result<()> {
        let records = self.store.databases(None).await?;
        self.set_recorded(&records);
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
                stop_left_running(&entry.path()).await;
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
        let mut starts = Vec::new();
        for rec in &records {
            if !mine.contains(&rec.key.internal()) || rec.engine == Engine::Patroni {
                continue;
            }
            let should_run = matches!(
                rec.status,
                DatabaseStatus::Active | DatabaseStatus::Waking | DatabaseStatus::Initializing
            );
            if !should_run {
                // Hibernated or failed while the last daemon was going away.
                stop_left_running(&self.db_dir(&rec.key)).await;
                continue;
            }
            let start = if rec.replicas.iter().any(|r| r.node_id != self.node_id) {
                // Spread over nodes: this node's replicas rejoin their cluster.
                Restart::Rejoin
            } else if rec.status == DatabaseStatus::Active && self.left_running(rec) {
                Restart::Adopt
            } else {
                // Started afresh: what is left of it would hold its ports
                // and answer on them with the old processes.
                stop_left_running(&self.db_dir(&rec.key)).await;
                // Until its restart is done, a database that should run is waking.
                Restart::Wake
            };
            starts.push((rec.clone(), start));
        }
        info!(
            databases = records.len(),
            adopting = starts.iter().filter(|(_, s)| *s == Restart::Adopt).count(),
            starting = starts.iter().filter(|(_, s)| *s != Restart::Adopt).count(),
            "adopting databases"
        );
        // Adoption is done before the API answers (it takes milliseconds per
        // database), so that nobody sees an adopted database without its
        // leader; one that cannot be adopted in time is started again.
        let (adopt, start): (Vec<_>, Vec<_>) =
            starts.into_iter().partition(|(_, s)| *s == Restart::Adopt);
        let adopted = futures::stream::iter(adopt)
            .map(|(rec, _)| async move {
                let adopted = tokio::time::timeout(ADOPT_WITHIN, self.readopt(&rec)).await;
                match adopted {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => {
                        warn!(database = %rec.key, error = %e, "could not adopt the running engine; starting it again");
                        Some(rec)
                    }
                    Err(_) => {
                        warn!(database = %rec.key, "the running engine did not answer in time; starting it again");
                        Some(rec)
                    }
                }
            })
            .buffer_unordered(16)
            .filter_map(|failed| async move { failed })
            .collect::<Vec<_>>()
            .await;
        let limit = Arc::new(tokio::sync::Semaphore::new(4));
        let restarts = start
            .into_iter()
            .chain(adopted.into_iter().map(|rec| (rec, Restart::Wake)));
        for (rec, start) in restarts {
            if start == Restart::Wake {
                self.set_view(&rec.key, DatabaseStatus::Waking, Vec::new());
            }
            let me = self.me.clone();
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let Some(m) = me.upgrade() else { return };
                let key = &rec.key;
                let result = match start {
                    Restart::Rejoin => m.start_local(&rec, LocalStart::default()).await,
                    _ => m.wake_here(key).await.map(|_| ()),
                };
                if let Err(e) = result {
                    error!(database = %key, error = %e, "could not restart database");
                }
            });
        }
        Ok(())
    }

    /// Whether every replica of this node still runs as the last daemon
    /// left it.
    fn left_running(&self, rec: &DatabaseRecord) -> bool {
        let dir = self.db_dir(&rec.key).join(rec.engine.as_str());
        rec.replicas
            .iter()
            .filter(|r| r.node_id == self.node_id)
            .all(|r| process::pidfile::live(&engine::pid_file(&dir, r)).is_some())
    }

    /// Takes over a database whose engines outlived the last daemon: its
    /// processes are adopted and it stays active, with no status change
    /// for the proxies to act on.
    async fn readopt(&self, rec: &DatabaseRecord) -> Result<()> {
        for r in rec.replicas.iter().filter(|r| r.node_id == self.node_id) {
            for port in r.ports() {
                self.ports.hold(port);
            }
        }
        self.start_local(rec, LocalStart::default()).await?;
        let endpoints = self.ready_everywhere(rec, &rec.replicas).await?;
        self.set_view(&rec.key, DatabaseStatus::Active, endpoints.clone());
        self.publish(Event::Leader {
            app: rec.key.app.clone(),
            name: rec.key.db.clone(),
            endpoints,
        });
        info!(database = %rec.key, "adopted the running engine");
        Ok(())
    }

    /// On the coordinator: hibernates databases idle for
    /// `hibernation_timeout` with no open session on any node's proxies.
    pub async fn run_idle_reaper(self: Arc<Self>) {
        let timeout = self.config.database.hibernation_timeout;
        if timeout.is_zero() {
            // Nothing to do, ever; ending would read as a failed loop.
            return std::future::pending().await;
        }
        let tick = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            if self.membership().await.coordinator().is_some() {
                continue;
            }
            // Only active databases can go to sleep: the work per turn grows
            // with them, not with every database held.
            let Ok(records) = self
                .store
                .databases_local(Some(DatabaseStatus::Active))
                .await
            else {
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
    /// and removes replaced ones) and, on the coordinator, follows the
    /// Patroni members kept in etcd and replaces the replicas of dead nodes. Nothing happens while `_system` cannot be
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
            let Ok(records) = self.store.databases_local(None).await else {
                continue;
            };
            self.set_recorded(&records);
            let mine: Vec<&DatabaseRecord> = records
                .iter()
                .filter(|r| r.replicas.iter().any(|p| p.node_id == self.node_id))
                .collect();
            let capacity = self.measure_capacity(&mine).await;
            self.peers.set_load(capacity);
            self.keep_local_replicas(&records).await;
            let membership = self.membership().await;
            if membership.coordinator().is_some() {
                continue;
            }
            self.follow_patroni_members(&records).await;
            if !membership.clustered() {
                continue;
            }
            // Several databases at once: each replacement mostly waits for
            // its new replica to start and join, and a dead node may have
            // held hundreds. Where they go is still decided one at a time.
            let dead_held = records.iter().filter(|rec| {
                rec.engine == Engine::Rqlite
                    && !rec.replicas.iter().all(|r| membership.is_live(&r.node_id))
            });
            let manager = &*self;
            futures::stream::iter(dead_held)
                .for_each_concurrent(REPLACEMENTS_AT_ONCE, |rec| async move {
                    let slot = manager.slot(&rec.key);
                    let _deciding = slot.deciding.lock().await;
                    let Ok(rec) = manager.record(&rec.key).await else {
                        return;
                    };
                    // Hibernating databases get their replacements at their next wake.
                    if !manager.is_up(&rec.key, &rec) {
                        return;
                    }
                    if let Err(e) = manager.replace_dead(&rec).await {
                        warn!(database = %rec.key, error = %e, "replacing replicas of a dead node failed; retrying");
                    }
                })
                .await;
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
            let Some(started) = running.as_ref().map(|r| r.started) else {
                continue;
            };
            if self
                .needs_stop(by_key.get(&key).copied(), started)
                .is_none()
            {
                continue;
            }
            // The snapshot may be older than a start that just happened (a
            // wake, a replacement): decide on the record as it is now, while
            // no start can run here.
            let Ok(fresh) = self.store.database(&key).await else {
                continue;
            };
            if let Some((why, remove_data)) = self.needs_stop(fresh.as_ref(), started) {
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
                // The scan read this node's copy; the start needs the record as it is.
                let started = match self.record(&rec.key).await {
                    Ok(fresh) => self.start_local(&fresh, LocalStart::default()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = started {
                    warn!(database = %rec.key, error = %e, "could not start this node's replica");
                }
            }
        }
    }

    /// Why this node's running replica of a database (as `rec` says it is
    /// now) must stop, and whether its data goes too.
    pub(super) fn needs_stop(
        &self,
        rec: Option<&DatabaseRecord>,
        started: Instant,
    ) -> Option<(&'static str, bool)> {
        match rec {
            None => Some((
                "stopping a replica of a database that no longer exists",
                true,
            )),
            Some(rec) if !rec.replicas.iter().any(|r| r.node_id == self.node_id) => Some((
                "stopping and removing a replica that was replaced while this node was away",
                true,
            )),
            // A wake is recorded once the database answers: a replica
            // started within a start's time (and its recording) belongs to
            // a wake in hand.
            Some(rec)
                if rec.status == DatabaseStatus::Hibernating
                    && started.elapsed() > self.engines.start_timeout * 2 =>
            {
                Some(("stopping a replica of a database that hibernated", false))
            }
            Some(_) => None,
        }
    }

    /// Rotates the logs of this node's running engines (and `_system`'s)
    /// once they pass `control.engine_log_max_bytes`.
    pub async fn rotate_engine_logs(self: Arc<Self>) {
        let (max, keep) = (
            self.config.control.engine_log_max_bytes,
            self.config.control.engine_log_keep,
        );
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let mut dirs = vec![self.config.node.data_dir.join("_system")];
            for (key, slot) in self.all_slots() {
                if slot.running.try_lock().is_ok_and(|r| r.is_some()) {
                    dirs.push(self.db_dir(&key));
                }
            }
            for dir in dirs {
                for engine in [Engine::Rqlite, Engine::Postgres] {
                    let Ok(entries) = std::fs::read_dir(dir.join(engine.as_str())) else {
                        continue;
                    };
                    for path in entries.flatten().map(|e| e.path()) {
                        if path.extension().is_some_and(|e| e == "log") {
                            if let Err(e) = process::rotate_log(&path, max, keep) {
                                warn!(log = %path.display(), error = %e, "could not rotate an engine log");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Leaves every engine running for the next daemon to adopt or, with
    /// `control.stop_engines_on_exit`, stops them; either way each
    /// database keeps its status, so the next start brings back what ran.
    pub async fn shutdown(&self) {
        self.tasks.abort_all();
        let stop = self.config.control.stop_engines_on_exit;
        let slots = self.all_slots();
        futures::future::join_all(slots.into_iter().map(|(key, slot)| async move {
            let Some(run) = slot.running.lock().await.take() else {
                return;
            };
            if stop {
                info!(database = %key, "stopping engine for shutdown");
                self.stop_all(run.processes).await;
            } else {
                run.processes.into_iter().for_each(Supervised::detach);
            }
        }))
        .await;
    }
}

/// How long adopting one running database may take before it is started
/// again instead.
const ADOPT_WITHIN: Duration = Duration::from_secs(10);

/// Databases whose replicas on a dead node are replaced at once.
const REPLACEMENTS_AT_ONCE: usize = 8;

/// How a database that should run is brought back when the daemon starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// Its engines outlived the last daemon: supervise them again.
    Adopt,
    /// Start it here (it was active but its engines are gone, or a wake or
    /// create was under way).
    Wake,
    /// Start this node's replicas of a database spread over nodes.
    Rejoin,
}

/// Stops every engine process an earlier daemon left running under a
/// database's directory (`<dir>/<engine>/node-<i>.pid`).
async fn stop_left_running(db_dir: &std::path::Path) {
    for engine in [Engine::Rqlite, Engine::Postgres] {
        let Ok(entries) = std::fs::read_dir(db_dir.join(engine.as_str())) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                process::stop_survivor(&path, engine::stop_signal(engine)).await;
            }
        }
    }
}
