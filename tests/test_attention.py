"""Fused attention on packed qkv: numerics against float64 (ratio rule), the drop-in Attention module against timm's,
custom-op contracts, torch.compile, bad input. The full N x H x D matrix is opt-in: DEIT_FAST_FULL_MATRIX=1."""

import itertools
import os

import pytest
import torch
from attention_cases import check_against_reference
from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm

from deit_fast import _backend
from deit_fast.layers import Attention
from deit_fast.ops import attention, attention_ref

SEQ_LENS = [1, 2, 97, 197, 198, 577, 1025]
HEADS = [3, 6, 12]
HEAD_DIMS = [32, 64, 128]
if os.environ.get("DEIT_FAST_FULL_MATRIX") == "1":
    CASES = list(itertools.product(SEQ_LENS, HEADS, HEAD_DIMS))
else:
    # Every N, H and D appears; long sequences with few heads to keep the interpreter's time down.
    CASES = [(1, 3, 64), (2, 6, 32), (97, 3, 128), (197, 3, 64), (197, 6, 32), (197, 3, 128), (198, 12, 64),
             (198, 3, 32), (577, 3, 64), (1025, 3, 32)]
DTYPE_CASES = [(dtype, *case) for case in CASES for dtype in (torch.float32, torch.float16)
               if case[0] < 1025 or dtype == torch.float16 or os.environ.get("DEIT_FAST_FULL_MATRIX") == "1"]


@pytest.mark.parametrize("dtype, N, H, D", DTYPE_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_triton_numerics(dtype, N, H, D, use_backend):
    """Triton forward and backward (interpreted here) vs float64, ratio rule, batch 2."""
    use_backend("triton")
    check_against_reference(torch.randn(2, N, 3 * H * D, dtype=dtype), H)


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_and_custom_scale(batch, use_backend):
    """Batch 1 and 4, a non-default scale, under the Triton kernels."""
    use_backend("triton")
    check_against_reference(torch.randn(batch, 198, 3 * 6 * 64), 6, scale=0.3)


def test_reference_backend_matches_float64(use_backend):
    """The reference backend (CPU default) is within the ratio rule too."""
    use_backend("reference")
    check_against_reference(torch.randn(2, 197, 3 * 3 * 64), 3)


def test_expanded_gradient(use_backend):
    """A stride-0 output gradient (from .sum()) gives the float64 dqkv."""
    use_backend("triton")
    qkv = torch.randn(2, 97, 3 * 3 * 32, requires_grad=True)
    attention(qkv, 3).sum().backward()
    ref = qkv.detach().double().requires_grad_()
    attention_ref(ref, 3, upcast=True).sum().backward()
    torch.testing.assert_close(qkv.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, use_backend):
    """torch.library.opcheck passes for the forward and backward custom ops."""
    use_backend(backend)
    qkv = torch.randn(2, 17, 3 * 2 * 32, requires_grad=True)
    torch.library.opcheck(torch.ops.deit_fast.attention_fwd.default, (qkv, 2, 0.2))
    out, lse = torch.ops.deit_fast.attention_fwd(qkv.detach(), 2, 0.2)
    torch.library.opcheck(torch.ops.deit_fast.attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, 2, 0.2))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of the Attention module matches eager, forward and backward."""
    use_backend(backend)
    torch._dynamo.reset()
    module = Attention(192, num_heads=3, qkv_bias=True)
    x = torch.randn(2, 198, 192, requires_grad=True)
    out = module(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    compiled = torch.compile(module, fullgraph=True)
    out_c = compiled(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the module


def copy_module(qk_norm=False, **kwargs):
    norm = TimmLayerNorm if qk_norm else None
    theirs = TimmAttention(384, num_heads=6, qkv_bias=True, qk_norm=qk_norm, norm_layer=norm, **kwargs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    ours = Attention(384, num_heads=6, qkv_bias=True, qk_norm=qk_norm, norm_layer=norm, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("fused_attn", [True, False], ids=["timm_sdpa", "timm_explicit"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_matches_timm(backend, qk_norm, fused_attn, use_backend):
    """Same state_dict keys; forward and every parameter gradient match timm's Attention (SDPA or explicit path)."""
    use_backend(backend)
    ours, theirs = copy_module(qk_norm=qk_norm)
    theirs.fused_attn = fused_attn
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 198, 384)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=5e-5, rtol=1e-4)
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_module_masks_and_dropout_fall_back(use_backend, caplog):
    """An attention mask, is_causal and training-time attention dropout run timm's path, with the same result."""
    use_backend("triton")
    ours, theirs = copy_module(attn_drop=0.1)
    x = torch.randn(2, 20, 384)
    mask = torch.rand(2, 1, 20, 20) > 0.3
    mask[..., 0] = True
    with caplog.at_level("WARNING", logger="deit_fast"):
        torch.testing.assert_close(ours.eval()(x, attn_mask=mask), theirs.eval()(x, attn_mask=mask))
        torch.testing.assert_close(ours(x, is_causal=True), theirs(x, is_causal=True))
        torch.manual_seed(1)
        a = ours.train()(x)
        torch.manual_seed(1)
        b = theirs.train()(x)
    torch.testing.assert_close(a, b)
    assert any("not fused" in r.message for r in caplog.records)


def test_module_fused_attn_false_runs_timm_explicit_path(use_backend):
    """fused_attn=False (timm's switch for reading attention maps) runs timm's explicit path: attn_drop sees them."""
    use_backend("triton")
    ours, _ = copy_module()
    ours.fused_attn = False
    seen = []
    ours.attn_drop.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    ours(torch.randn(2, 10, 384))
    assert seen == [(2, 6, 10, 10)]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: attention(torch.randn(2, 5, 100), 3), ValueError, r"multiple of 3 \* num_heads = 9"),
        (lambda: attention(torch.randn(10, 96), 2), ValueError, r"qkv must be \(B, N, 3\*num_heads\*head_dim\)"),
        (lambda: attention(torch.randn(2, 96, 5).transpose(1, 2), 2), ValueError, "qkv must be contiguous"),
        (lambda: attention(torch.ones(2, 5, 96, dtype=torch.int32), 2), ValueError, "floating-point"),
        (lambda: attention(torch.randn(2, 5, 96), 0), ValueError, "num_heads must be a positive int"),
        (lambda: attention(torch.randn(2, 5, 96), 2, scale=-1.0), ValueError, "scale must be"),
        (lambda: attention([1, 2], 2), TypeError, "qkv must be a torch.Tensor"),
    ],
)
def test_bad_input(call, error, message):
    """Wrong last dimension for num_heads, 2-D, non-contiguous or integer qkv get an error naming the argument."""
    with pytest.raises(error, match=message):
        call()


def test_unsupported_head_dim_falls_back(monkeypatch):
    """Head dim 48 is not fused: forcing Triton says why; auto runs the reference and is correct."""
    monkeypatch.setenv("DEIT_FAST_BACKEND", "triton")
    monkeypatch.setattr(_backend, "TRITON_INTERPRETED", True)
    with pytest.raises(_backend.BackendUnavailableError, match="head dim 48"):
        attention(torch.randn(1, 4, 3 * 2 * 48), 2)
    monkeypatch.setenv("DEIT_FAST_BACKEND", "auto")
    qkv = torch.randn(1, 4, 3 * 2 * 48, dtype=torch.float64)
    torch.testing.assert_close(attention(qkv, 2), attention_ref(qkv, 2, upcast=True))
