"""Shared by the patch-embedding tests on CPU and GPU: parameters for a case and the ratio-rule check of the tokens
and every gradient against timm's path in float64."""

import torch

from deit_fast.ops import patch_embed, patch_embed_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio


def make_params(H, W, p, C, T, no_embed_class, dtype, device="cpu"):
    P = (H // p) * (W // p)
    weight = (torch.randn(C, 3, p, p) * (3 * p * p) ** -0.5).to(device, dtype)
    bias = (torch.randn(C) * 0.1).to(device, dtype)
    pos = (torch.randn(1, P + (0 if no_embed_class else T), C) * 0.1).to(device)
    prefix = (torch.randn(T, C) * 0.1).to(device) if T else None
    return weight, bias, pos, prefix


def check(images, params, no_embed_class, image_grad=True, **norm):
    """Output and gradients (weight, bias, pos, prefix, image) vs float64, ratio rule vs timm's path in the
    weight's dtype."""
    def leaves(cast):
        return [cast(t).requires_grad_() if t is not None else None for t in params]

    ours, hi, pt = leaves(lambda t: t.detach().clone()), leaves(lambda t: t.detach().double()), leaves(
        lambda t: t.detach().clone())
    float_images = images.is_floating_point()
    imgs = [images.clone().requires_grad_(image_grad and float_images),
            (images.double() if float_images else images).requires_grad_(image_grad and float_images),
            images.clone().requires_grad_(image_grad and float_images)]
    out = patch_embed(imgs[0], *ours, no_embed_class=no_embed_class, **norm)
    ref = patch_embed_ref(imgs[1], *hi, no_embed_class=no_embed_class, upcast=True, **norm)
    out_pt = patch_embed_ref(imgs[2], *pt, no_embed_class=no_embed_class, **norm)
    assert out.shape == ref.shape and out.dtype == out_pt.dtype
    assert_close_ratio(out, ref, out_pt)
    g = torch.randn_like(ref)
    for o in (out, ref, out_pt):
        o.backward(g.to(o.dtype))
    names = ["weight", "bias", "pos_embed", "prefix_tokens"]
    for name, a, b, c in zip(names, ours, hi, pt, strict=True):
        if a is not None:
            assert_close_ratio(a.grad, b.grad, c.grad.to(a.grad.dtype), ratio=GRAD_RATIO, name=f"d{name}")
    if image_grad and float_images:
        assert_close_ratio(imgs[0].grad, imgs[1].grad, imgs[2].grad, ratio=GRAD_RATIO, name="dimages")
