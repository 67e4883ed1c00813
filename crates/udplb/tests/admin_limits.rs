//! What the admin endpoint may cost: a flood of idle connections is capped and cannot take
//! descriptors from the health checks or the traffic; slow or idle connections are closed;
//! a check that fails for lack of descriptors is the balancer's trouble, not the backend's.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// How long udplb waits for a request's header (docs/security.md).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Lets this test process open as many descriptors as its hard limit allows.
fn raise_own_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn all_healthy(stats: &serde_json::Value) -> bool {
    let b = backends_of(stats);
    !b.is_empty() && b.iter().all(|b| b["healthy"] == true)
}

fn sum(stats: &serde_json::Value, key: &str) -> u64 {
    backends_of(stats)
        .iter()
        .map(|b| b[key].as_u64().unwrap_or(0))
        .sum()
}

/// 300 more idle admin connections than udplb accepts, with the open-file limit lowered to 256
/// (so that they are more than udplb may open at all): the ones over the cap are closed at
/// once, health checks keep passing, established flows keep their replies, and a new admin
/// request is answered once the idle ones have used up their header timeout, while the test
/// still holds them all. Prints the figures.
#[test]
fn idle_admin_connections_cannot_starve_checks_or_traffic() {
    raise_own_nofile();
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let listen = listen_addr("127.0.0.1");
    let limit = 256;
    let lb = Udplb::start_with_fd_limit(
        limit,
        &[
            "--workers",
            "2",
            "--check",
            "udp:ping",
            "--check-interval",
            "200ms",
            &listen.to_string(),
            &a.addr.to_string(),
            &b.addr.to_string(),
        ],
    );
    assert!(
        wait_for(DEADLINE, || all_healthy(&lb.stats())),
        "{}",
        lb.stats()
    );
    let stats = lb.stats();
    let cap = stats["admin"]["connection_cap"].as_u64().unwrap_or(256) as usize;
    let failed_before = sum(&stats, "checks_failed");
    let ok_before = sum(&stats, "checks_ok");
    let load = Load::start(listen, 4);
    assert!(wait_for(DEADLINE, || lb.counter("/replies_out") >= 4));

    let flood = Instant::now();
    let wanted = cap + 300;
    let mut held = Vec::new();
    let mut not_connected = 0;
    for _ in 0..wanted {
        match TcpStream::connect_timeout(&lb.admin, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => not_connected += 1,
        }
    }
    let opened_in = flood.elapsed();
    let closed = |held: &[TcpStream]| {
        held.iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                matches!((&**s).read(&mut [0u8; 1]), Ok(0))
            })
            .count()
    };
    // Those over the cap are closed at once.
    let over = held.len().saturating_sub(cap);
    wait_for(Duration::from_secs(2), || closed(&held) >= over);
    let closed_at_once = closed(&held);
    // A new request, while the test still holds every connection it opened.
    let answered = wait_for(HEADER_TIMEOUT + Duration::from_secs(3), || {
        lb.try_stats().is_some()
    });
    let answered_after = flood.elapsed();
    let logs = load.finish();
    let (sent, lost) = totals(&logs);
    let stats = lb.try_stats();
    let stderr = lb.stderr.lock().unwrap().clone();
    let downs = stderr.matches("backend down").count();
    let (failed, passed) = stats.as_ref().map_or((None, None), |s| {
        (
            Some(sum(s, "checks_failed") - failed_before),
            Some(sum(s, "checks_ok") - ok_before),
        )
    });
    eprintln!(
        "admin flood (open-file limit {limit}, connection cap {cap}): {} of {wanted} connections \
         opened in {opened_in:?} ({not_connected} not accepted by the kernel), {closed_at_once} \
         closed by udplb at once; a new admin request answered: {answered} after \
         {answered_after:?}; checks failed during the flood: {failed:?}, passed: {passed:?}; \
         backend down lines: {downs}; datagrams lost {lost} of {sent} ({:.1} %)",
        held.len(),
        lost as f64 * 100.0 / sent.max(1) as f64
    );
    assert!(answered, "no new admin request answered during the flood");
    assert!(
        closed_at_once >= over,
        "only {closed_at_once} of {over} closed"
    );
    assert_eq!(failed, Some(0), "checks failed during the flood");
    assert!(passed.unwrap() > 0, "no check passed during the flood");
    assert_eq!(downs, 0, "{stderr}");
    assert!(lost * 100 <= sent, "lost {lost} of {sent}");
    drop(held);
}

