//! rouse's data plane. This crate currently validates the proxy's share of
//! the configuration; the listeners follow.

use rouse_control_api::config::{Config, ConfigError};

/// Loads and checks a configuration file as the proxy would at start, and
/// returns the proxy section as the proxy would use it.
pub fn check_config(path: Option<&std::path::Path>) -> Result<serde_json::Value, ConfigError> {
    let config = Config::load(path)?;
    Ok(serde_json::json!({ "proxy": config.proxy, "redis": config.redis }))
}
