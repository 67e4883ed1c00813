//! `[announce]` with a real routing daemon: bird2 on a balancer host exports the virtual
//! address over BGP to bird2 on a router host, in network namespaces the test makes. udplb
//! announces (`birdc enable vip`) once its pool holds its quorum, withdraws when the quorum is
//! lost and announces again when it is back, and at SIGTERM withdraws before it stops: the
//! router loses the route while udplb still serves. Needs root and bird2; skipped without root.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Namespace, ip, serve_if_asked};
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

/// A router and a balancer namespace linked to each other (and, unused, to the host), each
/// with bird2; the processes started in them are killed on drop.
struct Topology {
    tag: u32,
    router: Namespace,
    balancer: Namespace,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Topology {
    fn create(tag: u32) -> Result<Topology, String> {
        let router = Namespace::create(
            &format!("ulba-r{tag}"),
            &format!("ulbar{tag}"),
            &format!("ulbar{tag}p"),
            &format!("10.93.{tag}.1/30"),
            &format!("10.93.{tag}.2/30"),
            None,
        )?;
        let balancer = Namespace::create(
            &format!("ulba-b{tag}"),
            &format!("ulbab{tag}"),
            &format!("ulbab{tag}p"),
            &format!("10.93.{tag}.5/30"),
            &format!("10.93.{tag}.6/30"),
            None,
        )?;
        let (r, b) = (router.name.as_str(), balancer.name.as_str());
        ip(&[
            "-n", r, "link", "add", "rb0", "type", "veth", "peer", "name", "br0", "netns", b,
        ])?;
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("10.94.{tag}.1/30"),
            "dev",
            "rb0",
        ])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("10.94.{tag}.2/30"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", r, "link", "set", "rb0", "up"])?;
        ip(&["-n", b, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("10.96.{tag}.1/32"),
            "dev",
            "lo",
        ])?;
        balancer.can_exec()?;
        Ok(Topology {
            tag,
            router,
            balancer,
            dir: scratch_dir("announce"),
            children: Vec::new(),
        })
    }

    fn vip(&self) -> String {
        format!("10.96.{}.1", self.tag)
    }

    fn control(&self) -> PathBuf {
        self.dir.join("balancer.ctl")
    }

    /// Starts bird in `ns` with `config`, in the foreground (killed on drop).
    fn bird(&mut self, ns: &str, name: &str, config: String) {
        let file = self.dir.join(format!("{name}.conf"));
        std::fs::write(&file, config).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(&file)
            .arg("-s")
            .arg(self.dir.join(format!("{name}.ctl")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        self.children.push(child);
    }

    fn start_birds(&mut self) {
        let t = self.tag;
        let timers = "hold time 3; keepalive time 1; connect delay time 1; \
                      connect retry time 1; error wait time 1, 2;";
        let router = format!(
            "router id 10.94.{t}.1;\n\
             protocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol bgp balancer {{ local 10.94.{t}.1 as 65000; neighbor 10.94.{t}.2 as 65001; \
             {timers} ipv4 {{ import all; export none; }}; }}\n"
        );
        let balancer = format!(
            "router id 10.94.{t}.2;\n\
             protocol device {{ scan time 1; }}\n\
             protocol static vip {{ disabled; ipv4; route 10.96.{t}.1/32 blackhole; }}\n\
             protocol bgp uplink {{ local 10.94.{t}.2 as 65001; neighbor 10.94.{t}.1 as 65000; \
             {timers} ipv4 {{ import none; export where proto = \"vip\"; next hop self; }}; }}\n"
        );
        let (r, b) = (self.router.name.clone(), self.balancer.name.clone());
        self.bird(&r, "router", router);
        self.bird(&b, "balancer", balancer);
    }

    /// Whether the router has a route to the virtual address through the balancer.
    fn routed(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.router.name, "route", "show", &self.vip()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!("via 10.94.{}.2", self.tag))
    }

    fn backend(&self, port: u16) -> Child {
        self.balancer
            .command(
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
        Command::new("ip")
            .args(["netns", "exec", &self.balancer.name])
            .arg(env!("CARGO_BIN_EXE_udplb"))
            .args(["run", "-c"])
            .arg(config)
            .env("UDPLB_ALLOW_ROOT", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
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
    let mut topo = match Topology::create(std::process::id() % 200) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: cannot build the namespaces here: {why}");
            return;
        }
    };
    topo.start_birds();
    let port = 7000;
    let mut backend = topo.backend(port);
    let control = topo.control().display().to_string();
    let birdc = |verb: &str| format!("[\"birdc\", \"-s\", \"{control}\", \"{verb}\", \"vip\"]");
    let listen: SocketAddr = format!("{}:5300", topo.vip()).parse().unwrap();
    let config = topo.dir.join("udplb.toml");
    std::fs::write(
        &config,
        format!(
            "[announce]\nup = {}\ndown = {}\nwithdraw_delay = \"1500ms\"\n\
             [listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:{port}\"]\n[pools.p.health]\n{}\n",
            birdc("enable"),
            birdc("disable"),
            udp_check(200, 200, 1, 1),
        ),
    )
    .unwrap();
    let log = topo.dir.join("udplb.log");
    let mut lb = topo.udplb(&config, &log);
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();

    // Announced once the pool holds its quorum (bird's BGP session comes up meanwhile).
    let announced = took(Duration::from_secs(30), || topo.routed());
    assert!(announced.is_some(), "never announced: {}", logged());

    // The only backend dies: the quorum is lost, the route withdrawn.
    let _ = backend.kill();
    let _ = backend.wait();
    let lost = took(DEADLINE, || !topo.routed()).expect("not withdrawn on a lost quorum");
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
