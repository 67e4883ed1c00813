//! UDP GRO/GSO pass-through (`gro = true`): a client's GSO train reaches the backend as the
//! same datagrams, whole or taken apart, and every counter counts datagrams.

mod common;

use std::io::IoSlice;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use common::*;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

const SEGMENT: u16 = 100;
const TRAIN: usize = 10;

/// Sends one GSO train of `TRAIN` datagrams of `SEGMENT` bytes, datagram `i` filled with
/// byte `first + i`.
fn send_train(c: &UdpSocket, first: u8) {
    let payload: Vec<u8> = (0..TRAIN)
        .flat_map(|i| std::iter::repeat_n(first + i as u8, usize::from(SEGMENT)))
        .collect();
    let sent = sendmsg::<()>(
        c.as_raw_fd(),
        &[IoSlice::new(&payload)],
        &[ControlMessage::UdpGsoSegments(&SEGMENT)],
        MsgFlags::empty(),
        None,
    )
    .expect("a GSO send on loopback");
    assert_eq!(sent, payload.len());
}

/// A backend that reads plain datagrams (no GRO).
fn sink() -> UdpSocket {
    client("127.0.0.1:0")
}

/// Receives datagrams until one filled with `first` (earlier ones belong to probe trains),
/// then checks that it and the next `n - 1` are whole segments filled with the next bytes.
fn expect_datagrams(backend: &UdpSocket, first: u8, n: usize) {
    loop {
        let (d, _) = recv(backend);
        if !d.is_empty() && d[0] == first {
            assert_eq!(
                d.len(),
                usize::from(SEGMENT),
                "datagram 0 has the wrong size"
            );
            break;
        }
    }
    for i in 1..n {
        let (d, _) = recv(backend);
        assert_eq!(
            d.len(),
            usize::from(SEGMENT),
            "datagram {i} has the wrong size"
        );
        let want = first + i as u8;
        assert!(
            d.iter().all(|&b| b == want),
            "datagram {i} holds {:?}, not {want}",
            &d[..4]
        );
    }
}

/// Sends trains from `c` until the backend gets the first datagram (udplb may be starting),
/// then checks a train arrives whole and in order.
fn exchange_trains(c: &UdpSocket, backend: &UdpSocket) {
    let mut buf = [0u8; 65_536];
    c.set_nonblocking(false).unwrap();
    let start = std::time::Instant::now();
    loop {
        send_train(c, 0);
        if backend.recv_from(&mut buf).is_ok() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "udplb does not forward");
    }
    // One train, checked datagram by datagram.
    send_train(c, 100);
    expect_datagrams(backend, 100, TRAIN);
}

/// Waits until every datagram udplb received is counted as forwarded and returns those stats.
/// udplb counts a datagram as forwarded just after the send that may already have reached the
/// backend, so the counters can lag what the backend saw by one train.
fn all_counted_as_forwarded(lb: &Udplb) -> serde_json::Value {
    let mut stats = lb.stats();
    let counted = wait_for(DEADLINE, || {
        stats = lb.stats();
        let l = &stats["listeners"][0];
        l["datagrams_in"] == l["forwarded"]
    });
    assert!(counted, "received datagrams not all forwarded: {stats}");
    stats
}

/// udplb with one worker and `--gro` (plus `extra` options) in front of `backend`, and a
/// client connected to it.
fn start_gro(backend: &UdpSocket, extra: &[&str]) -> (Udplb, UdpSocket) {
    let options = [&["--workers", "1", "--gro"][..], extra].concat();
    let (lb, listen) = Udplb::serve(&options, &[backend.local_addr().unwrap()]);
    let c = client("127.0.0.1:0");
    c.connect(listen).unwrap();
    (lb, c)
}

#[test]
fn a_gso_train_is_forwarded_whole_and_counted_by_datagram() {
    let backend = sink();
    let (lb, c) = start_gro(&backend, &[]);
    exchange_trains(&c, &backend);
    let stats = all_counted_as_forwarded(&lb);
    let l = &stats["listeners"][0];
    let (trains, datagrams) = (
        l["gro_trains"].as_u64().unwrap(),
        l["datagrams_in"].as_u64().unwrap(),
    );
    assert!(trains >= 1, "no train arrived as one: {stats}");
    assert_eq!(
        datagrams % TRAIN as u64,
        0,
        "counted trains, not datagrams: {stats}"
    );
}

/// With a rate limit each datagram is a decision: trains are taken apart, and each datagram
/// counts against the limit.
#[test]
fn trains_are_taken_apart_where_a_policy_applies_per_datagram() {
    let backend = sink();
    let listen = listen_addr("127.0.0.1");
    let admin = admin_addr();
    let lb = run_toml(
        admin,
        &format!(
            "[admin]\nlisten = \"{admin}\"\n[runtime]\nworkers = 1\n\
             [listeners.l]\naddress = \"{listen}\"\npool = \"p\"\ngro = true\n\
             [listeners.l.limits]\ndatagrams_per_source = 1000000\n\
             [pools.p]\nbackends = [\"{}\"]\n",
            backend.local_addr().unwrap()
        ),
    );
    let c = client("127.0.0.1:0");
    c.connect(listen).unwrap();
    exchange_trains(&c, &backend);
    let stats = all_counted_as_forwarded(&lb);
    assert!(
        stats["listeners"][0]["gro_trains"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

/// The size limit applies to each datagram of a train, and a refused train counts every
/// datagram.
#[test]
fn an_oversized_train_is_dropped_datagram_by_datagram() {
    let backend = sink();
    let limit = (SEGMENT - 1).to_string();
    let (lb, c) = start_gro(&backend, &["--max-datagram-size", &limit]);
    // udplb may still be starting: send until one train was counted.
    assert!(
        wait_for(DEADLINE, || {
            send_train(&c, 0);
            lb.counter("/datagrams_in") > 0
        }),
        "{}",
        lb.stats()
    );
    assert!(
        wait_for(DEADLINE, || {
            let s = lb.stats();
            let l = &s["listeners"][0];
            l["datagrams_in"] == l["drops"]["oversize"]
        }),
        "{}",
        lb.stats()
    );
    assert_eq!(lb.counter("/datagrams_in") % TRAIN as u64, 0);
    assert_eq!(lb.counter("/forwarded"), 0);
}

#[test]
fn gro_is_refused_outside_flow_mode() {
    let (code, err) = check_toml(
        "[listeners.l]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\nmode = \"datagram\"\ngro = true\n\
         [pools.p]\nbackends = [\"127.0.0.1:53\"]\n",
    );
    assert_eq!(code, Some(78), "{err}"); // EX_CONFIG
    assert!(err.contains("listeners.l.gro"), "{err}");
    assert!(err.contains(":5:"), "no line number: {err}");
}
