"""The input pipelines: DALI (GPU decoding, or CPU mode from the same graph) and a torchvision/timm fallback, behind
one interface. Both yield (images, labels): images uint8 (B, H, W, 3), labels int64 (B,), on the GPU for DALI's GPU
mode and on the CPU otherwise; normalization, random erasing and mixup happen afterwards in deit_fast.ops.batch_prep.

Training recipe (DeiT's, as timm's create_transform builds it): random-resized crop (scale 0.08-1, ratio 3/4-4/3)
with bicubic resizing, horizontal flip, RandAugment rand-m9-mstd0.5-inc1. No color jitter in either pipeline: DeiT's
recipe has none (timm turns it off under RandAugment), and with RandAugment off the fallback is not given timm's
default jitter of 0.4 either, so both pipelines stay one recipe. Evaluation: resize the shorter side to
size / 0.875 (bicubic), center crop. Which images a rank reads each epoch comes from a sampler (RASampler for repeated
augmentation, else a shuffled shard); training drops the last partial batch.

DALI's RandAugment is timm's op set (the 15 'inc1' ops, each applied with probability 0.5, two per image), with
timm's magnitude ranges and timm's per-op magnitude noise (N(9, 0.5) clipped to [0, 10], drawn per op application,
quantized to 0.1); each op at a given magnitude gives timm's pixels (the colour ops within 1, tested). What remains
different, measured only statistically: filled pixels after geometric ops are 128 gray (timm: the mean pixel
124/116/104); Equalize follows OpenCV's formula (timm: PIL's); the resampling kernels of crop-resize, rotate, shear and
translate are DALI's, not PIL's; a posterize to 0 bits (level 10) keeps 1 bit (Pillow >= 11 refuses 0 bits, and the
fallback then draws the augmentation again).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from deit_fast.data.samplers import RASampler, ShardSampler
from deit_fast.data.scan import ScanResult, check_image, scan_imagefolder

logger = logging.getLogger("deit_fast")

PIPELINES = ("auto", "dali", "torchvision")
EVAL_CROP_RATIO = 0.875


def dali_available() -> str | None:
    """None when DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"DALI is not installed ({e}); pip install 'deit_fast[dali]'"
    return None


# ----------------------------------------------------------------------------------------------------------------
# DALI


def _rand_augment_ops():
    """timm's 'inc1' RandAugment ops with timm's magnitude ranges (each range is the op's strength at level 10), plus
    as many identities (each op applies with probability 0.5, as timm's default). Equalize and sharpness are DALI's
    own, written with the operators' current names (DALI 2.4's versions call deprecated aliases and warn on every
    build); posterize keeps timm's bit count (DALI's keeps 4 + level * 0.4 bits, the opposite direction)."""
    import nvidia.dali.fn as fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    def posterize_bits(level):  # timm's PosterizeIncreasing: 4 - int(level * 4 / 10) bits kept (0 -> 1, as DALI's)
        bits = max(1, 4 - int(float(level) * 4 / RA_MAX_LEVEL))
        return np.array(np.uint8(255) ^ np.uint8(2 ** (8 - bits) - 1), dtype=np.uint8)

    posterize = a.posterize.augmentation(mag_range=(0, RA_MAX_LEVEL), mag_to_param=posterize_bits)
    ops = [a.auto_contrast, equalize, a.invert, a.rotate, posterize,
           a.solarize, a.solarize_add, a.color, a.contrast, a.brightness, sharpness, a.shear_x, a.shear_y,
           a.translate_x.augmentation(mag_range=(0.0, 0.45)), a.translate_y.augmentation(mag_range=(0.0, 0.45))]
    identities = [a.identity.augmentation(name=f"identity_{i}") for i in range(len(ops))]
    return ops + identities


RA_MAX_LEVEL = 10  # timm's _LEVEL_DENOM: magnitudes run 0..10
RA_BINS_PER_LEVEL = 10  # the per-op magnitude noise is quantized to 0.1


