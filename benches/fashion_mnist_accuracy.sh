#!/usr/bin/env bash
# Accuracy campaign: sign and LAB models trained on the embedded Fashion-MNIST with the same
# recipe, budget and seeds, with and without distillation from a float teacher, evaluated on its
# 10,000 test images. Resumable: a run with a checkpoint continues from it (checkpoints every 200
# steps), a finished run is skipped, so the same command started again after an interruption, or
# in a later session, carries on until every run is done.
#
#   benches/fashion_mnist_accuracy.sh                     # the default campaign (days on 2 cores)
#   RUNS="quicknet:0 quicknet-lab:0" EPOCHS=3 benches/fashion_mnist_accuracy.sh
#   LANES=2 THREADS=1 benches/fashion_mnist_accuracy.sh   # two runs at a time, one thread each
#   benches/fashion_mnist_accuracy.sh report              # the table of what has finished
#
# A run is `model:seed` (a registered name or a spec file), or `model:seed:kd=NAME` to distil
# with Hinton's loss from this campaign's seed-0 run of the teacher spec NAME (`kd=NAME@T@W`:
# temperature T, weight W), or `model:seed:kdd=NAME` with ReActNet's distributional loss. The
# teacher must be in RUNS (`specs/teachers/resnet_float.yaml:0`); a student waits for it. A
# last field `e=N` gives a run its own budget (`quicknet-lab:0:e=64`, `quicknet:0:kd=NAME:e=64`:
# a longer run queued behind the campaign's, from the teacher of EPOCHS).
#
# Environment:
#   RUNS     the runs, in order (default: the QuickNet pair on seeds 0 and 1, its float teacher
#            and both distilled, then one seed of every other pair, two of Bi-Real Net's, whose
#            seed-0 gap was under 0.5 points, the QuickNet pair at twice the budget (is EPOCHS
#            its plateau?); XNOR-Net's 224x224 pair last)
#   EPOCHS   budget of every run without its own `e=N` (default 16); runs of another budget go
#            to other folders
#   EXTRA    more `zoo train` flags; give a TAG with them (suffix of the run folders)
#   LANES    runs at a time (default 1); a free lane takes the first run of RUNS not taken yet
#            whose teacher has finished (a student whose teacher is still training only when no
#            other run is left: it then waits for the teacher)
#   THREADS  compute threads per run (default 2)
#   ZOO      the binary (default target/release/zoo, built if missing)
#   OUT      run folders (default runs/accuracy, outside target/ so that `cargo clean` spares
#            hours of training; where the checkout itself may be replaced between sessions, a
#            folder outside it); `<run>.log` is each run's output, `<run>.run` how to train it
#            again
#   RECORDS  where each finished run's record is copied (`config.json`, `summary.json`, the
#            per-epoch `metrics.jsonl`: what `zoo plot` draws and the table quotes; and
#            `inspect/<run>.json`, its binarizers per layer), default
#            benches/results/fashion-mnist, kept in the repository; empty for none
#   BENCH_PROCS, BENCH_THREADS   latency of the report: processes per model (5), threads (2)
# `report` (also printed at the end) gives a Markdown table: accuracy as mean ± half-range over
# seeds, budget, time, cost, engine latency and the command of each row, and writes
# `$OUT/results.json` for `zoo plot` (accuracy against latency). Record the table in
# benches/RESULTS.md with the machine and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

ZOO=${ZOO:-target/release/zoo}
OUT=${OUT:-runs/accuracy}
RECORDS=${RECORDS-benches/results/fashion-mnist}
THREADS=${THREADS:-2}
LANES=${LANES:-1}
EPOCHS=${EPOCHS:-16}
EXTRA=${EXTRA:-}
TAG=${TAG:-}
RECIPE="--data fashion-mnist --batch-size 64 --lr 2.5e-3 --schedule linear --checkpoint-every 200"
RUNS=${RUNS:-quicknet:0 quicknet-lab:0 quicknet:1 quicknet-lab:1 specs/teachers/resnet_float.yaml:0 \
quicknet:0:kd=resnet-float quicknet-lab:0:kd=resnet-float birealnet:0 birealnet-lab:0 birealnet:1 \
birealnet-lab:1 labbnn:0 \
reactnet:0 reactnet-lab:0 quicknet:0:e=64 quicknet-lab:0:e=64 xnornet:0 xnornet-lab:0}

