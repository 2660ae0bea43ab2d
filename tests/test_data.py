"""The input side: built-in datasets, the scan of bad files, DeiT's repeated-augmentation sampler, and both pipelines
(DALI in CPU mode and the torchvision fallback): shapes, dtypes, labels, determinism, sharding, epoch semantics,
augmentation statistics, and bad data that never stops an epoch."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deit_fast.data import (
    RASampler,
    ScanResult,
    ShardSampler,
    build_loader,
    dali_available,
    digits_dataset,
    photos_dataset,
    scan_imagefolder,
)
from deit_fast.data import scan as scan_module
from deit_fast.data.pipelines import to_rgb

PIPELINES = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(dali_available() is not None,
                                                                            reason=str(dali_available())))]


@pytest.fixture(scope="module")
def digits():
    return digits_dataset()


@pytest.fixture(scope="module")
def photos():
    return photos_dataset()


def test_digits_tree(digits):
    """10 classes, the fixed 1437/360 split, 32x32 RGB JPEGs whose content is sklearn's digit of that label."""
    from sklearn.datasets import load_digits

    train, val = scan_imagefolder(digits / "train"), scan_imagefolder(digits / "val")
    assert train.classes == [str(i) for i in range(10)] and len(train.samples) == 1437 and len(val.samples) == 360
    original = load_digits()
    for path, label in val.samples[::37]:
        index = int(os.path.basename(path)[:4])
        assert index % 5 == 0 and original.target[index] == label
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
            small = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        assert np.corrcoef(small.ravel(), original.images[index].ravel())[0, 1] > 0.9


def test_photos_tree(photos):
    """Real photographs at ImageNet-like sizes, grayscale sources kept grayscale, 8 + 2 images a class."""
    train = scan_imagefolder(photos / "train")
    assert len(train.classes) == 10 and len(train.samples) == 80 and not train.bad
    sizes = [Image.open(p).size for p, _ in train.samples]
    assert min(min(s) for s in sizes) >= 256 and max(max(s) for s in sizes) > 400
    assert any(Image.open(p).mode == "L" for p, _ in train.samples)


