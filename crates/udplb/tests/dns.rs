//! udplb in front of real DNS servers: Debian's knot and unbound as backends, `dig` and
//! `dnsperf` as clients. Needs the packages knot, unbound, dnsutils and dnsperf
//! (`scripts/test.sh` installs them as root); the test fails with that message otherwise.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

const ZONE: &str = "example.test.";

/// A DNS server process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn need(bin: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{bin} not found: install Debian's knot, unbound, dnsutils and dnsperf (scripts/test.sh does as root)"
    );
}

fn dig(server: SocketAddr, name: &str, rtype: &str) -> Output {
    Command::new(need("dig"))
        .args([
            format!("@{}", server.ip()),
            "-p".into(),
            server.port().to_string(),
            name.into(),
            rtype.into(),
            "+short".into(),
            "+time=1".into(),
            "+tries=1".into(),
        ])
        .output()
        .expect("run dig")
}

fn answers(server: SocketAddr, name: &str, rtype: &str) -> Option<String> {
    let out = dig(server, name, rtype);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn wait_answering(s: &mut Server, what: &str) {
    let addr = s.addr;
    let ok = wait_for(DEADLINE, || {
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("{what} exited: {status}");
        }
        answers(addr, &format!("www.{ZONE}"), "A").is_some()
    });
    assert!(ok, "{what} never answered on {addr}");
}

fn start_knot(name: &str) -> (Server, PathBuf) {
    let dir = scratch_dir(name);
    let addr = listen_addr("127.0.0.1");
    std::fs::write(
        dir.join("example.test.zone"),
        format!(
            "$ORIGIN {ZONE}\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\n\
             ns A 192.0.2.1\nwww A 192.0.2.10\nwho TXT \"knot\"\n"
        ),
    )
    .unwrap();
    let conf = dir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: 127.0.0.1@{}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {d}\ncontrol:\n  listen: {d}/knot.sock\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: {d}\n\
             zone:\n  - domain: {ZONE}\n    file: example.test.zone\n",
            addr.port(),
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(need("knotd"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start knotd");
    let mut s = Server { child, addr };
    wait_answering(&mut s, "knotd");
    (s, dir)
}

fn start_unbound() -> Server {
    let dir = scratch_dir("unbound");
    let addr = listen_addr("127.0.0.1");
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 127.0.0.1\n  port: {}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n\
             directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n\
             do-ip6: no\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n\
             local-zone: \"{ZONE}\" static\n\
             local-data: \"{ZONE} 300 IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 300\"\n\
             local-data: \"www.{ZONE} 300 IN A 192.0.2.10\"\n\
             local-data: 'who.{ZONE} 300 IN TXT \"unbound\"'\n\
             remote-control:\n  control-enable: no\n",
            addr.port(),
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(need("unbound"))
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unbound");
    let mut s = Server { child, addr };
    wait_answering(&mut s, "unbound");
    s
}

#[test]
fn dig_and_dnsperf_through_udplb_to_knot_and_unbound() {
    let (knot, _) = start_knot("knot");
    let unbound = start_unbound();
    let (lb, listen) = Udplb::serve(&["--mode", "request-response"], &[knot.addr, unbound.addr]);

    // dig gets correct answers, and both servers answer (each dig is a new flow, and a worker's
    // round robin alternates; with 4 or more queries over 2 workers one worker sees two).
    let mut who = std::collections::HashSet::new();
    for _ in 0..6 {
        who.insert(answers(listen, &format!("who.{ZONE}"), "TXT").expect("a TXT answer"));
    }
    for _ in 0..3 {
        let a = answers(listen, &format!("www.{ZONE}"), "A").expect("an answer through udplb");
        assert_eq!(a, "192.0.2.10");
    }
    let expected: std::collections::HashSet<String> = ["\"knot\"", "\"unbound\""]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        who, expected,
        "both DNS servers should answer through udplb"
    );
    let nx = dig(listen, &format!("nope.{ZONE}"), "A");
    assert!(nx.status.success());

    // dnsperf: a fixed number of queries at a moderate rate, none lost.
    let dir = scratch_dir("dnsperf");
    let queries = dir.join("queries.txt");
    let lines: String = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                format!("www.{ZONE} A\n")
            } else {
                format!("who.{ZONE} TXT\n")
            }
        })
        .collect();
    std::fs::write(&queries, lines).unwrap();
    let out = Command::new(need("dnsperf"))
        .args([
            "-s",
            "127.0.0.1",
            "-p",
            &listen.port().to_string(),
            "-c",
            "4",
            "-n",
            "100",
            "-Q",
            "4000",
            "-t",
            "3",
            "-d",
        ])
        .arg(&queries)
        .output()
        .expect("run dnsperf");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(out.status.success(), "dnsperf failed: {report}");
    assert!(report.contains("Queries sent:         10000"), "{report}");
    assert!(report.contains("Queries completed:    10000"), "{report}");
    assert!(report.contains("Queries lost:         0 "), "{report}");
    // Request-response: every flow closed after its answer.
    assert!(
        wait_for(Duration::from_secs(5), || lb.counter("/flows/live") == 0),
        "{}",
        lb.stats()
    );
}

