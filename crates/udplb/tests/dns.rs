//! udplb in front of real DNS servers: Debian's knot and unbound as backends, `dig` and
//! `dnsperf` and `kdig` as clients. Needs the packages knot, knot-dnsutils, unbound, dnsutils and dnsperf
//! (`scripts/test.sh` installs them as root); the test fails with that message otherwise.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn need_here(bin: &str) -> PathBuf {
    need(bin, "knot, knot-dnsutils, unbound, dnsutils and dnsperf")
}

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

fn dig(server: SocketAddr, name: &str, rtype: &str) -> Output {
    Command::new(need_here("dig"))
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
             ns A 192.0.2.1\nwww A 192.0.2.10\nwho TXT \"knot\"\nbig TXT {}\n",
            big_txt()
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
             acl:\n  - id: xfr\n    address: 127.0.0.0/8\n    action: transfer\n\
             template:\n  - id: default\n    storage: {d}\n\
             zone:\n  - domain: {ZONE}\n    file: example.test.zone\n    acl: xfr\n",
            addr.port(),
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(need_here("knotd"))
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

/// The `big` TXT record's text: 30 strings of 250 characters (7.5 KB, far above what UDP
/// carries without truncation).
fn big_txt() -> String {
    (0..30)
        .map(|i| {
            format!(
                "\"{}\"",
                char::from(b'a' + (i % 26) as u8).to_string().repeat(250)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    let child = Command::new(need_here("unbound"))
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
    let out = Command::new(need_here("dnsperf"))
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
        let out = Command::new(need_here("knotc"))
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

/// A DNS query for `name` `rtype` with id `id`, framed for TCP (two-byte length first).
fn tcp_query(id: u16, name: &str, rtype: hickory_proto::rr::RecordType) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        rtype,
    ));
    let wire = m.to_vec().unwrap();
    let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
    framed.extend(wire);
    framed
}

/// Reads one length-framed DNS message from `s`.
fn read_tcp_message(s: &mut std::net::TcpStream) -> hickory_proto::op::Message {
    use std::io::Read;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("a framed answer");
    let mut wire = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut wire).expect("the whole answer");
    hickory_proto::op::Message::from_vec(&wire).expect("a DNS message")
}

fn tcp_connections(lb: &Udplb) -> u64 {
    lb.counter("/tcp/connections")
}

/// DNS over TCP through udplb: dig's retry of a truncated answer, 100 queries pipelined on one
/// connection (answers matched by id), kdig reusing one connection, a zone transfer, and a
/// backend that dies (connections go to the other).
#[test]
fn dns_over_tcp_truncated_answers_pipelines_and_zone_transfers() {
    use std::io::Write;
    let (one, _) = start_knot("knot-tcp-1");
    let (two, _) = start_knot("knot-tcp-2");
    let (lb, listen) = Udplb::serve(
        &["--mode", "request-response", "--tcp"],
        &[one.addr, two.addr],
    );
    let port = listen.port().to_string();

    // dig asks over UDP, gets a truncated answer, and asks again over TCP through udplb.
    let out = Command::new(need_here("dig"))
        .args(["@127.0.0.1", "-p", &port, &format!("big.{ZONE}"), "TXT"])
        .args(["+time=2", "+tries=1"])
        .output()
        .expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Truncated, retrying in TCP mode"), "{text}");
    assert!(text.contains(&"z".repeat(250)), "the whole answer: {text}");
    assert!(text.contains("status: NOERROR"), "{text}");
    assert_eq!(tcp_connections(&lb), 1, "{}", lb.stats());

    // 100 queries written at once on one connection; every answer comes back, by id.
    let mut s = std::net::TcpStream::connect(listen).expect("udplb accepts TCP");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let names = [
        (format!("www.{ZONE}"), hickory_proto::rr::RecordType::A),
        (format!("who.{ZONE}"), hickory_proto::rr::RecordType::TXT),
        (format!("big.{ZONE}"), hickory_proto::rr::RecordType::TXT),
        (format!("nope.{ZONE}"), hickory_proto::rr::RecordType::A),
    ];
    let mut batch = Vec::new();
    for id in 0..100u16 {
        let (name, rtype) = &names[usize::from(id) % names.len()];
        batch.extend(tcp_query(id, name, *rtype));
    }
    s.write_all(&batch).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let answer = read_tcp_message(&mut s);
        let id = answer.metadata.id;
        assert!(seen.insert(id), "answer {id} twice");
        let (name, _) = &names[usize::from(id) % names.len()];
        assert_eq!(answer.queries[0].name().to_ascii(), *name);
        if name.starts_with("nope") {
            assert_eq!(
                answer.metadata.response_code,
                hickory_proto::op::ResponseCode::NXDomain
            );
        } else {
            assert!(!answer.answers.is_empty(), "answer {id}: {answer:?}");
        }
    }
    drop(s);
    assert_eq!(tcp_connections(&lb), 2, "{}", lb.stats());

    // kdig, a real client, reusing one connection for 20 queries.
    let mut kdig = Command::new(need_here("kdig"));
    kdig.args(["@127.0.0.1", "-p", &port, "+tcp", "+keepopen", "+short"]);
    for _ in 0..20 {
        kdig.args([&format!("www.{ZONE}"), "A"]);
    }
    let out = kdig.output().expect("run kdig");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| *l == "192.0.2.10").count(),
        20,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcp_connections(&lb), 3, "{}", lb.stats());

    // A zone transfer (AXFR is TCP only).
    let out = Command::new(need_here("dig"))
        .args([
            "@127.0.0.1",
            "-p",
            &port,
            ZONE,
            "AXFR",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("run dig AXFR");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains("\tSOA\t")).count(),
        2,
        "an AXFR begins and ends with the SOA: {text}"
    );
    assert!(text.contains(&format!("big.{ZONE}")), "{text}");

    // One server dies: connections go to the other (a refused connect tries the next).
    drop(one);
    for _ in 0..4 {
        let out = Command::new(need_here("dig"))
            .args(["@127.0.0.1", "-p", &port, &format!("www.{ZONE}"), "A"])
            .args(["+tcp", "+short", "+time=3", "+tries=1"])
            .output()
            .expect("run dig +tcp");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.10");
    }
    assert!(
        wait_for(DEADLINE, || lb.counter("/tcp/active") == 0),
        "{}",
        lb.stats()
    );
    let stats = lb.stats();
    let tcp = &stats["listeners"][0]["tcp"];
    assert_eq!(tcp["refused"]["no_backend"], 0, "{tcp}");
    assert!(
        tcp["backend_connect_failures"].as_u64().unwrap() >= 1,
        "round robin reached the dead server at least once: {tcp}"
    );
    assert!(tcp["bytes_replied"].as_u64().unwrap() > 100 * 100, "{tcp}");
    drop(two);
}

