//! udplb-bench: the tools behind `scripts/bench.sh`.
//!
//! - `udplb-bench echo ADDR...`: UDP echo backends (one thread per address, batched syscalls).
//! - `udplb-bench relay --listen ADDR [--per-datagram] BACKEND...`: the minimal reference relay
//!   (no policy), per flow or per datagram.
//! - `udplb-bench load --target ADDR ...`: a closed-loop load generator: F flows (each its own
//!   connected socket, so its own source port) keep W requests outstanding each; it reports
//!   replies/s, loss and latency percentiles over a fixed duration after a warmup.
//! - `udplb-bench flows --target ADDR ...`: opens N flows from N loopback addresses through one
//!   socket: new flows/s, memory per flow, replies/s with N flows live (`scripts/scale.sh`).
//! - `udplb-bench bulk --target ADDR --sink ADDR ...`: one bulk flow sent as GSO trains to a
//!   sink that reads with GRO: datagrams/s delivered (`scripts/gso.sh`).
//! - `udplb-bench inject --interface IF --gateway-mac MAC --target ADDR ...`: a new client in
//!   every datagram, sent as Ethernet frames, open loop (`NEW_FLOWS=1 scripts/kernel-bench.sh`).
//!
//! This module owns the command line and dispatch. The tool is not linked into udplb; it exists
//! to measure udplb against a direct baseline in the same run.
#![forbid(unsafe_code)]

mod bulk;
mod cpustat;
mod echo;
mod flows;
mod generator;
mod inject;
mod load;
mod relay;
mod report;
mod wire;

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
    /// Scaling with concurrent flows: new flows/s, memory per flow, replies/s.
    Flows(flows::FlowsArgs),
    /// A new client in every datagram, as Ethernet frames, open loop: new flows per second.
    Inject(inject::InjectArgs),
    /// One bulk flow, sent as GSO trains, to a sink that reads with GRO.
    Bulk(bulk::BulkArgs),
    /// The reference relay: udplb's socket primitives and no policy; prints `listening ADDR`.
    Relay {
        /// Address to receive clients on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
        /// Backends, one per new client in turn.
        #[arg(required = true)]
        backends: Vec<SocketAddr>,
        /// Per-datagram scheduling: backends in turn per datagram, sent with `sendto` on the
        /// client's unconnected socket (the socket path of udplb's datagram mode).
        #[arg(long)]
        per_datagram: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Echo { addrs } => echo::run(&addrs),
        Command::Relay {
            listen,
            backends,
            per_datagram,
        } => relay::run(listen, &backends, per_datagram),
        Command::Flows(args) => flows::run(&args),
        Command::Bulk(args) => bulk::run(&args),
        Command::Inject(args) => inject::run(&args),
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

/// Parses durations like `10s`, `500ms` or `1m 30s`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
