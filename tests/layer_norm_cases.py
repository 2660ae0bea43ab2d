"""Shared LayerNorm test helpers: inputs, the op and the references under autograd, the float64 comparison."""

import torch

from deit_fast.ops import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio


def make_inputs(rows, D, dtype, device="cpu", residual=True, affine=True):
    x = torch.randn(rows, D, dtype=dtype, device=device) * 2 + 0.5
    r = torch.randn(rows, D, dtype=dtype, device=device) if residual else None
    w = torch.randn(D, dtype=torch.float32, device=device) * 0.5 + 1 if affine else None
    b = torch.randn(D, dtype=torch.float32, device=device) * 0.1 if affine else None
    return x, r, w, b


def run_op(x, r, w, b, eps=1e-6):
    """(outputs, grads) of the op under test for fixed random output gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    xl, rl, wl, bl = leaves
    if r is None:
        outs = (layer_norm(xl, wl, bl, eps),)
    else:
        outs = add_layer_norm(xl, rl, wl, bl, eps)
    return outs, leaves


def run_ref(x, r, w, b, eps=1e-6, upcast=False):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    xl, rl, wl, bl = leaves
    if r is None:
        outs = (layer_norm_ref(xl, wl, bl, eps, upcast=upcast),)
    else:
        outs = add_layer_norm_ref(xl, rl, wl, bl, eps, upcast=upcast)
    return outs, leaves


def check_against_reference(x, r, w, b):
    """Outputs and all gradients of the op vs float64, within the ratio rule of PyTorch in x's dtype."""
    outs, leaves = run_op(x, r, w, b)
    outs_hi, leaves_hi = run_ref(x, r, w, b, upcast=True)
    outs_pt, leaves_pt = run_ref(x, r, w, b)
    names = ["y"] if r is None else ["sum", "y"]
    grads_out = [torch.randn_like(o) for o in outs]
    for name, o, o_hi, o_pt in zip(names, outs, outs_hi, outs_pt, strict=True):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert_close_ratio(o, o_hi, o_pt, name=name)
    torch.autograd.backward(outs, grads_out)
    torch.autograd.backward(outs_hi, [g.double() for g in grads_out])
    torch.autograd.backward(outs_pt, grads_out)
    for name, leaf, hi, pt in zip(["dx", "dresidual", "dweight", "dbias"], leaves, leaves_hi, leaves_pt, strict=True):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype
        assert_close_ratio(leaf.grad, hi.grad, pt.grad, ratio=GRAD_RATIO, name=name)