def _apply_rand_augment(images, ops, *, n: int, m: float, mstd: float, **kwargs):
    """timm's RandAugment on a DALI batch: n ops per image, each drawn uniformly from `ops` (with replacement), each
    with its own magnitude from N(m, mstd) clipped to [0, 10] (timm's mstd noise; DALI's apply_rand_augment has one
    fixed magnitude) and a random sign for the ops that negate."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug.core import select, signed_bin

    num_bins = RA_MAX_LEVEL * RA_BINS_PER_LEVEL + 1
    op_idx = fn.random.uniform(values=list(range(len(ops))), shape=(n,), dtype=types.INT32)
    level = fn.random.normal(mean=float(m), stddev=float(mstd), shape=(n,)) if mstd > 0 else \
        fn.random.uniform(range=[float(m), float(m)], shape=(n,))
    level = dmath.clamp(level, 0.0, float(RA_MAX_LEVEL))
    bins = fn.cast(dmath.floor(level * float(RA_BINS_PER_LEVEL) + 0.5), dtype=types.INT32)
    mag_bin = signed_bin(bins, shape=(n,))
    for k in range(n):
        images = select(ops, op_idx[k], data=images, magnitude_bin=mag_bin[k], num_magnitude_bins=num_bins,
                        **kwargs)
    return images


def _dali_graph(source, *, train: bool, size: int, device: str, auto_augment: bool, batch_size: int,
                num_threads: int, device_id: int | None, seed: int, crop_scale=(0.08, 1.0), hflip: float = 0.5,
                eval_crop_ratio: float = EVAL_CROP_RATIO):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT64])
        decoder = "mixed" if device == "gpu" else "cpu"
        # adjust_orientation=False: DALI would rotate by the EXIF orientation tag, PIL (torchvision's ImageFolder,
        # DeiT's reference, the fallback pipeline) does not; the two pipelines must see the same pixels.
        if train:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=list(crop_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10, adjust_orientation=False)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            if hflip > 0:
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=hflip))
            if auto_augment:  # rand-m9-mstd0.5-inc1
                images = _apply_rand_augment(images, _rand_augment_ops(), n=2, m=9, mstd=0.5, shape=[size, size],
                                             fill_value=128)  # one value for all channels in DALI
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, resize_shorter=int(size / eval_crop_ratio), interp_type=types.INTERP_CUBIC,
                               antialias=True)
            images = fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")
        if device == "gpu":
            labels = labels.gpu()
        return images, labels

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=2)
    pipe.build()
    return pipe


class _FileBatches:
    """DALI's external source: the encoded files and labels of batch `iteration` of epoch `first_epoch + epoch_idx`,
    as the sampler orders them. A pure function of its arguments, so DALI's read-ahead is safe."""

    def __init__(self, samples, sampler, batch_size: int, drop_last: bool, first_epoch: int, skip_batches: int,
                 excluded: set[str]):
        self.samples, self.sampler, self.batch_size, self.drop_last = samples, sampler, batch_size, drop_last
        self.first_epoch, self.skip_batches, self.excluded = first_epoch, skip_batches, excluded
        self._epoch, self._indices = None, []

    def batch_indices(self, epoch: int, step: int) -> list[int]:
        if epoch != self._epoch:
            self._indices, self._epoch = self.sampler.indices(epoch), epoch
        return self._indices[step * self.batch_size:(step + 1) * self.batch_size]

    def steps(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __call__(self, info):
        step = info.iteration + (self.skip_batches if info.epoch_idx == 0 else 0)
        if step >= self.steps():
            raise StopIteration
        indices = self.batch_indices(self.first_epoch + info.epoch_idx, step)
        files, labels = [], []
        for i in indices:
            path, label = self.samples[i]
            data = None
            if path not in self.excluded:
                try:
                    data = np.fromfile(path, dtype=np.uint8)
                except OSError as e:
                    logger.warning("deit_fast data: cannot read %s (%s); using another image of the batch", path, e)
                    self.excluded.add(path)
            files.append(data)
            labels.append(np.array([label], dtype=np.int64))
        # An unreadable or excluded file takes the place of a readable one of the same batch (or, when none is, of
        # the first usable image of the dataset): a run never stops on one file.
        good = [j for j, f in enumerate(files) if f is not None and f.size]
        if not good:
            path, label = next(((p, lb) for p, lb in self.samples if p not in self.excluded), (None, None))
            if path is None:
                raise RuntimeError("every image of the dataset has been excluded as unreadable")
            files = [np.fromfile(path, dtype=np.uint8)] * len(indices)
            labels = [np.array([label], dtype=np.int64)] * len(indices)
            good = [0]
        for j, f in enumerate(files):
            if f is None or not f.size:
                files[j], labels[j] = files[good[j % len(good)]], labels[good[j % len(good)]]
        return files, labels


class DaliLoader:
    """Batches of (uint8 (B, H, W, 3), int64 (B,)) from a DALI pipeline; `device` 'gpu' decodes on the GPU ('mixed'),
    'cpu' runs the same graph on the CPU (device_id=None). A batch that fails to decode (a file the scan passed but DALI
    rejects) is checked file by file; the bad files are excluded with a warning, the pipeline is rebuilt, and the
    epoch goes on from that batch."""

    def __init__(self, samples, sampler, *, batch_size: int, size: int, train: bool, device: str = "cpu",
                 device_id: int | None = None, num_threads: int = 2, seed: int = 0, auto_augment: bool = True,
                 crop_scale=(0.08, 1.0), hflip: float = 0.5, eval_crop_ratio: float = EVAL_CROP_RATIO):
        self.samples, self.sampler = samples, sampler
        self.crop_scale, self.hflip, self.eval_crop_ratio = tuple(crop_scale), hflip, eval_crop_ratio
        self.batch_size, self.size, self.train, self.device = batch_size, size, train, device
        self.device_id = device_id if device == "gpu" else None
        self.num_threads, self.seed, self.auto_augment = num_threads, seed, auto_augment
        self.epoch, self.start_step, self.excluded = 0, 0, set()
        self._live = None  # the pipeline that can serve the next epoch without a rebuild

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return _steps(len(self.sampler), self.batch_size, self.train)

    def _build(self, first_step: int):
        source = _FileBatches(self.samples, self.sampler, self.batch_size, self.train, self.epoch, first_step,
                              self.excluded)
        # A different seed per (epoch, start) so a rebuilt pipeline does not replay the same augmentations.
        pipe = _dali_graph(source, train=self.train, size=self.size, device=self.device,
                           auto_augment=self.auto_augment and self.train, batch_size=self.batch_size,
                           num_threads=self.num_threads, device_id=self.device_id,
                           seed=(self.seed * 1000003 + self.epoch * 9973 + first_step) % (2**31),
                           crop_scale=self.crop_scale, hflip=self.hflip, eval_crop_ratio=self.eval_crop_ratio)
        return pipe, source

    def _start(self, first_step: int) -> dict:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe, source = self._build(first_step)
        iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        return {"pipe": pipe, "source": source, "iterator": iterator, "next": (self.epoch, first_step)}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step, self.start_step = self.start_step, 0
        failed_step = None
        while step < len(self):
            # Building a pipeline (tracing the RandAugment graph) takes about a second: a pipeline that finished an
            # epoch serves the next one (its source maps DALI's epoch counter to ours); any other start rebuilds.
            if self._live is None or self._live["next"] != (self.epoch, step):
                self._live = self._start(step)
            live, self._live = self._live, None  # not reusable until this epoch has been read to its end
            try:
                for batch in live["iterator"]:
                    yield batch[0]["images"], batch[0]["labels"].view(-1).long()
                    step += 1
            except RuntimeError as failure:
                if failed_step == step:  # the same batch failed again: skip it rather than retry forever
                    warnings.warn(f"deit_fast data: skipping batch {step} of epoch {self.epoch}, which DALI could "
                                  f"not decode twice ({str(failure).splitlines()[0][:200]})", stacklevel=2)
                    step += 1
                else:
                    failed_step = step
                    self._exclude_bad_files(live["source"].batch_indices(self.epoch, step), failure)
                continue
            live["next"] = (self.epoch + 1, 0)
            self._live = live
            return

    def _exclude_bad_files(self, indices, error) -> None:
        bad = []
        for i in indices:
            path = self.samples[i][0]
            if path not in self.excluded and (reason := check_image(path) or _dali_decodes(path)):
                bad.append(f"{path}: {reason}")
                self.excluded.add(path)
        if not bad:  # nothing identifiable: drop the whole batch's files rather than fail again
            for i in indices:
                self.excluded.add(self.samples[i][0])
            bad = [f"{self.samples[i][0]}: in a batch DALI failed on ({str(error).splitlines()[0][:200]})"
                   for i in indices]
        warnings.warn("deit_fast data: DALI could not decode a batch; excluded and continuing:\n" + "\n".join(bad),
                      stacklevel=3)


def _dali_decodes(path: str) -> str | None:
    """None when DALI's CPU decoder takes this file alone, else its error."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    data = np.fromfile(path, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), device="cpu",
                                 output_type=types.RGB)

    try:
        pipe = one()
        pipe.build()
        pipe.run()
    except RuntimeError as e:
        return f"DALI does not decode it ({str(e).splitlines()[0][:200]})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# torchvision / timm fallback


def to_rgb(image):
    """A PIL image as 8-bit RGB, the way DALI's decoders give it. Pillow's own convert('RGB') clips 16-bit
    grayscale (modes I;16*, I) to 255, which turns most of such an image white; here those are scaled by 255/65535
    and rounded, as DALI does. Everything else is convert('RGB') (palette, RGBA, CMYK, L, 1)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


class _ImageDataset(torch.utils.data.Dataset):
    """(uint8 (3, H, W), label) with timm's transforms; a file that fails to decode is logged once and replaced by
    the next usable one, so an epoch never stops on a bad file. Items are (epoch, index): the augmentation's random
    draws are seeded from (seed, epoch, index), so a sample is augmented the same way whichever worker reads it, and
    a run resumed mid-epoch sees the same images as an uninterrupted one."""

    def __init__(self, samples, transform, seed: int = 0):
        self.samples, self.transform, self.failed, self.seed = samples, transform, set(), seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        import random

        epoch, index = item if isinstance(item, tuple) else (0, item)
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.manual_seed(sample_seed)
        try:
            return self._load(index)
        finally:
            if saved is not None:  # the main process's generators belong to the training loop
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def _load(self, index: int):
        from PIL import Image

        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            if path in self.failed:
                continue
            try:
                with Image.open(path) as image:
                    image = to_rgb(image)
            except Exception as e:  # any decode failure: skip the file, never the run
                self.failed.add(path)
                logger.warning("deit_fast data: cannot decode %s (%s); using another image", path, e)
                continue
            return self._transform(image), label
        raise RuntimeError("no decodable image left in the dataset")

    def _transform(self, image):
        # timm's RandAugment 'mstd' can draw magnitude 10 for PosterizeIncreasing, i.e. 0 bits, which Pillow >= 11
        # rejects with a ValueError: draw the augmentation again (what older Pillow returned was a black image).
        for _ in range(9):
            try:
                return self.transform(image)
            except ValueError:
                continue
        return self.transform(image)


def _collate(batch):
    images = torch.stack([torch.as_tensor(np.asarray(image)) for image, _ in batch])  # (B, 3, H, W) uint8
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return images.permute(0, 2, 3, 1).contiguous(), labels


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


class TorchvisionLoader:
    """The same interface over a torch DataLoader with timm's create_transform (use_prefetcher=True: uint8 output)."""

    def __init__(self, samples, sampler, *, batch_size: int, size: int, train: bool, num_workers: int = 2,
                 seed: int = 0, auto_augment: bool = True, pin_memory: bool = False, crop_scale=(0.08, 1.0),
                 hflip: float = 0.5, eval_crop_ratio: float = EVAL_CROP_RATIO):
        from timm.data import create_transform

        transform = create_transform(size, is_training=train, use_prefetcher=True, interpolation="bicubic",
                                     auto_augment="rand-m9-mstd0.5-inc1" if (train and auto_augment) else None,
                                     crop_pct=eval_crop_ratio, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3),
                                     hflip=hflip, re_prob=0.0, color_jitter=None)
        self.sampler, self.train, self.batch_size = sampler, train, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.dataset = _ImageDataset(samples, transform, seed)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return _steps(len(self.sampler), self.batch_size, self.train)

    def __iter__(self):
        # The sampler's order is a function of the epoch, so a resumed epoch skips its first indices and reads the
        # same remaining batches without decoding the skipped ones.
        items = [(self.epoch, i) for i in self.sampler.indices(self.epoch)[self.start_step * self.batch_size:]]
        self.start_step = 0
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=items, num_workers=self.num_workers,
            collate_fn=_collate, drop_last=self.train, pin_memory=self.pin_memory, worker_init_fn=_seed_worker,
            persistent_workers=False)
        yield from loader


