//! The file format: a full configuration's model, and each kind of error with its location.

use std::time::Duration;

use udplb_config::{ConfigErrors, Dataplane, Encapsulation, FlowSync, Forwarding, parse};
use udplb_core::payload::KeySpec;
use udplb_core::snapshot::AdminState;
use udplb_core::{Affinity, SchedulerKind, SessionMode};

fn errors(src: &str) -> ConfigErrors {
    parse(src, "t.toml").expect_err("config should be rejected")
}

/// (line, key) of every error.
fn located(src: &str) -> Vec<(usize, String)> {
    errors(src)
        .errors
        .into_iter()
        .map(|e| (e.line, e.key))
        .collect()
}

const POOL: &str = "[pools.p]\nbackends = [\"127.0.0.1:5301\"]\n";

#[test]
fn a_full_config_becomes_the_right_model() {
    let src = r#"
[runtime]
workers = 3
[admin]
listen = "127.0.0.1:9190"
[listeners.zeta]
address = "[::]:53"
pool = "dns"
mode = "request-response"
responses = 2
affinity = "ip"
idle_timeout = "1m 30s"
max_flows = 1000
max_datagram_size = 1232
socket_buffer = 262144
[listeners.alpha]
address = "0.0.0.0:514"
pool = "dns"
mode = "datagram"
[pools.dns]
scheduler = "maglev"
backends = [
  "10.0.0.1:53",
  { address = "10.0.0.2:53", weight = 3 },
  { address = "10.0.0.3:53", backup = true, state = "draining" },
]
"#;
    let cfg = parse(src, "t.toml").unwrap();
    assert_eq!(cfg.runtime.workers, Some(3));
    assert_eq!(cfg.admin.unwrap().listen.port(), 9190);
    // File order, not alphabetical.
    let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha"]);
    let z = &cfg.listeners[0];
    assert_eq!(z.mode, SessionMode::RequestResponse { responses: 2 });
    assert_eq!(z.affinity, Affinity::Ip);
    assert_eq!(z.idle_timeout, Duration::from_secs(90));
    assert_eq!((z.max_flows, z.max_datagram_size), (1000, 1232));
    assert_eq!(z.socket_buffer, 262_144);
    assert_eq!(
        cfg.listeners[1].socket_buffer,
        udplb_config::defaults::SOCKET_BUFFER
    );
    assert_eq!(cfg.listeners[1].mode, SessionMode::Datagram);
    assert_eq!(
        cfg.listeners[1].idle_timeout,
        udplb_config::defaults::IDLE_TIMEOUT
    );
    let p = &cfg.pools[0];
    assert_eq!(p.scheduler, SchedulerKind::Maglev);
    let b: Vec<(u32, bool, AdminState)> = p
        .backends
        .iter()
        .map(|b| (b.spec.weight, b.spec.backup, b.state))
        .collect();
    assert_eq!(
        b,
        [
            (1, false, AdminState::Enabled),
            (3, false, AdminState::Enabled),
            (1, true, AdminState::Draining)
        ]
    );
}

#[test]
fn request_response_defaults_to_one_reply() {
    let cfg = parse(&format!("[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\nmode = \"request-response\"\n{POOL}"), "t")
        .unwrap();
    assert_eq!(
        cfg.listeners[0].mode,
        SessionMode::RequestResponse { responses: 1 }
    );
}

#[test]
fn all_errors_are_reported_at_once_in_file_order() {
    let src = r#"
bogus = 1
[runtime]
workers = "two"
[listeners.l]
address = "127.0.0.1:0"
pool = "missing"
mode = "stream"
idle_timeout = "soon"
max_flows = -1
colour = "red"
[pools.p]
scheduler = "fastest"
backends = ["127.0.0.1:5301", { address = "127.0.0.1:5301", weight = 0, primary = true }, 7]
"#;
    let got = located(src);
    let want: Vec<(usize, String)> = [
        (2, "bogus"),
        (4, "runtime.workers"),
        (6, "listeners.l.address"),
        (7, "listeners.l.pool"),
        (8, "listeners.l.mode"),
        (9, "listeners.l.idle_timeout"),
        (10, "listeners.l.max_flows"),
        (11, "listeners.l.colour"),
        (13, "pools.p.scheduler"),
        (14, "pools.p.backends[1].primary"),
        (14, "pools.p.backends[2]"),
        (14, "pools.p.backends[1].address"),
        (14, "pools.p.backends[1].weight"),
    ]
    .into_iter()
    .map(|(l, k)| (l, k.to_string()))
    .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got_sorted, want_sorted, "{}", errors(src));
    // Reported in file order.
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "{got:?}");
}

#[test]
fn messages_say_what_would_be_right() {
    let text = errors(
        "[listeners.l]\naddress = \"localhost:53\"\npool = \"p\"\nmode = \"stream\"\n[pools.p]\nbackends = [\"10.0.0.1:53\"]\n",
    )
    .to_string();
    assert!(
        text.contains("t.toml:2:11: listeners.l.address: \"localhost:53\" is not an ip:port address: \"localhost\" is a host name"),
        "{text}"
    );
    assert!(text.contains("flow, datagram, request-response"), "{text}");
}

#[test]
fn a_misspelled_required_key_is_one_error_with_a_suggestion() {
    let got = errors(&format!(
        "[listeners.l]\nadress = \"127.0.0.1:53\"\npool = \"p\"\n{POOL}"
    ));
    assert_eq!(got.errors.len(), 1, "{got}");
    assert!(
        got.errors[0].message.contains("did you mean \"address\""),
        "{got}"
    );
}

#[test]
fn a_missing_required_key_points_at_its_table() {
    assert_eq!(
        located(&format!("[listeners.l]\npool = \"p\"\n{POOL}")),
        [(1, "listeners.l.address".to_string())]
    );
    assert_eq!(
        located(
            "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\nscheduler = \"rr\"\n"
        ),
        [(4, "pools.p.backends".to_string())]
    );
}

#[test]
fn responses_need_request_response_mode() {
    let got = located(&format!(
        "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\nresponses = 2\n{POOL}"
    ));
    assert_eq!(got, [(4, "listeners.l.responses".to_string())]);
}

#[test]
fn wrong_types_are_named() {
    let text = errors(&format!("listeners = 3\n{POOL}")).to_string();
    assert!(
        text.contains("t.toml:1:13: listeners: expected a table, found integer"),
        "{text}"
    );
    let text = errors(&format!(
        "[listeners.l]\naddress = 53\npool = \"p\"\n{POOL}"
    ))
    .to_string();
    assert!(
        text.contains("listeners.l.address: expected a string, found integer"),
        "{text}"
    );
}

#[test]
fn syntax_errors_have_a_position() {
    let e = errors("[listeners.l\naddress = 1\n");
    assert_eq!(e.errors.len(), 1);
    assert_eq!(
        (e.errors[0].line, e.errors[0].key.as_str()),
        (1, "(syntax)"),
        "{e}"
    );
}

#[test]
fn no_listener_is_an_error() {
    assert_eq!(located(POOL), [(1, "listeners".to_string())]);
}

#[test]
fn conflicting_listener_addresses_name_the_first_listener() {
    let text = errors(&format!(
        "[listeners.a]\naddress = \"0.0.0.0:53\"\npool = \"p\"\n[listeners.b]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{POOL}"
    ))
    .to_string();
    assert!(text.starts_with("t.toml:5:"), "{text}");
    assert!(
        text.contains("listeners.b.address") && text.contains("\"a\""),
        "{text}"
    );
}

/// The message of the only error of `src`.
fn only_message(src: &str) -> String {
    let e = errors(src);
    assert_eq!(e.errors.len(), 1, "{e}");
    e.errors[0].message.clone()
}

fn listener_with(extra: &str) -> String {
    format!("[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{extra}\n{POOL}")
}

#[test]
fn unknown_keys_are_rejected_in_every_section() {
    let src = r#"
[runtime]
threads = 2
[admin]
listen = "127.0.0.1:9190"
bind = "x"
[listeners.l]
address = "127.0.0.1:53"
pool = "p"
[pools.p]
algorithm = "rr"
backends = [{ address = "127.0.0.1:1", wieght = 2 }]
"#;
    let keys: Vec<String> = errors(src).errors.into_iter().map(|e| e.key).collect();
    assert_eq!(
        keys,
        [
            "runtime.threads",
            "admin.bind",
            "pools.p.algorithm",
            "pools.p.backends[0].wieght"
        ]
    );
    let text = errors(src).to_string();
    assert!(
        text.contains("expected one of: scheduler, backends"),
        "{text}"
    );
    assert!(text.contains("did you mean \"weight\"?"), "{text}");
}

