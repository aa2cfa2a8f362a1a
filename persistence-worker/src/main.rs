//! The `persistence-worker` binary: load configuration, set up logging, bind, run until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use persistence_worker::config::WorkerConfig;
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc malloc, as in the gateway: a profile of the drain showed about a
/// quarter of the worker's CPU in glibc's malloc and free (docs/benchmarks.md, "Changes these
/// numbers made").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "Drains the chat message stream into Postgres")]
struct Args {
    /// Optional TOML configuration file; `CHAT_*` environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match WorkerConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("persistence-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match chat_core::telemetry::init(config.raw.log_format, &config.tracing) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("persistence-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let internal = match std::net::TcpListener::bind(config.internal_listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "persistence-worker: cannot bind {}: {e}",
                config.internal_listen
            );
            return ExitCode::from(2);
        }
    };
    tracing::info!(internal = %config.internal_listen, consumer = %config.consumer_name, "starting");
    let result = actix_web::rt::System::new().block_on(async move {
        let shutdown = CancellationToken::new();
        actix_web::rt::spawn(chat_core::shutdown::cancel_on_signal(shutdown.clone()));
        persistence_worker::run(config, internal, shutdown).await
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("persistence-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
