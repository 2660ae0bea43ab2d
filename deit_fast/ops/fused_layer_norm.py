"""LayerNorm and residual-add + LayerNorm, fused, forward and backward.

    layer_norm(x, weight, bias, eps)               y = (x - mean) * rstd * weight + bias
    add_layer_norm(x, residual, weight, bias, eps) s = x + residual;  y = layer_norm(s)  ->  (s, y)

over the last dimension D, with mean = sum(s) / D, var = sum((s - mean)^2) / D, rstd = 1 / sqrt(var + eps), all in
float32 whatever the input dtype. The sum s is rounded to the input dtype before it is normalized, so the fused op is
exactly `layer_norm(x + residual)` of the unfused PyTorch code.

Backward, with xhat = (s - mean) * rstd and g = dy * weight:
    ds = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dsum      (dx = dresidual = ds)
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
The forward saves s (or x), mean and rstd (8 bytes a row); the backward recomputes xhat from them.

Bytes, per element of a (rows, D) tensor in a 2-byte dtype: unfused, the add reads 2 and writes 1 tensor, then the
LayerNorm reads 1 and writes 1 (10 bytes); fused, 2 reads and 2 writes (8 bytes). Backward: unfused, LayerNorm's
backward reads dy and s and writes ds, then autograd adds dsum (read 2, write 1): 12 bytes; fused, 8 bytes.
dweight/dbias are reduced deterministically: each program or block writes a (D,) partial and a second pass sums
the partials in a fixed order (no atomics).

Limits of the fused kernels (other inputs run the PyTorch reference, see `deit_fast._backend`): float32, float16 and
bfloat16 inputs; D up to 8192; weight and bias of any float dtype (they are read as float32). Any number of rows,
any leading shape; non-contiguous inputs are copied to contiguous ones first.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import _backend

MAX_D = 8192
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the specification. Tests and benchmarks import these.


def layer_norm_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6, *,
                   upcast: bool = False) -> Tensor:
    """LayerNorm over the last dimension. upcast=True computes in float64 and returns float64 (the yardstick the
    tests measure errors against); otherwise it computes as PyTorch does in x's dtype (float32 statistics) and
    returns x's dtype."""
    shape = (x.shape[-1],)
    if upcast:
        w = weight.double() if weight is not None else None
        b = bias.double() if bias is not None else None
        return F.layer_norm(x.double(), shape, w, b, eps)
    if (weight is not None and weight.dtype != x.dtype) or (bias is not None and bias.dtype != x.dtype):
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        return F.layer_norm(x.float(), shape, w, b, eps).to(x.dtype)
    return F.layer_norm(x, shape, weight, bias, eps)


def add_layer_norm_ref(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6,
                       *, upcast: bool = False) -> tuple[Tensor, Tensor]:
    """(x + residual, layer_norm(x + residual)); upcast=True adds and normalizes in float64."""
    s = x.double() + residual.double() if upcast else x + residual
    return s, layer_norm_ref(s, weight, bias, eps, upcast=upcast)


# ----------------------------------------------------------------------------------------------------------------
# The reference backend: PyTorch's own kernels, returning the statistics the backward needs.


def _forward_reference(x, residual, weight, bias, eps):
    s = x + residual if residual is not None else x
    mixed = (weight is not None and weight.dtype != s.dtype) or (bias is not None and bias.dtype != s.dtype)
    inp = s.float() if mixed else s
    w = weight.to(inp.dtype) if weight is not None else None
    b = bias.to(inp.dtype) if bias is not None else None
    y, mean, rstd = torch.native_layer_norm(inp, (s.shape[-1],), w, b, eps)
    stat_shape = s.shape[:-1]
    sum_out = s if residual is not None else x.new_empty(0)
    return y.to(x.dtype), sum_out, mean.float().reshape(stat_shape), rstd.float().reshape(stat_shape)