def _steps(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


# ----------------------------------------------------------------------------------------------------------------
# The one entry point


def build_loader(root: str | os.PathLike, *, batch_size: int, img_size: int, train: bool, pipeline: str = "auto",
                 device: str = "cpu", device_id: int | None = None, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 2, repeated_aug: int = 3, auto_augment: bool = True,
                 crop_scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, scan: ScanResult | None = None,
                 eval_crop_ratio: float = EVAL_CROP_RATIO, pin_memory: bool | None = None):
    """A loader over an ImageFolder split (`root` is e.g. data/train): yields (uint8 (B, H, W, 3), int64 (B,)).

    pipeline: 'dali', 'torchvision', or 'auto' (DALI when it imports, else torchvision with a notice).
    device: 'gpu' decodes on the GPU with DALI ('mixed'); 'cpu' runs everything on the CPU.
    repeated_aug: RASampler's repeats in training (DeiT: 3); 0 or 1 for a plain shuffled shard.
    auto_augment, crop_scale, hflip: the training recipe's RandAugment (on/off), random-resized-crop area range and
    horizontal-flip probability (DeiT: on, (0.08, 1), 0.5).
    eval_crop_ratio: evaluation resizes the shorter side to img_size / ratio, then center-crops (DeiT: 0.875).
    pin_memory: the fallback's batches in pinned memory (default: when CUDA is available); DALI ignores it.
    The loader has `len()` (batches per epoch on this rank), `set_epoch(epoch, start_step=0)`, and the scan result
    as `.scan` (classes, usable samples, excluded files).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size and img_size must be positive, got {batch_size} and {img_size}")
    if not 0 < eval_crop_ratio <= 1:
        raise ValueError(f"eval_crop_ratio must be in (0, 1], got {eval_crop_ratio}")
    if pipeline == "auto":
        reason = dali_available()
        pipeline = "torchvision" if reason else "dali"
        if reason:
            logger.warning("deit_fast data: %s; using the torchvision pipeline", reason)
    elif pipeline == "dali" and (reason := dali_available()):
        raise RuntimeError(reason)
    if device == "gpu" and pipeline != "dali":
        device = "cpu"  # the fallback decodes on the CPU; batches go to the GPU afterwards
    scan = scan or scan_imagefolder(Path(root))
    n = len(scan.samples)
    if train and repeated_aug > 1:
        sampler = RASampler(n, rank, world_size, seed=seed, num_repeats=repeated_aug)
    else:
        sampler = ShardSampler(n, rank, world_size, seed=seed, shuffle=train, drop_last=train)
    if train and len(sampler) < batch_size:
        raise ValueError(f"{root}: {len(sampler)} training images on this rank, fewer than one batch of {batch_size}")
    if pipeline == "dali":
        loader = DaliLoader(scan.samples, sampler, batch_size=batch_size, size=img_size, train=train, device=device,
                            device_id=device_id, num_threads=max(1, num_workers), seed=seed + rank,
                            auto_augment=auto_augment, crop_scale=crop_scale, hflip=hflip,
                            eval_crop_ratio=eval_crop_ratio)
    else:
        loader = TorchvisionLoader(scan.samples, sampler, batch_size=batch_size, size=img_size, train=train,
                                   num_workers=num_workers, seed=seed, auto_augment=auto_augment,
                                   pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                                   crop_scale=crop_scale, hflip=hflip, eval_crop_ratio=eval_crop_ratio)
    loader.scan, loader.pipeline, loader.device_kind = scan, pipeline, device
    # Evaluation pads every rank's share to the same length (as DistributedSampler); the padding comes last, so
    # counting the first real_samples images of an epoch counts each image once over all ranks.
    loader.real_samples = None if train else sampler.real_count
    return loader
