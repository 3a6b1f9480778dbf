#!/usr/bin/env python3
"""PyTorch (eager, CPU or CUDA) training-throughput peer for the zoo's QuickNet and QuickNet-LAB.

The networks are built to compute what `specs/quicknet.yaml` and `specs/quicknet_lab.yaml`
define (expanded by `spec/src/decode.rs`, computed by the layers in `zoo/src/layers/`), at the
benchmark's size: 32x32x1 input (Fashion-MNIST padded from 28 to 32) or any other `--input`
(random images and labels drawn on the device once), 10 classes. On CUDA: float32 throughout
(TF32 off, as the zoo computes), cuDNN's autotuner on. Module and
tensor names follow the zoo's (`stage2.block1.conv.lab.beta`, `stem.bn2.running_var`, ...), so
`--summary` can be compared row by row with `zoo summary <model> --input 32x32x1 --classes 10`.

Semantics reproduced from the zoo:
- NCHW layout; TensorFlow SAME padding (output ceil(H/s), the smaller half of the padding on
  top/left, so a stride-2 3x3 on an even input pads only bottom/right).
- Binary convolutions: binarize the input (ste_sign, clip 1.25, or LAB), pad the binarized map
  with +1 (`pad_value: 1`), convolve with ste_sign(kernel) (clip 1.25), no bias; the latent
  kernels are clipped to [-1.25, 1.25] after every optimiser step.
- sign(0) = +1; ste_sign's gradient is 1 where |x| <= clip, else 0.
- LAB: depthwise 3x3 (stride 1, SAME zero padding, depth multiplier 2, bias), times a learnable
  scalar beta; output channel c compares the pair (2c, 2c+1) (the `channel` pairing, the
  default) and is +1 where the second is strictly larger, else -1; the backward pass is the
  gradient of tanh((beta*y1 - beta*y0) / 2).
- Keras batch norm: batch statistics with the biased variance for normalising, the unbiased one
  for the moving update, Keras momentum m = PyTorch momentum 1 - m, epsilon floored to 1.001e-5.
- ReLU with gradient 0 at 0 (PyTorch's too); max pool 2x2/1 VALID; fixed [1,2,1]x[1,2,1]/16
  blur, stride 2, SAME zero padding; Keras initialisers (glorot / he, truncated normals).

Training step: Adam (lr 2.5e-3, betas 0.9/0.999, eps 1e-7 as in Keras), softmax cross-entropy
on the logits, weight clip. Prints one JSON line with the timed throughput.
"""

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Constants of the specs and of the zoo's Fashion-MNIST pipeline (zoo/src/data/fashion_mnist.rs).

BINARY_CLIP = 1.25  # ste_sign clip of activations and kernels, and the latent weight clip
MIN_BN_EPSILON = 1.001e-5  # Keras' fused batch norm never uses a smaller epsilon
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_SIDE = 28

# QuickNet as the specs write it: stem widths, then (filters, blocks) per stage.
STEM_FILTERS = 16
STEM_OUT = 64
STAGES = [(64, 4), (128, 4), (256, 4), (512, 4)]


# ----------------------------------------------------------------------------------------------
# Padding and initialisers


def same_padding(size, kernel, stride):
    """TensorFlow SAME padding (before, after) along one dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride, value=0.0):
    """Pads an NCHW tensor as TensorFlow SAME would for a square window."""
    top, bottom = same_padding(x.shape[2], kernel, stride)
    left, right = same_padding(x.shape[3], kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def keras_truncated_normal_(tensor, stddev):
    """Keras' truncated normal: cut at 2 sigma, scaled so the draw keeps `stddev`."""
    sigma = stddev / 0.87962566103423978
    nn.init.trunc_normal_(tensor, mean=0.0, std=sigma, a=-2.0 * sigma, b=2.0 * sigma)


