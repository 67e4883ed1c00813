// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// udplb's kernel data plane: a tc program on the balancer's interfaces that forwards UDP
// datagrams of the kernel listeners to their backends and rewrites the backends' replies to
// come from the listener's address, each sent out by a FIB lookup and a redirect (no trip
// through the stack). Per listener: LVS-NAT (the destination rewritten, the client's address
// kept: the backends route their replies through the balancer), masquerade (the source
// rewritten as well, to a balancer address and a port of the pool's range: the backends answer
// the balancer, wherever they are, this host included) or direct server return (the datagram
// untouched, encapsulated to the backend, IP in IP or in UDP (GUE), which answers the client
// itself).
//
// Owns: parsing, the placement (the same hash and Maglev table as udplb's socket path: user
// space builds the table, this program indexes it), the flow map, checksums, TTL, counters.
// Must not: decide anything user space can decide ahead (tables, health, weights).
//
// This file holds IPv4's path and what both families share; IPv6's is in ipv6.h. Each family's
// path is its own function (each has the 512 bytes of stack a program may use), called from
// `udplb_ingress` at the end, which looks at ICMP errors about replies first.
//
// Maps are filled by udplb (crates/udplb-kernel/src/loaded.rs mirrors every layout here).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef UDPLB_BITFLIP
#error "UDPLB_BITFLIP (the placement hash's constant) comes from build.rs"
#endif

#define MAX_SERVICES 16
#define MAX_BACKENDS 256
#define RING_SIZE 65537
#define SCHEDULE_MAX 16384
#define LOCALS_MAX 4096 // this host's addresses, per family
#define AF_INET 2
#define LOOPBACK_IFINDEX 1 // lo, in every network namespace

// A service: a kernel listener, by its address and port (network order).
struct service_key {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

#define SERVICE_DATAGRAM 1 // every datagram placed anew (datagram mode)
#define SERVICE_BY_IP 2 // the client's address alone is hashed (affinity = "ip")
#define SERVICE_ALLOW_LIST 4 // only clients in acl_allow are served
#define SERVICE_MASQUERADE 8 // the source rewritten too, to a port of [port_base, +port_count)
#define SERVICE_DSR 16 // encapsulated IP in IP to the backend, not rewritten
#define SERVICE_GUE 32 // dsr: encapsulated in UDP to port `port_base` instead (GUE variant 1)
#define SERVICE_PERSIST 64 // a client returns to its backend for `persist_ns` (`persist`)
#define SERVICE_REPLY_RATIO 128 // its flows count their bytes (its backends' `reply_ratio`)
#define SERVICE_SYNCED 256 // `[sync]`: a new flow opens where a peer had it (`peer_flows`), and
			   // is told to udplb for the peers (`new_flows`)
#define SERVICE_WILDCARD 512 // address 0: datagrams to any of this host's addresses (`locals`)
			     // on the port. Its flows keep the address the client sent to, and
			     // are hashed without it (`flow_bucket`), so that a reply finds it.
#define SERVICE_DENY_LIST 1024 // clients in acl_deny are refused (without it, none is looked up)

// A listener's rate limits, as udplb's socket path counts them
// (udplb_core::ratelimit): per key and one-second window, at most `limit`, in a count-min
// sketch of two rows of cells that never grows.
#define LIMIT_DATAGRAMS_SOURCE 0
#define LIMIT_DATAGRAMS_PREFIX 1
#define LIMIT_FLOWS_SOURCE 2
#define LIMIT_FLOWS_PREFIX 3
#define LIMITERS 4

struct service {
	__u32 id; // < MAX_SERVICES: the service's slice of ring, schedule and backends
	__u32 flags;
	__u64 idle_ns; // a flow idle this long is placed anew
	__u32 ring_size; // 0: no backend takes new flows
	__u32 schedule_len; // datagram mode's round-robin schedule
	__u16 port_base; // masquerade: the balancer's source ports (host order); dsr with
			 // SERVICE_GUE: the backends' GUE port (host order)
	__u16 port_count;
	__u32 sync_ms; // SERVICE_SYNCED: a peer's flow is followed this long after udplb learned it
	__u32 limit[LIMITERS]; // per second and key (0: off)
	__u32 limit_base; // this service's first cell in `limits`
	__u32 limit_mask; // cells per row - 1 (a power of two - 1)
	__u32 prefix_mask; // a client's prefix for the per-prefix limits (network order)
	__u32 pad2;
	__u32 prefix6_mask[4]; // the same for an IPv6 client
	__u64 persist_ns; // SERVICE_PERSIST: remembered this long after the idle timeout
};

#define BACKEND_KEEPS_FLOWS 1
#define BACKEND_MASQUERADE 2 // its replies come to a masquerade port (struct masq)
#define BACKEND_LOCAL 4 // on this host (udplb knows its addresses; the FIB cannot tell
			// without forwarding on)
#define BACKEND_TAKES_NEW 8 // in the table (or schedule): healthy, not draining or disabled

struct backend {
	__u32 addr;
	__u16 port;
	__u16 flags;
};

struct flow_key {
	__u32 client_addr;
	__u32 service_addr;
	__u16 client_port;
	__u16 service_port;
};

// A persistence entry (and a flow, in `struct flow_slot`) names its backend by address (not
// by its slot in `backends`), so that the pinned maps mean the same to the next udplb process,
// which reuses them after a restart or an upgrade and may number the backends otherwise.
struct flow {
	__u32 backend_addr;
	__u16 backend_port;
	__u16 pad;
	__u64 last_ns;
	__u32 sent; // unused (the layout the persistence maps have had)
	__u32 replied;
};

// Replies: from a backend's address and port back to the service it serves.
struct reply_key {
	__u32 addr;
	__u16 port;
	__u16 pad;
};

struct reply {
	__u32 service_addr;
	__u16 service_port;
	__u16 flags; // BACKEND_KEEPS_FLOWS, BACKEND_MASQUERADE
	__u32 backend; // global backend index (counters)
	__u32 reply_ratio; // replied payload bytes per byte the client sent, at most (0: off)
};

// Per backend, per CPU.
struct counters {
	__u64 packets;
	__u64 bytes;
	__u64 reply_packets;
	__u64 reply_bytes;
	__u64 icmp_errors; // about datagrams to the backend: udplb's passive health reads them
	__u64 persisted; // new flows (datagram mode: datagrams) persistence sent back to it
	__u64 flows; // flows placed on it (flow mode)
};

enum drop_reason {
	DROP_NO_BACKEND,
	DROP_TTL,
	DROP_FIB,
	DROP_REWRITE,
	PASS_FRAGMENT, // a later fragment whose first one was not seen: left to the stack
	DROP_DENIED, // the listener's allow and deny lists refuse the client
	PASS_FORGED, // a backend's address from the clients' side: not rewritten, left to the stack
	DROP_NO_PORT, // masquerade: every port tried for a new client is taken
	DROP_TOO_BIG, // dsr: encapsulated, the datagram would exceed the route's MTU
	DROP_RATE_LIMITED, // over a per-source or per-prefix datagram limit
	DROP_FLOW_RATE_LIMITED, // over a per-source or per-prefix new-flow limit
	PASS_OVERSIZE, // too big for the route onward, without DF: rewritten, fragmented by the stack
	CUT_FOR_TUNNEL, // dsr: without DF, too big once encapsulated: cut into fragments first
	DROP_AMPLIFICATION, // a reply beyond its flow's reply ratio (or of no flow)
	FLOW_REPLACED, // not a drop: a new flow took the slot of one not idle (its bucket full)
	SYNC_USED, // not a drop: a new flow opened on the backend a peer had it on (`peer_flows`)
	SYNC_NOT_QUEUED, // not a drop: a new flow not told to udplb for the peers (`new_flows` full)
	DROP_FLOW_GONE, // nat: a reply to a wildcard listener's client whose flow is gone (the
			// address the client sent to, the reply's source, is not known)
	DROP_REASONS,
};

// Masquerade: the balancer's port (and address) a client's datagrams to a backend come from,
// by backend and port. A port is the client's while its datagrams keep coming (`last_ns`,
// refreshed at most once a second); idle for the listener's idle timeout, another client may
// take it.
struct masq_key {
	__u32 backend_addr;
	__u16 backend_port;
	__u16 port; // the balancer's (network order)
};

struct masq {
	__u32 client_addr;
	__u32 local_addr; // the balancer's address the backend answers
	__u32 service_addr;
	__u16 client_port;
	__u16 service_port;
	__u64 last_ns;
};

#define MASQ_PROBES 8 // ports tried for a new client
// A masquerade port's or persistence entry's `last_ns` is written at most this often (not on
// every datagram: a store to a shared entry costs more than the lookup).
#define REFRESH_NS 1000000000ULL


// A listener's allow or deny list entry: the service id (big-endian, so that its 32 bits come
// first) and a client network, matched by longest prefix (32 + the network's length).
struct acl_key {
	__u32 prefixlen;
	__u32 service;
	__u32 addr;
};

// The later fragments of a datagram follow its first: by source, destination and IP id, the
// address the first one's was rewritten to.
struct fragment_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u16 pad;
};

#define FRAGMENT_REPLY 1 // a reply (counted as one)
#define FRAGMENT_ENCAP 2 // encapsulated to `daddr`, not rewritten
#define FRAGMENT_DROP 4 // a reply beyond its flow's reply ratio: its later fragments too

struct fragment {
	union {
		__u32 saddr; // the new source (0: kept)
		__u32 gue; // FRAGMENT_ENCAP: its GUE ports (`gue_ports`), 0 for IP in IP
	};
	__u32 daddr; // the new destination (0: kept)
	__u32 backend;
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service_key);
	__type(value, struct service);
} services SEC(".maps");

// Which ports a listener is on (`services`) and a backend answers from (`backends`), a bit
// per port (both families): a datagram that is neither a listener's nor a backend's is left
// alone without a hash lookup. udplb sets a port's bit before the map entries that need it
// and never clears one (a stale bit costs only the lookups it would have saved).
struct port_bits {
	__u64 services;
	__u64 backends;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536 / 64);
	__type(key, __u32);
	__type(value, struct port_bits);
} ports SEC(".maps");

// Whether `port` (network order) may be a listener's (`service`) or else a backend's.
static __always_inline int port_may_be(__u16 port, int service)
{
	__u32 p = bpf_ntohs(port), at = p >> 6;
	struct port_bits *pb = bpf_map_lookup_elem(&ports, &at);
	if (!pb)
		return 1; // (at < 1024: never)
	__u64 bit = 1ULL << (p & 63);
	return ((service ? pb->services : pb->backends) & bit) != 0;
}

// This host's addresses, kept current by udplb: a wildcard listener takes what comes to any
// of them on its port (as a socket bound to 0.0.0.0 would), and nothing on its way elsewhere.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LOCALS_MAX);
	__type(key, __u32);
	__type(value, __u8);
} locals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * RING_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * SCHEDULE_MAX);
	__type(key, __u32);
	__type(value, __u32);
} schedule SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

#define LIBBPF_PIN_BY_NAME 1

// A packet the program leaves as it came (not for a kernel listener, or left to the stack):
// the program returns TC_ACT_UNSPEC for it (`udplb_ingress`), so that the next program on the
// interface (another udplb's, anyone's) still sees it, and then the stack. TC_ACT_OK would end
// the interface's chain there (tcx and cls_bpf alike). Within the program it is a verdict of
// its own, positive as every verdict is (-1 means "not decided" between its functions).
#define PASS_ON 64

