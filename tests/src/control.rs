//! The real `rouse-control` daemon, configured through a YAML file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{free_port, get_ok, pids_mentioning, temp_dir, LOCALHOST};

/// Control may set up its metadata store before it answers `/healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Time for control to stop its databases after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports per range when the test does not choose them.
const WINDOW: u16 = 200;

/// Settings of a [`Control`]; unset ones are those of `configs/local.yaml`.
#[derive(Debug, Clone)]
pub struct ControlBuilder {
    replication_factor: u32,
    hibernation_timeout: String,
    max_databases: u32,
    /// http, raft and postgres port ranges, inclusive.
    port_ranges: Option<[(u16, u16); 3]>,
    data_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// The node's own loopback address (API, libp2p, replicas); unset, the
    /// API and libp2p use 127.0.0.1 and replicas 127.0.0.1-3.
    host: Option<IpAddr>,
    bootstrap_peers: Vec<String>,
    health_check_interval: Option<String>,
    discovery_interval: Option<String>,
    /// Runs inside this network namespace (see [`crate::Network`]).
    netns: Option<String>,
    /// Where the admin and proxy tokens are: the founding node's
    /// `<data_dir>/tokens` (by default this node's own).
    tokens: Option<PathBuf>,
    /// The CA of the control API's certificate, when it speaks TLS.
    api_ca: Option<PathBuf>,
}

impl Default for ControlBuilder {
    fn default() -> Self {
        ControlBuilder {
            replication_factor: 1,
            hibernation_timeout: "60s".into(),
            max_databases: 100,
            port_ranges: None,
            data_dir: None,
            env: Vec::new(),
            host: None,
            bootstrap_peers: Vec::new(),
            health_check_interval: None,
            discovery_interval: None,
            netns: None,
            tokens: None,
            api_ca: None,
        }
    }
}

impl ControlBuilder {
    pub fn replication_factor(mut self, n: u32) -> Self {
        self.replication_factor = n;
        self
    }

    /// A duration as the config file spells it: `"2s"`, `"500ms"`, `"0"` (never).
    pub fn hibernation_timeout(mut self, timeout: &str) -> Self {
        self.hibernation_timeout = timeout.into();
        self
    }

    pub fn max_databases(mut self, n: u32) -> Self {
        self.max_databases = n;
        self
    }

    /// Inclusive `(start, end)` ranges of the engines' ports. By default each
    /// control gets random 200-port windows in 11000-17999 (http),
    /// 18000-24999 (raft) and 25000-31999 (postgres), so that tests running
    /// in parallel rarely compete for ports, and never with the ports the
    /// harness and the OS pick from the ephemeral range (32768 and up).
    pub fn port_ranges(mut self, http: (u16, u16), raft: (u16, u16), postgres: (u16, u16)) -> Self {
        self.port_ranges = Some([http, raft, postgres]);
        self
    }

    /// Uses an existing data directory, e.g. one a previous control left,
    /// instead of a fresh temporary one. It outlives the control.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// An environment variable of the daemon, e.g. `RUST_LOG` or a
    /// `ROUSE_<SECTION>__<KEY>` override.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The node's address, e.g. 127.0.0.2, so that several nodes on one
    /// machine are distinct hosts: the API and libp2p listen there (on free
    /// ports) and it is the node's only replica host.
    pub fn host(mut self, host: IpAddr) -> Self {
        self.host = Some(host);
        self
    }

    /// `discovery.cluster_secret_file`: the cluster key of the founding node
    /// (its `<data_dir>/cluster.key`), which a joining node needs.
    pub fn cluster_key(self, path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_string_lossy().into_owned();
        self.env("ROUSE_DISCOVERY__CLUSTER_SECRET_FILE", path)
    }

    /// TLS on the control API (`control.tls`) with these files; clients of
    /// the harness trust their CA.
    pub fn api_tls(mut self, files: crate::TlsFiles) -> Self {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        self.env
            .push(("ROUSE_CONTROL__TLS__CERT_FILE".into(), path(&files.cert)));
        self.env
            .push(("ROUSE_CONTROL__TLS__KEY_FILE".into(), path(&files.key)));
        self.api_ca = Some(files.ca);
        self
    }

