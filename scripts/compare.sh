#!/usr/bin/env bash
# Side by side on this machine, in one run: direct (no balancer), the reference relay
# (`udplb-bench relay`: udplb's socket primitives, no policy), udplb in flow and datagram mode,
# nginx's stream proxy and pen, on the same echo backends and the same closed-loop load.
#
# Every balancer runs one thread (udplb with one worker, nginx with one worker process; pen and
# the relay are single-threaded). With PIN=1 (default) it is pinned to CPU 1 while the load
# generator and the backends are pinned to CPU 0: CPU per forwarded datagram is CPU 1's busy
# time over the measured window (from /proc/stat, so softirq work the balancer causes is
# counted, which per-process accounting misses) divided by the datagrams it forwarded
# (requests + replies); replies/s are then bounded by what CPU 0 can generate and echo. With
# PIN=0 nothing is pinned: client, backends and balancer share both CPUs, which shows the
# throughput each balancer leaves (no CPU column).
# Rounds are interleaved (every balancer once per round); the table shows medians.
#
# Usage: scripts/compare.sh
# Env:   SCENARIOS ("a b e d"): a = 64 flows x 8 outstanding x 64 B, b = 1024 flows x 1 x 512 B,
#                              e = 1 flow x 1 outstanding (latency),
#                              f = latency at equal offered load: an open loop (64 flows, up to
#                                  64 in flight each, 64 B) at each rate of RATES, the same for
#                                  every peer, so tails compare at the same load
#                              d = DNS: dnsperf through each balancer to 3 knot servers, with
#                                  dnsdist as a peer (udplb in request-response and flow mode)
#        PEERS ("direct relay relay-datagram udplb-flow udplb-datagram nginx nginx-4m pen";
#               relay-datagram is the reference relay scheduling per datagram, the ceiling of
#               datagram mode; nginx-4m is nginx with the 4 MiB listener buffers udplb uses
#               (`rcvbuf=4m sndbuf=4m`), so that it queues a burst instead of dropping it;
#               udplb-shared is flow mode with shared upstream sockets, --shared-upstream;
#               udplb-kernel is the kernel data plane on lo, as root: compare it with PIN=0;
#               udplb-kernel-datagram the same in datagram mode; nftables is nftables'
#               conntrack DNAT of the local traffic to the backends in turn, the kernel
#               peer, as root, also with PIN=0)
#        DNS_PEERS ("udplb udplb-flow dnsdist nginx pen"; also udplb-shared: request-response
#               with --shared-upstream; udplb-kernel: the kernel data plane on lo, as root)
#        RATES ("60000 90000 120000"): requests/s offered in scenario f
#        DURATION (5s) WARMUP (1s) ROUNDS (3) PIN (1)
#        RESULTS (unset): also keep the raw results (one JSON line per run) in this file
#        HALT_POLL_NS (unset): on a KVM guest whose idle driver is cpuidle-haltpoll, let an idle
#                  vCPU poll this long before it halts (guest_halt_poll_ns; restored on exit):
#                  a halted vCPU is woken through the host, which here adds 100-400 us to a
#                  request's latency at every peer alike; polling time counts as idle
#        MAX_STEAL (unset): leave out of the tables every run in which either CPU lost more
#                  than this % of the run to steal (a shared virtual machine's host running
#                  something else; the steal% column shows it per peer either way)
#        BASELINE (unset): another udplb binary; adds the peers base-flow and base-datagram
#                  (base-kernel and base-kernel-datagram can be named in PEERS)
#                  (and base, base-flow to DNS_PEERS), so a change is measured before and after
#                  in the same interleaved run
# nginx (with its stream module) and pen are installed from Debian when missing (as root);
# a peer that is still missing is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIOS=${SCENARIOS:-a b e f d}
RATES=${RATES:-60000 90000 120000}
# Scenario f runs once per rate, as f@RATE.
expanded=()
for s in $SCENARIOS; do
    if [[ $s == f ]]; then
        for r in $RATES; do expanded+=("f@$r"); done
    else
        expanded+=("$s")
    fi