def init_kernel_(tensor, init, fan_in, fan_out):
    """Draws a kernel from a Keras initialiser by name, with Keras' fans."""
    with torch.no_grad():
        if init == "glorot_uniform":
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            tensor.uniform_(-limit, limit)
        elif init == "glorot_normal":
            keras_truncated_normal_(tensor, math.sqrt(2.0 / (fan_in + fan_out)))
        elif init == "he_normal":
            keras_truncated_normal_(tensor, math.sqrt(2.0 / fan_in))
        else:
            raise ValueError(f"unknown initialiser {init}")


# ----------------------------------------------------------------------------------------------
# Binarizers: straight-through estimators as autograd functions


class SteSign(torch.autograd.Function):
    """sign(x) with sign(0) = +1; gradient 1 where |x| <= clip, else 0 (Larq's ste_sign)."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class LabSign(torch.autograd.Function):
    """LAB's decision on the difference d = beta*y1 - beta*y0 of the two scaled scores.

    Forward: +1 where d > 0 (the second score strictly larger), else -1 (ties give -1).
    Backward: the gradient of tanh(d / 2), i.e. (1 - tanh(d/2)^2) / 2; autograd carries it on
    to y0 and y1 (with opposite signs), to beta, and through the depthwise convolution.
    """

    @staticmethod
    def forward(ctx, d):
        ctx.save_for_backward(d)
        return torch.where(d > 0, 1.0, -1.0).to(d.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        s = torch.tanh(0.5 * d)
        return grad * (0.5 * (1.0 - s * s))


def ste_sign(x, clip=BINARY_CLIP):
    return SteSign.apply(x, clip)


class Lab(nn.Module):
    """The Learnable Activation Binarizer (zoo/src/layers/binarize.rs, `Lab`).

    Tensors: `weight` (2C x 1 x 3 x 3; output 2k + q reads channel k, as PyTorch's grouped
    convolution with groups = C orders them), `bias` (2C), `beta` (1).
    """

    def __init__(self, channels, pairing="channel"):
        super().__init__()
        self.channels = channels
        self.pairing = pairing
        self.weight = nn.Parameter(torch.empty(2 * channels, 1, 3, 3))
        self.bias = nn.Parameter(torch.zeros(2 * channels))
        self.beta = nn.Parameter(torch.ones(1))
        # Keras depthwise fans: kh*kw*in and kh*kw*multiplier (LAB: glorot_uniform).
        init_kernel_(self.weight, "glorot_uniform", 9 * channels, 9 * 2)

    def forward(self, x):
        n, c, h, w = x.shape
        # SAME at stride 1 is one pixel of zeros all round for a 3x3 window.
        y = F.conv2d(x, self.weight, self.bias, stride=1, padding=1, groups=c)
        y = y * self.beta
        if self.pairing == "channel":
            # Pair the two outputs of each channel: (2c, 2c+1).
            pairs = y.view(n, c, 2, h, w)
            y0, y1 = pairs[:, :, 0], pairs[:, :, 1]
        else:
            # The official code's reshape as (2, C): pair outputs c and C + c.
            pairs = y.view(n, 2, c, h, w)
            y0, y1 = pairs[:, 0], pairs[:, 1]
        return LabSign.apply(y1 - y0)


# ----------------------------------------------------------------------------------------------
# Layers


class Conv(nn.Module):
    """A float convolution with TensorFlow SAME zero padding and no bias (the spec's `conv`)."""

    def __init__(self, cin, cout, kernel, stride=1, init="glorot_uniform"):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        init_kernel_(self.weight, init, kernel * kernel * cin, kernel * kernel * cout)

    def forward(self, x):
        x = pad_same(x, self.kernel, self.stride)
        return F.conv2d(x, self.weight, stride=self.stride)


class DepthwiseConv(nn.Module):
    """Float depthwise convolution, multiplier 1, SAME zero padding, no bias."""

    def __init__(self, channels, kernel, stride=1, init="glorot_uniform"):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, kernel))
        init_kernel_(self.weight, init, kernel * kernel * channels, kernel * kernel)

    def forward(self, x):
        x = pad_same(x, self.kernel, self.stride)
        return F.conv2d(x, self.weight, stride=self.stride, groups=x.shape[1])


