use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rouse_config::Config;
use rouse_control::cli;
use rouse_runtime::server::exit_code;
use rouse_runtime::telemetry::{init_logs, LogFormat};

#[derive(Parser)]
#[command(
    name = "rouse-control",
    version,
    about = "rouse lifecycle daemon and its command line"
)]
struct Args {
    /// Configuration file (default: the embedded configs/local.yaml).
    #[arg(long, global = true, env = "ROUSE_CONFIG")]
    config: Option<PathBuf>,
    /// Control API to talk to (default: control.api_addr of the config).
    #[arg(long, global = true, env = "ROUSE_CONTROL_URL")]
    url: Option<String>,
    /// CA certificates (PEM) to check an `https://` control with.
    #[arg(long, global = true, env = "ROUSE_CONTROL_CA")]
    ca_file: Option<PathBuf>,
    /// Log as human-readable lines or as JSON objects.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Take over from the daemon running on the same data directory:
        /// it stops, its engines keep running and this one adopts them.
        #[arg(long)]
        upgrade: bool,
    },
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> ExitCode {
    // Before the runtime starts any thread.
    rouse_runtime::memory::limit_arenas(2);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the runtime starts")
        .block_on(run())
}

async fn run() -> ExitCode {
    let args = Args::parse();
    init_logs(if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Human
    });
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rouse-control: {e}");
            return ExitCode::from(2);
        }
    };
    match args.command {
        Command::Serve { upgrade } => {
            rouse_runtime::server::raise_open_file_limit();
            if let Err(e) = rouse_control::make_way(&config, upgrade).await {
                eprintln!("rouse-control: {e}");
                return ExitCode::from(2);
            }
            let listener = match tokio::net::TcpListener::bind(config.control.api_addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "rouse-control: cannot listen on {}: {e}",
                        config.control.api_addr
                    );
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = rouse_runtime::server::shutdown_signal();
            tokio::spawn(ignore_hangups());
            exit_code(
                "rouse-control",
                rouse_control::run(config, listener, shutdown).await,
            )
        }
        Command::Client(cmd) => {
            let scheme = if config.control.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let url = args
                .url
                .unwrap_or_else(|| format!("{scheme}://{}", config.control.api_addr));
            let mut client = rouse_control_api::Client::new(&url);
            if let Some(file) = args.ca_file {
                let trusted = std::fs::read(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| client.with_ca(&pem));
                client = match trusted {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("rouse-control: --ca-file {}: {e}", file.display());
                        return ExitCode::from(2);
                    }
                };
            }
            if let Some(token) = cli::token(&config.node.data_dir) {
                client = client.with_token(token);
            }
            exit_code("rouse-control", cli::run(&client, cmd).await)
        }
    }
}

/// A SIGHUP (a `reload` meant for the proxy, a closed terminal) would end
/// the daemon and every database with it: it is logged and ignored.
async fn ignore_hangups() {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::warn!("SIGHUP ignored: rouse-control does not reload its configuration; restart it to apply changes");
    }
}
