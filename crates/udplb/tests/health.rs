//! Health checking end to end: the real binary, real backends on loopback, checks that take
//! dead backends out and put them back, policies for their flows, backup, quorum and notify.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::netns::{Namespace, serve_if_asked};
use common::*;

/// Starts udplb with one listener in `mode` on a pool of `backends` (TOML array items) whose
/// `[pools.p]` gets `pool_extra` lines and `[pools.p.health]` gets `health` lines.
fn start(mode: &str, backends: &[String], pool_extra: &str, health: &str) -> (Udplb, SocketAddr) {
    let listener = format!("mode = \"{mode}\"\nidle_timeout = \"30s\"");
    let pool = format!("{pool_extra}\n[pools.p.health]\n{health}");
    run_one_pool("127.0.0.1", &listener, backends, &pool)
}

/// A UDP check every 100 ms, 2 results to rise or fall.
fn fast_udp() -> String {
    udp_check(100, 100, 2, 2)
}

/// A backend killed under steady load: it is out of rotation within 1 s, its flows move to the
/// other backends at their next datagram, the other flows lose nothing; after `rise` good checks
/// it takes new flows again. Prints the failover time and the datagrams lost.
#[test]
fn killed_backend_is_taken_out_fast_and_its_flows_move() {
    let mut backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let names: Vec<String> = backends.iter().map(|b| quoted(b.addr)).collect();
    let (lb, listen) = start("flow", &names, "", &fast_udp());
    assert!(
        wait_for(DEADLINE, || (0..3).all(|i| lb.healthy(i) == Some(true))),
        "{}",
        lb.stats()
    );

    let load = Load::start(listen, 30);
    std::thread::sleep(Duration::from_millis(300));
    let b_addr = backends[1].addr;
    let killed_at = Instant::now();
    drop(backends.remove(1)); // b stops answering; its port is closed
    assert!(
        wait_for(DEADLINE, || lb.healthy(1) == Some(false)),
        "{}",
        lb.stats()
    );
    let detected = killed_at.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let logs = load.finish();

    let on_b: Vec<&FlowLog> = logs
        .iter()
        .filter(|l| l.tags.first().is_some_and(|t| t == "b"))
        .collect();
    let others: Vec<&FlowLog> = logs
        .iter()
        .filter(|l| l.tags.first().is_some_and(|t| t != "b"))
        .collect();
    let lost_b: u64 = on_b.iter().map(|l| l.lost()).sum();
    let lost_others: u64 = others.iter().map(|l| l.lost()).sum();
    let sent: u64 = logs.iter().map(|l| l.sent).sum();
    eprintln!(
        "udp check (interval 100ms, timeout 100ms, fall 2), 30 flows x 100 datagrams/s: killed backend out of \
         rotation after {detected:?}; {} flows were on it and lost {lost_b} datagrams; the other {} flows lost \
         {lost_others}; {sent} sent in all",
        on_b.len(),
        others.len()
    );
    assert!(detected < Duration::from_secs(1), "took {detected:?}");
    assert!(!on_b.is_empty(), "no flow was on b");
    assert_eq!(lost_others, 0, "flows on healthy backends lost datagrams");
    for l in &on_b {
        let last = l.tags.last().unwrap();
        assert_ne!(last, "b", "a flow of the dead backend was not moved");
    }
    for l in &others {
        assert!(
            l.stayed(),
            "a flow on a healthy backend moved: {:?}",
            l.tags
        );
    }

    // b comes back on the same port and takes new flows after rise (2) good checks.
    let back = Backend::start_at(b_addr, "b");
    assert!(
        wait_for(DEADLINE, || lb.healthy(1) == Some(true)),
        "{}",
        lb.stats()
    );
    let fresh: Vec<_> = (0..12).map(|_| client("127.0.0.1:0")).collect();
    let tags: Vec<String> = fresh
        .iter()
        .map(|c| tag(&request(c, listen, b"z").0))
        .collect();
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
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let port = free_tcp_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    // Both backends are governed by the same TCP port (`port` overrides the check port).
    let health = format!(
        "check = \"tcp\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"100ms\"\njitter = \"0s\"\nrise = 1\nfall = 1"
    );
    let (lb, listen) = start("datagram", &[quoted(a.addr), quoted(b.addr)], "", &health);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)
            && lb.healthy(1) == Some(true)),
        "{}",
        lb.stats()
    );
    drop(listener);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)
            && lb.healthy(1) == Some(false)),
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
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    let (reply, _) = request(&c, listen, b"back");
    assert!(reply.ends_with(b":back"));
}

