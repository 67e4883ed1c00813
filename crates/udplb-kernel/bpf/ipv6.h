// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// The IPv6 side of udplb's kernel data plane (included by udplb.bpf.c, whose helpers it uses):
// LVS-NAT, masquerade and direct server return (IPv6 in IPv6) for listeners on an IPv6
// address, in flow and datagram mode. The same placement
// (xxh3 of the client's 16 or 18 bytes, the same Maglev table), flow map, replies, allow and
// deny lists and rate limits as IPv4, in maps keyed by IPv6 addresses; hop limit; the UDP
// checksum (always present in IPv6) updated incrementally; later fragments (fragment header)
// follow their first; ICMPv6 errors from a backend translated to the client; a datagram too
// big for the route onward answered with ICMPv6 packet too big, as a router would.
//
// Must not: follow any extension header other than one fragment header (such packets are
// left to the stack).

#define AF_INET6 10
#define NEXTHDR_IPV6 41 // IPv6 in IPv6
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_ICMP6 58
#define ICMP6_DEST_UNREACH 1
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3
#define IPV6_MIN_MTU 1280

// An IPv6 address as the packet holds it (four words in network order).
struct in6 {
	__u32 w[4];
};

struct ip6hdr {
	__u32 vtc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	struct in6 saddr;
	struct in6 daddr;
};

struct frag6hdr {
	__u8 nexthdr;
	__u8 reserved;
	__u16 frag_off; // offset in 8-byte units << 3, and 1: more fragments follow
	__u32 id;
};

struct icmp6hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 rest; // packet too big: the MTU
};

#define IP6_OFF ETH_HLEN
#define IP6_HOP_OFF (IP6_OFF + offsetof(struct ip6hdr, hop_limit))
#define IP6_SRC_OFF (IP6_OFF + offsetof(struct ip6hdr, saddr))
#define IP6_DST_OFF (IP6_OFF + offsetof(struct ip6hdr, daddr))
#define L4_6_OFF (IP6_OFF + sizeof(struct ip6hdr)) // without a fragment header
#define ICMP6_CSUM_OFF (L4_6_OFF + offsetof(struct icmp6hdr, checksum))
#define INNER6_OFF (L4_6_OFF + sizeof(struct icmp6hdr))
#define INNER6_SRC_OFF (INNER6_OFF + offsetof(struct ip6hdr, saddr))
#define INNER6_DST_OFF (INNER6_OFF + offsetof(struct ip6hdr, daddr))
#define INNER6_SPORT_OFF (INNER6_OFF + sizeof(struct ip6hdr) + offsetof(struct udphdr, source))
#define INNER6_DPORT_OFF (INNER6_OFF + sizeof(struct ip6hdr) + offsetof(struct udphdr, dest))

struct service6_key {
	struct in6 addr;
	__u16 port;
	__u16 pad;
};

struct backend6 {
	struct in6 addr;
	__u16 port;
	__u16 flags;
};

struct flow6_key {
	struct in6 client_addr;
	struct in6 service_addr;
	__u16 client_port;
	__u16 service_port;
};

// As `struct flow`: the backend by address, so that the next udplb process reads it alike.
struct flow6 {
	struct in6 backend_addr;
	__u16 backend_port;
	__u16 pad;
	__u32 pad2;
	__u64 last_ns;
	__u32 sent; // as `struct flow`'s
	__u32 replied;
};

struct reply6_key {
	struct in6 addr;
	__u16 port;
	__u16 pad;
};

struct reply6 {
	struct in6 service_addr;
	__u16 service_port;
	__u16 flags; // BACKEND_KEEPS_FLOWS, BACKEND_MASQUERADE
	__u32 backend; // global backend index (counters)
	__u32 reply_ratio; // as `struct reply`'s
};

// As `struct masq_key` and `struct masq`: whose a masquerade port at a backend is.
struct masq6_key {
	struct in6 backend_addr;
	__u16 backend_port;
	__u16 port; // the balancer's (network order)
};

struct masq6 {
	struct in6 client_addr;
	struct in6 local_addr; // the balancer's address the backend answers
	struct in6 service_addr;
	__u16 client_port;
	__u16 service_port;
	__u32 pad;
	__u64 last_ns;
};

struct acl6_key {
	__u32 prefixlen; // 32 + the network's length
	__u32 service; // big-endian
	struct in6 addr;
};

struct fragment6_key {
	struct in6 saddr;
	struct in6 daddr;
	__u32 id;
};

struct fragment6 {
	union {
		struct in6 saddr; // the new source (all zero: kept)
		__u32 gue; // FRAGMENT_ENCAP: its GUE ports (`gue_ports6`), 0 for IPv6 in IPv6
	};
	struct in6 daddr; // the new destination (all zero: kept)
	__u32 backend;
	__u32 flags; // FRAGMENT_REPLY
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service6_key);
	__type(value, struct service);
} services6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES * MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend6);
} backends6 SEC(".maps");

// As `locals`, for this host's IPv6 addresses.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LOCALS_MAX);
	__type(key, struct in6);
	__type(value, __u8);
} locals6 SEC(".maps");

// As `struct flow_slot`, for IPv6 flows (68 bytes: a bucket spans about four cache lines).
struct flow6_slot {
	struct flow6_key key;
	__u32 word;
	struct in6 backend_addr;
	__u32 last;
	__u32 sent;
	__u32 replied;
};

struct flow6_bucket {
	struct flow6_slot slot[FLOW_WAYS];
};

_Static_assert(sizeof(struct flow6_bucket) == 272, "FLOW_BUCKET_BYTES in src/lib.rs");

// As `flows`, for IPv6 flows.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024); // buckets, a power of two: set by udplb before loading
	__uint(map_flags, BPF_F_MMAPABLE); // udplb counts the live flows in place
	__type(key, __u32);
	__type(value, struct flow6_bucket);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes
#endif
} flows6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES * MAX_BACKENDS);
	__type(key, struct reply6_key);
	__type(value, struct reply6);
} replies6 SEC(".maps");

// As `persist`, for IPv6 clients.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); // set by udplb before loading (as `flows`)
	__type(key, struct flow6_key);
	__type(value, struct flow6);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows6`
#endif
} persist6 SEC(".maps");

// As `peer_flows`, for IPv6 flows.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024); // set by udplb before loading (`sync.max_entries`)
	__type(key, struct flow6_key);
	__type(value, struct flow6);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows6`
#endif
} peer_flows6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct acl6_key);
	__type(value, __u8);
} acl6_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct acl6_key);
	__type(value, __u8);
} acl6_deny SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct fragment6_key);
	__type(value, struct fragment6);
} fragments6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); // set by udplb before loading (as `flows`)
	__type(key, struct masq6_key);
	__type(value, struct masq6);
#ifdef UDPLB_PIN
	__uint(pinning, LIBBPF_PIN_BY_NAME); // kept across udplb processes, with `flows6`
#endif
} masq6 SEC(".maps");

// What the IPv6 path has read of a UDP datagram (its header may be rewritten meanwhile).
struct packet6 {
	struct in6 saddr;
	struct in6 daddr;
	struct fragment6_key frk; // its fragments' key (the id 0 when not fragmented)
	__u32 l4; // where its UDP header is
	__u16 sport;
	__u16 dport;
	__u16 tot_len; // the IPv6 header included
	__u8 hops;
	__u8 first_of_more; // the first fragment, more follow
	__u32 payload; // the UDP payload's length (a first fragment's: the whole datagram's)
	// A request's backend, once chosen: its address, port, global index and flags.
	struct in6 to_addr;
	__u32 backend;
	union {
		struct {
			__u16 to_port;
			__u16 bflags;
		};
		__u32 gue; // dsr, once chosen: the GUE ports (`gue_ports6`), 0 for IPv6 in IPv6
	};
};

static __always_inline int in6_is_zero(const struct in6 *a)
{
	return !(a->w[0] | a->w[1] | a->w[2] | a->w[3]);
}

static __always_inline int in6_eq(const struct in6 *a, const struct in6 *b);

static __always_inline __u64 in6_half(const struct in6 *a, int half)
{
	return ((__u64)a->w[2 * half] << 32) | a->w[2 * half + 1];
}

