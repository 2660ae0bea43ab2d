"""Patch embedding, fused: from the image batch to the (B, N, C) token sequence in one kernel.

    patch (b, i) = the ph x pw x Cin pixels of patch i of image b (never materialized: gathered in the GEMM's load)
    out[b, T + i] = patch(b, i) @ W^T + bias + pos[T + i]       (T prefix tokens: class, distillation, registers)
    out[b, t]     = prefix[t] + pos[t]                          (t < T; written by extra programs of the same launch)
With `no_embed_class` (DeiT III) pos has no prefix rows: out[b, T + i] adds pos[i] and the prefix rows add nothing.
Two input forms:
    float NCHW (B, Cin, H, W), as timm models take them;
    uint8 NHWC (B, H, W, Cin) from the data pipeline, normalized as it is loaded: x = (u / 255 - mean[c]) / std[c]
    (timm's mean/std convention), so no float image exists at all.
Backward: dW = dout_patches^T @ patches (the patches gathered from the image again, split over B*P into float32
partials summed in a fixed order), and one column sum of dout over the batch that gives d pos, d prefix and d bias.
The image gradient is computed only when the image requires it (training never does): dout_patches @ W, scattered
back to the image layout.

Bytes: timm's Conv2d path reads the image, writes (B, C, Hp, Wp), transposes it (read + write), concatenates the
tokens (read + write) and adds the position embedding (read + write): about 7 passes over a (B, N, C) tensor after
the image read. Here: the image read and one write of the output. The uint8 path also drops normalization's float
image (a write and a read of 4 bytes a pixel in float32, 2 in bf16).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import _backend

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Reference: timm's PatchEmbed (Conv2d, flatten, transpose) + _pos_embed (cat, add), the specification.


def normalize_uint8(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 NHWC (B, H, W, Cin) -> normalized float NCHW (B, Cin, H, W): (u / 255 - mean) / std, timm's convention."""
    mean = torch.as_tensor(mean, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                           device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=mean.dtype, device=images.device).view(1, -1, 1, 1)
    x = images.permute(0, 3, 1, 2).to(mean.dtype) / 255.0
    return ((x - mean) / std).to(dtype)