/// The TCP side is bounded: connections beyond `tcp_max_connections` are closed at once, and
/// a connection that sends nothing is closed after the idle timeout.
#[test]
fn dns_over_tcp_is_capped_and_idle_connections_close() {
    use std::io::Read;
    let (knot, _) = start_knot("knot-tcp-cap");
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "mode = \"request-response\"\ntcp = true\ntcp_max_connections = 2\nidle_timeout = \"500ms\"",
        &[quoted(knot.addr)],
        "",
    );
    let open = || {
        let s = std::net::TcpStream::connect(listen).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    };
    let (mut a, _b) = (open(), open());
    assert!(
        wait_for(DEADLINE, || lb.counter("/tcp/active") == 2),
        "{}",
        lb.stats()
    );
    let mut c = open();
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "a third connection is closed at once"
    );
    assert_eq!(lb.counter("/tcp/refused/cap"), 1);
    // Silent for the idle timeout: closed (the read ends, well before the 10 s deadline).
    let started = std::time::Instant::now();
    assert_eq!(a.read(&mut buf).unwrap_or(0), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        wait_for(DEADLINE, || lb.counter("/tcp/active") == 0),
        "{}",
        lb.stats()
    );
    assert_eq!(lb.counter("/tcp/idle_closed"), 2);
}
