//! The per-worker flow table: which client talks to which backend, until when.
//!
//! Owns: [`FlowTable`], a slab of [`Flow`]s indexed by [`FlowKey`], the per-listener flow caps,
//! idle expiry and the created/closed accounting. Each flow carries an opaque `io` value that
//! the data plane chooses (its upstream socket); the table never looks inside it.
//!
//! Lifecycle: a flow is created by [`FlowTable::insert`] once [`FlowTable::has_room`] said yes
//! and a backend was picked; every datagram in either direction refreshes `last_seen`; it
//! leaves through [`FlowTable::close`] (one path, one reason) or [`FlowTable::expire`].
//!
//! Timers: one live heap entry per flow holding (deadline, slot, generation) for the flow's
//! next deadline: idle expiry, or in request-response mode the reply deadline of its oldest
//! unanswered request. A datagram only writes `last_seen`; when the entry comes due, the flow
//! is closed if it really was idle, reported unanswered if its reply deadline passed, and the
//! entry is re-armed at the next deadline. An entry whose generation no longer matches its slot
//! belongs to a closed flow, and one whose deadline is not the flow's armed one was superseded
//! by an earlier deadline: both are discarded, so a stale timer can never close the flow that
//! reused a slot. Stale entries are compacted away when they outnumber live ones.
//!
//! Must not: do I/O, read clocks (time is a [`Time`] argument) or hash with a fixed seed (the
//! index is keyed by network input, so it uses std's randomly keyed SipHash).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::snapshot::BackendId;
use crate::time::Time;
use crate::verdict::CloseReason;

/// What identifies a flow: the listener, the client's address and the local address it
/// targeted (a wildcard listener serves several), and behind another balancer the client its
/// PROXY v2 header named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    /// Index of the listener in the snapshot.
    pub listener: u16,
    /// The client's address: the sender of the datagrams, where replies go.
    pub client: SocketAddr,
    /// The address the client sent to, when the listener is a wildcard.
    pub local: Option<IpAddr>,
    /// On a listener behind another balancer (`proxy_protocol`): the client the PROXY header
    /// named, so that the clients one sender forwards are flows of their own.
    pub origin: Option<SocketAddr>,
}

/// Feeds the hasher one word for the common key (an IPv4 client of a listener with one
/// address) and one byte string otherwise. SipHash's cost is as much per `write` call as per
/// byte, and the derived `Hash` made a dozen calls per key (enum tags, each address field,
/// the `Option`): this is the one hash a client datagram pays. Every field `Eq` compares is
/// fed, so equal keys hash alike.
impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if let SocketAddr::V4(client) = self.client
            && self.local.is_none()
            && self.origin.is_none()
        {
            let word = (u64::from(client.ip().to_bits()) << 32)
                | (u64::from(client.port()) << 16)
                | u64::from(self.listener);
            return state.write_u64(word);
        }
        // Tag, listener, client (address, port, flow info, scope), local (tag, address),
        // origin (tag, address, port).
        let mut bytes = [0u8; 1 + 2 + 16 + 2 + 4 + 4 + 1 + 16 + 1 + 16 + 2];
        bytes[1..3].copy_from_slice(&self.listener.to_le_bytes());
        match self.client {
            SocketAddr::V4(c) => {
                bytes[0] = 4;
                bytes[3..7].copy_from_slice(&c.ip().octets());
                bytes[19..21].copy_from_slice(&c.port().to_le_bytes());
            }
            SocketAddr::V6(c) => {
                bytes[0] = 6;
                bytes[3..19].copy_from_slice(&c.ip().octets());
                bytes[19..21].copy_from_slice(&c.port().to_le_bytes());
                bytes[21..25].copy_from_slice(&c.flowinfo().to_le_bytes());
                bytes[25..29].copy_from_slice(&c.scope_id().to_le_bytes());
            }
        }
        match self.local {
            None => {}
            Some(IpAddr::V4(ip)) => {
                bytes[29] = 4;
                bytes[30..34].copy_from_slice(&ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                bytes[29] = 6;
                bytes[30..46].copy_from_slice(&ip.octets());
            }
        }
        match self.origin {
            None => {}
            Some(SocketAddr::V4(o)) => {
                bytes[46] = 4;
                bytes[47..51].copy_from_slice(&o.ip().octets());
                bytes[63..65].copy_from_slice(&o.port().to_le_bytes());
            }
            Some(SocketAddr::V6(o)) => {
                bytes[46] = 6;
                bytes[47..63].copy_from_slice(&o.ip().octets());
                bytes[63..65].copy_from_slice(&o.port().to_le_bytes());
            }
        }
        state.write(&bytes);
    }
}

