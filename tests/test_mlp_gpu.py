"""Fused MLP and Block on a CUDA GPU: bf16/fp16 numerics at DeiT shapes for the Triton GEMMs and the cuBLAS path,
determinism, the Block against timm's under bf16 autocast, and torch.compile."""

import pytest
import torch
from mlp_cases import VARIANTS, check, make_inputs
from timm.models.vision_transformer import Block as TimmBlock

from deit_fast.layers import Block
from deit_fast.ops import fused_mlp, mlp
from deit_fast.testing import GRAD_RATIO, assert_close_ratio

pytestmark = pytest.mark.gpu

SHAPES = [(4, 198, 384), (2, 197, 768), (3, 1, 192), (2, 198, 100)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B, N, C", SHAPES)
@pytest.mark.parametrize("gemm", ["triton", "cublas", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_numerics_gpu(dtype, gemm, B, N, C, variant, use_backend, monkeypatch):
    """Output and every gradient vs float64, ratio rule against PyTorch in the same dtype, for each GEMM choice."""
    use_backend("triton", "cuda")
    monkeypatch.setenv(fused_mlp.GEMM_ENV, gemm)
    check(*make_inputs(B, N, C, dtype, device="cuda", **VARIANTS[variant]))


def test_deterministic_backward(use_backend, monkeypatch):
    """Two backward passes give bit-identical gradients (split-K partials summed in a fixed order)."""
    use_backend("triton", "cuda")
    monkeypatch.setenv(fused_mlp.GEMM_ENV, "triton")
    (x, w1, b1, w2, b2), kw = make_inputs(64, 198, 384, torch.bfloat16, device="cuda",
                                          **VARIANTS["residual_layerscale_droppath"])
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    runs = []
    for _ in range(2):
        for t in leaves:
            t.grad = None
        mlp(*leaves, **kw).backward(torch.ones_like(x))
        runs.append([t.grad.clone() for t in leaves])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init_values", [None, 1e-1])
def test_block_autocast_vs_timm(init_values, use_backend):
    """Block under bf16 autocast vs timm's Block in float64 (same weights), ratio rule against timm's Block under the
    same autocast: output and input gradient."""
    use_backend("triton", "cuda")
    torch.manual_seed(0)
    theirs = TimmBlock(384, 6, qkv_bias=True, init_values=init_values).cuda()
    ours = Block(384, 6, qkv_bias=True, init_values=init_values).cuda()
    ours.load_state_dict(theirs.state_dict())
    ref = TimmBlock(384, 6, qkv_bias=True, init_values=init_values).cuda().double()
    ref.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 198, 384, device="cuda")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    x_hi = x.double().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, out_pt = ours(xs[0]), theirs(xs[1])
    out_hi = ref(x_hi)
    assert_close_ratio(out.to(torch.bfloat16), out_hi, out_pt.to(torch.bfloat16))
    g = torch.randn_like(out_hi)
    for o in (out, out_pt):
        o.backward(g.to(o.dtype))
    out_hi.backward(g)
    assert_close_ratio(xs[0].grad.to(torch.bfloat16), x_hi.grad, xs[1].grad.to(torch.bfloat16), ratio=GRAD_RATIO,
                       name="dx")


def test_block_compile_gpu(use_backend):
    """torch.compile(fullgraph=True) of a bf16 Block in training matches eager."""
    use_backend("triton", "cuda")
    torch._dynamo.reset()
    block = Block(384, 6, qkv_bias=True).cuda().to(torch.bfloat16)
    x = torch.randn(4, 198, 384, device="cuda", dtype=torch.bfloat16)
    eager = block(x)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), eager, atol=2e-2, rtol=2e-2)
