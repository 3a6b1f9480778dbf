#!/usr/bin/env bash
# The GPU check of the CUDA issues, as one call on a lent GPU machine: the machine and its CUDA
# libraries, the GPU tests (every CUDA op against its CPU op, the packed engine's kernels
# against the CPU's with the binary convolution's rate and LAB's bandwidth, the engine on the
# GPU against the CPU engine for every shipped spec, a whole training step of every registered
# model against the CPU), then inference side by side with PyTorch fp16 on the same card
# (`zoo --device cuda bench`, benches/peers/torch_infer.py): QuickNet and QuickNet-LAB at
# 224x224x3, batch 1, 256 and 1024, LAB's cost, a per-layer profile; then training throughput
# side by side with PyTorch (benches/peers/train_throughput.sh): at 32x32x1 (Fashion-MNIST) and
# 224x224x3 (a folder of random JPEGs made on the spot), batch 256.
#
# The GPU machines have no Rust toolchain. Here, first:
#   benches/gpu/device_check.sh --bundle     # builds with kernels/cuda/build.sh, packs
#                                            # target/device/bundle.tar.xz (carry it)
# There (`run` with carry ["target/device"]), from the repository root:
#   benches/gpu/device_check.sh              # results under $OUT (or target/device/out)
#
# Environment: ROUNDS [2], STEPS_SMALL [30] and STEPS_LARGE [10] timed steps per run,
# THREADS [all cores], SKIP_TESTS=1, SKIP_INFER=1 (the inference benchmarks), SKIP_BENCH=1 (the
# training ones), TORCH_COMPILE=1 (PyTorch's inference also under torch.compile), PROFILE=1
# (also: every GPU kernel of
# QuickNet-LAB training steps at 224x224x3, batch PROFILE_BATCH [64], timed by Nsight Systems
# (3 steps) or else Nsight Compute (1 step), summed by kernel into $OUT/kernels.txt).
set -uo pipefail
cd "$(dirname "$0")/../.."
bundle=target/device/bundle.tar.xz

