#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests (real dbus-daemon, real libvirt).
# On a fresh Debian 12 machine, as root: installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && [ "${VDI_SKIP_INSTALL:-0}" != 1 ]; then
  ./ci/install-deps.sh
fi
# Installs from rustup when missing; needs nothing else.
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# A clean checkout gains nothing from incremental state; it only takes disk (CI machines can be short).
export CARGO_INCREMENTAL=0
df -h . /tmp | sed 's/^/disk before tests: /'
trap 'df -h . /tmp | sed "s/^/disk after tests: /"; du -sh target 2>/dev/null || true' EXIT

# --desktop: only the end-to-end tests on the Debian desktop guest (tests/desktop.rs; its image
# is built with mmdebstrap as root, ~2 min, and one boot takes ~2 min under TCG).
if [ "${1:-}" = --desktop ]; then
  exec cargo test --locked --test desktop -- --ignored --nocapture
fi
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets --no-fail-fast
# The Debian desktop guest (its image built here, ~2-4 min; the test ~2.5 min): it fits the CI
# budget, so CI runs it too.
cargo test --locked --test desktop -- --ignored --nocapture
./ci/check-packaging.sh
# Every fuzz target's committed seeds run in `cargo test` above (tests/fuzz_seeds.rs). The
# coverage-guided runs need their own sanitizer build of every dependency (17-18 min on these
# 2-core machines, a third of the CI budget), so CI leaves them out unless VDI_FUZZ_SECONDS is
# set: `VDI_FUZZ_SECONDS=20 ./ci/test.sh` (regression), `./ci/fuzz.sh 600` (hunting).
(cd fuzz && cargo fmt --check)
if [ "${VDI_FUZZ_SECONDS:-0}" -gt 0 ]; then
  JOBS=2 ./ci/fuzz.sh "$VDI_FUZZ_SECONDS"
fi