#[test]
fn unknown_names_list_the_accepted_ones() {
    assert!(only_message(&listener_with("affinity = \"port\"")).contains("ip-port, ip"));
    let src = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\nscheduler = \"fastest\"\nbackends = [{ address = \"127.0.0.1:1\", state = \"off\" }]\n";
    let text = errors(src).to_string();
    assert!(
        text.contains("pools.p.scheduler: \"fastest\": expected one of: round-robin"),
        "{text}"
    );
    assert!(
        text.contains(
            "pools.p.backends[0].state: \"off\": expected one of: enabled, draining, disabled"
        ),
        "{text}"
    );
}

#[test]
fn bad_addresses_say_what_is_wrong() {
    let cases = [
        ("300.1.1.1:53", "\"300.1.1.1\" is not a valid IP address"),
        ("127.0.0.1", "the port is missing"),
        ("[::1]", "the port is missing"),
        ("::1:53", "IPv6 address needs brackets"),
        ("127.0.0.1:99999", "not a number in 1..=65535"),
        ("dns.example:53", "host name"),
        ("127.0.0.1:0", "port 0 is not allowed"),
    ];
    for (addr, want) in cases {
        let src = format!("[listeners.l]\naddress = \"{addr}\"\npool = \"p\"\n{POOL}");
        let message = only_message(&src);
        assert!(message.contains(want), "{addr}: {message}");
    }
    assert!(
        parse(
            &format!("[listeners.l]\naddress = \"[::1]:53\"\npool = \"p\"\n{POOL}"),
            "t"
        )
        .is_ok()
    );
}

#[test]
fn out_of_range_numbers_give_the_range() {
    for (extra, want) in [
        (
            "max_flows = 99999999999",
            "99999999999 is out of range 1..=16777216",
        ),
        ("max_flows = -1", "-1 is out of range 1..=16777216"),
        (
            "max_datagram_size = 65508",
            "65508 is out of range 1..=65507",
        ),
        (
            "socket_buffer = 1024",
            "1024 is out of range 4096..=1073741824",
        ),
        (
            "socket_buffer = 2147483648",
            "2147483648 is out of range 4096..=1073741824",
        ),
        ("idle_timeout = \"50ms\"", "out of range 100ms..="),
        ("idle_timeout = \"2days\"", "out of range 100ms..="),
        (
            "mode = \"request-response\"\nresponses = 1001",
            "1001 is out of range 1..=1000",
        ),
    ] {
        let message = only_message(&listener_with(extra));
        assert!(message.contains(want), "{extra}: {message}");
    }
    let message = only_message(&format!("[runtime]\nworkers = 1025\n{}", listener_with("")));
    assert!(message.contains("1..=1024"), "{message}");
    let message = only_message(
        "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:1\", weight = 10001 }]\n",
    );
    assert!(message.contains("1..=10000"), "{message}");
}

#[test]
fn every_syntax_error_is_reported() {
    let e = errors("a = \nb = ]\n[x\n");
    let lines: Vec<usize> = e.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 2, 3], "{e}");
    let e = errors(&listener_with("address = \"127.0.0.1:54\""));
    assert!(
        e.to_string()
            .contains("t.toml:4:1: (syntax): duplicate key \"address\""),
        "{e}"
    );
}

#[test]
fn pool_rules_point_at_backends() {
    let head = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\n";
    let e = errors(&format!("{head}backends = []\n"));
    assert_eq!(
        (e.errors[0].line, e.errors[0].key.as_str()),
        (5, "pools.p.backends"),
        "{e}"
    );
    let e = errors(&format!(
        "{head}backends = [{{ address = \"127.0.0.1:1\", backup = true }}]\n"
    ));
    assert!(
        e.to_string()
            .contains("t.toml:5:1: pools.p.backends: every backend is a backup"),
        "{e}"
    );
    let e = errors(&format!(
        "{head}backends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n"
    ));
    assert!(
        e.to_string()
            .contains("t.toml:5:28: pools.p.backends[1].address: 127.0.0.1:1 is listed twice"),
        "{e}"
    );
}

#[test]
fn an_unused_pool_is_fine() {
    let src = format!(
        "{}[pools.spare]\nbackends = [\"127.0.0.1:9\"]\n",
        listener_with("")
    );
    assert_eq!(parse(&src, "t").unwrap().pools.len(), 2);
}

#[test]
fn a_listener_on_an_unknown_pool_lists_the_pools() {
    let src = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"dsn\"\n[pools.dns]\nbackends = [\"127.0.0.1:1\"]\n";
    assert_eq!(
        errors(src).to_string(),
        "t.toml:3:1: listeners.l.pool: no pool named \"dsn\" (pools: dns)\n"
    );
}

#[test]
fn a_health_table_and_pool_policies_become_the_model() {
    use udplb_config::{Expect, Probe};
    use udplb_core::health::Initial;
    use udplb_core::{AllDownPolicy, FailurePolicy};
    let src = r#"
[listeners.l]
address = "127.0.0.1:53"
pool = "p"
[pools.p]
backends = ["127.0.0.1:5301", "127.0.0.1:5302"]
on_backend_down = "keep"
all_down = "fail-open"
quorum = 1
quorum_hysteresis = 1
notify = ["/bin/echo", "x"]
[pools.p.health]
check = "udp"
send_hex = "00ff"
expect = "ok"
interval = "500ms"
timeout = "200ms"
rise = 1
fall = 4
passive_fall = 0
initial = "up"
port = 9000
"#;
    let cfg = parse(src, "t.toml").unwrap();
    let p = &cfg.pools[0];
    assert_eq!(
        (p.on_down, p.all_down),
        (FailurePolicy::Keep, AllDownPolicy::FailOpen)
    );
    assert_eq!((p.quorum.min_up, p.quorum.hysteresis), (1, 1));
    assert_eq!(
        p.notify.as_deref(),
        Some(&["/bin/echo".to_string(), "x".to_string()][..])
    );
    let h = p.health.as_ref().unwrap();
    assert_eq!(
        h.probe,
        Probe::Udp {
            send: vec![0, 0xff],
            expect: Expect::Prefix(b"ok".to_vec())
        }
    );
    assert_eq!(
        (h.interval, h.timeout, h.jitter),
        (
            Duration::from_millis(500),
            Duration::from_millis(200),
            Duration::from_millis(50)
        )
    );
    assert_eq!(
        (
            h.thresholds.rise,
            h.thresholds.fall,
            h.thresholds.passive_fall
        ),
        (1, 4, 0)
    );
    assert_eq!((h.initial, h.port), (Initial::Up, Some(9000)));
}

#[test]
fn health_table_errors_name_their_keys() {
    let src = r#"
[listeners.l]
address = "127.0.0.1:53"
pool = "p"
[pools.p]
backends = ["127.0.0.1:5301"]
all_down = "panic"
[pools.p.health]
check = "tcp"
expect = "pong"
interval = "1s"
timeout = "2s"
rise = 0
"#;
    let got = located(src);
    let keys: Vec<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "pools.p.all_down",
            "pools.p.health.expect",
            "pools.p.health.timeout",
            "pools.p.health.rise"
        ],
        "{}",
        errors(src)
    );
    let pool = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n[pools.p.health]\n";
    let text = errors(&format!("{pool}check = \"udp\"\nsend = \"\"\n")).to_string();
    assert!(
        text.contains("pools.p.health.send: must not be empty"),
        "{text}"
    );
    let text = errors(&format!("{pool}check = \"udp\"\nexpect = \"pong\"\n")).to_string();
    assert!(
        text.contains("pools.p.health.expect: needs send or send_hex"),
        "{text}"
    );
    // Without send, a udp check only wants the port open; "none" checks nothing actively.
    use udplb_config::Probe;
    for (check, probe) in [("udp", Probe::Reachable), ("none", Probe::None)] {
        let cfg = parse(&format!("{pool}check = \"{check}\"\n"), "t.toml").unwrap();
        assert_eq!(cfg.pools[0].health.as_ref().unwrap().probe, probe);
    }
    let text = errors("[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n[pools.p.health]\ncheck = \"exec\"\ncommand = []\n").to_string();
    assert!(
        text.contains("pools.p.health.command: the command needs at least a program"),
        "{text}"
    );
}

