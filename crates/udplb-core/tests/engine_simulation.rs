//! A deterministic, seeded simulation of the engine, driven the way a worker drives it.
//!
//! Each seed picks a mode, a scheduler, a pool, PROXY header and failure policies, a flow cap
//! and timeouts; then random client datagrams, backend replies (some late, some from strangers),
//! refusals, health and operator changes and clock jumps are fed to the engine. After every
//! input the verdict is checked against the snapshot and a model of the live flows:
//! - a new flow goes to a backend of the pool's serving tier; an established one stays on a
//!   backend that keeps flows, or moves to one of the tier;
//! - a datagram is sent on its own client's flow, and a reply is relayed only to the client of
//!   the flow it arrived on: a reply on a closed flow's handle reaches nobody, even when the
//!   flow's slot serves another client since;
//! - PROXY headers go as the pool's policy says;
//! - the flow table's invariants hold, the model's flows are exactly the live ones, and no
//!   listener holds more flows than its cap.
//!
//! A failure prints its seed; replay it with
//! `UDPLB_SIM_SEED=<seed> cargo test -p udplb-core --test engine_simulation`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use udplb_core::affinity::{Persistence, PersistenceSettings};
use udplb_core::engine::{Datagram, Engine, Expiry, ReplyVerdict, Send, Verdict};
use udplb_core::flow::FlowHandle;
use udplb_core::snapshot::{AdminState, BackendInput, ListenerSpec, PoolInput, Snapshot};
use udplb_core::verdict::CloseReason;

mod common;
use common::Rng;
use udplb_core::{
    AllDownPolicy, BackendSpec, DropReason, FailurePolicy, ProxyHeader, SchedulerKind, SessionMode,
    Time,
};

fn backend(n: u64) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, n as u8], 5300))
}

/// What the model knows of a live flow (by the `Io` token the worker gave it).
struct Live {
    handle: FlowHandle,
    client: SocketAddr,
}

