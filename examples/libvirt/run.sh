#!/usr/bin/env bash
# Plain libvirt, no Kubernetes: boot a VM whose display goes out on libvirt's D-Bus bus and serve
# it with `vdi-sidecar bridge` (VNC, RDP and the browser client), until Ctrl-C.
#
#   examples/libvirt/run.sh [DISK-IMAGE]      (as root, libvirtd running)
#
# Without a disk the VM shows the firmware's "No bootable device" screen, which is still a desktop
# to look at. VDI_PASSWORD sets the viewers' password (default: generated and logged);
# VDI_SIDECAR names the binary (default: vdi-sidecar on PATH); VDI_NAME the domain;
# VDI_BRIDGE_ARGS adds bridge flags.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${VDI_NAME:-vdi-example}
sidecar=${VDI_SIDECAR:-vdi-sidecar}

disk=""
if [ $# -ge 1 ]; then
  image=$(realpath "$1")
  format=$(qemu-img info --output=json "$image" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
  disk="<disk type='file' device='disk'><driver name='qemu' type='$format'/><source file='$image'/><target dev='vda' bus='virtio'/></disk>"
fi

xml=$(mktemp)
cleanup() {
  virsh destroy "$name" >/dev/null 2>&1 || true
  virsh undefine "$name" >/dev/null 2>&1 || true
  rm -f "$xml" "$xml.password"
}
trap cleanup EXIT
sed -e "s|@NAME@|$name|" -e "s|@DISK@|$disk|" "$here/domain.xml" >"$xml"
virsh define "$xml" >/dev/null
virsh start "$name" >/dev/null

# libvirt writes the bus it started into the live XML.
address=$(virsh dumpxml "$name" | sed -n "s/.*<graphics type='dbus' address='\([^']*\)'.*/\1/p")
[ -n "$address" ] || { echo "run.sh: $name has no D-Bus display address" >&2; exit 1; }
echo "run.sh: $name is on $address" >&2

args=(bridge --dbus-address "$address")
if [ -n "${VDI_PASSWORD:-}" ]; then
  printf '%s' "$VDI_PASSWORD" >"$xml.password"
  args+=(--password-file "$xml.password")
fi
# VDI_BRIDGE_ARGS: more flags, e.g. "--vnc 0.0.0.0:5900 --rdp none" (word-split on purpose).
# shellcheck disable=SC2086
"$sidecar" "${args[@]}" ${VDI_BRIDGE_ARGS:-} &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; cleanup' EXIT
trap 'exit 0' INT TERM
wait "$pid"
