#!/usr/bin/env bash
# Publishes the zoo's Fashion-MNIST weights: trains every registered model on the embedded
# Fashion-MNIST (or reuses a finished run), then pushes each to the hub at $HF_ENDPOINT as
# `<org>/<model>.fmnist` (one repo per name and tag, timm's convention), with its model card,
# packed `.zoo` model and the run's test accuracy.
#
#   scripts/publish_fmnist.sh                          # every model, the default budget
#   BUDGET="--epochs 8" MODELS="quicknet quicknet-lab" scripts/publish_fmnist.sh
#   ZOO_HUB_ORG=me HF_ENDPOINT=http://127.0.0.1:8000 scripts/publish_fmnist.sh
#
# Environment:
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
for model in $MODELS; do
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