def test_ra_sampler_is_deits():
    """Each image repeated 3 times, consecutive copies on consecutive ranks, floor(N // 256 * 256 / world) samples per
    rank, the same order for the same epoch and a new one for the next."""
    N, world = 1000, 4
    samplers = [RASampler(N, rank, world, seed=0) for rank in range(world)]
    per_rank = [s.indices(0) for s in samplers]
    assert all(len(p) == 768 // world for p in per_rank)
    padded_order = [i for step in zip(*[s.indices(0) for s in samplers], strict=True) for i in step]
    counts = np.bincount(padded_order, minlength=N)
    assert counts.max() <= 3
    # the three copies of an image sit on three different ranks
    for image in padded_order[:30:3]:
        assert sum(image in p[:10] for p in per_rank) >= 2
    assert per_rank[0] == RASampler(N, 0, world, seed=0).indices(0)
    assert per_rank[0] != samplers[0].indices(1)
    assert len(RASampler(100, 0, 1)) == 100  # under 256 images: DeiT's rounding would leave none


def test_shard_sampler_splits_disjointly():
    """Ranks get disjoint shards covering the shuffled order (drop_last), or padded shards in evaluation whose
    unpadded parts cover every image once."""
    shards = [ShardSampler(103, rank, 4, seed=1).indices(2) for rank in range(4)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 100 and all(len(s) == 25 for s in shards)
    padded = [ShardSampler(103, rank, 4, shuffle=False, drop_last=False).indices(0) for rank in range(4)]
    assert sorted({i for s in padded for i in s}) == list(range(103))
    for n, world in ((103, 4), (5, 8), (20, 3), (7, 1)):  # the padding is each share's tail: real_count skips it
        samplers = [ShardSampler(n, rank, world, shuffle=True, drop_last=False) for rank in range(world)]
        assert sorted(i for s in samplers for i in s.indices(3)[:s.real_count]) == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(10, 4, 4)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_eval_batches_have_the_right_images(pipeline, digits):
    """Evaluation batches: uint8 (B, 32, 32, 3), labels in the scan's order, pixels those of the stored images."""
    loader = build_loader(digits / "val", batch_size=16, img_size=32, train=False, pipeline=pipeline, num_workers=1)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 32, 32, 3) and labels.dtype == torch.int64
    scan = loader.scan
    assert labels.tolist() == [label for _, label in scan.samples[:16]]

    def expected(path):  # the evaluation recipe written out with PIL: shorter side to int(32 / 0.875), center crop
        image = Image.open(path).convert("RGB").resize((36, 36), Image.BICUBIC)
        return torch.from_numpy(np.array(image.crop((2, 2, 34, 34))))

    stored = torch.stack([expected(p) for p, _ in scan.samples[:16]])
    # timm's transforms are PIL's (equal up to rounding); DALI resamples with its own antialiased cubic filter.
    assert (images.float() - stored.float()).abs().mean() < (1.0 if pipeline == "torchvision" else 6.0)
    assert len(loader) == 360 // 16 + 1


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_train_determinism_and_epochs(pipeline, photos):
    """Training batches are reproducible for a seed and epoch, differ across seeds and epochs, and an epoch has
    len(loader) full batches (the last partial batch dropped)."""
    def first_batch(seed, epoch):
        loader = build_loader(photos / "train", batch_size=8, img_size=64, train=True, pipeline=pipeline, seed=seed,
                              num_workers=0 if pipeline == "torchvision" else 1)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 80 // 8 and all(b[0].shape[0] == 8 for b in batches)
        return batches[0]

    a, b = first_batch(1, 0), first_batch(1, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first_batch(2, 0)[0], a[0])
    assert not torch.equal(first_batch(1, 1)[1], a[1]) or not torch.equal(first_batch(1, 1)[0], a[0])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_sharding_across_ranks(pipeline, digits):
    """Two ranks read disjoint halves of an evaluation split and together cover it."""
    seen = []
    for rank in range(2):
        loader = build_loader(digits / "val", batch_size=30, img_size=32, train=False, pipeline=pipeline, rank=rank,
                              world_size=2, num_workers=1)
        seen.append(torch.cat([labels for _, labels in loader]))
    assert len(seen[0]) == len(seen[1]) == 180
    expected = np.bincount([label for _, label in scan_imagefolder(digits / "val").samples], minlength=10)
    assert np.array_equal(np.bincount(torch.cat(seen).numpy(), minlength=10), expected)


@pytest.mark.parametrize("auto_augment, tolerance", [(False, 0.04), (True, 0.05)], ids=["crop_flip", "randaugment"])
def test_augmentation_statistics_match_timm(auto_augment, tolerance, photos):
    """DALI's training recipe and timm's (the fallback) give images with the same pixel statistics over eight epochs
    of photos at 64 px: per-channel mean and standard deviation within 4% with crop and flip alone, within 5% with
    RandAugment. Measured (seed 3): crop+flip means 117.4/101.6/97.1 (DALI) against 117.8/101.4/98.7 (timm), standard
    deviations within 1%; with RandAugment means 119.7/111.8/109.5 against 119.0/108.7/107.3, standard deviations
    2.5-3.1% lower: DALI fills uncovered pixels with 128 on every channel (timm: the mean pixel 124/116/104),
    equalizes with OpenCV's formula and resamples with its own kernels. (With DALI's posterize going the wrong way
    and one fixed magnitude, as before, the RandAugment means were 122.2/114.3/111.6, deviations 3-5% lower.)"""
    if dali_available():
        pytest.skip(dali_available())
    stats = {}
    for pipeline in ("dali", "torchvision"):
        loader = build_loader(photos / "train", batch_size=16, img_size=64, train=True, pipeline=pipeline, seed=3,
                              num_workers=1, repeated_aug=3, auto_augment=auto_augment)
        pixels = torch.cat([images.float().reshape(-1, 3) for epoch in range(8)
                            for images, _ in (loader.set_epoch(epoch) or loader)])
        stats[pipeline] = (pixels.mean(0), pixels.std(0))
    for a, b in zip(stats["dali"], stats["torchvision"], strict=True):
        assert ((a - b).abs() / b).max() < tolerance, (a, b)


def _dali_run(graph, inputs):
    """Outputs of a one-sample CPU DALI pipeline whose graph takes the uint8 HWC image `inputs`."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(inputs), num_threads=1, device_id=None, seed=5)
    def pipe():
        return graph(fn.external_source(source=lambda: list(inputs), batch=True, layout="HWC"))

    pipeline = pipe()
    pipeline.build()
    return [np.array(t) for t in pipeline.run()[0]]


RA_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
          "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
          "TranslateXRel", "TranslateYRel"]


@pytest.mark.skipif(dali_available() is not None, reason=str(dali_available()))
@pytest.mark.parametrize("level", [9.0, 7.4])
@pytest.mark.parametrize("index, name", list(enumerate(RA_OPS)))
def test_dali_rand_augment_ops_are_timms(index, name, level, monkeypatch):
    """Each DALI RandAugment op at a given magnitude gives timm's op's pixels: the colour ops exactly or within 1,
    the geometric ones up to resampling at the edges with the opposite sign (PIL maps output to input, DALI input
    to output; both negate at random, so the distributions are the same). Equalize is OpenCV's formula, not PIL's:
    only checked to change the image."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    import timm.data.auto_augment as taa
    from nvidia.dali.auto_aug.core import signed_bin

    from deit_fast.data.pipelines import RA_BINS_PER_LEVEL, RA_MAX_LEVEL, _rand_augment_ops

    monkeypatch.setattr(taa, "_randomly_negate", lambda v: v)
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    if name == "SharpnessIncreasing":  # a ramp is its own sharpened image: give the filter texture
        image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    geometric = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    sign = int(geometric and name != "Rotate")  # DALI's rotate turns the way PIL's does

    def graph(data):
        def constant(v):
            return fn.random.uniform(values=[v], dtype=types.INT32)
        magnitude = signed_bin(constant(round(level * RA_BINS_PER_LEVEL)), random_sign=constant(sign))
        return _rand_augment_ops()[index](data, magnitude_bin=magnitude, shape=[48, 64], fill_value=128,
                                           num_magnitude_bins=RA_MAX_LEVEL * RA_BINS_PER_LEVEL + 1)

    ours = _dali_run(graph, [image])[0].astype(int)
    theirs = np.array(taa.AugmentOp(name, prob=1.0, magnitude=level, hparams={"img_mean": (128,) * 3})(
        Image.fromarray(image))).astype(int)
    diff = np.abs(ours - theirs)
    if name == "SharpnessIncreasing":  # PIL leaves the border pixels as they are
        diff = diff[1:-1, 1:-1]
    if name == "Equalize":
        assert np.abs(ours - image).mean() > 1
    elif geometric:
        assert diff.mean() < 1.5 and np.abs(ours - image).mean() > 10, diff.mean()
    else:
        assert diff.max() <= 1 and np.abs(ours - image).mean() > 1, diff.max()


@pytest.mark.skipif(dali_available() is not None, reason=str(dali_available()))
def test_dali_rand_augment_magnitudes_are_timms():
    """Every op application draws its own magnitude from N(9, 0.5) clipped to [0, 10], as timm's mstd0.5: read back
    through SolarizeAdd alone (which adds int(level * 11) to dark pixels) on black images."""
    from deit_fast.data.pipelines import _apply_rand_augment, _rand_augment_ops

    solarize_add = _rand_augment_ops()[6]
    black = [np.zeros((4, 4, 3), np.uint8)] * 256
    out = _dali_run(lambda data: _apply_rand_augment(data, [solarize_add], n=1, m=9, mstd=0.5), black)
    levels = np.array([o[0, 0, 0] for o in out]) / 11.0
    assert all((o == o[0, 0, 0]).all() for o in out)  # one magnitude per image
    assert levels.max() <= 10.0 and abs(levels.mean() - 8.95) < 0.1 and 0.4 < levels.std() < 0.6
    assert len(np.unique(levels)) > 5  # not one fixed magnitude


# ---------------------------------------------------------------------------------------------- bad data


def _jpeg(array, mode=None, **kw):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, "JPEG", **kw)
    return buffer.getvalue()


