#!/usr/bin/env bash
# Accuracy benchmark: QuickNet and QuickNet-LAB trained on the embedded Fashion-MNIST with the
# same recipe and budget, then evaluated on its 10,000 test images.
#
#   benches/fashion_mnist_accuracy.sh                 # 3 epochs each, one after the other
#   BUDGET="--max-steps 2000" THREADS=8 PARALLEL=1 benches/fashion_mnist_accuracy.sh
#
# Environment: BUDGET (zoo train flags fixing the length, default `--epochs 3`), THREADS
# (compute threads per run, default 2), PARALLEL=1 (train both at once, for many-core
# machines), ZOO (the binary, default target/release/zoo, built if missing), OUT (run folders,
# default target/accuracy-runs). Prints a Markdown table; record it in benches/RESULTS.md with
# the command, the machine and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

ZOO=${ZOO:-target/release/zoo}
OUT=${OUT:-target/accuracy-runs}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:---epochs 3}
RECIPE="--data fashion-mnist --batch-size 64 --lr 2.5e-3 --schedule linear --seed 0"
MODELS=(quicknet quicknet-lab)

[[ -x $ZOO ]] || cargo build --release -p zoo
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%S)
run() {
    local model=$1
    # shellcheck disable=SC2086
    "$ZOO" --threads "$THREADS" train "$model" $RECIPE $BUDGET --out "$OUT/$model-$stamp" \
        > "$OUT/$model-$stamp.log" 2>&1
}
start=$(date +%s)
if [[ ${PARALLEL:-0} == 1 ]]; then
    for m in "${MODELS[@]}"; do run "$m" & done
    wait
else
    for m in "${MODELS[@]}"; do run "$m"; done
fi
echo "| model | steps | epochs | test top-1 | test top-5 | train img/s | wall s |"
echo "|---|---|---|---|---|---|---|"
for m in "${MODELS[@]}"; do
    python3 - "$OUT/$m-$stamp/summary.json" "$m" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
v = s["final_val"]
print(f"| {sys.argv[2]} | {s['steps']} | {s['epochs']:.2f} | {v['top1']:.2f}% | {v['top5']:.2f}% "
      f"| {s['train_images_per_second']:.1f} | {s['wall_seconds']:.0f} |")
PY
done
echo
echo "recipe: $RECIPE $BUDGET, $THREADS thread(s) per run$([[ ${PARALLEL:-0} == 1 ]] && echo ', both runs at once'); $(($(date +%s) - start)) s in all; runs in $OUT/*-$stamp"
