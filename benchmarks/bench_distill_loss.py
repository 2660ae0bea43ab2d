"""DeiT's distillation loss, forward+backward: DeiT's own code (timm's SoftTargetCrossEntropy + losses.py formulas)
eager and under torch.compile, deit_fast's default dispatch and its Triton kernels.

Presets: GPU, bf16 logits, B=256, K=1000 (ImageNet), hard and soft; CPU, float32, B=8, K=1000.
Minimum bytes: forward reads cls, dist, teacher logits and float32 soft targets; backward reads them again and writes
the two logit gradients: (3 + 3 + 2) * B * K * element + 2 * B * K * 4.
"""

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from deit_fast import _backend
from deit_fast.ops import distill_loss

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE, B, PRESET = (torch.bfloat16, 256, "b256-k1000") if HAS_CUDA else (torch.float32, 8, "b8-k1000")
K = 1000
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def deit_loss(kind, alpha=0.5, tau=1.0):
    base_criterion = SoftTargetCrossEntropy()

    def loss(cls, dist, targets, teacher):
        base = base_criterion(cls, targets)
        if kind == "hard":
            kd = F.cross_entropy(dist, teacher.argmax(dim=1))
        else:
            kd = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                          log_target=True) * (tau * tau) / dist.numel()
        return base * (1 - alpha) + kd * alpha

    return loss


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("provider", ["torch", "torch_compile", "deit_fast", "triton"])
def bench_distill_loss(provider, kind, run_benchmark, benchmark, force_backend):
    benchmark.group = f"distill_loss-fwdbwd-{DTYPE_NAME}-{PRESET}-{kind}"
    cls = torch.randn(B, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dist = torch.randn(B, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    teacher = torch.randn(B, K, device=DEVICE, dtype=DTYPE)
    targets = torch.softmax(torch.randn(B, K, device=DEVICE), dim=-1)
    if provider == "torch":
        fn = deit_loss(kind)
    elif provider == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(deit_loss(kind), fullgraph=True)
    else:
        if provider == "triton":
            force_backend("distill_loss", "triton", cls)

        def fn(c, d, y, t):
            return distill_loss(c, d, y, t, kind)
    backend = _backend.choose("distill_loss", cls, dist, targets, teacher)[0] if provider in ("deit_fast", "triton") \
        else provider

    def step():
        fn(cls, dist, targets, teacher).backward()
        cls.grad = dist.grad = None

    bytes_moved = 8 * B * K * cls.element_size() + 2 * B * K * 4
    run_benchmark(step, bytes_moved, provider=provider, backend=backend, op="distill_loss", mode="fwdbwd",
                  kind=kind, dtype=DTYPE_NAME, preset=PRESET)
