//! Reloading under load (SIGHUP): no datagram lost beyond a control run, every established
//! flow keeps its backend, an invalid file keeps the running configuration and is reported.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// A pool of `backends` with `weights`, scheduled by weighted round robin.
fn weighted_config(
    admin: SocketAddr,
    listen: SocketAddr,
    backends: &[&Backend],
    weights: &[u32],
) -> String {
    let entries: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{{ address = \"{}\", weight = {w} }}", b.addr))
        .collect();
    one_pool_toml(
        admin,
        listen,
        "",
        &entries,
        "scheduler = \"weighted-round-robin\"",
    )
}

/// Reloads that failed so far.
fn reloads_failed(lb: &Udplb) -> Option<u64> {
    lb.stats()["reload"]["failed"].as_u64()
}

/// Why the last reload failed.
fn reload_error(lb: &Udplb) -> String {
    lb.stats()["reload"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Per-flow losses and whether every flow stayed on its first backend.
fn summary(logs: &[FlowLog]) -> (u64, u64, bool) {
    let (sent, lost) = totals(logs);
    (sent, lost, logs.iter().all(FlowLog::stayed))
}

#[test]
fn fifty_reloads_under_load_lose_nothing_and_move_no_flow() {
    let dir = scratch_dir("load");
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let path = dir.join("udplb.toml");
    replace_file(&path, &weighted_config(admin, listen, &refs, &[1, 1, 1]));
    let lb = Udplb::run_config(&path, admin);

    // Control: the same load without reloads.
    let control = Load::start(listen, 30);
    std::thread::sleep(Duration::from_millis(1500));
    let (control_sent, control_lost, control_sticky) = summary(&control.finish());

    // 50 reloads, each with other weights, during the same load.
    let weights_of = |i: u32| [1 + i % 3, 1 + (i + 1) % 5, 2 + i % 2];
    let generation = lb.stats()["generation"].as_u64().unwrap();
    let load = Load::start(listen, 30);
    for i in 0..50u32 {
        replace_file(
            &path,
            &weighted_config(
                admin,
                listen,
                &refs,
                &[1 + i % 3, 1 + (i + 1) % 5, 2 + i % 2],
            ),
        );
        signal(lb.pid(), "HUP");
        std::thread::sleep(Duration::from_millis(30));
    }
    let reloaded = wait_for(DEADLINE, || {
        lb.stats()["reload"]["succeeded"].as_u64() == Some(50)
    });
    let (sent, lost, sticky) = summary(&load.finish());
    eprintln!(
        "reload under load (30 flows x 100 datagrams/s): control run lost {control_lost} of {control_sent}; \
         with 50 SIGHUP reloads lost {lost} of {sent}; every flow kept its backend: {sticky}"
    );
    assert!(reloaded, "{}", lb.stats());
    assert!(
        lb.stats()["generation"].as_u64().unwrap() >= generation + 50,
        "{}",
        lb.stats()
    );
    assert!(control_sticky && sticky, "a flow changed backend");
    assert!(
        lost <= control_lost,
        "reloads lost {lost} datagrams, the control run {control_lost}"
    );
    // The last weights are in force for new flows.
    let stats = lb.stats();
    let weights: Vec<u32> = (0..3)
        .map(|i| stats["pools"][0]["backends"][i]["weight"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(weights, weights_of(49));
}

#[test]
fn an_invalid_file_keeps_the_running_configuration_and_is_reported() {
    let dir = scratch_dir("invalid");
    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let path = dir.join("udplb.toml");
    replace_file(&path, &weighted_config(admin, listen, &[&a], &[1]));
    let lb = Udplb::run_config(&path, admin);
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"before").0, b"a:before");

    std::fs::write(&path, "[listeners.l]\nadress = \"oops\"\n").unwrap();
    signal(lb.pid(), "HUP");
    assert!(
        wait_for(DEADLINE, || reloads_failed(&lb) == Some(1)),
        "{}",
        lb.stats()
    );
    let error = reload_error(&lb);
    assert!(
        error.contains(&format!("{}:2:", path.display())) && error.contains("adress"),
        "{error}"
    );
    assert_eq!(
        request(&c, listen, b"after").0,
        b"a:after",
        "still serving the old configuration"
    );
    let (_, metrics) = lb.get("/metrics");
    assert!(
        metrics.contains("udplb_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );

    // A listener change cannot be applied live: refused, with the reason.
    let moved = listen_addr("127.0.0.1");
    replace_file(&path, &weighted_config(admin, moved, &[&a], &[1]));
    signal(lb.pid(), "HUP");
    assert!(
        wait_for(DEADLINE, || reloads_failed(&lb) == Some(2)),
        "{}",
        lb.stats()
    );
    let error = reload_error(&lb);
    assert!(error.contains("needs a restart"), "{error}");
    assert!(
        error.contains(&format!("listener \"l\": address {listen} -> {moved}")),
        "the change is not said in words: {error}"
    );
}

/// A reload is checked like a start: a notify program that does not exist is refused with
/// its file, line and key, and the running configuration stays.
#[test]
fn a_reload_with_a_program_that_cannot_run_is_refused() {
    let dir = scratch_dir("program");
    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let path = dir.join("udplb.toml");
    replace_file(&path, &weighted_config(admin, listen, &[&a], &[1]));
    let lb = Udplb::run_config(&path, admin);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("notify = [\"no-such-program-udplb\"]\n");
    std::fs::write(&path, &text).unwrap();
    signal(lb.pid(), "HUP");
    assert!(
        wait_for(DEADLINE, || reloads_failed(&lb) == Some(1)),
        "{}",
        lb.stats()
    );
    let error = reload_error(&lb);
    let line = text.lines().count();
    assert!(
        error.contains(&format!(
            "{}:{line}:1: pools.p.notify: there is no program \"no-such-program-udplb\" in PATH",
            path.display()
        )),
        "{error}"
    );
    let c = client("127.0.0.1:0");
    assert_eq!(request(&c, listen, b"still").0, b"a:still");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload whose file was replaced by a FIFO nothing writes to is refused at once, with the
/// reason; it stalls nothing meanwhile: the admin endpoint answers, a backend that stops
/// answering its check is marked down on schedule, and SIGTERM stops udplb. Prints how long
/// each took.
#[test]
fn a_reload_from_a_fifo_is_refused_and_stalls_nothing() {
    let dir = scratch_dir("fifo");
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let (interval, timeout, fall) = (200u64, 100u64, 2u64);
    let path = dir.join("udplb.toml");
    let health = format!(
        "[pools.p.health]\n{}",
        udp_check(interval, timeout, 1, fall)
    );
    let backends = [quoted(a.addr), quoted(b.addr)];
    replace_file(&path, &one_pool_toml(admin, listen, "", &backends, &health));
    let mut lb = Udplb::run_config(&path, admin);
    assert!(
        wait_for(DEADLINE, || lb.try_healthy(a.addr) == Some(true)
            && lb.try_healthy(b.addr) == Some(true)),
        "{}",
        lb.stats()
    );

    std::fs::remove_file(&path).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap()
            .success()
    );
    signal(lb.pid(), "HUP");
    // The admin endpoint answers while the reload is under way (or refused).
    let asked = Instant::now();
    let answered = wait_for(Duration::from_secs(3), || lb.try_stats().is_some());
    let admin_took = asked.elapsed();
    // A backend that stops answering is marked down within interval x fall + timeout.
    a.mute(true);
    let muted = Instant::now();
    let detected = wait_for(Duration::from_secs(5), || {
        lb.try_healthy(a.addr) == Some(false)
    });
    let detect_took = muted.elapsed();
    let reload = lb.try_stats().map(|s| s["reload"].clone());
    signal(lb.pid(), "TERM");
    let exit = wait_exit(&mut lb, Duration::from_secs(5));
    let bound = Duration::from_millis(interval * fall + timeout);
    eprintln!(
        "reload from a FIFO: admin answered: {answered} after {admin_took:?}; a backend that stopped \
         answering marked down: {detected} after {detect_took:?} (interval x fall + timeout = {bound:?}); \
         exit after SIGTERM: {exit:?}; reload status: {reload:?}"
    );
    assert!(
        answered,
        "the admin endpoint did not answer during the reload"
    );
    assert!(detected, "the muted backend was not marked down");
    assert!(
        detect_took <= bound + Duration::from_millis(150),
        "took {detect_took:?}, bound {bound:?}"
    );
    let reload = reload.unwrap();
    assert_eq!(reload["failed"].as_u64(), Some(1), "{reload}");
    let error = reload["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&path.display().to_string()) && error.contains("FIFO"),
        "{error}"
    );
    let (code, took) = exit.expect("udplb did not exit after SIGTERM");
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGHUP every 300 ms, each after `write(i)` (i = 1, 2, ...) rewrote the file, until
/// [`Storm::finish`].
struct Storm {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u32>,
}

impl Storm {
    fn start(pid: u32, write: impl Fn(u32) + Send + 'static) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut i = 1;
            while !flag.load(Ordering::Relaxed) {
                write(i);
                signal(pid, "HUP");
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            i - 1
        });
        Storm { stop, thread }
    }

    /// Stops the storm; returns how many reloads it asked for.
    fn finish(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Checks made of the backend at `addr` so far (passed and failed).
fn checks_of(stats: &serde_json::Value, addr: SocketAddr) -> u64 {
    backend_status(stats, addr).map_or(0, |b| {
        b["checks_ok"].as_u64().unwrap_or(0) + b["checks_failed"].as_u64().unwrap_or(0)
    })
}

/// SIGHUP every 300 ms, each reload swapping the order of the backends and changing a weight
/// (the checks stay the same): checks keep their schedule (one per interval, not one per
/// reload), their counters, and a backend that stops answering is marked down within
/// interval x fall + timeout, while the other stays up. Prints the checks made and the time
/// to detect.
#[test]
fn a_reload_storm_keeps_checks_on_schedule() {
    let dir = scratch_dir("storm");
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let (interval, timeout, fall) = (1000u64, 500u64, 2u64);
    let path = dir.join("udplb.toml");
    let (a_addr, b_addr, file) = (a.addr, b.addr, path.clone());
    let write = move |i: u32| {
        let (first, second) = if i.is_multiple_of(2) {
            (
                quoted(a_addr),
                format!("{{ address = \"{b_addr}\", weight = 1 }}"),
            )
        } else {
            (
                format!("{{ address = \"{b_addr}\", weight = 2 }}"),
                quoted(a_addr),
            )
        };
        let health = format!(
            "[pools.p.health]\n{}",
            udp_check(interval, timeout, 1, fall)
        );
        replace_file(
            &file,
            &one_pool_toml(admin, listen, "", &[first, second], &health),
        );
    };
    write(0);
    let lb = Udplb::run_config(&path, admin);
    assert!(
        wait_for(DEADLINE, || {
            let s = lb.stats();
            [a.addr, b.addr]
                .iter()
                .all(|&x| backend_status(&s, x).is_some_and(|b| b["healthy"] == true))
        }),
        "{}",
        lb.stats()
    );

    let storm = Storm::start(lb.pid(), write);
    // Healthy phase: 3 s of storm.
    let before = lb.stats();
    let ok_before = backend_status(&before, a.addr).unwrap()["checks_ok"]
        .as_u64()
        .unwrap();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let after = lb.stats();
    let made = checks_of(&after, a.addr) - checks_of(&before, a.addr);
    let calm = started.elapsed();
    let ok_after = backend_status(&after, a.addr).unwrap()["checks_ok"]
        .as_u64()
        .unwrap();
    // Then a stops answering.
    a.mute(true);
    let muted = Instant::now();
    let detected = wait_for(Duration::from_secs(8), || {
        lb.try_healthy(a.addr) == Some(false)
    });
    let took = muted.elapsed();
    let reloads = storm.finish();
    let stats = lb.stats();
    let bound = Duration::from_millis(interval * fall + timeout);
    eprintln!(
        "reload storm (SIGHUP every 300 ms, {reloads} reloads; udp check interval {interval}ms, \
         timeout {timeout}ms, fall {fall}): {made} checks of a healthy backend in {calm:?}; \
         a backend that stopped answering marked down: {detected} after {took:?} \
         (interval x fall + timeout = {bound:?}); reloads succeeded: {}",
        stats["reload"]["succeeded"]
    );
    assert!(
        made <= calm.as_secs() + 2,
        "{made} checks in {calm:?} with an interval of {interval} ms: reloads restarted them"
    );
    assert!(ok_after >= ok_before, "counters were reset by a reload");
    assert!(detected, "not marked down during the storm: {stats}");
    assert!(
        took <= bound + Duration::from_millis(300),
        "took {took:?}, bound {bound:?}"
    );
    assert_eq!(
        backend_status(&stats, b.addr).unwrap()["healthy"],
        true,
        "a's failures were charged to b: {stats}"
    );
}

/// A backend without an active check, taken out passively (its datagrams refused), comes back
/// through its recovery probe (an empty datagram not refused for 1 s, after a 1 s hold-down)
/// while SIGHUP comes every 300 ms: reloads that keep the backend let its probe finish.
/// Prints how long it took.
#[test]
fn a_reload_storm_lets_recovery_probes_finish() {
    let dir = scratch_dir("storm-recovery");
    let a = Backend::start("127.0.0.1", "a");
    let b = Backend::start("127.0.0.1", "b");
    let b_addr = b.addr;
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let path = dir.join("udplb.toml");
    let a_addr = a.addr;
    let file = path.clone();
    let write = move |i: u32| {
        let backends = [
            format!("{{ address = \"{a_addr}\", weight = {} }}", 1 + i % 2),
            quoted(b_addr),
        ];
        replace_file(
            &file,
            &one_pool_toml(admin, listen, "mode = \"datagram\"", &backends, ""),
        );
    };
    write(0);
    let lb = Udplb::run_config(&path, admin);
    // Bound while b holds its port: it cannot get it.
    let c = client("127.0.0.1:0");
    drop(b);
    assert!(
        wait_for(DEADLINE, || {
            let _ = c.send_to(b"x", listen);
            lb.try_healthy(b_addr) == Some(false)
        }),
        "{}",
        lb.stats()
    );
    // Back, as a service that ignores empty datagrams (a DNS server does): the probe passes
    // only once its 1 s timeout is over without a refusal.
    let _b = std::net::UdpSocket::bind(b_addr).unwrap();
    let back_at = Instant::now();
    let storm = Storm::start(lb.pid(), write);
    let recovered = wait_for(Duration::from_secs(6), || {
        lb.try_healthy(b_addr) == Some(true)
    });
    let took = back_at.elapsed();
    let reloads = storm.finish();
    eprintln!(
        "reload storm (SIGHUP every 300 ms, {reloads} reloads): a passively ejected backend \
         back in rotation: {recovered} after {took:?} (1 s hold-down + 1 s recovery probe)"
    );
    assert!(recovered, "{}", lb.stats());
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}
