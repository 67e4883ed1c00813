//! High availability with real routing daemons, in network namespaces the tests make (root,
//! bird2, keepalived; skipped without root): `[announce]` through bird2 and BGP (announced with
//! quorum, withdrawn on quorum loss and before udplb stops), ECMP over three balancers (a dead
//! balancer's flows keep their backend through the others, the survivors lose nothing), a
//! keepalived VRRP pair (failover with every flow on its backend; a master that loses its
//! backends hands over), and `udplb ctl ready`, what keepalived tracks.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Net, ip, serve_if_asked};
use common::*;

/// Not a test on its own: the backend, an echo in the balancer's namespace.
#[test]
fn announce_backend_in_namespace() {
    serve_if_asked("UDPLB_TEST_ANNOUNCE_ECHO", |data, _| {
        let mut out = b"a:".to_vec();
        out.extend_from_slice(data);
        out
    });
}

/// A router and a balancer namespace linked to each other, each with bird2 (BGP between
/// them, the balancer exporting a disabled static route to the virtual address).
struct Topology {
    tag: u32,
    router: String,
    balancer: String,
    net: Net,
}

impl Topology {
    /// `Err` when this host cannot make namespaces (a skip); a failure after that panics.
    fn create(tag: u32) -> Result<Topology, String> {
        let mut net = Net::new(scratch_dir("announce"));
        let (router, balancer) = (format!("ulba-r{tag}"), format!("ulba-b{tag}"));
        net.add(&router)?;
        let built = (|| -> Result<(), String> {
            net.add(&balancer)?;
            net.link(
                &router,
                "rb0",
                &format!("10.94.{tag}.1/30"),
                &balancer,
                "uplink0",
                &format!("10.94.{tag}.2/30"),
            )?;
            ip(&[
                "-n",
                &balancer,
                "addr",
                "add",
                &format!("10.96.{tag}.1/32"),
                "dev",
                "lo",
            ])
        })();
        if let Err(why) = built {
            panic!("building the topology: {why}");
        }
        let t = tag;
        let timers = "hold time 3; keepalive time 1; connect delay time 1; \
                      connect retry time 1; error wait time 1, 2;";
        net.bird(
            &router,
            "router",
            &format!(
                "router id 10.94.{t}.1;\n\
                 protocol device {{ scan time 1; }}\n\
                 protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
                 protocol bgp balancer {{ local 10.94.{t}.1 as 65000; neighbor 10.94.{t}.2 as 65001; \
                 {timers} ipv4 {{ import all; export none; }}; }}\n"
            ),
        );
        net.bird(
            &balancer,
            "balancer",
            &format!(
                "router id 10.94.{t}.2;\n\
                 protocol device {{ scan time 1; }}\n\
                 protocol static vip {{ disabled; ipv4; route 10.96.{t}.1/32 blackhole; }}\n\
                 protocol bgp uplink {{ local 10.94.{t}.2 as 65001; neighbor 10.94.{t}.1 as 65000; \
                 {timers} ipv4 {{ import none; export where proto = \"vip\"; next hop self; }}; }}\n"
            ),
        );
        Ok(Topology {
            tag,
            router,
            balancer,
            net,
        })
    }

    fn vip(&self) -> String {
        format!("10.96.{}.1", self.tag)
    }

    fn control(&self) -> PathBuf {
        self.net.dir.join("balancer.ctl")
    }

    /// Whether the router has a route to the virtual address through the balancer.
    fn routed(&self) -> bool {
        next_hops(&self.router, &self.vip()) == 1
    }

