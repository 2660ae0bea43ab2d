"""The MLP half of a transformer block, fused into the epilogues of its GEMMs.

    z = x @ W1^T + b1                                     (M, H)   pre-activation, saved for the backward
    a = GELU(z) = z/2 * (1 + erf(z / sqrt(2)))           (M, H)   exact erf, as timm's nn.GELU
    o = a @ W2^T + b2                                     (M, C)
    y = residual + s[m // T] * gamma * o                  (M, C)   s: per-sample drop-path factor (0 or 1/keep) of the
                                                                   sample owning row m (T rows a sample); gamma: layer
                                                                   scale; each optional, as is the residual
Backward (dy the gradient of y):
    g = dy * s * gamma;  dW2 = g^T a,  db2 = sum_m g,  dgamma = sum_m dy * s * o,  dresidual = dy
    dz = (g @ W2) * GELU'(z),  GELU'(z) = Phi(z) + z phi(z)
    dW1 = dz^T x,  db1 = sum_m dz,  dx = dz @ W1

Four GEMM kernels launch from one Triton kernel with compile-time epilogues:
    forward  fc1: acc + b1 -> store z and GELU(z)             fc2: (acc + b2) * s * gamma + residual -> y (+ o)
    backward dgrad of fc2: acc * GELU'(z) -> dz (z read in the epilogue; the GELU derivative costs no pass)
             wgrad of fc2: g^T @ GELU(z), the GELU recomputed on the operand load (a is never stored), + db2 as
                           the row sums of the g^T operand
             wgrad of fc1: dz^T @ x, + db1 as the row sums of dz^T;   dgrad of fc1: dz @ W1
Weight gradients split the long reduction over M (B*N rows) into SPLIT_K float32 partials summed in a fixed order
afterwards (deterministic; no atomics), so that a (C, H) weight gradient fills the GPU.

Saved for the backward: x (the GEMM input, as timm's fc1 saves it), z in the compute dtype, and o only when a layer
scale needs its gradient. timm's Mlp saves x, z (GELU input) and a (fc2 input): 1 + 4 + 4 = 9 row-widths of C per
token at mlp_ratio 4, against 1 + 4 = 5 here (6 with layer scale, where timm's LayerScale saves o as well: 10).
Unfused, the elementwise work around the GEMMs (bias, GELU, layer scale, drop path, residual; dGELU, bias sums) is
about seven extra passes over (M, H) or (M, C) tensors forward and backward; here it costs none.

Programs are persistent (one per SM, looping over output tiles in grouped order for L2 reuse) and the set of tile
configurations is fixed per GPU architecture (`GEMM_CONFIGS`); all of it is compiled ahead of time in the tests
(`python -m deit_fast.aot`). On a GPU the first call at each GEMM shape times the Triton configurations and cuBLAS
(F.linear/torch.matmul, the epilogue as PyTorch ops: the bias in cuBLASLt's, GELU, dGELU and the scale + residual
one pass each) and keeps the fastest (`DEIT_FAST_MLP_GEMM=auto`, the default;
`triton` or `cublas` forces one). float16/bfloat16 run the kernels on GPUs; float32 runs cuBLAS there (Triton's exact
float32 dot has no tensor cores); float32 and float16 run the kernels under the interpreter in the tests.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import _backend

logger = logging.getLogger("deit_fast")

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEMM_ENV = "DEIT_FAST_MLP_GEMM"
GEMM_CHOICES = ("auto", "triton", "cublas")


# ----------------------------------------------------------------------------------------------------------------
# Reference: timm's Mlp + LayerScale + DropPath + residual, the specification.


def mlp_ref(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, *,
            residual: Tensor | None = None, layer_scale: Tensor | None = None, sample_scale: Tensor | None = None,
            upcast: bool = False) -> Tensor:
    """y = residual + sample_scale[b] * layer_scale * fc2(GELU(fc1(x))), in x's dtype (float64 with upcast=True)."""
    def cast(t):
        return t.double() if upcast and t is not None else t

    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = map(cast, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    o = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    if layer_scale is not None:
        o = o * cast(layer_scale)
    if sample_scale is not None:
        o = o * cast(sample_scale).view(-1, *([1] * (o.dim() - 1)))
    return o + cast(residual) if residual is not None else o


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    triton = None

# Epilogues of the GEMM kernel
EPI_STORE, EPI_BIAS_GELU, EPI_BIAS_SCALE_RESIDUAL, EPI_DGELU = 0, 1, 2, 3

if triton is not None:

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z):
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _mlp_gemm_kernel(
        A,  # (M, K) left operand, any strides
        B,  # (K, N) right operand, any strides (a transposed weight is a view)
        OUT,  # (SPLIT_K, M, N) contiguous: the result (float32 partials when SPLIT_K > 1)
        BIAS,  # (N,) added in the epilogue (HAS_BIAS)
        AUX,  # (M, N) contiguous: z, written by EPI_BIAS_GELU, read by EPI_DGELU; o, written when STORE_AUX
        LAYER_SCALE,  # (N,) gamma (HAS_LAYER_SCALE)
        SAMPLE_SCALE,  # (M // tokens,) per-sample drop-path factor (HAS_SAMPLE_SCALE)
        RESIDUAL,  # (M, N) contiguous, added last (HAS_RESIDUAL)
        ROW_SUM,  # (SPLIT_K, M) float32: sums of A's rows over this split's K range (HAS_ROW_SUM)
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn,
        tokens,  # rows per sample, for SAMPLE_SCALE
        k_per_split,  # a multiple of BLOCK_K
        EPILOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_LAYER_SCALE: tl.constexpr,
        HAS_SAMPLE_SCALE: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        STORE_AUX: tl.constexpr,
        B_GELU: tl.constexpr,  # apply GELU to B as it is loaded (B holds z; the product needs GELU(z))
        HAS_ROW_SUM: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles = tiles_m * tiles_n
        tiles_per_group = GROUP_M * tiles_n
        # Persistent: each program walks output tiles (and K splits) with a stride of the grid size.
        for work in range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0)):
            split = work // tiles
            tile = work % tiles
            # Grouped order: GROUP_M row tiles sweep the columns together, so B's column tiles stay in L2.
            first_m = (tile // tiles_per_group) * GROUP_M
            group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
            pid_m = first_m + (tile % tiles_per_group) % group_rows
            pid_n = (tile % tiles_per_group) // group_rows
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_mask = offs_m < M
            n_mask = offs_n < N
            k_start = split * k_per_split
            k_end = tl.minimum(k_start + k_per_split, K)
            a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
            b_cols = B + offs_n.to(tl.int64)[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0)
                b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :],
                            other=0.0)
                if B_GELU:
                    b = _gelu(b.to(tl.float32)).to(A.dtype.element_ty)
                if HAS_ROW_SUM:
                    row_sum += tl.sum(a.to(tl.float32), axis=1)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

            mask = m_mask[:, None] & n_mask[None, :]
            offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == 1:  # EPI_BIAS_GELU: the pre-activation for the backward, the activation for fc2
                tl.store(AUX + offsets, acc.to(AUX.dtype.element_ty), mask=mask)
                acc = _gelu(acc)
            if EPILOGUE == 2:  # EPI_BIAS_SCALE_RESIDUAL
                if STORE_AUX:
                    tl.store(AUX + offsets, acc.to(AUX.dtype.element_ty), mask=mask)
                if HAS_LAYER_SCALE:
                    acc *= tl.load(LAYER_SCALE + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                if HAS_SAMPLE_SCALE:
                    sample = tl.load(SAMPLE_SCALE + offs_m // tokens, mask=m_mask, other=0.0).to(tl.float32)
                    acc *= sample[:, None]
                if HAS_RESIDUAL:
                    acc += tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
            if EPILOGUE == 3:  # EPI_DGELU
                z = tl.load(AUX + offsets, mask=mask, other=0.0).to(tl.float32)
                acc *= _gelu_grad(z)
            tl.store(OUT + split * M * N + offsets, acc.to(OUT.dtype.element_ty), mask=mask)
            if HAS_ROW_SUM:
                if pid_n == 0:
                    tl.store(ROW_SUM + split * M + offs_m, row_sum, mask=m_mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the bounded set the dispatcher may launch on
# sm_<capability>, all compiled ahead of time in the tests. The first of each list is the default where nothing is
# measured (the interpreter; DEIT_FAST_MLP_GEMM=triton); on a GPU the first call at a shape times them all.
GEMM_CONFIGS = {
    90: [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
    80: [(128, 128, 32, 8, 8, 4), (128, 64, 32, 8, 4, 4), (64, 64, 64, 8, 4, 3)],
}
# The GEMMs of one MLP: name -> (epilogue flags). Used by the launchers and by aot_cases.
GEMM_KINDS = ("fc1_fwd", "fc2_fwd", "fc2_dgrad", "fc2_wgrad", "fc1_wgrad", "fc1_dgrad")


def _configs(capability: int):
    return GEMM_CONFIGS[90 if capability >= 90 else 80]


def _kind_flags(kind: str, has_bias: bool = True, residual: bool = True, layer_scale: bool = True,
                sample_scale: bool = True, store_aux: bool = True) -> dict:
    flags = dict(EPILOGUE=EPI_STORE, HAS_BIAS=False, HAS_LAYER_SCALE=False, HAS_SAMPLE_SCALE=False,
                 HAS_RESIDUAL=False, STORE_AUX=False, B_GELU=False, HAS_ROW_SUM=False)
    if kind == "fc1_fwd":
        flags.update(EPILOGUE=EPI_BIAS_GELU, HAS_BIAS=has_bias)
    elif kind == "fc2_fwd":
        flags.update(EPILOGUE=EPI_BIAS_SCALE_RESIDUAL, HAS_BIAS=has_bias, HAS_RESIDUAL=residual,
                     HAS_LAYER_SCALE=layer_scale, HAS_SAMPLE_SCALE=sample_scale, STORE_AUX=store_aux)
    elif kind == "fc2_dgrad":
        flags.update(EPILOGUE=EPI_DGELU)
    elif kind == "fc2_wgrad":
        flags.update(B_GELU=True, HAS_ROW_SUM=True)
    elif kind == "fc1_wgrad":
        flags.update(HAS_ROW_SUM=True)
    return flags


def aot_cases(capability: int):
    """Every configuration the launchers can use on sm_<capability>: each GEMM kind with its epilogue flags (DeiT's
    variants: with and without layer scale and drop path, with and without bias), each tile configuration, float16
    and bfloat16 (float32 runs cuBLAS on GPUs), split-K on and off for the weight gradients."""
    for dtype in ("fp16", "bf16"):
        t = f"*{dtype}"
        for config in _configs(capability):
            block_m, block_n, block_k, group_m, num_warps, num_stages = config
            variants = [("fc1_fwd", dict(has_bias=True)), ("fc1_fwd", dict(has_bias=False)),
                        ("fc2_fwd", dict(layer_scale=False, sample_scale=False, store_aux=False)),
                        ("fc2_fwd", dict(layer_scale=False, sample_scale=True, store_aux=False)),
                        ("fc2_fwd", dict(layer_scale=True, sample_scale=True, store_aux=True)),
                        ("fc2_fwd", dict(residual=False, layer_scale=False, sample_scale=False, store_aux=False)),
                        ("fc2_dgrad", {}), ("fc1_dgrad", {})]
            variants += [(kind, dict(split_k=split)) for kind in ("fc2_wgrad", "fc1_wgrad") for split in (1, 4)]
            for kind, options in variants:
                split_k = options.pop("split_k", 1)
                flags = _kind_flags(kind, **options)
                out_t = "*fp32" if split_k > 1 else t
                if kind == "fc2_fwd" and flags["HAS_RESIDUAL"]:
                    out_t = "*fp32"  # autocast training: the residual stream is float32
                sig = {"A": t, "B": t, "OUT": out_t, "BIAS": t, "AUX": t, "LAYER_SCALE": "*fp32",
                       "SAMPLE_SCALE": t, "RESIDUAL": "*fp32", "ROW_SUM": "*fp32", "M": "i32", "N": "i32",
                       "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
                       "tokens": "i32", "k_per_split": "i32"}
                # The JIT specializes unit strides as constants; the GEMMs' operands are rows or transposed rows.
                unit = {"fc1_fwd": ("stride_ak", "stride_bk"), "fc2_fwd": ("stride_ak", "stride_bk"),
                        "fc2_dgrad": ("stride_ak", "stride_bn"), "fc1_dgrad": ("stride_ak", "stride_bn"),
                        "fc2_wgrad": ("stride_am", "stride_bn"), "fc1_wgrad": ("stride_am", "stride_bn")}[kind]
                constexprs = {**flags, "SPLIT_K": split_k, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                              "GROUP_M": group_m, "DOT_PRECISION": "tf32"}
                for name in unit:
                    sig[name] = "constexpr"
                    constexprs[name] = 1
                for name, _value in constexprs.items():
                    sig[name] = "constexpr"
                aligned = tuple(n for n in ("A", "B", "OUT", "BIAS", "AUX", "LAYER_SCALE", "RESIDUAL", "ROW_SUM", "N",
                                            "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "k_per_split")
                                if sig[n] != "constexpr")
                variant = "-".join(f"{k.lower()}{int(v)}" for k, v in flags.items() if k != "EPILOGUE" and v)
                yield (f"mlp_{kind}-{dtype}-{block_m}x{block_n}x{block_k}-w{num_warps}s{num_stages}-split{split_k}"
                       f"{'-' + variant if variant else ''}", _mlp_gemm_kernel, sig, constexprs,
                       {"num_warps": num_warps, "num_stages": num_stages}, aligned)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


@functools.cache
def _capability(device: torch.device) -> int:
    """sm_XY as XY; the interpreter (CPU tensors) uses the sm_90 configurations."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_k(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """K splits so that (C, H)-sized weight gradients fill the GPU: about one tile per SM, each split at least
    four K blocks long, at most 16 splits."""
    return max(1, min(16, round(_sm_count(device) / max(tiles, 1)), K // (4 * block_k)))


def _launch(kind: str, config, a: Tensor, b: Tensor, out_dtype: torch.dtype, *, bias=None, aux=None, layer_scale=None,
            sample_scale=None, tokens: int = 1, residual=None, store_aux: bool = False, split: bool = False):
    """out = epilogue(a @ b) with the GEMM kind's epilogue; returns (out, row sums of a or None). `a` and `b` may
    be transposed views."""
    block_m, block_n, block_k, group_m, num_warps, num_stages = config
    M, K = a.shape
    N = b.shape[1]
    device = a.device
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = _split_k(tiles, K, block_k, device) if split else 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = max(1, triton.cdiv(K, k_per_split))
    flags = _kind_flags(kind, has_bias=bias is not None, residual=residual is not None,
                        layer_scale=layer_scale is not None, sample_scale=sample_scale is not None,
                        store_aux=store_aux)
    out = torch.empty((split_k, M, N) if split_k > 1 else (M, N), device=device,
                      dtype=torch.float32 if split_k > 1 else out_dtype)
    row_sum = torch.zeros((split_k, M), device=device, dtype=torch.float32) if flags["HAS_ROW_SUM"] else None
    if kind == "fc1_fwd":
        aux = torch.empty((M, N), device=device, dtype=a.dtype)
    elif kind == "fc2_fwd" and store_aux:
        aux = torch.empty((M, N), device=device, dtype=a.dtype)
    programs = min(tiles * split_k, _sm_count(device))
    if M * N > 0:
        _mlp_gemm_kernel[(programs,)](
            a, b, out, bias if bias is not None else out, aux if aux is not None else out,
            layer_scale if layer_scale is not None else out, sample_scale if sample_scale is not None else out,
            residual if residual is not None else out, row_sum if row_sum is not None else out,
            M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), tokens, k_per_split,
            SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            DOT_PRECISION=_precision(a.dtype), num_warps=num_warps, num_stages=num_stages, **flags)
    if split_k > 1:
        out = out.sum(0).to(out_dtype)  # fixed-order sum of the partials: deterministic
    if row_sum is not None:
        row_sum = row_sum.sum(0)
    return out, aux, row_sum


# --- choosing Triton or cuBLAS per GEMM shape, by measurement on the GPU ---

_CHOICES: dict[tuple, object] = {}


def gemm_mode() -> str:
    value = os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if value not in GEMM_CHOICES:
        raise ValueError(f"{GEMM_ENV}={value!r} is not one of {', '.join(GEMM_CHOICES)}")
    return value


def _time_ms(fn, repeat: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat


def _run(kind: str, shape: tuple, device: torch.device, dtype: torch.dtype, triton_fn, cublas_fn):
    """Run one GEMM of the MLP with the implementation chosen for its shape: Triton (a given tile configuration)
    or cuBLAS with the epilogue unfused."""
    mode = gemm_mode()
    if device.type != "cuda":
        return triton_fn(_configs(90)[0])
    if mode == "cublas" or dtype == torch.float32:
        return cublas_fn()
    configs = _configs(_capability(device))
    if mode == "triton":
        return triton_fn(configs[0])
    key = (kind, shape, dtype, device)
    choice = _CHOICES.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return triton_fn(configs[0])
        candidates = {config: functools.partial(triton_fn, config) for config in configs}
        candidates["cublas"] = cublas_fn
        times = {name: _time_ms(fn) for name, fn in candidates.items()}
        choice = _CHOICES[key] = min(times, key=times.get)
        logger.info("deit_fast mlp %s %s %s: %s (%s)", kind, shape, dtype, choice,
                    ", ".join(f"{k}: {v:.3f} ms" for k, v in times.items()))
    return cublas_fn() if choice == "cublas" else triton_fn(choice)


def gemm_choices() -> dict:
    """What the measurement chose so far: {(kind, (M, N, K), dtype, device): tile config or 'cublas'}."""
    return dict(_CHOICES)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _factor(layer_scale, sample_scale, tokens: int, C: int, device, dtype=torch.float32):
    """s[m // T] * gamma as a broadcastable (B, 1, C) / (B, 1, 1) / (C,) float32 tensor, or None."""
    factor = None
    if layer_scale is not None:
        factor = layer_scale.to(dtype)
    if sample_scale is not None:
        s = sample_scale.to(dtype).view(-1, 1, 1)
        factor = s if factor is None else s * factor
    return factor


def _forward_triton(x, w1, b1, w2, b2, residual, layer_scale, sample_scale):
    shape = x.shape
    x2 = _rows(x.contiguous())
    M, C = x2.shape
    H = w1.shape[0]
    tokens = M // sample_scale.shape[0] if sample_scale is not None and sample_scale.shape[0] else 1
    out_dtype = residual.dtype if residual is not None else x.dtype
    res2 = _rows(residual.contiguous()) if residual is not None else None
    ls = layer_scale.contiguous() if layer_scale is not None else None
    store_o = layer_scale is not None

    def fc1_cublas():
        z = F.linear(x2, w1, b1)
        return F.gelu(z), z, None

    a, z, _ = _run("fc1_fwd", (M, H, C), x.device, x.dtype,
                   lambda cfg: _launch("fc1_fwd", cfg, x2, w1.t(), x.dtype, bias=b1), fc1_cublas)

    def fc2_cublas():  # cuBLAS(Lt) adds the bias; scale and residual then take one pass (addcmul), not three
        o = F.linear(a, w2, b2)
        factor = _factor(ls, sample_scale, tokens, C, x.device)
        Co = o.shape[-1]
        if factor is not None and res2 is not None:
            y = torch.addcmul(res2.view(-1, tokens, Co), o.view(-1, tokens, Co), factor).view(M, Co)
        elif factor is not None:
            y = (o.view(-1, tokens, Co) * factor).view(M, Co)
        elif res2 is not None:
            y = res2 + o
        else:
            y = o
        return y.to(out_dtype), (o if store_o else None), None

    y, o, _ = _run("fc2_fwd", (M, w2.shape[0], H), x.device, x.dtype,
                   lambda cfg: _launch("fc2_fwd", cfg, a, w2.t(), out_dtype, bias=b2, layer_scale=ls,
                                       sample_scale=sample_scale, tokens=tokens, residual=res2, store_aux=store_o),
                   fc2_cublas)
    out_shape = (*shape[:-1], w2.shape[0])
    return y.view(out_shape), z.view(*shape[:-1], H), (o.view(out_shape) if o is not None else x.new_empty(0))


def _backward_triton(dy, x, w1, w2, z, o, layer_scale, sample_scale, has_b1, has_b2):
    x2 = _rows(x.contiguous())
    z2 = _rows(z)
    M, C = x2.shape
    H = w1.shape[0]
    Cout = w2.shape[0]
    tokens = M // sample_scale.shape[0] if sample_scale is not None and sample_scale.shape[0] else 1
    dy2 = _rows(dy.contiguous())
    factor = _factor(layer_scale, sample_scale, tokens, Cout, x.device)
    if factor is not None:
        dls = None
        if layer_scale is not None:
            s = sample_scale.float().view(-1, 1, 1) if sample_scale is not None else 1.0
            dls = (dy2.float().view(-1, tokens, Cout) * s * _rows(o).float().view(-1, tokens, Cout)).sum((0, 1))
            dls = dls.to(layer_scale.dtype)
        g = (dy2.float().view(-1, tokens, Cout) * factor).view(M, Cout).to(x.dtype)
    else:
        dls = None
        g = dy2.to(x.dtype)

    def dz_cublas():
        return torch.ops.aten.gelu_backward(g @ w2, z2), None, None

    dz, _, _ = _run("fc2_dgrad", (M, H, Cout), x.device, x.dtype,
                    lambda cfg: _launch("fc2_dgrad", cfg, g, w2, x.dtype, aux=z2), dz_cublas)

    def dw2_cublas():
        return g.t() @ F.gelu(z2), None, g.float().sum(0)

    dw2, _, db2 = _run("fc2_wgrad", (Cout, H, M), x.device, x.dtype,
                       lambda cfg: _launch("fc2_wgrad", cfg, g.t(), z2, w2.dtype, split=True), dw2_cublas)

    def dw1_cublas():
        return dz.t() @ x2, None, dz.float().sum(0)

    dw1, _, db1 = _run("fc1_wgrad", (H, C, M), x.device, x.dtype,
                       lambda cfg: _launch("fc1_wgrad", cfg, dz.t(), x2, w1.dtype, split=True), dw1_cublas)
    dx, _, _ = _run("fc1_dgrad", (M, C, H), x.device, x.dtype,
                    lambda cfg: _launch("fc1_dgrad", cfg, dz, w1, x.dtype), lambda: (dz @ w1, None, None))
    return _gradients(x, dx, dw1, db1, dw2, db2, dls, has_b1, has_b2, w1, w2, layer_scale)


def _gradients(x, dx, dw1, db1, dw2, db2, dls, has_b1, has_b2, w1, w2, layer_scale):
    """The backward op's outputs: absent gradients as empty tensors (custom ops return tensors, not None)."""
    return (dx.view(x.shape).to(x.dtype), dw1.to(w1.dtype), db1.to(w1.dtype) if has_b1 else x.new_empty(0),
            dw2.to(w2.dtype), db2.to(w2.dtype) if has_b2 else x.new_empty(0),
            dls if dls is not None else x.new_empty(0))


def _triton_supports(x, *args) -> str | None:
    if x.dtype not in FUSED_DTYPES:
        return f"x has dtype {x.dtype}; the Triton kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly; bfloat16 kernels are tested on GPU only"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The reference backend: PyTorch ops with the same inputs and saved tensors, explicit backward formulas.


def _forward_reference(x, w1, b1, w2, b2, residual, layer_scale, sample_scale):
    z = F.linear(x, w1, b1)
    o = F.linear(F.gelu(z), w2, b2)
    y = o
    if layer_scale is not None:
        y = y * layer_scale
    if sample_scale is not None:
        y = y * sample_scale.view(-1, *([1] * (y.dim() - 1)))
    if residual is not None:
        y = residual + y
    out_dtype = residual.dtype if residual is not None else x.dtype
    return y.to(out_dtype), z, (o if layer_scale is not None else x.new_empty(0))


def _backward_reference(dy, x, w1, w2, z, o, layer_scale, sample_scale, has_b1, has_b2):
    g = dy.float()
    dls = None
    if sample_scale is not None:
        g = g * sample_scale.float().view(-1, *([1] * (g.dim() - 1)))
    if layer_scale is not None:
        dls = _rows(g * o.float()).sum(0).to(layer_scale.dtype)
        g = g * layer_scale.float()
    g = _rows(g.to(x.dtype))
    z2, x2 = _rows(z), _rows(x)
    dw2 = g.t() @ F.gelu(z2)
    dz = torch.ops.aten.gelu_backward(g @ w2, z2)
    dw1 = dz.t() @ x2
    dx = dz @ w1
    return _gradients(x, dx, dw1, dz.float().sum(0), dw2, g.float().sum(0), dls, has_b1, has_b2, w1, w2,
                      layer_scale)


_backend.register(_backend.Op(
    name="mlp",
    reference=_backend.Impl(_forward_reference, _backward_reference),
    triton=_backend.Impl(_forward_triton, _backward_triton, _triton_supports) if triton is not None else None,
    preference={"default": ("triton",)},
))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("deit_fast::mlp_fwd", mutates_args=())
def _mlp_fwd(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, residual: Tensor | None,
             layer_scale: Tensor | None, sample_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _, impl = _backend.choose("mlp", x, w1, b1, w2, b2, residual, layer_scale, sample_scale)
    with torch.autocast(x.device.type, enabled=False):
        return impl.forward(x, w1, b1, w2, b2, residual, layer_scale, sample_scale)


@_mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, layer_scale, sample_scale):
    out_dtype = residual.dtype if residual is not None else x.dtype
    y = x.new_empty((*x.shape[:-1], w2.shape[0]), dtype=out_dtype)
    z = x.new_empty((*x.shape[:-1], w1.shape[0]))
    o = x.new_empty((*x.shape[:-1], w2.shape[0])) if layer_scale is not None else x.new_empty(0)
    return y, z, o


@torch.library.custom_op("deit_fast::mlp_bwd", mutates_args=())
def _mlp_bwd(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, z: Tensor, o: Tensor, layer_scale: Tensor | None,
             sample_scale: Tensor | None, has_b1: bool, has_b2: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, impl = _backend.choose("mlp", x, w1, None, w2, None, None, layer_scale, sample_scale)
    with torch.autocast(x.device.type, enabled=False):
        return impl.backward(dy, x, w1, w2, z, o, layer_scale, sample_scale, has_b1, has_b2)


@_mlp_bwd.register_fake
def _(dy, x, w1, w2, z, o, layer_scale, sample_scale, has_b1, has_b2):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1),
            w1.new_empty(w1.shape[0]) if has_b1 else x.new_empty(0), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]) if has_b2 else x.new_empty(0),
            torch.empty_like(layer_scale) if layer_scale is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, layer_scale, sample_scale = inputs
    _, z, o = output
    ctx.has_b1, ctx.has_b2, ctx.has_residual = b1 is not None, b2 is not None, residual is not None
    ctx.save_for_backward(x, w1, w2, z, o, layer_scale, sample_scale)
    ctx.mark_non_differentiable(z, o)


def _backward(ctx, dy, dz, do):
    x, w1, w2, z, o, layer_scale, sample_scale = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dls = _mlp_bwd(dy, x, w1, w2, z, o, layer_scale, sample_scale, ctx.has_b1, ctx.has_b2)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
            dy if ctx.has_residual else None, dls if layer_scale is not None else None, None)


_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _check_tensor(name: str, t, shape: tuple | None, x: Tensor, optional: bool = True) -> None:
    if t is None:
        if not optional:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _validate(x, w1, b1, w2, b2, residual, layer_scale, sample_scale) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., C) with at least two dimensions, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    _check_tensor("fc1_weight", w1, None, x, optional=False)
    if w1.dim() != 2 or w1.shape[1] != C:
        raise ValueError(f"fc1_weight must be (hidden, {C}) to match x's last dimension, got {tuple(w1.shape)}")
    H = w1.shape[0]
    _check_tensor("fc2_weight", w2, None, x, optional=False)
    if w2.dim() != 2 or w2.shape[1] != H:
        raise ValueError(f"fc2_weight must be (out, {H}) to match fc1's {H} outputs, got {tuple(w2.shape)}")
    Cout = w2.shape[0]
    _check_tensor("fc1_bias", b1, (H,), x)
    _check_tensor("fc2_bias", b2, (Cout,), x)
    _check_tensor("residual", residual, (*x.shape[:-1], Cout), x)
    _check_tensor("layer_scale", layer_scale, (Cout,), x)
    _check_tensor("sample_scale", sample_scale, (x.shape[0],), x)
    for name, t in (("fc1_weight", w1), ("fc1_bias", b1), ("fc2_weight", w2), ("fc2_bias", b2)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match (as F.linear "
                             "requires), or run under torch.autocast")


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, *,
        residual: Tensor | None = None, layer_scale: Tensor | None = None,
        sample_scale: Tensor | None = None) -> Tensor:
    """The MLP half of a ViT block: residual + sample_scale * layer_scale * fc2(GELU(fc1(x))), exact-erf GELU.

    Args:
        x: (B, ..., C) float32/float16/bfloat16 (float64 runs the reference): the normalized input (norm2's output).
        fc1_weight: (H, C), fc1_bias: (H,) or None; fc2_weight: (C_out, H), fc2_bias: (C_out,) or None, all in x's
            dtype (under torch.autocast everything is cast to the autocast dtype, as F.linear would be).
        residual: (B, ..., C_out) or None, any float dtype: added last; the output takes its dtype (timm's residual
            stream is float32 under autocast). Its gradient is the output's gradient.
        layer_scale: (C_out,) or None: timm's LayerScale gamma.
        sample_scale: (B,) or None: per-sample factor on the branch, e.g. the drop-path mask divided by the keep
            probability (timm's drop_path draws it); no gradient flows to it.
    Returns:
        (B, ..., C_out) in residual's dtype, or x's dtype without a residual.
    """
    _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, sample_scale)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, fc1_weight, fc2_weight = x.to(dtype), fc1_weight.to(dtype), fc2_weight.to(dtype)
        fc1_bias = fc1_bias.to(dtype) if fc1_bias is not None else None
        fc2_bias = fc2_bias.to(dtype) if fc2_bias is not None else None
    if sample_scale is not None:
        sample_scale = sample_scale.detach()
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, sample_scale)
    if not torch.compiler.is_compiling() and _backend.choose("mlp", *args)[0] == "reference":
        out = mlp_ref(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual, layer_scale=layer_scale,
                      sample_scale=sample_scale)
        return out.to(residual.dtype) if residual is not None else out
    return _mlp_fwd(*args)[0]
