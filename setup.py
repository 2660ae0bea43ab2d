"""Build script: the pure-Python package plus, when nvcc is found, the CUDA extension `deit_fast._C`.

Environment variables:
  DEIT_FAST_BUILD_CUDA=0      skip the CUDA extension (pure-Python install: Triton + reference).
  DEIT_FAST_CUDA_ARCHS="8.0;9.0a"   architectures to compile for (TORCH_CUDA_ARCH_LIST syntax).
  DEIT_FAST_MAX_JOBS          parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _real_nvcc(path: str) -> str | None:
    """Follow symlinks and small wrapper scripts (`exec /real/bin/nvcc "$@"`) to the real nvcc binary."""
    seen = set()
    while path and path not in seen:
        seen.add(path)
        path = os.path.realpath(path)
        with open(path, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"#!"):
            return path
        candidates = re.findall(rb"(/[^\s'\"]*/bin/nvcc)\b", head)
        path = next((c.decode() for c in candidates if os.path.isfile(c.decode()) and c.decode() != path), None)
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if they hold bin/nvcc, else derived from the real nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = _real_nvcc(nvcc)
    if real is None:
        return None
    root = os.path.dirname(os.path.dirname(real))
    return root if os.path.isdir(os.path.join(root, "include")) else None


def cuda_extensions():
    if os.environ.get("DEIT_FAST_BUILD_CUDA", "1") == "0":
        print("deit_fast: DEIT_FAST_BUILD_CUDA=0, building without the CUDA extension", file=sys.stderr)
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        warnings.warn(
            "deit_fast: nvcc not found; installing without the CUDA extension (Triton and reference kernels only). "
            "Put nvcc on PATH or set CUDA_HOME to build it.",
            stacklevel=1,
        )
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so it must be set first.
    os.environ["CUDA_HOME"] = cuda_home
    archs = os.environ.get("DEIT_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    if "DEIT_FAST_MAX_JOBS" in os.environ:
        os.environ["MAX_JOBS"] = os.environ["DEIT_FAST_MAX_JOBS"]
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    # torch's BuildExtension adds the C++ standard its headers need (C++20 since torch 2.13).
    arch_define = f'-DDEIT_FAST_CUDA_ARCHS="{archs}"'
    ext = CUDAExtension(
        name="deit_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", arch_define],
            "nvcc": ["-O3", "-lineinfo", arch_define],
        },
    )
    print(f"deit_fast: building deit_fast._C with CUDA at {cuda_home} for {archs}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
