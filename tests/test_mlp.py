"""Fused MLP half (fc1 + GELU + fc2 + layer scale + drop path + residual): each backend vs float64 with the ratio
rule, outputs and the gradient of every input and parameter; custom-op contracts; torch.compile; saved activation
memory vs timm's; bad input. Larger widths are opt-in: DEIT_FAST_FULL_MATRIX=1."""

import os

import pytest
import torch
import torch.nn.functional as F
from mlp_cases import VARIANTS, check, make_inputs
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import LayerScale

from deit_fast.ops import fused_mlp, mlp, mlp_ref
from deit_fast.testing import saved_bytes

FULL = os.environ.get("DEIT_FAST_FULL_MATRIX", "0") not in ("", "0")
# (B, N, C): DeiT-Ti width at 197 and 198 tokens, an odd width, a single token, batch 1-4.
SHAPES = [(2, 197, 192), (1, 198, 100), (4, 1, 384), (3, 5, 20)]
if FULL:
    SHAPES += [(2, 198, 384), (1, 197, 768), (2, 1, 768), (4, 198, 192)]
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B, N, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_numerics(backend, dtype, B, N, C, variant, use_backend):
    """Each backend's output and gradients vs float64 at DeiT widths, odd widths, 1/197/198 tokens."""
    use_backend(backend)
    check(*make_inputs(B, N, C, dtype, **VARIANTS[variant]))