def patch_embed_ref(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                    prefix_tokens: Tensor | None = None, *, mean=None, std=None, no_embed_class: bool = False,
                    upcast: bool = False) -> Tensor:
    """timm's path: Conv2d(stride = kernel = patch), flatten to tokens, prepend the prefix tokens, add pos_embed
    (after the cat, or before it with no_embed_class). float64 throughout with upcast=True."""
    dtype = torch.float64 if upcast else weight.dtype
    if images.dtype == torch.uint8:
        images = normalize_uint8(images, mean, std, torch.float64 if upcast else weight.dtype)

    def cast(t):
        return t.to(dtype) if t is not None else None

    x = F.conv2d(cast(images), cast(weight), cast(bias), stride=tuple(weight.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    pos = cast(pos_embed) if upcast else pos_embed
    prefix = (cast(prefix_tokens) if upcast else prefix_tokens) if prefix_tokens is not None else None
    if no_embed_class and pos is not None:
        x = x + pos
    if prefix is not None and prefix.shape[0]:
        x = torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1).to(torch.result_type(x, prefix)), x], dim=1)
    if not no_embed_class and pos is not None:
        x = x + pos
    return x


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _load_patches(IMG, SCALE, SHIFT, m, k, m_mask, k_mask, P, grid_w, stride_b, stride_c, stride_h, stride_w,
                       PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CIN: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr, NORMALIZE: tl.constexpr, OUT_TY: tl.constexpr):
        """The (rows m) x (columns k) tile of the patch matrix, gathered from the image. Row m = (b, patch i); column
        k = (c, ky, kx) in the weight's order, or (ky, kx, c) for channels-last images (contiguous pixels)."""
        b = m // P
        i = m % P
        py = i // grid_w
        px = i % grid_w
        if CHANNELS_LAST:
            c = k % CIN
            ky = k // (CIN * PATCH_W)
            kx = (k // CIN) % PATCH_W
        else:
            c = k // (PATCH_H * PATCH_W)
            ky = (k // PATCH_W) % PATCH_H
            kx = k % PATCH_W
        row = (b.to(tl.int64) * stride_b + (py * PATCH_H).to(tl.int64) * stride_h
               + (px * PATCH_W).to(tl.int64) * stride_w)
        col = c.to(tl.int64) * stride_c + ky.to(tl.int64) * stride_h + kx.to(tl.int64) * stride_w
        mask = m_mask[:, None] & k_mask[None, :]
        pixels = tl.load(IMG + row[:, None] + col[None, :], mask=mask, other=0)
        if NORMALIZE:
            scale = tl.load(SCALE + c, mask=k_mask, other=0.0)
            shift = tl.load(SHIFT + c, mask=k_mask, other=0.0)
            # masked columns must be 0, not the shift
            pixels = tl.where(mask, pixels.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
        return pixels.to(OUT_TY)

    @triton.jit
    def _weight_offsets(k, CIN: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr):
        """Offset of column k inside a (Cin, ph, pw) filter (the Conv2d weight's layout)."""
        if CHANNELS_LAST:
            return (k % CIN) * (PATCH_H * PATCH_W) + k // CIN
        return k

    @triton.jit
    def _patch_embed_fwd_kernel(
        IMG,  # (B, Cin, H, W) float or (B, H, W, Cin) uint8, any strides
        W,  # (C, Cin, ph, pw) contiguous
        BIAS,  # (C,) (HAS_BIAS)
        POS,  # (L, C) contiguous position embedding (HAS_POS)
        PREFIX,  # (T, C) contiguous prefix tokens
        SCALE, SHIFT,  # (Cin,) float32: 1 / (255 std), -mean / std (NORMALIZE)
        OUT,  # (B, T + P, C) contiguous
        B, C, P, grid_w, T,
        stride_b, stride_c, stride_h, stride_w,
        pos_patch_row,  # the pos row of patch 0: T, or 0 with no_embed_class
        PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CIN: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        PREFIX_POS: tl.constexpr,  # prefix rows add pos[t]
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        K: tl.constexpr = CIN * PATCH_H * PATCH_W
        M = B * P
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(C, BLOCK_N)
        pid = tl.program_id(0)
        tokens = T + P
        if pid < tiles_m * tiles_n:
            tiles_per_group = GROUP_M * tiles_n
            first_m = (pid // tiles_per_group) * GROUP_M
            group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
            pid_m = first_m + (pid % tiles_per_group) % group_rows
            pid_n = (pid % tiles_per_group) // group_rows
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_mask = offs_m < M
            n_mask = offs_n < C
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = _load_patches(IMG, SCALE, SHIFT, offs_m, offs_k, m_mask, k_mask, P, grid_w, stride_b, stride_c,
                                   stride_h, stride_w, PATCH_H, PATCH_W, CIN, CHANNELS_LAST, NORMALIZE,
                                   W.dtype.element_ty)
                w_cols = _weight_offsets(offs_k, CIN, PATCH_H, PATCH_W, CHANNELS_LAST)
                w = tl.load(W + offs_n.to(tl.int64)[None, :] * K + w_cols[:, None],
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            mask = m_mask[:, None] & n_mask[None, :]
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            patch = offs_m % P
            if HAS_POS:
                pos_rows = (pos_patch_row + patch).to(tl.int64) * C
                acc += tl.load(POS + pos_rows[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            out_rows = ((offs_m // P).to(tl.int64) * tokens + T + patch) * C
            tl.store(OUT + out_rows[:, None] + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
        else:
            # Prefix rows (class / distillation / register tokens), BLOCK_M rows of B * T a program.
            rows = (pid - tiles_m * tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            r_mask = rows < B * T
            t = rows % T
            out_rows = ((rows // T).to(tl.int64) * tokens + t) * C
            for n0 in range(0, C, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask = r_mask[:, None] & (offs_n < C)[None, :]
                value = tl.load(PREFIX + t[:, None] * C + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
                if PREFIX_POS:
                    value += tl.load(POS + t[:, None] * C + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(OUT + out_rows[:, None] + offs_n[None, :], value.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _patch_embed_wgrad_kernel(
        DOUT,  # (B, T + P, C) contiguous
        IMG, SCALE, SHIFT,  # as in the forward
        DW,  # (SPLIT_K, C, Cin * ph * pw) float32 partials, in the weight's layout
        B, C, P, grid_w, T,
        stride_b, stride_c, stride_h, stride_w,
        m_per_split,  # rows of the B * P reduction per split, a multiple of BLOCK_K
        PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CIN: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, NORMALIZE: tl.constexpr, COMPUTE_TY: tl.constexpr,
        SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # dW[n, k] = sum over rows m of dout_patch[m, n] * patch[m, k]: an (C x M) @ (M x K) product whose reduction
        # runs over M = B * P in SPLIT_K slices.
        K: tl.constexpr = CIN * PATCH_H * PATCH_W
        M = B * P
        tiles_n = tl.cdiv(C, BLOCK_N)
        tiles_k = tl.cdiv(K, BLOCK_KW)
        pid = tl.program_id(0)
        split = pid // (tiles_n * tiles_k)
        tile = pid % (tiles_n * tiles_k)
        offs_n = (tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kw = (tile % tiles_k) * BLOCK_KW + tl.arange(0, BLOCK_KW)
        n_mask = offs_n < C
        kw_mask = offs_kw < K
        m_start = split * m_per_split
        m_end = tl.minimum(m_start + m_per_split, M)
        tokens = T + P
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_K):
            offs_m = m0 + tl.arange(0, BLOCK_K)
            m_mask = offs_m < m_end
            dout_rows = ((offs_m // P).to(tl.int64) * tokens + T + offs_m % P) * C
            g = tl.load(DOUT + dout_rows[None, :] + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :],
                        other=0.0).to(COMPUTE_TY)
            a = _load_patches(IMG, SCALE, SHIFT, offs_m, offs_kw, m_mask, kw_mask, P, grid_w, stride_b, stride_c,
                               stride_h, stride_w, PATCH_H, PATCH_W, CIN, CHANNELS_LAST, NORMALIZE, COMPUTE_TY)
            acc = tl.dot(g, a, acc, input_precision=DOT_PRECISION)
        w_cols = _weight_offsets(offs_kw, CIN, PATCH_H, PATCH_W, CHANNELS_LAST)
        tl.store(DW + split * C * K + offs_n.to(tl.int64)[:, None] * K + w_cols[None, :], acc,
                 mask=n_mask[:, None] & kw_mask[None, :])


PATCH_SIZES = (8, 14, 16)
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the forward; (BLOCK_N, BLOCK_KW, BLOCK_K, num_warps,
# num_stages) of the weight gradient; per architecture, all compiled ahead of time in the tests. The in-kernel gather
# (and, for uint8, the normalization) costs registers: these are the shapes that compile without spills for every
# patch size and both image forms (found with deit_fast.aot: 128x128x64 tiles with 2 stages spill on sm_90 at patch
# 8 with uint8 images; on sm_80 every 8-warp 128x128 tile spilled for some patch size or image form).
FWD_CONFIGS = {90: (128, 128, 32, 8, 8, 3), 80: (128, 64, 32, 8, 4, 3)}
WGRAD_CONFIGS = {90: (128, 128, 32, 8, 3), 80: (128, 128, 32, 8, 3)}


def _arch(capability: int) -> int:
    return 90 if capability >= 90 else 80


def aot_cases(capability: int):
    """Every configuration the launchers can use on sm_<capability>: patch 8/14/16, float NCHW and uint8 NHWC
    images, float16/bfloat16 weights (float32 runs cuBLAS's convolution on GPUs), with and without bias/pos/prefix
    position rows."""
    block_m, block_n, block_k, group_m, warps, stages = FWD_CONFIGS[_arch(capability)]
    wg_n, wg_kw, wg_k, wg_warps, wg_stages = WGRAD_CONFIGS[_arch(capability)]
    for dtype in ("fp16", "bf16"):
        t = f"*{dtype}"
        for patch in PATCH_SIZES:
            for channels_last in (False, True):
                img_t = "*u8" if channels_last else t
                geometry = {"PATCH_H": patch, "PATCH_W": patch, "CIN": 3, "CHANNELS_LAST": channels_last,
                            "NORMALIZE": channels_last}
                for has_bias, prefix_pos in ((True, True), (False, False)):
                    constexprs = {**geometry, "HAS_BIAS": has_bias, "HAS_POS": True, "PREFIX_POS": prefix_pos,
                                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
                                  "DOT_PRECISION": "tf32"}
                    sig = {"IMG": img_t, "W": t, "BIAS": t, "POS": "*fp32", "PREFIX": "*fp32", "SCALE": "*fp32",
                           "SHIFT": "*fp32", "OUT": "*fp32", "B": "i32", "C": "i32", "P": "i32", "grid_w": "i32",
                           "T": "i32", "stride_b": "i32", "stride_c": "i32", "stride_h": "i32", "stride_w": "i32",
                           "pos_patch_row": "i32", **{name: "constexpr" for name in constexprs}}
                    unit = "stride_c" if channels_last else "stride_w"
                    sig[unit], constexprs[unit] = "constexpr", 1
                    yield (f"patch_embed_fwd-{dtype}-p{patch}-{'nhwc_u8' if channels_last else 'nchw'}"
                           f"-bias{int(has_bias)}-prefixpos{int(prefix_pos)}", _patch_embed_fwd_kernel, sig, constexprs,
                           {"num_warps": warps, "num_stages": stages},
                           ("IMG", "W", "BIAS", "POS", "PREFIX", "OUT", "C", "stride_b"))
                for split in (1, 8):
                    constexprs = {**geometry, "COMPUTE_TY": getattr(tl, {"fp16": "float16", "bf16": "bfloat16"}[dtype]),
                                  "SPLIT_K": split, "BLOCK_N": wg_n, "BLOCK_KW": wg_kw, "BLOCK_K": wg_k,
                                  "DOT_PRECISION": "tf32"}
                    sig = {"DOUT": "*fp32", "IMG": img_t, "SCALE": "*fp32", "SHIFT": "*fp32", "DW": "*fp32",
                           "B": "i32", "C": "i32", "P": "i32", "grid_w": "i32", "T": "i32", "stride_b": "i32",
                           "stride_c": "i32", "stride_h": "i32", "stride_w": "i32", "m_per_split": "i32",
                           **{name: "constexpr" for name in constexprs}}
                    unit = "stride_c" if channels_last else "stride_w"
                    sig[unit], constexprs[unit] = "constexpr", 1
                    yield (f"patch_embed_wgrad-{dtype}-p{patch}-{'nhwc_u8' if channels_last else 'nchw'}-split{split}",
                           _patch_embed_wgrad_kernel, sig, constexprs, {"num_warps": wg_warps, "num_stages": wg_stages},
                           ("DOUT", "IMG", "DW", "C", "stride_b", "m_per_split"))


# ----------------------------------------------------------------------------------------------------------------
# Launchers


@functools.cache
def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _geometry(images: Tensor, weight: Tensor):
    """(channels_last, B, H, W, strides (b, c, h, w), grid_h, grid_w)."""
    channels_last = images.dtype == torch.uint8
    if channels_last:
        B, H, W_, _ = images.shape
        sb, sh, sw, sc = images.stride()
    else:
        B, _, H, W_ = images.shape
        sb, sc, sh, sw = images.stride()
    ph, pw = weight.shape[2:]
    return channels_last, B, (sb, sc, sh, sw), H // ph, W_ // pw


def _layout(prefix, no_embed_class):
    """(T prefix rows, the pos row of patch 0)."""
    T = prefix.shape[0] if prefix is not None else 0
    return T, (0 if no_embed_class else T)


def _normalization(scale, shift, device):
    if scale is None:
        dummy = torch.zeros(1, device=device, dtype=torch.float32)
        return dummy, dummy
    return scale, shift


def _out_dtype(weight: Tensor, pos_embed: Tensor | None, prefix: Tensor | None) -> torch.dtype:
    dtype = weight.dtype
    for t in (pos_embed, prefix):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _forward_triton(images, weight, bias, pos_embed, prefix, scale, shift, no_embed_class):
    channels_last, B, strides, grid_h, grid_w = _geometry(images, weight)
    C, cin, ph, pw = weight.shape
    P = grid_h * grid_w
    T, pos_patch_row = _layout(prefix, no_embed_class)
    out = torch.empty(B, T + P, C, device=images.device, dtype=_out_dtype(weight, pos_embed, prefix))
    weight = weight.contiguous()
    pos = pos_embed.reshape(-1, C).contiguous() if pos_embed is not None else out
    prefix_rows = prefix.contiguous() if prefix is not None else out
    scale, shift = _normalization(scale, shift, images.device)
    block_m, block_n, block_k, group_m, warps, stages = FWD_CONFIGS[_arch(_capability(images.device))]
    gemm_programs = triton.cdiv(B * P, block_m) * triton.cdiv(C, block_n)
    prefix_programs = triton.cdiv(B * T, block_m)
    if B * (T + P) * C > 0:
        _patch_embed_fwd_kernel[(gemm_programs + prefix_programs,)](
            images, weight, bias if bias is not None else weight, pos, prefix_rows, scale, shift, out,
            B, C, P, grid_w, T, *strides, pos_patch_row,
            PATCH_H=ph, PATCH_W=pw, CIN=cin, CHANNELS_LAST=channels_last, NORMALIZE=channels_last,
            HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            PREFIX_POS=pos_embed is not None and not no_embed_class and T > 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


def _weight_grad_triton(dout, images, weight, scale, shift, T):
    channels_last, B, strides, grid_h, grid_w = _geometry(images, weight)
    C, cin, ph, pw = weight.shape
    P = grid_h * grid_w
    K = cin * ph * pw
    block_n, block_kw, block_k, warps, stages = WGRAD_CONFIGS[_arch(_capability(images.device))]
    tiles = triton.cdiv(C, block_n) * triton.cdiv(K, block_kw)
    M = B * P
    split = max(1, min(32, _sm_count(images.device) // max(tiles, 1), M // (4 * block_k)))
    m_per_split = triton.cdiv(triton.cdiv(max(M, 1), split), block_k) * block_k
    split = max(1, triton.cdiv(M, m_per_split))
    partials = torch.zeros(split, C, K, device=images.device, dtype=torch.float32)
    scale, shift = _normalization(scale, shift, images.device)
    compute = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[weight.dtype]
    if M > 0:
        _patch_embed_wgrad_kernel[(tiles * split,)](
            dout, images, scale, shift, partials, B, C, P, grid_w, T, *strides, m_per_split,
            PATCH_H=ph, PATCH_W=pw, CIN=cin, CHANNELS_LAST=channels_last, NORMALIZE=channels_last,
            COMPUTE_TY=compute, SPLIT_K=split, BLOCK_N=block_n, BLOCK_KW=block_kw, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return partials.sum(0).view(weight.shape)  # fixed-order sum of the partials: deterministic


def _small_grads(dout, T, has_bias, has_pos, no_embed_class, weight, pos_embed, prefix):
    """d bias, d pos, d prefix from one column sum of dout over the batch (float32)."""
    column = dout.float().sum(0)  # (T + P, C)
    dbias = column[T:].sum(0).to(weight.dtype) if has_bias else None
    dpos = None
    if has_pos:
        dpos = (column[T:] if no_embed_class else column).unsqueeze(0).to(pos_embed.dtype, copy=True)
    dprefix = column[:T].to(prefix.dtype, copy=True) if prefix is not None else None  # outputs must not alias
    return dbias, dpos, dprefix


def _image_grad(dout, images, weight, T):
    """d images for float NCHW images: dout_patches @ W scattered back to the pixels (patches do not overlap)."""
    B, cin, H, W_ = images.shape
    C, _, ph, pw = weight.shape
    gh, gw = H // ph, W_ // pw
    dpatch = dout[:, T:].to(weight.dtype) @ weight.reshape(C, -1)  # (B, P, cin*ph*pw)
    dpatch = dpatch.view(B, gh, gw, cin, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, cin, gh * ph, gw * pw)
    dimg = torch.zeros_like(images, memory_format=torch.contiguous_format)
    dimg[:, :, :gh * ph, :gw * pw] = dpatch.to(images.dtype)
    return dimg


def _backward_triton(dout, images, weight, pos_embed, prefix, scale, shift, flags):
    has_bias, no_embed_class, image_grad = flags
    T = prefix.shape[0] if prefix is not None else 0
    dout = dout.contiguous()
    dweight = _weight_grad_triton(dout, images, weight, scale, shift, T).to(weight.dtype)
    dbias, dpos, dprefix = _small_grads(dout, T, has_bias, pos_embed is not None, no_embed_class, weight, pos_embed,
                                        prefix)
    dimg = _image_grad(dout, images, weight, T) if image_grad else None
    return dimg, dweight, dbias, dpos, dprefix


def _triton_supports(images, weight, *args) -> str | None:
    if weight.dtype not in FUSED_DTYPES:
        return f"weight has dtype {weight.dtype}; the Triton kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if images.device.type == "cpu" and weight.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly; bfloat16 kernels are tested on GPU only"
    if images.device.type == "cuda" and weight.dtype == torch.float32:
        return "float32 patch embedding runs PyTorch's convolution on GPUs (Triton's exact float32 dot has no " \
               "tensor cores)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The reference backend: timm's path with the same inputs, explicit backward formulas.


def _float_images(images, weight, scale, shift):
    if images.dtype != torch.uint8:
        return images
    x = images.permute(0, 3, 1, 2).float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return x.to(weight.dtype)


def _forward_reference(images, weight, bias, pos_embed, prefix, scale, shift, no_embed_class):
    x = _float_images(images, weight, scale, shift)
    ph, pw = weight.shape[2:]
    x = x[:, :, :x.shape[2] // ph * ph, :x.shape[3] // pw * pw]
    out = patch_embed_ref(x, weight, bias, pos_embed, prefix, no_embed_class=no_embed_class)
    return out.to(_out_dtype(weight, pos_embed, prefix)).contiguous()


def _backward_reference(dout, images, weight, pos_embed, prefix, scale, shift, flags):
    has_bias, no_embed_class, image_grad = flags
    T = prefix.shape[0] if prefix is not None else 0
    C, cin, ph, pw = weight.shape
    x = _float_images(images, weight, scale, shift)
    B = x.shape[0]
    gh, gw = x.shape[2] // ph, x.shape[3] // pw
    patches = x[:, :, :gh * ph, :gw * pw].reshape(B, cin, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(B * gh * gw, cin * ph * pw)
    dpatch_out = dout[:, T:].reshape(-1, C)
    dweight = (dpatch_out.float().t() @ patches.float()).view(weight.shape).to(weight.dtype)
    dbias, dpos, dprefix = _small_grads(dout, T, has_bias, pos_embed is not None, no_embed_class, weight, pos_embed,
                                        prefix)
    dimg = _image_grad(dout, images, weight, T) if image_grad else None
    return dimg, dweight, dbias, dpos, dprefix


_backend.register(_backend.Op(
    name="patch_embed",
    reference=_backend.Impl(_forward_reference, _backward_reference),
    triton=_backend.Impl(_forward_triton, _backward_triton, _triton_supports) if triton is not None else None,
    preference={"default": ("triton",)},
))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("deit_fast::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                     prefix: Tensor | None, scale: Tensor | None, shift: Tensor | None, no_embed_class: bool) -> Tensor:
    _, impl = _backend.choose("patch_embed", images, weight)
    with torch.autocast(images.device.type, enabled=False):
        return impl.forward(images, weight, bias, pos_embed, prefix, scale, shift, no_embed_class)


@_patch_embed_fwd.register_fake
def _(images, weight, bias, pos_embed, prefix, scale, shift, no_embed_class):
    channels_last = images.dtype == torch.uint8
    B = images.shape[0]
    H, W_ = (images.shape[1], images.shape[2]) if channels_last else (images.shape[2], images.shape[3])
    P = (H // weight.shape[2]) * (W_ // weight.shape[3])
    T = prefix.shape[0] if prefix is not None else 0
    return images.new_empty((B, T + P, weight.shape[0]), dtype=_out_dtype(weight, pos_embed, prefix))


@torch.library.custom_op("deit_fast::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(dout: Tensor, images: Tensor, weight: Tensor, pos_embed: Tensor | None, prefix: Tensor | None,
                     scale: Tensor | None, shift: Tensor | None, has_bias: bool, no_embed_class: bool,
                     image_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, impl = _backend.choose("patch_embed", images, weight)
    with torch.autocast(images.device.type, enabled=False):
        grads = impl.backward(dout, images, weight, pos_embed, prefix, scale, shift,
                              (has_bias, no_embed_class, image_grad))
    # custom ops return tensors: absent gradients as empty ones
    return tuple(g if g is not None else dout.new_empty(0) for g in grads)


@_patch_embed_bwd.register_fake
def _(dout, images, weight, pos_embed, prefix, scale, shift, has_bias, no_embed_class, image_grad):
    return (torch.empty_like(images, memory_format=torch.contiguous_format) if image_grad else dout.new_empty(0),
            torch.empty_like(weight), weight.new_empty(weight.shape[0]) if has_bias else dout.new_empty(0),
            torch.empty_like(pos_embed) if pos_embed is not None else dout.new_empty(0),
            torch.empty_like(prefix) if prefix is not None else dout.new_empty(0))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, prefix, scale, shift, no_embed_class = inputs
    ctx.has_bias, ctx.no_embed_class = bias is not None, no_embed_class
    ctx.image_grad = images.is_floating_point() and ctx.needs_input_grad[0]
    ctx.save_for_backward(images, weight, pos_embed, prefix, scale, shift)


def _backward(ctx, dout):
    images, weight, pos_embed, prefix, scale, shift = ctx.saved_tensors
    dimg, dweight, dbias, dpos, dprefix = _patch_embed_bwd(dout, images, weight, pos_embed, prefix, scale, shift,
                                                           ctx.has_bias, ctx.no_embed_class, ctx.image_grad)
    return (dimg if ctx.image_grad else None, dweight, dbias if ctx.has_bias else None,
            dpos if pos_embed is not None else None, dprefix if prefix is not None else None, None, None, None)


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _validate(images, weight, bias, pos_embed, prefix_tokens, mean, std, no_embed_class):
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError("weight must be the Conv2d projection weight (C, Cin, patch_h, patch_w), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    C, cin, ph, pw = weight.shape
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D: float (B, {cin}, H, W) or uint8 (B, H, W, {cin}); got shape "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        B, H, W_, channels = images.shape
        layout = "uint8 (B, H, W, Cin)"
        if mean is None or std is None:
            raise ValueError("uint8 images need mean and std (per channel, in [0, 1] units as timm's "
                             "IMAGENET_DEFAULT_MEAN/STD) to be normalized in the kernel")
        for name, v in (("mean", mean), ("std", std)):
            if torch.as_tensor(v).numel() != cin:
                raise ValueError(f"{name} must have {cin} values (one per channel), got {torch.as_tensor(v).numel()}")
        if not bool((torch.as_tensor(std, dtype=torch.float64) > 0).all()):
            raise ValueError(f"std must be positive, got {std}")
    elif images.is_floating_point():
        B, channels, H, W_ = images.shape
        layout = "float (B, Cin, H, W)"
        if mean is not None or std is not None:
            raise ValueError("mean/std apply to uint8 images only; float images are expected normalized")
    else:
        raise ValueError(f"images must be float NCHW or uint8 NHWC, got dtype {images.dtype}")
    if channels != cin:
        raise ValueError(f"images have {channels} channels but the weight expects {cin} (images as {layout}, "
                         f"shape {tuple(images.shape)})")
    if H % ph or W_ % pw:
        raise ValueError(f"image size {H}x{W_} is not divisible by the patch size {ph}x{pw}")
    if weight.device != images.device:
        raise ValueError(f"weight must be on images' device {images.device}, got {weight.device}")
    P = (H // ph) * (W_ // pw)
    T = prefix_tokens.shape[0] if prefix_tokens is not None else 0
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (C,)):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape) if isinstance(bias, Tensor) else bias}")
    if prefix_tokens is not None and (prefix_tokens.dim() != 2 or prefix_tokens.shape[1] != C):
        raise ValueError(f"prefix_tokens must be (T, {C}), got {tuple(prefix_tokens.shape)}")
    if pos_embed is not None:
        rows = P if no_embed_class else T + P
        if pos_embed.shape[-1] != C or pos_embed.numel() != rows * C:
            raise ValueError(f"pos_embed must be (1, {rows}, {C}) for {P} patches and {T} prefix tokens "
                             f"(no_embed_class={no_embed_class}), got {tuple(pos_embed.shape)}; resample it with "
                             "deit_fast.ops.resample_pos_embed for another image size")
    if images.is_floating_point() and images.dtype != weight.dtype and not torch.is_autocast_enabled(
            images.device.type):
        raise ValueError(f"images have dtype {images.dtype} but weight has {weight.dtype}; they must match (as "
                         "Conv2d requires), or run under torch.autocast")


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1) -> Tensor:
    """Position embedding for another patch grid (e.g. 384-px fine-tuning of a 224-px model): timm's
    resample_abs_pos_embed (bicubic, antialiased, prefix rows kept), differentiable."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid) if old_grid else None,
                                  num_prefix_tokens=num_prefix_tokens)


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None = None,
                prefix_tokens: Tensor | None = None, *, mean: Sequence[float] | Tensor | None = None,
                std: Sequence[float] | Tensor | None = None, no_embed_class: bool = False,
                image_grad: bool | None = None) -> Tensor:
    """Image batch -> token sequence: patchify, project, add bias and position embedding, prepend prefix tokens.

    Args:
        images: float (B, Cin, H, W) in the weight's dtype (any strides), or uint8 (B, H, W, Cin) with mean/std.
            H and W must be multiples of the patch size.
        weight: (C, Cin, ph, pw), the Conv2d projection weight (timm's `proj.weight`); bias: (C,) or None.
        pos_embed: (1, T + P, C) (timm's default), (1, P, C) with no_embed_class, or None.
        prefix_tokens: (T, C) or None: class, distillation and register tokens in order (e.g. torch.cat of timm's
            cls_token and dist_token, each (1, 1, C), reshaped to rows).
        mean, std: per-channel normalization of uint8 images, in [0, 1] units: x = (u / 255 - mean) / std.
        no_embed_class: DeiT III / timm `no_embed_class`: pos_embed covers the patches only.
        image_grad: compute the image gradient; default: when images require grad (training does not need it).
    Returns:
        (B, T + P, C); dtype: the weight's (the autocast dtype under autocast), promoted with pos_embed's and the
        prefix tokens' (timm's float32 token stream under autocast).
    """
    _validate(images, weight, bias, pos_embed, prefix_tokens, mean, std, no_embed_class)
    if torch.is_autocast_enabled(images.device.type):
        dtype = torch.get_autocast_dtype(images.device.type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        if images.is_floating_point():
            images = images.to(dtype)
    if image_grad is False:
        images = images.detach()
    scale = shift = None
    if images.dtype == torch.uint8:
        mean_t = torch.as_tensor(mean, dtype=torch.float64)
        std_t = torch.as_tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std_t)).to(images.device, torch.float32)
        shift = (-mean_t / std_t).to(images.device, torch.float32)
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(1, -1, weight.shape[0])
    args = (images, weight, bias, pos_embed, prefix_tokens, scale, shift, bool(no_embed_class))
    if not torch.compiler.is_compiling() and _backend.choose("patch_embed", images, weight)[0] == "reference":
        return _forward_reference(*args)  # eager: PyTorch's autograd, without the custom op's dispatch cost
    return _patch_embed_fwd(*args)
