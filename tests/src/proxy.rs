//! The real `rouse-proxy`, in front of a [`Control`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::control::workspace_bin;
use crate::process::ServerProcess;
use crate::{free_port, get_ok, temp_dir, Control, LOCALHOST};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of a [`Proxy`]; unset ones are the defaults of DESIGN.md.
pub struct ProxyBuilder {
    control_url: String,
    lines: Vec<String>,
    auth: Vec<String>,
    statics: Vec<(String, String)>,
}

impl ProxyBuilder {
    /// A `proxy:` key with its YAML value, e.g. `("wake_timeout", "2s")`.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.lines.push(format!("  {key}: {value}"));
        self
    }

    /// A `proxy.auth:` key, e.g. `("jwt_hs256_secret", "s3cret")`.
    pub fn auth(mut self, key: &str, value: &str) -> Self {
        self.auth
            .push(format!("    {key}: {}", serde_json::Value::from(value)));
        self
    }

    /// A static listener bound to one database (sidecar mode).
    pub fn static_listener(mut self, app: &str, db: &str) -> Self {
        self.statics.push((app.into(), db.into()));
        self
    }

    pub async fn start(self) -> Result<Proxy> {
        let dir = temp_dir("rouse-proxy-")?;
        let http = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let stats = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let postgres = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let statics: Vec<SocketAddr> = self
            .statics
            .iter()
            .map(|_| SocketAddr::new(LOCALHOST, free_port(LOCALHOST)))
            .collect();
        let mut yaml = format!(
            "proxy:\n  control_url: {}\n  http_addr: {http}\n  postgres_addr: {postgres}\n  stats_addr: {stats}\n  base_domain: localhost\n",
            serde_json::Value::from(self.control_url.as_str())
        );
        for line in &self.lines {
            yaml.push_str(line);
            yaml.push('\n');
        }
        if !self.auth.is_empty() {
            yaml.push_str("  auth:\n");
            for line in &self.auth {
                yaml.push_str(line);
                yaml.push('\n');
            }
        }
        if !statics.is_empty() {
            yaml.push_str("  static_listeners:\n");
            for ((app, db), addr) in self.statics.iter().zip(&statics) {
                yaml.push_str(&format!(
                    "    - {{addr: {addr}, app: {app}, database: {db}}}\n"
                ));
            }
        }
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut cmd = Command::new(workspace_bin("ROUSE_PROXY_BIN", "rouse-proxy")?);
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(dir.path());
        let mut process = ServerProcess::spawn("rouse-proxy", cmd, &dir.path().join("proxy.log"))?;
        let healthz = format!("http://{stats}/healthz");
        process
            .wait_ready(START_TIMEOUT, || get_ok(&healthz))
            .await?;
        Ok(Proxy {
            process,
            http,
            postgres,
            stats,
            statics,
            dir,
        })
    }
}

/// A running `rouse-proxy`; dropping it kills it.
pub struct Proxy {
    process: ServerProcess,
    http: SocketAddr,
    postgres: SocketAddr,
    stats: SocketAddr,
    statics: Vec<SocketAddr>,
    dir: TempDir,
}

impl Proxy {
    pub fn builder(control: &Control) -> ProxyBuilder {
        ProxyBuilder {
            control_url: control.api_url(),
            lines: Vec::new(),
            auth: Vec::new(),
            statics: Vec::new(),
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The PostgreSQL front.
    pub fn postgres_addr(&self) -> SocketAddr {
        self.postgres
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Address of the `i`-th static listener.
    pub fn static_addr(&self, i: usize) -> SocketAddr {
        self.statics[i]
    }

    /// The Prometheus text at the stats address.
    pub async fn metrics(&self) -> Result<String> {
        Ok(crate::http_client()
            .get(format!("http://{}/metrics", self.stats))
            .send()
            .await?
            .text()
            .await?)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
