#!/usr/bin/env bash
# Inference latency of the zoo against Larq Compute Engine (LCE), side by side: QuickNet and
# QuickNet-LAB at 224x224x3, 1000 classes, batch 1, float input, the same weights in both.
#
# Usage: LCE_VENV=<venv> benches/peers/lce_latency.sh [--skip-build] [--lce-only]
#
# 1. Builds the zoo (cargo build --release -p zoo; --skip-build skips it).
# 2. benches/peers/lce_latency.py --no-time --floor: builds both Keras models with seeded random
#    weights, saves them as OUT/<model>.h5, converts them with LCE to OUT/<model>.tflite, and
#    measures the XNOR-popcount rate for the arithmetic floor of the binary layers.
# 3. zoo import-larq OUT/<model>.h5 -> OUT/<model>.safetensors, then zoo export -> OUT/<model>.zoo.
# 4. ROUNDS rounds; in each, for each thread count: the floor loop (`zoo bench --floor`, a fixed
#    XNOR-popcount loop over QuickNet's binary MACs) with every zoo kernel; zoo bench with every
#    kernel, the second model timed against the first in the same process (`--against`: one
#    call of each in turn); LCE for each model (lce_latency.py --time-only, both LCE kernels);
#    one process after another, into OUT/floor-t<N>-k<kernel>-r<round>.json,
#    OUT/zoo-<model>[+<model>]-t<N>-k<kernel>-r<round>.json and OUT/lce-<model>-t<N>-r<round>.json.
# 5. The side-by-side table (lce_latency.py --report; also OUT/compare.json): per model, thread
#    count and zoo kernel, the median over processes of each process's median, with the spread
#    of those medians (max/min - 1) for the zoo, LCE and the floor loop (the machine's own
#    spread: fixed work); LCE/zoo, zoo/floor; LAB's cost: for the zoo the median over processes
#    of each process's median ratio of paired calls, for LCE the median of the per-round
#    ratios, each with its range; .tflite and .zoo sizes.
# --lce-only skips the zoo (steps 1, 3 and its half of 4).
#
# Environment (defaults in brackets):
#   LCE_VENV     virtual environment with benches/peers/requirements-lce.txt [target/lce-venv]
#   OUT          output folder [target/lce-results]
#   MODELS       one or two models ["quicknet quicknet-lab"]
#   THREADS      thread counts ["1 2"]
#   RUNS         timed LCE runs per process [50]
#   ZOO_RUNS     timed zoo runs per process [300]: a zoo run takes milliseconds, so a median
#                over more runs costs little and resists brief interference
#   WARMUP       untimed LCE runs before those [5]
#   ROUNDS       alternating rounds [10]: processes per model, engine, kernel and thread count
#   ZOO_KERNELS  zoo kernels to time (ZOO_PACKED_KERNEL) [every one this CPU runs, of
#                "avx512 avx2 portable"]
#   LCE_KERNELS  LCE interpreter settings to time ["bgemm indirect-bgemm"]; see
#                lce_latency.py --help
#   ZOO          the zoo binary [target/release/zoo]
set -euo pipefail

cd "$(dirname "$0")/../.."
LCE_VENV=${LCE_VENV:-target/lce-venv}
OUT=${OUT:-target/lce-results}
MODELS=${MODELS:-"quicknet quicknet-lab"}
THREADS=${THREADS:-"1 2"}
RUNS=${RUNS:-50}
ZOO_RUNS=${ZOO_RUNS:-300}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-10}
ZOO_KERNELS=${ZOO_KERNELS:-}
LCE_KERNELS=${LCE_KERNELS:-"bgemm indirect-bgemm"}
ZOO=${ZOO:-target/release/zoo}
INPUT=224x224x3  # the specs' own input and classes
CLASSES=1000
PEER=benches/peers/lce_latency.py

skip_build=0
lce_only=0
for arg in "$@"; do
    case "$arg" in
        --skip-build) skip_build=1 ;;
        --lce-only) lce_only=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[lce_latency] $*" >&2; }

export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2
VPY="$LCE_VENV/bin/python"
if [[ ! -x "$VPY" ]] || ! "$VPY" -c 'import larq_compute_engine, larq, tf_keras' 2>/dev/null; then
    echo "error: $LCE_VENV is not a virtual environment with LCE (set LCE_VENV). Set one up with:" >&2
    echo "    python3.11 -m venv $LCE_VENV" >&2
    echo "    $LCE_VENV/bin/pip install -r benches/peers/requirements-lce.txt" >&2
    exit 1
fi

