//! Black-box tests of the data path's guarantees: reply source address, drops by reason,
//! flow cap and idle expiry.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

#[test]
fn replies_leave_from_the_address_the_client_sent_to_v4_wildcard() {
    let a = Backend::start("127.0.0.1", "a");
    let port = free_udp_port("0.0.0.0");
    let _lb = Udplb::start(&[&format!("0.0.0.0:{port}"), &a.addr.to_string()]);
    for target in ["127.0.0.3", "127.0.0.1", "127.0.0.77"] {
        let c = client("127.0.0.1:0");
        let to: SocketAddr = format!("{target}:{port}").parse().unwrap();
        let (reply, from) = request(&c, to, b"x");
        assert_eq!(reply, b"a:x");
        assert_eq!(
            from, to,
            "reply to a datagram sent to {to} came from {from}"
        );
    }
}

#[test]
fn replies_leave_from_the_address_the_client_sent_to_v6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let a = Backend::start("::1", "a");
    let port = free_udp_port("::");
    let _lb = Udplb::start(&[&format!("[::]:{port}"), &a.addr.to_string()]);
    let c = client("[::1]:0");
    let to: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let (reply, from) = request(&c, to, b"six");
    assert_eq!(reply, b"a:six");
    assert_eq!(from, to);
}

#[test]
fn oversize_and_empty_datagrams_are_dropped_and_counted() {
    let a = Backend::start("127.0.0.1", "a");
    let (mut lb, listen) = Udplb::serve(&["--max-datagram-size", "512"], &[a.addr]);
    let c = client("127.0.0.1:0");
    c.send_to(&[], listen).unwrap();
    c.send_to(&[7u8; 513], listen).unwrap();
    c.send_to(&[7u8; 60_000], listen).unwrap();
    assert!(
        wait_for(DEADLINE, || lb.counter("/drops/empty") == 1
            && lb.counter("/drops/oversize") == 2),
        "{}",
        lb.stats()
    );
    // Exactly at the limit is forwarded; the backend's reply ("a:" + 512 bytes) is then over
    // the limit on the way back, and is dropped and counted too.
    c.send_to(&[1u8; 512], listen).unwrap();
    assert!(
        wait_for(DEADLINE, || a.count() == 1
            && lb.counter("/drops/reply_oversize") == 1),
        "{}",
        lb.stats()
    );
    // A reply of exactly the limit reaches the client, and the process is unharmed.
    let (reply, _) = request(&c, listen, &[1u8; 510]);
    assert_eq!(reply.len(), 512);
    assert_eq!(
        a.count(),
        2,
        "nothing oversize or empty reached the backend"
    );
    assert!(lb.alive());
}

#[test]
fn flow_cap_sheds_new_flows_and_idle_expiry_frees_everything() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = Udplb::serve(
        &["--workers", "1", "--max-flows", "3", "--idle-timeout", "1s"],
        &[a.addr],
    );
    let baseline = lb.open_udp_sockets();
    let clients: Vec<_> = (0..3).map(|_| client("127.0.0.1:0")).collect();
    for c in &clients {
        request(c, listen, b"hi");
    }
    // The gauge is published at the end of the worker's turn, just after the replies left.
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") == 3),
        "{}",
        lb.stats()
    );
    // A fourth client is shed and counted...
    let extra = client("127.0.0.1:0");
    extra.send_to(b"let me in", listen).unwrap();
    assert!(
        wait_for(DEADLINE, || lb.counter("/drops/flow_cap") == 1),
        "{}",
        lb.stats()
    );
    let mut buf = [0u8; 64];
    assert!(
        extra.recv_from(&mut buf).is_err(),
        "a shed client got a reply"
    );
    // ...while the established ones keep working.
    for c in &clients {
        let (reply, _) = request(c, listen, b"still here");
        assert_eq!(reply, b"a:still here");
    }
    assert_eq!(
        lb.open_udp_sockets(),
        baseline + 3,
        "one upstream socket per flow"
    );
    // Idle expiry returns flows and descriptors to the baseline.
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") == 0),
        "flows never expired: {}",
        lb.stats()
    );
    assert_eq!(lb.counter("/flows/closed/idle"), 3);
    assert!(
        wait_for(Duration::from_secs(2), || lb.open_udp_sockets() == baseline),
        "upstream sockets leaked"
    );
    // And the freed room admits a new flow.
    let (reply, _) = request(&extra, listen, b"now?");
    assert_eq!(reply, b"a:now?");
}

