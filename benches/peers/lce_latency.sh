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
# 4. For each round, model and thread count: zoo bench, then LCE (lce_latency.py --time-only),
#    one after the other, into OUT/zoo-<model>-t<N>-r<round>.json and OUT/lce-...json.
# 5. The side-by-side table (lce_latency.py --report; also OUT/compare.json): LCE and zoo
#    median ms, LCE/zoo, LAB's overhead in both, .tflite and .zoo sizes, the floor.
# --lce-only skips the zoo (steps 1, 3 and its half of 4).
#
# Environment (defaults in brackets):
#   LCE_VENV     virtual environment with benches/peers/requirements-lce.txt [target/lce-venv]
#   OUT          output folder [target/lce-results]
#   MODELS       models ["quicknet quicknet-lab"]
#   THREADS      thread counts ["1 2"]
#   RUNS         timed LCE runs per measurement [50]
#   ZOO_RUNS     timed zoo runs per measurement [500]: a zoo run takes milliseconds, so a
#                median over more runs costs little and resists brief interference
#   WARMUP       untimed LCE runs before those [5]
#   ROUNDS       alternating zoo/LCE rounds per model and thread count [1]; the table shows the
#                median over rounds of each run's median
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
ZOO_RUNS=${ZOO_RUNS:-500}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-1}
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
            echo "       zoo bench <M.zoo> --input HxWxC --threads N --runs N --json FILE." >&2
            echo "       --lce-only measures LCE alone." >&2
            exit 1
        fi
    done
fi

mkdir -p "$OUT"
rm -f "$OUT"/zoo-*.json "$OUT"/lce-*-t*.json "$OUT"/*.zoo "$OUT"/*.safetensors "$OUT"/compare.json
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
for round in $(seq 1 "$ROUNDS"); do
    for model in $MODELS; do
        for threads in $THREADS; do
            tag="$model-t$threads-r$round"
            if [[ $lce_only == 0 ]]; then
                log "round $round: zoo bench $model, $threads thread(s)"
                "$ZOO" bench "$OUT/$model.zoo" --input $INPUT --threads "$threads" --runs "$ZOO_RUNS" \
                    --json "$OUT/zoo-$tag.json" >"$OUT/zoo-$tag.log" 2>&1 || {
                    echo "error: zoo bench failed; its output ($OUT/zoo-$tag.log):" >&2
                    tail -n 20 "$OUT/zoo-$tag.log" >&2
                    exit 1
                }
            fi
            log "round $round: LCE $model, $threads thread(s)"
            # shellcheck disable=SC2086
            "$VPY" "$PEER" --out "$OUT" --time-only --models "$model" --threads "$threads" \
                --runs "$RUNS" --warmup "$WARMUP" --lce-kernels $LCE_KERNELS --seed 20240611 \
                --json "$OUT/lce-$tag.json"
        done
    done
done

# (5) The table.
"$VPY" "$PEER" --out "$OUT" --report
