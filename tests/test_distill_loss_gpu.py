"""Fused distillation loss on a CUDA GPU: bf16/fp16/fp32 logits vs float64 DeiT formulas with the ratio rule."""

import pytest
import torch
from test_distill_loss import check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("labels", [False, True], ids=["soft_targets", "labels"])
@pytest.mark.parametrize("kind", ["none", "hard", "soft"])
@pytest.mark.parametrize("B, K", [(1, 1), (256, 1000), (16, 21843)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_numerics_gpu(dtype, B, K, kind, labels, use_backend):
    """Triton kernels on GPU vs float64, including ImageNet-21k's class count (22 chunks)."""
    use_backend("triton", "cuda")
    cls = (torch.randn(B, K, device="cuda") * 3).to(dtype)
    dist = (torch.randn(B, K, device="cuda") * 3).to(dtype)
    teacher = (torch.randn(B, K, device="cuda") * 4).to(dtype)
    targets = (torch.randint(0, K, (B,), device="cuda") if labels
               else torch.softmax(torch.randn(B, K, device="cuda") * 2, dim=-1))
    check(cls, dist, targets, teacher, kind)