// The flow tables (`flows` here, `flows6` in ipv6.h): arrays of buckets of FLOW_WAYS slots,
// each flow in a slot of the bucket its seeded hash names; a new flow takes the slot of its
// bucket idle longest. A lookup reads one bucket (two cache lines for IPv4), an insert writes
// one slot: no chains, no lists, no locks (the kernel's LRU hash map took a node from its
// lists and walked a bucket's chain per new flow, its cost by far; docs/kernel.md). Each slot
// carries a version, odd while a CPU writes it: a writer takes the slot by compare-and-swap
// (so two writers never mix), and a reader keeps what it read only if the version was even
// and unchanged around it (so it never takes one flow's key with another's backend).
#define FLOW_WAYS 4
// A slot's `word`: its version in the high 16 bits, its backend's port in the low 16.
#define FLOW_VERSION_ONE (1U << 16)
// Flow times are bpf_ktime_get_ns() >> FLOW_TIME_SHIFT (about a millisecond; 32 bits wrap
// after 52 days, and an idle timeout is at most a day).
#define FLOW_TIME_SHIFT 20

struct flow_slot {
	struct flow_key key;
	__u32 word; // the version and the backend's port (FLOW_VERSION_ONE)
	__u32 backend_addr;
	__u32 last; // flow_time() when its client last sent
	// Payload bytes the client sent and the backend replied (listeners with a reply ratio;
	// saturating, not atomic: a flow's datagrams are handled on one CPU at a time).
	__u32 sent;
	__u32 replied;
};

struct flow_bucket {
	struct flow_slot slot[FLOW_WAYS];
};

_Static_assert(sizeof(struct flow_bucket) == 128, "FLOW_BUCKET_BYTES in src/lib.rs");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024); // buckets, a power of two: set by udplb before loading
	__uint(map_flags, BPF_F_MMAPABLE); // udplb counts the live flows in place
	__type(key, __u32);
	__type(value, struct flow_bucket);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes
#endif
} flows SEC(".maps");

// How the flow tables hash: a random seed (chosen by the udplb process that made the tables,
// kept with them) and each table's buckets less one.
struct flow_params {
	__u64 seed;
	__u32 mask;
	__u32 mask6;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_params);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows`
#endif
} flow_params SEC(".maps");

static __always_inline __u32 flow_time(__u64 now_ns)
{
	return (__u32)(now_ns >> FLOW_TIME_SHIFT);
}

// Whether a flow last seen at `last` (flow_time) is within `idle_ns` of `now_ns`.
static __always_inline int flow_live(__u32 last, __u64 now_ns, __u64 idle_ns)
{
	return flow_time(now_ns) - last <= (__u32)(idle_ns >> FLOW_TIME_SHIFT);
}

// A slot's word, read in order with the reads around it. x86's JIT keeps loads in program
// order (TSO), so a plain load does; elsewhere a fully ordered atomic read.
static __always_inline __u32 read_word(__u32 *word)
{
#ifdef UDPLB_TSO
	asm volatile("" ::: "memory"); // nor may the compiler move loads across it
	__u32 w = *(volatile __u32 *)word;
	asm volatile("" ::: "memory");
	return w;
#else
	return __sync_fetch_and_add(word, 0);
#endif
}

// Takes `slot`'s word from `seen` to odd: this CPU alone writes the slot now. 0: another does.
static __always_inline int take_slot(__u32 *word, __u32 seen)
{
	if (seen & FLOW_VERSION_ONE)
		return 0;
	return __sync_val_compare_and_swap(word, seen, seen + FLOW_VERSION_ONE) == seen;
}

// Publishes a slot taken from `seen`: version even again, with the backend's port.
static __always_inline void publish_slot(__u32 *word, __u32 seen, __u16 port)
{
	__sync_lock_test_and_set(word, ((seen + 2 * FLOW_VERSION_ONE) & 0xffff0000) | port);
}

// murmur3's 64-bit finalizer.
static __always_inline __u64 flow_mix(__u64 h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	return h ^ (h >> 33);
}

// The slot of flow bucket `bk` idle longest at `now` (flow_time; a never used one first).
#define OLDEST_SLOT(bk, now)                                                                   \
	({                                                                                     \
		int victim_ = 0;                                                               \
		__u32 oldest_ = 0;                                                             \
		_Pragma("unroll") for (int w_ = 0; w_ < FLOW_WAYS; w_++)                       \
		{                                                                              \
			__u32 age_ = (bk)->slot[w_].word < FLOW_VERSION_ONE ?                  \
					     0xffffffff :                                      \
					     (now) - (bk)->slot[w_].last;                      \
			if (age_ >= oldest_) {                                                 \
				oldest_ = age_;                                                \
				victim_ = w_;                                                  \
			}                                                                      \
		}                                                                              \
		&(bk)->slot[victim_ & (FLOW_WAYS - 1)];                                        \
	})

// The bucket of flow `fk`; of a wildcard listener's flow (`wild`), by its client and ports
// alone (its service address taken as 0), so that its replies find it.
static __always_inline struct flow_bucket *flow_bucket(const struct flow_key *fk, int wild)
{
	__u32 zero = 0;
	struct flow_params *fp = bpf_map_lookup_elem(&flow_params, &zero);
	if (!fp)
		return 0;
	__u32 service_addr = wild ? 0 : fk->service_addr;
	__u64 h = flow_mix((((__u64)fk->client_addr << 32) | service_addr) ^ fp->seed);
	h = flow_mix(h ^ (((__u64)fk->client_port << 16) | fk->service_port));
	__u32 at = (__u32)h & fp->mask;
	return bpf_map_lookup_elem(&flows, &at);
}

static __always_inline int same_flow(const struct flow_slot *s, const struct flow_key *fk)
{
	return s->key.client_addr == fk->client_addr && s->key.service_addr == fk->service_addr &&
	       s->key.client_port == fk->client_port && s->key.service_port == fk->service_port;
}

// Flow `fk`'s slot in bucket `bk` (0: none), its backend read into `addr`:`port`.
static __always_inline struct flow_slot *find_flow(struct flow_bucket *bk,
						   const struct flow_key *fk, __u32 *addr,
						   __u16 *port)
{
#pragma unroll
	for (int w = 0; w < FLOW_WAYS; w++) {
		struct flow_slot *s = &bk->slot[w];
		__u32 v = read_word(&s->word);
		if ((v & FLOW_VERSION_ONE) || !same_flow(s, fk))
			continue;
		__u32 a = s->backend_addr;
		if (read_word(&s->word) != v)
			continue;
		*addr = a;
		*port = (__u16)v;
		return s;
	}
	return 0;
}

// The address the client of wildcard listener flow `fk` (its service address 0) to backend
// `backend`:`bport` sent to (0: no such flow): what its replies come from. A client port that
// sent to several of this host's addresses, placed on the same backend each time, is one
// conversation to that backend, which cannot tell them apart: its replies come from the
// address the client sent to last (a resolver that tries another address of this host).
static __always_inline __u32 wildcard_flow_addr(const struct flow_key *fk, __u32 backend,
						__u16 bport)
{
	struct flow_bucket *bk = flow_bucket(fk, 1);
	if (!bk)
		return 0;
	__u32 found = 0, latest = 0;
#pragma unroll
	for (int w = 0; w < FLOW_WAYS; w++) {
		struct flow_slot *s = &bk->slot[w];
		__u32 v = read_word(&s->word);
		if ((v & FLOW_VERSION_ONE) || s->key.client_addr != fk->client_addr ||
		    s->key.client_port != fk->client_port ||
		    s->key.service_port != fk->service_port || s->backend_addr != backend ||
		    (__u16)v != bport)
			continue;
		__u32 a = s->key.service_addr, last = s->last;
		if (read_word(&s->word) != v || (found && (__s32)(last - latest) < 0))
			continue;
		found = a;
		latest = last;
	}
	return found;
}

// Whether bucket `bk` holds flow `fk`.
static __always_inline int has_flow(struct flow_bucket *bk, const struct flow_key *fk)
{
	__u32 addr;
	__u16 port;
	return bk && find_flow(bk, fk, &addr, &port);
}

static __always_inline void count_drop(__u32 reason);

// Puts flow `fk` (to backend `addr`:`port`, `sent` bytes so far) in bucket `bk`: in `s`, its
// own slot when it had one, else in the bucket's slot idle longest, counted as FLOW_REPLACED
// when that one's flow was not idle (by its own listener's idle timeout, `IDLE_OF`; `idle_ns`
// is the new flow's listener's): the table too small for its flows.
// Another CPU writing that slot at the same time wins; this flow is then placed again by its
// next datagram (to the same backend, unless the table changed).
// (`add_flow6`'s too: the IPv4 and IPv6 slots differ in their key's and address's types.)
#define ADD_FLOW(bk, s, fk, addr, port, now_ns, sent_bytes, idle_ns, IDLE_OF)                 \
	do {                                                                                   \
		__u32 now_ = flow_time(now_ns);                                                \
		int replaced_ = 0;                                                             \
		if (!(s)) {                                                                    \
			(s) = OLDEST_SLOT(bk, now_);                                           \
			replaced_ = (s)->word >= FLOW_VERSION_ONE &&                           \
				    flow_live((s)->last, now_ns,                               \
					      IDLE_OF(&(s)->key, fk, idle_ns));                \
		}                                                                              \
		__u32 seen_ = (s)->word;                                                       \
		if (take_slot(&(s)->word, seen_)) {                                            \
			if (replaced_)                                                         \
				count_drop(FLOW_REPLACED);                                     \
			(s)->key = *(fk);                                                      \
			(s)->backend_addr = (addr);                                            \
			(s)->last = now_;                                                      \
			(s)->sent = (sent_bytes);                                              \
			(s)->replied = 0;                                                      \
			publish_slot(&(s)->word, seen_, port);                                 \
		}                                                                              \
	} while (0)

// The idle timeout of the listener of flow `victim`: `idle_ns` when it is `fk`'s listener's,
// else its own (0 for a listener gone: its flows are idle).
static __always_inline __u64 idle_of(const struct flow_key *victim, const struct flow_key *fk,
				     __u64 idle_ns)
{
	if (victim->service_addr == fk->service_addr && victim->service_port == fk->service_port)
		return idle_ns;
	struct service_key sk = {.addr = victim->service_addr, .port = victim->service_port};
	struct service *svc = bpf_map_lookup_elem(&services, &sk);
	if (!svc) {
		sk.addr = 0; // a wildcard listener's flow (kept with the address it came to)
		svc = bpf_map_lookup_elem(&services, &sk);
	}
	return svc ? svc->idle_ns : 0;
}

static __always_inline void add_flow(struct flow_bucket *bk, struct flow_slot *s,
				     const struct flow_key *fk, __u32 addr, __u16 port,
				     __u64 now_ns, __u32 sent, __u64 idle_ns)
{
	ADD_FLOW(bk, s, fk, addr, port, now_ns, sent, idle_ns, idle_of);
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES * MAX_BACKENDS);
	__type(key, struct reply_key);
	__type(value, struct reply);
} replies SEC(".maps");

// Whether backend mapping `r` still serves listener `svc` at `addr`:`port`, the address the
// client sent to (a wildcard listener's backends name address 0).
static __always_inline int serves(const struct reply *r, const struct service *svc, __u32 addr,
				  __u16 port)
{
	return r->service_port == port &&
	       r->service_addr == ((svc->flags & SERVICE_WILDCARD) ? 0 : addr);
}

// Persistence (LVS's persistence_timeout): the backend each client of a listener with
// SERVICE_PERSIST last used, by the client's address and port (its address alone, port 0,
// with SERVICE_BY_IP), and when (`last_ns`, refreshed at most once a second).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); // set by udplb before loading (as `flows`)
	__type(key, struct flow_key);
	__type(value, struct flow);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows`
#endif
} persist SEC(".maps");

