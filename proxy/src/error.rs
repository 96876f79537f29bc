//! Errors of the data plane. Each knows what the client may see (status,
//! code, message) and its kind, which is also the `outcome` label of
//! `rouse_requests_total`.

use std::time::Duration;

use hyper::StatusCode;
use rouse_runtime::error_kind::ErrorKind;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// Unknown database, or another app's: the same answer for both.
    #[error("database not found")]
    NotFound,
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body over {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request body not received within {0:?}")]
    SlowBody(Duration),
    #[error("database {db} did not wake within {waited:?}")]
    WakeTimeout { db: String, waited: Duration },
    #[error("too many requests waiting for database {0} to wake")]
    QueueFull(String),
    /// Control would not wake it: its node runs as many databases as it
    /// may, all in use.
    #[error("database {0} cannot wake now: its node's active set is full of databases in use (database.max_active_databases / max_active_memory), try again")]
    ActiveSetFull(String),
    /// A statement the database refused.
    #[error("{0}")]
    Sql(String),
    /// A statement PostgreSQL refused: its words and SQLSTATE, with the
    /// detail and hint it gave.
    #[error("{message}")]
    Postgres {
        message: String,
        sqlstate: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// A statement the proxy refuses to pass on (it names a file or loads code).
    #[error("statement refused: {0}")]
    ForbiddenStatement(#[from] crate::sql::Forbidden),
    #[error("database {0} did not answer in time")]
    UpstreamTimeout(String),
    #[error("database {db} unavailable: {reason}")]
    Backend { db: String, reason: String },
    #[error("control unavailable: {0}")]
    Control(String),
    #[error("rate limit exceeded: retry in {0:?}")]
    RateLimited(Duration),
    #[error("too many failed logins from this address: retry in {0:?}")]
    FailedLogins(Duration),
    /// One of the app's limits (`apps:`), named.
    #[error("app {app} is at its limit {limit}")]
    AppLimit { app: String, limit: String },
    /// Redis is down and `redis.fail_open` is off.
    #[error("shared state unavailable")]
    SharedState,
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::NotFound | ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_)
            | ProxyError::Sql(_)
            | ProxyError::Postgres { .. }
            | ProxyError::ForbiddenStatement(_) => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::WakeTimeout { .. }
            | ProxyError::QueueFull(_)
            | ProxyError::ActiveSetFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Backend { .. } | ProxyError::Control(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RateLimited(_)
            | ProxyError::FailedLogins(_)
            | ProxyError::AppLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::SharedState => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::NotFound => "not_found",
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::PayloadTooLarge(_) => "body_too_large",
            ProxyError::SlowBody(_) => "request_timeout",
            ProxyError::WakeTimeout { .. } => "wake_timeout",
            ProxyError::QueueFull(_) => "wake_queue_full",
            ProxyError::ActiveSetFull(_) => "active_set_full",
            ProxyError::Sql(_) | ProxyError::Postgres { .. } => "sql_error",
            ProxyError::ForbiddenStatement(_) => "forbidden_statement",
            ProxyError::UpstreamTimeout(_) => "timeout",
            ProxyError::Backend { .. } => "backend_unavailable",
            ProxyError::Control(_) => "control_unavailable",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::FailedLogins(_) => "too_many_failed_logins",
            ProxyError::AppLimit { .. } => "app_limit",
            ProxyError::SharedState => "shared_state_unavailable",
        }
    }

    /// Whose fault it is; its label is the `outcome` of the request metrics.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::Unauthorized => ErrorKind::Auth,
            ProxyError::NotFound
            | ProxyError::NoRoute(_)
            | ProxyError::BadRequest(_)
            | ProxyError::PayloadTooLarge(_)
            | ProxyError::SlowBody(_)
            | ProxyError::Sql(_)
            | ProxyError::Postgres { .. }
            | ProxyError::ForbiddenStatement(_) => ErrorKind::User,
            ProxyError::WakeTimeout { .. } | ProxyError::QueueFull(_) => ErrorKind::WakeTimeout,
            ProxyError::ActiveSetFull(_) => ErrorKind::Capacity,
            ProxyError::UpstreamTimeout(_)
            | ProxyError::Backend { .. }
            | ProxyError::Control(_)
            | ProxyError::SharedState => ErrorKind::Backend,
            ProxyError::RateLimited(_)
            | ProxyError::FailedLogins(_)
            | ProxyError::AppLimit { .. } => ErrorKind::RateLimit,
        }
    }

    /// What the client is told: a backend's or control's own words (which
    /// may name hosts, paths or other tenants) stay in the log.
    pub(crate) fn client_message(&self) -> String {
        match self {
            ProxyError::Backend { db, .. } => format!("database {db} is unavailable, try again"),
            ProxyError::Control(_) => "the proxy cannot reach control, try again".into(),
            other => other.to_string(),
        }
    }

    /// Seconds a client should wait before retrying, where that helps.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::WakeTimeout { .. }
            | ProxyError::QueueFull(_)
            | ProxyError::ActiveSetFull(_)
            | ProxyError::AppLimit { .. } => Some(1),
            ProxyError::Backend { .. } | ProxyError::Control(_) | ProxyError::SharedState => {
                Some(1)
            }
            ProxyError::RateLimited(wait) | ProxyError::FailedLogins(wait) => {
                Some(wait.as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => None,
        }
    }
}

impl From<crate::sql::BodyError> for ProxyError {
    fn from(e: crate::sql::BodyError) -> Self {
        match e {
            crate::sql::BodyError::Forbidden(f) => ProxyError::ForbiddenStatement(f),
            crate::sql::BodyError::Malformed(m) => ProxyError::BadRequest(m),
        }
    }
}

pub(crate) type Result<T, E = ProxyError> = std::result::Result<T, E>;
