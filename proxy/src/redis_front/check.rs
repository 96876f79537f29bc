//! The checks: which address a sentinel names as the master, and which role
//! a server says it has (`ROLE`, else `INFO replication` for users whose
//! ACL allows only that, as HAProxy's usual Redis check needs).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::link::Dialer;
use super::resp::{self, Reply, RespError};
use crate::net::MaybeTls;

/// A check that has not answered within this time failed.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Master,
    Replica,
    /// A sentinel, say: not a server to send clients to.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("{addr}: cannot connect: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {CHECK_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{addr}: {source}")]
    Reply { addr: String, source: RespError },
    #[error("{addr} refused {command}: {message}")]
    Refused {
        addr: String,
        command: &'static str,
        message: String,
    },
    #[error("{addr}: unexpected reply to {command}")]
    Unexpected { addr: String, command: &'static str },
    #[error("sentinel {addr} knows no master named {name:?}")]
    UnknownMaster { addr: String, name: String },
}

/// Asks servers and sentinels, with the credentials the config gives.
pub(crate) struct Checker {
    dialer: Arc<Dialer>,
    username: Option<String>,
    password: Option<String>,
    sentinel_password: Option<String>,
}

impl Checker {
    pub(crate) fn new(
        dialer: Arc<Dialer>,
        username: Option<String>,
        password: Option<String>,
        sentinel_password: Option<String>,
    ) -> Checker {
        Checker {
            dialer,
            username,
            password,
            sentinel_password,
        }
    }

    /// The role server `addr` says it has.
    pub(crate) async fn role(&self, addr: &str) -> Result<Role, CheckError> {
        let auth = auth(self.username.as_deref(), self.password.as_deref());
        self.timed(addr, async {
            let mut link = self.connect(addr).await?;
            let reply = ask(&mut link, addr, auth.as_deref(), &[b"ROLE"]).await?;
            if !matches!(reply, Reply::Error(_)) {
                return role_of(&reply).ok_or_else(|| CheckError::Unexpected {
                    addr: addr.into(),
                    command: "ROLE",
                });
            }
            match ask(&mut link, addr, None, &[b"INFO", b"replication"]).await? {
                Reply::Error(message) => Err(CheckError::Refused {
                    addr: addr.into(),
                    command: "ROLE and INFO",
                    message,
                }),
                reply => {
                    reply
                        .text()
                        .and_then(role_in_info)
                        .ok_or_else(|| CheckError::Unexpected {
                            addr: addr.into(),
                            command: "INFO replication",
                        })
                }
            }
        })
        .await
    }

    /// The master's address (`host:port`) as sentinel `addr` knows it.
    pub(crate) async fn sentinel_master(
        &self,
        addr: &str,
        name: &str,
    ) -> Result<String, CheckError> {
        const COMMAND: &str = "SENTINEL get-master-addr-by-name";
        let command: &[&[u8]] = &[b"SENTINEL", b"get-master-addr-by-name", name.as_bytes()];
        match self.ask_sentinel(addr, COMMAND, command).await?.1 {
            Reply::Array(None) | Reply::Bulk(None) => Err(CheckError::UnknownMaster {
                addr: addr.into(),
                name: name.into(),
            }),
            reply => master_addr(&reply).ok_or_else(|| CheckError::Unexpected {
                addr: addr.into(),
                command: COMMAND,
            }),
        }
    }

    /// A link to sentinel `addr`, subscribed to `channel`.
    pub(crate) async fn subscribe(
        &self,
        addr: &str,
        channel: &str,
    ) -> Result<MaybeTls, CheckError> {
        let command: &[&[u8]] = &[b"SUBSCRIBE", channel.as_bytes()];
        Ok(self.ask_sentinel(addr, "SUBSCRIBE", command).await?.0)
    }

    /// Sends `command` (called `what`) to sentinel `addr`, logged in; the
    /// link and the reply, unless it is an error.
    async fn ask_sentinel(
        &self,
        addr: &str,
        what: &'static str,
        command: &[&[u8]],
    ) -> Result<(MaybeTls, Reply), CheckError> {
        let auth = auth(None, self.sentinel_password.as_deref());
        self.timed(addr, async {
            let mut link = self.connect(addr).await?;
            match ask(&mut link, addr, auth.as_deref(), command).await? {
                Reply::Error(message) => Err(CheckError::Refused {
                    addr: addr.into(),
                    command: what,
                    message,
                }),
                reply => Ok((link, reply)),
            }
        })
        .await
    }

    async fn connect(&self, addr: &str) -> Result<MaybeTls, CheckError> {
        self.dialer
            .connect(addr)
            .await
            .map_err(|source| CheckError::Connect {
                addr: addr.into(),
                source,
            })
    }

