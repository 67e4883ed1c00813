//! A burst of new clients, in a file of its own: its 1,500 client sockets and as many upstream
//! sockets would otherwise churn the system's UDP socket table while other tests count
//! udplb's sockets through it (tests of one file run in parallel, files one after another).

mod common;

use common::*;

/// A burst of new clients that the listener's receive buffer holds is served whole: new flows
/// are rationed only when the queue threatens to overflow (half the buffer), not as soon as a
/// backlog forms. 1,500 clients with 512-byte datagrams queue about 3 MiB at once, more than
/// the eighth of the buffer that used to trigger rationing, so this failed with it (udplb
/// shed first datagrams as `overload` that the kernel would have kept).
#[test]
fn a_burst_of_new_clients_within_the_buffer_is_served_whole() {
    const CLIENTS: usize = 1500;
    // udplb asks for a 4 MiB listener buffer with SO_RCVBUFFORCE (root), else SO_RCVBUF, which
    // the kernel caps at net.core.rmem_max: a smaller buffer cannot hold the burst at all.
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if !is_root() && rmem_max < 4 << 20 {
        eprintln!("skipped: a 4 MiB listener buffer needs root or net.core.rmem_max >= 4 MiB");
        return;
    }
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = Udplb::serve(&["--workers", "1"], &[a.addr]);
    // Up and forwarding before the burst.
    request(&client("127.0.0.1:0"), listen, b"up?");
    let clients: Vec<_> = (0..CLIENTS).map(|_| client("127.0.0.1:0")).collect();
    let payload = [7u8; 512];
    for c in &clients {
        c.send_to(&payload, listen).unwrap();
    }
    // Every client's reply, until all came or udplb dropped one of the burst.
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let mut waiting: Vec<&std::net::UdpSocket> = clients.iter().collect();
    let mut buf = [0u8; 1024];
    let dropped =
        || lb.counter("/drops/overload") > 0 || lb.stats()["rxq_overflow"].as_u64() > Some(0);
    // Only udplb's replies count: a client's port was free a moment ago, and a datagram some
    // other process still sends to it (a late reply to its last owner) is not one of them.
    let mut strays = Vec::new();
    let settled = wait_for(DEADLINE, || {
        waiting.retain(|c| {
            loop {
                match c.recv_from(&mut buf) {
                    Ok((n, from)) if from == listen => {
                        assert_eq!(
                            &buf[..n.min(2)],
                            b"a:",
                            "{:?}",
                            String::from_utf8_lossy(&buf[..n])
                        );
                        assert_eq!(n, 2 + payload.len());
                        return false;
                    }
                    Ok((n, from)) => {
                        strays.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
                    }
                    Err(_) => return true,
                }
            }
        });
        waiting.is_empty() || dropped()
    });
    if !strays.is_empty() {
        eprintln!("datagrams from elsewhere, ignored: {strays:?}");
    }
    assert!(
        settled,
        "{} clients still waiting: {}",
        waiting.len(),
        lb.stats()
    );
    let answered = CLIENTS - waiting.len();
    assert_eq!(
        answered,
        CLIENTS,
        "{} of {CLIENTS} clients answered: {}",
        answered,
        lb.stats()
    );
    assert_eq!(lb.counter("/drops/overload"), 0, "{}", lb.stats());
}