/// An exec check: the script's exit status decides, with the backend in its environment.
#[test]
fn exec_check_follows_the_commands_exit_status() {
    let dir = scratch_dir("exec");
    let a = Backend::start("127.0.0.1", "a");
    let flag = dir.join("healthy");
    std::fs::write(&flag, "").unwrap();
    let script = dir.join("check.sh");
    let seen = dir.join("seen");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$UDPLB_BACKEND $1\" > {}\ntest -e {}\n",
            seen.display(),
            flag.display()
        ),
    )
    .unwrap();
    let health = format!(
        "check = \"exec\"\ncommand = [\"/bin/sh\", \"{}\", \"{{port}}\"]\ninterval = \"200ms\"\ntimeout = \"200ms\"\njitter = \"0s\"\nrise = 1\nfall = 1",
        script.display()
    );
    let (lb, _) = start("flow", &[quoted(a.addr)], "", &health);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        format!("{} {}", a.addr, a.addr.port()),
        "the backend in the environment and in the arguments"
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)),
        "{}",
        lb.stats()
    );
    let err = lb.last_error(0);
    assert!(err.contains("exited"), "{err}");
}

/// All primaries down: the backup takes new flows; quorum lost and regained fire the notify
/// command exactly once each.
#[test]
fn all_down_uses_the_backup_and_quorum_changes_notify_once() {
    let dir = scratch_dir("quorum");
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
        quoted(a.addr),
        quoted(b.addr),
        format!("{{ address = \"{}\", backup = true }}", spare.addr),
    ];
    let pool_extra = format!(
        "quorum = 2\nquorum_hysteresis = 0\nnotify = [\"/bin/sh\", \"{}\"]",
        hook.display()
    );
    let (lb, listen) = start("datagram", &backends, &pool_extra, &fast_udp());
    assert!(
        wait_for(DEADLINE, || (0..3).all(|i| lb.healthy(i) == Some(true))),
        "{}",
        lb.stats()
    );
    let (a_addr, b_addr) = (a.addr, b.addr);
    // Bound while a and b hold their ports: it cannot get one of them.
    let c = client("127.0.0.1:0");
    drop(a);
    drop(b);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)
            && lb.healthy(1) == Some(false)),
        "{}",
        lb.stats()
    );
    let (reply, _) = request(&c, listen, b"hello");
    assert_eq!(reply, b"spare:hello");
    assert!(lb.stats()["pools"][0]["backup_active"].as_bool().unwrap());
    // The quorum is shown lost (status and metrics) while it is.
    assert!(
        wait_for(DEADLINE, || lb.stats()["pools"][0]["quorum_held"] == false),
        "{}",
        lb.stats()
    );
    let (_, metrics) = lb.get("/metrics");
    assert!(
        metrics.contains("udplb_pool_quorum_held{pool=\"p\"} 0"),
        "{metrics}"
    );
    let a = Backend::start_at(a_addr, "a");
    let b = Backend::start_at(b_addr, "b");
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)
            && lb.healthy(1) == Some(true)),
        "{}",
        lb.stats()
    );
    assert!(
        wait_for(DEADLINE, || lb.stats()["pools"][0]["quorum_held"] == true),
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

/// A small HTTP server for the check: serves `body` while `up`, else a page without it.
fn http_server(up: std::sync::Arc<std::sync::atomic::AtomicBool>, body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            // Down: still 200, but the page no longer holds the expected string.
            let up = up.load(std::sync::atomic::Ordering::Relaxed);
            let page = if up { body } else { "maintenance" };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{page}",
                page.len()
            );
            let _ = s.write_all(response.as_bytes());
        }
    });
    port
}

