"""Fused DeiT distillation loss: DeiT's formulas (losses.py) in float64 vs each backend with the ratio rule, every
distillation type, soft targets and integer labels, chunked rows, custom-op contracts, bad input."""

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from deit_fast.ops import distill_loss, distill_loss_ref
from deit_fast.testing import GRAD_RATIO, assert_close_ratio

TYPES = ["none", "hard", "soft"]


def make_inputs(B, K, dtype, labels=False):
    cls = (torch.randn(B, K) * 3).to(dtype)
    dist = (torch.randn(B, K) * 3).to(dtype)
    teacher = (torch.randn(B, K) * 4).to(dtype)
    targets = torch.randint(0, K, (B,)) if labels else torch.softmax(torch.randn(B, K) * 2, dim=-1)
    return cls, dist, targets, teacher


def check(cls, dist, targets, teacher, kind, alpha=0.3, tau=2.0):
    """Loss and both logit gradients vs float64 DeiT formulas, ratio rule vs the same formulas in float32."""
    leaves = [t.clone().requires_grad_() for t in (cls, dist)]
    leaves_hi = [t.double().requires_grad_() for t in (cls, dist)]
    leaves_pt = [t.clone().requires_grad_() for t in (cls, dist)]
    loss = distill_loss(leaves[0], leaves[1], targets, teacher, kind, alpha, tau)
    loss_hi = distill_loss_ref(*leaves_hi[:1], leaves_hi[1], targets, teacher, kind, alpha, tau, upcast=True)
    loss_pt = distill_loss_ref(leaves_pt[0], leaves_pt[1], targets, teacher, kind, alpha, tau)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_ratio(loss, loss_hi, loss_pt, name="loss")
    loss.backward()
    loss_hi.backward()
    loss_pt.backward()
    assert_close_ratio(leaves[0].grad, leaves_hi[0].grad, leaves_pt[0].grad.to(cls.dtype), ratio=GRAD_RATIO,
                       name="dcls")
    if kind == "none":
        assert leaves[1].grad is None
    else:
        assert_close_ratio(leaves[1].grad, leaves_hi[1].grad, leaves_pt[1].grad.to(dist.dtype), ratio=GRAD_RATIO,
                           name="ddist")


@pytest.mark.parametrize("labels", [False, True], ids=["soft_targets", "labels"])
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("B, K", [(1, 1), (3, 10), (64, 1000), (4, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_numerics(backend, dtype, B, K, kind, labels, use_backend):
    """Every backend, type and target form vs float64 (K=2500 runs three chunks of classes)."""
    use_backend(backend)
    check(*make_inputs(B, K, dtype, labels), kind)


def test_reference_is_deits_formula():
    """The reference equals DeiT's DistillationLoss written out with timm's SoftTargetCrossEntropy."""
    cls, dist, targets, teacher = make_inputs(8, 100, torch.float64)
    base = SoftTargetCrossEntropy()(cls, targets)
    T, alpha = 3.0, 0.1
    soft = F.kl_div(F.log_softmax(dist / T, dim=1), F.log_softmax(teacher / T, dim=1), reduction="sum",
                    log_target=True) * (T * T) / dist.numel()
    hard = F.cross_entropy(dist, teacher.argmax(dim=1))
    torch.testing.assert_close(distill_loss_ref(cls, dist, targets, teacher, "soft", alpha, T, upcast=True),
                               base * (1 - alpha) + soft * alpha)
    torch.testing.assert_close(distill_loss_ref(cls, dist, targets, teacher, "hard", 0.5, upcast=True),
                               base * 0.5 + hard * 0.5)
    torch.testing.assert_close(distill_loss_ref(cls, None, targets, None, "none", upcast=True), base)


def test_teacher_ties_take_first_argmax(use_backend):
    """Hard distillation follows torch.argmax on ties (the first maximum), also across class chunks."""
    use_backend("triton")
    K = 2500
    teacher = torch.zeros(2, K)
    teacher[:, [7, 1500]] = 5.0  # tie across two 1024-class chunks
    cls, dist, targets, _ = make_inputs(2, K, torch.float32)
    check(cls, dist, targets, teacher, "hard")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_and_compile(backend, use_backend):
    """opcheck of both custom ops; torch.compile(fullgraph=True) matches eager."""
    use_backend(backend)
    cls, dist, targets, teacher = make_inputs(4, 50, torch.float32)
    cls.requires_grad_()
    dist.requires_grad_()
    for kd_type in (0, 1, 2):
        args = (cls, dist if kd_type else None, targets, teacher if kd_type else None, kd_type, 0.5, 2.0)
        torch.library.opcheck(torch.ops.deit_fast.distill_loss_fwd.default, args)
    torch._dynamo.reset()

    def f(c, d):
        return distill_loss(c, d, targets, teacher, "soft", 0.5, 2.0)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(cls, dist), f(cls, dist))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(distillation_type="medium"), ValueError, "distillation_type must be one of"),
        (dict(teacher_logits=torch.randn(4, 11)), ValueError, "a teacher with another class count"),
        (dict(dist_logits=None), ValueError, "dist_logits is required"),
        (dict(targets=torch.randn(4, 9)), ValueError, "soft targets must have cls_logits' shape"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, r"integer targets must lie in \[0, 10\)"),
        (dict(targets=torch.ones(4, 10, dtype=torch.bool)), ValueError, "targets must be float soft targets"),
        (dict(cls_logits=torch.randn(4, 10, 1)), ValueError, "cls_logits must be a"),
        (dict(alpha=1.5), ValueError, "alpha must be in"),
        (dict(tau=0.0), ValueError, "tau must be positive"),
    ],
)
def test_bad_input(kwargs, error, message):
    """Wrong types, shapes, label ranges and a teacher with another class count get errors naming the argument."""
    cls, dist, targets, teacher = make_inputs(4, 10, torch.float32)
    args = dict(cls_logits=cls, dist_logits=dist, targets=targets, teacher_logits=teacher, distillation_type="hard")
    args.update(kwargs)
    with pytest.raises(error, match=message):
        distill_loss(**args)
