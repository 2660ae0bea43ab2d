"""The batch preparation CUDA kernel on a GPU: identical to the PyTorch reference for identical draws (exactly
outside erased boxes, within float32 ulps of the noise inside), every output dtype and layout, odd and even batches."""

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
from timm.data import IMAGENET_DEFAULT_STD as STD

from deit_fast.ops import BatchPrepConfig, BatchPrepDraws, batch_prep, batch_prep_ref, sample_draws

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
def test_kernel_matches_reference(mode, B, dtype, channels_last, use_backend):
    """Kernel vs reference on the same draws."""
    use_backend("cuda", "cuda")
    rng = np.random.default_rng(B)
    images = torch.randint(0, 256, (B, 224, 224, 3), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 1000, (B,), device="cuda")
    config = BatchPrepConfig(erase_prob=0.5, mixup_alpha=0.8 if mode == "mixup" else 0.0,
                             cutmix_alpha=1.0 if mode == "cutmix" else 0.0, mix_prob=0.0 if mode == "none" else 1.0)
    draws = sample_draws(B, 224, 224, rng, config)
    out, targets = batch_prep(images, labels, 1000, draws, MEAN, STD, dtype, channels_last)
    ref = batch_prep_ref(images, draws, MEAN, STD, dtype, channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)
    clean = BatchPrepDraws(draws.mode, draws.lam, draws.box, torch.zeros(B, 4, dtype=torch.int32), draws.seed)
    out_clean, _ = batch_prep(images, labels, 1000, clean, MEAN, STD, dtype, channels_last)
    assert torch.equal(out_clean, batch_prep_ref(images, clean, MEAN, STD, dtype, channels_last))
    assert targets.shape == (B, 1000)
