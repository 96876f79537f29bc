//! The proxy's listening sockets: bound from the configuration (or taken
//! over from the process being upgraded, by the names [`Listeners::sockets`]
//! gives them), the thread count they are served with, and the check a
//! configuration passes before any of that.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use rouse_config::{Config, ConfigError, ProxyConfig};
use rouse_control_api::DbKey;
use tokio::net::TcpListener;

use crate::upgrade::Inherited;

/// Loads and checks a configuration file as the proxy would at start, and
/// returns the proxy section as the proxy would use it.
pub fn check_config(path: Option<&std::path::Path>) -> Result<serde_json::Value, ConfigError> {
    let config = Config::load(path)?;
    Ok(serde_json::json!({ "proxy": config.proxy, "redis": config.redis }))
}

/// Threads serving clients: `proxy.worker_threads`, or by default one per
/// core the proxy may use (its CPU affinity and cgroup quota count), as
/// HAProxy's `nbthread`. An idle thread costs nothing, and under load a
/// single thread waits for a core among the app's and the database's
/// (decision 0017).
pub fn worker_threads(config: &ProxyConfig) -> usize {
    match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The proxy's listening sockets, bound before it runs (tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    pub postgres: TcpListener,
    pub postgres_ro: TcpListener,
    pub stats: TcpListener,
    /// Static listeners, each bound to one database.
    pub bound: Vec<(TcpListener, DbKey)>,
    /// Plain TCP listeners, as `proxy.tcp_listeners` lists them.
    pub tcp: Vec<TcpListener>,
    /// The Redis front, when `proxy.redis_backend` is set.
    pub redis: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` names; a socket in `inherited` (taken over from
    /// the process being upgraded) is used instead of a new one.
    pub async fn bind(config: &Config, inherited: &mut Inherited) -> std::io::Result<Listeners> {
        let p = &config.proxy;
        let mut take = |name: String, addr: SocketAddr| match inherited.remove(&name) {
            Some(l) => TcpListener::from_std(l),
            None => std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }),
        };
        let mut bound = Vec::new();
        for s in &p.static_listeners {
            bound.push((
                take(format!("static:{}", s.addr), s.addr)?,
                DbKey::new(s.app.clone(), s.database.clone()),
            ));
        }
        let mut tcp = Vec::new();
        for t in &p.tcp_listeners {
            tcp.push(take(format!("tcp:{}", t.addr), t.addr)?);
        }
        Ok(Listeners {
            http: take("http".into(), p.http_addr)?,
            postgres: take("postgres".into(), p.postgres_addr)?,
            postgres_ro: take("postgres_ro".into(), p.postgres_ro_addr)?,
            stats: take("stats".into(), p.stats_listen_addr())?,
            bound,
            tcp,
            redis: match &p.redis_backend {
                Some(_) => Some(take("redis".into(), p.redis_addr)?),
                None => None,
            },
        })
    }

    /// Every socket with the name `bind` knows it by, for an upgrade.
    pub(crate) fn sockets(&self, config: &Config) -> Vec<(String, RawFd)> {
        let p = &config.proxy;
        let mut out = vec![
            ("http".to_string(), self.http.as_raw_fd()),
            ("postgres".to_string(), self.postgres.as_raw_fd()),
            ("postgres_ro".to_string(), self.postgres_ro.as_raw_fd()),
            ("stats".to_string(), self.stats.as_raw_fd()),
        ];
        for ((l, _), s) in self.bound.iter().zip(&p.static_listeners) {
            out.push((format!("static:{}", s.addr), l.as_raw_fd()));
        }
        for (l, t) in self.tcp.iter().zip(&p.tcp_listeners) {
            out.push((format!("tcp:{}", t.addr), l.as_raw_fd()));
        }
        if let Some(l) = &self.redis {
            out.push(("redis".to_string(), l.as_raw_fd()));
        }
        out
    }
}
