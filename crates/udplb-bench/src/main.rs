//! udplb-bench: the tools behind `scripts/bench.sh`.
//!
//! - `udplb-bench echo ADDR...`: UDP echo backends (batched, one thread per address).
//! - `udplb-bench load --target ADDR ...`: a closed-loop load generator: F flows (each its own
//!   connected socket, so its own source port) keep W requests outstanding each; replies/s,
//!   loss and latency percentiles over a fixed duration after a warmup.
//!
//! Not linked into udplb; it exists to measure udplb against a direct baseline in one run.
#![forbid(unsafe_code)]

mod echo;
mod load;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "udplb-bench",
    about = "Echo backends and a closed-loop UDP load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every datagram back to its sender; prints `listening ADDR` per socket.
    Echo {
        /// Addresses to bind (port 0 picks a free port).
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
    /// Closed-loop load: every reply immediately triggers the next request of its flow.
    Load(load::LoadArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Echo { addrs } => echo::run(&addrs),
        Command::Load(args) => {
            let report = load::run(&args)?;
            if args.json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            Ok(())
        }
    }
}

/// Parses durations like `10s` or `500ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}