#[test]
fn a_backend_overrides_keys_of_the_pool_check() {
    use udplb_config::Probe;
    let src = r#"
[listeners.l]
address = "127.0.0.1:53"
pool = "p"
[pools.p]
backends = [
  "127.0.0.1:5301",
  { address = "127.0.0.1:5302", health = { port = 8080, fall = 5 } },
  { address = "127.0.0.1:5303", health = { check = "tcp", port = 22 } },
]
[pools.p.health]
check = "udp"
send = "ping"
interval = "1s"
"#;
    let cfg = parse(src, "t.toml").unwrap();
    let p = &cfg.pools[0];
    let checks: Vec<_> = p.backends.iter().map(|b| b.check(p).unwrap()).collect();
    assert_eq!((checks[0].port, checks[0].thresholds.fall), (None, 3));
    assert_eq!((checks[1].port, checks[1].thresholds.fall), (Some(8080), 5));
    assert!(matches!(checks[1].probe, Probe::Udp { .. }));
    assert_eq!(
        checks[1].interval,
        Duration::from_secs(1),
        "inherited from the pool"
    );
    assert_eq!((&checks[2].probe, checks[2].port), (&Probe::Tcp, Some(22)));

    let bad = src.replace("fall = 5", "fall = 0");
    let got = located(&bad);
    assert_eq!(
        got,
        [(8, "pools.p.backends[1].health.fall".to_string())],
        "{}",
        errors(&bad)
    );
}

#[test]
fn reply_timeout_belongs_to_request_response_listeners() {
    let listener = |extra: &str| {
        format!(
            "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{extra}\n\
             [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n"
        )
    };
    let cfg = parse(
        &listener("mode = \"request-response\"\nreply_timeout = \"750ms\""),
        "t.toml",
    )
    .unwrap();
    assert_eq!(cfg.listeners[0].reply_timeout, Duration::from_millis(750));
    let defaulted = parse(&listener("mode = \"request-response\""), "t.toml").unwrap();
    assert_eq!(defaulted.listeners[0].reply_timeout, Duration::from_secs(2));
    let text = errors(&listener("mode = \"flow\"\nreply_timeout = \"1s\"")).to_string();
    assert!(
        text.contains("listeners.l.reply_timeout: only applies to mode = \"request-response\""),
        "{text}"
    );
    let text = errors(&listener(
        "mode = \"request-response\"\nreply_timeout = \"1ms\"",
    ))
    .to_string();
    assert!(text.contains("listeners.l.reply_timeout"), "{text}");
}

/// Problems found after parsing (by udplb, about the machine) are reported at their key's
/// line, or at the closest enclosing key the file has.
#[test]
fn positions_locate_keys_after_parsing() {
    let src = "[runtime]\nuser = \"x\"\n\n[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n\n\
               [pools.p]\nbackends = [\"127.0.0.1:5301\"]\nnotify = [\"/bin/true\"]\n";
    let (_, positions) = udplb_config::parse_with_positions(src, "u.toml").unwrap();
    let at = |key: &str| {
        let e = positions.error(key, "m");
        (e.line, e.column, e.to_string())
    };
    assert_eq!(
        at("runtime.user"),
        (2, 1, "u.toml:2:1: runtime.user: m".into())
    );
    assert_eq!(at("pools.p.notify").0, 10);
    assert_eq!(at("runtime.group").0, 1, "absent: at [runtime]");
    assert_eq!(at("pools.p.health.command").0, 8, "absent: at [pools.p]");
    assert_eq!((at("nowhere").0, at("nowhere").1), (1, 1));
    // A backend's own check key is at the backend, not at the pool's key it replaces.
    let src = "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n[pools.p]\n\
               backends = [\"127.0.0.1:5301\",\n  { address = \"127.0.0.1:5302\", health = { command = [\"/x\"] } }]\n\
               [pools.p.health]\ncheck = \"exec\"\ncommand = [\"/y\"]\n";
    let (_, positions) = udplb_config::parse_with_positions(src, "u.toml").unwrap();
    let e = positions.error("pools.p.backends[1].health.command", "m");
    assert_eq!((e.line, e.column), (6, 44));
}

/// Changes on an admin endpoint other than loopback need a token file; on loopback they do
/// not (udplb warns at start); the token file is an absolute path.
#[test]
fn changes_on_a_reachable_admin_endpoint_need_a_token() {
    let admin = |listen: &str, extra: &str| {
        format!(
            "[admin]\nlisten = \"{listen}\"\nallow_changes = true\n{extra}\n\
             [listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{POOL}"
        )
    };
    for listen in [
        "0.0.0.0:9190",
        "192.0.2.1:9190",
        "[::]:9190",
        "[2001:db8::1]:9190",
    ] {
        let e = errors(&admin(listen, ""));
        assert_eq!(e.errors.len(), 1, "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "t.toml:3:1: admin.allow_changes: changes on an admin endpoint other than loopback"
            ) && text.contains("admin.token_file (--admin-token-file)"),
            "{text}"
        );
    }
    for listen in [
        "127.0.0.1:9190",
        "127.0.0.2:9190",
        "[::1]:9190",
        "[::ffff:127.0.0.1]:9190",
    ] {
        assert!(parse(&admin(listen, ""), "t.toml").is_ok(), "{listen}");
    }
    let with_token = parse(
        &admin("0.0.0.0:9190", "token_file = \"/etc/udplb/admin.token\""),
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        with_token.admin.unwrap().token_file.unwrap(),
        std::path::Path::new("/etc/udplb/admin.token")
    );
    // Read-only: no token needed anywhere.
    let read_only = "[admin]\nlisten = \"0.0.0.0:9190\"\n[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n";
    assert!(parse(&format!("{read_only}{POOL}"), "t.toml").is_ok());
    assert_eq!(
        only_message(&admin("127.0.0.1:9190", "token_file = \"admin.token\"")),
        "\"admin.token\" is not an absolute path"
    );
}

#[test]
fn slow_start_and_rebalance_are_pool_keys() {
    let pool = |extra: &str| {
        format!(
            "[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n{extra}\n"
        )
    };
    let cfg = parse(&pool("slow_start = \"10s\"\nrebalance = \"off\""), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].slow_start, Duration::from_secs(10));
    assert_eq!(cfg.pools[0].rebalance, None);
    let cfg = parse(&pool(""), "t.toml").unwrap();
    assert_eq!(
        (cfg.pools[0].slow_start, cfg.pools[0].rebalance),
        (Duration::ZERO, Some(Duration::from_secs(1)))
    );
    let text = errors(&pool("scheduler = \"maglev\"\nslow_start = \"5s\"")).to_string();
    assert!(
        text.contains("pools.p.slow_start: not with scheduler \"maglev\""),
        "{text}"
    );
    let text = errors(&pool("rebalance = \"soon\"")).to_string();
    assert!(text.contains("pools.p.rebalance"), "{text}");
}

#[test]
fn persistence_is_a_duration_or_off() {
    let cfg = parse(&listener_with("persistence = \"60s\""), "t.toml").unwrap();
    assert_eq!(cfg.listeners[0].persistence, Some(Duration::from_secs(60)));
    let cfg = parse(&listener_with("persistence = \"off\""), "t.toml").unwrap();
    assert_eq!(cfg.listeners[0].persistence, None);
    let cfg = parse(&listener_with(""), "t.toml").unwrap();
    assert_eq!(cfg.listeners[0].persistence, None);
    let text = errors(&listener_with("persistence = \"2d\"")).to_string();
    assert!(
        text.contains("listeners.l.persistence: 2days is out of range"),
        "{text}"
    );
    let text = errors(&listener_with("persistence = 60")).to_string();
    assert!(text.contains("listeners.l.persistence"), "{text}");
}

