//! The command line: `udplb run`, `udplb check`, and the pen-style one-liner.
//!
//! Owns: argument definitions, their translation into a [`udplb_config::Config`], logging setup
//! and exit codes (78, `EX_CONFIG`, for an invalid configuration).
//! Must not: run anything itself beyond dispatching to [`crate::daemon`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use udplb_config::{
    Admin, Config, Dataplane, Expect, Forwarding, HealthCheck, ListenerConfig, PoolConfig, Probe,
    Runtime,
};
use udplb_core::health::{Initial, Thresholds};
use udplb_core::{Affinity, BackendSpec, SchedulerKind, SessionMode};

use crate::preflight;

/// Exit code for an invalid configuration (sysexits' EX_CONFIG).
pub const EX_CONFIG: u8 = 78;

/// The configuration `run` and `check` read without `-c`.
pub const DEFAULT_CONFIG: &str = "/etc/udplb/udplb.toml";

/// Sections of udplb(1) that clap does not write: files, signals, exit status.
const MAN_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/udplb/udplb.toml\fR
The configuration \fBudplb run\fR and \fBudplb check\fR read without \fB\-c\fR.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the configuration file: it is validated first, and an invalid one is refused (logged)
while the running configuration stays. Flows keep their backends.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop admitting new flows, serve established flows and TCP connections for
runtime.shutdown_grace (5 s by default), then exit; a second signal exits at once.
.TP
\fBSIGUSR2\fR
Upgrade or restart without losing a datagram: start the program file udplb was started from
(after a package upgrade, the new binary) with the same arguments and hand it the listener,
TCP and admin sockets, every backend's health and the flows (on their own sockets, which it
continues); then serve only what is left until it ends, and exit 0. If the new process cannot
start, this one keeps serving. Under systemd:
\fBsystemctl kill \-\-signal=SIGUSR2 \-\-kill\-whom=main udplb\fR.
.SH ENVIRONMENT
.TP
\fBUDPLB_ADMIN\fR
The admin endpoint \fBudplb ctl\fR talks to (\fB\-\-admin\fR; default 127.0.0.1:9190).
.TP
\fBUDPLB_ADMIN_TOKEN_FILE\fR
The token file \fBudplb ctl\fR sends (\fB\-\-token\-file\fR).
.TP
\fBUDPLB_ALLOW_ROOT\fR
Keep running as root instead of switching to an unprivileged user (\fB\-\-allow\-root\fR).
.TP
\fBNO_COLOR\fR
Plain log lines even on a terminal.
.SH EXIT STATUS
0 when stopped by SIGTERM or SIGINT (and for \fB\-\-help\fR, \fB\-\-version\fR; \fBudplb check\fR
for a valid file); 78 (EX_CONFIG) for a command line or configuration file udplb cannot use;
1 for any other failure, such as an address that cannot be bound.
.SH SEE ALSO
\fBudplb\-run\fR(1), \fBudplb\-ctl\fR(1), \fBudplb\-check\fR(1), and the documents in docs/
(config.md, api.md, metrics.md, health.md, protocols.md, operations.md).
"#;

const EXAMPLES: &str = "\
Examples:
  udplb 127.0.0.1:5300 127.0.0.1:5301 127.0.0.1:5302
      flows of each client ip:port stick to one backend, round robin
  udplb --mode datagram 0.0.0.0:514 10.0.0.1:514 10.0.0.2:514,weight=2
      every syslog datagram scheduled on its own, 1:2
  udplb --mode request-response --scheduler maglev [::]:53 [2001:db8::1]:53 [2001:db8::2]:53
      DNS: each query's flow closes once answered
  udplb run -c /etc/udplb/udplb.toml
  udplb check -c /etc/udplb/udplb.toml
  udplb ctl backends
  udplb ctl drain dns 10.0.0.12:53

Exit status: 0 when stopped by SIGTERM/SIGINT (or for --help, --version); 78 (EX_CONFIG) for a
command line or configuration file udplb cannot use; 1 for any other failure, such as an
address that cannot be bound.";

