//! `loadgen`: the benchmark harness. Each subcommand runs one workload against running servers
//! (ours or a reference stack) and writes its result as JSON; `plot` draws the results as SVG.
//!
//! Layout: `proto` speaks the wire protocols, `identity` mints users and tokens, `conns` holds
//! idle connections, `chat` drives one-to-one traffic, `rooms` fans out into rooms, `drain` bursts the worker, `ceiling`
//! measures Redis on our publish path, `procstat` reads memory and CPU from `/proc`, `report`
//! holds the result types, `plot` draws them. `loadtest/README.md` documents every workload.

mod ceiling;
mod chat;
mod conns;
mod drain;
mod identity;
mod plot;
mod procstat;
mod proto;
mod report;
mod rooms;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "Benchmark harness for the chat gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Opens idle connections (over several child processes) and reports server memory per
    /// connection.
    Conns(conns::ConnsArgs),
    /// Internal: one child process of `conns`.
    #[command(hide = true)]
    ConnsShard(conns::ShardArgs),
    /// Drives one-to-one messages between pairs of users on different nodes.
    Chat(chat::ChatArgs),
    /// Posts into rooms of growing size across nodes; reports the time to the last member.
    Rooms(rooms::RoomsArgs),
    /// Appends a burst of messages to the stream and measures the worker draining them.
    Drain(drain::DrainArgs),
    /// Measures how many appends per second Redis takes on our append script.
    Ceiling(ceiling::CeilingArgs),
    /// Draws SVG plots from a directory of results.
    Plot {
        /// Directory with the JSON results.
        #[arg(long)]
        results: PathBuf,
        /// Directory for the SVG files.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Plot { results, out } = &cli.command {
        return plot::draw_all(results, out).context("plotting results");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Conns(args) => conns::run(args).await,
            Command::ConnsShard(args) => conns::run_shard(args).await,
            Command::Chat(args) => chat::run(args).await,
            Command::Rooms(args) => rooms::run(args).await,
            Command::Drain(args) => drain::run(args).await,
            Command::Ceiling(args) => ceiling::run(args).await,
            Command::Plot { .. } => Ok(()),
        }
    })
}
