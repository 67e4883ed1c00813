//! The TOML reader: walks the parsed document with its spans, builds the [`Config`] and records
//! where each key is, so that every error (of syntax, type or rule) names file, line and key.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};
use udplb_core::acl::Cidr;
use udplb_core::payload::KeySpec;
use udplb_core::ratelimit::LimitSettings;
use udplb_core::snapshot::AdminState;
use udplb_core::{
    Affinity, AllDownPolicy, BackendSpec, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode,
};

use crate::error::{ConfigError, ConfigErrors, Lines, Positions, enclosing};
use crate::model::{
    Admin, Announce, BackendConfig, Config, Dataplane, Encapsulation, FlowSync, Forwarding,
    HealthCheck, ListenerConfig, PoolConfig, PortRange, Runtime,
};
use crate::{defaults, rules};

mod health;

type Item<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &[
    "include",
    "runtime",
    "admin",
    "announce",
    "sync",
    "listeners",
    "pools",
];
/// What an included file may hold.
const INCLUDED_KEYS: &[&str] = &["listeners", "pools"];
/// Files one configuration may include at most.
pub const MAX_INCLUDED_FILES: usize = 1024;
const RUNTIME_KEYS: &[&str] = &[
    "workers",
    "shutdown_grace",
    "user",
    "group",
    "allow_root",
    "bpf_dir",
];
const ADMIN_KEYS: &[&str] = &["listen", "allow_changes", "token_file"];
const ANNOUNCE_KEYS: &[&str] = &["up", "down", "withdraw_delay"];
const SYNC_KEYS: &[&str] = &["listen", "peers", "key_file", "interval", "max_entries"];
const LISTENER_KEYS: &[&str] = &[
    "address",
    "pool",
    "mode",
    "responses",
    "affinity",
    "idle_timeout",
    "persistence",
    "reply_timeout",
    "max_flows",
    "max_datagram_size",
    "socket_buffer",
    "allow",
    "deny",
    "limits",
    "proxy_protocol",
    "proxy_from",
    "abuse_pool",
    "gro",
    "shared_upstream",
    "tcp",
    "tcp_max_connections",
    "dataplane",
    "interfaces",
];
const LIMIT_KEYS: &[&str] = &[
    "datagrams_per_source",
    "datagrams_per_prefix",
    "new_flows_per_source",
    "new_flows_per_prefix",
    "ipv4_prefix",
    "ipv6_prefix",
    "table_size",
    "reply_ratio",
];
const POOL_KEYS: &[&str] = &[
    "scheduler",
    "backends",
    "on_backend_down",
    "all_down",
    "quorum",
    "quorum_hysteresis",
    "notify",
    "health",
    "proxy_protocol",
    "strip_reply_proxy",
    "transparent",
    "rebalance",
    "slow_start",
    "payload_key",
    "forwarding",
    "masquerade_ports",
    "encapsulation",
    "gue_port",
];
const PAYLOAD_KEY_KEYS: &[&str] = &[
    "kind",
    "attributes",
    "state_timeout",
    "max_states",
    "offset",
    "length",
    "after",
    "until",
    "config_id",
    "server_id_length",
    "server_ids",
];
const BACKEND_KEYS: &[&str] = &["address", "weight", "backup", "state", "health"];

/// Reads and parses the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_positions(path).map(|(cfg, _)| cfg)
}

/// Like [`load`], with where each key is, to report later problems at their line.
pub fn load_with_positions(path: &Path) -> Result<(Config, Positions), ConfigErrors> {
    let file = path.display().to_string();
    match read_bounded(path) {
        Ok(src) => parse_with_positions(&src, &file),
        Err(why) => Err(ConfigErrors {
            errors: vec![ConfigError {
                file,
                line: 1,
                column: 1,
                key: "(file)".into(),
                message: format!("cannot read: {why}"),
            }],
        }),
    }
}

/// The largest configuration file read (a larger one is refused, not read).
pub const MAX_FILE_SIZE: u64 = 16 << 20;

/// Reads a configuration file: a regular file (a FIFO, device, socket or directory is refused
/// before it is opened, as opening or reading it could block or never end) of at most
/// [`MAX_FILE_SIZE`] bytes, in UTF-8. The file is opened without blocking and checked again
/// once open, in case it was replaced in between. Reading can still wait on a stalled file
/// system: callers that must not wait bound it with a timeout of their own.
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    regular_file(&meta)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| e.to_string())?;
    regular_file(&file.metadata().map_err(|e| e.to_string())?)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// `Ok` for a regular file of at most [`MAX_FILE_SIZE`] bytes; else what it is instead.
fn regular_file(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_file() {
        if meta.len() > MAX_FILE_SIZE {
            return Err(too_large(meta.len()));
        }
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    };
    Err(format!("it is {kind}, not a regular file"))
}

fn too_large(bytes: u64) -> String {
    format!(
        "{bytes} bytes, larger than the {} MiB a configuration file may have",
        MAX_FILE_SIZE >> 20
    )
}

/// Parses configuration text; `file` names it in errors.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with_positions(src, file).map(|(cfg, _)| cfg)
}

