"""LayerNorm and add+LayerNorm, forward and forward+backward: torch eager, torch.compile, deit_fast's Triton and CUDA
kernels side by side (and deit_fast's default dispatch, which on CPU is the PyTorch reference).

Presets: on GPU, DeiT rows (batch 256 x N=198 tokens) at D = 192/384/768 in bfloat16; on CPU, 2 x 198 rows at
D = 192/384 in float32 (the suite runs everywhere; the CPU figures only check the reference is not slower than
torch.nn.LayerNorm).

Minimum bytes per element of the (rows, D) tensors (weights and per-row statistics are negligible):
  layer_norm      fwd: read x, write y = 2;      bwd: read dy, x, write dx = 3
  add_layer_norm  fwd: read x, r, write s, y = 4; bwd: read dy, ds, s, write dx (= dresidual) = 4
"""

import os

import pytest
import torch
import torch.nn.functional as F

from deit_fast import _backend
from deit_fast.ops import add_layer_norm, layer_norm

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    DTYPE, ROWS, WIDTHS, PRESET = torch.bfloat16, 256 * 198, [192, 384, 768], "deit-b256"
else:
    DTYPE, ROWS, WIDTHS, PRESET = torch.float32, 2 * 198, [192, 384], "small"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
EPS = 1e-6
TENSOR_PASSES = {("layer_norm", "fwd"): 2, ("layer_norm", "fwdbwd"): 5,
                 ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "fwdbwd"): 8}


def torch_eager(op, D):
    if op == "layer_norm":
        return lambda x, r, w, b: (F.layer_norm(x, (D,), w, b, EPS),)

    def add_ln(x, r, w, b):
        s = x + r
        return s, F.layer_norm(s, (D,), w, b, EPS)

    return add_ln


def deit_fast_op(op):
    if op == "layer_norm":
        return lambda x, r, w, b: (layer_norm(x, w, b, EPS),)
    return lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)


PROVIDERS = ["torch", "torch_compile", "deit_fast", "triton", "cuda"]


def make_fn(provider, op, D, force_backend):
    if provider == "torch":
        return torch_eager(op, D)
    if provider == "torch_compile":
        torch._dynamo.reset()
        return torch.compile(torch_eager(op, D), fullgraph=True)
    if provider in ("triton", "cuda"):
        force_backend("layer_norm", provider, torch.empty(ROWS, D, device=DEVICE, dtype=DTYPE))
    return deit_fast_op(op)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_layer_norm(provider, op, D, mode, run_benchmark, benchmark, force_backend):
    benchmark.group = f"{op}-{mode}-{str(DTYPE).removeprefix('torch.')}-{PRESET}-D{D}"
    fn = make_fn(provider, op, D, force_backend)
    x = torch.randn(ROWS, D, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwdbwd")
    r = torch.randn(ROWS, D, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwdbwd")
    w = torch.randn(D, device=DEVICE, requires_grad=mode == "fwdbwd")
    b = torch.randn(D, device=DEVICE, requires_grad=mode == "fwdbwd")
    grads = None

    def step():
        nonlocal grads
        outs = fn(x, r, w, b)
        if mode == "fwdbwd":
            if grads is None:
                grads = [torch.randn_like(o) for o in outs]
            torch.autograd.backward(outs, grads)
            x.grad = r.grad = w.grad = b.grad = None

    backend = _backend.choose("layer_norm", x, None, w, b, EPS)[0] if provider.startswith(("deit", "triton", "cuda")) \
        else "torch"
    bytes_moved = TENSOR_PASSES[(op, mode)] * ROWS * D * x.element_size()
    run_benchmark(step, bytes_moved, provider=provider, backend=backend, op=op, mode=mode, D=D, rows=ROWS,
                  dtype=str(DTYPE), triton_interpreted=_backend.TRITON_INTERPRETED, preset=PRESET,
                  backend_env=os.environ.get("DEIT_FAST_BACKEND", "auto"))