done
SCENARIOS="${expanded[*]}"
peers_given=${PEERS:+1} dns_peers_given=${DNS_PEERS:+1}
DNS_PEERS=${DNS_PEERS:-udplb udplb-flow dnsdist nginx pen}
PEERS=${PEERS:-direct relay relay-datagram udplb-flow udplb-datagram nginx nginx-4m pen}
if [[ -n ${BASELINE:-} ]]; then
    [[ -x $BASELINE ]] || { echo "compare: BASELINE=$BASELINE is not an executable" >&2; exit 1; }
    # The baseline's peers join the default lists; peers named are run as named.
    [[ -n $peers_given ]] || PEERS="$PEERS base-flow base-datagram"
    [[ -n $dns_peers_given ]] || DNS_PEERS="$DNS_PEERS base base-flow"
fi
for peer in $PEERS; do
    case $peer in
        direct | relay | relay-datagram | udplb-flow | udplb-datagram | udplb-shared | base-flow | \
            base-datagram | udplb-kernel | udplb-kernel-datagram | base-kernel | \
            base-kernel-datagram | nftables | nginx | nginx-4m | pen) ;;
        *) echo "compare: unknown peer $peer in PEERS" >&2; exit 1 ;;
    esac
    [[ $peer != base-* || -n ${BASELINE:-} ]] || { echo "compare: $peer needs BASELINE" >&2; exit 1; }
done
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-3}
PIN=${PIN:-1}
if [[ $PIN == 1 ]]; then
    on0=(taskset -c 0)
    on1=(taskset -c 1)
else
    on0=()
    on1=()
fi
BENCH=target/release/udplb-bench
UDPLB=target/release/udplb

NAME=compare
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
(($(nproc) >= 2)) || die "needs 2 CPUs (balancer on CPU 1, load and backends on CPU 0)"
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [[ -n ${HALT_POLL_NS:-} ]]; then
    [[ -w $halt_poll ]] || die "HALT_POLL_NS needs the cpuidle-haltpoll driver and root ($halt_poll)"
    saved_halt_poll=$(<"$halt_poll")
    echo "$HALT_POLL_NS" >"$halt_poll"
    trap 'echo "$saved_halt_poll" >"$halt_poll"; cleanup' EXIT
fi

install_missing() {
    local want=()
    command -v nginx >/dev/null || want+=(nginx)
    [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || want+=(libnginx-mod-stream)
    command -v pen >/dev/null || want+=(pen)
    [[ " $PEERS " == *" nftables "* ]] && ! command -v nft >/dev/null && want+=(nftables)
    case " $SCENARIOS " in *" d "*)
        command -v dnsdist >/dev/null || want+=(dnsdist)
        command -v dnsperf >/dev/null || want+=(dnsperf)
        command -v knotd >/dev/null || want+=(knot) ;;
    esac
    install_packages "${want[@]}"
}
install_missing
build_release udplb udplb-bench || die "does not build"

start_echo "${on0[@]}"

scenario_args() {
    case $1 in
        a) echo "--flows 64 --outstanding 8 --size 64" ;;
        b) echo "--flows 1024 --outstanding 1 --size 512" ;;
        e) echo "--flows 1 --outstanding 1 --size 64" ;;
        f@*) echo "--flows 64 --outstanding 64 --size 64 --rate ${1#f@}" ;;
        *) die "unknown scenario $1" ;;
    esac
}

load() { # load SCENARIO TARGET...
    local s=$1 args=() t
    shift
    for t in "$@"; do args+=(--target "$t"); done
    # shellcheck disable=SC2046
    "${on0[@]}" "$BENCH" load "${args[@]}" $(scenario_args "$s") --duration "$DURATION" \
        --warmup "$WARMUP" --json
}

# cpu_json BEFORE AFTER (two cpu_times readings around a measured run): the JSON fields
# "cpu1_s" (CPU 1's busy seconds, pinned only) and "steal_s" ([CPU 0, CPU 1] steal seconds).
cpu_json() {
    python3 -c "
b, a, hz = [int(x) for x in '$1'.split()], [int(x) for x in '$2'.split()], $(getconf CLK_TCK)
cpu = (a[0] - b[0]) / hz if $PIN == 1 else None
print('\"cpu1_s\": %s, \"steal_s\": [%s, %s]' % ('null' if cpu is None else cpu,
      (a[1] - b[1]) / hz, (a[2] - b[2]) / hz))"
}

