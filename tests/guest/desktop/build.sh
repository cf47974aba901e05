#!/usr/bin/env bash
# Builds the desktop test guest: Debian 12 with Xfce (autologin on tty1), spice-vdagent,
# PulseAudio on an HDA card, the virtio-gpu DRM driver, and a serial command line the tests use
# (vdi-serial, below). Only Debian packages, fetched through this machine's own apt sources.
# Output (cached; rebuilt when this script changes): $1 or target/desktop-guest/
#   disk.raw (ext4, no partition table: root=/dev/vda)  vmlinuz  initrd.img  stamp  facts
# Needs root (mmdebstrap, mkfs.ext4 -d). Prints the output directory last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../../target/desktop-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

stamp=$(sha256sum < "$0" | cut -c1-16)
exec 9>"$out/.lock"
flock 9
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/disk.raw" ]; then
  echo "$out"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "desktop/build.sh: run as root (mmdebstrap)" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "desktop/build.sh: install mmdebstrap" >&2; exit 1; }
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
t0=$(date +%s)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/root

packages=(
  linux-image-amd64 systemd-sysv udev dbus dbus-user-session kmod procps
  # X and a light desktop: the modesetting driver drives virtio-gpu's DRM device.
  xserver-xorg-core xserver-xorg-input-libinput xinit x11-xserver-utils xdotool xclip
  xfce4-session xfwm4 xfce4-panel xfdesktop4 xfce4-settings xfce4-terminal
  fonts-dejavu-core dmz-cursor-theme
  # The agents a user meets: clipboard and resize, sound.
  spice-vdagent pulseaudio pulseaudio-utils alsa-utils libasound2-plugins
)
# The host's sources (same suites, same keys) are pasted into the image's sources.
mmdebstrap --variant=apt --components=main \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='chroot "$1" useradd -m -s /bin/bash -G audio,video,input user' \
  bookworm "$rootfs" "$sources" >"$work/mmdebstrap.log" 2>&1 || {
    tail -n 40 "$work/mmdebstrap.log" >&2; echo "desktop/build.sh: mmdebstrap failed" >&2; exit 1; }

# --- configuration -----------------------------------------------------------------------------
echo vdi-desktop > "$rootfs/etc/hostname"
echo '/dev/vda / ext4 defaults,noatime 0 1' > "$rootfs/etc/fstab"
passwd -R "$rootfs" -d root >/dev/null
# tty1: the user logs in by itself and starts X (Xfce) on that VT.
mkdir -p "$rootfs/etc/systemd/system/getty@tty1.service.d"
cat > "$rootfs/etc/systemd/system/getty@tty1.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin user --noclear %I $TERM
EOF
cat > "$rootfs/home/user/.bash_profile" <<'EOF'
if [ -z "$DISPLAY" ] && [ "$(tty)" = /dev/tty1 ]; then
  exec startx /usr/bin/startxfce4 -- -nolisten tcp vt1 >/tmp/x.log 2>&1
fi
EOF
# spice-vdagent's session part, and a resize that follows the host's preferred mode (virtio-gpu
# announces the client's window size as the connector's preferred mode on SetUIInfo).
mkdir -p "$rootfs/home/user/.config/autostart"
cat > "$rootfs/usr/local/bin/vdi-follow-size" <<'EOF'
#!/bin/sh
# Applies the monitor's preferred mode (the viewer's window, announced by QEMU through
# virtio-gpu) whenever it differs from the current one: what spice-vdagent does for SPICE.
while sleep 0.5; do
  xrandr --query 2>/dev/null | awk '
    / connected/ { out = $1 }
    /^ +[0-9]+x[0-9]+/ && out != "" {
      if ($0 ~ /\+/) pref[out] = $1
      if ($0 ~ /\*/) cur[out] = $1
    }
    END { for (o in pref) if (pref[o] != cur[o]) print o }' |
  while read -r o; do xrandr --output "$o" --auto; done