// Flows of the peer instances (`[sync]`), as udplb learned them: by flow key, the backend the
// peer's flow is on, and when udplb learned it (`last_ns`). Consulted when a flow opens.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024); // set by udplb before loading (`sync.max_entries`)
	__type(key, struct flow_key);
	__type(value, struct flow);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows`
#endif
} peer_flows SEC(".maps");

// A new flow of a SERVICE_SYNCED listener, for udplb to tell its peers: addresses and ports
// as the packet has them; an IPv4 address in the first word.
struct new_flow {
	__u32 service; // the listener's id
	__u16 client_port;
	__u16 backend_port;
	__u32 family; // 4 or 6
	__u32 client[4];
	__u32 backend[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); // about 23,000 new flows between two reads (every 100 ms)
} new_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); // set by udplb before loading (as `flows`)
	__type(key, struct masq_key);
	__type(value, struct masq);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows`
#endif
} masq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES * MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct acl_key);
	__type(value, __u8);
} acl_allow SEC(".maps");

// The rate limits' cells: per service with limits, LIMITERS x 2 rows x (limit_mask + 1), each
// the second it counts (upper 32 bits) and the count (lower 32).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); // set by udplb before loading
	__type(key, __u32);
	__type(value, __u64);
} limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct acl_key);
	__type(value, __u8);
} acl_deny SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct fragment_key);
	__type(value, struct fragment);
} fragments SEC(".maps");

// Datagram mode's position in each service's schedule, per CPU: each CPU deals the schedule
// out exactly, and the spread over all of them is off by at most one datagram per CPU (a
// position shared by the CPUs, updated atomically, cost 30 % of the throughput on two CPUs).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u64);
} turns SEC(".maps");

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&drops, &reason);
	if (n)
		*n += 1;
}

// The listener at `addr`:`port` (of the address itself), or with `wildcard`, the wildcard
// listener on `port` when `addr` is one of this host's.
static __always_inline struct service *service_at(__u32 addr, __u16 port, int wildcard)
{
	struct service_key sk = {.addr = wildcard ? 0 : addr, .port = port};
	struct service *svc = bpf_map_lookup_elem(&services, &sk);
	if (svc && wildcard && !bpf_map_lookup_elem(&locals, &addr))
		return 0;
	return svc;
}

static __always_inline __u64 rotl64(__u64 x, int r)
{
	return (x << r) | (x >> (64 - r));
}

// udplb's placement hash (udplb_core::hash::ClientKey: xxh3-64 with udplb's fixed seed) of
// 4 to 8 bytes, read as xxh3 reads them: `lo` the first 4 bytes, `hi` the last 4 (both
// little-endian), `len` the length.
static __always_inline __u64 placement_hash(__u32 first, __u32 last, __u64 len)
{
	__u64 h = ((__u64)last + ((__u64)first << 32)) ^ UDPLB_BITFLIP;
	h ^= rotl64(h, 49) ^ rotl64(h, 24);
	h *= 0x9FB21C651E98DF25ULL;
	h ^= (h >> 35) + len;
	h *= 0x9FB21C651E98DF25ULL;
	return h ^ (h >> 28);
}

// The high 64 bits of `h * n` (n < 2^32): the Maglev slot of hash `h` in a table of `n`,
// as udplb_core::maglev::MaglevTable::lookup computes it.
static __always_inline __u64 slot_of(__u64 h, __u64 n)
{
	__u64 lo = (h & 0xffffffffULL) * n;
	__u64 hi = (h >> 32) * n;
	return (hi + (lo >> 32)) >> 32;
}

// The backend (global index) for a new flow or a datagram of `svc` from a client whose
// placement hash is `h` (datagram mode deals its schedule instead).
static __always_inline int place(const struct service *svc, __u64 h, __u32 *backend)
{
	__u32 base = svc->id * MAX_BACKENDS;
	if (svc->flags & SERVICE_DATAGRAM) {
		__u32 id = svc->id;
		__u64 *turn = bpf_map_lookup_elem(&turns, &id);
		__u32 len = svc->schedule_len;
		if (!turn || len == 0 || len > SCHEDULE_MAX)
			return -1;
		__u64 mine = (*turn)++;
		__u32 at = svc->id * SCHEDULE_MAX + (__u32)(mine % len);
		__u32 *b = bpf_map_lookup_elem(&schedule, &at);
		if (!b)
			return -1;
		*backend = base + *b;
		return 0;
	}
	__u32 n = svc->ring_size;
	if (n == 0 || n > RING_SIZE)
		return -1;
	__u32 at = svc->id * RING_SIZE + (__u32)slot_of(h, n);
	__u32 *b = bpf_map_lookup_elem(&ring, &at);
	if (!b)
		return -1;
	*backend = base + *b;
	return 0;
}

// The placement hash of an IPv4 client of `svc` (0 in datagram mode, which needs none).
static __always_inline __u64 client_hash(const struct service *svc, __u32 addr, __u16 port)
{
	if (svc->flags & SERVICE_DATAGRAM)
		return 0;
	if (svc->flags & SERVICE_BY_IP)
		return placement_hash(addr, addr, 4);
	return placement_hash(addr, (addr >> 16) | ((__u32)port << 16), 6);
}

// The key of the persistence entry of the IPv4 client of flow `fk`.
static __always_inline struct flow_key persist_key(const struct service *svc,
						   const struct flow_key *fk)
{
	struct flow_key k = *fk;
	if (svc->flags & SERVICE_BY_IP)
		k.client_port = 0;
	if (svc->flags & SERVICE_WILDCARD)
		k.service_addr = 0; // whichever of this host's addresses the client sent to
	return k;
}

// The backend the IPv4 client of flow `fk` persists on (`*b`, its flags, address and port),
// while its entry is younger than the idle timeout and persistence together and the backend
// takes new clients and still serves this listener. Returns 0 when there is none.
static __always_inline int persisted(const struct service *svc, const struct flow_key *fk,
				     __u64 now, __u32 *b, __u16 *bflags, __u32 *to_addr,
				     __u16 *to_port)
{
	struct flow_key pk = persist_key(svc, fk);
	struct flow *p = bpf_map_lookup_elem(&persist, &pk);
	if (!p || now - p->last_ns > svc->idle_ns + svc->persist_ns)
		return 0;
	struct reply_key rk = {.addr = p->backend_addr, .port = p->backend_port};
	struct reply *r = bpf_map_lookup_elem(&replies, &rk);
	if (!r || !(r->flags & BACKEND_TAKES_NEW) ||
	    !serves(r, svc, fk->service_addr, fk->service_port))
		return 0;
	*b = r->backend;
	*bflags = r->flags;
	*to_addr = p->backend_addr;
	*to_port = p->backend_port;
	if (now - p->last_ns > REFRESH_NS)
		p->last_ns = now;
	struct counters *c = bpf_map_lookup_elem(&counters, b);
	if (c)
		c->persisted += 1;
	return 1;
}

// Remembers that the IPv4 client of flow `fk` used backend `addr`:`port` now. An entry naming
// another backend is replaced only when `placed` (a datagram of a kept flow on a backend that
// no longer takes new clients leaves alone where its client's new flows now go).
static __always_inline void remember(const struct service *svc, const struct flow_key *fk,
				     __u32 addr, __u16 port, __u64 now, int placed)
{
	struct flow_key pk = persist_key(svc, fk);
	struct flow *p = bpf_map_lookup_elem(&persist, &pk);
	if (p && p->backend_addr == addr && p->backend_port == port) {
		if (now - p->last_ns > REFRESH_NS)
			p->last_ns = now;
		return;
	}
	if (p && !placed)
		return;
	struct flow v = {.backend_addr = addr, .backend_port = port, .last_ns = now};
	bpf_map_update_elem(&persist, &pk, &v, BPF_ANY);
}

// The backend a peer instance had flow `fk` on (its address, port and flags into `to`, its
// index into `*b`), if udplb learned it within the listener's `sync_ms` and the backend keeps
// flows and serves this listener (the flow continues as it would have on the peer). Returns 0
// when there is none. (Its own function: the IPv4 path has no stack to spare.)
static __noinline int peer_flow(const struct service *svc, const struct flow_key *fk, __u64 now,
				struct backend *to, __u32 *b)
{
	struct flow_key k = *fk;
	if (svc->flags & SERVICE_WILDCARD)
		k.service_addr = 0; // as udplb learned it: by the listener's address
	struct flow *p = bpf_map_lookup_elem(&peer_flows, &k);
	if (!p || now - p->last_ns > (__u64)svc->sync_ms * 1000000)
		return 0;
	struct reply_key rk = {.addr = p->backend_addr, .port = p->backend_port};
	struct reply *r = bpf_map_lookup_elem(&replies, &rk);
	if (!r || !(r->flags & BACKEND_KEEPS_FLOWS) ||
	    !serves(r, svc, fk->service_addr, fk->service_port))
		return 0;
	*b = r->backend;
	to->addr = rk.addr;
	to->port = rk.port;
	to->flags = r->flags;
	count_drop(SYNC_USED);
	return 1;
}

// Tells udplb about new flow `e` of a SERVICE_SYNCED listener, for its peers (without waking
// it: udplb reads `new_flows` every sync interval).
static __always_inline void tell_peers(const struct new_flow *e)
{
	if (bpf_ringbuf_output(&new_flows, (void *)e, sizeof(*e), BPF_RB_NO_WAKEUP))
		count_drop(SYNC_NOT_QUEUED);
}

// As `tell_peers`, for an IPv4 flow. (Its own function: the event would take stack from the
// IPv4 path.)
static __noinline void tell_peers4(__u32 service, __u32 client, __u16 client_port, __u32 backend,
				   __u16 backend_port)
{
	struct new_flow e = {.service = service,
			     .client_port = client_port,
			     .backend_port = backend_port,
			     .family = 4,
			     .client = {client},
			     .backend = {backend}};
	tell_peers(&e);
}

// Counts a flow placed on `backend` (flow mode).
static __always_inline void count_flow(__u32 backend)
{
	struct counters *c = bpf_map_lookup_elem(&counters, &backend);
	if (c)
		c->flows += 1;
}

// Adds `bytes` to a saturating byte count.
static __always_inline void add_bytes(__u32 *count, __u32 bytes)
{
	__u32 sum = *count + bytes;
	*count = sum < *count ? ~0u : sum;
}

// Whether a reply of `bytes` payload bytes to flow `fk` is within the listener's reply ratio
// (`ratio` replied bytes per byte the client sent), charged to the flow if so. A reply to no
// flow (expired, or never placed here) has no allowance.
static __always_inline int within_reply_ratio(const struct flow_key *fk, int wild, __u32 ratio,
					      __u32 bytes)
{
	struct flow_bucket *bk = flow_bucket(fk, wild);
	__u32 addr;
	__u16 port;
	struct flow_slot *f = bk ? find_flow(bk, fk, &addr, &port) : 0;
	if (!f || (__u64)f->replied + bytes > (__u64)ratio * f->sent)
		return 0;
	add_bytes(&f->replied, bytes);
	return 1;
}

// Drops a reply beyond its flow's reply ratio; a first fragment's later ones follow it.
static __always_inline int beyond_reply_ratio(struct fragment_key *frk, int first_of_more)
{
	if (first_of_more) {
		struct fragment fr = {.flags = FRAGMENT_DROP};
		bpf_map_update_elem(&fragments, frk, &fr, BPF_ANY);
	}
	count_drop(DROP_AMPLIFICATION);
	return TC_ACT_SHOT;
}

// The count a cell holds for second `now`.
static __always_inline __u32 count_in(__u64 cell, __u32 now)
{
	return (__u32)(cell >> 32) == now ? (__u32)cell : 0;
}

