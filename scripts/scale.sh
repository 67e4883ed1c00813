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
# Each flow holds one connected UDP socket, so a size needs RLIMIT_NOFILE above it (raised
# here up to the hard limit) and as many free local ports (net.ipv4.ip_local_port_range): a
# size beyond either is reported as not reachable, with the limit that stops it
# (docs/performance.md, "Scaling with flows").
#
# Usage: scripts/scale.sh
# Env:   SIZES ("1000 10000 19000") ROUNDS (3) DURATION (3s: the traffic phase) WINDOW (256)
#        UDPLB (target/release/udplb)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-1000 10000 19000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3s}
WINDOW=${WINDOW:-256}
UDPLB=${UDPLB:-target/release/udplb}
BENCH=target/release/udplb-bench

NAME=scale
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
(($(nproc) >= 2)) || die "needs 2 CPUs (udplb on CPU 1, load and backends on CPU 0)"

cargo build --release --quiet -p udplb-bench || die "udplb-bench does not build"
if [[ $UDPLB == target/release/udplb ]]; then
    cargo build --release --quiet -p udplb || die "udplb does not build"
fi

ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
read -r port_low port_high </proc/sys/net/ipv4/ip_local_port_range
ports=$((port_high - port_low + 1))

start_echo taskset -c 0

# The descriptors one udplb process needs besides its flows (listener, epoll, admin, logs).
spare=64

echo "RLIMIT_NOFILE $nofile, local ports $port_low-$port_high ($ports); udplb on CPU 1, load on CPU 0" >&2
: >"$work/results"
for size in $SIZES; do
    if ((size + spare > nofile)); then
        echo "$size flows: not reachable here: one descriptor per flow needs RLIMIT_NOFILE >= $((size + spare)), hard limit is $nofile" >&2
        continue
    fi
    if ((size > ports)); then
        echo "$size flows: not reachable here: one local port per flow needs ip_local_port_range wider than $ports" >&2
        continue
    fi
    for round in $(seq "$ROUNDS"); do
        port=$(free_port)
        UDPLB_ALLOW_ROOT=1 taskset -c 1 "$UDPLB" --workers 1 --idle-timeout 300s \
            --max-flows $((size + 1000)) --shutdown-grace 0s \
            "127.0.0.1:$port" "${backends[@]}" >"$work/udplb.log" 2>&1 &
        lb=$!
        pids+=("$lb")
        # Ready when it forwards: one exchange through it (that flow is not counted below).
        ok=false
        for _ in $(seq 100); do
            if python3 - "$port" <<'EOF' 2>/dev/null; then ok=true; break; fi
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.05)
s.sendto(b"ping", ("127.0.0.1", int(sys.argv[1]))); s.recvfrom(64)
EOF
            sleep 0.05
        done
        $ok || { cat "$work/udplb.log" >&2; die "udplb did not forward"; }
        out=$(taskset -c 0 "$BENCH" flows --target "127.0.0.1:$port" --flows "$size" \
            --window "$WINDOW" --duration "$DURATION" --pid "$lb" --cpu 1)
        echo "$size $out" >>"$work/results"
        echo "  [$size $round] $out" >&2
        kill -KILL "$lb" 2>/dev/null || true
        wait "$lb" 2>/dev/null || true
    done
done

python3 - "$work/results" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    size, js = line.split(" ", 1)
    rows.setdefault(int(size), []).append(json.loads(js))
def med(rs, k):
    return statistics.median(r[k] for r in rs)
print(f"{'flows':>8} {'new_flows/s':>12} {'cpu1_busy':>9} {'ns/new_flow':>11} {'user_KiB/flow':>14} {'kernel_KiB/flow':>16} {'KiB/flow':>9} {'replies/s':>10} {'lost':>6}")
for size in sorted(rows):
    rs = rows[size]
    print(f"{size:>8} {med(rs,'new_flows_per_s'):>12.0f} {med(rs,'cpu_busy'):>9.2f} "
          f"{med(rs,'cpu_ns_per_new_flow'):>11.0f} {med(rs,'rss_kib_per_flow'):>14.2f} "
          f"{med(rs,'slab_kib_per_flow'):>16.2f} {med(rs,'kib_per_flow'):>9.2f} "
          f"{med(rs,'replies_per_s'):>10.0f} {sum(r['traffic_lost'] for r in rs):>6}")
EOF
