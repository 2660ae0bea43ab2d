"""The tolerance rule for fused kernels, shared by the tests and the GPU check (from FlashAttention's tests).

A kernel's error against a high-precision reference must be at most `ratio` times the error of the same PyTorch
computation done in the kernel's dtype, plus a floor: 2x for outputs, 3x for gradients. The floor is FlashAttention 3's
arithmetic noise, 2 * max|(ref + 0.3 - 0.3) - ref| in the kernel's dtype, plus 2 units in the last place of max|ref|:
a kernel that rounds its intermediates in another order than PyTorch's fused CPU kernels lands a few ulps away on
tiny reductions (seen: LayerNorm over D=3 in float32, 3 ulps vs PyTorch's 1), which is arithmetic noise, not a bug.
"""

from __future__ import annotations

import torch
from torch import Tensor

OUTPUT_RATIO = 2.0
GRAD_RATIO = 3.0


def noise_floor(ref: Tensor, dtype: torch.dtype) -> float:
    if ref.numel() == 0:
        return 0.0
    r = ref.to(dtype)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    return 2.0 * ((r + 0.3 - 0.3) - r).abs().max().item() + 2.0 * ulp


def ratio_error(out: Tensor, ref: Tensor, out_torch: Tensor, *, ratio: float = OUTPUT_RATIO,
                floor: float | None = None) -> tuple[float, float, float]:
    """(kernel error, allowed error, PyTorch-in-dtype error), errors as max |x - ref| in float64."""
    if out.shape != ref.shape or out_torch.shape != ref.shape:
        raise ValueError(f"shapes differ: out {tuple(out.shape)}, out_torch {tuple(out_torch.shape)}, "
                         f"ref {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0, 0.0, 0.0
    ref64 = ref.detach().double()
    err = (out.detach().double() - ref64).abs().max().item()
    err_torch = (out_torch.detach().double() - ref64).abs().max().item()
    if floor is None:
        floor = noise_floor(ref64, out.dtype)
    return err, ratio * err_torch + floor, err_torch


def assert_close_ratio(out: Tensor, ref: Tensor, out_torch: Tensor, *, ratio: float = OUTPUT_RATIO,
                       floor: float | None = None, name: str = "output") -> None:
    """Assert out is within `ratio` x (PyTorch's own error in out's dtype) + floor of the high-precision ref."""
    err, allowed, err_torch = ratio_error(out, ref, out_torch, ratio=ratio, floor=floor)
    if not torch.isfinite(torch.tensor(err)) or err > allowed:
        raise AssertionError(f"{name}: max error {err:.3e} exceeds {allowed:.3e} "
                             f"({ratio} x PyTorch's {err_torch:.3e} + floor) in {out.dtype}")


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while fn() runs (parameters excluded): the
    activation memory a forward keeps. Shared by the MLP tests and benchmarks."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