/// A UDP load balancer.
#[derive(Parser, Debug)]
#[command(
    name = "udplb",
    version,
    about = "A UDP load balancer: one listener, a pool of backends, replies from the address the client sent to.",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    oneliner: OneLiner,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run udplb with a configuration file.
    Run {
        /// The configuration file (TOML).
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Worker threads (overrides `runtime.workers`).
        #[arg(long, value_parser = parse_workers)]
        workers: Option<usize>,
        #[command(flatten)]
        privileges: PrivilegeArgs,
    },
    /// Query or change a running udplb through its admin API.
    Ctl(crate::ctl::CtlArgs),
    /// Translate another balancer's configuration into udplb.toml (stdout); what cannot be
    /// translated is listed on stderr. Exit 0 when a listener was made, 78 otherwise.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `udplb man > udplb.1`, or a command's:
    /// `udplb man run > udplb-run.1`.
    Man {
        /// The command (run, ctl, check, completions); none: udplb(1).
        command: Option<String>,
    },
    /// The backends' side of `forwarding = "dsr"`: take the IP-in-IP (or IPv6-in-IPv6) header,
    /// or the GUE headers, off what the given balancers send to this host, on the given
    /// interfaces, until SIGTERM or SIGINT (for hosts without the kernel's ipip or fou modules).
    /// Needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.
    Decap {
        /// An interface the encapsulated datagrams arrive on (repeatable).
        #[arg(short, long = "interface", value_name = "NAME", required = true)]
        interfaces: Vec<String>,
        /// A balancer's address whose encapsulated datagrams are taken (repeatable; IPv4 for
        /// IPv4 listeners, IPv6 for IPv6 ones); encapsulated datagrams from any other source
        /// are left to the stack.
        #[arg(short, long = "balancer", value_name = "ADDRESS", required = true)]
        balancers: Vec<std::net::IpAddr>,
        /// A UDP port GUE arrives on (the pool's `gue_port` with `encapsulation = "gue"`;
        /// repeatable, at most 16): the balancers' UDP to it is decapsulated too.
        #[arg(short, long = "gue-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        gue_ports: Vec<u16>,
    },
    /// Validate a configuration file as `run` would, without binding anything: its rules, and
    /// that its user, group and programs (notify, exec checks) exist. Exit 0 if valid, 78 if not.
    Check {
        /// The configuration file (TOML).
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        privileges: PrivilegeArgs,
    },
}

