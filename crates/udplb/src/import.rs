//! `udplb import keepalived FILE`: keepalived's LVS configuration (`virtual_server` blocks)
//! as an equivalent udplb.toml, and a list of what could not be translated.
//!
//! Owns: reading keepalived.conf's block syntax (words, quoted strings, `{ }` blocks, `!` and
//! `#` comments) into a tree, and translating UDP virtual servers: address and port, `lb_algo`
//! / `lvs_sched`, `ops`, `persistence_timeout` (and its client-IP granularity), `delay_loop`,
//! real servers with `weight` and `inhibit_on_failure`, `sorry_server` (a backup), `quorum` and
//! `hysteresis`, `lvs_method` / `lb_kind` NAT and TUN (IP in IP or GUE: udplb's kernel data
//! plane, which forwards as IPVS does), and the checks `UDP_CHECK`, `DNS_CHECK`, `TCP_CHECK`,
//! `HTTP_GET`/`SSL_GET` and `MISC_CHECK`. Everything else it meets is listed, with its line, as
//! not translated (TCP virtual servers, VRRP, DR, notify scripts, ...), never silently dropped.
//! Must not: write files (the caller prints the result) or guess where udplb has no
//! equivalent.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// A statement: its keyword and arguments, its block if it has one, and its line.
#[derive(Debug)]
struct Node {
    name: String,
    args: Vec<String>,
    block: Option<Vec<Node>>,
    line: usize,
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        self.children().find(|c| c.name == name)
    }

    fn children(&self) -> impl Iterator<Item = &Node> {
        self.block.iter().flatten()
    }

    fn arg(&self, name: &str) -> Option<&str> {
        self.child(name)?.args.first().map(String::as_str)
    }
}

/// The result: a configuration and what was left out.
#[derive(Debug, Default)]
pub struct Imported {
    /// udplb.toml text.
    pub toml: String,
    /// What could not be translated, each with its line in the keepalived file.
    pub notes: Vec<String>,
    /// Virtual servers translated.
    pub listeners: usize,
}

/// Translates keepalived configuration `text`.
pub fn keepalived(text: &str) -> Result<Imported, String> {
    let nodes = parse(&tokens(text))?;
    let mut out = Imported::default();
    let _ = writeln!(
        out.toml,
        "# Translated from keepalived.conf by `udplb import keepalived`: check it with\n\
         # `udplb check -c FILE`, and read the notes it printed.\n"
    );
    let mut tomls = Vec::new();
    for node in &nodes {
        match node.name.as_str() {
            "virtual_server" => {
                if let Some(t) = virtual_server(node, &mut out.notes) {
                    tomls.push(t);
                    out.listeners += 1;
                }
            }
            "global_defs"
            | "vrrp_script"
            | "vrrp_instance"
            | "vrrp_sync_group"
            | "virtual_server_group"
            | "static_ipaddress"
            | "static_routes"
            | "static_rules"
            | "include"
            | "track_file"
            | "linkbeat_interfaces"
            | "garp_group" => {
                out.notes.push(format!(
                    "line {}: {} not translated ({})",
                    node.line,
                    node.name,
                    why_not(&node.name)
                ));
            }
            other => out
                .notes
                .push(format!("line {}: {other} not translated", node.line)),
        }
    }
    out.toml.push_str(&tomls.join("\n"));
    Ok(out)
}

fn why_not(name: &str) -> &'static str {
    match name {
        "vrrp_instance" | "vrrp_sync_group" | "vrrp_script" => {
            "keep running keepalived for VRRP; udplb binds an address not configured yet (IP_FREEBIND), so it serves as soon as the address moves to it"
        }
        "global_defs" => "mail alerts and router ids have no udplb equivalent",
        "virtual_server_group" => "groups of addresses: write one listener per address",
        _ => "no udplb equivalent",
    }
}

