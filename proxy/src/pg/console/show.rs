//! The tables of the admin console, in PgBouncer's column layout so that
//! its scripts and exporters read them unchanged. A database is named
//! `<app>_<db>`; a user `<role>.<app>`, as clients log in.

use std::collections::BTreeMap;

use rouse_control_api::DbKey;

use super::super::PgFront;
use super::commands::Show;

/// Column names, and rows of text (`None` is NULL).
pub(super) type Table = (&'static [&'static str], Vec<Vec<Option<String>>>);

const POOLS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];
/// SHOW CLIENTS and SHOW SERVERS.
const CONNECTIONS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];
const DATABASES: &[&str] = &[
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "server_lifetime",
    "pool_mode",
    "load_balance_hosts",
    "max_connections",
    "current_connections",
    "paused",
    "disabled",
];
const WAKES: &[&str] = &["database", "ended_at", "wait_ms", "outcome"];
const HELP: &[&str] = &["command"];
const VERSION: &[&str] = &["version"];

/// Columns that hold text; every other column holds a number, and is
/// typed so (int8) for exporters that read them as numbers.
const TEXT_COLUMNS: &[&str] = &[
    "database",
    "user",
    "pool_mode",
    "type",
    "state",
    "addr",
    "local_addr",
    "connect_time",
    "request_time",
    "ptr",
    "link",
    "tls",
    "application_name",
    "name",
    "host",
    "force_user",
    "load_balance_hosts",
    "ended_at",
    "outcome",
    "command",
    "version",
];

pub(super) fn is_number(column: &str) -> bool {
    !TEXT_COLUMNS.contains(&column)
}