/// What `udplb import` reads.
#[derive(Subcommand, Debug)]
enum ImportFrom {
    /// keepalived's LVS configuration (virtual_server blocks), e.g.
    /// /etc/keepalived/keepalived.conf.
    Keepalived {
        /// The keepalived.conf file.
        file: PathBuf,
    },
    /// A pen command line (UDP, -U), e.g. `udplb import pen -- -U -r 53 10.0.0.1 10.0.0.2`.
    Pen {
        /// pen's arguments, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

/// `udplb [OPTIONS] LISTEN BACKEND [BACKEND...]`
#[derive(Args, Debug)]
struct OneLiner {
    #[arg(
        value_name = "LISTEN",
        required = true,
        help = "Address to listen on, e.g. 0.0.0.0:53 or [::]:53."
    )]
    listen: Option<SocketAddr>,
    #[arg(
        value_name = "BACKEND",
        required = true,
        help = "Backends: ADDR[,weight=N][,backup], e.g. 10.0.0.2:53,weight=2."
    )]
    backends: Vec<BackendArg>,
    /// Session mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Flow)]
    mode: ModeArg,
    /// Replies expected per request (default 1); only with --mode request-response.
    #[arg(long)]
    responses: Option<u32>,
    /// Request-response mode: a request left unanswered this long counts as a passive failure
    /// of its backend (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    reply_timeout: Option<Duration>,
    // The help text is not a doc comment: its brackets are not links.
    #[arg(
        long,
        value_name = "CHECK",
        default_value = "none",
        value_parser = parse_check,
        help = "Active health check of every backend: udp (the port is not refused), udp:TEXT \
                (TEXT gets a reply), dns:NAME (a DNS query for NAME answers NOERROR), \
                tcp[:PORT] (a TCP connect), http:[//HOST][:PORT]/PATH (a GET answers 2xx/3xx), \
                or none. Backends are watched passively in any case."
    )]
    check: CheckArg,
    /// Time between two active checks of a backend.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    check_interval: Option<Duration>,
    /// Refused datagrams or unanswered requests in a row that take a backend out of rotation
    /// (0: never).
    #[arg(long, value_name = "N", default_value_t = udplb_config::defaults::PASSIVE_FALL)]
    passive_fall: u32,
    /// Scheduler (every one honours weights): round-robin (smooth weighted), random,
    /// least-flows, power-of-two, maglev, rendezvous. Default: round-robin; maglev with
    /// --dataplane kernel or auto (the kernel indexes its table).
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<SchedulerKind>,
    /// Which data plane forwards: socket (udplb's workers), kernel (an eBPF program at tc on
    /// the interfaces; root), auto (kernel when it loads, sockets otherwise).
    #[arg(long, default_value = "socket", value_parser = parse_named::<Dataplane>)]
    dataplane: Dataplane,
    /// With --dataplane kernel or auto: an interface the program attaches to (repeatable;
    /// default: every interface that is up, but loopback).
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// With --dataplane kernel or auto: nat (the backends see the client and route back
    /// through udplb), masquerade (they see udplb's address), dsr (IP in IP; they answer the
    /// clients directly).
    #[arg(long, default_value = "nat", value_parser = parse_named::<Forwarding>)]
    forwarding: Forwarding,
    /// What makes a client sticky: ip-port or ip.
    #[arg(long, default_value = "ip-port", value_parser = parse_affinity)]
    affinity: Affinity,
    /// A client returns to the backend it last used if it comes back within this long after
    /// its last flow closed (LVS persistence; e.g. 60s). Off by default.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    persistence: Option<Duration>,
    /// Close a flow after this long without traffic (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Flow cap of the listener; new flows beyond it are dropped and counted.
    #[arg(long, default_value_t = udplb_config::defaults::MAX_FLOWS)]
    max_flows: u32,
    /// Largest datagram forwarded; larger ones are dropped and counted.
    #[arg(long, default_value_t = udplb_config::defaults::MAX_DATAGRAM_SIZE)]
    max_datagram_size: usize,
    /// Receive and send buffer of each listener socket, in bytes: what a burst can queue
    /// before datagrams are dropped.
    #[arg(long, default_value_t = udplb_config::defaults::SOCKET_BUFFER)]
    socket_buffer: usize,
    /// Receive trains of datagrams as one (UDP GRO) and forward them as one (UDP GSO); flow
    /// mode only.
    #[arg(long)]
    gro: bool,
    /// Flows share upstream sockets, one flow per backend on each, instead of a socket each
    /// (for many flows or many new flows per second); flow and request-response modes.
    #[arg(long)]
    shared_upstream: bool,
    /// Also accept TCP on the listen address and proxy each connection to a backend (DNS over
    /// TCP: truncated answers, zone transfers). Default: on port 53 or with a dns check.
    #[arg(long, conflicts_with = "no_tcp")]
    tcp: bool,
    /// UDP only, even on port 53 or with a dns check.
    #[arg(long)]
    no_tcp: bool,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// On SIGTERM/SIGINT, serve established flows (no new ones) this long before exiting.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Let the admin API change backends, weights and states (read-only otherwise).
    #[arg(long, requires = "admin")]
    admin_allow_changes: bool,
    /// A file holding the token admin API changes must present (`Authorization: Bearer
    /// TOKEN`); required for changes on an address other than loopback.
    #[arg(long, value_name = "FILE", requires = "admin")]
    admin_token_file: Option<PathBuf>,
    /// Serve the admin endpoint (status and counters) on this address.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    #[command(flatten)]
    privileges: PrivilegeArgs,
}

