//! Flood safety: 200k forged sources against a flow cap of 20k. The flow table never exceeds
//! its cap, udplb's memory stops growing once the cap is reached, and a legitimate client
//! running alongside keeps its replies. Needs a raw socket (root); skipped with a message
//! otherwise.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::spoof::{Spoofer, v4};
use common::*;

const CAP: u64 = 20_000;
/// Forged sources after the table is full (at least as many come before).
const AFTER_FULL: u32 = 100_000;
const RATE: u32 = 100_000;

/// The resident memory of `pid`.
fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")[0].parse().unwrap()
}

#[test]
fn a_spoofed_flood_stays_within_the_cap_and_spares_established_clients() {
    let Some(mut spoofer) = Spoofer::new() else {
        eprintln!("skipped: forging sources needs a raw socket (root / CAP_NET_RAW)");
        return;
    };
    let a = Backend::start("127.0.0.1", "a");
    // One descriptor per flow: where the hard limit is below the cap, the last flows are shed
    // as `upstream_socket` instead of `flow_cap` (both are refusals of new flows).
    let (lb, listen) = Udplb::serve(
        &["--max-flows", &CAP.to_string(), "--workers", "2"],
        &[a.addr],
    );
    let listen = v4(listen);
    let legit = Load::start(SocketAddr::V4(listen), 4);
    assert!(wait_for(DEADLINE, || lb.counter("/flows/live") == 4));
    let rss_before = rss_kib(lb.pid());

    // Watch the flow count all along: it must never pass the cap.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, peak, admin) = (Arc::clone(&stop), Arc::clone(&peak), lb.admin);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let stats = stats_at(admin, Duration::from_secs(1));
                if let Some(live) = stats.and_then(|s| s["listeners"][0]["flows"]["live"].as_u64())
                {
                    peak.fetch_max(live, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Fill the table: forged sources in chunks until the flows reach the cap (overload
    // rationing admits only part of them while the workers fall behind), at least 100k.
    let mut first = Duration::ZERO;
    let mut next = 0u32;
    while next < AFTER_FULL || (lb.counter("/flows/live") < CAP * 9 / 10 && next < 400_000) {
        first += spoofer.flood(next..next + 10_000, listen, b"flood", RATE);
        next += 10_000;
    }
    assert!(
        wait_for(DEADLINE, || lb.counter("/flows/live") >= CAP * 9 / 10),
        "{next} forged sources did not fill the table: {}",
        lb.stats()
    );
    let rss_half = rss_kib(lb.pid());
    let drops_half = lb.stats()["rxq_overflow"].as_u64().unwrap_or(0);
    let second = spoofer.flood(next..next + AFTER_FULL, listen, b"flood", RATE);
    let sources = next + AFTER_FULL;
    let logs = legit.finish();
    // Figures are taken once udplb has read everything queued for it (the count stands still).
    let mut seen = lb.counter("/datagrams_in");
    assert!(
        wait_for(DEADLINE, || {
            std::thread::sleep(Duration::from_millis(200));
            let now = lb.counter("/datagrams_in");
            std::mem::replace(&mut seen, now) == now
        }),
        "udplb never caught up with the flood"
    );
    let rss_after = rss_kib(lb.pid());
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();

    let (sent, received) = logs
        .iter()
        .fold((0, 0), |(s, r), l| (s + l.sent, r + l.received));
    let refused = ["flow_cap", "upstream_socket", "overload"]
        .iter()
        .map(|r| lb.counter(&format!("/drops/{r}")))
        .sum::<u64>();
    let overload = lb.counter("/drops/overload");
    let peak = peak.load(Ordering::Relaxed);
    let kernel_drops = lb.stats()["rxq_overflow"].as_u64().unwrap_or(0);
    println!(
        "flood: {sources} forged sources at ~{RATE}/s ({:.2} s + {:.2} s), flow cap {CAP}: \
         udplb read {seen} datagrams (kernel queue drops {kernel_drops}, {drops_half} of them while \
         the table filled), peak live flows \
         {peak}, {refused} new flows refused ({overload} of them shed as overload); udplb RSS {rss_before} KiB before, {rss_half} KiB at the cap \
         (+{} KiB), {rss_after} KiB after {AFTER_FULL} more sources (+{} KiB); legitimate clients got \
         {received} of {sent} replies ({:.2} %)",
        first.as_secs_f64(),
        second.as_secs_f64(),
        rss_half.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_half),
        100.0 * received as f64 / sent as f64,
    );
    assert!(sources >= 200_000, "{sources} sources");
    assert!(
        peak <= CAP,
        "live flows peaked at {peak}, above the cap {CAP}"
    );
    assert!(
        refused + peak >= seen - sent,
        "{seen} datagrams read, {peak} flows, only {refused} refused"
    );
    // The table is full before the last 100k sources: they must not grow memory
    // (allowance: allocator noise).
    assert!(
        rss_after <= rss_half + 4 * 1024,
        "memory grew from {rss_half} KiB to {rss_after} KiB after the cap was reached"
    );
    // 20k flows in user space: the table slots, index and timers (the sockets' memory is the
    // kernel's). Bound: 16 MiB over the idle process (measured: about 6.4 MiB).
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Established clients are spared udplb's own shedding (flow cap, overload): they lose at
    // most 1 % more than the kernel's receive queue dropped of everything sent (it drops
    // before udplb reads, forged and legitimate alike, when this shared machine deschedules
    // the workers: 0.74 % in one run, which with a plain 99 % bound failed at 98.95 %).
    let kernel_share = kernel_drops as f64 / (seen + kernel_drops).max(1) as f64;
    let lost_share = sent.saturating_sub(received) as f64 / sent.max(1) as f64;
    assert!(
        lost_share <= 0.01 + kernel_share,
        "legitimate clients got only {received} of {sent} replies (the kernel dropped {:.2} % \
         of all datagrams)",
        100.0 * kernel_share
    );
}
