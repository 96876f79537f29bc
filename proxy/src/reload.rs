//! Reloading the configuration (SIGHUP) without dropping a connection or a
//! request: credentials (JWT keys), rate limits, the response cache, the
//! wait bounds and Patroni cluster members and checks change in place;
//! connections and requests in flight keep what they started with. A new
//! configuration is checked whole before any of it is applied. Settings
//! that need new sockets or threads (listen addresses, TLS, worker threads,
//! ...) are reported as needing a restart or an upgrade.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rouse_config::{Config, PatroniCluster};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::app::Services;
use crate::auth::JwtKeys;
use crate::metrics::CONFIG_RELOADS;
use crate::patroni::Cluster;

/// Proxy settings that a reload applies.
const RELOADED: [&str; 7] = [
    "auth",
    "rate_limits",
    "response_cache",
    "wake_timeout",
    "max_waiting",
    "patroni",
    "patroni_clusters",
];

pub(crate) struct Reloader {
    current: Mutex<Config>,
    services: Arc<Services>,
    /// The cluster each plain TCP listener sends to, by cluster name.
    clusters: HashMap<String, watch::Sender<Arc<Cluster>>>,
}

impl Reloader {
    pub(crate) fn new(
        config: Config,
        services: Arc<Services>,
        clusters: HashMap<String, watch::Sender<Arc<Cluster>>>,
    ) -> Reloader {
        Reloader {
            current: Mutex::new(config),
            services,
            clusters,
        }
    }

    /// Applies `new` where it differs from the running configuration, or
    /// refuses it whole.
    pub(crate) fn apply(&self, new: Config) -> anyhow::Result<()> {
        let p = &new.proxy;
        // Everything that can fail comes first.
        let keys = JwtKeys::load(&p.auth)?;
        let clusters = self.changed_clusters(&new)?;

        let s = &self.services;
        s.auth.set_keys(keys);
        s.limits
            .set(p.rate_limits.http.clone(), p.rate_limits.postgres.clone());
        s.cache.set(&p.response_cache);
        s.resolver
            .set_bounds(p.wake_timeout, p.max_waiting as usize);
        for (name, cluster) in clusters {
            info!(cluster = %name, "Patroni cluster replaced: new connections use its members");
            let _ = self.clusters[&name].send(cluster);
        }
        let mut current = self.current.lock().expect("config poisoned");
        for key in needs_restart(&current, &new) {
            warn!(key = %key, "changed: takes effect after a restart or an upgrade");
        }
        *current = new;
        Ok(())
    }

    /// New clusters for those whose members or checks changed.
    fn changed_clusters(&self, new: &Config) -> anyhow::Result<Vec<(String, Arc<Cluster>)>> {
        let current = self.current.lock().expect("config poisoned");
        let old: HashMap<&str, &PatroniCluster> = current
            .proxy
            .patroni_clusters
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let checks_changed = serde_json::to_value(&current.proxy.patroni)?
            != serde_json::to_value(&new.proxy.patroni)?;
        let mut out = Vec::new();
        for c in &new.proxy.patroni_clusters {
            let unchanged = old
                .get(c.name.as_str())
                .is_some_and(|o| o.members == c.members);
            if !self.clusters.contains_key(&c.name) || (unchanged && !checks_changed) {
                continue;
            }
            // Members found in etcd stay as found until the next read.
            let members = match &c.discovery {
                Some(_) => self.clusters[&c.name].borrow().members(),
                None => c.members.clone(),
            };
            out.push((
                c.name.clone(),
                Cluster::start(
                    &c.name,
                    &members,
                    &new.proxy.patroni,
                    self.services.health.clone(),
                )?,
            ));
        }
        Ok(out)
    }
}

/// The `proxy.*` and `redis.*` keys that differ and are not reloaded.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (
        serde_json::to_value(&old.proxy),
        serde_json::to_value(&new.proxy),
    ) else {
        return out;
    };
    for (key, value) in &b {
        if !RELOADED.contains(&key.as_str()) && a.get(key) != Some(value) {
            out.push(format!("proxy.{key}"));
        }
    }
    if serde_json::to_value(&old.redis).ok() != serde_json::to_value(&new.redis).ok() {
        out.push("redis".into());
    }
    out
}

/// Reads the configuration again on every SIGHUP; one that does not load is
/// refused and the running one stays.
pub async fn reload_on_sighup(
    path: Option<std::path::PathBuf>,
    reloads: tokio::sync::mpsc::UnboundedSender<Config>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("cannot catch SIGHUP: no configuration reload");
        return;
    };
    while hangups.recv().await.is_some() {
        match Config::load(path.as_deref()) {
            Ok(config) => {
                let _ = reloads.send(config);
            }
            Err(e) => {
                tracing::error!(error = %e, "new configuration refused; the running one stays");
                CONFIG_RELOADS.counter(["refused".into()]).increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_changes_need_a_restart_limits_do_not() {
        let old = Config::parse("a", "", std::iter::empty()).unwrap();
        let text = "proxy:\n  http_addr: 127.0.0.1:9999\n  rate_limits: {http: {per_app: {rate: 5, burst: 5}}}\n";
        let new = Config::parse("b", text, std::iter::empty()).unwrap();
        assert_eq!(
            needs_restart(&old, &new),
            vec!["proxy.http_addr".to_string()]
        );
    }
}