    /// Where the founding node wrote its tokens (`<data_dir>/tokens`), for a
    /// node that joins its cluster: tokens are valid on every node.
    pub fn tokens_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tokens = Some(dir.into());
        self
    }

    /// `discovery.bootstrap_peers`: multiaddrs, with or without `/p2p/<peer id>`.
    pub fn bootstrap_peers<S: Into<String>>(mut self, peers: impl IntoIterator<Item = S>) -> Self {
        self.bootstrap_peers = peers.into_iter().map(Into::into).collect();
        self
    }

    /// Runs the daemon (and so its engines) inside network namespace `name`
    /// on `host`, its address there. Every port is free in a namespace of
    /// its own, so the API listens on 8001 and libp2p on 4001.
    pub fn netns(mut self, name: &str, host: IpAddr) -> Self {
        self.netns = Some(name.into());
        self.host = Some(host);
        self
    }

    /// `discovery.health_check_interval` and `discovery.discovery_interval`,
    /// as the config file spells durations (`"200ms"`).
    pub fn discovery_intervals(mut self, health_check: &str, discovery: &str) -> Self {
        self.health_check_interval = Some(health_check.into());
        self.discovery_interval = Some(discovery.into());
        self
    }

    /// Writes the config, starts `rouse-control --config <file> serve` and
    /// waits until `/healthz` answers.
    pub async fn start(self) -> Result<Control> {
        let bin = control_bin()?;
        let dir = temp_dir("rouse-control-")?;
        // Absolute: control runs from its temporary directory, not ours.
        let data_dir = match &self.data_dir {
            Some(data_dir) => std::path::absolute(data_dir)?,
            None => dir.path().join("data"),
        };
        let host = self.host.unwrap_or(LOCALHOST);
        let api_addr = SocketAddr::new(host, self.port(host, 8001));
        let config = dir.path().join("control.yaml");
        std::fs::write(&config, self.config_yaml(&data_dir, api_addr))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let launch = Launch {
            bin,
            config,
            log: dir.path().join("control.log"),
            env: self.env,
            netns: self.netns,
        };
        let mut process = launch.spawn()?;
        let scheme = if self.api_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let api_url = format!("{scheme}://{api_addr}");
        wait_healthy(&mut process, &api_url, self.api_ca.as_deref()).await?;
        let tokens = self
            .tokens
            .unwrap_or_else(|| data_dir.join(rouse_control_api::access::TOKENS_DIR));
        let control = Control {
            process,
            launch,
            api_url,
            api_ca: self.api_ca,
            data_dir,
            tokens,
            dir,
        };
        ADMIN_TOKENS
            .lock()
            .expect("admin tokens poisoned")
            .push(control.admin_token());
        let ca = control.client().engine_ca().await?.pem;
        let mut cas = ENGINE_CAS.lock().expect("engine CAs poisoned");
        if !cas.contains(&ca) {
            cas.push_str(&ca);
        }
        drop(cas);
        Ok(control)
    }

    /// A free port on `host`; `fixed` in a namespace of the daemon's own.
    fn port(&self, host: IpAddr, fixed: u16) -> u16 {
        match self.netns {
            Some(_) => fixed,
            None => free_port(host),
        }
    }

    fn config_yaml(&self, data_dir: &Path, api_addr: SocketAddr) -> String {
        let [(http_start, http_end), (raft_start, raft_end), (pg_start, pg_end)] = self
            .port_ranges
            .unwrap_or_else(|| [window(11_000), window(18_000), window(25_000)]);
        // JSON strings are valid YAML and quote whatever a path holds.
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        let data_dir = quote(&data_dir.to_string_lossy());
        let hibernation_timeout = quote(&self.hibernation_timeout);
        let replication_factor = self.replication_factor;
        let max_databases = self.max_databases;
        // The default libp2p port 4001 would be shared by parallel tests.
        let p2p_host = self.host.unwrap_or(LOCALHOST);
        // A single node binds whatever port is free when it starts (no race
        // with other tests between choosing and binding); a node of a
        // cluster keeps one port across restarts, for its peers to dial.
        let p2p_port = match self.host {
            Some(_) => self.port(p2p_host, 4001),
            None => 0,
        };
        let replica_hosts = match self.host {
            Some(host) => format!("  replica_hosts: [\"{host}\"]\n"),
            None => String::new(),
        };
        let mut discovery = String::new();
        if !self.bootstrap_peers.is_empty() {
            discovery.push_str("  bootstrap_peers:\n");
            for peer in &self.bootstrap_peers {
                discovery.push_str(&format!("    - {}\n", quote(peer)));
            }
        }
        if let Some(interval) = &self.health_check_interval {
            discovery.push_str(&format!("  health_check_interval: {}\n", quote(interval)));
        }
        if let Some(interval) = &self.discovery_interval {
            discovery.push_str(&format!("  discovery_interval: {}\n", quote(interval)));
        }
        if !discovery.is_empty() {
            discovery.insert_str(0, "discovery:\n");
        }
        format!(
            "node:
  data_dir: {data_dir}
  listen_addresses:
    - /ip4/{p2p_host}/tcp/{p2p_port}
database:
  replication_factor: {replication_factor}
  hibernation_timeout: {hibernation_timeout}
  max_databases: {max_databases}
  port_range_http_start: {http_start}
  port_range_http_end: {http_end}
  port_range_raft_start: {raft_start}
  port_range_raft_end: {raft_end}
  port_range_postgres_start: {pg_start}
  port_range_postgres_end: {pg_end}
control:
  api_addr: {api_addr}
{replica_hosts}{discovery}"
        )
    }
}