# start_nginx PORT DIRECTIVES LISTEN_OPTIONS BACKEND...: nginx's stream proxy, one worker, in
# the background.
start_nginx() {
    local port=$1 directives=$2 listen_opts=$3 b
    shift 3
    {
        [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] &&
            echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        echo "worker_processes 1; daemon off; pid $work/nginx.pid;"
        echo "error_log $work/nginx.err warn;"
        echo "events { worker_connections 16384; }"
        echo "stream { upstream b {"
        for b in "$@"; do echo "server $b;"; done
        echo "} server { listen 127.0.0.1:$port udp reuseport $listen_opts; proxy_pass b; $directives } }"
    } >"$work/nginx.conf"
    run_bg "$work/peer.log" "${on1[@]}" nginx -c "$work/nginx.conf" -e "$work/nginx.err"
}

# start_pen PORT BACKEND...: pen in UDP mode, round robin, in the background.
start_pen() {
    local port=$1
    shift
    run_bg "$work/peer.log" "${on1[@]}" pen -U -f -r -q 1024 -x 100000 "127.0.0.1:$port" "$@"
}

# stop_peer PID: stops a balancer and whatever it forked (nginx's master takes its worker
# down on SIGTERM; SIGKILL alone would leave the worker running, holding its port).
stop_peer() {
    local pid=$1 children
    children=$(pgrep -P "$pid" || true)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    # shellcheck disable=SC2086
    kill -KILL "$pid" $children 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# launch LABEL PEER PORT START READY VERB: starts PEER on PORT with START (start_peer,
# start_dns_peer) and sets pid; fails, saying under LABEL why PEER is skipped, when it is not
# installed or when `READY PORT PID` fails (then "does not VERB", with its output).
launch() {
    local label=$1 peer=$2 port=$3 start=$4 ready=$5 verb=$6
    pid=$("$start" "$peer" "$port")
    if [[ -z $pid ]]; then
        echo "  [$label] $peer: not installed, skipped" >&2
        return 1
    fi
    pids+=("$pid")
    if ! "$ready" "$port" "$pid"; then
        echo "  [$label] $peer: does not $verb, skipped; its output:" >&2
        sed 's/^/      /' "$work/peer.log" >&2 || true
        stop_peer "$pid"
        return 1
    fi
}

# forwarding PORT PID: the balancer PID forwards on PORT (10 s; probes from CPU 0).
forwarding() { wait_forwarding -p "$2" "127.0.0.1:$1" "${on0[@]}"; }

# start_kernel BINARY MODE PORT BACKEND...: udplb BINARY with its kernel data plane on lo
# (MODE: flow or datagram; Maglev) listening on PORT; sets bg_pid.
start_kernel() {
    local binary=$1 mode=$2 port=$3 list
    shift 3
    list=$(printf '"%s", ' "$@")
    cat >"$work/kernel.toml" <<CONFIG
[runtime]
workers = 1
shutdown_grace = "0s"
# Nothing pinned on the host: each run starts afresh and leaves nothing behind.
bpf_dir = "$work/bpf"
[listeners.l]
address = "127.0.0.1:$port"
pool = "p"
mode = "$mode"
dataplane = "kernel"
interfaces = ["lo"]
[pools.p]
backends = [${list%, }]
CONFIG
    UDPLB_ALLOW_ROOT=1 run_bg "$work/peer.log" "${on1[@]}" "$binary" run -c "$work/kernel.toml"
}

# start_nftables PORT BACKEND...: nftables' conntrack DNAT from 127.0.0.1:PORT to the
# backends in turn (locally sent traffic: the nat output hook), for as long as a process of its
# own runs (stopping it deletes the table); sets bg_pid.
start_nftables() {
    local port=$1 map="" i=0 b
    shift
    for b in "$@"; do
        map+="$i : ${b%:*} . ${b##*:}, "
        i=$((i + 1))
    done
    cat >"$work/nft.conf" <<NFT
table ip udplb_compare {
    chain out {
        type nat hook output priority -100;
        ip daddr 127.0.0.1 udp dport $port dnat to numgen inc mod $# map { ${map%, } }
    }
}
NFT
    nft -f "$work/nft.conf" || return 0
    run_bg "$work/peer.log" bash -c 'trap "nft delete table ip udplb_compare; exit 0" TERM; sleep infinity & wait'
}

# An interrupted run leaves no DNAT behind (its process killed before it could delete it).
no_nftables_left() { nft delete table ip udplb_compare 2>/dev/null || true; }
[[ " $PEERS " == *" nftables "* ]] && cleanup_hooks+=(no_nftables_left)

# start_peer PEER PORT -> pid of the balancer (pinned to CPU 1), or nothing if unavailable
# (it runs in a command substitution: the caller adds the pid to pids).
start_peer() {
    local peer=$1 port=$2 bg_pid=
    case $peer in
        relay | relay-datagram)
            local per=()
            [[ $peer == relay-datagram ]] && per=(--per-datagram)
            run_bg "$work/peer.log" \
                "${on1[@]}" "$BENCH" relay --listen "127.0.0.1:$port" "${per[@]}" "${backends[@]}"
            ;;
        udplb-flow | udplb-datagram | udplb-shared | base-flow | base-datagram)
            local binary=$UDPLB mode=${peer#*-} shared=()
            [[ $peer == base-* ]] && binary=$BASELINE
            [[ $peer == udplb-shared ]] && mode=flow shared=(--shared-upstream)
            UDPLB_ALLOW_ROOT=1 run_bg "$work/peer.log" "${on1[@]}" "$binary" --workers 1 \
                --mode "$mode" "${shared[@]}" --shutdown-grace 0s "127.0.0.1:$port" "${backends[@]}"
            ;;
        udplb-kernel | udplb-kernel-datagram | base-kernel | base-kernel-datagram)
            # The kernel data plane on lo (root): its work runs in the sender's softirq, not
            # on CPU 1, so compare it with PIN=0 (throughput), not by the CPU column.
            [[ $(id -u) -eq 0 ]] || return 0
            local mode=flow binary=$UDPLB
            [[ $peer == *-datagram ]] && mode=datagram
            [[ $peer == base-* ]] && binary=$BASELINE
            start_kernel "$binary" "$mode" "$port" "${backends[@]}"
            ;;
        nftables)
            [[ $(id -u) -eq 0 ]] && command -v nft >/dev/null || return 0
            start_nftables "$port" "${backends[@]}"
            ;;
        nginx | nginx-4m)
            command -v nginx >/dev/null || return 0
            local opts=""
            [[ $peer == nginx-4m ]] && opts="rcvbuf=4m sndbuf=4m"
            start_nginx "$port" "proxy_timeout 30s;" "$opts" "${backends[@]}"
            ;;
        pen)
            command -v pen >/dev/null || return 0
            start_pen "$port" "${backends[@]}"
            ;;
    esac
    echo "${bg_pid:-}"
}

