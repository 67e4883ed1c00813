//! Sources that can never be clients: a datagram forged with udplb's own listener address, a
//! backend's address, source port 0, or an IPv4-mapped address on an IPv6 listener is dropped
//! and counted (`bad_source`), never answered; backends that would be udplb itself are
//! refused. Forging needs CAP_NET_RAW: those tests are skipped with a message otherwise.

mod common;

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use common::spoof::{Spoofer, Spoofer6, v4, v6};
use common::*;

/// After one forged datagram, udplb stays quiet: it counted that datagram as `bad_source` and
/// nothing came back around (a loop shows as tens of thousands of datagrams a second).
fn assert_no_loop(lb: &Udplb, forged: u64, what: &str) {
    assert!(
        wait_for(DEADLINE, || lb.counter("/drops/bad_source") >= forged),
        "{what}: not dropped: {}",
        lb.stats()
    );
    std::thread::sleep(Duration::from_millis(300));
    let received = lb.counter("/datagrams_in");
    println!("{what}: {received} datagrams received in all after {forged} forged");
    assert_eq!(received, forged, "{what}: a loop: {}", lb.stats());
    assert_eq!(lb.counter("/forwarded"), 0, "{what}: {}", lb.stats());
}

#[test]
fn forged_own_listener_backend_and_port_zero_sources_are_dropped_ipv4() {
    let Some(mut spoofer) = Spoofer::new() else {
        eprintln!("skipped: forging IPv4 sources needs CAP_NET_RAW (run as root)");
        return;
    };
    let backend = Backend::start("127.0.0.1", "echo");
    let (lb, listen) = Udplb::serve(&[], &[backend.addr]);
    spoofer.send(v4(listen), v4(listen), b"loop?");
    assert_no_loop(&lb, 1, "own listener address");
    spoofer.send(v4(backend.addr), v4(listen), b"loop?");
    spoofer.send(
        SocketAddrV4::new([127, 0, 0, 9].into(), 0),
        v4(listen),
        b"port 0",
    );
    assert_no_loop(&lb, 3, "a backend's address, port 0");
    assert_eq!(backend.count(), 0);
    // A real client is served as before.
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"hi").0, b"echo:hi");
}

#[test]
fn a_wildcard_listener_refuses_every_local_address_on_its_port() {
    let Some(mut spoofer) = Spoofer::new() else {
        eprintln!("skipped: forging IPv4 sources needs CAP_NET_RAW (run as root)");
        return;
    };
    let backend = Backend::start("127.0.0.1", "echo");
    let port = free_udp_port("0.0.0.0");
    let lb = Udplb::start(&[&format!("0.0.0.0:{port}"), &backend.addr.to_string()]);
    let to = SocketAddrV4::new([127, 0, 0, 1].into(), port);
    // Another loopback address with the listener's port: the reply would reach the listener.
    spoofer.send(SocketAddrV4::new([127, 0, 0, 5].into(), port), to, b"loop?");
    assert_no_loop(&lb, 1, "a local address on the wildcard listener's port");
}

#[test]
fn forged_ipv6_sources_are_dropped_and_mapped_ones_do_not_pass_ipv4_rules() {
    let Some(mut spoofer) = Spoofer6::new() else {
        eprintln!("skipped: forging IPv6 sources needs CAP_NET_RAW (run as root)");
        return;
    };
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let backend = Backend::start("::1", "echo");
    let admin = admin_addr();
    let port = free_udp_port("::1");
    let listen: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let wildcard: SocketAddr = format!("[::]:{port}").parse().unwrap();
    let lb = run_toml(
        admin,
        &one_pool_toml(
            admin,
            wildcard,
            "allow = [\"10.0.0.0/8\", \"::1\"]",
            &[quoted(backend.addr)],
            "",
        ),
    );
    spoofer.send(v6(listen), v6(listen), b"loop?");
    assert_no_loop(&lb, 1, "own IPv6 listener address");
    // An IPv4-mapped source: an IPv6-only listener never sees a real IPv4 client so.
    let mapped: SocketAddrV6 = "[::ffff:10.1.2.3]:4444".parse().unwrap();
    spoofer.send(mapped, v6(listen), b"let me in");
    assert_no_loop(&lb, 2, "an IPv4-mapped source allowed by an IPv4 rule");
    assert_eq!(lb.counter("/drops/denied"), 0);
    let c = client("[::1]:0");
    assert_eq!(request(&c, listen, b"hi").0, b"echo:hi");
}

