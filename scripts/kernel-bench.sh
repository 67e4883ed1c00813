#!/usr/bin/env bash
# The kernel data plane (`dataplane = "kernel"`, LVS-NAT in a tc program) against direct
# traffic, nftables conntrack DNAT (the kernel peer) and udplb's socket path, over veth: a
# client, a balancer and a backend host, each a network namespace this script makes (root).
#
# Every peer gets the same closed-loop load (`udplb-bench load` in the client namespace: FLOWS
# flows, OUTSTANDING requests in flight each, 64 B) and the same echo backends (`udplb-bench
# echo`, three ports in the backend namespace); the balancer namespace is the backends'
# gateway in every case:
#   direct    to one backend's address, routed by the balancer namespace (no balancer at all)
#   nftables  to the service address, DNAT by nftables' conntrack to the three backends
#   kernel    to the service address, udplb with dataplane = "kernel" (Maglev, flow mode)
#   datagram  the kernel path in datagram mode (every datagram placed anew, round robin)
#   persist   the kernel path with persistence = "60s" (by ip:port: the backends' load as
#             kernel's; a persistence map lookup more per datagram)
#   ratio     the kernel path with limits.reply_ratio = 10 (each reply looked up by its flow)
#   wildcard  the kernel path with the listener on 0.0.0.0:5300 (the load to the same address):
#             a datagram finds its listener after three more hash lookups, a reply its
#             flow's bucket
#   sync      the kernel path with [sync] (to a peer address nobody serves): each new flow told
#             to udplb through the ring buffer and looked up in the peers' flows
#   masquerade  the same with forwarding = "masquerade" (the backends answer the balancer)
#   dsr       the same with forwarding = "dsr": IP in IP to the backend host, which runs
#             `udplb decap`, holds the service address and answers over a link of its own
#             to the client (its echo then serves the service address)
#   dsr-gue   dsr with encapsulation = "gue": in UDP to port 6080 of the backend host, which
#             runs `udplb decap --gue-port 6080`
#   socket    to the service address, udplb with dataplane = "socket" (its relay, one worker)
#   base-PEER  any udplb peer run with the binary BASELINE instead (before and after a change)
#   direct6, kernel6  direct and the kernel path (nat) on IPv6: the same hosts on fd00:77::/32,
#             the same echo program on the backend host's IPv6 address
#   tc-forward, xdp-forward  to one backend's address (as direct), forwarded by the same plain
#             IPv4 forwarder (scripts/forward.bpf.c: route lookup, TTL, MACs, redirect) at tc
#             ingress or as native XDP on the balancer's veths: what the hook costs, apart from
#             udplb's own work. XDP's redirect into a veth needs NAPI on its peer, so the
#             client's and backend's veths get an XDP program that passes everything; with a
#             forward peer in the run, those hosts compute their own UDP checksums (every peer)
# Nothing is pinned: client, backends and balancer share both CPUs, as veth's softirq work runs
# on the sending CPU. CPU per reply is both CPUs' busy time (from /proc/stat, softirq
# included) over the replies: the generator and the echo cost the same for every peer, so the
# difference to direct is what the balancer costs. Rounds are interleaved; medians.
#
# NEW_FLOWS=1 measures new flows per second instead: `udplb-bench inject` sends Ethernet frames
# into the client's veth from two threads, open loop, a new client (source address and port)
# in every one, and the backend host drops everything at its veth (a tc program) so nothing
# answers. New flows/s is what reached the backend host's veth (its rx counter) per second:
# for kernel (and datagram) a placement each, for nftables a new conntrack entry each, for
# direct plain routing (no state: the ceiling). CPU per new flow as above. kernel's listener
# gets max_flows = MAX_FLOWS (1000000), so the run also fills its flow map. direct6 and
# kernel6 inject IPv6 clients. CLIENTS (16000000)
# distinct clients are sent from before one repeats: a small number (CLIENTS=64) makes the same
# open loop run over established flows instead (what each mode costs per datagram, with no
# endpoint in the way).
#
# Usage: scripts/kernel-bench.sh
# Env:   PEERS ("direct nftables kernel socket"; also: datagram persist ratio sync wildcard masquerade dsr dsr-gue direct6 kernel6
#        tc-forward xdp-forward)
#        ROUNDS (3) DURATION (5s) FLOWS (64)
#        OUTSTANDING (8) NEW_FLOWS (unset) MAX_FLOWS (1000000 with NEW_FLOWS) CLIENTS (16000000)
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=${PEERS:-direct nftables kernel socket}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
FLOWS=${FLOWS:-64}
OUTSTANDING=${OUTSTANDING:-8}
NEW_FLOWS=${NEW_FLOWS:-}
CLIENTS=${CLIENTS:-16000000}
MAX_FLOWS=${MAX_FLOWS:-$([[ -n $NEW_FLOWS ]] && echo 1000000 || true)}
UDPLB=${UDPLB:-target/release/udplb}

