#!/usr/bin/env bash
# UDP GSO/GRO pass-through: one bulk flow of 1400-byte datagrams, sent as GSO trains (or one
# datagram per send), to a sink that reads with UDP_GRO, straight (direct) and through udplb
# with and without `--gro`, in one run with interleaved rounds (medians).
#
# The sender and the sink (`udplb-bench bulk`) run on CPU 0, udplb (one worker) on CPU 1.
# Columns: datagrams/s the sink received, the sender's rate, and CPU 1's busy time per
# delivered datagram (from /proc/stat, softirq work included).
#
# Usage: scripts/gso.sh
# Env:   DURATION (5s) WARMUP (1s) ROUNDS (3) SEGMENT (1400) TRAIN (32, datagrams per GSO send)
#        PEERS ("direct udplb udplb-gro"), SENDS ("gso single")
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-3}
SEGMENT=${SEGMENT:-1400}
TRAIN=${TRAIN:-32}
PEERS=${PEERS:-direct udplb udplb-gro}
SENDS=${SENDS:-gso single}
UDPLB=${UDPLB:-target/release/udplb}

NAME=gso
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
(($(nproc) >= 2)) || die "needs 2 CPUs (udplb on CPU 1, sender and sink on CPU 0)"
build_release udplb udplb-bench || die "does not build"

: >"$work/results"
for round in $(seq "$ROUNDS"); do
    for send in $SENDS; do
        train=$TRAIN
        [[ $send == single ]] && train=1
        for peer in $PEERS; do
            sink="127.0.0.1:$(free_port)"
            target=$sink
            pid=
            if [[ $peer != direct ]]; then
                port=$(free_port)
                gro=()
                [[ $peer == udplb-gro ]] && gro=(--gro)
                UDPLB_ALLOW_ROOT=1 run_bg "$work/udplb.log" taskset -c 1 "$UDPLB" --workers 1 \
                    "${gro[@]}" --shutdown-grace 0s "127.0.0.1:$port" "$sink"
                pid=$bg_pid
                target="127.0.0.1:$port"
                # udplb logs "listening" once its workers run on the bound listener (5 s at
                # most). The sink exists only while the load runs: nothing answers a
                # forwarding probe yet.
                rc=0
                wait_output "$work/udplb.log" "listening" 1 "$pid" || rc=$?
                ((rc != 2)) || die "udplb exited: $(cat "$work/udplb.log")"
            fi
            before=$(cpu1_busy)
            out=$(taskset -c 0 "$BENCH" bulk --target "$target" --sink "$sink" \
                --segment "$SEGMENT" --train "$train" --duration "$DURATION" --warmup "$WARMUP")
            after=$(cpu1_busy)
            stop "$pid"
            echo "$send $peer $((after - before)) $out" >>"$work/results"
            echo "  [$round] $send $peer" >&2
        done
    done
done

python3 - "$work/results" "$(seconds "$DURATION" "$(seconds "$WARMUP")")" "$(getconf CLK_TCK)" \
    "$SEGMENT" "$TRAIN" <<'PY'
import json, statistics, sys
path, window, hz, segment, train = sys.argv[1:6]
window = float(window)
runs = {}
for line in open(path):
    send, peer, ticks, js = line.split(" ", 3)
    r = json.loads(js)
    # CPU 1 was measured over warmup + duration; the rate over the duration stands for both.
    r["cpu_ns"] = int(ticks) / int(hz) / (r["datagrams_per_sec"] * window) * 1e9 if r["datagrams_per_sec"] else None
    runs.setdefault((send, peer), []).append(r)
print(f"\none bulk flow, {segment}-byte datagrams; gso = {train} datagrams per send (UDP_SEGMENT), "
      "single = one per send; the sink reads with UDP_GRO; udplb on CPU 1, sender and sink on CPU 0")
print(f"{'send':<7} {'peer':<10} {'datagrams/s':>12} {'Mbit/s':>8} {'sent/s':>10} {'cpu1_ns/dgram':>13} {'x direct':>8} {'x udplb':>8}")
med = lambda k, f: statistics.median(f(r) for r in runs[k])
for (send, peer) in runs:
    rate = med((send, peer), lambda r: r["datagrams_per_sec"])
    direct = med((send, "direct"), lambda r: r["datagrams_per_sec"]) if (send, "direct") in runs else None
    plain = med((send, "udplb"), lambda r: r["datagrams_per_sec"]) if (send, "udplb") in runs else None
    cpu = [r["cpu_ns"] for r in runs[(send, peer)] if r["cpu_ns"] is not None]
    cpu_s = f"{statistics.median(cpu):.0f}" if cpu and peer != "direct" else "-"
    print(f"{send:<7} {peer:<10} {rate:>12.0f} {med((send, peer), lambda r: r['mbit_per_sec']):>8.0f} "
          f"{med((send, peer), lambda r: r['sent_per_sec']):>10.0f} {cpu_s:>13} "
          f"{(f'{rate / direct:.2f}' if direct else '-'):>8} {(f'{rate / plain:.2f}' if plain else '-'):>8}")
PY