class QuantConv(nn.Module):
    """QuickNet's binary 3x3 convolution (the zoo's `QuantConv2d` with the specs' settings):
    binarize the input (ste_sign or LAB), pad it with +1, convolve with ste_sign(kernel)."""

    def __init__(self, cin, cout, activation="sign", lab_pairing="channel"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.weight.weight_clip = BINARY_CLIP  # clipped after each optimiser step
        init_kernel_(self.weight, "glorot_normal", 9 * cin, 9 * cout)
        self.lab = Lab(cin, lab_pairing) if activation == "lab" else None

    def forward(self, x):
        x = self.lab(x) if self.lab is not None else ste_sign(x)
        x = F.pad(x, (1, 1, 1, 1), value=1.0)  # pad_value: 1, after binarization
        return F.conv2d(x, ste_sign(self.weight))


def batch_norm(channels, momentum, epsilon, affine=True):
    """Keras BatchNormalization(momentum, epsilon) in PyTorch terms.

    PyTorch's training-mode batch norm already normalises with the biased variance and updates
    the running variance with the unbiased one, as Keras does.
    """
    return nn.BatchNorm2d(
        channels, eps=max(epsilon, MIN_BN_EPSILON), momentum=1.0 - momentum, affine=affine
    )


class MaxPool(nn.Module):
    """2x2 max pool, stride 1, VALID (the QuickNet transition's)."""

    def forward(self, x):
        return F.max_pool2d(x, kernel_size=2, stride=1)


class BlurPool(nn.Module):
    """Fixed [1,2,1]^T [1,2,1] / 16 blur on every channel, stride 2, SAME zero padding."""

    def __init__(self, channels):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :] / 16.0).expand(channels, 1, 3, 3).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)  # not a tensor of the model

    def forward(self, x):
        x = pad_same(x, 3, 2)
        return F.conv2d(x, self.kernel, stride=2, groups=x.shape[1])


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


class Dense(nn.Module):
    """Fully connected layer on N x C x 1 x 1 input, giving N x units (the logits)."""

    def __init__(self, cin, units, init="glorot_normal"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(units, cin))
        self.bias = nn.Parameter(torch.zeros(units))
        init_kernel_(self.weight, init, cin, units)

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


class QuickNetBlock(nn.Module):
    """`x + BN(ReLU(QuantConv3x3(x)))` (the `quicknet` template's residual block)."""

    def __init__(self, channels, activation, lab_pairing):
        super().__init__()
        self.conv = QuantConv(channels, channels, activation, lab_pairing)
        self.relu = nn.ReLU()
        self.bn = batch_norm(channels, momentum=0.9, epsilon=1e-5)

    def forward(self, x):
        return x + self.bn(self.relu(self.conv(x)))