NAME=kernel-bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, eBPF)"
command -v nft >/dev/null || install_packages nftables
build_release udplb udplb-bench || die "does not build"

c=ulbkb-c b=ulbkb-b k=ulbkb-k
vip=10.77.9.1
cleanup_ns() { for n in $c $b $k; do ip netns del "$n" 2>/dev/null || true; done; }
cleanup_ns
trap 'cleanup_ns; cleanup' EXIT
for n in $c $b $k; do ip netns add $n; ip -n $n link set lo up; done
ip -n $b link add bc type veth peer name cb netns $c
ip -n $b link add bk type veth peer name kb netns $k
ip -n $b addr add 10.77.1.1/24 dev bc
ip -n $c addr add 10.77.1.2/24 dev cb
ip -n $b addr add 10.77.2.1/24 dev bk
ip -n $k addr add 10.77.2.2/24 dev kb
for l in "$b bc" "$c cb" "$b bk" "$k kb"; do read -r n i <<<"$l"; ip -n "$n" link set "$i" up; done
ip -n $c route add default via 10.77.1.1
ip -n $k route add default via 10.77.2.1
# The backends' own way to the client (used by dsr only).
ip -n $k link add kc type veth peer name ck netns $c
ip -n $k addr add 10.77.3.2/24 dev kc
ip -n $c addr add 10.77.3.1/24 dev ck
ip -n $k link set kc up
ip -n $c link set ck up
for i in all default ck cb; do ip netns exec $c sysctl -q -w net.ipv4.conf.$i.rp_filter=0; done
ip -n $k addr add 10.77.2.3/24 dev kb
ip -n $k addr add 10.77.2.4/24 dev kb
ip -n $b addr add $vip/32 dev lo
ip netns exec $b sysctl -q -w net.ipv4.ip_forward=1
# IPv6 beside it (`nodad`: usable at once; the link-local addresses' detection is waited out).
vip6=fd00:77:9::1
ip -n $b addr add fd00:77:1::1/64 dev bc nodad
ip -n $c addr add fd00:77:1::2/64 dev cb nodad
ip -n $b addr add fd00:77:2::1/64 dev bk nodad
ip -n $k addr add fd00:77:2::2/64 dev kb nodad
ip -n $b addr add $vip6/128 dev lo
ip -n $c -6 route add default via fd00:77:1::1
ip -n $k -6 route add default via fd00:77:2::1
ip netns exec $b sysctl -q -w net.ipv6.conf.all.forwarding=1
for _ in $(seq 50); do
    tentative=$(for n in $c $b $k; do ip -n "$n" -6 addr show tentative; done)
    [[ -z $tentative ]] && break
    sleep 0.1
done

