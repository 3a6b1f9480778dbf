#!/usr/bin/env python3
"""GPU time per kernel, summed by kernel name (parameter lists dropped), from
Nsight Systems' `cuda_gpu_kern_sum` report or Nsight Compute's CSV log with the metric
`gpu__time_duration.sum`; the 40 costliest, with their share and launch count.

    python3 benches/gpu/kernel_times.py nsys steps_cuda_gpu_kern_sum.csv
    python3 benches/gpu/kernel_times.py ncu ncu.csv
"""
import collections
import csv
import sys

# Nsight Compute's time units, in milliseconds.
UNITS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
         "second": 1e3, "s": 1e3}


def number(text):
    return float(text.replace(",", ""))


def kernel_name(name):
    """The name without return type and parameters (`void k<A>(int)`: `k<A>`), at most 100
    characters: template arguments stay, as they tell cuBLAS's kernels apart."""
    name = name.split("(")[0].strip()
    if name.startswith("void "):
        name = name[len("void "):]
    return name[:100]


def read(tool, path):
    """{kernel: (milliseconds, launches)}."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) > 3]
    if not rows:
        sys.exit(f"{path}: no table")
    head, rows = rows[0], rows[1:]
    total, count = collections.Counter(), collections.Counter()
    if tool == "nsys":
        name, ns, n = head.index("Name"), head.index("Total Time (ns)"), head.index("Instances")
        for r in rows:
            total[kernel_name(r[name])] += number(r[ns]) * 1e-6
            count[kernel_name(r[name])] += int(number(r[n]))
    elif tool == "ncu":
        name, metric = head.index("Kernel Name"), head.index("Metric Name")
        value, unit = head.index("Metric Value"), head.index("Metric Unit")
        for r in rows:
            if r[metric] == "gpu__time_duration.sum":
                if r[unit] not in UNITS:
                    sys.exit(f"{path}: unknown time unit {r[unit]!r}")
                total[kernel_name(r[name])] += number(r[value]) * UNITS[r[unit]]
                count[kernel_name(r[name])] += 1
    else:
        sys.exit(f"unknown tool {tool!r}: expected nsys or ncu")
    return {k: (total[k], count[k]) for k in total}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    kernels = read(sys.argv[1], sys.argv[2])
    whole = sum(ms for ms, _ in kernels.values())
    launches = sum(n for _, n in kernels.values())
    print(f"{sys.argv[1]}: {launches} kernel launches, {whole:.1f} ms of GPU time")
    for kernel, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"{ms:10.2f} ms {100 * ms / max(whole, 1e-12):5.1f}% {n:6d}x  {kernel}")


if __name__ == "__main__":
    main()
