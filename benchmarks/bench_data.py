"""The input side: the two pipelines' images/s on the same JPEGs and cores, and batch preparation on the batch.

data_pipeline: one training epoch of the built-in photo tree (80 real photographs, shorter side 256-512) at 224 px
  with DeiT's recipe (random-resized crop, flip, RandAugment), batch 16, 2 threads (DALI, CPU mode) or 2 worker
  processes (torchvision/timm fallback). extra_info: images_per_s.
batch_prep: from the uint8 NHWC batch to the model input and soft targets: deit_fast.ops.batch_prep (the CUDA kernel
  on GPUs, the reference on CPUs) against timm on the same tensors: normalization, RandomErasing('pixel', p=0.25) on
  the batch, and Mixup (mixup 0.8, cutmix 1.0, smoothing 0.1). Bytes: the uint8 batch read once and the output written
  once (the kernel's minimum). GPU: B=256, 224 px, bf16 output; CPU: B=8, 64 px, float32.
"""

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
from timm.data import IMAGENET_DEFAULT_STD as STD
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing

from deit_fast.data import build_loader, dali_available, photos_dataset
from deit_fast.ops import BatchPrep

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
B, SIZE = (256, 224) if HAS_CUDA else (8, 64)


@pytest.mark.parametrize("provider", ["dali", "torchvision"])
def bench_data_pipeline(provider, run_benchmark, benchmark, tmp_path_factory):
    if provider == "dali" and dali_available():
        pytest.skip(dali_available())
    benchmark.group = "data_pipeline-train-photos224"
    root = photos_dataset(tmp_path_factory.mktemp("photos"))
    loader = build_loader(root / "train", batch_size=16, img_size=224, train=True, pipeline=provider, num_workers=2,
                          repeated_aug=0)
    images = len(loader) * 16
    epochs = iter(range(10**9))

    def epoch():
        loader.set_epoch(next(epochs))  # consecutive epochs, as training reads them (DALI keeps its pipeline)
        for _ in loader:
            pass

    run_benchmark(epoch, images * 224 * 224 * 3, provider=provider, backend=provider, op="data_pipeline",
                  mode="train", images=images)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(images / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("provider", ["timm", "deit_fast"])
def bench_batch_prep(provider, run_benchmark, benchmark):
    benchmark.group = f"batch_prep-prep-{str(DTYPE).removeprefix('torch.')}-B{B}-{SIZE}px"
    images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, 1000, (B,), device=DEVICE)
    if provider == "deit_fast":
        prep = BatchPrep(1000, MEAN, STD, dtype=DTYPE, seed=0)

        def fn():
            return prep(images, labels)
    else:
        mean = torch.tensor(MEAN, device=DEVICE).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=DEVICE).view(1, 3, 1, 1)
        erasing = RandomErasing(probability=0.25, mode="pixel", device=DEVICE.type)
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
        np.random.seed(0)

        def fn():
            x = images.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
            x = erasing(x)
            return mixup(x, labels)
    out_bytes = B * SIZE * SIZE * 3 * torch.finfo(DTYPE).bits // 8
    run_benchmark(fn, images.numel() + out_bytes, provider=provider, backend=provider, op="batch_prep", mode="prep")