/// Like [`parse`], with where each key is, to report later problems at their line.
pub fn parse_with_positions(src: &str, file: &str) -> Result<(Config, Positions), ConfigErrors> {
    let mut reader = Reader {
        sources: vec![(file, src)],
        current: 0,
        errors: Vec::new(),
        spans: HashMap::new(),
        failed: Vec::new(),
        suggested: Vec::new(),
        scheduled: Vec::new(),
    };
    let (root, syntax_errors) = DeTable::parse_recoverable(src);
    if !syntax_errors.is_empty() {
        // A partly read document would give misleading "missing key" errors: syntax only.
        for e in &syntax_errors {
            reader.syntax_error(src, e);
        }
        return Err(reader.into_errors());
    }
    let mut cfg = reader.config(root.get_ref());
    let patterns = reader.include_patterns(root.get_ref());
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let included = reader.expand_includes(&patterns, base);
    for (name, text) in &included {
        reader.read_included(name, text, &mut cfg);
    }
    reader.current = 0;
    reader.kernel_schedulers(&mut cfg);
    for p in rules::check(&cfg) {
        if !reader.is_consequence(&p) {
            reader.error_key(&p.key, p.message);
        }
    }
    if reader.errors.is_empty() {
        let at = reader
            .spans
            .iter()
            .map(|(key, &(source, ref span))| {
                let (name, text) = reader.sources[source];
                let (line, column) = Lines::new(text).position(span.start);
                (key.clone(), (name.to_string(), line, column))
            })
            .collect();
        Ok((cfg, Positions::new(file, at)))
    } else {
        Err(reader.into_errors())
    }
}

struct Reader<'a> {
    /// The files read (name, text): the main one first, then those it includes.
    sources: Vec<(&'a str, &'a str)>,
    /// The one being read.
    current: usize,
    errors: Vec<ConfigError>,
    /// Where each key path read so far is (file, span), for errors found after reading.
    spans: HashMap<String, (usize, Range<usize>)>,
    /// Tables (`listeners.NAME`, `pools.NAME`) that could not be read: rules about them would
    /// only repeat the error already reported.
    failed: Vec<String>,
    /// Keys an unknown key looked like a misspelling of ("did you mean"); not reported missing.
    suggested: Vec<String>,
    /// Pools whose `scheduler` key was given (and valid): those the kernel data plane serves
    /// keep it (and the rules refuse one other than Maglev); the others get Maglev.
    scheduled: Vec<String>,
}

impl<'a> Reader<'a> {
    /// Whether a broken rule follows from an error already reported.
    fn is_consequence(&self, p: &rules::Problem) -> bool {
        let failed = |prefix: &str| self.failed.iter().any(|f| f.starts_with(prefix));
        (p.key == "listeners" && failed("listeners."))
            || p.refers_to
                .as_ref()
                .is_some_and(|t| self.failed.contains(t))
    }

    /// A pool serving a listener the kernel data plane may serve (`dataplane = "kernel"` or
    /// `"auto"`) places with Maglev unless its `scheduler` is given: the kernel indexes the
    /// Maglev table. Any other scheduler given is refused by the rules, at its key.
    fn kernel_schedulers(&self, cfg: &mut Config) {
        for p in &mut cfg.pools {
            let kernel = cfg
                .listeners
                .iter()
                .any(|l| l.dataplane.may_use_kernel() && l.pool == p.name);
            if kernel && !self.scheduled.contains(&p.name) {
                p.scheduler = SchedulerKind::Maglev;
            }
        }
    }

    fn into_errors(mut self) -> ConfigErrors {
        let sources = &self.sources;
        let rank = |e: &ConfigError| sources.iter().position(|(name, _)| *name == e.file);
        self.errors.sort_by_key(|e| (rank(e), e.line, e.column));
        ConfigErrors {
            errors: self.errors,
        }
    }

    fn syntax_error(&mut self, src: &str, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().trim_end().to_string();
        let key_text = src.get(span.clone()).filter(|t| !t.trim().is_empty());
        if let (true, Some(text)) = (message == "duplicate key", key_text) {
            message = format!("duplicate key {:?}", text.trim());
        }
        self.error_at(span, "(syntax)", message);
    }

    /// An error at `span` of the file being read.
    fn error_at(&mut self, span: Range<usize>, key: &str, message: String) {
        self.error_in(self.current, span, key, message);
    }

    fn error_in(&mut self, source: usize, span: Range<usize>, key: &str, message: String) {
        let (name, text) = self.sources[source];
        let (line, column) = Lines::new(text).position(span.start);
        self.errors.push(ConfigError {
            file: name.into(),
            line,
            column,
            key: key.into(),
            message,
        });
    }

    /// An error at the key path `key`, or at the closest enclosing key that was seen (in
    /// whichever file it was).
    fn error_key(&mut self, key: &str, message: String) {
        let (source, span) = enclosing(&self.spans, key).cloned().unwrap_or((0, 0..0));
        self.error_in(source, span, key, message);
    }

    /// Records where key path `key` is, in the file being read.
    fn mark(&mut self, key: String, span: Range<usize>) {
        self.spans.insert(key, (self.current, span));
    }