// Counts one event of `key` in limiter `which` of `svc` at `now_ns`; whether it is within
// the limit (a limiter that is off costs one comparison). As udplb's socket path: the smaller of the key's two cells decides, only the
// cells at that minimum are raised (conservative update), each by a compare-and-swap so that
// the CPUs together never pass the limit; a lost race retries with fresh values.
static __always_inline int within(const struct service *svc, __u32 which, __u32 key, __u64 now_ns)
{
	if (which >= LIMITERS)
		return 1;
	__u32 limit = svc->limit[which];
	if (!limit)
		return 1;
	__u32 now = (__u32)(now_ns / 1000000000ULL);
	__u32 cells = svc->limit_mask + 1;
	__u32 base = svc->limit_base + which * 2 * cells;
	__u64 h = placement_hash(key, key ^ 0x9E3779B9, 8);
	__u32 at0 = base + ((__u32)h & svc->limit_mask);
	__u32 at1 = base + cells + ((__u32)(h >> 32) & svc->limit_mask);
	__u64 *c0 = bpf_map_lookup_elem(&limits, &at0);
	__u64 *c1 = bpf_map_lookup_elem(&limits, &at1);
	if (!c0 || !c1)
		return 1;
	for (int attempt = 0; attempt < 8; attempt++) {
		__u64 s0 = *(volatile __u64 *)c0, s1 = *(volatile __u64 *)c1;
		__u32 n0 = count_in(s0, now), n1 = count_in(s1, now);
		__u32 min = n0 < n1 ? n0 : n1;
		if (min >= limit)
			return 0;
		__u64 next = ((__u64)now << 32) | (min + 1);
		if (n0 == min && __sync_val_compare_and_swap(c0, s0, next) != s0)
			continue;
		if (n1 == min && __sync_val_compare_and_swap(c1, s1, next) != s1)
			continue;
		return 1;
	}
	return 0; // contended beyond reason: refused
}

// Whether the client's datagram (`flows`: a new flow's) is within the listener's limits, per
// source address and per prefix.
static __always_inline int within_limits(const struct service *svc, __u32 client, int flows,
					 __u64 now)
{
	__u32 source = flows ? LIMIT_FLOWS_SOURCE : LIMIT_DATAGRAMS_SOURCE;
	__u32 prefix = flows ? LIMIT_FLOWS_PREFIX : LIMIT_DATAGRAMS_PREFIX;
	return within(svc, source, client, now) &&
	       within(svc, prefix, client & svc->prefix_mask, now);
}

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_TTL_OFF (IP_OFF + offsetof(struct iphdr, ttl))
#define IP_SRC_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (IP_OFF + offsetof(struct iphdr, daddr))
#define UDP_OFF (IP_OFF + sizeof(struct iphdr))
#define UDP_CSUM_OFF (UDP_OFF + offsetof(struct udphdr, check))
#define UDP_SPORT_OFF (UDP_OFF + offsetof(struct udphdr, source))
#define UDP_DPORT_OFF (UDP_OFF + offsetof(struct udphdr, dest))

// Takes one from the TTL (which shares a 16-bit word with the protocol: the IP checksum changes
// by that word). Returns 0, or a drop reason + 1.
static __always_inline int take_ttl(struct __sk_buff *skb, __u8 ttl, __u8 proto)
{
	if (ttl <= 1)
		return DROP_TTL + 1;
	__u16 old_word = bpf_htons((__u16)ttl << 8 | proto);
	__u16 new_word = bpf_htons((__u16)(ttl - 1) << 8 | proto);
	__u8 new_ttl = ttl - 1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_word, new_word, sizeof(new_word)) ||
	    bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, sizeof(new_ttl), 0))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one address of the IP header (`dst`: the destination, else the source) with the IP
// checksum and, with `l4`, the UDP checksum's pseudo header (a zero UDP checksum stays zero; a
// later fragment has no UDP header: its first fragment carried the checksum, updated for the
// whole datagram). Returns 0, or a drop reason + 1.
static __always_inline int set_addr(struct __sk_buff *skb, int dst, __u32 old_addr, __u32 new_addr,
				    int l4)
{
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
	    bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_addr, sizeof(new_addr), 0))
		return DROP_REWRITE + 1;
	if (l4 && bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_addr, new_addr,
				      BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_addr)))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one UDP port (`dst`: the destination, else the source) with the UDP checksum.
static __always_inline int set_port(struct __sk_buff *skb, int dst, __u16 old_port, __u16 new_port)
{
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, old_port, new_port,
				BPF_F_MARK_MANGLED_0 | sizeof(new_port)) ||
	    bpf_skb_store_bytes(skb, dst ? UDP_DPORT_OFF : UDP_SPORT_OFF, &new_port, sizeof(new_port),
				0))
		return DROP_REWRITE + 1;
	return 0;
}

// A 32-bit one's-complement sum (as bpf_csum_diff gives it) folded to 16 bits.
static __always_inline __u16 fold(__u64 sum)
{
	__u32 c = (__u32)sum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

// One's-complement addition of two 32-bit partial sums (as the kernel's checksum helpers take
// them), for updating checksums by what changed (RFC 1624).
static __always_inline __u32 csum_add(__u32 a, __u32 b)
{
	__u32 s = a + b;
	return s + (s < a);
}

// The partial sum `diff` with a field's change from `from` to `to` added (a 16-bit field
// zero-extended, as the helpers take it).
static __always_inline __u32 csum_change(__u32 diff, __u32 from, __u32 to)
{
	return csum_add(csum_add(diff, ~from), to);
}

// Whether a checksum difference changes nothing (zero in one's complement has two forms): the
// helper call that would apply it is skipped. Each costs about a sixth of the program's time,
// and a datagram to a backend on the listener's own address changes no address.
static __always_inline int csum_unchanged(__u32 diff)
{
	return diff == 0 || diff == 0xffffffff;
}

// Both ends of a datagram before and after a rewrite (an end kept: the same old and new).
struct ends {
	__u32 saddr, new_saddr, daddr, new_daddr;
	__u16 sport, new_sport, dport, new_dport;
};

// Rewrites the datagram's ends in place, one taken from the TTL: the IP header written
// directly, its checksum computed from what changed; the UDP checksum updated by the kernel's
// helper, which knows how the packet holds it (a checksum still to be completed, as on
// loopback and veth, changes with the addresses alone; a zero checksum stays zero). Two helper
// calls at most, where one field at a time took seven. Returns 0, a drop reason + 1, or -1
// when the headers are not in the packet's linear data (nothing written).
static __always_inline int rewrite_in_place(struct __sk_buff *skb, const struct ends *e, __u8 ttl)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return -1;
	if (ttl <= 1)
		return DROP_TTL + 1;
	__u32 addrs = csum_change(csum_change(0, e->saddr, e->new_saddr), e->daddr, e->new_daddr);
	__u32 ip_diff = csum_change(addrs, bpf_htons((__u16)ttl << 8 | IPPROTO_UDP),
				    bpf_htons((__u16)(ttl - 1) << 8 | IPPROTO_UDP));
	ip->check = ~fold(csum_add(ip_diff, (__u16)~ip->check));
	ip->ttl = ttl - 1;
	ip->saddr = e->new_saddr;
	ip->daddr = e->new_daddr;
	udp->source = e->new_sport;
	udp->dest = e->new_dport;
	if (!csum_unchanged(addrs) && bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, addrs,
							 BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return DROP_REWRITE + 1;
	if (e->sport == e->new_sport && e->dport == e->new_dport)
		return 0;
	__u32 ports = csum_change(csum_change(0, e->sport, e->new_sport), e->dport, e->new_dport);
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, ports, BPF_F_MARK_MANGLED_0))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites the datagram's ends (`e`), checksums updated incrementally, one taken from the
// TTL: in place, or field by field through the helpers when its headers are not in the linear
// data. Returns 0, or a drop reason + 1.
static __always_inline int rewrite(struct __sk_buff *skb, const struct ends *e, __u8 ttl)
{
	int why = rewrite_in_place(skb, e, ttl);
	if (why >= 0)
		return why;
	why = take_ttl(skb, ttl, IPPROTO_UDP);
	if (!why && e->saddr != e->new_saddr)
		why = set_addr(skb, 0, e->saddr, e->new_saddr, 1);
	if (!why && e->sport != e->new_sport)
		why = set_port(skb, 0, e->sport, e->new_sport);
	if (!why && e->daddr != e->new_daddr)
		why = set_addr(skb, 1, e->daddr, e->new_daddr, 1);
	if (!why && e->dport != e->new_dport)
		why = set_port(skb, 1, e->dport, e->new_dport);
	return why;
}

// The route from `src` to `dst` (into `fib`): BPF_FIB_LKUP_RET_NOT_FWDED when `dst` is this
// host's own.
static __always_inline int route_with(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				      __u32 src, __u32 dst, __u16 tot_len, __u32 flags)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = skb->ingress_ifindex;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), flags);
}

static __always_inline int route(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __u32 src,
				 __u32 dst, __u16 tot_len)
{
	return route_with(skb, fib, src, dst, tot_len, 0);
}

// Whether the route `rc` is for the stack to follow: to this host itself, or from an
// interface that does not forward (net.ipv4.ip_forward=0: the lookup cannot tell local from
// not, and the stack delivers what is local and drops the rest, as the host's policy says).
static __always_inline int to_the_stack(int rc)
{
	return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

// Whether a packet from `backend` (to `to`) came in where the backend is: the interface the
// route to it goes out of. A packet that claims a backend's address but arrives from
// elsewhere (the clients' side) is forged: rewritten, it would leave from the listener's
// address to anywhere. Loopback and routes the lookup cannot follow are trusted (the stack's
// own checks apply to them).
static __always_inline int from_the_backend_side(struct __sk_buff *skb, __u32 backend, __u32 to,
						 __u16 tot_len)
{
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	struct bpf_fib_lookup back;
	int rc = route(skb, &back, to, backend, tot_len);
	return (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	       back.ifindex == skb->ingress_ifindex;
}

// Sends the rewritten datagram by the route `rc`/`fib` found: out of its interface with the
// next hop's MAC address (or the kernel's neighbour resolution when it has none yet).
static __always_inline int send_by(struct __sk_buff *skb, int rc, struct bpf_fib_lookup *fib)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0)) {
			count_drop(DROP_REWRITE);
			return TC_ACT_SHOT;
		}
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib->ifindex, 0, 0, 0);
	count_drop(DROP_FIB);
	return TC_ACT_SHOT;
}

// Hands a rewritten datagram for this host to the stack through loopback: arrived on another
// interface, a packet from one of this host's addresses (the listener's, a masquerade
// address) would be dropped as a martian.
static __always_inline int to_loopback(struct __sk_buff *skb)
{
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return TC_ACT_OK;
	__u8 lo_mac[ETH_ALEN] = {}; // loopback's: the packet is for this host
	if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0)) {
		count_drop(DROP_REWRITE);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

static __always_inline void count(__u32 backend, __u64 bytes, int reply)
{
	struct counters *c = bpf_map_lookup_elem(&counters, &backend);
	if (!c)
		return;
	if (reply) {
		c->reply_packets += 1;
		c->reply_bytes += bytes;
	} else {
		c->packets += 1;
		c->bytes += bytes;
	}
}

// ICMP's header (linux/icmp.h would pull in the C library's headers).
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 rest;
};
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11

