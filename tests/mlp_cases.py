"""Shared by the MLP tests on CPU and GPU: inputs for each variant and the ratio-rule check of the output and every
gradient against float64."""

import torch

from deit_fast.ops import mlp, mlp_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio

# residual, layer scale, drop-path factors, biases
VARIANTS = {
    "plain": dict(),
    "residual_droppath": dict(residual=True, sample_scale=True),
    "residual_layerscale_droppath": dict(residual=True, layer_scale=True, sample_scale=True),
    "no_bias_residual": dict(residual=True, bias=False),
}


def make_inputs(B, N, C, dtype, residual=False, layer_scale=False, sample_scale=False, bias=True, hidden=None,
                device="cpu"):
    H = hidden or 4 * C

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device, dtype)

    x = randn(B, N, C)
    w1, w2 = randn(H, C, scale=C**-0.5), randn(C, H, scale=H**-0.5)
    b1 = randn(H, scale=0.5) if bias else None
    b2 = randn(C, scale=0.5) if bias else None
    kwargs = {}
    if residual:
        kwargs["residual"] = randn(B, N, C)
    if layer_scale:
        kwargs["layer_scale"] = (torch.rand(C) + 0.1).to(device)
    if sample_scale:
        keep = 0.75
        kwargs["sample_scale"] = (torch.arange(B) % 2 == 0).float().div(keep).to(device)
    return (x, w1, b1, w2, b2), kwargs


def check(args, kwargs):
    """Output and every gradient vs float64, ratio rule vs PyTorch's own computation in the input dtype."""
    names = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    grad_names = names + [k for k in ("residual", "layer_scale") if k in kwargs]

    def leaves(cast):
        a = [cast(t).requires_grad_() if t is not None else None for t in args]
        k = {n: (cast(t).requires_grad_() if n in grad_names else cast(t)) for n, t in kwargs.items()}
        return a, k

    def grads(a, k):
        return [t for t in a if t is not None] + [k[n] for n in grad_names[len(names):]]

    a, k = leaves(lambda t: t.clone())
    a_hi, k_hi = leaves(lambda t: t.double())
    a_pt, k_pt = leaves(lambda t: t.clone())
    out = mlp(*a, **k)
    ref = mlp_ref(*a_hi, **k_hi, upcast=True)
    out_pt = mlp_ref(*a_pt, **k_pt)
    assert out.dtype == args[0].dtype and out.shape == ref.shape
    assert_close_ratio(out, ref, out_pt)
    dy = torch.randn_like(ref)
    for t, g in ((out, dy.to(out.dtype)), (ref, dy), (out_pt, dy.to(out_pt.dtype))):
        t.backward(g)
    present = [n for n, t in zip(names, args, strict=True) if t is not None] + grad_names[len(names):]
    for name, t, t_hi, t_pt in zip(present, grads(a, k), grads(a_hi, k_hi), grads(a_pt, k_pt), strict=True):
        assert t.grad is not None, name
        assert_close_ratio(t.grad, t_hi.grad, t_pt.grad.to(t.grad.dtype), ratio=GRAD_RATIO, name=f"d{name}")