/// Who udplb runs as once its sockets are bound (override `[runtime]`).
#[derive(Args, Debug)]
struct PrivilegeArgs {
    /// Started as root: switch to this user after binding (overrides `runtime.user`; default:
    /// udplb where that user exists, as the package creates it, else nobody).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Started as root: switch to this group (default: the user's primary group).
    #[arg(long, value_name = "GROUP", requires = "user")]
    group: Option<String>,
    /// Started as root without a user: stay root instead of switching to udplb (or nobody).
    #[arg(long, env = "UDPLB_ALLOW_ROOT", value_parser = clap::builder::BoolishValueParser::new())]
    allow_root: bool,
}

impl PrivilegeArgs {
    /// The keys these flags set, with their flag, to name them in errors.
    fn flags(&self) -> Vec<(&'static str, &'static str)> {
        match self.user {
            Some(_) => vec![("runtime.user", "--user"), ("runtime.group", "--group")],
            None => Vec::new(),
        }
    }

    fn apply(self, runtime: &mut Runtime) {
        if self.user.is_some() {
            runtime.user = self.user;
            runtime.group = self.group;
        }
        runtime.allow_root |= self.allow_root;
    }
}

/// Logging options (shared by every command).
#[derive(Args, Debug)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    /// Log level (trace, debug, info, warn, error, off) or comma-separated TARGET=LEVEL
    /// directives with levels (e.g. udplb=debug,info).
    #[arg(long, default_value = "info", global = true, value_parser = crate::logging::check_filter)]
    pub log_level: String,
}

/// Log output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, coloured only on a terminal and without NO_COLOR.
    Human,
    /// One JSON object per event.
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Flow,
    Datagram,
    RequestResponse,
}

#[derive(Clone, Copy, Debug)]
struct BackendArg(BackendSpec);

impl FromStr for BackendArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default();
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not a numeric ip:port address"))?;
        let mut spec = BackendSpec::new(addr);
        for opt in parts {
            match opt.split_once('=') {
                Some(("weight", w)) => {
                    spec.weight = w
                        .parse()
                        .ok()
                        .filter(|w| (1..=BackendSpec::MAX_WEIGHT).contains(w))
                        .ok_or_else(|| format!("weight must be 1..={}", BackendSpec::MAX_WEIGHT))?;
                }
                None if opt == "backup" => spec.backup = true,
                _ => return Err(format!("unknown backend option {opt:?} (weight=N, backup)")),
            }
        }
        Ok(BackendArg(spec))
    }
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// A name of the configuration's (`dataplane`, `forwarding`), as the file takes it.
fn parse_named<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

fn parse_affinity(s: &str) -> Result<Affinity, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn parse_workers(s: &str) -> Result<usize, String> {
    let range = udplb_config::defaults::WORKERS_RANGE;
    s.parse()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| format!("expected a number in {}..={}", range.start(), range.end()))
}

