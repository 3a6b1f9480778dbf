#!/usr/bin/env python3
"""PyTorch inference-latency peer (CUDA or CPU) for the zoo's QuickNet and QuickNet-LAB.

The networks are `torch_quicknet.py`'s (imported from this folder, not copied): they compute
what `specs/quicknet.yaml` and `specs/quicknet_lab.yaml` define, here at the GPU benchmark's
size by default, 224x224x3 input and 1000 classes. Inference form:
- `model.eval()` (batch norm with its running statistics) under `torch.inference_mode()`,
  channels-last memory format for the model and its input (a random normal batch drawn on the
  device before each measurement).
- Running statistics: calibrated once from random images (one training-mode forward pass of 8
  images in float32 with a cumulative average, before any timing), so every batch norm centres
  and scales what it sees. Plain random statistics would leave the residual stream adding
  ReLU outputs and drifting positive (at 64x64x3, 91% of one binarized input was +1).
- Binarizers as in `torch_quicknet.py`'s forward: sign (x >= 0 -> +1) on the activations,
  LAB's strict comparison (+1 where beta*y1 > beta*y0). The binary kernels are replaced by
  their signs once, as an inference engine stores them (the zoo's export packs the signs), and
  the binary convolutions then convolve with them directly instead of taking sign(kernel) on
  every call; the rest is the training peer's modules unchanged.
- Precision: float16 weights and activations on CUDA by default (`--dtype fp32` for float32),
  float32 on the CPU. As in `torch_quicknet.py`, on CUDA TF32 is off
  (`torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False`) and
  cuDNN's autotuner is on (`torch.backends.cudnn.benchmark = True`); other flags keep PyTorch's
  defaults. In float16, binary-convolution sums beyond 2048 in magnitude are rounded to the
  nearest representable value; that does not change the work.
- Modes: `eager`, and with `--compile` also `compiled`: `torch.compile(model,
  mode=--compile-mode (max-autotune), dynamic=False)`, one compiled graph per batch size. A
  compile failure is reported as a JSON line with "error" and the run goes on.

Timing: per (mode, batch, model), `--warmup` untimed calls, then `--rounds` rounds, each one
timed loop of `--iters` calls (or as many as fill `--seconds` over all rounds), bracketed by
CUDA events (on CPU: perf_counter). Latency per batch = loop time / iters; the JSON line gives
the median, min and max over rounds and images/s from the median. One JSON line per
measurement on stdout, then one with LAB's cost (quicknet-lab median / quicknet median - 1 per
mode and batch); progress on stderr. Out of memory at a batch gives a JSON line with "error".
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_quicknet as tq  # noqa: E402  (the training peer's model classes)

ACTIVATIONS = {"quicknet": "sign", "quicknet-lab": "lab"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def emit(record):
    print(json.dumps(record), flush=True)


def binary_conv_forward(self, x):
    """`tq.QuantConv.forward` with the kernel's signs stored once (see `binarize_kernels_`)."""
    x = self.lab(x) if self.lab is not None else tq.ste_sign(x)
    x = F.pad(x, (1, 1, 1, 1), value=1.0)  # pad_value: 1, after binarization
    return F.conv2d(x, self.weight)


@torch.no_grad()
def binarize_kernels_(model):
    for m in model.modules():
        if isinstance(m, tq.QuantConv):
            m.weight.copy_(torch.where(m.weight >= 0, 1.0, -1.0))
            m.forward = types.MethodType(binary_conv_forward, m)


@torch.no_grad()
def calibrate_batch_norms_(model, shape, device, generator):
    """Running statistics from one training-mode pass over 8 random images (cumulative
    average), so that eval-mode batch norm normalises what it sees."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(torch.randn((8, *shape), generator=generator, device=device))
    model.eval()


def build(name, shape, classes, device, dtype, seed):
    torch.manual_seed(seed)
    model = tq.QuickNet(shape[0], classes, ACTIVATIONS[name]).to(device)
    calibrate_batch_norms_(model, shape, device,
                           torch.Generator(device=device).manual_seed(seed + 1))
    binarize_kernels_(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype=dtype, memory_format=torch.channels_last).eval()


def time_loop(fn, x, iters, device):
    """Milliseconds per call over one loop of `iters` calls, and the last output."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            out = fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters, out
    begin = time.perf_counter()
    for _ in range(iters):
        out = fn(x)
    return (time.perf_counter() - begin) * 1e3 / iters, out


