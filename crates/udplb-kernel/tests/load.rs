//! The program loads (the kernel's verifier accepts it) and takes a service's tables (root).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
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
    let sizes = udplb_kernel::MapSizes::for_listeners([
        udplb_kernel::PerClient {
            ipv6: false,
            masquerade: true,
            remembers: true,
            max_flows: 4096,
        },
        udplb_kernel::PerClient {
            ipv6: true,
            masquerade: false,
            remembers: true,
            max_flows: 4096,
        },
    ]);
    let mut k =
        Kernel::load(sizes, udplb_kernel::limit_cells(64), (1024, 1024), None).expect("loads");
    let backends: Vec<Backend> = (1..=3)
        .map(|i| Backend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, i), 53).into(),
            keeps_flows: true,
            local: i == 3,
        })
        .collect();
    let service = Service {
        addr: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 53).into(),
        datagram: false,
        by_ip: false,
        idle: Duration::from_secs(30),
        persistence: Some(Duration::from_secs(60)),
        reply_ratio: Some(10),
        sync: Some(Duration::from_secs(120)),
        ring: (0..udplb_kernel::RING_SIZE as u32).map(|i| i % 3).collect(),
        schedule: vec![0, 1, 2],
        allow: vec![
            (Ipv4Addr::new(192, 0, 2, 0).into(), 24),
            ("2001:db8::".parse().unwrap(), 32),
        ],
        deny: vec![(Ipv4Addr::new(192, 0, 2, 7).into(), 32)],
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
            prefix6_len: 56,
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
    // And an IPv6 listener beside it, with NAT.
    let v6 = |s: u16| {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, s)),
            53,
        )
    };
    let mut six = fewer.clone();
    six.addr = v6(1);
    six.method = udplb_kernel::Method::Nat;
    for (i, b) in six.backends.iter_mut().enumerate() {
        b.addr = v6(0x100 + i as u16);
    }
    k.update(&[fewer.clone(), six.clone()]).expect("updates");
    // A backend of the other family is refused.
    six.backends[0].addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 53).into();
    assert!(k.update(&[fewer.clone(), six]).is_err());
    k.update(&[fewer]).expect("updates");
    assert_eq!(k.drops(), Default::default());
    // `[sync]`: a peer's flow is learned for a synced listener of its family only; no
    // traffic, no new flow to tell.
    let client: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    assert!(k.learn(0, client, "10.0.0.1:53".parse().unwrap()));
    assert!(!k.learn(0, client, v6(0x100)));
    assert!(!k.learn(5, client, "10.0.0.1:53".parse().unwrap()));
    let mut told = Vec::new();
    let mut new_flows = k.take_new_flows().expect("the queue of new flows");
    new_flows.drain(&mut told);
    assert!(told.is_empty(), "{told:?}");
    assert!(k.take_new_flows().is_none(), "taken once");
    // This host's addresses (for wildcard listeners): written, changed, and at most 4096 of
    // a family (the others written all the same).
    let locals: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    k.set_locals(&locals).expect("writes");
    k.set_locals(&locals[..1]).expect("removes one");
    let many: Vec<IpAddr> = (0..4097u32)
        .map(|i| Ipv4Addr::from(0x0a00_0000 + i).into())
        .chain([Ipv6Addr::LOCALHOST.into()])
        .collect();
    let e = k.set_locals(&many).expect_err("one too many");
    assert!(e.to_string().contains("more than 4096"), "{e}");
    k.set_locals(&locals).expect("fewer again");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