// As `flow_bucket`, for IPv6 flows.
static __always_inline struct flow6_bucket *flow6_bucket(const struct flow6_key *fk, int wild)
{
	__u32 zero = 0;
	struct flow_params *fp = bpf_map_lookup_elem(&flow_params, &zero);
	if (!fp)
		return 0;
	__u64 h = flow_mix(in6_half(&fk->client_addr, 0) ^ fp->seed);
	h = flow_mix(h ^ in6_half(&fk->client_addr, 1));
	h = flow_mix(h ^ (wild ? 0 : in6_half(&fk->service_addr, 0)));
	h = flow_mix(h ^ (wild ? 0 : in6_half(&fk->service_addr, 1)));
	h = flow_mix(h ^ (((__u64)fk->client_port << 16) | fk->service_port));
	__u32 at = (__u32)h & fp->mask6;
	return bpf_map_lookup_elem(&flows6, &at);
}

// As `find_flow`, for IPv6 flows.
static __always_inline struct flow6_slot *find_flow6(struct flow6_bucket *bk,
						     const struct flow6_key *fk, struct in6 *addr,
						     __u16 *port)
{
#pragma unroll
	for (int w = 0; w < FLOW_WAYS; w++) {
		struct flow6_slot *s = &bk->slot[w];
		__u32 v = read_word(&s->word);
		if ((v & FLOW_VERSION_ONE) || s->key.client_port != fk->client_port ||
		    s->key.service_port != fk->service_port ||
		    !in6_eq(&s->key.client_addr, &fk->client_addr) ||
		    !in6_eq(&s->key.service_addr, &fk->service_addr))
			continue;
		*addr = s->backend_addr; // the caller's only when this returns the slot
		if (read_word(&s->word) != v)
			continue;
		*port = (__u16)v;
		return s;
	}
	return 0;
}

// IPv6 flow `fk`'s backend into `addr`:`port`; 0: no such flow. (The IPv6 flow table's
// lookups off the request path are functions of their own: their locals would take stack
// from their callers'.)
static __noinline int flow6_backend(const struct flow6_key *fk, int wild, struct in6 *addr,
				    __u16 *port)
{
	struct flow6_bucket *bk = flow6_bucket(fk, wild);
	return bk && find_flow6(bk, fk, addr, port);
}

// Whether the IPv6 flow table holds flow `fk` (not a wildcard listener's).
static __noinline int has_flow6(const struct flow6_key *fk)
{
	struct in6 addr;
	__u16 port;
	return flow6_backend(fk, 0, &addr, &port);
}

// As `wildcard_flow_addr`: the address the client of wildcard listener flow `fk` to backend
// `backend`:`bport` sent to (last), into `fk->service_addr` (all zero on the way in). Returns
// 0 when there is no such flow.
static __noinline int wildcard_flow6(struct flow6_key *fk, const struct in6 *backend, __u16 bport)
{
	struct flow6_bucket *bk = flow6_bucket(fk, 1);
	if (!bk)
		return 0;
	int found = 0;
	__u32 latest = 0;
#pragma unroll
	for (int w = 0; w < FLOW_WAYS; w++) {
		struct flow6_slot *s = &bk->slot[w];
		__u32 v = read_word(&s->word);
		if ((v & FLOW_VERSION_ONE) || s->key.client_port != fk->client_port ||
		    s->key.service_port != fk->service_port || (__u16)v != bport ||
		    !in6_eq(&s->key.client_addr, &fk->client_addr) ||
		    !in6_eq(&s->backend_addr, backend))
			continue;
		struct in6 a = s->key.service_addr;
		__u32 last = s->last;
		if (read_word(&s->word) != v || (found && (__s32)(last - latest) < 0))
			continue;
		fk->service_addr = a;
		latest = last;
		found = 1;
	}
	return found;
}

// As `service_at`, for IPv6: the listener at `addr`:`port`, or with `wildcard`, the wildcard
// listener on `port` when `addr` is one of this host's. (Its own function, for the stack.)
static __noinline struct service *service6_at(const struct in6 *addr, __u16 port, int wildcard)
{
	struct service6_key sk = {.port = port};
	if (!wildcard)
		sk.addr = *addr;
	struct service *svc = bpf_map_lookup_elem(&services6, &sk);
	if (svc && wildcard && !bpf_map_lookup_elem(&locals6, addr))
		return 0;
	return svc;
}

// Whether backend mapping `r` still serves listener `svc` at `addr`:`port`, the address the
// client sent to (a wildcard listener's backends name address 0).
static __always_inline int serves6(const struct reply6 *r, const struct service *svc,
				   const struct in6 *addr, __u16 port)
{
	if (r->service_port != port)
		return 0;
	return (svc->flags & SERVICE_WILDCARD) ? in6_is_zero(&r->service_addr)
					       : in6_eq(&r->service_addr, addr);
}

static __always_inline int in6_eq(const struct in6 *a, const struct in6 *b);

// As `idle_of`, for IPv6 flows.
static __always_inline __u64 idle6_of(const struct flow6_key *victim, const struct flow6_key *fk,
				      __u64 idle_ns)
{
	if (in6_eq(&victim->service_addr, &fk->service_addr) &&
	    victim->service_port == fk->service_port)
		return idle_ns;
	struct service6_key sk = {.addr = victim->service_addr, .port = victim->service_port};
	struct service *svc = bpf_map_lookup_elem(&services6, &sk);
	if (!svc) {
		sk.addr = (struct in6){}; // a wildcard listener's flow
		svc = bpf_map_lookup_elem(&services6, &sk);
	}
	return svc ? svc->idle_ns : 0;
}

// As `add_flow`, for IPv6 flows.
static __always_inline void add_flow6(struct flow6_bucket *bk, struct flow6_slot *s,
				      const struct flow6_key *fk, const struct in6 *addr,
				      __u16 port, __u64 now_ns, __u32 sent, __u64 idle_ns)
{
	ADD_FLOW(bk, s, fk, *addr, port, now_ns, sent, idle_ns, idle6_of);
}

static __always_inline int in6_eq(const struct in6 *a, const struct in6 *b)
{
	return !((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) |
		 (a->w[3] ^ b->w[3]));
}

// The 128-bit product of `a` and `b`, its two halves xor-ed (xxh3's mul128_fold64), from
// 32-bit products (eBPF multiplies 64 bits at most).
static __always_inline __u64 mul128_fold64(__u64 a, __u64 b)
{
	__u64 a_lo = a & 0xffffffffULL, a_hi = a >> 32;
	__u64 b_lo = b & 0xffffffffULL, b_hi = b >> 32;
	__u64 ll = a_lo * b_lo, lh = a_lo * b_hi, hl = a_hi * b_lo, hh = a_hi * b_hi;
	__u64 cross = (ll >> 32) + (lh & 0xffffffffULL) + hl;
	__u64 high = hh + (lh >> 32) + (cross >> 32);
	__u64 low = (cross << 32) | (ll & 0xffffffffULL);
	return low ^ high;
}

static __always_inline __u64 xxh3_avalanche(__u64 h)
{
	h ^= h >> 37;
	h *= 0x165667919E3779F9ULL;
	return h ^ (h >> 32);
}

// udplb's placement hash of an IPv6 address (xxh3-64 of its 16 bytes, udplb's seed).
static __always_inline __u64 placement_hash6(const struct in6 *a)
{
	__u64 lo = (((__u64)a->w[1] << 32) | a->w[0]) ^ UDPLB_FLIP1;
	__u64 hi = (((__u64)a->w[3] << 32) | a->w[2]) ^ UDPLB_FLIP2;
	return xxh3_avalanche(16 + __builtin_bswap64(lo) + hi + mul128_fold64(lo, hi));
}

// ... of an IPv6 address and a port (its 18 bytes: bytes 0-15 and 2-17, 8 at a time).
static __always_inline __u64 placement_hash6_port(const struct in6 *a, __u16 port)
{
	__u64 w0 = ((__u64)a->w[1] << 32) | a->w[0];
	__u64 w1 = ((__u64)a->w[3] << 32) | a->w[2];
	__u64 acc = 18 * 0x9E3779B185EBCA87ULL;
	acc += mul128_fold64(w0 ^ UDPLB_MIX0, w1 ^ UDPLB_MIX1);
	__u64 x0 = (w0 >> 16) | (w1 << 48);
	__u64 x1 = (w1 >> 16) | ((__u64)port << 48);
	acc += mul128_fold64(x0 ^ UDPLB_MIX2, x1 ^ UDPLB_MIX3);
	return xxh3_avalanche(acc);
}

