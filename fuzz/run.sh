#!/usr/bin/env bash
# The fuzz campaign: every reader of outside input under libFuzzer (cargo-fuzz, nightly
# toolchain), seeded with real files, for a set time each; resumable (the corpus grows in
# fuzz/corpus/<target>). Appends one line per target to fuzz/results.tsv: date, target,
# inputs executed, seconds taken, crash files (crashes, out-of-memory and timeouts: hangs).
#
#   fuzz/run.sh                        # every target, SECONDS_PER_TARGET each (default 600)
#   TARGETS="spec idx" SECONDS_PER_TARGET=60 fuzz/run.sh
#   RUNS_PER_TARGET=1000000 SECONDS_PER_TARGET=7200 fuzz/run.sh   # a million inputs each
#
# Needs `cargo install cargo-fuzz` and `rustup toolchain install nightly`. A crash leaves its
# input in fuzz/artifacts/<target>/; reproduce with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
main() {
    local seconds=${SECONDS_PER_TARGET:-600}
    local runs_limit=()
    if [ -n "${RUNS_PER_TARGET:-}" ]; then runs_limit=(-runs="$RUNS_PER_TARGET"); fi
    local targets=${TARGETS:-"spec keras_h5 weights checkpoint zoo_model idx image run_config repo_config"}
    if [ ! -d fuzz/seeds ]; then
        # The seeds: real files of every kind (see tests/support/readers.rs, write_seeds).
        ZOO_FUZZ_SEEDS="$PWD/fuzz/seeds" cargo test -p zoo --test hostile_files \
            -- --ignored --exact write_fuzz_seeds
    fi
    (cd fuzz && cargo +nightly fuzz build -O)
    local bin
    bin=$PWD/fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release
    mkdir -p fuzz/logs
    # Every input is written to a scratch file and read back as the zoo reads it; on ext4 each
    # rewrite waits for writeback (about 4 ms: 250 inputs/s instead of 3,000), so the scratch
    # files live in memory where a tmpfs is at hand.
    if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ]; then
        export TMPDIR=/dev/shm
    fi
    for t in $targets; do
        mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
        # An input that runs longer than this many seconds is a hang. Images get more: valid
        # JPEGs near the decoded-size bound take 15-18 s here under the sanitizer (a
        # 64-megapixel photograph 15 s, a 25-megapixel input the campaign found 16-18 s), about
        # a second in an optimised build.
        local timeout=10
        if [ "$t" = image ]; then timeout=60; fi
        local log="fuzz/logs/$t-$(date -u +%Y%m%dT%H%M%S).log" start=$SECONDS
        # The binaries built above, run directly: `cargo fuzz run` would rebuild them from the
        # working tree, which may change while a campaign runs.
        (cd fuzz && ASAN_OPTIONS=detect_odr_violation=0 "$bin/$t" -artifact_prefix="artifacts/$t/" \
            -max_total_time="$seconds" "${runs_limit[@]}" -rss_limit_mb=2048 -timeout="$timeout" \
            -report_slow_units="$timeout" \
            -max_len=1048576 -print_final_stats=1 "corpus/$t" "seeds/$t") > "$log" 2>&1 || true
        local runs crashes
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' |
            tail -1 || true)
        crashes=$(find "fuzz/artifacts/$t" -type f ! -name 'slow-unit-*' | wc -l)
        printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%d)" "$t" "${runs:-0}" \
            "$((SECONDS - start))" "$crashes" | tee -a fuzz/results.tsv
    done
}
main "$@"
