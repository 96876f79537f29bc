//! The last wakes this proxy waited for, for the stats page.

use std::collections::VecDeque;
use std::sync::Mutex;

use rouse_control_api::DbKey;
use serde::Serialize;

/// One wake this proxy waited for.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Wake {
    pub(crate) db: String,
    /// Unix ms when it ended.
    pub(crate) at: u64,
    pub(crate) ms: u64,
    pub(crate) ok: bool,
}

/// The last wakes, oldest first.
#[derive(Default)]
pub(crate) struct WakeHistory(Mutex<VecDeque<Wake>>);

impl WakeHistory {
    const KEPT: usize = 200;

    pub(crate) fn record(&self, db: &DbKey, took: std::time::Duration, ok: bool) {
        let mut h = self.0.lock().expect("wake history poisoned");
        if h.len() == Self::KEPT {
            h.pop_front();
        }
        h.push_back(Wake {
            db: db.internal(),
            at: rouse_runtime::clock::now_ms(),
            ms: took.as_millis() as u64,
            ok,
        });
    }

    pub(crate) fn all(&self) -> Vec<Wake> {
        self.0
            .lock()
            .expect("wake history poisoned")
            .iter()
            .cloned()
            .collect()
    }
}
