//! Black-box tests of scheduling and session modes: the real binary, real sockets on loopback.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Sends `n` datagrams from one client and waits for every reply; returns the replies' tags.
fn exchange(c: &std::net::UdpSocket, to: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            c.send_to(format!("m{i}").as_bytes(), to).unwrap();
            let (reply, _) = recv(c);
            let s = String::from_utf8(reply).unwrap();
            assert!(s.ends_with(&format!(":m{i}")), "reply {s} to m{i}");
            tag(s.as_bytes())
        })
        .collect()
}

#[test]
fn datagram_mode_round_robin_is_exact() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (lb, listen) = Udplb::serve(&["--mode", "datagram"], &[a.addr, b.addr]);
    let c = client("127.0.0.1:0");
    let tags = exchange(&c, listen, 10);
    assert_eq!(a.count(), 5, "{tags:?}");
    assert_eq!(b.count(), 5, "{tags:?}");
    // One client, both backends: replies still all came back to it.
    // Counted once sendmmsg returns, which may be just after the client got the reply.
    assert!(
        wait_for(DEADLINE, || lb.counter("/replies_out") == 10),
        "{}",
        lb.stats()
    );
}

/// Clients that send a single datagram each (DNS resolvers with random ports): the datagram
/// that opens a client's flow is scheduled once, so round robin stays exact across clients.
#[test]
fn datagram_mode_round_robin_is_exact_across_new_clients() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (lb, listen) = Udplb::serve(&["--workers", "1", "--mode", "datagram"], &[a.addr, b.addr]);
    let tags: Vec<String> = (0..10)
        .flat_map(|_| exchange(&client("127.0.0.1:0"), listen, 1))
        .collect();
    assert_eq!((a.count(), b.count()), (5, 5), "{tags:?}");
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/created") == 10),
        "{}",
        lb.stats()
    );
}

#[test]
fn datagram_mode_weights_one_to_two_are_exact() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (_lb, listen) = Udplb::serve(
        &["--mode", "datagram", "--scheduler", "weighted-round-robin"],
        &[a.addr.to_string(), format!("{},weight=2", b.addr)],
    );
    let c = client("127.0.0.1:0");
    exchange(&c, listen, 9);
    assert_eq!((a.count(), b.count()), (3, 6));
}

/// The default scheduler honours weights, as the README's one-liner shows (`weight=2`: 1:2).
#[test]
fn default_round_robin_honours_weights() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (_lb, listen) = Udplb::serve(
        &["--mode", "datagram"],
        &[a.addr.to_string(), format!("{},weight=2", b.addr)],
    );
    let c = client("127.0.0.1:0");
    exchange(&c, listen, 9);
    assert_eq!((a.count(), b.count()), (3, 6));
}

/// A few flows spread over every backend whatever worker the kernel hands each to: with two
/// workers, 3 flows reach 3 backends and 6 flows 2 each (a round-robin cursor per worker sent
/// 4 flows to 2 of 3 backends).
#[test]
fn few_flows_spread_exactly_over_several_workers() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (_lb, listen) = Udplb::serve(&["--workers", "2"], &addrs);
    // Let every worker's first flow be known: one exchange to warm up, then count.
    let warm = client("127.0.0.1:0");
    exchange(&warm, listen, 1);
    let mut per_backend = std::collections::HashMap::new();
    let mut flows = Vec::new();
    for _ in 0..6 {
        let c = client("127.0.0.1:0");
        let tag = exchange(&c, listen, 1).remove(0);
        *per_backend.entry(tag).or_insert(0) += 1;
        flows.push(c);
        if flows.len() == 3 {
            assert_eq!(
                per_backend.len(),
                3,
                "3 flows, not 3 backends: {per_backend:?}"
            );
        }
    }
    let mut counts: Vec<u32> = per_backend.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 2, 2], "{per_backend:?}");
}

#[test]
fn flow_mode_keeps_each_client_on_one_backend() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (_lb, listen) = Udplb::serve(&["--workers", "2"], &addrs);
    let mut used = HashSet::new();
    for _ in 0..12 {
        let c = client("127.0.0.1:0");
        let tags = exchange(&c, listen, 5);
        assert!(
            tags.iter().all(|t| *t == tags[0]),
            "a client moved between backends: {tags:?}"
        );
        used.insert(tags[0].clone());
    }
    assert_eq!(
        used.len(),
        3,
        "12 clients should reach all 3 backends, got {used:?}"
    );
}

