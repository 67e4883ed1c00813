//! Binary upgrades (SIGUSR2): the running udplb starts the program file it was started from
//! and hands it its sockets, health and flows (flows on sockets of their own continue on those
//! sockets; the others' clients are placed on the same backend). Under steady load no datagram
//! is lost, every flow stays on its backend (with round robin, so only the handover can keep
//! it), the admin endpoint stays at its address, and the old process exits once its flows end.
//! A successor that cannot start leaves the old process serving.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A copy of the udplb binary under test at `dir/udplb`, as a package would install it.
fn install(dir: &Path) -> PathBuf {
    let program = dir.join("udplb");
    std::fs::copy(env!("CARGO_BIN_EXE_udplb"), &program).unwrap();
    program
}

/// "Another binary" replaces `program` as a package upgrade does (a new file renamed over the
/// old one; the bytes differ: an ELF file runs the same with bytes appended).
fn upgrade_file(program: &Path, tail: &[u8]) -> u64 {
    let new = program.with_extension("new");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_udplb")).unwrap();
    bytes.extend_from_slice(tail);
    std::fs::write(&new, bytes).unwrap();
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, program).unwrap();
    std::fs::metadata(program).unwrap().ino()
}

/// The inode of the program process `pid` runs.
fn program_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn config(dir: &Path, backends: &[&Backend], listener: &str) -> (PathBuf, SocketAddr) {
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let list: Vec<String> = backends.iter().map(|b| quoted(b.addr)).collect();
    let toml = one_pool_toml(
        admin,
        listen,
        &format!("idle_timeout = \"1s\"\n{listener}"),
        &list,
        &format!(
            "scheduler = \"round-robin\"\n[pools.p.health]\n{}\n[runtime]\nworkers = 2\nshutdown_grace = \"20s\"",
            udp_check(200, 200, 1, 2)
        ),
    );
    let path = dir.join("udplb.toml");
    std::fs::write(&path, toml).unwrap();
    (path, admin)
}

use std::net::SocketAddr;

/// udplb as a package installs it (a copy of the binary in `dir`), run on a [`config`] of
/// `backends` with `listener` lines once every backend is healthy.
struct Running {
    lb: Udplb,
    listen: SocketAddr,
    program: PathBuf,
    config: PathBuf,
    _dir: Removed,
}

/// A scratch directory (with its copies of the binary) removed when dropped, passed or not.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &Path, backends: &[&Backend], listener: &str) -> Running {
    let (config, admin) = config(dir, backends, listener);
    let program = install(dir);
    let lb = Udplb::run_program(&program, &config, admin);
    let listen: SocketAddr = lb.stats()["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // In rotation, not only healthy: a flow placed before the snapshot has every backend is
    // moved later, to even the pool out (`rebalance`).
    assert!(
        wait_for(DEADLINE, || backends
            .iter()
            .all(|b| lb.backend(b.addr)["in_rotation"] == true)),
        "backends never in rotation"
    );
    Running {
        lb,
        listen,
        program,
        config,
        _dir: Removed(dir.to_path_buf()),
    }
}

#[test]
fn an_upgrade_under_steady_load_loses_nothing_and_moves_no_flow() {
    // Each flow's own socket continues in the successor.
    upgrade_under_load("own-sockets", "", "continued=60 placed=0");
}

#[test]
fn flows_on_shared_sockets_are_placed_on_their_backends_by_the_successor() {
    // Shared sockets stay with the old process; the clients' next flows go to the same backends.
    upgrade_under_load("shared", "shared_upstream = true", "continued=0 placed=60");
}

