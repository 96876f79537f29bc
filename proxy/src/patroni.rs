//! Patroni clusters, followed the way HAProxy follows them: every member's
//! REST API is asked each `check_interval` whether it is the leader
//! (`GET /primary`) and whether it is a healthy replica
//! (`GET /replica[?lag=N]`); `rise` passes in a row mark a role up, `fall`
//! failures down. Connections go to the leader or round-robin over the
//! replicas; during a failover a new connection is held until a leader passes
//! its checks (at most `failover_hold`) instead of being refused, and a
//! session on a member that loses its role is told to close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rouse_config::{MemberRole, PatroniChecks};
use rouse_control_api::PatroniMember;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::health::Health;

/// Longest check answer read: the status line is all that counts.
const MAX_CHECK_ANSWER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PatroniError {
    #[error("cluster {cluster}: no {role} passed its health check within {waited:?}")]
    NoMember {
        cluster: String,
        role: &'static str,
        waited: Duration,
    },
    #[error("cluster {cluster}: member {member} has an unsupported REST API URL {url:?} (expected http://host:port)")]
    BadApiUrl {
        cluster: String,
        member: String,
        url: String,
    },
}

/// Why [`Cluster::connect`] gave up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError<E> {
    #[error(transparent)]
    NoMember(PatroniError),
    #[error("{0}")]
    Member(E),
}

/// Which members hold which role, as the checks last decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) leader: Option<usize>,
    pub(crate) replicas: Vec<usize>,
}

impl View {
    fn holds(&self, member: usize, role: MemberRole) -> bool {
        match role {
            MemberRole::Primary => self.leader == Some(member),
            MemberRole::Replica => self.replicas.contains(&member),
        }
    }
}

/// A member chosen for a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pick {
    pub(crate) member: usize,
    pub(crate) addr: SocketAddr,
    pub(crate) role: MemberRole,
}

/// One role's check state of one member (HAProxy's rise/fall counter).
#[derive(Debug, Clone, Copy, Default)]
struct RiseFall {
    /// `None` until the first check answered.
    up: Option<bool>,
    /// Results in a row that disagree with `up`.
    streak: u32,
    /// When `up` last changed: the newest leader wins a tie.
    since: Option<Instant>,
}

