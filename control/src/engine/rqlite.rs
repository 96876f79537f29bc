//! rqlite: `replication_factor` rqlited processes forming one Raft cluster.

use std::ffi::OsString;

use rouse_control_api::{BackendCredentials, Endpoint};
use serde_json::json;

use super::{poll_until, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::model::ReplicaRecord;
use crate::rqlite::{RqliteClient, Stmt};

/// Control's login on a tenant database's rqlited (`-auth`); its password
/// is the database's secret, sealed in `_system`.
pub const ENGINE_USER: &str = "rouse";
/// The proxies' login: the data plane only (execute, query, status, ready),
/// no join, remove, load or backup. Its password is derived from the
/// database's secret.
pub const PROXY_USER: &str = "rouse-proxy";
/// What the proxies' login may do.
const PROXY_PERMS: [&str; 4] = ["execute", "query", "status", "ready"];
/// The `-auth` file, inside the replica's own directory (the only one the
/// sandboxed engine may read).
const AUTH_FILE: &str = "auth.json";

/// A client of replica `r`, logged in with the database's secret (every
/// rqlited, `_system` included, runs with `-auth`).
pub fn client(env: &EngineEnv, r: &ReplicaRecord, secret: &str) -> RqliteClient {
    RqliteClient::new(
        &format!("{}:{}", r.host, r.port),
        &login(secret),
        env.rqlite_http.clone(),
    )
}

/// The engine login of a database whose secret is `secret`.
pub fn login(secret: &str) -> BackendCredentials {
    BackendCredentials {
        user: ENGINE_USER.into(),
        password: secret.into(),
    }
}

/// The proxies' login on a database whose secret is `secret`.
pub fn proxy_login(secret: &str) -> BackendCredentials {
    super::derived_login(secret, PROXY_USER)
}

/// A replica's member id in its Raft cluster.
pub fn node_id(r: &ReplicaRecord) -> String {
    format!("node-{}", r.idx)
}

/// The Raft member id a replica runs with: the instance's own (`_system`,
/// one replica) or `node-<idx>`.
fn member_id(inst: &Instance<'_>, r: &ReplicaRecord) -> String {
    inst.raft_id.map_or_else(|| node_id(r), str::to_string)
}

pub fn raft_addr(r: &ReplicaRecord) -> String {
    format!("{}:{}", r.host, r.raft_port.unwrap_or_default())
}

pub(super) fn prepare(env: &EngineEnv, inst: &Instance<'_>) -> Result<()> {
    for r in inst.local() {
        let dir = inst.replica_dir(r);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ControlError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        write_auth_file(&dir.join(AUTH_FILE), inst.secret)?;
        env.node_tls.write(&dir)?;
        // Raft remembers its members' addresses: after a wake on other ports,
        // rqlite's peers.json recovery tells every node where the others are now.
        if inst.raft_moved && !inst.first_start {
            let peers: Vec<_> = inst
                .replicas
                .iter()
                .map(|p| json!({"id": member_id(inst, p), "address": raft_addr(p), "non_voter": false}))
                .collect();
            let raft_dir = dir.join("raft");
            std::fs::create_dir_all(&raft_dir)
                .and_then(|_| {
                    std::fs::write(raft_dir.join("peers.json"), serde_json::to_vec(&peers)?)
                })
                .map_err(|e| ControlError::Internal(format!("cannot write peers.json: {e}")))?;
        }
    }
    Ok(())
}

/// Only `ENGINE_USER` may do anything and `PROXY_USER` the data plane;
/// nobody else, not even read `/status` (mode 0600).
fn write_auth_file(path: &std::path::Path, secret: &str) -> Result<()> {
    let proxy = proxy_login(secret);
    let users = json!([
        {"username": ENGINE_USER, "password": secret, "perms": ["all"]},
        {"username": proxy.user, "password": proxy.password, "perms": PROXY_PERMS},
    ]);
    crate::secrets::write_private(path, &serde_json::to_vec(&users).expect("JSON serialises"))
}

/// Joins are retried this often, for up to a minute.
const JOIN_INTERVAL: &str = "100ms";
const JOIN_ATTEMPTS: &str = "600";

pub(super) fn args(env: &EngineEnv, inst: &Instance<'_>, r: &ReplicaRecord) -> Vec<OsString> {
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis().max(1));
    let mut args: Vec<OsString> = vec![
        "-node-id".into(),
        member_id(inst, r).into(),
        "-http-addr".into(),
        format!("{}:{}", r.host, r.port).into(),
        "-raft-addr".into(),
        raft_addr(r).into(),
        "-raft-election-timeout".into(),
        ms(env.raft_election_timeout).into(),
        "-raft-timeout".into(),
        ms(env.raft_heartbeat_timeout).into(),
        // Raft requires the leader lease to be no longer than the heartbeat timeout.
        "-raft-leader-lease-timeout".into(),
        ms(env.raft_heartbeat_timeout).into(),
    ];
    // A new cluster: the first replica bootstraps alone and the others join
    // it. (`-bootstrap-expect` waits about 2 s more whenever one replica
    // starts a moment after another notified it.) A replica without data
    // in a running cluster joins through the given members.
    let first = inst.replicas.iter().map(|p| p.idx).min() == Some(r.idx);
    let join: Vec<String> = match (&inst.join[..], first) {
        ([], true) => Vec::new(),
        ([], false) => inst
            .replicas
            .iter()
            .filter(|p| p.idx != r.idx)
            .take(1)
            .map(raft_addr)
            .collect(),
        (given, _) => given.to_vec(),
    };
    if inst.first_start && !join.is_empty() {
        args.extend([
            "-join-as".into(),
            ENGINE_USER.into(),
            "-join".into(),
            join.join(",").into(),
            "-join-interval".into(),
            JOIN_INTERVAL.into(),
            "-join-attempts".into(),
            JOIN_ATTEMPTS.into(),
        ]);
        if inst.non_voter {
            args.push("-raft-non-voter".into());
        }
    }
    args.extend(["-auth".into(), inst.replica_dir(r).join(AUTH_FILE).into()]);
    args.extend(super::tls::NodeTls::rqlited_args(
        &inst.replica_dir(r),
        env.rqlite_http.is_https(),
    ));
    args.push(inst.replica_dir(r).into());
    args
}