impl OneLiner {
    /// Options given for a mode they do not apply to (as `responses` in a file).
    /// Options that mean nothing with the others given: errors, as in a file.
    fn mode_errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mode = match self.mode {
            ModeArg::Flow => Some("flow"),
            ModeArg::Datagram => Some("datagram"),
            ModeArg::RequestResponse => None,
        };
        if let Some(mode) = mode {
            for (given, flag) in [
                (self.responses.is_some(), "--responses"),
                (self.reply_timeout.is_some(), "--reply-timeout"),
            ] {
                if given {
                    out.push(format!(
                        "{flag}: only applies to --mode request-response (the mode is {mode})"
                    ));
                }
            }
        }
        if self.check_interval.is_some() && self.check.probe == Probe::None {
            out.push("--check-interval: needs an active check (--check)".to_string());
        }
        out
    }

    fn into_config(self) -> Config {
        let listen = self.listen.expect("clap requires LISTEN");
        let mode = match self.mode {
            ModeArg::Flow => SessionMode::Flow,
            ModeArg::Datagram => SessionMode::Datagram,
            ModeArg::RequestResponse => SessionMode::RequestResponse {
                responses: self.responses.unwrap_or(udplb_config::defaults::RESPONSES),
            },
        };
        let mut listener = ListenerConfig::new("default".into(), listen, "default".into());
        listener.mode = mode;
        if let Some(t) = self.reply_timeout {
            listener.reply_timeout = t;
        }
        listener.affinity = self.affinity;
        listener.idle_timeout = self.idle_timeout;
        listener.persistence = self.persistence;
        listener.max_flows = self.max_flows;
        listener.max_datagram_size = self.max_datagram_size;
        listener.socket_buffer = self.socket_buffer;
        listener.gro = self.gro;
        listener.shared_upstream = self.shared_upstream;
        listener.dataplane = self.dataplane;
        listener.interfaces = self.interfaces;
        listener.tcp = match (self.tcp, self.no_tcp) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let mut runtime = Runtime {
            workers: self.workers,
            shutdown_grace: Some(self.shutdown_grace),
            ..Runtime::default()
        };
        self.privileges.apply(&mut runtime);
        Config {
            runtime,
            admin: self.admin.map(|listen| Admin {
                listen,
                allow_changes: self.admin_allow_changes,
                token_file: self.admin_token_file,
            }),
            listeners: vec![listener],
            announce: None,
            sync: None,
            pools: vec![PoolConfig {
                health: Some(
                    self.check
                        .into_health(self.check_interval, self.passive_fall),
                ),
                forwarding: self.forwarding,
                ..PoolConfig::new(
                    "default".into(),
                    self.scheduler
                        .unwrap_or(if self.dataplane.may_use_kernel() {
                            SchedulerKind::Maglev
                        } else {
                            SchedulerKind::RoundRobin
                        }),
                    self.backends.into_iter().map(|b| b.0.into()).collect(),
                )
            }],
        }
    }
}

/// `--check`: the one-liner's active health check.
#[derive(Clone, Debug)]
struct CheckArg {
    probe: Probe,
    /// Check this port instead of the backend's.
    port: Option<u16>,
}

impl CheckArg {
    /// The pool's health table: this check (if any) and the passive thresholds.
    fn into_health(self, interval: Option<Duration>, passive_fall: u32) -> HealthCheck {
        let interval = interval.unwrap_or(udplb_config::defaults::CHECK_INTERVAL);
        HealthCheck {
            probe: self.probe,
            interval,
            timeout: udplb_config::defaults::CHECK_TIMEOUT.min(interval),
            jitter: interval / 10,
            thresholds: Thresholds {
                passive_fall,
                ..udplb_config::defaults::THRESHOLDS
            },
            initial: Initial::default(),
            port: self.port,
        }
    }
}