#[test]
fn ip_affinity_keeps_every_port_of_a_client_on_one_backend() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (_lb, listen) = Udplb::serve(&["--workers", "2", "--affinity", "ip"], &addrs);
    let tags: HashSet<String> = (0..8)
        .flat_map(|_| exchange(&client("127.0.0.1:0"), listen, 2))
        .collect();
    assert_eq!(tags.len(), 1, "ports of one client IP spread over {tags:?}");
}

#[test]
fn request_response_closes_the_flow_after_the_reply() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = Udplb::serve(
        &["--mode", "request-response", "--responses", "1"],
        &[a.addr],
    );
    let c = client("127.0.0.1:0");
    exchange(&c, listen, 3);
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") == 0),
        "flows stay open: {}",
        lb.stats()
    );
    assert_eq!(lb.counter("/flows/created"), 3);
    assert_eq!(lb.counter("/flows/closed/completed"), 3);
}

/// A backend that answers every request twice: `r:<payload>` at once, then `late:<payload>`
/// when told to (so that it arrives after the flow completed), reporting when it is sent.
struct DoubleAnswering {
    addr: SocketAddr,
    go: std::sync::mpsc::Sender<()>,
    late_sent: std::sync::mpsc::Receiver<()>,
}

impl DoubleAnswering {
    fn start() -> DoubleAnswering {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (sent, late_sent) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let payload = String::from_utf8_lossy(&buf[..n]).into_owned();
                socket
                    .send_to(format!("r:{payload}").as_bytes(), from)
                    .unwrap();
                if go_rx.recv().is_err() {
                    return;
                }
                socket
                    .send_to(format!("late:{payload}").as_bytes(), from)
                    .unwrap();
                if sent.send(()).is_err() {
                    return;
                }
            }
        });
        DoubleAnswering {
            addr,
            go,
            late_sent,
        }
    }

    /// Sends the late answer to the last request and waits until it is sent.
    fn answer_late(&self) {
        self.go.send(()).unwrap();
        self.late_sent.recv_timeout(DEADLINE).unwrap();
    }
}

/// udplb with one worker (spares and shared sockets are per worker, and the kernel spreads
/// client ports over workers) in request-response mode with one reply per request, in front
/// of `backend`, and three clients.
fn request_response_with(
    backend: &DoubleAnswering,
    extra: &[&str],
) -> (Udplb, SocketAddr, [std::net::UdpSocket; 3]) {
    let options = [
        &[
            "--workers",
            "1",
            "--mode",
            "request-response",
            "--responses",
            "1",
        ][..],
        extra,
    ]
    .concat();
    let (lb, listen) = Udplb::serve(&options, &[backend.addr]);
    let clients = [
        client("127.0.0.1:0"),
        client("127.0.0.1:0"),
        client("127.0.0.1:0"),
    ];
    (lb, listen, clients)
}

/// Sends client `i`'s request and checks its one answer.
fn request_once(c: &std::net::UdpSocket, listen: SocketAddr, i: usize) {
    let payload = format!("c{i}");
    c.send_to(payload.as_bytes(), listen).unwrap();
    let (reply, _) = recv(c);
    assert_eq!(String::from_utf8_lossy(&reply), format!("r:{payload}"));
}

/// Fails if any client has a datagram waiting: a late reply relayed to it.
fn assert_no_late_reply_reached(clients: &[std::net::UdpSocket]) {
    for c in clients {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            c.recv_from(&mut buf).is_err(),
            "a late reply reached a client: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
}

/// A completed request-response flow leaves its socket for the next flow to the same backend
/// once its quarantine (the reply timeout, 20 ms here) is over; what the backend sends after
/// the expected reply is discarded, never relayed to the client that gets the socket next.
#[test]
fn request_response_reuses_sockets_and_never_relays_late_replies() {
    let backend = DoubleAnswering::start();
    let (lb, listen, clients) = request_response_with(&backend, &["--reply-timeout", "20ms"]);
    for (i, c) in clients.iter().enumerate() {
        request_once(c, listen, i);
        // The flow completed before its client got the reply: this reaches the parked socket.
        backend.answer_late();
        // Wait out the spare's quarantine, so that the next flow takes it.
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(lb.counter("/flows/created"), 3);
    assert_eq!(lb.counter("/flows/sockets_reused"), 2, "{}", lb.stats());
    // Discarded when the socket was taken: the last one waits in the spare.
    assert_eq!(lb.counter("/late_replies"), 2, "{}", lb.stats());
    assert_no_late_reply_reached(&clients);
}

/// With shared upstream sockets a completed flow gives its (socket, backend) share back; the
/// backend's late answer arrives while no flow owns it and is discarded, never relayed to a
/// client that takes the share later.
#[test]
fn request_response_on_shared_sockets_never_relays_late_replies() {
    let backend = DoubleAnswering::start();
    let (lb, listen, clients) = request_response_with(&backend, &["--shared-upstream"]);
    for (i, c) in clients.iter().enumerate() {
        request_once(c, listen, i);
        backend.answer_late();
        assert!(
            wait_for(DEADLINE, || lb.counter("/late_replies") == i as u64 + 1),
            "{}",
            lb.stats()
        );
    }
    assert_eq!(lb.counter("/flows/created"), 3);
    assert_eq!(lb.counter("/flows/closed/completed"), 3);
    assert!(lb.counter("/flows/shared_sockets") <= 3, "{}", lb.stats());
    assert_no_late_reply_reached(&clients);
}

/// A backend that takes 60 ms to answer a request, and answers it three times: then, and again
/// 50 and 100 ms later (a server answering a request twice more, as after a retransmission).
fn triple_answering() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let payload = String::from_utf8_lossy(&buf[..n]).into_owned();
            let answer = socket.try_clone().unwrap();
            std::thread::spawn(move || {
                for (k, wait) in [(1, 60), (2, 50), (3, 50)] {
                    std::thread::sleep(Duration::from_millis(wait));
                    let _ = answer.send_to(format!("answer#{k} to {payload}").as_bytes(), from);
                }
            });
        }
    });
    addr
}