pub(super) fn text(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// Unix ms as PgBouncer prints times.
fn timestamp(ms: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).ok()?;
    Some(format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

impl PgFront {
    pub(super) async fn show(&self, what: Show) -> Table {
        match what {
            Show::Help => (
                HELP,
                [
                    "SHOW HELP|POOLS|CLIENTS|SERVERS|DATABASES|STATS|STATS_TOTALS|STATS_AVERAGES|WAKES|VERSION",
                    "PAUSE [<app>_<db>]",
                    "RESUME [<app>_<db>]",
                    "RECONNECT [<app>_<db>]",
                    "KILL <app>_<db>",
                    "RELOAD",
                ]
                .iter()
                .map(|c| vec![text(c)])
                .collect(),
            ),
            Show::Version => (
                VERSION,
                vec![vec![text(format!("rouse {}", env!("CARGO_PKG_VERSION")))]],
            ),
            Show::Pools => (POOLS, self.pools_table()),
            Show::Clients => (CONNECTIONS, self.clients_table()),
            Show::Servers => (CONNECTIONS, self.servers_table()),
            Show::Databases => (DATABASES, self.databases_table().await),
            Show::Wakes => (WAKES, self.wakes_table()),
            Show::Stats(which) => super::stats::table(&self.traffic, which),
        }
    }

    /// One row per (database, user): session clients with their own
    /// backend, and transaction pools.
    fn pools_table(&self) -> Vec<Vec<Option<String>>> {
        // (database, user) -> (clients, waiting, active, idle, mode)
        let mut pools: BTreeMap<(String, String), [usize; 4]> = BTreeMap::new();
        let mut modes = BTreeMap::new();
        for c in self.clients.all() {
            let id = (c.key.internal(), c.user());
            pools.entry(id.clone()).or_default()[0] += 1;
            if c.session_pooled {
                pools.entry(id.clone()).or_default()[2] += 1;
                modes.insert(id, "session");
            }
        }
        for ((key, role, _ro), pool) in self.pools.lock().expect("pools poisoned").iter() {
            let id = (key.internal(), format!("{role}.{}", key.app));
            let counts = pool.counts();
            let row = pools.entry(id.clone()).or_default();
            row[1] += counts.waiting;
            row[2] += counts.active;
            row[3] += counts.idle;
            modes.insert(id, "transaction");
        }
        pools
            .into_iter()
            .map(|(id, [clients, waiting, active, idle])| {
                let mode = modes.get(&id).copied().unwrap_or("session");
                vec![
                    text(&id.0),
                    text(&id.1),
                    text(clients.saturating_sub(waiting)),
                    text(waiting),
                    text(0),
                    text(0),
                    text(active),
                    text(0),
                    text(0),
                    text(idle),
                    text(0),
                    text(0),
                    text(0),
                    text(0),
                    text(0),
                    text(mode),
                ]
            })
            .collect()
    }

    fn clients_table(&self) -> Vec<Vec<Option<String>>> {
        self.clients
            .all()
            .iter()
            .map(|c| {
                connection_row(
                    "C",
                    &c.user(),
                    &c.key,
                    if self.clients.is_paused(&c.key) {
                        "waiting"
                    } else {
                        "active"
                    },
                    Some(c.addr),
                    c.connected_at(),
                    c.tls,
                    c.application_name(),
                    c.id,
                )
            })
            .collect()
    }

    /// Session backends (one per session client, `link` naming it), then
    /// each transaction pool's connections.
    fn servers_table(&self) -> Vec<Vec<Option<String>>> {
        let mut rows: Vec<_> = self
            .clients
            .all()
            .iter()
            .filter_map(|c| {
                let backend = c.backend()?;
                let mut row = connection_row(
                    "S",
                    &c.user(),
                    &c.key,
                    "active",
                    Some(backend),
                    c.connected_at(),
                    false,
                    "",
                    c.id,
                );
                row[14] = text(c.id);
                Some(row)
            })
            .collect();
        let now = rouse_runtime::clock::now_ms();
        for ((key, role, _ro), pool) in self.pools.lock().expect("pools poisoned").iter() {
            let user = format!("{role}.{}", key.app);
            let (idle, lent_to) = pool.servers();
            for (addr, age) in idle {
                let born = now.saturating_sub(age.as_millis() as u64);
                rows.push(connection_row(
                    "S",
                    &user,
                    key,
                    "idle",
                    Some(addr),
                    born,
                    false,
                    "",
                    0,
                ));
            }
            for _ in 0..pool.counts().active {
                rows.push(connection_row(
                    "S", &user, key, "active", lent_to, now, false, "", 0,
                ));
            }
        }
        rows
    }

    /// Every database control knows, with where it runs when it runs.
    async fn databases_table(&self) -> Vec<Vec<Option<String>>> {
        let Ok(list) = self.control.list_databases(None).await else {
            return Vec::new();
        };
        let sessions = self.clients.all();
        list.databases
            .iter()
            .map(|d| {
                let key = DbKey::new(d.app.clone(), d.name.clone());
                let leader = d.endpoints.first();
                vec![
                    text(key.internal()),
                    leader.map(|e| e.host.clone()),
                    leader.map(|e| e.port.to_string()),
                    text(&d.name),
                    None,
                    text(self.pool_size),
                    text(0),
                    text(0),
                    text(self.pool_times.server_lifetime.as_secs()),
                    text(format!("{:?}", d.pool_mode).to_lowercase()),
                    None,
                    text(0),
                    text(sessions.iter().filter(|c| c.key == key).count()),
                    text(u8::from(self.clients.is_paused(&key))),
                    text(0),
                ]
            })
            .collect()
    }

    fn wakes_table(&self) -> Vec<Vec<Option<String>>> {
        self.resolver
            .wake_history()
            .into_iter()
            .rev()
            .map(|w| {
                vec![
                    text(&w.db),
                    timestamp(w.at),
                    text(w.ms),
                    text(if w.ok { "woke" } else { "failed" }),
                ]
            })
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn connection_row(
    kind: &str,
    user: &str,
    key: &DbKey,
    state: &str,
    addr: Option<std::net::SocketAddr>,
    connected_at: u64,
    tls: bool,
    application_name: &str,
    id: u64,
) -> Vec<Option<String>> {
    vec![
        text(kind),
        text(user),
        text(key.internal()),
        text(state),
        addr.map(|a| a.ip().to_string()),
        addr.map(|a| a.port().to_string()),
        None,
        None,
        timestamp(connected_at),
        timestamp(connected_at),
        text(0),
        text(0),
        text(0),
        text(format!("{id:x}")),
        None,
        text(0),
        tls.then(|| "TLS".to_string()),
        text(application_name),
        text(0),
        text(id),
    ]
}
