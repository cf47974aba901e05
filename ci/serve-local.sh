#!/usr/bin/env bash
# Runs the sidecar outside Kubernetes against a temporary hooks directory, the way it runs in a
# virt-launcher pod: it starts its bus and then its hook socket, and waits for virt-launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ "${VDI_SKIP_INSTALL:-0}" != 1 ]; then
  ./ci/install-deps.sh
fi
cargo build --release --locked
hooks=${VDI_HOOKS_DIR:-$(mktemp -d /tmp/vdi-hooks.XXXXXX)}
mkdir -p "$hooks"
chmod 0755 "$hooks"
echo "hooks dir: $hooks (hook socket: $hooks/vdi-sidecar.sock, bus: $hooks/vdi/bus)"
echo "try: ./target/release/vdi-sidecar rewrite-domain < tests/data/domains/kubevirt-basic.xml"
echo "stop with Ctrl-C"
exec ./target/release/vdi-sidecar serve --hooks-dir "$hooks" \
  --qemu-bus-address "unix:path=$hooks/vdi/bus"