# The name of a model: a registered name, or a spec file's name with dashes.
model_name() {
    local name
    name=$(basename "$1" .yaml)
    echo "${name//_/-}"
}

# Sets the caller's `model`, `seed`, `kd` (empty without a teacher) and `epochs` from run $1.
parse_run() {
    local rest field
    IFS=: read -r model seed rest <<<"$1"
    kd="" epochs=$EPOCHS
    IFS=: read -ra rest <<<"$rest"
    for field in "${rest[@]}"; do
        case $field in
            e=*) epochs=${field#e=} ;;
            *) kd=$field ;;
        esac
    done
    [[ $seed =~ ^[0-9]+$ && $epochs =~ ^[0-9]+$ ]] ||
        { echo "run \`$1\`: expected model:seed[:kd=NAME][:e=N] with whole numbers" >&2; return 1; }
}

# The folder of a run: model, budget, seed, teacher and tag.
run_dir() {
    local model seed kd epochs
    parse_run "$1" || return 1
    echo "$OUT/$(model_name "$model")-e$epochs-s$seed${kd:+-${kd//[=@]/-}}$TAG"
}

# Whether a run of RUNS trains into the folder $1.
queued() {
    local r
    for r in $RUNS; do
        [[ $(run_dir "$r") == "$1" ]] && return 0
    done
    return 1
}

# Whether run $1 distils from a teacher that has not finished yet.
waits_for_teacher() {
    local model seed kd epochs teacher
    parse_run "$1"
    [[ -n $kd ]] || return 1
    IFS=@ read -r teacher _ <<<"${kd#*=}"
    [[ ! -f $(run_dir "$teacher:0")/summary.json ]]
}

