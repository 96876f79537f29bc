//! Whose fault an error is, for both daemons: what the client may be told
//! depends on it, and it is the `kind` label of the error metrics.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself: a bad name, body or statement, an unknown database.
    User,
    /// A missing or wrong credential.
    Auth,
    /// A limit the caller ran into: a rate, failed logins, an app's quota.
    RateLimit,
    /// A database did not wake in time, or too many requests wait for it.
    WakeTimeout,
    /// Not enough nodes, ports or room for another database.
    Capacity,
    /// An engine, the metadata, control or a peer failed or was unreachable.
    Backend,
    /// rouse itself.
    Internal,
}

impl ErrorKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::User => "user",
            ErrorKind::Auth => "auth",
            ErrorKind::RateLimit => "rate_limit",
            ErrorKind::WakeTimeout => "wake_timeout",
            ErrorKind::Capacity => "capacity",
            ErrorKind::Backend => "backend",
            ErrorKind::Internal => "internal",
        }
    }
}
