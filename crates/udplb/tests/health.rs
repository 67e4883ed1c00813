//! Health checking end to end: the real binary, real backends on loopback, checks that take
//! dead backends out and put them back, policies for their flows, backup, quorum and notify.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("udplb-health-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts udplb on a config whose `[pools.p]` gets `pool_extra` lines and `[pools.p.health]`
/// gets `health` lines; backends are `backends` (TOML array items).
fn start(
    dir: &std::path::Path,
    mode: &str,
    backends: &[String],
    pool_extra: &str,
    health: &str,
) -> (Udplb, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1"))
        .parse()
        .unwrap();
    let cfg = format!(
        "[admin]\nlisten = \"{admin}\"\n[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\nmode = \"{mode}\"\n\
         idle_timeout = \"30s\"\n[pools.p]\nbackends = [{}]\n{pool_extra}\n[pools.p.health]\n{health}\n",
        backends.join(", ")
    );
    let path = dir.join("udplb.toml");
    std::fs::write(&path, cfg).unwrap();
    (Udplb::run_config(&path, admin), listen)
}

fn quoted(b: &Backend) -> String {
    format!("\"{}\"", b.addr)
}

fn healthy(lb: &Udplb, backend: usize) -> Option<bool> {
    lb.stats()["pools"][0]["backends"][backend]["healthy"].as_bool()
}

const FAST_UDP: &str = "check = \"udp\"\nsend = \"ping\"\nexpect_regex = \":ping$\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\njitter = \"0s\"\nrise = 2\nfall = 2";

/// A backend killed under load: new flows stop going to it within 1 s, its flows move at their
/// next datagram, the other flows lose nothing; and after `rise` good checks it is back.
#[test]
fn killed_backend_is_taken_out_fast_and_its_flows_move() {
    let dir = scratch("kill");
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let names: Vec<String> = backends.iter().map(quoted).collect();
    let (lb, listen) = start(&dir, "flow", &names, "", FAST_UDP);
    assert!(
        wait_for(DEADLINE, || (0..3).all(|i| healthy(&lb, i) == Some(true))),
        "{}",
        lb.stats()
    );

    // 30 flows spread over the three backends.
    let clients: Vec<_> = (0..30).map(|_| client("127.0.0.1:0")).collect();
    let tag_of = |c: &std::net::UdpSocket, payload: &[u8]| -> String {
        let (reply, _) = request(c, listen, payload);
        String::from_utf8_lossy(&reply)
            .split(':')
            .next()
            .unwrap()
            .to_string()
    };
    let before: Vec<String> = clients.iter().map(|c| tag_of(c, b"x")).collect();
    assert!(before.iter().any(|t| t == "b"), "no flow on b: {before:?}");

    let mut backends = backends;
    let b_addr = backends[1].addr;
    let killed_at = Instant::now();
    drop(backends.remove(1)); // b stops answering; its port is closed
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 1) == Some(false)),
        "{}",
        lb.stats()
    );
    let detected = killed_at.elapsed();
    eprintln!(
        "udp check (interval 100ms, timeout 100ms, fall 2): killed backend marked down after {detected:?}"
    );
    assert!(detected < Duration::from_secs(1), "took {detected:?}");

    // Every flow is answered again: b's flows were moved, the others stayed where they were.
    let mut lost = 0;
    for (c, was) in clients.iter().zip(&before) {
        let start = Instant::now();
        let now = tag_of(c, b"y");
        if start.elapsed() > Duration::from_millis(150) {
            lost += 1; // needed a retry
        }
        assert_ne!(now, "b");
        if was != "b" {
            assert_eq!(&now, was, "a flow on a healthy backend moved");
        }
    }
    eprintln!(
        "flows needing a retry after failover: {lost} of {}",
        clients.len()
    );
    assert_eq!(lost, 0, "flows of healthy backends lost datagrams");

    // b comes back on the same port and is in rotation again after rise (2) good checks.
    let back = Backend::start_at(b_addr, "b");
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 1) == Some(true)),
        "{}",
        lb.stats()
    );
    let fresh: Vec<_> = (0..12).map(|_| client("127.0.0.1:0")).collect();
    let tags: Vec<String> = fresh.iter().map(|c| tag_of(c, b"z")).collect();
    assert!(
        tags.iter().any(|t| t == "b"),
        "recovered backend gets no new flows: {tags:?}"
    );
    assert!(back.count() > 0);
}

/// A TCP check on another port governs a UDP backend: the UDP side keeps answering, but the
/// backend leaves rotation when its TCP port closes and returns when it opens.
#[test]
fn tcp_check_on_any_port_governs_a_udp_backend() {
    let dir = scratch("tcp");
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let port = free_tcp_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    // Both backends are governed by the same TCP port (`port` overrides the check port).
    let health = format!(
        "check = \"tcp\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"100ms\"\njitter = \"0s\"\nrise = 1\nfall = 1"
    );
    let (lb, listen) = start(&dir, "datagram", &[quoted(&a), quoted(&b)], "", &health);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)
            && healthy(&lb, 1) == Some(true)),
        "{}",
        lb.stats()
    );
    drop(listener);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(false)
            && healthy(&lb, 1) == Some(false)),
        "{}",
        lb.stats()
    );
    // All down, no backup, default all_down = backup: datagrams are dropped and counted.
    let c = client("127.0.0.1:0");
    c.send_to(b"anyone", listen).unwrap();
    assert!(
        wait_for(DEADLINE, || lb.counter("/drops/no_backend") >= 1),
        "{}",
        lb.stats()
    );
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)),
        "{}",
        lb.stats()
    );
    let (reply, _) = request(&c, listen, b"back");
    assert!(reply.ends_with(b":back"));
}

