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
    /// `proxy.control_token`: the control's proxy token.
    control_token: String,
    lines: Vec<String>,
    auth: Vec<String>,
    statics: Vec<(String, String)>,
    clusters: Vec<String>,
    /// Top-level sections after `proxy:`, as YAML text.
    sections: Vec<String>,
    tcp: Vec<(String, String)>,
    redis_backend: Option<String>,
    env: Vec<(String, String)>,
}

impl ProxyBuilder {
    /// A `proxy:` key with its YAML value, e.g. `("wake_timeout", "2s")`.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.lines.push(format!("  {key}: {value}"));
        self
    }

    /// An environment variable of the proxy process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A Patroni cluster found in etcd at `etcd` (client URLs) by its
    /// scope; `None` leaves the scope to `PATRONI_SCOPE`.
    pub fn patroni_discovered(mut self, name: &str, etcd: &[String], scope: Option<&str>) -> Self {
        let mut discovery = serde_json::json!({"etcd": etcd});
        if let Some(scope) = scope {
            discovery["scope"] = scope.into();
        }
        self.clusters
            .push(serde_json::json!({"name": name, "discovery": discovery}).to_string());
        self
    }

    /// Where the proxy reaches control (by default the control's API).
    pub fn control_url(mut self, url: &str) -> Self {
        self.control_url = url.to_string();
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

    /// A Patroni cluster the proxy follows: (name, PostgreSQL address, REST API URL) per member.
    pub fn patroni_cluster(mut self, name: &str, members: &[(String, SocketAddr, String)]) -> Self {
        let members: Vec<serde_json::Value> = members
            .iter()
            .map(|(n, addr, api)| serde_json::json!({"name": n, "addr": addr.to_string(), "api": api}))
            .collect();
        self.clusters
            .push(serde_json::json!({"name": name, "members": members}).to_string());
        self
    }

    /// Shared state in the Redis at `url` (`redis:` section), with more
    /// `redis.*` keys as YAML lines such as `fail_open: false`. Proxies
    /// given the same URL share one `redis.secret` unless a line sets it.
    pub fn redis_url(mut self, url: &str, more: &[&str]) -> Self {
        let mut section = format!("redis:\n  url: {}\n", serde_json::Value::from(url));
        // Proxies of one Redis are one fleet: they share its secret.
        if !more.iter().any(|l| l.starts_with("secret:")) {
            let secret = serde_json::Value::from(format!("fleet secret of {url}"));
            section.push_str(&format!("  secret: {secret}\n"));
        }
        for line in more {
            section.push_str(&format!("  {line}\n"));
        }
        self.sections.push(section);
        self
    }

    /// A top-level section as YAML text, e.g. `"apps:\n  default: {max_waiting: 5}\n"`.
    pub fn section(mut self, yaml: &str) -> Self {
        self.sections.push(yaml.to_string());
        self
    }

    /// A plain TCP listener to a cluster's `primary` or `replica` members.
    pub fn tcp_listener(mut self, cluster: &str, role: &str) -> Self {
        self.tcp.push((cluster.into(), role.into()));
        self
    }

    /// The Redis front, to the backend this YAML value describes, e.g.
    /// `{sentinels: [127.0.0.1:26379], master_name: mymaster}`.
    pub fn redis_backend(mut self, yaml_value: &str) -> Self {
        self.redis_backend = Some(yaml_value.into());
        self
    }

    /// Starts the proxy and waits until it answers. Its ports are found
    /// free just before it binds them, and a test running beside this one
    /// may take one in between: a start that fails is tried again on other
    /// ports (a fault of the proxy itself fails every attempt).
    pub async fn start(self) -> Result<Proxy> {
        let mut failed = Vec::new();
        for _ in 0..3 {
            match self.start_once().await {
                Ok(proxy) => return Ok(proxy),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        anyhow::bail!("rouse-proxy did not start: {}", failed.join("; then: "))
    }

    async fn start_once(&self) -> Result<Proxy> {
        let dir = temp_dir("rouse-proxy-")?;
        let http = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let stats = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let postgres = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let postgres_ro = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let loopback = |_| SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let statics: Vec<SocketAddr> = self.statics.iter().map(loopback).collect();
        let tcp: Vec<SocketAddr> = self.tcp.iter().map(loopback).collect();
        let redis = self
            .redis_backend
            .as_ref()
            .map(|_| SocketAddr::new(LOCALHOST, free_port(LOCALHOST)));
        let mut yaml = format!(
            "proxy:\n  control_url: {}\n  control_token: {}\n  http_addr: {http}\n  postgres_addr: {postgres}\n  postgres_ro_addr: {postgres_ro}\n  stats_addr: {stats}\n  base_domain: localhost\n  upgrade_socket: {}\n",
            serde_json::Value::from(self.control_url.as_str()),
            serde_json::Value::from(self.control_token.as_str()),
            serde_json::Value::from(dir.path().join("upgrade.sock").to_string_lossy().as_ref())
        );
        for line in &self.lines {
            yaml.push_str(line);
            yaml.push('\n');
        }
        if let (Some(backend), Some(addr)) = (&self.redis_backend, redis) {
            yaml.push_str(&format!(
                "  redis_addr: {addr}\n  redis_backend: {backend}\n"
            ));
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
        if !self.clusters.is_empty() {
            yaml.push_str("  patroni_clusters:\n");
            for c in &self.clusters {
                yaml.push_str(&format!("    - {c}\n"));
            }
        }
        if !tcp.is_empty() {
            yaml.push_str("  tcp_listeners:\n");
            for ((cluster, role), addr) in self.tcp.iter().zip(&tcp) {
                yaml.push_str(&format!(
                    "    - {{addr: {addr}, cluster: {cluster}, role: {role}}}\n"
                ));
            }
        }
        for section in &self.sections {
            yaml.push_str(section);
        }
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut cmd = Command::new(workspace_bin("ROUSE_PROXY_BIN", "rouse-proxy")?);
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut process = ServerProcess::spawn("rouse-proxy", cmd, &dir.path().join("proxy.log"))?;
        let healthz = format!("http://{stats}/healthz");
        process
            .wait_ready(START_TIMEOUT, || get_ok(&healthz))
            .await?;
        Ok(Proxy {
            process,
            replaced: Vec::new(),
            http,
            postgres,
            postgres_ro,
            stats,
            statics,
            tcp,
            redis,
            dir,
        })
    }
}

/// A running `rouse-proxy`; dropping it kills it.
pub struct Proxy {
    process: ServerProcess,
    /// Processes replaced by an upgrade, draining.
    replaced: Vec<ServerProcess>,
    http: SocketAddr,
    postgres: SocketAddr,
    postgres_ro: SocketAddr,
    stats: SocketAddr,
    statics: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    redis: Option<SocketAddr>,
    dir: TempDir,
}

impl Proxy {
    pub fn builder(control: &Control) -> ProxyBuilder {
        ProxyBuilder {
            control_url: control.api_url(),
            control_token: control.proxy_token(),
            lines: control
                .api_ca()
                .map(|ca| {
                    let ca = serde_json::Value::from(ca.to_string_lossy().as_ref());
                    format!("  control_ca_file: {ca}")
                })
                .into_iter()
                .collect(),
            auth: Vec::new(),
            statics: Vec::new(),
            clusters: Vec::new(),
            sections: Vec::new(),
            tcp: Vec::new(),
            redis_backend: None,
            env: Vec::new(),
        }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The certificate the proxy made at first start when none is
    /// configured (its `node.data_dir` is `./data`, in its directory).
    pub fn self_signed_certificate(&self) -> std::path::PathBuf {
        self.dir.path().join("data/proxy-tls/proxy.crt")
    }

    /// The PostgreSQL front.
    pub fn postgres_addr(&self) -> SocketAddr {
        self.postgres
    }

    /// The read-only PostgreSQL front.
    pub fn postgres_ro_addr(&self) -> SocketAddr {
        self.postgres_ro
    }

    /// Address of the `i`-th plain TCP listener.
    pub fn tcp_addr(&self, i: usize) -> SocketAddr {
        self.tcp[i]
    }

    /// The Redis front; panics unless the builder set a Redis backend.
    pub fn redis_addr(&self) -> SocketAddr {
        self.redis.expect("the proxy has no redis_backend")
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Address of the `i`-th static listener.
    pub fn static_addr(&self, i: usize) -> SocketAddr {
        self.statics[i]
    }

    /// The stats address (`/metrics`, `/healthz`).
    pub fn stats_addr(&self) -> SocketAddr {
        self.stats
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

    /// Starts `rouse-proxy serve --upgrade` on the same configuration: the
    /// new process takes over the listening sockets and the current one
    /// drains (see [`Proxy::replaced_exited`]).
    pub fn upgrade(&mut self) -> Result<()> {
        let mut cmd = Command::new(workspace_bin("ROUSE_PROXY_BIN", "rouse-proxy")?);
        cmd.arg("--config")
            .arg(self.dir.path().join("proxy.yaml"))
            .args(["serve", "--upgrade"])
            .current_dir(self.dir.path());
        let log = self
            .dir
            .path()
            .join(format!("proxy-{}.log", self.replaced.len() + 1));
        let new = ServerProcess::spawn("rouse-proxy", cmd, &log)?;
        self.replaced
            .push(std::mem::replace(&mut self.process, new));
        Ok(())
    }

    /// Whether every process replaced by an upgrade has exited.
    pub fn replaced_exited(&mut self) -> bool {
        self.replaced.iter_mut().all(ServerProcess::has_exited)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
