#!/usr/bin/env bash
# Publishes the zoo's Fashion-MNIST weights: trains every registered model on the embedded
# Fashion-MNIST (or reuses a finished run), then pushes each to the hub at $HF_ENDPOINT as
# `<org>/<model>.fmnist` (one repo per name and tag, timm's convention), with its model card,
# packed `.zoo` model and the run's test accuracy.
#
#   scripts/publish_fmnist.sh                          # every model, the default budget
#   BUDGET="--epochs 8" MODELS="quicknet quicknet-lab" scripts/publish_fmnist.sh
#   FROM=runs/accuracy scripts/publish_fmnist.sh   # the accuracy campaign's runs
#   ZOO_HUB_ORG=me HF_ENDPOINT=http://127.0.0.1:8000 scripts/publish_fmnist.sh
#
# Environment:
#   FROM      a folder of finished runs (benches/fashion_mnist_accuracy.sh's): each model's run
#             with the best test top-1 (any seed, distilled or not) is published, nothing is
#             trained, and a model without a finished run there is skipped
#   BUDGET    zoo train flags fixing the length (default `--max-steps 700`, the quick start's)
#   TRAIN     extra zoo train flags (for example `--no-eval`)
#   MODELS    the models, space-separated (default: every registered one, from `zoo list`)
#   RUNS      where the runs go (default runs/publish); a finished run (model.safetensors) is
#             reused, an interrupted one resumed
#   THREADS   compute threads (default 2)
#   ZOO       the binary (default target/release/zoo, built if missing)
#   ZOO_HUB_ORG, HF_ENDPOINT, HF_TOKEN   as for `zoo push` (organisation default: zoo-bnn)
set -euo pipefail
cd "$(dirname "$0")/.."

ZOO=${ZOO:-target/release/zoo}
RUNS=${RUNS:-runs/publish}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:---max-steps 700}
TRAIN=${TRAIN:-}

[[ -x $ZOO ]] || cargo build --release -p zoo
if [[ -z ${MODELS:-} ]]; then
    # The registered models: the first table of `zoo list`, up to its blank line.
    MODELS=$("$ZOO" list | awk 'NR > 1 && NF == 0 { exit } NR > 1 { print $1 }')
fi
mkdir -p "$RUNS"
# The campaign run of `$1` with the best final test top-1 (its folders are `<model>-e<N>-s<seed>...`).
best_campaign_run() {
    python3 - "$FROM" "$1" <<'PY'
import json, pathlib, sys
runs = [(json.load(open(s)), s.parent) for s in pathlib.Path(sys.argv[1]).glob("*/summary.json")]
runs = [(s["final_val"]["top1"], str(d)) for s, d in runs
        if s["config"]["model"] == sys.argv[2] and s.get("final_val")]
print(max(runs)[1] if runs else "")
PY
}
for model in $MODELS; do
    if [[ -n ${FROM:-} ]]; then
        run=$(best_campaign_run "$model")
        if [[ -z $run ]]; then
            echo "== $model: no finished run in $FROM, skipped"
            continue
        fi
        echo "== $model: publishing $run"
        "$ZOO" push "$run" --tag fmnist --message "Publish $model.fmnist from $(basename "$run")"
        continue
    fi
    run="$RUNS/$model"
    if [[ -f $run/model.safetensors ]]; then
        echo "== $model: reusing $run"
    else
        if [[ -d $run/checkpoints ]]; then
            echo "== $model: resuming $run"
            args=(train --resume "$run")
        else
            echo "== $model: training into $run ($BUDGET $TRAIN)"
            # shellcheck disable=SC2206
            args=(train "$model" --data fashion-mnist $BUDGET $TRAIN --out "$run")
        fi
        "$ZOO" --threads "$THREADS" "${args[@]}" >> "$run.log" 2>&1 || { tail -n 5 "$run.log"; exit 1; }
        tail -n 2 "$run.log"
    fi
    "$ZOO" push "$run" --tag fmnist --message "Publish $model.fmnist ($BUDGET $TRAIN)"
done
