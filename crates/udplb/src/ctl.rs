//! `udplb ctl`: talks to a running udplb through its admin API ([docs/api.md]): tables for
//! people by default, the API's JSON with `--json`.
//!
//! Owns: the command-line shape of each API call and its table. Must not: know anything the
//! API does not say (it runs as another process, often on another host).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// `udplb ctl [--admin ADDR] [--json] COMMAND`
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin endpoint of the udplb to talk to.
    #[arg(
        long,
        default_value = "127.0.0.1:9190",
        value_name = "ADDR",
        env = "UDPLB_ADMIN"
    )]
    admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A file holding the admin token (`[admin] token_file`), sent with every call.
    #[arg(long, value_name = "FILE", env = "UDPLB_ADMIN_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Listeners with their traffic and flows.
    Status,
    /// Backends of every pool (or of one) with health, state and weight.
    Backends {
        /// Only this pool.
        pool: Option<String>,
    },
    /// No new flows for a backend; its flows continue until idle.
    Drain { pool: String, backend: String },
    /// Put a backend back in rotation.
    Enable { pool: String, backend: String },
    /// Take a backend out; its flows move at their next datagram.
    Disable { pool: String, backend: String },
    /// Set a backend's weight.
    Weight {
        pool: String,
        backend: String,
        weight: u32,
    },
    /// Add a backend to a pool.
    Add {
        pool: String,
        backend: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend (absent: nothing to do).
    Remove { pool: String, backend: String },
    /// Re-read the configuration file.
    Reload,
    /// Exit 0 while udplb should get traffic (every listener's pool holds its quorum with a
    /// backend up), 1 with the reason otherwise (keepalived's track_script).
    Ready,
    /// Where a new flow of CLIENT (ip:port) would go, and why.
    Explain {
        client: String,
        #[arg(long)]
        listener: Option<String>,
    },
}