def test_split_k_and_other_hidden_widths(use_backend, monkeypatch):
    """Weight gradients split over K (several float32 partials) give the same results; a hidden width that is not
    4x and a non-square fc2 (C_out != C) work."""
    use_backend("triton")
    monkeypatch.setattr(fused_mlp, "_sm_count", lambda device: 64)
    args, kwargs = make_inputs(2, 300, 24, torch.float32, residual=False, hidden=70)
    x, w1, b1, _, _ = args
    w2, b2 = torch.randn(10, 70) * 0.1, torch.randn(10)
    assert fused_mlp._split_k(1, 600, 64, torch.device("cpu")) == 2
    check((x, w1, b1, w2, b2), kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cublas_path(variant, use_backend, monkeypatch):
    """The path a GPU takes where cuBLAS beats the Triton GEMM at a shape (each GEMM as torch.matmul/F.linear, the
    epilogues as PyTorch ops): the same output and gradients, run here on CPU tensors by choosing it for every GEMM."""
    use_backend("triton")
    monkeypatch.setattr(fused_mlp, "_run", lambda kind, shape, device, dtype, triton_fn, cublas_fn: cublas_fn())
    check(*make_inputs(2, 13, 24, torch.float32, **VARIANTS[variant]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, use_backend):
    """torch.library.opcheck passes for the forward and backward custom ops, with and without the optional inputs."""
    use_backend(backend)
    for variant in ("plain", "residual_layerscale_droppath", "no_bias_residual"):
        (x, w1, b1, w2, b2), kw = make_inputs(2, 9, 16, torch.float32, **VARIANTS[variant])
        fwd_args = (x, w1, b1, w2, b2, kw.get("residual"), kw.get("layer_scale"), kw.get("sample_scale"))
        torch.library.opcheck(torch.ops.deit_fast.mlp_fwd.default, fwd_args)
        y, z, o = torch.ops.deit_fast.mlp_fwd(*fwd_args)
        torch.library.opcheck(torch.ops.deit_fast.mlp_bwd.default,
                              (torch.randn_like(y), x, w1, w2, z, o, kw.get("layer_scale"), kw.get("sample_scale"),
                               b1 is not None, b2 is not None))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of the op with every option matches eager, forward and backward."""
    use_backend(backend)
    torch._dynamo.reset()
    (x, w1, b1, w2, b2), kw = make_inputs(2, 17, 32, torch.float32, **VARIANTS["residual_layerscale_droppath"])
    params = [t.requires_grad_() for t in (x, w1, b1, w2, b2, kw["residual"], kw["layer_scale"])]

    def fn(x, w1, b1, w2, b2, residual, layer_scale):
        return mlp(x, w1, b1, w2, b2, residual=residual, layer_scale=layer_scale, sample_scale=kw["sample_scale"])

    out = fn(*params)
    grads = torch.autograd.grad(out.sum(), params)
    out_c = torch.compile(fn, fullgraph=True)(*params)
    grads_c = torch.autograd.grad(out_c.sum(), params)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    for g_c, g in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g_c, g, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layer_scale", [False, True])
def test_saves_less_than_timm(layer_scale, use_backend):
    """The fused op saves x and the pre-activation (plus fc2's output with a layer scale): no more than timm's
    Mlp + LayerScale + drop path + residual, measured with saved-tensor hooks (5 vs 9 row widths of C per token)."""
    use_backend("triton")
    B, N, C = 2, 33, 32
    timm_mlp = TimmMlp(C, 4 * C)
    ls = LayerScale(C, init_values=0.1) if layer_scale else torch.nn.Identity()
    x = torch.randn(B, N, C, requires_grad=True)
    residual = torch.randn(B, N, C, requires_grad=True)
    scale = torch.tensor([1.25, 0.0])

    def theirs():
        return residual + ls(timm_mlp(x)) * scale.view(B, 1, 1)

    def ours():
        return mlp(x, timm_mlp.fc1.weight, timm_mlp.fc1.bias, timm_mlp.fc2.weight, timm_mlp.fc2.bias,
                   residual=residual, layer_scale=ls.gamma if layer_scale else None, sample_scale=scale)

    ours_bytes, theirs_bytes = saved_bytes(ours), saved_bytes(theirs)
    row = B * N * C * 4
    assert ours_bytes == (6 if layer_scale else 5) * row + (B * 4)  # x, z (4C) [, o], the (B,) factors
    assert ours_bytes <= theirs_bytes


def test_autocast_casts_like_linear(use_backend):
    """Under autocast the GEMMs run in the autocast dtype and a float32 residual keeps the output float32, as
    timm's residual stream does; the result matches timm's Mlp under the same autocast."""
    use_backend("reference")
    m = TimmMlp(16, 64)
    x, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, residual=residual)
        expected = residual + m(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_bad_input():
    """Wrong shapes, dtypes and devices name the argument."""
    (x, w1, b1, w2, b2), _ = make_inputs(2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="fc1_weight"):
        mlp(x, w1[:, :4], b1, w2, b2)
    with pytest.raises(ValueError, match="fc2_weight"):
        mlp(x, w1, b1, w2[:, :5], b2)
    with pytest.raises(ValueError, match="fc1_bias"):
        mlp(x, w1, b1[:3], w2, b2)
    with pytest.raises(ValueError, match="fc2_weight has dtype"):
        mlp(x, w1, b1, w2.half(), b2)
    with pytest.raises(ValueError, match="residual"):
        mlp(x, w1, b1, w2, b2, residual=x[:, :2])
    with pytest.raises(ValueError, match="sample_scale"):
        mlp(x, w1, b1, w2, b2, sample_scale=torch.ones(3))
    with pytest.raises(ValueError, match="layer_scale"):
        mlp(x, w1, b1, w2, b2, layer_scale=torch.ones(3))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        mlp(x.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="at least two"):
        mlp(x[0, 0], w1, b1, w2, b2)
    with pytest.raises(TypeError, match="fc2_weight"):
        mlp(x, w1, b1, None, b2)
    with pytest.raises(ValueError, match=fused_mlp.GEMM_ENV):
        os.environ[fused_mlp.GEMM_ENV] = "fast"
        try:
            fused_mlp.gemm_mode()
        finally:
            del os.environ[fused_mlp.GEMM_ENV]


def test_gelu_is_exact_erf():
    """The reference uses exact-erf GELU (timm's nn.GELU), which the tanh approximation misses by > 1e-4."""
    z = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    w1 = torch.eye(1, dtype=torch.float64)
    out = mlp_ref(z.view(-1, 1), w1, None, w1, None, upcast=True).view(-1)
    torch.testing.assert_close(out, F.gelu(z), atol=1e-12, rtol=0)
    assert (out - F.gelu(z, approximate="tanh")).abs().max() > 1e-4
