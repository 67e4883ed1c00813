//! Table-driven tests of the engine, in the manner of katran's test fixtures: a listener and
//! its pools, then a sequence of inputs (client datagrams, backend replies, health and admin
//! changes, time) each with the verdict it must produce. No sockets: the engine is driven the
//! way the data plane drives it (an `Open` or `Move` is reported back as done, every send is
//! reported with [`Engine::sent`]).
//!
//! Backends are numbered: backend `n` is `10.0.1.n:5300`; pool 0 is the listener's, and a
//! case that gives the listener an abuse pool numbers its backends from 9. Clients are
//! numbered too: client `n` is `203.0.113.n:4000`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use udplb_core::acl::{Acl, CidrSet};
use udplb_core::affinity::{Persistence, PersistenceSettings};
use udplb_core::engine::{Datagram, Engine, Expiry, Handed, ReplyVerdict, Send, Verdict};
use udplb_core::flow::{FlowHandle, FlowKey};
use udplb_core::handover::{Inherited, Placement};
use udplb_core::payload::{KeySpec, PayloadKey};
use udplb_core::ratelimit::{LimitSettings, Limits};
use udplb_core::snapshot::{AdminState, BackendInput, ListenerSpec, PoolInput, Snapshot};
use udplb_core::source::SourceGuard;
use udplb_core::{
    Affinity, BackendSpec, DropReason, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode, Time,
};

mod common;

const LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 53);

fn backend(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, n], 5300))
}

fn client(n: u8) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, n], 4000))
}

fn number(addr: SocketAddr) -> u8 {
    match addr.ip() {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(_) => 0,
    }
}

/// One input.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Client `n` sends `len` bytes.
    Client(u8, usize),
    /// Client `n` sends these bytes.
    Payload(u8, &'static [u8]),
    /// Client `n` sends a GRO train of `len` bytes in segments of `segment`.
    Train(u8, usize, u16),
    /// Client `n` sends a datagram the receive buffer truncated.
    Truncated(u8),
    /// Sender `n` (another balancer) forwards `len` bytes of client `c` with a PROXY v2 header.
    Proxied { sender: u8, client: u8, len: usize },
    /// A datagram from this raw source.
    From(SocketAddr, usize),
    /// Backend `b` answers the flow of client `c` with `len` bytes.
    Reply { client: u8, backend: u8, len: usize },
    /// Backend `b` answers the flow of client `c` with these bytes.
    ReplyPayload {
        client: u8,
        backend: u8,
        data: &'static [u8],
    },
    /// Backend `b` answers the flow of client `c` with a PROXY v2 header and `len` bytes.
    ReplyWithHeader { client: u8, backend: u8, len: usize },
    /// The flow of client `c`'s socket was refused (ICMP port unreachable).
    Refused(u8),
    /// Backend `b`'s health.
    Health(u8, bool),
    /// Backend `b`'s operator state.
    Admin(u8, AdminState),
    /// New flows are no longer admitted (shutdown).
    StopAdmitting,
    /// A received batch begins, the listener overloaded or not.
    Batch { overloaded: bool },
    /// Time passes (milliseconds); deadlines due are handled.
    Wait(u64),
}

/// What an input produced.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    /// A client datagram dropped.
    Drop(DropReason),
    /// A flow opened to backend `to`, its first datagram sent (with a PROXY header or not).
    Open { to: u8, header: bool },
    /// Sent on an established flow.
    Send { to: u8, header: bool },
    /// The flow moved from one backend to another, then sent.
    Move { from: u8, to: u8, header: bool },
    /// A reply relayed to client `to` (skipping `skip` bytes); `completes`: the flow closes.
    Relay {
        to: u8,
        skip: usize,
        completes: bool,
    },
    /// A reply dropped.
    ReplyDrop(DropReason),
    /// A reply for a flow that is gone.
    Gone,
    /// A refusal charged to backend `n` (and the flow closed), or to nobody.
    Charged(Option<u8>),
    /// What time passing produced: backends charged with unanswered requests, flows closed.
    Expired { unanswered: Vec<u8>, closed: usize },
    /// Nothing to observe (a configuration change).
    Done,
}

const fn open(to: u8) -> Out {
    Out::Open { to, header: false }
}

const fn send(to: u8) -> Out {
    Out::Send { to, header: false }
}

const fn moved(from: u8, to: u8) -> Out {
    Out::Move {
        from,
        to,
        header: false,
    }
}

const fn relay(to: u8) -> Out {
    Out::Relay {
        to,
        skip: 0,
        completes: false,
    }
}

const fn hopen(to: u8) -> Out {
    Out::Open { to, header: true }
}

const fn hsend(to: u8) -> Out {
    Out::Send { to, header: true }
}

const fn hmoved(from: u8, to: u8) -> Out {
    Out::Move {
        from,
        to,
        header: true,
    }
}

const fn completed(to: u8) -> Out {
    Out::Relay {
        to,
        skip: 0,
        completes: true,
    }
}

const fn reply(client: u8, backend: u8, len: usize) -> Step {
    Step::Reply {
        client,
        backend,
        len,
    }
}

const fn reply_with_header(client: u8, backend: u8, len: usize) -> Step {
    Step::ReplyWithHeader {
        client,
        backend,
        len,
    }
}

const fn proxied(sender: u8, client: u8, len: usize) -> Step {
    Step::Proxied {
        sender,
        client,
        len,
    }
}

fn expired(unanswered: &[u8], closed: usize) -> Out {
    Out::Expired {
        unanswered: unanswered.to_vec(),
        closed,
    }
}

/// The listener, its pools and the engine of one worker, at a clock.
struct Fixture {
    listener: ListenerSpec,
    pools: Vec<PoolInput>,
    snap: Snapshot,
    admitting: bool,
    guard: Arc<SourceGuard>,
    engine: Engine<u32>,
    now: Time,
    sockets: u32,
}