/// One `virtual_server IP PORT { ... }` as a listener and a pool; `None` (with a note) when
/// it cannot be one.
fn virtual_server(vs: &Node, notes: &mut Vec<String>) -> Option<String> {
    let line = vs.line;
    let Some(addr) = address(&vs.args) else {
        notes.push(format!(
            "line {line}: virtual_server {} not translated (fwmark and group virtual servers have no udplb equivalent: write one listener per address)",
            vs.args.join(" ")
        ));
        return None;
    };
    let protocol = vs.arg("protocol").unwrap_or("TCP");
    if !protocol.eq_ignore_ascii_case("udp") {
        notes.push(format!(
            "line {line}: virtual_server {addr} (protocol {protocol}) not translated: udplb balances UDP (it proxies TCP only beside a UDP DNS listener)"
        ));
        return None;
    }
    let name = format!("vs_{}_{}", ident(addr.ip()), addr.port());
    let mut listener = format!("[listeners.{name}]\naddress = \"{addr}\"\npool = \"{name}\"\n");
    let mut pool = format!("[pools.{name}]\n");
    let ops = vs.child("ops").is_some();
    if ops {
        listener.push_str("mode = \"datagram\"\n");
    }
    let sched = vs
        .arg("lb_algo")
        .or_else(|| vs.arg("lvs_sched"))
        .unwrap_or("wlc");
    match scheduler(sched) {
        Some((s, note)) => {
            let _ = writeln!(pool, "scheduler = \"{s}\"");
            if let Some(n) = note {
                notes.push(format!("line {line}: lb_algo {sched}: {n}"));
            }
        }
        None => notes.push(format!(
            "line {line}: lb_algo {sched} has no udplb equivalent: round-robin used"
        )),
    }
    if let Some(n) = vs.child("persistence_timeout") {
        let secs = n.args.first().map_or("360", String::as_str);
        let _ = writeln!(listener, "persistence = \"{secs}s\"\naffinity = \"ip\"");
        if vs.child("persistence_granularity").is_some() {
            notes.push(format!(
                "line {}: persistence_granularity not translated: udplb persists by client address",
                n.line
            ));
        }
    }
    for (key, target) in [("quorum", "quorum"), ("hysteresis", "quorum_hysteresis")] {
        if let Some(v) = vs.arg(key) {
            let _ = writeln!(pool, "{target} = {v}");
        }
    }
    // What keeps a virtual server off the kernel data plane, which places by Maglev alone
    // (persistence it keeps in the kernel too).
    let off_kernel = scheduler(sched)
        .is_none_or(|(s, _)| s != "maglev")
        .then(|| format!("lb_algo {sched} (it places with mh or sh alone: maglev)"));
    for c in vs.children() {
        let note = match c.name.as_str() {
            "lb_kind" | "lvs_method" => {
                forwarding(c, off_kernel.as_deref(), &mut listener, &mut pool)
            }
            "quorum_up" | "quorum_down" => Some(format!(
                "{}: udplb runs a pool's `notify` command on every backend and quorum change with the event as its argument (quorum-lost, quorum-regained): adapt the script",
                c.name
            )),
            "persistence_engine" => Some(
                "persistence_engine sip: use payload_key kind = \"sip\" (docs/protocols.md)".into(),
            ),
            "ha_suspend"
            | "smtp_alert"
            | "virtualhost"
            | "alpha"
            | "omega"
            | "sorry_server_inhibit"
            | "sorry_server_lvs_method"
            | "delay_before_retry" => Some(format!("{} has no udplb equivalent", c.name)),
            _ => None,
        };
        if let Some(n) = note {
            notes.push(format!("line {}: {n}", c.line));
        }
    }
    let interval = vs.arg("delay_loop").unwrap_or("60");
    let mut backends = Vec::new();
    let mut check = None;
    for rs in vs.children().filter(|c| c.name == "real_server") {
        let Some(rs_addr) = address(&rs.args) else {
            notes.push(format!("line {}: real_server without an address", rs.line));
            continue;
        };
        let weight = rs.arg("weight").unwrap_or("1");
        if weight == "0" {
            backends.push(format!(
                "{{ address = \"{rs_addr}\", state = \"draining\" }}"
            ));
            notes.push(format!(
                "line {}: real_server {rs_addr} weight 0: draining (udplb weights are 1-10000)",
                rs.line
            ));
        } else {
            backends.push(format!("{{ address = \"{rs_addr}\", weight = {weight} }}"));
        }
        for c in rs.children() {
            match c.name.as_str() {
                "weight" => {}
                "inhibit_on_failure" => notes.push(format!(
                    "line {}: inhibit_on_failure: udplb takes a failed backend out of rotation; its flows follow on_backend_down",
                    c.line
                )),
                "notify_up" | "notify_down" => notes.push(format!(
                    "line {}: {}: use the pool's notify (backend-up, backend-down events)",
                    c.line, c.name
                )),
                n if n.ends_with("_CHECK") || n == "HTTP_GET" || n == "SSL_GET" => {
                    match health(c, interval, rs_addr) {
                        Ok(h) => {
                            if check.as_ref().is_some_and(|old| *old != h) {
                                notes.push(format!(
                                    "line {}: {n} differs from the first real server's: udplb uses the first for the pool (give this backend its own `health` table)",
                                    c.line
                                ));
                            }
                            check.get_or_insert(h);
                        }
                        Err(why) => notes.push(format!("line {}: {n}: {why}", c.line)),
                    }
                }
                other => notes.push(format!("line {}: {other} not translated", c.line)),
            }
        }
    }
    if let Some(sorry) = vs.child("sorry_server")
        && let Some(a) = address(&sorry.args)
    {
        backends.push(format!("{{ address = \"{a}\", backup = true }}"));
    }
    if backends.is_empty() {
        notes.push(format!(
            "line {line}: virtual_server {addr} has no real_server: not translated"
        ));
        return None;
    }
    let _ = writeln!(pool, "backends = [\n  {},\n]", backends.join(",\n  "));
    if let Some(h) = check {
        let _ = write!(pool, "\n[pools.{name}.health]\n{h}");
    }
    Some(format!("{listener}\n{pool}"))
}

