"""Attention straight from the qkv projection's layout, forward and backward.

    attention(qkv, num_heads, scale) -> out
    qkv: (B, N, 3*H*D), the qkv Linear's output as it comes; q, k, v of head h are the columns
         [h*D, (h+1)*D) of the blocks [0, C), [C, 2C), [2C, 3C) with C = H*D (timm's reshape(B, N, 3, H, D)).
    out: (B, N, H*D), head h in columns [h*D, (h+1)*D): ready for the proj Linear.
    out_h = softmax(q_h k_h^T * scale) v_h,   scale = D**-0.5 by default.

timm reshapes and permutes qkv into (3, B, H, N, D) before attention and the output back into (B, N, C) after it,
in forward and again in backward: a copy of 3C and one of C elements a token each way. Here the kernels read q, k, v
and write out and dqkv at their packed positions (row stride 3C or C), so those copies do not exist.

Forward (per program: BLOCK_M queries of one (batch, head)): s = q k^T * scale * log2(e), softmax in base 2 in float32,
p cast to the input dtype for p @ v (FlashAttention's rule), the log-sum-exp (base 2) saved for backward.
Short sequences (N <= 256, ViT/DeiT at 224 px has N = 197/198) take all keys in one tile: no online-softmax rescaling.
Longer ones run the online softmax over key blocks of BLOCK_N.
Backward, with P recomputed from the saved log-sum-exp and delta = rowsum(dout * out):
    dv = P^T dout,  dp = dout v^T,  ds = P * (dp - delta),  dq = ds k * scale,  dk = ds^T q * scale.
Two kernels, one owning a key block (dk, dv), one a query block (dq): every element of dqkv is written by exactly one
program, so the gradients are deterministic with no atomics.

Limits of the fused kernels (other inputs run the PyTorch reference): head dim 32, 64 or 128; float16 and bfloat16 on
GPUs (float32 too under the interpreter, where the tests run it); any N >= 1; no attention mask and no attention
dropout (the Attention module runs timm's path for those).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import _backend

HEAD_DIMS = (32, 64, 128)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ONE_TILE_MAX_N = 256
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Reference: the specification.


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v), each (B, H, N, D), views of the packed (B, N, 3*H*D) tensor in timm's order."""
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    return qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def attention_ref(qkv: Tensor, num_heads: int, scale: float | None = None, *, upcast: bool = False) -> Tensor:
    """Attention on packed qkv as timm computes it. upcast=True: timm's explicit path (q*scale @ k^T, softmax, @ v)
    in float64, returned as float64 (the tests' yardstick); otherwise F.scaled_dot_product_attention in qkv's
    dtype (timm's default fused path)."""
    q, k, v = split_qkv(qkv.double() if upcast else qkv, num_heads)
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    if upcast:
        out = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, H * D)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _attn_fwd_kernel(
        QKV,  # (B, N, 3*H*HEAD_DIM) packed q | k | v, contiguous
        OUT,  # (B, N, H*HEAD_DIM)
        LSE,  # (B*H, N) float32: log2 of the softmax denominator, in units of the scaled base-2 scores
        N,
        H,
        qk_scale,  # scale * log2(e)
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ONE_TILE: tl.constexpr,  # N <= BLOCK_N: every key in one tile, no online rescaling
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), "tf32" (ignored) for 16-bit
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        C = H * HEAD_DIM
        row_stride = 3 * C
        q_base = QKV + b.to(tl.int64) * N * row_stride + h * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < N
        # Rows past N load zeros: their scores are finite, they are never stored.
        q = tl.load(q_base + offs_m[:, None] * row_stride + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        if ONE_TILE:
            n_mask = offs_n < N
            kv_offsets = offs_n[:, None] * row_stride + offs_d[None, :]
            k = tl.load(q_base + C + kv_offsets, mask=n_mask[:, None], other=0.0)
            v = tl.load(q_base + 2 * C + kv_offsets, mask=n_mask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_i = tl.max(s, axis=1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + offs_n
                n_mask = cols < N
                kv_offsets = cols[:, None] * row_stride + offs_d[None, :]
                k = tl.load(q_base + C + kv_offsets, mask=n_mask[:, None], other=0.0)
                v = tl.load(q_base + 2 * C + kv_offsets, mask=n_mask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                s = tl.where(n_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
        acc = acc / l_i[:, None]
        out_base = OUT + b.to(tl.int64) * N * C + h * HEAD_DIM
        tl.store(out_base + offs_m[:, None] * C + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=m_mask[:, None])
        tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_mask)

    @triton.jit
    def _attn_bwd_delta_kernel(
        OUT,  # (B, N, H*HEAD_DIM)
        DOUT,  # (B, N, H*HEAD_DIM), contiguous
        DELTA,  # (B*H, N) float32: rowsum(dout * out) per head
        N,
        H,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        C = H * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < N
        offsets = b.to(tl.int64) * N * C + h * HEAD_DIM + offs_m[:, None] * C + offs_d[None, :]
        o = tl.load(OUT + offsets, mask=m_mask[:, None], other=0.0).to(tl.float32)
        do = tl.load(DOUT + offsets, mask=m_mask[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, axis=1), mask=m_mask)

    @triton.jit
    def _attn_bwd_scores(q, k, v, do, lse, delta, valid, qk_scale, DOT_PRECISION: tl.constexpr):
        """P recomputed from the saved log-sum-exp (zero where not `valid`) and dS = P * (dout v^T - delta), for a
        (queries x keys) tile."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        QKV,  # (B, N, 3C) packed input
        DOUT,  # (B, N, C), contiguous
        LSE,  # (B*H, N) float32, base 2
        DELTA,  # (B*H, N) float32
        DQKV,  # (B, N, 3C): this kernel writes the k and v blocks
        N,
        H,
        sm_scale,
        qk_scale,  # sm_scale * log2(e)
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        C = H * HEAD_DIM
        row_stride = 3 * C
        base = b.to(tl.int64) * N * row_stride + h * HEAD_DIM
        dout_base = DOUT + b.to(tl.int64) * N * C + h * HEAD_DIM
        stats_base = bh.to(tl.int64) * N
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        n_mask = offs_n < N
        kv_offsets = offs_n[:, None] * row_stride + offs_d[None, :]
        k = tl.load(QKV + base + C + kv_offsets, mask=n_mask[:, None], other=0.0)
        v = tl.load(QKV + base + 2 * C + kv_offsets, mask=n_mask[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            rows = start_m + offs_m
            m_mask = rows < N
            q = tl.load(QKV + base + rows[:, None] * row_stride + offs_d[None, :], mask=m_mask[:, None], other=0.0)
            do = tl.load(dout_base + rows[:, None] * C + offs_d[None, :], mask=m_mask[:, None], other=0.0)
            lse = tl.load(LSE + stats_base + rows, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + stats_base + rows, mask=m_mask, other=0.0)
            # Padding rows and columns must contribute nothing: their probabilities are zeroed.
            p, ds = _attn_bwd_scores(q, k, v, do, lse, delta, m_mask[:, None] & n_mask[None, :], qk_scale,
                                     DOT_PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dkv_ptrs = DQKV + base + kv_offsets
        tl.store(dkv_ptrs + C, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=n_mask[:, None])
        tl.store(dkv_ptrs + 2 * C, dv.to(DQKV.dtype.element_ty), mask=n_mask[:, None])

    @triton.jit
    def _attn_bwd_dq_kernel(
        QKV,  # (B, N, 3C) packed input
        DOUT,  # (B, N, C), contiguous
        LSE,  # (B*H, N) float32, base 2
        DELTA,  # (B*H, N) float32
        DQKV,  # (B, N, 3C): this kernel writes the q block
        N,
        H,
        sm_scale,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        C = H * HEAD_DIM
        row_stride = 3 * C
        base = b.to(tl.int64) * N * row_stride + h * HEAD_DIM
        stats_base = bh.to(tl.int64) * N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < N
        q = tl.load(QKV + base + offs_m[:, None] * row_stride + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        do = tl.load(DOUT + b.to(tl.int64) * N * C + h * HEAD_DIM + offs_m[:, None] * C + offs_d[None, :],
                     mask=m_mask[:, None], other=0.0)
        lse = tl.load(LSE + stats_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stats_base + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            n_mask = cols < N
            kv_offsets = cols[:, None] * row_stride + offs_d[None, :]
            k = tl.load(QKV + base + C + kv_offsets, mask=n_mask[:, None], other=0.0)
            v = tl.load(QKV + base + 2 * C + kv_offsets, mask=n_mask[:, None], other=0.0)
            _, ds = _attn_bwd_scores(q, k, v, do, lse, delta, n_mask[None, :], qk_scale, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.store(DQKV + base + offs_m[:, None] * row_stride + offs_d[None, :],
                 (dq * sm_scale).to(DQKV.dtype.element_ty), mask=m_mask[:, None])


def fwd_config(N: int, head_dim: int, capability: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, ONE_TILE, num_warps) for the forward on sm_<capability>.

    Chosen so that every configuration compiles without register spills (`python -m deit_fast.aot`): on sm_80 a
    64 x 256 score tile at head dim 64 spills with 4 or 8 warps, so there N > 128 runs the online-softmax path."""
    one_tile_max = ONE_TILE_MAX_N if capability >= 90 or head_dim != 64 else 128
    if N <= one_tile_max:
        block_n = max(16, 1 << (N - 1).bit_length())
        if capability >= 90:
            num_warps = 8 if block_n * head_dim >= 256 * 64 else 4
        else:
            num_warps = 8 if head_dim == 128 and block_n >= 128 else 4
        return 64, block_n, True, num_warps
    return 64, 64, False, 8 if head_dim == 128 else 4


def bwd_config(head_dim: int, capability: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps of the dk/dv kernel, num_warps of the dq kernel). sm_90 keeps 64-row query
    blocks so the products run on wgmma; sm_80 takes 32-row blocks, without spills."""
    if capability >= 90:
        num_warps = 4 if head_dim == 32 else 8
        return 64, 64, num_warps, num_warps
    return 32, 64, 8 if head_dim == 128 else 4, 4


def aot_cases(capability: int):
    """Every kernel configuration the launchers can use on sm_<capability>, for `python -m deit_fast.aot`.
    float32 is not launched on GPUs (see _triton_supports), so only float16 and bfloat16 are compiled."""
    for dtype in ("fp16", "bf16"):
        t = f"*{dtype}"
        for head_dim in HEAD_DIMS:
            configs = {fwd_config(n, head_dim, capability) for n in (1, 17, 33, 65, 129, 257)}
            for block_m, block_n, one_tile, num_warps in sorted(configs):
                sig = {"QKV": t, "OUT": t, "LSE": "*fp32", "N": "i32", "H": "i32", "qk_scale": "fp32",
                       "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                       "ONE_TILE": "constexpr", "DOT_PRECISION": "constexpr"}
                yield (f"attn_fwd-{dtype}-d{head_dim}-{block_m}x{block_n}{'-onetile' if one_tile else ''}",
                       _attn_fwd_kernel, sig, {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                               "ONE_TILE": one_tile, "DOT_PRECISION": "tf32"},
                       num_warps, ("QKV", "OUT", "LSE"))
            block_m, block_n, warps_dkdv, warps_dq = bwd_config(head_dim, capability)
            bwd_sig = {"QKV": t, "DOUT": t, "LSE": "*fp32", "DELTA": "*fp32", "DQKV": t, "N": "i32", "H": "i32",
                       "sm_scale": "fp32", "qk_scale": "fp32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"}
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": "tf32"}
            aligned = ("QKV", "DOUT", "LSE", "DELTA", "DQKV")
            yield (f"attn_bwd_dkdv-{dtype}-d{head_dim}", _attn_bwd_dkdv_kernel, bwd_sig, constexprs, warps_dkdv,
                   aligned)
            yield (f"attn_bwd_dq-{dtype}-d{head_dim}", _attn_bwd_dq_kernel, bwd_sig, constexprs, warps_dq, aligned)
            delta_sig = {"OUT": t, "DOUT": t, "DELTA": "*fp32", "N": "i32", "H": "i32", "HEAD_DIM": "constexpr",
                         "BLOCK_M": "constexpr"}
            yield (f"attn_bwd_delta-{dtype}-d{head_dim}", _attn_bwd_delta_kernel, delta_sig,
                   {"HEAD_DIM": head_dim, "BLOCK_M": 64}, 4, ("OUT", "DOUT", "DELTA"))


@functools.cache
def _capability(device: torch.device) -> int:
    """sm_XY as XY; the interpreter (CPU tensors) uses the sm_90 configurations."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _dims(qkv: Tensor, num_heads: int) -> tuple[int, int, int, int]:
    B, N, three_c = qkv.shape
    return B, N, num_heads, three_c // (3 * num_heads)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_triton(qkv, num_heads, scale):
    B, N, H, D = _dims(qkv, num_heads)
    qkv = qkv.contiguous()
    out = torch.empty(B, N, H * D, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(B * H, N, dtype=torch.float32, device=qkv.device)
    block_m, block_n, one_tile, num_warps = fwd_config(N, D, _capability(qkv.device))
    if B * N > 0:
        _attn_fwd_kernel[(triton.cdiv(N, block_m), B * H)](
            qkv, out, lse, N, H, scale * LOG2E, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile,
            DOT_PRECISION=_precision(qkv.dtype), num_warps=num_warps)
    return out, lse


def _backward_triton(dout, qkv, out, lse, num_heads, scale):
    B, N, H, D = _dims(qkv, num_heads)
    qkv = qkv.contiguous()
    dout = dout.contiguous()  # gradients can arrive as expanded views (stride 0)
    dqkv = torch.empty_like(qkv)
    if B * N == 0:
        return dqkv
    delta = torch.empty(B * H, N, dtype=torch.float32, device=qkv.device)
    _attn_bwd_delta_kernel[(triton.cdiv(N, 64), B * H)](out, dout, delta, N, H, HEAD_DIM=D, BLOCK_M=64, num_warps=4)
    block_m, block_n, warps_dkdv, warps_dq = bwd_config(D, _capability(qkv.device))
    args = (qkv, dout, lse, delta, dqkv, N, H, scale, scale * LOG2E)
    meta = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_precision(qkv.dtype))
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, block_n), B * H)](*args, **meta, num_warps=warps_dkdv)
    _attn_bwd_dq_kernel[(triton.cdiv(N, block_m), B * H)](*args, **meta, num_warps=warps_dq)
    return dqkv


def _triton_supports(qkv, num_heads, scale) -> str | None:
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim}; the Triton kernels take {HEAD_DIMS}"
    if qkv.dtype not in FUSED_DTYPES:
        return f"qkv has dtype {qkv.dtype}; the Triton kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly; bfloat16 kernels are tested on GPU only"
    if qkv.device.type == "cuda" and qkv.dtype == torch.float32:
        # Exact float32 products (no TF32, as PyTorch computes them) do not run on tensor cores in Triton:
        # PyTorch's own attention is the faster float32 path. The interpreter runs float32 to test the kernels.
        return "float32 attention runs PyTorch's scaled_dot_product_attention on GPUs"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The reference backend. It returns the same base-2 log-sum-exp as the Triton forward, so a backward run by either
# backend gets what it expects.


def _forward_reference(qkv, num_heads, scale):
    B, N, H, D = _dims(qkv, num_heads)
    q, k, _ = split_qkv(qkv, num_heads)
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)
    lse = (torch.logsumexp(scores, dim=-1) * LOG2E).reshape(B * H, N)
    return attention_ref(qkv, num_heads, scale), lse