/// A reference to a live flow that stays valid only as long as that flow lives: the slot plus
/// the slot's generation. Fits in a `u64` for use as an event-loop token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowHandle {
    slot: u32,
    generation: u32,
}

impl FlowHandle {
    /// Packs the handle into a `u64` (e.g. an epoll token).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    /// Unpacks a handle made by [`FlowHandle::to_u64`].
    pub fn from_u64(v: u64) -> FlowHandle {
        FlowHandle {
            slot: v as u32,
            generation: (v >> 32) as u32,
        }
    }

    /// The slot index (dense, < the table's high-water mark).
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

/// One flow.
#[derive(Debug)]
pub struct Flow<T> {
    /// Who and where.
    pub key: FlowKey,
    /// The backend the flow is bound to (in datagram mode: the last one used).
    pub backend: BackendId,
    /// That backend's address.
    pub backend_addr: SocketAddr,
    /// Snapshot generation at which `backend` was last validated.
    pub checked_generation: u64,
    /// When the flow was created.
    pub created: Time,
    /// Last datagram in either direction.
    pub last_seen: Time,
    /// Idle timeout of the flow's listener.
    pub idle_timeout: Duration,
    /// Replies still expected (request-response mode).
    pub pending_replies: u32,
    /// Request-response mode: how long the backend may stay silent while it owes replies.
    pub reply_timeout: Duration,
    /// Request-response mode: when the backend must have answered (armed by a request while
    /// none is armed, moved on by each reply while more are owed, cleared when it passes).
    pub reply_due: Option<Time>,
    /// The deadline of the flow's live timer entry.
    armed: Time,
    /// The data plane's handle (upstream socket).
    pub io: T,
}

/// The timeouts of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Close after this long without a datagram in either direction.
    pub idle: Duration,
    /// Request-response mode: report the flow unanswered when its backend owes replies and
    /// sends none for this long (see [`FlowTable::expire`]).
    pub reply: Duration,
}

impl Timeouts {
    /// Idle expiry only (no reply accounting).
    pub fn idle(idle: Duration) -> Timeouts {
        Timeouts { idle, reply: idle }
    }
}

/// What [`FlowTable::expire`] found.
#[derive(Debug)]
pub enum Expired<'a, T> {
    /// The flow's backend owed replies and sent none within the reply timeout (request-
    /// response mode): one unanswered request. The flow stays, so a late reply still reaches
    /// the client; another request arms the next deadline.
    Unanswered(FlowHandle, &'a Flow<T>),
    /// The flow was idle for its timeout and is closed.
    Idle(FlowHandle, Flow<T>),
    /// A timer of the flow came (not a reply deadline due now) and the flow had seen traffic
    /// since: it stays, its next deadline armed. An active flow is renewed at least once per
    /// idle timeout.
    Renewed(FlowHandle, &'a Flow<T>),
}

/// What a reply means for its flow (request-response accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Forward it; the flow stays.
    Forward,
    /// Forward it; the flow has every reply it expected and should be closed.
    ForwardAndComplete,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    flow: Option<Flow<T>>,
}

/// The flow index's hasher: SipHash-1-3, the algorithm of std's `HashMap`, with keys drawn
/// from std's randomly keyed `RandomState` (keys are chosen by the network, so collisions must
/// not be predictable). `siphasher`'s hasher takes an integer in one step, where std's buffers
/// it as bytes: a flow key costs about half the instructions to hash.
#[derive(Clone, Debug)]
struct KeyedSip {
    k0: u64,
    k1: u64,
}

