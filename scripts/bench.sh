#!/usr/bin/env bash
# Measures udplb against a direct client -> backend baseline in the same run.
#
# Three echo backends; the closed-loop generator runs FLOWS flows x OUTSTANDING requests in
# flight x SIZE-byte payloads for DURATION, first straight at the backends (direct), then
# through udplb in flow mode and in datagram mode. Rounds are interleaved (direct, flow,
# datagram, direct, ...) so drift on a shared machine hits every mode alike; the table shows
# each mode's median replies/s, its ratio to the direct median, its p99, and the CPU seconds
# udplb used during the measurement.
#
# Usage: scripts/bench.sh            (env: FLOWS OUTSTANDING SIZE DURATION ROUNDS WORKERS THREADS)
set -euo pipefail
cd "$(dirname "$0")/.."

FLOWS=${FLOWS:-64}
OUTSTANDING=${OUTSTANDING:-8}
SIZE=${SIZE:-64}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
THREADS=${THREADS:-1}

cargo build --release --quiet -p udplb -p udplb-bench
UDPLB=${UDPLB:-target/release/udplb}  # set UDPLB to measure another build
BENCH=target/release/udplb-bench

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$BENCH" echo 127.0.0.1:0 127.0.0.1:0 127.0.0.1:0 >"$work/echo" &
pids+=($!)
for _ in $(seq 100); do [[ $(wc -l <"$work/echo") -ge 3 ]] && break; sleep 0.05; done
mapfile -t backends < <(awk '/^listening/ {print $2}' "$work/echo")
[[ ${#backends[@]} -eq 3 ]] || { echo "echo backends did not start" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

load() { # load TARGET... -> one JSON line
    local args=()
    for t in "$@"; do args+=(--target "$t"); done
    "$BENCH" load "${args[@]}" --flows "$FLOWS" --outstanding "$OUTSTANDING" --size "$SIZE" \
        --duration "$DURATION" --threads "$THREADS" --json
}

# Waits until udplb forwards: short probes until one completes, with a deadline.
wait_forwarding() {
    for _ in $(seq 50); do
        if "$BENCH" load --target "$1" --flows 1 --outstanding 1 --duration 100ms --warmup 0s --timeout 50ms --json \
            | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["completed"] > 0 else 1)'; then
            return 0
        fi
    done
    echo "udplb does not forward on $1" >&2
    return 1
}

measure_udplb() { # measure_udplb MODE -> JSON line with udplb_cpu_s added
    local port lb before after
    port=$(free_port)
    "$UDPLB" --log-level error --workers "$WORKERS" --mode "$1" "127.0.0.1:$port" "${backends[@]}" &
    lb=$!
    pids+=("$lb")
    wait_forwarding "127.0.0.1:$port"
    before=$(cpu_ticks "$lb")
    local out
    out=$(load "127.0.0.1:$port")
    after=$(cpu_ticks "$lb")
    kill "$lb"
    wait "$lb" 2>/dev/null || true
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["udplb_cpu_s"]=(int(sys.argv[3])-int(sys.argv[2]))/int(sys.argv[4]); print(json.dumps(r))' \
        "$out" "$before" "$after" "$(getconf CLK_TCK)"
}

echo "udplb bench: $FLOWS flows x $OUTSTANDING outstanding x $SIZE bytes, $DURATION per run, $ROUNDS rounds, $WORKERS workers, $(nproc) CPUs" >&2
: >"$work/results"
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    echo "direct $(load "${backends[@]}")" >>"$work/results"
    echo "flow $(measure_udplb flow)" >>"$work/results"
    echo "datagram $(measure_udplb datagram)" >>"$work/results"
done

python3 - "$work/results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, js = line.split(" ", 1)
    runs.setdefault(mode, []).append(json.loads(js))
def med(mode, key):
    vals = [r[key] for r in runs[mode] if key in r]
    return statistics.median(vals) if vals else None
direct = med("direct", "replies_per_sec")
# ratio: median over modes' medians; round ratio: median of each round's ratio to the direct
# run just before it (robust to drift between rounds).
print(f"{'mode':<10} {'replies/s':>10} {'ratio':>6} {'round_ratio':>11} {'p99_us':>7} {'lost':>5} {'udplb_cpu_s':>11}   per-round replies/s")
for mode in ("direct", "flow", "datagram"):
    rps = med(mode, "replies_per_sec")
    cpu = med(mode, "udplb_cpu_s")
    lost = sum(r["lost"] for r in runs[mode])
    round_ratio = statistics.median(r["replies_per_sec"] / d["replies_per_sec"] for r, d in zip(runs[mode], runs["direct"]))
    rounds = " ".join(f"{r['replies_per_sec']:.0f}" for r in runs[mode])
    print(f"{mode:<10} {rps:>10.0f} {rps / direct:>6.2f} {round_ratio:>11.2f} {med(mode, 'p99_us'):>7.0f} {lost:>5} "
          f"{'-' if cpu is None else f'{cpu:.1f}':>11}   {rounds}")
PY