: >"$work/results"
for scenario in $SCENARIOS; do
    [[ $scenario == d ]] && continue # DNS runs below, with its own load and backends
    for round in $(seq "$ROUNDS"); do
        for peer in $PEERS; do
            if [[ $peer == direct ]]; then
                out=$(load "$scenario" "${backends[@]}")
                echo "$scenario $peer {\"round\": $round, \"cpu1_s\": null, \"steal_s\": null, \"r\": $out}" >>"$work/results"
                echo "  [$scenario $round] $peer" >&2
                continue
            fi
            port=$(free_port)
            launch "$scenario $round" "$peer" "$port" start_peer forwarding forward || continue
            load "$scenario" "127.0.0.1:$port" >"$work/run.json" &
            lp=$!
            sleep "$(seconds "$WARMUP" 0.03)"
            before=$(cpu_times)
            wait "$lp"
            after=$(cpu_times)
            stop_peer "$pid"
            echo "$scenario $peer {\"round\": $round, $(cpu_json "$before" "$after"), \"r\": $(cat "$work/run.json")}" >>"$work/results"
            echo "  [$scenario $round] $peer" >&2
        done
    done
done

# ---- (d) DNS: dnsperf -> balancer -> 3 knot servers --------------------------------------
# secs DURATION: DURATION in whole seconds, at least 1 (dnsperf -l).
secs() { python3 -c "print(max(1, round($(seconds "$1"))))"; }

start_knots() {
    knots=()
    local i port d
    for i in 1 2 3; do
        port=$(free_port)
        d="$work/knot$i"
        mkdir -p "$d"
        # shellcheck disable=SC2016 # $ORIGIN and $TTL are the zone file's
        printf '$ORIGIN example.test.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A 192.0.2.1\nwww A 192.0.2.10\nwho TXT "knot%s"\n' "$i" >"$d/example.test.zone"
        cat >"$d/knot.conf" <<KNOT
server:
  listen: 127.0.0.1@$port
  rundir: $d
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
database:
  storage: $d
log:
  - target: stderr
    any: error
template:
  - id: default
    storage: $d
zone:
  - domain: example.test.
    file: example.test.zone
KNOT
        run_bg "$d/log" "${on0[@]}" knotd -c "$d/knot.conf"
        knots+=("127.0.0.1:$port")
    done
    printf 'www.example.test A\nwho.example.test TXT\nns.example.test A\nexample.test SOA\n' >"$work/queries"
    dns_ready "${knots[2]##*:}" 60 || die "knot did not answer"
}