// Where an ICMP error about a forwarded datagram sits: the outer ICMP header, then the
// datagram's IP header (20 bytes: the program forwards no other) and its UDP header.
#define ICMP_OFF (IP_OFF + sizeof(struct iphdr))
#define ICMP_CSUM_OFF (ICMP_OFF + offsetof(struct icmphdr, checksum))
#define INNER_IP_OFF (ICMP_OFF + sizeof(struct icmphdr))
#define INNER_CSUM_OFF (INNER_IP_OFF + offsetof(struct iphdr, check))
#define INNER_SRC_OFF (INNER_IP_OFF + offsetof(struct iphdr, saddr))
#define INNER_DST_OFF (INNER_IP_OFF + offsetof(struct iphdr, daddr))
#define INNER_SPORT_OFF (INNER_IP_OFF + sizeof(struct iphdr) + offsetof(struct udphdr, source))
#define INNER_DPORT_OFF (INNER_IP_OFF + sizeof(struct iphdr) + offsetof(struct udphdr, dest))

// Rewrites one end of the datagram an ICMP error quotes (`dst`: its destination, else its
// source): the address with the quoted IP checksum, the port, and the ICMP checksum for both
// (the quoted IP checksum's change is added once all are made). Returns nonzero on failure.
static __always_inline int set_quoted(struct __sk_buff *skb, int dst, __u32 old_addr,
				      __u32 new_addr, __u16 old_port, __u16 new_port)
{
	return bpf_l3_csum_replace(skb, INNER_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
	       bpf_skb_store_bytes(skb, dst ? INNER_DST_OFF : INNER_SRC_OFF, &new_addr,
				   sizeof(new_addr), 0) ||
	       bpf_skb_store_bytes(skb, dst ? INNER_DPORT_OFF : INNER_SPORT_OFF, &new_port,
				   sizeof(new_port), 0) ||
	       bpf_l4_csum_replace(skb, ICMP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) ||
	       bpf_l4_csum_replace(skb, ICMP_CSUM_OFF, old_port, new_port, sizeof(new_port));
}

// After `set_quoted`: the quoted IP header's checksum (`old` before) changed too, and the ICMP
// checksum covers it. Returns nonzero on failure.
static __always_inline int carry_quoted_checksum(struct __sk_buff *skb, __u16 old)
{
	__u16 now;
	return bpf_skb_load_bytes(skb, INNER_CSUM_OFF, &now, sizeof(now)) ||
	       bpf_l4_csum_replace(skb, ICMP_CSUM_OFF, old, now, sizeof(now));
}

// An ICMP error a backend (or a router on the way) sent about a datagram this program
// forwarded (destination unreachable: a closed port, fragmentation needed; time exceeded): it
// names the backend, which the client never sent to. Translated as the client expects it,
// from the listener's address about a datagram to the listener (outer source, inner
// destination and port, with the inner IP checksum and the ICMP checksum updated; after a
// masquerade, the outer destination and the inner source too), and sent on to the client.
// Anything else ICMP is left to the stack.
static __always_inline int icmp_error(struct __sk_buff *skb, struct iphdr *ip, void *end)
{
	struct icmphdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end)
		return PASS_ON;
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
		return PASS_ON;
	struct iphdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > end || inner->ihl != 5 || inner->protocol != IPPROTO_UDP)
		return PASS_ON;
	struct udphdr *iudp = (void *)(inner + 1);
	if ((void *)(iudp + 1) > end)
		return PASS_ON;
	// The datagram went from the client (or a masquerade address: the error's destination)
	// to a backend.
	if (inner->saddr != ip->daddr)
		return PASS_ON;
	struct reply_key rk = {.addr = inner->daddr, .port = iudp->dest};
	struct reply *r = bpf_map_lookup_elem(&replies, &rk);
	if (!r)
		return PASS_ON;
	__u32 outer_src = ip->saddr, client = ip->daddr, backend = inner->daddr;
	__u32 vip = r->service_addr, local = ip->daddr;
	__u16 bport = iudp->dest, vport = r->service_port, lport = iudp->source, cport = lport;
	int masqueraded = r->flags & BACKEND_MASQUERADE;
	if (masqueraded) {
		struct masq_key mk = {.backend_addr = backend, .backend_port = bport, .port = lport};
		struct masq *m = bpf_map_lookup_elem(&masq, &mk);
		if (!m || m->local_addr != local)
			return PASS_ON;
		client = m->client_addr;
		cport = m->client_port;
		vip = m->service_addr; // the address the client sent to (a wildcard listener's too)
	} else if (!vip) {
		// A wildcard listener's: the address its client sent to, from the flow.
		struct flow_key fk = {.client_addr = client, .client_port = cport, .service_port = vport};
		vip = wildcard_flow_addr(&fk, backend, bport);
		if (!vip)
			return PASS_ON;
	}
	__u16 old_inner_csum = inner->check;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	__u8 ttl = ip->ttl;
	// From the backends' side (the backend, or a router on the way to it), or forged.
	if (!from_the_backend_side(skb, backend, client, tot_len)) {
		count_drop(PASS_FORGED);
		return PASS_ON;
	}
	struct bpf_fib_lookup fib;
	int rc = route(skb, &fib, vip, client, tot_len);
	if (to_the_stack(rc))
		return PASS_ON;
	// The quoted datagram: its destination (and source) and port(s), its IP checksum; the ICMP
	// checksum covers them all.
	if (set_quoted(skb, 1, backend, vip, bport, vport) ||
	    (masqueraded && set_quoted(skb, 0, local, client, lport, cport)))
		goto shot;
	if (carry_quoted_checksum(skb, old_inner_csum))
		goto shot;
	// The error itself comes from the listener's address (to the client).
	int why = take_ttl(skb, ttl, IPPROTO_ICMP);
	if (!why)
		why = set_addr(skb, 0, outer_src, vip, 0);
	if (!why && masqueraded)
		why = set_addr(skb, 1, local, client, 0);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	__u32 b = r->backend;
	struct counters *c = bpf_map_lookup_elem(&counters, &b);
	if (c)
		c->icmp_errors += 1;
	return send_by(skb, rc, &fib);
shot:
	count_drop(DROP_REWRITE);
	return TC_ACT_SHOT;
}

// The IP checksum of a 20-byte header (its checksum field zero).
static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	return ~fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

// Path MTU discovery: the datagram (DF set) will not fit the route onward (or, for direct
// server return, will not once encapsulated), so its sender is told, as a router would: ICMP
// fragmentation needed to `to`, from `from`, with the MTU it must keep to and the datagram's
// IP header and first 8 bytes quoted (the packet is cut down and turned into that error in
// place).
static __always_inline int frag_needed(struct __sk_buff *skb, __u32 to, __u32 from, __u16 mtu)
{
	const __u32 quoted = sizeof(struct iphdr) + 8;
	const __u32 head = sizeof(struct iphdr) + sizeof(struct icmphdr);
	__u8 quote[sizeof(struct iphdr) + 8];
	if (bpf_skb_load_bytes(skb, IP_OFF, quote, quoted) ||
	    bpf_skb_adjust_room(skb, head, BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_change_tail(skb, ETH_HLEN + head + quoted, 0))
		return -1;
	struct icmphdr icmp = {.type = ICMP_DEST_UNREACH, .code = 4, .rest = bpf_htonl(mtu)};
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)quote, quoted, (__u32)sum);
	icmp.checksum = ~fold(sum);
	struct iphdr ip = {
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(head + quoted),
		.ttl = 64,
		.protocol = IPPROTO_ICMP,
		.saddr = from,
		.daddr = to,
	};
	ip.check = ip_checksum(&ip);
	if (bpf_skb_store_bytes(skb, IP_OFF, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ICMP_OFF, &icmp, sizeof(icmp), 0))
		return -1;
	struct bpf_fib_lookup fib;
	int rc = route(skb, &fib, from, to, head + quoted);
	if (to_the_stack(rc))
		return to_loopback(skb);
	return send_by(skb, rc, &fib);
}

// A rewritten datagram the program does not send itself: one for this host, or one too big
// for its route without DF (`rc` BPF_FIB_LKUP_RET_FRAG_NEEDED), handed to the stack through
// loopback, which forwards it fragmented as a router would (its source may be this host's
// own address, which loopback takes: net.ipv4.conf.lo.accept_local).
static __always_inline int oversize_or_local(struct __sk_buff *skb, int rc)
{
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		count_drop(PASS_OVERSIZE);
	return to_loopback(skb);
}

// A datagram too big for the route found (BPF_FIB_LKUP_RET_FRAG_NEEDED, `fib` holding its
// MTU): dropped and counted; when `df`, its `sender` is told as a router would (ICMP
// fragmentation needed, from `from`, the MTU less the `overhead` the program adds), so that
// it sends smaller. (One without DF is rewritten as any other and handed to the stack, which
// fragments it: `oversize_or_local`; for direct server return, `mark_for_cut`.)
static __always_inline int too_big(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int df,
				   __u32 sender, __u32 from, __u16 overhead)
{
	count_drop(DROP_TOO_BIG);
	__u16 mtu = fib->mtu_result;
	if (!df || mtu <= 68 + overhead)
		return TC_ACT_SHOT;
	int sent = frag_needed(skb, sender, from, mtu - overhead);
	return sent < 0 ? TC_ACT_SHOT : sent;
}

// Masquerade: the balancer's port (network order) for the client's datagrams to a backend,
// coming from `local`; 0 when every port tried is another client's. A client finds its own
// port again at the first try unless another client took that one first.
static __always_inline __u16 masquerade_port(const struct service *svc, __u32 client, __u16 cport,
					     __u32 vip, __u16 vport, __u32 backend, __u16 bport,
					     __u32 local, __u64 now)
{
	__u32 n = svc->port_count;
	if (n == 0)
		return 0;
	__u32 h = (__u32)placement_hash(client, (client >> 16) | ((__u32)cport << 16), 6);
	struct masq_key k = {.backend_addr = backend, .backend_port = bport};
	for (__u32 i = 0; i < MASQ_PROBES; i++) {
		__u16 port = bpf_htons(svc->port_base + (__u16)((h + i * 40503u) % n));
		k.port = port;
		struct masq *m = bpf_map_lookup_elem(&masq, &k);
		if (m && m->client_addr == client && m->client_port == cport &&
		    m->service_addr == vip && m->service_port == vport) {
			if (now - m->last_ns > REFRESH_NS)
				m->last_ns = now;
			if (m->local_addr != local)
				m->local_addr = local; // the route to the backend changed
			return port;
		}
		if (m && now - m->last_ns <= svc->idle_ns)
			continue; // another client's
		struct masq v = {.client_addr = client,
				 .local_addr = local,
				 .service_addr = vip,
				 .client_port = cport,
				 .service_port = vport,
				 .last_ns = now};
		// Free (or idle): taken, unless another CPU took it just now.
		if (bpf_map_update_elem(&masq, &k, &v, m ? BPF_EXIST : BPF_NOEXIST) == 0)
			return port;
	}
	return 0;
}

