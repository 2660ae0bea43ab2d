"""The MLP half of a DeiT block, its GEMMs, and the whole Block, forward + backward.

mlp_half: y = x + drop_path(ls(mlp(norm2(x)))) in training (drop path 0.1, as DeiT trains), from the residual stream
  x to the next residual stream. Providers: timm (LayerNorm + Mlp + DropPath + add, eager), timm_compile (the same
  under torch.compile, mode max-autotune-no-cudagraphs on GPU), deit_fast (layer_norm + deit_fast.ops.mlp, GEMMs
  chosen by measurement), triton / cublas (deit_fast with DEIT_FAST_MLP_GEMM forced). extra_info carries the bytes
  autograd saves for the backward (saved_mb), counted with saved-tensor hooks.
mlp_gemm: each GEMM of the fused MLP (fc1/fc2 forward, the dgrad and wgrad of each) as the Triton kernel with its
  epilogue vs cuBLAS (torch.matmul / F.linear) without it, at the same shape: TFLOP/s side by side.
block: timm's Block vs deit_fast's Block (fused attention, add+LayerNorm, fused MLP), eager and compiled.
FLOPs: the two MLP GEMMs are 4 * M * C * H forward and twice that backward (M = B * N rows, H = 4C).
Presets: GPU, bf16, DeiT-S and DeiT-B at B=256, N=198; CPU, float32, tiny shapes under the interpreter (the suite runs
everywhere; CPU figures say nothing about GPU speed).
"""

import pytest
import torch
from timm.layers import DropPath
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block as TimmBlock

from deit_fast.layers import Block
from deit_fast.ops import fused_mlp, layer_norm, mlp
from deit_fast.testing import saved_bytes

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if HAS_CUDA:
    DTYPE = torch.bfloat16
    SHAPES = {"deit_small-N198": (256, 198, 384, 6), "deit_base-N198": (256, 198, 768, 12)}
    COMPILE_MODE = "max-autotune-no-cudagraphs"
else:
    DTYPE = torch.float32
    SHAPES = {"tiny-N17": (2, 17, 64, 2)}
    COMPILE_MODE = None
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
DROP_PATH = 0.1


def saved_mb(fn) -> float:
    """MB of distinct non-parameter tensors autograd saves while fn() runs."""
    return round(saved_bytes(fn) / 1e6, 2)


def fwdbwd_step(forward, x, params):
    grad = None

    def step():
        nonlocal grad
        out = forward(x)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        x.grad = None
        for p in params:
            p.grad = None
    return step


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, mode=COMPILE_MODE)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["timm", "timm_compile", "deit_fast", "triton", "cublas"])
def bench_mlp_half(provider, shape, run_benchmark, benchmark, monkeypatch):
    B, N, C, _ = SHAPES[shape]
    H = 4 * C
    benchmark.group = f"mlp_half-fwdbwd-{DTYPE_NAME}-{shape}"
    norm = torch.nn.LayerNorm(C, eps=1e-6).to(DEVICE, DTYPE)
    module = TimmMlp(C, H).to(DEVICE, DTYPE)
    drop_path = DropPath(DROP_PATH).train()
    x = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    if provider.startswith("timm"):
        def forward(x):
            return x + drop_path(module(norm(x)))
        if provider == "timm_compile":
            forward = compiled(forward)
    else:
        if provider in ("triton", "cublas"):
            monkeypatch.setenv(fused_mlp.GEMM_ENV, provider)
        if provider == "cublas" and not HAS_CUDA:
            pytest.skip("cuBLAS is the GPU path")
        from deit_fast.layers.mlp import drop_path_scale

        def forward(x):
            xn = layer_norm(x, norm.weight, norm.bias, 1e-6)
            return mlp(xn, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias, residual=x,
                       sample_scale=drop_path_scale(drop_path, xn, xn.dtype))
    M = B * N
    step = fwdbwd_step(forward, x, list(norm.parameters()) + list(module.parameters()))
    info = dict(saved_mb=saved_mb(lambda: forward(x)))
    run_benchmark(step, 6 * M * C * x.element_size(), flops=12 * M * C * H, provider=provider, backend=provider,
                  op="mlp_half", mode="fwdbwd", dtype=DTYPE_NAME, shape=shape, **info)


