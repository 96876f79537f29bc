//! The operator's command line: the same binary talks to a running daemon.

use clap::Subcommand;
use rouse_control_api::{
    BackendCredentials, Client, ClientError, CreateApp, CreateDatabase, DatabaseInfo, Engine, Name,
    PatroniDiscovery, PatroniMember, PatroniRegistration, PoolMode, RestoreRequest, Role,
};
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apps (tenants).
    App {
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// API keys of an app.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Postgres logins of an app.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Databases.
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Control API tokens (admin only).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Control nodes and their capacity.
    Nodes,
    /// What each node holds and how much more it can take.
    Capacity,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make a token; it is shown once.
    Create {
        /// admin, proxy or app:<name>.
        #[arg(long)]
        role: Role,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppCmd {
    Create {
        name: Name,
        /// Proxies must not create databases when a client first uses them.
        #[arg(long)]
        no_create_on_first_access: bool,
    },
    /// Delete an app with its databases (their data removed), keys and
    /// logins; --confirm must repeat its name.
    Delete {
        name: Name,
        #[arg(long)]
        confirm: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Issue a key; it is shown once.
    Create {
        app: Name,
    },
    List {
        app: Name,
    },
    Revoke {
        app: Name,
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create or update a login (password from --password or ROUSE_PASSWORD).
    Create {
        app: Name,
        name: String,
        #[arg(long, env = "ROUSE_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Remove a login: every proxy refuses it within a second.
    Delete { app: Name, name: String },
}

#[derive(Subcommand, Debug)]
pub enum DbCmd {
    /// Register an existing Patroni cluster as database NAME of APP (the
    /// database of that name inside the cluster).
    RegisterPatroni {
        app: Name,
        name: Name,
        /// A member as NAME=HOST:PORT,REST_API_URL, e.g.
        /// pg1=10.0.0.1:5432,http://10.0.0.1:8008; once per member.
        #[arg(long = "member", value_parser = parse_member, required_unless_present = "scope", conflicts_with = "scope")]
        members: Vec<PatroniMember>,
        /// Instead of members: the cluster's Patroni scope, whose members
        /// are read from etcd and followed.
        #[arg(long, requires = "etcd")]
        scope: Option<String>,
        /// An etcd client URL (with --scope); once per endpoint.
        #[arg(long = "etcd")]
        etcd: Vec<String>,
        /// Patroni's namespace in etcd (with --scope; default /service).
        #[arg(long, requires = "scope")]
        namespace: Option<String>,
        /// A superuser through which the app's users become roles.
        #[arg(long, default_value = "postgres")]
        admin_user: String,
        #[arg(long, env = "ROUSE_ADMIN_PASSWORD", hide_env_values = true)]
        admin_password: String,
    },
    Create {
        app: Name,
        name: Name,
        #[arg(long, default_value = "rqlite")]
        engine: Engine,
        /// Replicas (rqlite); the configured default when omitted.
        #[arg(long)]
        replicas: Option<u32>,
    },
    List {
        #[arg(long)]
        app: Option<Name>,
    },
    Status {
        app: Name,
        name: Name,
    },
    Wake {
        app: Name,
        name: Name,
    },
    Hibernate {
        app: Name,
        name: Name,
        /// Even with open sessions.
        #[arg(long)]
        force: bool,
    },
    Drop {
        app: Name,
        name: Name,
    },
    /// How proxies pool PostgreSQL connections: session or transaction.
    PoolMode {
        app: Name,
        name: Name,
        mode: PoolMode,
    },
    /// Back a database up now.
    Backup {
        app: Name,
        name: Name,
    },
    /// A database's backups, oldest first (also of a dropped one).
    Backups {
        app: Name,
        name: Name,
    },
    /// Put a backup back: the latest, a given one, or (PostgreSQL) a point
    /// in time; into the database itself or, with --as, a new one.
    Restore {
        app: Name,
        name: Name,
        #[arg(long)]
        backup: Option<String>,
        /// PostgreSQL: RFC 3339, e.g. 2026-12-03T23:15:00Z.
        #[arg(long)]
        time: Option<String>,
        /// Restore into this database (created when it does not exist).
        #[arg(long = "as")]
        as_name: Option<Name>,
        /// Overwrite a database that has data.
        #[arg(long)]
        force: bool,
    },
}

fn print<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialise")
    );
}

fn print_table(dbs: &[DatabaseInfo]) {
    println!(
        "{:<20} {:<20} {:<9} {:>3} {:<12} {:<22}",
        "APP", "DATABASE", "ENGINE", "RF", "STATUS", "LEADER"
    );
    for d in dbs {
        let leader = d
            .endpoints
            .first()
            .map(|e| e.addr())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<20} {:<9} {:>3} {:<12} {:<22}",
            d.app,
            d.name,
            d.engine.as_str(),
            d.replication_factor,
            d.status.as_str(),
            leader
        );
    }
}

pub async fn run(client: &Client, cmd: Command) -> Result<(), ClientError> {
    match cmd {
        Command::App { cmd } => match cmd {
            AppCmd::Create {
                name,
                no_create_on_first_access,
            } => print(
                &client
                    .create_app_with(&CreateApp {
                        name,
                        create_on_first_access: !no_create_on_first_access,
                    })
                    .await?,
            ),
            AppCmd::Delete { name, confirm } => print(&client.delete_app(&name, &confirm).await?),
        },
        Command::Key { cmd } => match cmd {
            KeyCmd::Create { app } => print(&client.create_key(&app).await?),
            KeyCmd::List { app } => print(&client.list_keys(&app).await?),
            KeyCmd::Revoke { app, id } => print(&client.delete_key(&app, &id).await?),
        },
        Command::User { cmd } => match cmd {
            UserCmd::Create {
                app,
                name,
                password,
            } => print(&client.create_user(&app, &name, &password).await?),
            UserCmd::Delete { app, name } => print(&client.delete_user(&app, &name).await?),
        },
        Command::Db { cmd } => match cmd {
            DbCmd::Create {
                app,
                name,
                engine,
                replicas,
            } => print(
                &client
                    .create_database(&CreateDatabase {
                        app,
                        name,
                        engine,
                        replication_factor: replicas,
                        patroni: None,
                    })
                    .await?,
            ),
            DbCmd::RegisterPatroni {
                app,
                name,
                members,
                scope,
                etcd,
                namespace,
                admin_user,
                admin_password,
            } => print(
                &client
                    .create_database(&CreateDatabase {
                        app,
                        name,
                        engine: Engine::Patroni,
                        replication_factor: None,
                        patroni: Some(PatroniRegistration {
                            members,
                            discovery: scope.map(|scope| PatroniDiscovery {
                                etcd,
                                scope: Some(scope),
                                namespace,
                            }),
                            admin: BackendCredentials {
                                user: admin_user,
                                password: admin_password,
                            },
                        }),
                    })
                    .await?,
            ),
            DbCmd::List { app } => {
                print_table(&client.list_databases(app.as_ref()).await?.databases)
            }
            DbCmd::Status { app, name } => print(&client.database(&app, &name).await?),
            DbCmd::Wake { app, name } => print(&client.wake(&app, &name).await?),
            DbCmd::Hibernate { app, name, force } => {
                print(&client.hibernate(&app, &name, force).await?)
            }
            DbCmd::Drop { app, name } => print(&client.drop_database(&app, &name).await?),
            DbCmd::PoolMode { app, name, mode } => {
                print(&client.set_pool_mode(&app, &name, mode).await?)
            }
            DbCmd::Backup { app, name } => print(&client.backup(&app, &name).await?),
            DbCmd::Backups { app, name } => print(&client.backups(&app, &name).await?),
            DbCmd::Restore {
                app,
                name,
                backup,
                time,
                as_name,
                force,
            } => print(
                &client
                    .restore(
                        &app,
                        &name,
                        &RestoreRequest {
                            backup,
                            time,
                            as_name,
                            force,
                        },
                    )
                    .await?,
            ),
        },
        Command::Token { cmd } => match cmd {
            TokenCmd::Create { role } => print(&client.create_token(&role).await?),
            TokenCmd::List => print(&client.list_tokens().await?),
            TokenCmd::Revoke { id } => print(&client.revoke_token(&id).await?),
        },
        Command::Nodes => print(&client.nodes().await?),
        Command::Capacity => print(&client.capacity().await?),
    }
    Ok(())
}

/// `NAME=HOST:PORT,REST_API_URL`
fn parse_member(s: &str) -> Result<PatroniMember, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT,REST_API_URL"))?;
    let (addr, api) = rest
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT,REST_API_URL"))?;
    Ok(PatroniMember {
        name: name.to_string(),
        addr: addr
            .parse()
            .map_err(|e| format!("{s:?}: bad address {addr:?}: {e}"))?,
        api: api.to_string(),
    })
}

/// The token the command line calls with: `ROUSE_TOKEN`, else the admin
/// token that the founding node wrote under `data_dir`.
pub fn token(data_dir: &std::path::Path) -> Option<String> {
    std::env::var("ROUSE_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| {
            let file = data_dir
                .join(rouse_control_api::access::TOKENS_DIR)
                .join("admin");
            std::fs::read_to_string(file).ok()
        })
}
