//! Every metric control records, declared once (see [`rouse_runtime::metric`]).

use rouse_runtime::metric::{Kind, Metric};

pub const DATABASES: Metric = Metric {
    name: "rouse_databases",
    kind: Kind::Gauge,
    labels: &["status"],
    help: "Databases known to this node's metadata, by status.",
};

pub const CONTROL_REQUESTS: Metric = Metric {
    name: "rouse_control_requests_total",
    kind: Kind::Counter,
    labels: &["status"],
    help: "Control API calls answered, by HTTP status.",
};

pub const CONTROL_ERRORS: Metric = Metric {
    name: "rouse_control_errors_total",
    kind: Kind::Counter,
    labels: &["kind", "code"],
    help: "Control API calls that failed, by whose fault (kind) and error code.",
};

pub const WAKE_REQUESTS: Metric = Metric {
    name: "rouse_wake_requests_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Wake calls that reached control (proxies coordinate to send one per database).",
};

pub const PEER_REFUSALS: Metric = Metric {
    name: "rouse_peer_refusals_total",
    kind: Kind::Counter,
    labels: &["what"],
    help: "What peers tried and were refused: a peer outside allowed_peers, one not recorded as a member, a gossiped event _system contradicts.",
};

pub const PEERS: Metric = Metric {
    name: "rouse_peers",
    kind: Kind::Gauge,
    labels: &["health"],
    help: "Peers this node has heard from, healthy or not.",
};

pub const PROCESS_RESTARTS: Metric = Metric {
    name: "rouse_process_restarts_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Engine processes that exited unexpectedly and were restarted.",
};

pub const REPLICA_REPLACEMENTS: Metric = Metric {
    name: "rouse_replica_replacements_total",
    kind: Kind::Counter,
    labels: &["result"],
    help:
        "Replicas of dead nodes replaced (done) or left for want of a node with room (no_capacity).",
};

/// Control's own metrics; the shared ones are in [`rouse_runtime::metric::CATALOGUE`].
pub const CATALOGUE: &[&Metric] = &[
    &DATABASES,
    &CONTROL_REQUESTS,
    &CONTROL_ERRORS,
    &WAKE_REQUESTS,
    &PEER_REFUSALS,
    &PEERS,
    &PROCESS_RESTARTS,
    &REPLICA_REPLACEMENTS,
];
