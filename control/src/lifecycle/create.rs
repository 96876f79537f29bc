//! Creating a database: quota and capacity checks, placement, the
//! `_system` record and the decision log, then the first start.

use std::collections::HashSet;
use std::time::Instant;

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use tracing::{error, info, warn};

use super::everywhere::Started;
use super::placement::placement;
use super::settings::{first_access_setting, patroni_setting};
use super::Manager;
use crate::cluster::LocalStart;
use crate::engine;
use crate::error::{ControlError, Result};
use crate::model::{DatabaseRecord, ReplicaRecord};
use crate::secrets;

impl Manager {
    pub(super) async fn create_here(
        &self,
        req: &CreateDatabase,
        first_access: bool,
    ) -> Result<DatabaseInfo> {
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
            (Engine::Patroni, Some(reg)) => Some(engine::patroni::accept(reg, &self.node_id).await?),
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
            let (held, held_by_app) = self.store.count(&key.app).await?;
            self.quotas.admit_create(&key.app, held_by_app as usize)?;
            let replicas = match &registration {
                Some((members, _)) => members.clone(),
                None if membership.clustered() => {
                    let placed =
                        membership.place(rf, &self.store.load().await?, &HashSet::new())?;
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
            ..LocalStart::default()
        };
        let placed = asked.elapsed();
        match self.start_everywhere(&rec, start).await {
            Ok(Started { endpoints, .. }) => {
                self.activity.touch(&key, now_ms());
                self.transition(&key, DatabaseStatus::Active, None, endpoints.clone())
                    .await?;
                if rec.engine == Engine::Postgres {
                    self.make_pg_repository(&rec);
                }
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
    pub(super) async fn record_decision(&self, key: &DbKey, kind: &str, detail: &str) {
        let by = self.peers.peer_id().to_string();
        if let Err(e) = self
            .store
            .insert_decision(now_ms(), &by, kind, key, detail)
            .await
        {
            warn!(database = %key, kind, error = %e, "could not log a decision");
        }
    }
}
