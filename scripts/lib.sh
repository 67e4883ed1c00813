# Shared by the benchmark scripts (bench.sh, compare.sh, scale.sh, gso.sh, instructions.sh):
# sourced, not run.
#
# Sourcing it sets up, for the script that sources it (which sets NAME first):
#   die MESSAGE        print "NAME: MESSAGE" on standard error and exit 1
#   $work              a fresh directory, removed on exit
#   pids               processes to kill on exit (append with pids+=("$!"))
#   free_port          a free UDP port on 127.0.0.1
#   seconds DURATION [PLUS]
#                      DURATION ("10s", "500ms", "2m", "1.5s", "3") as a number of seconds,
#                      plus PLUS when given
#   install_packages PACKAGE...
#                      as root, installs the Debian packages (after apt-get update, quietly),
#                      saying so on standard error; otherwise, or if that fails, nothing (the
#                      caller checks for what it needs afterwards)
#   build_release PACKAGE...
#                      `cargo build --release --quiet` of the packages (udplb, udplb-bench);
#                      udplb is left out when UDPLB names another build than the default
#                      target/release/udplb (that one is measured as it is); fails (for the
#                      caller to say so) when cargo does
#   run_bg LOG COMMAND...
#                      COMMAND in the background, its output in LOG; sets bg_pid and adds it
#                      to pids (prefix assignments such as UDPLB_ALLOW_ROOT=1 reach COMMAND)
#   stop PID [SIGNAL]  sends SIGNAL (KILL) to PID and reaps it; nothing when PID is empty
#   wait_output FILE PATTERN [COUNT [PID]]
#                      waits (5 s) until COUNT (1) lines of FILE match the grep PATTERN;
#                      fails with 1 after 5 s, with 2 as soon as process PID has exited
#   wait_forwarding [-s SECONDS] [-t TIMEOUT] [-p PID] ADDR [PREFIX...]
#                      sends short probes through the balancer at ADDR (`udplb-bench load`, one
#                      flow, one request in flight, 100 ms, run under the command PREFIX, e.g.
#                      taskset -c 0) until one request is answered within TIMEOUT (50ms);
#                      fails with 1 after SECONDS (10), with 2 as soon as process PID has exited
#   cpu_times          "BUSY1 STEAL0 STEAL1" in ticks since boot: CPU 1's busy time (user, nice,
#                      system, irq, softirq: not idle, iowait or steal) and each CPU's steal
#                      (time the hypervisor ran something else while the CPU had work)
#   cpu1_busy          the first of those
#   start_echo PREFIX...  $ECHO_BACKENDS (default 3) echo backends (`udplb-bench echo`, one
#                      process), started under the command prefix PREFIX (e.g. taskset -c 0;
#                      may be empty); sets backends=(ADDR ...)
# shellcheck shell=bash

die() { echo "${NAME:-bench}: $*" >&2; exit 1; }

BENCH=${BENCH:-target/release/udplb-bench}

work=$(mktemp -d)
pids=()
# Functions a script adds to undo what no process of its own holds (run at exit, in order).
cleanup_hooks=()
cleanup() {
    local p h
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for h in "${cleanup_hooks[@]}"; do "$h" || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

seconds() {
    python3 - "${NAME:-bench}" "$1" "${2:-0}" <<'EOF'
import re, sys
name, duration, plus = sys.argv[1:]
m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|min)?\s*", duration)
if not m:
    sys.exit(f"{name}: cannot read duration {duration!r}")
print(float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "min": 60, None: 1}[m.group(2)] + float(plus))
EOF
}

install_packages() {
    if (($# == 0)) || [[ $(id -u) -ne 0 ]]; then return 0; fi
    echo "installing: $*" >&2
    if apt-get update -qq; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
            >/dev/null || true
    fi
}

build_release() {
    local p packages=()
    for p in "$@"; do
        [[ $p == udplb && ${UDPLB:-target/release/udplb} != target/release/udplb ]] ||
            packages+=(-p "$p")
    done
    ((${#packages[@]} == 0)) || cargo build --release --quiet "${packages[@]}"
}

run_bg() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    bg_pid=$!
    pids+=("$bg_pid")
}

stop() {
    [[ -n $1 ]] || return 0
    kill -"${2:-KILL}" "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

wait_output() {
    local file=$1 pattern=$2 count=${3:-1} pid=${4:-}
    local found
    for _ in $(seq 100); do
        found=$(grep -c -- "$pattern" "$file" 2>/dev/null) || true
        ((${found:-0} >= count)) && return 0
        [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || return 2
        sleep 0.05
    done
    return 1
}

wait_forwarding() {
    local limit=10 timeout=50ms pid='' opt OPTIND=1
    while getopts s:t:p: opt; do
        case $opt in
            s) limit=$OPTARG ;;
            t) timeout=$OPTARG ;;
            p) pid=$OPTARG ;;
            *) return 1 ;;
        esac
    done
    shift $((OPTIND - 1))
    local addr=$1 deadline=$((SECONDS + limit))
    shift
    while ((SECONDS < deadline)); do
        [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || return 2
        "$@" "$BENCH" load --target "$addr" --flows 1 --outstanding 1 --duration 100ms \
            --warmup 0s --timeout "$timeout" --json |
            python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["completed"] > 0 else 1)' &&
            return 0
    done
    return 1
}

cpu_times() {
    awk '$1 == "cpu0" {s0 = $9} $1 == "cpu1" {b = $2 + $3 + $4 + $7 + $8; s1 = $9}
         END {print b, s0, s1}' /proc/stat
}
cpu1_busy() { cpu_times | cut -d' ' -f1; }

start_echo() {
    local n=${ECHO_BACKENDS:-3} addrs=() rc=0
    for _ in $(seq "$n"); do addrs+=(127.0.0.1:0); done
    run_bg "$work/echo.out" "$@" "$BENCH" echo "${addrs[@]}"
    wait_output "$work/echo.out" '^listening' "$n" "$bg_pid" || rc=$?
    ((rc != 2)) || die "echo backends exited: $(cat "$work/echo.out")"
    mapfile -t backends < <(awk '/^listening/ {print $2}' "$work/echo.out")
    ((${#backends[@]} == n)) || die "echo backends did not report $n addresses"
}
