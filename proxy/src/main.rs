use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rouse-proxy", version, about = "rouse data plane")]
struct Cli {
    /// Configuration file (default: the embedded configs/local.yaml).
    #[arg(long, global = true, env = "ROUSE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and print the effective proxy settings.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig => match rouse_proxy::check_config(cli.config.as_deref()) {
            Ok(effective) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&effective).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rouse-proxy: {e}");
                ExitCode::from(2)
            }
        },
    }
}
