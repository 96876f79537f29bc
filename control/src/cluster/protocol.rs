//! What nodes say to each other: the gossip topics, the request-response
//! protocol's requests and answers, and the coordinator's notices.

use rouse_control_api::{CreateDatabase, DatabaseInfo, DbKey, Engine};
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Result};
use crate::model::ReplicaRecord;

/// The gossipsub topic of the heartbeats.
pub const HEALTH_TOPIC: &str = "rouse/health";

/// Status changes, leader changes and the like, as control's `/events`
/// carries them, so that proxies on every node learn them.
pub const EVENTS_TOPIC: &str = "rouse/events";

/// What proxies report about their databases, so that the coordinator sees
/// the activity of every node before it hibernates anything.
pub const ACTIVITY_TOPIC: &str = "rouse/activity";

/// The coordinator's notices (see [`crate::cluster::Notice`]).
pub const CLUSTER_TOPIC: &str = "rouse/cluster";

/// Node-to-node requests (lifecycle decisions, work on replicas).
pub(super) const RPC_PROTOCOL: &str = "/rouse/node/1";

/// Health checks a peer may miss before it counts as unhealthy.
pub const MISSED_CHECKS: u32 = 3;

/// Identify protocol version: peers of another protocol family are not ours.
pub(super) const PROTOCOL_VERSION: &str = "/rouse/1.0.0";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NodeRequest {
    // Decisions, sent to the coordinator.
    Create {
        request: CreateDatabase,
        first_access: bool,
    },
    Wake {
        key: DbKey,
    },
    Hibernate {
        key: DbKey,
        force: bool,
    },
    Drop {
        key: DbKey,
    },
    // Work on the receiving node's replicas, sent by the coordinator.
    /// Ports for replica `idx`, preferring `previous`'s.
    Allocate {
        key: DbKey,
        engine: Engine,
        idx: u32,
        previous: Option<ReplicaRecord>,
    },
    /// Start this node's replicas of the database as `_system` records them.
    Start {
        key: DbKey,
        start: LocalStart,
    },
    /// Stop this node's replicas, and remove their data if asked.
    Stop {
        key: DbKey,
        remove_data: bool,
    },
}

/// What the coordinator tells every node it is doing, on gossipsub
/// [`crate::cluster::CLUSTER_TOPIC`]: each node logs it, so that any node's
/// log tells the cluster's story.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Notice {
    /// A wake of the database, asked at any node, is under way.
    Waking { key: DbKey },
    /// A replica sits on a dead node and needs a replacement.
    ReplacementNeeded { key: DbKey, dead_node: String },
    /// The replacement joined the database's Raft cluster.
    Replaced {
        key: DbKey,
        dead_node: String,
        new_node: String,
    },
}

/// How a holder starts its replicas.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LocalStart {
    /// A new database: replicas without data bootstrap a cluster together.
    /// Otherwise a replica without data joins the running cluster.
    pub bootstrap: bool,
    /// The Raft addresses changed since the last run.
    pub raft_moved: bool,
    /// The others make a quorum without this holder's replicas: a full
    /// active set refuses them at once rather than waiting for room.
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum NodeResponse {
    Info(Box<DatabaseInfo>),
    Replica(ReplicaRecord),
    Done,
    Failed(ControlError),
}

impl NodeResponse {
    pub fn from_result<T>(result: Result<T>, ok: impl FnOnce(T) -> NodeResponse) -> NodeResponse {
        match result {
            Ok(v) => ok(v),
            Err(e) => NodeResponse::Failed(e.portable()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rouse_control_api::Name;

    use super::*;

    fn key() -> DbKey {
        DbKey::new(Name::new("shop").unwrap(), Name::new("orders").unwrap())
    }

    /// What crosses libp2p is JSON: each request and answer reads back as
    /// it was sent, errors with their kind and code.
    #[test]
    fn requests_and_answers_survive_the_wire() {
        let requests = [
            NodeRequest::Wake { key: key() },
            NodeRequest::Hibernate {
                key: key(),
                force: true,
            },
            NodeRequest::Start {
                key: key(),
                start: LocalStart {
                    bootstrap: true,
                    ..LocalStart::default()
                },
            },
            NodeRequest::Allocate {
                key: key(),
                engine: Engine::Rqlite,
                idx: 2,
                previous: Some(ReplicaRecord {
                    idx: 2,
                    node_id: "n2".into(),
                    host: "127.0.0.3".into(),
                    port: 5003,
                    raft_port: Some(7003),
                }),
            },
        ];
        for request in requests {
            let json = serde_json::to_string(&request).unwrap();
            let back: NodeRequest = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }

        let failed = NodeResponse::from_result::<()>(
            Err(ControlError::InvalidName(Name::new("").unwrap_err())),
            |_| NodeResponse::Done,
        );
        let json = serde_json::to_string(&failed).unwrap();
        match serde_json::from_str::<NodeResponse>(&json).unwrap() {
            // A name error travels as a bad request, which any node reads.
            NodeResponse::Failed(e @ ControlError::BadRequest(_)) => {
                assert_eq!(e.code(), rouse_control_api::ErrorCode::BadRequest)
            }
            other => panic!("{other:?}"),
        }
    }
}
