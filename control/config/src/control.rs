//! The control section: the daemon's API, engine binaries, replica hosts and
//! engine timings, and TLS files.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub api_addr: SocketAddr,
    /// `rqlited` binary; found on PATH when unset.
    pub rqlited_path: Option<PathBuf>,
    /// Directory with `initdb` and `postgres`; PATH, then the newest
    /// `/usr/lib/postgresql/*/bin`, when unset.
    pub postgres_bin_dir: Option<PathBuf>,
    /// Unprivileged user that runs PostgreSQL when control runs as root.
    pub run_as: String,
    /// Loopback addresses the replicas of one database take on this node,
    /// so that a 3-replica Raft cluster runs on distinct hosts locally.
    pub replica_hosts: Vec<IpAddr>,
    /// rqlite `-raft-election-timeout`: short, so that a woken cluster
    /// elects its leader fast.
    #[serde(with = "crate::duration")]
    pub raft_election_timeout: Duration,
    /// rqlite `-raft-timeout` (heartbeat timeout).
    #[serde(with = "crate::duration")]
    pub raft_heartbeat_timeout: Duration,
    /// How long an engine may take to answer its first query after a start.
    #[serde(with = "crate::duration")]
    pub start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping an engine.
    #[serde(with = "crate::duration")]
    pub stop_grace: Duration,
    /// PostgreSQL `max_connections` of each managed instance.
    pub postgres_max_connections: u32,
    /// Engine processes may touch only their own data directory (Landlock).
    /// Off only to test the proxy's statement filter on its own.
    pub sandbox: bool,
    /// rqlite's HTTP API over TLS (certificates of the cluster CA). Unset:
    /// on when a replica host is not a loopback address, that is when
    /// engine traffic leaves the machine. Every node of a cluster must
    /// agree.
    pub engine_https: Option<bool>,
    /// TLS on the control API (PEM files); absent: plain HTTP. Clients then
    /// use `https://` and trust its CA (`proxy.control_ca_file`,
    /// `ROUSE_CONTROL_CA` for the command line).
    pub tls: Option<TlsConfig>,
    /// Stop every engine when the daemon stops. Off by default: engines
    /// outlive the daemon, and the next daemon (a restart, an upgrade)
    /// adopts them, so tenants never notice control going away.
    pub stop_engines_on_exit: bool,
    /// Engines booting at once on this node (from spawn until the process
    /// answers; elections then overlap freely), granted in turn across
    /// apps; 0: eight per CPU.
    pub max_concurrent_starts: usize,
    /// An engine's log is rotated when it grows past this many bytes.
    pub engine_log_max_bytes: u64,
    /// Rotated engine logs kept (`node-0.log.1` …).
    pub engine_log_keep: u32,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            api_addr: SocketAddr::from(([127, 0, 0, 1], 8001)),
            rqlited_path: None,
            postgres_bin_dir: None,
            run_as: "postgres".into(),
            replica_hosts: (1..=3)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                .collect(),
            raft_election_timeout: Duration::from_millis(100),
            raft_heartbeat_timeout: Duration::from_millis(100),
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            postgres_max_connections: 300,
            sandbox: true,
            engine_https: None,
            tls: None,
            stop_engines_on_exit: false,
            max_concurrent_starts: 0,
            engine_log_max_bytes: 10 * 1024 * 1024,
            engine_log_keep: 3,
        }
    }
}

impl ControlConfig {
    /// `max_concurrent_starts`, with 0 resolved for this machine.
    pub fn concurrent_starts(&self) -> usize {
        match self.max_concurrent_starts {
            0 => 8 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}