static __always_inline __u64 client_hash6(const struct service *svc, const struct in6 *addr,
					  __u16 port)
{
	if (svc->flags & SERVICE_DATAGRAM)
		return 0;
	if (svc->flags & SERVICE_BY_IP)
		return placement_hash6(addr);
	return placement_hash6_port(addr, port);
}

// As `within_limits`, for an IPv6 client: keyed by a hash of its address and of its prefix.
static __always_inline int within_limits6(const struct service *svc, const struct in6 *client,
					  int flows, __u64 now)
{
	__u32 source = flows ? LIMIT_FLOWS_SOURCE : LIMIT_DATAGRAMS_SOURCE;
	__u32 prefix = flows ? LIMIT_FLOWS_PREFIX : LIMIT_DATAGRAMS_PREFIX;
	if (!svc->limit[source] && !svc->limit[prefix])
		return 1;
	struct in6 net = {.w = {client->w[0] & svc->prefix6_mask[0],
				client->w[1] & svc->prefix6_mask[1],
				client->w[2] & svc->prefix6_mask[2],
				client->w[3] & svc->prefix6_mask[3]}};
	return within(svc, source, (__u32)placement_hash6(client), now) &&
	       within(svc, prefix, (__u32)placement_hash6(&net), now);
}

// The route from `src` to `dst` for a packet of `tot_len` bytes (IPv6 header included), with
// the lookup's `flags` (BPF_FIB_LOOKUP_SRC: the source the route would choose, into `fib`).
static __always_inline int route6_with(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				       const struct in6 *src, const struct in6 *dst,
				       __u16 tot_len, __u32 flags)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	__builtin_memcpy(fib->ipv6_src, src, sizeof(*src));
	__builtin_memcpy(fib->ipv6_dst, dst, sizeof(*dst));
	fib->ifindex = skb->ingress_ifindex;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), flags);
}

static __always_inline int route6(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				  const struct in6 *src, const struct in6 *dst, __u16 tot_len)
{
	return route6_with(skb, fib, src, dst, tot_len, 0);
}