/// `lvs_method` (or `lb_kind`) `c` as udplb's kernel data plane, which forwards as IPVS does:
/// NAT keeps the client's address (the real servers already route their replies through the
/// director), TUN encapsulates (`type ipip`, or `type gue port N`). `dataplane = "auto"`: where
/// udplb cannot load its program it serves with its sockets instead, and says so. Not when
/// `off_kernel` says what the kernel data plane cannot do: the sockets then, and the note says
/// what to change. Returns the note to print.
fn forwarding(
    c: &Node,
    off_kernel: Option<&str>,
    listener: &mut String,
    pool: &mut String,
) -> Option<String> {
    let method = c
        .args
        .first()
        .map_or("", String::as_str)
        .to_ascii_uppercase();
    let said = format!("{} {}", c.name, c.args.join(" "));
    if let (Some(why), "NAT" | "TUN") = (off_kernel, method.as_str()) {
        return Some(format!(
            "{said}: udplb's kernel data plane forwards as IPVS does (forwarding = \"nat\" or \"dsr\", dataplane = \"auto\"), but not with {why}: as written udplb relays through its own sockets (the real servers see udplb's address); set scheduler = \"maglev\" to use it"
        ));
    }
    let fallback = "where udplb cannot load its kernel program (no root or CAP_BPF) it serves with its sockets instead and says so in its log: the real servers then see udplb's address";
    let arg_after = |word: &str| {
        c.args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(word))
            .and_then(|i| c.args.get(i + 1))
            .map(String::as_str)
    };
    match method.as_str() {
        "NAT" => {
            listener.push_str("dataplane = \"auto\"\n");
            pool.push_str("forwarding = \"nat\"\n");
            Some(format!(
                "{said}: udplb's kernel data plane, forwarding = \"nat\" (the real servers see the client and reply through this host, as with LVS-NAT); {fallback}"
            ))
        }
        "TUN" => {
            let tunnel = arg_after("type").unwrap_or("ipip").to_ascii_lowercase();
            let gue_port = match tunnel.as_str() {
                "ipip" => None,
                "gue" => match arg_after("port").and_then(|p| p.parse::<u16>().ok()) {
                    Some(port) if port > 0 => Some(port),
                    _ => {
                        return Some(format!(
                            "{said}: GUE without a port: not translated (udplb relays through its own sockets)"
                        ));
                    }
                },
                other => {
                    return Some(format!(
                        "{said}: tunnel type {other} has no udplb equivalent (dsr encapsulates IP in IP or in GUE): udplb relays through its own sockets"
                    ));
                }
            };
            listener.push_str("dataplane = \"auto\"\n");
            pool.push_str("forwarding = \"dsr\"\n");
            let mut note = format!(
                "{said}: udplb's kernel data plane, forwarding = \"dsr\" (the real servers keep their LVS-TUN setup"
            );
            if let Some(port) = gue_port {
                let _ = writeln!(pool, "encapsulation = \"gue\"\ngue_port = {port}");
                note.push_str(", taking GUE on port ");
                note.push_str(&port.to_string());
            }
            note.push_str(&format!(
                ", or run `udplb decap`: docs/kernel.md); {fallback}"
            ));
            if c.args
                .iter()
                .any(|a| a.eq_ignore_ascii_case("csum") || a.eq_ignore_ascii_case("remcsum"))
            {
                note.push_str("; udplb's GUE carries no outer checksum (0), whatever csum says");
            }
            Some(note)
        }
        "DR" => Some(format!(
            "{said}: direct routing (the MAC rewritten) has no udplb equivalent: udplb relays through its own sockets (no route change on the real servers); forwarding = \"dsr\" answers directly too, once the real servers take IP in IP or GUE (docs/kernel.md)"
        )),
        _ => Some(format!("{said} not translated")),
    }
}

