//! Every metric the proxy records, declared once (see
//! [`rouse_runtime::metric`]); the shared ones (client connections, wake
//! durations, app limit refusals) are declared there.

use rouse_runtime::metric::{Kind, Metric};

pub const REQUESTS: Metric = Metric {
    name: "rouse_requests_total",
    kind: Kind::Counter,
    labels: &["app", "db", "protocol", "outcome"],
    help: "Requests (HTTP), sessions (postgres) and connections (tcp, redis) served or refused, by outcome: ok or the error kind.",
};

pub const REQUEST_DURATION: Metric = Metric {
    name: "rouse_request_duration_seconds",
    kind: Kind::Histogram,
    labels: &["protocol", "outcome"],
    help: "Time from an HTTP request's arrival to its answer, waking included.",
};

pub const WAITING_REQUESTS: Metric = Metric {
    name: "rouse_waiting_requests",
    kind: Kind::Gauge,
    labels: &["db"],
    help: "Requests held while their database wakes.",
};

pub const STALE_ROUTE_RETRIES: Metric = Metric {
    name: "rouse_stale_route_retries_total",
    kind: Kind::Counter,
    labels: &["protocol"],
    help: "Connections that failed on a cached route and were tried again after resolving it anew.",
};

pub const BACKEND_UP: Metric = Metric {
    name: "rouse_backend_up",
    kind: Kind::Gauge,
    labels: &["cluster", "member", "role"],
    help: "1 when a Patroni member (or the Redis master) passes its checks for a role, else 0.",
};

pub const AUTH_VALIDATIONS: Metric = Metric {
    name: "rouse_auth_validations_total",
    kind: Kind::Counter,
    labels: &["source"],
    help: "Credentials checked, by where the answer came from: control, a token's own signature, or a session cached in Redis.",
};

pub const FAILED_LOGIN_REFUSALS: Metric = Metric {
    name: "rouse_failed_login_refusals_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Logins refused because their address failed too many (proxy.failed_login_limit).",
};

pub const RATE_LIMITED: Metric = Metric {
    name: "rouse_rate_limited_total",
    kind: Kind::Counter,
    labels: &["app", "protocol"],
    help: "Requests refused by proxy.rate_limits.",
};

pub const CACHE: Metric = Metric {
    name: "rouse_cache_total",
    kind: Kind::Counter,
    labels: &["db", "result"],
    help: "Response cache lookups, by hit or miss.",
};

pub const REDIS_FALLBACK: Metric = Metric {
    name: "rouse_redis_fallback_total",
    kind: Kind::Counter,
    labels: &["what"],
    help: "Calls to the shared Redis that failed, so the proxy went on alone (or refused, with redis.fail_open false).",
};

pub const REDIS_TAMPERED: Metric = Metric {
    name: "rouse_redis_tampered_total",
    kind: Kind::Counter,
    labels: &["what"],
    help: "Entries in the shared Redis that the fleet did not write (their seal did not open), ignored.",
};

pub const ENGINE_LOGIN_REFUSALS: Metric = Metric {
    name: "rouse_engine_login_refusals_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Engines that refused a database's login: a route to another database's engine, never served.",
};

pub const UPGRADE_REFUSALS: Metric = Metric {
    name: "rouse_upgrade_refusals_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Connections to the upgrade socket from another user, refused.",
};

pub const CONFIG_RELOADS: Metric = Metric {
    name: "rouse_config_reloads_total",
    kind: Kind::Counter,
    labels: &["result"],
    help: "Configuration reloads (SIGHUP), applied or refused.",
};

pub const PARKED_CLIENTS: Metric = Metric {
    name: "rouse_parked_clients",
    kind: Kind::Gauge,
    labels: &[],
    help: "PostgreSQL clients idle long enough to be parked outside the runtime (a part of rouse_client_connections{protocol=\"postgres\"}).",
};

pub const CATALOGUE: &[&Metric] = &[
    &REQUESTS,
    &REQUEST_DURATION,
    &WAITING_REQUESTS,
    &STALE_ROUTE_RETRIES,
    &BACKEND_UP,
    &AUTH_VALIDATIONS,
    &FAILED_LOGIN_REFUSALS,
    &RATE_LIMITED,
    &CACHE,
    &REDIS_FALLBACK,
    &REDIS_TAMPERED,
    &ENGINE_LOGIN_REFUSALS,
    &UPGRADE_REFUSALS,
    &CONFIG_RELOADS,
    &PARKED_CLIENTS,
];
