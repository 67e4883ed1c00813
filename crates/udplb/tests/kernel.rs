//! The kernel data plane (`dataplane = "kernel"`), in namespaces the tests make (root; skipped
//! otherwise, or when udplb was built without clang): client — balancer — backends over veth,
//! the balancer the backends' gateway (LVS-NAT). Datagrams reach the backends with the
//! client's own address, replies come back from the listener's address, every client lands
//! where udplb's own placement (`/api/v1/explain`) says, a backend that dies leaves rotation
//! and its flows alone move, and datagram mode spreads exactly.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Net, ip, serve_if_asked};
use common::*;

/// Not a test on its own: a backend that answers `TAG|SENDER|:PAYLOAD` (the address it saw).
#[test]
fn kernel_backend_in_namespace() {
    let tag = std::env::var("UDPLB_TEST_KERNEL_TAG").unwrap_or_default();
    serve_if_asked("UDPLB_TEST_KERNEL_BACKEND", move |data, from| {
        // The ':' before the payload: what udplb's UDP check expects (`:ping$`).
        let mut out = format!("{tag}|{from}|:").into_bytes();
        out.extend_from_slice(data);
        out
    });
}

/// Not a test on its own: sends one GUE datagram from UDPLB_TEST_FORGE_FROM (an address of
/// this namespace) to UDPLB_TEST_FORGE_TO, holding an IPv4 UDP datagram from
/// UDPLB_TEST_FORGE_CLIENT to UDPLB_TEST_FORGE_VIP: what anyone could send a dsr backend.
#[test]
fn kernel_forged_gue_in_namespace() {
    let Ok(from) = std::env::var("UDPLB_TEST_FORGE_FROM") else {
        return;
    };
    let var = |k: &str| -> SocketAddr { std::env::var(k).unwrap().parse().unwrap() };
    let (to, client, vip) = (
        var("UDPLB_TEST_FORGE_TO"),
        var("UDPLB_TEST_FORGE_CLIENT"),
        var("UDPLB_TEST_FORGE_VIP"),
    );
    let (SocketAddr::V4(client), SocketAddr::V4(vip)) = (client, vip) else {
        panic!("IPv4 only");
    };
    let payload = b"forged";
    let udp_len = 8 + payload.len() as u16;
    let mut packet = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    packet[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    packet.extend_from_slice(&client.ip().octets());
    packet.extend_from_slice(&vip.ip().octets());
    let sum = packet
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let check = !((sum & 0xffff) + (sum >> 16)) as u16;
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    packet.extend_from_slice(&client.port().to_be_bytes());
    packet.extend_from_slice(&vip.port().to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]); // no checksum
    packet.extend_from_slice(payload);
    let socket = std::net::UdpSocket::bind(format!("{from}:0")).unwrap();
    socket.send_to(&packet, to).unwrap();
}

/// Not a test on its own: from the client namespace, each of UDPLB_TEST_KERNEL_CLIENTS
/// sockets sends UDPLB_TEST_KERNEL_ROUNDS requests to UDPLB_TEST_KERNEL_TARGET, one at a
/// time; prints per reply `LOCAL FROM TAG SEEN`.
#[test]
fn kernel_clients_in_namespace() {
    let Ok(target) = std::env::var("UDPLB_TEST_KERNEL_TARGET") else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let n: usize = std::env::var("UDPLB_TEST_KERNEL_CLIENTS")
        .unwrap()
        .parse()
        .unwrap();
    let rounds: usize = std::env::var("UDPLB_TEST_KERNEL_ROUNDS")
        .unwrap()
        .parse()
        .unwrap();
    if let Some(cpu) = std::env::var("UDPLB_TEST_KERNEL_CPU")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
    {
        pin_to(cpu);
    }
    let any = if target.is_ipv4() { "0.0.0.0" } else { "::" };
    let bind = std::env::var("UDPLB_TEST_KERNEL_BIND").unwrap_or_else(|_| any.into());
    // Requests padded to this many bytes (UDPLB_TEST_KERNEL_SIZE), if given.
    let size: usize = std::env::var("UDPLB_TEST_KERNEL_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let attempts: usize = std::env::var("UDPLB_TEST_KERNEL_ATTEMPTS")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind((bind.as_str(), 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            if std::env::var_os("UDPLB_TEST_NO_DF").is_some() {
                common::netns::without_df(&s);
            }
            if std::env::var_os("UDPLB_TEST_NO_CHECKSUM").is_some() {
                common::netns::without_checksum(&s);
            }
            s
        })
        .collect();
    let gate = std::env::var("UDPLB_TEST_KERNEL_GATE")
        .ok()
        .map(std::path::PathBuf::from);
    // Per round, another target if given (UDPLB_TEST_KERNEL_TARGETS, comma-separated; the
    // last one for the rounds beyond): the same clients to another balancer.
    let targets: Vec<SocketAddr> = std::env::var("UDPLB_TEST_KERNEL_TARGETS")
        .map(|t| t.split(',').map(|a| a.parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![target]);
    let mut buf = vec![0u8; 65_536];
    for round in 0..rounds {
        let target = targets[round.min(targets.len() - 1)];
        // A gated round's replies, also written to its `done-ROUND` file.
        let mut replies = String::new();
        if let Some(gate) = &gate
            && round > 0
        {
            // Wait for the test to say go (it changes the pool between rounds).
            let go = gate.join(format!("go-{round}"));
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for s in &sockets {
            let local = s.local_addr().unwrap();
            for _attempt in 0..attempts {
                let mut request = format!("r{round}").into_bytes();
                request.resize(request.len().max(size), b'.');
                s.send_to(&request, target).unwrap();
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    let mut parts = text.splitn(3, '|');
                    let (tag, seen) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
                    if gate.is_some() {
                        let line = format!("round {round} {} {from} {tag} {seen}", local.port());
                        println!("{line}");
                        replies += &line;
                        replies.push('\n');
                    } else {
                        println!("{} {from} {tag} {seen}", local.port());
                    }
                    break;
                }
            }
        }
        if let Some(gate) = &gate {
            std::fs::write(gate.join(format!("done-{round}")), &replies).unwrap();
        }
    }
}

