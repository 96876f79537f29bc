//! `rouse-bench`: side-by-side measurements of rouse against the bare
//! engines (and, for the data plane, HAProxy and PgBouncer), in one run.

mod stats;
mod wake;

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
    /// Wake latency (API call to active) per engine, beside the bare
    /// engine's own cold start on the same data, interleaved.
    Wake {
        /// Hibernate/wake cycles per engine and side.
        #[arg(long, default_value_t = 20)]
        cycles: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Wake { cycles } => println!("{}", wake::run(cycles).await?),
    }
    Ok(())
}
