//! systemd `Type=notify`: READY at start, RELOADING then READY around a reload, WATCHDOG while
//! the workers turn, STOPPING at shutdown, observed on a test NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Collects notification datagrams until `want` is among them (or the deadline passes).
fn wait_message(socket: &UnixDatagram, seen: &mut Vec<String>, want: &str) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < DEADLINE {
        if seen.iter().any(|m| m.lines().any(|l| l == want)) {
            return true;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    false
}

/// A socket standing in for systemd's NOTIFY_SOCKET, and its path.
fn notify_socket(name: &str) -> (UnixDatagram, String) {
    let path = scratch_dir(name).join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (socket, path.display().to_string())
}

#[test]
fn notifies_ready_reloading_watchdog_and_stopping() {
    let (socket, notify) = notify_socket("notify");

    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let cfg = write_config(&one_pool_toml(admin, listen, "", &[quoted(a.addr)], ""));
    let mut lb = Udplb::run_config_with_env(
        &cfg,
        admin,
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    assert!(wait_message(&socket, &mut seen, "READY=1"), "{seen:?}");
    assert!(wait_message(&socket, &mut seen, "WATCHDOG=1"), "{seen:?}");

    seen.clear();
    signal(lb.pid(), "HUP");
    assert!(wait_message(&socket, &mut seen, "RELOADING=1"), "{seen:?}");
    let reloading = seen.iter().find(|m| m.contains("RELOADING=1")).unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(wait_message(&socket, &mut seen, "READY=1"), "{seen:?}");

    signal(lb.pid(), "TERM");
    assert!(wait_message(&socket, &mut seen, "STOPPING=1"), "{seen:?}");
    assert!(wait_exit(&mut lb, DEADLINE).is_some(), "udplb did not stop");
}

#[test]
fn an_upgrade_makes_the_successor_the_main_process_and_it_pets_the_watchdog() {
    let (socket, notify) = notify_socket("notify-upgrade");
    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let cfg = write_config(&one_pool_toml(
        admin,
        listen,
        "idle_timeout = \"500ms\"",
        &[quoted(a.addr)],
        "",
    ));
    // As systemd starts it: WATCHDOG_PID names the main process.
    let mut shell = std::process::Command::new("sh");
    shell.args([
        "-c",
        "export WATCHDOG_PID=$$; exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_udplb"),
    ]);
    let args = ["run".to_string(), "-c".into(), cfg.display().to_string()];
    let mut lb = Udplb::spawn(
        shell,
        &args,
        admin,
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    assert!(wait_message(&socket, &mut seen, "WATCHDOG=1"), "{seen:?}");
    assert_eq!(request(&client("127.0.0.1:0"), listen, b"x").0, b"a:x");

    seen.clear();
    signal(lb.pid(), "USR2");
    let successor = loop {
        assert!(wait_message(&socket, &mut seen, "READY=1"), "{seen:?}");
        let main = seen
            .iter()
            .flat_map(|m| m.lines())
            .find_map(|l| l.strip_prefix("MAINPID="));
        if let Some(pid) = main {
            break pid.parse::<u32>().unwrap();
        }
        seen.clear();
    };
    let _successor = scopeguard(successor);
    assert_ne!(successor, lb.pid());
    // Once the old process is gone, only the successor can be petting the watchdog.
    assert!(
        wait_exit(&mut lb, DEADLINE).is_some(),
        "the old udplb did not exit"
    );
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while socket.recv(&mut buf).is_ok() {}
    socket.set_nonblocking(false).unwrap();
    seen.clear();
    assert!(wait_message(&socket, &mut seen, "WATCHDOG=1"), "{seen:?}");
    assert_eq!(request(&client("127.0.0.1:0"), listen, b"y").0, b"a:y");
}

/// Kills `pid` when dropped.
fn scopeguard(pid: u32) -> impl Drop {
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            signal(self.0, "KILL");
        }
    }
    Kill(pid)
}