fn parse_check(s: &str) -> Result<CheckArg, String> {
    let (kind, arg) = match s.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (s, None),
    };
    let probe = |probe| CheckArg { probe, port: None };
    match (kind, arg) {
        ("none", None) => Ok(probe(Probe::None)),
        ("udp", None) => Ok(probe(Probe::Reachable)),
        ("udp", Some(text)) if !text.is_empty() => Ok(probe(Probe::Udp {
            send: text.as_bytes().to_vec(),
            expect: Expect::Anything,
        })),
        ("dns", Some(name)) if !name.is_empty() && name.is_ascii() => Ok(probe(Probe::Dns {
            name: name.to_string(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            answer: None,
        })),
        ("tcp", None) => Ok(probe(Probe::Tcp)),
        ("tcp", Some(port)) => Ok(CheckArg {
            probe: Probe::Tcp,
            port: Some(parse_port(port)?),
        }),
        ("http", Some(url)) => parse_http_check(url),
        _ => Err(format!(
            "{s:?}: expected udp, udp:TEXT, dns:NAME, tcp[:PORT], http:[//HOST][:PORT]/PATH or none"
        )),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
}

/// `http:[//HOST][:PORT]/PATH` (also `http:PORT/PATH`): a GET of PATH on PORT (80) of every
/// backend's address, with HOST (default: the backend's address) as Host header.
fn parse_http_check(url: &str) -> Result<CheckArg, String> {
    let rest = url.strip_prefix("//").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        // `http:8080/health`: a port alone.
        None if !authority.is_empty() && authority.bytes().all(|b| b.is_ascii_digit()) => {
            ("", Some(parse_port(authority)?))
        }
        None => (authority, None),
    };
    Ok(CheckArg {
        probe: Probe::Http {
            path: path.to_string(),
            host: (!host.is_empty()).then(|| host.to_string()),
            status: (200, 399),
            body_contains: None,
        },
        port: Some(port.unwrap_or(80)),
    })
}

/// Runs the command the user asked for.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Some(Command::Check { config, privileges }) => Ok(check(&config, privileges)),
        Some(Command::Ctl(args)) => Ok(crate::ctl::run(args)),
        Some(Command::Decap {
            interfaces,
            balancers,
            gue_ports,
        }) => Ok(crate::kernel::decap(&interfaces, &balancers, &gue_ports)),
        Some(Command::Completions { shell }) => {
            // Rendered into memory first: the generator panics on a closed pipe.
            let mut out = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "udplb",
                &mut out,
            );
            write_stdout(&out)
        }
        Some(Command::Man { command }) => write_stdout(&man_page(command.as_deref())?),
        Some(Command::Import {
            from: ImportFrom::Keepalived { file },
        }) => Ok(import_keepalived(&file)),
        Some(Command::Import {
            from: ImportFrom::Pen { args },
        }) => Ok(print_imported("pen", crate::import::pen(&args))),
        Some(Command::Run {
            config,
            workers,
            privileges,
        }) => {
            let cfg = match load_for_start(&config, workers, privileges) {
                Ok(cfg) => cfg,
                Err(code) => return Ok(code),
            };
            crate::daemon::run(cfg, Some(config))?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let mut errors = cli.oneliner.mode_errors();
            let cfg = cli.oneliner.into_config();
            errors.extend(cfg.validate().err().unwrap_or_default());
            if !errors.is_empty() {
                for e in errors {
                    eprintln!("udplb: {e}");
                }
                return Ok(ExitCode::from(EX_CONFIG));
            }
            let problems = preflight::problems(&cfg, preflight::Stage::Start);
            if !problems.is_empty() {
                let flags = [
                    ("runtime.user", "--user"),
                    ("runtime.group", "--group"),
                    ("admin.token_file", "--admin-token-file"),
                ];
                for line in preflight::describe(&problems, None, &flags) {
                    eprintln!("{line}");
                }
                return Ok(ExitCode::from(EX_CONFIG));
            }
            crate::daemon::run(cfg, None)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `udplb import keepalived FILE`.
fn import_keepalived(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("udplb import: {}: {e}", file.display());
            return ExitCode::from(EX_CONFIG);
        }
    };
    let source = file.display().to_string();
    print_imported(&source, crate::import::keepalived(&text))
}

/// Prints an import's configuration (stdout) and notes (stderr, each prefixed with `source`).
fn print_imported(source: &str, imported: Result<crate::import::Imported, String>) -> ExitCode {
    match imported {
        Err(e) => {
            eprintln!("udplb import: {source}: {e}");
            ExitCode::from(EX_CONFIG)
        }
        Ok(out) => {
            for note in &out.notes {
                eprintln!("udplb import: {source}: {note}");
            }
            if out.listeners == 0 {
                eprintln!("udplb import: {source}: no UDP virtual_server to translate");
                return ExitCode::from(EX_CONFIG);
            }
            print!("{}", out.toml);
            ExitCode::SUCCESS
        }
    }
}

