//! Access control end to end: allow and deny lists per listener, IPv4, IPv6 and rules written
//! as IPv4-mapped IPv6; denied datagrams are counted and never reach a backend.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn start(listen_ip: &str, backend: SocketAddr, rules: &str) -> (Udplb, SocketAddr) {
    run_one_pool(listen_ip, rules, &[quoted(backend)], "")
}

/// Sends `n` datagrams from `c` and says whether any reply came back.
fn answered(c: &std::net::UdpSocket, to: SocketAddr) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for _ in 0..3 {
        c.send_to(b"hi", to).unwrap();
        if c.recv(&mut [0u8; 64]).is_ok() {
            return true;
        }
    }
    false
}

#[test]
fn allow_and_deny_lists_decide_who_is_served() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = start(
        "127.0.0.1",
        a.addr,
        "allow = [\"127.0.0.0/28\"]\ndeny = [\"::ffff:127.0.0.5/128\"]",
    );
    // Served: inside allow, not denied.
    let ok = client("127.0.0.1:0");
    assert_eq!(request(&ok, listen, b"x").0, b"a:x");
    // Denied by a rule written as IPv4-mapped IPv6.
    let denied = client("127.0.0.5:0");
    assert!(!answered(&denied, listen), "a denied client got a reply");
    // Outside the allow list.
    let outside = client("127.0.0.200:0");
    assert!(
        !answered(&outside, listen),
        "a client outside allow got a reply"
    );
    assert!(wait_for(DEADLINE, || lb.counter("/drops/denied") == 6));
    assert_eq!(
        lb.counter("/flows/created"),
        1,
        "no flow for refused clients"
    );
    assert_eq!(a.count(), 1, "refused datagrams reached the backend");
}

#[test]
fn ipv6_rules_apply_to_ipv6_clients() {
    let a = Backend::start("::1", "a");
    let (lb, listen) = start("::1", a.addr, "deny = [\"::1/128\"]");
    let c = client("[::1]:0");
    assert!(!answered(&c, listen));
    assert!(wait_for(DEADLINE, || lb.counter("/drops/denied") == 3));
    let (lb2, listen2) = start("::1", a.addr, "allow = [\"::1\"]\ndeny = [\"10.0.0.0/8\"]");
    assert_eq!(request(&c, listen2, b"y").0, b"a:y");
    assert_eq!(lb2.counter("/drops/denied"), 0);
}

#[test]
fn a_bad_network_is_a_config_error_with_its_position() {
    let (code, stderr) = check_toml(
        "[listeners.l]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\n\
         allow = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\n[pools.p]\nbackends = [\"127.0.0.1:53\"]\n",
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("udplb.toml:4:")
            && stderr.contains("listeners.l.allow[1]")
            && stderr.contains("did you mean 10.0.0.0/8?"),
        "{stderr}"
    );
}

#[test]
fn explain_says_when_a_client_is_refused() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = start("127.0.0.1", a.addr, "deny = [\"192.0.2.0/24\"]");
    let (code, body) = lb.call("GET", "/api/v1/explain?client=192.0.2.9:5000", None);
    assert_eq!(code, 200, "{body}");
    assert!(body["backend"].is_null(), "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("denied"),
        "{body}"
    );
    let (_, body) = lb.call("GET", "/api/v1/explain?client=198.51.100.9:5000", None);
    assert_eq!(body["candidates"][0], a.addr.to_string(), "{body}");
    assert!(
        !body["reason"].as_str().unwrap().contains("denied"),
        "{body}"
    );
}

#[test]
fn refused_clients_go_to_the_abuse_pool_when_there_is_one() {
    let a = Backend::start("127.0.0.1", "a");
    let tarpit = Backend::start("127.0.0.1", "tarpit");
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "deny = [\"127.0.0.5\"]\nabuse_pool = \"tarpit\"\n\
         [listeners.l.limits]\nnew_flows_per_source = 2",
        &[quoted(a.addr)],
        &format!("[pools.tarpit]\nbackends = [{}]", quoted(tarpit.addr)),
    );
    let served = client("127.0.0.1:0");
    assert_eq!(request(&served, listen, b"x").0, b"a:x");
    // Denied: served by the abuse pool instead of dropped, for all its datagrams.
    let denied = client("127.0.0.5:0");
    assert_eq!(request(&denied, listen, b"y").0, b"tarpit:y");
    assert_eq!(request(&denied, listen, b"z").0, b"tarpit:z");
    // Over the new-flow limit (2 per second for 127.0.0.1): the third new port is diverted.
    let second = client("127.0.0.1:0");
    assert_eq!(request(&second, listen, b"2").0, b"a:2");
    let third = client("127.0.0.1:0");
    assert_eq!(request(&third, listen, b"3").0, b"tarpit:3");
    assert_eq!(lb.counter("/drops/denied"), 0);
    assert_eq!(lb.counter("/drops/flow_rate_limited"), 0);
    assert!(lb.counter("/abuse_diverted") >= 3);
}

#[test]
fn an_abuse_pool_must_exist_and_differ_from_the_listener_pool() {
    let (code, stderr) = check_toml(
        "[listeners.l]\naddress = \"127.0.0.1:5353\"\npool = \"p\"\nabuse_pool = \"nope\"\n\
         [listeners.m]\naddress = \"127.0.0.1:5354\"\npool = \"p\"\nabuse_pool = \"p\"\n\
         [pools.p]\nbackends = [\"127.0.0.1:53\"]\n",
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("listeners.l.abuse_pool: no pool named \"nope\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("listeners.m.abuse_pool: must differ"),
        "{stderr}"
    );
}