    /// The `include` patterns of the main file (each a string; bad ones are reported).
    fn include_patterns(&mut self, root: &DeTable<'_>) -> Vec<(usize, String)> {
        let Some(v) = root.get("include") else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            return self
                .wrong_type(
                    "include",
                    v,
                    "an array of file patterns such as [\"conf.d/*.toml\"]",
                )
                .unwrap_or_default();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let key = format!("include[{i}]");
            self.mark(key.clone(), item.span());
            if let Some(s) = self.string(&key, item) {
                out.push((i, s.to_string()));
            }
        }
        out
    }

    /// The files `patterns` name (relative to `base`, the main file's directory), in order:
    /// each pattern's matches sorted by name, each file once. A pattern that matches nothing
    /// is fine (an empty conf.d); one that is not a pattern, or a file that cannot be read,
    /// is an error at the pattern.
    fn expand_includes(
        &mut self,
        patterns: &[(usize, String)],
        base: &Path,
    ) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, pattern) in patterns {
            let key = format!("include[{i}]");
            let full = base.join(pattern);
            let matches = match glob::glob(&full.to_string_lossy()) {
                Ok(m) => m,
                Err(e) => {
                    self.error_key(&key, format!("{pattern:?} is not a file pattern: {e}"));
                    continue;
                }
            };
            for path in matches {
                let path = match path {
                    Ok(p) => p,
                    Err(e) => {
                        self.error_key(&key, format!("cannot read {}", e.path().display()));
                        continue;
                    }
                };
                let name = path.display().to_string();
                if name == self.sources[0].0 || out.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                if out.len() == MAX_INCLUDED_FILES {
                    self.error_key(&key, format!("more than {MAX_INCLUDED_FILES} files"));
                    return out;
                }
                match read_bounded(&path) {
                    Ok(text) => out.push((name, text)),
                    Err(why) => self.error_key(&key, format!("{name}: cannot read: {why}")),
                }
            }
        }
        out
    }

    /// Reads included file `name` (`text`): its listeners and pools join `cfg`'s, after the
    /// main file's; a name defined twice is an error where it is defined again.
    fn read_included(&mut self, name: &'a str, text: &'a str, cfg: &mut Config) {
        self.sources.push((name, text));
        self.current = self.sources.len() - 1;
        let (root, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            for e in &syntax_errors {
                self.syntax_error(text, e);
            }
            return;
        }
        let root = root.get_ref();
        let before: HashMap<String, (usize, Range<usize>)> = self.spans.clone();
        self.check_keys("", root, INCLUDED_KEYS);
        let listeners = self.named_tables(root, "listeners", |r, key, name, t| {
            r.listener(key, name, t)
        });
        let pools = self.named_tables(root, "pools", |r, key, name, t| r.pool(key, name, t));
        for (kind, names) in [
            (
                "listeners",
                listeners.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
            ),
            ("pools", pools.iter().map(|p| p.name.clone()).collect()),
        ] {
            for n in names {
                let key = join(kind, &n);
                if let Some((source, span)) = before.get(&key) {
                    let (file, src) = self.sources[*source];
                    let (line, _) = Lines::new(src).position(span.start);
                    self.error_key(&key, format!("also defined in {file}:{line}"));
                }
            }
        }
        cfg.listeners.extend(listeners);
        cfg.pools.extend(pools);
    }

    fn config(&mut self, root: &DeTable<'_>) -> Config {
        self.check_keys("", root, TOP_KEYS);
        let runtime = self
            .section(root, "runtime")
            .map(|t| self.runtime(t))
            .unwrap_or_default();
        let admin = self.section(root, "admin").and_then(|t| self.admin(t));
        let announce = self
            .section(root, "announce")
            .and_then(|t| self.announce(t));
        let sync = self.section(root, "sync").and_then(|t| self.sync(t));
        let listeners = self.named_tables(root, "listeners", |r, key, name, t| {
            r.listener(key, name, t)
        });
        let pools = self.named_tables(root, "pools", |r, key, name, t| r.pool(key, name, t));
        Config {
            runtime,
            admin,
            listeners,
            pools,
            announce,
            sync,
        }
    }

    fn announce(&mut self, t: &DeTable<'_>) -> Option<Announce> {
        self.check_keys("announce", t, ANNOUNCE_KEYS);
        let up = self.required(t, "announce", "up", |r, k, v| r.command(k, v));
        let down = self.required(t, "announce", "down", |r, k, v| r.command(k, v));
        let withdraw_delay = self
            .optional(t, "announce", "withdraw_delay", |r, k, v| r.duration(k, v))
            .unwrap_or(defaults::WITHDRAW_DELAY);
        Some(Announce {
            up: up?,
            down: down?,
            withdraw_delay,
        })
    }

    fn sync(&mut self, t: &DeTable<'_>) -> Option<FlowSync> {
        self.check_keys("sync", t, SYNC_KEYS);
        let listen = self.required(t, "sync", "listen", |r, k, v| r.address(k, v));
        let peers = self.required(t, "sync", "peers", |r, k, v| r.addresses(k, v));
        let key_file = self.required(t, "sync", "key_file", |r, k, v| r.absolute_path(k, v));
        let interval = self
            .optional(t, "sync", "interval", |r, k, v| r.duration(k, v))
            .unwrap_or(defaults::SYNC_INTERVAL);
        let max_entries = self
            .ranged(t, "sync", "max_entries", defaults::SYNC_MAX_ENTRIES_RANGE)
            .unwrap_or(defaults::SYNC_MAX_ENTRIES);
        Some(FlowSync {
            listen: listen?,
            peers: peers?,
            key_file: key_file?,
            interval,
            max_entries,
        })
    }

    fn runtime(&mut self, t: &DeTable<'_>) -> Runtime {
        self.check_keys("runtime", t, RUNTIME_KEYS);
        Runtime {
            workers: self.ranged(t, "runtime", "workers", defaults::WORKERS_RANGE),
            shutdown_grace: self
                .optional(t, "runtime", "shutdown_grace", |r, k, v| r.duration(k, v)),
            user: self.optional(t, "runtime", "user", |r, k, v| r.name(k, v)),
            group: self.optional(t, "runtime", "group", |r, k, v| r.name(k, v)),
            bpf_dir: self.optional(t, "runtime", "bpf_dir", |r, k, v| r.absolute_path(k, v)),
            allow_root: self
                .optional(t, "runtime", "allow_root", |r, k, v| r.boolean(k, v))
                .unwrap_or(false),
        }
    }

    fn admin(&mut self, t: &DeTable<'_>) -> Option<Admin> {
        self.check_keys("admin", t, ADMIN_KEYS);
        let listen = self.required(t, "admin", "listen", |r, key, v| r.address(key, v))?;
        let allow_changes = self
            .optional(t, "admin", "allow_changes", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        let token_file = self.optional(t, "admin", "token_file", |r, k, v| r.absolute_path(k, v));
        Some(Admin {
            listen,
            allow_changes,
            token_file,
        })
    }

    fn listener(&mut self, key: &str, name: &str, t: &DeTable<'_>) -> Option<ListenerConfig> {
        self.check_keys(key, t, LISTENER_KEYS);
        let address = self.required(t, key, "address", |r, k, v| r.address(k, v));
        let pool = self.required(t, key, "pool", |r, k, v| r.string(k, v).map(str::to_string));
        let mode = self.mode(t, key);
        let mut l = ListenerConfig::new(name.into(), address?, pool?);
        l.mode = mode;
        if let Some(a) = self.optional(t, key, "affinity", |r, k, v| {
            r.named(k, v, Affinity::from_str)
        }) {
            l.affinity = a;
        }
        if let Some(d) = self.optional(t, key, "idle_timeout", |r, k, v| r.duration(k, v)) {
            l.idle_timeout = d;
        }
        if let Some(d) = self.optional(t, key, "persistence", |r, k, v| match v.get_ref() {
            DeValue::String(s) if s.as_ref() == "off" => Some(None),
            _ => r.duration(k, v).map(Some),
        }) {
            l.persistence = d;
        }
        if let Some(d) = self.optional(t, key, "reply_timeout", |r, k, v| r.duration(k, v)) {
            l.reply_timeout = d;
        }
        if let Some(n) = self.ranged(t, key, "max_flows", defaults::MAX_FLOWS_RANGE) {
            l.max_flows = n;
        }
        let size_range = defaults::MAX_DATAGRAM_SIZE_RANGE;
        if let Some(n) = self.ranged(t, key, "max_datagram_size", size_range) {
            l.max_datagram_size = n;
        }
        let buffer_range = defaults::SOCKET_BUFFER_RANGE;
        if let Some(n) = self.ranged(t, key, "socket_buffer", buffer_range) {
            l.socket_buffer = n;
        }
        l.allow = self
            .optional(t, key, "allow", |r, k, v| r.networks(k, v))
            .unwrap_or_default();
        l.deny = self
            .optional(t, key, "deny", |r, k, v| r.networks(k, v))
            .unwrap_or_default();
        l.limits = self.limits(key, t);
        l.proxy_protocol = self
            .optional(t, key, "proxy_protocol", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        l.proxy_from = self
            .optional(t, key, "proxy_from", |r, k, v| r.networks(k, v))
            .unwrap_or_default();
        l.abuse_pool = self.optional(t, key, "abuse_pool", |r, k, v| {
            r.string(k, v).map(str::to_string)
        });
        l.gro = self
            .optional(t, key, "gro", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        l.shared_upstream = self
            .optional(t, key, "shared_upstream", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        l.tcp = self.optional(t, key, "tcp", |r, k, v| r.boolean(k, v));
        let range = defaults::TCP_MAX_CONNECTIONS_RANGE;
        if let Some(n) = self.ranged(t, key, "tcp_max_connections", range) {
            l.tcp_max_connections = n;
        }
        if let Some(d) = self.optional(t, key, "dataplane", |r, k, v| {
            r.named(k, v, Dataplane::from_str)
        }) {
            l.dataplane = d;
        }
        l.interfaces = self
            .optional(t, key, "interfaces", |r, k, v| r.interfaces(k, v))
            .unwrap_or_default();
        Some(l)
    }

    /// `[listeners.NAME.limits]`.
    fn limits(&mut self, key: &str, t: &DeTable<'_>) -> Option<LimitSettings> {
        let v = t.get("limits")?;
        let lkey = join(key, "limits");
        let DeValue::Table(lt) = v.get_ref() else {
            return self.wrong_type(&lkey, v, "a table");
        };
        self.check_keys(&lkey, lt, LIMIT_KEYS);
        let d = LimitSettings::default();
        let rate = |r: &mut Self, name: &str| r.ranged(lt, &lkey, name, defaults::RATE_RANGE);
        Some(LimitSettings {
            datagrams_per_source: rate(self, "datagrams_per_source"),
            datagrams_per_prefix: rate(self, "datagrams_per_prefix"),
            new_flows_per_source: rate(self, "new_flows_per_source"),
            new_flows_per_prefix: rate(self, "new_flows_per_prefix"),
            ipv4_prefix: self
                .ranged(lt, &lkey, "ipv4_prefix", defaults::IPV4_PREFIX_RANGE)
                .unwrap_or(d.ipv4_prefix),
            ipv6_prefix: self
                .ranged(lt, &lkey, "ipv6_prefix", defaults::IPV6_PREFIX_RANGE)
                .unwrap_or(d.ipv6_prefix),
            cells: self
                .ranged(lt, &lkey, "table_size", defaults::LIMIT_CELLS_RANGE)
                .unwrap_or(d.cells),
            reply_ratio: self.ranged(lt, &lkey, "reply_ratio", defaults::REPLY_RATIO_RANGE),
        })
    }

    /// `[pools.NAME.payload_key]`: a `kind` and that kind's keys (another kind's keys are
    /// errors).
    fn payload_key(&mut self, key: &str, t: &DeTable<'_>) -> Option<KeySpec> {
        let v = t.get("payload_key")?;
        let pkey = join(key, "payload_key");
        let DeValue::Table(pt) = v.get_ref() else {
            return self.wrong_type(&pkey, v, "a table");
        };
        self.check_keys(&pkey, pt, PAYLOAD_KEY_KEYS);
        let kind = self.required(pt, &pkey, "kind", |r, k, v| {
            r.string(k, v).map(str::to_string)
        })?;
        let own: &[&str] = match kind.as_str() {
            "radius" => &["attributes", "state_timeout", "max_states"],
            "sip" => &[],
            "bytes" => &["offset", "length"],
            "token" => &["after", "until"],
            "quic-lb" => &["config_id", "server_id_length", "server_ids"],
            _ => &[],
        };
        for (k, _) in pt.iter() {
            let name = k.get_ref().as_ref();
            if name != "kind" && PAYLOAD_KEY_KEYS.contains(&name) && !own.contains(&name) {
                self.error_at(
                    k.span(),
                    &join(&pkey, name),
                    format!("not a key of kind {kind:?}"),
                );
            }
        }
        match kind.as_str() {
            "radius" => {
                let attributes = self
                    .optional(pt, &pkey, "attributes", |r, k, v| r.radius_attributes(k, v))
                    .unwrap_or_default();
                let state_timeout = self
                    .optional(pt, &pkey, "state_timeout", |r, k, v| r.duration(k, v))
                    .unwrap_or(defaults::STATE_TIMEOUT);
                let max_states = self
                    .ranged(pt, &pkey, "max_states", defaults::MAX_STATES_RANGE)
                    .unwrap_or(defaults::MAX_STATES);
                Some(KeySpec::Radius {
                    attributes,
                    state_timeout,
                    max_states,
                })
            }
            "sip" => Some(KeySpec::Sip),
            "bytes" => {
                let offset = self.ranged(pt, &pkey, "offset", 0..=65_506);
                let length = if pt.get("length").is_some() {
                    self.ranged(pt, &pkey, "length", defaults::KEY_BYTES_RANGE)
                } else {
                    let message = format!("missing: {pkey} needs a \"length\" key");
                    self.error_key(&join(&pkey, "length"), message);
                    None
                };
                Some(KeySpec::Bytes {
                    offset: offset.unwrap_or(0),
                    length: length?,
                })
            }
            "token" => {
                let after = self.required(pt, &pkey, "after", |r, k, v| {
                    r.string(k, v).map(|s| s.as_bytes().to_vec())
                })?;
                if after.is_empty() {
                    self.error_key(&join(&pkey, "after"), "must not be empty".into());
                    return None;
                }
                let until = self
                    .optional(pt, &pkey, "until", |r, k, v| {
                        r.string(k, v).map(|s| s.as_bytes().to_vec())
                    })
                    .unwrap_or_else(|| b" \t\r\n;,&".to_vec());
                Some(KeySpec::Token { after, until })
            }
            "quic-lb" => {
                let config_id = self.ranged(pt, &pkey, "config_id", 0..=6).unwrap_or(0);
                if pt.get("server_id_length").is_none() {
                    let message = format!("missing: {pkey} needs a \"server_id_length\" key");
                    self.error_key(&join(&pkey, "server_id_length"), message);
                    return None;
                }
                let server_id_length = self.ranged(pt, &pkey, "server_id_length", 1..=15)?;
                let servers =
                    self.required(pt, &pkey, "server_ids", |r, k, v| r.server_ids(k, v))?;
                Some(KeySpec::QuicLb {
                    config: udplb_core::payload::quic::LbConfig {
                        config_id,
                        server_id_length,
                    },
                    servers,
                })
            }
            other => {
                let k = join(&pkey, "kind");
                self.error_key(
                    &k,
                    format!(
                        "unknown kind {other:?} (expected one of: radius, sip, bytes, token, \
                         quic-lb)"
                    ),
                );
                None
            }
        }
    }

    /// QUIC-LB server IDs: a table of backend address to hexadecimal ID (`"0a01"`); each bad
    /// entry is reported at its own position.
    fn server_ids(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<(SocketAddr, Vec<u8>)>> {
        let DeValue::Table(t) = v.get_ref() else {
            return self.wrong_type(
                key,
                v,
                "a table of backend address to server ID, such as { \"10.0.0.1:443\" = \"01\" }",
            );
        };
        let mut out = Vec::with_capacity(t.len());
        let mut ok = true;
        for (k, item) in t.iter() {
            let ikey = join(key, k.get_ref());
            let Ok(addr) = k.get_ref().parse::<SocketAddr>() else {
                self.error_at(
                    k.span(),
                    &ikey,
                    format!("{:?} is not an \"ip:port\"", k.get_ref()),
                );
                ok = false;
                continue;
            };
            let Some(hex) = self.string(&ikey, item) else {
                ok = false;
                continue;
            };
            match decode_hex(hex) {
                Some(id) => out.push((addr, id)),
                None => {
                    self.error_at(
                        item.span(),
                        &ikey,
                        format!("{hex:?} is not a hexadecimal server ID such as \"0a01\""),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// RADIUS attributes by name (`"User-Name"`) or number.
    fn radius_attributes(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<u8>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(
                key,
                v,
                "an array of attribute names such as [\"User-Name\"]",
            );
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            let name = self.string(&ikey, item)?;
            match udplb_core::payload::radius::attribute_type(name) {
                Some(t) => out.push(t),
                None => {
                    let names: Vec<&str> = udplb_core::payload::radius::ATTRIBUTE_NAMES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect();
                    self.error_at(
                        item.span(),
                        &ikey,
                        format!(
                            "unknown RADIUS attribute {name:?} (a number 1-255 or one of: {})",
                            names.join(", ")
                        ),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    /// `mode` and `responses` together. On an error (already reported) the listener keeps a
    /// default so that its other rules are still checked.
    fn mode(&mut self, t: &DeTable<'_>, key: &str) -> SessionMode {
        let mode = match t.get("mode") {
            Some(v) => self.named(&join(key, "mode"), v, parse_mode),
            None => Some(Mode::Flow),
        };
        let responses = self.ranged(t, key, "responses", defaults::RESPONSES_RANGE);
        match mode {
            Some(Mode::RequestResponse) => SessionMode::RequestResponse {
                responses: responses.unwrap_or(defaults::RESPONSES),
            },
            Some(Mode::Datagram) => {
                self.only_with_request_response(t, key, "datagram");
                SessionMode::Datagram
            }
            Some(Mode::Flow) => {
                self.only_with_request_response(t, key, "flow");
                SessionMode::Flow
            }
            None => SessionMode::Flow,
        }
    }

    /// `responses` and `reply_timeout` mean something in request-response mode only.
    fn only_with_request_response(&mut self, t: &DeTable<'_>, key: &str, mode: &str) {
        for name in ["responses", "reply_timeout"] {
            if t.get(name).is_some() {
                let message =
                    format!("only applies to mode = \"request-response\" (mode is \"{mode}\")");
                self.error_key(&join(key, name), message);
            }
        }
    }

    fn pool(&mut self, key: &str, name: &str, t: &DeTable<'_>) -> Option<PoolConfig> {
        self.check_keys(key, t, POOL_KEYS);
        let scheduler = self.optional(t, key, "scheduler", |r, k, v| {
            r.named(k, v, SchedulerKind::from_str)
        });
        if scheduler.is_some() {
            self.scheduled.push(name.to_string());
        }
        let scheduler = scheduler.unwrap_or_default();
        let (health, health_table) = self.pool_health(key, t);
        let backends =
            self.required(t, key, "backends", |r, k, v| r.backends(k, v, health_table))?;
        let mut pool = PoolConfig::new(name.into(), scheduler, backends);
        pool.health = health;
        if let Some(p) = self.optional(t, key, "on_backend_down", |r, k, v| {
            r.named(k, v, FailurePolicy::from_str)
        }) {
            pool.on_down = p;
        }
        if let Some(p) = self.optional(t, key, "all_down", |r, k, v| {
            r.named(k, v, AllDownPolicy::from_str)
        }) {
            pool.all_down = p;
        }
        pool.quorum.min_up = self.ranged(t, key, "quorum", 0..=10_000).unwrap_or(0);
        pool.quorum.hysteresis = self
            .ranged(t, key, "quorum_hysteresis", 0..=10_000)
            .unwrap_or(0);
        pool.notify = self.optional(t, key, "notify", |r, k, v| r.command(k, v));
        if let Some(p) = self.optional(t, key, "proxy_protocol", |r, k, v| {
            r.named(k, v, ProxyHeader::from_str)
        }) {
            pool.proxy_protocol = p;
        }
        pool.strip_reply_proxy = self
            .optional(t, key, "strip_reply_proxy", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        pool.transparent = self
            .optional(t, key, "transparent", |r, k, v| r.boolean(k, v))
            .unwrap_or(false);
        if let Some(d) = self.optional(t, key, "slow_start", |r, k, v| r.duration(k, v)) {
            pool.slow_start = d;
        }
        pool.payload_key = self.payload_key(key, t);
        if let Some(r) = self.optional(t, key, "rebalance", |r, k, v| match v.get_ref() {
            DeValue::String(s) if s.as_ref() == "off" => Some(None),
            _ => r.duration(k, v).map(Some),
        }) {
            pool.rebalance = r;
        }
        if let Some(f) = self.optional(t, key, "forwarding", |r, k, v| {
            r.named(k, v, Forwarding::from_str)
        }) {
            pool.forwarding = f;
        }
        pool.masquerade_ports = self.optional(t, key, "masquerade_ports", |r, k, v| {
            r.named(k, v, PortRange::from_str)
        });
        pool.encapsulation = self.optional(t, key, "encapsulation", |r, k, v| {
            r.named(k, v, Encapsulation::from_str)
        });
        pool.gue_port = self.ranged(t, key, "gue_port", 1..=u16::MAX);
        Some(pool)
    }

    /// The pool's check, and its table when it is valid (backends override its keys).
    fn pool_health<'t, 'i>(
        &mut self,
        key: &str,
        t: &'t DeTable<'i>,
    ) -> (Option<HealthCheck>, Option<&'t DeTable<'i>>) {
        let Some(v) = t.get("health") else {
            return (None, None);
        };
        let hkey = join(key, "health");
        let DeValue::Table(h) = v.get_ref() else {
            return (self.wrong_type(&hkey, v, "a table"), None);
        };
        let check = self.health(&hkey, h);
        let table = check.is_some().then_some(h);
        (check, table)
    }

    fn backends(
        &mut self,
        key: &str,
        v: &Item<'_>,
        pool_health: Option<&DeTable<'_>>,
    ) -> Option<Vec<BackendConfig>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(key, v, "an array of backends");
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let bkey = format!("{key}[{i}]");
            self.mark(bkey.clone(), item.span());
            if let Some(b) = self.backend(&bkey, item, pool_health) {
                out.push(b);
            }
        }
        Some(out)
    }

    fn backend(
        &mut self,
        key: &str,
        v: &Item<'_>,
        pool_health: Option<&DeTable<'_>>,
    ) -> Option<BackendConfig> {
        match v.get_ref() {
            DeValue::String(_) => {
                self.mark(format!("{key}.address"), v.span());
                self.address(&format!("{key}.address"), v).map(|a| BackendSpec::new(a).into())
            }
            DeValue::Table(t) => self.backend_table(key, t, pool_health),
            _ => self.wrong_type(key, v, "\"ip:port\" or { address = \"ip:port\", weight = N, backup = BOOL, state = STATE }"),
        }
    }

    fn backend_table(
        &mut self,
        key: &str,
        t: &DeTable<'_>,
        pool_health: Option<&DeTable<'_>>,
    ) -> Option<BackendConfig> {
        self.check_keys(key, t, BACKEND_KEYS);
        let addr = self.required(t, key, "address", |r, k, v| r.address(k, v))?;
        let mut spec = BackendSpec::new(addr);
        if let Some(w) = self.ranged(t, key, "weight", 1..=BackendSpec::MAX_WEIGHT) {
            spec.weight = w;
        }
        if let Some(b) = self.optional(t, key, "backup", |r, k, v| r.boolean(k, v)) {
            spec.backup = b;
        }
        let state = self
            .optional(t, key, "state", |r, k, v| r.named(k, v, parse_state))
            .unwrap_or_default();
        let health = match t.get("health") {
            Some(v) => self.backend_health(key, v, pool_health),
            None => None,
        };
        Some(BackendConfig {
            spec,
            state,
            health,
        })
    }

    /// A backend's `health = { ... }`: the pool's check table with these keys replaced (or a
    /// check of its own when the pool has none).
    fn backend_health(
        &mut self,
        key: &str,
        v: &Item<'_>,
        pool_health: Option<&DeTable<'_>>,
    ) -> Option<HealthCheck> {
        let hkey = join(key, "health");
        let DeValue::Table(own) = v.get_ref() else {
            return self.wrong_type(&hkey, v, "a table of check keys to override");
        };
        let mut merged = pool_health.cloned().unwrap_or_default();
        if own.get("check").is_some() {
            // Another kind of check: the pool's kind-specific keys do not apply.
            let kind_keys: Vec<String> = merged
                .keys()
                .map(|k| k.get_ref().to_string())
                .filter(|k| health::is_kind_key(k))
                .collect();
            for k in &kind_keys {
                merged.remove(k.as_str());
            }
        }
        for (k, v) in own.iter() {
            // Removed first: inserting keeps an existing key, with the pool's position.
            merged.remove(k.get_ref().as_ref());
            merged.insert(k.clone(), v.clone());
        }
        self.health(&hkey, &merged)
    }

    // ---- tables and keys ----

    /// Records the spans of `t`'s keys under `path` and reports keys not in `allowed`.
    fn check_keys(&mut self, path: &str, t: &DeTable<'_>, allowed: &[&str]) {
        for (k, _) in t.iter() {
            let full = join(path, k.get_ref());
            self.mark(full.clone(), k.span());
            if !allowed.contains(&k.get_ref().as_ref()) {
                let mut msg = format!("unknown key {:?}", k.get_ref());
                if let Some(s) = closest(k.get_ref(), allowed).filter(|s| t.get(*s).is_none()) {
                    msg += &format!(", did you mean {s:?}?");
                    self.suggested.push(join(path, s));
                }
                msg += &format!(" (expected one of: {})", allowed.join(", "));
                self.error_at(k.span(), &full, msg);
            }
        }
    }

    /// The table at top-level key `name`, if present and a table.
    fn section<'t, 'i>(&mut self, root: &'t DeTable<'i>, name: &str) -> Option<&'t DeTable<'i>> {
        let v = root.get(name)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => self.wrong_type(name, v, "a table"),
        }
    }

    /// `[section.NAME]` tables in file order, each read with `read`.
    fn named_tables<T>(
        &mut self,
        root: &DeTable<'_>,
        section: &str,
        mut read: impl FnMut(&mut Self, &str, &str, &DeTable<'_>) -> Option<T>,
    ) -> Vec<T> {
        let Some(tables) = self.section(root, section) else {
            return Vec::new();
        };
        let mut entries: Vec<_> = tables.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut out = Vec::with_capacity(entries.len());
        for (name, v) in entries {
            let key = join(section, name.get_ref());
            self.mark(key.clone(), name.span());
            match v.get_ref() {
                DeValue::Table(t) => match read(self, &key, name.get_ref(), t) {
                    Some(x) => out.push(x),
                    None => self.failed.push(key),
                },
                _ => {
                    self.wrong_type::<()>(&key, v, "a table");
                }
            }
        }
        out
    }

    fn required<T>(
        &mut self,
        t: &DeTable<'_>,
        path: &str,
        name: &str,
        read: impl FnOnce(&mut Self, &str, &Item<'_>) -> Option<T>,
    ) -> Option<T> {
        match t.get(name) {
            Some(v) => read(self, &join(path, name), v),
            None => {
                let key = join(path, name);
                if !self.suggested.contains(&key) {
                    self.error_key(&key, format!("missing: {path} needs a {name:?} key"));
                }
                None
            }
        }
    }

    fn optional<T>(
        &mut self,
        t: &DeTable<'_>,
        path: &str,
        name: &str,
        read: impl FnOnce(&mut Self, &str, &Item<'_>) -> Option<T>,
    ) -> Option<T> {
        let v = t.get(name)?;
        read(self, &join(path, name), v)
    }

    // ---- values ----

    fn wrong_type<T>(&mut self, key: &str, v: &Item<'_>, expected: &str) -> Option<T> {
        self.error_at(
            v.span(),
            key,
            format!("expected {expected}, found {}", v.get_ref().type_str()),
        );
        None
    }

    fn string<'v>(&mut self, key: &str, v: &'v Item<'_>) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => self.wrong_type(key, v, "a string"),
        }
    }

    /// An array of networks (`"10.0.0.0/8"`, `"2001:db8::/32"`, bare addresses); each bad
    /// entry is reported at its own position.
    fn networks(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<Cidr>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(key, v, "an array of networks such as [\"10.0.0.0/8\"]");
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            match self.named(&ikey, item, Cidr::from_str) {
                Some(c) => out.push(c),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An array of `ip:port` addresses; each bad entry is reported at its own position, and
    /// each entry's position is recorded (`key[0]`, ...) for the rules about it.
    fn addresses(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<SocketAddr>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(key, v, "an array of addresses such as [\"10.0.0.2:7946\"]");
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            self.mark(ikey.clone(), item.span());
            match self.address(&ikey, item) {
                Some(a) => out.push(a),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An array of network interface names (`["eth0", "eth1"]`), each as the kernel allows
    /// one: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..". Each bad entry is
    /// reported at its own position, and each entry's position is recorded (`key[0]`, ...)
    /// for the rules about it.
    fn interfaces(&mut self, key: &str, v: &Item<'_>) -> Option<Vec<String>> {
        let DeValue::Array(items) = v.get_ref() else {
            return self.wrong_type(key, v, "an array of interface names such as [\"eth0\"]");
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            self.mark(ikey.clone(), item.span());
            let Some(name) = self.string(&ikey, item) else {
                ok = false;
                continue;
            };
            match interface_problem(name) {
                None => out.push(name.to_string()),
                Some(why) => {
                    self.error_at(
                        item.span(),
                        &ikey,
                        format!("{name:?} is not an interface name: {why}"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// An absolute path (a string starting with '/').
    fn absolute_path(&mut self, key: &str, v: &Item<'_>) -> Option<std::path::PathBuf> {
        let s = self.string(key, v)?;
        if !s.starts_with('/') {
            self.error_at(v.span(), key, format!("{s:?} is not an absolute path"));
            return None;
        }
        Some(s.into())
    }

    /// A user or group name (as in /etc/passwd): non-empty, no ':', '/' or whitespace.
    fn name(&mut self, key: &str, v: &Item<'_>) -> Option<String> {
        let s = self.string(key, v)?;
        if s.is_empty() || s.chars().any(|c| c == ':' || c == '/' || c.is_whitespace()) {
            self.error_at(v.span(), key, format!("{s:?} is not a user or group name"));
            return None;
        }
        Some(s.to_string())
    }

    fn boolean(&mut self, key: &str, v: &Item<'_>) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => self.wrong_type(key, v, "true or false"),
        }
    }

    /// An optional integer key, narrowed to `T` and within `range`.
    fn ranged<T>(
        &mut self,
        t: &DeTable<'_>,
        path: &str,
        name: &str,
        range: RangeInclusive<T>,
    ) -> Option<T>
    where
        T: TryFrom<i64> + PartialOrd + Display,
    {
        let v = t.get(name)?;
        let key = join(path, name);
        let DeValue::Integer(i) = v.get_ref() else {
            return self.wrong_type(&key, v, "an integer");
        };
        let n = i64::from_str_radix(i.as_str(), i.radix()).ok();
        match n.and_then(|n| T::try_from(n).ok()) {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                let (lo, hi) = (range.start(), range.end());
                let message = format!("{} is out of range {lo}..={hi}", i.as_str());
                self.error_at(v.span(), &key, message);
                None
            }
        }
    }

    fn address(&mut self, key: &str, v: &Item<'_>) -> Option<SocketAddr> {
        let s = self.string(key, v)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let message = format!("{s:?} is not an ip:port address: {}", address_problem(s));
                self.error_at(v.span(), key, message);
                None
            }
        }
    }

    fn duration(&mut self, key: &str, v: &Item<'_>) -> Option<Duration> {
        let DeValue::String(s) = v.get_ref() else {
            return self.wrong_type(key, v, "a duration string like \"30s\"");
        };
        match humantime::parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error_at(
                    v.span(),
                    key,
                    format!("{s:?} is not a duration like \"30s\" or \"500ms\" ({e})"),
                );
                None
            }
        }
    }

    fn named<T, E: std::fmt::Display>(
        &mut self,
        key: &str,
        v: &Item<'_>,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Option<T> {
        let s = self.string(key, v)?;
        match parse(s) {
            Ok(x) => Some(x),
            Err(e) => {
                self.error_at(v.span(), key, format!("{s:?}: {e}"));
                None
            }
        }
    }
}

/// Why `s` is not a numeric `ip:port`, and how to write it.
fn address_problem(s: &str) -> String {
    const FORMS: &str = "write 192.0.2.1:53 or [2001:db8::1]:53";
    let (host, port) = match (s.strip_prefix('['), s.rsplit_once(':')) {
        (Some(rest), _) => match rest.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return format!("missing ']' ({FORMS})"),
        },
        (None, Some((host, _))) if host.contains(':') => {
            return format!("an IPv6 address needs brackets ({FORMS})");
        }
        (None, Some((host, port))) => (host, Some(port)),
        (None, None) => (s, None),
    };
    if host.parse::<IpAddr>().is_err() {
        return if !host.contains(':') && host.contains(|c: char| c.is_ascii_alphabetic()) {
            format!("{host:?} is a host name; names are not resolved ({FORMS})")
        } else {
            format!("{host:?} is not a valid IP address ({FORMS})")
        };
    }
    match port {
        None => format!("the port is missing ({FORMS})"),
        Some(p) => format!("the port {p:?} is not a number in 1..=65535"),
    }
}

/// Why `name` cannot name a network interface (the kernel's `dev_valid_name`), if it cannot.
fn interface_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("it is empty".into())
    } else if name.len() > defaults::INTERFACE_NAME_MAX {
        Some(format!(
            "{} bytes, longer than the {} an interface name has at most",
            name.len(),
            defaults::INTERFACE_NAME_MAX
        ))
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not allowed".into())
    } else {
        let bad = |c: &char| *c == '/' || *c == ':' || c.is_whitespace();
        let c = name.chars().find(bad)?;
        Some(format!("{c:?} is not allowed in one"))
    }
}

/// The allowed key within edit distance 2 of `key`, if any.
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The `mode` key alone (its `responses` is a separate key).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Flow,
    Datagram,
    RequestResponse,
}

fn parse_mode(s: &str) -> Result<Mode, &'static str> {
    match s {
        "flow" => Ok(Mode::Flow),
        "datagram" => Ok(Mode::Datagram),
        "request-response" => Ok(Mode::RequestResponse),
        _ => Err("expected one of: flow, datagram, request-response"),
    }
}

fn parse_state(s: &str) -> Result<AdminState, &'static str> {
    match s {
        "enabled" => Ok(AdminState::Enabled),
        "draining" => Ok(AdminState::Draining),
        "disabled" => Ok(AdminState::Disabled),
        _ => Err("expected one of: enabled, draining, disabled"),
    }
}

/// Bytes written as hexadecimal digits (an even number of them, at least two).
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