/// A random window of [`WINDOW`] ports among the 7000 from `base`.
fn window(base: u16) -> (u16, u16) {
    let start = rand::random_range(base..=base + 7_000 - WINDOW);
    (start, start + WINDOW - 1)
}

/// `$ROUSE_CONTROL_BIN`, else `rouse-control` of the cargo target directory
/// the running executable was built in.
pub fn control_bin() -> Result<PathBuf> {
    workspace_bin("ROUSE_CONTROL_BIN", "rouse-control")
}

/// `$<var>`, else binary `name` of the cargo target directory the running
/// executable was built in.
pub(crate) fn workspace_bin(var: &str, name: &str) -> Result<PathBuf> {
    let bin = match std::env::var_os(var) {
        Some(bin) => PathBuf::from(bin),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("executable without a directory")?;
            // Tests run from target/<profile>/deps, the benchmarks from
            // target/<profile> itself.
            if dir.ends_with("deps") {
                dir = dir.parent().unwrap_or(dir);
            }
            dir.join(name)
        }
    };
    ensure!(
        bin.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` or set {var}",
        bin.display()
    );
    Ok(bin)
}

/// What it takes to start the same daemon again.
struct Launch {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    netns: Option<String>,
}

impl Launch {
    fn spawn(&self) -> Result<ServerProcess> {
        self.spawn_with(&[])
    }

    /// The daemon with extra arguments after `serve`.
    fn spawn_with(&self, serve_args: &[&str]) -> Result<ServerProcess> {
        // `ip netns exec` execs the daemon itself: the pid is the daemon's.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .args(serve_args)
            .envs(self.env.iter().map(|(key, value)| (key, value)));
        if let Some(dir) = self.config.parent() {
            cmd.current_dir(dir);
        }
        ServerProcess::spawn("rouse-control", cmd, &self.log)
    }
}

async fn wait_healthy(process: &mut ServerProcess, api_url: &str, ca: Option<&Path>) -> Result<()> {
    let healthz = format!("{api_url}/healthz");
    let Some(ca) = ca else {
        return process.wait_ready(START_TIMEOUT, || get_ok(&healthz)).await;
    };
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca)?)?;
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()?;
    process
        .wait_ready(START_TIMEOUT, || async {
            let status = http.get(&healthz).send().await?.status();
            ensure!(status.is_success(), "GET {healthz}: HTTP {status}");
            Ok(())
        })
        .await
}

/// A running `rouse-control`. Dropping it SIGKILLs the daemon, its process
/// group and every process still running from its data directory.
pub struct Control {
    // Declared before `dir`, so that the daemon dies before its directory goes.
    process: ServerProcess,
    launch: Launch,
    /// `http(s)://<api_addr>`, the same across restarts.
    api_url: String,
    api_ca: Option<PathBuf>,
    data_dir: PathBuf,
    tokens: PathBuf,
    dir: TempDir,
}

/// The engine CA of every control this process started (PEM), which
/// [`crate::http_client`] trusts.
static ENGINE_CAS: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Every engine CA known to this process, as one PEM bundle.
pub fn engine_cas() -> String {
    ENGINE_CAS.lock().expect("engine CAs poisoned").clone()
}

