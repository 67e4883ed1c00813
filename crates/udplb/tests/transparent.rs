//! Transparent mode end to end, in network namespaces the test makes: a client host, a backend
//! host and udplb on the host between them. The backend sees the client's own address; the
//! client gets its reply from the address it sent to; udplb, switched to an unprivileged user,
//! keeps CAP_NET_ADMIN and nothing else. Needs root; skipped with a message otherwise.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn ip(args: &[&str]) -> Result<(), String> {
    let ok = Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("`ip {}` failed", args.join(" ")))
    }
}

/// Two namespaces (client, backend) linked to the host by veth pairs, and the host's policy
/// routing rule that delivers the backend's replies (addressed to clients) locally. All of it
/// is removed on drop.
struct Topology {
    tag: u32,
    client_ns: String,
    backend_ns: String,
    client_if: String,
    backend_if: String,
    table: String,
    backend: Option<std::process::Child>,
}

impl Topology {
    fn new(tag: u32) -> Topology {
        Topology {
            tag,
            client_ns: format!("ulbt-c{tag}"),
            backend_ns: format!("ulbt-b{tag}"),
            client_if: format!("ulbtc{tag}"),
            backend_if: format!("ulbtb{tag}"),
            table: format!("{}", 4000 + tag % 1000),
            backend: None,
        }
    }

    fn octet(&self) -> u32 {
        16 + self.tag % 200
    }

    fn client_ip(&self) -> String {
        format!("10.214.{}.2", self.octet())
    }

    fn listener_ip(&self) -> String {
        format!("10.214.{}.1", self.octet())
    }

    fn backend_ip(&self) -> String {
        format!("10.215.{}.2", self.octet())
    }

    fn create(&self) -> Result<(), String> {
        let o = self.octet();
        let (c_host, b_host) = (format!("10.214.{o}.1/24"), format!("10.215.{o}.1/24"));
        let (c_ns, b_ns) = (
            format!("{}/24", self.client_ip()),
            format!("{}/24", self.backend_ip()),
        );
        let (c_gw, b_gw) = (format!("10.214.{o}.1"), format!("10.215.{o}.1"));
        for (ns, host_if, host_addr, ns_addr, gw) in [
            (&self.client_ns, &self.client_if, &c_host, &c_ns, &c_gw),
            (&self.backend_ns, &self.backend_if, &b_host, &b_ns, &b_gw),
        ] {
            let peer = format!("{host_if}p");
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", host_if, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", ns])?;
            ip(&["addr", "add", host_addr, "dev", host_if])?;
            ip(&["link", "set", host_if, "up"])?;
            ip(&["-n", ns, "addr", "add", ns_addr, "dev", &peer])?;
            ip(&["-n", ns, "link", "set", &peer, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "route", "add", "default", "via", gw])?;
        }
        // Replies from the backend are addressed to the client: deliver them to udplb's
        // transparent sockets instead of routing them on (docs/transparent.md).
        ip(&[
            "rule",
            "add",
            "iif",
            &self.backend_if,
            "lookup",
            &self.table,
            "pref",
            &self.table,
        ])?;
        ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &self.table,
        ])?;
        Ok(())
    }

    /// Runs this test binary's `helper` inside namespace `ns` with `env`.
    fn run_in(ns: &str, helper: &str, env: &[(&str, String)]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(std::env::current_exe().unwrap())
            .args([helper, "--exact", "--nocapture", "--test-threads=1"]);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut b) = self.backend.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        let _ = ip(&[
            "rule",
            "del",
            "iif",
            &self.backend_if,
            "lookup",
            &self.table,
        ]);
        let _ = ip(&["route", "flush", "table", &self.table]);
        for (ns, host_if) in [
            (&self.client_ns, &self.client_if),
            (&self.backend_ns, &self.backend_if),
        ] {
            let _ = ip(&["link", "del", host_if]);
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Not a test on its own: the namespaced backend. Answers every datagram with the address it
/// came from.
#[test]
fn transparent_backend_in_namespace() {
    let Ok(addr) = std::env::var("UDPLB_TEST_SOURCE_ECHO") else {
        return;
    };
    let socket = std::net::UdpSocket::bind(addr.as_str()).expect("bind");
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("saw {from}").as_bytes(), from);
        }
    }
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
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: transparent mode and namespaces need root");
        return;
    }
    let mut topo = Topology::new(std::process::id() % 10_000);
    if let Err(why) = topo.create() {
        eprintln!("skipped: cannot build the namespaces here: {why}");
        return;
    }
    let backend: SocketAddr = format!("{}:7000", topo.backend_ip()).parse().unwrap();
    topo.backend = Some(
        Topology::run_in(
            &topo.backend_ns,
            "transparent_backend_in_namespace",
            &[("UDPLB_TEST_SOURCE_ECHO", backend.to_string())],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
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

    let out = Topology::run_in(
        &topo.client_ns,
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
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    assert!(status.contains("CapEff:\t0000000000001000"), "{status}");
    assert!(status.contains("CapPrm:\t0000000000001000"), "{status}");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(status.contains(&format!("Uid:\t{nobody}\t")), "{status}");
}
