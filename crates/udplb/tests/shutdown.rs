//! SIGTERM: udplb stops admitting new flows, keeps serving established ones until they end or
//! the grace period is over, and exits 0.

mod common;

use std::time::Duration;

use common::*;

/// Waits for the process to exit; returns its code and how long it took.
fn exit_code(lb: &mut Udplb, limit: Duration) -> (Option<i32>, Duration) {
    wait_exit(lb, limit).unwrap_or_else(|| panic!("udplb did not exit within {limit:?}"))
}

#[test]
fn sigterm_serves_established_flows_refuses_new_ones_then_exits_zero() {
    let a = Backend::start("127.0.0.1", "a");
    let (mut lb, listen) = Udplb::serve(
        &["--idle-timeout", "1s", "--shutdown-grace", "20s"],
        &[a.addr],
    );
    let established = client("127.0.0.1:0");
    assert_eq!(request(&established, listen, b"one").0, b"a:one");

    signal(lb.pid(), "TERM");
    // New clients are refused and counted (each try is a new client: one admitted just before
    // the signal took effect would be an established flow)...
    assert!(
        wait_for(DEADLINE, || {
            client("127.0.0.1:0").send_to(b"let me in", listen).unwrap();
            lb.try_counter("/drops/shutting_down")
                .is_some_and(|n| n > 0)
        }),
        "new flows are still admitted"
    );
    let newcomer = client("127.0.0.1:0");
    newcomer.send_to(b"let me in", listen).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        newcomer.recv_from(&mut buf).is_err(),
        "a new client got a reply while shutting down"
    );
    // ...while the established flow is still served.
    assert_eq!(request(&established, listen, b"two").0, b"a:two");
    assert!(lb.alive());
    // Once that flow idles out (1 s), udplb exits 0, well before the 20 s grace period.
    let (code, took) = exit_code(&mut lb, Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn the_grace_period_bounds_the_wait() {
    let a = Backend::start("127.0.0.1", "a");
    let (mut lb, listen) = Udplb::serve(
        &["--idle-timeout", "60s", "--shutdown-grace", "300ms"],
        &[a.addr],
    );
    request(&client("127.0.0.1:0"), listen, b"stay");
    signal(lb.pid(), "TERM");
    let (code, took) = exit_code(&mut lb, Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}