impl Fixture {
    /// A listener on [`LISTENER`] in `mode`, pool 0 of `backends` backends (1..=n) scheduled by
    /// `scheduler`, changed by `setup` before the first snapshot.
    fn new(
        mode: SessionMode,
        scheduler: SchedulerKind,
        backends: u8,
        setup: impl FnOnce(&mut ListenerSpec, &mut Vec<PoolInput>),
    ) -> Fixture {
        let mut listener = common::listener("dns", LISTENER, mode);
        let members = (1..=backends)
            .map(|n| BackendInput::from(BackendSpec::new(backend(n))))
            .collect();
        let mut pools = vec![PoolInput::new("main".into(), scheduler, members)];
        setup(&mut listener, &mut pools);
        if listener.affinity == Affinity::Ip && listener.persistence.is_none() {
            // As udplb plans it: IP affinity remembers a client for the idle timeout.
            listener.persistence = Some(Arc::new(Persistence::new(PersistenceSettings {
                by_port: false,
                timeout: listener.idle_timeout,
                cap: 1_000,
            })));
        }
        let snap = Snapshot::build(1, vec![listener.clone()], pools.clone(), None);
        let mut engine = Engine::new(1, 0x5eed);
        engine.apply(&snap);
        Fixture {
            listener,
            pools,
            snap,
            admitting: true,
            guard: Arc::default(),
            engine,
            now: Time(1_000_000_000),
            sockets: 0,
        }
    }

    /// Rebuilds the snapshot after a change of the inputs (a new generation).
    fn publish(&mut self) {
        let mut snap = Snapshot::build(
            self.snap.generation + 1,
            vec![self.listener.clone()],
            self.pools.clone(),
            Some(&self.snap),
        );
        snap.admitting = self.admitting;
        snap.guard = Arc::clone(&self.guard);
        self.engine.apply(&snap);
        self.snap = snap;
    }

    fn backend_mut(&mut self, n: u8) -> &mut BackendInput {
        let addr = backend(n);
        self.pools
            .iter_mut()
            .flat_map(|p| p.backends.iter_mut())
            .find(|b| b.spec.addr == addr)
            .expect("no such backend")
    }

    /// The flow serving client `c` (directly or named by a PROXY header).
    fn flow_of(&self, c: u8) -> Option<FlowHandle> {
        let addr = client(c);
        let direct = FlowKey {
            listener: 0,
            client: addr,
            local: None,
            origin: None,
        };
        let table = self.engine.table();
        table.find(&direct).or_else(|| {
            table
                .handles()
                .find(|&h| table.get(h).is_some_and(|f| f.key.origin == Some(addr)))
        })
    }

    fn run(&mut self, step: Step) -> Out {
        match step {
            Step::Client(c, len) => self.client(client(c), &vec![b'q'; len], None, false),
            Step::Payload(c, data) => self.client(client(c), data, None, false),
            Step::ReplyPayload {
                client: c,
                backend: b,
                data,
            } => self.reply(c, b, data),
            Step::Train(c, len, segment) => {
                self.client(client(c), &vec![b'q'; len], Some(segment), false)
            }
            Step::Truncated(c) => self.client(client(c), b"q", None, true),
            Step::From(source, len) => self.client(source, &vec![b'q'; len], None, false),
            Step::Proxied {
                sender,
                client: c,
                len,
            } => {
                let mut header = [0u8; udplb_core::proxy::MAX_HEADER_V6];
                let n = udplb_core::proxy::encode(&mut header, client(c), LISTENER).unwrap();
                let mut data = header[..n].to_vec();
                data.extend(std::iter::repeat_n(b'q', len));
                self.client(client(sender), &data, None, false)
            }
            Step::Reply {
                client: c,
                backend: b,
                len,
            } => self.reply(c, b, &vec![b'a'; len]),
            Step::ReplyWithHeader {
                client: c,
                backend: b,
                len,
            } => {
                let mut header = [0u8; udplb_core::proxy::MAX_HEADER_V6];
                let n = udplb_core::proxy::encode(&mut header, client(c), LISTENER).unwrap();
                let mut data = header[..n].to_vec();
                data.extend(std::iter::repeat_n(b'a', len));
                self.reply(c, b, &data)
            }
            Step::Refused(c) => {
                let h = self.flow_of(c).expect("client has no flow");
                let charged = self.engine.socket_failed(h, true);
                if charged.is_some() {
                    let closed =
                        self.engine
                            .close(h, udplb_core::verdict::CloseReason::Error, self.now);
                    assert!(closed.is_some());
                }
                let number_of = |id| {
                    self.snap
                        .pools
                        .iter()
                        .flat_map(|p| &p.backends)
                        .find(|b| b.id == id)
                        .map(|b| number(b.spec.addr))
                };
                Out::Charged(charged.and_then(number_of))
            }
            Step::Health(b, up) => {
                self.backend_mut(b).healthy = up;
                self.publish();
                Out::Done
            }
            Step::Admin(b, state) => {
                self.backend_mut(b).admin = state;
                self.publish();
                Out::Done
            }
            Step::StopAdmitting => {
                self.admitting = false;
                self.publish();
                Out::Done
            }
            Step::Batch { overloaded } => {
                self.engine.begin_batch(overloaded);
                Out::Done
            }
            Step::Wait(ms) => {
                self.now = self.now.after(Duration::from_millis(ms));
                self.expire()
            }
        }
    }

    fn client(
        &mut self,
        source: SocketAddr,
        data: &[u8],
        segment_size: Option<u16>,
        truncated: bool,
    ) -> Out {
        let d = Datagram {
            listener: 0,
            source,
            local: None,
            data,
            truncated,
            segment_size,
        };
        let (s, out): (Send, fn(u8, bool) -> Out) =
            match self.engine.on_client(&self.snap, self.now, &d) {
                Verdict::Drop(reason) => return Out::Drop(reason),
                Verdict::Send(s) => (s, |to, header| Out::Send { to, header }),
                Verdict::Open(o) => {
                    self.sockets += 1;
                    (
                        self.engine.opened(&o, self.sockets, self.now),
                        |to, header| Out::Open { to, header },
                    )
                }
                Verdict::Move(m) => {
                    let from = number(m.from);
                    let s = self.engine.moved(&m);
                    assert_eq!(s.to, m.to);
                    let to = number(s.to);
                    self.engine
                        .sent(&self.snap, &s, self.now, data.len() - s.skip);
                    return Out::Move {
                        from,
                        to,
                        header: s.header,
                    };
                }
            };
        self.engine
            .sent(&self.snap, &s, self.now, data.len() - s.skip);
        out(number(s.to), s.header)
    }