/// The `[pools.NAME.health]` lines for keepalived check block `c` run every `interval`
/// seconds against `backend`.
fn health(c: &Node, interval: &str, backend: SocketAddr) -> Result<String, String> {
    let mut h = String::new();
    let kind = match c.name.as_str() {
        "UDP_CHECK" => {
            if let Some(payload) = c.child("payload") {
                let _ = writeln!(h, "send_hex = \"{}\"", payload.args.join(" "));
            }
            if let Some(reply) = c.child("require_reply") {
                if !reply.args.is_empty() {
                    let _ = writeln!(h, "expect_hex = \"{}\"", reply.args.join(" "));
                }
                if c.child("payload").is_none() {
                    h.push_str("send = \"ping\"\n");
                }
            }
            "udp"
        }
        "DNS_CHECK" => {
            let name = c.arg("name").unwrap_or(".");
            let _ = writeln!(
                h,
                "name = \"{name}\"\ntype = \"{}\"",
                c.arg("type").unwrap_or("SOA")
            );
            "dns"
        }
        "TCP_CHECK" => "tcp",
        "HTTP_GET" | "SSL_GET" => {
            if c.name == "SSL_GET" {
                return Err("SSL_GET: udplb's HTTP check speaks plain HTTP".into());
            }
            if let Some(url) = c.child("url") {
                if let Some(path) = url.arg("path") {
                    let _ = writeln!(h, "path = \"{path}\"");
                }
                if let Some(status) = url.arg("status_code") {
                    let _ = writeln!(h, "status = \"{status}\"");
                }
            }
            "http"
        }
        "MISC_CHECK" => {
            let Some(path) = c.arg("misc_path") else {
                return Err("no misc_path".into());
            };
            let words: Vec<String> = path
                .split_whitespace()
                .map(|w| format!("\"{w}\""))
                .collect();
            let _ = writeln!(h, "command = [{}]", words.join(", "));
            if let Some(t) = c.arg("misc_timeout") {
                let _ = writeln!(h, "timeout = \"{t}s\"");
            }
            "exec"
        }
        other => return Err(format!("{other} has no udplb equivalent")),
    };
    let mut out = format!("check = \"{kind}\"\ninterval = \"{interval}s\"\n");
    if let Some(t) = c.arg("connect_timeout") {
        let _ = writeln!(out, "timeout = \"{t}s\"");
    }
    if let Some(r) = c.arg("retry").or_else(|| c.arg("nb_get_retry")) {
        let fall = r.parse::<u32>().unwrap_or(1).max(1);
        let _ = writeln!(out, "fall = {fall}");
    }
    if let Some(p) = c.arg("connect_port")
        && p.parse::<u16>().is_ok_and(|p| p != backend.port())
    {
        let _ = writeln!(out, "port = {p}");
    }
    // keepalived takes a backend up at the first success by default.
    out.push_str("rise = 1\n");
    out.push_str(&h);
    Ok(out)
}

/// udplb's scheduler for LVS scheduler `s`, and what differs.
fn scheduler(s: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match s {
        "rr" | "wrr" => ("round-robin", None),
        "lc" | "wlc" => ("least-flows", None),
        "sed" | "nq" | "lblc" | "lblcr" | "twos" => (
            "least-flows",
            Some("translated as least-flows, the nearest udplb scheduler"),
        ),
        "sh" | "mh" => ("maglev", None),
        _ => return None,
    })
}

fn address(args: &[String]) -> Option<SocketAddr> {
    let ip: IpAddr = args.first()?.parse().ok()?;
    let port: u16 = args.get(1)?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

fn ident(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "_")
}

/// A token and its line.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String, usize),
    Open(usize),
    Close(usize),
    End(usize),
}

