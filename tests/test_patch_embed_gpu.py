"""Fused patch embedding on a CUDA GPU: bf16/fp16 at DeiT shapes, float and uint8 images, against timm's path in
float64 with the ratio rule; determinism of the weight gradient; autocast output dtype."""

import pytest
import torch
from patch_embed_cases import check, make_params
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_fast.ops import patch_embed

pytestmark = pytest.mark.gpu

CASES = [(64, 224, 224, 16, 384, 2, False), (16, 384, 384, 16, 768, 1, False), (8, 224, 224, 14, 192, 1, True),
         (8, 208, 80, 8, 384, 2, False)]


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_numerics_gpu(dtype, case, uint8, use_backend):
    """Tokens and every gradient vs float64, ratio rule vs timm's path in the same dtype."""
    use_backend("triton", "cuda")
    B, H, W, p, C, T, nec = case
    params = make_params(H, W, p, C, T, nec, dtype, device="cuda")
    if uint8:
        images = torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, device="cuda")
        check(images, params, nec, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    else:
        check(torch.randn(B, 3, H, W, device="cuda", dtype=dtype), params, nec)


def test_deterministic_weight_grad(use_backend):
    """Two backward passes give bit-identical weight gradients (split partials summed in a fixed order)."""
    use_backend("triton", "cuda")
    weight, bias, pos, prefix = (t.requires_grad_() for t in make_params(224, 224, 16, 384, 2, False,
                                                                           torch.bfloat16, device="cuda"))
    images = torch.randn(128, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        weight.grad = None
        patch_embed(images, weight, bias, pos, prefix).sum().backward()
        grads.append(weight.grad.clone())
    assert torch.equal(*grads)