if [[ $lce_only == 0 ]]; then
    if [[ $skip_build == 0 ]]; then
        log "cargo build --release -p zoo"
        cargo build --release -p zoo
    fi
    if [[ ! -x $ZOO ]]; then
        echo "error: $ZOO does not exist; build it with: cargo build --release -p zoo" >&2
        exit 1
    fi
    for sub in import-larq export bench; do
        if ! "$ZOO" "$sub" --help >/dev/null 2>&1; then
            echo "error: $ZOO has no working '$sub' subcommand. This script needs" >&2
            echo "       zoo import-larq <H5> --spec S --input HxWxC --classes N -o <W.safetensors>," >&2
            echo "       zoo export <W.safetensors> --spec S --input HxWxC --classes N -o <M.zoo>," >&2
            echo "       zoo bench <M.zoo> --input HxWxC --threads N --runs N --batch 0 [--floor | --against <M2.zoo>] --json FILE." >&2
            echo "       --lce-only measures LCE alone." >&2
            exit 1
        fi
    done
fi

mkdir -p "$OUT"
rm -f "$OUT"/zoo-*.json "$OUT"/zoo-*.log "$OUT"/floor-*.json "$OUT"/floor-*.log "$OUT"/lce-*-t*.json "$OUT"/*.zoo "$OUT"/*.safetensors "$OUT"/compare.json
log "results in $OUT"

# (2) The Keras models, their .h5 weights, the .tflite files, the popcount rate.
# shellcheck disable=SC2086
"$VPY" "$PEER" --out "$OUT" --models $MODELS --threads $THREADS --seed 20240611 --no-time --floor

# (3) The same weights in the zoo.
if [[ $lce_only == 0 ]]; then
    log "zoo summary: $("$ZOO" summary quicknet --input $INPUT --classes $CLASSES | grep -E '^Binary MACs' | tr -s ' ')"
    for model in $MODELS; do
        log "zoo import-larq + export: $model"
        "$ZOO" import-larq "$OUT/$model.h5" --spec "$model" --input $INPUT --classes $CLASSES \
            -o "$OUT/$model.safetensors"
        "$ZOO" export "$OUT/$model.safetensors" --spec "$model" --input $INPUT --classes $CLASSES \
            -o "$OUT/$model.zoo"
    done
fi

# (4) Alternating measurements.
if [[ $lce_only == 0 && -z $ZOO_KERNELS ]]; then
    # The kernels this CPU runs: an unavailable ZOO_PACKED_KERNEL falls back to the best one.
    for kernel in avx512 avx2 portable; do
        ZOO_PACKED_KERNEL=$kernel "$ZOO" bench quicknet --input 32x32x1 --runs 1 --warmup 0 \
            --batch 0 --json "$OUT/kernel-probe.json" >/dev/null
        if grep -q "\"kernel\": \"$kernel\"" "$OUT/kernel-probe.json"; then
            ZOO_KERNELS="$ZOO_KERNELS $kernel"
        fi
    done
    rm -f "$OUT/kernel-probe.json"
    log "zoo kernels this CPU runs:$ZOO_KERNELS"
fi

# `zoo bench` of one process into $1 (JSON), with kernel $2, the rest of the arguments its own.
zoo_bench() {
    local json=$1 kernel=$2
    shift 2
    ZOO_PACKED_KERNEL=$kernel "$ZOO" bench "$@" --input $INPUT --runs "$ZOO_RUNS" --batch 0 \
        --json "$json" >"${json%.json}.log" 2>&1 || {
        echo "error: zoo bench failed; its output (${json%.json}.log):" >&2
        tail -n 20 "${json%.json}.log" >&2
        exit 1
    }
}

# shellcheck disable=SC2086
set -- $MODELS
if (( $# > 2 )); then
    echo "error: MODELS names at most two models (the second is timed against the first)" >&2
    exit 2
fi
first=$1 second=${2:-}

for round in $(seq 1 "$ROUNDS"); do
    for threads in $THREADS; do
        if [[ $lce_only == 0 ]]; then
            log "round $round: the floor loop, $threads thread(s), kernels$ZOO_KERNELS"
            for kernel in $ZOO_KERNELS; do
                zoo_bench "$OUT/floor-t$threads-k$kernel-r$round.json" "$kernel" quicknet \
                    --classes $CLASSES --threads "$threads" --floor
            done
        fi
        if [[ $lce_only == 0 ]]; then
            log "round $round: zoo bench $first${second:+ against $second}, $threads thread(s), kernels$ZOO_KERNELS"
            for kernel in $ZOO_KERNELS; do
                zoo_bench "$OUT/zoo-$first${second:++$second}-t$threads-k$kernel-r$round.json" \
                    "$kernel" "$OUT/$first.zoo" ${second:+--against "$OUT/$second.zoo"} \
                    --threads "$threads"
            done
        fi
        for model in $MODELS; do
            log "round $round: LCE $model, $threads thread(s)"
            # shellcheck disable=SC2086
            "$VPY" "$PEER" --out "$OUT" --time-only --models "$model" --threads "$threads" \
                --runs "$RUNS" --warmup "$WARMUP" --lce-kernels $LCE_KERNELS --seed 20240611 \
                --json "$OUT/lce-$model-t$threads-r$round.json"
        done
    done
done

# (5) The table.
"$VPY" "$PEER" --out "$OUT" --report
