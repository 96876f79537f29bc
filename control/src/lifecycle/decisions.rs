//! The coordinator's decisions about an existing database: wake, hibernate
//! and drop, each under the database's decision lock.

use std::time::{Duration, Instant};

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;
use rouse_runtime::metric::WAKE_DURATION;
use tracing::{error, info, warn};

use super::everywhere::Started;
use super::settings::patroni_setting;
use super::{not_found, Manager};
use crate::cluster::{LocalStart, Notice};
use crate::error::{ControlError, Result};
use crate::model::DatabaseRecord;

impl Manager {
    pub(super) async fn wake_here(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let asked = Instant::now();
        let slot = self.slot(key);
        let deciding = slot.deciding.clone().lock_owned().await;
        // What the hibernation wrote, if nothing was written since and this
        // node is alone; else the leader's copy, not a Raft entry: under the
        // decision lock nobody else changes the record, and in a storm of
        // wakes the engines' first writes queue up on the same disk as
        // `_system`'s.
        let handed = self.store.take_handed_over(key);
        let rec = match handed {
            Some(rec) if !self.membership().await.clustered() => rec,
            _ => self
                .store
                .database_status(key)
                .await?
                .ok_or_else(|| not_found(key))?,
        };
        if self.is_up(key, &rec) {
            return Ok(self.info(&rec));
        }
        let locked = asked.elapsed();
        let asleep = rec.status;
        // Not written to `_system`: a wake is this daemon's work in hand
        // (a restarted daemon wakes again on the next request).
        self.announce(key, DatabaseStatus::Waking, None, Vec::new());
        info!(database = %key, "waking database");
        self.notify(Notice::Waking { key: key.clone() });
        let result = async {
            let (rec, raft_moved) = self.reallocate(&rec).await?;
            let start = LocalStart {
                raft_moved,
                ..LocalStart::default()
            };
            match self.start_everywhere(&rec, start).await {
                Ok(started) => Ok((rec, started)),
                Err(e) => {
                    self.release(&rec.replicas);
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((
                mut rec,
                Started {
                    endpoints,
                    full,
                    seat_wait,
                },
            )) => {
                let took = asked.elapsed();
                let now = now_ms();
                self.activity.touch(key, now);
                WAKE_DURATION
                    .histogram([rec.engine.as_str().into(), "wait".into()])
                    .record((locked + seat_wait).as_secs_f64());
                self.announce(key, DatabaseStatus::Active, None, endpoints.clone());
                let wake_ms = took.as_millis() as u64;
                (rec.last_activity, rec.last_wake_ms) = (now, Some(wake_ms));
                self.publish(Event::Leader {
                    app: key.app.clone(),
                    name: key.db.clone(),
                    endpoints,
                });
                info!(database = %key, wake_ms, "database woke up");
                // The waiting clients are answered now; the record follows,
                // still under the decision lock, so that no later decision
                // about the database overtakes it. A daemon that dies before
                // writing it finds the engine running for a hibernated
                // database, stops it, and the next request wakes it again.
                let me = self.me.clone();
                let woken = rec.clone();
                tokio::spawn(async move {
                    let _deciding = deciding;
                    let Some(m) = me.upgrade() else { return };
                    if let Err(e) = m.store.set_woken(&woken.key, now, wake_ms).await {
                        error!(database = %woken.key, error = %e, "could not record the wake");
                    }
                    // Replicas left behind on dead nodes get their replacements now,
                    // and those on full nodes move to nodes with room.
                    if let Err(e) = m.replace_dead(&woken).await {
                        warn!(database = %woken.key, error = %e, "could not replace replicas of dead nodes");
                    }
                    if let Err(e) = m.move_off(&woken, &full).await {
                        warn!(database = %woken.key, error = %e, "could not move replicas off full nodes");
                    }
                });
                Ok(self.info(&rec))
            }
            // No room: the database stays asleep (not failed).
            Err(e @ ControlError::ActiveSetFull { .. }) => {
                self.announce(key, asleep, rec.reason.as_deref(), Vec::new());
                Err(e)
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

    pub(super) async fn hibernate_here(&self, key: &DbKey, force: bool) -> Result<DatabaseInfo> {
        // Before the decision lock: a wake that comes meanwhile is not
        // held up by the copy.
        if force || self.activity.open_sessions(key) == 0 {
            self.backup_before_sleep(key).await;
        }
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
        let slept = DatabaseRecord {
            status: DatabaseStatus::Hibernating,
            reason: None,
            last_activity: last,
            ..rec
        };
        if !self.membership().await.clustered() {
            self.store.hand_over(slept.clone());
        }
        Ok(self.info(&slept))
    }

    pub(super) async fn drop_here(&self, key: &DbKey) -> Result<()> {
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
}
