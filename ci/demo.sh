#!/usr/bin/env bash
# The main job, locally: builds the test guest from Debian packages, then runs
# `vdi-sidecar demo`: our bus, QEMU with the D-Bus display, and the VNC server on 127.0.0.1:5900.
# It prints the address and the generated password (or set VDI_PASSWORD).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && [ "${VDI_SKIP_INSTALL:-0}" != 1 ]; then
  ./ci/install-deps.sh
fi
guest=$(tests/guest/build.sh | tail -n1)
cargo build --release --locked
exec ./target/release/vdi-sidecar demo --kernel "$guest/vmlinuz" --initrd "$guest/initrd.gz" "$@"
