#!/usr/bin/env bash
# Runs udplb's whole test suite: formatting, lints, the core's dependency guard, every test
# (unit, property, simulation, black-box against the real binary and real DNS servers) and the
# docs. As root it first installs the Debian packages the tests use when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(knot knot-dnsutils unbound dnsutils dnsperf iproute2 chromium freeradius freeradius-utils snmpd snmp ngtcp2-client keepalived bird2 curl clang libbpf-dev tcpdump ethtool)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    fi
fi
# The Debian services are used as test peers started by the tests, not as system daemons.
for svc in knot unbound freeradius snmpd keepalived bird; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== core has no I/O dependencies"
if cargo tree -p udplb-core --edges normal --prefix none --locked | grep -E '^(tokio|mio|libc|socket2|nix|rand) '; then
    echo "udplb-core must stay sans-IO" >&2
    exit 1
fi
echo "== tests"
cargo test --workspace --locked
echo "== docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