// As `from_the_backend_side`, for IPv6 (`back`: room for the route back).
static __always_inline int from_the_backend_side6(struct __sk_buff *skb,
						  struct bpf_fib_lookup *back,
						  const struct in6 *backend, const struct in6 *to,
						  __u16 tot_len)
{
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	int rc = route6(skb, back, to, backend, tot_len);
	return (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	       back->ifindex == skb->ingress_ifindex;
}

// Takes one from the hop limit (IPv6 has no header checksum). Returns 0, or a drop reason + 1.
static __always_inline int take_hop(struct __sk_buff *skb, __u8 hops)
{
	if (hops <= 1)
		return DROP_TTL + 1;
	__u8 next = hops - 1;
	if (bpf_skb_store_bytes(skb, IP6_HOP_OFF, &next, sizeof(next), 0))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one address of the IPv6 header (`dst`: the destination, else the source) and the
// checksum at `csum_off` that covers it through the pseudo header (negative: none, a later
// fragment). Returns 0, or a drop reason + 1.
static __always_inline int set_addr6(struct __sk_buff *skb, int dst, struct in6 *old_addr,
				     struct in6 *new_addr, int csum_off)
{
	if (bpf_skb_store_bytes(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, new_addr, sizeof(*new_addr),
				0))
		return DROP_REWRITE + 1;
	if (csum_off < 0)
		return 0;
	__s64 diff = bpf_csum_diff((__be32 *)old_addr, sizeof(*old_addr), (__be32 *)new_addr,
				   sizeof(*new_addr), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff,
					    BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one UDP port (`dst`: the destination, else the source; the UDP header at `l4`)
// with the checksum. Returns 0, or a drop reason + 1.
static __always_inline int set_port6(struct __sk_buff *skb, int dst, __u16 old_port,
				     __u16 new_port, __u32 l4)
{
	if (bpf_l4_csum_replace(skb, l4 + offsetof(struct udphdr, check), old_port, new_port,
				BPF_F_MARK_MANGLED_0 | sizeof(new_port)) ||
	    bpf_skb_store_bytes(skb, l4 + (dst ? offsetof(struct udphdr, dest) :
						 offsetof(struct udphdr, source)),
				&new_port, sizeof(new_port), 0))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one address and one port of the datagram in place (`dst`: the destination, else
// the source; its UDP header at `l4`), one taken from the hop limit with `hop`: the header
// written directly, the UDP checksum updated by the kernel's helper from what changed (as
// `rewrite_in_place` does for IPv4). Returns 0, a drop reason + 1, or -1 when the headers are
// not in the packet's linear data (nothing written).
static __always_inline int rewrite6_in_place(struct __sk_buff *skb, int dst, struct in6 *old_addr,
					     struct in6 *new_addr, __u16 old_port, __u16 new_port,
					     __u8 hops, __u32 l4, int hop)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ip6hdr *ip = data + IP6_OFF;
	if (l4 > L4_6_OFF + sizeof(struct frag6hdr))
		return -1;
	struct udphdr *udp = data + l4;
	if ((void *)(ip + 1) > end || (void *)(udp + 1) > end)
		return -1;
	if (hop && hops <= 1)
		return DROP_TTL + 1;
	__u32 addrs = 0;
	for (int i = 0; i < 4; i++)
		addrs = csum_change(addrs, old_addr->w[i], new_addr->w[i]);
	if (hop)
		ip->hop_limit = hops - 1;
	if (dst) {
		ip->daddr = *new_addr;
		udp->dest = new_port;
	} else {
		ip->saddr = *new_addr;
		udp->source = new_port;
	}
	__u32 check = l4 + offsetof(struct udphdr, check);
	if (!csum_unchanged(addrs) &&
	    bpf_l4_csum_replace(skb, check, 0, addrs, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return DROP_REWRITE + 1;
	if (old_port != new_port &&
	    bpf_l4_csum_replace(skb, check, old_port, new_port,
				BPF_F_MARK_MANGLED_0 | sizeof(new_port)))
		return DROP_REWRITE + 1;
	return 0;
}

// Rewrites one address and one port of the datagram (its UDP header at `l4`), the checksum
// updated incrementally, one taken from the hop limit: in place, or field by field through
// the helpers when its headers are not in the linear data. Returns 0, or a drop reason + 1.
static __always_inline int rewrite6(struct __sk_buff *skb, int dst, struct in6 *old_addr,
				    struct in6 *new_addr, __u16 old_port, __u16 new_port, __u8 hops,
				    __u32 l4)
{
	int why = rewrite6_in_place(skb, dst, old_addr, new_addr, old_port, new_port, hops, l4, 1);
	if (why >= 0)
		return why;
	why = take_hop(skb, hops);
	if (!why)
		why = set_addr6(skb, dst, old_addr, new_addr, l4 + offsetof(struct udphdr, check));
	if (!why)
		why = set_port6(skb, dst, old_port, new_port, l4);
	return why;
}

// Rewrites both ends of the datagram (masquerade), as [`rewrite6`] does one.
static __always_inline int rewrite_both6(struct __sk_buff *skb, struct in6 *saddr,
					 struct in6 *new_saddr, __u16 sport, __u16 new_sport,
					 struct in6 *daddr, struct in6 *new_daddr, __u16 dport,
					 __u16 new_dport, __u8 hops, __u32 l4)
{
	int why = rewrite6(skb, 0, saddr, new_saddr, sport, new_sport, hops, l4);
	if (why)
		return why;
	why = rewrite6_in_place(skb, 1, daddr, new_daddr, dport, new_dport, hops, l4, 0);
	if (why >= 0)
		return why;
	why = set_addr6(skb, 1, daddr, new_daddr, l4 + offsetof(struct udphdr, check));
	if (!why)
		why = set_port6(skb, 1, dport, new_dport, l4);
	return why;
}

// ICMPv6 packet too big as `too_big6` builds it: the pseudo header (which the checksum
// covers), the ICMPv6 header, the quote; then the IPv6 header. (In a per-CPU map: the
// program's stack is too small for it.)
struct too_big6_msg {
	struct in6 src;
	struct in6 dst;
	__u32 len;
	__u32 next;
	struct icmp6hdr icmp;
	__u8 quote[48];
	struct ip6hdr ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct too_big6_msg);
} scratch6 SEC(".maps");

// Path MTU discovery, IPv6: the packet will not fit the route onward (`fib` holds the MTU;
// it is reused for the route back), and IPv6 routers never fragment, so it is dropped
// (counted `too_big`) and turned in place into ICMPv6 packet too big, from `from` to its
// sender `to`, quoting its first 48 bytes.
static __noinline int too_big6(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
			       struct in6 *to, struct in6 *from)
{
	count_drop(DROP_TOO_BIG);
	__u32 zero = 0;
	struct too_big6_msg *msg = bpf_map_lookup_elem(&scratch6, &zero);
	if (!msg)
		return TC_ACT_SHOT;
	__u32 mtu = fib->mtu_result;
	if (mtu < IPV6_MIN_MTU)
		mtu = IPV6_MIN_MTU;
	const __u32 body = sizeof(struct icmp6hdr) + sizeof(msg->quote);
	msg->src = *from;
	msg->dst = *to;
	msg->len = bpf_htonl(body);
	msg->next = bpf_htonl(NEXTHDR_ICMP6);
	msg->icmp = (struct icmp6hdr){.type = ICMP6_PACKET_TOO_BIG, .rest = bpf_htonl(mtu)};
	msg->ip = (struct ip6hdr){.vtc_flow = bpf_htonl(0x60000000),
				  .payload_len = bpf_htons(body),
				  .nexthdr = NEXTHDR_ICMP6,
				  .hop_limit = 64,
				  .saddr = *from,
				  .daddr = *to};
	if (bpf_skb_load_bytes(skb, IP6_OFF, msg->quote, sizeof(msg->quote)) ||
	    bpf_skb_adjust_room(skb, sizeof(struct ip6hdr) + sizeof(struct icmp6hdr),
				BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_change_tail(skb, ETH_HLEN + sizeof(struct ip6hdr) + body, 0))
		return TC_ACT_SHOT;
	// The checksum over the pseudo header, the ICMPv6 header and the quote.
	msg->icmp.checksum =
		~fold(bpf_csum_diff(0, 0, (__be32 *)msg, offsetof(struct too_big6_msg, ip), 0));
	if (bpf_skb_store_bytes(skb, IP6_OFF, &msg->ip, sizeof(msg->ip), 0) ||
	    bpf_skb_store_bytes(skb, L4_6_OFF, &msg->icmp, sizeof(msg->icmp), 0))
		return TC_ACT_SHOT;
	int rc = route6(skb, fib, from, to, sizeof(struct ip6hdr) + body);
	if (to_the_stack(rc))
		return to_loopback(skb);
	return send_by(skb, rc, fib);
}

// An ICMPv6 error a backend (or a router on the way) sent about a datagram this program
// forwarded to it: translated as the client expects it (from the listener's address, about a
// datagram to the listener: outer source, quoted destination and port, the ICMPv6 checksum
// for each) and sent on to the client. Anything else is left to the stack.
static __noinline int icmp6_error(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct ip6hdr *ip = (void *)(long)skb->data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return PASS_ON;
	struct icmp6hdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end)
		return PASS_ON;
	if (icmp->type != ICMP6_DEST_UNREACH && icmp->type != ICMP6_PACKET_TOO_BIG &&
	    icmp->type != ICMP6_TIME_EXCEEDED)
		return PASS_ON;
	struct ip6hdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > end || inner->nexthdr != IPPROTO_UDP)
		return PASS_ON;
	struct udphdr *iudp = (void *)(inner + 1);
	if ((void *)(iudp + 1) > end)
		return PASS_ON;
	// The datagram went from the client (the error's destination) to a backend.
	if (!in6_eq(&inner->saddr, &ip->daddr))
		return PASS_ON;
	struct reply6_key rk = {.addr = inner->daddr, .port = iudp->dest};
	struct reply6 *r = bpf_map_lookup_elem(&replies6, &rk);
	if (!r)
		return PASS_ON;
	struct in6 outer_src = ip->saddr, client = ip->daddr, backend = inner->daddr;
	struct in6 vip = r->service_addr, local = ip->daddr;
	__u16 bport = iudp->dest, vport = r->service_port, lport = iudp->source, cport = lport;
	__u16 tot_len = bpf_ntohs(ip->payload_len) + sizeof(struct ip6hdr);
	__u8 hops = ip->hop_limit;
	__u32 b = r->backend;
	int masqueraded = r->flags & BACKEND_MASQUERADE;
	if (masqueraded) {
		// About a datagram from a masquerade address and port: whose it was.
		struct masq6_key mk = {.backend_addr = backend, .backend_port = bport, .port = lport};
		struct masq6 *m = bpf_map_lookup_elem(&masq6, &mk);
		if (!m || !in6_eq(&m->local_addr, &local))
			return PASS_ON;
		client = m->client_addr;
		cport = m->client_port;
		vip = m->service_addr; // the address the client sent to (a wildcard listener's too)
	} else if (in6_is_zero(&vip)) {
		// A wildcard listener's: the address its client sent to, from the flow.
		struct flow6_key fk = {.client_addr = client, .client_port = cport, .service_port = vport};
		if (!wildcard_flow6(&fk, &backend, bport))
			return PASS_ON;
		vip = fk.service_addr;
	}
	struct bpf_fib_lookup fib;
	if (!from_the_backend_side6(skb, &fib, &backend, &client, tot_len)) {
		count_drop(PASS_FORGED);
		return PASS_ON;
	}
	int rc = route6(skb, &fib, &vip, &client, tot_len);
	if (to_the_stack(rc))
		return PASS_ON;
	// The quoted datagram's destination and port: in the ICMPv6 message, so in its checksum.
	__s64 diff = bpf_csum_diff((__be32 *)&backend, sizeof(backend), (__be32 *)&vip,
				   sizeof(vip), 0);
	if (diff < 0 ||
	    bpf_skb_store_bytes(skb, INNER6_DST_OFF, &vip, sizeof(vip), 0) ||
	    bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, (__u32)diff, 0) ||
	    bpf_skb_store_bytes(skb, INNER6_DPORT_OFF, &vport, sizeof(vport), 0) ||
	    bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, bport, vport, sizeof(vport)))
		goto shot;
	if (masqueraded) {
		// And its source: the client's, not the masquerade address.
		diff = bpf_csum_diff((__be32 *)&local, sizeof(local), (__be32 *)&client,
				     sizeof(client), 0);
		if (diff < 0 ||
		    bpf_skb_store_bytes(skb, INNER6_SRC_OFF, &client, sizeof(client), 0) ||
		    bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, (__u32)diff, 0) ||
		    bpf_skb_store_bytes(skb, INNER6_SPORT_OFF, &cport, sizeof(cport), 0) ||
		    bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, lport, cport, sizeof(cport)))
			goto shot;
	}
	int why = take_hop(skb, hops);
	if (!why)
		why = set_addr6(skb, 0, &outer_src, &vip, ICMP6_CSUM_OFF);
	if (!why && masqueraded)
		why = set_addr6(skb, 1, &local, &client, ICMP6_CSUM_OFF);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	struct counters *c = bpf_map_lookup_elem(&counters, &b);
	if (c)
		c->icmp_errors += 1;
	return send_by(skb, rc, &fib);
shot:
	count_drop(DROP_REWRITE);
	return TC_ACT_SHOT;
}

// What encapsulation adds: an IPv6 header, and a UDP header for GUE (`gue` nonzero).
static __always_inline __u16 overhead6(__u32 gue)
{
	return sizeof(struct ip6hdr) + (gue ? sizeof(struct udphdr) : 0);
}

// As `gue_ports`, for an IPv6 client.
static __always_inline __u32 gue_ports6(const struct service *svc, const struct in6 *client,
					__u16 cport)
{
	if (!(svc->flags & SERVICE_GUE))
		return 0;
	return gue_ports(svc, client->w[0] ^ client->w[1] ^ client->w[2] ^ client->w[3], cport);
}

// The route to `to` for a packet of `tot_len` bytes once encapsulated (`gue` as `gue_ports6`),
// its source the one the route chooses.
static __always_inline int route_encapsulated6(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					       struct in6 *to, __u16 tot_len, __u32 gue)
{
	struct in6 any = {};
	return route6_with(skb, fib, &any, to, tot_len + overhead6(gue), BPF_FIB_LOOKUP_SRC);
}

// Puts an IPv6 header from the route's source (`fib`, found as `rc` by `route_encapsulated6`)
// to `to` in front of the packet of `tot_len` bytes, with a UDP header after it when `gue`
// (GUE: its checksum 0, as RFC 6935 lets a tunnel's be), and sends it by that route; counted
// for backend `b`.
static __always_inline int encapsulated6(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					 int rc, struct in6 *to, __u16 tot_len, __u32 b, __u32 gue)
{
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		count_drop(DROP_TOO_BIG);
		return TC_ACT_SHOT;
	}
	__u16 udp_len = tot_len + sizeof(struct udphdr);
	// One header at a time, in the same bytes of stack.
	union {
		struct ip6hdr ip;
		struct udphdr udp;
	} h = {.ip = {.vtc_flow = bpf_htonl(0x60000000),
		      .payload_len = bpf_htons(gue ? udp_len : tot_len),
		      .nexthdr = gue ? IPPROTO_UDP : NEXTHDR_IPV6,
		      .hop_limit = 64,
		      .daddr = *to}};
	__builtin_memcpy(&h.ip.saddr, fib->ipv6_src, sizeof(h.ip.saddr));
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    in6_is_zero(&h.ip.saddr)) {
		count_drop(DROP_FIB);
		return TC_ACT_SHOT;
	}
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0);
	int failed = bpf_skb_adjust_room(skb, overhead6(gue), BPF_ADJ_ROOM_MAC, flags) ||
		     bpf_skb_store_bytes(skb, IP6_OFF, &h.ip, sizeof(h.ip), 0);
	if (!failed && gue) {
		h.udp = (struct udphdr){
			.source = gue & 0xffff, .dest = gue >> 16, .len = bpf_htons(udp_len)};
		failed = bpf_skb_store_bytes(skb, IP6_OFF + sizeof(h.ip), &h.udp, sizeof(h.udp), 0);
	}
	if (failed) {
		count_drop(DROP_REWRITE);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 0);
	return send_by(skb, rc, fib);
}