/// Splits keepalived syntax into words (quoted strings keep their spaces), braces and line
/// ends; `!` and `#` start comments.
fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut chars = line.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                '!' | '#' => break,
                '{' => {
                    chars.next();
                    out.push(Token::Open(n));
                }
                '}' => {
                    chars.next();
                    out.push(Token::Close(n));
                }
                '"' => {
                    chars.next();
                    let word: String = chars.by_ref().take_while(|&c| c != '"').collect();
                    out.push(Token::Word(word, n));
                }
                c if c.is_whitespace() => {
                    chars.next();
                }
                _ => {
                    let mut word = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || c == '{' || c == '}' {
                            break;
                        }
                        word.push(c);
                        chars.next();
                    }
                    out.push(Token::Word(word, n));
                }
            }
        }
        out.push(Token::End(n));
    }
    out
}

/// Statements and blocks from `tokens`.
fn parse(tokens: &[Token]) -> Result<Vec<Node>, String> {
    let mut at = 0;
    let nodes = block(tokens, &mut at, 0)?;
    match tokens.get(at) {
        None => Ok(nodes),
        Some(Token::Close(line)) => Err(format!("line {line}: '}}' without a '{{'")),
        Some(_) => Err("unexpected input".into()),
    }
}

fn block(tokens: &[Token], at: &mut usize, depth: usize) -> Result<Vec<Node>, String> {
    if depth > 32 {
        return Err("blocks nested too deep".into());
    }
    let mut nodes = Vec::new();
    let mut current: Option<Node> = None;
    while let Some(t) = tokens.get(*at) {
        match t {
            Token::Word(w, line) => {
                *at += 1;
                match &mut current {
                    Some(node) => node.args.push(w.clone()),
                    None => {
                        current = Some(Node {
                            name: w.clone(),
                            args: Vec::new(),
                            block: None,
                            line: *line,
                        });
                    }
                }
            }
            Token::End(_) => {
                *at += 1;
                nodes.extend(current.take());
            }
            Token::Open(line) => {
                *at += 1;
                let mut node = current.take().unwrap_or(Node {
                    name: String::new(),
                    args: Vec::new(),
                    block: None,
                    line: *line,
                });
                let children = block(tokens, at, depth + 1)?;
                match tokens.get(*at) {
                    Some(Token::Close(_)) => *at += 1,
                    _ => return Err(format!("line {line}: '{{' never closed")),
                }
                node.block = Some(children);
                nodes.push(node);
            }
            Token::Close(_) => break,
        }
    }
    nodes.extend(current.take());
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_virtual_server_becomes_a_listener_and_a_pool() {
        let text = r#"
! comment
virtual_server 10.10.10.2 1358 {
    delay_loop 6
    lb_algo wlc
    lb_kind NAT
    ops
    persistence_timeout 50
    protocol UDP
    quorum 1
    sorry_server 192.168.200.200 1358
    real_server 192.168.200.6 1358 {
        weight 2
        inhibit_on_failure
        DNS_CHECK {
            type A
            name "www.example.test"
            retry 3
            connect_timeout 2
        }
    }
    real_server 192.168.200.7 1358 { weight 1 }
}
virtual_server 10.10.10.3 80 {
    protocol TCP
    real_server 192.168.200.8 80 { weight 1 }
}
"#;
        let out = keepalived(text).unwrap();
        assert_eq!(out.listeners, 1);
        let cfg = udplb_config::parse(&out.toml, "imported.toml").unwrap_or_else(|e| {
            panic!("{e}\n{}", out.toml);
        });
        let l = &cfg.listeners[0];
        assert_eq!(l.address, "10.10.10.2:1358".parse().unwrap());
        assert_eq!(l.mode, udplb_core::SessionMode::Datagram);
        assert_eq!(l.persistence, Some(std::time::Duration::from_secs(50)));
        let p = &cfg.pools[0];
        assert_eq!(p.scheduler, udplb_core::SchedulerKind::LeastFlows);
        assert_eq!(p.backends.len(), 3);
        assert!(p.backends[2].spec.backup, "the sorry server");
        assert_eq!(p.backends[0].spec.weight, 2);
        assert_eq!(p.quorum.min_up, 1);
        let h = p.health.as_ref().unwrap();
        assert_eq!(h.interval, std::time::Duration::from_secs(6));
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("line 24: virtual_server 10.10.10.3:80 (protocol TCP)")),
            "{:?}",
            out.notes
        );
        assert!(out.notes.iter().any(|n| n.contains("inhibit_on_failure")));
        // wlc and persistence: the kernel data plane cannot, so the sockets, said why.
        assert_eq!(l.dataplane, udplb_config::Dataplane::Socket);
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("lb_kind NAT") && n.contains("not with lb_algo wlc")),
            "{:?}",
            out.notes
        );
    }

    /// LVS-TUN becomes dsr (IP in IP, or GUE with its port); DR and GRE stay on udplb's
    /// sockets, said why.
    #[test]
    fn lvs_methods_become_the_kernel_data_planes_forwarding() {
        let vs = |method: &str| {
            format!(
                "virtual_server 10.0.0.1 53 {{\n protocol UDP\n lb_algo mh\n {method}\n real_server 10.0.1.1 53 {{ weight 1 }}\n}}\n"
            )
        };
        let translate = |method: &str| {
            let out = keepalived(&vs(method)).unwrap();
            let cfg = udplb_config::parse(&out.toml, "imported.toml")
                .unwrap_or_else(|e| panic!("{method}: {e}\n{}", out.toml));
            (cfg, out.notes.join("\n"))
        };
        let (cfg, notes) = translate("lb_kind NAT");
        assert_eq!(cfg.listeners[0].dataplane, udplb_config::Dataplane::Auto);
        assert_eq!(cfg.pools[0].forwarding, udplb_config::Forwarding::Nat);
        assert!(notes.contains("see the client"), "{notes}");
        // Persistence the kernel keeps too: still the kernel data plane.
        let out = keepalived(
            &vs("lb_kind NAT").replace("lb_algo mh", "lb_algo mh\n persistence_timeout 300"),
        )
        .unwrap();
        let cfg = udplb_config::parse(&out.toml, "imported.toml").unwrap();
        assert_eq!(
            cfg.listeners[0].dataplane,
            udplb_config::Dataplane::Auto,
            "{}",
            out.toml
        );
        assert_eq!(
            cfg.listeners[0].persistence,
            Some(std::time::Duration::from_secs(300))
        );
        let (cfg, _) = translate("lvs_method TUN");
        assert_eq!(cfg.listeners[0].dataplane, udplb_config::Dataplane::Auto);
        assert_eq!(cfg.pools[0].forwarding, udplb_config::Forwarding::Dsr);
        assert_eq!(cfg.pools[0].gue_port(), None);
        let (cfg, notes) = translate("lvs_method TUN type gue port 6081 csum");
        assert_eq!(cfg.pools[0].gue_port(), Some(6081));
        assert!(notes.contains("no outer checksum"), "{notes}");
        for (method, why) in [
            ("lb_kind DR", "direct routing"),
            (
                "lvs_method TUN type gre",
                "tunnel type gre has no udplb equivalent",
            ),
            ("lvs_method TUN type gue", "GUE without a port"),
        ] {
            let (cfg, notes) = translate(method);
            assert_eq!(
                cfg.listeners[0].dataplane,
                udplb_config::Dataplane::Socket,
                "{method}"
            );
            assert!(notes.contains(why), "{method}: {notes}");
        }
    }

    #[test]
    fn broken_blocks_are_errors() {
        assert!(keepalived("virtual_server 1.2.3.4 53 {\n protocol UDP\n").is_err());
        assert!(keepalived("}\n").is_err());
    }
}