    fn reply(&mut self, c: u8, b: u8, data: &[u8]) -> Out {
        let Some(h) = self.flow_of(c) else {
            return Out::Gone;
        };
        match self
            .engine
            .on_reply(&self.snap, self.now, h, &backend(b), data, false)
        {
            ReplyVerdict::Gone => Out::Gone,
            ReplyVerdict::Drop { reason, .. } => Out::ReplyDrop(reason),
            ReplyVerdict::Forward {
                to,
                skip,
                completes,
                ..
            } => {
                let to = number(*to);
                if completes {
                    let closed =
                        self.engine
                            .close(h, udplb_core::verdict::CloseReason::Completed, self.now);
                    assert!(closed.is_some());
                }
                Out::Relay {
                    to,
                    skip,
                    completes,
                }
            }
        }
    }

    fn expire(&mut self) -> Out {
        let mut unanswered = Vec::new();
        let mut closed = 0;
        let snap = &self.snap;
        self.engine.expire(self.now, |e| match e {
            Expiry::Unanswered { backend: id, .. } => {
                let b = snap
                    .pools
                    .iter()
                    .flat_map(|p| &p.backends)
                    .find(|b| b.id == id);
                unanswered.push(b.map_or(0, |b| number(b.spec.addr)));
            }
            Expiry::Closed(_) => closed += 1,
        });
        Out::Expired { unanswered, closed }
    }
}

/// One case: a setup and its steps, each with the output it must produce.
struct Case {
    name: &'static str,
    mode: SessionMode,
    scheduler: SchedulerKind,
    backends: u8,
    setup: fn(&mut ListenerSpec, &mut Vec<PoolInput>),
    steps: Vec<(Step, Out)>,
}

fn check(case: Case) {
    let mut fx = Fixture::new(case.mode, case.scheduler, case.backends, case.setup);
    for (i, (step, expected)) in case.steps.into_iter().enumerate() {
        let got = fx.run(step);
        assert_eq!(got, expected, "case {:?}, step {i} ({step:?})", case.name);
        fx.engine.table().check_invariants();
    }
}

const REQUEST_RESPONSE: SessionMode = SessionMode::RequestResponse { responses: 1 };
const RR: SchedulerKind = SchedulerKind::RoundRobin;

fn no_setup(_: &mut ListenerSpec, _: &mut Vec<PoolInput>) {}

fn limits(settings: LimitSettings) -> Option<Arc<Limits>> {
    Some(Arc::new(Limits::new(settings)))
}

/// An abuse pool (index 1) of backend 9.
fn with_abuse_pool(l: &mut ListenerSpec, pools: &mut Vec<PoolInput>) {
    let members = vec![BackendInput::from(BackendSpec::new(backend(9)))];
    pools.push(PoolInput::new("abuse".into(), RR, members));
    l.abuse_pool = Some(1);
}

use Step::*;

#[test]
fn flow_mode_keeps_a_client_on_one_backend_and_spreads_clients() {
    check(Case {
        name: "flow mode",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 3,
        setup: no_setup,
        steps: vec![
            (Client(1, 10), open(1)),
            (Client(1, 10), send(1)),
            (Client(2, 10), open(2)),
            (Client(3, 10), open(3)),
            (Client(1, 10), send(1)),
            (Client(4, 10), open(1)),
            (reply(2, 2, 20), relay(2)),
            // An idle flow closes; the client's next datagram is scheduled again.
            (Wait(29_000), expired(&[], 0)),
            (Client(1, 10), send(1)),
            (Wait(1_500), expired(&[], 3)),
            (reply(2, 2, 20), Out::Gone),
            (Client(2, 10), open(2)),
        ],
    });
}

#[test]
fn datagram_mode_schedules_every_datagram_and_knows_who_answered() {
    check(Case {
        name: "datagram mode",
        mode: SessionMode::Datagram,
        scheduler: RR,
        backends: 3,
        setup: no_setup,
        steps: vec![
            (Client(1, 10), open(1)),
            (Client(1, 10), send(2)),
            (Client(1, 10), send(3)),
            (Client(2, 10), open(1)),
            (reply(1, 3, 5), relay(1)),
            (reply(1, 2, 5), relay(1)),
            // Not a backend of the pool.
            (reply(1, 7, 5), Out::ReplyDrop(DropReason::UnknownSource)),
            // A backend down leaves the rotation at the next datagram.
            (Health(2, false), Out::Done),
            (Client(1, 10), send(1)),
            (Client(1, 10), send(3)),
            (Client(1, 10), send(1)),
            // An unconnected socket's refusal is charged through its error queue, not here.
            (Refused(1), Out::Charged(None)),
        ],
    });
}

#[test]
fn request_response_closes_answered_exchanges_and_charges_unanswered_ones() {
    check(Case {
        name: "request-response",
        mode: REQUEST_RESPONSE,
        scheduler: RR,
        backends: 2,
        setup: no_setup,
        steps: vec![
            (Client(1, 30), open(1)),
            (reply(1, 1, 90), completed(1)),
            // A second answer to a closed exchange reaches nobody.
            (reply(1, 1, 90), Out::Gone),
            (Client(1, 30), open(2)),
            (Wait(999), expired(&[], 0)),
            (Wait(2), expired(&[2], 0)),
            // A refusal on the flow's connected socket is charged to its backend.
            (Client(2, 30), open(1)),
            (Refused(2), Out::Charged(Some(1))),
            (Client(2, 30), open(2)),
        ],
    });
}