#[test]
fn payload_keys_by_kind() {
    let pool = |scheduler: &str, mode: &str, key: &str| {
        format!(
            "[listeners.l]\naddress = \"127.0.0.1:1812\"\npool = \"p\"\nmode = \"{mode}\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:5301\"]\nscheduler = \"{scheduler}\"\n\
             [pools.p.payload_key]\n{key}\n"
        )
    };
    let cfg = parse(&pool("rr", "datagram", "kind = \"radius\""), "t.toml").unwrap();
    assert_eq!(
        cfg.pools[0].payload_key,
        Some(KeySpec::Radius {
            attributes: vec![],
            state_timeout: Duration::from_secs(60),
            max_states: 65_536
        })
    );
    let radius = "kind = \"radius\"\nattributes = [\"User-Name\", \"calling-station-id\", \"26\"]\n\
                  state_timeout = \"30s\"\nmax_states = 1000";
    let cfg = parse(&pool("maglev", "datagram", radius), "t.toml").unwrap();
    assert_eq!(
        cfg.pools[0].payload_key,
        Some(KeySpec::Radius {
            attributes: vec![1, 31, 26],
            state_timeout: Duration::from_secs(30),
            max_states: 1000
        })
    );
    let cfg = parse(&pool("hrw", "datagram", "kind = \"sip\""), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].payload_key, Some(KeySpec::Sip));
    let bytes = "kind = \"bytes\"\noffset = 4\nlength = 8";
    let cfg = parse(&pool("maglev", "datagram", bytes), "t.toml").unwrap();
    assert_eq!(
        cfg.pools[0].payload_key,
        Some(KeySpec::Bytes {
            offset: 4,
            length: 8
        })
    );
    let token = "kind = \"token\"\nafter = \"session=\"";
    let cfg = parse(&pool("maglev", "datagram", token), "t.toml").unwrap();
    assert_eq!(
        cfg.pools[0].payload_key,
        Some(KeySpec::Token {
            after: b"session=".to_vec(),
            until: b" \t\r\n;,&".to_vec()
        })
    );

    // Each error names the key.
    for (scheduler, mode, key, expected) in [
        (
            "rr",
            "datagram",
            "kind = \"sip\"",
            "pools.p.payload_key.kind: kind \"sip\" places datagrams by a hash of their key: the pool needs scheduler = \"maglev\" or \"rendezvous\" (it has \"round-robin\")",
        ),
        (
            "maglev",
            "request-response",
            "kind = \"sip\"",
            "pools.p.payload_key: listener \"l\" (mode \"request-response\") uses this pool: kind \"sip\" needs mode = \"datagram\" (a key places each datagram on its own)",
        ),
        (
            "maglev",
            "datagram",
            "kind = \"sip\"\noffset = 3",
            "pools.p.payload_key.offset: not a key of kind \"sip\"",
        ),
        (
            "maglev",
            "datagram",
            "kind = \"bytes\"",
            "pools.p.payload_key.length: missing: pools.p.payload_key needs a \"length\" key",
        ),
        (
            "maglev",
            "datagram",
            "kind = \"json\"",
            "pools.p.payload_key.kind: unknown kind \"json\" (expected one of: radius, sip, bytes, token, quic-lb)",
        ),
        (
            "rr",
            "datagram",
            "kind = \"radius\"\nattributes = [\"User-Nme\"]",
            "pools.p.payload_key.attributes[0]: unknown RADIUS attribute \"User-Nme\"",
        ),
        (
            "rr",
            "datagram",
            "kind = \"radius\"\nstate_timeout = \"2h\"",
            "pools.p.payload_key.state_timeout: 2h is out of range 1s..=1h",
        ),
    ] {
        let text = errors(&pool(scheduler, mode, key)).to_string();
        assert!(text.contains(expected), "{key}:\n{text}");
    }
}

#[test]
fn tcp_is_on_where_a_listener_serves_dns() {
    let cfg = |address: &str, listener: &str, pool: &str| {
        parse(
            &format!(
                "[listeners.l]\naddress = \"{address}\"\npool = \"p\"\n{listener}\n\
                 [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n{pool}\n"
            ),
            "t.toml",
        )
        .unwrap()
    };
    let takes = |c: &udplb_config::Config| c.takes_tcp(&c.listeners[0]);
    assert!(takes(&cfg("0.0.0.0:53", "", "")), "port 53");
    assert!(!takes(&cfg("0.0.0.0:5300", "", "")), "another port");
    let dns_check = "[pools.p.health]\ncheck = \"dns\"\nname = \"example.test\"";
    assert!(takes(&cfg("0.0.0.0:5300", "", dns_check)), "a DNS check");
    assert!(!takes(&cfg("0.0.0.0:53", "tcp = false", "")));
    assert!(takes(&cfg("0.0.0.0:5300", "tcp = true", "")));
    // A pool TCP cannot serve: not automatically, and an error when asked for.
    assert!(!takes(&cfg("0.0.0.0:53", "", "proxy_protocol = \"every\"")));
    let text = errors(
        "[listeners.l]\naddress = \"0.0.0.0:53\"\npool = \"p\"\ntcp = true\n\
         [pools.p]\nbackends = [\"127.0.0.1:5301\"]\nproxy_protocol = \"first\"\n",
    )
    .to_string();
    assert!(
        text.contains("listeners.l.tcp: not with pool \"p\"'s proxy_protocol"),
        "{text}"
    );
    let cfg = cfg("0.0.0.0:53", "tcp_max_connections = 10", "");
    assert_eq!(cfg.listeners[0].tcp_max_connections, 10);
    assert!(
        errors(&listener_with("tcp_max_connections = 0"))
            .to_string()
            .contains("listeners.l.tcp_max_connections: 0 is out of range")
    );
}

#[test]
fn quic_lb_server_ids() {
    let pool = |mode: &str, key: &str| {
        format!(
            "[listeners.l]\naddress = \"127.0.0.1:443\"\npool = \"p\"\nmode = \"{mode}\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:4431\", \"127.0.0.1:4432\"]\nscheduler = \"maglev\"\n\
             [pools.p.payload_key]\nkind = \"quic-lb\"\n{key}\n"
        )
    };
    let ids = "server_id_length = 2\nserver_ids = { \"127.0.0.1:4431\" = \"0a01\", \"127.0.0.1:4432\" = \"0x0a02\" }";
    let cfg = parse(&pool("flow", &format!("config_id = 3\n{ids}")), "t.toml").unwrap();
    let Some(KeySpec::QuicLb { config, servers }) = &cfg.pools[0].payload_key else {
        panic!("{:?}", cfg.pools[0].payload_key);
    };
    assert_eq!((config.config_id, config.server_id_length), (3, 2));
    assert_eq!(
        servers,
        &vec![
            ("127.0.0.1:4431".parse().unwrap(), vec![0x0a, 0x01]),
            ("127.0.0.1:4432".parse().unwrap(), vec![0x0a, 0x02])
        ]
    );
    assert!(parse(&pool("datagram", ids), "t.toml").is_ok());
    for (mode, key, expected) in [
        (
            "request-response",
            ids,
            "kind \"quic-lb\" needs mode = \"flow\" or \"datagram\"",
        ),
        (
            "flow",
            "server_id_length = 2\nserver_ids = { \"127.0.0.1:4431\" = \"0a01\" }",
            "pools.p.payload_key.server_ids: backend 127.0.0.1:4432 has no server ID",
        ),
        (
            "flow",
            "server_id_length = 2\nserver_ids = { \"127.0.0.1:4431\" = \"0a01\", \"127.0.0.1:4432\" = \"0a01\" }",
            "the same server ID as another backend",
        ),
        (
            "flow",
            "server_id_length = 1\nserver_ids = { \"127.0.0.1:4431\" = \"0a01\", \"127.0.0.1:4432\" = \"02\" }",
            "2 bytes, but server_id_length = 1",
        ),
        (
            "flow",
            "server_id_length = 1\nserver_ids = { \"127.0.0.1:4431\" = \"zz\", \"127.0.0.1:4432\" = \"02\" }",
            "\"zz\" is not a hexadecimal server ID",
        ),
        (
            "flow",
            "server_ids = { \"127.0.0.1:4431\" = \"01\" }",
            "needs a \"server_id_length\" key",
        ),
        (
            "flow",
            &format!("config_id = 7\n{ids}"),
            "config_id: 7 is out of range 0..=6",
        ),
    ] {
        let text = errors(&pool(mode, key)).to_string();
        assert!(text.contains(expected), "{key}:\n{text}");
    }
}