// Direct server return, IPv6: the datagram, untouched, inside an IPv6 header from the route's
// source address to the chosen backend (IPv6 in IPv6, or in UDP when `p->gue`: GUE), sent by
// the route (as `encapsulate`). One that would exceed the route's MTU once encapsulated is
// answered with packet too big, the MTU less what encapsulation adds, from the listener's
// address to the client.
static __noinline int encapsulate6(struct __sk_buff *skb, struct packet6 *p)
{
	struct bpf_fib_lookup fib;
	int rc = route_encapsulated6(skb, &fib, &p->to_addr, p->tot_len, p->gue);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		fib.mtu_result -= overhead6(p->gue);
		return too_big6(skb, &fib, &p->saddr, &p->daddr);
	}
	return encapsulated6(skb, &fib, rc, &p->to_addr, p->tot_len, p->backend, p->gue);
}

#define TO_ENCAPSULATE -2 // `later_fragment6`: `p` filled in, for `encapsulate6`

// A later fragment (`p->frk` its key): rewritten as its first fragment was, to where it went;
// or, when its first fragment was encapsulated, `p` filled in for `encapsulate6` to do the
// same (TO_ENCAPSULATE).
static __noinline int later_fragment6(struct __sk_buff *skb, struct packet6 *p)
{
	struct fragment6_key *frk = &p->frk;
	__u16 tot_len = p->tot_len;
	__u8 hops = p->hops;
	struct fragment6 *fr = bpf_map_lookup_elem(&fragments6, frk);
	if (!fr) {
		count_drop(PASS_FRAGMENT);
		return PASS_ON;
	}
	if (fr->flags & FRAGMENT_DROP)
		return TC_ACT_SHOT; // its first fragment was (counted as such)
	struct in6 new_saddr = fr->saddr, new_daddr = fr->daddr;
	__u32 b = fr->backend;
	int reply = fr->flags & FRAGMENT_REPLY;
	if (fr->flags & FRAGMENT_ENCAP) {
		p->to_addr = new_daddr;
		p->backend = b;
		p->gue = fr->gue;
		return TO_ENCAPSULATE;
	}
	int keep_src = in6_is_zero(&new_saddr), keep_dst = in6_is_zero(&new_daddr);
	struct bpf_fib_lookup fib;
	int rc = route6(skb, &fib, keep_src ? &frk->saddr : &new_saddr,
			keep_dst ? &frk->daddr : &new_daddr, tot_len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big6(skb, &fib, &frk->saddr, keep_src ? &frk->daddr : &new_saddr);
	int why = take_hop(skb, hops);
	if (!why && !keep_src)
		why = set_addr6(skb, 0, &frk->saddr, &new_saddr, -1);
	if (!why && !keep_dst)
		why = set_addr6(skb, 1, &frk->daddr, &new_daddr, -1);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, reply);
	if (to_the_stack(rc))
		return to_loopback(skb);
	return send_by(skb, rc, &fib);
}

// As `persisted`: the backend the client of `p` persists on, into `p`. Returns 0 when there
// is none.
static __always_inline int persisted6(const struct service *svc, const struct flow6_key *pk,
				      __u64 now, struct packet6 *p)
{
	struct flow6 *e = bpf_map_lookup_elem(&persist6, pk);
	if (!e || now - e->last_ns > svc->idle_ns + svc->persist_ns)
		return 0;
	struct reply6_key rk = {.addr = e->backend_addr, .port = e->backend_port};
	struct reply6 *r = bpf_map_lookup_elem(&replies6, &rk);
	if (!r || !(r->flags & BACKEND_TAKES_NEW) || !serves6(r, svc, &p->daddr, p->dport))
		return 0;
	p->backend = r->backend;
	p->bflags = r->flags;
	p->to_addr = e->backend_addr;
	p->to_port = e->backend_port;
	if (now - e->last_ns > REFRESH_NS)
		e->last_ns = now;
	struct counters *c = bpf_map_lookup_elem(&counters, &p->backend);
	if (c)
		c->persisted += 1;
	return 1;
}

// As `remember`, for the IPv6 client of `p` and the backend chosen into it.
static __always_inline void remember6(const struct flow6_key *pk, const struct packet6 *p,
				      __u64 now, int placed)
{
	struct flow6 *e = bpf_map_lookup_elem(&persist6, pk);
	if (e && in6_eq(&e->backend_addr, &p->to_addr) && e->backend_port == p->to_port) {
		if (now - e->last_ns > REFRESH_NS)
			e->last_ns = now;
		return;
	}
	if (e && !placed)
		return;
	struct flow6 v = {.backend_addr = p->to_addr, .backend_port = p->to_port, .last_ns = now};
	bpf_map_update_elem(&persist6, pk, &v, BPF_ANY);
}

// The backend that persistence names for the client of `p` (into `p`), or else, when
// `placed`, remembers the one just placed (SERVICE_PERSIST only; its own function, for the
// stack). Returns 1 when `p` now names the persisted backend.
static __noinline int persistence6(const struct service *svc, struct packet6 *p, __u64 now,
				   int placed)
{
	struct flow6_key pk = {.client_addr = p->saddr,
			       .client_port = (svc->flags & SERVICE_BY_IP) ? 0 : p->sport,
			       .service_port = p->dport};
	if (!(svc->flags & SERVICE_WILDCARD))
		pk.service_addr = p->daddr; // (a wildcard listener's: whichever address, 0)
	if (placed < 0)
		return persisted6(svc, &pk, now, p);
	remember6(&pk, p, now, placed);
	return 0;
}

// A new flow's entry in bucket `bk` (in `f`, its old slot, if any), to the backend chosen
// into `p` (flow mode), or once a local client's in datagram mode, so that its replies are
// known as replies (see the IPv4 side). (Its own function: the key would take stack from
// `choose6`.)
static __noinline void remember_flow6(const struct service *svc, struct flow6_bucket *bk,
				      struct flow6_slot *f, const struct packet6 *p, __u64 now)
{
	int datagram = svc->flags & SERVICE_DATAGRAM;
	struct flow6_key fk = {.client_addr = p->saddr,
			       .service_addr = p->daddr,
			       .client_port = p->sport,
			       .service_port = p->dport};
	if (!datagram) {
		if (bk)
			add_flow6(bk, f, &fk, &p->to_addr, p->to_port, now, p->payload,
				  svc->idle_ns);
		count_flow(p->backend);
	} else if (bk && !f)
		add_flow6(bk, 0, &fk, &p->to_addr, p->to_port, now, p->payload, svc->idle_ns);
}