#[test]
fn a_reply_timeout_above_the_idle_timeout_still_charges_the_backend() {
    check(Case {
        name: "reply timeout above idle",
        mode: REQUEST_RESPONSE,
        scheduler: RR,
        backends: 1,
        setup: |l, _| {
            l.idle_timeout = Duration::from_millis(500);
            l.reply_timeout = Duration::from_secs(2);
        },
        steps: vec![(Client(1, 30), open(1)), (Wait(501), expired(&[1], 1))],
    });
}

#[test]
fn failover_moves_flows_to_the_scheduler_choice_and_drain_keeps_them() {
    check(Case {
        name: "failover and drain",
        mode: SessionMode::Flow,
        scheduler: SchedulerKind::LeastFlows,
        backends: 3,
        setup: no_setup,
        steps: vec![
            (Client(1, 10), open(1)),
            (Client(2, 10), open(2)),
            (Client(3, 10), open(3)),
            (Client(4, 10), open(1)),
            (Client(5, 10), open(2)),
            // Backend 1 (2 flows) goes down: its flows go where the fewest flows are.
            (Health(1, false), Out::Done),
            (Client(1, 10), moved(1, 3)),
            (Client(4, 10), moved(1, 2)),
            (Client(2, 10), send(2)),
            // Draining: established flows stay, new ones go elsewhere.
            (Health(1, true), Out::Done),
            (Admin(3, AdminState::Draining), Out::Done),
            (Client(3, 10), send(3)),
            (Client(6, 10), open(1)),
            (Client(7, 10), open(1)),
            (Client(8, 10), open(1)),
            // Disabled: established flows leave too.
            (Admin(3, AdminState::Disabled), Out::Done),
            (Client(3, 10), moved(3, 1)),
            (Client(1, 10), moved(3, 2)),
        ],
    });
}

#[test]
fn keep_policy_leaves_flows_on_a_down_backend() {
    check(Case {
        name: "on_down = keep",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 2,
        setup: |_, pools| pools[0].on_down = FailurePolicy::Keep,
        steps: vec![
            (Client(1, 10), open(1)),
            (Health(1, false), Out::Done),
            (Client(1, 10), send(1)),
            (Client(2, 10), open(2)),
            (Client(3, 10), open(2)),
        ],
    });
}

#[test]
fn displaced_flows_rebalance_after_a_pause_once_the_pool_is_whole() {
    check(Case {
        name: "rebalance",
        mode: SessionMode::Flow,
        scheduler: SchedulerKind::LeastFlows,
        backends: 2,
        setup: |_, pools| pools[0].rebalance = Some(Duration::from_secs(2)),
        steps: vec![
            (Health(1, false), Out::Done),
            (Client(1, 10), open(2)),
            (Client(2, 10), open(2)),
            (Client(3, 10), open(2)),
            (Client(4, 10), open(2)),
            (Health(1, true), Out::Done),
            // No pause yet: nothing moves.
            (Client(1, 10), send(2)),
            (Wait(2_000), expired(&[], 0)),
            (Client(1, 10), moved(2, 1)),
            // Within one flow per unit of weight of its share: the rest stay, and are no
            // longer displaced.
            (Client(2, 10), send(2)),
            (Client(3, 10), send(2)),
            (Client(4, 10), send(2)),
            (Wait(2_000), expired(&[], 0)),
            (Client(4, 10), send(2)),
            // A flow placed while the pool was whole never moves.
            (Client(5, 10), open(1)),
        ],
    });
}

#[test]
fn all_backends_down_drops_as_no_backend() {
    check(Case {
        name: "no backend",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |_, pools| pools[0].all_down = udplb_core::AllDownPolicy::Drop,
        steps: vec![
            (Client(1, 10), open(1)),
            (Health(1, false), Out::Done),
            (Client(1, 10), Out::Drop(DropReason::NoBackend)),
            (Client(2, 10), Out::Drop(DropReason::NoBackend)),
            (Health(1, true), Out::Done),
            (Client(2, 10), open(1)),
        ],
    });
}

#[test]
fn bad_input_and_shutdown_are_dropped_with_their_reason() {
    check(Case {
        name: "bad input",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |l, _| l.max_datagram_size = 100,
        steps: vec![
            (Client(1, 0), Out::Drop(DropReason::Empty)),
            (Client(1, 101), Out::Drop(DropReason::Oversize)),
            (Truncated(1), Out::Drop(DropReason::Oversize)),
            (Train(1, 300, 101), Out::Drop(DropReason::Oversize)),
            (Train(1, 300, 100), open(1)),
            (
                From(SocketAddr::from(([203, 0, 113, 2], 0)), 10),
                Out::Drop(DropReason::BadSource),
            ),
            (reply(1, 1, 101), Out::ReplyDrop(DropReason::ReplyOversize)),
            // Shutting down: established flows are served, new ones are not admitted.
            (StopAdmitting, Out::Done),
            (Client(1, 10), send(1)),
            (Client(2, 10), Out::Drop(DropReason::ShuttingDown)),
        ],
    });
}

#[test]
fn sources_that_loop_are_refused() {
    let mut fx = Fixture::new(SessionMode::Flow, RR, 2, no_setup);
    fx.guard = Arc::new(SourceGuard::new([LISTENER], [backend(1), backend(2)], []));
    fx.publish();
    for source in [
        LISTENER,
        backend(2),
        SocketAddr::from(([224, 0, 0, 1], 4000)),
    ] {
        assert_eq!(
            fx.run(From(source, 10)),
            Out::Drop(DropReason::BadSource),
            "{source}"
        );
    }
    assert_eq!(fx.run(Client(1, 10)), open(1));
}

#[test]
fn flow_caps_hold_per_worker() {
    check(Case {
        name: "flow cap",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 2,
        setup: |l, _| l.max_flows = 2,
        steps: vec![
            (Client(1, 10), open(1)),
            (Client(2, 10), open(2)),
            (Client(3, 10), Out::Drop(DropReason::FlowCap)),
            (Client(1, 10), send(1)),
            (Wait(30_001), expired(&[], 2)),
            (Client(3, 10), open(1)),
        ],
    });
}

