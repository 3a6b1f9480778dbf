#!/usr/bin/env python3
"""Inference latency of QuickNet and QuickNet-LAB in Larq Compute Engine (LCE), batch 1, CPU.

The peer of `zoo bench`: the same two networks, at the zoo specs' full size (224x224x3, 1000
classes), as Keras/Larq models with seeded random weights, converted by LCE's own converter
(`larq_compute_engine.convert_keras_model`) and timed with LCE's own TFLite interpreter.

Steps (the default does all three; see --no-time, --time-only, --floor, --report):

 1. Build. The Keras models come from the parity-fixture generator
    (tests/fixtures/larq/generate.py: `build_model`, `randomize`, its `LAB` quantizer), with the
    full widths and depth read from specs/quicknet.yaml / specs/quicknet_lab.yaml; the script
    checks that the generator's QuickNet spec text for that config is the spec's text. Weights
    are the generator's seeded random draw (non-trivial batch-norm statistics, latent binary
    kernels beyond the clip, LAB betas of both signs). Each model's weights are saved with
    `model.save_weights("<model>.h5")`, the fixtures' format, for `zoo import-larq`.
 2. Convert with LCE to `<model>.tflite`. LCE knows Larq's sign binarizer (it becomes
    LceQuantize + LceBconv2d) but not LAB: converted as trained, LAB's comparison is not
    recognised and its convolution stays a float CONV_2D (--lab-form as-trained). The default
    (--lab-form folded) converts the inference form that `zoo export` also uses: LAB's two
    depthwise kernels, two biases and beta folded into one depthwise 3x3 kernel and bias per
    channel, d = beta*(y1 - y0), followed by Larq's sign, which LCE binarizes. (Ties: d == 0
    gives +1 there, -1 in LAB; irrelevant to latency, and float weights practically never tie.)
    --lab-form unfolded keeps the trained depthwise-by-2 convolution and computes
    d = beta*y1 - beta*y0 in the graph before the sign. Checks: LCE's logits against Keras' on
    one seeded input (at full size a few binarizer inputs lie within float rounding of zero,
    so these differ by a few percent of the logit scale), and the same conversion of the
    parity fixture's reduced network (tests/fixtures/larq/<model>.h5, inputs chosen far from
    every threshold) against the fixture's Keras logits, which must agree to 1e-4 relative.
 3. Time each .tflite with `larq_compute_engine.tflite.python.interpreter.Interpreter(flatbuffer,
    num_threads=N, use_indirect_bgemm=..., use_xnnpack=...)`, batch 1, float32 input:
    --warmup untimed invocations, then --runs timed ones (wall clock around the interpreter's
    `predict` of one image: input copy, invoke, output copy); median/min/max ms per model,
    thread count and LCE kernel setting (--lce-kernels: `bgemm`, the Interpreter's defaults,
    and `indirect-bgemm`, its use_indirect_bgemm=True, which on x86 is several times faster).
    The CPU time other processes used meanwhile is recorded too (`load.others_cpu_share`).

Output: OUT/lce.json (all figures, LCE/TF versions, CPU, date) and a table on stdout.
`--floor` adds the arithmetic floor of the binary layers (binary MACs / measured XNOR-popcount
rate, see `popcount_rate`), `--report` the side-by-side table with `zoo bench` results
(used by benches/peers/lce_latency.sh).

Needs the venv of benches/peers/requirements-lce.txt; runs with TF_USE_LEGACY_KERAS=1 (set here
if missing).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "larq")
SPECS = {"quicknet": "specs/quicknet.yaml", "quicknet-lab": "specs/quicknet_lab.yaml"}
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# The architectures, read from the zoo's specs.
# ---------------------------------------------------------------------------------------------


def spec_config(model):
    """The generator config of `model` at the spec's full size, plus (classes, spec text)."""
    path = os.path.join(REPO, SPECS[model])
    text = open(path).read()
    h, w, c = map(int, re.search(r"^input:\s*(\d+)x(\d+)x(\d+)\s*$", text, re.M).groups())
    classes = int(re.search(r"^classes:\s*(\d+)\s*$", text, re.M).group(1))
    stages = re.findall(
        r"^\s*- \{block: quicknet, filters: (\d+), blocks: (\d+)(, activation: (\w+))?\}\s*$",
        text, re.M)
    assert len(stages) == 4, (path, stages)
    acts = {s[3] or "sign" for s in stages}
    assert len(acts) == 1 and acts <= {"sign", "lab"}, (path, acts)
    return dict(
        family="quicknet", source=os.path.basename(path), input=(h, w, c),
        filters=tuple(int(s[0]) for s in stages), blocks=tuple(int(s[1]) for s in stages),
        lab=acts == {"lab"},
    ), classes, text


