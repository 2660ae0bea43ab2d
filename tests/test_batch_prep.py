"""Batch preparation (normalize + random erasing + mixup/cutmix + cast, and the soft targets): the PyTorch reference
vs the CUDA kernel's math built for the host, for identical draws; the reference vs timm's own operations for the same
parameters; the draws' distributions vs timm's Mixup and RandomErasing (two-sample KS tests); bad input."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
from timm.data import IMAGENET_DEFAULT_STD as STD
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from timm.data.random_erasing import RandomErasing

from deit_fast.ops import BatchPrep, BatchPrepConfig, BatchPrepDraws, batch_prep, batch_prep_ref, sample_draws
from deit_fast.ops.fused_batch_prep import MODES, _scale_shift, mix_targets, noise_ref

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """csrc/batch_prep's math in the kernel's loop order, built for the host with contraction of a*b+c off."""
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    lib = tmp_path_factory.mktemp("host") / "batch_prep_host.so"
    subprocess.run([CXX, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "host" / "batch_prep_host.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def run_host(lib, images, draws):
    B, H, W, C = images.shape
    scale, shift = _scale_shift(MEAN, STD, C, "cpu")
    out = torch.empty(B, C, H, W)
    erase = draws.erase.contiguous()

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    lib.batch_prep_host(ptr(images.contiguous()), ptr(out), ptr(scale), ptr(shift), ptr(erase),
                        ctypes.c_float(draws.lam), ctypes.c_float(draws.one_minus_lam), MODES[draws.mode],
                        *draws.box, ctypes.c_uint32(draws.seed), B, H, W, C)
    return out


def forced(mode, B, H, W, rng, erase_all=False):
    """Draws with the mixing mode forced and every sample erased when asked (to exercise each path)."""
    config = BatchPrepConfig(erase_prob=1.0 if erase_all else 0.25,
                             mixup_alpha=0.8 if mode == "mixup" else 0.0, cutmix_alpha=1.0 if mode == "cutmix" else 0.0,
                             mix_prob=0.0 if mode == "none" else 1.0)
    return sample_draws(B, H, W, rng, config)


@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
@pytest.mark.parametrize("B", [1, 4, 5])
def test_reference_matches_kernel_math(host_kernel, mode, B):
    """Identical draws give identical outputs: exactly outside erased boxes, within a few float32 ulps of the noise
    inside them (log/cos differ by ulps between the C library and PyTorch)."""
    rng = np.random.default_rng(B)
    images = torch.randint(0, 256, (B, 20, 28, 3), dtype=torch.uint8)
    draws = forced(mode, B, 20, 28, rng, erase_all=True)
    assert draws.mode == mode
    host = run_host(host_kernel, images, draws)
    ref = batch_prep_ref(images, draws, MEAN, STD)
    torch.testing.assert_close(host, ref, atol=5e-6, rtol=5e-6)
    assert (draws.erase[:, 2] > 0).all()
    clean = BatchPrepDraws(draws.mode, draws.lam, draws.box, torch.zeros(B, 4, dtype=torch.int32), draws.seed)
    assert torch.equal(run_host(host_kernel, images, clean), batch_prep_ref(images, clean, MEAN, STD))


def test_reference_is_timms_operations():
    """With the same parameters the reference equals timm's Normalize, then mixup (x * lam + flip * (1 - lam)) or
    cutmix (box pasted from the flipped batch), in float32, then the cast; NHWC output is the same values."""
    rng = np.random.default_rng(0)
    images = torch.randint(0, 256, (6, 16, 24, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for mode in ("mixup", "cutmix"):
        draws = forced(mode, 6, 16, 24, rng)
        draws = BatchPrepDraws(draws.mode, draws.lam, draws.box, torch.zeros(6, 4, dtype=torch.int32), 0)
        expected = x.clone()
        if mode == "mixup":
            expected = expected.mul(draws.lam).add(x.flip(0).mul(1.0 - draws.lam))
        else:
            t, left, h, w = draws.box
            expected[:, :, t:t + h, left:left + w] = x.flip(0)[:, :, t:t + h, left:left + w]
        ref = batch_prep_ref(images, draws, MEAN, STD)
        torch.testing.assert_close(ref, expected, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(batch_prep_ref(images, draws, MEAN, STD, torch.bfloat16, channels_last=True),
                                   ref.to(torch.bfloat16).permute(0, 2, 3, 1))


def test_targets_are_timms():
    """Soft targets equal timm's mixup_target (label smoothing 0.1, mixed with the flipped batch by lam)."""
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    draws = BatchPrepDraws("mixup", 0.3, (0, 0, 0, 0), torch.zeros(6, 4, dtype=torch.int32), 0)
    torch.testing.assert_close(mix_targets(labels, 10, draws, 0.1), mixup_target(labels, 10, 0.3, 0.1))


