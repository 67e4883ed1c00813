//! udplb: a UDP load balancer.
//!
//! The binary: command line, logging, and the control plane (configuration loading, snapshot
//! publication, the admin endpoint, signals). The data path lives in `udplb-dataplane`, the
//! decisions in `udplb-core`, the configuration model in `udplb-config`.
#![forbid(unsafe_code)]

mod admin;
mod announce;
mod api;
mod bpf_dir;
mod cli;
mod config_file;
mod control;
mod ctl;
mod daemon;
mod health;
mod host;
mod import;
mod kernel;
mod logging;
mod metrics;
mod plan;
mod preflight;
mod privileges;
mod rates;
mod reload;
mod sync;
mod systemd;
mod tcp;
mod token;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // A command line udplb cannot use is a configuration error, like a bad file (78);
        // --help and --version go to stdout and succeed.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(cli::EX_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = logging::init(&cli.log) {
        eprintln!("udplb: {e}");
        return ExitCode::from(cli::EX_CONFIG);
    }
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("udplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
