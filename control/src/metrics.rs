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

pub const BACKUPS: Metric = Metric {
    name: "rouse_backups_total",
    kind: Kind::Counter,
    labels: &["engine", "reason", "result"],
    help: "Backups attempted, by why (manual, scheduled, hibernate) and result (done, unchanged, failed).",
};

pub const BACKUP_LAST_SUCCESS: Metric = Metric {
    name: "rouse_backup_last_success_timestamp_seconds",
    kind: Kind::Gauge,
    labels: &["app", "db"],
    help:
        "When each database's last backup succeeded (Unix seconds), as this node made or found it.",
};

pub const BACKUP_FAILURES: Metric = Metric {
    name: "rouse_backup_failures_total",
    kind: Kind::Counter,
    labels: &["app", "db"],
    help: "Backups of each database that failed.",
};

pub const BACKUP_BYTES: Metric = Metric {
    name: "rouse_backup_bytes_total",
    kind: Kind::Counter,
    labels: &["engine"],
    help: "Bytes written to the backup destination.",
};

pub const BACKUP_DURATION: Metric = Metric {
    name: "rouse_backup_duration_seconds",
    kind: Kind::Histogram,
    labels: &["engine", "op"],
    help: "How long backups and restores took (op: backup, restore).",
};

pub const EVICTIONS: Metric = Metric {
    name: "rouse_evictions_total",
    kind: Kind::Counter,
    labels: &["reason"],
    help: "Databases put to sleep to make room in the active set, by the limit that was reached.",
};

pub const ACTIVE_SET_WAITS: Metric = Metric {
    name: "rouse_active_set_waits_total",
    kind: Kind::Counter,
    labels: &["outcome"],
    help: "Wakes that waited for room in a full active set (outcome: room, refused).",
};

pub const EVICTION_CHURN: Metric = Metric {
    name: "rouse_eviction_churn_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Databases woken again within a minute of being put to sleep to make room.",
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
    &BACKUPS,
    &BACKUP_LAST_SUCCESS,
    &BACKUP_FAILURES,
    &BACKUP_BYTES,
    &BACKUP_DURATION,
    &EVICTIONS,
    &ACTIVE_SET_WAITS,
    &EVICTION_CHURN,
];