#[test]
fn rate_limits_drop_or_divert_to_the_abuse_pool() {
    check(Case {
        name: "rate limits, no abuse pool",
        mode: REQUEST_RESPONSE,
        scheduler: RR,
        backends: 2,
        setup: |l, _| {
            l.limits = limits(LimitSettings {
                datagrams_per_source: Some(3),
                new_flows_per_source: Some(1),
                ..LimitSettings::default()
            })
        },
        steps: vec![
            (Client(1, 10), open(1)),
            (reply(1, 1, 10), completed(1)),
            // A second new flow within the second.
            (Client(1, 10), Out::Drop(DropReason::FlowRateLimited)),
            (Client(2, 10), open(2)),
            (Client(2, 10), send(2)),
            (Client(2, 10), send(2)),
            (Client(2, 10), Out::Drop(DropReason::RateLimited)),
            (Wait(1_100), expired(&[2], 0)),
            (Client(1, 10), open(1)),
        ],
    });
    check(Case {
        name: "rate limits, abuse pool",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 2,
        setup: |l, pools| {
            with_abuse_pool(l, pools);
            l.limits = limits(LimitSettings {
                new_flows_per_source: Some(1),
                ..LimitSettings::default()
            });
        },
        steps: vec![
            (Client(1, 10), open(1)),
            (Wait(30_001), expired(&[], 1)),
            (Client(1, 10), open(2)),
            // The second new flow within the second goes to the abuse pool, and stays there.
            (Wait(30_001), expired(&[], 1)),
            (Client(1, 10), open(1)),
        ],
    });
}

#[test]
fn refused_clients_go_to_the_abuse_pool_when_there_is_one() {
    check(Case {
        name: "denied, no abuse pool",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |l, _| {
            let net: udplb_core::acl::Cidr = "203.0.113.66/32".parse().unwrap();
            l.acl = Acl::new(&[], &[net]);
        },
        steps: vec![
            (Client(66, 10), Out::Drop(DropReason::Denied)),
            (Client(1, 10), open(1)),
        ],
    });
    check(Case {
        name: "denied, abuse pool",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |l, pools| {
            with_abuse_pool(l, pools);
            let net: udplb_core::acl::Cidr = "203.0.113.66/32".parse().unwrap();
            l.acl = Acl::new(&[], &[net]);
        },
        steps: vec![
            (Client(66, 10), open(9)),
            (Client(66, 10), send(9)),
            (reply(66, 9, 10), relay(66)),
            (Client(1, 10), open(1)),
        ],
    });
}

#[test]
fn proxy_headers_go_first_until_answered_or_on_every_datagram() {
    check(Case {
        name: "proxy first",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 2,
        setup: |_, pools| pools[0].proxy_header = ProxyHeader::First,
        steps: vec![
            (Client(1, 10), hopen(1)),
            // Not answered yet: the first datagram may have been lost.
            (Client(1, 10), hsend(1)),
            (reply(1, 1, 10), relay(1)),
            (Client(1, 10), send(1)),
            // A move to another backend sends it again.
            (Health(1, false), Out::Done),
            (Client(1, 10), hmoved(1, 2)),
            (reply(1, 2, 10), relay(1)),
            (Client(1, 10), send(2)),
        ],
    });
    check(Case {
        name: "proxy every",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |_, pools| pools[0].proxy_header = ProxyHeader::Every,
        steps: vec![
            (Client(1, 10), hopen(1)),
            (reply(1, 1, 10), relay(1)),
            (Client(1, 10), hsend(1)),
        ],
    });
    check(Case {
        name: "proxy in datagram mode",
        mode: SessionMode::Datagram,
        scheduler: RR,
        backends: 2,
        setup: |_, pools| pools[0].proxy_header = ProxyHeader::First,
        steps: vec![
            (Client(1, 10), hopen(1)),
            (reply(1, 1, 10), relay(1)),
            (Client(1, 10), hsend(2)),
        ],
    });
}

#[test]
fn replies_with_a_proxy_header_are_stripped_or_dropped() {
    check(Case {
        name: "strip reply headers",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |_, pools| pools[0].strip_reply_proxy = true,
        steps: vec![
            (Client(1, 10), open(1)),
            (
                reply_with_header(1, 1, 10),
                Out::Relay {
                    to: 1,
                    skip: 28,
                    completes: false,
                },
            ),
            (reply(1, 1, 10), relay(1)),
        ],
    });
}

#[test]
fn proxy_ingress_keys_flows_by_the_client_each_header_names() {
    check(Case {
        name: "proxy ingress",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 2,
        setup: |l, _| l.proxy_ingress = true,
        steps: vec![
            // A new sender must say whom it forwards.
            (Client(100, 10), Out::Drop(DropReason::ProxyHeader)),
            (proxied(100, 1, 10), open(1)),
            (proxied(100, 2, 10), open(2)),
            (proxied(100, 1, 10), send(1)),
            // Without a header: the client the sender named last.
            (Client(100, 10), send(1)),
            (reply(1, 1, 10), relay(100)),
            (reply(2, 2, 10), relay(100)),
            // A header with nothing after it.
            (proxied(100, 3, 0), Out::Drop(DropReason::Empty)),
        ],
    });
    check(Case {
        name: "proxy ingress from trusted senders only",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |l, _| {
            l.proxy_ingress = true;
            let net: udplb_core::acl::Cidr = "203.0.113.100/32".parse().unwrap();
            l.proxy_from = CidrSet::new(&[net]);
        },
        steps: vec![
            (proxied(101, 1, 10), Out::Drop(DropReason::ProxyHeader)),
            (proxied(100, 1, 10), open(1)),
        ],
    });
}