def binary_macs(cfg):
    """MACs of the binary 3x3 convolutions (one per block), TF SAME geometry."""
    h, w, _ = cfg["input"]
    h, w = -(-h // 4), -(-w // 4)  # stem: two stride-2 layers
    total = 0
    for i, (filters, blocks) in enumerate(zip(cfg["filters"], cfg["blocks"])):
        if i > 0:  # transition: max pool 2x2/1 VALID, then the stride-2 blur (SAME)
            h, w = -(-(h - 1) // 2), -(-(w - 1) // 2)
        total += blocks * h * w * filters * filters * 9
    return total


# ---------------------------------------------------------------------------------------------
# Keras models (via the fixture generator) and LCE conversion.
# ---------------------------------------------------------------------------------------------


def import_generator():
    sys.path.insert(0, FIXTURES)
    sys.dont_write_bytecode = True  # leave no __pycache__ in tests/fixtures/larq
    import generate  # noqa: E402  (tests/fixtures/larq/generate.py)

    return generate


def inference_lab_classes(gen):
    """LAB's inference forms as Larq quantizers whose output is Larq's sign (which LCE converts
    to LceQuantize). `load(lab)` takes the weights of a trained `gen.LAB`."""
    import larq as lq
    import tensorflow as tf

    class FoldedLAB(lq.quantizers._BaseQuantizer):
        """sign(depthwise3x3(x, beta*(w1 - w0)) + beta*(b1 - b0)): one kernel per channel."""

        precision = 1

        def __init__(self, pairing="channel", **kwargs):
            assert pairing == "channel", pairing
            super().__init__(**kwargs)

        def build(self, input_shape):
            c = int(input_shape[-1])
            self.kernel = self.add_weight(name="kernel", shape=(3, 3, c, 1), initializer="zeros")
            self.bias = self.add_weight(name="bias", shape=(c,), initializer="zeros")
            super().build(input_shape)

        def call(self, inputs):
            d = tf.nn.depthwise_conv2d(inputs, self.kernel, [1, 1, 1, 1], "SAME") + self.bias
            return lq.quantizers.ste_sign(d, clip_value=1.25)

        def load(self, lab):
            k = lab.depthwise_kernel.numpy().astype(np.float64)  # (3, 3, C, 2), output 2c + q
            b = lab.bias.numpy().astype(np.float64)
            beta = float(lab.beta.numpy())
            self.kernel.assign((beta * k[..., 1:2] - beta * k[..., 0:1]).astype(np.float32))
            self.bias.assign((beta * b[1::2] - beta * b[0::2]).astype(np.float32))

    class UnfoldedLAB(lq.quantizers._BaseQuantizer):
        """sign(beta*y1 - beta*y0) with the trained depthwise-by-2 convolution y."""

        precision = 1

        def __init__(self, pairing="channel", **kwargs):
            assert pairing == "channel", pairing
            super().__init__(**kwargs)

        def build(self, input_shape):
            c = int(input_shape[-1])
            self.depthwise_kernel = self.add_weight(
                name="depthwise_kernel", shape=(3, 3, c, 2), initializer="zeros")
            self.bias = self.add_weight(name="bias", shape=(2 * c,), initializer="zeros")
            self.beta = self.add_weight(name="beta", shape=(), initializer="ones")
            super().build(input_shape)

        def call(self, inputs):
            y = tf.nn.depthwise_conv2d(inputs, self.depthwise_kernel, [1, 1, 1, 1], "SAME")
            y = y + self.bias
            d = self.beta * y[..., 1::2] - self.beta * y[..., 0::2]
            return lq.quantizers.ste_sign(d, clip_value=1.25)

        def load(self, lab):
            for mine, theirs in zip(self.weights, lab.weights):
                mine.assign(theirs)

    return {"folded": FoldedLAB, "unfolded": UnfoldedLAB}


def build_keras(gen, model, seed):
    """The trained-form Keras model of `model` with seeded random weights, and its config."""
    cfg, classes, text = spec_config(model)
    act = gen.LABQ if cfg["lab"] else gen.SIGN_125
    # The spec text the generator writes for this config must be the shipped spec's.
    body = gen.quicknet_body(cfg["filters"], cfg["blocks"],
                             ", activation: lab" if cfg["lab"] else "")
    assert body in text, f"{SPECS[model]} is not the generator's QuickNet for {cfg}"
    cfg = dict(cfg, act=act)
    gen.CLASSES = classes  # the generator's builders read their class count from this global
    keras_model = gen.build_model(cfg)
    gen.randomize(keras_model, np.random.default_rng([seed, zlib.crc32(model.encode())]))
    return keras_model, cfg, classes


def inference_model(gen, trained, cfg, form):
    """`trained` with every LAB replaced by its inference form `form` (same other weights)."""
    cls = inference_lab_classes(gen)[form]
    trained_lab = gen.LAB
    gen.LAB = cls  # generate.activation_quantizer instantiates the module's `LAB`
    try:
        model = gen.build_model(cfg)
    finally:
        gen.LAB = trained_lab
    assert len(model.layers) == len(trained.layers)
    for src, dst in zip(trained.layers, model.layers):
        assert type(src) is type(dst), (src.name, dst.name)
        lab = getattr(src, "input_quantizer", None)
        if isinstance(lab, trained_lab):
            assert isinstance(dst.input_quantizer, cls)
            dst.kernel.assign(src.kernel)
            dst.input_quantizer.load(lab)
        else:
            dst.set_weights(src.get_weights())
    return model


def tflite_ops(flatbuffer):
    """{op name: count} of a .tflite flatbuffer's main subgraph."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    counts = {}
    for op in m.subgraphs[0].operators:
        code = m.operatorCodes[op.opcodeIndex]
        if code.customCode:
            name = code.customCode.decode()
        else:
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def seeded_input(cfg, seed):
    return np.random.default_rng([seed, 99]).standard_normal((1,) + cfg["input"]).astype(np.float32)


def diff_stats(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return {"max_abs_diff": float(np.abs(ref - out).max()),
            "max_abs_ref": float(np.abs(ref).max()),
            "argmax_equal": bool(np.argmax(ref) == np.argmax(out))}


def fixture_check(gen, model, form):
    """The same conversion applied to the parity fixture's reduced network of `model` (its .h5
    and its 4 inputs, chosen so that no binarizer input is within float rounding of its
    threshold): LCE's logits against the fixture's Keras logits."""
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    cfg = dict(gen.NETWORKS[model])
    fixture = lambda suffix: os.path.join(FIXTURES, model + suffix)  # noqa: E731
    ref = np.load(fixture(".logits.npy"))
    x = np.ascontiguousarray(np.load(fixture(".input.npy")).transpose(0, 2, 3, 1))
    gen.CLASSES = ref.shape[1]
    keras_model = gen.build_model(cfg)
    keras_model.load_weights(fixture(".h5"))
    if form in ("folded", "unfolded"):
        keras_model = inference_model(gen, keras_model, cfg, form)
    out = Interpreter(lce.convert_keras_model(keras_model), num_threads=1).predict(x)
    return diff_stats(ref, out)


def build_and_convert(args, log):
    """Steps 1 and 2 for every model; returns the `models` section of the JSON."""
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    gen = import_generator()
    models = {}
    for model in args.models:
        t0 = time.perf_counter()
        trained, cfg, classes = build_keras(gen, model, args.seed)
        x = seeded_input(cfg, args.seed)
        ref = trained(x, training=False).numpy()
        assert np.isfinite(ref).all(), f"{model}: non-finite logits"
        h5 = os.path.join(args.out, f"{model}.h5")
        trained.save_weights(h5)
        form = args.lab_form if cfg["lab"] else None
        checks = {}
        if form in ("folded", "unfolded"):
            to_convert = inference_model(gen, trained, cfg, form)
            checks["keras_inference_form"] = diff_stats(ref, to_convert(x, training=False).numpy())
        else:
            to_convert = trained
        flatbuffer = lce.convert_keras_model(to_convert)
        path = os.path.join(args.out, f"{model}.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        out = Interpreter(flatbuffer, num_threads=1).predict(x)
        checks["lce_vs_keras"] = diff_stats(ref, out)
        checks["fixture_lce_vs_keras"] = fixture_check(gen, model, form)
        h, w, c = cfg["input"]
        models[model] = {
            "spec": SPECS[model],
            "input": f"{h}x{w}x{c}",
            "classes": classes,
            "filters": list(cfg["filters"]),
            "blocks": list(cfg["blocks"]),
            "lab_form": form,
            "keras_params": int(trained.count_params()),
            "binary_macs": binary_macs(cfg),
            "h5": os.path.relpath(h5, REPO) if h5.startswith(REPO) else h5,
            "h5_bytes": os.path.getsize(h5),
            "tflite": os.path.relpath(path, REPO) if path.startswith(REPO) else path,
            "tflite_bytes": len(flatbuffer),
            "tflite_mib": len(flatbuffer) / MIB,
            "tflite_ops": tflite_ops(flatbuffer),
            "checks": checks,
        }
        c, cf = checks["lce_vs_keras"], checks["fixture_lce_vs_keras"]
        log(f"{model}: {cfg['input']} -> {classes}, {trained.count_params():,} Keras values; "
            f"{path}: {len(flatbuffer):,} bytes ({len(flatbuffer) / MIB:.2f} MiB), "
            f"{models[model]['tflite_ops']}; LCE vs Keras logits: max |diff| "
            f"{c['max_abs_diff']:.3g} of {c['max_abs_ref']:.3g}, same argmax {c['argmax_equal']};"
            f" on the reduced parity fixture: max |diff| {cf['max_abs_diff']:.3g} of "
            f"{cf['max_abs_ref']:.3g} ({time.perf_counter() - t0:.0f} s)")
        if cf["max_abs_diff"] > 1e-4 * max(1.0, cf["max_abs_ref"]):
            sys.exit(f"error: {model}: LCE's conversion disagrees with Keras on the fixture")
        if models[model]["tflite_ops"].get("LceBconv2d", 0) != sum(cfg["blocks"]):
            log(f"warning: {model}: {models[model]['tflite_ops'].get('LceBconv2d', 0)} LceBconv2d"
                f" ops for {sum(cfg['blocks'])} binary convolutions (float convolutions remain)")
    return models


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


LCE_KERNELS = {  # name: (use_indirect_bgemm, use_xnnpack) of LCE's Interpreter
    "bgemm": (False, False),  # the Interpreter's defaults
    "indirect-bgemm": (True, False),
    "bgemm+xnnpack": (False, True),
    "indirect-bgemm+xnnpack": (True, True),
}


def cpu_ticks():
    """(busy, total) jiffies of all CPUs from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def time_tflite(path, threads, runs, warmup, kernel, seed):
    """Latency of one .tflite; also how busy the rest of the machine was meanwhile."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    indirect, xnnpack = LCE_KERNELS[kernel]
    with open(path, "rb") as f:
        flatbuffer = f.read()
    interpreter = Interpreter(flatbuffer, num_threads=threads, use_xnnpack=xnnpack,
                              use_indirect_bgemm=indirect)
    shape = tuple(interpreter.input_shapes[0])
    x = np.random.default_rng([seed, 98]).standard_normal(shape).astype(np.float32)
    # The pybind interpreter under Interpreter.predict: set input, invoke, copy the output out.
    predict = interpreter.interpreter.predict
    for _ in range(warmup):
        predict([x])
    times = []
    ticks0, own0, wall0 = cpu_ticks(), os.times(), time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        predict([x])
        times.append((time.perf_counter() - t0) * 1e3)
    ticks1, own1, wall = cpu_ticks(), os.times(), time.perf_counter() - wall0
    lat = {"median": statistics.median(times), "min": min(times), "max": max(times),
           "runs": runs}
    load = {"own_cpu_s": (own1.user + own1.system) - (own0.user + own0.system), "wall_s": wall}
    if ticks0 and ticks1:
        hz = os.sysconf("SC_CLK_TCK")
        busy = (ticks1[0] - ticks0[0]) / hz
        # CPU time that other processes used meanwhile, as a share of the whole machine.
        load["others_cpu_share"] = max(0.0, busy - load["own_cpu_s"]) / (wall * os.cpu_count())
    return lat, load


def run_timing(args, models, log):
    results = []
    for model in args.models:
        for threads in args.threads:
            for kernel in args.lce_kernels:
                path = models[model]["tflite"]
                path = path if os.path.isabs(path) else os.path.join(REPO, path)
                lat, load = time_tflite(path, threads, args.runs, args.warmup, kernel, args.seed)
                results.append({"model": model, "threads": threads, "lce_kernel": kernel,
                                "latency_ms": lat, "warmup": args.warmup, "batch": 1,
                                "load": load})
                busy = load.get("others_cpu_share")
                log(f"{model} threads={threads} {kernel}: median {lat['median']:.2f} ms (min "
                    f"{lat['min']:.2f}, max {lat['max']:.2f}, {lat['runs']} runs)"
                    + ("" if busy is None else f"; other processes used {100 * busy:.0f}% of"
                       " the machine meanwhile"))
    return results


# ---------------------------------------------------------------------------------------------
# The arithmetic floor: binary MACs / XNOR-popcount rate.
# ---------------------------------------------------------------------------------------------

POPCOUNT_C = r"""
/* XNOR-popcount rate: each thread repeats a 16x16 binary GEMM tile (16 rows of A against 16
   columns of B, K = 72 64-bit words = 4608 bits: the reduction depth of a 3x3x512 binary
   convolution), register-blocked 4x4, all operands in L1. Counts binary MACs (bit pairs) per
   second. AVX-512 VPOPCNTDQ when the compiler targets it, else 64-bit scalar popcount. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define PATH "avx512-vpopcntdq"
#else
#define PATH "scalar-popcnt"
#endif
#define R 16
#define KW 72
typedef struct { long iters; double secs; uint64_t sink; } job_t;
static pthread_barrier_t barrier;
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec;
}
static uint64_t tile(const uint64_t *a, const uint64_t *b) {
  uint64_t sink = 0;
  for (int i = 0; i < R; i += 4)
    for (int j = 0; j < R; j += 4) {
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
      __m512i acc[4][4];
      for (int p = 0; p < 4; p++) for (int q = 0; q < 4; q++) acc[p][q] = _mm512_setzero_si512();
      for (int k = 0; k < KW; k += 8) {
        __m512i va[4], vb[4];
        for (int p = 0; p < 4; p++) va[p] = _mm512_loadu_si512(a + (i + p) * KW + k);
        for (int q = 0; q < 4; q++) vb[q] = _mm512_loadu_si512(b + (j + q) * KW + k);
        for (int p = 0; p < 4; p++) for (int q = 0; q < 4; q++)
          acc[p][q] = _mm512_add_epi64(acc[p][q],
                        _mm512_popcnt_epi64(_mm512_xor_si512(va[p], vb[q])));
      }
      for (int p = 0; p < 4; p++) for (int q = 0; q < 4; q++)
        sink += (uint64_t)_mm512_reduce_add_epi64(acc[p][q]);
#else
      uint64_t acc[4][4] = {{0}};
      for (int k = 0; k < KW; k++)
        for (int p = 0; p < 4; p++) for (int q = 0; q < 4; q++)
          acc[p][q] += (uint64_t)__builtin_popcountll(a[(i + p) * KW + k] ^ b[(j + q) * KW + k]);
      for (int p = 0; p < 4; p++) for (int q = 0; q < 4; q++) sink += acc[p][q];
#endif
    }
  return sink;
}
static void *work(void *arg) {
  job_t *job = arg;
  uint64_t *a = aligned_alloc(64, R * KW * 8), *b = aligned_alloc(64, R * KW * 8);
  uint64_t s = (uint64_t)(uintptr_t)arg | 1;
  for (int i = 0; i < R * KW; i++) {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17; a[i] = s;
    s ^= s << 13; s ^= s >> 7; s ^= s << 17; b[i] = s;
  }
  tile(a, b);
  pthread_barrier_wait(&barrier);
  double t0 = now();
  uint64_t sink = 0;
  for (long n = 0; n < job->iters; n++) { sink += tile(a, b); a[n % (R * KW)] ^= sink; }
  job->secs = now() - t0;
  job->sink = sink;
  free(a); free(b);
  return NULL;
}
static double run(int threads, long iters) {
  pthread_t tid[256]; job_t jobs[256];
  pthread_barrier_init(&barrier, NULL, threads);
  for (int t = 0; t < threads; t++) { jobs[t].iters = iters; pthread_create(&tid[t], NULL, work, &jobs[t]); }
  double secs = 0;
  for (int t = 0; t < threads; t++) { pthread_join(tid[t], NULL); if (jobs[t].secs > secs) secs = jobs[t].secs; }
  pthread_barrier_destroy(&barrier);
  return (double)threads * iters * R * R * KW * 64 / secs;
}
int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  double target = argc > 2 ? atof(argv[2]) : 0.5;
  if (threads < 1 || threads > 256) return 2;
  long iters = 1000;
  for (;;) {  /* calibrate on one thread to about `target` seconds per repetition */
    double rate = run(1, iters), secs = (double)iters * R * R * KW * 64 / rate;
    if (secs > target / 4) { iters = (long)(iters * target / secs) + 1; break; }
    iters *= 4;
  }
  double best = 0;
  for (int rep = 0; rep < 5; rep++) { double r = run(threads, iters); if (r > best) best = r; }
  printf("{\"path\": \"%s\", \"threads\": %d, \"k_bits\": %d, \"binary_macs_per_s\": %.6e}\n",
         PATH, threads, KW * 64, best);
  return 0;
}
"""


def popcount_rate(out_dir, threads_list, log):
    """The machine's XNOR-popcount rate (binary MACs/s) per thread count, measured with the
    small C kernel above (compiled with `cc -O3 -march=native`). None without a C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log("no C compiler (cc): skipping the XNOR-popcount rate")
        return None
    src = os.path.join(out_dir, "popcount_rate.c")
    exe = os.path.join(out_dir, "popcount_rate")
    with open(src, "w") as f:
        f.write(POPCOUNT_C)
    rates = {}
    try:
        subprocess.run([cc, "-O3", "-march=native", "-pthread", "-o", exe, src], check=True)
        for threads in threads_list:
            line = subprocess.run([exe, str(threads)], check=True, capture_output=True,
                                  text=True).stdout
            rates[threads] = json.loads(line)
            log(f"XNOR-popcount rate, {threads} thread(s): "
                f"{rates[threads]['binary_macs_per_s'] / 1e9:.0f} G binary MACs/s "
                f"({rates[threads]['path']})")
    except (subprocess.CalledProcessError, ValueError) as e:
        log(f"the XNOR-popcount kernel failed ({e}): no floor")
        return None
    return rates


