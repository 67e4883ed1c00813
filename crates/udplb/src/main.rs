//! udplb: a UDP load balancer.
//!
//! The binary: command line, logging, and the control plane (configuration loading, snapshot
//! publication, the admin endpoint, signals). The data path lives in `udplb-dataplane`, the
//! decisions in `udplb-core`, the configuration model in `udplb-config`.
#![forbid(unsafe_code)]

mod admin;
mod api;
mod cli;
mod ctl;
mod daemon;
mod health;
mod logging;
mod metrics;
mod plan;
mod privileges;
mod reload;
mod systemd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init(&cli.log);
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("udplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