if [[ " $PEERS " == *-forward* || -n $NEW_FLOWS ]]; then
    clang -O2 -g -Wall -target bpf -I/usr/include/$(uname -m)-linux-gnu \
        -c scripts/forward.bpf.c -o "$work/forward.o" || die "scripts/forward.bpf.c does not build"
    # A frame redirected by XDP loses the skb's "checksum still to fill in" mark, and veth
    # hands locally sent datagrams on with it: the hosts that send compute their checksums,
    # as a real NIC's traffic arrives (for every peer of the run alike).
    ip netns exec $c ethtool -K cb tx off >/dev/null
    ip netns exec $k ethtool -K kb tx off >/dev/null
fi

run_bg "$work/echo.out" ip netns exec $k "$BENCH" echo 10.77.2.2:7001 10.77.2.2:7002 10.77.2.2:7003
wait_output "$work/echo.out" '^listening' 3 "$bg_pid" || die "echo backends did not start"
backends='"10.77.2.2:7001", "10.77.2.2:7002", "10.77.2.2:7003"'
run_bg "$work/echo6.out" ip netns exec $k "$BENCH" echo "[fd00:77:2::2]:7001" "[fd00:77:2::2]:7002" "[fd00:77:2::2]:7003"
wait_output "$work/echo6.out" '^listening' 3 "$bg_pid" || die "IPv6 echo backends did not start"
backends6='"[fd00:77:2::2]:7001", "[fd00:77:2::2]:7002", "[fd00:77:2::2]:7003"'

# Starts peer $1 in the balancer; sets target (where the load goes).
start_peer() {
    local binary=$UDPLB
    if [[ $1 == base-* ]]; then
        [[ -n ${BASELINE:-} ]] || die "peer $1 needs BASELINE (another udplb binary)"
        binary=$BASELINE
        set -- "${1#base-}"
    fi
    case $1 in
        direct) target=10.77.2.2:7001 ;;
        direct6) target="[fd00:77:2::2]:7001" ;;
        tc-forward)
            for i in bc bk; do
                ip netns exec $b tc qdisc replace dev $i clsact
                ip netns exec $b tc filter add dev $i ingress bpf direct-action obj "$work/forward.o" sec tc
            done
            target=10.77.2.2:7001
            ;;
        xdp-forward)
            for i in bc bk; do ip -n $b link set dev $i xdpdrv obj "$work/forward.o" sec xdp; done
            # A veth takes frames redirected to it only if its peer runs NAPI: XDP there.
            ip -n $c link set dev cb xdpdrv obj "$work/forward.o" sec xdp/pass
            ip -n $k link set dev kb xdpdrv obj "$work/forward.o" sec xdp/pass
            target=10.77.2.2:7001
            ;;
        nftables)
            ip netns exec $b nft -f - <<NFT
table ip udplb_bench {
    chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr $vip udp dport 5300 dnat to numgen inc mod 3 map { 0 : 10.77.2.2 . 7001, 1 : 10.77.2.2 . 7002, 2 : 10.77.2.2 . 7003 }
    }
}
NFT
            target=$vip:5300
            ;;
        kernel | socket | masquerade | dsr | dsr-gue | datagram | persist | ratio | sync | kernel6 | wildcard)
            local dataplane=$1 forwarding=nat pool=$backends mode=flow address=$vip:5300
            local remember= flow_sync=
            if [[ $1 == sync ]]; then
                dataplane=kernel
                printf 'a-key-for-the-benchmark-only\n' >"$work/sync.key"
                chmod 600 "$work/sync.key"
                flow_sync=$'[sync]\nlisten = "127.0.0.1:7946"\npeers = ["127.0.0.2:7946"]\n'"key_file = \"$work/sync.key\""
            fi
            [[ $1 == persist ]] && dataplane=kernel remember='persistence = "60s"'
            [[ $1 == ratio ]] && dataplane=kernel remember='limits = { reply_ratio = 10 }'
            [[ $1 == kernel6 ]] && dataplane=kernel pool=$backends6 address="[$vip6]:5300"
            [[ $1 == wildcard ]] && dataplane=kernel address=0.0.0.0:5300
            [[ $1 == masquerade ]] && dataplane=kernel forwarding=masquerade
            [[ $1 == datagram ]] && dataplane=kernel mode=datagram
            local encapsulation=
            if [[ $1 == dsr || $1 == dsr-gue ]]; then
                dataplane=kernel forwarding=dsr
                local gue=()
                if [[ $1 == dsr-gue ]]; then
                    gue=(--gue-port 6080)
                    encapsulation=$'encapsulation = "gue"\ngue_port = 6080'
                fi
                pool='"10.77.2.2:5300", "10.77.2.3:5300", "10.77.2.4:5300"'
                ip -n $k addr add $vip/32 dev lo
                ip -n $k route add 10.77.1.0/24 via 10.77.3.1
                run_bg "$work/dsr-echo.out" ip netns exec $k "$BENCH" echo $vip:5300
                dsr_echo_pid=$bg_pid
                wait_output "$work/dsr-echo.out" '^listening' 1 "$bg_pid" || die "echo on $vip did not start"
                run_bg "$work/decap.log" ip netns exec $k "$UDPLB" decap -i kb -b 10.77.2.1 "${gue[@]}"
                decap_pid=$bg_pid
                wait_output "$work/decap.log" 'taking IP in IP' 1 "$bg_pid" || die "udplb decap did not start"
            fi
            cat >"$work/udplb.toml" <<CONFIG