# Takes the next run for a lane (its index in `queue` into `next`): the first not taken yet
# that need not wait for a teacher, else the first not taken yet; fails when all are taken.
# Taking is `mkdir` in $claims, which only one lane can do for a run.
take_next() {
    local pass i
    for pass in ready any; do
        for ((i = 0; i < ${#queue[@]}; i++)); do
            [[ $pass == ready ]] && waits_for_teacher "${queue[$i]}" && continue
            if mkdir "$claims/$i" 2>/dev/null; then
                next=$i
                return 0
            fi
        done
    done
    return 1
}

# Trains one run to its end: skipped when finished, resumed when it has a checkpoint.
train_one() {
    local spec=$1 dir model seed kd epochs teacher_flags=() teacher_entry=""
    parse_run "$spec"
    dir=$(run_dir "$spec")
    if [[ -f $dir/summary.json ]]; then
        record "$dir"
        echo "done:    $dir"
        return
    fi
    if [[ -n $kd ]]; then
        local teacher t w tdir
        IFS=@ read -r teacher t w <<<"${kd#*=}"
        tdir=$(run_dir "$teacher:0")
        while [[ ! -f $tdir/summary.json ]]; do
            queued "$tdir" || { echo "$spec: its teacher $tdir has not finished and is not in RUNS" >&2; return 1; }
            [[ -f $tdir.failed ]] && { echo "$spec: its teacher $tdir failed" >&2; return 1; }
            sleep 30
        done
        teacher_flags=(--teacher "$tdir")
        teacher_entry=$(head -n 1 "$tdir.run")
        if [[ $kd == kdd=* ]]; then
            teacher_flags+=(--kd distributional)
        else
            teacher_flags+=(${t:+--kd-temperature "$t"} ${w:+--kd-weight "$w"})
        fi
    fi
    mkdir -p "$OUT"
    # How to run it again, for the report: the entry, its teacher's, and the budget.
    printf '%s\n%s\n%s\n%s\n%s\n' "$spec" "$teacher_entry" "$EPOCHS" "$EXTRA" "$TAG" >"$dir.run"
    if compgen -G "$dir/checkpoints/step-*.safetensors" >/dev/null; then
        echo "resume:  $dir"
        "$ZOO" --threads "$THREADS" train --resume "$dir" >>"$dir.log" 2>&1
    else
        echo "start:   $dir"
        rm -rf "$dir"
        # shellcheck disable=SC2086
        "$ZOO" --threads "$THREADS" train "$model" $RECIPE --epochs "$epochs" --seed "$seed" \
            "${teacher_flags[@]}" $EXTRA --out "$dir" >"$dir.log" 2>&1
    fi
    record "$dir"
    echo "finished: $dir"
}

# Copies the record of the finished run in folder $1 to $RECORDS.
# With it, once, what its binarizers do on 1,000 test images (`zoo inspect --json` as
# `inspect/<run>.json`, an empty list for a float model), which `zoo plot` draws for a pair; a
# failed inspection is reported and tried again at the next start, the run still recorded.
record() {
    [[ -n $RECORDS && -f $1/summary.json ]] || return 0
    local name inspection
    name=$(basename "$1")
    mkdir -p "$RECORDS/$name" "$RECORDS/inspect"
    cp "$1"/{config.json,summary.json,metrics.jsonl} "$RECORDS/$name/"
    inspection=$RECORDS/inspect/$name.json
    if [[ ! -f $inspection ]] &&
        ! "$ZOO" --threads "$THREADS" inspect "$1" --images 1000 --json "$inspection" >/dev/null; then
        echo "$1: zoo inspect failed; its inspection is left for the next start" >&2
    fi
}

# The results table of the finished runs: accuracy (mean and half-range over seeds), budget,
# time, cost at the input, and the engine's batch-1 latency of the exported `.zoo` (exported
# into each run folder; BENCH_PROCS processes per model, alternating between models, at
# BENCH_THREADS threads: median of the per-process medians, with their range). Time the latency
# on an otherwise idle machine.
report() {
    ZOO=$ZOO OUT=$OUT python3 - <<'PY'
import json, os, pathlib, re, statistics, subprocess
zoo, out = os.environ["ZOO"], pathlib.Path(os.environ["OUT"])
procs = int(os.environ.get("BENCH_PROCS", "5"))
threads = os.environ.get("BENCH_THREADS", "2")
groups = {}
for s in sorted(out.glob("*/summary.json")):
    m = re.fullmatch(r"(.+)-e(\d+)-s(\d+)(.*)", s.parent.name)
    if m:
        groups.setdefault((m[1], int(m[2]), m[4]), []).append((int(m[3]), s.parent))

def figure(text, label):
    return int(re.search(label + r"\s+([\d,]+)", text)[1].replace(",", ""))

def training_time(run):
    """Seconds of training steps and images trained over every epoch of a run, whichever
    process (session) ran it (`summary.json` times only the last); each process leaves its
    first two steps (its warm-up) untimed."""
    epochs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return (sum(e["seconds"] for e in epochs),
            sum(e["seconds"] * e["images_per_second"] for e in epochs))

rows, latency = [], {}
for key, runs in groups.items():
    summaries = [json.load(open(d / "summary.json")) for _, d in runs]
    config = summaries[0]["config"]
    text = subprocess.run([zoo, "summary", config["model"], "--input", config["input"],
                           "--classes", str(config["classes"])],
                          check=True, capture_output=True, text=True).stdout
    packed = float(re.search(r"Model size \(1-bit weights\)\s+([\d.]+) MiB", text)[1])
    exported = runs[0][1] / "model.zoo"
    if not exported.exists():
        subprocess.run([zoo, "export", str(runs[0][1]), "-o", str(exported)], check=True,
                       capture_output=True)
    rows.append((key, runs, summaries, figure(text, "Binary MACs"), figure(text, "Float MACs"),
                 packed, exported))
    latency[key] = []
# Alternate the models' processes so the machine's drift falls on all of them alike.
for i in range(procs):
    for key, *_, exported in rows:
        result = exported.with_suffix(f".bench{threads}t.json")
        subprocess.run([zoo, "bench", str(exported), "--threads", threads, "--runs", "200",
                        "--json", str(result)], check=True, capture_output=True)
        latency[key].append(json.load(open(result))["latency_ms"]["median"])

def reproduce(dirs):
    """The campaign command that trains these runs (and their teacher) again."""
    entries, teacher, epochs, extra, tag = [], "", "", "", ""
    for d in dirs:
        lines = (pathlib.Path(f"{d}.run").read_text().split("\n") + [""] * 5)[:5]
        entries.append(lines[0])
        teacher, epochs, extra, tag = lines[1:5]
    command = 'RUNS="' + " ".join(([teacher] if teacher else []) + entries) + f'" EPOCHS={epochs}'
    command += f' EXTRA="{extra}"' if extra else ""
    command += f" TAG={tag}" if tag else ""
    return command + " benches/fashion_mnist_accuracy.sh"

def spread(xs):
    return f"{statistics.mean(xs):.2f} ± {(max(xs) - min(xs)) / 2:.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

print(f"| model | epochs | seeds | test top-1 % | test top-5 % | best top-1 % (epoch) | train h | "
      f"train img/s | binary MACs | float MACs | packed MiB | latency ms ({threads} threads) | reproduce |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
points = []
for (model, epochs, rest), runs, summaries, bmacs, fmacs, packed, _ in rows:
    top1 = [s["final_val"]["top1"] for s in summaries]
    top5 = [s["final_val"]["top5"] for s in summaries]
    best = ", ".join(f"{s['best'][0]:.2f} ({s['best'][1]})" for s in summaries)
    times = [training_time(d) for _, d in runs]
    ips = statistics.mean(images / seconds if seconds else 0.0 for seconds, images in times)
    hours = statistics.mean(seconds for seconds, _ in times) / 3600
    seeds = ",".join(str(seed) for seed, _ in runs)
    lat = latency[(model, epochs, rest)]
    lat_text = f"{statistics.median(lat):.3f} [{min(lat):.3f}-{max(lat):.3f}]" if lat else "-"
    command = reproduce([d for _, d in runs])
    print(f"| {model}{rest} | {epochs} | {seeds} | {spread(top1)} | {spread(top5)} | {best} | "
          f"{hours:.2f} | {ips:.0f} | {bmacs / 1e6:.1f} M | {fmacs / 1e6:.2f} M | {packed:.2f} | "
          f"{lat_text} | `{command}` |")
    if lat and bmacs > 0:
        points.append({"model": f"{model}{rest}", "top1": statistics.mean(top1),
                       "latency_ms": statistics.median(lat)})
# For `zoo plot results.json`: accuracy against latency of the binary models.
(out / "results.json").write_text(json.dumps(points, indent=1) + "\n")
PY
}

# The campaign. (All in a function, so bash has read the whole file before it starts: editing
# the script while a campaign runs does not change the running one.)
main() {
    if [[ ${1:-} == report ]]; then
        report
        return
    fi
    [[ -x $ZOO ]] || cargo build --release -p zoo
    read -ra queue <<<"$RUNS"
    for r in "${queue[@]}"; do
        run_dir "$r" >/dev/null # each run well formed before any starts
    done
    start=$(date +%s)
    claims=$(mktemp -d)
    for ((lane = 0; lane < LANES; lane++)); do
        (
            while take_next; do
                dir=$(run_dir "${queue[$next]}")
                rm -f "$dir.failed"
                train_one "${queue[$next]}" || { touch "$dir.failed"; echo "failed:  ${queue[$next]} (see $dir.log)"; }
            done
        ) &
    done
    wait
    rm -rf "$claims"
    echo "campaign: $RECIPE --epochs $EPOCHS $EXTRA, $THREADS thread(s) per run, $LANES lane(s); $(($(date +%s) - start)) s"
    report
}

main "$@"; exit