def measure(fn, x, args, device):
    for _ in range(args.warmup):
        fn(x)
    iters = args.iters
    if args.seconds is not None:  # calibrate: as many calls as fill the budget over all rounds
        ms, _ = time_loop(fn, x, 1, device)
        iters = max(1, int(args.seconds * 1e3 / (args.rounds * ms)))
    times, out = [], None
    for _ in range(args.rounds):
        ms, out = time_loop(fn, x, iters, device)
        times.append(ms)
    return times, iters, bool(torch.isfinite(out).all())


def is_oom(e):
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text  # the CPU allocator's wording


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["quicknet", "quicknet-lab", "both"], default="both")
    parser.add_argument("--input", default="224x224x3", help="HxWxC")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batches", default="1,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--compile-mode", default="max-autotune")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed round")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instead of --iters: time budget per measurement (all rounds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        # As torch_quicknet.py: no TF32, cuDNN's autotuner on.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    height, width, channels = (int(v) for v in args.input.split("x"))
    shape = (channels, height, width)
    names = ["quicknet", "quicknet-lab"] if args.model == "both" else [args.model]
    batches = [int(b) for b in args.batches.split(",")]
    modes = ["eager"] + (["compiled"] if args.compile else [])
    common = {
        "device": str(device), "dtype": {v: k for k, v in DTYPES.items()}[dtype],
        "input": args.input, "classes": args.classes, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }

    models = {n: build(n, shape, args.classes, device, dtype, args.seed) for n in names}
    medians = {}  # (mode, batch, model) -> ms
    for mode in modes:
        fns = dict(models)
        if mode == "compiled":
            try:  # the compilation itself happens at each batch's first call, below
                fns = {n: torch.compile(m, mode=args.compile_mode, dynamic=False)
                       for n, m in models.items()}
            except Exception as e:  # noqa: BLE001  (no torch.compile, or a bad mode)
                emit({**common, "mode": mode, "error": f"{type(e).__name__}: {e}"})
                break
        for batch in batches:
            for name in names:
                head = {"model": name, "mode": mode, **common, "batch": batch}
                if mode == "compiled":
                    head["compile_mode"] = args.compile_mode
                if fns[name] is None:
                    continue  # its compilation failed at an earlier batch
                log(f"{name} {mode} batch {batch} ...")
                x = None
                try:
                    with torch.inference_mode():
                        x = torch.randn((batch, *shape), device=device, dtype=dtype)
                        x = x.contiguous(memory_format=torch.channels_last)
                        times, iters, finite = measure(fns[name], x, args, device)
                except Exception as e:  # noqa: BLE001  (reported, then the run goes on)
                    if not is_oom(e) and mode == "eager":
                        raise
                    emit({**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
                    if not is_oom(e):
                        fns[name] = None  # a compile failure: skip this model's other batches
                    del x
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                ms = statistics.median(times)
                medians[(mode, batch, name)] = ms
                emit({**head, "ms_median": ms, "ms_min": min(times), "ms_max": max(times),
                      "images_per_second": batch * 1e3 / ms, "rounds": args.rounds,
                      "iters": iters, "warmup": args.warmup, "finite": finite})
                log(f"  {ms:.3f} ms/batch (min {min(times):.3f}, max {max(times):.3f}), "
                    f"{batch * 1e3 / ms:,.0f} images/s")
                del x

    cost = {}
    for (mode, batch, name), ms in medians.items():
        base = medians.get((mode, batch, "quicknet"))
        if name == "quicknet-lab" and base:
            cost.setdefault(mode, {})[str(batch)] = ms / base - 1.0
    emit({"lab_cost": cost, "definition": "quicknet-lab ms_median / quicknet ms_median - 1",
          **common})


if __name__ == "__main__":
    main()