#[test]
fn replies_beyond_the_amplification_ratio_are_dropped() {
    check(Case {
        name: "amplification",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: |l, _| {
            l.limits = limits(LimitSettings {
                reply_ratio: Some(3),
                ..LimitSettings::default()
            })
        },
        steps: vec![
            (Client(1, 10), open(1)),
            (reply(1, 1, 25), relay(1)),
            (reply(1, 1, 25), Out::ReplyDrop(DropReason::Amplification)),
            (reply(1, 1, 5), relay(1)),
            (Client(1, 10), send(1)),
            (reply(1, 1, 25), relay(1)),
        ],
    });
}

#[test]
fn overloaded_listeners_ration_new_flows_but_serve_established_ones() {
    let mut steps = vec![
        (Client(1, 10), open(1)),
        (Batch { overloaded: true }, Out::Done),
    ];
    for c in 2..2 + udplb_core::engine::NEW_FLOWS_PER_BATCH_UNDER_BACKLOG as u8 {
        steps.push((Client(c, 10), open(1)));
    }
    steps.push((Client(50, 10), Out::Drop(DropReason::Overload)));
    steps.push((Client(1, 10), send(1)));
    steps.push((Batch { overloaded: false }, Out::Done));
    steps.push((Client(50, 10), open(1)));
    check(Case {
        name: "overload",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 1,
        setup: no_setup,
        steps,
    });
}

#[test]
fn ip_affinity_keeps_a_clients_ports_on_one_backend() {
    check(Case {
        name: "ip affinity",
        mode: SessionMode::Flow,
        scheduler: RR,
        backends: 3,
        setup: |l, _| l.affinity = Affinity::Ip,
        steps: vec![
            (Client(1, 10), open(1)),
            (
                From(SocketAddr::from(([203, 0, 113, 1], 4001)), 10),
                open(1),
            ),
            (Client(2, 10), open(2)),
            (
                From(SocketAddr::from(([203, 0, 113, 1], 4002)), 10),
                open(1),
            ),
        ],
    });
}

/// Persistence by ip:port for 5 s.
fn with_persistence(l: &mut ListenerSpec, _: &mut Vec<PoolInput>) {
    l.persistence = Some(Arc::new(Persistence::new(PersistenceSettings {
        by_port: true,
        timeout: Duration::from_secs(5),
        cap: 1_000,
    })));
}

#[test]
fn persistence_keeps_a_clients_exchanges_on_one_backend() {
    check(Case {
        name: "persistence, request-response",
        mode: REQUEST_RESPONSE,
        scheduler: RR,
        backends: 2,
        setup: with_persistence,
        steps: vec![
            (Client(1, 30), open(1)),
            (reply(1, 1, 90), completed(1)),
            // Round robin would say 2: the client returns to 1.
            (Client(1, 30), open(1)),
            (reply(1, 1, 90), completed(1)),
            (Client(2, 30), open(2)),
            (reply(2, 2, 90), completed(2)),
            (Wait(4_900), expired(&[], 0)),
            (Client(2, 30), open(2)),
            (reply(2, 2, 90), completed(2)),
            // Forgotten 5 s after its last exchange: scheduled again.
            (Wait(5_000), expired(&[], 0)),
            (Client(2, 30), open(1)),
            (reply(2, 1, 90), completed(2)),
            // Not to a backend that takes no new clients: scheduled, then remembered there.
            (Admin(1, AdminState::Draining), Out::Done),
            (Client(1, 30), open(2)),
            (reply(1, 2, 90), completed(1)),
            (Admin(1, AdminState::Enabled), Out::Done),
            (Client(1, 30), open(2)),
        ],
    });
}

#[test]
fn persistence_in_datagram_mode_keeps_a_client_on_one_backend_until_it_fails() {
    check(Case {
        name: "persistence, datagram mode",
        mode: SessionMode::Datagram,
        scheduler: RR,
        backends: 3,
        setup: with_persistence,
        steps: vec![
            (Client(1, 10), open(1)),
            (Client(1, 10), send(1)),
            (Client(2, 10), open(2)),
            (Client(1, 10), send(1)),
            (reply(1, 1, 5), relay(1)),
            (Health(1, false), Out::Done),
            (Client(1, 10), send(2)),
            (Client(1, 10), send(2)),
            (reply(1, 2, 5), relay(1)),
            // Back up: the client stays where it went.
            (Health(1, true), Out::Done),
            (Client(1, 10), send(2)),
            (Client(2, 10), send(2)),
            // Its flow idles out; it is remembered on 2 for 5 s more.
            (Wait(30_001), expired(&[], 2)),
            (Client(1, 10), open(2)),
        ],
    });
}

/// A RADIUS packet of `code` with `attrs`, for the life of the test.
fn radius(code: u8, attrs: &[(u8, &[u8])]) -> &'static [u8] {
    Vec::leak(udplb_core::payload::radius::build(code, attrs))
}

// The type of `Case::setup`, which other setups need to push pools.
#[allow(clippy::ptr_arg)]
fn radius_key(_: &mut ListenerSpec, pools: &mut Vec<PoolInput>) {
    pools[0].payload_key = Some(Arc::new(PayloadKey::new(KeySpec::Radius {
        attributes: vec![],
        state_timeout: Duration::from_secs(60),
        max_states: 1_000,
    })));
}

#[test]
fn radius_state_routes_every_round_to_the_backend_that_issued_it() {
    const USER: u8 = 1;
    const STATE: u8 = 24;
    let first = radius(1, &[(USER, b"bob")]);
    let challenge = |state: &[u8]| radius(11, &[(STATE, state)]);
    let round2 = |state: &[u8]| radius(1, &[(USER, b"bob"), (STATE, state)]);
    check(Case {
        name: "RADIUS State",
        mode: SessionMode::Datagram,
        scheduler: RR,
        backends: 3,
        setup: radius_key,
        steps: vec![
            (Payload(1, first), open(1)),
            (
                ReplyPayload {
                    client: 1,
                    backend: 1,
                    data: challenge(b"s1"),
                },
                relay(1),
            ),
            (Payload(2, first), open(2)),
            (
                ReplyPayload {
                    client: 2,
                    backend: 2,
                    data: challenge(b"s2"),
                },
                relay(2),
            ),
            // Each round to its issuer, from whichever port (or NAS) it comes.
            (Payload(1, round2(b"s1")), send(1)),
            (Payload(2, round2(b"s1")), send(1)),
            (Payload(3, round2(b"s2")), open(2)),
            (Payload(1, round2(b"s2")), send(2)),
            // Unknown States, other packets and garbage: the scheduler (round robin on).
            (Payload(1, round2(b"zz")), send(3)),
            (Payload(1, first), send(1)),
            (Payload(1, b"not radius"), send(2)),
            // An issuer that goes down loses its conversations to the scheduler.
            (Health(1, false), Out::Done),
            (Payload(1, round2(b"s1")), send(3)),
            (Health(1, true), Out::Done),
            (Payload(1, round2(b"s1")), send(1)),
            // Forgotten after the State timeout.
            (Wait(60_001), expired(&[], 3)),
            (Payload(1, round2(b"s2")), open(1)),
            (Payload(1, round2(b"s2")), send(2)),
        ],
    });
}

