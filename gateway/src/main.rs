//! The `gateway` binary: load configuration, set up logging, bind, run until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::GatewayConfig;
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc malloc: see docs/benchmarks.md ("Changes these numbers made").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "Chat gateway node")]
struct Args {
    /// Optional TOML configuration file; `CHAT_*` environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match GatewayConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match chat_core::telemetry::init(config.raw.log_format, &config.tracing) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if config.insecure_dev_secret {
        tracing::warn!("CHAT_DEV_MODE is on and no CHAT_JWT_SECRET is set: using a public development secret; never do this in production");
    }
    let listeners = match gateway::Listeners::bind(&config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "gateway: cannot bind {} / {}: {e}",
                config.listen, config.internal_listen
            );
            return ExitCode::from(2);
        }
    };
    tracing::info!(public = %config.listen, internal = %config.internal_listen, node_id = %config.node_id, "starting");
    let result = actix_web::rt::System::new().block_on(async move {
        let shutdown = CancellationToken::new();
        actix_web::rt::spawn(chat_core::shutdown::cancel_on_signal(shutdown.clone()));
        gateway::run(config, listeners, shutdown).await
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