/// Two upgrades in a row under steady load over 60 flows (round robin over three backends);
/// each successor's log ends its `flows inherited` line with `handed`.
fn upgrade_under_load(name: &str, listener: &str, handed: &str) {
    let dir = scratch_dir(name);
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let Running {
        mut lb,
        listen,
        program,
        _dir,
        ..
    } = start(&dir, &refs, listener);
    let first = lb.pid();
    let load = Load::start(listen, 60);
    // Every flow is established (and spread over the three backends) before the upgrade.
    assert!(wait_for(DEADLINE, || backends
        .iter()
        .all(|b| b.count() > 60)));

    let mut pids = vec![first];
    // The serving successor, killed however the test ends: one left running would go on
    // checking backend ports that later tests may be given.
    let mut serving: Option<Adopted> = None;
    for (round, tail) in [b"first".as_slice(), b"second".as_slice()]
        .into_iter()
        .enumerate()
    {
        let old = *pids.last().unwrap();
        let inode = upgrade_file(&program, tail);
        let new = upgrade_to_successor(&lb, old).unwrap_or_else(|| {
            panic!(
                "round {round}: the admin endpoint never answered from a new process: {}",
                lb.stderr.lock().unwrap()
            )
        });
        pids.push(new);
        let previous = serving.replace(Adopted(new));
        assert_eq!(program_inode(new), inode, "the successor runs the new file");
        // The old process serves its flows' last replies, then exits 0 once they idle out
        // (1 s without a datagram: they all go to the successor now).
        if old == first {
            let (code, _) = wait_exit(&mut lb, Duration::from_secs(15)).expect("old udplb exits");
            assert_eq!(code, Some(0), "{}", lb.stderr.lock().unwrap());
        } else {
            assert!(
                wait_for(Duration::from_secs(15), || !alive(old)),
                "old udplb exits"
            );
        }
        // It exited on its own: its pid is no longer ours to kill.
        std::mem::forget(previous);
        // Traffic keeps flowing through the successor meanwhile and after.
        let before: u64 = backends.iter().map(Backend::count).sum();
        assert!(wait_for(DEADLINE, || backends
            .iter()
            .map(Backend::count)
            .sum::<u64>()
            > before + 200));
    }
    let logs = load.finish();
    let (sent, lost) = totals(&logs);
    let moved = logs.iter().filter(|l| !l.stayed()).count();
    eprintln!(
        "upgrade under load: {} flows, {sent} datagrams, {lost} lost, {moved} flows moved, processes {pids:?}",
        logs.len()
    );
    assert!(sent > 1_200, "too little load to tell: {sent}");
    assert_eq!(lost, 0, "{}", lb.stderr.lock().unwrap());
    assert_eq!(
        moved,
        0,
        "flows changed backend: {}",
        lb.stderr.lock().unwrap()
    );
    // Round robin spread them: staying put was the handover's doing, not a single backend's.
    let used: std::collections::HashSet<&String> = logs.iter().map(|l| &l.tags[0]).collect();
    assert_eq!(used.len(), 3);
    let log = lb.stderr.lock().unwrap().clone();
    let inherited: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("flows inherited"))
        .collect();
    assert_eq!(inherited.len(), 2, "{log}");
    assert!(
        inherited.iter().all(|l| l.ends_with(handed)),
        "{inherited:?}"
    );
}

#[test]
fn a_successor_that_cannot_start_leaves_the_old_process_serving() {
    let dir = scratch_dir("broken");
    let a = Backend::start("127.0.0.1", "a");
    let Running {
        mut lb,
        listen,
        program,
        config: path,
        _dir,
    } = start(&dir, &[&a], "");
    let load = Load::start(listen, 10);
    assert!(wait_for(DEADLINE, || a.count() > 50));
    // A program that exits at once; then a configuration the new process refuses.
    let failures = |lb: &Udplb| lb.stderr.lock().unwrap().matches("upgrade failed").count();
    let broken = program.with_extension("new");
    std::fs::write(&broken, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &program).unwrap();
    signal(lb.pid(), "USR2");
    assert!(
        wait_for(DEADLINE, || failures(&lb) == 1),
        "{}",
        lb.stderr.lock().unwrap()
    );
    upgrade_file(&program, b"");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("round-robin", "no-such-scheduler")).unwrap();
    signal(lb.pid(), "USR2");
    assert!(
        wait_for(DEADLINE, || failures(&lb) == 2),
        "{}",
        lb.stderr.lock().unwrap()
    );
    // Still the same process, serving every flow.
    let served = a.count();
    assert!(wait_for(DEADLINE, || a.count() > served + 100));
    assert_eq!(pid_at(&lb), Some(lb.pid()));
    assert!(lb.alive());
    let logs = load.finish();
    let (sent, lost) = totals(&logs);
    assert!(sent > 0);
    assert_eq!(lost, 0, "{}", lb.stderr.lock().unwrap());
    // And a good upgrade still works after the failed ones.
    std::fs::write(&path, good).unwrap();
    let old = lb.pid();
    let _successor = Adopted(upgrade_to_successor(&lb, old).expect("a successor"));
}

