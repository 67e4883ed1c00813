//! udplb in front of two real RADIUS servers (Debian's freeradius), with its own clients
//! (`radclient` for PAP, `radeapclient` for EAP-MD5, whose two rounds must reach the server
//! that issued the challenge). Needs the packages freeradius and freeradius-utils
//! (`scripts/test.sh` installs them as root); the test fails with that message otherwise.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;

fn need_here(bin: &str) -> PathBuf {
    need(bin, "freeradius and freeradius-utils")
}

const SECRET: &str = "testing123";

/// A freeradius process, killed when dropped.
struct Radiusd {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Radiusd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A freeradius serving user bob (password "hello") by PAP and EAP-MD5 on a free port of
/// 127.0.0.1, every reply naming it (`Reply-Message = NAME`). Only the modules those need are
/// loaded (no certificates); it stays the user the test runs as.
fn start_radiusd(name: &str) -> Radiusd {
    let dir = scratch_dir(name);
    let addr = listen_addr("127.0.0.1");
    let d = dir.display();
    let port = addr.port();
    std::fs::write(
        dir.join("radiusd.conf"),
        format!(
            "confdir = {d}\nlogdir = {d}\nrun_dir = {d}\nlibdir = /usr/lib/freeradius\n\
             pidfile = {d}/radiusd.pid\nname = radiusd\nmax_request_time = 30\ncleanup_delay = 5\n\
             max_requests = 1024\nhostname_lookups = no\nproxy_requests = no\n\
             log {{\n destination = stdout\n auth = yes\n}}\n\
             security {{\n max_attributes = 200\n reject_delay = 0\n status_server = yes\n}}\n\
             thread pool {{\n start_servers = 2\n max_servers = 4\n min_spare_servers = 1\n max_spare_servers = 4\n}}\n\
             client localhost4 {{\n ipaddr = 127.0.0.1\n secret = {SECRET}\n}}\n\
             modules {{\n pap {{\n }}\n files {{\n  filename = {d}/users\n }}\n\
              eap {{\n  default_eap_type = md5\n  timer_expire = 60\n  max_sessions = 4096\n  md5 {{\n  }}\n }}\n}}\n\
             server default {{\n listen {{\n  type = auth\n  ipaddr = 127.0.0.1\n  port = {port}\n }}\n\
              authorize {{\n  update reply {{\n   Reply-Message := \"{name}\"\n  }}\n  eap {{\n   ok = return\n  }}\n  files\n  pap\n }}\n\
              authenticate {{\n  Auth-Type PAP {{\n   pap\n  }}\n  eap\n }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("users"), "bob\tCleartext-Password := \"hello\"\n").unwrap();
    let log = std::fs::File::create(dir.join("radiusd.log")).unwrap();
    let child = Command::new(need_here("freeradius"))
        .args(["-f", "-l", "stdout", "-n", "radiusd", "-d"])
        .arg(&dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start freeradius");
    let mut server = Radiusd { child, addr };
    let ready = wait_for(DEADLINE, || {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(dir.join("radiusd.log")).unwrap_or_default();
            panic!("freeradius {name} exited: {status}\n{log}");
        }
        std::fs::read_to_string(dir.join("radiusd.log"))
            .is_ok_and(|log| log.contains("Ready to process requests"))
    });
    assert!(ready, "freeradius {name} never became ready on {addr}");
    server
}

/// Runs `bin` with `args` and `input` on stdin; returns its stdout.
fn run_with_input(bin: &str, args: &[String], input: &str) -> String {
    let mut child = Command::new(need_here(bin))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments radclient and radeapclient share: print what was received, two tries one
/// second apart, an Access-Request to `server` with the shared secret.
fn client_args(server: SocketAddr) -> Vec<String> {
    ["-x", "-r", "2", "-t", "1"]
        .map(String::from)
        .into_iter()
        .chain([server.to_string(), "auth".into(), SECRET.into()])
        .collect()
}

/// One EAP-MD5 authentication of bob through `server` (a new client port each time), two
/// rounds: the challenge, then the answer carrying the challenge's `State`. Returns whether
/// it was accepted (radeapclient exits 0 either way; its output says).
fn eap_md5(server: SocketAddr) -> bool {
    let out = run_with_input(
        "radeapclient",
        &client_args(server),
        "User-Name = \"bob\"\nCleartext-Password = \"hello\"\nEAP-Type-Identity = \"bob\"\nEAP-Code = Response\n",
    );
    out.lines().any(|l| l.starts_with("Received Access-Accept"))
}

/// One PAP authentication of bob through `server`; returns the name of the server that
/// accepted it.
fn pap(server: SocketAddr) -> Option<String> {
    let out = run_with_input(
        "radclient",
        &client_args(server),
        "User-Name = \"bob\", User-Password = \"hello\"\n",
    );
    let accepted = out.lines().any(|l| l.starts_with("Received Access-Accept"));
    let name = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Reply-Message = "))
        .map(|s| s.trim_matches('"').to_string());
    name.filter(|_| accepted)
}

fn through_udplb(servers: &[&Radiusd], listener: &str) -> (Udplb, SocketAddr) {
    let backends: Vec<String> = servers.iter().map(|s| quoted(s.addr)).collect();
    run_one_pool("127.0.0.1", listener, &backends, "")
}

#[test]
fn eap_conversations_stay_on_one_server_with_persistence_and_pap_still_spreads() {
    let one = start_radiusd("server-1");
    let two = start_radiusd("server-2");
    assert!(eap_md5(one.addr), "EAP-MD5 directly against freeradius");

    // Request-response mode alone sends each round to the next server in turn: the second
    // round reaches a server that never issued the challenge.
    let (lb, listen) = through_udplb(&[&one, &two], "mode = \"request-response\"");
    let accepted = (0..6).filter(|_| eap_md5(listen)).count();
    assert!(
        accepted < 6,
        "without persistence, rounds should alternate between the servers ({accepted}/6 accepted)"
    );
    drop(lb);

    let (lb, listen) = through_udplb(
        &[&one, &two],
        "mode = \"request-response\"\npersistence = \"30s\"",
    );
    let accepted = (0..20).filter(|_| eap_md5(listen)).count();
    assert_eq!(accepted, 20, "EAP-MD5 through udplb with persistence");
    let stats = lb.stats();
    let returns = stats["listeners"][0]["persistence"]["returned"]
        .as_u64()
        .expect("persistence counters in /stats");
    assert!(returns >= 20, "each second round returned: {stats}");

    // Each radclient is a new client port: new clients still go round robin (a port the
    // kernel hands out again within the 30 s returns to where it went before).
    let mut by_server = std::collections::HashMap::new();
    for _ in 0..20 {
        let name = pap(listen).expect("PAP accepted through udplb");
        *by_server.entry(name).or_insert(0) += 1;
    }
    for name in ["server-1", "server-2"] {
        let n = by_server.get(name).copied().unwrap_or(0);
        assert!((8..=12).contains(&n), "PAP spread: {by_server:?}");
    }
}

#[test]
fn eap_rounds_follow_their_state_to_the_server_that_issued_it() {
    let one = start_radiusd("state-1");
    let two = start_radiusd("state-2");
    // Datagram mode with round robin alone sends every other datagram to the other server;
    // only the State keeps a conversation together. Clients run five at a time.
    let backends = [quoted(one.addr), quoted(two.addr)];
    let (lb, listen) = run_one_pool(
        "127.0.0.1",
        "mode = \"datagram\"",
        &backends,
        "[pools.p.payload_key]\nkind = \"radius\"",
    );
    let accepted: usize = (0..4)
        .map(|_| {
            let batch: Vec<_> = (0..5)
                .map(|_| std::thread::spawn(move || eap_md5(listen)))
                .collect();
            batch
                .into_iter()
                .map(|t| usize::from(t.join().unwrap()))
                .sum::<usize>()
        })
        .sum();
    assert_eq!(accepted, 20, "EAP-MD5 through udplb by State");
    let stats = lb.stats();
    let key = &stats["pools"][0]["payload_key"];
    assert_eq!(key["kind"], "radius", "{stats}");
    assert!(key["state_returns"].as_u64().unwrap() >= 20, "{key}");
    assert!(key["states"].as_u64().unwrap() >= 20, "{key}");
    assert_eq!(key["malformed"], 0, "{key}");
    // PAP, one round each, still goes round robin.
    let names: Vec<String> = (0..4).map(|_| pap(listen).expect("PAP accepted")).collect();
    assert!(
        names.iter().any(|n| n == "state-1") && names.iter().any(|n| n == "state-2"),
        "{names:?}"
    );
}
