#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 20: the CI regression
# check; issue 22 asks for >= 600 per target when hunting), starting from the committed seeds
# (fuzz/seeds/<target>) and a local corpus (fuzz/corpus/<target>, grown by earlier runs, not
# committed). Prints one line per target: runs, coverage, features, corpus size; fails on the first
# crash, hang (> 2 s per input), leak or allocation over 64 MiB, leaving the input in
# fuzz/artifacts/<target>/.
#   ./ci/fuzz.sh [SECONDS] [TARGET...]      JOBS=2 runs two targets at once; FUZZ_SEED=0 picks
#                                           a random seed (default 1: CI repeats what ran here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vdi-sidecar-fuzz$')
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# cargo-fuzz passes -Z flags (sanitizer, coverage); the one toolchain here is stable.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O 2>&1 | grep -v '^\s*Compiling' || true
for t in "${targets[@]}"; do
    test -x "fuzz/target/x86_64-unknown-linux-gnu/release/$t" || { echo "fuzz target $t did not build" >&2; exit 1; }
done
mkdir -p fuzz/logs
run_one() {
    local t="$1"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    local log="fuzz/logs/$t.log"
    if "fuzz/target/x86_64-unknown-linux-gnu/release/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" \
        -max_total_time="$secs" -timeout=2 -malloc_limit_mb=64 -rss_limit_mb=2048 \
        -max_len=131072 -seed="${FUZZ_SEED:-1}" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"$log" 2>&1; then
        local done_line runs
        done_line=$(grep -E '^#[0-9]+\s+DONE' "$log" | tail -1 || true)
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        printf '%-16s ok   %ss  runs %-9s %s\n' "$t" "$secs" "${runs:-?}" \
            "$(echo "$done_line" | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+')"
    else
        printf '%-16s FAIL (see %s)\n' "$t" "$log"
        grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -8
        return 1
    fi
}
jobs="${JOBS:-1}"
status=0
if [ "$jobs" -gt 1 ]; then
    export -f run_one
    export secs
    printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}' || status=1
else
    for t in "${targets[@]}"; do run_one "$t" || status=1; done
fi
exit $status