/// An HTTP check (ldirectord style): healthy while the page holds the string, down when not.
#[test]
fn http_check_wants_the_status_and_the_string() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let a = Backend::start("127.0.0.1", "a");
    let up = Arc::new(AtomicBool::new(true));
    let port = http_server(Arc::clone(&up), "webserverisworking");
    let health = format!(
        "check = \"http\"\nport = {port}\npath = \"/check.txt\"\nbody_contains = \"webserverisworking\"\n\
         interval = \"100ms\"\ntimeout = \"100ms\"\njitter = \"0s\"\nrise = 1\nfall = 1"
    );
    let (lb, listen) = start("flow", &[quoted(a.addr)], "", &health);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"hi").0, b"a:hi");
    up.store(false, Ordering::Relaxed);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)),
        "{}",
        lb.stats()
    );
    let err = lb.last_error(0);
    assert!(err.contains("body lacks \"webserverisworking\""), "{err}");
    up.store(true, Ordering::Relaxed);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
}

/// Not a test on its own: when `UDPLB_TEST_ECHO` names an address, this runs an echo backend
/// there until killed. The black-hole test starts it inside a network namespace by running
/// this test binary again.
#[test]
fn echo_backend_for_namespaces() {
    serve_if_asked("UDPLB_TEST_ECHO", |payload, _| [b"ns:", payload].concat());
}

/// A black-holed backend (its link cut, no ICMP) is marked down within
/// interval × fall + timeout. Needs root for the namespace; skipped otherwise.
#[test]
fn black_holed_backend_is_marked_down_within_the_formula() {
    if !is_root() {
        eprintln!("skipped: creating a network namespace needs root");
        return;
    }
    let tag = std::process::id() % 10_000;
    let octet = 16 + (tag % 200);
    let (host_ip, ns_ip) = (format!("10.213.{octet}.1/30"), format!("10.213.{octet}.2"));
    let made = Namespace::create(
        &format!("udplb-test-{tag}"),
        &format!("ulb{tag}h"),
        &format!("ulb{tag}n"),
        &host_ip,
        &format!("{ns_ip}/30"),
        None,
    )
    .and_then(|ns| ns.can_exec().map(|()| ns));
    let mut ns = match made {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace here: {why}");
            return;
        }
    };
    let backend: SocketAddr = format!("{ns_ip}:5353").parse().unwrap();
    ns.serve(
        "echo_backend_for_namespaces",
        &[("UDPLB_TEST_ECHO", backend.to_string())],
    );
    let local = Backend::start("127.0.0.1", "local");
    let (interval, timeout, fall) = (200u64, 100u64, 2u64);
    let health = udp_check(interval, timeout, 1, fall);
    let (lb, listen) = start("flow", &[quoted(backend), quoted(local.addr)], "", &health);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)
            && lb.healthy(1) == Some(true)),
        "{}",
        lb.stats()
    );

    let cut_at = Instant::now();
    ns.black_hole();
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)),
        "{}",
        lb.stats()
    );
    let detected = cut_at.elapsed();
    let bound = Duration::from_millis(interval * fall + timeout);
    eprintln!(
        "black hole (udp check, interval {interval}ms, timeout {timeout}ms, fall {fall}): marked down after \
         {detected:?} (interval x fall + timeout = {bound:?})"
    );
    // Slack for the poll of /stats (10 ms) and a loaded machine.
    assert!(
        detected <= bound + Duration::from_millis(150),
        "took {detected:?}, bound {bound:?}"
    );
    let error = lb.last_error(0);
    assert!(error.contains("timeout"), "a black hole times out: {error}");
    // Clients are served by the remaining backend.
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"hi").0, b"local:hi");
}

