//! Records a hibernation hands to the next wake of the same database, so
//! that the wake, which clients wait on, does not read `_system` first
//! (under a storm of wakes that read waits behind the starting engines for
//! a CPU). Kept only while this node is alone: then this daemon is the
//! only writer of `_system`, and [`Store`](super::Store) drops a
//! database's record here before it writes any of its rows.

use std::collections::HashMap;
use std::sync::Mutex;

use rouse_control_api::DbKey;

use crate::model::DatabaseRecord;

/// Records kept at most; past that a wake reads `_system` as before.
const MAX_KEPT: usize = 10_000;

#[derive(Default)]
pub(super) struct Handoffs {
    records: Mutex<HashMap<DbKey, DatabaseRecord>>,
}

impl Handoffs {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<DbKey, DatabaseRecord>> {
        self.records.lock().expect("handoffs poisoned")
    }

    pub(super) fn keep(&self, rec: DatabaseRecord) {
        let mut records = self.records();
        if records.len() < MAX_KEPT || records.contains_key(&rec.key) {
            records.insert(rec.key.clone(), rec);
        }
    }

    /// The record kept for `key`, which is gone from here afterwards.
    pub(super) fn take(&self, key: &DbKey) -> Option<DatabaseRecord> {
        self.records().remove(key)
    }

    pub(super) fn forget(&self, key: &DbKey) {
        self.records().remove(key);
    }

    pub(super) fn clear(&self) {
        self.records().clear();
    }
}

#[cfg(test)]
mod tests {
    use rouse_control_api::{DatabaseStatus, Engine, Name};

    use super::*;

    fn record(db: &str) -> DatabaseRecord {
        DatabaseRecord {
            key: DbKey::new(Name::new("app").unwrap(), Name::new(db).unwrap()),
            engine: Engine::Rqlite,
            replication_factor: 1,
            status: DatabaseStatus::Hibernating,
            reason: None,
            created_at: 0,
            last_activity: 0,
            last_wake_ms: None,
            secret: "s".into(),
            replicas: Vec::new(),
        }
    }

    #[test]
    fn a_record_is_taken_once_and_a_write_or_a_clear_drops_it() {
        let handoffs = Handoffs::default();
        let (a, b) = (record("a"), record("b"));
        handoffs.keep(a.clone());
        assert_eq!(handoffs.take(&a.key).map(|r| r.key), Some(a.key.clone()));
        assert!(handoffs.take(&a.key).is_none(), "taken once");

        handoffs.keep(a.clone());
        handoffs.keep(b.clone());
        handoffs.forget(&a.key);
        assert!(handoffs.take(&a.key).is_none(), "dropped by a write");
        handoffs.clear();
        assert!(
            handoffs.take(&b.key).is_none(),
            "dropped when others may write"
        );
    }

    #[test]
    fn keeps_a_bounded_number() {
        let handoffs = Handoffs::default();
        for i in 0..MAX_KEPT + 5 {
            handoffs.keep(record(&format!("d{i}")));
        }
        assert_eq!(handoffs.records().len(), MAX_KEPT);
        assert!(handoffs
            .take(&record(&format!("d{}", MAX_KEPT + 1)).key)
            .is_none());
        assert!(handoffs.take(&record("d0").key).is_some());
    }
}
