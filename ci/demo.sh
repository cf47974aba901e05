#!/usr/bin/env bash
# The main job, locally: builds the test guest from Debian packages, then runs
# `vdi-sidecar demo`: our bus, QEMU with the D-Bus display, the VNC server on 127.0.0.1:5900 and
# the web client (noVNC) on https://127.0.0.1:6080/.
# It prints the address and the generated password (or set VDI_PASSWORD).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ "${VDI_SKIP_INSTALL:-0}" != 1 ]; then
  ./ci/install-deps.sh
fi
# --desktop: the Debian desktop guest (Xfce, spice-vdagent, PulseAudio; built once as root,
# ~2 min, cached in target/desktop-guest) instead of the small test guest.
desktop=0
if [ "${1:-}" = --desktop ]; then
  desktop=1; shift
fi
if [ "$desktop" = 1 ]; then
  guest=$(tests/guest/desktop/build.sh | tail -n1)
  boot=(--kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" --disk "$guest/disk.raw")
else
  guest=$(tests/guest/build.sh | tail -n1)
  boot=(--kernel "$guest/vmlinuz" --initrd "$guest/initrd.gz")
fi
if [ ! -f web/node_modules/@novnc/novnc/core/rfb.js ]; then
  (cd web && npm ci --no-audit --no-fund) || echo "demo: no noVNC (npm ci in web/ failed): the web page will say so" >&2
fi
cargo build --release --locked
exec ./target/release/vdi-sidecar demo "${boot[@]}" \
  --web-root web/node_modules/@novnc/novnc "$@"