def timm_mix_draws(n, H=224, W=224, seed=0):
    np.random.seed(seed)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
                  num_classes=10)
    out = []
    for _ in range(n):
        lam, use_cutmix = mixup._params_per_batch()
        if use_cutmix:
            _, lam = cutmix_bbox_and_lam((2, 3, H, W), lam, correct_lam=True)
        out.append((use_cutmix, lam))
    return out


def test_mix_distribution_matches_timm():
    """Cutmix/mixup switching, mixup's Beta(0.8, 0.8) lam and cutmix's area-corrected lam match timm's draws."""
    n = 4000
    theirs = timm_mix_draws(n)
    rng = np.random.default_rng(1)
    ours = [sample_draws(2, 224, 224, rng) for _ in range(n)]
    cut_theirs = np.array([lam for c, lam in theirs if c])
    cut_ours = np.array([d.lam for d in ours if d.mode == "cutmix"])
    mix_theirs = np.array([lam for c, lam in theirs if not c])
    mix_ours = np.array([d.lam for d in ours if d.mode == "mixup"])
    assert abs(len(cut_ours) / n - 0.5) < 0.03 and abs(len(cut_theirs) / n - 0.5) < 0.03
    assert stats.ks_2samp(cut_ours, cut_theirs).pvalue > 1e-3
    assert stats.ks_2samp(mix_ours, mix_theirs).pvalue > 1e-3


def timm_erase_boxes(n, H, W):
    erasing = RandomErasing(probability=0.25, mode="pixel", max_count=1, device="cpu")
    boxes = []
    for i in range(n):
        torch.manual_seed(i)
        img = torch.zeros(3, H, W)
        erasing(img)
        rows = torch.nonzero(img.abs().sum(0).sum(1)).flatten()
        cols = torch.nonzero(img.abs().sum(0).sum(0)).flatten()
        boxes.append((0, 0, 0, 0) if len(rows) == 0 else
                     (int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)))
    return np.array(boxes)


def test_erase_distribution_matches_timm():
    """Erasing probability, box area, aspect ratio and position match timm's RandomErasing ('pixel', p=0.25)."""
    import random

    random.seed(0)
    n, H, W = 3000, 64, 48
    theirs = timm_erase_boxes(n, H, W)
    ours = sample_draws(n, H, W, np.random.default_rng(2), BatchPrepConfig(mix_prob=0.0)).erase.numpy()
    for boxes in (theirs, ours):
        assert abs((boxes[:, 2] > 0).mean() - 0.25) < 0.03
    t, o = theirs[theirs[:, 2] > 0], ours[ours[:, 2] > 0]
    for column in range(4):
        assert stats.ks_2samp(t[:, column], o[:, column]).pvalue > 1e-3, column
    assert stats.ks_2samp(t[:, 2] * t[:, 3], o[:, 2] * o[:, 3]).pvalue > 1e-3


def test_noise_is_standard_normal():
    """The counter-based noise is standard normal (KS test) and differs between seeds and elements."""
    z = noise_ref(123, torch.arange(200_000)).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert not torch.equal(noise_ref(1, torch.arange(100)), noise_ref(2, torch.arange(100)))


def test_batch_prep_function_and_module():
    """batch_prep returns input and targets of the right shapes and dtypes; BatchPrep's draws are reproducible from
    its seed and its state_dict."""
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    prep = BatchPrep(5, MEAN, STD, dtype=torch.bfloat16, seed=3)
    state = prep.state_dict()
    x1, y1 = prep(images, labels)
    assert x1.shape == (4, 3, 8, 8) and x1.dtype == torch.bfloat16 and y1.shape == (4, 5)
    torch.testing.assert_close(y1.sum(1), torch.ones(4))
    prep.load_state_dict(state)
    x2, y2 = prep(images, labels)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_bad_input():
    """Wrong dtypes, shapes, labels and configuration values name the argument."""
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    draws = sample_draws(2, 8, 8, np.random.default_rng(0))
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="images must be a uint8"):
        batch_prep(images.float(), labels, 2, draws, MEAN, STD)
    with pytest.raises(ValueError, match="labels must be in"):
        batch_prep(images, torch.tensor([0, 7]), 2, draws, MEAN, STD)
    with pytest.raises(ValueError, match="labels must be an integer"):
        batch_prep(images, labels.float(), 2, draws, MEAN, STD)
    with pytest.raises(ValueError, match="draws must be"):
        batch_prep(images, labels, 2, sample_draws(3, 8, 8, np.random.default_rng(0)), MEAN, STD)
    with pytest.raises(ValueError, match="mean and std"):
        batch_prep(images, labels, 2, draws, MEAN[:2], STD)
    with pytest.raises(ValueError, match="dtype"):
        batch_prep(images, labels, 2, draws, MEAN, STD, dtype=torch.int8)
    with pytest.raises(ValueError, match="switch_prob"):
        BatchPrepConfig(switch_prob=1.5)
    with pytest.raises(TypeError, match="rng"):
        sample_draws(2, 8, 8, 0)
