//! The `_system` rqlite database that holds all metadata, run by the daemon
//! itself. Its ports are chosen once from the configured ranges and kept in
//! `<data_dir>/_system/addr.json`, reused while free.

use std::path::Path;
use std::sync::Arc;

use rouse_config::Config;
use rouse_control_api::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::cluster::{Peers, SystemMember};
use crate::cluster_key::ClusterKey;
use crate::engine::{self, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::meta::Store;
use crate::model::ReplicaRecord;
use crate::ports::PortAllocator;
use crate::process::{self, ProcessEvent, Supervised};
use crate::rqlite::RqliteClient;

#[derive(Serialize, Deserialize, PartialEq)]
struct SavedAddr {
    host: String,
    http_port: u16,
    raft_port: u16,
    /// The member id in `_system`'s Raft cluster (stores made before
    /// several nodes were supported use `node-0`).
    #[serde(default = "first_member_id")]
    raft_id: String,
    /// Joined another node's `_system` (as a voter or not).
    #[serde(default)]
    joined: bool,
    #[serde(default = "yes")]
    voter: bool,
}

fn first_member_id() -> String {
    "node-0".into()
}

fn yes() -> bool {
    true
}

/// Voting members of `_system`: later nodes join as non-voters, reading and
/// writing through the voters.
const SYSTEM_VOTERS: usize = 3;

pub struct SystemDb {
    process: Supervised,
    pub store: Store,
    /// The store was created by this start: its emptiness says nothing
    /// about which data directories are orphans.
    pub fresh: bool,
}

impl SystemDb {
    /// Starts this node's `_system` member: again with its data, or new.
    /// A new node with bootstrap peers joins the `_system` of its peers
    /// (a voter while there are fewer than three); one without founds it.
    pub async fn start(
        config: &Config,
        node_id: &str,
        engines: &EngineEnv,
        ports: &Arc<PortAllocator>,
        peers: &Peers,
        cluster_key: &ClusterKey,
    ) -> Result<SystemDb> {
        // Every member runs with `-auth`; every node derives the login.
        let password = cluster_key.derive("_system rqlite login");
        let root = config.node.data_dir.join("_system");
        std::fs::create_dir_all(&root).map_err(|e| {
            ControlError::Internal(format!("cannot create {}: {e}", root.display()))
        })?;
        let addr_file = root.join("addr.json");
        let saved: Option<SavedAddr> = std::fs::read(&addr_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let host = config.control.replica_hosts[0];
        let d = &config.database;
        // A member left running by the daemon before this one keeps its
        // ports: it is adopted, not started again.
        let member = ReplicaRecord {
            idx: 0,
            node_id: node_id.to_string(),
            host: host.to_string(),
            port: 0,
            raft_port: None,
        };
        let adopting = process::pidfile::live(&engine::pid_file(&root.join("rqlite"), &member));
        let port = |range: std::ops::RangeInclusive<u16>, preferred: Option<u16>| match preferred {
            Some(p) if adopting.is_some() => {
                ports.hold(p);
                Ok(p)
            }
            _ => ports.allocate(range, host, preferred),
        };
        let http = port(
            d.port_range_http_start..=d.port_range_http_end,
            saved.as_ref().map(|s| s.http_port),
        )?;
        let raft = port(
            d.port_range_raft_start..=d.port_range_raft_end,
            saved.as_ref().map(|s| s.raft_port),
        )?;
        let replicas = [ReplicaRecord {
            port: http,
            raft_port: Some(raft),
            ..member
        }];
        let probe = Instance {
            label: "_system",
            dir: root.join("rqlite"),
            replicas: &replicas,
            node_id,
            secret: &password,
            first_start: false,
            raft_moved: false,
            join: Vec::new(),
            non_voter: false,
            raft_id: None,
            archive: None,
        };
        let has_data = engine::has_data(Engine::Rqlite, &probe);
        let (join, voter) = match &saved {
            Some(s) if has_data => (Vec::new(), s.voter),
            _ if config.discovery.bootstrap_peers.is_empty() => (Vec::new(), true),
            _ => find_system(peers).await,
        };
        let now = SavedAddr {
            host: host.to_string(),
            http_port: http,
            raft_port: raft,
            raft_id: match &saved {
                Some(s) if has_data => s.raft_id.clone(),
                _ => node_id.to_string(),
            },
            joined: !join.is_empty() || saved.as_ref().is_some_and(|s| s.joined && has_data),
            voter,
        };
        let raft_moved = saved
            .as_ref()
            .is_some_and(|s| s.raft_port != raft || s.host != now.host);
        if raft_moved && has_data && (now.joined || !config.discovery.bootstrap_peers.is_empty()) {
            // Rewriting the Raft configuration of a shared `_system` to this
            // one member would split it.
            return Err(ControlError::Internal(format!(
                "_system's Raft address {}:{} is taken; free it: this node's member of the shared metadata store cannot move",
                saved.as_ref().map_or("?", |s| s.host.as_str()),
                saved.as_ref().map_or(0, |s| s.raft_port)
            )));
        }
        if saved.as_ref() != Some(&now) {
            write_atomic(
                &addr_file,
                &serde_json::to_vec(&now).expect("plain struct serialises"),
            )?;
        }
        let inst = Instance {
            first_start: !has_data,
            raft_moved,
            join,
            non_voter: !voter,
            raft_id: Some(&now.raft_id),
            ..probe
        };
        engines.prepare(Engine::Rqlite, &inst).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let spec = engines.process(Engine::Rqlite, &inst, &replicas[0])?;
        let process = Supervised::start(spec, 0, tx).await.map_err(|e| {
            ControlError::Internal(format!("cannot start rqlited for _system: {e}"))
        })?;
        tokio::spawn(log_events(rx));
        let client = RqliteClient::new(
            &format!("{}:{http}", now.host),
            &engine::rqlite::login(&password),
            engines.rqlite_http.clone(),
        );
        engine::poll_until(
            tokio::time::Instant::now() + engines.start_timeout,
            "_system",
            || async {
                if client.ready().await {
                    Ok(())
                } else {
                    Err("no leader yet".to_string())
                }
            },
        )
        .await?;
        let store = Store::open(client, cluster_key.sealing("secrets at rest in _system")).await?;
        peers.set_system(SystemMember {
            raft_addr: format!("{}:{raft}", now.host),
            voter,
        });
        info!(
            database = "_system",
            http_port = http,
            raft_port = raft,
            joined = now.joined,
            voter,
            "metadata store ready"
        );
        Ok(SystemDb {
            process,
            store,
            fresh: inst.first_start,
        })
    }

    /// Stops this node's member, or leaves it running for the next daemon.
    pub async fn stop(self, grace: std::time::Duration, leave_running: bool) {
        if leave_running {
            self.process.detach();
        } else {
            self.process.stop(grace).await;
        }
    }
}

/// Waits for peers and picks the `_system` to join: the Raft addresses of
/// the members peers announce, and whether to vote. When no peer runs one
/// yet, the node with the lowest peer id among those heard founds it and
/// the others join.
async fn find_system(peers: &Peers) -> (Vec<String>, bool) {
    let settle = peers.health_check_interval() * 3;
    let started = std::time::Instant::now();
    let mut told = std::time::Instant::now();
    loop {
        let heard: Vec<_> = peers.peers().into_iter().filter(|p| p.healthy).collect();
        let members: Vec<&SystemMember> = heard
            .iter()
            .filter_map(|p| p.heartbeat.system.as_ref())
            .collect();
        if !members.is_empty() {
            let voters = members.iter().filter(|m| m.voter).count();
            let join = members.iter().map(|m| m.raft_addr.clone()).collect();
            info!(
                members = members.len(),
                voter = voters < SYSTEM_VOTERS,
                "joining the peers' _system"
            );
            return (join, voters < SYSTEM_VOTERS);
        }
        if !heard.is_empty()
            && started.elapsed() > settle
            && heard.iter().all(|p| p.peer_id > peers.peer_id())
        {
            info!("no peer runs _system yet and this node has the lowest peer id: founding it");
            return (Vec::new(), true);
        }
        if told.elapsed() > std::time::Duration::from_secs(10) {
            warn!(
                peers = heard.len(),
                "waiting for a peer's _system to join (check discovery.bootstrap_peers)"
            );
            told = std::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn log_events(mut rx: mpsc::UnboundedReceiver<ProcessEvent>) {
    while let Some(ev) = rx.recv().await {
        match ev {
            ProcessEvent::Restarting {
                status, attempt, ..
            } => {
                warn!(database = "_system", status = %status, attempt, "metadata store exited; restarting")
            }
            ProcessEvent::Restarted { .. } => {
                info!(database = "_system", "metadata store restarted")
            }
            ProcessEvent::GaveUp { reason, .. } => {
                error!(database = "_system", reason = %reason, "metadata store cannot run")
            }
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| ControlError::Internal(format!("cannot write {}: {e}", path.display())))
}

/// This node's id, made once and kept in `<data_dir>/node_id`.
pub fn node_id(data_dir: &Path) -> Result<String> {
    let file = data_dir.join("node_id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!(
        "node-{}",
        &crate::secrets::hash_bearer_secret(&crate::secrets::new_password())[..12]
    );
    write_atomic(&file, id.as_bytes())?;
    Ok(id)
}
