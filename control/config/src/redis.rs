//! Redis: the shared state of the proxies (`redis:`), and the Redis servers
//! behind the proxy's Redis front (`proxy.redis_backend`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Shared state; absent means in-process only.
    pub url: Option<String>,
    /// When Redis does not answer: go on with in-process sessions and
    /// limits (true), or refuse what needs Redis (false).
    pub fail_open: bool,
    /// A Redis call that has not answered within this time failed.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Authenticates what the proxies store in Redis (at least 16
    /// characters); `<data_dir>/redis.secret` when unset. Never printed.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            fail_open: true,
            timeout: Duration::from_millis(250),
            secret: None,
        }
    }
}

/// Where the Redis front finds the current master: through Sentinel, or by
/// asking each of a static list of servers for its role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBackend {
    /// Sentinels (`host:port`) to ask `SENTINEL get-master-addr-by-name`.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The master's name among the sentinels.
    #[serde(default)]
    pub master_name: Option<String>,
    /// Without sentinels: the servers (`host:port`) whose `ROLE` decides.
    #[serde(default)]
    pub servers: Vec<String>,
    /// AUTH towards the Redis servers (the proxy's own checks).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// AUTH towards the sentinels.
    #[serde(default)]
    pub sentinel_password: Option<String>,
    /// TLS towards the Redis servers, verified against this PEM CA file.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default = "default_redis_check_interval", with = "crate::duration")]
    pub check_interval: Duration,
}

fn default_redis_check_interval() -> Duration {
    Duration::from_secs(1)
}