impl KeyedSip {
    fn random() -> KeyedSip {
        let keys = std::collections::hash_map::RandomState::new();
        KeyedSip {
            k0: keys.hash_one(0u64),
            k1: keys.hash_one(1u64),
        }
    }
}

impl BuildHasher for KeyedSip {
    type Hasher = siphasher::sip::SipHasher13;

    #[inline]
    fn build_hasher(&self) -> Self::Hasher {
        siphasher::sip::SipHasher13::new_with_keys(self.k0, self.k1)
    }
}

/// The flow table of one worker.
#[derive(Debug)]
pub struct FlowTable<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    index: HashMap<FlowKey, u32, KeyedSip>,
    timers: BinaryHeap<Reverse<(Time, u32, u32)>>,
    live_per_listener: Vec<u32>,
    cap_per_listener: Vec<u32>,
    live_per_backend: Vec<u32>,
    created: u64,
    closed: [u64; CloseReason::COUNT],
}

impl<T> Default for FlowTable<T> {
    fn default() -> Self {
        FlowTable {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::with_hasher(KeyedSip::random()),
            timers: BinaryHeap::new(),
            live_per_listener: Vec::new(),
            cap_per_listener: Vec::new(),
            live_per_backend: Vec::new(),
            created: 0,
            closed: [0; CloseReason::COUNT],
        }
    }
}

