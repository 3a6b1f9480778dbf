#!/usr/bin/env bash
# The fuzz campaign: every reader of outside input under libFuzzer (cargo-fuzz, nightly
# toolchain), seeded with real files, for a set time each; resumable (the corpus grows in
# fuzz/corpus/<target>). Appends one line per target to fuzz/results.tsv: date, target,
# inputs executed, seconds, crash files.
#
#   fuzz/run.sh                        # every target, SECONDS_PER_TARGET each (default 600)
#   TARGETS="spec idx" SECONDS_PER_TARGET=60 fuzz/run.sh
#
# Needs `cargo install cargo-fuzz` and `rustup toolchain install nightly`. A crash leaves its
# input in fuzz/artifacts/<target>/; reproduce with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
main() {
    local seconds=${SECONDS_PER_TARGET:-600}
    local targets=${TARGETS:-"spec keras_h5 weights checkpoint zoo_model idx image run_config repo_config"}
    if [ ! -d fuzz/seeds ]; then
        # The seeds: real files of every kind (see tests/support/readers.rs, write_seeds).
        ZOO_FUZZ_SEEDS="$PWD/fuzz/seeds" cargo test -p zoo --test hostile_files \
            -- --ignored --exact write_fuzz_seeds
    fi
    (cd fuzz && cargo +nightly fuzz build -O)
    mkdir -p fuzz/logs
    for t in $targets; do
        mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
        local log="fuzz/logs/$t-$(date -u +%Y%m%dT%H%M%S).log"
        (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
            -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 \
            -print_final_stats=1) > "$log" 2>&1 || true
        local runs crashes
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
        crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
        printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%d)" "$t" "${runs:-0}" "$seconds" "$crashes" \
            | tee -a fuzz/results.tsv
    done
}
main "$@"
