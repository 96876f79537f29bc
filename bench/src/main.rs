//! `rouse-bench`: side-by-side measurements of rouse against the bare
//! engines (and, for the data plane, HAProxy and PgBouncer), in one run.

mod active_set;
mod backups;
mod chart;
mod cluster;
mod cpu;
mod density;
mod http;
mod pg;
mod pg_http;
mod pg_idle;
mod redis;
mod report;
mod sessions;
mod stats;
mod wake;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rouse-bench",
    about = "rouse benchmarks, side by side with the bare engines"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every comparison below in one run (about 23 minutes on two cores),
    /// written as one Markdown report with PNG charts.
    All {
        /// Small sizes everywhere: a smoke run of a couple of minutes.
        #[arg(long)]
        quick: bool,
        /// Directory for README.md and the charts.
        #[arg(long, default_value = "bench/report")]
        out: PathBuf,
    },
    /// Wake latency (API call to active) per engine, beside the bare
    /// engine's own cold start on the same data, interleaved.
    Wake {
        /// Hibernate/wake cycles per engine and side.
        #[arg(long, default_value_t = 20)]
        cycles: usize,
    },
    /// Thousands of rqlite databases on one node: create rate, control and
    /// `_system` cost per stored database, engine memory per running one,
    /// and a storm of 100 distinct wakes from two apps beside 100 bare
    /// rqlited cold starts at once.
    Density {
        #[arg(long, default_value_t = 2000)]
        databases: usize,
    },
    /// Backup and restore time of a large rqlite database and a pgbench
    /// PostgreSQL database, and what `backups.on_hibernate` adds to a
    /// hibernation.
    Backups {
        /// Size of the rqlite database.
        #[arg(long, default_value_t = 1024)]
        rqlite_mib: usize,
        /// pgbench scale of the PostgreSQL database.
        #[arg(long, default_value_t = 50)]
        pg_scale: u32,
    },
    /// pgbench through rouse, HAProxy (mode tcp) and PgBouncer, beside the
    /// bare server.
    Pg {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// A point read through `/sql` (Neon's SQL over HTTP) and through the
    /// gateway API, beside the same read over PostgreSQL connections (bare
    /// and through rouse's Postgres port), at one client and at many.
    PgHttp {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
    /// Memory per idle PostgreSQL client, rouse beside PgBouncer; then
    /// pgbench on some of the clients while the others stay idle.
    PgIdle {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Of the clients, how many pgbench drives.
        #[arg(long, default_value_t = 1_000)]
        active: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// rqlite HTTP throughput and p99 through rouse, HAProxy and bare
    /// rqlited (wrk), and 500 requests arriving at a hibernated database.
    Http {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
    },
    /// Create and wake times of a 3-replica database spread over 3 nodes,
    /// and recovery to 3 replicas after a node holding one is killed.
    Cluster {
        #[arg(long, default_value_t = 20)]
        cycles: usize,
        /// Node kills (each followed by the node's return).
        #[arg(long, default_value_t = 3)]
        kills: usize,
    },
    /// redis-benchmark GET/SET, pipelined and not, through rouse's Redis
    /// front and HAProxy (mode tcp), beside the bare server; then what a
    /// credential check costs when cached, shared through Redis, or not.
    Redis {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Requests per unpipelined run (pipelined runs make 10 times as many).
        #[arg(long, default_value_t = 300_000)]
        requests: usize,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        /// API keys checked per case in the credential-check part.
        #[arg(long, default_value_t = 500)]
        keys: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Thousands of client sockets, here and in the servers started from here.
    rouse_runtime::server::raise_open_file_limit();
    match Args::parse().command {
        Command::All { quick, out } => {
            let sizes = if quick {
                report::Sizes::QUICK
            } else {
                report::Sizes::FULL
            };
            report::all(&sizes, quick, &out).await?;
            println!("{}", out.join("README.md").display());
        }
        Command::Wake { cycles } => println!("{}", wake::run(cycles).await?),
        Command::Density { databases } => println!("{}", density::run(databases).await?),
        Command::Backups {
            rqlite_mib,
            pg_scale,
        } => println!("{}", backups::run(rqlite_mib, pg_scale).await?),
        Command::Cluster { cycles, kills } => println!("{}", cluster::run(cycles, kills).await?),
        Command::PgIdle {
            clients,
            active,
            seconds,
        } => println!("{}", pg_idle::idle(clients, active, seconds).await?),
        Command::Pg { rounds, seconds } => println!("{}", pg::run(rounds, seconds).await?),
        Command::PgHttp {
            rounds,
            seconds,
            clients,
        } => println!("{}", pg_http::run(rounds, seconds, clients).await?),
        Command::Http {
            rounds,
            seconds,
            connections,
        } => println!("{}", http::run(rounds, seconds, connections).await?),
        Command::Redis {
            rounds,
            requests,
            clients,
            keys,
        } => {
            println!("{}", redis::run(rounds, requests, clients).await?);
            println!("{}", sessions::run(keys).await?);
        }
    }
    Ok(())
}
