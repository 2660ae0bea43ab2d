"""Fused attention on a CUDA GPU: bf16/fp16 numerics over the full N x H x D matrix, determinism, float32 dispatch,
the Attention module against timm's, opcheck and torch.compile."""

import itertools

import pytest
import torch
from attention_cases import check_against_reference
from timm.layers import Attention as TimmAttention

from deit_fast import BackendUnavailableError, _backend
from deit_fast.layers import Attention
from deit_fast.ops import attention

pytestmark = pytest.mark.gpu

CASES = list(itertools.product([1, 2, 97, 197, 198, 577, 1025], [3, 6, 12], [32, 64, 128]))


@pytest.mark.parametrize("N, H, D", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_numerics_gpu(dtype, N, H, D, use_backend):
    """Triton forward and dq/dk/dv vs float64, ratio rule against PyTorch's SDPA in the same dtype."""
    use_backend("triton", "cuda")
    check_against_reference(torch.randn(2, N, 3 * H * D, device="cuda", dtype=dtype), H)


def test_deterministic_backward(use_backend):
    """Two backward passes give bit-identical dqkv (no atomics)."""
    use_backend("triton", "cuda")
    qkv = torch.randn(64, 198, 3 * 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        qkv.grad = None
        attention(qkv, 6).backward(torch.ones(64, 198, 384, device="cuda", dtype=torch.bfloat16))
        grads.append(qkv.grad.clone())
    assert torch.equal(*grads)


def test_float32_dispatch(monkeypatch):
    """float32 on the GPU runs the reference under auto and refuses a forced Triton, saying why."""
    qkv = torch.randn(2, 198, 3 * 384, device="cuda")
    monkeypatch.setenv("DEIT_FAST_BACKEND", "auto")
    assert _backend.choose("attention", qkv, 6, 0.125)[0] == "reference"
    monkeypatch.setenv("DEIT_FAST_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="float32"):
        attention(qkv, 6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_module_matches_timm_bf16(qk_norm, use_backend):
    """The drop-in module in bf16 matches timm's (fp32 copy of the same weights) as closely as timm's bf16 does."""
    use_backend("triton", "cuda")
    kwargs = dict(num_heads=6, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm if qk_norm else None)
    theirs = TimmAttention(384, **kwargs).cuda()
    ours = Attention(384, **kwargs).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 198, 384, device="cuda")
    with torch.no_grad():
        ref = theirs(x)
        theirs_bf16 = theirs.bfloat16()(x.bfloat16())
        ours_bf16 = ours.bfloat16()(x.bfloat16())
    err_ours = (ours_bf16.float() - ref).abs().max().item()
    err_timm = (theirs_bf16.float() - ref).abs().max().item()
    assert err_ours <= 2 * err_timm + 1e-3


def test_opcheck_and_compile_gpu(use_backend):
    """opcheck on CUDA tensors; the compiled module matches eager."""
    use_backend("triton", "cuda")
    qkv = torch.randn(2, 198, 3 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.deit_fast.attention_fwd.default, (qkv, 3, 0.125))
    torch._dynamo.reset()
    module = Attention(192, num_heads=3, qkv_bias=True).cuda().bfloat16()
    x = torch.randn(4, 198, 192, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x))
