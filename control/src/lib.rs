//! rouse's control daemon: owns the lifecycle of every database on its node
//! (create, hibernate, wake, drop, restart on crash) and serves the control
//! API that proxies and operators use.

mod activity;
mod api;
mod backup;
pub mod cli;
pub mod cluster;
pub mod cluster_key;
mod engine;
mod error;
mod instance;
mod lifecycle;
mod meta;
mod metrics;
mod model;
mod ports;
mod process;
mod quota;
mod rqlite;
mod sandbox;
mod secrets;
mod start_gate;
mod tokens;

pub use engine::tls::NodeTls;
/// Every metric control records besides the shared ones of `rouse_runtime`.
pub use metrics::CATALOGUE as METRICS;

use std::future::Future;
use std::sync::Arc;

use rouse_config::Config;
use tokio::net::TcpListener;
use tracing::info;

use crate::cluster::Peers;
use crate::engine::EngineEnv;
use crate::lifecycle::Manager;
use crate::meta::SystemDb;
use crate::ports::PortAllocator;

/// Before binding: with `upgrade`, stops the daemon running on this
/// config's data directory (it leaves its engines for this one to adopt);
/// without, refuses to start while one runs there.
pub async fn make_way(config: &Config, upgrade: bool) -> anyhow::Result<()> {
    let wait = config.control.stop_grace + std::time::Duration::from_secs(30);
    Ok(instance::make_way(&config.node.data_dir, upgrade, wait).await?)
}

/// Runs the daemon on an already-bound API listener until `shutdown`
/// resolves; its engines keep running for the next daemon to adopt (or
/// stop, with `control.stop_engines_on_exit`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    rouse_runtime::telemetry::metrics();
    rouse_runtime::metric::describe(rouse_runtime::metric::CATALOGUE);
    rouse_runtime::metric::describe(metrics::CATALOGUE);
    let api_tls = config
        .control
        .tls
        .as_ref()
        .map(rouse_runtime::server::tls_acceptor)
        .transpose()
        .map_err(|e| anyhow::anyhow!("control.tls: {e}"))?;
    // Everything control and its engines create is the node's alone:
    // directories 0700, files 0600.
    // SAFETY: umask(2) only sets this process's file mode mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(&config.node.data_dir)?;
    restrict_data_dir(&config.node.data_dir)?;
    instance::claim(&config.node.data_dir);
    let node_id = meta::node_id(&config.node.data_dir)?;
    let cluster_key = cluster_key::ClusterKey::load(&config)?;
    let engines = EngineEnv::from_config(&config.control, &config.node.data_dir, &cluster_key)?;
    let ports = Arc::new(PortAllocator::default());
    if let Ok(addr) = listener.local_addr() {
        ports.hold(addr.port());
    }
    // Before the metadata store: a bad address or a taken port refuses the
    // start without leaving rqlited behind.
    let (peers, swarm, inbound) = Peers::start(&config, &node_id, cluster_key.network_key())?;
    if !config.discovery.bootstrap_peers.is_empty()
        && config.control.replica_hosts.iter().all(|h| h.is_loopback())
        && !config
            .node
            .listen_addresses
            .iter()
            .all(|a| a.contains("/ip4/127."))
    {
        tracing::warn!("control.replica_hosts are loopback addresses: other nodes and their proxies cannot reach this node's replicas; set control.replica_hosts to this node's address");
    }
    let system = SystemDb::start(&config, &node_id, &engines, &ports, &peers, &cluster_key).await?;
    let grace = config.control.stop_grace;
    let stop_engines = config.control.stop_engines_on_exit;
    // A node without bootstrap peers founded (or alone runs) `_system`.
    let config_founds_cluster = config.discovery.bootstrap_peers.is_empty();
    let data_dir = config.node.data_dir.clone();
    let backups = backup::Backups::open(&config.backups, &data_dir, engines.postgres_user)?;
    let manager = Manager::new(
        config,
        node_id.clone(),
        system.store.clone(),
        engines,
        ports,
        peers.clone(),
        backups,
    );
    manager.record_membership().await?;
    let tokens = Arc::new(tokens::Tokens::new(system.store.clone()));
    if config_founds_cluster {
        tokens.found(&data_dir).await?;
    }
    let tasks = &manager.tasks;
    tasks.once("peer_requests", manager.clone().serve_peers(inbound));
    let swarm_abort = swarm.abort_handle();
    tasks.once("swarm", async move {
        let _ = swarm.await;
    });
    manager.adopt(!system.fresh).await?;
    let m = manager.clone();
    tasks.restarting("upkeep", move || m.clone().run_upkeep());
    let m = manager.clone();
    tasks.restarting("idle_reaper", move || m.clone().run_idle_reaper());
    let m = manager.clone();
    tasks.restarting("engine_logs", move || m.clone().rotate_engine_logs());
    let m = manager.clone();
    tasks.restarting("backups", move || m.clone().run_backup_schedule());
    tasks.restarting("memory_trim", rouse_runtime::memory::trim_forever);
    info!(node_id = %node_id, api_addr = %listener.local_addr()?, "rouse-control ready");
    api::serve(listener, manager.clone(), tokens, api_tls, shutdown).await;
    info!(
        stop_engines,
        "shutting down: engines {}",
        if stop_engines { "stop" } else { "keep running" }
    );
    swarm_abort.abort();
    manager.shutdown().await;
    system.stop(grace, !stop_engines).await;
    Ok(())
}

/// The data directory is 0700; 0711 when control runs as root, so that
/// PostgreSQL, which runs as `control.run_as`, can pass through to its own
/// directory (without listing the others).
fn restrict_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid(2) has no preconditions.
    let mode = if unsafe { libc::geteuid() } == 0 {
        0o711
    } else {
        0o700
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}
