use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rouse_control_api::config::Config;
use rouse_control_api::telemetry::{init_logs, LogFormat};

/// A request allocates many small buffers; mimalloc serves them faster than
/// the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "rouse-proxy", version, about = "rouse data plane")]
struct Cli {
    /// Configuration file (default: the embedded configs/local.yaml).
    #[arg(long, global = true, env = "ROUSE_CONFIG")]
    config: Option<PathBuf>,
    /// Log as human-readable lines or as JSON objects.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve,
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
        Command::Serve => {
            init_logs(if cli.log_format == "json" {
                LogFormat::Json
            } else {
                LogFormat::Human
            });
            let config = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rouse-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            rouse_control_api::server::raise_open_file_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(rouse_proxy::worker_threads(&config.proxy))
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("rouse-proxy: cannot start: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let listeners = match rouse_proxy::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rouse-proxy: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = rouse_control_api::server::shutdown_signal();
    rouse_control_api::server::exit_code(
        "rouse-proxy",
        rouse_proxy::run(config, listeners, shutdown).await,
    )
}