/// `[announce]`: both commands required, the delay defaults and is bounded, errors at their line.
#[test]
fn announce_needs_both_commands_and_a_bounded_delay() {
    let with = |section: &str| {
        format!(
            "[announce]\n{section}\n[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{POOL}"
        )
    };
    let cfg = parse(
        &with("up = [\"birdc\", \"enable\", \"vip\"]\ndown = [\"birdc\", \"disable\", \"vip\"]"),
        "t.toml",
    )
    .unwrap();
    let a = cfg.announce.unwrap();
    assert_eq!(a.up, ["birdc", "enable", "vip"]);
    assert_eq!(a.down, ["birdc", "disable", "vip"]);
    assert_eq!(a.withdraw_delay, Duration::from_secs(2));
    assert!(parse(&with("up = [\"x\"]"), "t.toml").is_err());
    let text = errors(&with("up = [\"x\"]\ndown = []")).to_string();
    assert!(text.contains("t.toml:3:8: announce.down"), "{text}");
    let text = errors(&with(
        "up = [\"x\"]\ndown = [\"y\"]\nwithdraw_delay = \"1h\"",
    ))
    .to_string();
    assert!(text.contains("announce.withdraw_delay"), "{text}");
    let text = errors(&with("up = [\"x\"]\ndown = [\"y\"]\nwhen = \"now\"")).to_string();
    assert!(text.contains("announce.when"), "{text}");
}

/// `[sync]`: `listen`, `peers` and `key_file` required; `interval` and `max_entries` default
/// and are bounded; the peers are other instances' addresses; errors at their line.
#[test]
fn sync_needs_listen_peers_and_a_key_file() {
    let with = |section: &str| {
        format!(
            "[sync]\n{section}\n[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n{POOL}"
        )
    };
    let listen = "listen = \"10.0.0.1:7946\"";
    let key_file = "key_file = \"/etc/udplb/sync.key\"";
    let peers = "peers = [\"10.0.0.2:7946\", \"10.0.0.3:7946\"]";
    let cfg = parse(&with(&format!("{listen}\n{peers}\n{key_file}")), "t.toml").unwrap();
    assert_eq!(
        cfg.sync.unwrap(),
        FlowSync {
            listen: "10.0.0.1:7946".parse().unwrap(),
            peers: vec![
                "10.0.0.2:7946".parse().unwrap(),
                "10.0.0.3:7946".parse().unwrap()
            ],
            key_file: "/etc/udplb/sync.key".into(),
            interval: Duration::from_millis(100),
            max_entries: 1_048_576,
        }
    );
    let s = parse(
        &with(&format!(
            "{listen}\n{peers}\n{key_file}\ninterval = \"1s\"\nmax_entries = 4096"
        )),
        "t.toml",
    )
    .unwrap()
    .sync
    .unwrap();
    assert_eq!((s.interval, s.max_entries), (Duration::from_secs(1), 4096));
    assert_eq!(parse(&with(""), "t.toml").unwrap_err().errors.len(), 3);

    // A missing key is reported at the [sync] header.
    assert_eq!(
        located(&with(&format!("{listen}\n{peers}"))),
        [(1, "sync.key_file".to_string())]
    );
    assert!(
        only_message(&with(&format!("{listen}\n{peers}")))
            .contains("sync needs a \"key_file\" key")
    );
    // Each rule names its key, at its line (a peer at its own column).
    for (keys, expected) in [
        (
            format!("{listen}\npeers = []\n{key_file}"),
            "t.toml:3:1: sync.peers: give at least one peer",
        ),
        (
            format!("{listen}\npeers = [\"10.0.0.2:7946\", \"10.0.0.1:7946\"]\n{key_file}"),
            "t.toml:3:27: sync.peers[1]: is this instance's own sync.listen",
        ),
        (
            format!("listen = \"0.0.0.0:7946\"\npeers = [\"127.0.0.1:7946\"]\n{key_file}"),
            "t.toml:3:10: sync.peers[0]: is this instance's own sync.listen (0.0.0.0:7946)",
        ),
        (
            format!("{listen}\npeers = [\"[2001:db8::2]:7946\"]\n{key_file}"),
            "sync.peers[0]: an IPv6 address, but sync.listen is IPv4",
        ),
        (
            format!("listen = \"[2001:db8::1]:7946\"\npeers = [\"10.0.0.2:7946\"]\n{key_file}"),
            "sync.peers[0]: an IPv4 address, but sync.listen is IPv6",
        ),
        (
            format!("{listen}\npeers = [\"10.0.0.2:7946\", \"10.0.0.2:7946\"]\n{key_file}"),
            "sync.peers[1]: 10.0.0.2:7946 is listed twice",
        ),
        (
            format!("{listen}\npeers = [\"10.0.0.2:0\"]\n{key_file}"),
            "sync.peers[0]: 10.0.0.2:0: port 0 is not allowed",
        ),
        (
            format!("{listen}\npeers = [\"0.0.0.0:7946\"]\n{key_file}"),
            "sync.peers[0]: 0.0.0.0:7946: a peer needs a concrete address",
        ),
        (
            format!("listen = \"10.0.0.1:0\"\n{peers}\n{key_file}"),
            "t.toml:2:1: sync.listen: 10.0.0.1:0: port 0 is not allowed",
        ),
        (
            format!("listen = \"0.0.0.0:53\"\n{peers}\n{key_file}"),
            "sync.listen: 0.0.0.0:53 conflicts with listener \"l\" on 127.0.0.1:53",
        ),
        (
            format!("{listen}\n{peers}\n{key_file}\ninterval = \"5ms\""),
            "t.toml:5:1: sync.interval: 5ms is out of range 10ms..=10s",
        ),
        (
            format!("{listen}\n{peers}\n{key_file}\ninterval = \"1m\""),
            "sync.interval: 1m is out of range 10ms..=10s",
        ),
        (
            format!("{listen}\n{peers}\n{key_file}\nmax_entries = 10"),
            "t.toml:5:15: sync.max_entries: 10 is out of range 1024..=16777216",
        ),
        (
            format!("{listen}\n{peers}\nkey_file = \"sync.key\""),
            "sync.key_file: \"sync.key\" is not an absolute path",
        ),
        (
            format!("{listen}\npeers = \"10.0.0.2:7946\"\n{key_file}"),
            "sync.peers: expected an array of addresses such as [\"10.0.0.2:7946\"], found string",
        ),
        (
            format!("{listen}\npeers = [\"10.0.0.2\"]\n{key_file}"),
            "t.toml:3:10: sync.peers[0]: \"10.0.0.2\" is not an ip:port address: the port is missing",
        ),
    ] {
        let e = errors(&with(&keys));
        assert_eq!(e.errors.len(), 1, "{keys}:\n{e}");
        let text = e.to_string();
        assert!(text.contains(expected), "{keys}:\n{text}");
    }
    // Unknown keys are rejected; a misspelled required key is one error, with a suggestion.
    let text = errors(&with(&format!(
        "{listen}\n{peers}\n{key_file}\nsecret = \"x\""
    )))
    .to_string();
    assert!(
        text.contains("t.toml:5:1: sync.secret: unknown key \"secret\" (expected one of: listen, peers, key_file, interval, max_entries)"),
        "{text}"
    );
    assert_eq!(
        only_message(&with(&format!(
            "{listen}\npeer = [\"10.0.0.2:7946\"]\n{key_file}"
        ))),
        "unknown key \"peer\", did you mean \"peers\"? (expected one of: listen, peers, key_file, interval, max_entries)"
    );
}

/// A listener `l` with `dataplane = DATAPLANE` and the keys `listener` (from line 3), served
/// by pool `p` with the keys `pool`.
fn with_dataplane(dataplane: &str, listener: &str, pool: &str) -> String {
    format!("[listeners.l]\ndataplane = \"{dataplane}\"\n{listener}\n[pools.p]\n{pool}\n")
}

/// The listener keys of [`with_dataplane`] (lines 3 and 4).
const KERNEL_LISTENER: &str = "address = \"10.0.0.1:53\"\npool = \"p\"";
/// Its pool's backends (line 6 when the listener has no other key).
const KERNEL_BACKENDS: &str = "backends = [\"10.0.1.1:53\", \"10.0.1.2:53\"]";