struct Sim {
    seed: u64,
    rng: Rng,
    listener: ListenerSpec,
    pools: Vec<PoolInput>,
    snap: Snapshot,
    engine: Engine<u64>,
    now: Time,
    next_token: u64,
    live: HashMap<u64, Live>,
    /// Handles of closed flows: a reply on one must reach nobody.
    stale: Vec<FlowHandle>,
    /// Verdicts seen, by kind, so a seed that exercised nothing is noticed.
    seen: HashMap<&'static str, u64>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.max(1));
        let mode = rng.pick(&[
            SessionMode::Flow,
            SessionMode::Datagram,
            SessionMode::RequestResponse { responses: 1 },
            SessionMode::RequestResponse { responses: 2 },
        ]);
        let scheduler = rng.pick(&SchedulerKind::ALL);
        let idle = Duration::from_millis(200 + rng.below(3_000));
        let mut listener = common::listener("sim", SocketAddr::from(([192, 0, 2, 1], 53)), mode);
        listener.idle_timeout = idle;
        listener.reply_timeout = Duration::from_millis(50 + rng.below(2 * idle.as_millis() as u64));
        listener.max_flows = 1 + rng.below(40) as u32;
        listener.shared_upstream = rng.below(2) == 0;
        if rng.below(3) == 0 {
            listener.persistence = Some(Arc::new(Persistence::new(PersistenceSettings {
                by_port: rng.below(2) == 0,
                timeout: Duration::from_millis(100 + rng.below(5_000)),
                cap: 1 + rng.below(40) as usize,
            })));
        }
        let n = 1 + rng.below(5);
        let members = (1..=n)
            .map(|i| {
                let mut spec = BackendSpec::new(backend(i));
                spec.weight = 1 + rng.below(4) as u32;
                spec.backup = i > 1 && rng.below(5) == 0;
                BackendInput::from(spec)
            })
            .collect();
        let mut pool = PoolInput::new("main".into(), scheduler, members);
        pool.proxy_header = rng.pick(&[ProxyHeader::Off, ProxyHeader::First, ProxyHeader::Every]);
        pool.on_down = rng.pick(&[FailurePolicy::Reschedule, FailurePolicy::Keep]);
        pool.all_down = rng.pick(&[
            AllDownPolicy::Backup,
            AllDownPolicy::FailOpen,
            AllDownPolicy::Drop,
        ]);
        pool.rebalance = (rng.below(2) == 0).then(|| Duration::from_millis(rng.below(1_000)));
        let pools = vec![pool];
        let snap = Snapshot::build(1, vec![listener.clone()], pools.clone(), None);
        let mut engine = Engine::new(1, seed | 1);
        engine.apply(&snap);
        Sim {
            seed,
            rng,
            listener,
            pools,
            snap,
            engine,
            now: Time(1_000_000_000),
            next_token: 0,
            live: HashMap::new(),
            stale: Vec::new(),
            seen: HashMap::new(),
        }
    }

    fn see(&mut self, what: &'static str) {
        *self.seen.entry(what).or_default() += 1;
    }

    fn step(&mut self) {
        match self.rng.below(20) {
            0..=9 => self.client_datagram(),
            10..=13 => self.reply(),
            14 => self.refusal(),
            15 => self.health(),
            16 => self.admin(),
            _ => self.time_passes(),
        }
        self.check();
    }

    fn client_datagram(&mut self) {
        let source = SocketAddr::from((
            [203, 0, 113, self.rng.below(6) as u8],
            4000 + self.rng.below(8) as u16,
        ));
        let len = 1 + self.rng.below(200) as usize;
        let data = vec![0u8; len];
        let d = Datagram {
            listener: 0,
            source,
            local: None,
            data: &data,
            truncated: false,
            segment_size: None,
        };
        let seed = self.seed;
        let send = match self.engine.on_client(&self.snap, self.now, &d) {
            Verdict::Drop(reason) => return self.dropped(reason),
            Verdict::Open(open) => {
                let pool = &self.snap.pools[0];
                let at = pool.position(&open.to).expect("opened to a stranger");
                assert!(
                    pool.tier.contains(at),
                    "seed {seed}: new flow to backend {} outside the serving tier",
                    open.to
                );
                self.next_token += 1;
                let s = self.engine.opened(&open, self.next_token, self.now);
                self.live.insert(
                    self.next_token,
                    Live {
                        handle: s.flow,
                        client: source,
                    },
                );
                self.check_header(&s, true);
                self.see("open");
                s
            }
            Verdict::Move(m) => {
                let (_, from) = self.engine.key(m.flow).expect("moved a closed flow");
                assert_eq!(from, m.from, "seed {seed}: move from elsewhere");
                let pool = &self.snap.pools[0];
                let at = pool.position(&m.to).expect("moved to a stranger");
                assert!(
                    pool.tier.contains(at),
                    "seed {seed}: moved to backend {} outside the serving tier",
                    m.to
                );
                let s = self.engine.moved(&m);
                assert_eq!(self.engine.key(s.flow).map(|k| k.1), Some(m.to));
                self.check_header(&s, true);
                self.see("move");
                s
            }
            Verdict::Send(s) => {
                let pool = &self.snap.pools[0];
                let at = pool.position(&s.to).expect("sent to a stranger");
                if self.listener.mode == SessionMode::Datagram {
                    assert!(pool.tier.contains(at), "seed {seed}: datagram off the tier");
                } else {
                    assert_eq!(self.engine.key(s.flow).map(|k| k.1), Some(s.to));
                    assert!(
                        pool.keeps_flows(at),
                        "seed {seed}: sent to {} which keeps no flows",
                        s.to
                    );
                }
                self.check_header(&s, false);
                self.see("send");
                s
            }
        };
        let token = *self.engine.io(send.flow).expect("sent on a closed flow");
        assert_eq!(
            self.live[&token].client, source,
            "seed {seed}: a datagram went on another client's flow"
        );
        self.engine
            .sent(&self.snap, &send, self.now, len - send.skip);
    }

    fn check_header(&self, s: &Send, fresh: bool) {
        let policy = self.snap.pools[0].proxy_header;
        match policy {
            ProxyHeader::Off => assert!(!s.header, "seed {}: header with Off", self.seed),
            ProxyHeader::Every => assert!(s.header, "seed {}: no header with Every", self.seed),
            ProxyHeader::First if fresh => {
                assert!(
                    s.header,
                    "seed {}: first datagram without header",
                    self.seed
                )
            }
            ProxyHeader::First => {}
        }
    }

    fn dropped(&mut self, reason: DropReason) {
        let seed = self.seed;
        match reason {
            DropReason::FlowCap => {
                let cap = self.listener.max_flows;
                assert!(
                    self.engine.live_of(0) >= cap,
                    "seed {seed}: cap drop below the cap"
                );
            }
            DropReason::NoBackend => {}
            other => panic!("seed {seed}: unexpected drop {other:?}"),
        }
        self.see("drop");
    }

    fn reply(&mut self) {
        let seed = self.seed;
        let late = !self.stale.is_empty() && self.rng.below(4) == 0;
        let (handle, client) = if late {
            (self.rng.pick(&self.stale), None)
        } else {
            let mut tokens: Vec<u64> = self.live.keys().copied().collect();
            if tokens.is_empty() {
                return;
            }
            tokens.sort_unstable();
            let live = &self.live[&self.rng.pick(&tokens)];
            (live.handle, Some(live.client))
        };
        // The flow's backend (in datagram mode, any, and now and then a stranger: a connected
        // socket receives only from its peer, a shared one's flow is found by the source).
        let datagram_mode = self.listener.mode == SessionMode::Datagram;
        let source = match (self.engine.key(handle), self.rng.below(10)) {
            (_, 0) if datagram_mode => backend(99),
            (Some(_), _) if datagram_mode => {
                backend(1 + self.rng.below(self.pools[0].backends.len() as u64))
            }
            (Some((_, addr)), _) => addr,
            (None, _) => backend(1),
        };
        let data = [0u8; 64];
        let verdict = self
            .engine
            .on_reply(&self.snap, self.now, handle, &source, &data, false);
        match (verdict, client) {
            (ReplyVerdict::Forward { .. }, None) => {
                panic!("seed {seed}: a reply on a closed flow's handle was relayed")
            }
            (ReplyVerdict::Forward { to, completes, .. }, Some(client)) => {
                assert_eq!(*to, client, "seed {seed}: reply relayed to another client");
                assert_ne!(
                    source,
                    backend(99),
                    "seed {seed}: a stranger's reply relayed"
                );
                self.see("relay");
                if completes {
                    self.close(handle, CloseReason::Completed);
                }
            }
            (ReplyVerdict::Gone, Some(_)) => panic!("seed {seed}: live flow reported gone"),
            (ReplyVerdict::Gone, None) => self.see("late"),
            (ReplyVerdict::Drop { reason, .. }, _) => {
                assert_eq!(reason, DropReason::UnknownSource, "seed {seed}");
                self.see("stranger");
            }
        }
    }

    fn refusal(&mut self) {
        let mut tokens: Vec<u64> = self.live.keys().copied().collect();
        if tokens.is_empty() {
            return;
        }
        tokens.sort_unstable();
        let handle = self.live[&self.rng.pick(&tokens)].handle;
        if let Some(b) = self.engine.socket_failed(handle, true) {
            let (_, addr) = self.engine.key(handle).unwrap();
            let pool = &self.snap.pools[0];
            assert_eq!(pool.position_of_id(b), pool.position(&addr));
            self.close(handle, CloseReason::Error);
            self.see("refused");
        }
    }

    fn close(&mut self, handle: FlowHandle, reason: CloseReason) {
        let closed = self.engine.close(handle, reason, self.now).expect("live");
        assert!(self.live.remove(&closed.io).is_some());
        self.stale.push(handle);
        assert!(self.engine.close(handle, reason, self.now).is_none());
    }

    fn health(&mut self) {
        let n = self.pools[0].backends.len() as u64;
        let b = &mut self.pools[0].backends[self.rng.below(n) as usize];
        b.healthy = !b.healthy;
        self.publish();
    }

    fn admin(&mut self) {
        let n = self.pools[0].backends.len() as u64;
        let state = self.rng.pick(&[
            AdminState::Enabled,
            AdminState::Enabled,
            AdminState::Draining,
            AdminState::Disabled,
        ]);
        self.pools[0].backends[self.rng.below(n) as usize].admin = state;
        self.publish();
    }

    fn publish(&mut self) {
        let snap = Snapshot::build(
            self.snap.generation + 1,
            vec![self.listener.clone()],
            self.pools.clone(),
            Some(&self.snap),
        );
        self.engine.apply(&snap);
        self.snap = snap;
    }

    fn time_passes(&mut self) {
        let idle = self.listener.idle_timeout.as_millis() as u64;
        self.now = self
            .now
            .after(Duration::from_millis(self.rng.below(idle / 2 + 1)));
        let mut closed = Vec::new();
        let mut unanswered = 0;
        let pool = &self.snap.pools[0];
        self.engine.expire(self.now, |e| match e {
            Expiry::Unanswered { backend, .. } => {
                assert!(pool.position_of_id(backend).is_some());
                unanswered += 1;
            }
            Expiry::Closed(c) => closed.push(c.io),
        });
        for token in closed {
            let live = self.live.remove(&token).expect("closed an unknown flow");
            self.stale.push(live.handle);
        }
        if unanswered > 0 {
            self.see("unanswered");
        }
    }

    fn check(&self) {
        let table = self.engine.table();
        table.check_invariants();
        assert_eq!(
            table.live(),
            self.live.len(),
            "seed {}: live flows",
            self.seed
        );
        assert!(self.engine.live_of(0) <= self.listener.max_flows);
        for (token, live) in &self.live {
            assert_eq!(self.engine.io(live.handle), Some(token));
        }
    }
}

fn run(seed: u64, steps: usize) -> HashMap<&'static str, u64> {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.seen
}

#[test]
fn engine_simulation() {
    if let Ok(seed) = std::env::var("UDPLB_SIM_SEED") {
        run(
            seed.parse().expect("UDPLB_SIM_SEED must be a number"),
            20_000,
        );
        return;
    }
    let mut seen: HashMap<&'static str, u64> = HashMap::new();
    for seed in 1..=64u64 {
        match std::panic::catch_unwind(|| run(seed, 1_500)) {
            Ok(s) => s
                .into_iter()
                .for_each(|(k, v)| *seen.entry(k).or_default() += v),
            Err(_) => panic!("simulation failed; replay with UDPLB_SIM_SEED={seed}"),
        }
    }
    // The seeds exercised every kind of verdict.
    for what in [
        "open",
        "send",
        "move",
        "drop",
        "relay",
        "late",
        "stranger",
        "refused",
        "unanswered",
    ] {
        assert!(
            seen.get(what).copied().unwrap_or(0) > 0,
            "no {what} in any seed: {seen:?}"
        );
    }
}