// As `tell_peers4`, for the new IPv6 flow of `p`. (Called from `choose6`, not from
// `remember_flow6`: the stack of the calls in a row stays within what a program has.)
static __noinline void tell_peers6(__u32 service, const struct packet6 *p)
{
	struct new_flow e = {.service = service,
			     .client_port = p->sport,
			     .backend_port = p->to_port,
			     .family = 6};
	__builtin_memcpy(e.client, &p->saddr, sizeof(e.client));
	__builtin_memcpy(e.backend, &p->to_addr, sizeof(e.backend));
	tell_peers(&e);
}

// As `peer_flow`, for the IPv6 client of `p` (the backend into `p`). (Its own function: its
// key would take stack from `choose6`.)
static __noinline int peer_flow6(const struct service *svc, struct packet6 *p, __u64 now)
{
	struct flow6_key fk = {.client_addr = p->saddr,
			       .client_port = p->sport,
			       .service_port = p->dport};
	if (!(svc->flags & SERVICE_WILDCARD))
		fk.service_addr = p->daddr; // (as udplb learned it: by the listener's address)
	struct flow6 *f = bpf_map_lookup_elem(&peer_flows6, &fk);
	if (!f || now - f->last_ns > (__u64)svc->sync_ms * 1000000)
		return 0;
	struct reply6_key rk = {.addr = f->backend_addr, .port = f->backend_port};
	struct reply6 *r = bpf_map_lookup_elem(&replies6, &rk);
	if (!r || !(r->flags & BACKEND_KEEPS_FLOWS) || !serves6(r, svc, &p->daddr, p->dport))
		return 0;
	p->backend = r->backend;
	p->bflags = r->flags;
	p->to_addr = rk.addr;
	p->to_port = rk.port;
	count_drop(SYNC_USED);
	return 1;
}

// Whether the listener's allow and deny lists refuse the client of `p`: deny wins; an allow
// list, when there is one, must name the client. (Its own function: its key would take stack
// from `choose6`'s calls.)
static __noinline int denied6(const struct service *svc, const struct packet6 *p)
{
	struct acl6_key ak = {.prefixlen = 160, .service = bpf_htonl(svc->id), .addr = p->saddr};
	return ((svc->flags & SERVICE_DENY_LIST) && bpf_map_lookup_elem(&acl6_deny, &ak)) ||
	       ((svc->flags & SERVICE_ALLOW_LIST) && !bpf_map_lookup_elem(&acl6_allow, &ak));
}