#[test]
fn dataplane_interfaces_and_forwarding_default_to_sockets_and_nat() {
    let cfg = parse(&listener_with(""), "t.toml").unwrap();
    let l = &cfg.listeners[0];
    assert_eq!(l.dataplane, Dataplane::Socket);
    assert!(l.interfaces.is_empty());
    assert_eq!(cfg.pools[0].forwarding, Forwarding::Nat);
    // A pool of socket listeners only keeps the default scheduler.
    assert_eq!(cfg.pools[0].scheduler, SchedulerKind::RoundRobin);
    for (name, d) in [
        ("socket", Dataplane::Socket),
        ("kernel", Dataplane::Kernel),
        ("auto", Dataplane::Auto),
    ] {
        assert_eq!((name.parse::<Dataplane>().unwrap(), d.name()), (d, name));
    }
    for (name, f) in [
        ("nat", Forwarding::Nat),
        ("masquerade", Forwarding::Masquerade),
        ("dsr", Forwarding::Dsr),
    ] {
        assert_eq!((name.parse::<Forwarding>().unwrap(), f.name()), (f, name));
    }
    let text = errors(&listener_with("dataplane = \"xdp\"")).to_string();
    assert!(
        text.contains(
            "t.toml:4:13: listeners.l.dataplane: \"xdp\": expected one of: socket, kernel, auto"
        ),
        "{text}"
    );
    let text = errors(&format!("{}forwarding = \"tunnel\"\n", listener_with(""))).to_string();
    assert!(
        text.contains("pools.p.forwarding: \"tunnel\": expected one of: nat, masquerade, dsr"),
        "{text}"
    );
}

/// Direct server return: the backends serve the listener's port (the datagram is not
/// rewritten).
#[test]
fn dsr_backends_serve_the_listeners_port() {
    let dsr = format!("{KERNEL_BACKENDS}\nforwarding = \"dsr\"");
    let cfg = parse(&with_dataplane("kernel", KERNEL_LISTENER, &dsr), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].forwarding, Forwarding::Dsr);
    let other = "backends = [\"10.0.1.1:53\", \"10.0.1.2:5353\"]\nforwarding = \"dsr\"";
    assert_eq!(
        only_message(&with_dataplane("kernel", KERNEL_LISTENER, other)),
        "10.0.1.2:5353: with forwarding = \"dsr\" a backend serves the listener's own port (53 \
         of listeners.l): the datagram reaches it unchanged"
    );
}

/// `encapsulation = "gue"`: dsr in UDP to `gue_port` (6080 unless given); both keys only where
/// they apply, each error at its line.
#[test]
fn gue_encapsulation_needs_dsr_and_its_port_needs_gue() {
    let dsr = format!("{KERNEL_BACKENDS}\nforwarding = \"dsr\"");
    let pool = |extra: &str| with_dataplane("kernel", KERNEL_LISTENER, &format!("{dsr}\n{extra}"));
    let cfg = parse(&pool(""), "t.toml").unwrap();
    assert_eq!(
        (cfg.pools[0].encapsulation, cfg.pools[0].gue_port()),
        (None, None)
    );
    let cfg = parse(&pool("encapsulation = \"ipip\""), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].encapsulation, Some(Encapsulation::Ipip));
    assert_eq!(cfg.pools[0].gue_port(), None);
    let cfg = parse(&pool("encapsulation = \"gue\""), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].gue_port(), Some(6080));
    let cfg = parse(&pool("encapsulation = \"gue\"\ngue_port = 5555"), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].gue_port(), Some(5555));
    for (bad, why) in [
        (
            "encapsulation = \"vxlan\"",
            "t.toml:8:17: pools.p.encapsulation: \"vxlan\": expected one of: ipip, gue",
        ),
        (
            "encapsulation = \"gue\"\ngue_port = 0",
            "t.toml:9:12: pools.p.gue_port: 0 is out of range 1..=65535",
        ),
        (
            "encapsulation = \"gue\"\ngue_port = \"6080\"",
            "t.toml:9:12: pools.p.gue_port: ",
        ),
    ] {
        let text = errors(&pool(bad)).to_string();
        assert!(text.contains(why), "{bad}: {text}");
    }
    assert_eq!(
        only_message(&pool("gue_port = 5555")),
        "only with encapsulation = \"gue\" (and forwarding = \"dsr\")"
    );
    // Not a port the backends serve clients or checks on: a query from the balancer would be
    // taken apart as GUE.
    assert_eq!(
        only_message(&pool("encapsulation = \"gue\"\ngue_port = 53")),
        "GUE port 53 is listeners.l's port, which the backends serve with dsr: choose another \
         gue_port"
    );
    assert_eq!(
        only_message(&pool(
            "encapsulation = \"gue\"\n[pools.p.health]\ncheck = \"tcp\"\nport = 6080"
        )),
        "GUE port 6080 is the health check's port on the backends: choose another gue_port"
    );
    let nat = format!("{KERNEL_BACKENDS}\nencapsulation = \"gue\"");
    let src = with_dataplane("kernel", KERNEL_LISTENER, &nat);
    assert_eq!(
        only_message(&src),
        "only with forwarding = \"dsr\" (this pool forwards with \"nat\")"
    );
    assert!(
        errors(&src).to_string().contains("t.toml:7:"),
        "{}",
        errors(&src)
    );
}

/// `masquerade_ports`: a range of the pool's, only with `forwarding = "masquerade"`, above
/// Linux's ephemeral ports unless given.
#[test]
fn masquerade_ports_default_above_the_ephemeral_range_and_need_masquerade() {
    let masq = format!("{KERNEL_BACKENDS}\nforwarding = \"masquerade\"");
    let cfg = parse(&with_dataplane("kernel", KERNEL_LISTENER, &masq), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].forwarding, Forwarding::Masquerade);
    assert_eq!(cfg.pools[0].masquerade_ports().to_string(), "61000-65535");
    let given = format!("{masq}\nmasquerade_ports = \"20000-20999\"");
    let cfg = parse(&with_dataplane("kernel", KERNEL_LISTENER, &given), "t.toml").unwrap();
    assert_eq!(cfg.pools[0].masquerade_ports().count(), 1000);
    for (bad, why) in [
        ("\"20000\"", "\"20000\": not a range"),
        ("\"0-10\"", "\"0\" is not a port from 1 to 65535"),
        ("\"30000-20000\"", "30000 is above 20000"),
        ("20000", "expected a string"),
    ] {
        let src = with_dataplane(
            "kernel",
            KERNEL_LISTENER,
            &format!("{masq}\nmasquerade_ports = {bad}"),
        );
        let text = errors(&src).to_string();
        assert!(
            text.contains("t.toml:8:")
                && text.contains("pools.p.masquerade_ports: ")
                && text.contains(why),
            "{bad}: {text}"
        );
    }
    let nat = format!("{KERNEL_BACKENDS}\nmasquerade_ports = \"20000-20999\"");
    assert_eq!(
        only_message(&with_dataplane("kernel", KERNEL_LISTENER, &nat)),
        "only with forwarding = \"masquerade\" (this pool forwards with \"nat\")"
    );
}

/// The kernel indexes the Maglev table: a pool serving a kernel (or auto) listener places with
/// Maglev unless its scheduler is given, and a scheduler given that is not Maglev is refused
/// at its key.
#[test]
fn a_kernel_listener_pool_places_with_maglev() {
    for dataplane in ["kernel", "auto"] {
        let cfg = parse(
            &with_dataplane(dataplane, KERNEL_LISTENER, KERNEL_BACKENDS),
            "t.toml",
        )
        .unwrap();
        let l = &cfg.listeners[0];
        assert_eq!(l.dataplane, dataplane.parse().unwrap());
        assert!(l.dataplane.may_use_kernel());
        assert_eq!(cfg.pools[0].scheduler, SchedulerKind::Maglev, "{dataplane}");
        assert_eq!(cfg.pools[0].forwarding, Forwarding::Nat);
        // Given explicitly: as good.
        let maglev = format!("{KERNEL_BACKENDS}\nscheduler = \"maglev\"\nforwarding = \"nat\"");
        let cfg = parse(
            &with_dataplane(dataplane, KERNEL_LISTENER, &maglev),
            "t.toml",
        )
        .unwrap();
        assert_eq!(cfg.pools[0].scheduler, SchedulerKind::Maglev);
        // Another one: refused where it is written.
        let rr = format!("{KERNEL_BACKENDS}\nscheduler = \"rr\"");
        let e = errors(&with_dataplane(dataplane, KERNEL_LISTENER, &rr));
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(
            e.to_string().trim_end(),
            format!(
                "t.toml:7:1: pools.p.scheduler: \"round-robin\" cannot serve listeners.l \
                 (dataplane = \"{dataplane}\"): the kernel data plane places with \"maglev\""
            )
        );
        // A scheduler that is no scheduler at all: that error only.
        let bad = format!("{KERNEL_BACKENDS}\nscheduler = \"fastest\"");
        let e = errors(&with_dataplane(dataplane, KERNEL_LISTENER, &bad));
        assert_eq!(e.errors.len(), 1, "{e}");
        assert!(e.errors[0].message.contains("expected one of"), "{e}");
    }
    // Maglev refuses a slow start; the error says where Maglev came from.
    let slow = format!("{KERNEL_BACKENDS}\nslow_start = \"10s\"");
    assert!(
        only_message(&with_dataplane("kernel", KERNEL_LISTENER, &slow)).starts_with(
            "not with scheduler \"maglev\" (the kernel data plane's, for listeners.l)"
        )
    );
    // A pool shared with a socket listener places with Maglev for both.
    let src = format!(
        "{}[listeners.s]\naddress = \"10.0.0.2:53\"\npool = \"p\"\n",
        with_dataplane("kernel", KERNEL_LISTENER, KERNEL_BACKENDS)
    );
    let cfg = parse(&src, "t.toml").unwrap();
    assert_eq!(cfg.pools[0].scheduler, SchedulerKind::Maglev);
    // A configuration built without the file has no default to fill in: the rule applies.
    let mut cfg = parse(&listener_with(""), "t.toml").unwrap();
    cfg.listeners[0].dataplane = Dataplane::Kernel;
    assert_eq!(
        cfg.validate().unwrap_err(),
        [
            "pools.p.scheduler: \"round-robin\" cannot serve listeners.l (dataplane = \"kernel\"): \
          the kernel data plane places with \"maglev\""
        ]
    );
}

