// scripts/kernel-bench.sh's programs. The same plain IPv4 forwarder at two hooks (tc ingress
// and XDP): a route lookup, the TTL decremented, both MAC addresses set, and a redirect out of
// the route's interface. What it cannot forward this way (no neighbour yet, not IPv4, TTL 1)
// goes to the stack. And two trivial ones: a sink and a pass for veth peers.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

static __always_inline int lookup(void *ctx, struct iphdr *ip, __u32 ifindex,
				  struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->tot_len = bpf_ntohs(ip->tot_len);
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	fib->ifindex = ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

// RFC 1624 incremental update for the TTL byte going down by one.
static __always_inline void decrement_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

// Returns the interface to send to, or 0 to leave the packet to the stack.
static __always_inline __u32 forward(void *ctx, void *data, void *data_end, __u32 ifindex)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ttl <= 1)
		return 0;
	struct bpf_fib_lookup fib;
	if (lookup(ctx, ip, ifindex, &fib) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	decrement_ttl(ip);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return fib.ifindex;
}

SEC("tc")
int tc_forward(struct __sk_buff *skb)
{
	__u32 out = forward(skb, (void *)(long)skb->data, (void *)(long)skb->data_end,
			    skb->ingress_ifindex);
	return out ? bpf_redirect(out, 0) : TC_ACT_OK;
}

SEC("xdp")
int xdp_forward(struct xdp_md *xdp)
{
	__u32 out = forward(xdp, (void *)(long)xdp->data, (void *)(long)xdp->data_end,
			    xdp->ingress_ifindex);
	return out ? bpf_redirect(out, 0) : XDP_PASS;
}

// For a sink: whatever arrives is dropped before the stack sees it.
SEC("tc/drop")
int tc_drop(struct __sk_buff *skb)
{
	return TC_ACT_SHOT;
}

// For a veth peer: a program there makes it run NAPI, which redirected frames need.
SEC("xdp/pass")
int xdp_pass(struct xdp_md *xdp)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