// A client's datagram to an IPv6 listener `svc`: its flow's backend, or one placed anew,
// into `p` (the allow and deny lists and the rate limits checked first). Returns -1 when
// chosen, else what becomes of the datagram. (Its own function, as `forward6`: each has the
// stack the program may use beside the IPv6 path's.)
static __noinline int choose6(struct __sk_buff *skb, const struct service *svc,
			      struct packet6 *p)
{
	if ((svc->flags & (SERVICE_DENY_LIST | SERVICE_ALLOW_LIST)) && denied6(svc, p)) {
		count_drop(DROP_DENIED);
		return TC_ACT_SHOT;
	}
	__u64 now = bpf_ktime_get_ns();
	if (!within_limits6(svc, &p->saddr, 0, now)) {
		count_drop(DROP_RATE_LIMITED);
		return TC_ACT_SHOT;
	}
	struct flow6_key fk = {.client_addr = p->saddr,
			       .service_addr = p->daddr,
			       .client_port = p->sport,
			       .service_port = p->dport};
	int datagram = svc->flags & SERVICE_DATAGRAM;
	// The flow's bucket: in datagram mode only a local client's (remembered below).
	struct flow6_bucket *bk = datagram && skb->ingress_ifindex != LOOPBACK_IFINDEX ?
					  0 :
					  flow6_bucket(&fk, svc->flags & SERVICE_WILDCARD);
	struct reply6_key kept = {};
	struct flow6_slot *f = bk ? find_flow6(bk, &fk, &kept.addr, &kept.port) : 0;
	if (f && !datagram && flow_live(f->last, now, svc->idle_ns)) {
		// Its backend, while it keeps flows and still serves this listener.
		struct reply6 *r = bpf_map_lookup_elem(&replies6, &kept);
		if (r && (r->flags & BACKEND_KEEPS_FLOWS) && serves6(r, svc, &p->daddr, p->dport)) {
			p->backend = r->backend;
			p->bflags = r->flags;
			p->to_addr = kept.addr;
			p->to_port = kept.port;
			if (f->last != flow_time(now))
				f->last = flow_time(now);
			if (svc->flags & SERVICE_REPLY_RATIO)
				add_bytes(&f->sent, p->payload);
			if (svc->flags & SERVICE_PERSIST)
				persistence6(svc, p, now, 0);
			return -1;
		}
	}
	if (!datagram && !within_limits6(svc, &p->saddr, 1, now)) {
		count_drop(DROP_FLOW_RATE_LIMITED);
		return TC_ACT_SHOT;
	}
	if (!((svc->flags & SERVICE_SYNCED) && peer_flow6(svc, p, now)) &&
	    (!(svc->flags & SERVICE_PERSIST) || !persistence6(svc, p, now, -1))) {
		__u32 b = 0;
		if (place(svc, client_hash6(svc, &p->saddr, p->sport), &b) < 0) {
			count_drop(DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		struct backend6 *be = bpf_map_lookup_elem(&backends6, &b);
		if (!be || in6_is_zero(&be->addr)) {
			count_drop(DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		p->backend = b;
		p->bflags = be->flags;
		p->to_addr = be->addr;
		p->to_port = be->port;
		if (svc->flags & SERVICE_PERSIST)
			persistence6(svc, p, now, 1);
	}
	remember_flow6(svc, bk, f, p, now);
	if ((svc->flags & (SERVICE_SYNCED | SERVICE_DATAGRAM)) == SERVICE_SYNCED)
		tell_peers6(svc->id, p);
	return -1;
}

// A client's datagram to the backend `choose6` chose: destination rewritten (LVS-NAT).
static __noinline int forward6(struct __sk_buff *skb, struct packet6 *p)
{
	if (p->first_of_more) {
		struct fragment6 fr = {.daddr = p->to_addr, .backend = p->backend};
		bpf_map_update_elem(&fragments6, &p->frk, &fr, BPF_ANY);
	}
	struct bpf_fib_lookup fib;
	// A backend on this host: the stack delivers it, no route to look up.
	int rc = (p->bflags & BACKEND_LOCAL) ?
			 BPF_FIB_LKUP_RET_NOT_FWDED :
			 route6(skb, &fib, &p->saddr, &p->to_addr, p->tot_len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big6(skb, &fib, &p->saddr, &p->daddr);
	int why = rewrite6(skb, 1, &p->daddr, &p->to_addr, p->dport, p->to_port, p->hops, p->l4);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(p->backend, skb->len, 0);
	if (to_the_stack(rc))
		return TC_ACT_OK; // a backend on this host
	return send_by(skb, rc, &fib);
}

// Masquerade: the balancer's port (network order) for the client's datagrams to the chosen
// backend, coming from `local`; 0 when every port tried is another client's (as
// `masquerade_port`).
static __always_inline __u16 masquerade_port6(const struct service *svc, struct packet6 *p,
					      struct in6 *local, __u64 now)
{
	__u32 n = svc->port_count;
	if (n == 0)
		return 0;
	__u32 h = (__u32)placement_hash6_port(&p->saddr, p->sport);
	struct masq6_key k = {.backend_addr = p->to_addr, .backend_port = p->to_port};
	for (__u32 i = 0; i < MASQ_PROBES; i++) {
		__u16 port = bpf_htons(svc->port_base + (__u16)((h + i * 40503u) % n));
		k.port = port;
		struct masq6 *m = bpf_map_lookup_elem(&masq6, &k);
		if (m && in6_eq(&m->client_addr, &p->saddr) && m->client_port == p->sport &&
		    in6_eq(&m->service_addr, &p->daddr) && m->service_port == p->dport) {
			if (now - m->last_ns > REFRESH_NS)
				m->last_ns = now;
			if (!in6_eq(&m->local_addr, local))
				m->local_addr = *local; // the route to the backend changed
			return port;
		}
		if (m && now - m->last_ns <= svc->idle_ns)
			continue; // another client's
		struct masq6 v = {.client_addr = p->saddr,
				  .local_addr = *local,
				  .service_addr = p->daddr,
				  .client_port = p->sport,
				  .service_port = p->dport,
				  .last_ns = now};
		// Free (or idle): taken, unless another CPU took it just now.
		if (bpf_map_update_elem(&masq6, &k, &v, m ? BPF_EXIST : BPF_NOEXIST) == 0)
			return port;
	}
	return 0;
}

// Masquerade: the client's datagram to the chosen backend from a balancer address (the
// route's source; a backend on this host: its own address, through loopback) and a port of
// the pool's range.
static __noinline int masquerade6(struct __sk_buff *skb, const struct service *svc,
				  struct packet6 *p)
{
	struct bpf_fib_lookup fib = {};
	struct in6 any = {};
	int rc = BPF_FIB_LKUP_RET_NOT_FWDED;
	if (!(p->bflags & BACKEND_LOCAL))
		rc = route6_with(skb, &fib, &any, &p->to_addr, p->tot_len, BPF_FIB_LOOKUP_SRC);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big6(skb, &fib, &p->saddr, &p->daddr);
	int local = rc == BPF_FIB_LKUP_RET_NOT_FWDED;
	struct in6 from = p->to_addr;
	if (!local)
		__builtin_memcpy(&from, fib.ipv6_src, sizeof(from));
	if (!local && ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
		       in6_is_zero(&from))) {
		count_drop(DROP_FIB);
		return TC_ACT_SHOT;
	}
	__u16 port = masquerade_port6(svc, p, &from, bpf_ktime_get_ns());
	if (!port) {
		count_drop(DROP_NO_PORT);
		return TC_ACT_SHOT;
	}
	if (p->first_of_more) {
		struct fragment6 fr = {.saddr = from, .daddr = p->to_addr, .backend = p->backend};
		bpf_map_update_elem(&fragments6, &p->frk, &fr, BPF_ANY);
	}
	int why = rewrite_both6(skb, &p->saddr, &from, p->sport, port, &p->daddr, &p->to_addr,
				p->dport, p->to_port, p->hops, p->l4);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(p->backend, skb->len, 0);
	if (local)
		return to_loopback(skb);
	return send_by(skb, rc, &fib);
}

// As `within_reply_ratio`, for IPv6 flow `fk`.
static __noinline int within_reply_ratio6(const struct flow6_key *fk, int wild, __u32 ratio,
					 __u32 bytes)
{
	struct flow6_bucket *bk = flow6_bucket(fk, wild);
	struct in6 addr;
	__u16 port;
	struct flow6_slot *f = bk ? find_flow6(bk, fk, &addr, &port) : 0;
	if (!f || (__u64)f->replied + bytes > (__u64)ratio * f->sent)
		return 0;
	add_bytes(&f->replied, bytes);
	return 1;
}

// As `beyond_reply_ratio`, for the IPv6 reply `p`.
static __always_inline int beyond_reply_ratio6(struct packet6 *p)
{
	if (p->first_of_more) {
		struct fragment6 fr = {.flags = FRAGMENT_DROP};
		bpf_map_update_elem(&fragments6, &p->frk, &fr, BPF_ANY);
	}
	count_drop(DROP_AMPLIFICATION);
	return TC_ACT_SHOT;
}

// Masquerade: a backend's reply to one of the balancer's masquerade ports goes to the client
// whose port it is, from the listener's address. Anything else from the backend is left to
// the stack.
static __noinline int masquerade_reply6(struct __sk_buff *skb, const struct reply6 *r,
					struct packet6 *p)
{
	struct masq6_key mk = {.backend_addr = p->saddr, .backend_port = p->sport, .port = p->dport};
	struct masq6 *m = bpf_map_lookup_elem(&masq6, &mk);
	if (!m || !in6_eq(&m->local_addr, &p->daddr))
		return PASS_ON;
	struct in6 client = m->client_addr, vip = m->service_addr;
	__u16 cport = m->client_port, vport = m->service_port;
	__u32 b = r->backend;
	if (r->reply_ratio) {
		struct flow6_key fk = {.client_addr = client,
				       .service_addr = vip,
				       .client_port = cport,
				       .service_port = vport};
		if (!within_reply_ratio6(&fk, in6_is_zero(&r->service_addr), r->reply_ratio,
					 p->payload))
			return beyond_reply_ratio6(p);
	}
	struct bpf_fib_lookup fib;
	if (!from_the_backend_side6(skb, &fib, &p->saddr, &p->daddr, p->tot_len)) {
		count_drop(PASS_FORGED);
		return PASS_ON;
	}
	int rc = route6(skb, &fib, &vip, &client, p->tot_len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big6(skb, &fib, &p->saddr, &p->daddr);
	if (p->first_of_more) {
		struct fragment6 fr = {
			.saddr = vip, .daddr = client, .backend = b, .flags = FRAGMENT_REPLY};
		bpf_map_update_elem(&fragments6, &p->frk, &fr, BPF_ANY);
	}
	int why = rewrite_both6(skb, &p->saddr, &vip, p->sport, vport, &p->daddr, &client,
				p->dport, cport, p->hops, p->l4);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 1);
	if (to_the_stack(rc))
		return to_loopback(skb); // a client on this host
	return send_by(skb, rc, &fib);
}

// A backend's reply (`r` its mapping): from the listener's address to the client.
static __noinline int reply6(struct __sk_buff *skb, struct reply6 *r, struct packet6 *p)
{
	struct in6 *saddr = &p->saddr, *daddr = &p->daddr;
	__u16 sport = p->sport, dport = p->dport, tot_len = p->tot_len;
	__u32 l4 = p->l4;
	__u8 hops = p->hops;
	__u16 from_port = r->service_port;
	__u32 b = r->backend;
	struct flow6_key fk = {.client_addr = *daddr,
			       .service_addr = r->service_addr,
			       .client_port = dport,
			       .service_port = from_port};
	int wild = in6_is_zero(&fk.service_addr);
	struct bpf_fib_lookup fib;
	if (!from_the_backend_side6(skb, &fib, saddr, daddr, tot_len)) {
		count_drop(PASS_FORGED);
		return PASS_ON;
	}
	// A wildcard listener's: from the address its client sent to (to this host without a
	// flow: udplb's health checks, say).
	if (wild && !wildcard_flow6(&fk, saddr, sport)) {
		if (bpf_map_lookup_elem(&locals6, daddr))
			return PASS_ON;
		count_drop(DROP_FLOW_GONE);
		return TC_ACT_SHOT;
	}
	// Through loopback a reply is for this host: no route to look up.
	int rc = skb->ingress_ifindex == LOOPBACK_IFINDEX ?
			 BPF_FIB_LKUP_RET_NOT_FWDED :
			 route6(skb, &fib, &fk.service_addr, daddr, tot_len);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big6(skb, &fib, saddr, &fk.service_addr);
	// To this host itself: only a reply to a client of a flow this program placed.
	int local = to_the_stack(rc);
	if (local && !wild && !has_flow6(&fk))
		return PASS_ON;
	if (r->reply_ratio && !within_reply_ratio6(&fk, wild, r->reply_ratio, p->payload))
		return beyond_reply_ratio6(p);
	if (p->first_of_more) {
		struct fragment6 fr = {.saddr = fk.service_addr, .backend = b, .flags = FRAGMENT_REPLY};
		bpf_map_update_elem(&fragments6, &p->frk, &fr, BPF_ANY);
	}
	int why = rewrite6(skb, 0, saddr, &fk.service_addr, sport, from_port, hops, l4);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	count(b, skb->len, 1);
	if (local)
		return to_loopback(skb);
	return send_by(skb, rc, &fib);
}

// As `masquerade_port_of`, for IPv6.
static __always_inline __u16 masquerade_port6_of(const struct service *svc, struct in6 *client,
						 __u16 cport, struct in6 *vip, __u16 vport,
						 struct masq6_key *k, struct in6 *local)
{
	__u32 n = svc->port_count;
	if (n == 0)
		return 0;
	__u32 h = (__u32)placement_hash6_port(client, cport);
	for (__u32 i = 0; i < MASQ_PROBES; i++) {
		k->port = bpf_htons(svc->port_base + (__u16)((h + i * 40503u) % n));
		struct masq6 *m = bpf_map_lookup_elem(&masq6, k);
		if (m && in6_eq(&m->client_addr, client) && m->client_port == cport &&
		    in6_eq(&m->service_addr, vip) && m->service_port == vport) {
			*local = m->local_addr;
			return k->port;
		}
	}
	return 0;
}

// Rewrites one end of the datagram an ICMPv6 error quotes (`dst`: its destination, else its
// source), address and port, with the ICMPv6 checksum. Returns nonzero on failure.
static __always_inline int set_quoted6(struct __sk_buff *skb, int dst, struct in6 *old_addr,
				       struct in6 *new_addr, __u16 old_port, __u16 new_port)
{
	__s64 diff = bpf_csum_diff((__be32 *)old_addr, sizeof(*old_addr), (__be32 *)new_addr,
				   sizeof(*new_addr), 0);
	return diff < 0 ||
	       bpf_skb_store_bytes(skb, dst ? INNER6_DST_OFF : INNER6_SRC_OFF, new_addr,
				   sizeof(*new_addr), 0) ||
	       bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, (__u32)diff, 0) ||
	       bpf_skb_store_bytes(skb, dst ? INNER6_DPORT_OFF : INNER6_SPORT_OFF, &new_port,
				   sizeof(new_port), 0) ||
	       bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, old_port, new_port, sizeof(new_port));
}

// As `icmp_about_reply`, for IPv6: an ICMPv6 error from a router beyond the balancer about a
// reply, handed to the backend that sent it. Returns -1 when the packet is not such an error.
static __noinline int icmp6_about_reply(struct __sk_buff *skb)
{
	void *end = (void *)(long)skb->data_end;
	struct ip6hdr *ip = (void *)(long)skb->data + ETH_HLEN;
	if ((void *)(ip + 1) > end || ip->nexthdr != NEXTHDR_ICMP6)
		return -1;
	struct icmp6hdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end ||
	    (icmp->type != ICMP6_DEST_UNREACH && icmp->type != ICMP6_PACKET_TOO_BIG &&
	     icmp->type != ICMP6_TIME_EXCEEDED))
		return -1;
	struct ip6hdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > end || inner->nexthdr != IPPROTO_UDP ||
	    !in6_eq(&inner->saddr, &ip->daddr))
		return -1;
	struct udphdr *iudp = (void *)(inner + 1);
	if ((void *)(iudp + 1) > end)
		return -1;
	// The reply went from the listener (`vip`, `vport`) to the client.
	struct flow6_key fk = {.client_addr = inner->daddr,
			       .service_addr = inner->saddr,
			       .client_port = iudp->dest,
			       .service_port = iudp->source};
	struct in6 outer_src = ip->saddr;
	__u16 tot_len = bpf_ntohs(ip->payload_len) + sizeof(struct ip6hdr);
	__u8 hops = ip->hop_limit;
	struct service *svc = service6_at(&fk.service_addr, fk.service_port, 0);
	if (!svc)
		svc = service6_at(&fk.service_addr, fk.service_port, 1);
	if (!svc)
		return -1;
	struct in6 backend;
	__u16 bport;
	if (!flow6_backend(&fk, svc->flags & SERVICE_WILDCARD, &backend, &bport))
		return -1;
	struct bpf_fib_lookup fib;
	if (svc->flags & SERVICE_DSR) {
		__u32 gue = gue_ports6(svc, &fk.client_addr, fk.client_port);
		int rc = route_encapsulated6(skb, &fib, &backend, tot_len, gue);
		return encapsulated6(skb, &fib, rc, &backend, tot_len, NOT_COUNTED, gue);
	}
	struct in6 local = {};
	__u16 lport = 0;
	int masqueraded = svc->flags & SERVICE_MASQUERADE;
	if (masqueraded) {
		struct masq6_key mk = {.backend_addr = backend, .backend_port = bport};
		lport = masquerade_port6_of(svc, &fk.client_addr, fk.client_port, &fk.service_addr,
					    fk.service_port, &mk, &local);
		if (!lport)
			return -1;
	}
	int rc = route6(skb, &fib, masqueraded ? &local : &outer_src, &backend, tot_len);
	if (set_quoted6(skb, 0, &fk.service_addr, &backend, fk.service_port, bport) ||
	    (masqueraded &&
	     set_quoted6(skb, 1, &fk.client_addr, &local, fk.client_port, lport))) {
		count_drop(DROP_REWRITE);
		return TC_ACT_SHOT;
	}
	int why = take_hop(skb, hops);
	if (!why)
		why = set_addr6(skb, 1, &fk.service_addr, &backend, ICMP6_CSUM_OFF);
	if (!why && masqueraded)
		why = set_addr6(skb, 0, &outer_src, &local, ICMP6_CSUM_OFF);
	if (why) {
		count_drop(why - 1);
		return TC_ACT_SHOT;
	}
	if (to_the_stack(rc))
		return masqueraded ? to_loopback(skb) : TC_ACT_OK; // a backend on this host
	return send_by(skb, rc, &fib);
}