/// pen options that take a value.
const PEN_VALUED: &str = "BCTObcejFltupxwoEKGAL";

/// Translates a pen command line (its arguments, without `pen`): `-U` (UDP) is required;
/// client tracking (pen's default, `-T` seconds) becomes persistence by client IP, `-r` plain
/// round robin, `-h`/`-N` maglev by client IP, `-W` the servers' weights, `-e` a backup,
/// `-B` an abuse pool, `-s` keeping flows on a failed backend, `-x` the flow cap, `-u` the
/// user. Options without an equivalent are listed.
pub fn pen(args: &[String]) -> Result<Imported, String> {
    let mut flags = std::collections::HashMap::new();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            positional.extend(args[i..].iter().cloned());
            break;
        }
        let Some(opts) = a.strip_prefix('-').filter(|o| !o.is_empty()) else {
            positional.push(a.clone());
            continue;
        };
        for (at, c) in opts.char_indices() {
            if PEN_VALUED.contains(c) {
                let rest = &opts[at + c.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_string()
                } else {
                    let v = args.get(i).cloned().ok_or(format!("-{c} needs a value"))?;
                    i += 1;
                    v
                };
                flags.insert(c, value);
                break;
            }
            flags.insert(c, String::new());
        }
    }
    if !flags.contains_key(&'U') {
        return Err("pen without -U balances TCP; udplb balances UDP".into());
    }
    let (listen, servers) = positional
        .split_first()
        .ok_or("no listen port and servers")?;
    let listen_addr = pen_listen(listen)?;
    if servers.is_empty() {
        return Err("no servers".into());
    }
    let mut out = Imported::default();
    let name = format!("pen_{}", listen_addr.port());
    let mut runtime = String::new();
    let mut listener =
        format!("[listeners.{name}]\naddress = \"{listen_addr}\"\npool = \"{name}\"\n");
    let mut pool = format!("[pools.{name}]\n");
    let weighted = flags.contains_key(&'W');
    let mut backends = Vec::new();
    for s in servers {
        let (addr, weight, prio) = pen_server(s, listen_addr.port())?;
        match weight.filter(|_| weighted) {
            Some(w) => backends.push(format!("{{ address = \"{addr}\", weight = {w} }}")),
            None => backends.push(format!("\"{addr}\"")),
        }
        if prio.is_some() {
            out.notes.push(format!(
                "server {s}: priority not translated (udplb has primaries and backups: mark backups with backup = true)"
            ));
        }
    }
    if let Some(e) = flags.get(&'e') {
        let (addr, _, _) = pen_server(e, listen_addr.port())?;
        backends.push(format!("{{ address = \"{addr}\", backup = true }}"));
    }
    let hashed = flags.contains_key(&'h') || flags.contains_key(&'N');
    if hashed {
        pool.push_str("scheduler = \"maglev\"\n");
        listener.push_str("affinity = \"ip\"\n");
    }
    if !flags.contains_key(&'r') && !flags.contains_key(&'N') {
        // pen's client tracking: a client returns to its server for -T seconds (0: forever).
        let secs = flags
            .get(&'T')
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(86_400);
        let _ = writeln!(listener, "affinity = \"ip\"\npersistence = \"{secs}s\"");
        if hashed {
            listener = listener.replacen("affinity = \"ip\"\n", "", 1);
        }
        if flags.get(&'T').is_none_or(|t| t == "0") {
            out.notes.push(
                "-T 0 (or none): pen tracks clients forever; udplb remembers them for at most 24h"
                    .into(),
            );
        }
    }
    if flags.contains_key(&'s') {
        pool.push_str("on_backend_down = \"keep\"\n");
    }
    if let Some(x) = flags.get(&'x') {
        let _ = writeln!(listener, "max_flows = {x}");
    }
    if let Some(u) = flags.get(&'u') {
        let _ = writeln!(runtime, "[runtime]\nuser = \"{u}\"\n");
    }
    let mut abuse = String::new();
    if let Some(b) = flags.get(&'B') {
        let (addr, _, _) = pen_server(b, listen_addr.port())?;
        let _ = writeln!(listener, "abuse_pool = \"{name}_abuse\"");
        let _ = write!(abuse, "\n[pools.{name}_abuse]\nbackends = [\"{addr}\"]\n");
        out.notes.push(
            "-B: udplb sends clients refused by allow/deny or over a rate limit to the abuse pool: add them to the listener".into(),
        );
    }
    for (flag, why) in [
        (
            'C',
            "the control port: use udplb's admin endpoint ([admin] listen) and udplb ctl",
        ),
        (
            'X',
            "the control port's exit command: stop udplb with SIGTERM",
        ),
        (
            'b',
            "the blacklist time: udplb holds a failed backend down 1 s, 2 s, 4 s ... (passive health)",
        ),
        (
            'c',
            "the client table size: persistence holds at most max_flows clients",
        ),
        ('t', "the connect timeout (TCP): no UDP equivalent"),
        ('l', "the log file: udplb logs to stderr (the journal)"),
        (
            'w',
            "the HTML statistics file: udplb serves a status page on its admin endpoint",
        ),
        ('p', "the pid file: not needed under systemd"),
        ('j', "chroot: the systemd unit sandboxes udplb"),
        ('d', "debugging: --log-level debug"),
        (
            'H',
            "X-Forwarded-For (HTTP): udplb forwards datagrams; see proxy_protocol",
        ),
        (
            'F',
            "a pen configuration file: translate its settings by hand",
        ),
        ('o', "penctl options: translate them by hand"),
        ('O', "penctl options: translate them by hand"),
    ] {
        if flags.contains_key(&flag) {
            out.notes.push(format!("-{flag} not translated: {why}"));
        }
    }
    for (flag, _) in flags.iter().filter(|(f, _)| "EKGAZRL".contains(**f)) {
        out.notes.push(format!(
            "-{flag} not translated: SSL options have no UDP meaning"
        ));
    }
    let _ = write!(
        out.toml,
        "# Translated from a pen command line by `udplb import pen`: check it with\n\
         # `udplb check -c FILE`, and read the notes it printed.\n\n{runtime}{listener}\n{pool}backends = [{}]\n{abuse}",
        backends.join(", ")
    );
    out.listeners = 1;
    Ok(out)
}

