//! Shared upstream sockets (`shared_upstream = true`): flows share sockets by local port, one
//! flow per backend on each, and every reply still reaches its own client.

mod common;

use std::net::{SocketAddr, UdpSocket};

use common::*;

/// Sends `payload` from `c` and checks the reply is that payload, from backend `tag` (or any
/// backend when `None`); returns the backend's tag.
fn exchange(c: &UdpSocket, listen: SocketAddr, payload: &str, tag: Option<&str>) -> String {
    c.send_to(payload.as_bytes(), listen).unwrap();
    let (reply, from) = recv(c);
    assert_eq!(
        from, listen,
        "the reply does not come from the address the client sent to"
    );
    let reply = String::from_utf8(reply).unwrap();
    let (got_tag, echoed) = reply.split_once(':').unwrap();
    assert_eq!(echoed, payload, "client got another client's reply");
    if let Some(tag) = tag {
        assert_eq!(got_tag, tag, "the flow changed backend");
    }
    got_tag.to_string()
}

fn shared_sockets(lb: &Udplb) -> u64 {
    lb.counter("/flows/shared_sockets")
}

/// Starts udplb with one worker (shared sockets are per worker) and `--shared-upstream`, and
/// waits until it relays.
/// udplb with shared upstream sockets, once a first flow (the probe) was answered. The probe's
/// socket is returned to be kept: freed, its port could come back as a later client's, which
/// would then continue the probe's flow instead of opening its own.
fn start(extra: &[&str], backends: &[&Backend]) -> (Udplb, SocketAddr, UdpSocket) {
    let options = [&["--workers", "1", "--shared-upstream"][..], extra].concat();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (lb, listen) = Udplb::serve(&options, &addrs);
    let probe = client("127.0.0.1:0");
    request(&probe, listen, b"up?");
    (lb, listen, probe)
}

#[test]
fn flows_share_sockets_one_per_backend_and_replies_reach_their_clients() {
    let backends = [
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
        Backend::start("127.0.0.1", "c"),
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let (lb, listen, _probe) = start(&["--idle-timeout", "60s"], &refs);
    let sockets_before = lb.open_udp_sockets();
    // With the probe flow, 6 flows over 3 backends round robin: 2 per backend, 2 sockets.
    let clients: Vec<UdpSocket> = (0..5).map(|_| client("127.0.0.1:0")).collect();
    let tags: Vec<String> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| exchange(c, listen, &format!("c{i}-0"), None))
        .collect();
    for round in 1..4 {
        for (i, c) in clients.iter().enumerate() {
            exchange(c, listen, &format!("c{i}-{round}"), Some(&tags[i]));
        }
    }
    assert_eq!(shared_sockets(&lb), 2, "{}", lb.stats());
    assert_eq!(lb.counter("/flows/live"), 6);
    assert_eq!(
        lb.open_udp_sockets(),
        sockets_before + 1,
        "a socket per flow, not per backend share"
    );
    assert_eq!(lb.counter("/late_replies"), 0);
    assert_eq!(lb.counter("/drops/unknown_source"), 0);
}

#[test]
fn idle_flows_give_their_share_back_to_new_flows() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen, _probe) = start(&["--idle-timeout", "300ms"], &[&a]);
    let first: Vec<UdpSocket> = (0..3).map(|_| client("127.0.0.1:0")).collect();
    for (i, c) in first.iter().enumerate() {
        exchange(c, listen, &format!("first{i}"), Some("a"));
    }
    // The probe flow and three more, all to a: four sockets.
    assert_eq!(shared_sockets(&lb), 4, "{}", lb.stats());
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") == 0),
        "{}",
        lb.stats()
    );
    // A released share waits out a quarantine (the reply timeout, 2 s by default) before
    // another flow takes it.
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    for (i, c) in (0..3).map(|_| client("127.0.0.1:0")).enumerate() {
        exchange(&c, listen, &format!("second{i}"), Some("a"));
    }
    assert_eq!(
        shared_sockets(&lb),
        4,
        "new flows opened sockets: {}",
        lb.stats()
    );
}

#[test]
fn flows_of_a_disabled_backend_move_to_a_share_with_another() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (lb, listen, _probe) = start(&["--admin-allow-changes"], &[&a, &b]);
    let clients: Vec<UdpSocket> = (0..4).map(|_| client("127.0.0.1:0")).collect();
    let tags: Vec<String> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| exchange(c, listen, &format!("c{i}"), None))
        .collect();
    assert!(tags.iter().any(|t| t == "b"), "{tags:?}");
    let disable = format!("/api/v1/pools/default/backends/{}/disable", b.addr);
    assert_eq!(lb.call("POST", &disable, None).0, 200);
    for round in 0..3 {
        for (i, c) in clients.iter().enumerate() {
            exchange(c, listen, &format!("c{i}-{round}"), Some("a"));
        }
    }
    // The probe's flow and four more, round robin: three on a, two on b (three sockets).
    // Moved, all five are on a: five sockets.
    assert_eq!(shared_sockets(&lb), 5, "{}", lb.stats());
    assert_eq!(lb.counter("/flows/live"), 5);
}

#[test]
fn shared_upstream_is_refused_where_flows_cannot_share() {
    let cases = [
        (
            "mode = \"datagram\"\nshared_upstream = true\n",
            "",
            "datagram",
        ),
        (
            "mode = \"flow\"\ngro = true\nshared_upstream = true\n",
            "",
            "gro",
        ),
        (
            "shared_upstream = true\n",
            "transparent = true\n",
            "transparent",
        ),
    ];
    for (listener, pool, why) in cases {
        let (code, err) = check_toml(&format!(
            "[listeners.l]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\n{listener}\
             [pools.p]\nbackends = [\"127.0.0.1:53\"]\n{pool}"
        ));
        assert_eq!(code, Some(78), "{err}"); // EX_CONFIG
        assert!(err.contains("listeners.l.shared_upstream"), "{err}");
        assert!(err.contains(why), "{err}");
    }
}