/// A TCP echo server on `addr` (the UDP backend's address: udplb connects there).
fn tcp_echo(addr: SocketAddr) {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 256];
                while let Ok(n) = std::io::Read::read(&mut stream, &mut buf) {
                    if n == 0 || std::io::Write::write_all(&mut stream, &buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn echo_over(stream: &mut std::net::TcpStream, text: &str) -> String {
    std::io::Write::write_all(stream, text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    std::io::Read::read_exact(stream, &mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

#[test]
fn a_tcp_connection_open_at_the_upgrade_is_served_to_its_end_by_the_old_process() {
    let dir = scratch_dir("tcp");
    let a = Backend::start("127.0.0.1", "a");
    tcp_echo(a.addr);
    let Running {
        mut lb,
        listen,
        _dir,
        ..
    } = start(&dir, &[&a], "tcp = true");
    let mut old_connection = std::net::TcpStream::connect(listen).unwrap();
    old_connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(echo_over(&mut old_connection, "before"), "before");

    let old = lb.pid();
    let _successor = Adopted(upgrade_to_successor(&lb, old).expect("a successor"));
    // New connections are the successor's; the open one stays with the old process, which
    // waits for it (its UDP flows, none, would have let it go at once).
    let mut new_connection = std::net::TcpStream::connect(listen).unwrap();
    new_connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(echo_over(&mut new_connection, "new"), "new");
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            echo_over(&mut old_connection, &format!("after {i}")),
            format!("after {i}")
        );
        assert!(lb.alive(), "the old process left an open connection");
        // (1 s idle timeout: keep the new one busy too.)
        assert_eq!(echo_over(&mut new_connection, "new"), "new");
    }
    drop(old_connection);
    let (code, _) = wait_exit(&mut lb, DEADLINE).expect("the old process exits");
    assert_eq!(code, Some(0));
    assert_eq!(echo_over(&mut new_connection, "still"), "still");
}

#[test]
fn clients_remembered_by_persistence_return_to_their_backends_after_an_upgrade() {
    let dir = scratch_dir("persistence");
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    // Each exchange is a flow of its own: only persistence brings a client back.
    let listener = "mode = \"request-response\"\npersistence = \"60s\"";
    let Running {
        lb, listen, _dir, ..
    } = start(&dir, &refs, listener);
    let clients: Vec<_> = (0..20).map(|_| client("127.0.0.1:0")).collect();
    let before: Vec<String> = clients
        .iter()
        .map(|c| tag(&request(c, listen, b"x").0))
        .collect();
    assert!(wait_for(DEADLINE, || lb.counter("/flows/live") == 0));

    let old = lb.pid();
    let _successor = Adopted(upgrade_to_successor(&lb, old).expect("a successor"));
    // In another order than before: round robin alone would deal them out differently.
    let mut after: Vec<String> = clients
        .iter()
        .rev()
        .map(|c| tag(&request(c, listen, b"y").0))
        .collect();
    after.reverse();
    assert_eq!(after, before);
    let used: std::collections::HashSet<&String> = before.iter().collect();
    assert_eq!(used.len(), 3);
}