/// In request-response mode, requests a backend never answers are passive failures: a backend
/// whose TCP check still passes is ejected after `passive_fall` unanswered requests, and its
/// traffic goes to the backup (passive signals never take a pool's last up backend out).
#[test]
fn unanswered_requests_eject_a_backend_between_checks() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap(); // receives, never answers
    let backup = Backend::start("127.0.0.1", "backup");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health = format!(
        "check = \"tcp\"\nport = {}\ninterval = \"1s\"\ntimeout = \"500ms\"\nrise = 100\nfall = 100\npassive_fall = 2",
        tcp.local_addr().unwrap().port()
    );
    let backends = [
        quoted(silent.local_addr().unwrap()),
        format!("{{ address = \"{}\", backup = true }}", backup.addr),
    ];
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "mode = \"request-response\"\nidle_timeout = \"200ms\"",
        &backends,
        &format!("[pools.p.health]\n{health}"),
    );
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    for _ in 0..2 {
        client("127.0.0.1:0").send_to(b"anyone?", listen).unwrap();
    }
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)),
        "{}",
        lb.stats()
    );
    assert_eq!(lb.counter("/reply_timeouts"), 2);
    assert_eq!(lb.backend(0)["passive_failures"].as_u64(), Some(2));
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"hi").0, b"backup:hi");
    drop(tcp);
}

/// A backend's own check overrides the pool's: here one backend is governed by a TCP port
/// while the other keeps the pool's UDP check.
#[test]
fn a_backend_can_override_the_pool_check() {
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b_entry = format!(
        "{{ address = \"{}\", health = {{ check = \"tcp\", port = {} }} }}",
        b.addr,
        tcp.local_addr().unwrap().port()
    );
    let (lb, _) = start("flow", &[quoted(a.addr), b_entry], "", &fast_udp());
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)
            && lb.healthy(1) == Some(true)),
        "{}",
        lb.stats()
    );
    drop(tcp);
    assert!(
        wait_for(DEADLINE, || lb.healthy(1) == Some(false)),
        "{}",
        lb.stats()
    );
    assert_eq!(
        lb.healthy(0),
        Some(true),
        "the pool's UDP check still passes for a"
    );
    drop(b);
}

/// At startup, checked backends are down until their first check passes: a dead backend
/// never receives a datagram, and traffic flows as soon as the live one is seen healthy.
#[test]
fn startup_sends_nothing_to_a_backend_never_seen_healthy() {
    let live = Backend::start("127.0.0.1", "live");
    let dead = listen_addr("127.0.0.1");
    let (lb, listen) = start("flow", &[quoted(dead), quoted(live.addr)], "", &fast_udp());
    // Straight away, many new flows: each is answered by the live backend once it is up.
    for _ in 0..20 {
        let (reply, _) = request(&client("127.0.0.1:0"), listen, b"early");
        assert_eq!(reply, b"live:early");
    }
    assert_eq!(
        lb.counter("/backend_refused"),
        0,
        "a datagram went to the dead backend"
    );
    assert_eq!(lb.healthy(0), Some(false));
}