#[test]
fn sip_calls_stay_on_one_backend_whoever_sends_them() {
    let mut fx = Fixture::new(
        SessionMode::Datagram,
        SchedulerKind::Maglev,
        4,
        |_, pools| {
            pools[0].payload_key = Some(Arc::new(PayloadKey::new(KeySpec::Sip)));
        },
    );
    let mut backend_of_call = std::collections::HashMap::new();
    for i in 0..200u32 {
        let call = i % 40;
        let sender = 1 + (i % 7) as u8;
        let text = if i % 2 == 0 {
            format!(
                "INVITE sip:b@example.test SIP/2.0\r\nCall-ID: call-{call}@example.test\r\n\r\n"
            )
        } else {
            format!("SIP/2.0 200 OK\r\ni: call-{call}@example.test\r\n\r\n")
        };
        let data: &'static [u8] = Vec::leak(text.into_bytes());
        let to = match fx.run(Payload(sender, data)) {
            Out::Open { to, .. } | Out::Send { to, .. } => to,
            other => panic!("call {call}: {other:?}"),
        };
        assert_eq!(
            *backend_of_call.entry(call).or_insert(to),
            to,
            "call {call} changed backend"
        );
    }
    let used: std::collections::HashSet<u8> = backend_of_call.values().copied().collect();
    assert_eq!(
        used.len(),
        4,
        "40 calls over 4 backends: {backend_of_call:?}"
    );
    // A keep-alive has no key; garbage is scheduled and counted.
    assert!(matches!(fx.run(Payload(1, b"\r\n\r\n")), Out::Send { .. }));
    assert!(matches!(fx.run(Payload(1, b"garbage")), Out::Send { .. }));
    let key = fx.snap.pools[0].payload_key.as_ref().unwrap();
    assert_eq!(key.counts().malformed, 1);
}

#[test]
fn trains_pass_whole_only_where_nothing_is_decided_per_datagram() {
    let passes = |mode, setup: fn(&mut ListenerSpec, &mut Vec<PoolInput>)| {
        let fx = Fixture::new(mode, RR, 2, setup);
        Engine::<u32>::passes_trains(&fx.snap, 0)
    };
    assert!(passes(SessionMode::Flow, no_setup));
    assert!(!passes(SessionMode::Datagram, no_setup));
    assert!(!passes(REQUEST_RESPONSE, no_setup));
    assert!(!passes(SessionMode::Flow, |l, _| {
        l.limits = limits(LimitSettings {
            datagrams_per_source: Some(10),
            ..LimitSettings::default()
        })
    }));
    assert!(!passes(SessionMode::Flow, |l, _| l.proxy_ingress = true));
    assert!(!passes(SessionMode::Flow, |_, p| {
        p[0].proxy_header = ProxyHeader::First
    }));
    assert!(!passes(SessionMode::Flow, |l, p| {
        with_abuse_pool(l, p);
        p[1].proxy_header = ProxyHeader::Every;
    }));
}

/// A QUIC short-header packet to a connection ID that server `server` issued (QUIC-LB config
/// 1, one byte of server ID), for the life of the test.
fn quic_short(server: u8, nonce: u8) -> &'static [u8] {
    Vec::leak(vec![
        0x40,
        0x20 | (nonce & 0x1f),
        server,
        nonce,
        0,
        0,
        0,
        0,
        0xaa,
        0xbb,
    ])
}

/// A QUIC Initial with a client's random destination connection ID.
fn quic_initial(random: u8) -> &'static [u8] {
    Vec::leak(vec![
        0xc0, 0, 0, 0, 1, 8, random, 1, 2, 3, 4, 5, 6, 7, 0, 0x44, 0x40,
    ])
}

#[test]
fn quic_lb_routes_connection_ids_to_their_server_and_survives_migration() {
    let mut fx = Fixture::new(SessionMode::Flow, SchedulerKind::Maglev, 3, |_, pools| {
        let servers = (1..=3).map(|n| (backend(n), vec![n])).collect();
        pools[0].payload_key = Some(Arc::new(PayloadKey::new(KeySpec::QuicLb {
            config: udplb_core::payload::quic::LbConfig {
                config_id: 1,
                server_id_length: 1,
            },
            servers,
        })));
    });
    let to = |out: Out| match out {
        Out::Open { to, .. } | Out::Send { to, .. } | Out::Move { to, .. } => to,
        other => panic!("{other:?}"),
    };
    // Initials: by a hash of their connection ID, spread; a retransmission agrees.
    let mut first = std::collections::HashSet::new();
    for c in 1..=30u8 {
        let b = to(fx.run(Payload(c, quic_initial(c))));
        first.insert(b);
        assert_eq!(to(fx.run(Payload(c, quic_initial(c)))), b);
    }
    assert_eq!(first.len(), 3, "30 connections over 3 servers");
    // A connection whose client moved (a new address, a new flow) reaches the server that
    // issued its connection IDs, whatever the client's address hashes to.
    for (c, server) in (40..=90u8).zip([1u8, 2, 3].into_iter().cycle()) {
        assert_eq!(to(fx.run(Payload(c, quic_short(server, c)))), server);
    }
    // Its server down: by the ID's hash (the connection is lost there anyway).
    fx.run(Health(3, false));
    let b = to(fx.run(Payload(100, quic_short(3, 1))));
    assert_ne!(b, 3);
    assert_eq!(
        to(fx.run(Payload(101, quic_short(3, 1)))),
        b,
        "instances agree"
    );
    // Too short to hold a connection ID: the client's hash, counted.
    fx.run(Payload(102, b"\xc0\x00\x00"));
    let key = fx.snap.pools[0].payload_key.as_ref().unwrap();
    assert_eq!(key.counts().malformed, 1);
}

