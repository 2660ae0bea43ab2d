"""Shared attention test helper: the float64 comparison of deit_fast.ops.attention, output and dq/dk/dv."""

import torch

from deit_fast.ops import attention, attention_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio


def check_against_reference(qkv, num_heads, scale=None):
    """Output and dqkv of deit_fast.ops.attention vs float64 timm math, ratio rule vs PyTorch in qkv's dtype."""
    leaf = qkv.detach().clone().requires_grad_()
    leaf_hi = qkv.detach().double().requires_grad_()
    leaf_pt = qkv.detach().clone().requires_grad_()
    out = attention(leaf, num_heads, scale)
    out_hi = attention_ref(leaf_hi, num_heads, scale, upcast=True)
    out_pt = attention_ref(leaf_pt, num_heads, scale)
    assert out.shape == (qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3) and out.dtype == qkv.dtype
    assert_close_ratio(out, out_hi, out_pt, name="out")
    g = torch.randn_like(out)
    out.backward(g)
    out_hi.backward(g.double())
    out_pt.backward(g)
    assert leaf.grad.shape == qkv.shape
    for name, sl in (("dq", slice(0, 1)), ("dk", slice(1, 2)), ("dv", slice(2, 3))):
        def part(t, sl=sl):
            return t.view(*t.shape[:2], 3, -1)[:, :, sl]

        assert_close_ratio(part(leaf.grad), part(leaf_hi.grad), part(leaf_pt.grad), ratio=GRAD_RATIO, name=name)
