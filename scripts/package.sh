#!/usr/bin/env bash
# Builds udplb's Debian package with Debian's own dpkg-deb: the binary in /usr/bin, its man
# pages (udplb(1), udplb-run(1), udplb-ctl(1), udplb-check(1)) and shell completions (bash,
# zsh, fish) made by the binary itself, the hardened systemd unit, the system user udplb
# (sysusers.d, created at configure), a default /etc/udplb/udplb.toml (a conffile: upgrades
# keep an operator's edits) and the docs.
#
# Usage: scripts/package.sh [OUT_DIR]        (default target/debian; prints the .deb's path)
# Env:   UDPLB (target/release/udplb, built with cargo first when it is the default)
#        VERSION (the workspace version) COMPRESSION (xz; gzip, zstd or none)
# Install: apt install ./target/debian/udplb_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/debian}
binary=${UDPLB:-target/release/udplb}
if [[ -z ${UDPLB:-} ]]; then
    cargo build --release --locked --quiet -p udplb
fi
[[ -x $binary ]] || { echo "package: $binary is not an executable" >&2; exit 1; }
version=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/udplb_${version}_${arch}"
install -D -m 0755 "$binary" "$root/usr/bin/udplb"
strip --strip-debug "$root/usr/bin/udplb" 2>/dev/null || true

man="$root/usr/share/man/man1"
mkdir -p "$man"
"$root/usr/bin/udplb" man | gzip -9n >"$man/udplb.1.gz"
for command in run ctl check; do
    "$root/usr/bin/udplb" man "$command" | gzip -9n >"$man/udplb-$command.1.gz"
done

"$root/usr/bin/udplb" completions bash |
    install -D -m 0644 /dev/stdin "$root/usr/share/bash-completion/completions/udplb"
"$root/usr/bin/udplb" completions zsh |
    install -D -m 0644 /dev/stdin "$root/usr/share/zsh/vendor-completions/_udplb"
"$root/usr/bin/udplb" completions fish |
    install -D -m 0644 /dev/stdin "$root/usr/share/fish/vendor_completions.d/udplb.fish"

install -D -m 0644 contrib/udplb.service "$root/lib/systemd/system/udplb.service"
install -D -m 0644 contrib/udplb-decap.service "$root/lib/systemd/system/udplb-decap.service"
install -D -m 0644 /dev/stdin "$root/etc/default/udplb-decap" <<'EOF'
# Arguments of `udplb decap` for udplb-decap.service (the backends' side of forwarding = "dsr",
# docs/kernel.md): the interfaces the balancers' datagrams arrive on, the balancers' addresses,
# and the pool's gue_port with encapsulation = "gue". Then: systemctl enable --now udplb-decap
#UDPLB_DECAP_ARGS="--interface eth0 --balancer 10.0.0.2 --balancer 10.0.0.3 --gue-port 6080"
UDPLB_DECAP_ARGS=""
EOF
install -D -m 0644 contrib/udplb.sysusers "$root/usr/lib/sysusers.d/udplb.conf"
# The example, but without its `user = "nobody"`: the unit starts udplb as the user udplb, and
# udplb started as root by hand switches to that user by default.
sed 's/^user = "nobody"$/# user = "udplb"/' examples/udplb.toml |
    install -D -m 0644 /dev/stdin "$root/etc/udplb/udplb.toml"
grep -q '^# user = "udplb"$' "$root/etc/udplb/udplb.toml" ||
    { echo "package: examples/udplb.toml has no user line to replace" >&2; exit 1; }
install -d -m 0755 "$root/etc/udplb/conf.d"

doc="$root/usr/share/doc/udplb"
install -D -m 0644 README.md "$doc/README.md"
install -m 0644 ARCHITECTURE.md docs/*.md "$doc/"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: udplb

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: udplb
Version: $version
Architecture: $arch
Maintainer: udplb <udplb@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.34)
Section: net
Priority: optional
Homepage: https://github.com/udplb/udplb
Description: UDP load balancer
 One UDP listener spreading datagrams over a pool of backends, per flow or per
 datagram, with weighted, least-loaded and consistent-hash schedulers; replies
 leave from the address the client sent to. Health checks (UDP, DNS, TCP, HTTP,
 a command), runtime control through an admin API and udplb ctl, persistence,
 RADIUS/SIP/QUIC-aware placement, DNS over TCP, Prometheus metrics.
EOF
printf '%s\n' /etc/udplb/udplb.toml /etc/default/udplb-decap >"$root/DEBIAN/conffiles"
# The unit is installed, not started: an operator edits /etc/udplb/udplb.toml first.
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers udplb.conf
    elif ! getent passwd udplb >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent \
            --gecos "udplb UDP load balancer" udplb >/dev/null
    fi
fi
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/udplb_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z${COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
echo "$deb"