[runtime]
workers = 1
shutdown_grace = "0s"
# Nothing pinned on the host: each run starts afresh and leaves nothing behind.
bpf_dir = "$work/bpf"
[admin]
listen = "127.0.0.1:9190"
[listeners.l]
address = "$address"
pool = "p"
mode = "$mode"
dataplane = "$dataplane"
$([[ $dataplane == kernel ]] && echo 'interfaces = ["bc", "bk"]')
$([[ -n $MAX_FLOWS ]] && echo "max_flows = $MAX_FLOWS")
$remember
[pools.p]
scheduler = "maglev"
backends = [$pool]
$([[ $dataplane == kernel ]] && echo "forwarding = \"$forwarding\"")
$encapsulation
$flow_sync
CONFIG
            UDPLB_ALLOW_ROOT=1 run_bg "$work/udplb.log" ip netns exec $b "$binary" run -c "$work/udplb.toml"
            udplb_pid=$bg_pid
            target=${address/0.0.0.0/$vip}
            ;;
        *) die "unknown peer $1" ;;
    esac
}

stop_peer() {
    case ${1#base-} in
        nftables) ip netns exec $b nft delete table ip udplb_bench ;;
        tc-forward) for i in bc bk; do ip netns exec $b tc qdisc del dev $i clsact; done ;;
        xdp-forward)
            for i in bc bk; do ip -n $b link set dev $i xdpdrv off; done
            ip -n $c link set dev cb xdpdrv off
            ip -n $k link set dev kb xdpdrv off
            ;;
        kernel | socket | masquerade | datagram | persist | ratio | sync | kernel6 | wildcard) stop "$udplb_pid" TERM ;;
        dsr | dsr-gue)
            stop "$udplb_pid" TERM
            stop "$decap_pid" TERM
            stop "$dsr_echo_pid" TERM
            ip -n $k route del 10.77.1.0/24 via 10.77.3.1
            ip -n $k addr del $vip/32 dev lo
            ;;
    esac
}

busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# One peer's new flows: inject into the client's veth, count what the backend host received.
measure_new_flows() {
    local arrived_before arrived_after before after out
    ip netns exec $k tc qdisc replace dev kb clsact
    ip netns exec $k tc filter add dev kb ingress bpf direct-action obj "$work/forward.o" sec tc/drop
    arrived_before=$(ip netns exec $k cat /sys/class/net/kb/statistics/rx_packets)
    before=$(busy_ticks)
    local first=10.77.128.0
    [[ $target == \[* ]] && first=fd00:77:128::
    out=$(ip netns exec $c "$BENCH" inject --interface cb --gateway-mac "$(ip netns exec $b cat /sys/class/net/bc/address)" \
        --target "$target" --first-source $first --clients "$CLIENTS" --threads 2 --duration "$DURATION")
    after=$(busy_ticks)
    arrived_after=$(ip netns exec $k cat /sys/class/net/kb/statistics/rx_packets)
    ip netns exec $k tc qdisc del dev kb clsact
    echo "$peer $((after - before)) $((arrived_after - arrived_before)) $out"
}

# One peer's closed loop: the CPU both CPUs spent over the 1 s warmup and the measured window,
# and the replies in that time (at the measured rate).
measure_closed_loop() {
    local before after out replies
    before=$(busy_ticks)
    out=$(ip netns exec $c "$BENCH" load --target "$target" --flows "$FLOWS" \
        --outstanding "$OUTSTANDING" --duration "$DURATION" --warmup 1s --json)
    after=$(busy_ticks)
    replies=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(round(r["replies_per_sec"] * (r["duration_s"] + 1)))' "$out")
    echo "$peer $((after - before)) $replies $out"
}

measure=measure_closed_loop
if [[ -n $NEW_FLOWS ]]; then
    measure=measure_new_flows
    # The injected clients' networks, so that reverse-path checks and routes know them.
    ip -n $b route add 10.77.128.0/17 via 10.77.1.2
    ip -n $b -6 route add fd00:77:128::/64 via fd00:77:1::2
fi
: >"$work/results"
for round in $(seq "$ROUNDS"); do
    for peer in $PEERS; do
        start_peer "$peer"
        wait_forwarding -s 10 "$target" ip netns exec $c || {
            cat "$work/udplb.log" 2>/dev/null >&2
            die "$peer does not forward"
        }
        line=$($measure)
        stop_peer "$peer"
        echo "$line" >>"$work/results"
        echo "  [$peer $round] $line" >&2
    done
done

# One summary for both modes: per peer the medians, the rate against direct of its family
# (direct6 for the IPv6 peers) and both CPUs' busy time per counted datagram or reply.
python3 - "$work/results" "$(getconf CLK_TCK)" "${NEW_FLOWS:+open}" <<'EOF'
import json, statistics, sys
ticks_per_s, open_loop = int(sys.argv[2]), sys.argv[3] == "open"
rows = {}
for line in open(sys.argv[1]):
    peer, ticks, counted, js = line.split(" ", 3)
    r = json.loads(js)
    r["rate"] = r["replies_per_sec"] if "replies_per_sec" in r else int(counted) / r["duration_s"]
    r["cpu_ns"] = int(ticks) / ticks_per_s * 1e9 / int(counted) if int(counted) else None
    rows.setdefault(peer, []).append(r)
med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)
direct_of = lambda peer: "direct6" if peer.endswith("6") else "direct"
base = lambda peer: med(rows[direct_of(peer)], "rate") if direct_of(peer) in rows else None
if open_loop:
    # Each datagram a new flow unless `repeated` (clients sent from more than once).
    print(f"{'peer':>10} {'datagrams/s':>12} {'x direct':>9} {'sent/s':>10} {'cpu_ns/dgram':>12} {'repeated':>9}")
else:
    print(f"{'peer':>10} {'replies/s':>12} {'x direct':>9} {'p50_us':>7} {'p99_us':>7} {'cpu_ns/reply':>12} {'lost':>6}")
for peer, rs in rows.items():
    rate = med(rs, "rate")
    ratio = f"{rate / base(peer):.2f}" if base(peer) else "-"
    if open_loop:
        print(f"{peer:>10} {rate:>12.0f} {ratio:>9} {med(rs, 'sent_per_sec'):>10.0f} "
              f"{med(rs, 'cpu_ns'):>12.0f} {str(any(r['clients_repeated'] for r in rs)):>9}")
    else:
        print(f"{peer:>10} {rate:>12.0f} {ratio:>9} {med(rs, 'p50_us'):>7.0f} {med(rs, 'p99_us'):>7.0f} "
              f"{med(rs, 'cpu_ns'):>12.0f} {sum(r['lost'] for r in rs):>6}")
EOF