// Masquerade: sends the client's datagram to backend `to_addr`:`to_port` from a balancer
// address (the route's source; a backend on this host: its own address, through loopback)
// and a port of the pool's range.
static __always_inline int masquerade(struct __sk_buff *skb, const struct service *svc,
				      __u32 saddr, __u16 sport, __u32 daddr, __u16 dport,
				      __u32 to_addr, __u16 to_port, __u32 b, __u16 bflags, __u8 ttl,
				      __u16 tot_len, struct fragment_key *frk, int first_of_more,
				      __u64 now, int df)
{
	struct bpf_fib_lookup fib = {};
	int rc = BPF_FIB_LKUP_RET_NOT_FWDED;
	if (!(bflags & BACKEND_LOCAL))
		rc = route_with(skb, &fib, 0, to_addr, tot_len, BPF_FIB_LOOKUP_SRC);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		if (df)
			return too_big(skb, &fib, df, saddr, daddr, 0);
		// Fragmented by the stack: the route's source all the same (asked for a length
		// that fits).
		int fits = route_with(skb, &fib, 0, to_addr,
				      sizeof(struct iphdr) + sizeof(struct udphdr), BPF_FIB_LOOKUP_SRC);
		if (fits == BPF_FIB_LKUP_RET_SUCCESS || fits == BPF_FIB_LKUP_RET_NO_NEIGH)
			rc = BPF_FIB_LKUP_RET_FRAG_NEEDED;
		else
			rc = fits;
	}
	int oversize = rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
	int local = rc == BPF_FIB_LKUP_RET_NOT_FWDED;
	__u32 from = local ? to_addr : fib.ipv4_src;
	if (!local && ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH &&
			!oversize) ||
		       !from)) {
		count_drop(DROP_FIB);
		return TC_ACT_SHOT;
	}
	__u16 port = masquerade_port(svc, saddr, sport, daddr, dport, to_addr, to_port, from, now);
	if (!port) {
		count_drop(DROP_NO_PORT);
		return TC_ACT_SHOT;
	}
	if (first_of_more) {
		struct fragment fr = {.saddr = from, .daddr = to_addr, .backend = b};
		bpf_map_update_elem(&fragments, frk, &fr, BPF_ANY);
	}
	struct ends e = {.saddr = saddr,
			 .new_saddr = from,
			 .sport = sport,
			 .new_sport = port,
			 .daddr = daddr,
			 .new_daddr = to_addr,
			 .dport = dport,
			 .new_dport = to_port};
	int why = rewrite(skb, &e, ttl);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 0);
	if (local || oversize)
		return oversize_or_local(skb, rc);
	return send_by(skb, rc, &fib);
}

// Masquerade: a backend's reply to one of the balancer's masquerade ports goes to the client
// whose port it is, from the listener's address. Anything else from the backend (to udplb's
// health checks, say) is left to the stack.
static __always_inline int masquerade_reply(struct __sk_buff *skb, const struct reply *r,
					    __u32 saddr, __u16 sport, __u32 daddr, __u16 dport,
					    __u8 ttl, __u16 tot_len, struct fragment_key *frk,
					    int first_of_more, int df, __u32 payload)
{
	struct masq_key mk = {.backend_addr = saddr, .backend_port = sport, .port = dport};
	struct masq *m = bpf_map_lookup_elem(&masq, &mk);
	if (!m || m->local_addr != daddr)
		return PASS_ON;
	__u32 client = m->client_addr, vip = m->service_addr, b = r->backend;
	__u16 cport = m->client_port, vport = m->service_port;
	if (r->reply_ratio) {
		struct flow_key fk = {.client_addr = client,
				      .service_addr = vip,
				      .client_port = cport,
				      .service_port = vport};
		if (!within_reply_ratio(&fk, !r->service_addr, r->reply_ratio, payload))
			return beyond_reply_ratio(frk, first_of_more);
	}
	struct bpf_fib_lookup fib;
	int rc = route(skb, &fib, vip, client, tot_len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && df)
		return too_big(skb, &fib, df, saddr, daddr, 0);
	if (first_of_more) {
		struct fragment fr = {
			.saddr = vip, .daddr = client, .backend = b, .flags = FRAGMENT_REPLY};
		bpf_map_update_elem(&fragments, frk, &fr, BPF_ANY);
	}
	struct ends e = {.saddr = saddr,
			 .new_saddr = vip,
			 .sport = sport,
			 .new_sport = vport,
			 .daddr = daddr,
			 .new_daddr = client,
			 .dport = dport,
			 .new_dport = cport};
	int why = rewrite(skb, &e, ttl);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 1);
	if (to_the_stack(rc) || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return oversize_or_local(skb, rc); // fragmented, or a client on this host
	return send_by(skb, rc, &fib);
}

// Direct server return of a UDP datagram (or fragment) without DF that will not fit the
// route once encapsulated is fragmented first, as a router fragments what it puts into a
// tunnel (RFC 2003, 5.1), and the backend's stack reassembles it once the outer header is off
// (`udplb decap` and the ipip module alike). A program cannot make a packet into two, so
// `mark_for_cut` sends it back in at its interface twice, marked (skb->mark) with where to
// cut and which part to keep: the dispatcher makes each copy into its fragment
// (`cut_marked`), and both then follow the backend recorded for the datagram's fragments. The
// mark: CUT_TAG ("ud"), CUT_HEAD for the part before the cut, the cut in 8-byte units below;
// CUT_TAG alone once cut. (A packet's own mark is not kept through a cut.)
#define CUT_TAG 0x75640000u
#define CUT_TAG_MASK 0xffffc000u
#define CUT_HEAD 0x2000u
#define CUT_UNITS 0x1fffu
// bpf_skb_adjust_room takes at most this many bytes off at once.
#define CUT_MAX 0xff8u
// A datagram whose UDP checksum must be completed before it is cut is summed in chunks of
// this many bytes, at most SUM_CHUNKS of them.
#define SUM_CHUNK 512
#define SUM_CHUNKS 16
// Past where a UDP checksum the hardware is to finish starts: the IP and UDP headers and 8
// bytes (see `no_longer_partial`).
#define PAST_SUM_START (sizeof(struct iphdr) + sizeof(struct udphdr) + 8)

// `cut_marked`'s room (the program's stack is too small for it).
struct cut_scratch {
	__u8 chunk[SUM_CHUNK];
	__u8 head[PAST_SUM_START];
	__u32 pseudo[3];
	struct iphdr ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cut_scratch);
} cut_scratch SEC(".maps");

// The one's-complement sum (unfolded, as bpf_csum_diff gives it) of `len` bytes of the packet
// from `off` on top of `sum`, the last chunk padded with zeros; -1 when they cannot be read
// or are more than SUM_CHUNKS chunks.
static __always_inline __s64 sum_bytes(struct __sk_buff *skb, struct cut_scratch *room,
				       __u32 off, __u32 len, __s64 sum)
{
	for (int i = 0; i < SUM_CHUNKS && len && sum >= 0; i++) {
		__u32 n = len < SUM_CHUNK ? len : SUM_CHUNK;
		n = ((n - 1) & (SUM_CHUNK - 1)) + 1; // 1 to SUM_CHUNK, as the verifier must see
		__u32 padded = (n + 3) & ~3u;
		if (padded > SUM_CHUNK)
			return -1;
		*(__u32 *)&room->chunk[(padded - 4) & (SUM_CHUNK - 4)] = 0;
		if (bpf_skb_load_bytes(skb, off, room->chunk, n))
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)room->chunk, padded, (__u32)sum);
		off += n;
		len -= n;
	}
	return len ? -1 : sum;
}

// Takes the skb out of CHECKSUM_PARTIAL (the hardware or the stack to finish the UDP sum
// from the UDP header on): bytes from the IP header to past that start are taken off and put
// back, which the kernel takes as the end of the partial sum (skb_postpull_rcsum).
static __always_inline int no_longer_partial(struct __sk_buff *skb, struct cut_scratch *room)
{
	if (bpf_skb_load_bytes(skb, IP_OFF, room->head, PAST_SUM_START) ||
	    bpf_skb_adjust_room(skb, -(__s32)PAST_SUM_START, BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_adjust_room(skb, PAST_SUM_START, BPF_ADJ_ROOM_MAC, 0))
		return -1;
	return bpf_skb_store_bytes(skb, IP_OFF, room->head, PAST_SUM_START, 0) ? -1 : 0;
}

// Before a whole datagram is cut into fragments its UDP checksum must be whole too. A sender
// may have left it to the hardware (a local or container client, over loopback or veth:
// the field holds the pseudo header's sum only, the skb is CHECKSUM_PARTIAL), and once cut,
// neither a NIC nor the stack can finish it (it covers every fragment). Then it is summed
// here, written, and the skb no longer marked partial. A field that is not the pseudo
// header's sum is taken as whole without summing (a damaged one stays damaged: the backend
// drops the datagram, as it would without udplb). Returns 0, or -1 when it cannot be done.
static __always_inline int complete_udp_checksum(struct __sk_buff *skb, struct cut_scratch *room)
{
	struct iphdr *ip = &room->ip;
	__u16 udp_len = bpf_ntohs(ip->tot_len) - sizeof(*ip);
	__u16 field;
	if (bpf_skb_load_bytes(skb, UDP_CSUM_OFF, &field, sizeof(field)))
		return -1;
	if (!field)
		return 0; // no checksum (IPv4 allows it): nothing to keep
	room->pseudo[0] = ip->saddr;
	room->pseudo[1] = ip->daddr;
	room->pseudo[2] = bpf_htonl((IPPROTO_UDP << 16) | udp_len);
	__s64 pseudo = bpf_csum_diff(0, 0, (__be32 *)room->pseudo, sizeof(room->pseudo), 0);
	if (pseudo < 0)
		return -1;
	if (field != fold(pseudo))
		return 0; // not the pseudo header's sum alone: whole (or damaged), nothing to sum
	__s64 sum = sum_bytes(skb, room, UDP_OFF, udp_len, pseudo);
	if (sum < 0)
		return -1;
	if (fold(sum) == 0xffff)
		return 0; // whole after all (1 in 65,536 equals that sum)
	__u16 whole = ~fold((__u32)fold(sum) + (__u16)~field);
	if (!whole)
		whole = 0xffff;
	if (bpf_skb_store_bytes(skb, UDP_CSUM_OFF, &whole, sizeof(whole), 0))
		return -1;
	return no_longer_partial(skb, room);
}

// The datagram (or fragment) `mark_for_cut` sent back in, made into its part: before the cut
// (the checksum of a whole datagram completed first; cut down, more fragments to follow), or
// after it (the bytes before the cut taken off, the offset moved on). Marked CUT_TAG, it then
// follows its datagram's backend as a fragment (`ingress4`). Returns a verdict when it cannot
// be cut (dropped, counted), -1 to go on.
static __noinline int cut_marked(struct __sk_buff *skb)
{
	__u32 mark = skb->mark, units = mark & CUT_UNITS, cut = units * 8;
	__u32 zero = 0;
	struct cut_scratch *room = bpf_map_lookup_elem(&cut_scratch, &zero);
	if (!room)
		goto fail;
	struct iphdr *ip = &room->ip;
	if (!units || cut > CUT_MAX || bpf_skb_load_bytes(skb, IP_OFF, ip, sizeof(*ip)) ||
	    ip->ihl != 5)
		goto fail;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (tot_len <= sizeof(*ip) + cut || (frag & 0x1fff) + units > 0x1fff)
		goto fail;
	if (mark & CUT_HEAD) {
		// A fragment's checksum is never the hardware's to finish: the stack finished it
		// to fragment.
		if (!(frag & 0x3fff) && (tot_len < PAST_SUM_START || complete_udp_checksum(skb, room)))
			goto fail;
		ip->frag_off = bpf_htons((frag & 0x1fff) | 0x2000); // where it was, more to follow
		ip->tot_len = bpf_htons(sizeof(*ip) + cut);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(*ip) + cut, 0))
			goto fail;
	} else {
		if (bpf_skb_adjust_room(skb, -(__s32)cut, BPF_ADJ_ROOM_NET, 0))
			goto fail;
		ip->frag_off = bpf_htons((frag & 0x2000) | ((frag & 0x1fff) + units));
		ip->tot_len = bpf_htons(tot_len - cut);
	}
	ip->check = 0;
	ip->check = ip_checksum(ip);
	if (bpf_skb_store_bytes(skb, IP_OFF, ip, sizeof(*ip), 0))
		goto fail;
	skb->mark = CUT_TAG;
	return -1;