/// pen's `[host:]port` (all addresses without a host).
fn pen_listen(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p),
        None => ("0.0.0.0", s),
    };
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("{s}: udplb needs a numeric address"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{s}: udplb needs a numeric port"))?;
    Ok(SocketAddr::new(ip, port))
}

/// pen's `host[:port[:maxc[:hard[:weight[:prio]]]]]`: address, weight, priority.
fn pen_server(
    s: &str,
    default_port: u16,
) -> Result<(SocketAddr, Option<u32>, Option<u32>), String> {
    let fields: Vec<&str> = s.split(':').collect();
    let ip: IpAddr = fields[0]
        .parse()
        .map_err(|_| format!("{s}: udplb needs numeric server addresses"))?;
    let num = |i: usize| {
        fields
            .get(i)
            .filter(|f| !f.is_empty())
            .map(|f| f.parse::<u32>())
    };
    let port = match num(1) {
        Some(p) => u16::try_from(p.map_err(|_| format!("{s}: bad port"))?)
            .map_err(|_| format!("{s}: bad port"))?,
        None => default_port,
    };
    let weight = num(4).transpose().map_err(|_| format!("{s}: bad weight"))?;
    let prio = num(5)
        .transpose()
        .map_err(|_| format!("{s}: bad priority"))?;
    Ok((SocketAddr::new(ip, port), weight, prio))
}