start_dns_peer() { # start_dns_peer PEER PORT -> pid (the caller adds it to pids)
    local peer=$1 port=$2 k bg_pid=
    case $peer in
        udplb | udplb-flow | udplb-shared | base | base-flow)
            # udplb: request-response (each query's flow ends with its answer); udplb-flow:
            # flows of client ip:port kept until idle, like the other peers do; udplb-shared:
            # request-response on shared upstream sockets.
            local mode=request-response binary=$UDPLB shared=()
            [[ $peer == *-flow ]] && mode=flow
            [[ $peer == base* ]] && binary=$BASELINE
            [[ $peer == udplb-shared ]] && shared=(--shared-upstream)
            UDPLB_ALLOW_ROOT=1 run_bg "$work/peer.log" "${on1[@]}" "$binary" --workers 1 \
                --mode "$mode" "${shared[@]}" --shutdown-grace 0s "127.0.0.1:$port" "${knots[@]}"
            ;;
        udplb-kernel)
            [[ $(id -u) -eq 0 ]] || return 0
            start_kernel "$UDPLB" flow "$port" "${knots[@]}"
            ;;
        dnsdist)
            command -v dnsdist >/dev/null || return 0
            {
                echo "setLocal('127.0.0.1:$port')"
                echo "setACL({'127.0.0.0/8'})"
                echo "setSecurityPollSuffix('')"
                for k in "${knots[@]}"; do
                    echo "newServer({address='$k', checkName='example.test.', checkType='SOA'})"
                done
                echo "setServerPolicy(roundrobin)"
            } >"$work/dnsdist.conf"
            run_bg "$work/peer.log" \
                "${on1[@]}" dnsdist --supervised --disable-syslog -C "$work/dnsdist.conf"
            ;;
        nginx)
            command -v nginx >/dev/null || return 0
            start_nginx "$port" "proxy_responses 1; proxy_timeout 2s;" "" "${knots[@]}"
            ;;
        pen)
            command -v pen >/dev/null || return 0
            start_pen "$port" "${knots[@]}"
            ;;
    esac
    echo "${bg_pid:-}"
}

dnsperf_json() { # dnsperf_json PORT -> JSON line
    "${on0[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -c 16 -q 128 \
        -l "$(secs "$DURATION")" 2>&1 | python3 -c '
import json, re, sys
t = sys.stdin.read()
num = lambda k: float(re.search(k + r":\s+([0-9.]+)", t).group(1))
print(json.dumps({"replies_per_sec": num("Queries per second"), "lost": int(num("Queries lost")),
                  "completed": int(num("Queries completed")), "avg_us": num("Average Latency \\(s\\)") * 1e6}))'
}

dns_ready() { # dns_ready PORT [SECONDS]: a query answered within SECONDS (10)
    local deadline=$((SECONDS + ${2:-10}))
    while ((SECONDS < deadline)); do
        dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -n 1 -t 1 2>/dev/null |
            grep -q 'Queries completed:.*(100.00%)' && return 0
        sleep 0.2
    done
    return 1
}

# answering PORT PID: the DNS peer on PORT answers a query (10 s).
answering() { dns_ready "$1"; }

if [[ " $SCENARIOS " == *" d "* ]]; then
    if command -v knotd >/dev/null && command -v dnsperf >/dev/null; then
        start_knots
        for round in $(seq "$ROUNDS"); do
            for peer in $DNS_PEERS; do
                port=$(free_port)
                launch "d $round" "$peer" "$port" start_dns_peer answering answer || continue
                before=$(cpu_times)
                out=$(dnsperf_json "$port")
                after=$(cpu_times)
                stop_peer "$pid"
                echo "d $peer {\"round\": $round, $(cpu_json "$before" "$after"), \"r\": $out}" >>"$work/results"
                echo "  [d $round] $peer" >&2
            done
        done
    else
        echo "  (d) skipped: needs knotd and dnsperf (Debian: knot, dnsperf)" >&2
    fi
fi