fail:
	skb->mark = 0;
	count_drop(DROP_REWRITE);
	return TC_ACT_SHOT;
}

// Sends a UDP datagram without DF that would not fit once encapsulated (only `fits` bytes of
// it would) to `to_addr` (backend `b`, GUE ports `gue`) back in twice, to be cut into two
// fragments (see CUT_TAG): the fragments' backend recorded, a copy marked for the part after
// the cut, the datagram itself for the part before. Returns the verdict, or -1 when it cannot
// be cut.
static __noinline int mark_for_cut(struct __sk_buff *skb, __u32 fits, __u32 to_addr, __u32 b,
				   __u32 gue)
{
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = (void *)(long)skb->data + ETH_HLEN;
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    fits < sizeof(struct iphdr) + 8 || fits > 0xffff)
		return -1;
	__u32 units = (fits - sizeof(struct iphdr)) / 8;
	if (units > CUT_MAX / 8)
		units = CUT_MAX / 8;
	if (bpf_ntohs(ip->tot_len) <= sizeof(*ip) + units * 8 ||
	    (bpf_ntohs(ip->frag_off) & 0x1fff) + units > 0x1fff)
		return -1;
	struct fragment_key frk = {.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id};
	struct fragment fr = {.gue = gue, .daddr = to_addr, .backend = b, .flags = FRAGMENT_ENCAP};
	if (bpf_map_update_elem(&fragments, &frk, &fr, BPF_ANY))
		return -1;
	skb->mark = CUT_TAG | units;
	if (bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS)) {
		skb->mark = 0;
		return -1;
	}
	skb->mark = CUT_TAG | CUT_HEAD | units;
	count_drop(CUT_FOR_TUNNEL);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

// GUE (variant 1: the IP packet right after the UDP header, as the kernel's fou takes it)
// for client `client`:`cport` of `svc`, its ports as one word for `encapsulate` (destination
// in the upper half, source in the lower, network order), or 0 when the service encapsulates
// IP in IP. The source port, one of 49152-65535, is chosen by the client's address and port:
// a backend's NIC spreads the flows over its queues (RSS) as it would the clients' own, and
// every datagram of a flow takes the same one.
static __always_inline __u32 gue_ports(const struct service *svc, __u32 client, __u16 cport)
{
	if (!(svc->flags & SERVICE_GUE))
		return 0;
	__u32 h = (client ^ ((__u32)cport << 16) ^ cport) * 0x9e3779b1;
	__u16 sport = 0xc000 | (h >> 18);
	return (__u32)bpf_htons(svc->port_base) << 16 | bpf_htons(sport);
}

struct outer_header {
	struct iphdr ip;
	struct udphdr udp; // GUE only
};

// Direct server return: the datagram, untouched, inside an IP header from the route's source
// address to backend `to_addr` (IP in IP, as LVS-TUN), or inside an IP and a UDP header when
// `gue` (`gue_ports`; GUE, as katran), sent by the route. The backend takes the headers off
// and answers the client from the listener's address itself. One that would exceed the
// route's MTU once encapsulated is, with DF, dropped (`too_big`) and its client told the MTU
// less what encapsulation adds; without DF, cut into fragments that fit (`mark_for_cut`).
static __always_inline int encapsulate(struct __sk_buff *skb, __u32 to_addr, __u32 b, __u16 tot_len,
				       __u8 tos, __u32 client, __u32 vip, int dont_fragment,
				       __u32 gue)
{
	struct bpf_fib_lookup fib;
	__u16 overhead = sizeof(struct iphdr) + (gue ? sizeof(struct udphdr) : 0);
	__u16 outer_len = tot_len + overhead;
	int rc = route_with(skb, &fib, 0, to_addr, outer_len, BPF_FIB_LOOKUP_SRC);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && !dont_fragment && fib.mtu_result > overhead) {
		int verdict = mark_for_cut(skb, fib.mtu_result - overhead, to_addr, b, gue);
		if (verdict >= 0)
			return verdict;
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big(skb, &fib, dont_fragment, client, vip, overhead);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) || !fib.ipv4_src) {
		count_drop(DROP_FIB);
		return TC_ACT_SHOT;
	}
	struct outer_header outer = {
		.ip =
			{
				.version = 4,
				.ihl = 5,
				.tos = tos,
				.tot_len = bpf_htons(outer_len),
				.frag_off = bpf_htons(0x4000), // DF: never fragmented on the way
				.ttl = 64,
				.protocol = gue ? IPPROTO_UDP : IPPROTO_IPIP,
				.saddr = fib.ipv4_src,
				.daddr = to_addr,
			},
		// Checksum 0: none (the datagram inside has its own).
		.udp = {.source = gue & 0xffff,
			.dest = gue >> 16,
			.len = bpf_htons(tot_len + sizeof(struct udphdr))},
	};
	outer.ip.check = ip_checksum(&outer.ip);
	int failed = gue ? bpf_skb_adjust_room(skb, sizeof(outer), BPF_ADJ_ROOM_MAC,
					       BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
						       BPF_F_ADJ_ROOM_ENCAP_L4_UDP) ||
				   bpf_skb_store_bytes(skb, IP_OFF, &outer, sizeof(outer), 0)
			 : bpf_skb_adjust_room(skb, sizeof(outer.ip), BPF_ADJ_ROOM_MAC,
					       BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) ||
				   bpf_skb_store_bytes(skb, IP_OFF, &outer.ip, sizeof(outer.ip), 0);
	if (failed) {
		count_drop(DROP_REWRITE);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 0);
	return send_by(skb, rc, &fib);
}

#define NOT_COUNTED (MAX_SERVICES * MAX_BACKENDS) // a backend index no counter has

// Masquerade: the balancer's port (network order) and address the client's datagrams to a
// backend come from, if it has one (as `masquerade_port` finds it, without taking one).
static __always_inline __u16 masquerade_port_of(const struct service *svc, __u32 client,
						__u16 cport, __u32 vip, __u16 vport, __u32 backend,
						__u16 bport, __u32 *local)
{
	__u32 n = svc->port_count;
	if (n == 0)
		return 0;
	__u32 h = (__u32)placement_hash(client, (client >> 16) | ((__u32)cport << 16), 6);
	struct masq_key k = {.backend_addr = backend, .backend_port = bport};
	for (__u32 i = 0; i < MASQ_PROBES; i++) {
		k.port = bpf_htons(svc->port_base + (__u16)((h + i * 40503u) % n));
		struct masq *m = bpf_map_lookup_elem(&masq, &k);
		if (m && m->client_addr == client && m->client_port == cport &&
		    m->service_addr == vip && m->service_port == vport) {
			*local = m->local_addr;
			return k.port;
		}
	}
	return 0;
}

// An ICMP error about a reply (a router between the balancer and the client could not pass
// it: fragmentation needed, say), sent to the listener's address the reply came from: handed
// to the backend that sent the reply, so that it learns what a router would have told it
// without a balancer on the way. With nat the error is rewritten to be about the backend's
// own datagram (the outer destination and the quoted source become the backend's); after a
// masquerade, about its datagram to the balancer's address and port (and from that address);
// with dsr it is encapsulated to the backend as it is (the backend sent the reply from the
// listener's address itself). Only for flows the flow map knows (not datagram mode). Returns
// -1 when the packet is not such an error.
static __noinline int icmp_about_reply(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = (void *)(long)skb->data + ETH_HLEN;
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_ICMP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	struct icmphdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end ||
	    (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED))
		return -1;
	struct iphdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > end || inner->ihl != 5 || inner->protocol != IPPROTO_UDP ||
	    inner->saddr != ip->daddr)
		return -1;
	struct udphdr *iudp = (void *)(inner + 1);
	if ((void *)(iudp + 1) > end)
		return -1;
	__u32 vip = inner->saddr, client = inner->daddr, outer_src = ip->saddr;
	__u16 vport = iudp->source, cport = iudp->dest;
	__u16 tot_len = bpf_ntohs(ip->tot_len), old_inner_csum = inner->check;
	__u8 ttl = ip->ttl, tos = ip->tos;
	struct service *svc = service_at(vip, vport, 0);
	if (!svc)
		svc = service_at(vip, vport, 1);
	if (!svc)
		return -1;
	struct flow_key fk = {
		.client_addr = client, .service_addr = vip, .client_port = cport, .service_port = vport};
	struct flow_bucket *bk = flow_bucket(&fk, svc->flags & SERVICE_WILDCARD);
	__u32 backend;
	__u16 bport;
	if (!bk || !find_flow(bk, &fk, &backend, &bport))
		return -1;
	if (svc->flags & SERVICE_DSR)
		return encapsulate(skb, backend, NOT_COUNTED, tot_len, tos, 0, 0, 0,
				   gue_ports(svc, client, cport));
	__u32 local = 0;
	__u16 lport = 0;
	int masqueraded = svc->flags & SERVICE_MASQUERADE;
	if (masqueraded) {
		lport = masquerade_port_of(svc, client, cport, vip, vport, backend, bport, &local);
		if (!lport)
			return -1;
	}
	struct bpf_fib_lookup fib;
	int rc = route(skb, &fib, masqueraded ? local : outer_src, backend, tot_len);
	if (set_quoted(skb, 0, vip, backend, vport, bport) ||
	    (masqueraded && set_quoted(skb, 1, client, local, cport, lport)))
		goto shot;
	if (carry_quoted_checksum(skb, old_inner_csum))
		goto shot;
	int why = take_ttl(skb, ttl, IPPROTO_ICMP);
	if (!why)
		why = set_addr(skb, 1, vip, backend, 0);
	if (!why && masqueraded)
		why = set_addr(skb, 0, outer_src, local, 0);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	if (to_the_stack(rc))
		return masqueraded ? to_loopback(skb) : TC_ACT_OK; // a backend on this host
	return send_by(skb, rc, &fib);
shot:
	count_drop(DROP_REWRITE);
	return TC_ACT_SHOT;
}

#include "ipv6.h"