@pytest.fixture
def bad_tree(tmp_path):
    rng = np.random.default_rng(0)
    good = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    root = tmp_path / "train"
    files = {
        "a/good_0.jpg": _jpeg(good), "a/good_1.jpg": _jpeg(good[::-1].copy()),
        "a/good_2.jpg": _jpeg(good[:, ::-1].copy()),
        "a/gray.jpg": _jpeg(good[:, :, 0].copy()), "a/cmyk.jpg": _jpeg(good, "CMYK"),
        "b/tiny.jpg": _jpeg(good[:1, :1].copy()), "b/truncated.jpg": _jpeg(good)[:400],
        "b/corrupt.jpg": _jpeg(good)[:200] + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)),
        "b/empty.jpg": b"", "b/good_3.jpg": _jpeg(good),
    }
    png = io.BytesIO()
    Image.fromarray(good).save(png, "PNG")
    files["b/png_named.jpg"] = png.getvalue()
    gif = io.BytesIO()
    Image.fromarray(good).convert("P").save(gif, "GIF")
    files["a/gif_named.jpg"] = gif.getvalue()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "c").mkdir()  # an empty class folder
    os.symlink(root / "missing.jpg", root / "a" / "dangling.jpg")  # unreadable (root can read any mode bits)
    return root


def test_scan_excludes_bad_files_once(bad_tree, monkeypatch):
    """Corrupt, truncated, empty, GIF and unreadable files are excluded with one warning listing them; grayscale,
    CMYK, tiny and PNG-named-.jpg files are kept; the empty class keeps its index; a rescan opens no file."""
    with pytest.warns(UserWarning) as record:
        result = scan_imagefolder(bad_tree)
    assert len(record) == 1
    bad = {os.path.basename(p) for p, _ in result.bad}
    assert bad == {"truncated.jpg", "corrupt.jpg", "empty.jpg", "gif_named.jpg", "dangling.jpg"}
    kept = {os.path.basename(p) for p, _ in result.samples}
    assert {"gray.jpg", "cmyk.jpg", "tiny.jpg", "png_named.jpg"} <= kept
    assert result.classes == ["a", "b", "c"] and result.empty_classes == ["c"]
    for name in bad:
        assert name in str(record[0].message)
    opened = []
    monkeypatch.setattr(scan_module, "check_image", lambda p: opened.append(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan_imagefolder(bad_tree)
    assert opened == []


@pytest.fixture
def formats_tree(tmp_path):
    """One class per image format both pipelines decode (the same 36x46 picture, saved in each), some under names
    that do not say their format, plus a text file that starts like a BMP."""
    y, x = np.mgrid[0:36, 0:46] / 36.0
    picture = Image.fromarray((np.stack([y, x, 0.5 + 0.5 * np.sin(6 * (x + y))], -1) * 200 + 20).astype(np.uint8))
    saves = {
        "bmp/a.bmp": (picture, "BMP", {}), "bmp_gray/a.bmp": (picture.convert("L"), "BMP", {}),
        "webp/a.webp": (picture, "WEBP", {"lossless": True}), "webp_rgba/a.jpg": (picture.convert("RGBA"), "WEBP",
                                                                                   {"lossless": True}),
        "tiff/a.tif": (picture, "TIFF", {"compression": "tiff_lzw"}), "pgm/a.pgm": (picture.convert("L"), "PPM", {}),
        "ppm/a.ppm": (picture, "PPM", {}), "jp2/a.jp2": (picture, "JPEG2000", {"irreversible": False}),
        "png_palette/a.png": (picture.convert("P"), "PNG", {}), "png_rgba/a.png": (picture.convert("RGBA"), "PNG", {}),
    }
    root = tmp_path / "formats"
    for rel, (image, fmt, kw) in saves.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, fmt, **kw)
    gray16 = np.asarray(picture.convert("L"), dtype=np.uint16) * 257  # 16-bit: 8-bit gray x 65535/255
    (root / "png_gray16").mkdir()
    Image.fromarray(gray16).save(root / "png_gray16" / "a.png")
    exif = picture.getexif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90 degrees": PIL (and so timm, DeiT) ignores it, DALI must too
    (root / "jpeg_exif").mkdir()
    picture.save(root / "jpeg_exif" / "a.jpg", "JPEG", quality=98, exif=exif)
    (root / "bmp" / "fake.bmp").write_bytes(b"BM but not a bitmap at all" * 10)
    return root, picture


def test_scan_keeps_every_format_both_pipelines_decode(formats_tree):
    """BMP, WebP, TIFF, PNM, JPEG 2000, palette, RGBA and 16-bit PNG (and JPEG) are kept (by content, whatever the
    name); a file that only starts like one is excluded with its reason."""
    root, _ = formats_tree
    with pytest.warns(UserWarning, match="fake.bmp"):
        result = scan_imagefolder(root)
    assert len(result.samples) == 12 and not result.empty_classes
    assert [os.path.basename(p) for p, _ in result.bad] == ["fake.bmp"] and "BMP" in result.bad[0][1]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipelines_decode_every_kept_format(pipeline, formats_tree):
    """Both pipelines read every kept format to RGB: each evaluation image is PIL's reading of the file (all formats
    here but the JPEG are lossless, so that is the picture, quantized for the palette and gray ones), center-cropped,
    and not turned by an EXIF orientation tag. At 32 px the recipe resizes the shorter side to 36, the picture's own,
    so no resampling blurs a decoding difference."""
    root, picture = formats_tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(root, batch_size=12, img_size=32, train=False, pipeline=pipeline, num_workers=1)
        images, labels = next(iter(loader))
    assert images.shape == (12, 32, 32, 3) and labels.tolist() == list(range(12))

    def expected(image):  # the evaluation recipe: shorter side to int(32 / 0.875) = 36 (as it is), center crop 32
        return torch.from_numpy(np.array(to_rgb(image).crop((7, 2, 39, 34)))).float()

    for image, (path, _) in zip(images, loader.scan.samples, strict=True):
        with Image.open(path) as stored:
            want = expected(stored)
        if os.path.basename(os.path.dirname(path)) in ("bmp", "webp", "tiff", "ppm", "jp2"):
            assert want.equal(expected(picture))  # lossless RGB: the picture itself
        if path.endswith(os.path.join("png_gray16", "a.png")):  # 16-bit gray scaled down, not clipped at 255
            assert want.equal(expected(picture.convert("L")))
        # The JPEG: another IDCT may round differently; a rotated image would be off by far more.
        tolerance = 4.0 if path.endswith("jpeg_exif/a.jpg") else 1.0
        assert (image.float() - want).abs().max() <= tolerance, path


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_eval_crop_ratio(pipeline, formats_tree):
    """eval_crop_ratio sets the evaluation resize (shorter side to img_size / ratio): at ratio 1 and img_size 36
    the 36x46 picture is only center-cropped to 36x36."""
    root, picture = formats_tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(root, batch_size=12, img_size=36, train=False, pipeline=pipeline, num_workers=1,
                              eval_crop_ratio=1.0)
        images, _ = next(iter(loader))
    bmp = [i for i, (path, _) in enumerate(loader.scan.samples) if path.endswith(os.path.join("bmp", "a.bmp"))][0]
    want = torch.from_numpy(np.array(picture.crop((5, 0, 41, 36)))).float()
    assert images.shape == (12, 36, 36, 3) and (images[bmp].float() - want).abs().max() <= 1.0
    with pytest.raises(ValueError, match="eval_crop_ratio"):
        build_loader(root, batch_size=2, img_size=36, train=False, pipeline=pipeline, eval_crop_ratio=0.0)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipelines_survive_bad_files(pipeline, bad_tree):
    """An epoch over the bad tree completes with RGB batches, also when the scan is bypassed and a truncated file
    reaches the decoder mid-epoch (it is excluded with a warning and the epoch goes on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = scan_imagefolder(bad_tree)
        loader = build_loader(bad_tree, batch_size=2, img_size=32, train=True, pipeline=pipeline, repeated_aug=0,
                              num_workers=1, scan=scan)
        batches = list(loader)
    assert len(batches) == len(loader) and all(b[0].shape == (2, 32, 32, 3) for b in batches)
    unscanned = ScanResult(bad_tree, scan.classes, scan.samples + [(str(bad_tree / "b" / "truncated.jpg"), 1)] * 3)
    loader = build_loader(bad_tree, batch_size=2, img_size=32, train=False, pipeline=pipeline, num_workers=1,
                          scan=unscanned)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) >= len(scan.samples)


def test_build_loader_bad_arguments(digits):
    """Unknown pipelines/devices and too-small datasets get clear errors."""
    with pytest.raises(ValueError, match="pipeline"):
        build_loader(digits / "val", batch_size=2, img_size=32, train=False, pipeline="ffcv")
    with pytest.raises(ValueError, match="device"):
        build_loader(digits / "val", batch_size=2, img_size=32, train=False, device="tpu")
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(digits / "val", batch_size=1000, img_size=32, train=True, pipeline="torchvision")
    with pytest.raises(FileNotFoundError):
        scan_imagefolder(digits / "nope")
