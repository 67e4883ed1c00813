//! PROXY protocol v2 towards backends: a backend that reads the header sees the real client
//! address and port and the address the client sent to, on the first datagram of a flow or on
//! every one, over IPv4 and IPv6; replies can carry a header that udplb strips.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A backend that records every datagram and answers "ok:" + its payload after the header,
/// optionally behind `reply_prefix`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn start(ip: &str, reply_prefix: Vec<u8>) -> Recorder {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let d = buf[..n].to_vec();
                let payload = header_len(&d).map_or(&d[..], |len| &d[len..]).to_vec();
                log.lock().unwrap().push(d);
                let mut reply = reply_prefix.clone();
                reply.extend_from_slice(b"ok:");
                reply.extend_from_slice(&payload);
                let _ = socket.send_to(&reply, from);
            }
        });
        Recorder { addr, seen }
    }

    fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The length of the v2 header `d` starts with, read by offsets as the specification lays
/// it out (independently of udplb's own parser).
fn header_len(d: &[u8]) -> Option<usize> {
    d.starts_with(&SIGNATURE)
        .then(|| 16 + usize::from(u16::from_be_bytes([d[14], d[15]])))
}

/// (source, destination) of a PROXY DGRAM header.
fn header_addresses(d: &[u8]) -> (SocketAddr, SocketAddr) {
    assert_eq!(d[12], 0x21, "version 2, PROXY");
    let port = |at: usize| u16::from_be_bytes([d[at], d[at + 1]]);
    match d[13] {
        0x12 => {
            assert_eq!(&d[14..16], &[0, 12]);
            let ip = |at: usize| IpAddr::from([d[at], d[at + 1], d[at + 2], d[at + 3]]);
            (
                SocketAddr::new(ip(16), port(24)),
                SocketAddr::new(ip(20), port(26)),
            )
        }
        0x22 => {
            assert_eq!(&d[14..16], &[0, 36]);
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&d[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            (
                SocketAddr::new(ip(16), port(48)),
                SocketAddr::new(ip(32), port(50)),
            )
        }
        other => panic!("family/transport {other:#x}"),
    }
}

fn start(ip: &str, mode: &str, backend: SocketAddr, pool_extra: &str) -> (Udplb, SocketAddr) {
    run_one_pool(
        ip,
        &format!("mode = \"{mode}\""),
        &[quoted(backend)],
        pool_extra,
    )
}

fn exchange(c: &UdpSocket, listen: SocketAddr, payloads: &[&str]) {
    for p in payloads {
        let (reply, from) = request(c, listen, p.as_bytes());
        assert_eq!(from, listen);
        assert_eq!(reply, format!("ok:{p}").into_bytes());
    }
}

#[test]
fn first_datagram_of_each_flow_carries_the_client_address_ipv4() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let (_lb, listen) = start("127.0.0.1", "flow", b.addr, "proxy_protocol = \"first\"");
    let c = client("127.0.0.1:0");
    exchange(&c, listen, &["one", "two", "three"]);
    let seen = b.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let len = header_len(&seen[0]).expect("first datagram has a header");
    assert_eq!(len, 28);
    assert_eq!(
        header_addresses(&seen[0]),
        (c.local_addr().unwrap(), listen)
    );
    assert_eq!(&seen[0][len..], b"one");
    assert_eq!(seen[1], b"two", "later datagrams are bare");
    assert_eq!(seen[2], b"three");
}

#[test]
fn every_datagram_carries_it_ipv6() {
    let b = Recorder::start("::1", Vec::new());
    let (_lb, listen) = start("::1", "flow", b.addr, "proxy_protocol = \"every\"");
    let c = client("[::1]:0");
    exchange(&c, listen, &["a", "b"]);
    let seen = b.seen();
    assert_eq!(seen.len(), 2);
    for (d, p) in seen.iter().zip([b"a", b"b"]) {
        let len = header_len(d).expect("header");
        assert_eq!(len, 52);
        assert_eq!(header_addresses(d), (c.local_addr().unwrap(), listen));
        assert_eq!(&d[len..], p);
    }
}

#[test]
fn datagram_mode_and_wildcard_listeners_name_the_address_the_client_targeted() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let (_lb, listen) = start("0.0.0.0", "datagram", b.addr, "proxy_protocol = \"first\"");
    let target = SocketAddr::new("127.0.0.7".parse().unwrap(), listen.port());
    let c = client("127.0.0.1:0");
    for p in ["x", "y"] {
        let (reply, from) = request(&c, target, p.as_bytes());
        assert_eq!((reply, from), (format!("ok:{p}").into_bytes(), target));
    }
    let seen = b.seen();
    assert_eq!(seen.len(), 2);
    for d in &seen {
        assert_eq!(header_addresses(d), (c.local_addr().unwrap(), target));
    }
}

