//! Flow-state sync between two udplb processes on loopback (`[sync]`): a client whose flows
//! one instance placed keeps its backends when it turns to the other, whose own scheduler
//! would place it elsewhere; datagrams not from a peer, malformed, forged or replayed change
//! nothing.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use hmac::{Hmac, Mac};

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

const CLIENTS: usize = 40;

/// A key file of the shared key (others may not read it).
fn key_file(dir: &Path, key: &str) -> String {
    let path = dir.join(format!("key-{key}"));
    std::fs::write(&path, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// A udplb on `listen` with round robin over `backends`, syncing with `peer` from `sync`
/// (no `[sync]` when `sync` is `None`).
fn instance(
    listen: SocketAddr,
    backends: &[String],
    sync: Option<(SocketAddr, SocketAddr, &str)>,
) -> Udplb {
    let admin = admin_addr();
    let mut toml = one_pool_toml(admin, listen, "", backends, "scheduler = \"rr\"");
    if let Some((me, peer, key)) = sync {
        toml += &format!(
            "[sync]\nlisten = \"{me}\"\npeers = [\"{peer}\"]\nkey_file = \"{key}\"\n\
             interval = \"20ms\"\n"
        );
    }
    run_toml(admin, &toml)
}

/// The value of the sample `name` (with its labels, as written) in `/metrics`.
fn metric(lb: &Udplb, name: &str) -> f64 {
    let (_, text) = lb.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The backend tag each client gets through `listen`, one request per client, the clients
/// asking in turn (or in reverse, the last first).
fn backends_through(clients: &[UdpSocket], listen: SocketAddr, reverse: bool) -> Vec<String> {
    let ask = |c: &UdpSocket| tag(&request(c, listen, b"hello").0);
    if reverse {
        let mut tags: Vec<String> = clients.iter().rev().map(ask).collect();
        tags.reverse();
        tags
    } else {
        clients.iter().map(ask).collect()
    }
}

/// Two instances A and B syncing with each other, round robin over three echo backends.
struct Pair {
    a: Udplb,
    b: Udplb,
    listen_a: SocketAddr,
    listen_b: SocketAddr,
    sync_a: SocketAddr,
    list: Vec<String>,
    _backends: Vec<Backend>,
}

impl Pair {
    fn start(name: &str) -> Pair {
        let key = key_file(&scratch_dir(name), "a-shared-key-of-the-two-balancers");
        let backends: Vec<Backend> = (1..=3)
            .map(|i| Backend::start("127.0.0.1", &format!("b{i}")))
            .collect();
        let list: Vec<String> = backends.iter().map(|b| quoted(b.addr)).collect();
        let (sync_a, sync_b) = (listen_addr("127.0.0.1"), listen_addr("127.0.0.1"));
        let (listen_a, listen_b) = (listen_addr("127.0.0.1"), listen_addr("127.0.0.1"));
        Pair {
            a: instance(listen_a, &list, Some((sync_a, sync_b, &key))),
            b: instance(listen_b, &list, Some((sync_b, sync_a, &key))),
            listen_a,
            listen_b,
            sync_a,
            list,
            _backends: backends,
        }
    }
}

#[test]
fn a_client_turning_to_another_instance_keeps_the_backend_the_first_one_chose() {
    let Pair {
        a,
        b,
        listen_a,
        listen_b,
        sync_a,
        list,
        _backends,
    } = Pair::start("sync");
    let listen_c = listen_addr("127.0.0.1");
    let unsynced = instance(listen_c, &list, None);
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| client("127.0.0.1:0")).collect();
    let placed = backends_through(&clients, listen_a, false);
    assert!(
        wait_for(DEADLINE, || metric(&b, "udplb_sync_placements")
            >= CLIENTS as f64),
        "B learned {} of {CLIENTS} placements",
        metric(&b, "udplb_sync_placements")
    );
    // The clients come in another order: B's round robin alone would move most of them (as
    // the instance without the sync shows).
    let through_b = backends_through(&clients, listen_b, true);
    let through_unsynced = backends_through(&clients, listen_c, true);
    let moved = |got: &[String]| placed.iter().zip(got).filter(|(p, g)| p != g).count();
    assert_eq!(
        moved(&through_b),
        0,
        "placed {placed:?}, through B {through_b:?}"
    );
    assert!(
        moved(&through_unsynced) > CLIENTS / 3,
        "without sync only {} of {CLIENTS} moved: the test shows nothing",
        moved(&through_unsynced)
    );
    assert_eq!(
        metric(&b, "udplb_sync_placements_used_total"),
        CLIENTS as f64
    );
    let spread: HashMap<&String, usize> = placed.iter().fold(HashMap::new(), |mut m, t| {
        *m.entry(t).or_default() += 1;
        m
    });
    assert_eq!(spread.len(), 3, "round robin over 3 backends: {spread:?}");
    // B told A of the flows it opened: both know them.
    assert!(wait_for(DEADLINE, || metric(
        &a,
        "udplb_sync_placements_received_total"
    ) >= CLIENTS as f64));
    drop(unsynced);
    // The operator's view: each peer heard, what is held and used.
    let (ok, status, _) = ctl(b.admin, &["status"], &[]);
    assert!(ok);
    let line = status
        .lines()
        .find(|l| l.starts_with("sync: "))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("{sync_a} heard ")) && line.contains(" flows placed by them"),
        "{status}"
    );
    assert_eq!(b.stats()["sync"]["used"], CLIENTS as u64);
}