/// udplb in request-response mode in front of `server`, checked by a DNS check with `check`
/// lines; returns it and its listener's address.
fn dns_checked(server: &Server, check: &str) -> (Udplb, SocketAddr) {
    run_one_pool(
        "127.0.0.1",
        "mode = \"request-response\"",
        &[quoted(server.addr)],
        &format!("[pools.p.health]\ncheck = \"dns\"\n{check}"),
    )
}

/// The DNS health check against a real server: healthy while knot serves the zone, down once
/// knot stops serving it (and answers REFUSED).
#[test]
fn dns_check_follows_a_real_server_that_stops_serving_the_zone() {
    let (knot, dir) = start_knot("knot-health");
    let (lb, listen) = dns_checked(
        &knot,
        &format!(
            "name = \"www.{ZONE}\"\ntype = \"A\"\nanswer = \"192.0.2.10\"\ninterval = \"100ms\"\n\
             timeout = \"100ms\"\nrise = 1\nfall = 1"
        ),
    );
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    assert_eq!(
        answers(listen, &format!("www.{ZONE}"), "A").as_deref(),
        Some("192.0.2.10")
    );

    // knot stops serving the zone: it now answers REFUSED, and the check takes it out.
    let knotc = |args: &[&str]| {
        let out = Command::new(need("knotc"))
            .arg("-s")
            .arg(dir.join("knot.sock"))
            .args(args)
            .output()
            .expect("run knotc");
        assert!(
            out.status.success(),
            "knotc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    knotc(&["conf-begin"]);
    knotc(&["conf-unset", &format!("zone[{ZONE}]")]);
    knotc(&["conf-commit"]);
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(false)),
        "{}",
        lb.stats()
    );
    let error = lb.last_error(0).to_lowercase();
    assert!(error.contains("refused"), "{error}");
}

/// A DNS check names its query as an operator writes it: without the trailing dot, in any
/// case. Against a real knot, the backend is healthy and serves through udplb (a plain name
/// used to be judged "the reply does not echo the question" and every backend marked down).
#[test]
fn dns_check_takes_plain_names_in_any_case() {
    let (knot, _) = start_knot("knot-plain-name");
    let (lb, listen) = dns_checked(
        &knot,
        "name = \"www.example.test\"\ninterval = \"100ms\"\ntimeout = \"100ms\"",
    );
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    assert_eq!(
        answers(listen, &format!("www.{ZONE}"), "A").as_deref(),
        Some("192.0.2.10")
    );
    drop(lb);

    // The one-liner's check, in another case.
    let (lb, listen) = Udplb::serve(
        &[
            "--mode",
            "request-response",
            "--check",
            "dns:WWW.Example.TEST",
            "--check-interval",
            "100ms",
        ],
        &[knot.addr],
    );
    assert!(
        wait_for(DEADLINE, || lb.healthy(0) == Some(true)),
        "{}",
        lb.stats()
    );
    assert_eq!(lb.backend(0)["checks_failed"].as_u64(), Some(0));
    assert_eq!(
        answers(listen, &format!("www.{ZONE}"), "A").as_deref(),
        Some("192.0.2.10")
    );
}
