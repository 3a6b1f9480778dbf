#!/usr/bin/env bash
# Training throughput of the zoo's trainer against the PyTorch peer, side by side, on the CPU
# or a GPU.
#
# In each of ROUNDS rounds, runs `zoo train` and benches/peers/torch_quicknet.py on each model
# (QuickNet, QuickNet-LAB) in turn, on Fashion-MNIST (32x32x1, 10 classes) or at another INPUT,
# batch 64, THREADS threads; prints the median images per second of each and their ratio and, when both models
# run, LAB's cost over sign in step time for each trainer (the median over rounds of each
# round's ratio, so that the two models of a round see the same machine).
#
# Usage: benches/peers/train_throughput.sh [--pytorch-only] [--skip-build]
#
# Environment (defaults in brackets):
#   PEERS_VENV   the Python virtual environment for the peer [target/peers-venv]; created and
#                filled from benches/peers/requirements-torch.txt when missing or out of date
#   PYTHON       the interpreter that creates the venv (Python 3.11) [python3]
#   MODELS       models to measure ["quicknet quicknet-lab"]
#   ROUNDS       alternating rounds per model [3]
#   STEPS        timed steps per run [50]: PyTorch times STEPS steps after WARMUP untimed
#                ones; `zoo train` runs --max-steps STEPS+2 and times all but its first 2
#                (WARMUP_STEPS in zoo/src/train/mod.rs), so both time STEPS steps
#   WARMUP       untimed PyTorch steps first [2, as the zoo's]
#   BATCH        batch size [64]
#   THREADS      threads for both [2]
#   DEVICE       where both train: cpu, cuda or cuda:N [cpu]; the zoo needs its `cuda` feature
#   INPUT        HxWxC [32x32x1: Fashion-MNIST]. Another size needs DATA, an image folder
#                (train/<class>/*.JPEG, val/<class>/*.JPEG) that the zoo reads at INPUT with its
#                decoded images cached; the peer trains on random images of that size
#   ZOO          our trainer [target/release/zoo]
#   PEER_PYTHON  an interpreter that has torch already (a GPU machine's python3): no venv
#   RESULTS_DIR  where the raw results of every run go [target/peers-results/<date-time>]
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
PEERS_VENV=${PEERS_VENV:-target/peers-venv}
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-"quicknet quicknet-lab"}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-2}
ZOO_UNTIMED=2  # steps zoo train leaves out of train_images_per_second
BATCH=${BATCH:-64}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
INPUT=${INPUT:-32x32x1}
DATA=${DATA:-}
RESULTS_DIR=${RESULTS_DIR:-target/peers-results/$(date +%Y%m%d-%H%M%S)}
REQUIREMENTS=benches/peers/requirements-torch.txt
ZOO=${ZOO:-target/release/zoo}
if [[ $INPUT == 32x32x1 ]]; then
    zoo_data=(--data fashion-mnist)
    peer_data=(--data fashion-mnist)
elif [[ -n $DATA ]]; then
    zoo_data=(--data "$DATA" --input "${INPUT%x*}" --cache)
    peer_data=(--data random --input "$INPUT")
else
    echo "error: INPUT=$INPUT needs DATA, an image folder of that many channels" >&2
    exit 2
fi

pytorch_only=0
skip_build=0
for arg in "$@"; do
    case "$arg" in
        --pytorch-only) pytorch_only=1 ;;
        --skip-build) skip_build=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[train_throughput] $*" >&2; }

# (a) The peer's virtual environment, (re)filled when the pinned requirements change.
VPY="${PEER_PYTHON:-$PEERS_VENV/bin/python}"
STAMP="$PEERS_VENV/.requirements-torch.txt"
if [[ -n ${PEER_PYTHON:-} ]]; then
    log "the peer runs on $PEER_PYTHON as it is"
elif [[ ! -x "$VPY" ]]; then
    log "creating the virtual environment $PEERS_VENV"
    "$PYTHON" -m venv "$PEERS_VENV"
fi
if [[ -z ${PEER_PYTHON:-} ]] && ! cmp -s "$REQUIREMENTS" "$STAMP"; then
    log "installing $REQUIREMENTS into $PEERS_VENV (torch's PyPI wheel and its CUDA runtime: ~5 GiB)"
    "$VPY" -m pip install --disable-pip-version-check -q -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$STAMP"
fi