impl RiseFall {
    /// Takes a check result; true when the state changed.
    fn record(&mut self, passed: bool, rise: u32, fall: u32) -> bool {
        match self.up {
            // The first answer decides at once, so a fresh proxy knows the leader.
            None => {
                *self = RiseFall {
                    up: Some(passed),
                    streak: 0,
                    since: Some(Instant::now()),
                };
                true
            }
            Some(up) if up == passed => {
                self.streak = 0;
                false
            }
            Some(up) => {
                self.streak += 1;
                let needed = if up { fall } else { rise };
                if self.streak >= needed {
                    *self = RiseFall {
                        up: Some(passed),
                        streak: 0,
                        since: Some(Instant::now()),
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    fn is_up(&self) -> bool {
        self.up == Some(true)
    }

    fn in_transition(&self) -> bool {
        self.streak > 0
    }
}

struct Member {
    config: PatroniMember,
    /// `host:port` of the REST API and the path prefix before `/primary`.
    api: (String, String),
    primary: RiseFall,
    replica: RiseFall,
    /// Wakes the member's checker at once (a connect to it just failed).
    recheck: Arc<Notify>,
}

pub(crate) struct Cluster {
    name: String,
    checks: PatroniChecks,
    members: Mutex<Vec<Member>>,
    view: watch::Sender<View>,
    next_replica: AtomicUsize,
    /// Where each member's check state is shown.
    health: Arc<Health>,
}

impl Cluster {
    /// Starts checking `members`; the checks stop when the cluster is dropped.
    pub(crate) fn start(
        name: &str,
        members: &[PatroniMember],
        checks: &PatroniChecks,
        health: Arc<Health>,
    ) -> Result<Arc<Cluster>, PatroniError> {
        let members = members
            .iter()
            .map(|m| {
                Ok(Member {
                    api: parse_api_url(&m.api).ok_or_else(|| PatroniError::BadApiUrl {
                        cluster: name.to_string(),
                        member: m.name.clone(),
                        url: m.api.clone(),
                    })?,
                    config: m.clone(),
                    primary: RiseFall::default(),
                    replica: RiseFall::default(),
                    recheck: Arc::new(Notify::new()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = members.len();
        let names: Vec<&str> = members.iter().map(|m| m.config.name.as_str()).collect();
        health.keep_members(name, &names);
        let cluster = Arc::new(Cluster {
            name: name.to_string(),
            checks: checks.clone(),
            members: Mutex::new(members),
            view: watch::Sender::new(View::default()),
            next_replica: AtomicUsize::new(0),
            health,
        });
        for i in 0..count {
            tokio::spawn(check_forever(Arc::downgrade(&cluster), i));
        }
        Ok(cluster)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn checks(&self) -> &PatroniChecks {
        &self.checks
    }

    pub(crate) fn members(&self) -> Vec<PatroniMember> {
        let members = self.members.lock().expect("members poisoned");
        members.iter().map(|m| m.config.clone()).collect()
    }

    /// A member in `role`, waiting up to `failover_hold` for one.
    pub(crate) async fn pick(&self, role: MemberRole) -> Result<Pick, PatroniError> {
        let mut rx = self.view.subscribe();
        let chosen = tokio::time::timeout(self.checks.failover_hold, async {
            loop {
                if let Some(member) = self.choose(&rx.borrow_and_update(), role) {
                    return member;
                }
                if rx.changed().await.is_err() {
                    // The sender lives in `self`: unreachable while we borrow it.
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .map_err(|_| PatroniError::NoMember {
            cluster: self.name.clone(),
            role: role_name(role),
            waited: self.checks.failover_hold,
        })?;
        let addr = self.members.lock().expect("members poisoned")[chosen]
            .config
            .addr;
        Ok(Pick {
            member: chosen,
            addr,
            role,
        })
    }

    fn choose(&self, view: &View, role: MemberRole) -> Option<usize> {
        match role {
            MemberRole::Primary => view.leader,
            MemberRole::Replica if view.replicas.is_empty() => None,
            MemberRole::Replica => {
                let n = self.next_replica.fetch_add(1, Ordering::Relaxed);
                Some(view.replicas[n % view.replicas.len()])
            }
        }
    }

    /// Connects to a member in `role` with `connect`. A member that fails
    /// it is checked again at once and another pick follows, until
    /// `failover_hold` ends: clients wait through a failover instead of
    /// seeing a refusal. The last failure is returned when time is up.
    pub(crate) async fn connect<T, E, F, Fut>(
        &self,
        role: MemberRole,
        connect: F,
    ) -> Result<(T, Pick), ConnectError<E>>
    where
        E: std::fmt::Display,
        F: Fn(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + self.checks.failover_hold;
        loop {
            let pick = tokio::time::timeout_at(deadline, self.pick(role))
                .await
                .unwrap_or_else(|_| Err(self.no_member(role)))
                .map_err(ConnectError::NoMember)?;
            let mut rx = self.view.subscribe();
            match connect(pick.addr).await {
                Ok(conn) => return Ok((conn, pick)),
                Err(e) => {
                    warn!(cluster = %self.name, member = pick.member, addr = %pick.addr, error = %e, "member refused a connection");
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ConnectError::Member(e));
                    }
                    self.suspect(pick.member);
                    // Wait for the checks to move, or retry soon anyway.
                    let soon = tokio::time::Instant::now() + Duration::from_millis(200);
                    let _ = tokio::time::timeout_at(deadline.min(soon), rx.changed()).await;
                }
            }
        }
    }

    fn no_member(&self, role: MemberRole) -> PatroniError {
        PatroniError::NoMember {
            cluster: self.name.clone(),
            role: role_name(role),
            waited: self.checks.failover_hold,
        }
    }

    /// Checks a member again now: a connection to it just failed.
    pub(crate) fn suspect(&self, member: usize) {
        if let Some(m) = self.members.lock().expect("members poisoned").get(member) {
            m.recheck.notify_one();
        }
    }

    /// Resolves when `pick`'s member no longer holds its role: the session
    /// on it must close (HAProxy's `on-marked-down shutdown-sessions`).
    pub(crate) async fn lost(&self, pick: Pick) {
        let mut rx = self.view.subscribe();
        let _ = rx.wait_for(|v| !v.holds(pick.member, pick.role)).await;
    }

    fn record(&self, member: usize, primary: bool, replica: bool) -> bool {
        let (rise, fall) = (self.checks.rise, self.checks.fall);
        let mut members = self.members.lock().expect("members poisoned");
        let m = &mut members[member];
        let changed_primary = m.primary.record(primary, rise, fall);
        let changed_replica = m.replica.record(replica, rise, fall);
        let transition = m.primary.in_transition() || m.replica.in_transition();
        if changed_primary || changed_replica {
            let name = m.config.name.clone();
            for (role, health, changed) in [
                ("primary", m.primary, changed_primary),
                ("replica", m.replica, changed_replica),
            ] {
                if changed {
                    self.health.record(&self.name, &name, role, health.is_up());
                }
            }
            let view = view_of(&members);
            drop(members);
            self.view.send_if_modified(|current| {
                if *current == view {
                    return false;
                }
                info!(cluster = %self.name, leader = ?view.leader, replicas = ?view.replicas, "cluster view changed");
                *current = view;
                true
            });
        }
        transition
    }
}

/// The newest member to pass as primary is the leader (Patroni's lock has
/// one holder; an older "primary" is one whose failures are still counting).
fn view_of(members: &[Member]) -> View {
    let leader = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.primary.is_up())
        .max_by_key(|(_, m)| m.primary.since)
        .map(|(i, _)| i);
    let replicas = members
        .iter()
        .enumerate()
        .filter(|(i, m)| m.replica.is_up() && Some(*i) != leader)
        .map(|(i, _)| i)
        .collect();
    View { leader, replicas }
}

fn role_name(role: MemberRole) -> &'static str {
    match role {
        MemberRole::Primary => "leader",
        MemberRole::Replica => "replica",
    }
}

/// `http://host:port[/prefix]` as (`host:port`, `/prefix` without the end slash).
fn parse_api_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = authority.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some((authority.to_string(), path.to_string()))
}

/// Checks one member until its cluster is dropped: every `check_interval`,
/// and every quarter of it while a state is changing.
async fn check_forever(cluster: Weak<Cluster>, member: usize) {
    let (api, recheck, checks, lag) = {
        let Some(c) = cluster.upgrade() else { return };
        let members = c.members.lock().expect("members poisoned");
        let m = &members[member];
        let lag = c
            .checks
            .max_lag
            .map(|l| format!("?lag={l}"))
            .unwrap_or_default();
        (m.api.clone(), m.recheck.clone(), c.checks.clone(), lag)
    };
    let (authority, prefix) = api;
    let primary_path = format!("{prefix}/primary");
    let replica_path = format!("{prefix}/replica{lag}");
    loop {
        let (primary, replica) = tokio::join!(
            check(&authority, &primary_path, checks.check_timeout),
            check(&authority, &replica_path, checks.check_timeout),
        );
        let Some(c) = cluster.upgrade() else { return };
        let transition = c.record(member, primary, replica);
        drop(c);
        let wait = if transition {
            checks.check_interval / 4
        } else {
            checks.check_interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = recheck.notified() => {}
        }
    }
}

/// One check: `GET path` answered 200 within `timeout`. Patroni may answer
/// HTTP/1.0 with no headers; only the status line is read.
async fn check(authority: &str, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(authority).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: rouse-proxy\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !answer.contains(&b'\n') && answer.len() < MAX_CHECK_ANSWER {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        Some(status_of(&answer) == Some(200))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// The status code of an HTTP status line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    words.next()?.strip_prefix("HTTP/")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_count_results_in_a_row() {
        let mut h = RiseFall::default();
        assert!(h.record(true, 2, 3), "the first answer decides");
        assert!(h.is_up());
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(true, 2, 3), "a pass resets the failures");
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(false, 2, 3));
        assert!(h.in_transition());
        assert!(h.record(false, 2, 3), "third failure in a row");
        assert!(!h.is_up());
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3), "second pass in a row");
        assert!(h.is_up());
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.1 503 Service Unavailable\r\nX: y\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.0 200"), Some(200));
        assert_eq!(status_of(b"garbage"), None);
        assert_eq!(status_of(b""), None);
    }

    #[test]
    fn api_urls() {
        assert_eq!(
            parse_api_url("http://127.0.0.2:8008"),
            Some(("127.0.0.2:8008".into(), String::new()))
        );
        assert_eq!(
            parse_api_url("http://db1:8008/patroni/"),
            Some(("db1:8008".into(), "/patroni".into()))
        );
        assert_eq!(parse_api_url("https://db1:8008"), None);
        assert_eq!(parse_api_url("http://db1"), None);
    }

    fn member(primary: Option<Instant>, replica: bool) -> Member {
        Member {
            config: PatroniMember {
                name: "m".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                api: "http://127.0.0.1:2".into(),
            },
            api: ("127.0.0.1:2".into(), String::new()),
            primary: RiseFall {
                up: Some(primary.is_some()),
                streak: 0,
                since: primary,
            },
            replica: RiseFall {
                up: Some(replica),
                streak: 0,
                since: None,
            },
            recheck: Arc::new(Notify::new()),
        }
    }

    #[test]
    fn the_newest_primary_leads_and_is_no_replica() {
        let old = Instant::now();
        let new = old + Duration::from_secs(1);
        let view = view_of(&[
            member(Some(old), false),
            member(Some(new), true),
            member(None, true),
        ]);
        assert_eq!(view.leader, Some(1));
        assert_eq!(view.replicas, vec![2]);
        assert!(view.holds(2, MemberRole::Replica));
        assert!(!view.holds(0, MemberRole::Primary));
    }
}
