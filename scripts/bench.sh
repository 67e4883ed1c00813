#!/usr/bin/env bash
# Measures udplb against a direct client -> backend baseline in the same run.
#
# Three echo backends (`udplb-bench echo`); the closed-loop generator (`udplb-bench load`) runs
# FLOWS flows x OUTSTANDING requests in flight x SIZE-byte payloads for DURATION, straight at
# the backends (direct), and through udplb in flow mode and in datagram mode. Rounds are
# interleaved (direct, flow, datagram, direct, ...) so drift on a shared machine hits every
# mode alike. The table shows each mode's median replies/s, its ratio to the direct median,
# the median over rounds of the ratio to that round's direct run, the median p99, the CPU
# seconds udplb used during the measured window (utime+stime from /proc/PID/stat), and the
# loss summed over rounds.
#
# Usage: scripts/bench.sh
# Env:   FLOWS (64) OUTSTANDING (8) SIZE (64) DURATION (10s) WARMUP (1s) ROUNDS (3)
#        WORKERS (2, udplb --workers) THREADS (1, generator threads)
#        MODES ("direct flow datagram": which to measure, in round order)
#        UDPLB (target/release/udplb: set it to measure another build)
set -euo pipefail
cd "$(dirname "$0")/.."

FLOWS=${FLOWS:-64}
OUTSTANDING=${OUTSTANDING:-8}
SIZE=${SIZE:-64}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-1}
MODES=${MODES:-direct flow datagram}
UDPLB=${UDPLB:-target/release/udplb}
BENCH=target/release/udplb-bench

NAME=bench
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

needs_udplb=false
for mode in $MODES; do
    case $mode in
        direct) ;;
        flow | datagram) needs_udplb=true ;;
        *) die "unknown mode '$mode' in MODES (direct, flow, datagram)" ;;
    esac
done

build_release udplb-bench || die "udplb-bench does not build"
if $needs_udplb; then
    build_release udplb || die "udplb does not build (MODES=direct measures the baseline alone)"
    [[ -x $UDPLB ]] || die "no udplb binary at $UDPLB"
fi

lb_pid=

sleep_before_measuring=$(seconds "$WARMUP" 0.03)

# cpu_ticks PID -> utime+stime (fields 14 and 15; the text after the ")" of comm starts at 3).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

load() { # load TARGET... -> one JSON line
    local args=() t
    for t in "$@"; do args+=(--target "$t"); done
    "$BENCH" load "${args[@]}" --flows "$FLOWS" --outstanding "$OUTSTANDING" --size "$SIZE" \
        --duration "$DURATION" --warmup "$WARMUP" --threads "$THREADS" --json
}

# udplb_forwards ADDR: waits (10 s) until udplb forwards on ADDR; exits with its output if it
# does not.
udplb_forwards() {
    local rc=0
    wait_forwarding -p "$lb_pid" "$1" || rc=$?
    ((rc)) || return 0
    if ((rc == 2)); then
        echo "bench: udplb exited at startup; its output:" >&2
    else
        echo "bench: udplb does not forward on $1 within 10 s; its output:" >&2
    fi
    sed 's/^/    /' "$work/udplb.log" >&2
    exit 1
}

# Each measurement leaves its JSON line in $work/run.json (no subshell: udplb's pid must stay
# visible to the cleanup trap).
measure_direct() { load "${backends[@]}" >"$work/run.json"; }

measure_udplb() { # measure_udplb MODE: the JSON line gets udplb_cpu_s added
    local port before after
    port=$(free_port)
    UDPLB_ALLOW_ROOT=1 run_bg "$work/udplb.log" \
        "$UDPLB" --workers "$WORKERS" --mode "$1" "127.0.0.1:$port" "${backends[@]}"
    lb_pid=$bg_pid
    udplb_forwards "127.0.0.1:$port"
    load "127.0.0.1:$port" >"$work/run.json" &
    local load_pid=$!
    sleep "$sleep_before_measuring" # CPU counts from the end of the warmup
    before=$(cpu_ticks "$lb_pid")
    wait "$load_pid" || die "load through udplb ($1 mode) failed"
    after=$(cpu_ticks "$lb_pid")
    stop "$lb_pid" # measured already: skip udplb's shutdown grace (5 s of draining)
    lb_pid=
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
r["udplb_cpu_s"] = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
open(sys.argv[1], "w").write(json.dumps(r) + "\n")' "$work/run.json" "$before" "$after" "$(getconf CLK_TCK)"
}

summary() { # summary MODE JSON -> one progress line
    python3 -c '
import json, sys
r = json.loads(sys.argv[2])
rps, p99, lost = r["replies_per_sec"], r["p99_us"], r["lost"]
cpu = "  udplb cpu %.1fs" % r["udplb_cpu_s"] if "udplb_cpu_s" in r else ""
print(f"  {sys.argv[1]:<9} {rps:>9.0f}/s  p99 {p99}us  lost {lost}{cpu}")' "$1" "$2"
}

# shellcheck disable=SC2119 # no command prefix
start_echo
echo "udplb bench: $FLOWS flows x $OUTSTANDING outstanding x $SIZE bytes, $DURATION per run" \
    "(+$WARMUP warmup), $ROUNDS rounds, $WORKERS udplb workers, $THREADS generator threads," \
    "$(nproc) CPUs; backends ${backends[*]}" >&2
: >"$work/results"
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    for mode in $MODES; do
        if [[ $mode == direct ]]; then measure_direct; else measure_udplb "$mode"; fi
        out=$(cat "$work/run.json")
        summary "$mode" "$out" >&2
        echo "$mode $out" >>"$work/results"
    done
done

# shellcheck disable=SC2086 # one argument per mode
python3 - "$work/results" $MODES <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, js = line.split(" ", 1)
    runs.setdefault(mode, []).append(json.loads(js))
modes = sys.argv[2:]

def med(mode, key):
    vals = [r[key] for r in runs[mode] if key in r]
    return statistics.median(vals) if vals else None

direct = med("direct", "replies_per_sec") if "direct" in runs else None

def ratio(x):
    return f"{x / direct:.2f}" if direct else "-"

def round_ratio(mode):
    if "direct" not in runs:
        return "-"
    pairs = [(r["replies_per_sec"], d["replies_per_sec"]) for r, d in zip(runs[mode], runs["direct"])]
    return f"{statistics.median(r / d for r, d in pairs if d):.2f}"

print(f"{'mode':<10} {'replies/s':>10} {'ratio':>6} {'p99_us':>7} {'udplb_cpu_s':>11} "
      f"{'round_ratio':>11} {'lost':>6}   per-round replies/s")
for mode in modes:
    rps = med(mode, "replies_per_sec")
    cpu = med(mode, "udplb_cpu_s")
    lost = sum(r["lost"] for r in runs[mode])
    rounds = " ".join(f"{r['replies_per_sec']:.0f}" for r in runs[mode])
    print(f"{mode:<10} {rps:>10.0f} {ratio(rps):>6} {med(mode, 'p99_us'):>7.0f} "
          f"{'-' if cpu is None else f'{cpu:.1f}':>11} {round_ratio(mode):>11} {lost:>6}   {rounds}")
PY