def floor_section(models, rates):
    """{model: {threads: floor ms}} from binary MACs and the measured rates."""
    if not rates:
        return None
    out = {}
    for model, info in models.items():
        out[model] = {str(t): info["binary_macs"] / r["binary_macs_per_s"] * 1e3
                      for t, r in rates.items()}
    return {"rates": {str(t): r for t, r in rates.items()}, "floor_ms": out}


# ---------------------------------------------------------------------------------------------
# Metadata, tables, and the side-by-side report.
# ---------------------------------------------------------------------------------------------


def cpu_info():
    info = {"processors": os.cpu_count(), "machine": platform.machine()}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for key, name in (("model name", "model_name"), ("cpu family", "family"), ("model", "model"),
                      ("cpu MHz", "mhz")):
        m = re.search(rf"^{key}\s*:\s*(.*)$", text, re.M)
        if m:
            info[name] = m.group(1).strip()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if m:
        wanted = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq", "avx512_vnni")
        info["flags"] = [f for f in m.group(1).split() if f in wanted]
    return info


def versions():
    import larq
    import larq_compute_engine as lce
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "larq_compute_engine": lce.__version__, "larq": larq.__version__,
           "numpy": np.__version__}
    try:
        import tf_keras

        out["tf_keras"] = tf_keras.__version__
    except ImportError:
        pass
    return out