#[test]
fn reply_headers_are_stripped_and_malformed_ones_dropped() {
    // The backend answers behind a PROXY header of its own (as a proxy in front of it would).
    let mut prefix = SIGNATURE.to_vec();
    prefix.extend_from_slice(&[0x21, 0x12, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]);
    let b = Recorder::start("127.0.0.1", prefix);
    let (lb, listen) = start("127.0.0.1", "flow", b.addr, "strip_reply_proxy = true");
    let c = client("127.0.0.1:0");
    exchange(&c, listen, &["q"]);
    assert_eq!(b.seen(), vec![b"q".to_vec()], "no header towards this pool");

    // A header whose length runs past the reply: dropped and counted, never forwarded.
    let mut truncated = SIGNATURE.to_vec();
    truncated.extend_from_slice(&[0x21, 0x12, 0, 200]);
    let bad = Recorder::start("127.0.0.1", truncated);
    let (lb2, listen2) = start("127.0.0.1", "flow", bad.addr, "strip_reply_proxy = true");
    c.send_to(b"q", listen2).unwrap();
    assert!(wait_for(DEADLINE, || lb2.counter("/drops/proxy_header") == 1));
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        c.recv(&mut [0u8; 64]).is_err(),
        "a malformed reply got through"
    );
    assert_eq!(lb.counter("/drops/proxy_header"), 0);
}

/// udplb behind udplb: the front one adds headers, the back one (`proxy_protocol = true` on
/// its listener) takes the client from them for policy and for the header it forwards.
#[test]
fn a_balancer_behind_a_balancer_sees_and_forwards_the_real_client() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let back_listen = listen_addr("127.0.0.1");
    // The back listener trusts headers from loopback only and denies 127.0.0.9.
    let back = back_config(
        back_listen,
        b.addr,
        "proxy_from = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.9\"]",
    );
    let (_front, front_listen) = start(
        "127.0.0.1",
        "flow",
        back_listen,
        "proxy_protocol = \"every\"",
    );
    let c = client("127.0.0.1:0");
    exchange(&c, front_listen, &["hello", "again"]);
    let seen = b.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        header_addresses(&seen[0]),
        (c.local_addr().unwrap(), front_listen),
        "the back balancer forwards the front one's client and target"
    );
    assert_eq!(&seen[0][28..], b"hello");
    assert_eq!(seen[1], b"again", "first mode: later datagrams bare");
    // A client the back listener denies, though it reaches it through the front one.
    let denied = client("127.0.0.9:0");
    denied.send_to(b"no", front_listen).unwrap();
    assert!(wait_for(DEADLINE, || back.counter("/drops/denied") == 1));
    assert_eq!(b.seen().len(), 2);
}

/// Starts a second udplb whose listener expects PROXY headers, on `listen`'s address.
fn back_config(listen: SocketAddr, backend: SocketAddr, extra: &str) -> Udplb {
    let admin = admin_addr();
    run_toml(
        admin,
        &one_pool_toml(
            admin,
            listen,
            &format!("proxy_protocol = true\n{extra}"),
            &[quoted(backend)],
            "proxy_protocol = \"first\"",
        ),
    )
}

/// A hand-made header with IPv4-mapped IPv6 addresses: the ACL sees an IPv4 client, and the
/// header forwarded to the backend is an IPv4 one.
#[test]
fn ingress_headers_are_checked_and_mapped_addresses_normalised() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let listen = listen_addr("127.0.0.1");
    let lb = back_config(listen, b.addr, "allow = [\"192.0.2.0/24\"]");
    let c = client("127.0.0.1:0");
    let target: SocketAddr = "198.51.100.1:53".parse().unwrap();
    // INET6 with mapped addresses, written by hand (encode would normalise them to INET).
    let mut mapped = SIGNATURE.to_vec();
    mapped.extend_from_slice(&[0x21, 0x22, 0, 36]);
    mapped.extend_from_slice(&"::ffff:192.0.2.44".parse::<Ipv6Addr>().unwrap().octets());
    mapped.extend_from_slice(&"::ffff:198.51.100.1".parse::<Ipv6Addr>().unwrap().octets());
    mapped.extend_from_slice(&[0x30, 0x39, 0, 53]);
    mapped.extend_from_slice(b"q1");
    let (reply, from) = request(&c, listen, &mapped);
    assert_eq!((reply.as_slice(), from), (&b"ok:q1"[..], listen));
    let seen = b.seen();
    assert_eq!(seen[0][13], 0x12, "forwarded as INET");
    assert_eq!(
        header_addresses(&seen[0]),
        (
            "192.0.2.44:12345".parse().unwrap(),
            "198.51.100.1:53".parse().unwrap()
        )
    );

    // Refused: a client outside allow; no header on a new flow; a malformed header.
    let other = client("127.0.0.1:0");
    let outside = with_header("203.0.113.5:1000", target, b"x");
    other.send_to(&outside, listen).unwrap();
    assert!(wait_for(DEADLINE, || lb.counter("/drops/denied") == 1));
    let bare = client("127.0.0.1:0");
    bare.send_to(b"no header", listen).unwrap();
    let mut broken = with_header("192.0.2.1:1", target, b"");
    broken[15] = 200;
    bare.send_to(&broken, listen).unwrap();
    assert!(wait_for(DEADLINE, || lb.counter("/drops/proxy_header") == 2));
    assert_eq!(b.seen().len(), 1);
}