/// The man page of `udplb` (with the sections clap does not write), or of its subcommand
/// `command`, named `udplb-COMMAND` as udplb(1) refers to it.
fn man_page(command: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let top = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    match command {
        None => {
            clap_mangen::Man::new(top)
                .render(&mut out)
                .context("rendering the man page")?;
            out.extend_from_slice(MAN_SECTIONS.as_bytes());
        }
        Some(name) => {
            let Some(sub) = top.find_subcommand(name) else {
                let names: Vec<&str> = top.get_subcommands().map(|c| c.get_name()).collect();
                anyhow::bail!("no command {name:?} (one of: {})", names.join(", "));
            };
            // clap names are `&'static str`; the process prints the page and exits.
            let page_name: &'static str = Box::leak(format!("udplb-{name}").into_boxed_str());
            let sub = sub.clone().name(page_name);
            clap_mangen::Man::new(sub)
                .render(&mut out)
                .context("rendering the man page")?;
        }
    }
    Ok(out)
}

/// Writes generated output; a closed pipe (`| head`) is not an error worth a message.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Loads `path` with the command line's overrides and checks everything `run` needs but
/// binding (rules, then the machine: [`preflight`]); the errors are printed and the exit
/// code returned.
fn load_for_start(
    path: &std::path::Path,
    workers: Option<usize>,
    privileges: PrivilegeArgs,
) -> Result<Config, ExitCode> {
    let (mut cfg, positions) = crate::config_file::load(path).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(EX_CONFIG)
    })?;
    if workers.is_some() {
        cfg.runtime.workers = workers;
    }
    let flags = privileges.flags();
    privileges.apply(&mut cfg.runtime);
    let problems = preflight::problems(&cfg, preflight::Stage::Start);
    if !problems.is_empty() {
        for line in preflight::describe(&problems, Some(&positions), &flags) {
            eprintln!("{line}");
        }
        return Err(ExitCode::from(EX_CONFIG));
    }
    Ok(cfg)
}

fn check(path: &std::path::Path, privileges: PrivilegeArgs) -> ExitCode {
    match load_for_start(path, None, privileges) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} listener(s), {} pool(s))",
                path.display(),
                cfg.listeners.len(),
                cfg.pools.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn every_check_form_parses_to_its_probe() {
        let probe = |s: &str| parse_check(s).map(|c| (c.probe, c.port));
        assert_eq!(probe("none"), Ok((Probe::None, None)));
        assert_eq!(probe("udp"), Ok((Probe::Reachable, None)));
        assert_eq!(
            probe("udp:ping"),
            Ok((
                Probe::Udp {
                    send: b"ping".to_vec(),
                    expect: Expect::Anything
                },
                None
            ))
        );
        assert!(
            matches!(probe("dns:www.example.com"), Ok((Probe::Dns { name, .. }, None)) if name == "www.example.com")
        );
        assert_eq!(probe("tcp"), Ok((Probe::Tcp, None)));
        assert_eq!(probe("tcp:8053"), Ok((Probe::Tcp, Some(8053))));
        let http = |s: &str| match probe(s) {
            Ok((Probe::Http { path, host, .. }, port)) => (path, host, port),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            http("http://:8080/health"),
            ("/health".into(), None, Some(8080))
        );
        assert_eq!(
            http("http:8080/health"),
            ("/health".into(), None, Some(8080))
        );
        assert_eq!(
            http("http://lb.example:81/"),
            ("/".into(), Some("lb.example".into()), Some(81))
        );
        assert_eq!(http("http:/status"), ("/status".into(), None, Some(80)));
        for bad in [
            "dns",
            "dns:",
            "tcp:0",
            "tcp:http",
            "udp:",
            "icmp",
            "http:host:x/",
        ] {
            assert!(parse_check(bad).is_err(), "{bad}");
        }
    }
}