/// Out of file descriptors, new flows are shed and counted; established flows keep working,
/// the process survives, and flows are admitted again once descriptors are free.
#[test]
fn running_out_of_descriptors_sheds_new_flows_and_never_crashes() {
    let a = Backend::start("127.0.0.1", "a");
    let listen = listen_addr("127.0.0.1");
    let lb = Udplb::start_with_fd_limit(
        48,
        &[
            "--workers",
            "1",
            "--idle-timeout",
            "1s",
            &listen.to_string(),
            &a.addr.to_string(),
        ],
    );
    let clients: Vec<_> = (0..64).map(|_| client("127.0.0.1:0")).collect();
    for c in &clients {
        c.send_to(b"hi", listen).unwrap();
    }
    // The admin endpoint itself needs a descriptor, so it may answer only once idle flows
    // have expired; the counter is read whenever it does.
    assert!(
        wait_for(DEADLINE, || lb
            .try_counter("/drops/upstream_socket")
            .is_some_and(|n| n > 0)),
        "no flow was shed: {}",
        lb.stderr.lock().unwrap()
    );
    // Replies of the admitted flows may still be on their way: collect them until every
    // admitted flow has answered (a flow that never does fails the wait).
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let mut got = vec![false; clients.len()];
    let mut admitted = 0;
    let settled = wait_for(DEADLINE, || {
        for (c, g) in clients.iter().zip(got.iter_mut()) {
            *g = *g || c.recv(&mut [0u8; 16]).is_ok();
        }
        let answered = got.iter().filter(|g| **g).count();
        // The admin endpoint may be short of a descriptor: no answer is no verdict.
        lb.try_counter("/flows/created").is_some_and(|n| {
            admitted = n as usize;
            answered > 0 && answered == admitted
        })
    });
    let answered = got.iter().filter(|g| **g).count();
    assert!(
        settled,
        "{answered} answered, {admitted} flows admitted: every admitted flow gets its reply"
    );
    assert!(
        answered > 0 && answered < clients.len(),
        "{answered} of {} answered",
        clients.len()
    );
    let mut lb = lb;
    assert!(lb.alive());
    // Once the idle flows are gone, new clients are admitted again.
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") == 0),
        "{}",
        lb.stats()
    );
    let (reply, _) = request(&client("127.0.0.1:0"), listen, b"again");
    assert_eq!(reply, b"a:again");
}

/// `rb` and `tb` (the kernel's receive and send buffer sizes) of every UDP socket bound to
/// `port`, from `ss -m`; `None` when `ss` (iproute2) is missing.
fn socket_buffers(port: u16) -> Option<Vec<(u64, u64)>> {
    let out = std::process::Command::new("ss")
        .args(["-ulmnH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |mem: &str, name: &str| -> u64 {
        mem.split([',', '(', ')'])
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {mem}"))
    };
    Some(
        text.lines()
            .filter(|l| l.contains("skmem:"))
            .map(|l| (field(l, "rb"), field(l, "tb")))
            .collect(),
    )
}

#[test]
fn listener_sockets_get_the_buffers_socket_buffer_asks_for() {
    let a = Backend::start("127.0.0.1", "a");
    // Below the kernel's default maximum, so it holds for any user on any machine.
    let (_lb, listen) = Udplb::serve(&["--workers", "2", "--socket-buffer", "65536"], &[a.addr]);
    let Some(buffers) = socket_buffers(listen.port()) else {
        eprintln!("skipped: needs ss (Debian: iproute2)");
        return;
    };
    // One socket per worker; Linux doubles what it is given (half pays for bookkeeping).
    assert_eq!(buffers, vec![(131_072, 131_072); 2], "{buffers:?}");
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"x").0, b"a:x");
}
