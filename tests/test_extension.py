"""The CUDA C++ extension without a GPU: it imports and registers its ops, its kernels compile for sm_90a without
register spills or local memory, and the math they share with a host build matches the PyTorch reference."""

import ctypes
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deit_fast import _backend
from deit_fast.ops import layer_norm_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")


def test_extension_imports_and_registers_ops():
    """deit_fast._C imports, reports its architectures, and registers the deit_fast_cuda ops with their schemas."""
    ext, err = _backend.cuda_extension()
    if ext is None:
        if NVCC is None or os.environ.get("DEIT_FAST_BUILD_CUDA") == "0":
            pytest.skip(f"the extension is not built here (nvcc missing or DEIT_FAST_BUILD_CUDA=0): {err}")
        pytest.fail(f"nvcc is on PATH but the extension did not build or import: {err}")
    archs = _backend.extension_archs()
    expected = os.environ.get("DEIT_FAST_CUDA_ARCHS", "8.0;9.0a")
    assert archs == ["sm_" + a.strip().replace(".", "") for a in expected.split(";") if a.strip()]
    fwd = str(torch.ops.deit_fast_cuda.layer_norm_fwd.default._schema)
    bwd = str(torch.ops.deit_fast_cuda.layer_norm_bwd.default._schema)
    assert "Tensor? residual" in fwd and "float eps" in fwd
    assert "Tensor? dsum" in bwd


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(glob.glob(str(CSRC / "**" / "*.cu"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, CSRC))
def test_cuda_kernels_do_not_spill(source, tmp_path):
    """Every kernel in each .cu file compiles for sm_90a with no register spills and no stack (local memory)."""
    result = subprocess.run(
        [NVCC, "-arch=sm_90a", "-std=c++17", "-O3", "-Xptxas", "-v", f"-I{CSRC}", "-c", source,
         "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    # ptxas prints "Function properties for <name>" followed by its stack/spill line.
    offenders = []
    for name, body in re.findall(r"Function properties for (\S+)\n(.*?)\n", result.stderr):
        numbers = [int(n) for n in re.findall(r"(\d+) bytes", body)]
        if any(numbers):
            offenders.append(f"{name}: {body.strip()}")
    assert re.search(r"Function properties for", result.stderr), "ptxas -v printed no kernel properties"
    assert not offenders, "kernels use local memory:\n" + "\n".join(offenders)


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    """The host build of csrc/layer_norm's math, loaded with ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("host") / "layer_norm_host.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{CSRC}",
                    str(ROOT / "tests" / "host" / "layer_norm_host.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("rows", [1, 198])
@pytest.mark.parametrize("D", [1, 100, 192, 384, 768, 1000])
def test_host_math_matches_reference(host_math, D, rows):
    """The CUDA kernels' LayerNorm math, run on the host in float32, matches float64 within the ratio rule."""
    x = torch.randn(rows, D) * 2 + 0.5
    w = torch.randn(D) * 0.5 + 1
    b = torch.randn(D) * 0.1
    dy = torch.randn(rows, D)
    y, mean, rstd = torch.empty_like(x), torch.empty(rows), torch.empty(rows)
    host_math.layer_norm_fwd_host(_ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean), _ptr(rstd), rows, D,
                                  ctypes.c_float(1e-6))
    ds, dw, db = torch.empty_like(x), torch.empty(D), torch.empty(D)
    host_math.layer_norm_bwd_host(_ptr(dy), _ptr(x), _ptr(w), _ptr(mean), _ptr(rstd), _ptr(ds), _ptr(dw), _ptr(db),
                                  rows, D)

    leaves_hi = [t.double().requires_grad_() for t in (x, w, b)]
    y_hi = layer_norm_ref(*leaves_hi, upcast=True)
    y_hi.backward(dy.double())
    leaves_pt = [t.clone().requires_grad_() for t in (x, w, b)]
    y_pt = layer_norm_ref(*leaves_pt)
    y_pt.backward(dy)
    assert_close_ratio(y, y_hi, y_pt, name="y")
    for name, got, hi, pt in zip(["dx", "dweight", "dbias"], [ds, dw, db], leaves_hi, leaves_pt, strict=True):
        assert_close_ratio(got, hi.grad, pt.grad, ratio=GRAD_RATIO, name=name)