/// Not a test on its own: from the client namespace, UDPLB_TEST_KERNEL_SOCKETS sockets bound to
/// UDPLB_TEST_KERNEL_BIND each send UDPLB_TEST_KERNEL_EACH datagrams to
/// UDPLB_TEST_KERNEL_BURST at once, then count the replies; prints `windows W replies R`, W
/// the one-second windows (of CLOCK_MONOTONIC, the program's clock) the sending spanned.
#[test]
fn kernel_burst_in_namespace() {
    let Ok(target) = std::env::var("UDPLB_TEST_KERNEL_BURST") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap();
    // Thousands of sockets at once: the soft descriptor limit raised to the hard one.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let sockets: Vec<UdpSocket> = (0..var("UDPLB_TEST_KERNEL_SOCKETS").parse::<usize>().unwrap())
        .map(|_| UdpSocket::bind((var("UDPLB_TEST_KERNEL_BIND").as_str(), 0)).unwrap())
        .collect();
    let each: usize = var("UDPLB_TEST_KERNEL_EACH").parse().unwrap();
    let second = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .unwrap()
            .tv_sec()
    };
    let first = second();
    for s in &sockets {
        for _ in 0..each {
            s.send_to(b"burst", target.as_str()).unwrap();
        }
    }
    let windows = second() - first + 1;
    // Replies for 300 ms after the last datagram (or until every one has its reply).
    let mut replies = 0;
    let mut buf = [0u8; 2048];
    for s in &sockets {
        s.set_nonblocking(true).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < deadline && replies < sockets.len() * each {
        let before = replies;
        for s in &sockets {
            while s.recv_from(&mut buf).is_ok() {
                replies += 1;
            }
        }
        if replies == before {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    println!("windows {windows} replies {replies}");
}

/// What `ip route get TO` says in host `ns` (a learned path MTU shows as `mtu N`).
fn route_to(ns: &str, to: &str) -> String {
    let out = Net::exec(ns, Path::new("ip"))
        .args(["route", "get", to])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether host `ns` has an IPv6 address duplicate address detection has not cleared yet.
fn ipv6_tentative(ns: &str) -> bool {
    let out = Net::exec(ns, Path::new("ip"))
        .args(["-6", "addr", "show", "tentative"])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

struct Topology {
    net: Net,
    t: u32,
    balancer: String,
    clients: String,
    backends: String,
    /// The listener, the backends and the clients on IPv6 ([`Topology::ipv6`]).
    v6: bool,
    /// dsr encapsulates in GUE to this port, which the backend host takes (`udplb decap
    /// --gue-port`); `None`: IP in IP.
    gue: Option<u16>,
    /// `udplb decap` on the backend host ([`Topology::dsr_backend_host`]): its pid and log.
    decap: Option<(u32, std::path::PathBuf)>,
    /// The listener's address when it is not [`Topology::vip`] (a wildcard).
    listen: Option<SocketAddr>,
}

impl Topology {
    /// `None` (said why) without root, namespaces or the program. `prefix` names the
    /// namespaces and the scratch directory together with the process id: each test of this
    /// file needs its own (two tests with one would share, and tear down, each other's hosts).
    fn build(prefix: &str) -> Option<Topology> {
        if !is_root() {
            eprintln!("skipped: network namespaces and eBPF need root");
            return None;
        }
        need("curl", "curl");
        let t = std::process::id() % 200;
        let mut net = Net::new(scratch_dir(prefix));
        let (b, c, k) = (
            format!("{prefix}-b{t}"),
            format!("{prefix}-c{t}"),
            format!("{prefix}-k{t}"),
        );
        if let Err(why) = net.add(&b) {
            eprintln!("skipped: cannot make network namespaces here: {why}");
            return None;
        }
        let built = (|| -> Result<(), String> {
            net.add(&c)?;
            net.add(&k)?;
            net.link(
                &b,
                "bc",
                &format!("10.97.{t}.1/24"),
                &c,
                "cb",
                &format!("10.97.{t}.2/24"),
            )?;
            net.link(
                &b,
                "bk",
                &format!("10.98.{t}.1/24"),
                &k,
                "kb",
                &format!("10.98.{t}.2/24"),
            )?;
            ip(&[
                "-n",
                &c,
                "route",
                "add",
                "default",
                "via",
                &format!("10.97.{t}.1"),
            ])?;
            ip(&[
                "-n",
                &k,
                "route",
                "add",
                "default",
                "via",
                &format!("10.98.{t}.1"),
            ])?;
            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("10.99.{t}.1/32"),
                "dev",
                "lo",
            ])?;
            let ok = Net::exec(&b, Path::new("sysctl"))
                .args(["-q", "-w", "net.ipv4.ip_forward=1"])
                .status()
                .map_err(|e| e.to_string())?;
            ok.success()
                .then_some(())
                .ok_or("sysctl failed".to_string())
        })();
        if let Err(why) = built {
            panic!("building the topology: {why}");
        }
        Some(Topology {
            net,
            t,
            balancer: b,
            clients: c,
            backends: k,
            v6: false,
            gue: None,
            decap: None,
            listen: None,
        })
    }

    /// The same hosts on IPv6 as well (fd00:97:T::/64 the clients', fd00:98:T::/64 the
    /// backends', the listener on fd00:99:T::1), forwarding on; from now on the listener, the
    /// backends and the clients are the IPv6 ones.
    fn ipv6(&mut self) {
        let t = self.t;
        let (b, c, k) = (&self.balancer, &self.clients, &self.backends);
        // `nodad`: usable at once (duplicate address detection would hold them a second).
        let add = |ns: &str, addr: String, dev: &str| {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev, "nodad"]).unwrap();
        };
        add(b, format!("fd00:97:{t}::1/64"), "bc");
        add(c, format!("fd00:97:{t}::2/64"), "cb");
        add(b, format!("fd00:98:{t}::1/64"), "bk");
        add(k, format!("fd00:98:{t}::2/64"), "kb");
        add(b, format!("fd00:99:{t}::1/128"), "lo");
        ip(&[
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:97:{t}::1"),
        ])
        .unwrap();
        ip(&[
            "-n",
            k,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:98:{t}::1"),
        ])
        .unwrap();
        let ok = Net::exec(b, Path::new("sysctl"))
            .args(["-q", "-w", "net.ipv6.conf.all.forwarding=1"])
            .status()
            .unwrap();
        assert!(ok.success());
        self.settle_ipv6();
        self.v6 = true;
    }

    /// Waits until duplicate address detection has cleared every host's link-local addresses:
    /// until then neighbour discovery has no source to ask from, and packets wait in its queue
    /// (seconds).
    fn settle_ipv6(&self) {
        let hosts = [&self.balancer, &self.clients, &self.backends];
        assert!(
            wait_for(DEADLINE, || hosts.iter().all(|ns| !ipv6_tentative(ns))),
            "IPv6 addresses stayed tentative"
        );
    }

    /// The method of `forwarding` as a test names it: ending in 6 (`nat6`, `masquerade6`), that
    /// method on IPv6 (the hosts are given it first).
    fn family_of<'a>(&mut self, forwarding: &'a str) -> &'a str {
        match forwarding.strip_suffix('6') {
            Some(method) => {
                self.ipv6();
                method
            }
            None => forwarding,
        }
    }

    /// The clients' address.
    fn client_ip(&self) -> String {
        if self.v6 {
            format!("fd00:97:{}::2", self.t)
        } else {
            format!("10.97.{}.2", self.t)
        }
    }

    /// A far client host (10.95.T.2) behind the clients' host, which routes for it over a
    /// link of `mtu` bytes: a router beyond the balancer with a narrower link. Returns its
    /// name.
    fn far_client(&mut self, mtu: u32) -> String {
        let t = self.t;
        let f = self.clients.replacen("-c", "-f", 1);
        self.net.add(&f).unwrap();
        let (near, far) = (format!("10.95.{t}.1"), format!("10.95.{t}.2"));
        self.net
            .link(
                &self.clients,
                "cf",
                &format!("{near}/24"),
                &f,
                "fc",
                &format!("{far}/24"),
            )
            .unwrap();
        for (ns, dev) in [(&self.clients, "cf"), (&f, "fc")] {
            ip(&["-n", ns, "link", "set", dev, "mtu", &mtu.to_string()]).unwrap();
        }
        ip(&["-n", &f, "route", "add", "default", "via", &near]).unwrap();
        let net = format!("10.95.{t}.0/24");
        let via = format!("10.97.{t}.2");
        ip(&["-n", &self.balancer, "route", "add", &net, "via", &via]).unwrap();
        let ok = Net::exec(&self.clients, Path::new("sysctl"))
            .args(["-q", "-w", "net.ipv4.ip_forward=1"])
            .args(["-w", "net.ipv6.conf.all.forwarding=1"])
            .status()
            .unwrap();
        assert!(ok.success());
        if self.v6 {
            let (near, far) = (format!("fd00:95:{t}::1"), format!("fd00:95:{t}::2"));
            ip(&[
                "-n",
                &self.clients,
                "addr",
                "add",
                &format!("{near}/64"),
                "dev",
                "cf",
                "nodad",
            ])
            .unwrap();
            ip(&[
                "-n",
                &f,
                "addr",
                "add",
                &format!("{far}/64"),
                "dev",
                "fc",
                "nodad",
            ])
            .unwrap();
            ip(&["-n", &f, "-6", "route", "add", "default", "via", &near]).unwrap();
            let (net, via) = (format!("fd00:95:{t}::/64"), format!("fd00:97:{t}::2"));
            ip(&[
                "-n",
                &self.balancer,
                "-6",
                "route",
                "add",
                &net,
                "via",
                &via,
            ])
            .unwrap();
            self.settle_ipv6();
            assert!(
                wait_for(DEADLINE, || !ipv6_tentative(&f)),
                "IPv6 addresses stayed tentative"
            );
        }
        f
    }

    /// Path MTU discovery seen from the clients' host: a datagram of `size` bytes sent once gets
    /// no answer (too big somewhere on the way), after which the client holds `mtu MTU` towards
    /// the listener, and its next try (fragmented to fit) is answered.
    fn client_learns_the_mtu(&self, size: usize, mtu: u32) {
        let size = ("UDPLB_TEST_KERNEL_SIZE", size.to_string());
        let once = [
            size.clone(),
            ("UDPLB_TEST_KERNEL_ATTEMPTS", "1".to_string()),
        ];
        assert!(self.clients_with(1, 1, &once).is_empty());
        let to_vip = route_to(&self.clients, &self.vip().ip().to_string());
        assert!(to_vip.contains(&format!("mtu {mtu}")), "{to_vip}");
        assert_eq!(
            self.clients_with(1, 1, std::slice::from_ref(&size)).len(),
            1,
            "{}",
            self.api("/stats")["kernel"]
        );
    }

    /// The MTU of the link between the balancer and the clients, both ends.
    fn clients_link_mtu(&self, mtu: u32) {
        for (ns, dev) in [(&self.balancer, "bc"), (&self.clients, "cb")] {
            ip(&["-n", ns, "link", "set", dev, "mtu", &mtu.to_string()]).unwrap();
        }
    }

    /// The MTU of the link between the balancer and the backends, both ends.
    fn backends_link_mtu(&self, mtu: u32) {
        for (ns, dev) in [(&self.balancer, "bk"), (&self.backends, "kb")] {
            ip(&["-n", ns, "link", "set", dev, "mtu", &mtu.to_string()]).unwrap();
        }
    }

    /// The balancer's address on the backends' side.
    fn balancer_ip(&self) -> std::net::IpAddr {
        if self.v6 {
            format!("fd00:98:{}::1", self.t).parse().unwrap()
        } else {
            format!("10.98.{}.1", self.t).parse().unwrap()
        }
    }

    /// The backend host's address.
    fn backend_ip(&self) -> String {
        if self.v6 {
            format!("fd00:98:{}::2", self.t)
        } else {
            format!("10.98.{}.2", self.t)
        }
    }

    /// The backends' host loses its default route: only what comes from the balancer's own
    /// address (masquerade) can be answered.
    fn without_a_route_to_the_clients(&self) {
        ip(&["-n", &self.backends, "route", "del", "default"]).unwrap();
        if self.v6 {
            ip(&["-n", &self.backends, "-6", "route", "del", "default"]).unwrap();
        }
    }

    /// Direct server return's backend host: the listener's address on its loopback, an echo
    /// (tag `d`) serving it, `udplb decap` taking IP in IP from the balancer on `kb`, and a
    /// link of its own to the clients (`kc`—`ck`, the clients' reverse-path filter off: the
    /// replies arrive where their route to the listener does not go). Returns the decap's pid
    /// and log; `None` (said why) when udplb was built without the program.
    fn dsr_backend_host(&mut self) -> Option<(u32, std::path::PathBuf)> {
        self.dsr_backend_host_serving(true)
    }

    /// As [`Topology::dsr_backend_host`], the echo on the listener's address only when `echo`
    /// (the caller serves it otherwise).
    fn dsr_backend_host_serving(&mut self, echo: bool) -> Option<(u32, std::path::PathBuf)> {
        let t = self.t;
        let (k, c) = (self.backends.clone(), self.clients.clone());
        self.net
            .link(
                &k,
                "kc",
                &format!("10.96.{t}.2/24"),
                &c,
                "ck",
                &format!("10.96.{t}.1/24"),
            )
            .unwrap();
        if self.v6 {
            ip(&[
                "-n",
                &k,
                "addr",
                "add",
                &format!("fd00:96:{t}::2/64"),
                "dev",
                "kc",
                "nodad",
            ])
            .unwrap();
            ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("fd00:96:{t}::1/64"),
                "dev",
                "ck",
                "nodad",
            ])
            .unwrap();
            let (clients, via) = (format!("fd00:97:{t}::/64"), format!("fd00:96:{t}::1"));
            ip(&["-n", &k, "-6", "route", "add", &clients, "via", &via]).unwrap();
            let vip = format!("fd00:99:{t}::1/128");
            ip(&["-n", &k, "addr", "add", &vip, "dev", "lo"]).unwrap();
            self.settle_ipv6();
        } else {
            let (clients, via, vip) = (
                format!("10.97.{t}.0/24"),
                format!("10.96.{t}.1"),
                format!("10.99.{t}.1/32"),
            );
            ip(&["-n", &k, "route", "add", &clients, "via", &via]).unwrap();
            ip(&["-n", &k, "addr", "add", &vip, "dev", "lo"]).unwrap();
            for setting in ["all", "default", "ck", "cb"] {
                let ok = Net::exec(&c, Path::new("sysctl"))
                    .args(["-q", "-w", &format!("net.ipv4.conf.{setting}.rp_filter=0")])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
        }
        if echo {
            let vip = self.vip();
            self.start_echo(&k, vip, "d");
        }
        let log = self.net.dir.join("decap.log");
        let gue: Vec<String> = self
            .gue
            .iter()
            .flat_map(|p| ["--gue-port".to_string(), p.to_string()])
            .collect();
        let child = Net::exec(&k, Path::new(env!("CARGO_BIN_EXE_udplb")))
            .args(["decap", "-i", "kb", "-b"])
            .arg(if self.v6 {
                format!("fd00:98:{t}::1")
            } else {
                format!("10.98.{t}.1")
            })
            .args(&gue)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = self.net.keep(child);
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            wait_for(DEADLINE, || said().contains("udplb decap:")),
            "udplb decap did not start"
        );
        if said().contains("not built into this udplb") {
            eprintln!("skipped: udplb was built without clang");
            return None;
        }
        assert!(said().contains("taking IP in IP"), "{}", said());
        if let Some(port) = self.gue {
            assert!(
                said().contains(&format!("and GUE to port {port}")),
                "{}",
                said()
            );
            assert!(!said().contains("is bound to UDP port"), "{}", said());
        }
        self.decap = Some((pid, log.clone()));
        Some((pid, log))
    }

    /// Stops `udplb decap` ([`Topology::dsr_backend_host`]): what it says it did, as
    /// (decapsulated, of them in GUE, left to the stack from other sources).
    fn stop_decap(&self) -> (u64, u64, u64) {
        let (pid, log) = self.decap.clone().expect("no udplb decap");
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(
            wait_for(DEADLINE, || said().contains("stopped")),
            "{}",
            said()
        );
        // "stopped (SIGTERM): N decapsulated (G in GUE), O from other sources ..."
        let text = said();
        let numbers: Vec<u64> = text
            .lines()
            .find(|l| l.contains("stopped"))
            .and_then(|l| l.split_once("): "))
            .map(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(numbers.len(), 3, "{text}");
        (numbers[0], numbers[1], numbers[2])
    }

    /// The pool's keys for dsr, with GUE when the topology has it.
    fn dsr_forwarding(&self) -> String {
        match self.gue {
            Some(port) => {
                format!("forwarding = \"dsr\"\nencapsulation = \"gue\"\ngue_port = {port}\n")
            }
            None => "forwarding = \"dsr\"\n".to_string(),
        }
    }

    /// An echo backend (tag `l`) on the balancer itself, on 127.0.0.1:7004 ([::1]:7004 on
    /// IPv6).
    fn start_local_backend(&mut self) -> SocketAddr {
        let local: SocketAddr = if self.v6 {
            "[::1]:7004"
        } else {
            "127.0.0.1:7004"
        }
        .parse()
        .unwrap();
        let balancer = self.balancer.clone();
        self.start_echo(&balancer, local, "l");
        local
    }

    /// An echo (tag `tag`) on `addr` in host `ns`, kept for the test's life.
    fn start_echo(&mut self, ns: &str, addr: SocketAddr, tag: &str) {
        let child = Net::helper(
            ns,
            "kernel_backend_in_namespace",
            &[
                ("UDPLB_TEST_KERNEL_BACKEND", addr.to_string()),
                ("UDPLB_TEST_KERNEL_TAG", tag.to_string()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        self.net.keep(child);
    }

    fn vip(&self) -> SocketAddr {
        if self.v6 {
            format!("[fd00:99:{}::1]:5300", self.t).parse().unwrap()
        } else {
            format!("10.99.{}.1:5300", self.t).parse().unwrap()
        }
    }

    fn backend_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.backend_ip().parse().unwrap(), 7001 + i as u16)
    }

    /// Echo backends x, y, z on 7001..7003 of the backend host; returns their pids.
    fn start_backends(&mut self) -> Vec<u32> {
        self.start_backends_with(&[])
    }

    /// As [`Topology::start_backends`], with more variables for the echo helper.
    fn start_backends_with(&mut self, extra: &[(&str, String)]) -> Vec<u32> {
        ["x", "y", "z"]
            .iter()
            .enumerate()
            .map(|(i, tag)| {
                let child = Net::helper(
                    &self.backends,
                    "kernel_backend_in_namespace",
                    &[
                        (
                            "UDPLB_TEST_KERNEL_BACKEND",
                            self.backend_addr(i).to_string(),
                        ),
                        ("UDPLB_TEST_KERNEL_TAG", tag.to_string()),
                    ]
                    .into_iter()
                    .chain(extra.iter().cloned())
                    .collect::<Vec<_>>(),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
                self.net.keep(child)
            })
            .collect()
    }

    /// A topology (IPv6 with `v6`) with its echo backends and udplb serving them with
    /// `listener` lines; `None` when the test is skipped (not root, or udplb built without
    /// the program, each said).
    fn serving(prefix: &str, v6: bool, listener: &str) -> Option<Topology> {
        let mut topo = Topology::build(prefix)?;
        if v6 {
            topo.ipv6();
        }
        topo.start_backends();
        topo.start_udplb(listener);
        (!topo.without_the_program()).then_some(topo)
    }

    /// udplb on the balancer with `listener` lines for the kernel listener, the three echo
    /// backends UDP-checked.
    fn start_udplb(&mut self, listener: &str) -> u32 {
        self.start_udplb_forwarding(listener, "nat")
    }

    /// As [`Topology::start_udplb`], the pool forwarding with `forwarding` (masquerade: once
    /// the backends have lost their route to the clients, so that only masquerade can answer).
    fn start_udplb_forwarding(&mut self, listener: &str, forwarding: &str) -> u32 {
        if forwarding == "masquerade" {
            self.without_a_route_to_the_clients();
        }
        let backends: Vec<String> = (0..3).map(|i| quoted(self.backend_addr(i))).collect();
        let pool = format!(
            "backends = [{}]\nforwarding = \"{forwarding}\"\n[pools.p.health]\n{}\n",
            backends.join(", "),
            udp_check(200, 200, 1, 2)
        );
        self.start_udplb_with(listener, &pool)
    }

    /// udplb on the balancer with `listener` lines for the kernel listener and `pool` lines
    /// for its pool.
    fn start_udplb_with(&mut self, listener: &str, pool: &str) -> u32 {
        self.start_udplb_by(listener, pool, Net::udplb)
    }

    /// As [`Topology::start_udplb_with`], udplb started by `command` (the balancer's namespace,
    /// the configuration file and the log file given).
    fn start_udplb_by(
        &mut self,
        listener: &str,
        pool: &str,
        command: impl FnOnce(&str, &Path, &Path) -> Command,
    ) -> u32 {
        let toml = format!(
            "[admin]\nlisten = \"127.0.0.1:9190\"\nallow_changes = true\n\
             [listeners.l]\naddress = \"{}\"\npool = \"p\"\ndataplane = \"kernel\"\n\
             interfaces = [\"bc\", \"bk\"]\n{listener}\n[pools.p]\n{pool}",
            self.listen.unwrap_or(self.vip()),
        );
        let config = self.net.dir.join("udplb.toml");
        std::fs::write(&config, toml).unwrap();
        let log = self.net.dir.join("udplb.log");
        let child = command(&self.balancer, &config, &log).spawn().unwrap();
        let pid = self.net.keep(child);
        self.wait_until_up();
        pid
    }

    /// Waits until udplb serves: every pool's backends healthy, the kernel's maps written.
    fn wait_until_up(&self) {
        assert!(
            wait_for(DEADLINE, || self.api("/stats")["pools"]
                .as_array()
                .is_some_and(|pools| pools.iter().all(|p| p["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().all(|b| b["healthy"] == true))))),
            "udplb did not come up: {}",
            self.log()
        );
        self.wait_for_the_maps();
    }

    /// Waits until the kernel's maps say what udplb's snapshot says.
    /// The kernel's live flows of the listener per backend (x, y, z; those with none too),
    /// from `/stats`, which must agree with `/metrics` and the listener's total.
    fn kernel_flows(&self) -> HashMap<String, u64> {
        let stats = self.api("/stats");
        let listener = &stats["kernel"]["listeners"][0];
        let by_tag: HashMap<String, u64> = listener["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("no kernel backends: {stats}"))
            .iter()
            .map(|b| {
                let addr = b["address"].as_str().unwrap();
                let tag = (0..3)
                    .find(|&i| self.backend_addr(i).to_string() == addr)
                    .map_or("?", |i| ["x", "y", "z"][i]);
                (tag.to_string(), b["flows"].as_u64().unwrap())
            })
            .collect();
        let total: u64 = by_tag.values().sum();
        assert_eq!(listener["flows"], total, "{stats}");
        // The pool's backends say the same (what `ctl backends` and the status page show).
        let in_pool: u64 = stats["pools"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["kernel_flows"].as_u64().unwrap_or(u64::MAX / 8))
            .sum();
        assert_eq!(in_pool, total, "{stats}");
        let slots = &stats["kernel"]["flow_table_slots"];
        assert!(slots["ipv4"].as_u64() >= Some(4096), "{stats}");
        by_tag.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    fn wait_for_the_maps(&self) {
        assert!(
            wait_for(DEADLINE, || {
                let stats = self.api("/stats");
                stats["kernel"]["generation"] == stats["generation"]
            }),
            "the kernel maps lag: {}",
            self.log()
        );
    }

    /// `n` clients sending `rounds` rounds, each round after the first once the test writes
    /// `go-ROUND` in the returned directory (the helper writes `done-ROUND` after each), so
    /// that the test changes things between rounds with the clients' flows live.
    fn gated_clients(&self, n: usize, rounds: usize) -> (std::path::PathBuf, std::process::Child) {
        let control = self.net.dir.join("rounds");
        std::fs::create_dir_all(&control).unwrap();
        let helper = Net::helper(
            &self.clients,
            "kernel_clients_in_namespace",
            &[
                ("UDPLB_TEST_KERNEL_TARGET", self.vip().to_string()),
                ("UDPLB_TEST_KERNEL_CLIENTS", n.to_string()),
                ("UDPLB_TEST_KERNEL_ROUNDS", rounds.to_string()),
                ("UDPLB_TEST_KERNEL_GATE", control.display().to_string()),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        (control, helper)
    }

    /// Whether udplb said it was built without the program (clang missing): the test is
    /// skipped, saying so.
    fn without_the_program(&self) -> bool {
        let missing = self.log().contains("not built into this udplb");
        if missing {
            eprintln!("skipped: udplb was built without clang");
        }
        missing
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.net.dir.join("udplb.log")).unwrap_or_default()
    }

    /// `GET path` on udplb's admin endpoint in the balancer.
    fn api(&self, path: &str) -> serde_json::Value {
        let out = Net::exec(&self.balancer, Path::new("curl"))
            .args(["-s", "-g", &format!("127.0.0.1:9190{path}")])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// `method path` with the JSON `body` on the admin API's pool `p`'s backends (`path` after
    /// `backends/`), which must succeed.
    fn change_backend(&self, method: &str, path: &str, body: &str) {
        let out = Net::exec(&self.balancer, Path::new("curl"))
            .args(["-s", "-f", "-g", "-X", method, "-d", body])
            .args(["-H", "content-type: application/json"])
            .arg(format!("127.0.0.1:9190/api/v1/pools/p/backends/{path}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{method} {path}: {out:?}");
    }

    /// `n` clients sending `rounds` requests each: per reply (client port, reply source, tag,
    /// the client address the backend saw).
    fn clients(&self, n: usize, rounds: usize) -> Vec<(u16, SocketAddr, String, String)> {
        self.clients_with(n, rounds, &[])
    }

    /// As [`Topology::clients`], with more of the helper's variables (`UDPLB_TEST_KERNEL_*`).
    fn clients_with(
        &self,
        n: usize,
        rounds: usize,
        extra: &[(&str, String)],
    ) -> Vec<(u16, SocketAddr, String, String)> {
        self.clients_in(&self.clients, n, rounds, extra)
    }

    /// As [`Topology::clients_with`], from the host `ns`.
    fn clients_in(
        &self,
        ns: &str,
        n: usize,
        rounds: usize,
        extra: &[(&str, String)],
    ) -> Vec<(u16, SocketAddr, String, String)> {
        let mut env = vec![
            ("UDPLB_TEST_KERNEL_TARGET", self.vip().to_string()),
            ("UDPLB_TEST_KERNEL_CLIENTS", n.to_string()),
            ("UDPLB_TEST_KERNEL_ROUNDS", rounds.to_string()),
        ];
        env.extend(extra.iter().cloned());
        let out = Net::helper(ns, "kernel_clients_in_namespace", &env)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        helper_lines(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .filter_map(|l| reply_line(l))
            .collect()
    }
}

/// Every rewrite keeps the UDP checksum right, however the datagram holds it. The client's
/// and the backends' kernels compute theirs in full (veth would otherwise leave them to an
/// offload, unchecked), so that every receiver checks them: requests and replies all get
/// through, none counted as a checksum error on either side; so do IPv4 requests sent with no
/// checksum (zero, which stays valid; IPv6 has no such thing).
#[test]
fn nat_keeps_udp_checksums_right_both_ways() {
    udp_checksums_kept("ulck", "nat", false);
}

#[test]
fn masquerade_keeps_udp_checksums_right_both_ways() {
    udp_checksums_kept("ulcm", "masquerade", false);
}

#[test]
fn ipv6_nat_keeps_udp_checksums_right_both_ways() {
    udp_checksums_kept("ul6k", "nat", true);
}

#[test]
fn ipv6_masquerade_keeps_udp_checksums_right_both_ways() {
    udp_checksums_kept("ul6m", "masquerade", true);
}

fn udp_checksums_kept(prefix: &str, forwarding: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    let ethtool = need("ethtool", "ethtool");
    for (ns, dev) in [(&topo.clients, "cb"), (&topo.backends, "kb")] {
        let ok = Net::exec(ns, &ethtool)
            .args(["-K", dev, "tx", "off"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "ethtool -K {dev} tx off");
    }
    topo.start_backends();
    topo.start_udplb_forwarding("", forwarding);
    if topo.without_the_program() {
        return;
    }
    let (file, prefix, name) = if v6 {
        ("/proc/net/snmp6", "Udp6InCsumErrors", "Udp6InCsumErrors")
    } else {
        ("/proc/net/snmp", "Udp: ", "InCsumErrors")
    };
    let checksum_errors = |ns: &str| -> u64 {
        let out = Net::exec(ns, Path::new("cat")).arg(file).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        // snmp6: one line "NAME VALUE"; snmp: a line of names, then one of values.
        let (names, values) = match lines[..] {
            [one] => (one, one),
            [names, values, ..] => (names, values),
            _ => panic!("no {prefix} in {file}: {text}"),
        };
        let at = names.split_whitespace().position(|n| n == name).unwrap();
        let value = values.split_whitespace().nth(at + usize::from(v6)).unwrap();
        value.parse().unwrap()
    };
    let mut cases = vec![vec![]];
    if !v6 {
        cases.push(vec![("UDPLB_TEST_NO_CHECKSUM", "1".to_string())]);
    }
    for extra in cases {
        let replies = topo.clients_with(20, 2, &extra);
        assert_eq!(replies.len(), 40, "{extra:?}: {replies:?}");
        let errors = (
            checksum_errors(&topo.clients),
            checksum_errors(&topo.backends),
        );
        assert_eq!(
            errors,
            (0, 0),
            "{extra:?}: checksum errors (clients, backends)"
        );
    }
    assert_eq!(topo.api("/stats")["listeners"][0]["datagrams_in"], 0);
}

#[test]
fn nat_keeps_the_clients_address_answers_from_the_listener_and_places_as_udplb_does() {
    nat_keeps_the_clients_address("ulbk", false);
}

/// The same on IPv6: a listener on an IPv6 address, IPv6 backends and clients.
#[test]
fn ipv6_nat_keeps_the_clients_address_answers_from_the_listener_and_places_as_udplb_does() {
    nat_keeps_the_clients_address("ulbb", true);
}

fn nat_keeps_the_clients_address(prefix: &str, v6: bool) {
    let Some(topo) = Topology::serving(prefix, v6, "") else {
        return;
    };
    let client_ip = topo.client_ip();
    let client = |port: &u16| SocketAddr::new(client_ip.parse().unwrap(), *port);
    let replies = topo.clients(60, 2);
    assert!(
        replies.len() == 120,
        "{} replies: {replies:?}\n{}\n{}",
        replies.len(),
        topo.log(),
        topo.api("/stats")["kernel"]
    );
    let mut backend_of: HashMap<u16, String> = HashMap::new();
    for (port, from, tag, seen) in &replies {
        assert_eq!(*from, topo.vip(), "a reply not from the listener's address");
        assert_eq!(
            seen,
            &client(port).to_string(),
            "the backend saw another address"
        );
        let first = backend_of.entry(*port).or_insert_with(|| tag.clone());
        assert_eq!(first, tag, "client {port} changed backend");
    }
    let spread: HashMap<&String, usize> = backend_of.values().fold(HashMap::new(), |mut m, t| {
        *m.entry(t).or_default() += 1;
        m
    });
    assert_eq!(
        spread.len(),
        3,
        "60 clients over 3 backends: {spread:?}\n{}\n{}",
        topo.api("/stats")["kernel"],
        topo.api("/stats")["pools"]
    );
    // Where udplb's own placement (the socket path's) would put each client.
    let tag_of = |addr: &str| match addr.rsplit(':').next() {
        Some("7001") => "x",
        Some("7002") => "y",
        Some("7003") => "z",
        _ => "?",
    };
    // Explain names each client's place, and finds its live flow in the kernel's table there.
    let differ: Vec<u16> = backend_of
        .iter()
        .filter(|(port, tag)| {
            let explained = topo.api(&format!("/api/v1/explain?client={}", client(port)));
            tag_of(explained["backend"].as_str().unwrap_or("")) != tag.as_str()
                || tag_of(explained["flow"]["backend"].as_str().unwrap_or("")) != tag.as_str()
        })
        .map(|(p, _)| *p)
        .collect();
    let explained = topo.api(&format!("/api/v1/explain?client={}", client(&1)));
    assert_eq!(explained["dataplane"], "kernel", "{explained}");
    assert!(
        explained["flow"].is_null(),
        "port 1 sent nothing: {explained}"
    );
    assert!(
        differ.is_empty(),
        "placed unlike udplb's own placement, or no live flow found there: {differ:?}: {}",
        topo.api(&format!("/api/v1/explain?client={}", client(&differ[0])))
    );
    // The datagrams went through the kernel, not udplb's sockets; the operator sees it, and
    // each backend's flows: one per client placed there.
    let stats = topo.api("/stats");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
    let created: HashMap<String, u64> = stats["kernel"]["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let tag = tag_of(b["address"].as_str().unwrap()).to_string();
            (tag, b["flows_created"].as_u64().unwrap())
        })
        .collect();
    let expected: HashMap<String, u64> = spread
        .iter()
        .map(|(t, n)| (t.to_string(), *n as u64))
        .collect();
    assert_eq!(created, expected, "flows created per backend");
    // (Counted at most once a second: an earlier count may still be served.)
    let expected_live: HashMap<String, u64> =
        expected.into_iter().filter(|(_, n)| *n > 0).collect();
    assert!(
        wait_for(DEADLINE, || topo.kernel_flows() == expected_live),
        "live kernel flows per backend: {:?}, placed {expected_live:?}",
        topo.kernel_flows()
    );
    let out = Net::exec(&topo.balancer, Path::new(env!("CARGO_BIN_EXE_udplb")))
        .args(["ctl", "--admin", "127.0.0.1:9190", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(
            "kernel: attached to bc,bk (l nat); 60 live flows; forwarded 120 datagrams, 120 \
             replies; dropped 0"
        ) && status
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains(" kernel ")),
        "{status}"
    );
    let out = Net::exec(&topo.balancer, Path::new("curl"))
        .args(["-s", "127.0.0.1:9190/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    let forwarded: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("udplb_kernel_datagrams_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(forwarded, 120.0, "{metrics}");
    let live_metric: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("udplb_kernel_flows{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(live_metric, 60.0, "{metrics}");
    // What the shipped dashboard and alerts read of the kernel data plane, it exports.
    let exported: std::collections::HashSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.strip_suffix("_total").unwrap_or(name))
        .collect();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib");
    for file in ["grafana/udplb.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(contrib.join(file)).unwrap();
        let used: std::collections::HashSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("udplb_kernel_"))
            .collect();
        assert!(used.len() > 2, "{file}: {used:?}");
        for name in used {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which udplb does not export"
            );
        }
    }
}

const ZONE: &str = "example.test.";

/// knotd on the backend host, port 5353, serving a zone whose `big` TXT answer (3.9 KB) needs
/// IP fragments on a 1500-byte path.
fn start_knot(topo: &mut Topology) -> SocketAddr {
    let addr = SocketAddr::new(topo.backend_ip().parse().unwrap(), 5353);
    start_knot_on(topo, addr);
    addr
}

/// The same knotd, on `addr` (an address of the backend host).
fn start_knot_on(topo: &mut Topology, addr: SocketAddr) {
    let dir = topo.net.dir.join("knot");
    std::fs::create_dir_all(&dir).unwrap();
    let big: Vec<String> = (0..15)
        .map(|i| format!("\"{}\"", char::from(b'a' + i as u8).to_string().repeat(250)))
        .collect();
    std::fs::write(
        dir.join("zone"),
        format!(
            "$ORIGIN {ZONE}\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\n\
             ns A 192.0.2.1\nwww A 192.0.2.10\nbig TXT {}\n",
            big.join(" ")
        ),
    )
    .unwrap();
    let conf = dir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: {}@{}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  \
             background-workers: 1\n  udp-max-payload: 4096\n\
             database:\n  storage: {d}\ncontrol:\n  listen: {d}/knot.sock\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: {d}\n\
             zone:\n  - domain: {ZONE}\n    file: zone\n",
            addr.ip(),
            addr.port(),
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Net::exec(&topo.backends, &need("knotd", "knot"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    topo.net.keep(child);
}

/// `dig` in the client host: its output.
fn dig_in(topo: &Topology, args: &[&str]) -> String {
    let vip = topo.vip();
    let out = Net::exec(&topo.clients, &need("dig", "dnsutils"))
        .args([&format!("@{}", vip.ip()), "-p", &vip.port().to_string()])
        .args(["+notcp", "+ignore", "+tries=1", "+time=2"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn knot_answers_dig_and_dnsperf_through_the_kernel_with_fragmented_answers() {
    knot_through_the_kernel("ulbd", "nat");
}

#[test]
fn knot_answers_through_masquerade_with_fragmented_answers() {
    knot_through_the_kernel("ulbx", "masquerade");
}

#[test]
fn knot_answers_dig_and_dnsperf_over_ipv6_with_fragmented_answers() {
    knot_through_the_kernel("ul6d", "nat6");
}

/// knotd behind a kernel listener forwarding with `forwarding`: dig gets a fragmented answer
/// whole, dnsperf loses nothing. (Masquerade: knotd's host has no route to the clients.)
/// (`forwarding` ending in 6: that method on IPv6.)
fn knot_through_the_kernel(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let forwarding = topo.family_of(forwarding);
    let knot = start_knot(&mut topo);
    if forwarding == "masquerade" {
        topo.without_a_route_to_the_clients();
    }
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [{}]\nforwarding = \"{forwarding}\"\n",
            quoted(knot)
        ),
    );
    if topo.without_the_program() {
        return;
    }
    knot_answers_dig_and_dnsperf(&topo);
    let stats = topo.api("/stats");
    let replies = &stats["kernel"]["listeners"][0]["backends"][0];
    assert!(replies["replies"].as_u64().unwrap_or(0) >= 4, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0);
}

#[test]
fn a_reply_ratio_drops_amplified_answers_and_their_fragments() {
    reply_ratio_holds("ulaa", "nat");
}

#[test]
fn a_reply_ratio_drops_amplified_answers_behind_masquerade() {
    reply_ratio_holds("ulab", "masquerade");
}

#[test]
fn a_reply_ratio_drops_amplified_ipv6_answers_and_their_fragments() {
    reply_ratio_holds("ulac", "nat6");
}

/// A reply ratio counts over the flow's life: each 100-byte request lets its echo (about 150
/// bytes) through at `reply_ratio = 2`, round after round, as the bytes sent add up; udplb's
/// own health checks (replies to the balancer, of no flow) still pass.
#[test]
fn a_reply_ratio_lets_a_long_flow_reply_within_what_it_sent() {
    let Some(mut topo) = Topology::build("ulad") else {
        return;
    };
    topo.start_backends();
    topo.start_udplb("limits = { reply_ratio = 2 }");
    if topo.without_the_program() {
        return;
    }
    let replies = topo.clients_with(2, 20, &[("UDPLB_TEST_KERNEL_SIZE", "100".into())]);
    assert_eq!(replies.len(), 40, "{}", topo.api("/stats")["kernel"]);
    assert!(replies.iter().all(|r| r.1 == topo.vip()));
    assert_eq!(topo.api("/stats")["kernel"]["drops"]["amplification"], 0);
}

/// knotd behind a kernel listener with `limits.reply_ratio = 10`: an A answer (about twice its
/// query) passes, the 3.9 KB TXT answer (about 80 times its query) is dropped as
/// `amplification`, its later fragments with it (none left to the stack).
fn reply_ratio_holds(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let forwarding = topo.family_of(forwarding);
    let knot = start_knot(&mut topo);
    if forwarding == "masquerade" {
        topo.without_a_route_to_the_clients();
    }
    topo.start_udplb_with(
        "limits = { reply_ratio = 10 }",
        &format!(
            "backends = [{}]\nforwarding = \"{forwarding}\"\n",
            quoted(knot)
        ),
    );
    if topo.without_the_program() {
        return;
    }
    assert!(
        wait_for(DEADLINE, || dig_in(&topo, &[&format!("www.{ZONE}"), "A"])
            .contains("192.0.2.10")),
        "no answer through the kernel: {}",
        topo.log()
    );
    let big = dig_in(&topo, &["+bufsize=4096", &format!("big.{ZONE}"), "TXT"]);
    assert!(!big.contains(&"o".repeat(250)), "answered: {big}");
    let stats = topo.api("/stats");
    let kernel = &stats["kernel"];
    assert!(
        kernel["drops"]["amplification"].as_u64() >= Some(1),
        "{kernel}"
    );
    assert_eq!(kernel["fragments_passed"], 0, "{kernel}");
    // Only the queries and the small answers went on: not the big answer's later fragments.
    let backend = &kernel["listeners"][0]["backends"][0];
    for counted in ["bytes", "reply_bytes"] {
        assert!(
            backend[counted].as_u64() < Some(1_000),
            "{counted}: {kernel}"
        );
    }
}

/// knotd behind dsr in GUE (`udplb decap --gue-port` on its host, knotd on the listener's
/// address there): dig gets the fragmented answer whole from the listener's address, straight
/// from knotd's host, and dnsperf loses nothing.
#[test]
fn knot_answers_dig_and_dnsperf_through_dsr_in_gue() {
    let Some(mut topo) = Topology::build("ulgk") else {
        return;
    };
    topo.gue = Some(6080);
    if topo.dsr_backend_host_serving(false).is_none() {
        return;
    }
    let vip = topo.vip();
    start_knot_on(&mut topo, vip);
    let backend = SocketAddr::new(topo.backend_ip().parse().unwrap(), vip.port());
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [{}]\n{}",
            quoted(backend),
            topo.dsr_forwarding()
        ),
    );
    if topo.without_the_program() {
        return;
    }
    knot_answers_dig_and_dnsperf(&topo);
    let stats = topo.api("/stats");
    let kernel = &stats["kernel"]["listeners"][0];
    assert_eq!(kernel["encapsulation"], "gue 6080", "{stats}");
    assert!(
        kernel["backends"][0]["datagrams"].as_u64().unwrap_or(0) >= 10_000,
        "{stats}"
    );
    assert_eq!(kernel["backends"][0]["replies"], 0, "{stats}");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0);
    let (taken, in_gue, _) = topo.stop_decap();
    assert!(taken >= 10_000, "{taken}");
    assert_eq!(in_gue, taken);
}

/// Through the topology's listener, knotd (`start_knot`) answers dig, the 3.9 KB answer whole
/// and from the listener's address, and dnsperf loses none of 10,000 queries.
fn knot_answers_dig_and_dnsperf(topo: &Topology) {
    assert!(
        wait_for(DEADLINE, || dig_in(topo, &[&format!("www.{ZONE}"), "A"])
            .contains("192.0.2.10")),
        "no answer through the kernel: {}",
        topo.log()
    );
    // 3.9 KB: three fragments on each link of the path; every one rewritten.
    let big = dig_in(topo, &["+bufsize=4096", &format!("big.{ZONE}"), "TXT"]);
    let flags = big
        .lines()
        .find(|l| l.contains(";; flags:"))
        .unwrap_or_default();
    assert!(!flags.contains(" tc"), "truncated: {big}");
    assert!(big.contains(&"o".repeat(250)), "the whole answer: {big}");
    assert!(
        big.contains(&format!(
            "SERVER: {}#{}",
            topo.vip().ip(),
            topo.vip().port()
        )),
        "{big}"
    );
    // dnsperf from the client host: none lost.
    let queries = topo.net.dir.join("queries.txt");
    let lines: String = (0..100).map(|_| format!("www.{ZONE} A\n")).collect();
    std::fs::write(&queries, lines).unwrap();
    let vip = topo.vip();
    let out = Net::exec(&topo.clients, &need("dnsperf", "dnsperf"))
        .args(["-s", &vip.ip().to_string(), "-p", &vip.port().to_string()])
        .args(["-c", "4", "-n", "100", "-Q", "4000", "-t", "3", "-d"])
        .arg(&queries)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(report.contains("Queries completed:    10000"), "{report}");
    assert!(report.contains("Queries lost:         0 "), "{report}");
}

/// The lines a helper printed (the test harness prints `test NAME ... ` before the first).
fn helper_lines(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| match l.rsplit_once(" ... ") {
            Some((_, rest)) => rest.to_string(),
            None => l.to_string(),
        })
        .collect()
}

/// One reply the clients' helper printed: client port, reply source, tag, the client address
/// the backend saw.
fn reply_line(line: &str) -> Option<(u16, SocketAddr, String, String)> {
    let mut f = line.split(' ');
    Some((
        f.next()?.parse().ok()?,
        f.next()?.parse().ok()?,
        f.next()?.to_string(),
        f.next()?.to_string(),
    ))
}

/// The replies of each of `n` rounds of `gated_clients`, from the helper's output `text`.
fn gated_rounds(text: &str, n: usize) -> Vec<Vec<(u16, SocketAddr, String, String)>> {
    (0..n)
        .map(|r| {
            helper_lines(text)
                .into_iter()
                .filter_map(|l| reply_line(l.strip_prefix(&format!("round {r} "))?))
                .collect()
        })
        .collect()
}

/// Each client's backend tag, from one round of `replies`.
fn backends_of(replies: &[(u16, SocketAddr, String, String)]) -> HashMap<u16, String> {
    replies
        .iter()
        .map(|(port, _, tag, _)| (*port, tag.clone()))
        .collect()
}

/// A wildcard listener (0.0.0.0, [::]) on the kernel data plane takes the datagrams to any of
/// the balancer's addresses on its port, one added while udplb runs too, and answers each
/// from the address its client sent to (the same client ports to a second address: from that
/// one), with nat the backends seeing the clients; what passes through the balancer to
/// another host on that port is forwarded, not taken.
#[test]
fn a_wildcard_listener_answers_from_the_address_each_client_sent_to() {
    wildcard_listener("ulwn", "nat");
}

#[test]
fn ipv6_a_wildcard_listener_answers_from_the_address_each_client_sent_to() {
    wildcard_listener("ulw6", "nat6");
}

#[test]
fn a_wildcard_listener_behind_masquerade_answers_from_the_address_each_client_sent_to() {
    wildcard_listener("ulwm", "masquerade");
}

fn wildcard_listener(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let method = topo.family_of(forwarding);
    let t = topo.t;
    let (second, third, any, len) = if topo.v6 {
        (
            format!("fd00:99:{t}::2"),
            format!("fd00:99:{t}::3"),
            "[::]",
            128,
        )
    } else {
        (
            format!("10.99.{t}.2"),
            format!("10.99.{t}.3"),
            "0.0.0.0",
            32,
        )
    };
    let balancer = topo.balancer.clone();
    let add_address = |addr: &str| {
        ip(&[
            "-n",
            &balancer,
            "addr",
            "add",
            &format!("{addr}/{len}"),
            "dev",
            "lo",
        ])
        .unwrap();
    };
    add_address(&second);
    topo.start_backends();
    // The backend host's own service on the listener's port (tag f), which clients reach
    // through the balancer.
    let own = SocketAddr::new(topo.backend_ip().parse().unwrap(), 5300);
    let backends = topo.backends.clone();
    topo.start_echo(&backends, own, "f");
    topo.listen = Some(format!("{any}:5300").parse().unwrap());
    topo.start_udplb_forwarding("", method);
    if topo.without_the_program() {
        return;
    }
    let first = topo.vip();
    let second = SocketAddr::new(second.parse().unwrap(), 5300);
    // The same 30 client ports to the first address, then to the second.
    let control = topo.net.dir.join("rounds");
    std::fs::create_dir_all(&control).unwrap();
    let helper = Net::helper(
        &topo.clients,
        "kernel_clients_in_namespace",
        &[
            ("UDPLB_TEST_KERNEL_TARGET", first.to_string()),
            ("UDPLB_TEST_KERNEL_TARGETS", format!("{first},{second}")),
            ("UDPLB_TEST_KERNEL_CLIENTS", "30".to_string()),
            ("UDPLB_TEST_KERNEL_ROUNDS", "2".to_string()),
            ("UDPLB_TEST_KERNEL_GATE", control.display().to_string()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    assert!(
        wait_for(DEADLINE, || control.join("done-0").exists()),
        "round 0 did not end"
    );
    std::fs::write(control.join("go-1"), "").unwrap();
    let out = helper.wait_with_output().unwrap();
    let rounds = gated_rounds(&String::from_utf8_lossy(&out.stdout), 2);
    let client_ip: std::net::IpAddr = topo.client_ip().parse().unwrap();
    for (round, to) in [first, second].iter().enumerate() {
        let replies = &rounds[round];
        assert_eq!(
            replies.len(),
            30,
            "round {round} to {to}: {replies:?}\n{}",
            topo.api("/stats")["kernel"]
        );
        for (port, from, _, seen) in replies {
            assert_eq!(from, to, "client {port}'s reply in round {round}");
            let seen: SocketAddr = seen.parse().unwrap();
            if method == "nat" {
                assert_eq!(seen, SocketAddr::new(client_ip, *port), "the backend saw");
            } else {
                assert_eq!(seen.ip(), topo.balancer_ip(), "the backend saw");
            }
        }
    }
    let stats = topo.api("/stats");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
    // Each client has a flow per address it sent to; explain finds one of them where the
    // client was placed.
    assert!(
        wait_for(DEADLINE, || topo.kernel_flows().values().sum::<u64>() == 60),
        "live kernel flows: {:?}",
        topo.kernel_flows()
    );
    let (port, _, tag, _) = &rounds[1][0];
    let explained = topo.api(&format!(
        "/api/v1/explain?client={}",
        SocketAddr::new(client_ip, *port)
    ));
    let placed = explained["flow"]["backend"].as_str().unwrap_or_default();
    let tags = ["x", "y", "z"];
    assert!(
        (0..3).any(|i| topo.backend_addr(i).to_string() == placed && tags[i] == tag),
        "explain: {explained}"
    );
    if method == "nat" {
        // On its way to another host: forwarded to it, which answers from its own address.
        let through = topo.clients_with(3, 1, &[("UDPLB_TEST_KERNEL_TARGET", own.to_string())]);
        assert_eq!(through.len(), 3, "{through:?}");
        assert!(
            through
                .iter()
                .all(|(_, from, tag, _)| *from == own && tag == "f"),
            "{through:?}"
        );
    }
    // An address added while udplb runs: the kernel takes it within a second or so (until
    // then udplb's socket serves it).
    add_address(&third);
    let third = SocketAddr::new(third.parse().unwrap(), 5300);
    let socket_datagrams = || topo.api("/stats")["listeners"][0]["datagrams_in"].as_u64();
    assert!(
        wait_for(DEADLINE, || {
            let before = socket_datagrams();
            let replies =
                topo.clients_with(1, 1, &[("UDPLB_TEST_KERNEL_TARGET", third.to_string())]);
            replies.len() == 1 && replies[0].1 == third && socket_datagrams() == before
        }),
        "the kernel did not take the address added: {}",
        topo.api("/stats")
    );
}

#[test]
fn a_dead_backend_leaves_rotation_and_a_drained_one_keeps_its_flows() {
    dead_and_drained_backends("ulbh", false);
}

#[test]
fn ipv6_a_dead_backend_leaves_rotation_and_a_drained_one_keeps_its_flows() {
    dead_and_drained_backends("ul6h", true);
}

fn dead_and_drained_backends(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    let pids = topo.start_backends();
    topo.start_udplb("");
    if topo.without_the_program() {
        return;
    }
    // Long-lived flows: the clients' helper keeps its sockets for the whole run; the test
    // changes the pool between rounds through files the helper waits on.
    let (control, helper) = topo.gated_clients(60, 3);
    let round_done = |n: usize| control.join(format!("done-{n}")).exists();
    let go = |n: usize| std::fs::write(control.join(format!("go-{n}")), "").unwrap();
    assert!(wait_for(DEADLINE, || round_done(0)), "round 0");
    // Backend y drained: its flows stay, no new ones.
    let drained = topo.backend_addr(1);
    topo.change_backend("POST", &format!("{drained}/drain"), "");
    // Backend z killed: out of rotation once its checks fail (fall = 2, every 200 ms).
    signal(pids[2], "KILL");
    assert!(
        wait_for(
            DEADLINE,
            || topo.api("/stats")["pools"][0]["backends"][2]["healthy"] == false
        ),
        "z never went down"
    );
    topo.wait_for_the_maps();
    go(1);
    assert!(wait_for(DEADLINE, || round_done(1)), "round 1");
    go(2);
    let out = helper.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rounds = gated_rounds(&text, 3);
    let (before, after) = (backends_of(&rounds[0]), backends_of(&rounds[1]));
    assert_eq!(before.len(), 60, "{text}");
    assert_eq!(after.len(), 60, "{text}\n{}", topo.log());
    for (port, was) in &before {
        let now = &after[port];
        match was.as_str() {
            // Draining keeps established flows; the dead backend's move to the living.
            "y" | "x" => assert_eq!(now, was, "client {port} moved off {was}"),
            "z" => assert!(now == "x" || now == "y", "client {port} still on z: {now}"),
            other => panic!("{other}"),
        }
    }
    assert!(before.values().any(|t| t == "z") && before.values().any(|t| t == "y"));
    // New clients go to x only: y drains and z is dead. (A new socket that got the port of
    // one of the first clients continues that client's flow: left out.)
    let fresh: Vec<_> = topo
        .clients(30, 1)
        .into_iter()
        .filter(|(port, ..)| !before.contains_key(port))
        .collect();
    assert!(
        fresh.iter().all(|(_, _, tag, _)| tag == "x"),
        "{fresh:?}\n{}\n{}\n{}",
        topo.api(&format!(
            "/api/v1/explain?client={}",
            SocketAddr::new(topo.client_ip().parse().unwrap(), fresh[1].0)
        )),
        topo.api("/stats")["pools"],
        topo.api("/stats")["kernel"]
    );
}

#[test]
fn a_flow_keeps_its_backend_while_it_sends_and_is_placed_anew_once_idle() {
    flows_idle_out("ulfi", false);
}

#[test]
fn ipv6_a_flow_keeps_its_backend_while_it_sends_and_is_placed_anew_once_idle() {
    flows_idle_out("ul6i", true);
}

/// 60 flows placed, backend y drained: its flows stay on it while their clients keep
/// sending within the idle timeout (the flow table's lookups and refreshes), and leave it once
/// idle longer (its expiry), for backends that take new flows.
fn flows_idle_out(prefix: &str, v6: bool) {
    const IDLE: Duration = Duration::from_secs(2);
    let Some(topo) = Topology::serving(prefix, v6, "idle_timeout = \"2s\"") else {
        return;
    };
    let (control, helper) = topo.gated_clients(60, 4);
    let round_done = |n: usize| control.join(format!("done-{n}")).exists();
    let go = |n: usize| std::fs::write(control.join(format!("go-{n}")), "").unwrap();
    assert!(wait_for(DEADLINE, || round_done(0)), "round 0");
    let drained = topo.backend_addr(1);
    topo.change_backend("POST", &format!("{drained}/drain"), "");
    topo.wait_for_the_maps();
    // Rounds 1 and 2 within the idle timeout of each other: still live.
    let live = Instant::now();
    go(1);
    assert!(wait_for(DEADLINE, || round_done(1)), "round 1");
    go(2);
    assert!(wait_for(DEADLINE, || round_done(2)), "round 2");
    assert!(
        live.elapsed() < IDLE,
        "rounds 1 and 2 took {:?}",
        live.elapsed()
    );
    // The operator sees those 60 flows live, per backend, while they are (a count is
    // served for up to a second).
    let mut counted = HashMap::new();
    wait_for(Duration::from_millis(1500), || {
        counted = topo.kernel_flows();
        counted.values().sum::<u64>() == 60
    });
    // Round 3 after the idle timeout (and its millisecond-grained clock) has passed.
    std::thread::sleep(IDLE + Duration::from_millis(500));
    // (Counted about once a second: the count made after they idled out shows none.)
    let mut after_idle = HashMap::new();
    wait_for(Duration::from_secs(5), || {
        after_idle = topo.kernel_flows();
        after_idle.is_empty()
    });
    go(3);
    let out = helper.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rounds = gated_rounds(&text, 4);
    let placed = backends_of(&rounds[0]);
    assert_eq!(placed.len(), 60, "{text}");
    assert!(placed.values().any(|t| t == "y"), "{placed:?}");
    for (r, replies) in rounds.iter().enumerate().take(3).skip(1) {
        assert_eq!(
            backends_of(replies),
            placed,
            "round {r} moved flows\n{}",
            topo.log()
        );
    }
    let mut on: HashMap<String, u64> = HashMap::new();
    for tag in placed.values() {
        *on.entry(tag.clone()).or_default() += 1;
    }
    assert_eq!(
        counted, on,
        "live kernel flows per backend, within the idle timeout"
    );
    assert!(
        after_idle.is_empty(),
        "flows idle beyond the timeout still counted live: {after_idle:?}"
    );
    let idle = backends_of(&rounds[3]);
    assert_eq!(idle.len(), 60, "{text}");
    for (port, was) in &placed {
        let now = &idle[port];
        assert!(
            now != "y",
            "client {port} (was on {was}) still on the drained backend after idling"
        );
    }
}

#[test]
fn persistence_keeps_a_client_on_its_backend_while_that_takes_new_clients() {
    persistence_keeps_clients("ulpa", false);
}

#[test]
fn ipv6_persistence_keeps_a_client_on_its_backend_while_that_takes_new_clients() {
    persistence_keeps_clients("ulpb", true);
}

/// Persistence by client address: a client's new flows return to the backend it used after
/// the Maglev table has moved it elsewhere, until that backend is drained.
fn persistence_keeps_clients(prefix: &str, v6: bool) {
    let Some(topo) = Topology::serving(prefix, v6, "affinity = \"ip\"\npersistence = \"60s\"")
    else {
        return;
    };
    let tag_of = |addr: &str| {
        (0..3)
            .find(|&i| topo.backend_addr(i).to_string() == addr)
            .map(|i| ["x", "y", "z"][i].to_string())
            .unwrap_or_else(|| panic!("no backend {addr}"))
    };
    let explain = || {
        let client = SocketAddr::new(topo.client_ip().parse().unwrap(), 40_000);
        topo.api(&format!("/api/v1/explain?client={client}"))
    };
    // Where the table places a new client (persistence aside).
    let placed_now = || {
        let explain = explain();
        explain["table_backend"]
            .as_str()
            .or(explain["backend"].as_str())
            .unwrap_or_else(|| panic!("{explain}"))
            .to_string()
    };
    let change = |method: &str, path: String, body: &str| {
        topo.change_backend(method, &path, body);
        topo.wait_for_the_maps();
    };
    // Every port of the client on one backend (IP affinity), which is remembered.
    let first = topo.clients(10, 1);
    assert_eq!(first.len(), 10, "{first:?}");
    let kept = first[0].2.clone();
    assert!(first.iter().all(|c| c.2 == kept), "{first:?}");
    let kept_addr = (0..3)
        .map(|i| topo.backend_addr(i))
        .find(|a| tag_of(&a.to_string()) == kept)
        .unwrap();
    // Its backend's weight cut to 1 against 10,000: the table now places the client elsewhere
    // (but for about 3 slots in 65,537, which the wait below would show)...
    for i in 0..3 {
        let weight = if topo.backend_addr(i) == kept_addr {
            1
        } else {
            10_000
        };
        change(
            "PUT",
            format!("{}/weight", topo.backend_addr(i)),
            &format!("{{\"weight\": {weight}}}"),
        );
    }
    // (Explain names the kept backend too while the others fail a check: waited out.)
    assert!(
        wait_for(DEADLINE, || placed_now() != kept_addr.to_string()),
        "the table still places it there: {}\n{}",
        explain(),
        topo.api("/stats")["pools"]
    );
    let elsewhere = placed_now();
    // Explain reads the program's persistence map: the client goes back to its backend.
    let said = explain();
    assert_eq!(
        (said["remembered"].as_str(), said["backend"].as_str()),
        (
            Some(kept_addr.to_string().as_str()),
            Some(kept_addr.to_string().as_str())
        ),
        "{said}"
    );
    // ... but its new flows (new ports) return to the backend it used.
    let seen: std::collections::HashSet<u16> = first.iter().map(|c| c.0).collect();
    let second = topo.clients(10, 1);
    assert_eq!(second.len(), 10, "{second:?}");
    assert!(
        second.iter().all(|c| c.2 == kept),
        "persistence on {kept}, the table on {elsewhere}: {second:?}\n{}",
        topo.api("/stats")["kernel"]
    );
    // Counted: at least the second round's new flows (a reused port continues its flow).
    let returns: u64 = topo.api("/stats")["kernel"]["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["address"] == kept_addr.to_string())
        .map(|b| b["persistence_returns"].as_u64().unwrap())
        .sum();
    assert!(returns >= 10, "{returns} returns counted");
    // Drained, that backend takes no new clients: new flows go where the table says, and are
    // remembered there.
    change("POST", format!("{kept_addr}/drain"), "");
    let now = tag_of(&placed_now());
    assert_ne!(now, kept);
    let seen: std::collections::HashSet<u16> =
        seen.into_iter().chain(second.iter().map(|c| c.0)).collect();
    let third: Vec<_> = topo
        .clients(10, 1)
        .into_iter()
        .filter(|c| !seen.contains(&c.0))
        .collect();
    assert!(!third.is_empty());
    assert!(third.iter().all(|c| c.2 == now), "to {now}: {third:?}");
}

#[test]
fn datagram_mode_with_persistence_keeps_each_client_on_one_backend() {
    datagram_persistence("ulpc", false);
}

#[test]
fn ipv6_datagram_mode_with_persistence_keeps_each_client_on_one_backend() {
    datagram_persistence("ulpd", true);
}

/// Datagram mode spreads every datagram (`datagram_mode_spreads`), unless persistence keeps
/// each client (ip:port) on the backend it was first given.
fn datagram_persistence(prefix: &str, v6: bool) {
    let Some(topo) = Topology::serving(prefix, v6, "mode = \"datagram\"\npersistence = \"60s\"")
    else {
        return;
    };
    // Four clients in turn, a datagram each per round: without persistence the round robin
    // would give each client the next backend every round (4 = 1 mod 3).
    let replies = topo.clients_with(4, 20, &[("UDPLB_TEST_KERNEL_CPU", "0".into())]);
    assert_eq!(replies.len(), 80);
    let mut per_client: HashMap<u16, std::collections::HashSet<String>> = HashMap::new();
    for (port, from, tag, _) in &replies {
        assert_eq!(*from, topo.vip());
        per_client.entry(*port).or_default().insert(tag.clone());
    }
    assert_eq!(per_client.len(), 4);
    for (port, tags) in &per_client {
        assert_eq!(tags.len(), 1, "client {port} spread over {tags:?}");
    }
}

/// `[sync]` with a kernel listener: its new flows (told by the program) and its live ones
/// (read from the flow table, a part per interval) reach a peer, whose own table places the
/// same clients otherwise, and a client the peer placed opens its kernel flow where the peer
/// had it. The peer is a socket-path udplb on the same host with other weights.
#[test]
fn sync_shares_the_kernel_flows_with_a_peer_both_ways() {
    sync_shares_the_kernel_flows("ulsy", false, false);
}

/// The same on IPv6.
#[test]
fn ipv6_sync_shares_the_kernel_flows_with_a_peer_both_ways() {
    sync_shares_the_kernel_flows("ul6s", true, false);
}

/// The same, udplb restarted (its maps pinned) once it has learned the peer's flows, and the
/// peer stopped before: the restarted program still opens each of the peer's flows where the
/// peer had it, from the map it kept.
#[test]
fn what_udplb_learned_of_its_peers_flows_survives_a_restart() {
    sync_shares_the_kernel_flows("ulsr", false, true);
}

/// `restart`: udplb is restarted, its maps pinned, between learning the peer's flows and
/// serving them (the peer stopped first).
fn sync_shares_the_kernel_flows(prefix: &str, v6: bool, restart: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    topo.start_backends();
    let dir = topo.net.dir.clone();
    let bpf = dir.join("bpf");
    let _fs = restart.then(|| BpfFs::mount(bpf.clone()));
    let key = dir.join("sync.key");
    std::fs::write(&key, "the-key-both-balancers-share\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let backends: Vec<String> = (0..3).map(|i| quoted(topo.backend_addr(i))).collect();
    let sync = |me: &str, peer: &str| {
        format!(
            "[sync]\nlisten = \"{me}:7946\"\npeers = [\"{peer}:7946\"]\nkey_file = \"{}\"\n\
             interval = \"50ms\"\n",
            key.display()
        )
    };
    let health = udp_check(200, 200, 1, 2);
    let runtime = if restart {
        format!(
            "[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n",
            bpf.join("udplb").display()
        )
    } else {
        String::new()
    };
    let pool = format!(
        "backends = [{}]\n[pools.p.health]\n{health}\n{}{runtime}",
        backends.join(", "),
        sync("127.0.0.1", "127.0.0.2")
    );
    let udplb_pid = topo.start_udplb_with("idle_timeout = \"3s\"", &pool);
    if topo.without_the_program() {
        return;
    }
    // The peer: the same listener name on the socket path, the third backend weighted 8.
    let peer_listen: SocketAddr = if v6 {
        format!("[fd00:97:{}::1]:5301", topo.t)
    } else {
        format!("10.97.{}.1:5301", topo.t)
    }
    .parse()
    .unwrap();
    let weighted: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "{{ address = {}, weight = {} }}",
                quoted(topo.backend_addr(i)),
                if i == 2 { 8 } else { 1 }
            )
        })
        .collect();
    let peer_toml = format!(
        "[admin]\nlisten = \"127.0.0.1:9191\"\n[listeners.l]\naddress = \"{peer_listen}\"\n\
         pool = \"p\"\nidle_timeout = \"10s\"\n[pools.p]\nscheduler = \"maglev\"\n\
         backends = [{}]\n[pools.p.health]\n{health}\n{}",
        weighted.join(", "),
        sync("127.0.0.2", "127.0.0.1")
    );
    let peer_config = dir.join("peer.toml");
    std::fs::write(&peer_config, peer_toml).unwrap();
    let peer_log = dir.join("peer.log");
    let child = Net::udplb(&topo.balancer, &peer_config, &peer_log)
        .spawn()
        .unwrap();
    let peer_pid = topo.net.keep(child);
    let peer_api = |path: &str| -> serde_json::Value {
        let out = Net::exec(&topo.balancer, Path::new("curl"))
            .args(["-s", "-g", &format!("127.0.0.1:9191{path}")])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    assert!(
        wait_for(DEADLINE, || peer_api("/stats")["pools"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().all(|b| b["healthy"] == true))),
        "the peer did not come up: {}",
        std::fs::read_to_string(&peer_log).unwrap_or_default()
    );
    let n = 60;
    let client_ip = topo.client_ip();
    let tag_of = |addr: &serde_json::Value| {
        (0..3)
            .find(|&i| addr.as_str() == Some(&topo.backend_addr(i).to_string()))
            .map_or("?".to_string(), |i| ["x", "y", "z"][i].to_string())
    };
    let explain = |api: &dyn Fn(&str) -> serde_json::Value, port: u16| {
        let client = SocketAddr::new(client_ip.parse().unwrap(), port);
        api(&format!("/api/v1/explain?client={client}&listener=l"))
    };
    // Where each client's flow opens on an instance by that instance's own table.
    let own_pick = |api: &dyn Fn(&str) -> serde_json::Value, port: u16| -> String {
        let v = explain(api, port);
        tag_of(if v["table_backend"].is_null() {
            &v["backend"]
        } else {
            &v["table_backend"]
        })
    };
    // Explain names the peer's flow, and a new flow going there.
    let explains_the_peer = |api: &dyn Fn(&str) -> serde_json::Value,
                             placed: &HashMap<u16, String>| {
        for (port, tag) in placed {
            let v = explain(api, *port);
            assert_eq!(
                (tag_of(&v["peer"]), tag_of(&v["backend"])),
                (tag.clone(), tag.clone()),
                "{v}"
            );
        }
    };
    let sent = |api: &dyn Fn(&str) -> serde_json::Value| api("/stats")["sync"]["sent"].as_u64();
    let held =
        |api: &dyn Fn(&str) -> serde_json::Value| api("/stats")["sync"]["placements"].as_u64();
    let ours = |path: &str| topo.api(path);
    let run = |targets: &[SocketAddr], rounds: usize, gate: &Path| {
        std::fs::create_dir_all(gate).unwrap();
        let list: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        Net::helper(
            &topo.clients,
            "kernel_clients_in_namespace",
            &[
                ("UDPLB_TEST_KERNEL_TARGET", topo.vip().to_string()),
                ("UDPLB_TEST_KERNEL_TARGETS", list.join(",")),
                ("UDPLB_TEST_KERNEL_CLIENTS", n.to_string()),
                ("UDPLB_TEST_KERNEL_ROUNDS", rounds.to_string()),
                ("UDPLB_TEST_KERNEL_GATE", gate.display().to_string()),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    };
    let round_done = |gate: &Path, r: usize| {
        assert!(
            wait_for(DEADLINE, || gate.join(format!("done-{r}")).exists()),
            "round {r} did not end"
        );
    };

    // The kernel's flows to the peer: new ones at once, live ones renewed within an idle
    // timeout (a second round keeps them live and opens none).
    let gate = dir.join("export");
    let helper = run(&[topo.vip(), topo.vip(), peer_listen], 3, &gate);
    round_done(&gate, 0);
    // Told by the program as they open, not left to the renewals (a third of the table a
    // second here).
    assert!(
        wait_for(Duration::from_millis(1500), || held(&peer_api)
            >= Some(n as u64)),
        "the peer learned {:?} of {n} kernel flows; udplb: {}",
        held(&peer_api),
        ours("/stats")["sync"]
    );
    std::fs::write(gate.join("go-1"), "").unwrap();
    round_done(&gate, 1);
    assert!(
        wait_for(Duration::from_secs(8), || sent(&ours) >= Some(2 * n as u64)),
        "the live kernel flows were not renewed: {}",
        ours("/stats")["sync"]
    );
    std::fs::write(gate.join("go-2"), "").unwrap();
    let out = helper.wait_with_output().unwrap();
    let rounds = gated_rounds(&String::from_utf8_lossy(&out.stdout), 3);
    let (kernel, peer) = (backends_of(&rounds[0]), backends_of(&rounds[2]));
    assert_eq!(kernel.len(), n, "{rounds:?}");
    assert_eq!(peer, kernel, "the peer opened the kernel's flows elsewhere");
    let moved = kernel
        .iter()
        .filter(|(port, tag)| own_pick(&peer_api, **port) != **tag)
        .count();
    assert!(
        moved > 0,
        "the peer's own table places every client as the kernel's did: the test shows nothing"
    );
    assert!(
        peer_api("/stats")["sync"]["used"].as_u64() >= Some(moved as u64),
        "{}",
        peer_api("/stats")["sync"]
    );
    explains_the_peer(&peer_api, &kernel);

    // The peer's flows to the kernel: new clients placed by the peer first, until udplb's
    // explain names a peer's flow for each (the program's map, as the program reads it).
    let gate = dir.join("import");
    let helper = run(&[peer_listen, topo.vip()], 2, &gate);
    round_done(&gate, 0);
    let first = std::fs::read_to_string(gate.join("done-0")).unwrap();
    let placed = backends_of(&gated_rounds(&first, 1)[0]);
    assert_eq!(placed.len(), n, "{first}");
    assert!(
        wait_for(DEADLINE, || placed
            .keys()
            .all(|&port| !explain(&ours, port)["peer"].is_null())),
        "udplb learned {:?} of the peer's {n} flows: {}",
        held(&ours),
        peer_api("/stats")["sync"]
    );
    // With `restart`, the restarted udplb (stopped at the end, or by the namespaces' end).
    let restarted = restart.then(|| {
        signal(peer_pid, "TERM");
        assert!(wait_for(DEADLINE, || gone(peer_pid)));
        signal(udplb_pid, "TERM");
        assert!(wait_for(DEADLINE, || gone(udplb_pid)));
        let child = Net::udplb(
            &topo.balancer,
            &dir.join("udplb.toml"),
            &dir.join("udplb.log"),
        )
        .spawn()
        .unwrap();
        topo.wait_until_up();
        assert!(
            topo.log().contains("the flow map is kept there"),
            "{}",
            topo.log()
        );
        child
    });
    std::fs::write(gate.join("go-1"), "").unwrap();
    let out = helper.wait_with_output().unwrap();
    let rounds = gated_rounds(&String::from_utf8_lossy(&out.stdout), 2);
    let (peer, kernel) = (backends_of(&rounds[0]), backends_of(&rounds[1]));
    assert_eq!(peer.len(), n, "{rounds:?}");
    assert_eq!(
        kernel,
        peer,
        "the kernel opened the peer's flows elsewhere: {}",
        ours("/stats")["sync"]
    );
    let moved = peer
        .iter()
        .filter(|(port, tag)| own_pick(&ours, **port) != **tag)
        .count();
    assert!(
        moved > 0,
        "udplb's own table places every client as the peer did"
    );
    explains_the_peer(&ours, &peer);
    assert!(
        ours("/stats")["sync"]["used"].as_u64() >= Some(moved as u64),
        "{}",
        ours("/stats")["sync"]
    );
    if let Some(mut child) = restarted {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn datagram_mode_spreads_every_datagram_exactly() {
    datagram_mode_spreads("ulbg", "nat");
}

#[test]
fn datagram_mode_spreads_exactly_behind_masquerade_one_port_per_backend() {
    datagram_mode_spreads("ulbw", "masquerade");
}

#[test]
fn ipv6_datagram_mode_spreads_exactly_behind_masquerade_one_port_per_backend() {
    datagram_mode_spreads("ul6g", "masquerade6");
}

/// (`forwarding` ending in 6: that method on IPv6.)
fn datagram_mode_spreads(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let forwarding = topo.family_of(forwarding);
    topo.start_backends();
    topo.start_udplb_forwarding("mode = \"datagram\"", forwarding);
    if topo.without_the_program() {
        return;
    }
    // One client, 300 datagrams: round robin over three backends, 100 each. (Each CPU deals
    // the schedule out on its own: the client stays on one, where its datagrams are handled.)
    let replies = topo.clients_with(1, 300, &[("UDPLB_TEST_KERNEL_CPU", "0".into())]);
    assert_eq!(replies.len(), 300);
    let mut per: HashMap<String, usize> = HashMap::new();
    let mut seen_as: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for (_, from, tag, seen) in &replies {
        assert_eq!(*from, topo.vip());
        *per.entry(tag.clone()).or_default() += 1;
        seen_as.entry(tag.clone()).or_default().insert(seen.clone());
    }
    let expected: HashMap<String, usize> = ["x", "y", "z"]
        .iter()
        .map(|t| (t.to_string(), 100))
        .collect();
    assert_eq!(per, expected);
    // Each backend saw the client as one address and port throughout (masquerade: the
    // balancer's, one port per client and backend).
    for (tag, seen) in &seen_as {
        assert_eq!(seen.len(), 1, "backend {tag} saw {seen:?}");
        if forwarding == "masquerade" {
            let seen: SocketAddr = seen.iter().next().unwrap().parse().unwrap();
            assert_eq!(seen.ip(), topo.balancer_ip(), "backend {tag} saw {seen}");
            assert!(seen.port() >= 61_000, "backend {tag} saw {seen}");
        }
    }
}

#[test]
fn a_kernel_listener_that_cannot_load_is_refused_with_the_reason() {
    if !is_root() {
        eprintln!("skipped: runs udplb check as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir("kernel-check");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.join("udplb.toml");
    let toml = "[listeners.l]\naddress = \"192.0.2.1:5300\"\npool = \"p\"\n{}\n\
                [pools.p]\nbackends = [\"10.0.0.1:53\"]\n";
    let (uid, gid) = nobody();
    let check = |dataplane: &str| {
        std::fs::write(
            &config,
            toml.replace("{}", &format!("dataplane = \"{dataplane}\"")),
        )
        .unwrap();
        udplb_command()
            .args(["check", "-c"])
            .arg(&config)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap()
    };
    let out = check("kernel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("udplb.toml:4:")
            && stderr.contains("listeners.l.dataplane")
            && (stderr.contains("needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")
                || stderr.contains("built without the kernel data plane")),
        "{stderr}"
    );
    // "auto" serves with sockets where the kernel cannot: nothing to refuse.
    let out = check("auto");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Started as another user than root (which cannot load the program), `--dataplane auto`
/// serves with sockets, on IPv4 and IPv6: it keeps none of the kernel data plane's
/// capabilities, which it was never given.
#[test]
fn dataplane_auto_without_privileges_serves_with_sockets() {
    if !is_root() {
        eprintln!("skipped: starts udplb as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let (uid, gid) = nobody();
    for ip in ["127.0.0.1", "::1"] {
        let backend = Backend::start(ip, "a");
        let listen = listen_addr(ip);
        let log = scratch_dir("kernel-auto-nobody").join(format!("udplb-{}.log", listen.is_ipv6()));
        let mut child = udplb_command()
            .args(["--dataplane", "auto"])
            .arg(listen.to_string())
            .arg(backend.addr.to_string())
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let c = client(if listen.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        });
        let mut buf = [0u8; 512];
        let answered = wait_for(DEADLINE, || {
            c.send_to(b"hi", listen).unwrap();
            c.recv_from(&mut buf).is_ok()
        });
        let _ = child.kill();
        let _ = child.wait();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(answered, "no answer from {listen}: {said}");
        assert!(said.contains("serves with sockets"), "{said}");
        // One clear line: nothing about forwarding or the bpf file system of a kernel data
        // plane that does not run.
        assert_eq!(said.matches("kernel data plane").count(), 1, "{said}");
        assert!(said.contains("neither root nor CAP_BPF"), "{said}");
    }
}

/// udplb as systemd's unit runs it: never root, started as another user (nobody) with the
/// capabilities the kernel data plane needs as ambient ones. It loads and forwards. A pin
/// directory that user cannot write (root's) costs only the flows' survival across restarts,
/// said once with the user and what to do; given to the user, the flow map is kept there.
#[test]
fn the_kernel_data_plane_runs_as_a_user_with_its_capabilities() {
    let Some(mut topo) = Topology::build("ulcp") else {
        return;
    };
    need("setpriv", "util-linux");
    topo.start_backends();
    let bpf = topo.net.dir.join("bpf");
    let _fs = BpfFs::mount(bpf.clone());
    let dir = bpf.join("udplb");
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = format!(
        "[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n",
        dir.display()
    );
    let pool = format!(
        "backends = [{}]\n{runtime}",
        (0..3)
            .map(|i| quoted(topo.backend_addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let as_nobody = |ns: &str, config: &Path, log: &Path| {
        let caps = "+bpf,+perfmon,+net_admin";
        let mut c = Net::exec(ns, Path::new("setpriv"));
        c.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
            .args(["--inh-caps", caps, "--ambient-caps", caps])
            .arg(env!("CARGO_BIN_EXE_udplb"))
            .args(["run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        c
    };
    for (round, kept) in [(0, false), (1, true)] {
        if kept {
            let (uid, gid) = nobody();
            let owner = (Some(uid.into()), Some(gid.into()));
            for p in walk(&dir) {
                nix::unistd::chown(&p, owner.0, owner.1).unwrap();
            }
        }
        let pid = topo.start_udplb_by("", &pool, as_nobody);
        if topo.without_the_program() {
            return;
        }
        assert_eq!(
            status_field(pid, "Uid").first().map(String::as_str),
            Some(nobody().0.to_string().as_str())
        );
        let replies = topo.clients(10, 2);
        let stats = topo.api("/stats");
        assert_eq!(replies.len(), 20, "round {round}: {}", topo.log());
        assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
        let log = topo.log();
        if kept {
            assert!(log.contains("the flow map is kept there"), "{log}");
            assert!(!log.contains("not kept"), "{log}");
        } else {
            assert!(
                log.contains("the flow map is not kept across restarts"),
                "{log}"
            );
            assert!(log.contains("user nobody"), "{log}");
            assert!(log.contains("chown -R nobody"), "{log}");
        }
        signal(pid, "TERM");
        assert!(wait_for(DEADLINE, || gone(pid)));
    }
}

/// `dir` and what is in it, two levels down.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        let inner = std::fs::read_dir(e.path()).into_iter().flatten().flatten();
        out.extend(inner.map(|f| f.path()));
    }
    out
}

/// A bpf file system mounted for the test (unmounted when dropped).
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount(dir: std::path::PathBuf) -> BpfFs {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount -t bpf");
        BpfFs(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Whether process `pid` has exited with all its threads (its main thread shows as a zombie
/// while the others are still being torn down, holding its sockets, the admin port among
/// them): reaped, or a zombie with no other thread left.
fn gone(pid: u32) -> bool {
    let zombie =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "));
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    zombie && threads <= 1
}

/// Clients placed over two backends; udplb restarted with a third (a new process, a new
/// Maglev table); returns how many of 60 clients changed backend, and the restarted udplb's
/// log. `pinned`: the flow map on a bpf file system (else on a plain directory).
fn restart_with_a_new_backend(
    prefix: &str,
    pinned: bool,
    upgrade: bool,
    user: &str,
) -> Option<(usize, String)> {
    let mut topo = Topology::build(prefix)?;
    // A prefix ending in 6: on IPv6.
    if prefix.ends_with('6') {
        topo.ipv6();
    }
    topo.start_backends();
    let bpf = topo.net.dir.join("bpf");
    let _fs = pinned.then(|| BpfFs::mount(bpf.clone()));
    let listener = "idle_timeout = \"60s\"";
    let addrs: Vec<String> = (0..3).map(|i| quoted(topo.backend_addr(i))).collect();
    let pool = |n: usize| format!("backends = [{}]\n", addrs[..n].join(", "));
    // `user` empty: udplb stays root (UDPLB_ALLOW_ROOT); else it switches to that user.
    let runtime = format!(
        "[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n{}",
        bpf.join("udplb").display(),
        if user.is_empty() {
            String::new()
        } else {
            format!("user = \"{user}\"\n")
        }
    );
    let first = topo.start_udplb_with(listener, &(pool(2) + &runtime));
    if topo.without_the_program() {
        return None;
    }
    let (control, helper) = topo.gated_clients(60, 2);
    assert!(
        wait_for(DEADLINE, || control.join("done-0").exists()),
        "round 0"
    );
    if upgrade {
        // An upgrade (SIGUSR2): the successor reads the file, now with a third backend.
        let toml = std::fs::read_to_string(topo.net.dir.join("udplb.toml")).unwrap();
        std::fs::write(
            topo.net.dir.join("udplb.toml"),
            toml.replace(&pool(2), &pool(3)),
        )
        .unwrap();
        signal(first, "USR2");
        assert!(
            wait_for(DEADLINE, || topo.api("/stats")["pid"]
                .as_u64()
                .is_some_and(|p| p != u64::from(first))),
            "no successor: {}",
            topo.log()
        );
        topo.wait_for_the_maps();
        // Until the old process is gone, its program (attached first) serves: wait for it.
        assert!(wait_for(DEADLINE, || gone(first)));
    } else {
        // A restart: the old process exits (its program detached), a new one starts with a
        // third backend.
        signal(first, "TERM");
        assert!(wait_for(DEADLINE, || gone(first)));
        topo.start_udplb_with(listener, &(pool(3) + &runtime));
    }
    std::fs::write(control.join("go-1"), "").unwrap();
    let out = helper.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let round = |r: usize| -> HashMap<u16, String> {
        helper_lines(&text)
            .iter()
            .filter_map(|l| {
                let mut f = l.strip_prefix(&format!("round {r} "))?.split(' ');
                let port = f.next()?.parse().ok()?;
                let _from = f.next()?;
                Some((port, f.next()?.to_string()))
            })
            .collect()
    };
    let (before, after) = (round(0), round(1));
    assert_eq!(
        (before.len(), after.len()),
        (60, 60),
        "{text}\n{}",
        topo.log()
    );
    let moved = before.iter().filter(|(p, t)| after[*p] != **t).count();
    eprintln!(
        "kernel {} with a new backend (flow map pinned: {pinned}): {moved} of 60 flows \
         changed backend",
        if upgrade { "upgrade" } else { "restart" }
    );
    Some((moved, topo.log()))
}

#[test]
fn flows_continue_on_their_backends_across_a_restart() {
    let Some((moved, log)) = restart_with_a_new_backend("ulbp", true, false, "") else {
        return;
    };
    assert!(log.contains("the flow map is kept there"), "{log}");
    assert_eq!(moved, 0, "{log}");
}

#[test]
fn ipv6_flows_continue_on_their_backends_across_a_restart() {
    let Some((moved, log)) = restart_with_a_new_backend("ulp6", true, false, "") else {
        return;
    };
    assert_eq!(moved, 0, "{log}");
}

/// A kept (pinned) map is reused as it is: a restart with another `max_flows` makes it anew at
/// the new size (said in the log) rather than silently keep the old one.
/// The persistence map is kept with the flow map: after a restart whose weights make the
/// Maglev table place a client elsewhere, its new flows still return to the backend it used.
#[test]
fn persistence_continues_across_a_restart() {
    let Some(mut topo) = Topology::build("ulpe") else {
        return;
    };
    topo.start_backends();
    let bpf = topo.net.dir.join("bpf");
    let _fs = BpfFs::mount(bpf.clone());
    let listener = "affinity = \"ip\"\npersistence = \"60s\"";
    let runtime = format!(
        "[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n",
        bpf.join("udplb").display()
    );
    let addrs: Vec<String> = (0..3).map(|i| quoted(topo.backend_addr(i))).collect();
    let pool = |weights: [u32; 3]| {
        let backends: Vec<String> = addrs
            .iter()
            .zip(weights)
            .map(|(a, w)| format!("{{ address = {a}, weight = {w} }}"))
            .collect();
        format!("backends = [{}]\n{runtime}", backends.join(", "))
    };
    let first = topo.start_udplb_with(listener, &pool([1, 1, 1]));
    if topo.without_the_program() {
        return;
    }
    let before = topo.clients(5, 1);
    assert_eq!(before.len(), 5, "{before:?}");
    let kept = before[0].2.clone();
    assert!(before.iter().all(|c| c.2 == kept), "{before:?}");
    let at = ["x", "y", "z"].iter().position(|t| *t == kept).unwrap();
    signal(first, "TERM");
    assert!(wait_for(DEADLINE, || gone(first)));
    let mut weights = [10_000; 3];
    weights[at] = 1;
    topo.start_udplb_with(listener, &pool(weights));
    let client = SocketAddr::new(topo.client_ip().parse().unwrap(), 40_000);
    let explain = || topo.api(&format!("/api/v1/explain?client={client}"));
    // (Explain names the kept backend too while the others fail a check: waited out.)
    assert!(
        wait_for(DEADLINE, || explain()["table_backend"].as_str()
            != Some(topo.backend_addr(at).to_string().as_str())),
        "the table still places the client on its backend: {}\n{}",
        explain(),
        topo.api("/stats")["pools"]
    );
    // The new process reads the kept persistence map: explain says so.
    assert_eq!(
        explain()["remembered"].as_str(),
        Some(topo.backend_addr(at).to_string().as_str()),
        "{}",
        explain()
    );
    let seen: std::collections::HashSet<u16> = before.iter().map(|c| c.0).collect();
    let after: Vec<_> = topo
        .clients(5, 1)
        .into_iter()
        .filter(|c| !seen.contains(&c.0))
        .collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|c| c.2 == kept),
        "remembered on {kept}, the table on {}: {after:?}\n{}",
        explain()["table_backend"],
        topo.log()
    );
}

#[test]
fn a_restart_with_another_max_flows_resizes_the_kept_maps() {
    let Some(mut topo) = Topology::build("ulrs") else {
        return;
    };
    topo.start_backends();
    let bpf = topo.net.dir.join("bpf");
    let _fs = BpfFs::mount(bpf.clone());
    let addrs: Vec<String> = (0..3).map(|i| quoted(topo.backend_addr(i))).collect();
    let pool = format!(
        "backends = [{}]\n[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n",
        addrs.join(", "),
        bpf.join("udplb").display()
    );
    let first = topo.start_udplb_with("max_flows = 2048", &pool);
    if topo.without_the_program() {
        return;
    }
    assert_eq!(topo.clients(5, 1).len(), 5);
    assert!(!topo.log().contains("resized"), "{}", topo.log());
    signal(first, "TERM");
    assert!(wait_for(DEADLINE, || gone(first)));
    topo.start_udplb_with("max_flows = 4096", &pool);
    let log = topo.log();
    assert!(
        log.contains("the kept map is resized")
            && log.contains("map=\"flows\"")
            && log.contains("was=2048")
            && log.contains("now=4096"),
        "{log}"
    );
    // Only the IPv4 flow map: the others are not used, and keep their size.
    assert_eq!(log.matches("the kept map is resized").count(), 1, "{log}");
    assert_eq!(topo.clients(5, 1).len(), 5);
}

#[test]
fn without_a_bpf_file_system_a_restart_places_flows_afresh() {
    let Some((moved, log)) = restart_with_a_new_backend("ulbq", false, false, "") else {
        return;
    };
    assert!(log.contains("not on a bpf file system"), "{log}");
    assert!(moved > 0, "no flow moved: the scenario shows nothing");
}

#[test]
fn flows_continue_on_their_backends_across_an_upgrade() {
    let Some((moved, log)) = restart_with_a_new_backend("ulbu", true, true, "") else {
        return;
    };
    assert_eq!(moved, 0, "{log}");
}

/// Not a test on its own: from the client host, a connected socket sends one datagram to
/// UDPLB_TEST_KERNEL_REFUSED and prints what receiving then says: `refused` (an ICMP port
/// unreachable reached it, about the address it sent to), `answer`, or `silence`.
#[test]
fn kernel_refused_in_namespace() {
    let Ok(target) = std::env::var("UDPLB_TEST_KERNEL_REFUSED") else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let s = UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .unwrap();
    s.connect(target).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..4 {
        let _ = s.send(b"anyone?");
        match s.recv(&mut buf) {
            Ok(_) => return println!("outcome answer"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return println!("outcome refused");
            }
            Err(_) => {}
        }
    }
    println!("outcome silence");
}

#[test]
fn a_closed_backend_port_reaches_the_client_as_refused_by_the_listener() {
    a_closed_backend_port_is_refused("ulbi", "nat");
}

#[test]
fn a_closed_backend_port_behind_masquerade_is_refused_by_the_listener() {
    a_closed_backend_port_is_refused("ulbj", "masquerade");
}

#[test]
fn a_closed_backend_port_reaches_an_ipv6_client_as_refused_by_the_listener() {
    a_closed_backend_port_is_refused("ulbs", "nat6");
}

#[test]
fn a_closed_backend_port_behind_ipv6_masquerade_is_refused_by_the_listener() {
    a_closed_backend_port_is_refused("ul6j", "masquerade6");
}

/// `forwarding` ending in 6 (`nat6`, `masquerade6`): that method on IPv6.
/// The same through a wildcard listener (0.0.0.0, [::]): the error comes from the address
/// the client sent to, which the program finds in the client's flow.
#[test]
fn a_closed_backend_port_behind_a_wildcard_listener_is_refused_by_the_address_sent_to() {
    a_closed_backend_port_is_refused("ulwr", "nat-any");
}

#[test]
fn a_closed_backend_port_behind_an_ipv6_wildcard_listener_is_refused_by_the_address_sent_to() {
    a_closed_backend_port_is_refused("ulw7", "nat6-any");
}

/// `forwarding` ending in `-any`: the listener on the wildcard address of its family.
fn a_closed_backend_port_is_refused(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let (forwarding, wildcard) = match forwarding.strip_suffix("-any") {
        Some(f) => (f, true),
        None => (forwarding, false),
    };
    let forwarding = topo.family_of(forwarding);
    if wildcard {
        let any = if topo.v6 { "[::]:5300" } else { "0.0.0.0:5300" };
        topo.listen = Some(any.parse().unwrap());
    }
    if forwarding == "masquerade" {
        topo.without_a_route_to_the_clients();
    }
    // Nothing listens on the backend's port; no health check, so it stays in rotation.
    let closed = SocketAddr::new(topo.backend_ip().parse().unwrap(), 7009);
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [{}]\nforwarding = \"{forwarding}\"\n",
            quoted(closed)
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let out = Net::helper(
        &topo.clients,
        "kernel_refused_in_namespace",
        &[("UDPLB_TEST_KERNEL_REFUSED", topo.vip().to_string())],
    )
    .stderr(Stdio::null())
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // The client's socket is connected to the listener: only an ICMP error about a datagram
    // to the listener (translated from the backend's) makes it say refused.
    assert!(
        text.contains("outcome refused"),
        "{text}\n{}",
        topo.api("/stats")["kernel"]
    );
}

#[test]
fn masquerade_reaches_backends_without_a_route_to_the_clients_and_on_this_host() {
    masquerade_reaches_backends("ulbm", false);
}

#[test]
fn ipv6_masquerade_reaches_backends_without_a_route_to_the_clients_and_on_this_host() {
    masquerade_reaches_backends("ul6m", true);
}

fn masquerade_reaches_backends(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    topo.start_backends();
    topo.without_a_route_to_the_clients();
    // A fourth backend on the balancer itself, on loopback.
    let local = topo.start_local_backend();
    let backends: Vec<String> = (0..3)
        .map(|i| quoted(topo.backend_addr(i)))
        .chain([quoted(local)])
        .collect();
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [{}]\nforwarding = \"masquerade\"\n[pools.p.health]\n{}\n",
            backends.join(", "),
            udp_check(200, 200, 1, 2)
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let replies = topo.clients(60, 2);
    assert_eq!(
        replies.len(),
        120,
        "{replies:?}\n{}\n{}",
        topo.log(),
        topo.api("/stats")["kernel"]
    );
    // Per client: its backend and the address and port that backend saw it from.
    let (balancer_side, loopback) = (topo.balancer_ip(), local.ip());
    let mut seen_as: HashMap<u16, (String, String)> = HashMap::new();
    for (port, from, tag, seen) in &replies {
        assert_eq!(*from, topo.vip(), "a reply not from the listener's address");
        let seen_addr: SocketAddr = seen.parse().unwrap();
        let balancer = if tag == "l" { loopback } else { balancer_side };
        assert_eq!(seen_addr.ip(), balancer, "backend {tag} saw {seen}");
        let masq_port = seen_addr.port();
        assert!(
            (61_000..=65_535).contains(&masq_port),
            "backend {tag} saw {seen}: not a masquerade port"
        );
        let first = seen_as
            .entry(*port)
            .or_insert_with(|| (tag.clone(), seen.clone()));
        assert_eq!(
            first,
            &(tag.clone(), seen.clone()),
            "client {port}: another backend or port"
        );
    }
    let mut taken = std::collections::HashSet::new();
    for (tag, seen) in seen_as.values() {
        assert!(taken.insert((tag, seen)), "two clients as {seen} at {tag}");
    }
    let tags: std::collections::HashSet<&String> = seen_as.values().map(|(t, _)| t).collect();
    assert_eq!(tags.len(), 4, "60 clients over 4 backends: {tags:?}");
    let stats = topo.api("/stats");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
    assert_eq!(stats["kernel"]["drops"]["no_port"], 0, "{stats}");
    assert_eq!(
        stats["kernel"]["listeners"][0]["forwarding"], "masquerade",
        "{stats}"
    );
    assert!(
        stats["kernel"]["interfaces"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i == "lo")),
        "masquerade attaches to loopback: {stats}"
    );
}

/// Direct server return on IPv6: IPv6 in IPv6 to two backend addresses of the backend host
/// (`udplb decap` taking the outer header off), which answers the clients directly.
#[test]
fn ipv6_dsr_backends_see_the_client_and_answer_it_directly_from_the_listeners_address() {
    let Some(mut topo) = Topology::build("ul6r") else {
        return;
    };
    topo.ipv6();
    let t = topo.t;
    let second = format!("fd00:98:{t}::3/64");
    ip(&[
        "-n",
        &topo.backends,
        "addr",
        "add",
        &second,
        "dev",
        "kb",
        "nodad",
    ])
    .unwrap();
    let Some((_, decap_log)) = topo.dsr_backend_host() else {
        return;
    };
    let decap_said = || std::fs::read_to_string(&decap_log).unwrap_or_default();
    let vip = topo.vip();
    let backends: Vec<String> = [2, 3]
        .iter()
        .map(|i| {
            quoted(SocketAddr::new(
                format!("fd00:98:{t}::{i}").parse().unwrap(),
                vip.port(),
            ))
        })
        .collect();
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [{}]\nforwarding = \"dsr\"\n",
            backends.join(", ")
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let replies = topo.clients(40, 2);
    let stats = topo.api("/stats");
    assert_eq!(
        replies.len(),
        80,
        "{replies:?}\n{}\n{}",
        stats["kernel"],
        decap_said()
    );
    let client_ip: std::net::IpAddr = topo.client_ip().parse().unwrap();
    for (port, from, tag, seen) in &replies {
        assert_eq!(*from, vip, "a reply not from the listener's address");
        assert_eq!(tag, "d");
        assert_eq!(seen, &SocketAddr::new(client_ip, *port).to_string());
    }
    let backends = stats["kernel"]["listeners"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backends.len(), 2, "{stats}");
    for b in &backends {
        assert!(b["datagrams"].as_u64().unwrap_or(0) > 0, "{stats}");
        assert_eq!(b["replies"], 0, "{stats}");
    }
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
    // A datagram that fits the clients' links but not once encapsulated: the client is told
    // (packet too big, the MTU less 40 bytes), and its next try, fragmented, is answered.
    topo.client_learns_the_mtu(1440, 1460);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
}

/// Direct server return: the balancer encapsulates (IP in IP) to two backend addresses of the
/// backend host, which takes the outer header off (`udplb decap`, this kernel has no ipip
/// module), serves the listener's address on its loopback and answers the clients directly,
/// over a link of its own to them (not through the balancer).
#[test]
fn dsr_backends_see_the_client_and_answer_it_directly_from_the_listeners_address() {
    dsr_to_two_backend_addresses("ulbr", None);
}

/// The same in GUE (`encapsulation = "gue"`): each datagram in UDP from the balancer to the
/// backend host's GUE port, which `udplb decap --gue-port` takes off. The source port, chosen
/// by the client, is one of 49152-65535 (so a backend NIC spreads clients over its queues);
/// the outer checksum is none (0). GUE from an address that is not a balancer's is not
/// decapsulated (counted, left to the stack).
#[test]
fn gue_dsr_backends_see_the_client_and_answer_it_directly() {
    dsr_to_two_backend_addresses("ulgd", Some(6080));
}

/// dsr to two addresses of the backend host, IP in IP or in GUE to `gue`, as tcpdump on the
/// backend's link reads it; then a client whose datagram would not fit once encapsulated is
/// told the MTU less what encapsulation adds, and its next try, fragmented, is answered (the
/// later fragment encapsulated as its first); `udplb decap` took every datagram in the
/// encapsulation asked for.
/// A wildcard listener with dsr: the backend host holds both of the balancer's addresses the
/// clients send to, and answers each client from the one it sent to (the encapsulated
/// datagram's destination), seeing the client's own address.
#[test]
fn a_wildcard_listener_with_dsr_is_answered_from_each_address_sent_to() {
    let Some(mut topo) = Topology::build("ulwd") else {
        return;
    };
    let t = topo.t;
    let second = format!("10.99.{t}.2");
    for ns in [topo.balancer.clone(), topo.backends.clone()] {
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{second}/32"),
            "dev",
            "lo",
        ])
        .unwrap();
    }
    if topo.dsr_backend_host().is_none() {
        return;
    }
    let second = SocketAddr::new(second.parse().unwrap(), 5300);
    let backends = topo.backends.clone();
    topo.start_echo(&backends, second, "e");
    topo.listen = Some("0.0.0.0:5300".parse().unwrap());
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [\"10.98.{t}.2:5300\"]\n{}",
            topo.dsr_forwarding()
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let client_ip = topo.client_ip();
    for (to, tag) in [(topo.vip(), "d"), (second, "e")] {
        let replies = topo.clients_with(20, 1, &[("UDPLB_TEST_KERNEL_TARGET", to.to_string())]);
        assert_eq!(
            replies.len(),
            20,
            "to {to}: {}",
            topo.api("/stats")["kernel"]
        );
        for (port, from, got, seen) in &replies {
            assert_eq!((from, got.as_str()), (&to, tag), "client {port}");
            assert_eq!(seen, &format!("{client_ip}:{port}"), "the backend saw");
        }
    }
    assert_eq!(topo.api("/stats")["listeners"][0]["datagrams_in"], 0);
}

fn dsr_to_two_backend_addresses(prefix: &str, gue: Option<u16>) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    topo.gue = gue;
    let t = topo.t;
    ip(&[
        "-n",
        &topo.backends,
        "addr",
        "add",
        &format!("10.98.{t}.3/24"),
        "dev",
        "kb",
    ])
    .unwrap();
    // The client's kernel computes its checksums itself (veth would otherwise leave them to an
    // offload that never happens, and tcpdump could not check them).
    let ok = Net::exec(&topo.clients, &need("ethtool", "ethtool"))
        .args(["-K", "cb", "tx", "off"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let Some((_, decap_log)) = topo.dsr_backend_host() else {
        return;
    };
    let vip = topo.vip();
    let decap_said = || std::fs::read_to_string(&decap_log).unwrap_or_default();
    let capture = topo.net.dir.join("tcpdump.txt");
    let capture_log = topo.net.dir.join("tcpdump.log");
    let (packets, filter) = match gue {
        Some(_) => ("8", ["udp", "dst", "port", "6080"].as_slice()),
        None => ("4", ["ip", "proto", "4"].as_slice()),
    };
    let child = Net::exec(&topo.backends, &need("tcpdump", "tcpdump"))
        .args(["-i", "kb", "-nn", "-vv", "-c", packets])
        .args(filter)
        .stdout(std::fs::File::create(&capture).unwrap())
        .stderr(std::fs::File::create(&capture_log).unwrap())
        .spawn()
        .unwrap();
    topo.net.keep(child);
    assert!(
        wait_for(DEADLINE, || std::fs::read_to_string(&capture_log)
            .unwrap_or_default()
            .contains("listening on")),
        "tcpdump did not start"
    );
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [\"10.98.{t}.2:{p}\", \"10.98.{t}.3:{p}\"]\n{}",
            topo.dsr_forwarding(),
            p = vip.port()
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let replies = topo.clients(40, 2);
    let stats = topo.api("/stats");
    assert_eq!(
        replies.len(),
        80,
        "{replies:?}\n{}\n{}",
        stats["kernel"],
        decap_said()
    );
    let client_ip = format!("10.97.{t}.2");
    for (port, from, tag, seen) in &replies {
        assert_eq!(*from, vip, "a reply not from the listener's address");
        assert_eq!(tag, "d");
        assert_eq!(
            seen,
            &format!("{client_ip}:{port}"),
            "the backend saw another address"
        );
    }
    // Both backend addresses took clients; no reply came back through the balancer.
    let kernel = &stats["kernel"]["listeners"][0];
    assert_eq!(kernel["forwarding"], "dsr", "{stats}");
    let encapsulation = gue.map_or("ipip".to_string(), |p| format!("gue {p}"));
    assert_eq!(kernel["encapsulation"], encapsulation.as_str(), "{stats}");
    let out = Net::exec(&topo.balancer, Path::new(env!("CARGO_BIN_EXE_udplb")))
        .args(["ctl", "--admin", "127.0.0.1:9190", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("(l dsr {encapsulation})")),
        "{status}"
    );
    let backends = kernel["backends"].as_array().cloned().unwrap_or_default();
    assert_eq!(backends.len(), 2, "{stats}");
    for b in &backends {
        assert!(b["datagrams"].as_u64().unwrap_or(0) > 0, "{stats}");
        assert_eq!(b["replies"], 0, "{stats}");
    }
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
    let captured = || std::fs::read_to_string(&capture).unwrap_or_default();
    if gue.is_some() {
        // UDP from the balancer to port 6080 of both backend addresses, no checksum, from
        // ports of 49152-65535, more than one (the first 8 datagrams are of several clients).
        assert!(
            wait_for(DEADLINE, || captured().matches(".6080: ").count() >= 8),
            "{}",
            captured()
        );
        let seen = captured();
        let from = format!("10.98.{t}.1.");
        let sports: std::collections::BTreeSet<u16> = seen
            .lines()
            .filter_map(|l| l.trim().strip_prefix(from.as_str()))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect();
        assert!(!sports.is_empty(), "{seen}");
        assert!(sports.iter().all(|&p| p >= 49152), "{sports:?}\n{seen}");
        assert!(sports.len() > 1, "one source port for every client: {seen}");
        assert!(seen.contains("[no cksum]"), "{seen}");
    } else {
        // IP in IP from the balancer's address, the outer and the inner checksums good, the
        // client's datagram inside unchanged.
        assert!(
            wait_for(DEADLINE, || captured().matches("udp sum ok").count() >= 4),
            "{}",
            captured()
        );
        let seen = captured();
        assert!(seen.contains("proto IPIP (4)"), "{seen}");
        assert!(
            seen.contains(&format!("10.98.{t}.1 > 10.98.{t}.")),
            "{seen}"
        );
        assert!(
            seen.contains(&format!("> {}.{}: [udp sum ok]", vip.ip(), vip.port())),
            "{seen}"
        );
        assert!(!seen.contains("bad cksum"), "{seen}");
    }
    // 1,450 bytes: 1,478 on the wire, 1,498 in IP in IP (fits), 1,506 in GUE: the client
    // learns 1,472. 1,470 bytes: 1,518 in IP in IP: it learns 1,480.
    match gue {
        Some(_) => topo.client_learns_the_mtu(1450, 1472),
        None => topo.client_learns_the_mtu(1470, 1480),
    }
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
    let mut forged = 0;
    if let Some(port) = gue {
        // GUE from another address of the balancers' network (not a balancer's).
        let forger = format!("10.98.{t}.9");
        ip(&[
            "-n",
            &topo.balancer,
            "addr",
            "add",
            &format!("{forger}/24"),
            "dev",
            "bk",
        ])
        .unwrap();
        let sent = Net::helper(
            &topo.balancer,
            "kernel_forged_gue_in_namespace",
            &[
                ("UDPLB_TEST_FORGE_FROM", forger),
                ("UDPLB_TEST_FORGE_TO", format!("10.98.{t}.2:{port}")),
                ("UDPLB_TEST_FORGE_CLIENT", format!("10.97.{t}.77:4242")),
                ("UDPLB_TEST_FORGE_VIP", vip.to_string()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
        assert!(sent.success());
        forged = 1;
    }
    // Stopped, the decapsulation says what it did: every datagram in the encapsulation asked
    // for; the forged one left to the stack.
    let (taken, in_gue, others) = topo.stop_decap();
    assert!(taken >= 80, "{}", decap_said());
    let expected = if gue.is_some() { taken } else { 0 };
    assert_eq!((in_gue, others), (expected, forged), "{}", decap_said());
}

/// A topology whose backend host takes IP in IP (or GUE to `gue`: `udplb decap`) and answers
/// the clients itself, and udplb forwarding to it by dsr; None (the test skipped) when it
/// cannot be set up.
fn dsr_to_the_backend_host(prefix: &str, gue: Option<u16>) -> Option<Topology> {
    let mut topo = Topology::build(prefix)?;
    topo.gue = gue;
    let t = topo.t;
    topo.dsr_backend_host()?;
    let vip = topo.vip();
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [\"10.98.{t}.2:{}\"]\n{}",
            vip.port(),
            topo.dsr_forwarding()
        ),
    );
    (!topo.without_the_program()).then_some(topo)
}

/// Direct server return and the MTU: a datagram (DF set, as Linux sends UDP) that fits the
/// clients' links but not once encapsulated is dropped, counted (`too_big`) and answered with
/// ICMP fragmentation needed, from the listener's address, with 20 bytes less: the client's
/// kernel learns the path MTU and its next try, fragmented to fit, is answered. A 3,000-byte
/// datagram goes through whole, each fragment encapsulated to the backend its first went to.
#[test]
fn dsr_tells_the_client_the_path_mtu_and_carries_fragments() {
    let Some(topo) = dsr_to_the_backend_host("ulbv", None) else {
        return;
    };
    let vip = topo.vip();
    let small = topo.clients(1, 1);
    assert_eq!(small.len(), 1, "{}", topo.api("/stats")["kernel"]);
    // 1,470 bytes: 1,498 on the wire, 1,518 encapsulated, over the 1,500 of the backends' link.
    topo.client_learns_the_mtu(1470, 1480);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    let big = [("UDPLB_TEST_KERNEL_SIZE", "3000".to_string())];
    let replies = topo.clients_with(1, 1, &big);
    let stats = topo.api("/stats");
    assert_eq!(replies.len(), 1, "{stats}");
    assert_eq!(replies[0].1, vip);
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
}

/// dsr without DF: a request that fits the clients' link but not the backends' once
/// encapsulated is cut into IP fragments first, as a router fragments what it puts into a
/// tunnel, and the backend host (`udplb decap`) reassembles it: answered. So is each 1,500-byte
/// fragment of a 3,000-byte datagram the client fragmented itself. (With DF the client is told
/// the MTU instead: `dsr_tells_the_client_the_path_mtu_and_carries_fragments`.)
#[test]
fn dsr_cuts_datagrams_without_df_too_big_once_encapsulated() {
    cuts_datagrams_without_df("ulfd", None);
}

/// The same through GUE: 28 bytes added, not 20, and each fragment in UDP to the GUE port
/// its datagram's first went to.
#[test]
fn gue_dsr_cuts_datagrams_without_df_too_big_once_encapsulated() {
    cuts_datagrams_without_df("ulgf", Some(6080));
}

fn cuts_datagrams_without_df(prefix: &str, gue: Option<u16>) {
    let Some(topo) = dsr_to_the_backend_host(prefix, gue) else {
        return;
    };
    let vip = topo.vip();
    // 1,448 bytes: 1,476 on the wire, 1,496 in IP in IP (no cut), 1,504 in GUE (one cut).
    // 1,470 bytes: 1,498 on the wire, too big either way: one cut (the client's checksum left
    // to veth's offload: completed by the program). 3,000 bytes: fragments of 1,500, 1,500
    // and 68 bytes from the client, the first two cut once each. Then 1,470 bytes again with
    // the client's checksum whole, as a NIC's traffic arrives.
    let first = u64::from(gue.is_some());
    let steps = [
        (1448, first),
        (1470, first + 1),
        (3000, first + 3),
        (1470, first + 4),
    ];
    for (i, (size, cuts)) in steps.into_iter().enumerate() {
        if i == steps.len() - 1 {
            let off = Net::exec(&topo.clients, Path::new("ethtool"))
                .args(["-K", "cb", "tx", "off"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(off.success());
        }
        let once = [
            ("UDPLB_TEST_KERNEL_SIZE", size.to_string()),
            ("UDPLB_TEST_KERNEL_ATTEMPTS", "1".to_string()),
            ("UDPLB_TEST_NO_DF", "1".to_string()),
        ];
        let replies = topo.clients_with(1, 1, &once);
        let stats = topo.api("/stats");
        assert_eq!(replies.len(), 1, "{size} bytes: {}", stats["kernel"]);
        assert_eq!(replies[0].1, vip);
        assert_eq!(stats["kernel"]["drops"]["too_big"], 0, "{stats}");
        assert_eq!(stats["kernel"]["cut_for_tunnel"], cuts, "{stats}");
    }
    // Each fragment in the encapsulation asked for.
    let (taken, in_gue, _) = topo.stop_decap();
    assert!(taken >= 8, "{taken}");
    assert_eq!(in_gue, if gue.is_some() { taken } else { 0 });
}

/// IPv6 dsr in GUE: UDP over IPv6 to the backend host's GUE port (its checksum 0, which
/// `udplb decap` takes), the clients answered directly; the MTU a client learns is 48 bytes
/// less.
#[test]
fn ipv6_gue_dsr_backends_see_the_client_and_answer_it_directly() {
    let Some(mut topo) = Topology::build("ul6u") else {
        return;
    };
    topo.ipv6();
    topo.gue = Some(6080);
    let t = topo.t;
    if topo.dsr_backend_host().is_none() {
        return;
    }
    let vip = topo.vip();
    topo.start_udplb_with(
        "",
        &format!(
            "backends = [\"[fd00:98:{t}::2]:{}\"]\n{}",
            vip.port(),
            topo.dsr_forwarding()
        ),
    );
    if topo.without_the_program() {
        return;
    }
    let replies = topo.clients(20, 2);
    let stats = topo.api("/stats");
    assert_eq!(replies.len(), 40, "{replies:?}\n{}", stats["kernel"]);
    let client_ip: std::net::IpAddr = topo.client_ip().parse().unwrap();
    for (port, from, tag, seen) in &replies {
        assert_eq!(*from, vip);
        assert_eq!(tag, "d");
        assert_eq!(seen, &SocketAddr::new(client_ip, *port).to_string());
    }
    assert_eq!(
        stats["kernel"]["listeners"][0]["encapsulation"], "gue 6080",
        "{stats}"
    );
    // 1,440 bytes: 1,488 on the wire, 1,536 in GUE: the client learns 1,452.
    topo.client_learns_the_mtu(1440, 1452);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
    let (taken, in_gue, others) = topo.stop_decap();
    assert!(taken >= 40, "{taken}");
    assert_eq!((in_gue, others), (taken, 0));
}

/// Path MTU discovery through nat: a reply (DF set) too big for the clients' link is dropped,
/// counted, and its backend told (ICMP fragmentation needed, as a router would): the backend's
/// kernel learns the MTU towards the client and fragments its next reply to fit. The other way,
/// a request too big for the backends' link tells the client the same.
/// IPv6: later fragments (fragment headers) follow their first both ways, and a datagram too
/// big for the route onward is answered with ICMPv6 packet too big, which the client heeds.
#[test]
fn ipv6_fragments_follow_their_first_and_the_client_learns_the_path_mtu() {
    let Some(mut topo) = Topology::build("ulbc") else {
        return;
    };
    topo.ipv6();
    topo.start_backends();
    topo.start_udplb("");
    if topo.without_the_program() {
        return;
    }
    // 3,000 bytes each way across 1,500-byte links: fragmented by the client and by the
    // backend, each fragment rewritten as its first.
    let big = [("UDPLB_TEST_KERNEL_SIZE", "3000".to_string())];
    let replies = topo.clients_with(4, 2, &big);
    assert_eq!(
        replies.len(),
        8,
        "{replies:?}\n{}",
        topo.api("/stats")["kernel"]
    );
    for (port, from, _, seen) in &replies {
        assert_eq!(*from, topo.vip());
        let client = SocketAddr::new(topo.client_ip().parse().unwrap(), *port);
        assert_eq!(seen, &client.to_string());
    }
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
    // The backends' link narrower than the clients': 1,400 bytes fit the clients' link, not
    // the backends'. The first try is lost, and the client is told (from the listener's
    // address, about its datagram), so its next try is fragmented and answered.
    topo.backends_link_mtu(1300);
    topo.client_learns_the_mtu(1400, 1300);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
}

/// A router beyond the balancer (the far client's) cannot pass a reply: its ICMP error goes to
/// the listener's address the reply came from, and reaches the backend that sent it as if no
/// balancer were on the way, so the backend learns the path MTU.
#[test]
fn nat_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrn", "nat");
}

#[test]
fn masquerade_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrm", "masquerade");
}

#[test]
fn dsr_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrd", "dsr");
}

#[test]
fn ipv6_nat_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrn6", "nat6");
}

#[test]
fn ipv6_masquerade_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrm6", "masquerade6");
}

/// The same through GUE: the error reaches the backend in GUE, as the client's datagrams do.
#[test]
fn gue_dsr_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrg", "dsr-gue");
}

#[test]
fn ipv6_dsr_hands_a_routers_error_about_a_reply_to_its_backend() {
    routers_error_about_a_reply("ulrd6", "dsr6");
}

/// (`forwarding` ending in 6: that method on IPv6.)
fn routers_error_about_a_reply(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let forwarding = topo.family_of(forwarding);
    // dsr-gue: dsr in GUE to port 6080.
    let forwarding = match forwarding.strip_suffix("-gue") {
        Some(method) => {
            topo.gue = Some(6080);
            method
        }
        None => forwarding,
    };
    let v6 = topo.v6;
    let far = topo.far_client(1300);
    let t = topo.t;
    // The far client's address, the balancer's on the backends' side.
    let (far_ip, balancer) = if v6 {
        (format!("fd00:95:{t}::2"), format!("fd00:98:{t}::1"))
    } else {
        (format!("10.95.{t}.2"), format!("10.98.{t}.1"))
    };
    // Where the backend sends its replies, and so where it learns the MTU towards.
    let answers = match forwarding {
        "dsr" => {
            if topo.dsr_backend_host().is_none() {
                return;
            }
            let (net, via) = if v6 {
                (format!("fd00:95:{t}::/64"), format!("fd00:96:{t}::1"))
            } else {
                (format!("10.95.{t}.0/24"), format!("10.96.{t}.1"))
            };
            ip(&["-n", &topo.backends, "route", "add", &net, "via", &via]).unwrap();
            let backend = SocketAddr::new(topo.backend_ip().parse().unwrap(), topo.vip().port());
            topo.start_udplb_with(
                "",
                &format!(
                    "backends = [{}]\n{}",
                    quoted(backend),
                    topo.dsr_forwarding()
                ),
            );
            far_ip
        }
        _ => {
            topo.start_backends();
            topo.start_udplb_forwarding("", forwarding);
            if forwarding == "masquerade" {
                balancer
            } else {
                far_ip
            }
        }
    };
    if topo.without_the_program() {
        return;
    }
    let learned = || route_to(&topo.backends, &answers);
    // 1,270 bytes (1,240 on IPv6): the request (1,298 on the wire; 1,288) passes the
    // 1,300-byte link; the reply, with the echo's tag and the client's address in front, does
    // not.
    let size = (
        "UDPLB_TEST_KERNEL_SIZE",
        if v6 { "1240" } else { "1270" }.to_string(),
    );
    let once = [
        size.clone(),
        ("UDPLB_TEST_KERNEL_ATTEMPTS", "1".to_string()),
    ];
    assert!(topo.clients_in(&far, 1, 1, &once).is_empty());
    assert!(
        wait_for(DEADLINE, || learned().contains("mtu 1300")),
        "{}\n{}",
        learned(),
        topo.api("/stats")["kernel"]
    );
    // Its next reply is fragmented to fit, and answered.
    assert_eq!(
        topo.clients_in(&far, 1, 1, std::slice::from_ref(&size))
            .len(),
        1
    );
    if topo.decap.is_some() {
        // The datagrams, and the router's error, in the encapsulation asked for.
        let (taken, in_gue, _) = topo.stop_decap();
        assert!(taken >= 3, "{taken}");
        assert_eq!(in_gue, if topo.gue.is_some() { taken } else { 0 });
    }
}

/// Datagrams without DF (as some DNS servers send their answers) too big for the route
/// onward are fragmented, as a router would, not lost: a reply too big for the clients' link,
/// then a request too big for the backends'.
#[test]
fn nat_fragments_datagrams_without_df_too_big_for_the_route_onward() {
    without_df_too_big("ulfn", "nat");
}

#[test]
fn masquerade_fragments_datagrams_without_df_too_big_for_the_route_onward() {
    without_df_too_big("ulfm", "masquerade");
}

fn without_df_too_big(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    topo.clients_link_mtu(1400);
    let no_df = ("UDPLB_TEST_NO_DF", "1".to_string());
    topo.start_backends_with(std::slice::from_ref(&no_df));
    topo.start_udplb_forwarding("", forwarding);
    if topo.without_the_program() {
        return;
    }
    // 1,370 bytes: the request fits the clients' 1,400-byte link, the reply does not.
    let once = [
        ("UDPLB_TEST_KERNEL_SIZE", "1370".to_string()),
        ("UDPLB_TEST_KERNEL_ATTEMPTS", "1".to_string()),
        no_df,
    ];
    let replies = topo.clients_with(1, 1, &once);
    assert_eq!(replies.len(), 1, "{}", topo.api("/stats")["kernel"]);
    assert_eq!(replies[0].1, topo.vip());
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 0, "{stats}");
    assert_eq!(stats["kernel"]["oversize_passed"], 1, "{stats}");
    // The backends' link narrower still: now the request does not fit the route onward.
    topo.backends_link_mtu(1300);
    let replies = topo.clients_with(1, 1, &once);
    assert_eq!(replies.len(), 1, "{}", topo.api("/stats")["kernel"]);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 0, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
    assert!(
        stats["kernel"]["oversize_passed"].as_u64() >= Some(2),
        "{stats}"
    );
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
}

#[test]
fn nat_tells_backends_and_clients_the_path_mtu() {
    path_mtu("ulby", "nat");
}

/// As [`nat_tells_backends_and_clients_the_path_mtu`] behind masquerade: the backend learns the
/// MTU towards the balancer's address it answers.
#[test]
fn masquerade_tells_backends_and_clients_the_path_mtu() {
    path_mtu("ulbz", "masquerade");
}

fn path_mtu(prefix: &str, forwarding: &str) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    topo.clients_link_mtu(1400);
    topo.start_backends();
    topo.start_udplb_forwarding("", forwarding);
    if topo.without_the_program() {
        return;
    }
    let t = topo.t;
    // 1,370 bytes: the request (1,398 on the wire) fits the clients' 1,400; the echo's reply,
    // with its tag and the client's address in front, does not.
    let size = ("UDPLB_TEST_KERNEL_SIZE", "1370".to_string());
    let once = [
        size.clone(),
        ("UDPLB_TEST_KERNEL_ATTEMPTS", "1".to_string()),
    ];
    assert!(topo.clients_with(1, 1, &once).is_empty());
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 1, "{stats}");
    // What the backend answers: the client (nat), or the balancer's address (masquerade).
    let answered = if forwarding == "masquerade" {
        format!("10.98.{t}.1")
    } else {
        format!("10.97.{t}.2")
    };
    let to_client = route_to(&topo.backends, &answered);
    assert!(to_client.contains("mtu 1400"), "{to_client}");
    assert_eq!(
        topo.clients_with(1, 1, std::slice::from_ref(&size)).len(),
        1
    );
    // The backends' link narrower than the clients': the client is told.
    topo.backends_link_mtu(1300);
    topo.client_learns_the_mtu(1370, 1300);
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["drops"]["too_big"], 2, "{stats}");
    assert_eq!(stats["kernel"]["fragments_passed"], 0, "{stats}");
}

/// A burst from `bind` in the client namespace: (one-second windows it spanned, replies).
fn burst(topo: &Topology, bind: &str, sockets: usize, each: usize) -> (u64, u64) {
    burst_to(topo, topo.vip(), bind, sockets, each)
}

/// As [`burst`], to `target`.
fn burst_to(
    topo: &Topology,
    target: SocketAddr,
    bind: &str,
    sockets: usize,
    each: usize,
) -> (u64, u64) {
    let out = Net::helper(
        &topo.clients,
        "kernel_burst_in_namespace",
        &[
            ("UDPLB_TEST_KERNEL_BURST", target.to_string()),
            ("UDPLB_TEST_KERNEL_BIND", bind.to_string()),
            ("UDPLB_TEST_KERNEL_SOCKETS", sockets.to_string()),
            ("UDPLB_TEST_KERNEL_EACH", each.to_string()),
        ],
    )
    .stderr(Stdio::null())
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = helper_lines(&text)
        .into_iter()
        .find(|l| l.starts_with("windows "))
        .unwrap_or_else(|| panic!("the burst said nothing: {text}"));
    let f: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    (f[0], f[1])
}

/// More flows than the smallest flow table holds (1,024 buckets of 4, `max_flows = 1`), none
/// idle: every new flow beyond the table's 4,096 slots takes the place of a live one, and
/// `udplb_kernel_flows_replaced_total` says so (the table too small for its flows).
#[test]
fn flows_beyond_the_flow_table_are_counted_as_replaced() {
    let Some(topo) = Topology::serving("ulfr", false, "max_flows = 1") else {
        return;
    };
    let flows = 8000;
    burst(&topo, &topo.client_ip(), flows, 1);
    let out = Net::exec(&topo.balancer, Path::new("curl"))
        .args(["-s", "127.0.0.1:9190/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let placed = counter("udplb_kernel_flows_created_total");
    let replaced = counter("udplb_kernel_flows_replaced_total");
    // At most 4,096 flows stay in the table: each one placed beyond them replaced another.
    assert!(
        placed > 5000.0 && placed <= flows as f64,
        "placed {placed}\n{metrics}"
    );
    assert!(
        replaced >= placed - 4096.0 && replaced < placed,
        "placed {placed}, replaced {replaced}"
    );
    // /stats says the same, apart from the drops.
    let stats = topo.api("/stats");
    assert_eq!(
        stats["kernel"]["flows_replaced"].as_f64(),
        Some(replaced),
        "{stats}"
    );
}

/// Two listeners sharing the flow table, idle timeouts 60 s (l) and 1 s (m): m's new flows
/// take the places of l's flows, idle 1.5 s but live by l's own timeout, and are counted as
/// replacing them (judged by the new flow's listener's timeout, they would not be).
#[test]
fn a_replaced_flow_is_judged_by_its_own_listeners_idle_timeout() {
    let Some(mut topo) = Topology::build("ulfj") else {
        return;
    };
    let other = SocketAddr::new(topo.vip().ip(), 5301);
    let listener = format!(
        "max_flows = 1\nidle_timeout = \"60s\"\n\
         [listeners.m]\naddress = \"{other}\"\npool = \"q\"\ndataplane = \"kernel\"\n\
         interfaces = [\"bc\", \"bk\"]\nidle_timeout = \"1s\"\nmax_flows = 1\n\
         [pools.q]\nbackends = [\"{}:7004\"]\n",
        topo.backend_ip()
    );
    topo.start_backends();
    topo.start_udplb(&listener);
    if topo.without_the_program() {
        return;
    }
    let metrics = || {
        let out = Net::exec(&topo.balancer, Path::new("curl"))
            .args(["-s", "127.0.0.1:9190/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let counter = |text: &str, name: &str, labels: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // The table's 4,096 slots filled with l's flows (8,000 placed).
    burst(&topo, &topo.client_ip(), 8000, 1);
    let before = metrics();
    // All placed, on l's three backends (none was still waiting for its first check).
    let placed_l = counter(
        &before,
        "udplb_kernel_flows_created_total",
        "listener=\"l\"",
    );
    assert_eq!(placed_l, 8000.0, "{before}");
    std::thread::sleep(Duration::from_millis(1500));
    burst_to(&topo, other, &topo.client_ip(), 2000, 1);
    let after = metrics();
    let placed = counter(&after, "udplb_kernel_flows_created_total", "listener=\"m\"");
    let replaced = counter(&after, "udplb_kernel_flows_replaced_total", "")
        - counter(&before, "udplb_kernel_flows_replaced_total", "");
    assert!(placed > 1500.0, "m placed {placed}\n{after}");
    // Each m flow took the place of an l flow (older than any m flow) unless its bucket held
    // 4 m flows already: nearly all were l's, live by their 60 s.
    assert!(
        replaced >= 0.9 * placed,
        "m placed {placed}, replaced {replaced}\n{after}"
    );
}

#[test]
fn rate_limits_per_source_are_kept_in_the_kernel() {
    rate_limits_per_source("ulbt", false);
}

#[test]
fn ipv6_rate_limits_per_source_are_kept_in_the_kernel() {
    rate_limits_per_source("ul6t", true);
}

fn rate_limits_per_source(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    let t = topo.t;
    // The client host's two addresses.
    let (one, two) = if v6 {
        topo.ipv6();
        (format!("fd00:97:{t}::2"), format!("fd00:97:{t}::3"))
    } else {
        (format!("10.97.{t}.2"), format!("10.97.{t}.3"))
    };
    let second = format!("{two}/{}", if v6 { 64 } else { 24 });
    let mut add = vec!["-n", &topo.clients, "addr", "add", &second, "dev", "cb"];
    if v6 {
        add.push("nodad");
    }
    ip(&add).unwrap();
    topo.start_backends();
    topo.start_udplb("[listeners.l.limits]\ndatagrams_per_source = 40\nnew_flows_per_source = 5\n");
    if topo.without_the_program() {
        return;
    }
    // One flow, 200 datagrams at once: at most 40 a second get through.
    let (windows, replies) = burst(&topo, &one, 1, 200);
    let stats = topo.api("/stats");
    assert!(replies > 0, "{stats}");
    assert!(
        replies <= 40 * windows,
        "{replies} replies in {windows} s: {stats}"
    );
    let limited = stats["kernel"]["drops"]["rate_limited"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(limited, 200 - replies, "{stats}");
    // Another address, 30 new flows of one datagram: at most 5 a second are placed; its
    // datagrams are within their own limit.
    let (windows, replies) = burst(&topo, &two, 30, 1);
    let stats = topo.api("/stats");
    assert!(replies > 0, "{stats}");
    assert!(
        replies <= 5 * windows,
        "{replies} flows in {windows} s: {stats}"
    );
    assert_eq!(
        stats["kernel"]["drops"]["flow_rate_limited"]
            .as_u64()
            .unwrap_or(0),
        30 - replies,
        "{stats}"
    );
    assert_eq!(
        stats["kernel"]["drops"]["rate_limited"].as_u64(),
        Some(limited)
    );
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
}

/// A second udplb process given the `runtime.bpf_dir` another one uses waits a moment for it
/// (one restarted by hand while the old still serves), then is refused, naming that process
/// and what to do: the two would resize, unpin and share each other's maps. The first serves
/// on; once it has exited, the directory is the next process's.
#[test]
fn a_second_udplb_process_is_refused_the_bpf_dir_another_one_uses() {
    let Some(mut topo) = Topology::build("ulbl") else {
        return;
    };
    topo.start_backends();
    let bpf = topo.net.dir.join("bpf");
    let _fs = BpfFs::mount(bpf.clone());
    let dir = bpf.join("udplb");
    let runtime = format!(
        "[runtime]\nshutdown_grace = \"0s\"\nbpf_dir = \"{}\"\n",
        dir.display()
    );
    let backends: Vec<String> = (0..3).map(|i| quoted(topo.backend_addr(i))).collect();
    let backends = backends.join(", ");
    let first = topo.start_udplb_with("", &format!("backends = [{backends}]\n{runtime}"));
    if topo.without_the_program() {
        return;
    }
    // Its own listener and admin endpoint, the same directory.
    let config = topo.net.dir.join("second.toml");
    std::fs::write(
        &config,
        format!(
            "{runtime}[admin]\nlisten = \"127.0.0.1:9191\"\n[listeners.m]\naddress = \"{}\"\n\
             pool = \"q\"\ndataplane = \"kernel\"\ninterfaces = [\"bc\", \"bk\"]\n\
             [pools.q]\nbackends = [{backends}]\n",
            SocketAddr::new(topo.vip().ip(), 5301)
        ),
    )
    .unwrap();
    let log = topo.net.dir.join("second.log");
    let mut second = Net::udplb(&topo.balancer, &config, &log).spawn().unwrap();
    // It waits its shutdown_grace (0 s) and 5 s more.
    let mut exited = None;
    assert!(
        wait_for(DEADLINE, || {
            exited = second.try_wait().unwrap();
            exited.is_some()
        }),
        "the second udplb still runs: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!exited.unwrap().success(), "{said}");
    assert!(said.contains("waiting for it to let go"), "{said}");
    assert!(
        said.contains(&format!(
            "runtime.bpf_dir {} is held by another process (pid {first} udplb): each udplb \
             process on a host needs a runtime.bpf_dir of its own",
            dir.display()
        )),
        "{said}"
    );
    let replies = topo.clients(10, 2);
    assert_eq!(replies.len(), 20, "{}", topo.log());
    // Made by udplb for its user alone: no other user can open it to hold the lock.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    signal(first, "TERM");
    assert!(wait_for(DEADLINE, || gone(first)));
    let next = Net::udplb(&topo.balancer, &config, &log).spawn().unwrap();
    topo.net.keep(next);
    assert!(
        wait_for(DEADLINE, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("the flow map is kept there"))),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Two udplb processes on one host, each with a kernel listener on the same interfaces (two
/// services, or another program on the interface): each one's program passes on what is not
/// its own, so both forward in the kernel whichever was attached first; each client is
/// answered from the address it sent to, the backends see its own address, and neither
/// udplb's sockets serve a datagram.
#[test]
fn two_udplb_processes_forward_in_the_kernel_on_the_same_interfaces() {
    let Some(mut topo) = Topology::build("ul2p") else {
        return;
    };
    topo.start_backends();
    topo.start_udplb("");
    if topo.without_the_program() {
        return;
    }
    // Its own backend: replies are known by their backend's address and port, which one
    // listener alone may have on a host.
    let second = SocketAddr::new(topo.vip().ip(), 5301);
    let backend: SocketAddr = format!("{}:7004", topo.backend_ip()).parse().unwrap();
    let backends_ns = topo.backends.clone();
    topo.start_echo(&backends_ns, backend, "w");
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:9191\"\n[listeners.m]\naddress = \"{second}\"\n\
         pool = \"q\"\ndataplane = \"kernel\"\ninterfaces = [\"bc\", \"bk\"]\n\
         [pools.q]\nbackends = [\"{backend}\"]\n"
    );
    let config = topo.net.dir.join("second.toml");
    std::fs::write(&config, toml).unwrap();
    let log = topo.net.dir.join("second.log");
    let child = Net::udplb(&topo.balancer, &config, &log).spawn().unwrap();
    topo.net.keep(child);
    let second_api = |path: &str| -> serde_json::Value {
        let out = Net::exec(&topo.balancer, Path::new("curl"))
            .args(["-s", "-g", &format!("127.0.0.1:9191{path}")])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    assert!(
        wait_for(DEADLINE, || {
            let stats = second_api("/stats");
            !stats["kernel"]["generation"].is_null()
                && stats["kernel"]["generation"] == stats["generation"]
        }),
        "the second udplb did not come up: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let client = topo.client_ip();
    for (target, api) in [
        (
            topo.vip(),
            &(|p: &str| topo.api(p)) as &dyn Fn(&str) -> serde_json::Value,
        ),
        (second, &second_api),
    ] {
        let replies = topo.clients_with(20, 1, &[("UDPLB_TEST_KERNEL_TARGET", target.to_string())]);
        assert_eq!(replies.len(), 20, "to {target}: {replies:?}");
        for (_, from, _, seen) in &replies {
            assert_eq!(*from, target, "{replies:?}");
            assert!(seen.starts_with(&client), "the backend saw {seen}");
        }
        let stats = api("/stats");
        assert_eq!(
            stats["listeners"][0]["datagrams_in"], 0,
            "{target}: {stats}"
        );
        let placed: u64 = stats["kernel"]["listeners"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["flows_created"].as_u64())
            .sum();
        assert_eq!(placed, 20, "{target}: {stats}");
    }
}

/// The one-liner takes the kernel data plane as the file does: Maglev by default, masquerade
/// to a backend elsewhere and one on the balancer itself.
#[test]
fn the_one_liner_forwards_in_the_kernel() {
    the_one_liner_forwards("ulbo", false);
}

#[test]
fn the_one_liner_forwards_ipv6_in_the_kernel() {
    the_one_liner_forwards("ul6o", true);
}

fn the_one_liner_forwards(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    topo.start_backends();
    topo.without_a_route_to_the_clients();
    let local = topo.start_local_backend();
    let log = topo.net.dir.join("udplb.log");
    let child = Net::exec(&topo.balancer, Path::new(env!("CARGO_BIN_EXE_udplb")))
        .env("UDPLB_ALLOW_ROOT", "1")
        .args(["--dataplane", "kernel", "--forwarding", "masquerade"])
        .args([
            "--interface",
            "bc",
            "--interface",
            "bk",
            "--admin",
            "127.0.0.1:9190",
        ])
        .args(["--check", "udp:ping"])
        .arg(topo.vip().to_string())
        .arg(topo.backend_addr(0).to_string())
        .arg(local.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    topo.net.keep(child);
    if topo.without_the_program() {
        return;
    }
    assert!(
        wait_for(DEADLINE, || topo.api("/stats")["pools"][0]["backends"]
            .as_array()
            .is_some_and(
                |b| b.len() == 2 && b.iter().all(|b| b["healthy"] == true)
            )),
        "udplb did not come up: {}",
        topo.log()
    );
    topo.wait_for_the_maps();
    let replies = topo.clients(30, 1);
    assert_eq!(replies.len(), 30, "{}", topo.api("/stats")["kernel"]);
    assert!(replies.iter().all(|(_, from, _, _)| *from == topo.vip()));
    let tags: std::collections::HashSet<&String> = replies.iter().map(|r| &r.2).collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    let stats = topo.api("/stats");
    assert_eq!(stats["kernel"]["listeners"][0]["forwarding"], "masquerade");
    assert_eq!(stats["listeners"][0]["datagrams_in"], 0, "{stats}");
}

#[test]
fn an_unprivileged_udplb_upgrades_with_its_flows() {
    // Started as root, udplb switches to nobody keeping CAP_BPF, CAP_PERFMON and
    // CAP_NET_ADMIN: its successor (nobody) loads the program and opens the pinned flow map
    // it was given.
    let Some((moved, log)) = restart_with_a_new_backend("ulbn", true, true, "nobody") else {
        return;
    };
    assert!(log.contains("switched user after binding"), "{log}");
    assert_eq!(moved, 0, "{log}");
}

#[test]
fn local_clients_and_backends_are_served_through_loopback() {
    local_clients_and_backends("ulbl", false);
}

#[test]
fn ipv6_local_clients_and_backends_are_served_through_loopback() {
    local_clients_and_backends("ul6l", true);
}

fn local_clients_and_backends(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    // Everything on the balancer host: backends on 127.0.0.1, the listener on 127.0.0.2, the
    // program on lo (IPv6: backends on ::1, the listener on its address on lo).
    let (backend_ip, vip, client_ip): (std::net::IpAddr, SocketAddr, std::net::IpAddr) = if v6 {
        topo.ipv6();
        let vip = topo.vip();
        ("::1".parse().unwrap(), vip, vip.ip())
    } else {
        let local = "127.0.0.1".parse().unwrap();
        (local, "127.0.0.2:5300".parse().unwrap(), local)
    };
    let backend = |i: usize| SocketAddr::new(backend_ip, 7001 + i as u16);
    let host = topo.balancer.clone();
    for (i, tag) in ["x", "y", "z"].iter().enumerate() {
        topo.start_echo(&host, backend(i), tag);
    }
    let backends: Vec<String> = (0..3).map(|i| quoted(backend(i))).collect();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:9190\"\n[listeners.l]\naddress = \"{vip}\"\npool = \"p\"\n\
         dataplane = \"kernel\"\ninterfaces = [\"lo\"]\n[pools.p]\nbackends = [{}]\n\
         [pools.p.health]\n{}\n",
        backends.join(", "),
        udp_check(200, 200, 1, 2)
    );
    let config = topo.net.dir.join("udplb.toml");
    std::fs::write(&config, toml).unwrap();
    let child = Net::udplb(&host, &config, &topo.net.dir.join("udplb.log"))
        .spawn()
        .unwrap();
    topo.net.keep(child);
    if topo.without_the_program() {
        return;
    }
    assert!(
        wait_for(DEADLINE, || topo.api("/stats")["pools"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().all(|b| b["healthy"] == true))),
        "health checks through the program on lo: {}",
        topo.log()
    );
    topo.wait_for_the_maps();
    let out = Net::helper(
        &host,
        "kernel_clients_in_namespace",
        &[
            ("UDPLB_TEST_KERNEL_TARGET", vip.to_string()),
            ("UDPLB_TEST_KERNEL_CLIENTS", "30".into()),
            ("UDPLB_TEST_KERNEL_ROUNDS", "2".into()),
        ],
    )
    .stderr(Stdio::null())
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<Vec<String>> = helper_lines(&text)
        .iter()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .filter(|f: &Vec<String>| f.len() == 4)
        .collect();
    assert_eq!(replies.len(), 60, "{text}\n{}", topo.log());
    let mut tags = std::collections::HashSet::new();
    for f in &replies {
        assert_eq!(
            f[1],
            vip.to_string(),
            "a reply not from the listener: {f:?}"
        );
        let port: u16 = f[0].parse().unwrap();
        assert_eq!(
            f[3],
            SocketAddr::new(client_ip, port).to_string(),
            "the backend saw {}",
            f[3]
        );
        tags.insert(f[2].clone());
    }
    assert_eq!(tags.len(), 3, "{tags:?}");
    assert_eq!(topo.api("/stats")["listeners"][0]["datagrams_in"], 0);
}

#[test]
fn icmp_errors_from_a_backend_take_it_out_passively() {
    let Some(mut topo) = Topology::build("ulbe") else {
        return;
    };
    topo.start_backends();
    // x answers; nothing listens on the other backend's port; no active check.
    let closed = format!("10.98.{}.2:7009", topo.t);
    let backends = format!(
        "backends = [{}, \"{closed}\"]\n",
        quoted(topo.backend_addr(0))
    );
    topo.start_udplb_with("", &backends);
    if topo.without_the_program() {
        return;
    }
    // New clients keep coming; those placed on the closed port get refused (translated ICMP)
    // until udplb counts passive_fall (3) failures in a row and takes the backend out.
    let ejected = wait_for(DEADLINE, || {
        topo.clients(10, 1);
        topo.api("/stats")["pools"][0]["backends"][1]["healthy"] == false
    });
    let stats = topo.api("/stats");
    assert!(ejected, "{stats}\n{}", topo.log());
    assert!(
        stats["kernel"]["listeners"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["icmp_errors"].as_u64() > Some(0))),
        "{stats}"
    );
    topo.wait_for_the_maps();
    let after = topo.clients(30, 1);
    assert_eq!(after.len(), 30, "{after:?}");
    assert!(after.iter().all(|(_, _, tag, _)| tag == "x"), "{after:?}");
}

#[test]
fn allow_and_deny_lists_are_kept_in_the_kernel_and_follow_a_reload() {
    allow_and_deny_lists("ulba", false);
}

#[test]
fn ipv6_allow_and_deny_lists_are_kept_in_the_kernel_and_follow_a_reload() {
    allow_and_deny_lists("ul6a", true);
}

fn allow_and_deny_lists(prefix: &str, v6: bool) {
    let Some(mut topo) = Topology::build(prefix) else {
        return;
    };
    if v6 {
        topo.ipv6();
    }
    // A second client address on the client host.
    let t = topo.t;
    let (one, two, net, len) = if v6 {
        (
            format!("fd00:97:{t}::2"),
            format!("fd00:97:{t}::3"),
            format!("fd00:97:{t}::/64"),
            64,
        )
    } else {
        (
            format!("10.97.{t}.2"),
            format!("10.97.{t}.3"),
            format!("10.97.{t}.0/24"),
            24,
        )
    };
    let second = format!("{two}/{len}");
    let mut add = vec!["-n", &topo.clients, "addr", "add", &second, "dev", "cb"];
    if v6 {
        add.push("nodad");
    }
    ip(&add).unwrap();
    topo.start_backends();
    topo.start_udplb(&format!("allow = [\"{net}\"]\ndeny = [\"{two}\"]"));
    if topo.without_the_program() {
        return;
    }
    let answered_from = |ip: &str| {
        let out = Net::helper(
            &topo.clients,
            "kernel_clients_in_namespace",
            &[
                ("UDPLB_TEST_KERNEL_TARGET", topo.vip().to_string()),
                ("UDPLB_TEST_KERNEL_CLIENTS", "3".into()),
                ("UDPLB_TEST_KERNEL_ROUNDS", "1".into()),
                ("UDPLB_TEST_KERNEL_BIND", ip.to_string()),
                ("UDPLB_TEST_KERNEL_ATTEMPTS", "2".into()),
            ],
        )
        .stderr(Stdio::null())
        .output()
        .unwrap();
        helper_lines(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .filter(|l| l.split(' ').count() == 4)
            .count()
    };
    assert_eq!((answered_from(&one), answered_from(&two)), (3, 0));
    let stats = topo.api("/stats");
    assert!(
        stats["kernel"]["drops"]["denied"].as_u64() >= Some(3),
        "{stats}"
    );
    // Deny the other one instead (a reload: the lists are map updates).
    let config = topo.net.dir.join("udplb.toml");
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        toml.replace(
            &format!("deny = [\"{two}\"]"),
            &format!("deny = [\"{one}\"]"),
        ),
    )
    .unwrap();
    let reloaded = Net::exec(&topo.balancer, Path::new("curl"))
        .args(["-s", "-f", "-X", "POST", "127.0.0.1:9190/api/v1/reload"])
        .output()
        .unwrap();
    assert!(reloaded.status.success(), "{reloaded:?}\n{}", topo.log());
    topo.wait_for_the_maps();
    assert_eq!((answered_from(&one), answered_from(&two)), (0, 3));
}

/// Keeps this process on CPU `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: `set` is a plain bit set, zeroed and then filled by CPU_SET within its size;
    // sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Not a test on its own: from the client host, sends 10 datagrams from
/// UDPLB_TEST_KERNEL_FORGE_FROM (a backend's address) to UDPLB_TEST_KERNEL_FORGE_TO.
#[test]
fn kernel_forger_in_namespace() {
    let Ok(from) = std::env::var("UDPLB_TEST_KERNEL_FORGE_FROM") else {
        return;
    };
    let to: SocketAddr = std::env::var("UDPLB_TEST_KERNEL_FORGE_TO")
        .unwrap()
        .parse()
        .unwrap();
    let from: SocketAddr = from.parse().unwrap();
    if from.is_ipv6() {
        // IPv6: the address is given to this host's interface (the test does), so a plain
        // socket sends from it.
        let s = UdpSocket::bind(from).expect("bind the forged address");
        for _ in 0..10 {
            s.send_to(b"forged", to).unwrap();
        }
        return;
    }
    let mut spoofer = common::spoof::Spoofer::new().expect("a raw socket");
    for _ in 0..10 {
        spoofer.send(common::spoof::v4(from), common::spoof::v4(to), b"forged");
    }
}

#[test]
fn a_backends_address_forged_from_the_clients_side_is_not_rewritten() {
    forged_from_the_clients_side("ulbf", false);
}

#[test]
fn an_ipv6_backends_address_forged_from_the_clients_side_is_not_rewritten() {
    forged_from_the_clients_side("ul6f", true);
}

fn forged_from_the_clients_side(prefix: &str, v6: bool) {
    let Some(topo) = Topology::serving(prefix, v6, "") else {
        return;
    };
    // A genuine reply first: the counters move.
    assert_eq!(topo.clients(1, 1).len(), 1);
    let replies = |stats: &serde_json::Value| -> u64 {
        stats["kernel"]["listeners"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["replies"].as_u64())
            .sum()
    };
    let before = replies(&topo.api("/stats"));
    assert!(before >= 1);
    // From the clients' side, "from" backend x to a host beyond the balancer (IPv6: to the
    // balancer, on a port that is no listener's): rewritten, it would leave from the
    // listener's address.
    let to = if v6 {
        // The client host takes backend x's address (forging, without a raw socket).
        let forged = format!("{}/128", topo.backend_ip());
        let add = [
            "-n",
            &topo.clients,
            "addr",
            "add",
            &forged,
            "dev",
            "cb",
            "nodad",
        ];
        ip(&add).unwrap();
        SocketAddr::new(topo.vip().ip(), 9999)
    } else {
        format!("10.98.{}.2:9999", topo.t).parse().unwrap()
    };
    let status = Net::helper(
        &topo.clients,
        "kernel_forger_in_namespace",
        &[
            (
                "UDPLB_TEST_KERNEL_FORGE_FROM",
                topo.backend_addr(0).to_string(),
            ),
            ("UDPLB_TEST_KERNEL_FORGE_TO", to.to_string()),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .unwrap();
    assert!(status.success());
    assert!(
        wait_for(DEADLINE, || topo.api("/stats")["kernel"]["forged_passed"]
            .as_u64()
            >= Some(10)),
        "{}",
        topo.api("/stats")["kernel"]
    );
    assert_eq!(
        replies(&topo.api("/stats")),
        before,
        "a forged reply was rewritten"
    );
}