// An IPv4 packet (its own function: each family's path has the 512 bytes of stack a program
// may use).
static __noinline int ingress4(struct __sk_buff *skb)
{
	// A fragment `cut_marked` made: it follows its datagram's backend.
	int cut = skb->mark == CUT_TAG;
	if (cut)
		skb->mark = 0;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS_ON;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return PASS_ON;
	if (ip->protocol == IPPROTO_ICMP && !(ip->frag_off & bpf_htons(0x3fff)))
		return icmp_error(skb, ip, end);
	if (ip->protocol != IPPROTO_UDP)
		return PASS_ON;
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	__u8 ttl = ip->ttl, tos = ip->tos;
	__u16 frag = bpf_ntohs(ip->frag_off);
	struct fragment_key frk = {.saddr = saddr, .daddr = daddr, .id = ip->id};
	if ((frag & 0x1fff) || cut) {
		// A later fragment (or one cut here): where its first one went.
		struct fragment *fr = bpf_map_lookup_elem(&fragments, &frk);
		if (!fr) {
			count_drop(PASS_FRAGMENT);
			return PASS_ON;
		}
		if (fr->flags & FRAGMENT_DROP)
			return TC_ACT_SHOT; // its first fragment was (counted as such)
		__u32 new_saddr = fr->saddr, new_daddr = fr->daddr, b = fr->backend;
		int reply = fr->flags & FRAGMENT_REPLY;
		if (fr->flags & FRAGMENT_ENCAP)
			return encapsulate(skb, new_daddr, b, tot_len, tos, saddr, daddr, 0, fr->gue);
		struct bpf_fib_lookup fib;
		int rc = route(skb, &fib, new_saddr ? new_saddr : saddr,
			       new_daddr ? new_daddr : daddr, tot_len);
		// Too big for the route (a fragment has no DF): fragmented further by the stack.
		int why = take_ttl(skb, ttl, IPPROTO_UDP);
		if (!why && new_saddr)
			why = set_addr(skb, 0, saddr, new_saddr, 0);
		if (!why && new_daddr)
			why = set_addr(skb, 1, daddr, new_daddr, 0);
		if (why) {
			count_drop(why - 1);
			return TC_ACT_SHOT;
		}
		count(b, skb->len, reply);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && !new_saddr) {
			count_drop(PASS_OVERSIZE);
			return TC_ACT_OK; // a client's, its source kept: forwarded from here
		}
		if (to_the_stack(rc) || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			return oversize_or_local(skb, rc); // for this host, or fragmented
		return send_by(skb, rc, &fib);
	}
	int first_of_more = frag & 0x2000, df = frag & 0x4000;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return PASS_ON;
	__u16 sport = udp->source, dport = udp->dest;
	__u16 udp_len = bpf_ntohs(udp->len);
	__u32 payload = udp_len > sizeof(*udp) ? udp_len - sizeof(*udp) : 0;

	// A listener's datagram, or a backend's reply; a wildcard listener's datagram is known as
	// such once it is not a reply.
	int to_service = port_may_be(dport, 1);
	struct service *svc = to_service ? service_at(daddr, dport, 0) : 0;
	struct reply *r = 0;
	if (!svc) {
		struct reply_key rk = {.addr = saddr, .port = sport};
		if (port_may_be(sport, 0))
			r = bpf_map_lookup_elem(&replies, &rk);
		if (!r && to_service)
			svc = service_at(daddr, dport, 1);
	}
	if (svc) {
		int wild = svc->flags & SERVICE_WILDCARD;
		// Deny wins; an allow list, when there is one, must name the client.
		struct acl_key ak = {.prefixlen = 64, .service = bpf_htonl(svc->id), .addr = saddr};
		if (((svc->flags & SERVICE_DENY_LIST) && bpf_map_lookup_elem(&acl_deny, &ak)) ||
		    ((svc->flags & SERVICE_ALLOW_LIST) && !bpf_map_lookup_elem(&acl_allow, &ak))) {
			count_drop(DROP_DENIED);
			return TC_ACT_SHOT;
		}
		__u32 b = 0, to_addr = 0;
		__u16 to_port = 0, bflags = 0;
		__u64 now = bpf_ktime_get_ns();
		if (!within_limits(svc, saddr, 0, now)) {
			count_drop(DROP_RATE_LIMITED);
			return TC_ACT_SHOT;
		}
		struct flow_key fk = {.client_addr = saddr,
				      .service_addr = daddr,
				      .client_port = sport,
				      .service_port = dport};
		int datagram = svc->flags & SERVICE_DATAGRAM;
		// The flow's bucket: in datagram mode only a local client's (remembered below).
		struct flow_bucket *bk =
			datagram && skb->ingress_ifindex != LOOPBACK_IFINDEX ? 0 : flow_bucket(&fk, wild);
		__u32 kept_addr = 0;
		__u16 kept_port = 0;
		struct flow_slot *f = bk ? find_flow(bk, &fk, &kept_addr, &kept_port) : 0;
		if (f && !datagram && flow_live(f->last, now, svc->idle_ns)) {
			// Its backend, while it keeps flows and still serves this listener.
			struct reply_key kept = {.addr = kept_addr, .port = kept_port};
			struct reply *held = bpf_map_lookup_elem(&replies, &kept);
			if (held && (held->flags & BACKEND_KEEPS_FLOWS) &&
			    serves(held, svc, daddr, dport)) {
				b = held->backend;
				bflags = held->flags;
				to_addr = kept_addr;
				to_port = kept_port;
				if (f->last != flow_time(now))
					f->last = flow_time(now);
				if (svc->flags & SERVICE_REPLY_RATIO)
					add_bytes(&f->sent, payload);
			}
		}
		int persists = svc->flags & SERVICE_PERSIST;
		if (to_addr && persists)
			remember(svc, &fk, to_addr, to_port, now, 0);
		if (!to_addr) {
			if (!datagram && !within_limits(svc, saddr, 1, now)) {
				count_drop(DROP_FLOW_RATE_LIMITED);
				return TC_ACT_SHOT;
			}
			struct backend peer = {};
			if ((svc->flags & SERVICE_SYNCED) && peer_flow(svc, &fk, now, &peer, &b)) {
				to_addr = peer.addr;
				to_port = peer.port;
				bflags = peer.flags;
			} else if (!persists ||
				   !persisted(svc, &fk, now, &b, &bflags, &to_addr, &to_port)) {
				if (place(svc, client_hash(svc, saddr, sport), &b) < 0) {
					count_drop(DROP_NO_BACKEND);
					return TC_ACT_SHOT;
				}
				struct backend *be = bpf_map_lookup_elem(&backends, &b);
				if (!be || !be->addr) {
					count_drop(DROP_NO_BACKEND);
					return TC_ACT_SHOT;
				}
				to_addr = be->addr;
				to_port = be->port;
				bflags = be->flags;
				if (persists)
					remember(svc, &fk, to_addr, to_port, now, 1);
			}
			if (!datagram) {
				if (bk)
					add_flow(bk, f, &fk, to_addr, to_port, now, payload,
						 svc->idle_ns);
				count_flow(b);
				if (svc->flags & SERVICE_SYNCED)
					tell_peers4(svc->id, saddr, sport, to_addr, to_port);
			} else if (bk && !f)
				// A local client in datagram mode: remembered once (never placed by it),
				// so that its replies, to this host, are known as replies.
				add_flow(bk, 0, &fk, to_addr, to_port, now, payload, svc->idle_ns);
		}
		if (svc->flags & SERVICE_DSR) {
			__u32 gue = gue_ports(svc, saddr, sport);
			if (first_of_more) {
				struct fragment fr = {.gue = gue,
						      .daddr = to_addr,
						      .backend = b,
						      .flags = FRAGMENT_ENCAP};
				bpf_map_update_elem(&fragments, &frk, &fr, BPF_ANY);
			}
			return encapsulate(skb, to_addr, b, tot_len, tos, saddr, daddr, frag & 0x4000,
					   gue);
		}
		if (svc->flags & SERVICE_MASQUERADE)
			return masquerade(skb, svc, saddr, sport, daddr, dport, to_addr, to_port, b,
					  bflags, ttl, tot_len, &frk, first_of_more, now, df);
		if (first_of_more) {
			struct fragment fr = {.daddr = to_addr, .backend = b};
			bpf_map_update_elem(&fragments, &frk, &fr, BPF_ANY);
		}
		struct bpf_fib_lookup fib;
		// A backend on this host: the stack delivers it, no route to look up.
		int rc = (bflags & BACKEND_LOCAL) ? BPF_FIB_LKUP_RET_NOT_FWDED :
						    route(skb, &fib, saddr, to_addr, tot_len);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && df)
			return too_big(skb, &fib, df, saddr, daddr, 0);
		// The destination to the backend's.
		struct ends e = {.saddr = saddr,
				 .new_saddr = saddr,
				 .sport = sport,
				 .new_sport = sport,
				 .daddr = daddr,
				 .new_daddr = to_addr,
				 .dport = dport,
				 .new_dport = to_port};
		int why = rewrite(skb, &e, ttl);
		if (why) {
			count_drop(why - 1);
			return TC_ACT_SHOT;
		}
		count(b, skb->len, 0);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
			// Without DF: the stack forwards it from here, fragmented, as a router would.
			count_drop(PASS_OVERSIZE);
			return TC_ACT_OK;
		}
		// A backend on this host: the stack delivers the rewritten datagram to it. (So it
		// does where this interface does not forward: the stack decides, as it would.)
		if (to_the_stack(rc))
			return TC_ACT_OK;
		return send_by(skb, rc, &fib);
	}

	if (r) {
		__u32 from_addr = r->service_addr;
		__u16 from_port = r->service_port;
		__u32 b = r->backend;
		if (!from_the_backend_side(skb, saddr, daddr, tot_len)) {
			count_drop(PASS_FORGED);
			return PASS_ON;
		}
		if (r->flags & BACKEND_MASQUERADE)
			return masquerade_reply(skb, r, saddr, sport, daddr, dport, ttl, tot_len, &frk,
						first_of_more, df, payload);
		int wild = !from_addr;
		if (wild) {
			// A wildcard listener's: from the address its client sent to.
			struct flow_key fk = {
				.client_addr = daddr, .client_port = dport, .service_port = from_port};
			from_addr = wildcard_flow_addr(&fk, saddr, sport);
			if (!from_addr && bpf_map_lookup_elem(&locals, &daddr))
				return PASS_ON; // to this host: udplb's health checks, say
			if (!from_addr) {
				count_drop(DROP_FLOW_GONE);
				return TC_ACT_SHOT;
			}
		}
		struct bpf_fib_lookup fib;
		// Through loopback a reply is for this host (the stack loops back only that): no
		// route to look up.
		int rc = skb->ingress_ifindex == LOOPBACK_IFINDEX ?
				 BPF_FIB_LKUP_RET_NOT_FWDED :
				 route(skb, &fib, from_addr, daddr, tot_len);
		if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && df)
			return too_big(skb, &fib, df, saddr, from_addr, 0);
		// To this host itself: a reply only to a client of a flow this program placed (a local
		// client through loopback); anything else (udplb's health checks, a client of the
		// socket path) is left alone.
		int local = to_the_stack(rc);
		struct flow_key fk = {.client_addr = daddr,
				      .service_addr = from_addr,
				      .client_port = dport,
				      .service_port = from_port};
		if (local && !wild && !has_flow(flow_bucket(&fk, 0), &fk))
			return PASS_ON;
		if (r->reply_ratio && !within_reply_ratio(&fk, wild, r->reply_ratio, payload))
			return beyond_reply_ratio(&frk, first_of_more);
		if (first_of_more) {
			struct fragment fr = {.saddr = from_addr, .backend = b, .flags = FRAGMENT_REPLY};
			bpf_map_update_elem(&fragments, &frk, &fr, BPF_ANY);
		}
		// The source to the listener's.
		struct ends e = {.saddr = saddr,
				 .new_saddr = from_addr,
				 .sport = sport,
				 .new_sport = from_port,
				 .daddr = daddr,
				 .new_daddr = daddr,
				 .dport = dport,
				 .new_dport = dport};
		int why = rewrite(skb, &e, ttl);
		if (why) {
			count_drop(why - 1);
			return TC_ACT_SHOT;
		}
		count(b, skb->len, 1);
		if (local || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			return oversize_or_local(skb, rc); // a local client, or fragmented
		return send_by(skb, rc, &fib);
	}
	return PASS_ON;
}

static __always_inline int classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS_ON;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return PASS_ON;
		if ((skb->mark & CUT_TAG_MASK) == CUT_TAG && skb->mark != CUT_TAG) {
			int verdict = cut_marked(skb);
			return verdict >= 0 ? verdict : ingress4(skb);
		}
		if (ip->protocol == IPPROTO_ICMP) {
			int verdict = icmp_about_reply(skb);
			if (verdict >= 0)
				return verdict;
		}
		return ingress4(skb);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return PASS_ON;
		if (ip->nexthdr == NEXTHDR_ICMP6) {
			int verdict = icmp6_about_reply(skb);
			if (verdict >= 0)
				return verdict;
		}
		return ingress6(skb);
	}
	return PASS_ON;
}

SEC("classifier")
int udplb_ingress(struct __sk_buff *skb)
{
	int verdict = classify(skb);
	return verdict == PASS_ON ? TC_ACT_UNSPEC : verdict;
}

char _license[] SEC("license") = "Dual BSD/GPL";