#[test]
fn a_backend_that_is_udplb_itself_is_refused() {
    let listen = listen_addr("127.0.0.1");
    let wildcard_port = free_udp_port("0.0.0.0");
    for (what, toml) in [
        (
            "its own listener",
            format!(
                "[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
                 [pools.p]\nbackends = [\"127.0.0.1:1\", \"{listen}\"]\n"
            ),
        ),
        (
            "loopback on a wildcard listener's port",
            format!(
                "[listeners.l]\naddress = \"0.0.0.0:{wildcard_port}\"\npool = \"p\"\n\
                 [pools.p]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:{wildcard_port}\"]\n"
            ),
        ),
        (
            "multicast",
            format!(
                "[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
                 [pools.p]\nbackends = [\"127.0.0.1:1\", \"239.1.2.3:5000\"]\n"
            ),
        ),
        (
            "broadcast",
            format!(
                "[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
                 [pools.p]\nbackends = [\"127.0.0.1:1\", \"255.255.255.255:5000\"]\n"
            ),
        ),
    ] {
        let (code, err) = check_toml(&toml);
        assert_eq!(code, Some(78), "{what}: {err}");
        assert!(err.contains("pools.p.backends[1].address"), "{what}: {err}");
    }
    // The one-liner, too.
    let (code, stderr) = exit_of(
        &[&listen.to_string(), &listen.to_string()],
        &[("UDPLB_ALLOW_ROOT", "1")],
    );
    assert_eq!(code, Some(78));
    assert!(stderr.contains("udplb would send its datagrams to itself"));
    // And the admin API.
    let backend = Backend::start("127.0.0.1", "echo");
    let lb = Udplb::start(&[
        "--admin-allow-changes",
        &listen.to_string(),
        &backend.addr.to_string(),
    ]);
    let (status, body) = lb.call(
        "POST",
        "/api/v1/pools/default/backends",
        Some(&format!("{{\"address\": \"{listen}\"}}")),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("itself"),
        "{body}"
    );
}

/// An address added to this host while udplb runs (a VRRP address moving in) makes a backend
/// with that address on a wildcard listener's port udplb itself: within a few seconds it is
/// out of rotation, rather than each datagram sent to it coming back as a new client's.
#[test]
fn a_backend_that_becomes_a_local_address_leaves_rotation() {
    if !is_root() {
        eprintln!("skipped: adding an address to lo needs root");
        return;
    }
    /// Removes the address again, whatever happens.
    struct Added(&'static str);
    impl Drop for Added {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["addr", "del", self.0, "dev", "lo"])
                .status();
        }
    }
    let other = Backend::start("127.0.0.1", "other");
    let port = free_udp_port("0.0.0.0");
    let soon_local = format!("192.0.2.77:{port}");
    let lb = Udplb::start(&[
        &format!("0.0.0.0:{port}"),
        &soon_local,
        &other.addr.to_string(),
    ]);
    let in_rotation = |lb: &Udplb| lb.backend(0)["in_rotation"].as_bool();
    assert_eq!(in_rotation(&lb), Some(true));
    let added = std::process::Command::new("ip")
        .args(["addr", "add", "192.0.2.77/32", "dev", "lo"])
        .status()
        .unwrap();
    if !added.success() {
        eprintln!("skipped: cannot add an address to lo here");
        return;
    }
    let _added = Added("192.0.2.77/32");
    assert!(
        wait_for(DEADLINE, || in_rotation(&lb) == Some(false)),
        "{}",
        lb.stats()
    );
    assert!(
        lb.stderr
            .lock()
            .unwrap()
            .contains("one of udplb's own listener addresses")
    );
}
