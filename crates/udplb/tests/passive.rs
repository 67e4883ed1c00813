//! Passive health through the one-liner, with no health configuration: a backend that dies
//! leaves rotation in every mode, a backend that answers nothing leaves it in
//! request-response mode, and a backend that comes back is put back by itself.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How often each client flow asks.
const PERIOD: Duration = Duration::from_millis(30);

/// One request: when it was sent, and whether (and by which backend) it was answered.
#[derive(Clone, Debug)]
struct Asked {
    at: Instant,
    answered_by: Option<String>,
}

/// Clients asking steadily: `flows` sockets (or, with `fresh`, a new socket per request, as a
/// DNS stub does), each sending a numbered request every [`PERIOD`]; replies are matched to
/// requests by number.
struct Clients {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Asked>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(target: SocketAddr, flows: usize, fresh: bool) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Asked>>> = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..flows)
            .map(|_| {
                let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
                std::thread::spawn(move || ask_until_stopped(target, fresh, &stop, &log))
            })
            .collect();
        Clients { stop, log, threads }
    }

    fn finish(self) -> Vec<Asked> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

fn ask_until_stopped(target: SocketAddr, fresh: bool, stop: &AtomicBool, log: &Mutex<Vec<Asked>>) {
    let mut socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 256];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if fresh {
            socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        }
        let seq = {
            let mut log = log.lock().unwrap();
            log.push(Asked {
                at: Instant::now(),
                answered_by: None,
            });
            log.len() - 1
        };
        let _ = socket.send_to(seq.to_string().as_bytes(), target);
        next += PERIOD;
        // Collect replies (to this request or earlier ones) until the next one is due.
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let Some((tag, seq)) = text.split_once(':') else {
                continue;
            };
            if let Ok(seq) = seq.parse::<usize>() {
                log.lock().unwrap()[seq].answered_by = Some(tag.to_string());
            }
        }
    }
}

/// How long after `from` requests still went unanswered: the send time of the last
/// unanswered request after `from` (among those sent before `until`), zero if none was.
fn unanswered_for(log: &[Asked], from: Instant, until: Instant) -> Duration {
    log.iter()
        .filter(|a| a.at >= from && a.at < until && a.answered_by.is_none())
        .map(|a| a.at.duration_since(from))
        .max()
        .unwrap_or_default()
}

fn answered_by(log: &[Asked], from: Instant, tag: &str) -> usize {
    log.iter()
        .filter(|a| a.at >= from && a.answered_by.as_deref() == Some(tag))
        .count()
}

/// `udplb --mode MODE LISTEN b1 b2 b3` with nothing else; b2 is stopped under steady load.
/// Within 1 s every request is answered by the live backends again, for the rest of the run;
/// when b2 comes back on its address, it gets traffic again with no action.
fn killed_backend_leaves_rotation(mode: &str) {
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let c = Backend::start("127.0.0.1", "c");
    let b_addr = b.addr;
    let (lb, listen) = Udplb::serve(&["--mode", mode], &[a.addr, b.addr, c.addr]);
    let clients = Clients::start(listen, 6, false);
    assert!(
        wait_for(DEADLINE, || {
            let log = clients.log.lock().unwrap();
            answered_by(&log, Instant::now() - Duration::from_secs(1), "b") > 0
        }),
        "{mode}: b never answered: {}",
        lb.stats()
    );
    let killed = Instant::now();
    drop(b);
    std::thread::sleep(Duration::from_secs(3));
    let end = Instant::now();
    // b comes back on the same address: the recovery probe finds its port open again, and
    // clients are answered by it again.
    // Established flows stay where they are (flow mode); new clients reach b again.
    let _b = Backend::start_at(b_addr, "b");
    let restarted = Instant::now();
    let log = clients.finish();
    let newcomers = Clients::start(listen, 3, true);
    let back = wait_for(Duration::from_secs(15), || {
        answered_by(&newcomers.log.lock().unwrap(), restarted, "b") > 0
    });
    let back_after = restarted.elapsed();
    newcomers.finish();
    let stats = lb.stats();
    let gap = unanswered_for(&log, killed, end - Duration::from_millis(300));
    println!(
        "{mode}: requests went unanswered for {} ms after the backend stopped, back in \
         rotation {} ms after it restarted; passive failures {}",
        gap.as_millis(),
        back_after.as_millis(),
        stats["pools"][0]["backends"][1]["passive_failures"]
    );
    assert!(
        gap <= Duration::from_secs(1),
        "{mode}: requests still unanswered {gap:?} after the backend stopped: {stats}"
    );
    assert!(
        back,
        "{mode}: the backend came back but got no traffic: {stats}"
    );
}

#[test]
fn killed_backend_leaves_rotation_in_flow_mode() {
    killed_backend_leaves_rotation("flow");
}

#[test]
fn killed_backend_leaves_rotation_in_datagram_mode() {
    killed_backend_leaves_rotation("datagram");
}

#[test]
fn killed_backend_leaves_rotation_in_request_response_mode() {
    killed_backend_leaves_rotation("request-response");
}

/// A backend that receives requests and answers none (as freeradius does for a client it does
/// not know): in request-response mode its unanswered requests take it out of rotation, with
/// no health configuration; until its hold-down ends, every request is answered by the others.
#[test]
fn silent_backend_leaves_rotation_in_request_response_mode() {
    let a = Backend::start("127.0.0.1", "a");
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap(); // receives, never answers
    let c = Backend::start("127.0.0.1", "c");
    let (lb, listen) = Udplb::serve(
        &["--mode", "request-response", "--reply-timeout", "300ms"],
        &[a.addr, silent.local_addr().unwrap(), c.addr],
    );
    let started = Instant::now();
    let clients = Clients::start(listen, 2, true);
    assert!(
        wait_for(DEADLINE, || lb.healthy(1) == Some(false)),
        "the silent backend was never taken out: {}",
        lb.stats()
    );
    let ejected = Instant::now();
    // Held down for 1 s: everything asked meanwhile is answered.
    std::thread::sleep(Duration::from_millis(900));
    let log = clients.finish();
    let stats = lb.stats();
    println!(
        "silent backend out of rotation {} ms after the first request (reply timeout 300 ms)",
        ejected.duration_since(started).as_millis()
    );
    let settle = Duration::from_millis(150);
    let gap = unanswered_for(
        &log,
        ejected + settle,
        Instant::now() - Duration::from_millis(100),
    );
    assert_eq!(
        gap,
        Duration::ZERO,
        "unanswered requests while the silent backend was out: {stats}"
    );
    assert!(
        stats["listeners"][0]["reply_timeouts"].as_u64() >= Some(3),
        "{stats}"
    );
    drop(silent);
}

/// Health options that mean nothing with the others given are refused, as in a file.
#[test]
fn one_liner_health_options_that_do_not_apply_are_errors() {
    let run = |args: &[&str]| exit_of(args, &[("UDPLB_ALLOW_ROOT", "1")]);
    let (code, err) = run(&["--reply-timeout", "1s", "127.0.0.1:5300", "127.0.0.1:5301"]);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("--reply-timeout: only applies to --mode request-response"),
        "{err}"
    );
    let (code, err) = run(&["--check-interval", "1s", "127.0.0.1:5300", "127.0.0.1:5301"]);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("--check-interval: needs an active check"),
        "{err}"
    );
    let (code, err) = run(&["--check", "icmp", "127.0.0.1:5300", "127.0.0.1:5301"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("expected udp, udp:TEXT, dns:NAME"), "{err}");
}
