//! udplb's configuration: a TOML file (or the one-liner's arguments) turned into a validated
//! [`Config`].
//!
//! Owns: the file format ([`parse`], [`load`]), the model ([`model`]), the defaults
//! ([`defaults`]) and every rule a configuration must follow ([`Config::validate`]). Errors
//! carry the file, line, column and dotted key path (`listeners.dns.address`), and all of them
//! are reported at once.
//!
//! Must not: open sockets or touch anything beyond reading the file in [`load`]. Whether an
//! address can really be bound is the data plane's business when it starts.
#![forbid(unsafe_code)]

pub mod defaults;
mod error;
pub mod model;
mod parse;
mod rules;

pub use error::{ConfigError, ConfigErrors, Positions};
pub use model::{
    Admin, Announce, BackendConfig, Config, Dataplane, Encapsulation, Expect, FlowSync, Forwarding,
    HealthCheck, ListenerConfig, PoolConfig, PortRange, Probe, Runtime,
};
pub use parse::{MAX_FILE_SIZE, load, load_with_positions, parse, parse_with_positions};
