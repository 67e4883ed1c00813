# Shared by the benchmark scripts (bench.sh, compare.sh, scale.sh, gso.sh): sourced, not run.
#
# Sourcing it sets up, for the script that sources it (which sets NAME first):
#   die MESSAGE        print "NAME: MESSAGE" on standard error and exit 1
#   $work              a fresh directory, removed on exit
#   pids               processes to kill on exit (append with pids+=("$!"))
#   free_port          a free UDP port on 127.0.0.1
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
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cpu_times() {
    awk '$1 == "cpu0" {s0 = $9} $1 == "cpu1" {b = $2 + $3 + $4 + $7 + $8; s1 = $9}
         END {print b, s0, s1}' /proc/stat
}
cpu1_busy() { cpu_times | cut -d' ' -f1; }

start_echo() {
    local n=${ECHO_BACKENDS:-3} addrs=() pid
    for _ in $(seq "$n"); do addrs+=(127.0.0.1:0); done
    "$@" "$BENCH" echo "${addrs[@]}" >"$work/echo.out" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
        (($(grep -c '^listening' "$work/echo.out" || true) >= n)) && break
        kill -0 "$pid" 2>/dev/null || die "echo backends exited"
        sleep 0.05
    done
    mapfile -t backends < <(awk '/^listening/ {print $2}' "$work/echo.out")
    ((${#backends[@]} == n)) || die "echo backends did not report $n addresses"
}