def _backward_reference(dout, qkv, out, lse, num_heads, scale):
    # Explicit formulas (no autograd inside an op: it is traced below the autograd layer), in float32 for 16-bit.
    B, N, H, D = _dims(qkv, num_heads)
    compute = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
    q, k, v = (t.to(compute) for t in split_qkv(qkv, num_heads))
    do = dout.reshape(B, N, H, D).transpose(1, 2).to(compute)
    p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = (ds @ k) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    dqkv = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)  # (B, N, 3, H, D)
    return dqkv.reshape(B, N, 3 * H * D).to(qkv.dtype)


_backend.register(_backend.Op(
    name="attention",
    reference=_backend.Impl(_forward_reference, _backward_reference),
    triton=_backend.Impl(_forward_triton, _backward_triton, _triton_supports) if triton is not None else None,
    preference={"default": ("triton",)},
))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("deit_fast::attention_fwd", mutates_args=())
def _attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    _, impl = _backend.choose("attention", qkv, num_heads, scale)
    return impl.forward(qkv, num_heads, scale)


@_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    B, N, H, D = _dims(qkv, num_heads)
    return qkv.new_empty((B, N, H * D)), qkv.new_empty((B * H, N), dtype=torch.float32)


@torch.library.custom_op("deit_fast::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
    _, impl = _backend.choose("attention", qkv, num_heads, scale)
    return impl.backward(dout, qkv, out, lse, num_heads, scale)


@_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.save_for_backward(qkv, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _validate(qkv, num_heads, scale) -> None:
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3*num_heads*head_dim), got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"the last dimension of qkv ({qkv.shape[-1]}) must be a positive multiple of "
                         f"3 * num_heads = {3 * num_heads}")
    if not qkv.is_floating_point():
        raise ValueError(f"qkv must be a floating-point tensor, got dtype {qkv.dtype}")
    if not qkv.is_contiguous():
        raise ValueError("qkv must be contiguous, as the qkv Linear's output is (got strides "
                         f"{qkv.stride()}); call .contiguous() if it is a view")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def attention(qkv: Tensor, num_heads: int, scale: float | None = None) -> Tensor:
    """Multi-head self-attention on the packed output of the qkv Linear.

    Args:
        qkv: (B, N, 3*H*D) contiguous, float32/float16/bfloat16 (float64 runs the reference): q | k | v blocks, each
            H heads of D, as timm's `qkv` Linear produces them.
        num_heads: H.
        scale: multiplies q k^T; default D**-0.5.
    Returns:
        (B, N, H*D) in qkv's dtype, heads side by side (timm's layout before `proj`). The gradient with respect to
        qkv comes back packed the same way as qkv.
    """
    _validate(qkv, num_heads, scale)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = float(head_dim**-0.5 if scale is None else scale)
    if not torch.compiler.is_compiling() and _backend.choose("attention", qkv, num_heads, scale)[0] == "reference":
        return attention_ref(qkv, num_heads, scale)
    return _attention_fwd(qkv, num_heads, scale)[0]
