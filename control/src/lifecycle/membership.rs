//! Which peers are members of the cluster, as recorded in `_system`, and
//! the live membership used for placement and coordination. A peer not yet
//! recorded makes this node read the members again, at most once a while.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rouse_runtime::clock::now_ms;
use tracing::{debug, warn};

use super::Manager;
use crate::cluster::Membership;
use crate::error::Result;
use crate::metrics::PEER_REFUSALS;

impl Manager {
    /// The cluster as this node sees it now; healthy peers not yet known
    /// as members are looked up in `_system` first (a node that just
    /// joined takes part at once).
    pub(super) async fn membership(&self) -> Membership {
        let unknown = {
            let members = self.members.lock().expect("members poisoned");
            self.peers
                .peers()
                .iter()
                .any(|p| p.healthy && !members.known.contains(&p.peer_id))
        };
        if unknown {
            if let Err(e) = self.refresh_members().await {
                debug!(error = %e, "cannot read the cluster's members");
            }
        }
        let members = self.members.lock().expect("members poisoned").known.clone();
        let membership = Membership::new(
            &self.peers,
            &members,
            &self.node_id,
            (self.config.database.max_databases, self.has_active_room()),
            self.started,
            !self.config.discovery.bootstrap_peers.is_empty(),
        );
        // Others may write `_system` from now on: nothing written while
        // alone is taken for granted any more.
        if membership.clustered() {
            self.store.forget_handed_over();
        }
        membership
    }

    /// Records this node as a member of the cluster in `_system`.
    pub async fn record_membership(&self) -> Result<()> {
        self.store
            .record_member(&self.peers.peer_id().to_string(), &self.node_id, now_ms())
            .await?;
        self.refresh_members().await
    }

    pub(super) async fn refresh_members(&self) -> Result<()> {
        let members: HashSet<libp2p::PeerId> = self
            .store
            .members()
            .await?
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        self.members.lock().expect("members poisoned").known = members;
        Ok(())
    }

    /// Whether `peer` is a member recorded in `_system`. An unknown peer
    /// makes this node read the members again (`eager`: always; otherwise
    /// at most once a second per peer, so that frequent messages of a
    /// stranger do not each cost a read of `_system`).
    pub(super) async fn is_member(&self, peer: &libp2p::PeerId, eager: bool) -> bool {
        let read_again = {
            let mut members = self.members.lock().expect("members poisoned");
            if members.known.contains(peer) {
                return true;
            }
            let due = eager
                || members
                    .asked
                    .get(peer)
                    .is_none_or(|at| at.elapsed() > Duration::from_secs(1));
            if due {
                if members.asked.len() >= 1_000 {
                    members.asked.clear();
                }
                members.asked.insert(*peer, Instant::now());
            }
            due
        };
        if read_again {
            if let Err(e) = self.refresh_members().await {
                warn!(error = %e, "cannot read the cluster's members");
            }
        }
        self.members
            .lock()
            .expect("members poisoned")
            .known
            .contains(peer)
    }

    /// Whether to act on what `peer` sent (`what`: a request, gossip);
    /// a refusal is logged and counted. Requests are rare and someone waits
    /// for them: for those, look again (`eager`).
    pub(super) async fn admits(
        &self,
        peer: &libp2p::PeerId,
        what: &'static str,
        eager: bool,
    ) -> bool {
        let member = self.is_member(peer, eager).await;
        if !member {
            PEER_REFUSALS.counter(["not_a_member".into()]).increment(1);
            warn!(peer_id = %peer, what, "ignored a peer that is not a member recorded in _system");
        }
        member
    }
}
