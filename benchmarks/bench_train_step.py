"""A whole distillation training step from a uint8 batch already on the device, as `python -m deit_fast.train` runs it
against the same step built from timm's modules, timm's Mixup/RandomErasing and DeiT's loss (issue 8's target).

Both providers: the same student architecture and initial weights, the same convnet teacher (eval, no grad,
channels_last on GPUs), hard distillation (alpha 0.5), mixup 0.8 / cutmix 1.0 / smoothing 0.1, random erasing
(pixel, 0.25), fused AdamW; bf16 autocast on GPUs, float32 on CPUs.
- timm: timm.create_model(student) eager; x = normalize(uint8 -> float), timm RandomErasing on the batch, timm Mixup;
  DeiT's DistillationLoss formulas on timm's SoftTargetCrossEntropy.
- deit_fast: deit_fast.create_model(student) (fused layers, default dispatch); deit_fast.ops.batch_prep (one kernel
  from uint8 to the mixed, erased, normalized input and its soft targets) and deit_fast.ops.distill_loss.
Presets: GPU, DeiT-S distilled, RegNetY-16GF teacher (`regnety_160`), B=256, 224 px, 1000 classes; CPU, a 2-block
width-64 distilled DeiT at 32 px with patch 8, resnet18 teacher, B=8, 10 classes. extra_info: images_per_s.
"""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
from timm.data import IMAGENET_DEFAULT_STD as STD
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

import deit_fast
import deit_fast.bench
from deit_fast.ops import BatchPrep, distill_loss

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
if HAS_CUDA:
    STUDENT, STUDENT_KW, TEACHER, B, SIZE, K = "deit_small_distilled_patch16_224", {}, "regnety_160", 256, 224, 1000
else:
    STUDENT, STUDENT_KW = "deit_tiny_distilled_patch16_224", dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
    TEACHER, B, SIZE, K = "resnet18", 8, 32, 10


def _teacher():
    torch.manual_seed(1)
    teacher = timm.create_model(TEACHER, num_classes=K).to(DEVICE).eval().requires_grad_(False)
    return teacher.to(memory_format=torch.channels_last) if HAS_CUDA else teacher


def _make_step(student, teacher, prepare, loss_fn):
    """One training step: prepare(uint8, labels) -> (input, soft targets); loss_fn(cls, dist, targets, teacher)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)

    def step(images, labels):
        x, targets = prepare(images, labels)
        if HAS_CUDA:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            cls, dist = student(x)
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = loss_fn(cls, dist, targets, teacher_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _step_timm(student, teacher):
    mean = torch.tensor(MEAN, device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=DEVICE).view(1, 3, 1, 1)
    erasing = RandomErasing(probability=0.25, mode="pixel", device=DEVICE.type)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=K)
    base = SoftTargetCrossEntropy()
    np.random.seed(0)

    def prepare(images, labels):
        return mixup(erasing(images.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)), labels)

    def loss_fn(cls, dist, targets, teacher_logits):  # DeiT's DistillationLoss, hard, alpha 0.5
        return 0.5 * base(cls, targets) + 0.5 * F.cross_entropy(dist, teacher_logits.argmax(dim=1))

    return _make_step(student, teacher, prepare, loss_fn)


def _step_deit_fast(student, teacher):
    prep = BatchPrep(K, MEAN, STD, dtype=torch.float32, seed=0)

    def loss_fn(cls, dist, targets, teacher_logits):
        return distill_loss(cls.float(), dist.float(), targets, teacher_logits.float(), "hard", 0.5, 1.0)

    return _make_step(student, teacher, prep, loss_fn)


@pytest.mark.parametrize("provider", ["timm", "deit_fast"])
def bench_distill_train_step(provider, run_benchmark, benchmark):
    benchmark.group = f"distill_train-step-{str(DTYPE).removeprefix('torch.')}-{STUDENT}-{TEACHER}-B{B}-{SIZE}px"
    torch.manual_seed(0)
    make = deit_fast.create_model if provider == "deit_fast" else timm.create_model
    student = make(STUDENT, num_classes=K, img_size=SIZE, drop_path_rate=0.1, **STUDENT_KW).to(DEVICE).train()
    student.distilled_training = True
    teacher = _teacher()
    step = (_step_deit_fast if provider == "deit_fast" else _step_timm)(student, teacher)
    images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, K, (B,), device=DEVICE)
    flops = 3 * deit_fast.bench.model_flops(student, SIZE) * B  # the student's forward + backward
    run_benchmark(lambda: step(images, labels), images.numel(), flops=flops, provider=provider, backend=provider,
                  op="distill_train", mode="step", images=B)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(B * benchmark.extra_info["repeat"] / benchmark.stats.stats.median,
                                                     1)
