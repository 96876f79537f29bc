//! The `_system` rqlite database that holds all metadata, run by the daemon
//! itself. Its ports are chosen once from the configured ranges and kept in
//! `<data_dir>/_system/addr.json`, reused while free.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::engine::{self, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::ports::PortAllocator;
use crate::process::{ProcessEvent, Supervised};
use crate::rqlite::RqliteClient;
use crate::store::{ReplicaRecord, Store};
use rouse_control_api::config::Config;
use rouse_control_api::Engine;

#[derive(Serialize, Deserialize, PartialEq)]
struct SavedAddr {
    host: String,
    http_port: u16,
    raft_port: u16,
}

pub struct SystemDb {
    process: Supervised,
    pub store: Store,
    /// The store was created by this start: its emptiness says nothing
    /// about which data directories are orphans.
    pub fresh: bool,
}

impl SystemDb {
    pub async fn start(
        config: &Config,
        node_id: &str,
        engines: &EngineEnv,
        ports: &Arc<PortAllocator>,
    ) -> Result<SystemDb> {
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
        let http = ports.allocate(
            d.port_range_http_start..=d.port_range_http_end,
            host,
            saved.as_ref().map(|s| s.http_port),
        )?;
        let raft = ports.allocate(
            d.port_range_raft_start..=d.port_range_raft_end,
            host,
            saved.as_ref().map(|s| s.raft_port),
        )?;
        let now = SavedAddr {
            host: host.to_string(),
            http_port: http,
            raft_port: raft,
        };
        let raft_moved = saved
            .as_ref()
            .is_some_and(|s| s.raft_port != raft || s.host != now.host);
        if saved.as_ref() != Some(&now) {
            write_atomic(
                &addr_file,
                &serde_json::to_vec(&now).expect("plain struct serialises"),
            )?;
        }
        let replicas = [ReplicaRecord {
            idx: 0,
            node_id: node_id.to_string(),
            host: now.host.clone(),
            port: http,
            raft_port: Some(raft),
        }];
        let inst = Instance {
            label: "_system",
            dir: root.join("rqlite"),
            replicas: &replicas,
            secret: "",
            first_start: false,
            raft_moved,
        };
        let inst = Instance {
            first_start: !engine::has_data(Engine::Rqlite, &inst),
            ..inst
        };
        engines.prepare(Engine::Rqlite, &inst).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let spec = engines.process(Engine::Rqlite, &inst, &replicas[0])?;
        let process = Supervised::start(spec, 0, tx).await.map_err(|e| {
            ControlError::Internal(format!("cannot start rqlited for _system: {e}"))
        })?;
        tokio::spawn(log_events(rx));
        engines.wait_ready(Engine::Rqlite, &inst).await?;
        let store = Store::open(RqliteClient::new(&format!("{}:{http}", now.host))).await?;
        info!(
            database = "_system",
            http_port = http,
            raft_port = raft,
            "metadata store ready"
        );
        Ok(SystemDb {
            process,
            store,
            fresh: inst.first_start,
        })
    }

    pub async fn stop(self, grace: std::time::Duration) {
        self.process.stop(grace).await;
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
        &crate::secrets::hash_api_key(&crate::secrets::new_password())[..12]
    );
    write_atomic(&file, id.as_bytes())?;
    Ok(id)
}