done
EOF
chmod 755 "$rootfs/usr/local/bin/vdi-follow-size"
cat > "$rootfs/home/user/.config/autostart/vdi-follow-size.desktop" <<'EOF'
[Desktop Entry]
Type=Application
Name=Follow the viewer's size
Exec=/usr/local/bin/vdi-follow-size
EOF
# The serial command line, in the test guest's protocol (tests/common/qemu.rs): "VDI READY" once
# the desktop and its sound server are up; then one shell command per line, run as the desktop's
# user, its output as "VDI OUT <line>" (a last line without its newline too), and
# "VDI OK <first word> <exit status>" at the end.
cat > "$rootfs/usr/local/bin/vdi-serial" <<'EOF'
#!/bin/bash
stty -F /dev/ttyS0 raw -echo 115200
exec </dev/ttyS0 >/dev/ttyS0 2>&1
until pgrep -u user -x xfdesktop >/dev/null && pgrep -u user -x xfce4-panel >/dev/null &&
      [ -S /run/user/1000/pulse/native ]; do sleep 1; done
echo "VDI READY"
while IFS= read -r line; do
  line=${line%$'\r'}
  [ -n "$line" ] || continue
  runuser -u user -- env DISPLAY=:0 XDG_RUNTIME_DIR=/run/user/1000 bash -c "$line" 2>&1 </dev/null |
    awk '{ print "VDI OUT " $0; fflush() }'
  echo "VDI OK ${line%% *} ${PIPESTATUS[0]}"
done
EOF
chmod 755 "$rootfs/usr/local/bin/vdi-serial"
# ttyS0 is the command line's alone (the kernel's console=ttyS0 would start a getty there).
ln -sf /dev/null "$rootfs/etc/systemd/system/serial-getty@ttyS0.service"
cat > "$rootfs/etc/systemd/system/vdi-serial.service" <<'EOF'
[Unit]
Description=Test command line on ttyS0
After=multi-user.target
[Service]
ExecStart=/usr/local/bin/vdi-serial
Restart=always
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vdi-serial.service \
  "$rootfs/etc/systemd/system/multi-user.target.wants/vdi-serial.service"
# No screen blanking or locking in a test desktop.
mkdir -p "$rootfs/etc/X11/xorg.conf.d"
cat > "$rootfs/etc/X11/xorg.conf.d/10-noblank.conf" <<'EOF'
Section "ServerFlags"
  Option "BlankTime" "0"
  Option "StandbyTime" "0"
  Option "SuspendTime" "0"
  Option "OffTime" "0"
EndSection
EOF
chroot "$rootfs" chown -R user:user /home/user
# Apt's lists and caches are not needed at run time.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*

# --- kernel and image ----------------------------------------------------------------------------
cp "$(ls "$rootfs"/boot/vmlinuz-* | head -n1)" "$out/vmlinuz.new"
cp "$(ls "$rootfs"/boot/initrd.img-* | head -n1)" "$out/initrd.img.new"
used=$(du -sm "$rootfs" | cut -f1)
size=$(( used + used / 2 + 256 ))
rm -f "$out/disk.raw.new"
mkfs.ext4 -q -F -L vdi-desktop -d "$rootfs" "$out/disk.raw.new" "${size}M"
for f in disk.raw vmlinuz initrd.img; do mv "$out/$f.new" "$out/$f"; done
secs=$(( $(date +%s) - t0 ))
{
  echo "build_seconds $secs"
  echo "root_mib $used"
  echo "image_mib $size"
  echo "image_allocated_mib $(du -m "$out/disk.raw" | cut -f1)"
  echo "packages $(chroot "$rootfs" dpkg-query -f '.\n' -W | wc -l)"
} > "$out/facts"
echo "$stamp" > "$out/stamp"
echo "desktop guest built in ${secs}s: $(tr '\n' ' ' < "$out/facts")" >&2
echo "$out"
