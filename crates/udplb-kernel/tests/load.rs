//! The program loads (the kernel's verifier accepts it) and takes a service's tables (root).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use udplb_kernel::{Backend, Kernel, Service};

#[test]
fn the_verifier_accepts_the_program_and_its_maps_take_a_service() {
    if !udplb_kernel::built() {
        eprintln!("skipped: built without clang");
        return;
    }
    if !nix_is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return;
    }
    let mut k = Kernel::load(4096, udplb_kernel::limit_cells(64), None).expect("loads");
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, i), 53),
            keeps_flows: true,
            local: i == 3,
        })
        .collect();
    let service = Service {
        addr: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 53),
        datagram: false,
        by_ip: false,
        idle: Duration::from_secs(30),
        ring: (0..udplb_kernel::RING_SIZE as u32).map(|i| i % 3).collect(),
        schedule: vec![0, 1, 2],
        allow: vec![(Ipv4Addr::new(192, 0, 2, 0), 24)],
        deny: vec![(Ipv4Addr::new(192, 0, 2, 7), 32)],
        backends,
        method: udplb_kernel::Method::Masquerade {
            first: 61_000,
            last: 65_535,
        },
        limits: Some(udplb_kernel::Limits {
            datagrams_per_source: 100,
            datagrams_per_prefix: 1000,
            new_flows_per_source: 10,
            new_flows_per_prefix: 0,
            prefix_len: 24,
            first_cell: 0,
            cells: 64,
        }),
    };
    k.update(std::slice::from_ref(&service)).expect("updates");
    // Again, unchanged: nothing to write; then one backend fewer.
    k.update(std::slice::from_ref(&service)).expect("updates");
    let mut fewer = service.clone();
    fewer.backends.pop();
    fewer.ring = (0..udplb_kernel::RING_SIZE as u32).map(|i| i % 2).collect();
    assert!(
        k.update(std::slice::from_ref(&fewer)).is_err(),
        "the schedule names a backend gone"
    );
    fewer.schedule = vec![0, 1];
    k.update(&[fewer]).expect("updates");
    assert_eq!(k.drops(), Default::default());
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
