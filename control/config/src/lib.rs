//! The configuration file shared by `rouse-control` and `rouse-proxy`: one
//! YAML document with `node`, `database`, `discovery`, `control`, `proxy`
//! `redis`, `apps` and `backups` sections (each binary uses its own), the keys of the
//! reference `node.yaml` loading as they are. Every key can be overridden by
//! `ROUSE_<SECTION>__<KEY>` environment variables; `REDIS_URL` sets
//! `redis.url`. Unknown keys are refused with the file, line and key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod apps;
mod backups;
mod control;
mod database;
mod discovery;
pub mod duration;
mod node;
mod patroni;
mod proxy;
mod redis;

pub use apps::*;
pub use backups::*;
pub use control::*;
pub use database::*;
pub use discovery::*;
pub use node::*;
pub use patroni::*;
pub use proxy::*;
pub use redis::*;

/// `configs/local.yaml`, the default when no `--config` is given.
pub const LOCAL_CONFIG: &str = include_str!("../../../configs/local.yaml");

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub database: DatabaseConfig,
    pub discovery: DiscoveryConfig,
    pub control: ControlConfig,
    pub proxy: ProxyConfig,
    pub redis: RedisConfig,
    pub apps: crate::apps::AppsConfig,
    pub backups: BackupsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: key `{key}`: {message}")]
    File {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("environment {vars}: key `{key}`: {message}")]
    Env {
        vars: String,
        key: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

const SECTIONS: [&str; 8] = [
    "node",
    "database",
    "discovery",
    "control",
    "proxy",
    "redis",
    "apps",
    "backups",
];

impl Config {
    /// Loads `path` (or the embedded `configs/local.yaml`), then applies the
    /// process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => (
                "configs/local.yaml (embedded)".to_string(),
                LOCAL_CONFIG.to_string(),
            ),
        };
        Config::parse(&name, &text, std::env::vars())
    }

    /// Parses `text` (named `file` in errors) and applies the `ROUSE_*` and
    /// `REDIS_URL` variables among `env`.
    pub fn parse(
        file: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        let from_file: Config = serde_path_to_error::deserialize(
            serde_norway::Deserializer::from_str(text),
        )
        .map_err(|e| {
            let line = e.inner().location().map(|l| l.line()).unwrap_or(1);
            ConfigError::File {
                file: file.to_string(),
                line,
                key: e.path().to_string(),
                message: strip_location(&e.inner().to_string()),
            }
        })?;

        let overrides = env_overrides(env);
        let config = if overrides.is_empty() {
            from_file
        } else {
            let mut tree: serde_norway::Value =
                serde_norway::from_str(text).map_err(|e| ConfigError::Invalid {
                    file: file.to_string(),
                    message: e.to_string(),
                })?;
            if tree.is_null() {
                tree = serde_norway::Value::Mapping(Default::default());
            }
            for (path, value, _) in &overrides {
                set_path(&mut tree, path, value.clone());
            }
            let vars = overrides
                .iter()
                .map(|(_, _, var)| var.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            serde_path_to_error::deserialize(tree).map_err(|e| ConfigError::Env {
                vars,
                key: e.path().to_string(),
                message: strip_location(&e.inner().to_string()),
            })?
        };
        config.validate().map_err(|message| ConfigError::Invalid {
            file: file.to_string(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let d = &self.database;
        for (what, start, end) in [
            ("http", d.port_range_http_start, d.port_range_http_end),
            ("raft", d.port_range_raft_start, d.port_range_raft_end),
            (
                "postgres",
                d.port_range_postgres_start,
                d.port_range_postgres_end,
            ),
        ] {
            if start == 0 || start > end {
                return Err(format!(
                    "database.port_range_{what}_start..end ({start}..{end}) is not a range of ports"
                ));
            }
        }
        if d.replication_factor == 0 {
            return Err("database.replication_factor must be at least 1".into());
        }
        if self.control.replica_hosts.is_empty() {
            return Err("control.replica_hosts must name at least one address".into());
        }
        self.backups.validate()?;
        self.proxy.validate()
    }
}

/// serde_norway appends " at line X column Y"; the line is reported on its own.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// `(key path, value, variable name)` for every variable that names a key.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Vec<(Vec<String>, serde_norway::Value, String)> {
    let mut out = Vec::new();
    let mut redis_url = None;
    for (var, raw) in env {
        if var == "REDIS_URL" {
            redis_url = Some(raw);
            continue;
        }
        let Some(rest) = var.strip_prefix("ROUSE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        // Other ROUSE_* variables (of scripts, say) are not config keys.
        if path.len() < 2 || !SECTIONS.contains(&path[0].as_str()) {
            continue;
        }
        let value = serde_norway::from_str(&raw).unwrap_or(serde_norway::Value::String(raw));
        out.push((path, value, var));
    }
    if let Some(url) = redis_url {
        if !out.iter().any(|(p, _, _)| p == &["redis", "url"]) {
            out.push((
                vec!["redis".into(), "url".into()],
                serde_norway::Value::String(url),
                "REDIS_URL".into(),
            ));
        }
    }
    out.sort_by(|a, b| a.2.cmp(&b.2));
    out
}

fn set_path(tree: &mut serde_norway::Value, path: &[String], value: serde_norway::Value) {
    use serde_norway::Value;
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = tree;
    for key in parents {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("just made a mapping");
        node = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    if !node.is_mapping() {
        *node = Value::Mapping(Default::default());
    }
    node.as_mapping_mut()
        .expect("just made a mapping")
        .insert(Value::String(last.clone()), value);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn embedded_local_config_loads() {
        let c = Config::parse("local.yaml", LOCAL_CONFIG, no_env()).unwrap();
        assert_eq!(c.database.replication_factor, 1);
    }

    #[test]
    fn reference_node_yaml_loads_as_is() {
        let text = include_str!("../../../configs/node.yaml");
        let c = Config::parse("node.yaml", text, no_env()).unwrap();
        assert_eq!(c.database.replication_factor, 3);
        assert_eq!(c.database.hibernation_timeout, Duration::from_secs(60));
        assert_eq!(c.database.port_range_raft_end, 7999);
        assert_eq!(c.discovery.health_check_interval, Duration::from_secs(10));
        assert_eq!(c.node.max_connections, 50);
    }

    #[test]
    fn sidecar_example_loads() {
        let text = include_str!("../../../configs/sidecar.yaml");
        let c = Config::parse("sidecar.yaml", text, no_env()).unwrap();
        assert_eq!(c.proxy.response_cache[0].ttl, Duration::from_secs(5));
        assert_eq!(
            c.proxy.rate_limits.postgres.per_app.as_ref().unwrap().burst,
            20
        );
        assert!(c.redis.fail_open);
        let bad = "proxy:\n  admin_users: [ops]\n";
        let err = Config::parse("c.yaml", bad, no_env()).unwrap_err();
        assert!(
            err.to_string().contains("not a login <user>.<app>"),
            "{err}"
        );
        let bad = "proxy:\n  rate_limits:\n    http: {per_app: {rate: 0, burst: 1}}\n";
        let err = Config::parse("c.yaml", bad, no_env()).unwrap_err();
        assert!(err.to_string().contains("rate must be above zero"), "{err}");
    }

    #[test]
    fn patroni_example_loads_and_listeners_must_name_a_cluster() {
        let text = include_str!("../../../configs/patroni.yaml");
        let c = Config::parse("patroni.yaml", text, no_env()).unwrap();
        assert_eq!(c.proxy.patroni_clusters[0].members.len(), 3);
        assert_eq!(c.proxy.tcp_listeners[1].role, MemberRole::Replica);
        assert_eq!(c.proxy.patroni.fall, 3);

        let stray = "proxy:\n  tcp_listeners:\n    - {addr: \"127.0.0.1:5000\", cluster: nope, role: primary}\n";
        let err = Config::parse("c.yaml", stray, no_env()).unwrap_err();
        assert!(err.to_string().contains("cluster nope"), "{err}");
        let empty = "proxy:\n  patroni_clusters:\n    - {name: a, members: []}\n";
        let err = Config::parse("c.yaml", empty, no_env()).unwrap_err();
        assert!(err.to_string().contains("has no members"), "{err}");
        let by_scope = "proxy:\n  patroni_clusters:\n    - {name: a, discovery: {etcd: [\"http://127.0.0.1:2379\"], scope: pillar, namespace: /db/}}\n";
        let c = Config::parse("c.yaml", by_scope, no_env()).unwrap();
        let d = c.proxy.patroni_clusters[0].discovery.as_ref().unwrap();
        assert_eq!(d.members_prefix().unwrap(), "/db/pillar/members/");
        let sneaky = by_scope.replace("scope: pillar", "scope: a/../b");
        let err = Config::parse("c.yaml", &sneaky, no_env()).unwrap_err();
        assert!(err.to_string().contains("invalid Patroni scope"), "{err}");
        let nowhere = by_scope.replace("\"http://127.0.0.1:2379\"", "");
        let err = Config::parse("c.yaml", &nowhere, no_env()).unwrap_err();
        assert!(err.to_string().contains("no etcd endpoint"), "{err}");
        let bad_role = "proxy:\n  patroni_clusters:\n    - {name: a, members: []}\n  tcp_listeners:\n    - {addr: \"127.0.0.1:5000\", cluster: a, role: leader}\n";
        let err = Config::parse("c.yaml", bad_role, no_env()).unwrap_err();
        assert!(err.to_string().contains("role"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "node:\n  data_dir: /tmp/x\ndatabase:\n  replication_factor: 1\n  hibernate_after: 5s\n";
        let err = Config::parse("c.yaml", text, no_env()).unwrap_err();
        match &err {
            ConfigError::File {
                file,
                line,
                key,
                message,
            } => {
                assert_eq!(file, "c.yaml");
                assert_eq!(*line, 5);
                assert!(key.contains("hibernate_after"), "{key}");
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("c.yaml:5: key `database.hibernate_after`"),
            "{err}"
        );
    }

    #[test]
    fn bad_value_names_its_key() {
        let text = "database:\n  hibernation_timeout: soon\n";
        let err = Config::parse("c.yaml", text, no_env())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.yaml:2") && err.contains("database.hibernation_timeout"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![
            (
                "ROUSE_DATABASE__HIBERNATION_TIMEOUT".to_string(),
                "5s".to_string(),
            ),
            (
                "ROUSE_CONTROL__API_ADDR".to_string(),
                "127.0.0.1:18001".to_string(),
            ),
            ("ROUSE_DEPS_DIR".to_string(), "/opt/x".to_string()),
            (
                "REDIS_URL".to_string(),
                "redis://127.0.0.1:6379/0".to_string(),
            ),
        ];
        let c = Config::parse("local.yaml", LOCAL_CONFIG, env).unwrap();
        assert_eq!(c.database.hibernation_timeout, Duration::from_secs(5));
        assert_eq!(c.control.api_addr.port(), 18001);
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6379/0"));

        let bad = vec![("ROUSE_DATABASE__TYPO".to_string(), "1".to_string())];
        let err = Config::parse("local.yaml", LOCAL_CONFIG, bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ROUSE_DATABASE__TYPO") && err.contains("typo"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = Config::parse("empty.yaml", "# nothing\n", no_env()).unwrap();
        assert_eq!(c.control.api_addr.port(), 8001);
        assert_eq!(c.proxy.max_waiting, 10_000);
    }

    #[test]
    fn inverted_port_range_is_refused() {
        let text = "database:\n  port_range_http_start: 6000\n  port_range_http_end: 5000\n";
        assert!(matches!(
            Config::parse("c.yaml", text, no_env()),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