/// After every backend was down, the flows that came back first all land on the first backend
/// that is up again; once the others are back, those displaced flows go back into balance at
/// their next pause (`rebalance`), where they used to stay on the first one for good.
#[test]
fn flows_displaced_by_an_outage_rebalance_once_the_pool_is_whole() {
    let mut backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let names: Vec<String> = backends.iter().map(|b| quoted(b.addr)).collect();
    let fast = "check = \"udp\"\nsend = \"ping\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
                jitter = \"0s\"\nrise = 1\nfall = 1";
    let (lb, listen) = start("flow", &names, "rebalance = \"250ms\"", fast);
    assert!(wait_for(DEADLINE, || (0..3).all(|i| lb.healthy(i) == Some(true))));
    // 30 clients, bound while the backends hold their ports (a client bound later could get a
    // freed backend port, and its health checks).
    let clients: Vec<std::net::UdpSocket> = (0..30).map(|_| client("127.0.0.1:0")).collect();
    // Every backend goes away.
    backends.clear();
    assert!(wait_for(DEADLINE, || (0..3).all(|i| lb.healthy(i) == Some(false))));
    // The clients keep asking, one datagram every 400 ms each; a comes back first.
    let ask_all = |clients: &[std::net::UdpSocket]| -> Vec<String> {
        for c in clients {
            c.send_to(b"q", listen).unwrap();
        }
        clients
            .iter()
            .map(|c| {
                let mut buf = [0u8; 64];
                match c.recv_from(&mut buf) {
                    Ok((n, _)) => tag(&buf[..n]),
                    Err(_) => String::new(),
                }
            })
            .collect()
    };
    let _a = Backend::start_at(addrs[0], "a");
    assert!(wait_for(DEADLINE, || lb.healthy(0) == Some(true)));
    let first = ask_all(&clients);
    assert!(first.iter().all(|t| t == "a"), "{first:?}");
    let _b = Backend::start_at(addrs[1], "b");
    let _c = Backend::start_at(addrs[2], "c");
    assert!(wait_for(DEADLINE, || (0..3).all(|i| lb.healthy(i) == Some(true))));
    let mut spread = std::collections::HashMap::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        spread.clear();
        for tag in ask_all(&clients) {
            *spread.entry(tag).or_insert(0) += 1;
        }
    }
    println!(
        "30 flows after the outage: {spread:?}; rebalanced {}",
        lb.counter("/flows/rebalanced")
    );
    for tag in ["a", "b", "c"] {
        let n = spread.get(tag).copied().unwrap_or(0);
        assert!((6..=14).contains(&n), "{tag}: {n} flows in {spread:?}");
    }
}

/// `slow_start`: a backend back up after being down gets a share of new flows (here, of
/// datagrams: datagram mode schedules each) that grows from nothing to its weight's over the
/// window, instead of its full share at once.
#[test]
fn a_recovered_backend_ramps_up_over_slow_start() {
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let b_addr = b.addr;
    let fast = "check = \"udp\"\nsend = \"ping\"\ninterval = \"50ms\"\ntimeout = \"50ms\"\n\
                jitter = \"0s\"\nrise = 1\nfall = 1";
    let (lb, listen) = start(
        "datagram",
        &[quoted(a.addr), quoted(b.addr)],
        "slow_start = \"3s\"",
        fast,
    );
    assert!(wait_for(DEADLINE, || (0..2).all(|i| lb.healthy(i) == Some(true))));
    drop(b);
    assert!(wait_for(DEADLINE, || lb.healthy(1) == Some(false)));
    let _b = Backend::start_at(b_addr, "b");
    assert!(wait_for(DEADLINE, || lb.healthy(1) == Some(true)));
    let c = client("127.0.0.1:0");
    let share_of_b = |n: usize| {
        let mut b = 0;
        for i in 0..n {
            c.send_to(format!("{i}").as_bytes(), listen).unwrap();
            if recv(&c).0.starts_with(b"b:") {
                b += 1;
            }
        }
        b as f64 / n as f64
    };
    let early = share_of_b(200);
    // Past the window (this is the ramp's own length, not a hope).
    std::thread::sleep(Duration::from_millis(3_200));
    let late = share_of_b(200);
    println!("share of the recovered backend: {early:.2} at first, {late:.2} after slow_start");
    assert!(early < 0.2, "{early}: no slow start");
    assert!(
        (0.4..=0.6).contains(&late),
        "{late}: did not ramp to its weight"
    );
}