#[test]
fn listeners_without_proxy_protocol_forward_headers_as_payload() {
    let a = Backend::start("127.0.0.1", "a");
    let (_lb, listen) = Udplb::serve(&[], &[a.addr]);
    let c = client("127.0.0.1:0");
    let d = with_header("192.0.2.1:1", listen, b"data");
    let (reply, _) = request(&c, listen, &d);
    assert_eq!(&reply[..2], b"a:");
    assert_eq!(
        &reply[2..],
        &d[..],
        "the header was not honoured: it is payload"
    );
}

#[test]
fn headers_from_untrusted_senders_are_refused() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let listen = listen_addr("127.0.0.1");
    let lb = back_config(listen, b.addr, "proxy_from = [\"10.0.0.0/8\"]");
    let d = with_header("192.0.2.1:1", listen, b"x");
    client("127.0.0.1:0").send_to(&d, listen).unwrap();
    assert!(wait_for(DEADLINE, || lb.counter("/drops/proxy_header") == 1));
    assert!(b.seen().is_empty());
}

/// A PROXY header in front of `payload`, naming `client` and `target`.
fn with_header(client: &str, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 64];
    let n = udplb_core::proxy::encode(&mut d, client.parse().unwrap(), target).unwrap();
    d.truncate(n);
    d.extend_from_slice(payload);
    d
}

/// One sender forwarding several clients through one socket: each client the headers name is
/// a flow of its own, forwarded with its own address; a datagram without a header belongs to
/// the client the sender named last (as 200 clients through one sender used to become one
/// flow, every header after the first naming client 1).
#[test]
fn clients_behind_one_sender_are_flows_of_their_own() {
    let b = Recorder::start("127.0.0.1", Vec::new());
    let listen = listen_addr("127.0.0.1");
    let lb = back_config(listen, b.addr, "");
    let sender = client("127.0.0.1:0");
    let clients = ["192.0.2.1:1001", "192.0.2.2:1002", "192.0.2.3:1003"];
    for (i, c) in clients.iter().enumerate() {
        let payload = format!("from {i}");
        let (reply, _) = request(&sender, listen, &with_header(c, listen, payload.as_bytes()));
        assert_eq!(reply, format!("ok:{payload}").into_bytes());
    }
    // No header: the client named last.
    let (reply, _) = request(&sender, listen, b"bare");
    assert_eq!(reply, b"ok:bare");
    assert_eq!(lb.counter("/flows/created"), 3, "{}", lb.stats());
    let seen = b.seen();
    let named: Vec<SocketAddr> = seen
        .iter()
        .filter(|d| header_len(d).is_some())
        .map(|d| header_addresses(d).0)
        .collect();
    let expected: Vec<SocketAddr> = clients.iter().map(|c| c.parse().unwrap()).collect();
    assert_eq!(
        named, expected,
        "each client's own header reached the backend"
    );
    assert_eq!(
        seen.last().unwrap(),
        b"bare",
        "the last client's flow had its header"
    );
}

/// With `proxy_protocol = "first"` the header goes again on every datagram until the backend
/// answers: the first datagram, and its header, may have been lost.
#[test]
fn the_first_header_is_sent_again_until_the_backend_answers() {
    // A backend that answers only from its third datagram on.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut log = log.lock().unwrap();
            log.push(buf[..n].to_vec());
            if log.len() >= 3 {
                let _ = socket.send_to(b"ok", from);
            }
        }
    });
    let (lb, listen) = start("127.0.0.1", "flow", addr, "proxy_protocol = \"first\"");
    let c = client("127.0.0.1:0");
    for p in ["one", "two", "three"] {
        c.send_to(p.as_bytes(), listen).unwrap();
        assert!(wait_for(DEADLINE, || seen
            .lock()
            .unwrap()
            .iter()
            .any(|d| d.ends_with(p.as_bytes()))));
    }
    assert_eq!(recv(&c).0, b"ok");
    assert!(wait_for(DEADLINE, || lb.counter("/replies_out") == 1));
    c.send_to(b"four", listen).unwrap();
    assert!(wait_for(DEADLINE, || seen.lock().unwrap().len() == 4));
    let seen = seen.lock().unwrap().clone();
    let headers: Vec<bool> = seen.iter().map(|d| header_len(d).is_some()).collect();
    assert_eq!(headers, [true, true, true, false], "{seen:?}");
}
