//! This node's replicas: starting and stopping engine processes, following
//! their exits, and announcing a new leader.

use std::time::Duration;

use rouse_control_api::*;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::Manager;
use super::{Running, Slot};
use crate::cluster::LocalStart;
use crate::engine::{self, Instance};
use crate::error::{ControlError, Result};
use crate::metrics::PROCESS_RESTARTS;
use crate::model::{DatabaseRecord, ReplicaRecord};
use crate::process::{log_tail, ProcessEvent, Supervised};

impl Manager {
    /// How this node's PostgreSQL replica archives its WAL. A destination
    /// that cannot be set up does not keep the database from starting.
    fn archive(
        &self,
        rec: &DatabaseRecord,
        inst: &Instance<'_>,
    ) -> Option<crate::engine::postgres::Archive> {
        if rec.engine != Engine::Postgres {
            return None;
        }
        let r = inst.local().next()?;
        let socket = engine::postgres::socket_dir(inst, r);
        match self.backups.pg_archive(
            &rec.key,
            &inst.dir,
            &inst.replica_dir(r),
            r.port,
            socket.as_deref(),
        ) {
            Ok(archive) => archive,
            Err(e) => {
                error!(database = %rec.key, error = %e, "WAL archiving is off: backups of this database will fail");
                None
            }
        }
    }

    /// Starts this node's replicas of a database (idempotent) and waits
    /// until they answer. A replica without data bootstraps the cluster with
    /// the others (`start.bootstrap`) or joins the running one.
    pub(super) async fn start_local(&self, rec: &DatabaseRecord, start: LocalStart) -> Result<()> {
        let key = &rec.key;
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        slot.held_down
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if running.is_some() {
            return Ok(());
        }
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
            archive: None,
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
        let inst = Instance {
            archive: self.archive(rec, &inst),
            ..inst
        };
        let ports: Vec<u16> = inst.local().flat_map(ReplicaRecord::ports).collect();
        // Allocated by the coordinator; held here too once this node
        // restarted, so that no other database is given them.
        ports.iter().for_each(|p| self.ports.hold(*p));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut processes = Vec::new();
        for r in inst.local() {
            let spec = self.engines.process(rec.engine, &inst, r)?;
            match Supervised::start(spec.clone(), r.idx as usize, tx.clone()).await {
                Ok(p) => {
                    info!(database = %label, pid = p.pid(), adopted = p.adopted(), host = %r.host, port = r.port, raft_port = ?r.raft_port, joining = inst.first_start && !inst.join.is_empty(), "engine process started");
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
        if let Err(e) = alive {
            self.stop_all(processes).await;
            self.ports.release(ports);
            return Err(e);
        }
        self.forward_process_events(key.clone(), rx);
        *running = Some(Running {
            processes,
            ports,
            started: std::time::Instant::now(),
            _place: self.active.place(),
        });
        Ok(())
    }

    /// Stops this node's replicas of a database; with `remove_data`, its
    /// data directory here goes too.
    pub(super) async fn stop_local(&self, key: &DbKey, remove_data: bool) {
        let slot = self.slot(key);
        let mut running = slot.running.lock().await;
        self.stop_held(key, &slot, &mut running, remove_data).await;
    }

    /// [`Self::stop_local`] with the slot's process lock already held.
    pub(super) async fn stop_held(
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

    pub(super) async fn stop_all(&self, processes: Vec<Supervised>) {
        let grace = self.config.control.stop_grace;
        futures::future::join_all(processes.into_iter().map(|p| p.stop(grace))).await;
    }

    pub(super) fn forward_process_events(
        &self,
        key: DbKey,
        mut rx: mpsc::UnboundedReceiver<ProcessEvent>,
    ) {
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(manager) = me.upgrade() else { return };
                manager.on_process_event(&key, ev).await;
            }
        });
    }

    pub(super) async fn on_process_event(&self, key: &DbKey, ev: ProcessEvent) {
        match ev {
            ProcessEvent::Restarting {
                replica,
                status,
                attempt,
            } => {
                warn!(database = %key, replica, status = %status, attempt, "engine process exited unexpectedly; restarting");
                PROCESS_RESTARTS.counter([]).increment(1);
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
    pub(super) async fn announce_leader(&self, rec: &DatabaseRecord) {
        let deadline = tokio::time::Instant::now() + self.engines.start_timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(leader) =
                engine::rqlite::current_leader(&self.engines, &rec.replicas, &rec.secret).await
            {
                let endpoints = engine::endpoints(
                    &rec.replicas,
                    Some(leader),
                    self.engines.rqlite_http.is_https(),
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
}
