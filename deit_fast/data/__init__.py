"""The input side: ImageFolder scanning, built-in datasets, samplers (DeiT's repeated augmentation), and the DALI and
torchvision pipelines behind one `build_loader`."""

from deit_fast.data.builtin import digits_dataset, photos_dataset
from deit_fast.data.pipelines import DaliLoader, TorchvisionLoader, build_loader, dali_available
from deit_fast.data.samplers import RASampler, ShardSampler
from deit_fast.data.scan import ScanResult, cache_dir, check_image, scan_imagefolder

__all__ = [
    "DaliLoader", "RASampler", "ScanResult", "ShardSampler", "TorchvisionLoader", "build_loader", "cache_dir",
    "check_image", "dali_available", "digits_dataset", "photos_dataset", "scan_imagefolder",
]