def print_lce_table(doc):
    print(f"\nLarq Compute Engine {doc['versions']['larq_compute_engine']} "
          f"(TF {doc['versions']['tensorflow']}), batch 1, float32 input, "
          f"CPU: {doc['cpu'].get('model_name', '?')}, {doc['date']}")
    print(f"{'model':<14} {'threads':>7} {'LCE kernel':<16} {'median ms':>10} {'min ms':>8} "
          f"{'max ms':>8} {'runs':>5} {'others':>6} {'.tflite bytes':>14} {'MiB':>6}")
    for r in doc["results"]:
        m = doc["models"][r["model"]]
        lat = r["latency_ms"]
        busy = r.get("load", {}).get("others_cpu_share")
        busy = "-" if busy is None else f"{100 * busy:.0f}%"
        print(f"{r['model']:<14} {r['threads']:>7} {r['lce_kernel']:<16} {lat['median']:>10.2f} "
              f"{lat['min']:>8.2f} {lat['max']:>8.2f} {lat['runs']:>5} {busy:>6} "
              f"{m['tflite_bytes']:>14,} {m['tflite_mib']:>6.2f}")
    print("(others: CPU time other processes used during the timed runs, share of the machine)")
    floor = doc.get("floor")
    if floor:
        print_floor(doc["models"], floor)