impl<T> FlowTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the cap of each listener (index = listener). Lowering a cap below the live count
    /// sheds no existing flow; new flows wait until the count drops.
    pub fn set_caps(&mut self, caps: &[u32]) {
        self.cap_per_listener = caps.to_vec();
        if self.live_per_listener.len() < caps.len() {
            self.live_per_listener.resize(caps.len(), 0);
        }
    }

    /// The live flow with key `key`.
    #[inline]
    pub fn find(&self, key: &FlowKey) -> Option<FlowHandle> {
        let slot = *self.index.get(key)?;
        Some(FlowHandle {
            slot,
            generation: self.slots[slot as usize].generation,
        })
    }

    /// The live flow with key `key`, and its handle.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<(FlowHandle, &Flow<T>)> {
        let slot = *self.index.get(key)?;
        let s = &self.slots[slot as usize];
        let h = FlowHandle {
            slot,
            generation: s.generation,
        };
        s.flow.as_ref().map(|f| (h, f))
    }

    /// The flow behind `h`, if it is still live.
    #[inline]
    pub fn get(&self, h: FlowHandle) -> Option<&Flow<T>> {
        let slot = self.slots.get(h.slot as usize)?;
        if slot.generation != h.generation {
            return None;
        }
        slot.flow.as_ref()
    }

    /// The flow behind `h`, mutably, if it is still live.
    #[inline]
    pub fn get_mut(&mut self, h: FlowHandle) -> Option<&mut Flow<T>> {
        let slot = self.slots.get_mut(h.slot as usize)?;
        if slot.generation != h.generation {
            return None;
        }
        slot.flow.as_mut()
    }

    /// Whether listener `listener` may admit one more flow.
    #[inline]
    pub fn has_room(&self, listener: u16) -> bool {
        let l = listener as usize;
        let live = self.live_per_listener.get(l).copied().unwrap_or(0);
        let cap = self.cap_per_listener.get(l).copied().unwrap_or(0);
        live < cap
    }

    /// Creates a flow. The caller checked [`FlowTable::has_room`] and that `key` is absent.
    pub fn insert(
        &mut self,
        key: FlowKey,
        backend: (BackendId, SocketAddr),
        generation: u64,
        now: Time,
        timeouts: Timeouts,
        io: T,
    ) -> FlowHandle {
        debug_assert!(self.has_room(key.listener), "insert beyond the cap");
        debug_assert!(!self.index.contains_key(&key), "insert of a live key");
        let flow = Flow {
            key,
            backend: backend.0,
            backend_addr: backend.1,
            checked_generation: generation,
            created: now,
            last_seen: now,
            idle_timeout: timeouts.idle,
            pending_replies: 0,
            reply_timeout: timeouts.reply,
            reply_due: None,
            armed: now.after(timeouts.idle),
            io,
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    flow: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let entry = &mut self.slots[slot as usize];
        entry.flow = Some(flow);
        let handle = FlowHandle {
            slot,
            generation: entry.generation,
        };
        self.index.insert(key, slot);
        self.timers
            .push(Reverse((now.after(timeouts.idle), slot, entry.generation)));
        let l = key.listener as usize;
        if self.live_per_listener.len() <= l {
            self.live_per_listener.resize(l + 1, 0);
        }
        self.live_per_listener[l] += 1;
        self.add_backend_load(backend.0, 1);
        self.created += 1;
        handle
    }

    /// Moves a live flow to another backend (reschedule, or datagram mode's per-datagram pick).
    #[inline]
    pub fn rebind(&mut self, h: FlowHandle, backend: (BackendId, SocketAddr), generation: u64) {
        let Some(flow) = self.get_mut(h) else { return };
        let old = flow.backend;
        flow.backend = backend.0;
        flow.backend_addr = backend.1;
        flow.checked_generation = generation;
        if old != backend.0 {
            self.add_backend_load(old, -1);
            self.add_backend_load(backend.0, 1);
        }
    }

    /// Records a request datagram on a flow: refreshes it and, in request-response mode,
    /// expects `responses` more replies and arms the reply deadline if none is armed. Returns
    /// whether the flow owed no reply before (a request-response exchange starts here).
    #[inline]
    pub fn on_request(&mut self, h: FlowHandle, now: Time, responses: u32) -> bool {
        let Some(flow) = self.get_mut(h) else {
            return false;
        };
        flow.last_seen = now;
        let idle = flow.pending_replies == 0;
        flow.pending_replies = flow.pending_replies.saturating_add(responses);
        if responses > 0 && flow.reply_due.is_none() {
            self.arm_reply_deadline(h, now);
        }
        idle
    }

    /// Sets flow `h`'s reply deadline to `now` plus its reply timeout, re-arming its timer
    /// when that comes before the armed deadline.
    fn arm_reply_deadline(&mut self, h: FlowHandle, now: Time) {
        let Some(flow) = self.get_mut(h) else { return };
        let due = now.after(flow.reply_timeout);
        flow.reply_due = Some(due);
        if due < flow.armed {
            flow.armed = due;
            self.timers.push(Reverse((due, h.slot, h.generation)));
        }
    }

    /// Records a reply datagram on a flow. In request-response mode (`counted`), one expected
    /// reply is consumed and the flow completes when none is left; while more are owed, the
    /// reply deadline moves on (the backend is answering).
    #[inline]
    pub fn on_reply(&mut self, h: FlowHandle, now: Time, counted: bool) -> ReplyOutcome {
        let Some(flow) = self.get_mut(h) else {
            return ReplyOutcome::Forward;
        };
        flow.last_seen = now;
        if counted {
            flow.pending_replies = flow.pending_replies.saturating_sub(1);
            if flow.pending_replies == 0 {
                flow.reply_due = None;
                return ReplyOutcome::ForwardAndComplete;
            }
            self.arm_reply_deadline(h, now);
        }
        ReplyOutcome::Forward
    }

    /// Closes a live flow and returns it (so the caller can release its `io`). Closing a
    /// handle that is no longer live returns `None` and changes nothing.
    pub fn close(&mut self, h: FlowHandle, reason: CloseReason) -> Option<Flow<T>> {
        let slot = self.slots.get_mut(h.slot as usize)?;
        if slot.generation != h.generation {
            return None;
        }
        let flow = slot.flow.as_ref()?;
        self.index.remove(&flow.key);
        let (listener, backend) = (flow.key.listener, flow.backend);
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(h.slot);
        self.live_per_listener[listener as usize] -= 1;
        self.closed[reason.index()] += 1;
        // Taken last, straight into the return value: a flow is a few hundred bytes.
        let flow = self.slots[h.slot as usize].flow.take();
        self.add_backend_load(backend, -1);
        flow
    }

    /// Handles every deadline due at `now`: reports flows whose backend left a request
    /// unanswered for the reply timeout ([`Expired::Unanswered`], once per armed deadline) and
    /// closes flows idle for their timeout ([`Expired::Idle`]). Re-arms the timers of flows
    /// that saw traffic since their timer was set ([`Expired::Renewed`]).
    pub fn expire(&mut self, now: Time, mut on_expired: impl FnMut(Expired<'_, T>)) {
        while let Some(&Reverse((deadline, slot, generation))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let entry = &mut self.slots[slot as usize];
            if entry.generation != generation {
                continue; // the flow this timer was for is gone
            }
            let Some(flow) = entry.flow.as_mut() else {
                continue;
            };
            if flow.armed != deadline {
                continue; // superseded by an earlier deadline, which was handled then
            }
            let h = FlowHandle { slot, generation };
            let reply_deadline = flow.reply_due.is_some_and(|due| due <= now);
            if reply_deadline {
                flow.reply_due = None;
                if flow.pending_replies > 0 {
                    on_expired(Expired::Unanswered(h, flow));
                }
            }
            let entry = &mut self.slots[slot as usize];
            let Some(flow) = entry.flow.as_mut() else {
                continue;
            };
            let idle_due = flow.last_seen.after(flow.idle_timeout);
            if idle_due > now {
                let next = flow.reply_due.map_or(idle_due, |r| r.min(idle_due));
                flow.armed = next;
                self.timers.push(Reverse((next, slot, generation)));
                if !reply_deadline {
                    on_expired(Expired::Renewed(h, flow));
                }
                continue;
            }
            if let Some(flow) = self.close(h, CloseReason::Idle) {
                on_expired(Expired::Idle(h, flow));
            }
        }
        self.compact_timers();
    }

    /// When the next timer is due (the event loop sleeps at most until then).
    pub fn next_deadline(&self) -> Option<Time> {
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Closes every flow (shutdown), handing each to `on_close`.
    pub fn drain_all(
        &mut self,
        reason: CloseReason,
        mut on_close: impl FnMut(FlowHandle, Flow<T>),
    ) {
        for slot in 0..self.slots.len() {
            let h = FlowHandle {
                slot: slot as u32,
                generation: self.slots[slot].generation,
            };
            if let Some(flow) = self.close(h, reason) {
                on_close(h, flow);
            }
        }
    }

    /// Handles of every live flow (for revalidation after a snapshot change).
    pub fn handles(&self) -> impl Iterator<Item = FlowHandle> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.flow.is_some())
            .map(|(i, s)| FlowHandle {
                slot: i as u32,
                generation: s.generation,
            })
    }

    /// Live flows in the table.
    pub fn live(&self) -> usize {
        self.index.len()
    }

    /// Live flows of listener `listener`.
    pub fn live_of(&self, listener: u16) -> u32 {
        self.live_per_listener
            .get(listener as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Live flows per backend, indexed by [`BackendId`] (input to least-loaded schedulers).
    pub fn load(&self) -> &[u32] {
        &self.live_per_backend
    }

    /// Flows created since the table was made.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Flows closed since the table was made, per [`CloseReason`].
    pub fn closed(&self) -> &[u64; CloseReason::COUNT] {
        &self.closed
    }

    /// Verifies the table's invariants; panics with a description when one is broken.
    /// Cheap enough for tests and debug builds, too slow for the hot path.
    pub fn check_invariants(&self) {
        let live = self.slots.iter().filter(|s| s.flow.is_some()).count();
        assert_eq!(live, self.index.len(), "index and slots disagree");
        let closed: u64 = self.closed.iter().sum();
        assert_eq!(
            self.created - closed,
            live as u64,
            "created - closed != live"
        );
        let per_listener: u32 = self.live_per_listener.iter().sum();
        assert_eq!(per_listener as usize, live, "per-listener counts");
        let per_backend: u32 = self.live_per_backend.iter().sum();
        assert_eq!(per_backend as usize, live, "per-backend counts");
        // No "live <= cap" here: a reload may lower a cap below the live count (no flow is
        // shed; new ones wait). The cap is enforced where flows are created (`has_room`).
        for (&key, &slot) in &self.index {
            let flow = self.slots[slot as usize]
                .flow
                .as_ref()
                .expect("index points at a free slot");
            assert_eq!(flow.key, key, "index points at another flow");
        }
        assert_eq!(self.free.len() + live, self.slots.len(), "free list");
        // Every live flow has a timer entry for its current generation, at its armed deadline
        // (a reply deadline is never later than it: an earlier one re-arms the timer).
        let armed: std::collections::HashSet<(Time, u32, u32)> =
            self.timers.iter().map(|Reverse(entry)| *entry).collect();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(flow) = &s.flow {
                assert!(
                    armed.contains(&(flow.armed, i as u32, s.generation)),
                    "flow in slot {i} has no timer"
                );
                if let Some(due) = flow.reply_due {
                    assert!(
                        flow.armed <= due,
                        "flow in slot {i}: reply deadline unarmed"
                    );
                }
            }
        }
    }

    fn add_backend_load(&mut self, id: BackendId, delta: i32) {
        let i = id.index();
        if self.live_per_backend.len() <= i {
            self.live_per_backend.resize(i + 1, 0);
        }
        let v = &mut self.live_per_backend[i];
        *v = v
            .checked_add_signed(delta)
            .expect("per-backend flow count underflow");
    }

    /// Drops timer entries of closed flows (and superseded ones) once they outnumber live
    /// flows, so a table with fast churn (request-response) keeps its heap proportional to its
    /// live flows.
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.index.len() + 1024 {
            return;
        }
        let slots = &self.slots;
        self.timers.retain(|Reverse((deadline, slot, generation))| {
            let s = &slots[*slot as usize];
            s.generation == *generation && s.flow.as_ref().is_some_and(|f| f.armed == *deadline)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_table_hashes_keys_with_keys_of_its_own() {
        let (a, b) = (KeyedSip::random(), KeyedSip::random());
        assert_ne!((a.k0, a.k1), (b.k0, b.k1));
        assert_ne!(a.k0, a.k1);
        let key = FlowKey {
            listener: 0,
            client: SocketAddr::from(([192, 0, 2, 1], 4000)),
            local: None,
            origin: None,
        };
        assert_ne!(a.hash_one(key), b.hash_one(key));
        assert_eq!(a.hash_one(key), a.hash_one(key));
    }

    fn key(port: u16) -> FlowKey {
        FlowKey {
            listener: 0,
            client: SocketAddr::from(([192, 0, 2, 1], port)),
            local: None,
            origin: None,
        }
    }

    fn backend() -> (BackendId, SocketAddr) {
        (BackendId(0), SocketAddr::from(([127, 0, 0, 1], 53)))
    }

    fn closed_handle<T>(e: Expired<'_, T>) -> FlowHandle {
        match e {
            Expired::Idle(h, _) => h,
            Expired::Unanswered(h, _) => panic!("{h:?} reported unanswered"),
            Expired::Renewed(h, _) => panic!("{h:?} reported renewed"),
        }
    }

    /// Closed flows go to `closed`, renewed ones to `renewed`.
    fn sort_expired<T>(
        closed: &mut Vec<FlowHandle>,
        renewed: &mut Vec<FlowHandle>,
    ) -> impl FnMut(Expired<'_, T>) {
        move |e| match e {
            Expired::Renewed(h, _) => renewed.push(h),
            e => closed.push(closed_handle(e)),
        }
    }

    fn table(cap: u32) -> FlowTable<()> {
        let mut t = FlowTable::new();
        t.set_caps(&[cap]);
        t
    }

    #[test]
    fn every_field_of_a_key_changes_its_hash_and_equal_keys_hash_alike() {
        use std::collections::HashSet;
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
        fn hash(k: &FlowKey) -> u64 {
            let mut h = std::hash::DefaultHasher::new();
            k.hash(&mut h);
            h.finish()
        }
        let v6 = |port, flowinfo, scope| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                port,
                flowinfo,
                scope,
            ))
        };
        let v4 = |a: u8, port| SocketAddr::from(([192, 0, 2, a], port));
        let local4 = Some(IpAddr::from([192, 0, 2, 100]));
        let local6 = Some(IpAddr::from(Ipv6Addr::LOCALHOST));
        let mut keys = Vec::new();
        for listener in [0, 1] {
            for client in [v4(1, 53), v4(2, 53), v4(1, 54), v6(53, 0, 0), v6(54, 0, 0)]
                .into_iter()
                .chain([v6(53, 1, 0), v6(53, 0, 1)])
            {
                for local in [None, local4, local6] {
                    for origin in [None, Some(v4(9, 9)), Some(v4(9, 8)), Some(v6(9, 0, 0))] {
                        keys.push(FlowKey {
                            listener,
                            client,
                            local,
                            origin,
                        });
                    }
                }
            }
        }
        let hashes: HashSet<u64> = keys.iter().map(hash).collect();
        assert_eq!(hashes.len(), keys.len(), "two different keys hashed alike");
        for k in &keys {
            let copy = *k;
            assert_eq!(hash(k), hash(&copy));
        }
        // An IPv4-mapped IPv6 client is another key than the IPv4 one, and hashes apart.
        let mapped = FlowKey {
            listener: 0,
            client: SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(), 53)),
            local: None,
            origin: None,
        };
        assert_ne!(hash(&mapped), hash(&keys[0]));
    }

    #[test]
    fn cap_sheds_new_flows_only() {
        let mut t = table(2);
        let idle = Duration::from_secs(10);
        let a = t.insert(key(1), backend(), 1, Time(0), Timeouts::idle(idle), ());
        t.insert(key(2), backend(), 1, Time(0), Timeouts::idle(idle), ());
        assert!(!t.has_room(0));
        assert_eq!(t.find(&key(1)), Some(a));
        t.close(a, CloseReason::Completed);
        assert!(t.has_room(0));
        t.check_invariants();
    }

    #[test]
    fn idle_expiry_respects_activity() {
        let mut t = table(10);
        let idle = Duration::from_secs(10);
        let a = t.insert(key(1), backend(), 1, Time(0), Timeouts::idle(idle), ());
        let b = t.insert(key(2), backend(), 1, Time(0), Timeouts::idle(idle), ());
        t.on_request(a, Time(9_000), 0);
        let (mut closed, mut renewed) = (vec![], vec![]);
        t.expire(Time(10_000), sort_expired(&mut closed, &mut renewed));
        assert_eq!((&closed[..], &renewed[..]), (&[b][..], &[a][..]));
        assert_eq!(t.next_deadline(), Some(Time(19_000)));
        t.expire(Time(19_000), sort_expired(&mut closed, &mut renewed));
        assert_eq!((&closed[..], &renewed[..]), (&[b, a][..], &[a][..]));
        assert_eq!(t.live(), 0);
        t.check_invariants();
    }

    #[test]
    fn stale_timer_never_closes_a_reused_slot() {
        let mut t = table(10);
        let a = t.insert(
            key(1),
            backend(),
            1,
            Time(0),
            Timeouts::idle(Duration::from_secs(1)),
            (),
        );
        t.close(a, CloseReason::Completed);
        let b = t.insert(
            key(2),
            backend(),
            1,
            Time(500),
            Timeouts::idle(Duration::from_secs(10)),
            (),
        );
        assert_eq!(a.slot(), b.slot(), "slot reused");
        let mut closed = 0;
        t.expire(Time(1_000), |_| closed += 1);
        assert_eq!(closed, 0);
        assert!(t.get(b).is_some());
        assert!(t.get(a).is_none());
        assert!(
            t.close(a, CloseReason::Idle).is_none(),
            "a stale handle closes nothing"
        );
        t.check_invariants();
    }

    #[test]
    fn request_response_completes_after_every_reply() {
        let mut t = table(10);
        let a = t.insert(
            key(1),
            backend(),
            1,
            Time(0),
            Timeouts::idle(Duration::from_secs(10)),
            (),
        );
        t.on_request(a, Time(1), 1);
        t.on_request(a, Time(2), 1);
        assert_eq!(t.on_reply(a, Time(3), true), ReplyOutcome::Forward);
        assert_eq!(
            t.on_reply(a, Time(4), true),
            ReplyOutcome::ForwardAndComplete
        );
    }

    #[test]
    fn an_unanswered_request_is_reported_once_per_deadline_and_the_flow_stays() {
        let mut t = table(10);
        let timeouts = Timeouts {
            idle: Duration::from_secs(30),
            reply: Duration::from_secs(2),
        };
        let a = t.insert(key(1), backend(), 1, Time(0), timeouts, ());
        let mut events = Vec::new();
        let mut record = |t: &mut FlowTable<()>, now| {
            t.expire(Time(now), |e| {
                events.push(match e {
                    Expired::Unanswered(h, f) => (now, "unanswered", h, f.pending_replies),
                    Expired::Idle(h, f) => (now, "idle", h, f.pending_replies),
                    Expired::Renewed(h, f) => (now, "renewed", h, f.pending_replies),
                })
            });
            t.check_invariants();
        };
        t.on_request(a, Time(1_000), 1);
        // A second request while one is owed does not move the deadline.
        t.on_request(a, Time(2_500), 1);
        record(&mut t, 2_999);
        record(&mut t, 3_000);
        record(&mut t, 10_000);
        // A retry arms the next deadline.
        t.on_request(a, Time(10_000), 1);
        // A reply while more are owed moves it on.
        assert_eq!(t.on_reply(a, Time(11_000), true), ReplyOutcome::Forward);
        record(&mut t, 12_999);
        record(&mut t, 13_000);
        record(&mut t, 43_000);
        assert_eq!(
            events,
            [
                (3_000, "unanswered", a, 2),
                // The timer armed for 12 s (the reply then moved the deadline on) finds the
                // flow active.
                (12_999, "renewed", a, 2),
                (13_000, "unanswered", a, 2),
                (43_000, "idle", a, 2),
            ]
        );
        // Answered in time: nothing is reported.
        let b = t.insert(key(2), backend(), 1, Time(50_000), timeouts, ());
        t.on_request(b, Time(50_000), 1);
        assert_eq!(
            t.on_reply(b, Time(51_000), true),
            ReplyOutcome::ForwardAndComplete
        );
        let mut reported = 0;
        t.expire(Time(79_000), |e| {
            if !matches!(e, Expired::Renewed(..)) {
                reported += 1;
            }
        });
        assert_eq!(reported, 0);
        t.check_invariants();
    }

    #[test]
    fn handle_round_trips_through_u64() {
        let h = FlowHandle {
            slot: 7,
            generation: 0xdead_beef,
        };
        assert_eq!(FlowHandle::from_u64(h.to_u64()), h);
    }

    #[test]
    fn timer_heap_stays_proportional_to_live_flows() {
        let mut t = table(100_000);
        let idle = Duration::from_secs(30);
        for i in 0..50_000u32 {
            let h = t.insert(
                key((i % 60_000) as u16),
                backend(),
                1,
                Time(u64::from(i)),
                Timeouts::idle(idle),
                (),
            );
            t.close(h, CloseReason::Completed);
            t.expire(Time(u64::from(i)), |_| {});
        }
        assert!(
            t.timers.len() <= 2 * t.live() + 1025,
            "{} timers",
            t.timers.len()
        );
    }
}
