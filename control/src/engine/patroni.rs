//! Registered Patroni clusters. Control runs nothing for them: it checks
//! that the admin credentials reach the leader, and makes the app's users
//! login roles there (replicas learn them by streaming replication). The
//! proxy follows the leader itself, by the members' REST API.

use rouse_control_api::{Endpoint, Name, PatroniDiscovery, PatroniMember, PatroniRegistration};
use rouse_runtime::etcd;
use serde::{Deserialize, Serialize};

use super::postgres::{connect_as, sync_users};
use crate::error::{ControlError, Result};
use crate::model::{ReplicaRecord, UserRecord};

/// What control keeps of a registration beyond the database record: the
/// REST API of each member (in replica order), the admin user, and where
/// the members are followed; the admin's password is the record's secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub admin_user: String,
    pub api: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<PatroniDiscovery>,
}

/// Checks a registration, reads its members from etcd when it names where
/// Patroni keeps them, and splits it into replicas and what else is kept.
pub async fn accept(
    reg: &PatroniRegistration,
    node_id: &str,
) -> Result<(Vec<ReplicaRecord>, Registration)> {
    let members = match &reg.discovery {
        None => reg.members.clone(),
        Some(_) if !reg.members.is_empty() => {
            return Err(ControlError::BadRequest(
                "give a Patroni cluster's members or its discovery, not both".into(),
            ))
        }
        Some(d) => discover(d).await?,
    };
    if reg.admin.user.is_empty() {
        return Err(ControlError::BadRequest(
            "the admin user must not be empty".into(),
        ));
    }
    members_of(&members, &reg.admin.user, reg.discovery.clone(), node_id)
}

/// The members Patroni keeps in etcd now. The scope is named: control's
/// environment is not the cluster's.
pub async fn discover(d: &PatroniDiscovery) -> Result<Vec<PatroniMember>> {
    let bad = |m: String| Err(ControlError::BadRequest(m));
    if d.scope.is_none() {
        return bad("discovery names the cluster's scope".into());
    }
    if d.etcd.is_empty() || d.etcd.iter().any(|e| !e.starts_with("http://")) {
        return bad(format!(
            "discovery needs etcd endpoints as http:// URLs: {:?}",
            d.etcd
        ));
    }
    let prefix = d.members_prefix().map_err(ControlError::BadRequest)?;
    let found = etcd::Members::new(&d.etcd, prefix.clone())
        .read()
        .await
        .map_err(|e| ControlError::Engine(e.to_string()))?;
    if found.is_empty() {
        return bad(format!("etcd holds no Patroni member under {prefix}"));
    }
    Ok(found)
}

/// Checks members and makes them replicas and the registration kept.
pub fn members_of(
    members: &[PatroniMember],
    admin_user: &str,
    discovery: Option<PatroniDiscovery>,
    node_id: &str,
) -> Result<(Vec<ReplicaRecord>, Registration)> {
    let bad = |m: String| Err(ControlError::BadRequest(m));
    if members.is_empty() {
        return bad("a Patroni cluster needs at least one member".into());
    }
    for (i, m) in members.iter().enumerate() {
        if m.name.is_empty() || members[..i].iter().any(|o| o.name == m.name) {
            return bad(format!(
                "member names must be unique and not empty: {:?}",
                m.name
            ));
        }
        if !m.api.starts_with("http://") {
            return bad(format!(
                "member {}: REST API {:?} must be an http:// URL",
                m.name, m.api
            ));
        }
    }
    let replicas = members
        .iter()
        .enumerate()
        .map(|(i, m)| ReplicaRecord {
            idx: i as u32,
            node_id: format!("{node_id}/{}", m.name),
            host: m.addr.ip().to_string(),
            port: m.addr.port(),
            raft_port: None,
        })
        .collect();
    let kept = Registration {
        admin_user: admin_user.to_string(),
        api: members.iter().map(|m| m.api.clone()).collect(),
        discovery,
    };
    Ok((replicas, kept))
}

/// The members as endpoints; which one leads is the proxy's to find out.
pub fn endpoints(replicas: &[ReplicaRecord], reg: &Registration) -> Vec<Endpoint> {
    replicas
        .iter()
        .zip(&reg.api)
        .map(|(r, api)| Endpoint {
            tls: false,
            node_id: r.node_id.clone(),
            host: r.host.clone(),
            port: r.port,
            raft_port: None,
            api: Some(api.clone()),
            leader: false,
        })
        .collect()
}

/// Makes `users` of `app` login roles (`<user>.<app>`) on the cluster's
/// leader, which is the member that is not in recovery, and takes LOGIN
/// from the app's roles of removed users.
pub async fn apply_users(
    app: &Name,
    replicas: &[ReplicaRecord],
    reg: &Registration,
    password: &str,
    users: &[UserRecord],
) -> Result<()> {
    let mut tried = Vec::new();
    for r in replicas {
        let admin = match connect_as(r, &reg.admin_user, password, "postgres").await {
            Ok(a) => a,
            Err(e) => {
                tried.push(format!("{}:{}: {e}", r.host, r.port));
                continue;
            }
        };
        let in_recovery: bool = admin
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| ControlError::Engine(e.to_string()))?
            .get(0);
        if in_recovery {
            tried.push(format!("{}:{}: a replica", r.host, r.port));
            continue;
        }
        // User names hold no dot and app names none either: `<user>.<app>`
        // is this app's role exactly when it ends with `.<app>`.
        let suffix = rouse_control_api::name::cluster_role("", app);
        return sync_users(
            &admin,
            users,
            None,
            |n| rouse_control_api::name::cluster_role(n, app),
            |role| role.ends_with(&suffix),
        )
        .await
        .map_err(ControlError::Engine);
    }
    Err(ControlError::Engine(format!(
        "no leader of the Patroni cluster accepted the admin login: {}",
        tried.join("; ")
    )))
}
