"""A fast, cached scan of an ImageFolder tree (`root/<class>/<image>`) that finds the files a run cannot use.

Each file is checked once: its first bytes must be one of the formats both pipelines decode (DALI's image decoders
and PIL): JPEG, PNG, BMP, WebP, TIFF, PNM or JPEG 2000, recognised by content whatever the file's name (PNG data named
.jpg is used; GIF is not, since DALI has no GIF decoder), and it must decode: JPEGs at 1/8 scale (libjpeg's DCT
scaling, still a full pass over the entropy-coded data, so truncation and corruption show), the others fully.
Grayscale, palette, RGBA and CMYK images pass (both pipelines decode them to RGB). Results are cached by file size and
modification time in a JSON file per tree, so a second scan only opens new or changed files. Bad files are returned
with their reason; `scan_imagefolder` warns once with the list. Class folders without a usable file keep their index
(labels stay those of the full class list) and are reported."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".jp2", ".j2k")
SCAN_VERSION = 2  # 2: BMP, WebP, TIFF, PNM and JPEG 2000 are usable (1 excluded them)


def image_format(head: bytes) -> str | None:
    """The format of a file from its first 16 bytes, among those both pipelines decode; None for any other."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in (b" ", b"\t", b"\n", b"\r"):
        return "PNM"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    return None


def cache_dir() -> Path:
    """deit_fast's cache folder: $DEIT_FAST_CACHE, else $XDG_CACHE_HOME/deit_fast, else ~/.cache/deit_fast."""
    if env := os.environ.get("DEIT_FAST_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deit_fast"


@dataclass
class ScanResult:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, label) of usable files
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty_classes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{path}: {reason}" for path, reason in self.bad]
        lines += [f"{self.root / name}: class folder without usable images" for name in self.empty_classes]
        return "\n".join(lines)


def check_image(path: str) -> str | None:
    """None when the file is an image both pipelines decode, else why it is not usable."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "empty file"
    kind = image_format(head)
    if kind is None:
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return "GIF data (DALI has no GIF decoder)"
        return "not an image format both pipelines decode (JPEG, PNG, BMP, WebP, TIFF, PNM, JPEG 2000)"
    try:
        with Image.open(path) as image:
            if kind == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if image.width < 1 or image.height < 1:
                return "image without pixels"
    except Exception as e:  # PIL raises many types for broken files
        return f"{kind} does not decode ({type(e).__name__}: {e})"
    return None


def _cache_file(root: Path) -> Path:
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "scans" / f"{root.name}-{digest}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["files"] if data.get("version") == SCAN_VERSION else {}
    except (OSError, ValueError, KeyError):
        return {}


def _save_cache(path: Path, files: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": SCAN_VERSION, "files": files}))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs a rescan


def scan_imagefolder(root: str | os.PathLike, *, use_cache: bool = True, workers: int | None = None,
                     warn: bool = True) -> ScanResult:
    """Classes (sorted folder names), usable (path, label) samples and bad files of an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    candidates = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                    candidates.append((os.path.join(dirpath, filename), label))
    cache_path = _cache_file(root)
    cached = _load_cache(cache_path) if use_cache else {}
    fresh = {}
    to_check = []
    for path, _ in candidates:
        rel = os.path.relpath(path, root)
        try:
            st = os.stat(path)
            key = [st.st_size, st.st_mtime_ns]
        except OSError as e:
            fresh[rel] = [None, None, f"unreadable ({e.strerror or e})"]
            continue
        entry = cached.get(rel)
        if entry is not None and entry[:2] == key:
            fresh[rel] = entry
        else:
            to_check.append((rel, path, key))
    if to_check:
        with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
            for (rel, _, key), reason in zip(to_check, pool.map(check_image, [p for _, p, _ in to_check]),
                                             strict=True):
                fresh[rel] = [*key, reason]
    if use_cache and (to_check or len(fresh) != len(cached)):
        _save_cache(cache_path, fresh)
    result = ScanResult(root, classes, [])
    counts = [0] * len(classes)
    for path, label in candidates:
        reason = fresh[os.path.relpath(path, root)][2]
        if reason is None:
            result.samples.append((path, label))
            counts[label] += 1
        else:
            result.bad.append((path, reason))
    result.empty_classes = [name for name, count in zip(classes, counts, strict=True) if count == 0]
    if warn and (result.bad or result.empty_classes):
        warnings.warn(f"deit_fast: {len(result.bad)} unusable file(s) excluded and {len(result.empty_classes)} empty "
                      f"class folder(s) in {root}:\n{result.report()}", stacklevel=2)
    if not result.samples:
        raise ValueError(f"{root} has no usable images in {len(classes)} class folders (of {len(candidates)} "
                         f"files with image names)")
    return result
