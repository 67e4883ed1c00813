#!/usr/bin/env bash
# User-space instructions per forwarded datagram, counted by callgrind: udplb in each mode and
# the reference relay (`udplb-bench relay`), on the same echo backends and the same load.
#
# Kernel work (the UDP stack) is not counted, only what the balancer's own code and libc
# execute: the part of a datagram's cost that udplb controls, and a deterministic figure where
# timings on a shared machine are not. Collection covers the event loop only (the worker's
# `Worker::run`, the relay's `relay::run`), so startup and the control plane are left out.
# The count is divided by the datagrams relayed in both directions (2 per completed request);
# a run that lost requests under the interpreter is reported as such.
#
# Usage: scripts/instructions.sh
# Env:   PEERS ("relay udplb-flow udplb-datagram udplb-rr udplb-shared"; also udplb-quic) FLOWS (64)
#        OUTSTANDING (2) DURATION (4s) UDPLB (target/release/udplb)
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=${PEERS:-relay udplb-flow udplb-datagram udplb-rr udplb-shared}
FLOWS=${FLOWS:-64}
OUTSTANDING=${OUTSTANDING:-2}
DURATION=${DURATION:-4s}
UDPLB=${UDPLB:-target/release/udplb}

NAME=instructions
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
command -v valgrind >/dev/null || install_packages valgrind
command -v valgrind >/dev/null || die "needs valgrind (Debian: valgrind)"
build_release udplb udplb-bench || die "does not build"
# shellcheck disable=SC2119 # no command prefix
start_echo

printf '%-15s %12s %10s %6s %14s\n' peer instructions datagrams lost 'instr/dgram'
for peer in $PEERS; do
    port=$(free_port)
    out="${KEEP:-$work}/$peer.callgrind"
    case $peer in
        relay)
            cmd=("$BENCH" relay --listen "127.0.0.1:$port" "${backends[@]}")
            toggle='udplb_bench::relay::run*'
            ;;
        udplb-quic)
            # Datagram mode reading every datagram's QUIC connection ID (QUIC-LB routing,
            # maglev by the ID's hash where no server ID is found).
            conf="$work/quic.toml"
            {
                printf '[runtime]\nworkers = 1\nshutdown_grace = "0s"\n'
                printf '[listeners.l]\naddress = "127.0.0.1:%s"\npool = "p"\nmode = "datagram"\n' "$port"
                printf '[pools.p]\nscheduler = "maglev"\nbackends = ['
                printf '"%s",' "${backends[@]}"
                printf ']\n[pools.p.payload_key]\nkind = "quic-lb"\nserver_id_length = 1\nserver_ids = {'
                for i in "${!backends[@]}"; do printf '"%s" = "%02x",' "${backends[$i]}" $((i + 1)); done
                printf '}\n'
            } | sed 's/,]/]/; s/,}/ }/' >"$conf"
            cmd=("$UDPLB" run -c "$conf")
            toggle='udplb_dataplane::worker::Worker::run*'
            ;;
        udplb-*)
            mode=${peer#udplb-} extra=()
            [[ $mode == rr ]] && mode=request-response
            [[ $mode == shared ]] && mode=flow extra=(--shared-upstream)
            cmd=("$UDPLB" --workers 1 --mode "$mode" "${extra[@]}"
                --shutdown-grace 0s "127.0.0.1:$port" "${backends[@]}")
            toggle='udplb_dataplane::worker::Worker::run*'
            ;;
        *) die "unknown peer $peer" ;;
    esac
    UDPLB_ALLOW_ROOT=1 run_bg "$work/peer.log" valgrind --tool=callgrind \
        --callgrind-out-file="$out" "--toggle-collect=$toggle" "${cmd[@]}"
    pid=$bg_pid
    # Slow to start under the interpreter: up to 90 s (300 probes of 100 ms + 200 ms).
    wait_forwarding -s 90 -t 200ms -p "$pid" "127.0.0.1:$port" || {
        cat "$work/peer.log" >&2
        die "$peer does not forward under valgrind"
    }
    "$BENCH" load --target "127.0.0.1:$port" --flows "$FLOWS" --outstanding "$OUTSTANDING" \
        --duration "$DURATION" --warmup 0s --timeout 2s --json >"$work/load.json"
    stop "$pid" TERM # callgrind writes its counts on the way out
    python3 - "$peer" "$out" "$work/load.json" <<'PY'
import json, sys
peer, out, load = sys.argv[1:]
instr = 0
for line in open(out):
    if line.startswith("summary:") or line.startswith("totals:"):
        instr = max(instr, int(line.split()[1]))
r = json.load(open(load))
# Every completed request is two forwarded datagrams; the probes before the load are few
# (a handful of datagrams) and counted in the instructions only.
dgrams = 2 * r["completed"]
print(f"{peer:<15} {instr:>12} {dgrams:>10} {r['lost']:>6} {instr / max(dgrams, 1):>14.0f}")
PY
done