/// Runs one ctl command; API errors exit 1 with the API's message.
pub fn run(args: CtlArgs) -> ExitCode {
    let token = match args.token_file.as_deref().map(crate::token::read) {
        None => None,
        Some(Ok(token)) => Some(token),
        Some(Err(e)) => {
            eprintln!("udplb ctl: --token-file: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ctl = Ctl::new(&args.admin, token);
    let result = match &args.command {
        CtlCommand::Status => ctl.get("/api/v1/status").map(|v| (status_table(&v), v)),
        CtlCommand::Backends { pool } => ctl
            .get("/api/v1/pools")
            .map(|v| (backends_table(&v, pool.as_deref()), v)),
        CtlCommand::Drain { pool, backend } => {
            ctl.change("POST", &backend_path(pool, backend, "/drain"), None)
        }
        CtlCommand::Enable { pool, backend } => {
            ctl.change("POST", &backend_path(pool, backend, "/enable"), None)
        }
        CtlCommand::Disable { pool, backend } => {
            ctl.change("POST", &backend_path(pool, backend, "/disable"), None)
        }
        CtlCommand::Weight {
            pool,
            backend,
            weight,
        } => ctl.change(
            "PUT",
            &backend_path(pool, backend, "/weight"),
            Some(json!({ "weight": weight })),
        ),
        CtlCommand::Add {
            pool,
            backend,
            weight,
            backup,
        } => ctl.change(
            "POST",
            &format!("/api/v1/pools/{pool}/backends"),
            Some(json!({ "address": backend, "weight": weight, "backup": backup })),
        ),
        CtlCommand::Remove { pool, backend } => {
            ctl.change("DELETE", &backend_path(pool, backend, ""), None)
        }
        CtlCommand::Reload => ctl.change("POST", "/api/v1/reload", None),
        CtlCommand::Ready => ctl.get("/api/v1/ready").map(|v| ("ready\n".to_string(), v)),
        CtlCommand::Explain { client, listener } => {
            let mut path = format!("/api/v1/explain?client={client}");
            if let Some(l) = listener {
                path += &format!("&listener={l}");
            }
            ctl.get(&path).map(|v| (explain_text(&v), v))
        }
    };
    match result {
        Ok((text, value)) => {
            if args.json {
                println!("{value}");
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("udplb ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Ctl {
    agent: ureq::Agent,
    base: String,
    token: Option<crate::token::Token>,
}

impl Ctl {
    fn new(admin: &str, token: Option<crate::token::Token>) -> Ctl {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Ctl {
            agent,
            base: format!("http://{admin}"),
            token,
        }
    }

    /// `request` with the token, if any.
    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", token.header()),
            None => request,
        }
    }

    fn get(&self, path: &str) -> Result<Value, String> {
        self.call("GET", path, None)
    }

    /// A change: the text says whether anything changed.
    fn change(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(String, Value), String> {
        let v = self.call(method, path, body)?;
        let text = match v.get("changed").and_then(Value::as_bool) {
            Some(true) | None => format!("ok (generation {})\n", v["generation"]),
            Some(false) => "ok, nothing to change\n".to_string(),
        };
        Ok((text, v))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let sent = match (method, body) {
            ("GET", _) => self.authorized(self.agent.get(&url)).call(),
            ("DELETE", _) => self.authorized(self.agent.delete(&url)).call(),
            ("PUT", Some(b)) => self.authorized(self.agent.put(&url)).send_json(b),
            ("PUT", None) => self.authorized(self.agent.put(&url)).send_empty(),
            (_, Some(b)) => self.authorized(self.agent.post(&url)).send_json(b),
            (_, None) => self.authorized(self.agent.post(&url)).send_empty(),
        };
        let response = sent.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(value)
        } else {
            let why = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_string);
            Err(format!("{status}: {why}"))
        }
    }
}

fn backend_path(pool: &str, backend: &str, what: &str) -> String {
    format!("/api/v1/pools/{pool}/backends/{backend}{what}")
}

fn status_table(v: &Value) -> String {
    let mut rows = vec![row(&[
        "LISTENER",
        "ADDRESS",
        "MODE",
        "DATAPLANE",
        "POOL",
        "IN",
        "FORWARDED",
        "REPLIES",
        "DROPS",
        "FLOWS",
    ])];
    for l in v["listeners"].as_array().into_iter().flatten() {
        let drops = sum_of_values(&l["drops"]);
        rows.push(row(&[
            &text(&l["name"]),
            &text(&l["address"]),
            &text(&l["mode"]),
            &text(&l["dataplane"]),
            &text(&l["pool"]),
            &text(&l["datagrams_in"]),
            &text(&l["forwarded"]),
            &text(&l["replies_out"]),
            &drops.to_string(),
            &text(&l["flows"]["live"]),
        ]));
    }
    layout(&rows)
        + &kernel_line(&v["kernel"])
        + &announcement(&v["announce"])
        + &flow_sync(&v["sync"])
}

/// The kernel data plane's line under `status`, when a listener uses it: where it is
/// attached, how each of its listeners reaches the backends, what it forwarded (the table's
/// counters are the sockets') and dropped.
fn kernel_line(k: &Value) -> String {
    if k.is_null() {
        return String::new();
    }
    let sum = |field: &str| -> u64 {
        k["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["backends"].as_array().into_iter().flatten())
            .filter_map(|b| b[field].as_u64())
            .sum()
    };
    let dropped = sum_of_values(&k["drops"]);
    let interfaces: Vec<String> = k["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let methods: Vec<String> = k["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| match l["encapsulation"].as_str() {
            Some(e) => format!("{} {} {e}", text(&l["listener"]), text(&l["forwarding"])),
            None => format!("{} {}", text(&l["listener"]), text(&l["forwarding"])),
        })
        .collect();
    let live: u64 = k["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["flows"].as_u64())
        .sum();
    format!(
        "kernel: attached to {} ({}); {live} live flows; forwarded {} datagrams, {} replies; \
         dropped {dropped}\n",
        interfaces.join(","),
        methods.join(", "),
        sum("datagrams"),
        sum("replies")
    )
}

/// The flow-state sync line under `status`, with `[sync]`: when each peer was last heard,
/// the placements held and used.
fn flow_sync(s: &Value) -> String {
    if s.is_null() {
        return String::new();
    }
    let now = crate::health::unix_now();
    let peers: Vec<String> = s["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| match p["heard_unix"].as_f64() {
            Some(_) => format!(
                "{} heard {} ago",
                text(&p["address"]),
                since(&p["heard_unix"], now)
            ),
            None => format!("{} never heard", text(&p["address"])),
        })
        .collect();
    format!(
        "sync: {}; {} placements from peers held, {} flows placed by them\n",
        peers.join(", "),
        text(&s["placements"]),
        text(&s["used"])
    )
}

/// The announcement line under `status`, with `[announce]`: announced or withdrawn, for how
/// long, and why not when it should not be.
fn announcement(a: &Value) -> String {
    if a.is_null() {
        return String::new();
    }
    let now = crate::health::unix_now();
    let state = match a["announced"].as_bool() {
        Some(true) => "announced",
        Some(false) => "withdrawn",
        None => "not yet told",
    };
    let mut line = format!("announce: {state} (for {})", since(&a["since_unix"], now));
    if let Some(why) = a["reason"].as_str().filter(|r| !r.is_empty()) {
        line += &format!(", not wanted: {why}");
    }
    if let Some(e) = a["last_error"].as_str() {
        line += &format!(", last failure: {e}");
    }
    line + "\n"
}

/// Every backend with its health (and for how long), state, weight, live flows, traffic per
/// second each way over the last 2 s (datagrams, bytes), reply latency (request-response
/// listeners: the bucket bounds p50 and p99 fall in), checks and last error: what
/// `ipvsadm -L -n --stats --rate` shows, and more.
fn backends_table(pools: &Value, only: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut rows = vec![row(&[
        "POOL",
        "BACKEND",
        "UP",
        "SINCE",
        "ROTATION",
        "STATE",
        "WEIGHT",
        "FLOWS",
        "TO/S",
        "FROM/S",
        "BYTES/S TO/FROM",
        "LATENCY P50/P99",
        "CHECKS OK/FAILED",
        "LAST ERROR",
    ])];
    for p in pools
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| only.is_none_or(|o| p["name"] == o))
    {
        for b in p["backends"].as_array().into_iter().flatten() {
            let yes_no = |v: &Value| {
                if v.as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_string()
            };
            rows.push(row(&[
                &text(&p["name"]),
                &text(&b["address"]),
                &yes_no(&b["healthy"]),
                &since(&b["healthy_since_unix"], now),
                &yes_no(&b["in_rotation"]),
                &text(&b["admin"]),
                &text(&b["weight"]),
                &(b["flows"].as_u64().unwrap_or(0) + b["kernel_flows"].as_u64().unwrap_or(0))
                    .to_string(),
                &per_second(&b["rates"]["forwarded_per_s"]),
                &per_second(&b["rates"]["replies_per_s"]),
                &format!(
                    "{}/{}",
                    per_second(&b["rates"]["bytes_forwarded_per_s"]),
                    per_second(&b["rates"]["bytes_replied_per_s"])
                ),
                &latency(&b["reply_latency"]),
                &format!("{}/{}", text(&b["checks_ok"]), text(&b["checks_failed"])),
                &text(&b["last_error"]),
            ]));
        }
    }
    layout(&rows)
}

/// How long ago Unix time `at` was, as "5m3s" (to the second).
fn since(at: &Value, now: f64) -> String {
    at.as_f64().map_or("-".into(), |at| {
        let secs = Duration::from_secs((now - at).max(0.0) as u64);
        humantime::format_duration(secs)
            .to_string()
            .replace(' ', "")
    })
}

/// A rate with an SI prefix: 950, 12.5k, 3.1M.
fn per_second(v: &Value) -> String {
    let Some(x) = v.as_f64() else {
        return "-".into();
    };
    match x {
        x if x >= 1e6 => format!("{:.1}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// p50/p99 reply latency as bucket bounds ("<=1ms/<=5ms"); "-" without samples.
fn latency(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let bound = |q: &Value| match q.as_f64() {
        Some(ms) if ms < 1.0 => format!("<={}us", (ms * 1e3).round()),
        Some(ms) => format!("<={ms}ms"),
        None => ">5s".into(),
    };
    format!(
        "{}/{}",
        bound(&v["p50_ms_at_most"]),
        bound(&v["p99_ms_at_most"])
    )
}

fn explain_text(v: &Value) -> String {
    let candidates: Vec<String> = v["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let mut table = match v["table_backend"].as_str() {
        Some(t) if v["backend"] == v["peer"] => format!("  without the peer's flow: {t}\n"),
        Some(t) => format!("  without persistence: {t}\n"),
        None => String::new(),
    };
    if let Some(b) = v["flow"]["backend"].as_str() {
        table += &format!(
            "  live flow (this ip:port, kept until idle): {b}, idle {} ms\n",
            text(&v["flow"]["idle_ms"])
        );
    }
    format!(
        "client {} on listener {} (pool {}, {}, {} data plane):\n  backend: {}\n{table}  candidates: {}\n  tier: {}\n  why: {}\n",
        text(&v["client"]),
        text(&v["listener"]),
        text(&v["pool"]),
        text(&v["scheduler"]),
        text(&v["dataplane"]),
        if v["backend"].is_null() {
            "any candidate".to_string()
        } else {
            text(&v["backend"])
        },
        candidates.join(", "),
        text(&v["tier"]),
        text(&v["reason"]),
    )
}

/// The sum of an object's numbers (drops by reason), 0 for anything else.
fn sum_of_values(v: &Value) -> u64 {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, n)| n.as_u64())
        .sum()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Aligns columns with two spaces between them.
fn layout(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}
