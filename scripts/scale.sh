#!/usr/bin/env bash
# How udplb scales with concurrent flows: new flows per second on one core, memory per flow
# (udplb's resident memory plus the kernel's slab: sockets, files, epoll items), and replies/s
# with every flow live.
#
# Three echo backends and the generator (`udplb-bench flows`: N flows from N loopback
# addresses through one socket) run on CPU 0; udplb runs with one worker pinned to CPU 1, so
# "new flows/s" is what one core opens. Every size runs ROUNDS times on a fresh udplb; the
# table shows medians.
#
# Every size runs twice on each udplb: "first", its first N flows (udplb starts with no
# upstream socket), then, once those idled out, "again": N new flows (another generator socket,
# so other client ports). Memory per flow is from "first"; replies/s with N flows live from
# "again", with the CPU of CPU 1 per exchange (request and reply) on those established flows,
# the bar a new flow's cost is set against.
#
# With one connected UDP socket per flow (the default), a size needs RLIMIT_NOFILE above it
# (raised here up to the hard limit) and as many free local ports
# (net.ipv4.ip_local_port_range). With SHARED=1 (`--shared-upstream`) one socket carries one
# flow per backend, so both limits apply to N / ECHO_BACKENDS. A size beyond either is reported
# as not reachable, with the limit that stops it (docs/performance.md, "Scaling with flows").
#
# With SYNC=1 every round runs twice, udplb started from a configuration file each time (the
# same settings as the flags): without `[sync]` ("nosync"), then with it ("sync": flow-state
# sync to one peer, an echo on CPU 0 that sends every message back, so udplb also receives
# and authenticates as much as it sends, as in a pair). The rows then compare the cost of a
# new flow with and without the sync in the same run.
#
# Usage: scripts/scale.sh
# Env:   SIZES ("1000 10000 19000") ROUNDS (3) DURATION (3s: the traffic phase) WINDOW (256)
#        SHARED (0) SYNC (0) ECHO_BACKENDS (3) UDPLB (target/release/udplb)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-1000 10000 19000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3s}
WINDOW=${WINDOW:-256}
SHARED=${SHARED:-0}
SYNC=${SYNC:-0}
UDPLB=${UDPLB:-target/release/udplb}
BENCH=target/release/udplb-bench

NAME=scale
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
(($(nproc) >= 2)) || die "needs 2 CPUs (udplb on CPU 1, load and backends on CPU 0)"

build_release udplb-bench || die "udplb-bench does not build"
build_release udplb || die "udplb does not build"

ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
read -r port_low port_high </proc/sys/net/ipv4/ip_local_port_range
ports=$((port_high - port_low + 1))

