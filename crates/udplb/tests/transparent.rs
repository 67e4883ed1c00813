//! Transparent mode end to end, in network namespaces the test makes: a client host, a backend
//! host and udplb on the host between them. The backend sees the client's own address; the
//! client gets its reply from the address it sent to; udplb, switched to an unprivileged user,
//! keeps CAP_NET_ADMIN and nothing else. Needs root; skipped with a message otherwise.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::netns::{Namespace, ip, serve_if_asked};
use common::*;

/// Two namespaces (client, backend) linked to the host by veth pairs, and the host's policy
/// routing rule that delivers the backend's replies (addressed to clients) locally. All of it
/// is removed on drop.
struct Topology {
    tag: u32,
    client: Namespace,
    backend: Namespace,
    table: String,
}

impl Topology {
    fn octet(tag: u32) -> u32 {
        16 + tag % 200
    }

    fn client_ip(&self) -> String {
        format!("10.214.{}.2", Self::octet(self.tag))
    }

    fn listener_ip(&self) -> String {
        format!("10.214.{}.1", Self::octet(self.tag))
    }

    fn backend_ip(&self) -> String {
        format!("10.215.{}.2", Self::octet(self.tag))
    }

    fn create(tag: u32) -> Result<Topology, String> {
        let o = Self::octet(tag);
        let side = |ns: &str, host_if: &str, net: &str| {
            Namespace::create(
                ns,
                host_if,
                &format!("{host_if}p"),
                &format!("{net}.1/24"),
                &format!("{net}.2/24"),
                Some(&format!("{net}.1")),
            )
        };
        let client = side(
            &format!("ulbt-c{tag}"),
            &format!("ulbtc{tag}"),
            &format!("10.214.{o}"),
        )?;
        let backend = side(
            &format!("ulbt-b{tag}"),
            &format!("ulbtb{tag}"),
            &format!("10.215.{o}"),
        )?;
        let topo = Topology {
            tag,
            client,
            backend,
            table: format!("{}", 4000 + tag % 1000),
        };
        // Replies from the backend are addressed to the client: deliver them to udplb's
        // transparent sockets instead of routing them on (docs/transparent.md).
        ip(&[
            "rule",
            "add",
            "iif",
            &topo.backend.host_if,
            "lookup",
            &topo.table,
            "pref",
            &topo.table,
        ])?;
        ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &topo.table,
        ])?;
        Ok(topo)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = ip(&[
            "rule",
            "del",
            "iif",
            &self.backend.host_if,
            "lookup",
            &self.table,
        ]);
        let _ = ip(&["route", "flush", "table", &self.table]);
    }
}

/// Not a test on its own: the namespaced backend. Answers every datagram with the address it
/// came from.
#[test]
fn transparent_backend_in_namespace() {
    serve_if_asked("UDPLB_TEST_SOURCE_ECHO", |_, from| {
        format!("saw {from}").into_bytes()
    });
}

/// Not a test on its own: the namespaced client. Sends to UDPLB_TEST_TARGET until a reply
/// comes, then prints `reply=... from=... local=...`.
#[test]
fn transparent_client_in_namespace() {
    let Ok(target) = std::env::var("UDPLB_TEST_TARGET") else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..25 {
        socket.send_to(b"hello", target).unwrap();
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let local = socket.local_addr().unwrap();
            println!(
                "reply={} from={from} port={}",
                String::from_utf8_lossy(&buf[..n]),
                local.port()
            );
            return;
        }
    }
    println!("no reply");
}

#[test]
fn backends_see_the_client_address_and_clients_the_address_they_sent_to() {
    if !is_root() {
        eprintln!("skipped: transparent mode and namespaces need root");
        return;
    }
    let mut topo = match Topology::create(std::process::id() % 10_000) {
        Ok(topo) => topo,
        Err(why) => {
            eprintln!("skipped: cannot build the namespaces here: {why}");
            return;
        }
    };
    let backend: SocketAddr = format!("{}:7000", topo.backend_ip()).parse().unwrap();
    topo.backend.serve(
        "transparent_backend_in_namespace",
        &[("UDPLB_TEST_SOURCE_ECHO", backend.to_string())],
    );
    let listen: SocketAddr = format!("{}:5300", topo.listener_ip()).parse().unwrap();
    let admin = admin_addr();
    let lb = run_toml(
        admin,
        &format!(
            "[runtime]\nuser = \"nobody\"\n[admin]\nlisten = \"{admin}\"\n\
             [listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
             [pools.p]\nbackends = [\"{backend}\"]\ntransparent = true\n"
        ),
    );

    check_client(&topo, listen, &lb, lb.pid());
    // An upgrade's successor, which starts unprivileged, keeps CAP_NET_ADMIN and serves the
    // same way (a new client port: a new flow, a new transparent socket).
    let successor = upgrade_to_successor(&lb, lb.pid())
        .unwrap_or_else(|| panic!("no successor: {}", lb.stderr.lock().unwrap()));
    let _kill = Killed(successor);
    check_client(&topo, listen, &lb, successor);
}

/// Kills a process that is not the test's child when dropped.
struct Killed(u32);

impl Drop for Killed {
    fn drop(&mut self) {
        signal(self.0, "KILL");
    }
}

/// A client in its namespace gets its reply through udplb (`pid`) from the address it sent to,
/// and the backend saw the client's own address; udplb runs as nobody with CAP_NET_ADMIN only.
fn check_client(topo: &Topology, listen: SocketAddr, lb: &Udplb, pid: u32) {
    let out = topo
        .client
        .command(
            "transparent_client_in_namespace",
            &[("UDPLB_TEST_TARGET", listen.to_string())],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints the test's name on the same line first.
    let line = stdout
        .lines()
        .find_map(|l| {
            l.find("reply=")
                .or_else(|| l.find("no reply"))
                .map(|at| &l[at..])
        })
        .unwrap_or_else(|| panic!("client output: {stdout}"));
    println!("transparent: {line}");
    let port = line.rsplit("port=").next().unwrap();
    assert!(
        line.starts_with(&format!(
            "reply=saw {}:{port} from={listen}",
            topo.client_ip()
        )),
        "{line}\nudplb: {}",
        lb.stderr.lock().unwrap()
    );
    // Unprivileged, with CAP_NET_ADMIN only (bit 12), on every thread.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("CapEff:\t0000000000001000"), "{status}");
    assert!(status.contains("CapPrm:\t0000000000001000"), "{status}");
    let (nobody, _) = nobody();
    assert!(status.contains(&format!("Uid:\t{nobody}\t")), "{status}");
}