def _backward_reference(dy, dsum, s, weight, mean, rstd):
    mixed = weight is not None and weight.dtype != s.dtype
    inp = s.float() if mixed else s
    w = weight.to(inp.dtype) if weight is not None else None
    stat_shape = (*s.shape[:-1], 1)
    # aten computes dbias only when given a bias; its values do not enter any gradient.
    zero_bias = torch.zeros(s.shape[-1], dtype=inp.dtype, device=s.device)
    ds, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(inp.dtype), inp, (s.shape[-1],), mean.to(inp.dtype).reshape(stat_shape),
        rstd.to(inp.dtype).reshape(stat_shape), w, zero_bias, (True, w is not None, True))
    ds = ds.to(s.dtype)
    if dsum is not None:
        ds = ds + dsum
    param_dtype = weight.dtype if weight is not None else s.dtype
    dw = dw.to(param_dtype) if dw is not None else torch.zeros(s.shape[-1], dtype=param_dtype, device=s.device)
    return ds, dw, db.to(param_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. One program normalizes ROWS rows of up to BLOCK_D (a power of two >= D) columns held in registers;
# columns past D are masked. Statistics in float32, two passes over the registers.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _layer_norm_fwd_kernel(
        X,  # (M, D) input, contiguous
        RES,  # (M, D) residual, same dtype as X (unused unless HAS_RESIDUAL)
        W,  # (D,) float32 weight
        B,  # (D,) float32 bias
        Y,  # (M, D) output, X's dtype
        S,  # (M, D) x + residual, X's dtype (written only if HAS_RESIDUAL)
        MEAN,  # (M,) float32
        RSTD,  # (M,) float32
        M,
        D,
        eps,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < M
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(RES + offsets, mask=mask, other=0.0)
            # Round the sum to the input dtype, as `x + residual` in PyTorch does, before normalizing it.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + offsets, x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        # Masked columns are 0 in x but must not count as (0 - mean)^2.
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        w = tl.load(W + cols, mask=col_mask, other=0.0)
        b = tl.load(B + cols, mask=col_mask, other=0.0)
        y = centered * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        DY,  # (M, D) gradient of the output, S's dtype
        DSUM,  # (M, D) gradient of the sum output (unused unless HAS_DSUM)
        S,  # (M, D) the normalized input: x, or x + residual
        W,  # (D,) float32 weight
        MEAN,  # (M,) float32
        RSTD,  # (M,) float32
        DS,  # (M, D) gradient of S, S's dtype
        DW_PARTIAL,  # (programs, D) float32: this program's sum of dy * xhat
        DB_PARTIAL,  # (programs, D) float32: this program's sum of dy
        M,
        D,
        rows_per_program,  # a multiple of ROWS; program p owns rows [p * rows_per_program, (p + 1) * rows_per_program)
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        HAS_DSUM: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        w = tl.load(W + cols, mask=col_mask, other=0.0)
        dw = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        db = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        first_row = pid * rows_per_program
        for start in range(0, rows_per_program, ROWS):
            rows = first_row + start + tl.arange(0, ROWS)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
            s = tl.load(S + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / D
            c2 = tl.sum(g, axis=1) / D
            ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DSUM:
                ds += tl.load(DSUM + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + offsets, ds.to(DS.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(DW_PARTIAL + pid * D + cols, tl.sum(dw, axis=0), mask=col_mask)
        tl.store(DB_PARTIAL + pid * D + cols, tl.sum(db, axis=0), mask=col_mask)


def triton_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) for a row width D: about 2048 elements a program, 4 warps; wide rows get 8 or 16
    warps (16 at 4096: with 8, ptxas spills the float32 add+LayerNorm forward on sm_80, found by deit_fast.aot)."""
    block_d = max(128, 1 << (D - 1).bit_length())
    rows = max(1, 2048 // block_d)
    num_warps = {2048: 8, 4096: 16, 8192: 16}.get(block_d, 4)
    return block_d, rows, num_warps


# Every configuration the launchers can use (D <= MAX_D): the ahead-of-time compilation test compiles each of them.
TRITON_CONFIGS = sorted({triton_config(d) for d in (2**k for k in range(0, MAX_D.bit_length()))})


def aot_cases(capability: int):
    """(name, kernel, signature, constexprs, num_warps, aligned args) for every kernel configuration the launchers
    can use (the same on every architecture); `python -m deit_fast.aot` compiles each of them."""
    for dtype in ("fp32", "fp16", "bf16"):
        t = f"*{dtype}"
        fwd_sig = {"X": t, "RES": t, "W": "*fp32", "B": "*fp32", "Y": t, "S": t, "MEAN": "*fp32", "RSTD": "*fp32",
                   "M": "i32", "D": "i32", "eps": "fp32", "BLOCK_D": "constexpr", "ROWS": "constexpr",
                   "HAS_RESIDUAL": "constexpr"}
        bwd_sig = {"DY": t, "DSUM": t, "S": t, "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "DS": t,
                   "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "M": "i32", "D": "i32", "rows_per_program": "i32",
                   "BLOCK_D": "constexpr", "ROWS": "constexpr", "HAS_DSUM": "constexpr"}
        fwd_aligned = ("X", "RES", "W", "B", "Y", "S", "MEAN", "RSTD", "D")
        bwd_aligned = ("DY", "DSUM", "S", "W", "MEAN", "RSTD", "DS", "DW_PARTIAL", "DB_PARTIAL", "D")
        for block_d, rows, num_warps in TRITON_CONFIGS:
            for flag in (False, True):
                yield (f"layer_norm_fwd-{dtype}-{block_d}x{rows}-residual{int(flag)}", _layer_norm_fwd_kernel,
                       fwd_sig, {"BLOCK_D": block_d, "ROWS": rows, "HAS_RESIDUAL": flag}, num_warps, fwd_aligned)
                yield (f"layer_norm_bwd-{dtype}-{block_d}x{rows}-dsum{int(flag)}", _layer_norm_bwd_kernel, bwd_sig,
                       {"BLOCK_D": block_d, "ROWS": rows, "HAS_DSUM": flag}, num_warps, bwd_aligned)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


@functools.cache
def _ones_and_zeros(D: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.ones(D, dtype=torch.float32, device=device), torch.zeros(D, dtype=torch.float32, device=device)


def _float_params(weight, bias, D, device):
    ones, zeros = _ones_and_zeros(D, device)
    w = weight.float().contiguous() if weight is not None else ones
    b = bias.float().contiguous() if bias is not None else zeros
    return w, b


def _forward_triton(x, residual, weight, bias, eps):
    D = x.shape[-1]
    x2 = x.contiguous().view(-1, D)
    M = x2.shape[0]
    res2 = residual.contiguous().view(-1, D) if residual is not None else x2
    w, b = _float_params(weight, bias, D, x.device)
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else x2.new_empty(0)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_d, rows, num_warps = triton_config(D)
    if M > 0:
        _layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](
            x2, res2, w, b, y, s if residual is not None else y, mean, rstd, M, D, eps,
            BLOCK_D=block_d, ROWS=rows, HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    stat_shape = x.shape[:-1]
    s_out = s.view(x.shape) if residual is not None else s
    return y.view(x.shape), s_out, mean.view(stat_shape), rstd.view(stat_shape)


def _backward_triton(dy, dsum, s, weight, mean, rstd):
    D = s.shape[-1]
    s2 = s.contiguous().view(-1, D)
    M = s2.shape[0]
    # Gradients can be expanded views (stride 0): make the rows dense.
    dy2 = dy.contiguous().view(-1, D)
    dsum2 = dsum.contiguous().view(-1, D) if dsum is not None else dy2
    w, _ = _float_params(weight, None, D, s.device)
    block_d, rows, num_warps = triton_config(D)
    programs = max(1, min(triton.cdiv(M, rows), 2 * _sm_count(s.device)))
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), programs), rows) * rows
    programs = max(1, triton.cdiv(M, rows_per_program))
    ds = torch.empty_like(s2)
    partial = torch.zeros((2, programs, D), dtype=torch.float32, device=s.device)
    if M > 0:
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dsum2, s2, w, mean.contiguous().view(-1), rstd.contiguous().view(-1), ds, partial[0], partial[1],
            M, D, rows_per_program, BLOCK_D=block_d, ROWS=rows, HAS_DSUM=dsum is not None, num_warps=num_warps)
    # Fixed-order sums of the partials: deterministic. Separate tensors: custom-op outputs must not alias.
    param_dtype = weight.dtype if weight is not None else s.dtype
    return ds.view(s.shape), partial[0].sum(0).to(param_dtype), partial[1].sum(0).to(param_dtype)


def _triton_supports(x, *args) -> str | None:
    if x.dtype not in FUSED_DTYPES:
        return f"x has dtype {x.dtype}; the Triton kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if x.shape[-1] > MAX_D:
        return f"the last dimension is {x.shape[-1]}; the Triton kernels take at most {MAX_D}"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly; bfloat16 kernels are tested on GPU only"
    return None


# ----------------------------------------------------------------------------------------------------------------
# CUDA C++ kernels (csrc/layer_norm), registered by deit_fast._C as torch.ops.deit_fast_cuda.*


def _forward_cuda(x, residual, weight, bias, eps):
    return tuple(torch.ops.deit_fast_cuda.layer_norm_fwd(x, residual, weight, bias, eps))


def _backward_cuda(dy, dsum, s, weight, mean, rstd):
    return tuple(torch.ops.deit_fast_cuda.layer_norm_bwd(dy, dsum, s, weight, mean, rstd))


def _cuda_supports(x, *args) -> str | None:
    if x.dtype not in FUSED_DTYPES:
        return f"x has dtype {x.dtype}; the CUDA kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if x.shape[-1] > MAX_D:
        return f"the last dimension is {x.shape[-1]}; the CUDA kernels take at most {MAX_D}"
    return None


# Preference on CUDA tensors: the CUDA C++ kernels first (one warp per DeiT-width row, exact-fit 16-byte vectors),
# Triton second. Not yet measured on a GPU: benchmarks/gpu_check reports both side by side, and this order is to be
# set from its results.
_backend.register(_backend.Op(
    name="layer_norm",
    reference=_backend.Impl(_forward_reference, _backward_reference),
    triton=_backend.Impl(_forward_triton, _backward_triton, _triton_supports) if triton is not None else None,
    cuda=_backend.Impl(_forward_cuda, _backward_cuda, _cuda_supports),
))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), with fake implementations and an autograd formula.


@torch.library.custom_op("deit_fast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                    eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, impl = _backend.choose("layer_norm", x, residual, weight, bias, eps)
    y, s, mean, rstd = impl.forward(x, residual, weight, bias, eps)
    # custom ops may not return their inputs or views of them
    return y, (s if residual is not None else x.new_empty(0)), mean, rstd


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), s, stats, torch.empty_like(stats)


@torch.library.custom_op("deit_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, dsum: Tensor | None, s: Tensor, weight: Tensor | None, mean: Tensor,
                    rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _, impl = _backend.choose("layer_norm", s, dsum, weight, None, 0.0)
    return impl.backward(dy, dsum, s, weight, mean, rstd)


@_layer_norm_bwd.register_fake
def _(dy, dsum, s, weight, mean, rstd):
    param_dtype = weight.dtype if weight is not None else s.dtype
    dw = s.new_empty(s.shape[-1], dtype=param_dtype)
    return torch.empty_like(s, memory_format=torch.contiguous_format), dw, torch.empty_like(dw)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dsum, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = _layer_norm_bwd(dy, dsum if ctx.has_residual else None, s, weight, mean, rstd)
    return (ds, ds if ctx.has_residual else None, dw if weight is not None else None, db if ctx.has_bias else None,
            None)


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions


def _validate(x, residual, weight, bias, eps) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalize over, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.shape != (D,):
            raise ValueError(f"{name} must have shape ({D},) to match x's last dimension, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {p.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _eager_reference(*args) -> bool:
    """In eager mode the reference runs as plain PyTorch with its own autograd: the custom op's Python dispatch
    costs ~90 us a call (measured on this project's 2-core CPU machine), more than a small LayerNorm itself. Under
    torch.compile the custom op is kept so that the graph has the same op whatever the backend."""
    return not torch.compiler.is_compiling() and _backend.choose("layer_norm", *args)[0] == "reference"


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dimension of x.

    Args:
        x: (..., D) float32, float16 or bfloat16 (float64 runs the reference).
        weight: (D,) or None (no scale); any float dtype, used in float32.
        bias: (D,) or None (no shift); any float dtype, used in float32.
        eps: added to the variance (timm's and DeiT's 1e-6 by default).
    Returns:
        (..., D) in x's dtype, contiguous.
    """
    _validate(x, None, weight, bias, eps)
    if _eager_reference(x, None, weight, bias, eps):
        return layer_norm_ref(x, weight, bias, eps)
    return _layer_norm_fwd(x, None, weight, bias, float(eps))[0]


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The residual add and the LayerNorm after it, in one pass.

    Args:
        x, residual: (..., D), the same shape and dtype (float32, float16 or bfloat16).
        weight, bias, eps: as in `layer_norm`.
    Returns:
        (x + residual, layer_norm(x + residual)), both (..., D) in x's dtype. Gradients flow to x and residual
        through both outputs.
    """
    _validate(x, residual, weight, bias, eps)
    if _eager_reference(x, residual, weight, bias, eps):
        return add_layer_norm_ref(x, residual, weight, bias, eps)
    y, s, _, _ = _layer_norm_fwd(x, residual, weight, bias, float(eps))
    return s, y