class QuickNet(nn.Module):
    """QuickNet (activation "sign") or QuickNet-LAB (activation "lab") as the specs define it."""

    def __init__(self, in_channels=1, classes=10, activation="sign", lab_pairing="channel"):
        super().__init__()
        f = STEM_FILTERS
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", Conv(in_channels, f, 3, stride=2, init="he_normal"))
        self.stem.add_module("bn1", batch_norm(f, 0.99, 1e-3))
        self.stem.add_module("relu1", nn.ReLU())
        self.stem.add_module("dwconv1", DepthwiseConv(f, 3, stride=2))
        self.stem.add_module("bn2", batch_norm(f, 0.99, 1e-3, affine=False))
        self.stem.add_module("conv2", Conv(f, STEM_OUT, 1, init="he_normal"))
        self.stem.add_module("bn3", batch_norm(STEM_OUT, 0.99, 1e-3))
        channels = STEM_OUT
        for i, (filters, blocks) in enumerate(STAGES, start=1):
            stage = nn.Sequential()
            if filters != channels:
                # The transition: relu, max pool 2x2/1, blur /2, conv 1x1, batch norm.
                t = nn.Sequential()
                t.add_module("relu", nn.ReLU())
                t.add_module("maxpool", MaxPool())
                t.add_module("blur", BlurPool(channels))
                t.add_module("conv", Conv(channels, filters, 1, init="glorot_normal"))
                t.add_module("bn", batch_norm(filters, momentum=0.9, epsilon=1e-5))
                stage.add_module("transition", t)
            for b in range(1, blocks + 1):
                stage.add_module(f"block{b}", QuickNetBlock(filters, activation, lab_pairing))
            channels = filters
            self.add_module(f"stage{i}", stage)
        self.head = nn.Sequential()
        self.head.add_module("relu1", nn.ReLU())
        self.head.add_module("gap1", GlobalAvgPool())
        self.head.add_module("dense1", Dense(channels, classes, init="glorot_normal"))

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, len(STAGES) + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.head(x)


def build_model(name, lab_pairing="channel", in_channels=1):
    activation = {"quicknet": "sign", "quicknet-lab": "lab"}[name]
    return QuickNet(in_channels=in_channels, classes=10, activation=activation,
                    lab_pairing=lab_pairing)


def stored_tensors(model):
    """The model's tensors as the zoo counts them: parameters plus BN moving statistics."""
    tensors = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            tensors[name] = buf
    return tensors


def print_summary(model, side, channels=1):
    """Per-layer rows (name, output HxWxC, stored values) in the zoo summary's terms."""
    counts = {}
    for name, t in stored_tensors(model).items():
        owner = name.rsplit(".", 1)[0]
        if owner.endswith(".lab"):
            owner = owner[: -len(".lab")]  # the zoo counts LAB's tensors with its convolution
        counts[owner] = counts.get(owner, 0) + t.numel()
    shapes = {}
    leaves = {
        n: m for n, m in model.named_modules()
        if n and not n.endswith(".lab")
        and (isinstance(m, (QuickNetBlock, QuantConv)) or not any(True for _ in m.children()))
    }
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
        for n, m in leaves.items()
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, side, side))
    model.train()
    for h in hooks:
        h.remove()
    for n in leaves:
        s = shapes[n]
        hwc = f"{s[2]}x{s[3]}x{s[1]}" if len(s) == 4 else f"1x1x{s[1]}"
        c = counts.get(n)
        print(f"{n:<40} {type(leaves[n]).__name__:<14} {hwc:>10} {f'{c:,}' if c else '-':>10}")
    tensors = stored_tensors(model)
    trainable = sum(t.numel() for t in model.parameters())
    binary = sum(
        p.numel() for p in model.parameters() if getattr(p, "weight_clip", None) is not None
    )
    total = sum(t.numel() for t in tensors.values())
    print(f"Parameters {total:,} (trainable {trainable:,}, non-trainable {total - trainable:,}, "
          f"binary kernels {binary:,})")


# ----------------------------------------------------------------------------------------------
# Data