def print_floor(models, floor):
    groups = {}  # models with the same binary MACs share a floor
    for model in floor["floor_ms"]:
        groups.setdefault(models[model]["binary_macs"], []).append(model)
    for macs, names in groups.items():
        per_threads = floor["floor_ms"][names[0]]
        parts = ", ".join(
            f"{t} thread(s) {ms:.2f} ms (at {floor['rates'][t]['binary_macs_per_s'] / 1e9:.0f} G"
            f" binary MACs/s, {floor['rates'][t]['path']})" for t, ms in per_threads.items())
        print(f"Arithmetic floor of the binary convolutions of {', '.join(names)}: {macs:,} "
              f"binary MACs / measured XNOR-popcount rate = {parts}")


def load_json(path):
    with open(path) as f:
        return json.load(f)


def stats(values):
    """Median, range and spread (max/min - 1) of per-process medians."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": max(values) / min(values) - 1, "processes": len(values)}


def round_ratios(a, b):
    """LAB's cost from {round: ms} of quicknet-lab (a) and quicknet (b): the median, minimum and
    maximum over rounds of a/b - 1 (processes of one round ran back to back)."""
    ratios = [a[r] / b[r] - 1 for r in sorted(set(a) & set(b))]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios)}


def report(args):
    """The side-by-side table of lce_latency.sh from the lce-*, zoo-* and floor-*.json files in
    args.out; writes OUT/compare.json."""
    lce_doc = load_json(os.path.join(args.out, "lce.json"))
    # {key: {round: per-process median ms}}; keys (model, threads, kernel) for the zoo and LCE,
    # (threads, kernel) for the floor loop.
    # paired: {(first, second, threads, kernel): {round: the process's median ratio}}.
    zoo, lce, floor, paired = {}, {}, {}, {}
    for name in sorted(os.listdir(args.out)):
        m = re.fullmatch(r"(lce|zoo|floor)-(?:(.+)-)?t(\d+)(?:-k(\w+))?-r(\d+)\.json", name)
        if not m:
            continue
        kind, model, threads, rnd = m.group(1), m.group(2), int(m.group(3)), int(m.group(5))
        doc = load_json(os.path.join(args.out, name))
        if kind == "lce":
            for r in doc["results"]:
                key = (r["model"], r["threads"], r["lce_kernel"])
                lce.setdefault(key, {})[rnd] = r["latency_ms"]["median"]
        elif kind == "zoo":
            zoo.setdefault((doc["model"], threads, doc["kernel"]), {})[rnd] = \
                doc["latency_ms"]["median"]
            other = doc.get("against")
            if other:
                zoo.setdefault((other["model"], threads, doc["kernel"]), {})[rnd] = \
                    other["latency_ms"]["median"]
                key = (doc["model"], other["model"], threads, doc["kernel"])
                paired.setdefault(key, {})[rnd] = other["ratio"]["median"]
        else:
            floor.setdefault((threads, doc["kernel"]), {})[rnd] = doc["latency_ms"]["median"]
    if not zoo and not lce:
        sys.exit(f"error: no zoo-*, floor-* or lce-* results in {args.out}")
    kernels = [k for k in LCE_KERNELS if any(key[2] == k for key in lce)]
    zoo_kernels = sorted({key[2] for key in zoo} | {key[1] for key in floor},
                         key=lambda k: ["avx512", "avx2", "portable"].index(k)
                         if k in ("avx512", "avx2", "portable") else 9)
    pairs = sorted({key[:2] for key in zoo} | {key[:2] for key in lce}, key=lambda k: (k[1], k[0]))
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731

    rows = []
    for model, threads in pairs:
        lce_stats = {k: stats(list(lce[(model, threads, k)].values()))
                     for k in kernels if (model, threads, k) in lce}
        for kernel in zoo_kernels or [None]:
            z = zoo.get((model, threads, kernel))
            f = floor.get((threads, kernel))
            zs = stats(list(z.values())) if z else None
            fs = stats(list(f.values())) if f else None
            zm = zs and zs["median"]
            rows.append({
                "model": model, "threads": threads, "zoo_kernel": kernel, "zoo_ms": zs,
                "floor_ms": fs, "lce_ms": lce_stats,
                "zoo_over_floor": ratio(zm, fs and fs["median"]),
                "lce_over_zoo": {k: ratio(v["median"], zm) for k, v in lce_stats.items()},
            })
    lab = []
    for threads in sorted({t for _, t in pairs}):
        for kernel in zoo_kernels:
            p = paired.get(("quicknet", "quicknet-lab", threads, kernel))
            a, b = zoo.get(("quicknet-lab", threads, kernel)), zoo.get(("quicknet", threads, kernel))
            if p:
                costs = [v - 1 for v in p.values()]
                lab.append({"threads": threads, "engine": f"zoo {kernel} (paired calls)",
                            "cost": {"median": statistics.median(costs), "min": min(costs),
                                     "max": max(costs), "rounds": len(costs)}})
            elif a and b:
                lab.append({"threads": threads, "engine": f"zoo {kernel}",
                            "cost": round_ratios(a, b)})
        for k in kernels:
            a, b = lce.get(("quicknet-lab", threads, k)), lce.get(("quicknet", threads, k))
            if a and b:
                lab.append({"threads": threads, "engine": f"LCE {k}", "cost": round_ratios(a, b)})

    sizes = {}
    for model, info in lce_doc["models"].items():
        zoo_path = os.path.join(args.out, f"{model}.zoo")
        sizes[model] = {"tflite_bytes": info["tflite_bytes"],
                        "zoo_bytes": os.path.getsize(zoo_path) if os.path.exists(zoo_path) else None}

    def cell(st):
        return "-" if not st else f"{st['median']:.2f} ({100 * st['spread']:.0f}%)"

    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    first = next(iter(lce_doc["models"].values()))
    print(f"\nLCE {lce_doc['versions']['larq_compute_engine']} vs zoo, batch 1, input "
          f"{first['input']}, {first['classes']} classes, CPU: "
          f"{lce_doc['cpu'].get('model_name', '?')} ({lce_doc['cpu'].get('processors')} logical"
          " CPUs). Milliseconds: the median over processes of each process's median, and in"
          " brackets the spread of those medians (slowest / fastest - 1); floor: the fixed"
          " XNOR-popcount loop over the binary MACs (the machine's own spread).")
    head = "".join(f" {'LCE ' + k:>17} {'/zoo':>6}" for k in kernels)
    print(f"{'model':<13} {'thr':>3} {'kernel':<8} {'zoo':>14} {'floor':>14} {'zoo/floor':>9}{head}")
    for r in rows:
        cells = "".join(f" {cell(r['lce_ms'].get(k)):>17} "
                        f"{fmt(r['lce_over_zoo'].get(k), '{:.1f}x'):>6}" for k in kernels)
        print(f"{r['model']:<13} {r['threads']:>3} {r['zoo_kernel'] or '-':<8} "
              f"{cell(r['zoo_ms']):>14} {cell(r['floor_ms']):>14} "
              f"{fmt(r['zoo_over_floor'], '{:.2f}x'):>9}{cells}")
    if lab:
        print("\nLAB's cost (quicknet-lab / quicknet - 1): median over rounds [smallest, largest];"
              " zoo: each round's process times both models call for call, its median ratio;"
              " LCE: the ratio of the two processes of a round")
        for r in lab:
            c = r["cost"]
            print(f"{r['threads']:>3} thread(s) {r['engine']:<22} {100 * c['median']:+6.1f}% "
                  f"[{100 * c['min']:+.1f}%, {100 * c['max']:+.1f}%] over {c['rounds']} rounds")
    print(f"\n{'model':<14} {'.tflite bytes':>14} {'MiB':>7} {'.zoo bytes':>12} {'MiB':>7}")
    for model, sz in sizes.items():
        z = sz["zoo_bytes"]
        print(f"{model:<14} {sz['tflite_bytes']:>14,} {sz['tflite_bytes'] / MIB:>7.2f} "
              f"{fmt(z, '{:,}'):>12} {fmt(None if z is None else z / MIB):>7}")
    if lce_doc.get("floor"):
        print("\nThe C reference of the floor loop (--floor), best of 5 repetitions:")
        print_floor(lce_doc["models"], lce_doc["floor"])
    summary = {"date": lce_doc["date"], "cpu": lce_doc["cpu"], "versions": lce_doc["versions"],
               "rows": rows, "lab_cost": lab, "sizes": sizes, "c_floor": lce_doc.get("floor")}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Modes: default = build, convert, time (and --floor if asked); --no-time = build"
               " and convert only; --time-only = time the .tflite files of a previous build in"
               " --out (results to --json); --floor-only; --report = side-by-side table of the"
               " lce-*.json / zoo-*.json files in --out.")
    parser.add_argument("--out", default=os.path.join(REPO, "target", "lce-results"),
                        help="output folder (default: target/lce-results)")
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=50, help="timed runs (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--seed", type=int, default=20240611, help="weights and input seed")
    parser.add_argument("--lab-form", choices=("folded", "unfolded", "as-trained"),
                        default="folded", help="how LAB is converted (default: folded, as zoo"
                        " export does)")
    parser.add_argument("--lce-kernels", nargs="+", choices=list(LCE_KERNELS),
                        default=["bgemm", "indirect-bgemm"],
                        help="LCE interpreter settings to time: bgemm = the defaults,"
                        " indirect-bgemm = use_indirect_bgemm=True, +xnnpack = use_xnnpack=True"
                        " (default: bgemm indirect-bgemm)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the XNOR-popcount rate and print the binary floor")
    parser.add_argument("--json", default=None,
                        help="where the results go (default: OUT/lce.json; --time-only: required)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-time", action="store_true", help="build and convert only")
    mode.add_argument("--time-only", action="store_true", help="time an earlier build's models")
    mode.add_argument("--floor-only", action="store_true",
                      help="only the XNOR-popcount rate and the floor (into OUT/lce.json)")
    mode.add_argument("--report", action="store_true", help="side-by-side table with zoo bench")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    log = lambda msg: print(f"[lce_latency] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    main_json = os.path.join(args.out, "lce.json")

    if args.report:
        return report(args)
    if args.time_only or args.floor_only:
        doc = load_json(main_json)
        missing = [m for m in args.models if m not in doc["models"]]
        if missing:
            sys.exit(f"error: {main_json} has no build of {missing}; run without --time-only")
        if args.floor_only:
            doc["floor"] = floor_section(doc["models"], popcount_rate(args.out, args.threads, log))
            with open(main_json, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            if doc["floor"]:
                print_floor(doc["models"], doc["floor"])
            return
        if not args.json:
            sys.exit("error: --time-only needs --json FILE")
        doc.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   cpu=cpu_info())
        doc["settings"].update(runs=args.runs, warmup=args.warmup,
                               lce_kernels=args.lce_kernels)
        doc["models"] = {m: doc["models"][m] for m in args.models}
        doc.pop("floor", None)
        doc["results"] = run_timing(args, doc["models"], log)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        return

    doc = {
        "framework": "larq-compute-engine",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_info(),
        "versions": versions(),
        "settings": {"batch": 1, "input_dtype": "float32", "seed": args.seed,
                     "lab_form": args.lab_form, "runs": args.runs, "warmup": args.warmup,
                     "lce_kernels": args.lce_kernels,
                     "timer": "time.perf_counter around LiteInterpreter.predict (1 image)"},
    }
    doc["models"] = build_and_convert(args, log)
    doc["results"] = [] if args.no_time else run_timing(args, doc["models"], log)
    if args.floor:
        doc["floor"] = floor_section(doc["models"], popcount_rate(args.out, args.threads, log))
    path = args.json or main_json
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    if path != main_json:
        shutil.copyfile(path, main_json)
    log(f"wrote {path}")
    if doc["results"]:
        print_lce_table(doc)
    elif doc.get("floor"):
        print_floor(doc["models"], doc["floor"])


if __name__ == "__main__":
    sys.exit(main())
