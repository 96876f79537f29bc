//! What arrives from outside a request: peers' requests and gossip
//! (checked against `_system` before it is believed), and proxies' activity
//! reports.

use std::sync::Arc;

use rouse_control_api::*;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Manager;
use crate::cluster::{self, NodeResponse, Notice};
use crate::cluster::{Inbound, ACTIVITY_TOPIC, CLUSTER_TOPIC, EVENTS_TOPIC};
use crate::error::{ControlError, Result};
use crate::metrics::PEER_REFUSALS;

impl Manager {
    /// Applies a proxy's activity report and shares it with the other
    /// nodes, so that the coordinator sees every proxy.
    pub async fn report_activity(&self, report: &ActivityReport) -> Result<usize> {
        let reported: Vec<DbKey> = report
            .databases
            .iter()
            .map(|d| DbKey::new(d.app.clone(), d.name.clone()))
            .collect();
        let known = self.store.existing(&reported).await?;
        // Checked here once; the other nodes take what is passed on as it is.
        let known_only = ActivityReport {
            proxy_id: report.proxy_id.clone(),
            databases: report
                .databases
                .iter()
                .filter(|d| known.contains(&DbKey::new(d.app.clone(), d.name.clone())))
                .cloned()
                .collect(),
        };
        self.peers.gossip(
            ACTIVITY_TOPIC,
            serde_json::to_vec(&known_only).expect("reports serialise"),
        );
        Ok(self.activity.report(&known_only, |_| true))
    }

    /// Answers peers' requests and applies their gossip until the swarm stops.
    pub async fn serve_peers(self: Arc<Self>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
        while let Some(message) = inbound.recv().await {
            match message {
                Inbound::Request {
                    from,
                    request,
                    reply,
                } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let answer = if me.admits(&from, "request", true).await {
                            NodeResponse::from_result(me.handle(request).await, |r| r)
                        } else {
                            NodeResponse::Failed(ControlError::Peer(
                                "this node acts only on requests of members recorded in _system"
                                    .into(),
                            ))
                        };
                        if reply.send(answer).is_err() {
                            debug!(peer_id = %from, "a request ended before its answer");
                        }
                    });
                }
                Inbound::Gossip { from, topic, data } => {
                    if self.admits(&from, "gossip", false).await {
                        self.on_gossip(&topic, &data).await
                    }
                }
            }
        }
    }

    pub(super) async fn on_gossip(&self, topic: &str, data: &[u8]) {
        match topic {
            EVENTS_TOPIC => {
                let Ok(event) = serde_json::from_slice::<Event>(data) else {
                    warn!(topic, "unreadable event from a peer");
                    return;
                };
                if !self.agrees_with_system(&event).await {
                    PEER_REFUSALS.counter(["event".into()]).increment(1);
                    warn!(?event, "ignored a peer's event that _system contradicts");
                    return;
                }
                match &event {
                    Event::Status {
                        app, name, status, ..
                    } => self.set_view(&DbKey::new(app.clone(), name.clone()), *status, Vec::new()),
                    Event::Leader {
                        app,
                        name,
                        endpoints,
                    } => self.set_view(
                        &DbKey::new(app.clone(), name.clone()),
                        DatabaseStatus::Active,
                        endpoints.clone(),
                    ),
                    Event::Dropped { app, name } => {
                        self.forget(&DbKey::new(app.clone(), name.clone()))
                    }
                    Event::KeyRevoked { .. } | Event::UserChanged { .. } => {}
                }
                // This node's proxies learn it too; it is not gossiped again.
                let _ = self.events.send(event);
            }
            CLUSTER_TOPIC => match serde_json::from_slice::<Notice>(data) {
                Ok(Notice::Waking { key }) => {
                    info!(database = %key, "the coordinator wakes the database")
                }
                Ok(Notice::ReplacementNeeded { key, dead_node }) => {
                    warn!(database = %key, dead_node = %dead_node, "the coordinator replaces a replica of a dead node")
                }
                Ok(Notice::Replaced {
                    key,
                    dead_node,
                    new_node,
                }) => {
                    info!(database = %key, dead_node = %dead_node, new_node = %new_node, "replica replaced")
                }
                Err(e) => warn!(topic, error = %e, "unreadable notice from a peer"),
            },
            ACTIVITY_TOPIC => match serde_json::from_slice::<ActivityReport>(data) {
                Ok(report) => {
                    self.activity.report(&report, |_| true);
                }
                Err(e) => warn!(topic, error = %e, "unreadable activity from a peer"),
            },
            _ => {}
        }
    }

    /// Whether a gossiped event fits what `_system` records, before this
    /// node and its proxies act on it: a leader among the database's own
    /// replicas, a drop of a database that is gone.
    pub(super) async fn agrees_with_system(&self, event: &Event) -> bool {
        let record = |app: &Name, name: &Name| {
            let key = DbKey::new(app.clone(), name.clone());
            async move { self.store.database(&key).await }
        };
        match event {
            Event::Leader {
                app,
                name,
                endpoints,
            } => match record(app, name).await {
                Ok(Some(rec)) => cluster::endpoints_agree(&rec.replicas, endpoints),
                _ => false,
            },
            Event::Status { app, name, .. } => matches!(record(app, name).await, Ok(Some(_))),
            Event::Dropped { app, name } => matches!(record(app, name).await, Ok(None)),
            Event::KeyRevoked { .. } | Event::UserChanged { .. } => true,
        }
    }
}
