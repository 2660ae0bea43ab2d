"""Attention: the core (from the packed qkv to the (B, N, C) output) and the whole Attention module.

Core providers, from the qkv Linear's output (B, N, 3C) to the proj Linear's input (B, N, C):
  sdpa_<backend>          timm's path: reshape/permute/unbind, F.scaled_dot_product_attention with that backend only,
                          transpose/reshape back (the layout copies timm pays, forward and backward)
  sdpa_<backend>_nocopy   the same kernel on q, k, v already laid out (B, H, N, D), output left (B, H, N, D)
  torch_compile           timm's path under torch.compile
  deit_fast, triton       deit_fast.ops.attention (default dispatch; Triton forced)
Module providers: timm's Attention eager and under torch.compile, deit_fast's Attention eager and under torch.compile.

FLOPs (FlashAttention's convention): forward 4 * B * H * N^2 * D, backward 2.5x that. Minimum bytes: forward reads
qkv and writes out (4C a token), backward reads qkv, out, dout and writes dqkv (9C a token).
Presets: GPU, bf16, DeiT-Ti/S/B at B=256, N=198, D=64 (H = 3/6/12) and DeiT-B at 384 px (B=64, N=577, H=12);
CPU, float32, B=2, N=198, H=3 (the suite runs everywhere; CPU figures say nothing about GPU speed).
"""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

from deit_fast import _backend
from deit_fast.layers import Attention
from deit_fast.ops import attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if HAS_CUDA:
    DTYPE = torch.bfloat16
    SHAPES = {"deit_tiny-N198": (256, 198, 3), "deit_small-N198": (256, 198, 6), "deit_base-N198": (256, 198, 12),
              "deit_base384-N577": (64, 577, 12)}
    SDPA_BACKENDS = ["flash", "efficient", "cudnn"]
else:
    DTYPE = torch.float32
    SHAPES = {"small-N198": (2, 198, 3)}
    SDPA_BACKENDS = ["default"]
HEAD_DIM = 64
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def sdpa_context(backend):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}.get(backend)
    return sdpa_kernel(chosen) if chosen is not None else nullcontext()


def timm_core(num_heads):
    def core(qkv):
        B, N, three_c = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, num_heads, three_c // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, three_c // 3)

    return core


CORE_PROVIDERS = [f"sdpa_{b}" for b in SDPA_BACKENDS] + [f"sdpa_{b}_nocopy" for b in SDPA_BACKENDS] + [
    "torch_compile", "deit_fast", "triton"]


def _time_mode(mode, forward, inputs, run_benchmark, flops_fwd, bytes_fwd, bytes_bwd, flops_bwd=None, **info):
    """Benchmark fwd, bwd (retained graph) or fwdbwd of forward(*inputs); flops_bwd defaults to 2.5x forward."""
    flops_bwd = int(2.5 * flops_fwd) if flops_bwd is None else flops_bwd
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward(*inputs)
        flops, bytes_moved = flops_fwd, bytes_fwd
    elif mode == "bwd":
        out = forward(*inputs)
        grad = torch.randn_like(out)

        def step():
            torch.autograd.backward(out, grad, retain_graph=True)
            for t in inputs:
                t.grad = None
        flops, bytes_moved = flops_bwd, bytes_bwd
    else:
        grad = None

        def step():
            nonlocal grad
            out = forward(*inputs)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            for t in inputs:
                t.grad = None
        flops, bytes_moved = flops_fwd + flops_bwd, bytes_fwd + bytes_bwd
    run_benchmark(step, bytes_moved, flops=flops, mode=mode, dtype=DTYPE_NAME, **info)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", CORE_PROVIDERS)
def bench_attention_core(provider, shape, mode, run_benchmark, benchmark, force_backend):
    B, N, H = SHAPES[shape]
    C = H * HEAD_DIM
    benchmark.group = f"attention-{mode}-{DTYPE_NAME}-{shape}"
    qkv = torch.randn(B, N, 3 * C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    inputs = (qkv,)
    backend = provider
    if provider.startswith("sdpa_"):
        sdpa_backend = provider.removeprefix("sdpa_").removesuffix("_nocopy")
        if provider.endswith("_nocopy"):
            inputs = tuple(torch.randn(B, H, N, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
                           for _ in range(3))
            kernel = F.scaled_dot_product_attention
        else:
            kernel = timm_core(H)

        def forward(*args):
            with sdpa_context(sdpa_backend):
                return kernel(*args)
        try:
            forward(*inputs).sum().backward()
        except RuntimeError as e:  # this GPU or build lacks that SDPA backend at this shape
            pytest.skip(f"{provider}: {e}")
    elif provider == "torch_compile":
        torch._dynamo.reset()
        forward = torch.compile(timm_core(H), fullgraph=True)
    else:
        if provider == "triton":
            force_backend("attention", "triton", qkv, H, HEAD_DIM**-0.5)
        backend = _backend.choose("attention", qkv, H, HEAD_DIM**-0.5)[0]

        def forward(qkv):
            return attention(qkv, H)
    flops_fwd = 4 * B * H * N * N * HEAD_DIM
    element = qkv.element_size()
    _time_mode(mode, forward, inputs, run_benchmark, flops_fwd, 4 * B * N * C * element, 9 * B * N * C * element,
               provider=provider, backend=backend, op="attention", shape=shape)


MODULE_PROVIDERS = ["timm", "timm_compile", "deit_fast", "deit_fast_compile"]


@pytest.mark.parametrize("shape", [s for s in SHAPES if "N577" not in s])
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def bench_attention_module(provider, shape, run_benchmark, benchmark):
    B, N, H = SHAPES[shape]
    C = H * HEAD_DIM
    benchmark.group = f"attention_module-fwdbwd-{DTYPE_NAME}-{shape}"
    cls = TimmAttention if provider.startswith("timm") else Attention
    module = cls(C, num_heads=H, qkv_bias=True).to(DEVICE, DTYPE)
    if provider.endswith("_compile"):
        torch._dynamo.reset()
        module = torch.compile(module, fullgraph=True)
    x = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    # Linear layers: qkv (6 B N C^2) and proj (2 B N C^2) forward, twice that backward; attention core as above.
    core = 4 * B * H * N * N * HEAD_DIM
    element = x.element_size()
    _time_mode("fwdbwd", module, (x,), run_benchmark, 8 * B * N * C * C + core, 2 * B * N * C * element,
               3 * B * N * C * element, flops_bwd=16 * B * N * C * C + int(2.5 * core), provider=provider,
               backend=provider, op="attention_module", shape=shape)
