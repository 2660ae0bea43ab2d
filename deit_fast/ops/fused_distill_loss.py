"""DeiT's distillation loss, fused: one pass over each row of logits forward, one backward.

    loss = (1 - alpha) * base + alpha * kd          (type "hard" or "soft";  type "none": loss = base)
    base = mean over rows of sum_k -target_k * log_softmax(cls)_k        (timm's SoftTargetCrossEntropy; integer
                                                                          labels are one-hot targets)
    hard: kd = mean over rows of -log_softmax(dist)_{argmax(teacher)}     (F.cross_entropy vs the teacher's argmax)
    soft: kd = sum over rows and classes of KL(softmax(teacher/tau) || softmax(dist/tau)) * tau^2 / (B * K)
          (DeiT's losses.py: kl_div(..., reduction='sum', log_target=True) * tau^2 / outputs_kd.numel())

Gradients (g = the loss's gradient, B rows, K classes; no gradient flows to targets or the teacher):
    d cls  = g * w_base / B * (softmax(cls) * sum(target) - target),    w_base = 1 - alpha (1 for "none")
    hard:  d dist = g * alpha / B * (softmax(dist) - onehot(argmax teacher))
    soft:  d dist = g * alpha * tau / (B * K) * (softmax(dist/tau) - softmax(teacher/tau))
Unfused, PyTorch materializes log_softmax of each (B, K) input and their products, forward and backward; fused, the
forward reads cls, dist, teacher and targets once each and writes a few floats a row (the row statistics the
backward needs), and the backward reads them again and writes the two gradients. Logits in any float dtype,
statistics in float32; rows of any length (chunks of up to 1024 classes with an online log-sum-exp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_fast import _backend

TYPES = ("none", "hard", "soft")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Reference: DeiT's formulas, the specification.


def distill_loss_ref(cls_logits: Tensor, dist_logits: Tensor | None, targets: Tensor, teacher_logits: Tensor | None,
                     distillation_type: str = "hard", alpha: float = 0.5, tau: float = 1.0, *,
                     upcast: bool = False) -> Tensor:
    """The loss exactly as DeiT's DistillationLoss computes it, in float32 (float64 with upcast=True)."""
    dtype = torch.float64 if upcast else torch.float32
    cls = cls_logits.to(dtype)
    if targets.dtype in (torch.int64, torch.int32):
        base = F.cross_entropy(cls, targets.long())
    else:
        base = torch.sum(-targets.to(dtype) * F.log_softmax(cls, dim=-1), dim=-1).mean()
    if distillation_type == "none":
        return base
    dist, teacher = dist_logits.to(dtype), teacher_logits.to(dtype)
    if distillation_type == "hard":
        kd = F.cross_entropy(dist, teacher.argmax(dim=1))
    else:
        kd = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                      log_target=True) * (tau * tau) / dist.numel()
    return base * (1 - alpha) + kd * alpha


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. One program per row; classes in chunks of BLOCK_K.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _online_lse(x, m, s):
        """Fold a chunk x (masked entries -inf) into a running max m and sum s of exp(x - m)."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        return m_new, s

    @triton.jit
    def _distill_loss_fwd_kernel(
        CLS,  # (B, K) class-head logits
        DIST,  # (B, K) distillation-head logits (unused when KD_TYPE == 0)
        TEACHER,  # (B, K) teacher logits (unused when KD_TYPE == 0)
        TARGET,  # (B, K) float32 soft targets, or (B,) int64 labels when INT_LABELS
        ROW_LOSS,  # (B, 2) float32 out: base term, kd term of each row
        STATS,  # (B, 4) float32 out: lse(cls), lse(dist / tau), lse(teacher / tau), teacher argmax
        K,
        inv_tau,
        BLOCK_K: tl.constexpr,
        KD_TYPE: tl.constexpr,  # 0 none, 1 hard, 2 soft
        INT_LABELS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        base = row * K
        # Pass 1: log-sum-exps (and the teacher's first argmax).
        # Loop-carried values start as typed scalars (Triton requires a fixed type across iterations).
        m_c = tl.full([], float("-inf"), tl.float32)
        s_c = tl.full([], 0.0, tl.float32)
        m_d = tl.full([], float("-inf"), tl.float32)
        s_d = tl.full([], 0.0, tl.float32)
        m_t = tl.full([], float("-inf"), tl.float32)
        s_t = tl.full([], 0.0, tl.float32)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = cols < K
            c = tl.load(CLS + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_c, s_c = _online_lse(c, m_c, s_c)
            if KD_TYPE != 0:
                t = tl.load(TEACHER + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
                d = tl.load(DIST + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
                if KD_TYPE == 1:
                    m_d, s_d = _online_lse(d, m_d, s_d)
                    chunk_best = tl.max(t, axis=0)
                    chunk_idx = tl.min(tl.where(t == chunk_best, cols, K), axis=0)
                    take = chunk_best > best  # strictly greater: the first maximum wins, as torch.argmax
                    best_idx = tl.where(take, chunk_idx, best_idx)
                    best = tl.maximum(best, chunk_best)
                else:
                    m_d, s_d = _online_lse(d * inv_tau, m_d, s_d)
                    m_t, s_t = _online_lse(t * inv_tau, m_t, s_t)
        lse_c = m_c + tl.log(s_c)
        lse_d = tl.full([], 0.0, tl.float32)
        lse_t = tl.full([], 0.0, tl.float32)
        if KD_TYPE != 0:
            lse_d = m_d + tl.log(s_d)
        if KD_TYPE == 2:
            lse_t = m_t + tl.log(s_t)
        # Pass 2: the terms that need the log-sum-exps.
        base_term = tl.full([], 0.0, tl.float32)
        kd_term = tl.full([], 0.0, tl.float32)
        if INT_LABELS:
            label = tl.load(TARGET + row)
            base_term = lse_c - tl.load(CLS + base + label).to(tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = cols < K
            if not INT_LABELS:
                c = tl.load(CLS + base + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(TARGET + base + cols, mask=mask, other=0.0).to(tl.float32)
                base_term += tl.sum(y * (lse_c - c), axis=0)
            if KD_TYPE == 2:
                d = tl.load(DIST + base + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                t = tl.load(TEACHER + base + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                log_p = t - lse_t
                kd_term += tl.sum(tl.where(mask, tl.exp(log_p) * (log_p - (d - lse_d)), 0.0), axis=0)
        if KD_TYPE == 1:
            kd_term = lse_d - tl.load(DIST + base + best_idx).to(tl.float32)
        tl.store(ROW_LOSS + row * 2, base_term)
        tl.store(ROW_LOSS + row * 2 + 1, kd_term)
        tl.store(STATS + row * 4, lse_c)
        tl.store(STATS + row * 4 + 1, lse_d)
        tl.store(STATS + row * 4 + 2, lse_t)
        tl.store(STATS + row * 4 + 3, best_idx.to(tl.float32))

    @triton.jit
    def _distill_loss_bwd_kernel(
        CLS,
        DIST,
        TEACHER,
        TARGET,
        STATS,  # (B, 4) float32 from the forward
        GRAD,  # () float32: gradient of the loss
        DCLS,  # (B, K) out, CLS's dtype
        DDIST,  # (B, K) out, DIST's dtype (unused when KD_TYPE == 0)
        K,
        inv_tau,
        base_scale,  # w_base / B
        kd_scale,  # hard: alpha / B; soft: alpha * tau / (B * K)
        BLOCK_K: tl.constexpr,
        KD_TYPE: tl.constexpr,
        INT_LABELS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        base = row * K
        g = tl.load(GRAD)
        lse_c = tl.load(STATS + row * 4)
        lse_d = tl.load(STATS + row * 4 + 1)
        lse_t = tl.load(STATS + row * 4 + 2)
        best_idx = tl.load(STATS + row * 4 + 3).to(tl.int64)
        # sum(target) scales softmax in d cls; it is 1 for labels and for mixup/smoothing targets, but not assumed.
        target_sum = tl.full([], 1.0, tl.float32)
        label = tl.full([], 0, tl.int64)
        if INT_LABELS:
            label = tl.load(TARGET + row)
        else:
            target_sum = tl.full([], 0.0, tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + offs
                target_sum += tl.sum(tl.load(TARGET + base + cols, mask=cols < K, other=0.0).to(tl.float32), axis=0)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = cols < K
            c = tl.load(CLS + base + cols, mask=mask, other=0.0).to(tl.float32)
            if INT_LABELS:
                y = tl.where(cols == label, 1.0, 0.0)
            else:
                y = tl.load(TARGET + base + cols, mask=mask, other=0.0).to(tl.float32)
            dc = (tl.exp(c - lse_c) * target_sum - y) * (g * base_scale)
            tl.store(DCLS + base + cols, dc.to(DCLS.dtype.element_ty), mask=mask)
            if KD_TYPE == 1:
                d = tl.load(DIST + base + cols, mask=mask, other=0.0).to(tl.float32)
                dd = (tl.exp(d - lse_d) - tl.where(cols == best_idx, 1.0, 0.0)) * (g * kd_scale)
                tl.store(DDIST + base + cols, dd.to(DDIST.dtype.element_ty), mask=mask)
            if KD_TYPE == 2:
                d = tl.load(DIST + base + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                t = tl.load(TEACHER + base + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
                dd = (tl.exp(d - lse_d) - tl.exp(t - lse_t)) * (g * kd_scale)
                tl.store(DDIST + base + cols, dd.to(DDIST.dtype.element_ty), mask=mask)


def block_k(K: int) -> int:
    """Classes per chunk: ImageNet's 1000 in one; more in chunks of 1024 (larger chunks spilled registers on
    sm_80/sm_90 with 4 warps, found by deit_fast.aot)."""
    return min(1024, max(128, 1 << (K - 1).bit_length()))


def aot_cases(capability: int):
    """Every kernel configuration the launchers can use, for `python -m deit_fast.aot`."""
    for dtype in ("fp32", "fp16", "bf16"):
        t = f"*{dtype}"
        for bk in (128, 256, 512, 1024):
            for kd_type in (0, 1, 2):
                for int_labels in (False, True):
                    target = "*i64" if int_labels else "*fp32"
                    fwd = {"CLS": t, "DIST": t, "TEACHER": t, "TARGET": target, "ROW_LOSS": "*fp32", "STATS": "*fp32",
                           "K": "i32", "inv_tau": "fp32", "BLOCK_K": "constexpr", "KD_TYPE": "constexpr",
                           "INT_LABELS": "constexpr"}
                    bwd = {"CLS": t, "DIST": t, "TEACHER": t, "TARGET": target, "STATS": "*fp32", "GRAD": "*fp32",
                           "DCLS": t, "DDIST": t, "K": "i32", "inv_tau": "fp32", "base_scale": "fp32",
                           "kd_scale": "fp32", "BLOCK_K": "constexpr", "KD_TYPE": "constexpr",
                           "INT_LABELS": "constexpr"}
                    constexprs = {"BLOCK_K": bk, "KD_TYPE": kd_type, "INT_LABELS": int_labels}
                    name = f"{dtype}-k{bk}-kd{kd_type}-{'labels' if int_labels else 'soft'}"
                    yield f"distill_fwd-{name}", _distill_loss_fwd_kernel, fwd, constexprs, 4, ()
                    yield f"distill_bwd-{name}", _distill_loss_bwd_kernel, bwd, constexprs, 4, ()


def _kd_code(distillation_type: str) -> int:
    return TYPES.index(distillation_type)


def _kernel_inputs(cls_logits, dist_logits, targets, teacher_logits):
    """Contiguous logits (cls standing in for absent ones), int64 labels or float32 soft targets, and which."""
    cls = cls_logits.contiguous()
    dist = dist_logits.contiguous() if dist_logits is not None else cls
    teacher = teacher_logits.contiguous() if teacher_logits is not None else cls
    int_labels = not targets.is_floating_point()
    target = targets.contiguous().long() if int_labels else targets.contiguous().float()
    return cls, dist, teacher, target, int_labels


def _forward_triton(cls_logits, dist_logits, targets, teacher_logits, kd_type, alpha, tau):
    B, K = cls_logits.shape
    cls, dist, teacher, target, int_labels = _kernel_inputs(cls_logits, dist_logits, targets, teacher_logits)
    row_loss = torch.empty(B, 2, dtype=torch.float32, device=cls.device)
    stats = torch.empty(B, 4, dtype=torch.float32, device=cls.device)
    if B > 0:
        _distill_loss_fwd_kernel[(B,)](cls, dist, teacher, target, row_loss, stats, K, 1.0 / tau, BLOCK_K=block_k(K),
                                       KD_TYPE=kd_type, INT_LABELS=int_labels, num_warps=4)
    return _combine(row_loss, kd_type, alpha, tau, B, K), stats


def _combine(row_loss, kd_type, alpha, tau, B, K):
    base = row_loss[:, 0].sum() / B
    if kd_type == 0:
        return base
    kd = row_loss[:, 1].sum() / B if kd_type == 1 else row_loss[:, 1].sum() * (tau * tau) / (B * K)
    return base * (1 - alpha) + kd * alpha


def _scales(kd_type, alpha, tau, B, K):
    base_scale = (1.0 if kd_type == 0 else 1 - alpha) / B
    kd_scale = alpha / B if kd_type == 1 else alpha * tau / (B * K)
    return base_scale, kd_scale


def _backward_triton(grad, cls_logits, dist_logits, targets, teacher_logits, stats, kd_type, alpha, tau):
    B, K = cls_logits.shape
    cls, dist, teacher, target, int_labels = _kernel_inputs(cls_logits, dist_logits, targets, teacher_logits)
    dcls = torch.empty_like(cls)
    ddist = torch.empty_like(dist) if kd_type != 0 else cls.new_empty(0)
    base_scale, kd_scale = _scales(kd_type, alpha, tau, B, K)
    if B > 0:
        _distill_loss_bwd_kernel[(B,)](cls, dist, teacher, target, stats, grad.float().contiguous(), dcls,
                                       ddist if kd_type != 0 else dcls, K, 1.0 / tau, base_scale, kd_scale,
                                       BLOCK_K=block_k(K), KD_TYPE=kd_type, INT_LABELS=int_labels, num_warps=4)
    return dcls, ddist


def _triton_supports(cls_logits, *args) -> str | None:
    if cls_logits.dtype not in FUSED_DTYPES:
        return f"logits have dtype {cls_logits.dtype}; the Triton kernels take {', '.join(map(str, FUSED_DTYPES))}"
    if cls_logits.device.type == "cpu" and cls_logits.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly; bfloat16 kernels are tested on GPU only"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The reference backend: the same row statistics and gradients in PyTorch (float32).


def _forward_reference(cls_logits, dist_logits, targets, teacher_logits, kd_type, alpha, tau):
    B, K = cls_logits.shape
    cls = cls_logits.float()
    lse_c = torch.logsumexp(cls, dim=-1)
    if targets.is_floating_point():
        base_rows = (targets.float() * (lse_c[:, None] - cls)).sum(-1)
    else:
        base_rows = lse_c - cls.gather(1, targets.long()[:, None])[:, 0]
    zeros = torch.zeros_like(lse_c)
    lse_d, lse_t, best, kd_rows = zeros, zeros, zeros, zeros
    if kd_type == 1:
        dist = dist_logits.float()
        lse_d = torch.logsumexp(dist, dim=-1)
        best_idx = teacher_logits.float().argmax(dim=-1)
        kd_rows = lse_d - dist.gather(1, best_idx[:, None])[:, 0]
        best = best_idx.float()
    elif kd_type == 2:
        d, t = dist_logits.float() / tau, teacher_logits.float() / tau
        lse_d, lse_t = torch.logsumexp(d, dim=-1), torch.logsumexp(t, dim=-1)
        log_p = t - lse_t[:, None]
        kd_rows = (log_p.exp() * (log_p - (d - lse_d[:, None]))).sum(-1)
    row_loss = torch.stack([base_rows, kd_rows], dim=1)
    stats = torch.stack([lse_c, lse_d, lse_t, best], dim=1)
    return _combine(row_loss, kd_type, alpha, tau, B, K), stats


def _backward_reference(grad, cls_logits, dist_logits, targets, teacher_logits, stats, kd_type, alpha, tau):
    B, K = cls_logits.shape
    g = grad.float()
    base_scale, kd_scale = _scales(kd_type, alpha, tau, B, K)
    cls = cls_logits.float()
    if targets.is_floating_point():
        y = targets.float()
    else:
        y = F.one_hot(targets.long(), K).float()
    dcls = ((cls - stats[:, :1]).exp() * y.sum(-1, keepdim=True) - y) * (g * base_scale)
    ddist = cls_logits.new_empty(0)
    if kd_type == 1:
        onehot = F.one_hot(stats[:, 3].long(), K).float()
        ddist = ((dist_logits.float() - stats[:, 1:2]).exp() - onehot) * (g * kd_scale)
    elif kd_type == 2:
        p_d = (dist_logits.float() / tau - stats[:, 1:2]).exp()
        p_t = (teacher_logits.float() / tau - stats[:, 2:3]).exp()
        ddist = (p_d - p_t) * (g * kd_scale)
    return dcls.to(cls_logits.dtype), ddist.to(cls_logits.dtype) if kd_type != 0 else ddist


_backend.register(_backend.Op(
    name="distill_loss",
    reference=_backend.Impl(_forward_reference, _backward_reference),
    triton=_backend.Impl(_forward_triton, _backward_triton, _triton_supports) if triton is not None else None,
    preference={"default": ("triton",)},
))


# ----------------------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("deit_fast::distill_loss_fwd", mutates_args=())
def _distill_loss_fwd(cls_logits: Tensor, dist_logits: Tensor | None, targets: Tensor, teacher_logits: Tensor | None,
                      kd_type: int, alpha: float, tau: float) -> tuple[Tensor, Tensor]:
    _, impl = _backend.choose("distill_loss", cls_logits, dist_logits, targets, teacher_logits)
    loss, stats = impl.forward(cls_logits, dist_logits, targets, teacher_logits, kd_type, alpha, tau)
    return loss.clone(), stats


@_distill_loss_fwd.register_fake
def _(cls_logits, dist_logits, targets, teacher_logits, kd_type, alpha, tau):
    return cls_logits.new_empty((), dtype=torch.float32), cls_logits.new_empty((cls_logits.shape[0], 4),
                                                                                 dtype=torch.float32)


@torch.library.custom_op("deit_fast::distill_loss_bwd", mutates_args=())
def _distill_loss_bwd(grad: Tensor, cls_logits: Tensor, dist_logits: Tensor | None, targets: Tensor,
                      teacher_logits: Tensor | None, stats: Tensor, kd_type: int, alpha: float,
                      tau: float) -> tuple[Tensor, Tensor]:
    _, impl = _backend.choose("distill_loss", cls_logits, dist_logits, targets, teacher_logits)
    return impl.backward(grad, cls_logits, dist_logits, targets, teacher_logits, stats, kd_type, alpha, tau)


@_distill_loss_bwd.register_fake
def _(grad, cls_logits, dist_logits, targets, teacher_logits, stats, kd_type, alpha, tau):
    ddist = torch.empty_like(cls_logits) if kd_type != 0 else cls_logits.new_empty(0)
    return torch.empty_like(cls_logits), ddist


def _setup_context(ctx, inputs, output):
    cls_logits, dist_logits, targets, teacher_logits, kd_type, alpha, tau = inputs
    ctx.kd_type, ctx.alpha, ctx.tau = kd_type, alpha, tau
    ctx.save_for_backward(cls_logits, dist_logits, targets, teacher_logits, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, dstats):
    cls_logits, dist_logits, targets, teacher_logits, stats = ctx.saved_tensors
    dcls, ddist = _distill_loss_bwd(grad, cls_logits, dist_logits, targets, teacher_logits, stats, ctx.kd_type,
                                    ctx.alpha, ctx.tau)
    return dcls, (ddist if ctx.kd_type != 0 else None), None, None, None, None, None


_distill_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public function


def _validate(cls_logits, dist_logits, targets, teacher_logits, distillation_type, alpha, tau) -> None:
    if distillation_type not in TYPES:
        raise ValueError(f"distillation_type must be one of {TYPES}, got {distillation_type!r}")
    if not isinstance(cls_logits, Tensor) or cls_logits.dim() != 2 or not cls_logits.is_floating_point():
        raise ValueError("cls_logits must be a (B, num_classes) floating-point tensor, got "
                         f"{getattr(cls_logits, 'shape', type(cls_logits).__name__)}")
    B, K = cls_logits.shape
    if K == 0:
        raise ValueError("cls_logits must have at least one class")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point():
        if targets.shape != (B, K):
            raise ValueError(f"soft targets must have cls_logits' shape {(B, K)}, got {tuple(targets.shape)}")
    elif targets.dtype in (torch.int64, torch.int32):
        if targets.shape != (B,):
            raise ValueError(f"integer targets must have shape ({B},), got {tuple(targets.shape)}")
        if targets.numel() and targets.device.type == "cuda" and not torch.compiler.is_compiling():
            # Checked on the device, so a training step never waits for the GPU here.
            torch._assert_async(((targets >= 0) & (targets < K)).all(), f"integer targets must lie in [0, {K})")
        elif targets.numel() and not torch.compiler.is_compiling() and (
                int(targets.min()) < 0 or int(targets.max()) >= K):
            raise ValueError(f"integer targets must lie in [0, {K}), got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
    else:
        raise ValueError(f"targets must be float soft targets or int64 labels, got dtype {targets.dtype}")
    for name, t in (("targets", targets),):
        if t.device != cls_logits.device:
            raise ValueError(f"{name} must be on cls_logits' device {cls_logits.device}, got {t.device}")
    if distillation_type != "none":
        for name, t in (("dist_logits", dist_logits), ("teacher_logits", teacher_logits)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} is required for distillation_type={distillation_type!r}")
            if t.shape != (B, K):
                raise ValueError(f"{name} must have cls_logits' shape {(B, K)}, got {tuple(t.shape)} (a teacher "
                                 "with another class count cannot distill this student)")
            if t.device != cls_logits.device:
                raise ValueError(f"{name} must be on cls_logits' device {cls_logits.device}, got {t.device}")
        if dist_logits.dtype != cls_logits.dtype:
            raise ValueError(f"dist_logits must have cls_logits' dtype {cls_logits.dtype}, got {dist_logits.dtype}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")


def distill_loss(cls_logits: Tensor, dist_logits: Tensor | None, targets: Tensor, teacher_logits: Tensor | None,
                 distillation_type: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> Tensor:
    """DeiT's DistillationLoss (losses.py) with timm's SoftTargetCrossEntropy as the base criterion, fused.

    Args:
        cls_logits: (B, K) class-head logits, any float dtype.
        dist_logits: (B, K) distillation-head logits, cls_logits' dtype; None for distillation_type "none".
        targets: (B, K) soft targets (mixup / label smoothing), or (B,) integer labels.
        teacher_logits: (B, K) teacher logits, any float dtype, no gradient; None for "none".
        distillation_type: "none" (base loss only), "hard" or "soft".
        alpha: weight of the distillation term; tau: softmax temperature of "soft".
    Returns:
        A float32 scalar. Gradients flow to cls_logits and dist_logits only.
    """
    _validate(cls_logits, dist_logits, targets, teacher_logits, distillation_type, alpha, tau)
    kd_type = _kd_code(distillation_type)
    if kd_type == 0:
        dist_logits = teacher_logits = None
    else:
        teacher_logits = teacher_logits.detach().to(cls_logits.dtype)
    targets = targets.detach()
    return _distill_loss_fwd(cls_logits, dist_logits, targets, teacher_logits, kd_type, float(alpha), float(tau))[0]
