//! Patroni clusters found by their scope: the members are read from etcd
//! every check interval, and a changed set of members becomes a new
//! [`Cluster`] that the listeners pick up, as after a reload. A member added
//! or removed in etcd is followed without a reload; while etcd cannot be
//! read, the last members known are kept.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::health::Health;
use crate::patroni::Cluster;
use rouse_runtime::etcd;

pub(crate) async fn follow(
    members: etcd::Members,
    cluster: watch::Sender<Arc<Cluster>>,
    health: Arc<Health>,
) {
    let mut warned = false;
    loop {
        let current = cluster.borrow().clone();
        match members.read().await {
            Ok(found) => {
                warned = false;
                if found != current.members() {
                    match Cluster::start(current.name(), &found, current.checks(), health.clone()) {
                        Ok(next) => {
                            info!(cluster = current.name(), members = ?found.iter().map(|m| &m.name).collect::<Vec<_>>(), "Patroni members changed in etcd");
                            cluster.send_replace(next);
                        }
                        Err(e) => {
                            warn!(cluster = current.name(), error = %e, "Patroni members in etcd are unusable: keeping the last known")
                        }
                    }
                }
            }
            Err(e) if !warned => {
                warned = true;
                warn!(cluster = current.name(), error = %e, "cannot read the Patroni members from etcd: keeping the last known");
            }
            Err(_) => {}
        }
        tokio::time::sleep(current.checks().check_interval).await;
    }
}
