//! A deterministic, seeded simulation of the flow table.
//!
//! Random admissions, requests, replies, closes and clock jumps against a table with a small
//! cap; after every event the table's invariants are checked (created − closed == live, never
//! above the cap, index and slots agree, every live flow has a timer) and a model of which
//! flows must still be live, and which must be reported unanswered (request-response reply
//! deadlines), is compared with the table. A failure prints its seed; replay it
//! with `UDPLB_SIM_SEED=<seed> cargo test -p udplb-core --test simulation`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use udplb_core::Time;
use udplb_core::flow::{Expired, FlowHandle, FlowKey, FlowTable, ReplyOutcome, Timeouts};
use udplb_core::snapshot::BackendId;
use udplb_core::verdict::CloseReason;

mod common;
use common::Rng;

/// A flow as the model sees it.
#[derive(Clone, Copy)]
struct Expected {
    handle: FlowHandle,
    last_seen: Time,
    pending: u32,
    reply_due: Option<Time>,
}

struct Model {
    last_seen: HashMap<FlowKey, Expected>,
}

impl Expected {
    fn request(&mut self, now: Time, responses: u32, reply: Duration) {
        self.last_seen = now;
        self.pending += responses;
        if responses > 0 && self.reply_due.is_none() {
            self.reply_due = Some(now.after(reply));
        }
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed.max(1));
    let cap = 1 + rng.below(64) as u32;
    let listeners = 2u16;
    let idle = Duration::from_millis(100 + rng.below(5_000));
    let reply = Duration::from_millis(10 + rng.below(2 * idle.as_millis() as u64));
    let timeouts = Timeouts { idle, reply };
    let mut table: FlowTable<u64> = FlowTable::new();
    table.set_caps(&vec![cap; listeners as usize]);
    let mut model = Model {
        last_seen: HashMap::new(),
    };
    let mut now = Time(0);
    let mut shed = 0u64;
    for step in 0..steps {
        let key = FlowKey {
            listener: rng.below(u64::from(listeners)) as u16,
            client: SocketAddr::from(([10, 0, 0, rng.below(8) as u8], 1000 + rng.below(32) as u16)),
            local: None,
            origin: None,
        };
        match rng.below(10) {
            0..=4 => {
                // A request datagram: existing flow or admission.
                let responses = rng.below(3) as u32;
                match table.find(&key) {
                    Some(h) => {
                        table.on_request(h, now, responses);
                        model
                            .last_seen
                            .get_mut(&key)
                            .expect("table has a flow the model lacks")
                            .request(now, responses, reply);
                    }
                    None if table.has_room(key.listener) => {
                        assert!(
                            !model.last_seen.contains_key(&key),
                            "seed {seed}: model has a flow the table lacks"
                        );
                        let backend = BackendId(rng.below(4) as u32);
                        let h =
                            table.insert(key, (backend, key.client), 1, now, timeouts, step as u64);
                        table.on_request(h, now, responses);
                        let mut expected = Expected {
                            handle: h,
                            last_seen: now,
                            pending: 0,
                            reply_due: None,
                        };
                        expected.request(now, responses, reply);
                        model.last_seen.insert(key, expected);
                    }
                    None => {
                        assert_eq!(
                            table.live_of(key.listener),
                            cap,
                            "seed {seed}: shed below the cap"
                        );
                        shed += 1;
                    }
                }
            }
            5..=6 => {
                // A reply on a random live flow.
                if let Some((&k, &Expected { handle: h, .. })) = model
                    .last_seen
                    .iter()
                    .nth(rng.below(model.last_seen.len().max(1) as u64) as usize)
                {
                    let outcome = table.on_reply(h, now, true);
                    let m = model.last_seen.get_mut(&k).unwrap();
                    m.last_seen = now;
                    m.pending = m.pending.saturating_sub(1);
                    m.reply_due = (m.pending > 0).then(|| now.after(reply));
                    if outcome == ReplyOutcome::ForwardAndComplete {
                        assert_eq!(m.pending, 0);
                        let f = table
                            .close(h, CloseReason::Completed)
                            .expect("completing a live flow");
                        assert_eq!(f.key, k);
                        model.last_seen.remove(&k);
                    }
                }
            }
            7 => {
                // A stale handle must never close anything.
                let bogus = FlowHandle::from_u64(rng.next());
                if table.get(bogus).is_none() {
                    assert!(table.close(bogus, CloseReason::Error).is_none());
                }
            }
            _ => {
                // Time passes; idle flows expire, and only idle ones; flows whose reply
                // deadline passed with replies owed are reported, once, and only those.
                now = Time(now.0 + rng.below(idle.as_millis() as u64));
                let mut expired = vec![];
                let mut unanswered = vec![];
                table.expire(now, |e| match e {
                    Expired::Idle(_, f) => expired.push(f.key),
                    Expired::Unanswered(_, f) => unanswered.push(f.key),
                    Expired::Renewed(..) => {}
                });
                let mut due: Vec<FlowKey> = model
                    .last_seen
                    .iter()
                    .filter(|(_, m)| m.reply_due.is_some_and(|d| d <= now) && m.pending > 0)
                    .map(|(k, _)| *k)
                    .collect();
                let order = |v: &mut Vec<FlowKey>| v.sort_by_key(|k| (k.listener, k.client));
                order(&mut due);
                order(&mut unanswered);
                assert_eq!(unanswered, due, "seed {seed}: unanswered flows");
                for m in model.last_seen.values_mut() {
                    if m.reply_due.is_some_and(|d| d <= now) {
                        m.reply_due = None;
                    }
                }
                for k in &expired {
                    let m = model.last_seen.remove(k).expect("expired an unknown flow");
                    assert!(
                        m.last_seen.after(idle) <= now,
                        "seed {seed}: expired a flow that was not idle"
                    );
                }
                for (k, m) in &model.last_seen {
                    assert!(
                        m.last_seen.after(idle) > now,
                        "seed {seed}: idle flow {k:?} survived expiry"
                    );
                }
            }
        }
        table.check_invariants();
        assert_eq!(
            table.live(),
            model.last_seen.len(),
            "seed {seed}: live count"
        );
        let closed: u64 = table.closed().iter().sum();
        assert_eq!(table.created() - closed, table.live() as u64);
    }
    let _ = shed;
}

#[test]
fn flow_table_simulation() {
    if let Ok(seed) = std::env::var("UDPLB_SIM_SEED") {
        run(
            seed.parse().expect("UDPLB_SIM_SEED must be a number"),
            20_000,
        );
        return;
    }
    for seed in 1..=64u64 {
        let result = std::panic::catch_unwind(|| run(seed, 3_000));
        if result.is_err() {
            panic!("simulation failed; replay with UDPLB_SIM_SEED={seed}");
        }
    }
}
