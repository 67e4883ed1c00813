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

#[test]
fn notifies_ready_reloading_watchdog_and_stopping() {
    let socket_path = scratch_dir("notify").join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let cfg = write_config(&one_pool_toml(admin, listen, "", &[quoted(a.addr)], ""));
    let notify = socket_path.display().to_string();
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