[[ -n ${RESULTS:-} ]] && cp "$work/results" "$RESULTS"
[[ -n ${HALT_POLL_NS:-} ]] && echo "idle vCPUs polled ${HALT_POLL_NS} ns before halting (HALT_POLL_NS)"
# shellcheck disable=SC2086 # one argument per peer
MAX_STEAL=${MAX_STEAL:-} python3 - "$work/results" "$(seconds "$DURATION")" "$PIN" $PEERS $DNS_PEERS <<'PY'
import json, os, statistics, sys
path, secs, pin, peers = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
max_steal = float(os.environ["MAX_STEAL"]) if os.environ.get("MAX_STEAL") else None

def steal_pct(x, cpu):
    """Steal on `cpu` during the run, in % of the run (None where it was not read)."""
    s = x.get("steal_s")
    return s[cpu] / secs * 100 if s else None

runs, left_out = {}, {}
for line in open(path):
    scen, peer, js = line.split(" ", 2)
    x = json.loads(js)
    worst = max((v for v in (steal_pct(x, 0), steal_pct(x, 1)) if v is not None), default=None)
    if max_steal is not None and worst is not None and worst > max_steal:
        left_out.setdefault(scen, []).append(f"{peer} round {x['round']} ({worst:.1f}%)")
        continue
    runs.setdefault(scen, {}).setdefault(peer, []).append(x)
names = {"a": "(a) 64 flows x 8 outstanding x 64 B", "b": "(b) 1024 flows x 1 x 512 B",
         "e": "(e) 1 flow x 1 outstanding x 64 B (latency)",
         **{s: f"(f) open loop: {s[2:]} requests/s offered, 64 flows x 64 B (latency at equal load)"
            for s in runs if s.startswith("f@")},
         "d": "(d) DNS: dnsperf (16 clients, 128 outstanding) -> 3 knot servers; replies/s = queries/s"}
peers = list(dict.fromkeys(peers))

def cpu_of(x):
    r = x["r"]["replies_per_sec"]
    return x["cpu1_s"] / (2 * r * secs) * 1e9 if x["cpu1_s"] is not None and r else None

def steal_col(rs):
    """Median steal on CPU 0 (load) / CPU 1 (balancer) in % of the run."""
    cols = []
    for cpu in (0, 1):
        v = [steal_pct(x, cpu) for x in rs if steal_pct(x, cpu) is not None]
        cols.append(f"{statistics.median(v):.1f}" if v else "-")
    return "/".join(cols)

def same_round_ratio(by_peer, p, q, f=lambda x: x["r"]["replies_per_sec"]):
    """Median over rounds of p / q within the same round: rounds interleave the peers, so
    drift between rounds cancels."""
    ref = {x["round"]: f(x) for x in by_peer.get(q, []) if f(x)}
    rs = [f(x) / ref[x["round"]] for x in by_peer.get(p, []) if x["round"] in ref and f(x)]
    return statistics.median(rs) if rs else None

def same_round(by_peer, ref):
    if ref not in by_peer:
        return
    for p in peers:
        r = same_round_ratio(by_peer, p, ref)
        if p in by_peer and p != ref and r:
            c = same_round_ratio(by_peer, p, ref, cpu_of)
            cpu_s = f", CPU per datagram {c:.2f}x" if c else ""
            print(f"same-round median vs {ref}: {p} {r:.2f}x{cpu_s}")

