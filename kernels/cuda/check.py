#!/usr/bin/env python3
"""Compiles every CUDA source of the zoo with NVRTC, as the `cuda` feature does at run time
(kernels/src/cuda.rs: `common.cuh` expanded in place, the options of options.txt), for each
architecture the zoo supports, then assembles each PTX with ptxas for that architecture's GPU
(sm_80, sm_90), as the driver does when it loads the module, which is where inline PTX such as
the tensor cores' `mma` is checked; fails on any error or warning. Needs no GPU and no driver:
only libnvrtc and ptxas (PyPI's `nvidia-cuda-nvrtc` and `nvidia-cuda-nvcc`).

    python3 kernels/cuda/check.py [--nvrtc path/to/libnvrtc.so.13] [--ptxas path/to/ptxas]
                                  [--ptx-dir DIR]
"""
import argparse
import ctypes
import glob
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHITECTURES = ["compute_80", "compute_90"]
INCLUDE = '#include "common.cuh"'


def find_nvrtc():
    """libnvrtc from an installed `nvidia-cuda-nvrtc` wheel, else the system's."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
            hits = glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True)
            if hits:
                return hits[0]
    return "libnvrtc.so"


def find_ptxas():
    """ptxas from an installed `nvidia-cuda-nvcc` wheel, else the one on PATH, else None."""
    import shutil
    import site

    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", "ptxas"))
        if hits:
            return hits[0]
    return shutil.which("ptxas")


def assemble(ptxas, ptx, arch):
    """Assembles `ptx` (compiled for compute_XY) for sm_XY; returns (ok, messages)."""
    gpu = arch.replace("compute_", "sm_")
    with tempfile.TemporaryDirectory() as tmp:
        source_path = os.path.join(tmp, "module.ptx")
        with open(source_path, "wb") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas, f"--gpu-name={gpu}", source_path, "-o", os.path.join(tmp, "module.cubin")],
            capture_output=True, text=True)
    return run.returncode == 0, (run.stdout + run.stderr).strip()


def source(name):
    """The text NVRTC compiles for kernels/cuda/<name>: the shared header expanded in place."""
    with open(os.path.join(HERE, name)) as f:
        text = f.read()
    with open(os.path.join(HERE, "common.cuh")) as f:
        common = f.read()
    line = text[: text.index(INCLUDE)].count("\n") + 2
    return text.replace(INCLUDE, f'{common}\n#line {line} "{name}"', 1)


def options():
    with open(os.path.join(HERE, "options.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def compile_source(nvrtc, name, arch):
    """Returns (ok, log, ptx)."""
    program = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(
        ctypes.byref(program), source(name).encode(), name.encode(), 0, None, None))
    opts = options() + [f"--gpu-architecture={arch}"]
    argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    status = nvrtc.nvrtcCompileProgram(program, len(opts), argv)
    size = ctypes.c_size_t()
    check(nvrtc, nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
    log = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetProgramLog(program, log))
    ptx = b""
    if status == 0:
        check(nvrtc, nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        check(nvrtc, nvrtc.nvrtcGetPTX(program, buf))
        ptx = buf.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status == 0, log.value.decode(errors="replace").strip(), ptx


def check(nvrtc, status):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"NVRTC: {nvrtc.nvrtcGetErrorString(status).decode()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrtc", default=None, help="the libnvrtc shared library")
    parser.add_argument("--ptxas", default=None, help="the ptxas executable")
    parser.add_argument("--ptx-dir", default=None, help="also write the PTX of each compile here")
    args = parser.parse_args()
    library = args.nvrtc or find_nvrtc()
    # NVRTC opens its builtins library by name; load the one beside it first.
    for builtins in glob.glob(os.path.join(os.path.dirname(library), "libnvrtc-builtins.so.*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(library)
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value} ({library}), options {options()}")
    ptxas = args.ptxas or find_ptxas()
    if not ptxas:
        sys.exit("ptxas not found: install nvidia-cuda-nvcc (kernels/cuda/requirements-nvrtc.txt) "
                 "or pass --ptxas")
    print(f"ptxas {ptxas}")
    sources = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.cu")))
    failed = 0
    for name in sources:
        for arch in ARCHITECTURES:
            ok, log, ptx = compile_source(nvrtc, name, arch)
            if ok:
                ok, messages = assemble(ptxas, ptx, arch)
                log = "\n".join(m for m in (log, messages) if m)
            kernels = ptx.count(b".entry")
            verdict = "ok" if ok and not log else ("warnings" if ok else "FAILED")
            print(f"{name:20} {arch:11} {verdict:8} {kernels:3} kernels")
            if log:
                print("  " + log.replace("\n", "\n  "))
            if not ok or log:
                failed += 1
            if args.ptx_dir and ok:
                os.makedirs(args.ptx_dir, exist_ok=True)
                out = os.path.join(args.ptx_dir, f"{name[:-3]}.{arch}.ptx")
                with open(out, "wb") as f:
                    f.write(ptx)
    if failed:
        sys.exit(f"{failed} compile(s) failed or warned")


if __name__ == "__main__":
    main()