/// The admin token of every control this process started, so that
/// [`engine_login`] can open the logins control seals for its caller.
static ADMIN_TOKENS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The engine login in `info`, opened with the admin token of whichever
/// control of this process sealed it.
pub fn engine_login(
    info: &rouse_control_api::DatabaseInfo,
) -> Option<rouse_control_api::BackendCredentials> {
    let tokens = ADMIN_TOKENS.lock().expect("admin tokens poisoned").clone();
    tokens.into_iter().find_map(|token| {
        rouse_control_api::Client::new("http://unused")
            .with_token(token)
            .engine_login(info)
    })
}

impl Control {
    pub fn builder() -> ControlBuilder {
        ControlBuilder::default()
    }

    /// A client with the admin token.
    pub fn client(&self) -> rouse_control_api::Client {
        self.anonymous_client().with_token(self.admin_token())
    }

    /// A client without any token.
    pub fn anonymous_client(&self) -> rouse_control_api::Client {
        let client = rouse_control_api::Client::new(&self.api_url());
        match &self.api_ca {
            Some(ca) => client
                .with_ca(&std::fs::read(ca).expect("the API's CA file"))
                .expect("the API's CA is usable"),
            None => client,
        }
    }

    /// The CA of the API's certificate (`api_tls`).
    pub fn api_ca(&self) -> Option<PathBuf> {
        self.api_ca.clone()
    }

    /// The founding node's `<data_dir>/tokens`.
    pub fn tokens_dir(&self) -> PathBuf {
        self.tokens.clone()
    }

    /// The admin token the founding node wrote.
    pub fn admin_token(&self) -> String {
        self.token_file("admin")
    }

    /// The proxy token the founding node wrote.
    pub fn proxy_token(&self) -> String {
        self.token_file("proxy")
    }

    fn token_file(&self, role: &str) -> String {
        let file = self.tokens.join(role);
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .to_string()
    }

    /// The config file the daemon runs with.
    pub fn config_file(&self) -> PathBuf {
        self.launch.config.clone()
    }

    /// `http://127.0.0.1:<port>` (`https://` with `api_tls`), the same
    /// across restarts.
    pub fn api_url(&self) -> String {
        self.api_url.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The temporary directory holding the config file and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the daemon's log, over all its restarts.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the daemon has exited.
    pub fn has_exited(&mut self) -> bool {
        self.process.has_exited()
    }

    /// SIGKILLs the daemon and its process group: a crash.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM to the daemon alone, then waits up to 30 s for it to exit;
    /// its engines keep running unless `control.stop_engines_on_exit` is set.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.terminate(STOP_TIMEOUT).await
    }

    /// [`Control::restart`] with the environment variable `key` set to
    /// `value` from now on (a changed setting).
    pub async fn restart_with(&mut self, key: &str, value: &str) -> Result<()> {
        self.launch.env.retain(|(k, _)| k != key);
        self.launch.env.push((key.into(), value.into()));
        self.restart().await
    }

    /// Stops the daemon (if still running) and starts it again with the same
    /// config, data directory and API address.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        // Replacing the process drops the old one: whatever is left of its
        // group gets SIGKILLed.
        self.process = self.launch.spawn()?;
        wait_healthy(&mut self.process, &self.api_url, self.api_ca.as_deref()).await
    }
}

impl Control {
    /// Starts a second daemon on the same data directory and config, as an
    /// upgrade would (`serve --upgrade` when `take_over`), and waits for it:
    /// with `take_over`, until it serves (it then replaces this one);
    /// without, until it exits, giving its status and log.
    pub async fn start_another(&mut self, take_over: bool) -> Result<Option<(ExitStatus, String)>> {
        if take_over {
            let mut new = self.launch.spawn_with(&["--upgrade"])?;
            wait_healthy(&mut new, &self.api_url, self.api_ca.as_deref()).await?;
            let old = std::mem::replace(&mut self.process, new);
            // The old daemon exits by itself once the new one took over.
            let mut old = old;
            old.exit_within_secs(30).await?;
            return Ok(None);
        }
        let mut second = self.launch.spawn_with(&[])?;
        let status = second
            .exit_within_secs(30)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the second daemon did not exit"))?;
        Ok(Some((status, second.log_tail(20))))
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.process.kill();
        // Engines that control started in process groups of their own
        // survive the killpg; they all run from the data directory.
        for pid in pids_mentioning(&self.data_dir.to_string_lossy()) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
