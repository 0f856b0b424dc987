#!/usr/bin/env bash
# Debian packages: ota-server for amd64, ota-agent for arm64 (static musl,
# agent-dist profile), built with cargo-deb, then checked: their contents,
# and the server package installed, run as its system user, and purged.
#   usage: scripts/package.sh [--no-install]   (after the release builds; installs cargo-deb if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install -q cargo-deb --locked
[ -x target/release/ota-server ] || cargo build --release -q -p ota-server
[ -x target/aarch64-unknown-linux-musl/agent-dist/ota-agent ] ||
  cargo build -q --profile agent-dist --target aarch64-unknown-linux-musl -p ota-agent
server_deb=$(cargo deb -q -p ota-server --no-build | tail -1)
agent_deb=$(cargo deb -q -p ota-agent --target aarch64-unknown-linux-musl --profile agent-dist --no-build | tail -1)
check() { # DEB PATH...
  local deb=$1 list; shift
  # Listed once into a variable: `dpkg-deb -c | grep -q` under pipefail
  # fails when grep stops reading early (SIGPIPE).
  list=$(dpkg-deb -c "$deb")
  for p in "$@"; do
    grep -q " \./$p\$" <<<"$list" || { echo "!! $deb lacks $p"; exit 1; }
  done
}
check "$server_deb" usr/bin/ota-server usr/lib/systemd/system/ota-server.service etc/ota-server/server.toml
check "$agent_deb" usr/bin/ota-agent usr/lib/systemd/system/ota-agent.service etc/ota-agent/agent.toml usr/share/doc/ota-agent/examples/agent-grub.toml
[ "$(dpkg-deb -f "$agent_deb" Architecture)" = arm64 ] || { echo "!! agent package is not arm64"; exit 1; }
printf '%s  %s bytes\n' "$server_deb" "$(stat -c %s "$server_deb")" "$agent_deb" "$(stat -c %s "$agent_deb")"
if [ "${1:-}" != --no-install ] && [ "$(id -u)" = 0 ]; then
  # Install the server package for real: user, secrets, key, state dir; run
  # it as its user on a spare port; then purge.
  dpkg -i "$server_deb" >/dev/null
  getent passwd ota-server >/dev/null || { echo "!! no ota-server user"; exit 1; }
  ! grep -q change-me /etc/ota-server/server.toml || { echo "!! placeholder secrets left"; exit 1; }
  sed 's/^listen = .*/listen = "127.0.0.1:0"/' /etc/ota-server/server.toml > /tmp/ota-server-pkgtest.toml
  chgrp ota-server /tmp/ota-server-pkgtest.toml; chmod 640 /tmp/ota-server-pkgtest.toml
  runuser -u ota-server -- /usr/bin/ota-server serve --config /tmp/ota-server-pkgtest.toml > /tmp/ota-server-pkgtest.out 2>/dev/null &
  pid=$!
  for _ in $(seq 50); do grep -q "listening on" /tmp/ota-server-pkgtest.out && break; sleep 0.1; done
  addr=$(sed -n 's/^ota-server listening on //p' /tmp/ota-server-pkgtest.out)
  curl -fsS "http://$addr/healthz" >/dev/null || { echo "!! the packaged server does not answer"; kill $pid; exit 1; }
  kill -TERM $pid; wait $pid || true
  [ "$(stat -c %U /var/lib/ota-server/db)" = ota-server ] || { echo "!! state not owned by ota-server"; exit 1; }
  dpkg --purge ota-server >/dev/null
  rm -rf /etc/ota-server /tmp/ota-server-pkgtest.*
  echo "server package: installed, ran as user ota-server with state in /var/lib/ota-server, purged"
fi
