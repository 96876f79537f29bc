//! The `rouse-proxy` command line: `serve` (optionally taking over the
//! listening sockets of a running proxy) and `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rouse_config::Config;
use rouse_runtime::telemetry::{init_logs, LogFormat};

/// A request allocates many small buffers; mimalloc serves them faster than
/// the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run by a worker about to sleep. A block freed on another thread than
/// the one that allocated it waits in its page until the owner collects,
/// which mimalloc does only while the owner allocates; a session's login
/// garbage and task are often freed by the other worker, and once every
/// client idles no worker allocates, so that memory stayed resident (0.3
/// KiB per idle client with two workers). Collecting costs a walk over the
/// thread's partly used pages, under 1 % of the proxy's CPU at full load.
fn take_back_remote_frees() {
    // SAFETY: mi_collect only touches the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// A worker that sleeps while another frees into its pages would keep
/// them until it next wakes; a task scheduled now and then wakes a
/// sleeping worker to look for it, and so to collect on its way back to
/// sleep.
async fn wake_sleeping_workers() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tick.tick().await;
        tokio::spawn(async {});
    }
}

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
    Serve {
        /// Take over the listening sockets of the proxy running with the same
        /// `proxy.upgrade_socket` (graceful upgrade), which then drains.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration file and print the effective proxy settings.
    CheckConfig,
}

fn main() -> ExitCode {
    // The proxy starts no processes that would inherit this.
    rouse_runtime::memory::no_huge_pages();
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
        Command::Serve { upgrade } => {
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
            rouse_runtime::server::raise_open_file_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(rouse_proxy::worker_threads(&config.proxy))
                .on_thread_park(take_back_remote_frees)
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("rouse-proxy: cannot start: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.spawn(wake_sleeping_workers());
            runtime.block_on(serve(config, cli.config, upgrade))
        }
    }
}

async fn serve(config: Config, path: Option<PathBuf>, upgrade: bool) -> ExitCode {
    let (mut inherited, handover) = match (upgrade, &config.proxy.upgrade_socket) {
        (false, _) => (Default::default(), None),
        (true, None) => {
            eprintln!("rouse-proxy: --upgrade needs proxy.upgrade_socket");
            return ExitCode::from(2);
        }
        (true, Some(socket)) => match rouse_proxy::upgrade::take(socket) {
            Ok((inherited, handover)) => (inherited, Some(handover)),
            Err(e) => {
                eprintln!(
                    "rouse-proxy: cannot take over from {}: {e}",
                    socket.display()
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let listeners = match rouse_proxy::Listeners::bind(&config, &mut inherited).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rouse-proxy: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Our own servers accept on the sockets from here on: the old process may go.
    if let Some(handover) = handover {
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            handover.serving();
        });
    }
    let shutdown = rouse_runtime::server::shutdown_signal();
    let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(rouse_proxy::reload_on_sighup(path, reload_tx));
    rouse_runtime::server::exit_code(
        "rouse-proxy",
        rouse_proxy::run(config, listeners, shutdown, reloads).await,
    )
}