start_echo taskset -c 0
nb=${#backends[@]}
lbflags=()
((SHARED)) && lbflags=(--shared-upstream)

# The descriptors one udplb process needs besides its flows (listener, epoll, admin, logs).
spare=64

variants=(flags)
if ((SYNC)); then
    variants=(nosync sync)
    run_bg "$work/peer.out" taskset -c 0 "$BENCH" echo 127.0.0.1:0
    wait_output "$work/peer.out" '^listening' 1 "$bg_pid" || die "the sync peer did not start"
    peer=$(awk '/^listening/ {print $2}' "$work/peer.out")
    install -m 0600 /dev/null "$work/sync.key"
    echo "a-key-for-the-scale-benchmark" >"$work/sync.key"
fi

# Starts udplb (variant $1: its flags, or a configuration file with or without [sync]) with
# the listener on port $2, the admin endpoint on $3, idle timeout $4 s and $5 flows at most.
start_udplb() {
    local variant=$1 port=$2 admin=$3 idle=$4 max=$5
    if [[ $variant == flags ]]; then
        UDPLB_ALLOW_ROOT=1 run_bg "$work/udplb.log" taskset -c 1 "$UDPLB" --workers 1 \
            --idle-timeout "${idle}s" --max-flows "$max" --shutdown-grace 0s \
            --admin "127.0.0.1:$admin" "${lbflags[@]}" "127.0.0.1:$port" "${backends[@]}"
        return
    fi
    local list sync="" shared=false
    ((SHARED)) && shared=true
    list=$(printf '"%s", ' "${backends[@]}")
    if [[ $variant == sync ]]; then
        sync="[sync]
listen = \"127.0.0.1:$(free_port)\"
peers = [\"$peer\"]
key_file = \"$work/sync.key\""
    fi
    cat >"$work/udplb.toml" <<CONFIG
[runtime]
workers = 1
shutdown_grace = "0s"
[admin]
listen = "127.0.0.1:$admin"
[listeners.l]
address = "127.0.0.1:$port"
pool = "p"
idle_timeout = "${idle}s"
max_flows = $max
shared_upstream = $shared
[pools.p]
backends = [${list%, }]
$sync
CONFIG
    UDPLB_ALLOW_ROOT=1 run_bg "$work/udplb.log" taskset -c 1 "$UDPLB" run -c "$work/udplb.toml"
}

# Live flows of the udplb whose admin endpoint is on port $1.
live_flows() {
    python3 - "$1" <<'EOF'
import json, sys, urllib.request
s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/stats", timeout=2))
print(sum(l["flows"]["live"] for l in s["listeners"]))
EOF
}

echo "RLIMIT_NOFILE $nofile, local ports $port_low-$port_high ($ports), $nb backends, shared upstream sockets: $SHARED; udplb on CPU 1, load on CPU 0" >&2
: >"$work/results"
for size in $SIZES; do
    sockets=$size what="one descriptor and one local port per flow"
    if ((SHARED)); then
        sockets=$(((size + nb - 1) / nb)) what="a socket per $nb flows (one per backend)"
    fi
    if ((sockets + spare > nofile)); then
        echo "$size flows: not reachable here: $what needs RLIMIT_NOFILE >= $((sockets + spare)), hard limit is $nofile" >&2
        continue
    fi
    if ((sockets > ports)); then
        echo "$size flows: not reachable here: $what needs ip_local_port_range wider than $ports" >&2
        continue
    fi
    # Flows idle out after this long (between "first" and "again"): longer than opening them
    # all takes (at 20k new flows/s or more), so the first are still live when the last open.
    IDLE=$((3 + size / 20000))
    for round in $(seq "$ROUNDS"); do
      for variant in "${variants[@]}"; do
        port=$(free_port)
        admin=$(free_port)
        start_udplb "$variant" "$port" "$admin" "$IDLE" $((size + 1000))
        lb=$bg_pid
        # Ready when it forwards: one flow through it (that flow is not counted below).
        wait_forwarding -p "$lb" "127.0.0.1:$port" taskset -c 0 || {
            cat "$work/udplb.log" >&2
            die "udplb did not forward"
        }
        out=$(taskset -c 0 "$BENCH" flows --target "127.0.0.1:$port" --flows "$size" \
            --window "$WINDOW" --duration 0s --pid "$lb" --cpu 1)
        echo "$size $variant first $out" >>"$work/results"
        echo "  [$size $variant $round first] $out" >&2
        # Until the first flows idled out, and past the 100 ms for which a released shared
        # socket waits before serving another flow to the same backend.
        for _ in $(seq $((IDLE * 20 + 100))); do
            (($(live_flows "$admin") == 0)) && break
            sleep 0.1
        done
        (($(live_flows "$admin") == 0)) || die "flows did not idle out"
        sleep 0.3
        out=$(taskset -c 0 "$BENCH" flows --target "127.0.0.1:$port" --flows "$size" \
            --window "$WINDOW" --duration "$DURATION" --pid "$lb" --cpu 1)
        echo "$size $variant again $out" >>"$work/results"
        echo "  [$size $variant $round again] $out" >&2
        stop "$lb"
      done
    done
done

python3 - "$work/results" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    size, variant, phase, js = line.split(" ", 3)
    rows.setdefault((int(size), variant, phase), []).append(json.loads(js))
def med(rs, k):
    return statistics.median(r[k] for r in rs)
print(f"{'flows':>8} {'udplb':>7} {'phase':>6} {'new_flows/s':>12} {'cpu1_busy':>9} {'steal':>6} {'ns/new_flow':>11} {'user_KiB/flow':>14} {'kernel_KiB/flow':>16} {'KiB/flow':>9} {'replies/s':>10} {'ns/exchange':>11} {'lost':>6}")
for (size, variant, phase) in sorted(rows, key=lambda k: (k[0], k[2] != "first", k[1])):
    rs = rows[(size, variant, phase)]
    first = phase == "first"
    mem = lambda k: f"{med(rs, k):.2f}" if first else "-"
    traffic = "-" if first else f"{med(rs, 'replies_per_s'):.0f}"
    exchange = "-" if first or rs[0].get("cpu_ns_per_reply") is None else f"{med(rs, 'cpu_ns_per_reply'):.0f}"
    steal = f"{med(rs, 'cpu_steal'):.2f}" if all(r.get("cpu_steal") is not None for r in rs) else "-"
    print(f"{size:>8} {variant:>7} {phase:>6} {med(rs,'new_flows_per_s'):>12.0f} {med(rs,'cpu_busy'):>9.2f} {steal:>6} "
          f"{med(rs,'cpu_ns_per_new_flow'):>11.0f} {mem('rss_kib_per_flow'):>14} "
          f"{mem('slab_kib_per_flow'):>16} {mem('kib_per_flow'):>9} "
          f"{traffic:>10} {exchange:>11} {sum(r['traffic_lost'] for r in rs):>6}")
EOF
