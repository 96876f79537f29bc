//! The check state of every backend the proxy follows (Patroni members, the
//! Redis master), kept for `rouse_backend_up` (HAProxy-style up/down, for
//! alerts) and for the stats page. One registry per proxy, handed to whoever
//! checks and whoever shows.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::BACKEND_UP;

/// (cluster, member, role)
type BackendId = (String, String, String);

#[derive(Default)]
pub(crate) struct Health {
    backends: Mutex<BTreeMap<BackendId, BackendState>>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BackendState {
    pub(crate) cluster: String,
    pub(crate) member: String,
    pub(crate) role: String,
    pub(crate) up: bool,
    /// Unix ms of the last change.
    pub(crate) since: u64,
}

impl Health {
    /// Records a backend's check state.
    pub(crate) fn record(&self, cluster: &str, member: &str, role: &'static str, up: bool) {
        BACKEND_UP
            .gauge([
                cluster.to_string().into(),
                member.to_string().into(),
                role.into(),
            ])
            .set(if up { 1.0 } else { 0.0 });
        let id = (cluster.to_string(), member.to_string(), role.to_string());
        let state = BackendState {
            cluster: id.0.clone(),
            member: id.1.clone(),
            role: id.2.clone(),
            up,
            since: rouse_runtime::clock::now_ms(),
        };
        self.backends
            .lock()
            .expect("backends poisoned")
            .insert(id, state);
    }

    /// Forgets the members of `cluster` that are not among `members` (gone
    /// from the cluster's list in etcd).
    pub(crate) fn keep_members(&self, cluster: &str, members: &[&str]) {
        self.backends
            .lock()
            .expect("backends poisoned")
            .retain(|(c, m, _), _| c != cluster || members.contains(&m.as_str()));
    }

    /// Every backend's state, by cluster, member and role.
    pub(crate) fn backends(&self) -> Vec<BackendState> {
        let backends = self.backends.lock().expect("backends poisoned");
        backends.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_states_are_kept_by_cluster_member_and_role() {
        let health = Health::default();
        health.record("pillar", "pg1", "primary", true);
        health.record("pillar", "pg1", "primary", false);
        health.record("pillar", "pg1", "replica", true);
        let b = health.backends();
        assert_eq!(b.len(), 2);
        assert!(!b.iter().find(|s| s.role == "primary").unwrap().up);
        assert!(b.iter().find(|s| s.role == "replica").unwrap().up);
    }
}