# (b) Our trainer.
if [[ $pytorch_only == 0 ]]; then
    if [[ $skip_build == 0 ]]; then
        log "cargo build --release -p zoo"
        cargo build --release -p zoo
    fi
    if [[ ! -x $ZOO ]]; then
        echo "error: $ZOO does not exist; build it with: cargo build --release -p zoo" >&2
        exit 1
    fi
    if ! "$ZOO" train --help >/dev/null 2>&1; then
        echo "error: $ZOO has no working 'train' subcommand (\`$ZOO train --help\` failed)." >&2
        echo "       This script needs: zoo train <model> --data fashion-mnist --batch-size N" >&2
        echo "       --threads N --max-steps N --no-eval --out DIR, writing DIR/summary.json" >&2
        echo "       with \"train_images_per_second\". Use --pytorch-only to measure the peer alone." >&2
        exit 1
    fi
fi

mkdir -p "$RESULTS_DIR"
log "raw results in $RESULTS_DIR"

# One run of our trainer; prints its images per second.
run_zoo() {
    local model=$1 round=$2
    local out="$RESULTS_DIR/zoo-$model-round$round"
    rm -rf "$out"
    if ! "$ZOO" --device "$DEVICE" train "$model" "${zoo_data[@]}" --batch-size "$BATCH" \
        --threads "$THREADS" --max-steps $((ZOO_UNTIMED + STEPS)) --no-eval --out "$out" \
        >"$out.log" 2>&1; then
        echo "error: zoo train $model failed; its output is in $out.log:" >&2
        tail -n 20 "$out.log" >&2
        return 1
    fi
    "$VPY" - "$out/summary.json" <<'EOF'
import json, sys
path = sys.argv[1]
try:
    value = json.load(open(path))["train_images_per_second"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: no train_images_per_second in {path}: {e!r}")
print(value)
EOF
}

# One run of the PyTorch peer; keeps its JSON line and prints its images per second.
run_torch() {
    local model=$1 round=$2
    local out="$RESULTS_DIR/pytorch-$model-round$round.json"
    if ! "$VPY" benches/peers/torch_quicknet.py --model "$model" "${peer_data[@]}" \
        --device "$DEVICE" --batch-size "$BATCH" --threads "$THREADS" --steps "$STEPS" \
        --warmup-steps "$WARMUP" >"$out" 2>"$out.stderr"; then
        echo "error: the PyTorch peer failed on $model:" >&2
        cat "$out.stderr" >&2
        return 1
    fi
    "$VPY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["images_per_second"])' "$out"
}

median() { "$VPY" -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }

# (c) Interleaved rounds, then the table of medians.
declare -A zoo_values torch_values
for round in $(seq 1 "$ROUNDS"); do
    for model in $MODELS; do
        if [[ $pytorch_only == 0 ]]; then
            value=$(run_zoo "$model" "$round")
            zoo_values[$model]+="$value,"
            log "$model round $round: zoo $value img/s"
        else
            zoo_values[$model]+="nan,"
        fi
        value=$(run_torch "$model" "$round")
        torch_values[$model]+="$value,"
        log "$model round $round: pytorch $value img/s"
    done
done
rows=()
for model in $MODELS; do
    rows+=("$model ${zoo_values[$model]%,} ${torch_values[$model]%,}")
done

torch_version=$("$VPY" -c 'import torch; print(torch.__version__)')
echo
echo "Training throughput on $DEVICE, ${zoo_data[*]} (zoo) at $INPUT, batch $BATCH, $THREADS threads, median of $ROUNDS rounds"
echo "(PyTorch $torch_version: $WARMUP warm-up + $STEPS timed steps; zoo: --max-steps $((ZOO_UNTIMED + STEPS)), the first $ZOO_UNTIMED untimed)"
"$VPY" - "${rows[@]}" <<'EOF'
import math, statistics, sys
rounds = {}
print(f"{'model':<14} {'zoo img/s':>10} {'pytorch img/s':>14} {'zoo/pytorch':>12}")
for row in sys.argv[1:]:
    model, zoo, torch = row.split()
    rounds[model] = [[float(v) for v in zoo.split(",")], [float(v) for v in torch.split(",")]]
    zoo, torch = (statistics.median(v) for v in rounds[model])
    fmt = lambda v: "-" if math.isnan(v) else f"{v:.1f}"
    ratio = "-" if math.isnan(zoo) else f"{zoo / torch:.2f}x"
    print(f"{model:<14} {fmt(zoo):>10} {fmt(torch):>14} {ratio:>12}")
if "quicknet" in rounds and "quicknet-lab" in rounds:
    print("LAB over sign, step time (median over rounds of quicknet img/s / quicknet-lab img/s - 1):")
    for name, i in [("zoo", 0), ("pytorch", 1)]:
        ratios = [s / l - 1 for s, l in zip(rounds["quicknet"][i], rounds["quicknet-lab"][i])]
        if not any(math.isnan(r) for r in ratios):
            each = ", ".join(f"{100 * r:+.1f}%" for r in ratios)
            print(f"  {name:<8} {100 * statistics.median(ratios):+.1f}% (rounds: {each})")
EOF