#[cfg(test)]
mod pen_tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn pen_command_lines() {
        let out = pen(&args(
            "-U -r -W -e 10.0.0.9:53 -x 1000 53 10.0.0.1:53:::2 10.0.0.2",
        ))
        .unwrap();
        let cfg = udplb_config::parse(&out.toml, "pen.toml")
            .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
        let l = &cfg.listeners[0];
        assert_eq!(l.address, "0.0.0.0:53".parse().unwrap());
        assert_eq!(l.max_flows, 1000);
        assert_eq!(l.persistence, None, "-r: no client tracking");
        let p = &cfg.pools[0];
        assert_eq!(p.backends[0].spec.weight, 2);
        assert_eq!(p.backends[1].spec.addr, "10.0.0.2:53".parse().unwrap());
        assert!(p.backends[2].spec.backup);

        // pen's default: client tracking.
        let out = pen(&args("-UT 60 -s 127.0.0.1:5300 127.0.0.1:5301")).unwrap();
        let cfg = udplb_config::parse(&out.toml, "pen.toml").unwrap();
        assert_eq!(
            cfg.listeners[0].persistence,
            Some(std::time::Duration::from_secs(60))
        );
        assert_eq!(cfg.listeners[0].affinity, udplb_core::Affinity::Ip);
        assert_eq!(cfg.pools[0].on_down, udplb_core::FailurePolicy::Keep);

        // Hashing, with an abuse server and options udplb does without.
        let out = pen(&args(
            "-U -h -B 10.0.0.66:53 -C 8888 -l /var/log/pen.log 53 10.0.0.1 10.0.0.2",
        ))
        .unwrap();
        let cfg = udplb_config::parse(&out.toml, "pen.toml")
            .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
        assert_eq!(cfg.pools[0].scheduler, udplb_core::SchedulerKind::Maglev);
        assert_eq!(cfg.listeners[0].abuse_pool.as_deref(), Some("pen_53_abuse"));
        assert!(
            out.notes.iter().any(|n| n.starts_with("-C not translated")),
            "{:?}",
            out.notes
        );
        assert!(out.notes.iter().any(|n| n.starts_with("-l not translated")));

        assert!(pen(&args("-r 53 10.0.0.1")).unwrap_err().contains("-U"));
        assert!(pen(&args("-U 53")).is_err());
        assert!(
            pen(&args("-U 53 mailhost"))
                .unwrap_err()
                .contains("numeric")
        );
    }
}