#[test]
fn sync_datagrams_not_from_a_peer_with_the_key_change_nothing() {
    let dir = scratch_dir("sync-refused");
    let key = key_file(&dir, "the-key-the-two-balancers-share");
    let backend = Backend::start("127.0.0.1", "b1");
    let list = [quoted(backend.addr)];
    let (sync_b, peer) = (listen_addr("127.0.0.1"), listen_addr("127.0.0.1"));
    let listen = listen_addr("127.0.0.1");
    let b = instance(listen, &list, Some((sync_b, peer, &key)));
    // The peer's address, but not the peer's key: a forged message; then garbage and empty
    // datagrams from the peer's address; then a real message twice (the second is a replay).
    let forger = UdpSocket::bind(peer).unwrap();
    let wait_until_bound = || {
        wait_for(DEADLINE, || {
            forger.send_to(b"x", sync_b).unwrap();
            metric(&b, "udplb_sync_refused_total{reason=\"malformed\"}") >= 1.0
        })
    };
    assert!(wait_until_bound(), "udplb never read its sync socket");
    let message = |key: &str, sequence: u8| {
        // The wire format (see src/sync/wire.rs): a header, no entries, an HMAC-SHA256 tag.
        let mut m = b"ULBS\x01\0\0\0".to_vec();
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&u64::from(sequence).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        let tag = hmac_sha256(key.as_bytes(), &m);
        m.extend_from_slice(&tag[..16]);
        m
    };
    forger
        .send_to(&message("another-key-entirely-32-bytes", 1), sync_b)
        .unwrap();
    forger.send_to(&[], sync_b).unwrap();
    let real = message("the-key-the-two-balancers-share", 1);
    forger.send_to(&real, sync_b).unwrap();
    forger.send_to(&real, sync_b).unwrap();
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    stranger.send_to(&real, sync_b).unwrap();
    let counted = |reason: &str| {
        metric(
            &b,
            &format!("udplb_sync_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(
        wait_for(DEADLINE, || counted("forged") == 1.0
            && counted("replayed") == 1.0
            && counted("not_a_peer") == 1.0
            && metric(&b, "udplb_sync_messages_received_total") == 1.0),
        "{}",
        b.get("/metrics").1
    );
    assert!(counted("malformed") >= 2.0);
    // Still serving.
    let c = client("127.0.0.1:0");
    assert_eq!(tag(&request(&c, listen, b"hello").0), "b1");
}

#[test]
fn an_upgraded_instance_goes_on_hearing_its_peers() {
    // Every part bound: what is not would be dropped (stopped) at once.
    let Pair {
        a: _a,
        b,
        listen_a,
        listen_b,
        sync_a: _,
        list: _,
        _backends,
    } = Pair::start("sync-upgrade");
    // B is serving (it answers) before it is upgraded.
    let probe = client("127.0.0.1:0");
    request(&probe, listen_b, b"hello");
    let _successor = Adopted(upgrade_to_successor(&b, b.pid()).expect("no successor"));
    // The old process drains its flows meanwhile; it no longer reads the sync socket.
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| client("127.0.0.1:0")).collect();
    let placed = backends_through(&clients, listen_a, false);
    assert!(
        wait_for(DEADLINE, || metric(&b, "udplb_sync_placements")
            >= CLIENTS as f64),
        "the successor learned {} of {CLIENTS} placements",
        metric(&b, "udplb_sync_placements")
    );
    assert_eq!(backends_through(&clients, listen_b, true), placed);
}