    fn backend(&self, port: u16) -> Child {
        Net::helper(
            &self.balancer,
            "announce_backend_in_namespace",
            &[("UDPLB_TEST_ANNOUNCE_ECHO", format!("127.0.0.1:{port}"))],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    }

    /// udplb in the balancer's namespace on `config`, its log in `log`.
    fn udplb(&self, config: &Path, log: &Path) -> Child {
        Net::udplb(&self.balancer, config, log).spawn().unwrap()
    }
}

/// Waits until `cond` holds (at most `limit`); returns how long it took.
fn took(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    wait_for(limit, &mut cond).then(|| start.elapsed())
}

#[test]
fn udplb_announces_with_quorum_and_withdraws_on_quorum_loss_and_before_it_stops() {
    if !is_root() {
        eprintln!("skipped: network namespaces and bird need root");
        return;
    }
    need("bird", "bird2");
    need("birdc", "bird2");
    let topo = match Topology::create(std::process::id() % 200) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: cannot build the namespaces here: {why}");
            return;
        }
    };
    let port = 7000;
    let mut backend = topo.backend(port);
    let control = topo.control().display().to_string();
    let birdc = |verb: &str| format!("[\"birdc\", \"-s\", \"{control}\", \"{verb}\", \"vip\"]");
    let listen: SocketAddr = format!("{}:5300", topo.vip()).parse().unwrap();
    let config = topo.net.dir.join("udplb.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:9190\"\n\
             [announce]\nup = {}\ndown = {}\nwithdraw_delay = \"1500ms\"\n\
             [listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:{port}\"]\n[pools.p.health]\n{}\n",
            birdc("enable"),
            birdc("disable"),
            udp_check(200, 200, 1, 1),
        ),
    )
    .unwrap();
    let log = topo.net.dir.join("udplb.log");
    let mut lb = topo.udplb(&config, &log);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    // Announced once the pool holds its quorum (bird's BGP session comes up meanwhile).
    let announced = took(Duration::from_secs(30), || topo.routed());
    assert!(announced.is_some(), "never announced: {}", logged());
    // Round robin behind a router: udplb says placement differs between instances.
    assert!(
        logged().contains("use scheduler = \"maglev\""),
        "{}",
        logged()
    );
    let ctl_status = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &topo.balancer])
            .arg(env!("CARGO_BIN_EXE_udplb"))
            .args(["ctl", "--admin", "127.0.0.1:9190", "status"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        ctl_status().contains("announce: announced (for "),
        "{}",
        ctl_status()
    );

    // The only backend dies: the quorum is lost, the route withdrawn.
    let _ = backend.kill();
    let _ = backend.wait();
    let lost = took(DEADLINE, || !topo.routed()).expect("not withdrawn on a lost quorum");
    assert!(
        wait_for(DEADLINE, || ctl_status()
            .contains("announce: withdrawn (for ")
            && ctl_status().contains("not wanted: pool p below its quorum")),
        "{}",
        ctl_status()
    );
    backend = topo.backend(port);
    let back = took(DEADLINE, || topo.routed()).expect("not announced again");

    // SIGTERM: the router loses the route while udplb still runs (and serves), then it exits.
    let stop = Instant::now();
    signal(lb.id(), "TERM");
    let withdrawn = took(DEADLINE, || !topo.routed()).expect("not withdrawn at shutdown");
    assert!(
        matches!(lb.try_wait(), Ok(None)),
        "udplb stopped before the route was withdrawn: {}",
        logged()
    );
    let exited = loop {
        if let Ok(Some(status)) = lb.try_wait() {
            break status;
        }
        assert!(
            stop.elapsed() < DEADLINE,
            "udplb did not exit: {}",
            logged()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped = stop.elapsed();
    assert!(exited.success(), "{}", logged());
    assert!(
        stopped >= withdrawn + Duration::from_millis(1_000),
        "udplb stopped {stopped:?} after SIGTERM, the route went {withdrawn:?}: it must serve \
         on for the withdraw delay"
    );
    let _ = backend.kill();
    let _ = backend.wait();
    eprintln!(
        "announce: announced {announced:?} after start; withdrawn {lost:?} after the backend \
         died, announced {back:?} after it came back; at SIGTERM withdrawn after {withdrawn:?}, \
         exited after {stopped:?}"
    );
}

/// Not a test on its own: a backend of the ECMP test, answering `TAG:payload`.
#[test]
fn ecmp_backend_in_namespace() {
    let tag = std::env::var("UDPLB_TEST_ECMP_TAG").unwrap_or_default();
    serve_if_asked("UDPLB_TEST_ECMP_BACKEND", move |data, _| {
        let mut out = format!("{tag}:").into_bytes();
        out.extend_from_slice(data);
        out
    });
}

/// Not a test on its own: the ECMP test's clients. Every flow (its own socket) sends
/// `FLOW/SEQ` every 10 ms for UDPLB_TEST_ECMP_MS; then prints, per flow, one line
/// `flow F tags T1,T2,... lost MS1,MS2,...` (the backend tag of each reply in order, and the
/// send time of each request never answered, in ms since the start).
#[test]
fn ecmp_client_in_namespace() {
    let Ok(target) = std::env::var("UDPLB_TEST_ECMP_TARGET") else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let flows: usize = std::env::var("UDPLB_TEST_ECMP_FLOWS")
        .unwrap()
        .parse()
        .unwrap();
    let run = Duration::from_millis(
        std::env::var("UDPLB_TEST_ECMP_MS")
            .unwrap()
            .parse()
            .unwrap(),
    );
    let sockets: Vec<std::net::UdpSocket> = (0..flows)
        .map(|_| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let mut sent: Vec<Vec<u64>> = vec![Vec::new(); flows];
    let mut answered: Vec<std::collections::HashSet<u64>> = vec![Default::default(); flows];
    let mut tags: Vec<Vec<String>> = vec![Vec::new(); flows];
    let mut buf = [0u8; 256];
    let mut drain = |answered: &mut Vec<std::collections::HashSet<u64>>,
                     tags: &mut Vec<Vec<String>>| {
        for (f, s) in sockets.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (tag, rest) = text.split_once(':').unwrap_or(("?", ""));
                if let Some(seq) = rest.split('/').nth(1).and_then(|s| s.parse().ok()) {
                    answered[f].insert(seq);
                }
                tags[f].push(tag.to_string());
            }
        }
    };
    while start.elapsed() < run {
        for (f, s) in sockets.iter().enumerate() {
            let seq = sent[f].len() as u64;
            if s.send_to(format!("{f}/{seq}").as_bytes(), target).is_ok() {
                sent[f].push(start.elapsed().as_millis() as u64);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        drain(&mut answered, &mut tags);
    }
    let end = Instant::now();
    while end.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
        drain(&mut answered, &mut tags);
    }
    for f in 0..flows {
        let lost: Vec<String> = sent[f]
            .iter()
            .enumerate()
            .filter(|(seq, _)| !answered[f].contains(&(*seq as u64)))
            .map(|(_, ms)| ms.to_string())
            .collect();
        println!(
            "flow {f} tags {} lost {}",
            tags[f].join(","),
            lost.join(",")
        );
    }
}

/// `n` (at most 4) backends in `ns` on `ip`:7001.., answering with their tags x, y, z and w.
fn tagged_backends(net: &mut Net, ns: &str, ip: &str, n: usize) {
    for (i, tag) in ["x", "y", "z", "w"].iter().take(n).enumerate() {
        let child = Net::helper(
            ns,
            "ecmp_backend_in_namespace",
            &[
                ("UDPLB_TEST_ECMP_BACKEND", format!("{ip}:{}", 7001 + i)),
                ("UDPLB_TEST_ECMP_TAG", tag.to_string()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        net.keep(child);
    }
}

/// A balancer's udplb configuration: the admin endpoint on loopback, `sections` (e.g.
/// `[announce]`), the listener on `vip`:5300 and Maglev over the first `n` of the
/// [`tagged_backends`] on `backends_ip`, UDP-checked. The same on every balancer: each places
/// a client alike.
fn balancer_toml(vip: &str, backends_ip: &str, n: u16, sections: &str) -> String {
    let backends: Vec<String> = (7001..7001 + n)
        .map(|p| format!("\"{backends_ip}:{p}\""))
        .collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:9190\"\n{sections}\
         [listeners.l]\naddress = \"{vip}:5300\"\npool = \"p\"\nidle_timeout = \"5s\"\n\
         [pools.p]\nscheduler = \"maglev\"\nbackends = [{}]\n[pools.p.health]\n{}\n",
        backends.join(", "),
        udp_check(200, 200, 1, 2),
    )
}

/// udplb in `ns` on `toml` (kept in `name`.toml, its log in `name`.log); returns its pid.
fn run_balancer(net: &mut Net, ns: &str, name: &str, toml: &str) -> u32 {
    let config = net.dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    let log = net.dir.join(format!("{name}.log"));
    let child = Net::udplb(ns, &config, &log).spawn().unwrap();
    net.keep(child)
}

/// The router's next hops towards `vip`.
fn next_hops(router: &str, vip: &str) -> usize {
    let out = Command::new("ip")
        .args(["-n", router, "route", "show", vip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hops = text.matches("nexthop via").count();
    if hops == 0 && text.contains(" via ") {
        1
    } else {
        hops
    }
}

/// A router learning the virtual address over BGP from three balancers (bird2 on each, ECMP
/// with an L4 hash), tagged backends behind the router, and a client host, in namespaces the
/// test makes. udplb is started on the balancers by the test.
struct Ecmp {
    net: Net,
    t: u32,
    router: String,
    clients: String,
    balancers: Vec<String>,
    vip: String,
    /// Each balancer's udplb and bird.
    udplb: Vec<u32>,
    birds: Vec<u32>,
}

impl Ecmp {
    /// The topology with `backends` tagged backends, its namespaces named after `prefix`;
    /// `None` (said why) without root or bird2.
    fn build(prefix: &str, backends: usize) -> Option<Ecmp> {
        if !is_root() {
            eprintln!("skipped: network namespaces and bird need root");
            return None;
        }
        need("bird", "bird2");
        need("curl", "curl");
        let t = std::process::id() % 200;
        let mut net = Net::new(scratch_dir(prefix));
        let (r, c, k) = (
            format!("{prefix}-r{t}"),
            format!("{prefix}-c{t}"),
            format!("{prefix}-k{t}"),
        );
        let balancers: Vec<String> = (1..=3).map(|i| format!("{prefix}-b{i}-{t}")).collect();
        if let Err(why) = net.add(&r) {
            eprintln!("skipped: cannot make network namespaces here: {why}");
            return None;
        }
        let vip = format!("10.96.{t}.1");
        if let Err(why) = Self::link(&mut net, t, &r, &c, &k, &balancers, &vip) {
            panic!("building the topology: {why}");
        }
        let timers = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; \
                      error wait time 1, 2;";
        let mut router = format!(
            "router id 10.92.{t}.1;\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n"
        );
        for i in 1..=3 {
            let base = 4 * i;
            router += &format!(
                "protocol bgp b{i} {{ local 10.94.{t}.{} as 65000; neighbor 10.94.{t}.{} as \
                 65001; {timers} ipv4 {{ import all; export none; }}; }}\n",
                base + 1,
                base + 2
            );
        }
        net.bird(&r, "router", &router);
        tagged_backends(&mut net, &k, &format!("10.91.{t}.2"), backends);
        let mut birds = Vec::new();
        for (i, b) in balancers.iter().enumerate() {
            let base = 4 * (i + 1);
            let bird_conf = format!(
                "router id 10.94.{t}.{};\nprotocol device {{ scan time 1; }}\n\
                 protocol static vip {{ disabled; ipv4; route {vip}/32 blackhole; }}\n\
                 protocol bgp uplink {{ local 10.94.{t}.{} as 65001; neighbor 10.94.{t}.{} as \
                 65000; {timers} ipv4 {{ import none; export where proto = \"vip\"; next hop \
                 self; }}; }}\n",
                base + 2,
                base + 2,
                base + 1
            );
            birds.push(net.bird(b, &format!("b{}", i + 1), &bird_conf));
        }
        Some(Ecmp {
            net,
            t,
            router: r,
            clients: c,
            balancers,
            vip,
            udplb: Vec::new(),
            birds,
        })
    }

    /// Namespaces, links, routes and the router's ECMP hashing.
    fn link(
        net: &mut Net,
        t: u32,
        r: &str,
        c: &str,
        k: &str,
        balancers: &[String],
        vip: &str,
    ) -> Result<(), String> {
        for ns in [c, k]
            .into_iter()
            .chain(balancers.iter().map(String::as_str))
        {
            net.add(ns)?;
        }
        net.link(
            r,
            "rc",
            &format!("10.92.{t}.1/30"),
            c,
            "cr",
            &format!("10.92.{t}.2/30"),
        )?;
        net.link(
            r,
            "rk",
            &format!("10.91.{t}.1/30"),
            k,
            "kr",
            &format!("10.91.{t}.2/30"),
        )?;
        ip(&[
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &format!("10.92.{t}.1"),
        ])?;
        ip(&[
            "-n",
            k,
            "route",
            "add",
            "default",
            "via",
            &format!("10.91.{t}.1"),
        ])?;
        for (i, b) in balancers.iter().enumerate() {
            let base = 4 * (i + 1);
            net.link(
                r,
                &format!("rb{}", i + 1),
                &format!("10.94.{t}.{}/30", base + 1),
                b,
                "uplink0",
                &format!("10.94.{t}.{}/30", base + 2),
            )?;
            let gateway = format!("10.94.{t}.{}", base + 1);
            ip(&["-n", b, "route", "add", "default", "via", &gateway])?;
            ip(&["-n", b, "addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        }
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
        ] {
            let ok = Net::exec(r, Path::new("sysctl"))
                .args(["-q", "-w", sysctl])
                .status()
                .map_err(|e| e.to_string())?;
            if !ok.success() {
                return Err(format!("sysctl {sysctl} failed"));
            }
        }
        Ok(())
    }

    /// Balancer `i`'s address on its link to the router.
    fn uplink(&self, i: usize) -> String {
        format!("10.94.{}.{}", self.t, 4 * (i + 1) + 2)
    }

    /// Balancer `i`'s `[announce]`: enabling and disabling its bird's `vip` protocol.
    fn announce(&self, i: usize) -> String {
        let control = self.net.dir.join(format!("b{}.ctl", i + 1));
        let birdc = |verb: &str| {
            format!(
                "[\"birdc\", \"-s\", \"{}\", \"{verb}\", \"vip\"]",
                control.display()
            )
        };
        format!(
            "[announce]\nup = {}\ndown = {}\nwithdraw_delay = \"2s\"\n",
            birdc("enable"),
            birdc("disable")
        )
    }

    /// Starts udplb on balancer `i` with `toml`.
    fn start_udplb(&mut self, i: usize, toml: &str) {
        let (ns, name) = (self.balancers[i].clone(), format!("b{}", i + 1));
        let pid = run_balancer(&mut self.net, &ns, &name, toml);
        self.udplb.push(pid);
    }

    fn logs(&self) -> String {
        (1..=3)
            .map(|i| {
                std::fs::read_to_string(self.net.dir.join(format!("b{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Waits until the router has a route to the virtual address through every balancer.
    fn wait_for_every_balancer(&self) {
        assert!(
            wait_for(Duration::from_secs(30), || next_hops(
                &self.router,
                &self.vip
            ) == 3),
            "the router never had three next hops: {}",
            self.logs()
        );
    }

    /// `flows` clients, each sending every 10 ms for `ms` ([`ecmp_client_in_namespace`]).
    fn clients(&self, flows: usize, ms: u64) -> Child {
        Net::helper(
            &self.clients,
            "ecmp_client_in_namespace",
            &[
                ("UDPLB_TEST_ECMP_TARGET", format!("{}:5300", self.vip)),
                ("UDPLB_TEST_ECMP_FLOWS", flows.to_string()),
                ("UDPLB_TEST_ECMP_MS", ms.to_string()),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    }

    /// The `/stats` of balancer `i`'s udplb.
    fn stats(&self, i: usize) -> serde_json::Value {
        let out = Net::exec(&self.balancers[i], Path::new("curl"))
            .args(["-s", "127.0.0.1:9190/stats"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Kills balancer `i`: udplb and bird (its BGP session goes with it).
    fn kill(&self, i: usize) {
        signal(self.udplb[i], "KILL");
        signal(self.birds[i], "KILL");
    }
}

#[test]
fn ecmp_over_three_balancers_loses_nothing_of_survivors_and_keeps_every_flow_on_its_backend() {
    let Some(mut ecmp) = Ecmp::build("ulbe", 3) else {
        return;
    };
    // The same configuration on every balancer: Maglev places a client alike on each.
    for i in 0..3 {
        let backends = format!("10.91.{}.2", ecmp.t);
        let toml = balancer_toml(&ecmp.vip, &backends, 3, &ecmp.announce(i));
        ecmp.start_udplb(i, &toml);
    }
    ecmp.wait_for_every_balancer();
    let (r, vip) = (ecmp.router.clone(), ecmp.vip.clone());

    // Steady load from 60 clients for 9 s.
    let flows = 60;
    let client = ecmp.clients(flows, 9000);
    let started = Instant::now();
    let flows_on = |i: usize| {
        ecmp.stats(i)["listeners"][0]["flows"]["live"]
            .as_u64()
            .unwrap_or(0)
    };

    // 3 s in: balancer 2 dies, udplb and bird (its BGP session goes with it).
    std::thread::sleep(Duration::from_millis(3_000).saturating_sub(started.elapsed()));
    let on_dead = flows_on(1);
    let killed_at = started.elapsed();
    ecmp.kill(1);
    let dead_withdrawn =
        took(DEADLINE, || next_hops(&r, &vip) == 2).expect("the dead balancer's route stayed");

    // 6 s in: balancer 3 is stopped: it withdraws first, then drains.
    std::thread::sleep(Duration::from_millis(6_000).saturating_sub(started.elapsed()));
    let drained_at = started.elapsed();
    signal(ecmp.udplb[2], "TERM");
    let drain_withdrawn =
        took(DEADLINE, || next_hops(&r, &vip) == 1).expect("the stopped balancer did not withdraw");
    let still_running = std::fs::read_to_string(format!("/proc/{}/stat", ecmp.udplb[2])).is_ok();

    let out = client.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (moved, lossy, lost_at) = client_report(&report, flows);
    let window = (killed_at.as_millis() as u64).saturating_sub(100)
        ..=(killed_at + dead_withdrawn).as_millis() as u64 + 1_000;
    let late_losses = lost_at.iter().filter(|ms| !window.contains(ms)).count();
    let total_lost = lost_at.len();
    eprintln!(
        "ecmp: 3 balancers, {flows} flows; balancer 2 killed at {killed_at:?} with {on_dead} flows: \
         route withdrawn after {dead_withdrawn:?}, {lossy} flows lost {total_lost} datagrams; \
         balancer 3 stopped at {drained_at:?}: route withdrawn after {drain_withdrawn:?} (still \
         running then: {still_running}); {moved} flows changed backend; losses outside the \
         kill window: {late_losses}"
    );
    assert!(still_running, "balancer 3 stopped before it withdrew");
    assert_eq!(moved, 0, "flows changed backend: {report}");
    assert!(
        lossy as u64 <= on_dead,
        "{lossy} flows lost datagrams, only {on_dead} were on the dead balancer: {report}"
    );
    assert_eq!(
        late_losses, 0,
        "datagrams lost outside the kill window: {report}"
    );
}

/// A backend is added on every balancer (a reload), then a balancer dies: the flows the
/// router moves to the survivors (the dead one's, and those the re-hash shuffles) are placed
/// afresh there, by a Maglev table that now has the new backend. With `sync`, each balancer
/// has told the others where its flows go; returns how many of `flows` changed backend, and
/// how many the survivors placed from what a peer told them.
fn backend_change_then_a_balancer_dies(
    prefix: &str,
    sync: bool,
    flows: usize,
) -> Option<(usize, u64)> {
    let mut ecmp = Ecmp::build(prefix, 4)?;
    let key = ecmp.net.dir.join("sync.key");
    std::fs::write(&key, "a-key-every-balancer-shares\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let backends = format!("10.91.{}.2", ecmp.t);
    let tomls: Vec<(String, String)> = (0..3)
        .map(|i| {
            let peers: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("\"{}:7946\"", ecmp.uplink(j)))
                .collect();
            let sections = if sync {
                format!(
                    "{}[sync]\nlisten = \"{}:7946\"\npeers = [{}]\nkey_file = \"{}\"\n",
                    ecmp.announce(i),
                    ecmp.uplink(i),
                    peers.join(", "),
                    key.display()
                )
            } else {
                ecmp.announce(i)
            };
            (
                balancer_toml(&ecmp.vip, &backends, 3, &sections),
                balancer_toml(&ecmp.vip, &backends, 4, &sections),
            )
        })
        .collect();
    for (i, (before, _)) in tomls.iter().enumerate() {
        ecmp.start_udplb(i, before);
    }
    ecmp.wait_for_every_balancer();
    let client = ecmp.clients(flows, 7000);
    let started = Instant::now();
    // 1.5 s in: a fourth backend on every balancer; established flows stay where they are.
    std::thread::sleep(Duration::from_millis(1_500));
    for (i, (_, after)) in tomls.iter().enumerate() {
        std::fs::write(ecmp.net.dir.join(format!("b{}.toml", i + 1)), after).unwrap();
        signal(ecmp.udplb[i], "HUP");
    }
    let fourth_up =
        |i: usize| ecmp.stats(i)["pools"][0]["backends"][3]["healthy"].as_bool() == Some(true);
    assert!(
        wait_for(DEADLINE, || (0..3).all(fourth_up)),
        "the fourth backend never came up everywhere: {}",
        ecmp.logs()
    );
    // 3 s in: balancer 2 dies.
    std::thread::sleep(Duration::from_millis(3_000).saturating_sub(started.elapsed()));
    ecmp.kill(1);
    let withdrawn = took(DEADLINE, || next_hops(&ecmp.router, &ecmp.vip) == 2)
        .expect("the dead balancer's route stayed");
    let out = client.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (moved, lossy, _) = client_report(&report, flows);
    let used: u64 = [0, 2]
        .iter()
        .map(|&i| {
            let out = Net::exec(&ecmp.balancers[i], Path::new("curl"))
                .args(["-s", "127.0.0.1:9190/metrics"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| {
                    let v: f64 = l
                        .strip_prefix("udplb_sync_placements_used_total ")?
                        .parse()
                        .ok()?;
                    Some(v as u64)
                })
                .unwrap_or(0)
        })
        .sum();
    eprintln!(
        "ecmp, backend added then balancer 2 killed (sync {sync}): {flows} flows, route withdrawn \
         after {withdrawn:?}, {lossy} flows lost datagrams (the dead balancer's, until then); \
         {moved} flows changed backend; {used} flows placed by what a peer told"
    );
    Some((moved, used))
}

#[test]
fn with_flow_sync_no_flow_moves_when_a_backend_change_and_a_balancer_death_coincide() {
    let flows = 120;
    let Some((moved, used)) = backend_change_then_a_balancer_dies("ulbs", true, flows) else {
        return;
    };
    assert_eq!(moved, 0, "flows changed backend");
    assert!(used > 0, "no flow was placed by what a peer told");
}

#[test]
fn without_flow_sync_some_flows_move_when_a_backend_change_and_a_balancer_death_coincide() {
    // What the sync is for: consistent hashing alone moves some established flows here.
    let Some((moved, used)) = backend_change_then_a_balancer_dies("ulbn", false, 120) else {
        return;
    };
    assert!(moved > 0, "no flow moved: the scenario shows nothing");
    assert_eq!(used, 0);
}

/// `udplb ctl ready` (`GET /api/v1/ready`), what keepalived's track_script runs: 0 while the
/// pool holds its quorum with a backend up, 1 with the reason once its only backend is down.
#[test]
fn ctl_ready_says_whether_udplb_should_get_traffic() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = run_one_pool(
        "127.0.0.1",
        "",
        &[quoted(a.addr)],
        &format!("[pools.p.health]\n{}", udp_check(100, 100, 1, 1)),
    );
    let ready = || {
        let out = udplb_command()
            .args(["ctl", "--admin", &lb.admin.to_string(), "ready"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(wait_for(DEADLINE, || ready().0 == Some(0)), "{:?}", ready());
    a.mute(true);
    assert!(wait_for(DEADLINE, || ready().0 == Some(1)), "{:?}", ready());
    let (_, said) = ready();
    assert!(
        said.contains("503") && said.contains("pool p below its quorum"),
        "{said}"
    );
    a.mute(false);
    assert!(wait_for(DEADLINE, || ready().0 == Some(0)), "{:?}", ready());
}

/// The client lines of [`ecmp_client_in_namespace`]: flows whose replies came from more than
/// one backend, flows that lost datagrams, and the send times (ms) of the datagrams lost.
fn client_report(report: &str, flows: usize) -> (usize, usize, Vec<u64>) {
    let lines: Vec<&str> = report
        .lines()
        .filter_map(|l| l.find("flow ").map(|at| &l[at..]))
        .collect();
    assert_eq!(lines.len(), flows, "client output: {report}");
    let (mut moved, mut lossy, mut lost_at) = (0, 0, Vec::new());
    for line in &lines {
        let (_, rest) = line.split_once(" tags ").unwrap();
        let (tags, lost) = rest.split_once(" lost").unwrap();
        let tags: Vec<&str> = tags.split(',').collect();
        if tags.iter().any(|t| *t != tags[0]) {
            moved += 1;
        }
        let lost: Vec<u64> = lost
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        if !lost.is_empty() {
            lossy += 1;
        }
        lost_at.extend(lost);
    }
    (moved, lossy, lost_at)
}

/// Whether `ns` holds address `ip`.
fn holds(ns: &str, ip: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/"))
}

/// Kills every process in namespace `ns` (a host that fails).
fn kill_all_in(ns: &str) {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        signal(pid.parse().unwrap(), "KILL");
    }
}

/// A keepalived VRRP pair (master priority 150, backup 100, adverts every 200 ms, udplb's
/// readiness as track_script) with udplb on both, three backends and a client host on one
/// LAN, in namespaces the test makes. `None`: skipped (not root, or no namespaces here).
struct Vrrp {
    net: Net,
    t: u32,
    vip: String,
}

impl Vrrp {
    fn ns(&self, h: &str) -> String {
        format!("ulbv-{h}{}", self.t)
    }

    fn logs(&self) -> String {
        ["m.log", "s.log", "m-keepalived.log", "s-keepalived.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.net.dir.join(f)).unwrap_or_default();
                format!("== {f}\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Steady load from 60 clients for `ms`; returns the client to wait for.
    fn load(&self, ms: u64) -> Child {
        Net::helper(
            &self.ns("c"),
            "ecmp_client_in_namespace",
            &[
                ("UDPLB_TEST_ECMP_TARGET", format!("{}:5300", self.vip)),
                ("UDPLB_TEST_ECMP_FLOWS", "60".into()),
                ("UDPLB_TEST_ECMP_MS", ms.to_string()),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    }

    fn start(name: &str, t: u32) -> Option<Vrrp> {
        if !is_root() {
            eprintln!("skipped: network namespaces and keepalived need root");
            return None;
        }
        need("keepalived", "keepalived");
        let mut net = Net::new(scratch_dir(name));
        let sw = format!("ulbv-sw{t}");
        if let Err(why) = net.add(&sw) {
            eprintln!("skipped: cannot make network namespaces here: {why}");
            return None;
        }
        let hosts = [("m", 2), ("s", 3), ("c", 10), ("k", 20)];
        let ns = |h: &str| format!("ulbv-{h}{t}");
        let built = (|| -> Result<(), String> {
            ip(&["-n", &sw, "link", "add", "lan", "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", "lan", "up"])?;
            for (h, n) in hosts {
                let name = ns(h);
                net.add(&name)?;
                let port = format!("p{h}");
                ip(&[
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &name,
                ])?;
                ip(&["-n", &sw, "link", "set", &port, "master", "lan"])?;
                ip(&["-n", &sw, "link", "set", &port, "up"])?;
                ip(&[
                    "-n",
                    &name,
                    "addr",
                    "add",
                    &format!("10.89.{t}.{n}/24"),
                    "dev",
                    "eth0",
                ])?;
                ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            }
            Ok(())
        })();
        if let Err(why) = built {
            panic!("building the topology: {why}");
        }
        let vip = format!("10.89.{t}.100");
        tagged_backends(&mut net, &ns("k"), &format!("10.89.{t}.20"), 3);
        let udplb_bin = env!("CARGO_BIN_EXE_udplb");
        for (h, priority) in [("m", 150), ("s", 100)] {
            let name = ns(h);
            // The same udplb on both: listening on the address before owning it (IP_FREEBIND).
            let toml = balancer_toml(&vip, &format!("10.89.{t}.20"), 3, "");
            run_balancer(&mut net, &name, h, &toml);
            let keepalived = net.dir.join(format!("{h}-keepalived.conf"));
            std::fs::write(
                &keepalived,
                format!(
                    "global_defs {{\n  router_id udplb_{h}\n  script_user root\n  vrrp_version 3\n}}\n\
                     vrrp_script udplb_ready {{\n  script \"{udplb_bin} ctl --admin 127.0.0.1:9190 ready\"\n  \
                     interval 1\n  fall 2\n  rise 1\n}}\n\
                     vrrp_instance vi {{\n  state BACKUP\n  interface eth0\n  virtual_router_id {}\n  \
                     priority {priority}\n  advert_int 0.2\n  virtual_ipaddress {{\n    {vip}/24 dev eth0\n  }}\n  \
                     track_script {{\n    udplb_ready\n  }}\n}}\n",
                    50 + t % 200
                ),
            )
            .unwrap();
            let pid = |what: &str| net.dir.join(format!("{h}-{what}.pid"));
            let child = Net::exec(&name, Path::new("keepalived"))
                .args(["-n", "-l", "-P", "-f"])
                .arg(&keepalived)
                .arg("-p")
                .arg(pid("main"))
                .arg("-r")
                .arg(pid("vrrp"))
                .stdout(std::fs::File::create(net.dir.join(format!("{h}-keepalived.log"))).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            net.keep(child);
        }
        let pair = Vrrp { net, t, vip };
        assert!(
            wait_for(Duration::from_secs(20), || holds(&pair.ns("m"), &pair.vip)
                && !holds(&pair.ns("s"), &pair.vip)),
            "the master never took the address: {}",
            pair.logs()
        );
        Some(pair)
    }
}

#[test]
fn a_vrrp_pair_fails_over_with_every_flow_on_its_backend() {
    let Some(pair) = Vrrp::start("vrrp", std::process::id() % 200) else {
        return;
    };
    let flows = 60;
    let client = pair.load(6_000);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(2_000));
    // The master host fails: keepalived and udplb gone at once.
    let failed_at = started.elapsed();
    kill_all_in(&pair.ns("m"));
    let failover =
        took(DEADLINE, || holds(&pair.ns("s"), &pair.vip)).expect("the backup never took over");
    let out = client.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (moved, lossy, lost_at) = client_report(&report, flows);
    let window = (failed_at.as_millis() as u64).saturating_sub(100)
        ..=(failed_at + failover).as_millis() as u64 + 500;
    let late = lost_at.iter().filter(|ms| !window.contains(ms)).count();
    eprintln!(
        "vrrp: master failed at {failed_at:?}; the backup held the address after {failover:?}; \
         {lossy} of {flows} flows lost {} datagrams, {late} of them outside the failover; {moved} \
         flows changed backend",
        lost_at.len()
    );
    assert_eq!(moved, 0, "flows changed backend: {report}\n{}", pair.logs());
    assert_eq!(
        late,
        0,
        "datagrams lost after the failover: {report}\n{}",
        pair.logs()
    );
}

#[test]
fn a_vrrp_master_whose_pool_loses_its_quorum_hands_the_address_over() {
    // Another tag: the two pairs run side by side.
    let Some(pair) = Vrrp::start("vrrp-quorum", (std::process::id() + 100) % 200) else {
        return;
    };
    let flows = 60;
    let client = pair.load(7_000);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(2_000));
    // The master can no longer reach the backends: its udplb is not ready, keepalived's
    // track_script fails, and the backup, which reaches them, takes the address.
    let cut_at = started.elapsed();
    ip(&[
        "-n",
        &pair.ns("m"),
        "route",
        "add",
        "blackhole",
        &format!("10.89.{}.20/32", pair.t),
    ])
    .unwrap();
    let handed = took(Duration::from_secs(15), || holds(&pair.ns("s"), &pair.vip))
        .expect("the backup never took over");
    assert!(!holds(&pair.ns("m"), &pair.vip), "both hold the address");
    let out = client.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (moved, lossy, lost_at) = client_report(&report, flows);
    let after = lost_at
        .iter()
        .filter(|&&ms| ms > (cut_at + handed).as_millis() as u64 + 500)
        .count();
    eprintln!(
        "vrrp quorum: master cut from its backends at {cut_at:?}; the backup held the address \
         after {handed:?}; {lossy} of {flows} flows lost {} datagrams ({after} after the \
         handover); {moved} flows changed backend",
        lost_at.len()
    );
    assert_eq!(moved, 0, "flows changed backend: {report}\n{}", pair.logs());
    assert_eq!(
        after,
        0,
        "datagrams lost after the handover: {report}\n{}",
        pair.logs()
    );
}