    async fn timed<T>(
        &self,
        addr: &str,
        check: impl std::future::Future<Output = Result<T, CheckError>>,
    ) -> Result<T, CheckError> {
        tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| Err(CheckError::Timeout { addr: addr.into() }))
    }
}

/// `AUTH [username] password`, when there is a password.
fn auth<'a>(username: Option<&'a str>, password: Option<&'a str>) -> Option<Vec<&'a [u8]>> {
    let password = password?.as_bytes();
    Some(match username {
        Some(user) => vec![b"AUTH", user.as_bytes(), password],
        None => vec![b"AUTH", password],
    })
}

/// Sends AUTH (if any) and `command` in one write; the reply to `command`.
async fn ask(
    link: &mut MaybeTls,
    addr: &str,
    auth: Option<&[&[u8]]>,
    command: &[&[u8]],
) -> Result<Reply, CheckError> {
    let reply_error = |source| CheckError::Reply {
        addr: addr.into(),
        source,
    };
    let mut out = BytesMut::with_capacity(128);
    if let Some(auth) = auth {
        resp::command(&mut out, auth);
    }
    resp::command(&mut out, command);
    // Flushed: TLS may hold written bytes back.
    async {
        link.write_all(&out).await?;
        link.flush().await
    }
    .await
    .map_err(|e| reply_error(e.into()))?;
    let mut buf = BytesMut::new();
    if auth.is_some() {
        if let Reply::Error(message) = resp::read_reply(link, &mut buf)
            .await
            .map_err(reply_error)?
        {
            return Err(CheckError::Refused {
                addr: addr.into(),
                command: "AUTH",
                message,
            });
        }
    }
    resp::read_reply(link, &mut buf).await.map_err(reply_error)
}

/// The role in a `ROLE` reply: its first element.
fn role_of(reply: &Reply) -> Option<Role> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    Some(match items.first()?.text()? {
        b"master" => Role::Master,
        b"slave" | b"replica" => Role::Replica,
        _ => Role::Other,
    })
}

/// The `role:` line of `INFO replication`.
fn role_in_info(info: &[u8]) -> Option<Role> {
    let info = std::str::from_utf8(info).ok()?;
    info.lines()
        .find_map(|l| l.trim_end().strip_prefix("role:"))
        .map(|role| match role {
            "master" => Role::Master,
            "slave" | "replica" => Role::Replica,
            _ => Role::Other,
        })
}

/// `host:port` from a sentinel's `[host, port]` answer.
fn master_addr(reply: &Reply) -> Option<String> {
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    let [host, port] = &items[..] else {
        return None;
    };
    let host = std::str::from_utf8(host.text()?).ok()?;
    let port: u16 = std::str::from_utf8(port.text()?).ok()?.parse().ok()?;
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn roles() {
        let master = Reply::Array(Some(vec![
            bulk("master"),
            Reply::Integer(0),
            Reply::Array(Some(vec![])),
        ]));
        assert_eq!(role_of(&master), Some(Role::Master));
        let replica = Reply::Array(Some(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            Reply::Integer(6379),
            bulk("connected"),
            Reply::Integer(1),
        ]));
        assert_eq!(role_of(&replica), Some(Role::Replica));
        let sentinel = Reply::Array(Some(vec![bulk("sentinel"), Reply::Array(Some(vec![]))]));
        assert_eq!(role_of(&sentinel), Some(Role::Other));
        assert_eq!(role_of(&Reply::Array(Some(vec![]))), None);
        assert_eq!(role_of(&bulk("master")), None);
    }

    #[test]
    fn roles_in_info() {
        let info = b"# Replication\r\nrole:master\r\nconnected_slaves:0\r\n";
        assert_eq!(role_in_info(info), Some(Role::Master));
        assert_eq!(
            role_in_info(b"# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n"),
            Some(Role::Replica)
        );
        assert_eq!(role_in_info(b"# Replication\r\n"), None);
    }

    #[test]
    fn sentinel_answers() {
        let answer = Reply::Array(Some(vec![bulk("10.0.0.7"), bulk("6379")]));
        assert_eq!(master_addr(&answer).as_deref(), Some("10.0.0.7:6379"));
        let v6 = Reply::Array(Some(vec![bulk("::1"), bulk("6379")]));
        assert_eq!(master_addr(&v6).as_deref(), Some("[::1]:6379"));
        let bad_port = Reply::Array(Some(vec![bulk("h"), bulk("x")]));
        assert_eq!(master_addr(&bad_port), None);
        assert_eq!(master_addr(&Reply::Array(Some(vec![bulk("h")]))), None);
    }

    #[test]
    fn auth_commands() {
        assert_eq!(auth(Some("u"), None), None);
        assert_eq!(auth(None, Some("p")), Some(vec![&b"AUTH"[..], b"p"]));
        assert_eq!(
            auth(Some("u"), Some("p")),
            Some(vec![&b"AUTH"[..], b"u", b"p"])
        );
    }
}