/// Everything udplb does in user space and the kernel data plane does not (yet) is refused on
/// a kernel listener, at the key that asks for it; `auto` is held to the same rules.
#[test]
fn what_the_kernel_data_plane_cannot_do_is_refused_at_its_key() {
    let l = KERNEL_LISTENER;
    let b = KERNEL_BACKENDS;
    let other_pool = format!("{b}\n[pools.q]\nbackends = [\"10.0.2.1:53\"]");
    let cases: Vec<(String, String, &str)> = vec![
        (
            "address = \"0.0.0.0:53\"\npool = \"p\"\nmode = \"datagram\"".into(),
            b.into(),
            "t.toml:3:1: listeners.l.address: a wildcard address not with mode = \"datagram\" \
             and forwarding = \"nat\" (pool \"p\") on the kernel data plane",
        ),
        (
            format!("{l}\nmode = \"request-response\""),
            b.into(),
            "t.toml:5:1: listeners.l.mode: not with dataplane = \"DP\" (replies are counted per \
             request in user space",
        ),
        (
            format!("{l}\nproxy_protocol = true"),
            b.into(),
            "t.toml:5:1: listeners.l.proxy_protocol: not with dataplane = \"DP\" (PROXY headers \
             are read in user space; not built in the kernel data plane yet)",
        ),
        (
            format!("{l}\nmode = \"datagram\"\nlimits = {{ reply_ratio = 10 }}"),
            b.into(),
            "t.toml:6:12: listeners.l.limits.reply_ratio: not with dataplane = \"DP\" (in \
             datagram mode the kernel data plane keeps no flows to count replied bytes by",
        ),
        (
            format!("{l}\nmode = \"datagram\"\nlimits = {{ new_flows_per_source = 10 }}"),
            b.into(),
            "t.toml:6:12: listeners.l.limits.new_flows_per_source: not with dataplane = \"DP\" \
             (in datagram mode the kernel data plane keeps no flows to count new ones by",
        ),
        (
            format!("{l}\nabuse_pool = \"q\""),
            other_pool.clone(),
            "t.toml:5:1: listeners.l.abuse_pool: not with dataplane = \"DP\" (clients are \
             diverted in user space",
        ),
        (
            format!("{l}\nshared_upstream = true"),
            b.into(),
            "t.toml:5:1: listeners.l.shared_upstream: not with dataplane = \"DP\" (upstream \
             sockets are shared in user space",
        ),
        (
            l.into(),
            format!("{b}\nproxy_protocol = \"first\""),
            "t.toml:7:1: pools.p.proxy_protocol: not for listeners.l (dataplane = \"DP\"): PROXY \
             headers are written in user space; not built in the kernel data plane yet",
        ),
        (
            l.into(),
            format!("{b}\nstrip_reply_proxy = true"),
            "t.toml:7:1: pools.p.strip_reply_proxy: not for listeners.l (dataplane = \"DP\"): \
             PROXY headers are removed in user space",
        ),
        (
            l.into(),
            format!("{b}\ntransparent = true"),
            "t.toml:7:1: pools.p.transparent: not for listeners.l (dataplane = \"DP\"): it makes \
             sockets send from the client's address",
        ),
        (
            format!("{l}\nmode = \"datagram\""),
            format!("{b}\nscheduler = \"maglev\"\n[pools.p.payload_key]\nkind = \"sip\""),
            "t.toml:9:10: pools.p.payload_key: not for listeners.l (dataplane = \"DP\"): keys are \
             read from datagrams in user space",
        ),
        (
            l.into(),
            "backends = [\"10.0.1.1:53\", \"[2001:db8::1]:53\"]".into(),
            "t.toml:6:28: pools.p.backends[1].address: [2001:db8::1]:53 is not for listeners.l \
             (dataplane = \"DP\"): the kernel data plane forwards to backends of the listener's \
             IP family (IPv4)",
        ),
        (
            "address = \"[2001:db8::1]:53\"\npool = \"p\"".into(),
            "backends = [\"[2001:db8:1::1]:53\", \"10.0.1.1:53\"]".into(),
            "t.toml:6:35: pools.p.backends[1].address: 10.0.1.1:53 is not for listeners.l \
             (dataplane = \"DP\"): the kernel data plane forwards to backends of the listener's \
             IP family (IPv6)",
        ),
    ];
    for dataplane in ["kernel", "auto"] {
        for (listener, pool, expected) in &cases {
            let src = with_dataplane(dataplane, listener, pool);
            let e = errors(&src);
            assert_eq!(e.errors.len(), 1, "{src}\n{e}");
            let expected = expected.replace("DP", dataplane);
            assert!(e.to_string().starts_with(&expected), "{src}\n{e}");
            // The same keys are fine on a socket listener.
            let socket = with_dataplane("socket", listener, pool);
            assert!(parse(&socket, "t.toml").is_ok(), "{socket}");
        }
    }
    // A wildcard address the kernel serves in flow mode with every forwarding method, and in
    // datagram mode where the reply's address is not the program's to remember (masquerade
    // keeps it per client port, dsr's backends answer themselves).
    let wildcard = "address = \"0.0.0.0:53\"\npool = \"p\"";
    for (mode, forwarding) in [
        ("flow", "nat"),
        ("flow", "masquerade"),
        ("flow", "dsr"),
        ("datagram", "masquerade"),
        ("datagram", "dsr"),
    ] {
        let src = with_dataplane(
            "auto",
            &format!("{wildcard}\nmode = \"{mode}\""),
            &format!("{b}\nforwarding = \"{forwarding}\""),
        );
        assert!(parse(&src, "t.toml").is_ok(), "{src}");
    }
    // Persistence the kernel keeps too, in flow and datagram mode, by ip:port or by ip.
    for extra in [
        "persistence = \"10s\"",
        "persistence = \"10s\"\naffinity = \"ip\"\nmode = \"datagram\"",
    ] {
        let src = with_dataplane("kernel", &format!("{l}\n{extra}"), b);
        let cfg = parse(&src, "t.toml").unwrap_or_else(|e| panic!("{src}\n{e}"));
        assert_eq!(cfg.listeners[0].persistence, Some(Duration::from_secs(10)));
    }
    // A reply ratio too, in flow mode with nat or masquerade; not with dsr, whose replies
    // bypass the balancer.
    let ratio = format!("{l}\nlimits = {{ reply_ratio = 10 }}");
    for forwarding in ["nat", "masquerade"] {
        let src = with_dataplane(
            "kernel",
            &ratio,
            &format!("{b}\nforwarding = \"{forwarding}\""),
        );
        assert!(parse(&src, "t.toml").is_ok(), "{src}");
    }
    let dsr = with_dataplane("kernel", &ratio, &format!("{b}\nforwarding = \"dsr\""));
    assert!(
        only_message(&dsr).starts_with(
            "not with forwarding = \"dsr\" (pools.p): the backends answer the clients directly"
        ),
        "{}",
        only_message(&dsr)
    );
    // What is refused is also what `udplb check` reports after parsing, at its line.
    let src = with_dataplane("kernel", &format!("{l}\nshared_upstream = true"), b);
    assert_eq!(
        located(&src),
        [(5, "listeners.l.shared_upstream".to_string())]
    );
}

