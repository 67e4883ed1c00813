// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// The backend's side of udplb's `forwarding = "dsr"`: a tc program at ingress of a backend's
// interface that takes the outer headers off what a udplb balancer encapsulated (IP in IP, as
// LVS-TUN does, or IPv6 in IPv6; or either in UDP to a GUE port, as katran does), so that the
// stack delivers the client's own datagram, to the listener's address the backend holds (on
// its loopback), and the backend answers the client directly. For backends without the
// kernel's ipip or fou modules (or that would rather not have a tunnel device); `udplb decap`
// loads it.
//
// Owns: recognising an encapsulated datagram from a known balancer and decapsulating it.
// Must not: accept an encapsulated datagram from any other source (anyone could otherwise hand
// the backend a datagram claiming any client's address), or touch anything else.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// The balancers' addresses (network order) whose IP in IP is taken.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} balancers SEC(".maps");

// The same for IPv6 in IPv6.
struct in6 {
	__u32 w[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct in6);
	__type(value, __u8);
} balancers6 SEC(".maps");

// The UDP ports (network order) GUE arrives on (`udplb decap --gue-port`).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u16);
	__type(value, __u8);
} gue_ports SEC(".maps");

struct ip6hdr {
	__u32 vtc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	struct in6 saddr;
	struct in6 daddr;
};

#define NEXTHDR_IPV6 41

// Per CPU: [0] decapsulated, [1] encapsulated but from an unknown source (left to the stack),
// [2] of [0], those in GUE.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} decap_counts SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&decap_counts, &what);
	if (n)
		*n += 1;
}

// Whether `udp` (ending by `end`) is a GUE header: to a GUE port, an IP packet of `version`
// right after it.
static __always_inline int is_gue(struct udphdr *udp, void *end, __u8 version)
{
	__u8 *inner = (void *)(udp + 1);
	if ((void *)(inner + 1) > end || (*inner >> 4) != version)
		return 0;
	__u16 port = udp->dest;
	return bpf_map_lookup_elem(&gue_ports, &port) != 0;
}

// The outer headers (`headers` bytes, a UDP one among them when `gue`) taken off a datagram
// from a known balancer, or, when `known` is 0, the datagram left to the stack; counted.
static __always_inline int take_off(struct __sk_buff *skb, int known, __s32 headers, int gue)
{
	if (!known) {
		count(1);
		return TC_ACT_UNSPEC;
	}
	if (bpf_skb_adjust_room(skb, -headers, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	count(0);
	if (gue)
		count(2);
	return TC_ACT_OK;
}

// IPv6 in IPv6 (or in GUE) from a known balancer: the outer headers taken off.
static __always_inline int decap6(struct __sk_buff *skb, void *data, void *end)
{
	struct ip6hdr *outer = data + sizeof(struct ethhdr);
	if ((void *)(outer + 1) > end)
		return TC_ACT_UNSPEC;
	__s32 headers = sizeof(struct ip6hdr);
	if (outer->nexthdr == IPPROTO_UDP) {
		if (!is_gue((void *)(outer + 1), end, 6))
			return TC_ACT_UNSPEC;
		headers += sizeof(struct udphdr);
	} else if (outer->nexthdr != NEXTHDR_IPV6) {
		return TC_ACT_UNSPEC;
	}
	struct ip6hdr *inner = (void *)outer + headers;
	if ((void *)(inner + 1) > end || (bpf_ntohl(inner->vtc_flow) >> 28) != 6)
		return TC_ACT_UNSPEC;
	struct in6 from = outer->saddr;
	return take_off(skb, bpf_map_lookup_elem(&balancers6, &from) != 0, headers,
			headers > (__s32)sizeof(struct ip6hdr));
}

SEC("classifier")
int udplb_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return decap6(skb, data, end);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	struct iphdr *outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > end || outer->ihl != 5 || (outer->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_UNSPEC;
	__s32 headers = sizeof(struct iphdr);
	if (outer->protocol == IPPROTO_UDP) {
		if (!is_gue((void *)(outer + 1), end, 4))
			return TC_ACT_UNSPEC;
		headers += sizeof(struct udphdr);
	} else if (outer->protocol != IPPROTO_IPIP) {
		return TC_ACT_UNSPEC;
	}
	struct iphdr *inner = (void *)outer + headers;
	if ((void *)(inner + 1) > end || inner->version != 4)
		return TC_ACT_UNSPEC;
	__u32 from = outer->saddr;
	return take_off(skb, bpf_map_lookup_elem(&balancers, &from) != 0, headers,
			headers > (__s32)sizeof(struct iphdr));
}

char _license[] SEC("license") = "Dual BSD/GPL";
