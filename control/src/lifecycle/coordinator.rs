//! The public lifecycle calls (create, wake, hibernate, drop). Each is
//! decided here when this node coordinates, or asked of the coordinator over
//! libp2p; `handle` answers the requests peers send this node.

use std::time::Duration;

use rouse_control_api::*;
use tracing::debug;

use super::Manager;
use crate::cluster::{NodeRequest, NodeResponse};
use crate::error::{ControlError, Result};

impl Manager {
    /// Creates a database; `first_access` when a proxy creates it because a
    /// client used it, which the app's policy may forbid.
    pub async fn create(&self, req: &CreateDatabase, first_access: bool) -> Result<DatabaseInfo> {
        let request = NodeRequest::Create {
            request: req.clone(),
            first_access,
        };
        self.decide_info(request, async {
            self.create_here(req, first_access).await.map(info)
        })
        .await
    }

    /// Starts a database that is not running (idempotent; concurrent calls
    /// share one start). Returns once it answers queries.
    pub async fn wake(&self, key: &DbKey) -> Result<DatabaseInfo> {
        let request = NodeRequest::Wake { key: key.clone() };
        self.decide_info(request, async { self.wake_here(key).await.map(info) })
            .await
    }

    /// Stops a running database, keeping its data. Refused while proxies
    /// report open sessions, unless `force`.
    pub async fn hibernate(&self, key: &DbKey, force: bool) -> Result<DatabaseInfo> {
        let request = NodeRequest::Hibernate {
            key: key.clone(),
            force,
        };
        self.decide_info(request, async {
            self.hibernate_here(key, force).await.map(info)
        })
        .await
    }

    pub async fn drop_database(&self, key: &DbKey) -> Result<()> {
        let request = NodeRequest::Drop { key: key.clone() };
        self.decide(request, async {
            self.drop_here(key).await.map(|_| NodeResponse::Done)
        })
        .await
        .map(|_| ())
    }

    /// Makes a decision `here` when this node coordinates, else sends
    /// `request` to the coordinator. An answer about a database also
    /// updates this node's view.
    pub(super) async fn decide(
        &self,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<NodeResponse> {
        let (answer, asked) = match self.membership().await.coordinator() {
            None => (here.await?, false),
            Some(peer) => (self.ask(peer, request).await?, true),
        };
        if let NodeResponse::Info(info) = &answer {
            let key = DbKey::new(info.app.clone(), info.name.clone());
            self.set_view(&key, info.status, info.endpoints.clone());
            // The caller may be owed the engine login, which the
            // coordinator's answer does not carry (a database created
            // elsewhere a moment ago).
            if asked && !self.knows_secret(&key) {
                if let Ok(Some(rec)) = self.store.database_status(&key).await {
                    self.info(&rec);
                }
            }
        }
        Ok(answer)
    }

    /// Makes a decision that answers with the database's status.
    pub(super) async fn decide_info(
        &self,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<DatabaseInfo> {
        match self.decide(request, here).await? {
            NodeResponse::Info(info) => Ok(*info),
            other => Err(ControlError::Internal(format!(
                "unexpected answer from the coordinator: {other:?}"
            ))),
        }
    }

    /// Sends `request` to `peer`. A peer that could not be dialled (so
    /// nothing was sent) is tried twice more, shortly after: a connection
    /// may be in the middle of being made (a node that just joined, a redial).
    pub(super) async fn ask(
        &self,
        peer: libp2p::PeerId,
        request: NodeRequest,
    ) -> Result<NodeResponse> {
        let mut tries = 0;
        loop {
            match self.peers.request(peer, request.clone()).await {
                Ok(NodeResponse::Failed(e)) => return Err(e),
                Ok(answer) => return Ok(answer),
                Err(e @ crate::cluster::PeersError::Dial { .. }) if tries < 2 => {
                    tries += 1;
                    debug!(peer_id = %peer, error = %e, "request to a peer failed; trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(ControlError::Peer(e.to_string())),
            }
        }
    }

    /// Runs the work of `request` on node `node_id`: `here` on this node,
    /// or `request` there over libp2p.
    pub(super) async fn on_node(
        &self,
        node_id: &str,
        request: NodeRequest,
        here: impl std::future::Future<Output = Result<NodeResponse>>,
    ) -> Result<NodeResponse> {
        if node_id == self.node_id {
            return here.await;
        }
        let peer = self
            .membership()
            .await
            .peer_of(node_id)
            .ok_or_else(|| ControlError::Peer(format!("node {node_id} is not known here")))?;
        self.ask(peer, request).await
    }

    /// Answers a peer's request.
    pub async fn handle(&self, request: NodeRequest) -> Result<NodeResponse> {
        match request {
            NodeRequest::Create {
                request,
                first_access,
            } => self.create_here(&request, first_access).await.map(info),
            NodeRequest::Wake { key } => self.wake_here(&key).await.map(info),
            NodeRequest::Hibernate { key, force } => {
                self.hibernate_here(&key, force).await.map(info)
            }
            NodeRequest::Drop { key } => self.drop_here(&key).await.map(|_| NodeResponse::Done),
            NodeRequest::Allocate {
                key: _,
                engine,
                idx,
                previous,
            } => self
                .allocate_local(engine, idx, previous.as_ref())
                .map(NodeResponse::Replica),
            NodeRequest::Start { key, start } => {
                let rec = self.record(&key).await?;
                self.start_seated(&rec, start)
                    .await
                    .map(|_| NodeResponse::Done)
            }
            NodeRequest::Stop { key, remove_data } => {
                self.stop_local(&key, remove_data).await;
                Ok(NodeResponse::Done)
            }
        }
    }
}

/// A database's status as an answer to a peer.
fn info(info: DatabaseInfo) -> NodeResponse {
    NodeResponse::Info(Box::new(info))
}