/// Client A is answered; client B asks right after and must get its own answer and nothing
/// else, even though the backend answers A twice more while B's exchange is under way (a
/// socket reused at once gave B "answer#2 to A" in 20 runs of 20, and dropped B's own answer
/// as late). With and without shared upstream sockets.
#[test]
fn duplicate_answers_never_reach_the_next_client() {
    let backend = triple_answering();
    for extra in [&[][..], &["--shared-upstream"][..]] {
        let options = [&["--workers", "1", "--mode", "request-response"][..], extra].concat();
        let (lb, listen) = Udplb::serve(&options, &[backend]);
        let mut wrong = 0;
        for run in 0..20 {
            let (a, b) = (client("127.0.0.1:0"), client("127.0.0.1:0"));
            let ask = |c: &std::net::UdpSocket, who: String| {
                c.send_to(who.as_bytes(), listen).unwrap();
                String::from_utf8(recv(c).0).unwrap()
            };
            assert_eq!(ask(&a, format!("A{run}")), format!("answer#1 to A{run}"));
            let got = ask(&b, format!("B{run}"));
            if got != format!("answer#1 to B{run}") {
                wrong += 1;
                eprintln!("{extra:?} run {run}: B got {got:?}");
            }
            // Until A's and B's duplicates are all sent: none may reach either client.
            std::thread::sleep(Duration::from_millis(200));
            assert_no_late_reply_reached(&[a, b]);
        }
        println!("{extra:?}: {wrong} of 20 second clients got another client's answer");
        assert_eq!(wrong, 0, "{extra:?}: {}", lb.stats());
    }
}

#[test]
fn backup_takes_traffic_only_when_no_primary_can() {
    let (primary, backup) = (
        Backend::start("127.0.0.1", "p"),
        Backend::start("127.0.0.1", "b"),
    );
    let (_lb, listen) = Udplb::serve(
        &["--mode", "datagram"],
        &[primary.addr.to_string(), format!("{},backup", backup.addr)],
    );
    let c = client("127.0.0.1:0");
    exchange(&c, listen, 6);
    assert_eq!((primary.count(), backup.count()), (6, 0));

    // The same pool with its only primary disabled in the configuration.
    let backends = [
        format!("{{ address = \"{}\", state = \"disabled\" }}", primary.addr),
        format!("{{ address = \"{}\", backup = true }}", backup.addr),
    ];
    let (_lb2, listen) = run_one_pool("127.0.0.1", "mode = \"datagram\"", &backends, "");
    exchange(&c, listen, 4);
    assert_eq!((primary.count(), backup.count()), (6, 4));
}

#[test]
fn refused_backend_is_counted_and_the_flow_rescheduled() {
    let dead = listen_addr("127.0.0.1"); // nothing listens there: the kernel answers port unreachable
    let alive = Backend::start("127.0.0.1", "a");
    let (lb, listen) = Udplb::serve(&["--workers", "1"], &[dead, alive.addr]);
    let c = client("127.0.0.1:0");
    // The first flow goes to the dead backend (round robin starts there): its datagrams are
    // refused; once refused, the flow closes and the next datagram is scheduled afresh.
    let (reply, _) = request(&c, listen, b"hello");
    assert_eq!(reply, b"a:hello");
    assert!(lb.counter("/backend_refused") >= 1, "{}", lb.stats());
}
