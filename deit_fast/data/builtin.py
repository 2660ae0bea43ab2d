"""Built-in datasets written once as ImageFolder JPEG trees, so the real reading and decoding path always runs.

digits: scikit-learn's bundled handwritten digits (1797 8x8 grayscale images, 10 classes), upscaled to 32x32 with
    bicubic interpolation and stored as RGB JPEGs (quality 95). Fixed split: every fifth image (index % 5 == 0) is
    validation (360), the rest training (1437).
photos: real photographs from scikit-image's bundled samples (astronaut, cat, coffee, rocket, Hubble deep field,
    immunohistochemistry, color wheel; camera, coins and moon as grayscale JPEGs), at ImageNet-like sizes: each source
    is a class, with deterministic crops, flips and rescales (shorter side 256-512) as its images; 8 training and 2
    validation images a class.
Both are written into the cache folder (deit_fast.data.scan.cache_dir()) through a temporary folder renamed into
place, so an interrupted first run never leaves a half-written tree.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from deit_fast.data.scan import cache_dir

DIGITS_VERSION = "digits-v1"
PHOTOS_VERSION = "photos-v1"


def _write_tree(name: str, root: str | os.PathLike | None, fill) -> Path:
    target = Path(root) if root is not None else cache_dir() / name
    if (target / "train").is_dir() and (target / "val").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():  # a partial tree from an older layout: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "train").is_dir():  # another process finished first
            return target
        raise
    return target


def digits_dataset(root: str | os.PathLike | None = None, size: int = 32) -> Path:
    """The digits ImageFolder tree (train/ and val/), written on first use; returns its folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    def fill(tmp: Path) -> None:
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            split = "val" if i % 5 == 0 else "train"
            folder = tmp / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
            gray.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)

    return _write_tree(f"{DIGITS_VERSION}-{size}", root, fill)


PHOTO_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "colorwheel", "camera", "coins", "moon")


def photos_dataset(root: str | os.PathLike | None = None) -> Path:
    """The photo ImageFolder tree (train/ and val/), written on first use; returns its folder."""
    import skimage.data
    from PIL import Image

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(0)
        for name in PHOTO_SOURCES:
            source = getattr(skimage.data, name)()
            image = Image.fromarray(source)
            image = image.convert("L") if image.mode in ("L", "1") else image.convert("RGB")
            for j in range(10):
                split = "val" if j >= 8 else "train"
                folder = tmp / split / name
                folder.mkdir(parents=True, exist_ok=True)
                w, h = image.size
                scale = rng.uniform(0.6, 1.0)
                cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = image.crop((left, top, left + cw, top + ch))
                if j % 2:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                short = int(rng.integers(256, 513))
                factor = short / min(crop.size)
                crop = crop.resize((max(1, round(crop.size[0] * factor)), max(1, round(crop.size[1] * factor))),
                                   Image.BICUBIC)
                crop.save(folder / f"{name}_{j}.jpg", quality=90)

    return _write_tree(PHOTOS_VERSION, root, fill)