pub(super) async fn wait_ready(
    env: &EngineEnv,
    inst: &Instance<'_>,
    deadline: tokio::time::Instant,
) -> Result<Vec<Endpoint>> {
    let clients: Vec<RqliteClient> = inst
        .replicas
        .iter()
        .map(|r| client(env, r, inst.secret))
        .collect();
    let leader = poll_until(deadline, inst.label, || async {
        // `/readyz` first: cheap enough to poll every few milliseconds. A
        // strong read alone is not enough: a new node may answer one and
        // then, for a moment, refuse writes for want of a leader.
        if !futures::future::join_all(clients.iter().map(RqliteClient::ready))
            .await
            .contains(&true)
        {
            return Err("no leader yet".to_string());
        }
        let idx = if clients.len() == 1 {
            0
        } else {
            let mut found = None;
            for c in &clients {
                if let Some(id) = c.leader_id().await {
                    found = Some(
                        inst.replicas
                            .iter()
                            .position(|r| node_id(r) == id)
                            .ok_or_else(|| format!("unknown leader {id}"))?,
                    );
                    break;
                }
            }
            found.ok_or_else(|| "no leader yet".to_string())?
        };
        // A strong read goes through Raft: the leader really leads.
        clients[idx]
            .query(Stmt::new("SELECT 1"))
            .await
            .map_err(|e| e.to_string())?;
        // Every replica is in the cluster: a new one has joined.
        if clients.len() > 1 {
            let members = clients[idx].members().await.unwrap_or_default();
            if let Some(missing) = inst
                .replicas
                .iter()
                .map(node_id)
                .find(|id| !members.contains(id))
            {
                return Err(format!("{missing} has not joined yet"));
            }
        }
        Ok(idx)
    })
    .await?;
    Ok(super::endpoints(
        inst.replicas,
        Some(leader),
        env.rqlite_http.is_https(),
    ))
}

pub(super) async fn wait_alive(
    env: &EngineEnv,
    inst: &Instance<'_>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    for r in inst.local() {
        let client = client(env, r, inst.secret);
        poll_until(deadline, inst.label, || async {
            if client.alive().await {
                Ok(())
            } else {
                Err(format!("{} does not answer yet", client.addr()))
            }
        })
        .await?;
    }
    Ok(())
}

/// The current leader's index, asked of the replicas in turn.
pub async fn current_leader(
    env: &EngineEnv,
    replicas: &[ReplicaRecord],
    secret: &str,
) -> Option<usize> {
    for r in replicas {
        if let Some(id) = client(env, r, secret).leader_id().await {
            return replicas.iter().position(|p| node_id(p) == id);
        }
    }
    None
}