/// `[sync]` shares the kernel data plane's flows too: a kernel (or `auto`) listener takes it
/// in every mode it has.
#[test]
fn kernel_listeners_take_sync() {
    let sync = "[sync]\nlisten = \"10.0.0.1:7946\"\npeers = [\"10.0.0.2:7946\"]\n\
                key_file = \"/etc/udplb/sync.key\"\n";
    for dataplane in ["kernel", "auto", "socket"] {
        for mode in ["flow", "datagram"] {
            let listener = format!("{KERNEL_LISTENER}\nmode = \"{mode}\"");
            let src = format!(
                "{sync}{}",
                with_dataplane(dataplane, &listener, KERNEL_BACKENDS)
            );
            let cfg = parse(&src, "t.toml").unwrap_or_else(|e| panic!("{src}\n{e}"));
            assert!(cfg.sync.is_some());
        }
    }
}

/// Replies are mapped back to their listener by the backend's address: two listeners of the
/// kernel data plane share no backend (nor a pool).
#[test]
fn kernel_listeners_share_no_backend() {
    let src = |b_dataplane: &str, b_pool: &str, q_backend: &str| {
        format!(
            "[listeners.a]\naddress = \"10.0.0.1:53\"\npool = \"p\"\ndataplane = \"kernel\"\n\
             [listeners.b]\naddress = \"10.0.0.2:53\"\npool = \"{b_pool}\"\ndataplane = \"{b_dataplane}\"\n\
             [pools.p]\nbackends = [\"10.0.1.1:53\", \"10.0.1.2:53\"]\n\
             [pools.q]\nbackends = [\"10.0.1.3:53\", \"{q_backend}\"]\n"
        )
    };
    let text = errors(&src("auto", "q", "10.0.1.2:53")).to_string();
    assert_eq!(
        text.trim_end(),
        "t.toml:12:28: pools.q.backends[1].address: 10.0.1.2:53 is also a backend of \
         listeners.a (pool \"p\"), and both may use the kernel data plane: it maps replies back \
         to their listener by the backend's address"
    );
    // Another port of the same host, or a socket listener: fine.
    assert!(parse(&src("kernel", "q", "10.0.1.2:54"), "t.toml").is_ok());
    assert!(parse(&src("socket", "q", "10.0.1.2:53"), "t.toml").is_ok());
    // One pool for two kernel listeners: every backend would be shared.
    let e = errors(&src("kernel", "p", "10.0.1.4:53"));
    assert_eq!(e.errors.len(), 1, "{e}");
    assert!(
        e.to_string().starts_with(
            "t.toml:7:1: listeners.b.pool: pool \"p\" also serves listeners.a, and both may use \
             the kernel data plane"
        ),
        "{e}"
    );
    assert!(parse(&src("socket", "p", "10.0.1.4:53"), "t.toml").is_ok());
}

#[test]
fn the_kernel_data_plane_has_room_for_16_listeners_of_256_backends() {
    let listeners = |n: usize| {
        (0..n)
            .map(|i| {
                format!(
                    "[listeners.l{i}]\naddress = \"10.0.0.{i}:53\"\npool = \"p{i}\"\n\
                     dataplane = \"auto\"\n[pools.p{i}]\nbackends = [\"10.0.1.{i}:53\"]\n"
                )
            })
            .collect::<String>()
    };
    assert!(parse(&listeners(16), "t.toml").is_ok());
    let e = errors(&listeners(17));
    assert_eq!(e.errors.len(), 1, "{e}");
    assert!(
        e.to_string().starts_with(
            "t.toml:100:1: listeners.l16.dataplane: listener 17 with dataplane = \"kernel\" or \
             \"auto\": the kernel data plane serves at most 16"
        ),
        "{e}"
    );
    let pool = |n: u32| {
        let backends: Vec<String> = (0..n)
            .map(|i| format!("\"10.1.{}.{}:53\"", i / 200, i % 200))
            .collect();
        format!("backends = [{}]", backends.join(", "))
    };
    assert!(
        parse(
            &with_dataplane("kernel", KERNEL_LISTENER, &pool(256)),
            "t.toml"
        )
        .is_ok()
    );
    let e = errors(&with_dataplane("kernel", KERNEL_LISTENER, &pool(257)));
    assert_eq!(e.errors.len(), 1, "{e}");
    assert!(
        e.to_string().starts_with(
            "t.toml:6:1: pools.p.backends: 257 backends, but a pool of listeners.l (dataplane = \
             \"kernel\") has at most 256"
        ),
        "{e}"
    );
    // A socket listener's pool has no such bound.
    assert!(
        parse(
            &with_dataplane("socket", KERNEL_LISTENER, &pool(257)),
            "t.toml"
        )
        .is_ok()
    );
}

#[test]
fn interfaces_are_names_for_the_kernel_data_plane() {
    let cfg = parse(
        &with_dataplane(
            "kernel",
            &format!("{KERNEL_LISTENER}\ninterfaces = [\"eth0\", \"ens3f1np1\", \"bond0.100\"]"),
            KERNEL_BACKENDS,
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        cfg.listeners[0].interfaces,
        ["eth0", "ens3f1np1", "bond0.100"]
    );
    // Each bad name at its own position.
    let src = with_dataplane(
        "kernel",
        &format!(
            "{KERNEL_LISTENER}\ninterfaces = [\"\", \"eth0/1\", \"a b\", \"sixteen-bytes-xx\", \
             \"eth0:1\", \"..\", 7]"
        ),
        KERNEL_BACKENDS,
    );
    let e = errors(&src);
    let got: Vec<(usize, usize, &str)> = e
        .errors
        .iter()
        .map(|e| (e.line, e.column, e.key.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (5, 15, "listeners.l.interfaces[0]"),
            (5, 19, "listeners.l.interfaces[1]"),
            (5, 29, "listeners.l.interfaces[2]"),
            (5, 36, "listeners.l.interfaces[3]"),
            (5, 56, "listeners.l.interfaces[4]"),
            (5, 66, "listeners.l.interfaces[5]"),
            (5, 72, "listeners.l.interfaces[6]"),
        ],
        "{e}"
    );
    let text = e.to_string();
    for expected in [
        "listeners.l.interfaces[0]: \"\" is not an interface name: it is empty",
        "listeners.l.interfaces[1]: \"eth0/1\" is not an interface name: '/' is not allowed",
        "listeners.l.interfaces[2]: \"a b\" is not an interface name: ' ' is not allowed",
        "listeners.l.interfaces[3]: \"sixteen-bytes-xx\" is not an interface name: 16 bytes, \
         longer than the 15",
        "listeners.l.interfaces[4]: \"eth0:1\" is not an interface name: ':' is not allowed",
        "listeners.l.interfaces[5]: \"..\" is not an interface name",
        "listeners.l.interfaces[6]: expected a string, found integer",
    ] {
        assert!(text.contains(expected), "{expected}\n{text}");
    }
    // Not an array; a name twice.
    let text = errors(&with_dataplane(
        "auto",
        &format!("{KERNEL_LISTENER}\ninterfaces = \"eth0\""),
        KERNEL_BACKENDS,
    ))
    .to_string();
    assert!(
        text.contains(
            "t.toml:5:14: listeners.l.interfaces: expected an array of interface names such as \
             [\"eth0\"], found string"
        ),
        "{text}"
    );
    let text = errors(&with_dataplane(
        "auto",
        &format!("{KERNEL_LISTENER}\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]"),
        KERNEL_BACKENDS,
    ))
    .to_string();
    assert_eq!(
        text.trim_end(),
        "t.toml:5:31: listeners.l.interfaces[2]: \"eth0\" is listed twice"
    );
    // Only where the kernel data plane may serve.
    let text = errors(&with_dataplane(
        "socket",
        &format!("{KERNEL_LISTENER}\ninterfaces = [\"eth0\"]"),
        KERNEL_BACKENDS,
    ))
    .to_string();
    assert!(
        text.starts_with(
            "t.toml:5:1: listeners.l.interfaces: only with dataplane = \"kernel\" or \"auto\""
        ),
        "{text}"
    );
}