def read_idx_gz(path):
    """Reads a gzip-compressed IDX file of unsigned bytes into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


class FashionMnist:
    """The training split, normalised and centred in `side` x `side` (background-filled),
    served as shuffled batches (a new permutation every epoch)."""

    def __init__(self, directory, side, seed):
        images = read_idx_gz(os.path.join(directory, "train-images-idx3-ubyte.gz"))
        labels = read_idx_gz(os.path.join(directory, "train-labels-idx1-ubyte.gz"))
        if images.shape[1:] != (FMNIST_SIDE, FMNIST_SIDE) or len(images) != len(labels):
            raise ValueError(f"{directory}: unexpected Fashion-MNIST shapes {images.shape}")
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype(np.int64))
        before = (side - FMNIST_SIDE) // 2
        self.pads = (before, side - FMNIST_SIDE - before) * 2
        self.background = -FMNIST_MEAN / FMNIST_STD
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.cursor = None, len(self.labels)

    def batch(self, size):
        if self.cursor + size > len(self.labels):
            self.order = torch.randperm(len(self.labels), generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor: self.cursor + size]
        self.cursor += size
        x = (self.images[index].float().div_(255.0) - FMNIST_MEAN).div_(FMNIST_STD)
        x = F.pad(x.unsqueeze(1), self.pads, value=self.background)
        return x, self.labels[index]


class RandomImages:
    """`count` random normal images of `shape` (C, H, W) with random labels, drawn once on
    `device`, served in turn: the throughput of the network alone."""

    def __init__(self, shape, count, device, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randn((count, *shape), generator=generator, device=device)
        self.labels = torch.randint(0, 10, (count,), generator=generator, device=device)
        self.cursor = 0

    def batch(self, size):
        index = torch.arange(self.cursor, self.cursor + size, device=self.images.device)
        index %= len(self.labels)
        self.cursor = (self.cursor + size) % len(self.labels)
        return self.images[index], self.labels[index]


# ----------------------------------------------------------------------------------------------
# Training loop


def clip_weights_(params):
    """The specs' WeightClip(1.25) on the latent binary kernels, after each step."""
    with torch.no_grad():
        for p in params:
            p.clamp_(-p.weight_clip, p.weight_clip)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["quicknet", "quicknet-lab"], default="quicknet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    parser.add_argument("--data", choices=["fashion-mnist", "random"], default="fashion-mnist",
                        help="random: random images of --input (any size) drawn on the device")
    parser.add_argument("--input", default="32x32x1",
                        help="HxWxC; Fashion-MNIST is 32x32x1 (padded), other sizes need --data random")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the IDX files (default: data/fashion-mnist in the repo)")
    parser.add_argument("--lr", type=float, default=2.5e-3)
    parser.add_argument("--lab-pairing", choices=["channel", "official"], default="channel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", action="store_true",
                        help="print the layer table and parameter count, then exit")
    args = parser.parse_args()

    # Thread settings first, before any parallel work.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)

    height, width, channels = (int(v) for v in args.input.split("x"))
    if args.data == "fashion-mnist" and (height, width, channels) != (32, 32, 1):
        parser.error("Fashion-MNIST is served at 32x32x1; other inputs need --data random")
    device = torch.device(args.device)
    if device.type == "cuda":
        # float32 as the zoo computes (PyTorch would use TF32 in convolutions by default).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    model = build_model(args.model, args.lab_pairing, channels)
    if args.summary:
        print_summary(model, height, channels)
        return

    if args.data == "random":
        data = RandomImages((channels, height, width), 4 * args.batch_size, device, args.seed)
    else:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        data = FashionMnist(args.data_dir or os.path.join(repo, "data", "fashion-mnist"), height,
                            args.seed)
    model.to(device)
    clipped = [p for p in model.parameters() if getattr(p, "weight_clip", None) is not None]
    # Keras' Adam defaults but for the learning rate (epsilon 1e-7 instead of PyTorch's 1e-8).
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-7)
    model.train()

    def step():
        x, y = data.batch(args.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_weights_(clipped)
        return loss.item()  # also a synchronisation point

    for _ in range(args.warmup_steps):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    if not all(math.isfinite(l) for l in losses):
        print(f"warning: non-finite loss during training: {losses}", file=sys.stderr)

    total = sum(times)
    print(json.dumps({
        "framework": "pytorch",
        "model": args.model,
        "images_per_second": args.batch_size * len(times) / total,
        "median_step_s": statistics.median(times),
        "mean_step_s": total / len(times),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": str(device),
        "input": args.input,
        "data": args.data,
        "params": sum(t.numel() for t in stored_tensors(model).values()),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