static __noinline int ingress6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ip6hdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return PASS_ON;
	if (ip->nexthdr == NEXTHDR_ICMP6)
		return icmp6_error(skb);
	struct packet6 p = {.saddr = ip->saddr,
			    .daddr = ip->daddr,
			    .frk = {.saddr = ip->saddr, .daddr = ip->daddr},
			    .l4 = L4_6_OFF,
			    .tot_len = bpf_ntohs(ip->payload_len) + sizeof(struct ip6hdr),
			    .hops = ip->hop_limit};
	if (ip->nexthdr == NEXTHDR_FRAGMENT) {
		struct frag6hdr *fh = (void *)(ip + 1);
		if ((void *)(fh + 1) > end || fh->nexthdr != IPPROTO_UDP)
			return PASS_ON;
		__u16 off = bpf_ntohs(fh->frag_off);
		p.frk.id = fh->id;
		if (off & 0xfff8) {
			int verdict = later_fragment6(skb, &p);
			// Called from here, not from `later_fragment6`: the stack of the calls in
			// a row stays within what a program has.
			return verdict == TO_ENCAPSULATE ? encapsulate6(skb, &p) : verdict;
		}
		p.first_of_more = off & 1;
		p.l4 += sizeof(struct frag6hdr);
	} else if (ip->nexthdr != IPPROTO_UDP) {
		return PASS_ON;
	}
	struct udphdr *udp = data + p.l4;
	if ((void *)(udp + 1) > end)
		return PASS_ON;
	p.sport = udp->source;
	p.dport = udp->dest;
	__u16 udp_len = bpf_ntohs(udp->len);
	p.payload = udp_len > sizeof(*udp) ? udp_len - sizeof(*udp) : 0;
	// A listener's datagram, or a backend's reply; a wildcard listener's datagram is known as
	// such once it is not a reply.
	int to_service = port_may_be(p.dport, 1);
	struct service6_key sk = {.addr = p.daddr, .port = p.dport};
	struct service *svc = to_service ? bpf_map_lookup_elem(&services6, &sk) : 0;
	struct reply6 *r = 0;
	if (!svc) {
		struct reply6_key rk = {.addr = p.saddr, .port = p.sport};
		if (port_may_be(p.sport, 0))
			r = bpf_map_lookup_elem(&replies6, &rk);
		if (!r && to_service)
			svc = service6_at(&p.daddr, p.dport, 1);
	}
	if (svc) {
		int verdict = choose6(skb, svc, &p);
		if (verdict >= 0)
			return verdict;
		if (svc->flags & SERVICE_MASQUERADE)
			return masquerade6(skb, svc, &p);
		if (svc->flags & SERVICE_DSR) {
			p.gue = gue_ports6(svc, &p.saddr, p.sport);
			if (p.first_of_more) {
				struct fragment6 fr = {.gue = p.gue,
						       .daddr = p.to_addr,
						       .backend = p.backend,
						       .flags = FRAGMENT_ENCAP};
				bpf_map_update_elem(&fragments6, &p.frk, &fr, BPF_ANY);
			}
			return encapsulate6(skb, &p);
		}
		return forward6(skb, &p);
	}
	if (r && (r->flags & BACKEND_MASQUERADE))
		return masquerade_reply6(skb, r, &p);
	if (r)
		return reply6(skb, r, &p);
	return PASS_ON;
}
