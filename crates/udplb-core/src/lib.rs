//! udplb's decision core: everything udplb decides about a datagram, with no I/O.
//!
//! [`engine`] is a worker's decisions about each datagram, as functions of inputs returning
//! small verdicts; the rest are its parts.
//!
//! Owns: the vocabulary of the balancer ([`model`]), scheduling ([`sched`], [`maglev`]),
//! the immutable configuration [`snapshot`] the workers read, the per-worker [`flow`] table
//! with idle expiry and its cap, the flows a previous process handed over ([`handover`])
//! and those other instances share ([`sync`]),
//! persistence ([`affinity`]), payload keys ([`payload`]: which
//! conversation a datagram belongs to) and the tables the workers share for them
//! ([`sharded`]), backend health and pool quorum as
//! state machines ([`health`]), latency histograms ([`latency`]), the sources that can never
//! be clients ([`source`]) and the reasons a datagram can be dropped ([`verdict`]).
//!
//! Must not: open sockets, read clocks, draw random numbers or spawn threads. Time is a
//! [`Time`] the caller passes in; randomness is a `u64` the caller passes in; hashing for
//! placement uses a fixed seed so every udplb instance agrees ([`hash`]). This keeps the core
//! unit-, property- and simulation-testable.
#![forbid(unsafe_code)]

pub mod acl;
pub mod affinity;
pub mod engine;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod hash;
pub mod health;
pub mod latency;
pub mod maglev;
pub mod model;
pub mod payload;
pub mod proxy;
pub mod ratelimit;
pub mod sched;
pub mod sharded;
pub mod snapshot;
pub mod source;
pub mod sync;
pub mod time;
pub mod verdict;

pub use model::{
    Affinity, AllDownPolicy, BackendSpec, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode,
};
pub use time::Time;
pub use verdict::DropReason;