GEMMS = ["fc1_fwd", "fc2_fwd", "fc2_dgrad", "fc2_wgrad", "fc1_wgrad", "fc1_dgrad"]


def gemm_operands(kind, M, C, H):
    """(a, b, kwargs for _launch, cuBLAS function) at the MLP's shapes; a and b as the launchers pass them."""
    def t(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE) * 0.1
    if kind == "fc1_fwd":
        x, w, b = t(M, C), t(H, C), t(H)
        return x, w.t(), dict(bias=b), lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    if kind == "fc2_fwd":
        a, w, b, r = t(M, H), t(C, H), t(C), t(M, C)
        return a, w.t(), dict(bias=b, residual=r), lambda: r + torch.nn.functional.linear(a, w, b)
    if kind == "fc2_dgrad":
        g, w, z = t(M, C), t(C, H), t(M, H)
        return g, w, dict(aux=z), lambda: torch.ops.aten.gelu_backward(g @ w, z)
    if kind == "fc2_wgrad":
        g, z = t(M, C), t(M, H)
        return g.t(), z, dict(split=True), lambda: g.t() @ torch.nn.functional.gelu(z)
    if kind == "fc1_wgrad":
        dz, x = t(M, H), t(M, C)
        return dz.t(), x, dict(split=True), lambda: dz.t() @ x
    dz, w = t(M, H), t(H, C)
    return dz, w, {}, lambda: dz @ w


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", GEMMS)
@pytest.mark.parametrize("provider", ["cublas", "triton"])
def bench_mlp_gemm(provider, kind, shape, run_benchmark, benchmark):
    B, N, C, _ = SHAPES[shape]
    M, H = B * N, 4 * C
    benchmark.group = f"mlp_gemm-{kind}-{DTYPE_NAME}-{shape}"
    a, b, kwargs, cublas = gemm_operands(kind, M, C, H)
    if provider == "cublas":
        fn = cublas
    else:
        config = fused_mlp._configs(fused_mlp._capability(DEVICE))[0]

        def fn():
            return fused_mlp._launch(kind, config, a, b, DTYPE, **kwargs)
    run_benchmark(fn, (a.numel() + b.numel()) * a.element_size(), flops=2 * M * C * H, provider=provider,
                  backend=provider, op="mlp_gemm", mode="gemm", dtype=DTYPE_NAME, shape=shape, kind=kind)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["timm", "timm_compile", "deit_fast", "deit_fast_compile"])
def bench_block(provider, shape, run_benchmark, benchmark):
    B, N, C, heads = SHAPES[shape]
    benchmark.group = f"block-fwdbwd-{DTYPE_NAME}-{shape}"
    cls = TimmBlock if provider.startswith("timm") else Block
    module = cls(C, heads, qkv_bias=True, drop_path=DROP_PATH).to(DEVICE, DTYPE).train()
    forward = compiled(module) if provider.endswith("_compile") else module
    x = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    M = B * N
    # Linear layers 24 M C^2 forward (qkv 6, proj 2, MLP 16), twice that backward; attention 4 M N C, 2.5x backward.
    flops = 3 * 24 * M * C * C + int(3.5 * 4 * M * N * C)
    info = dict(saved_mb=saved_mb(lambda: forward(x)))
    run_benchmark(fwdbwd_step(forward, x, list(module.parameters())), 4 * M * C * x.element_size(), flops=flops,
                  provider=provider, backend=provider, op="block", mode="fwdbwd", dtype=DTYPE_NAME, shape=shape,
                  **info)
