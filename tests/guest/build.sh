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
dpkg-deb -x debs/"${kpkg}"_*.deb kernel
dpkg-deb -x debs/busybox-static_*.deb bb
kver=${kpkg#linux-image-}
moddir=kernel/lib/modules/$kver

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules/"$kver"}
cp bb/bin/busybox "$root/bin/busybox"
gcc -static -O2 -Wall -o "$root/bin/vdi-guest" "$here/vdi-guest.c" -lm

# Modules the tests use, with everything they depend on (read from each .ko's modinfo).
declare -A seen=()
find_ko() { find "$moddir/kernel" -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" | head -n1; }
add_mod() {
  local name=$1 ko deps d
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  ko=$(find_ko "$name")
  [ -n "$ko" ] || ko=$(find_ko "$(echo "$name" | tr - _)")
  [ -n "$ko" ] || { echo "build.sh: module $name not found (built in?)" >&2; return 0; }
  deps=$(strings -a "$ko" | sed -n 's/^depends=//p' | head -n1 | tr , ' ')
  for d in $deps; do add_mod "$d"; done
  mkdir -p "$root/lib/modules/$kver/$(dirname "${ko#"$moddir"/}")"
  cp "$ko" "$root/lib/modules/$kver/${ko#"$moddir"/}"
  echo "${ko#"$moddir"/}" >> "$root/lib/modules/$kver/load-order"
}
for m in evdev psmouse virtio_pci virtio_input virtio-gpu xhci-pci usbhid hid-generic \
         snd-hda-codec-generic snd-hda-intel \
         snd-intel8x0; do
  add_mod "$m"
done

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
