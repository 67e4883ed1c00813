//! Rate limits end to end: per source and per prefix, on datagrams and on new flows. An
//! abusive source loses (at least 99 % of) its excess while a well-behaved source on the same
//! listener keeps every reply. The tests print the figures.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

fn start(backend: SocketAddr, limits: &str) -> (Udplb, SocketAddr) {
    run_one_pool(
        "127.0.0.1",
        &format!("[listeners.l.limits]\n{limits}"),
        &[quoted(backend)],
        "",
    )
}

/// Sends `per_tick` datagrams every 10 ms for `duration` from each socket, counting replies.
/// Returns (sent, replies) per socket.
fn blast(
    sockets: &[UdpSocket],
    to: SocketAddr,
    per_tick: usize,
    duration: Duration,
) -> Vec<(u64, u64)> {
    for s in sockets {
        s.set_nonblocking(true).unwrap();
    }
    let mut out = vec![(0u64, 0u64); sockets.len()];
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let mut tick = 0u32;
    while start.elapsed() < duration {
        for (s, (sent, _)) in sockets.iter().zip(out.iter_mut()) {
            for _ in 0..per_tick {
                if s.send_to(b"x", to).is_ok() {
                    *sent += 1;
                }
            }
        }
        tick += 1;
        let due = Duration::from_millis(10 * u64::from(tick));
        while start.elapsed() < due {
            for (s, (_, got)) in sockets.iter().zip(out.iter_mut()) {
                while s.recv(&mut buf).is_ok() {
                    *got += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Late replies.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(300) {
        for (s, (_, got)) in sockets.iter().zip(out.iter_mut()) {
            while s.recv(&mut buf).is_ok() {
                *got += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

#[test]
fn an_abusive_source_loses_its_excess_and_a_polite_one_nothing() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = start(a.addr, "datagrams_per_source = 200");
    let abusive = client("127.0.0.1:0");
    let polite = client("127.0.0.2:0");
    let polite_thread = std::thread::spawn(move || {
        let (mut sent, mut got) = (0, 0);
        polite
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            polite.send_to(b"p", listen).unwrap();
            sent += 1;
            if polite.recv(&mut [0u8; 64]).is_ok() {
                got += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (sent, got)
    });
    // 30 per 10 ms: 3,000 datagrams/s, 15 times the limit, for 2 s.
    let r = blast(
        std::slice::from_ref(&abusive),
        listen,
        30,
        Duration::from_secs(2),
    );
    let (sent, replies) = r[0];
    let (polite_sent, polite_got) = polite_thread.join().unwrap();
    let limited = lb.counter("/drops/rate_limited");
    // Two seconds touch at most three one-second windows.
    let budget = 200 * 3;
    let excess = sent.saturating_sub(budget);
    println!(
        "rate limit 200/s per source: abusive source sent {sent} at ~3000/s, got {replies} \
         replies (at most {budget} allowed in the 3 one-second windows 2 s can touch), \
         {limited} dropped as rate_limited ({:.2} % of what it sent beyond its replies); \
         polite source got {polite_got} of {polite_sent}",
        100.0 * limited as f64 / sent.saturating_sub(replies) as f64
    );
    assert!(
        replies <= budget,
        "{replies} replies over a budget of {budget}"
    );
    assert!(
        limited * 100 >= excess * 99,
        "only {limited} of {excess} excess dropped"
    );
    assert_eq!(polite_got, polite_sent, "the polite source lost replies");
}

#[test]
fn a_prefix_limit_caps_a_subnet_and_spares_others() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = start(
        a.addr,
        "datagrams_per_source = 1000\ndatagrams_per_prefix = 300\nipv4_prefix = 24",
    );
    // Three sources of 127.0.1.0/24 at 200/s each: 600/s against 300/s for the /24.
    let subnet: Vec<UdpSocket> = (1..=3).map(|i| client(&format!("127.0.1.{i}:0"))).collect();
    let other = vec![client("127.0.2.1:0")];
    let other_thread = std::thread::spawn(move || blast(&other, listen, 1, Duration::from_secs(2)));
    let r = blast(&subnet, listen, 2, Duration::from_secs(2));
    let o = other_thread.join().unwrap();
    let (sent, replies) = r.iter().fold((0, 0), |(s, g), x| (s + x.0, g + x.1));
    println!(
        "prefix limit 300/s per /24: the /24 sent {sent}, got {replies}; another /24 got {} of {}",
        o[0].1, o[0].0
    );
    assert!(replies <= 300 * 3, "the /24 got {replies}");
    assert!(replies >= 300, "the /24 got only {replies}");
    assert_eq!(o[0].1, o[0].0, "another prefix lost replies");
    assert!(lb.counter("/drops/rate_limited") >= sent - 900);
}

#[test]
fn new_flows_per_source_are_limited_but_established_ones_continue() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = start(a.addr, "new_flows_per_source = 50");
    let established = client("127.0.0.1:0");
    assert_eq!(request(&established, listen, b"e").0, b"a:e");
    // 400 new ports from the same address at once.
    let many: Vec<UdpSocket> = (0..400).map(|_| client("127.0.0.1:0")).collect();
    for s in &many {
        s.send_to(b"n", listen).unwrap();
    }
    assert!(wait_for(DEADLINE, || lb.counter("/datagrams_in") >= 401));
    let created = lb.counter("/flows/created");
    let limited = lb.counter("/drops/flow_rate_limited");
    println!("new-flow limit 50/s per source: 400 new ports -> {created} flows, {limited} refused");
    assert!(created <= 1 + 100, "{created} flows created");
    assert_eq!(created - 1 + limited, 400);
    assert_eq!(request(&established, listen, b"still").0, b"a:still");
}

/// A backend that answers every datagram with 100 bytes (an amplifier).
fn amplifier() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&[b'A'; 100], from);
        }
    });
    addr
}

#[test]
fn replies_beyond_the_amplification_ratio_are_dropped() {
    let (lb, listen) = start(amplifier(), "reply_ratio = 3");
    let c = client("127.0.0.1:0");
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    // 10 bytes in: 30 bytes of replies allowed, 100 refused.
    c.send_to(&[b'q'; 10], listen).unwrap();
    assert!(c.recv(&mut buf).is_err(), "an amplified reply got through");
    assert!(wait_for(DEADLINE, || lb.counter("/drops/amplification") == 1));
    // 30 more bytes in: 120 allowed in all, so the next 100-byte reply fits.
    c.send_to(&[b'q'; 30], listen).unwrap();
    assert_eq!(c.recv(&mut buf).unwrap(), 100);
    // 1 more byte: 123 allowed, 200 would have been sent.
    c.send_to(b"q", listen).unwrap();
    assert!(c.recv(&mut buf).is_err());
    assert!(wait_for(DEADLINE, || lb.counter("/drops/amplification") == 2));
}