/// How long udplb keeps a connection that does `behave`; `None` if still open after 10 s.
fn held_for(admin: SocketAddr, behave: fn(&mut TcpStream, u32)) -> Option<Duration> {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    for tick in 0.. {
        if start.elapsed() > Duration::from_secs(10) {
            return None;
        }
        behave(&mut s, tick);
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    unreachable!()
}

/// A slowloris connection (a header sent one byte every 200 ms), one that sends nothing and
/// one left idle after a request are each closed within the header timeout. Prints how long
/// each was kept.
#[test]
fn slow_and_idle_admin_connections_are_closed() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&[], &[a.addr]);
    let admin = lb.admin;
    let slowloris = std::thread::spawn(move || {
        held_for(admin, |s, tick| {
            let bytes: &[u8] = if tick == 0 {
                b"GET /stats HTTP/1.1\r\nHost: udplb\r\nX-Slow: "
            } else {
                b"a"
            };
            let _ = s.write_all(bytes);
        })
    });
    let silent = std::thread::spawn(move || held_for(admin, |_, _| {}));
    let idle = std::thread::spawn(move || {
        held_for(admin, |s, tick| {
            if tick == 0 {
                let _ = s.write_all(b"GET /stats HTTP/1.1\r\nHost: udplb\r\n\r\n");
            }
        })
    });
    let (slowloris, silent, idle) = (
        slowloris.join().unwrap(),
        silent.join().unwrap(),
        idle.join().unwrap(),
    );
    eprintln!(
        "admin connections kept (None: still open after 10 s): slowloris {slowloris:?}, \
         silent {silent:?}, idle after a request {idle:?} (header timeout {HEADER_TIMEOUT:?})"
    );
    for (what, held) in [("slowloris", slowloris), ("silent", silent), ("idle", idle)] {
        let held = held.unwrap_or_else(|| panic!("{what}: still open after 10 s"));
        assert!(
            held <= HEADER_TIMEOUT + Duration::from_secs(1),
            "{what}: kept {held:?}"
        );
    }
    // The endpoint still serves.
    assert!(lb.try_stats().is_some());
}

/// One HTTP/1.1 connection kept open, to read the admin endpoint when udplb cannot accept new
/// ones.
struct KeepAlive(BufReader<TcpStream>);

impl KeepAlive {
    fn open(admin: SocketAddr) -> KeepAlive {
        let s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        KeepAlive(BufReader::new(s))
    }

    fn stats(&mut self) -> serde_json::Value {
        self.0
            .get_mut()
            .write_all(b"GET /stats HTTP/1.1\r\nHost: udplb\r\n\r\n")
            .unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            assert!(
                self.0.read_line(&mut line).unwrap() > 0,
                "connection closed"
            );
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        self.0.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    }
}

/// An open-file limit under which `pid` can open nothing more: a little below the lowest
/// descriptor number it leaves free (the lowest over a few looks, as checks open and close
/// sockets meanwhile), so every number under the limit belongs to a long-lived descriptor.
fn exhausting_limit(pid: u32) -> u64 {
    let lowest_free = || {
        let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        (0..).find(|n| !used.contains(n)).unwrap()
    };
    let lowest = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            lowest_free()
        })
        .min()
        .unwrap();
    lowest.saturating_sub(2).max(3)
}

fn set_soft_nofile(pid: u32, soft: u64) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(status.success());
}

/// udplb out of descriptors (its open-file limit lowered below what it holds, with prlimit):
/// checks cannot open their sockets, which is udplb's trouble, not the backends': they are
/// counted as unknown, no backend is marked down, established flows keep their replies.
#[test]
fn a_check_that_cannot_open_a_socket_does_not_fail_the_backend() {
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let (lb, listen) = Udplb::serve(
        &["--check", "udp:ping", "--check-interval", "100ms"],
        &[a.addr, b.addr],
    );
    assert!(
        wait_for(DEADLINE, || all_healthy(&lb.stats())),
        "{}",
        lb.stats()
    );
    let mut admin = KeepAlive::open(lb.admin);
    let load = Load::start(listen, 4);
    assert!(wait_for(DEADLINE, || lb.counter("/replies_out") >= 4));
    let before = admin.stats();
    let pid = lb.pid();
    set_soft_nofile(pid, exhausting_limit(pid));
    let start = Instant::now();
    let mut went_down = false;
    while start.elapsed() < Duration::from_millis(1500) {
        went_down |= !all_healthy(&admin.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = admin.stats();
    set_soft_nofile(pid, 4096);
    let logs = load.finish();
    let (sent, lost) = totals(&logs);
    let delta = |key: &str| sum(&during, key) - sum(&before, key);
    let (unknown, failed, passed) = (
        delta("checks_unknown"),
        delta("checks_failed"),
        delta("checks_ok"),
    );
    eprintln!(
        "udplb out of descriptors for 1.5 s (udp check every 100 ms, 2 backends): checks unknown \
         {unknown}, failed {failed}, passed {passed}; a backend marked down: {went_down}; \
         datagrams lost {lost} of {sent}; last error: {}, last unknown: {}",
        backends_of(&during)[0]["last_error"],
        backends_of(&during)[0]["last_unknown"]
    );
    assert!(!went_down, "{during}");
    assert_eq!(failed, 0, "{during}");
    assert!(unknown >= 10, "{during}");
    assert!(lost * 100 <= sent, "lost {lost} of {sent}");
    assert!(
        wait_for(DEADLINE, || sum(&lb.stats(), "checks_ok")
            > sum(&during, "checks_ok")),
        "checks did not resume"
    );
}