if [[ ${1:-} == --bundle ]]; then
    set -e
    kernels/cuda/build.sh build --release --features cuda -p zoo --bin zoo
    tests=$(kernels/cuda/build.sh test --release --features cuda -p zoo-kernels -p zoo \
        --test cuda --test cuda_packed --test gpu_training --test gpu_engine --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue  # build.sh prints the nvcc version first
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
    stage=$(mktemp -d)
    mkdir -p "$stage/bin"
    cp target/cuda/release/zoo "$stage/bin/zoo"
    while read -r name exe; do cp "$exe" "$stage/bin/test-$name"; done <<<"$tests"
    strip "$stage"/bin/*
    # Trained weights for the engine's GPU test: the accuracy campaign's QuickNet pair, packed
    # by the default build (target/release/zoo) where both are here.
    mkdir -p "$stage/models"
    for run in runs/accuracy/quicknet-e32-s*/ runs/accuracy/quicknet-lab-e32-s*/; do
        [[ -f $run/best.safetensors && -x target/release/zoo ]] || continue
        target/release/zoo export "$run" --output "$stage/models/$(basename "$run").zoo" || true
    done
    mkdir -p target/device
    tar -C "$stage" -cJf "$bundle" bin models
    rm -rf "$stage"
    ls -l "$bundle"
    tar -tvf "$bundle"
    exit 0
fi

OUT=${OUT:-target/device/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
nproc
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'

step "the CUDA libraries the zoo links (cudart, cublas, cublasLt, curand, nvrtc)"
libs=$(python3 - <<'EOF'
import glob, os, site
wanted = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
          "libnvrtc.so.13"]
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets"]
dirs = []
for name in wanted:
    hits = [h for r in roots for h in glob.glob(os.path.join(r, "**", name), recursive=True)]
    print(f"{name}: {hits[0] if hits else 'MISSING'}", file=__import__("sys").stderr)
    for h in hits[:1]:
        if os.path.dirname(h) not in dirs:
            dirs.append(os.path.dirname(h))
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

bin=$(mktemp -d)
tar -C "$bin" -xJf "$bundle" || { echo "no bundle at $bundle: build it here with --bundle"; exit 1; }
bin=$bin/bin
ldd "$bin/zoo" | grep -E "not found|cuda|cublas|curand|nvrtc" || true

failed=0
if [[ -z ${SKIP_TESTS:-} ]]; then
    step "GPU tests: every CUDA op against the CPU"
    "$bin/test-cuda" --nocapture --test-threads 1 || failed=1
    step "GPU tests: the packed engine's kernels (tensor-core convolution, LAB, packing, pooling) against the CPU"
    "$bin/test-cuda_packed" --nocapture --test-threads 1 || failed=1
    "$bin/test-cuda_packed" --nocapture --ignored binary_convolution_rate lab_bandwidth || failed=1
    step "GPU tests: the engine on the GPU against the CPU engine (every shipped spec, trained weights)"
    models=$(ls "$bin"/../models/*.zoo 2>/dev/null | tr '\n' ':')
    ZOO_ENGINE_MODELS=$models "$bin/test-gpu_engine" --nocapture --test-threads 1 || failed=1
    step "GPU tests: a training step of every registered model against the CPU"
    "$bin/test-gpu_training" --nocapture || failed=1
fi

if [[ -z ${SKIP_INFER:-} ]]; then
    step "inference on the GPU: the zoo's engine, QuickNet and QuickNet-LAB at 224x224x3"
    for model in quicknet quicknet-lab; do
        for batch in 256 1024; do
            "$bin/zoo" --device cuda bench "$model" --runs 200 --batch "$batch" \
                --json "$OUT/infer-$model-$batch.json" || failed=1
        done
    done
    step "LAB's cost over sign at batch 1, calls in pairs"
    "$bin/zoo" --device cuda bench quicknet --against quicknet-lab --runs 400 --batch 0 \
        --json "$OUT/infer-lab-cost.json" || failed=1
    step "without the CUDA graph; the binary convolutions all on tensor cores, all on CUDA cores"
    ZOO_CUDA_GRAPH=0 "$bin/zoo" --device cuda bench quicknet --runs 200 --batch 0 || failed=1
    for conv in tensor popcount; do
        ZOO_GPU_CONV=$conv "$bin/zoo" --device cuda bench quicknet --runs 200 --batch 256 || failed=1
    done
    step "per-layer profile of QuickNet-LAB at batch 1 (CUDA events)"
    "$bin/zoo" --device cuda bench quicknet-lab --profile --runs 50 --batch 0 \
        --profile-out "$OUT/profile-quicknet-lab" || failed=1
    step "PyTorch on the same card: fp16, channels-last, cuDNN autotuning${TORCH_COMPILE:+, torch.compile}"
    timeout "${TORCH_TIMEOUT:-300}" python3 benches/peers/torch_infer.py --batches 1,256,1024 \
        ${TORCH_COMPILE:+--compile --compile-mode max-autotune-no-cudagraphs} \
        | tee "$OUT/torch_infer.jsonl" || failed=1
fi

images=$(mktemp -d)
if [[ -z ${SKIP_BENCH:-} || -n ${PROFILE:-} ]]; then
    step "random JPEGs for 224x224x3 (the zoo reads them with --cache; PyTorch trains on random tensors)"
    python3 - "$images" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
root, rng = sys.argv[1], np.random.default_rng(0)
for split, count in [("train", 26), ("val", 2)]:
    for c in range(10):
        os.makedirs(f"{root}/{split}/class{c}", exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{root}/{split}/class{c}/{i}.JPEG", quality=90)
EOF
fi

if [[ -n ${PROFILE:-} ]]; then
    # Nsight Systems traces every kernel at little cost; Nsight Compute replays each one (slow:
    # one step only, under PROFILE_TIMEOUT). Whichever is installed; both sum by kernel name.
    step "GPU kernel times of QuickNet-LAB training steps at 224x224x3"
    train=("$bin/zoo" --device cuda train quicknet-lab --data "$images" --input 224x224 --cache
        --batch-size "${PROFILE_BATCH:-64}" --no-eval --out "$(mktemp -d)/run")
    times=
    if command -v nsys >/dev/null; then
        tool=nsys
        timeout "${PROFILE_TIMEOUT:-240}" nsys profile -t cuda --force-overwrite true \
            -o "$OUT/steps" "${train[@]}" --max-steps 3 >"$OUT/profile.log" 2>&1 || failed=1
        nsys stats --report cuda_gpu_kern_sum --format csv --output "$OUT/steps" \
            "$OUT/steps.nsys-rep" >>"$OUT/profile.log" 2>&1 || failed=1
        times=$(ls "$OUT"/steps*cuda_gpu_kern_sum*.csv 2>/dev/null | head -n 1)
    elif command -v ncu >/dev/null; then
        tool=ncu
        timeout "${PROFILE_TIMEOUT:-240}" ncu --clock-control none \
            --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu.csv" "${train[@]}" \
            --max-steps 1 >"$OUT/profile.log" 2>&1 || failed=1
        times=$OUT/ncu.csv
    else
        echo "neither nsys nor ncu is installed: no kernel profile"
    fi
    if [[ -n $times && -f $times ]]; then
        python3 benches/gpu/kernel_times.py "$tool" "$times" | tee "$OUT/kernels.txt"
    fi
fi

if [[ -z ${SKIP_BENCH:-} ]]; then
    common=(DEVICE=cuda ZOO="$bin/zoo" PEER_PYTHON=python3 BATCH=256 ROUNDS="${ROUNDS:-2}"
        THREADS="${THREADS:-$(nproc)}")
    step "training throughput at 32x32x1 (Fashion-MNIST), batch 256"
    env "${common[@]}" STEPS="${STEPS_SMALL:-30}" RESULTS_DIR="$OUT/small" \
        benches/peers/train_throughput.sh --skip-build || failed=1
    step "training throughput at 224x224x3, batch 256"
    env "${common[@]}" STEPS="${STEPS_LARGE:-10}" INPUT=224x224x3 DATA="$images" \
        RESULTS_DIR="$OUT/large" benches/peers/train_throughput.sh --skip-build || failed=1
fi
step "done (failures: $failed)"
exit $failed