/// An exec check: the script's exit status decides, with the backend in its environment.
#[test]
fn exec_check_follows_the_commands_exit_status() {
    let dir = scratch("exec");
    let a = Backend::start("127.0.0.1", "a");
    let flag = dir.join("healthy");
    std::fs::write(&flag, "").unwrap();
    let script = dir.join("check.sh");
    let seen = dir.join("seen");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$UDPLB_BACKEND\" > {}\ntest -e {}\n",
            seen.display(),
            flag.display()
        ),
    )
    .unwrap();
    let health = format!(
        "check = \"exec\"\ncommand = [\"/bin/sh\", \"{}\"]\ninterval = \"200ms\"\ntimeout = \"200ms\"\njitter = \"0s\"\nrise = 1\nfall = 1",
        script.display()
    );
    let (lb, _) = start(&dir, "flow", &[quoted(&a)], "", &health);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)),
        "{}",
        lb.stats()
    );
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        a.addr.to_string()
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(false)),
        "{}",
        lb.stats()
    );
    let err = lb.stats()["pools"][0]["backends"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("exited"), "{err}");
}

/// All primaries down: the backup takes new flows; quorum lost and regained fire the notify
/// command exactly once each.
#[test]
fn all_down_uses_the_backup_and_quorum_changes_notify_once() {
    let dir = scratch("quorum");
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let spare = Backend::start("127.0.0.1", "spare");
    let events = dir.join("events");
    let hook = dir.join("notify.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$UDPLB_EVENT $UDPLB_BACKENDS_UP\" >> {}\n",
            events.display()
        ),
    )
    .unwrap();
    let backends = [
        quoted(&a),
        quoted(&b),
        format!("{{ address = \"{}\", backup = true }}", spare.addr),
    ];
    let pool_extra = format!(
        "quorum = 2\nquorum_hysteresis = 0\nnotify = [\"/bin/sh\", \"{}\"]",
        hook.display()
    );
    let (lb, listen) = start(&dir, "datagram", &backends, &pool_extra, FAST_UDP);
    assert!(
        wait_for(DEADLINE, || (0..3).all(|i| healthy(&lb, i) == Some(true))),
        "{}",
        lb.stats()
    );
    let (a_addr, b_addr) = (a.addr, b.addr);
    drop(a);
    drop(b);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(false)
            && healthy(&lb, 1) == Some(false)),
        "{}",
        lb.stats()
    );
    let c = client("127.0.0.1:0");
    let (reply, _) = request(&c, listen, b"hello");
    assert_eq!(reply, b"spare:hello");
    assert!(lb.stats()["pools"][0]["backup_active"].as_bool().unwrap());
    let a = Backend::start_at(a_addr, "a");
    let b = Backend::start_at(b_addr, "b");
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)
            && healthy(&lb, 1) == Some(true)),
        "{}",
        lb.stats()
    );
    let (reply, _) = request(&c, listen, b"again");
    assert!(
        reply == b"a:again" || reply == b"b:again",
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let read = || std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        wait_for(DEADLINE, || read()
            .lines()
            .filter(|l| l.starts_with("quorum-regained"))
            .count()
            == 1),
        "{}",
        read()
    );
    let log = read();
    assert_eq!(
        log.lines().filter(|l| l.starts_with("quorum-lost")).count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("backend-down"))
            .count(),
        2,
        "{log}"
    );
    drop((a, b));
}

/// A small HTTP server for the check: serves `body` with 200 while `up`, else 503.
fn http_server(up: std::sync::Arc<std::sync::atomic::AtomicBool>, body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let response = if up.load(std::sync::atomic::Ordering::Relaxed) {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            let _ = s.write_all(response.as_bytes());
        }
    });
    port
}

/// An HTTP check (ldirectord style): healthy while the page holds the string, down on 503.
#[test]
fn http_check_wants_the_status_and_the_string() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch("http");
    let a = Backend::start("127.0.0.1", "a");
    let up = Arc::new(AtomicBool::new(true));
    let port = http_server(Arc::clone(&up), "webserverisworking");
    let health = format!(
        "check = \"http\"\nport = {port}\npath = \"/check.txt\"\nbody_contains = \"webserverisworking\"\n\
         interval = \"100ms\"\ntimeout = \"100ms\"\njitter = \"0s\"\nrise = 1\nfall = 1"
    );
    let (lb, listen) = start(&dir, "flow", &[quoted(&a)], "", &health);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)),
        "{}",
        lb.stats()
    );
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"hi").0, b"a:hi");
    up.store(false, Ordering::Relaxed);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(false)),
        "{}",
        lb.stats()
    );
    let err = lb.stats()["pools"][0]["backends"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("503"), "{err}");
    up.store(true, Ordering::Relaxed);
    assert!(
        wait_for(DEADLINE, || healthy(&lb, 0) == Some(true)),
        "{}",
        lb.stats()
    );
}
