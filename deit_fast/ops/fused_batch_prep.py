"""Batch preparation, fused: the uint8 NHWC batch from the data pipeline -> the model's input and soft targets.

One pass (CUDA C++ kernel, csrc/batch_prep) does what DeiT's recipe does after decoding and augmentation:
    normalize       v = (u / 255 - mean) / std                                  (timm's Normalize)
    random erasing  per sample with probability 0.25, one box of area 0.02-1/3 of the image and log-uniform aspect
                    0.3-3.3, filled with per-pixel, per-channel standard normal noise   (timm RandomErasing 'pixel')
    mixup / cutmix  with the flipped batch: out_b = lam v_b + (1 - lam) v_{B-1-b}, or v_{B-1-b} inside a box
                    (timm Mixup, batch mode: mixup alpha 0.8, cutmix alpha 1.0, switch probability 0.5, cutmix lam
                    corrected to the box's area)
    cast            to the training dtype, NCHW or NHWC
and the soft targets: label smoothing 0.1, mixed with the same lam (timm's mixup_target).

Unfused (timm on GPU tensors) this is a uint8->float conversion, a normalization, per-sample erasing (a Python loop),
and mixup's flip/mul/add: about six passes over a float32 batch. Fused: the uint8 batch is read once and the output
written once.

The random draws (mixing mode, lam, box, erased boxes, noise seed) are made on the host by `sample_draws` from a
numpy Generator the caller owns, so the PyTorch reference (`batch_prep_ref`) and the kernel give the same output for
the same draws. The noise is a counter-based hash of (seed, element) turned normal by Box-Muller (see
csrc/batch_prep/batch_prep_math.cuh), so it needs no state and no noise tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from deit_fast import _backend

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = {"none": 0, "mixup": 1, "cutmix": 2}


@dataclass(frozen=True)
class BatchPrepDraws:
    """The random parameters of one batch.

    mode: 'none', 'mixup' or 'cutmix'; lam: the weight of each sample itself (after cutmix's area correction);
    box: cutmix's (top, left, height, width); erase: (B, 4) int32 (top, left, height, width) per sample, height 0 for
    no erasing; seed: the noise seed (uint32).
    """

    mode: str
    lam: float
    box: tuple[int, int, int, int]
    erase: Tensor
    seed: int
    one_minus_lam: float = field(init=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "one_minus_lam", 1.0 - self.lam)


@dataclass(frozen=True)
class BatchPrepConfig:
    """DeiT's defaults (main.py): mixup 0.8, cutmix 1.0, mixup-prob 1.0, switch 0.5, smoothing 0.1, reprob 0.25."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    erase_prob: float = 0.25
    erase_min_area: float = 0.02
    erase_max_area: float = 1 / 3
    erase_min_aspect: float = 0.3

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mix_prob", "switch_prob", "smoothing", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.erase_min_area <= self.erase_max_area <= 1:
            raise ValueError(f"erase areas must satisfy 0 < min <= max <= 1, got {self.erase_min_area}, "
                             f"{self.erase_max_area}")
        if not 0 < self.erase_min_aspect <= 1:
            raise ValueError(f"erase_min_aspect must be in (0, 1], got {self.erase_min_aspect}")


def _erase_box(rng: np.random.Generator, H: int, W: int, cfg: BatchPrepConfig) -> tuple[int, int, int, int]:
    """timm RandomErasing._erase's draw for one sample (count 1, up to 10 attempts), or (0, 0, 0, 0)."""
    if rng.random() > cfg.erase_prob:
        return 0, 0, 0, 0
    area = H * W
    log_aspect = (math.log(cfg.erase_min_aspect), math.log(1 / cfg.erase_min_aspect))
    for _ in range(10):
        target_area = rng.uniform(cfg.erase_min_area, cfg.erase_max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < W and h < H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    return 0, 0, 0, 0


def _mix_params(rng: np.random.Generator, cfg: BatchPrepConfig) -> tuple[float, bool]:
    """timm Mixup._params_per_batch: (lam, use_cutmix)."""
    lam, use_cutmix = 1.0, False
    if (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and rng.random() < cfg.mix_prob:
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = rng.random() < cfg.switch_prob
            alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        elif cfg.mixup_alpha > 0:
            alpha = cfg.mixup_alpha
        else:
            use_cutmix, alpha = True, cfg.cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
    return lam, use_cutmix


def _cutmix_box(rng: np.random.Generator, H: int, W: int, lam: float) -> tuple[tuple[int, int, int, int], float]:
    """timm rand_bbox + cutmix_bbox_and_lam (correct_lam=True): the box and the lam of its actual area."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
    top, bottom = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
    left, right = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
    lam = 1.0 - (bottom - top) * (right - left) / float(H * W)
    return (top, left, bottom - top, right - left), lam


def sample_draws(batch_size: int, height: int, width: int, rng: np.random.Generator,
                 config: BatchPrepConfig = BatchPrepConfig()) -> BatchPrepDraws:
    """Draw one batch's parameters on the host with timm's distributions (Mixup in batch mode, RandomErasing)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    erase = torch.tensor([_erase_box(rng, height, width, config) for _ in range(batch_size)],
                         dtype=torch.int32).reshape(batch_size, 4)
    lam, use_cutmix = _mix_params(rng, config)
    box, mode = (0, 0, 0, 0), "none"
    if lam != 1.0:
        mode = "mixup"
        if use_cutmix:
            box, lam = _cutmix_box(rng, height, width, lam)
            mode = "cutmix"
    return BatchPrepDraws(mode, lam, box, erase, int(rng.integers(0, 2**32)))


# ----------------------------------------------------------------------------------------------------------------
# Reference


def _hash32(x: Tensor) -> Tensor:
    """csrc/batch_prep's lowbias32 on int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def noise_ref(seed: int, index: Tensor) -> Tensor:
    """The kernel's standard normal noise for element indices `index` (int64 tensor) of a batch with this seed."""
    mask = 0xFFFFFFFF
    key = int(_hash32(torch.tensor(seed & mask, dtype=torch.int64)))
    index = index & mask
    h1 = _hash32(((index * 2) & mask) ^ key)
    h2 = _hash32(((index * 2 + 1) & mask) ^ key)
    u1 = ((h1 >> 8) + 1).to(torch.float32) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(torch.float32) * 5.9604644775390625e-08
    radius = torch.sqrt(torch.log(u1) * -2.0)
    return radius * torch.cos(u2 * 6.2831854820251465)


def _scale_shift(mean, std, C: int, device) -> tuple[Tensor, Tensor]:
    mean64 = torch.as_tensor(mean, dtype=torch.float64)
    std64 = torch.as_tensor(std, dtype=torch.float64)
    if mean64.numel() != C or std64.numel() != C:
        raise ValueError(f"mean and std must have {C} values (one per channel), got {mean64.numel()} and "
                         f"{std64.numel()}")
    if not bool((std64 > 0).all()):
        raise ValueError(f"std must be positive, got {std}")
    return ((1.0 / (255.0 * std64)).to(device, torch.float32), (-mean64 / std64).to(device, torch.float32))


def batch_prep_ref(images: Tensor, draws: BatchPrepDraws, mean: Sequence[float], std: Sequence[float],
                   dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Tensor:
    """The specification, in PyTorch on any device: float32 math in the kernel's order, then the cast."""
    B, H, W, C = images.shape
    scale, shift = _scale_shift(mean, std, C, images.device)
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    v = x * scale.view(1, C, 1, 1)
    v = v + shift.view(1, C, 1, 1)
    erase = draws.erase.to(images.device)
    if bool((erase[:, 2] > 0).any()):
        ys = torch.arange(H, device=images.device).view(1, H, 1)
        xs = torch.arange(W, device=images.device).view(1, 1, W)
        top, left, h, w = (erase[:, i].view(B, 1, 1) for i in range(4))
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & (h > 0)
        # v is contiguous (B, C, H, W), so an element's flat position is the index the kernel hashes; noise is made
        # for the erased elements only.
        index = inside.unsqueeze(1).expand(B, C, H, W).reshape(-1).nonzero().squeeze(1)
        v = v.contiguous()
        v.view(-1)[index] = noise_ref(draws.seed, index)
    if draws.mode == "mixup":
        lam = torch.tensor(draws.lam, dtype=torch.float32)
        one_minus = torch.tensor(draws.one_minus_lam, dtype=torch.float32)
        v = v * lam + v.flip(0) * one_minus
    elif draws.mode == "cutmix":
        top, left, h, w = draws.box
        v = v.clone()
        v[:, :, top:top + h, left:left + w] = v.flip(0)[:, :, top:top + h, left:left + w]
    out = v.to(dtype)
    return out.permute(0, 2, 3, 1).contiguous() if channels_last else out


def mix_targets(labels: Tensor, num_classes: int, draws: BatchPrepDraws, smoothing: float = 0.1) -> Tensor:
    """timm's mixup_target: smoothed one-hot targets mixed with the flipped batch's by lam; (B, num_classes) float32."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    labels = labels.long().view(-1, 1)
    y1 = torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels, on)
    y2 = torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels.flip(0), on)
    return y1 * draws.lam + y2 * (1.0 - draws.lam)


# ----------------------------------------------------------------------------------------------------------------
# Backends


def _forward_reference(images, draws, mean, std, dtype, channels_last):
    return batch_prep_ref(images, draws, mean, std, dtype, channels_last)


def _forward_cuda(images, draws, mean, std, dtype, channels_last):
    scale, shift = _scale_shift(mean, std, images.shape[-1], images.device)
    return torch.ops.deit_fast_cuda.batch_prep(
        images, scale, shift, draws.erase.to(images.device, torch.int32), float(draws.lam),
        float(draws.one_minus_lam), MODES[draws.mode], list(draws.box), int(draws.seed), dtype, bool(channels_last))


def _cuda_supports(images, *args) -> str | None:
    if not 1 <= images.shape[-1] <= 4:
        return f"images have {images.shape[-1]} channels; the kernel takes 1 to 4"
    return None


_backend.register(_backend.Op(
    name="batch_prep",
    reference=_backend.Impl(_forward_reference),
    cuda=_backend.Impl(_forward_cuda, supports=_cuda_supports),
    preference={"default": ("cuda",)},
))


def batch_prep(images: Tensor, labels: Tensor, num_classes: int, draws: BatchPrepDraws, mean: Sequence[float],
               std: Sequence[float], dtype: torch.dtype = torch.float32, channels_last: bool = False,
               smoothing: float = 0.1) -> tuple[Tensor, Tensor]:
    """Model input and soft targets from a uint8 batch.

    Args:
        images: (B, H, W, C) uint8, as the data pipeline delivers it.
        labels: (B,) integer class indices in [0, num_classes).
        draws: the batch's random parameters (`sample_draws`).
        mean, std: per channel, in [0, 1] units (timm's IMAGENET_DEFAULT_MEAN/STD convention).
        dtype: the output dtype (float32, float16 or bfloat16).
        channels_last: (B, H, W, C) output instead of (B, C, H, W).
        smoothing: label smoothing of the targets.
    Returns:
        (input, targets): input (B, C, H, W) or (B, H, W, C) in `dtype`; targets (B, num_classes) float32.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 (B, H, W, C) tensor, got "
                         f"{images.dtype if isinstance(images, Tensor) else type(images).__name__} "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else ''}")
    B = images.shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (B,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer ({B},) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if B and labels.device.type == "cuda":
        # Checked on the device, so a training step never waits for the GPU here.
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), f"labels must be in [0, {num_classes})")
    elif B and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {dtype}")
    if not isinstance(draws, BatchPrepDraws) or tuple(draws.erase.shape) != (B, 4):
        raise ValueError(f"draws must be a BatchPrepDraws for a batch of {B} (sample_draws)")
    _, impl = _backend.choose("batch_prep", images, draws, mean, std, dtype, channels_last)
    out = impl.forward(images, draws, mean, std, dtype, channels_last)
    return out, mix_targets(labels.to(images.device), num_classes, draws, smoothing)


class BatchPrep:
    """The training loop's batch preparation: draws from its own seeded Generator, then runs `batch_prep`."""

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float], *,
                 config: BatchPrepConfig = BatchPrepConfig(), dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, seed: int = 0):
        self.num_classes, self.mean, self.std, self.config = num_classes, tuple(mean), tuple(std), config
        self.dtype, self.channels_last = dtype, channels_last
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        B, H, W, _ = images.shape
        draws = sample_draws(B, H, W, self.rng, self.config)
        return batch_prep(images, labels, self.num_classes, draws, self.mean, self.std, self.dtype,
                          self.channels_last, self.config.smoothing)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
