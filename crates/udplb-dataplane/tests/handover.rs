//! The listener switch of an upgrade, on real sockets: stopped, the workers leave their
//! listener sockets unread (datagrams queue) and hand over every flow with its connected
//! socket; resumed with those flows (a handover that failed), they continue them on the same
//! sockets: the same backend sees the same source port, and what queued meanwhile arrives.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use udplb_core::acl::{Acl, CidrSet};
use udplb_core::snapshot::{BackendInput, ListenerSpec, PoolInput, Snapshot};
use udplb_core::{Affinity, BackendSpec, SchedulerKind, SessionMode};
use udplb_dataplane::{Dataplane, DataplaneOptions, ListenerTotals};

/// An echo backend that answers `TAG:PORT`, PORT being the source port it saw.
fn backend(tag: &'static str) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{tag}:{}", from.port()).as_bytes(), from);
        }
    });
    addr
}

fn listener() -> ListenerSpec {
    ListenerSpec {
        name: "l".into(),
        address: "127.0.0.1:0".parse().unwrap(),
        pool: 0,
        mode: SessionMode::Flow,
        affinity: Affinity::IpPort,
        idle_timeout: Duration::from_secs(30),
        reply_timeout: Duration::from_secs(1),
        max_flows: 1_000,
        max_datagram_size: 1_500,
        acl: Acl::default(),
        limits: None,
        persistence: None,
        proxy_ingress: false,
        proxy_from: CidrSet::default(),
        abuse_pool: None,
        gro: false,
        socket_buffer: 1 << 20,
        shared_upstream: false,
        tcp: None,
    }
}

fn ask(client: &UdpSocket, to: SocketAddr) -> String {
    client.send_to(b"hi", to).unwrap();
    answer(client)
}

fn answer(client: &UdpSocket) -> String {
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("a reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn stopped_workers_hand_over_their_flows_and_take_them_back_on_the_same_sockets() {
    let members = ["a", "b"]
        .into_iter()
        .map(|t| BackendInput::from(BackendSpec::new(backend(t))))
        .collect();
    let pools = vec![PoolInput::new(
        "p".into(),
        SchedulerKind::RoundRobin,
        members,
    )];
    let snap = Snapshot::build(1, vec![listener()], pools, None);
    let shared = Arc::new(ArcSwap::from_pointee(snap));
    let options = DataplaneOptions {
        workers: 2,
        descriptor_reserve: 0,
    };
    let dataplane = Dataplane::start(shared, &options).unwrap();
    let listen = dataplane.listener_addrs()[0];
    let clients: Vec<UdpSocket> = (0..20)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        })
        .collect();
    let before: Vec<String> = clients.iter().map(|c| ask(c, listen)).collect();
    assert!(
        before.iter().any(|r| r.starts_with("a:")) && before.iter().any(|r| r.starts_with("b:"))
    );

    let listening = dataplane.listening();
    let stopped = listening
        .stop(Duration::from_secs(2))
        .expect("workers stop reading");
    assert_eq!(stopped.flows.len(), clients.len(), "every flow handed over");
    assert!(stopped.placements.is_empty());
    // Published at the end of the workers' turn: wait for it.
    let live = || ListenerTotals::sum(dataplane.stats(), 0).flows_live;
    let deadline = Instant::now() + Duration::from_secs(2);
    while live() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(live(), 0, "handed flows left the workers");
    // Unread now: a datagram waits in the listener socket.
    clients[0]
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    clients[0].send_to(b"queued", listen).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        clients[0].recv(&mut buf).is_err(),
        "answered while not reading"
    );
    clients[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    listening.resume(stopped.flows);
    // The queued datagram goes out on its flow's own socket, then every flow continues there.
    assert_eq!(answer(&clients[0]), before[0]);
    let after: Vec<String> = clients.iter().map(|c| ask(c, listen)).collect();
    assert_eq!(after, before, "same backend, same source port");
    dataplane.stop();
}