#[test]
fn a_new_process_opens_handed_over_flows_to_their_backends_while_they_keep_flows() {
    let mut old = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    for (c, b) in [(1, 1), (2, 2), (3, 3), (4, 1), (7, 2)] {
        assert_eq!(old.run(Client(c, 10)), open(b));
    }
    let placements: Vec<Placement> = old.engine.placements().collect();
    assert_eq!(placements.len(), 5);
    let mut new = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    assert_eq!(new.run(Admin(2, AdminState::Draining)), Out::Done);
    assert_eq!(new.run(Health(3, false)), Out::Done);
    let until = Time(new.now.0 + 30_000);
    new.engine
        .inherit(Arc::new(Inherited::new(placements)), until);
    let steps = [
        // Round robin would say 1: a draining backend keeps its established flows.
        (Client(2, 10), open(2)),
        // Down: the flow is placed as a failover would place it.
        (Client(3, 10), open(1)),
        (Client(4, 10), open(1)),
        (Client(5, 10), open(1)),
        (Client(2, 10), send(2)),
        // Taken once: a later flow of the client is scheduled.
        (Wait(31_000), expired(&[], 4)),
        (Client(2, 10), open(1)),
        // Not used before the idle timeouts passed: forgotten (2, draining, would keep it).
        (Client(7, 10), open(1)),
    ];
    for (i, (step, expected)) in steps.into_iter().enumerate() {
        assert_eq!(new.run(step), expected, "step {i} ({step:?})");
    }
}

#[test]
fn flows_handed_over_with_their_sockets_continue_where_their_backend_keeps_flows() {
    let mut old = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    for (c, b) in [(1, 1), (2, 2), (3, 3)] {
        assert_eq!(old.run(Client(c, 10)), open(b));
    }
    let mut handed = Vec::new();
    old.engine.hand_over(old.now, |h| handed.push(h));
    assert_eq!(handed.len(), 3);
    assert_eq!(
        old.engine.table().live(),
        0,
        "handed flows leave this process"
    );
    let mut new = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    assert_eq!(new.run(Admin(2, AdminState::Draining)), Out::Done);
    assert_eq!(new.run(Health(3, false)), Out::Done);
    let mut adopted = 0;
    for h in handed {
        let bare = Handed {
            key: h.key,
            backend: h.backend,
            requested: h.requested,
            replied: h.replied,
            io: (),
        };
        if let Some(open) = new.engine.adoption(&new.snap, &bare) {
            assert_eq!(open.to, h.backend);
            let send = new.engine.opened(&open, h.io, new.now);
            new.engine.resume_counts(send.flow, h.requested, h.replied);
            adopted += 1;
        }
    }
    // Backend 3 is down: its flow is not adopted (the client's next datagram is placed anew).
    assert_eq!(adopted, 2);
    let steps = [
        (Client(1, 10), send(1)),
        // Draining keeps established flows: round robin would have said 1.
        (Client(2, 10), send(2)),
        (Client(3, 10), open(1)),
    ];
    for (i, (step, expected)) in steps.into_iter().enumerate() {
        assert_eq!(new.run(step), expected, "step {i} ({step:?})");
    }
}

#[test]
fn a_flow_another_instance_placed_opens_on_its_backend_while_it_keeps_flows() {
    use udplb_core::sync::{Outbox, Synced};
    let share = |fx: &mut Fixture| {
        let (synced, outbox) = (Arc::new(Synced::new(1024)), Arc::new(Outbox::new(1024)));
        fx.engine.share(Arc::clone(&synced), Arc::clone(&outbox));
        (synced, outbox)
    };
    let mut a = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    let (_, told_by_a) = share(&mut a);
    for (c, b) in [(1, 1), (2, 2), (3, 3)] {
        assert_eq!(a.run(Client(c, 10)), open(b));
    }
    let mut sent = Vec::new();
    told_by_a.drain_into(&mut sent);
    let clients: Vec<(u8, u8)> = sent
        .iter()
        .map(|p| (number(p.client), number(p.backend)))
        .collect();
    assert_eq!(clients, [(1, 1), (2, 2), (3, 3)], "each flow told once");
    // An active flow is told again once per idle timeout; an idle one is not.
    let idle = a.listener.idle_timeout.as_millis() as u64;
    assert_eq!(a.run(Wait(idle - 1)), expired(&[], 0));
    assert_eq!(a.run(Client(2, 10)), send(2));
    assert_eq!(a.run(Wait(1)), expired(&[], 2));
    told_by_a.drain_into(&mut sent);
    assert_eq!(sent.len(), 4);
    assert_eq!((number(sent[3].client), number(sent[3].backend)), (2, 2));

    let mut b = Fixture::new(SessionMode::Flow, RR, 3, no_setup);
    let (learned, _) = share(&mut b);
    for p in &sent {
        learned.record(*p);
    }
    assert_eq!(b.run(Health(3, false)), Out::Done);
    let steps = [
        // Round robin would say 1.
        (Client(2, 10), open(2)),
        // A's backend is down here: scheduled.
        (Client(3, 10), open(1)),
        // Nobody told B of this client.
        (Client(9, 10), open(2)),
        (Client(1, 10), open(1)),
    ];
    for (i, (step, expected)) in steps.into_iter().enumerate() {
        assert_eq!(b.run(step), expected, "step {i} ({step:?})");
    }
    assert_eq!(learned.hits(), 2);
}
