#!/usr/bin/env bash
# Builds the test guest from Debian packages: the distribution kernel (vmlinuz + the modules the
# tests need), busybox-static, and our vdi-guest program, as an initramfs booted with -kernel.
# Output (cached; rebuilt when this script or vdi-guest.c changes): $1 or target/vdi-guest/
#   vmlinuz  initrd.gz  stamp
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/vdi-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

stamp=$(cat "$0" "$here/vdi-guest.c" | sha256sum | cut -c1-16)
# Tests run in parallel and all ask for the guest: one builds, the others wait and reuse it.
exec 9>"$out/.lock"
flock 9
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initrd.gz" ]; then
  echo "$out"; exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build.sh: cannot resolve the kernel package (apt-get update?)" >&2; exit 1; }
mkdir -p debs
(cd debs && apt-get download "$kpkg" busybox-static >/dev/null 2>&1) || {
  echo "build.sh: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
kdeb=$(echo debs/"${kpkg}"_*.deb)
dpkg-deb -x debs/busybox-static_*.deb bb
kver=${kpkg#linux-image-}

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules/"$kver"} kernel
cp bb/bin/busybox "$root/bin/busybox"
# spice-protocol (libspice-protocol-dev): the vdagent message layouts for the clipboard agent.
gcc -static -O2 -Wall $(pkg-config --cflags spice-protocol) -o "$root/bin/vdi-guest" "$here/vdi-guest.c" -lm

# The kernel package unpacks to ~400 MB, nearly all modules we never load; CI machines can be
# short of disk. So only the kernel image and the modules the tests use (with what they depend
# on, read from each .ko's modinfo) are unpacked, a batch per dependency level.
dpkg-deb --fsys-tarfile "$kdeb" | tar -t | grep -E '\.ko$' > ko-list
unpack() { dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C kernel -T "$1"; }
echo "./boot/vmlinuz-$kver" > want
unpack want
declare -A seen=() path=() deps=()
find_ko() {  # $1 a module name, - and _ being the same; prints the path in the package
  local re
  re=$(echo "$1" | sed 's/[-_]/[-_]/g')
  { grep -E "/$re\.ko$" ko-list || true; } | head -n1
}
wanted=(evdev psmouse virtio_pci virtio_input virtio-gpu virtio_console xhci-pci usbhid hid-generic
        snd-hda-codec-generic snd-hda-intel snd-intel8x0)
batch=("${wanted[@]}")
while [ ${#batch[@]} -gt 0 ]; do
  : > want
  new=()
  for name in "${batch[@]}"; do
    key=$(echo "$name" | tr - _)
    [ -n "${seen[$key]:-}" ] && continue
    seen[$key]=1
    ko=$(find_ko "$name")
    [ -n "$ko" ] || { echo "build.sh: module $name not found (built in?)" >&2; continue; }
    path[$key]=$ko
    echo "$ko" >> want
    new+=("$key")
  done
  [ -s want ] && unpack want
  batch=()
  for key in "${new[@]}"; do
    deps[$key]=$(strings -a "kernel/${path[$key]}" | sed -n 's/^depends=//p' | head -n1 | tr , ' ' | tr - _)
    read -ra more <<< "${deps[$key]}"
    batch+=("${more[@]}")
  done
done
# Load order: every module after what it depends on (insmod does not resolve dependencies).
declare -A placed=()
place() {
  local key=$1 d rel
  [ -n "${placed[$key]:-}" ] && return 0
  placed[$key]=1
  for d in ${deps[$key]:-}; do place "$d"; done
  [ -n "${path[$key]:-}" ] || return 0
  rel=${path[$key]#./lib/modules/"$kver"/}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
  cp "kernel/${path[$key]}" "$root/lib/modules/$kver/$rel"
  echo "$rel" >> "$root/lib/modules/$kver/load-order"
}
for m in "${wanted[@]}"; do place "$(echo "$m" | tr - _)"; done

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
kver=$(uname -r)
while read -r ko; do insmod "/lib/modules/$kver/$ko" 2>/dev/null || echo "VDI-INIT insmod failed: $ko"; done < "/lib/modules/$kver/load-order"
sleep 0.3
exec /bin/vdi-guest < /dev/ttyS0 > /dev/ttyS0 2>&1
INIT
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz.new"
cp kernel/boot/vmlinuz-"$kver" "$out/vmlinuz.new"
mv "$out/initrd.gz.new" "$out/initrd.gz"
mv "$out/vmlinuz.new" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "$out"
