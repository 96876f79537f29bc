use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rouse_control::cli;
use rouse_control_api::config::Config;

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
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve,
    #[command(flatten)]
    Client(cli::Command),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Servers with thousands of connections need more than the default 1024.
fn raise_open_file_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logs(args.log_format);
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rouse-control: {e}");
            return ExitCode::from(2);
        }
    };
    match args.command {
        Command::Serve => {
            raise_open_file_limit();
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
            match rouse_control::run(config, listener, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rouse-control: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client(cmd) => {
            let url = args
                .url
                .unwrap_or_else(|| format!("http://{}", config.control.api_addr));
            match cli::run(&rouse_control_api::Client::new(&url), cmd).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rouse-control: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