for scen, by_peer in runs.items():
    where = ("balancer pinned to CPU 1, load and backends to CPU 0" if pin
             else "nothing pinned: load, backends and balancer share the CPUs")
    print(f"\n{names.get(scen, scen)}; {where}")
    if scen in left_out:
        print(f"left out (steal above MAX_STEAL={max_steal:g}%): {', '.join(left_out[scen])}")
    med = lambda peer, f: statistics.median(f(x) for x in by_peer[peer]) if peer in by_peer else None
    rps = {p: med(p, lambda x: x["r"]["replies_per_sec"]) for p in by_peer}
    per_round = lambda p, q: same_round_ratio(by_peer, p, q)
    cpu_ns = lambda p: [x["cpu1_s"] / (2 * x["r"]["replies_per_sec"] * secs) * 1e9
                        for x in by_peer[p] if x["cpu1_s"] is not None and x["r"]["replies_per_sec"]]
    if scen == "d":
        print(f"{'peer':<15} {'queries/s':>10} {'lost':>6} {'avg_us':>7} {'cpu_ns/dgram':>12}"
              f" {'steal%':>9} {'x dnsdist':>9} {'x nginx':>8} {'x pen':>8}")
        for p in peers:
            if p not in by_peer:
                continue
            lost = sum(x["r"]["lost"] for x in by_peer[p])
            cpu = cpu_ns(p)
            ratio = lambda q: f"{rps[p] / rps[q]:.2f}" if rps.get(q) else "-"
            print(f"{p:<15} {rps[p]:>10.0f} {lost:>6} {med(p, lambda x: x['r']['avg_us']):>7.0f} "
                  f"{(f'{statistics.median(cpu):.0f}' if cpu else '-'):>12} "
                  f"{steal_col(by_peer[p]):>9} {ratio('dnsdist'):>9} "
                  f"{ratio('nginx'):>8} {ratio('pen'):>8}")
        same_round(by_peer, "dnsdist")
        continue
    # p99+lost: the tail over every request, a lost one (or, open loop, one not sent for a
    # full window) counted as the whole timeout.
    print(f"{'peer':<15} {'replies/s':>10} {'lost':>6} {'p50_us':>7} {'p99_us':>7} {'p99+lost':>8}"
          f" {'cpu_ns/dgram':>12} {'steal%':>9} {'x direct':>8} {'x relay':>8} {'x nginx':>8}"
          f" {'x pen':>8}")
    for p in peers:
        if p not in by_peer:
            continue
        lost = sum(x["r"]["lost"] + x["r"].get("window_full", 0) for x in by_peer[p])
        cpu = [x["cpu1_s"] / (2 * x["r"]["replies_per_sec"] * secs) * 1e9
               for x in by_peer[p] if x["cpu1_s"] is not None and x["r"]["replies_per_sec"]]
        cpu_s = f"{statistics.median(cpu):.0f}" if cpu else "-"
        ratio = lambda q: f"{rps[p] / rps[q]:.2f}" if rps.get(q) else "-"
        tail = med(p, lambda x: x['r'].get('p99_with_lost_us', x['r']['p99_us']))
        print(f"{p:<15} {rps[p]:>10.0f} {lost:>6} {med(p, lambda x: x['r']['p50_us']):>7.0f} "
              f"{med(p, lambda x: x['r']['p99_us']):>7.0f} {tail:>8.0f} {cpu_s:>12} "
              f"{steal_col(by_peer[p]):>9} "
              f"{ratio('direct'):>8} {ratio('relay'):>8} {ratio('nginx'):>8} {ratio('pen'):>8}")
    # Tail latency against nginx's (as Debian ships it, and with udplb's socket buffers).
    p99 = lambda p: med(p, lambda x: x['r']['p99_us'])
    p99l = lambda p: med(p, lambda x: x['r'].get('p99_with_lost_us', x['r']['p99_us']))
    for ng in ("nginx", "nginx-4m"):
        if ng not in by_peer or not p99(ng) or not p99l(ng):
            continue
        for p in ("udplb-flow", "udplb-datagram", "udplb-shared"):
            if p not in by_peer:
                continue
            same = same_round_ratio(by_peer, p, ng, lambda x: x["r"]["p99_us"])
            same_l = same_round_ratio(
                by_peer, p, ng, lambda x: x["r"].get("p99_with_lost_us", x["r"]["p99_us"]))
            if same is None or same_l is None:
                continue
            print(f"p99 {p} vs {ng}: {p99(p) / p99(ng):.2f}x answered, "
                  f"{p99l(p) / p99l(ng):.2f}x with lost requests (same-round medians "
                  f"{same:.2f}x, {same_l:.2f}x)")
    same_round(by_peer, "relay")
    # (c) per-datagram scheduling against per-flow, for udplb and for the bare socket path.
    for dg, fl in (("udplb-datagram", "udplb-flow"), ("relay-datagram", "relay")):
        if rps.get(dg) and rps.get(fl):
            c_dg, c_fl = cpu_ns(dg), cpu_ns(fl)
            cpu_ratio = (f", CPU per datagram {statistics.median(c_dg) / statistics.median(c_fl):.2f}x"
                         if c_dg and c_fl else "")
            same = per_round(dg, fl)
            print(f"(c) {dg} vs {fl}: replies/s {rps[dg] / rps[fl]:.2f}x{cpu_ratio}"
                  f" (same-round median {same:.2f}x)")
PY
