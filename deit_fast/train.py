"""`python -m deit_fast.train`: DeiT training with distillation, on one device or many (torchrun + DDP).

Arguments follow facebookresearch/deit's main.py (names and defaults), plus deit_fast's own (device, dtype, compile,
backend, data pipeline, checkpoint-every-steps, accumulation steps, config files). With no arguments it runs the
embedded default job: on the built-in digits dataset it trains a small convnet teacher (timm resnet18, kept in the
output folder and reused), then a small DeiT student with hard distillation through the distillation token, and
prints both validation top-1 accuracies.

The loop: deit_fast.data loaders (DALI or torchvision) give uint8 batches; deit_fast.ops.batch_prep normalizes,
erases and mixes them in one pass and makes the soft targets; the model is deit_fast.create_model (fused layers);
the loss is deit_fast.ops.distill_loss; bf16 autocast on GPUs (fp16 with loss scaling if asked, float32 on CPUs),
fused AdamW, a per-step cosine schedule with warmup, EMA, gradient clipping and accumulation. A non-finite loss skips
its step without a host synchronization (the optimizer step is skipped on the device, as loss scaling does); K in a
row stop the run. Checkpoints (model, optimizer, schedule, EMA, scaler, RNG states, position in the epoch) are written
atomically; --resume continues a run as if it had not stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

DATA_SETS = ("IMNET", "CIFAR", "DIGITS")
DISTILLATION_TYPES = ("none", "soft", "hard")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_MEAN/STD


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deit_fast.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="With no arguments it runs the embedded default job (digits: resnet18 teacher, then a small DeiT "
               "student with hard distillation); `python -m deit_fast.train --default-job none [--output-dir DIR]` "
               "runs that job's student without distillation (or with 'soft'), for comparison.")
    a = p.add_argument
    a("--config", default=None, help="YAML or JSON file of argument values (command-line flags override it)")
    # model
    a("--model", default="deit_base_patch16_224", help="timm model name (DeiT/ViT models run on deit_fast's layers)")
    a("--model-kwargs", default="{}", help="JSON dict of extra create_model arguments, e.g. '{\"depth\": 6}'")
    a("--input-size", type=int, default=224, help="image size")
    a("--drop", type=float, default=0.0, help="dropout rate (timm's drop_rate, as DeiT passes it)")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    a("--model-ema", type=str2bool, nargs="?", const=True, default=True,
      help="keep an exponential moving average of the weights (a bare flag, as DeiT's, or true/false)")
    a("--no-model-ema", dest="model_ema", action="store_false", help="no EMA (DeiT's spelling)")
    a("--model-ema-decay", type=float, default=0.99996, help="EMA decay per optimizer step")
    # optimization
    a("--batch-size", type=int, default=64, help="images per device per step")
    a("--epochs", type=int, default=300)
    a("--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--opt", default="adamw", choices=["adamw"], help="optimizer (fused AdamW)")
    a("--opt-eps", type=float, default=1e-8, help="AdamW epsilon")
    a("--opt-betas", type=float, nargs=2, default=None, help="AdamW betas (default: torch's 0.9 0.999)")
    a("--lr", type=float, default=5e-4, help="learning rate for a global batch of 512 (scaled linearly)")
    a("--unscale-lr", action="store_true", help="use --lr as it is, without the batch/512 scaling")
    a("--weight-decay", type=float, default=0.05)
    a("--clip-grad", type=float, default=None, help="gradient-norm clipping (off by default)")
    a("--sched", default="cosine", choices=["cosine"], help="per-step cosine schedule")
    a("--warmup-epochs", type=float, default=5)
    a("--warmup-lr", type=float, default=1e-6)
    a("--min-lr", type=float, default=1e-5)
    # augmentation
    a("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('none' to disable; DeiT's is the only one)")
    a("--smoothing", type=float, default=0.1, help="label smoothing")
    a("--reprob", type=float, default=0.25, help="random erasing probability")
    a("--mixup", type=float, default=0.8, help="mixup alpha (0 disables)")
    a("--cutmix", type=float, default=1.0, help="cutmix alpha (0 disables)")
    a("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    a("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    a("--repeated-aug", type=str2bool, nargs="?", const=True, default=True,
      help="DeiT's 3x repeated augmentation (a bare flag, as DeiT's, or true/false)")
    a("--no-repeated-aug", dest="repeated_aug", action="store_false", help="no repeated augmentation")
    a("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability")
    # distillation
    a("--teacher-model", default="regnety_160", help="timm model name of the teacher")
    a("--teacher-path", default="", help="teacher weights: a state_dict or a DeiT-style {'model': ...} checkpoint, "
                                         "a path or an https:// URL")
    a("--distillation-type", default="none", choices=DISTILLATION_TYPES)
    a("--distillation-alpha", type=float, default=0.5)
    a("--distillation-tau", type=float, default=1.0)
    # data
    a("--data-path", default="", help="dataset folder (IMNET: with train/ and val/; CIFAR: with cifar-100-python/)")
    a("--data-set", default="IMNET", choices=DATA_SETS)
    a("--download", action="store_true", help="CIFAR: download it into --data-path if missing")
    a("--data-pipeline", default="auto", choices=["auto", "dali", "torchvision"])
    a("--num-workers", "--num_workers", type=int, default=10, help="loader worker processes (DALI: threads)")
    a("--pin-mem", action=argparse.BooleanOptionalAction, default=True,
      help="pinned host memory for the fallback loader's batches on GPUs")
    a("--eval-crop-ratio", type=float, default=0.875,
      help="evaluation: resize the shorter side to input-size / ratio, then center-crop input-size")
    a("--dist-eval", action="store_true",
      help="accepted for DeiT's command lines: evaluation is always sharded over the ranks, each image counted "
           "once")
    # run
    a("--output-dir", "--output_dir", default="", help="where checkpoints, logs and plots go")
    a("--resume", default="", help="checkpoint to continue from (a path, or an https:// URL as DeiT's releases)")
    a("--finetune", default="", help="checkpoint to start from (position embedding resampled, heads dropped; a path "
                                     "or an https:// URL)")
    a("--eval", action="store_true", help="evaluate --resume's checkpoint and exit")
    a("--throughput", action="store_true", help="measure the model's images/s and exit")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="bf16 on GPUs, float32 on CPUs")
    a("--compile", action="store_true", help="torch.compile the model (and the teacher)")
    a("--backend", default=None, choices=["auto", "reference", "triton", "cuda"], help="deit_fast kernels")
    a("--checkpoint-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    a("--max-steps", type=int, default=0, help="stop (with a checkpoint) after N optimizer steps in total")
    a("--log-every", type=int, default=50, help="optimizer steps between log lines (host syncs only there)")
    a("--max-non-finite", type=int, default=10, help="stop after this many non-finite losses in a row")
    return p


DEFAULT_JOB_TEACHER = dict(model="resnet18", data_set="DIGITS", input_size=24, batch_size=128, epochs=10, lr=8e-3,
                           warmup_epochs=1, min_lr=1e-5, weight_decay=0.05, drop_path=0.0, aa="none", mixup=0.0,
                           cutmix=0.0, reprob=0.0, smoothing=0.1, repeated_aug=False, model_ema=False,
                           crop_scale=(0.6, 1.0), hflip=0.0, num_workers=1, log_every=20)
DEFAULT_JOB_STUDENT = dict(model="deit_tiny_distilled_patch16_224",
                           model_kwargs=json.dumps(dict(embed_dim=128, depth=4, num_heads=4, patch_size=4)),
                           data_set="DIGITS", input_size=24, batch_size=128, epochs=40, lr=8e-3, warmup_epochs=3,
                           min_lr=1e-5, weight_decay=0.05, drop_path=0.0, aa="none", mixup=0.0, cutmix=0.0,
                           reprob=0.0, smoothing=0.1, repeated_aug=False, model_ema=False, crop_scale=(0.6, 1.0),
                           hflip=0.0, num_workers=1, log_every=20, distillation_type="hard", distillation_alpha=0.5,
                           teacher_model="resnet18")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        text = Path(pre.config).read_text()
        if pre.config.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(k.replace("-", "_") for k in values) - known)
        if unknown:
            parser.error(f"--config {pre.config}: unknown keys {', '.join(unknown)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    positive = ("batch_size", "epochs", "input_size", "accumulation_steps", "log_every", "max_non_finite")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "drop_path", "mixup", "cutmix",
                 "distillation_tau", "num_workers", "checkpoint_every_steps", "max_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("smoothing", "reprob", "mixup_prob", "mixup_switch_prob", "distillation_alpha", "hflip",
                 "model_ema_decay", "drop"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        parser.error(f"--crop-scale must satisfy 0 < min <= max <= 1, got {args.crop_scale}")
    if not 0 < args.eval_crop_ratio <= 1:
        parser.error(f"--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}")
    if args.opt_eps <= 0:
        parser.error(f"--opt-eps must be positive, got {args.opt_eps}")
    if args.opt_betas is not None and not all(0 <= b < 1 for b in args.opt_betas):
        parser.error(f"--opt-betas must be in [0, 1), got {args.opt_betas}")
    if args.distillation_type != "none" and not args.teacher_path and not (args.eval or args.throughput):
        parser.error(f"--distillation-type {args.distillation_type} needs --teacher-path (the teacher's trained "
                     f"weights; DeiT's main.py requires them too)")
    if args.clip_grad is not None and args.clip_grad <= 0:
        parser.error(f"--clip-grad must be positive, got {args.clip_grad}")
    if args.aa not in ("none", "rand-m9-mstd0.5-inc1"):
        parser.error(f"--aa {args.aa!r}: deit_fast's pipelines implement DeiT's rand-m9-mstd0.5-inc1 or none")
    try:
        if not isinstance(json.loads(args.model_kwargs), dict):
            raise ValueError
    except ValueError:
        parser.error(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if args.data_set in ("IMNET", "CIFAR") and not args.data_path:
        parser.error(f"--data-set {args.data_set} needs --data-path")
    if args.dtype == "bfloat16" and args.device == "cpu":
        pass  # allowed: bf16 autocast on CPU
    if args.eval and not args.resume:
        parser.error("--eval evaluates the checkpoint given by --resume")


# ----------------------------------------------------------------------------------------------------------------
# Setup


class Context:
    """Rank, world size, device and dtype of this process."""

    def __init__(self, args):
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda, but CUDA is not available (use --device cpu)")
            self.device = torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        name = args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = getattr(torch, name)
        self.main = self.rank == 0

    bar = None  # the progress bar while one is on the terminal: lines go above it

    def log(self, *parts) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.write(" ".join(map(str, parts)))
            else:
                print(*parts, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dataset_root(args) -> tuple[Path, Path]:
    """(train folder, val folder) of the chosen dataset, writing the built-in trees on first use."""
    from deit_fast.data import digits_dataset

    if args.data_set == "DIGITS":
        root = digits_dataset(Path(args.data_path) if args.data_path else None, size=32)
    elif args.data_set == "CIFAR":
        root = cifar_tree(Path(args.data_path), download=args.download)
    else:
        root = Path(args.data_path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise SystemExit(f"{root} has no {split}/ folder (expected an ImageFolder tree: {root}/{split}/<class>/)")
    return root / "train", root / "val"


def cifar_tree(path: Path, download: bool) -> Path:
    """CIFAR-100 from torchvision's files under `path`, written once as an ImageFolder JPEG tree beside them."""
    import torchvision
    from PIL import Image

    target = path / "cifar100-imagefolder"
    if (target / "val").is_dir():
        return target
    try:
        sets = {split: torchvision.datasets.CIFAR100(str(path), train=(split == "train"), download=download)
                for split in ("train", "val")}
    except RuntimeError as e:
        raise SystemExit(f"CIFAR-100 is not in {path} ({e}); pass --download to fetch it") from e
    tmp = target.with_name(target.name + ".tmp")
    for split, data in sets.items():
        for i, (image, label) in enumerate(zip(data.data, data.targets, strict=True)):
            folder = tmp / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    os.replace(tmp, target)
    return target


def build_model(name: str, num_classes: int, args, img_size: int | None = None):
    import timm

    import deit_fast

    kwargs = dict(json.loads(args.model_kwargs)) if name == args.model else {}
    kwargs["num_classes"] = num_classes
    if args.drop_path and name == args.model:
        kwargs["drop_path_rate"] = args.drop_path
    if args.drop and name == args.model:
        kwargs["drop_rate"] = args.drop
    try:
        try:
            return deit_fast.create_model(name, img_size=img_size or args.input_size, **kwargs)
        except ValueError as e:  # not a ViT: a timm model as it is (e.g. the convnet teacher)
            if "VisionTransformer" not in str(e) and "does not take" not in str(e):
                raise
        return timm.create_model(name, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"cannot build model {name!r} with {kwargs}: {e}") from e


def read_checkpoint(path: str):
    """torch.load(weights_only=True) with errors that name the file; an https:// URL (DeiT's released checkpoints)
    is fetched once into torch.hub's cache and checked against the hash in its name, as DeiT's main.py does."""
    try:
        if path.startswith(("https://", "http://")):
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=True, weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise SystemExit(f"checkpoint {path} does not exist") from e
    except Exception as e:  # pickle errors, truncated files
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def model_state(checkpoint, path: str) -> dict:
    """The model's state_dict in a deit_fast or DeiT-style {'model': ...} checkpoint, or a bare state_dict."""
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"{path} holds a {type(checkpoint).__name__}, not a state_dict or {{'model': state_dict}}")
    return checkpoint


def load_weights(path: str) -> dict:
    return model_state(read_checkpoint(path), path)


def load_strict(model, state: dict, source: str) -> None:
    """load_state_dict with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shaped:
        raise SystemExit(f"{source} does not match the model: missing keys {missing or 'none'}; unexpected keys "
                         f"{unexpected or 'none'}; mis-shaped {shaped or 'none'}")
    model.load_state_dict(state)


def load_teacher(args, num_classes: int, ctx: Context):
    teacher = build_model(args.teacher_model, num_classes, args)
    if args.teacher_path:
        state = load_weights(args.teacher_path)
        head = [k for k in state if k.endswith(("fc.weight", "head.weight", "classifier.weight"))]
        if head and state[head[0]].shape[0] != num_classes:
            raise SystemExit(f"the teacher {args.teacher_path} predicts {state[head[0]].shape[0]} classes but "
                             f"the data has {num_classes}; a teacher must share the student's classes")
        load_strict(teacher, state, f"--teacher-path {args.teacher_path}")
    teacher = teacher.to(ctx.device).eval().requires_grad_(False)
    if ctx.device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    if args.compile:
        teacher = torch.compile(teacher)
    return teacher


def finetune_from(model, path: str, ctx: Context) -> None:
    """DeiT main.py's --finetune: drop heads whose class count differs, resample the position embedding."""
    from timm.layers import resample_abs_pos_embed

    state = load_weights(path)
    own = model.state_dict()
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            ctx.log(f"finetune: dropping {key} {tuple(state[key].shape)} (the model has {tuple(own[key].shape)})")
            del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        new_grid = model.patch_embed.grid_size
        old_n = state["pos_embed"].shape[1] - prefix
        old = int(math.sqrt(old_n))
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(new_grid), [old, old],
                                                    num_prefix_tokens=prefix)
        ctx.log(f"finetune: position embedding resampled from {old}x{old} to {new_grid[0]}x{new_grid[1]}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        ctx.log(f"finetune: not in the checkpoint (initialized fresh): {', '.join(result.missing_keys)}")
    if result.unexpected_keys:
        raise SystemExit(f"--finetune {path}: keys the model does not have: {', '.join(result.unexpected_keys)}")


def param_groups(model, weight_decay: float):
    """No weight decay for biases, norms (1-D parameters) and the model's no_weight_decay() set, as timm/DeiT."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(args, steps_per_epoch: int, base_lr: float):
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            lr = args.warmup_lr + (base_lr - args.warmup_lr) * step / max(1, warmup)
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            lr = args.min_lr + (base_lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr / base_lr

    return factor


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename over the target, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(prep) -> dict:
    """Every random state a resumed run needs, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached],
             "torch": torch.get_rng_state(), "batch_prep": prep.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, prep) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    prep.load_state_dict(state["batch_prep"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def evaluate(model, loader, ctx: Context, num_classes: int) -> dict:
    from deit_fast.ops import BatchPrep, BatchPrepConfig

    prep = BatchPrep(num_classes, MEAN, STD, config=BatchPrepConfig(mix_prob=0.0, erase_prob=0.0, smoothing=0.0),
                     dtype=torch.float32)
    model.eval()
    correct1 = torch.zeros((), device=ctx.device)
    correct5 = torch.zeros((), device=ctx.device)
    total = torch.zeros((), device=ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    loader.set_epoch(0)
    remaining = getattr(loader, "real_samples", None)  # the rest of this rank's share is padding (see build_loader)
    for images, labels in loader:
        if remaining is not None:
            keep = min(labels.shape[0], remaining)
            remaining -= keep
            if keep == 0:
                continue
            images, labels = images[:keep], labels[:keep]
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        x, _ = prep(images, labels)
        with torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == labels).sum()
        correct5 += (top == labels[:, None]).any(dim=1).sum()
        total += labels.numel()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
    if ctx.distributed:
        for t in (correct1, correct5, total, loss_sum):
            dist.all_reduce(t)
    n = max(1.0, float(total))
    return {"top1": 100.0 * float(correct1) / n, "top5": 100.0 * float(correct5) / n, "loss": float(loss_sum) / n,
            "images": int(n)}


def throughput(model, ctx: Context, batch_size: int, img_size: int) -> float:
    """DeiT's utils: images/s of inference at batch_size after warm-up (30 timed iterations)."""
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=ctx.device)
    with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=ctx.dtype,
                                                  enabled=ctx.dtype != torch.float32):
        for _ in range(10):
            model(x)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(30):
            model(x)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
    return 30 * batch_size / (time.perf_counter() - start)


class Logger:
    """log.jsonl (rank 0), a progress bar on a terminal or plain lines elsewhere."""

    def __init__(self, ctx: Context, out: Path | None, total_steps: int, done_steps: int = 0):
        self.ctx, self.file, self.bar = ctx, None, None
        if ctx.main and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.file = open(out / "log.jsonl", "a")
        if ctx.main and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = ctx.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def progress(self, record: dict, steps: int) -> None:
        if not self.ctx.main:
            return
        text = (f"epoch {record['epoch']} step {record['step']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['images_per_s']:.0f} img/s data {100 * record['data_wait']:.0f}%")
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix_str(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.ctx.bar = None
        if self.file is not None:
            self.file.close()


def plot_curves(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax2.plot([r["epoch"] for r in epochs], [r["val_top1"] for r in epochs], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation top-1 (%)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def train(args, ctx: Context) -> dict:
    """One training run as the arguments describe it; returns the final evaluation."""
    from deit_fast.data import build_loader, scan_imagefolder
    from deit_fast.ops import BatchPrep, BatchPrepConfig, distill_loss

    if args.backend:
        os.environ["DEIT_FAST_BACKEND"] = args.backend
    seed_everything(args.seed + ctx.rank)
    out = Path(args.output_dir) if args.output_dir else None
    train_dir, val_dir = dataset_root(args)
    train_scan = scan_imagefolder(train_dir, warn=ctx.main)
    val_scan = scan_imagefolder(val_dir, warn=ctx.main)
    num_classes = len(train_scan.classes)
    if val_scan.classes != train_scan.classes:
        raise SystemExit(f"{val_dir} has other classes than {train_dir}")
    model = build_model(args.model, num_classes, args).to(ctx.device)
    if args.finetune:
        finetune_from(model, args.finetune, ctx)
    distilled = hasattr(model, "dist_token")
    teacher = None
    if args.distillation_type != "none" and not args.eval:  # --eval needs no teacher
        if not distilled:
            raise SystemExit(f"--distillation-type {args.distillation_type} needs a model with a distillation token "
                             f"(a *_distilled_* DeiT), not {args.model}")
        teacher = load_teacher(args, num_classes, ctx)
        model.distilled_training = True
    common = dict(img_size=args.input_size, device="gpu" if ctx.device.type == "cuda" else "cpu",
                  device_id=ctx.local_rank if ctx.device.type == "cuda" else None, rank=ctx.rank,
                  world_size=ctx.world_size, seed=args.seed, num_workers=args.num_workers, pipeline=args.data_pipeline,
                  pin_memory=args.pin_mem and ctx.device.type == "cuda")
    train_loader = build_loader(train_dir, batch_size=args.batch_size, train=True,
                                repeated_aug=3 if args.repeated_aug else 0, auto_augment=args.aa != "none",
                                crop_scale=tuple(args.crop_scale), hflip=args.hflip, scan=train_scan, **common)
    val_loader = build_loader(val_dir, batch_size=args.batch_size, train=False, scan=val_scan,
                              eval_crop_ratio=args.eval_crop_ratio, **common)
    prep_config = BatchPrepConfig(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, mix_prob=args.mixup_prob,
                                  switch_prob=args.mixup_switch_prob, smoothing=args.smoothing,
                                  erase_prob=args.reprob)
    prep = BatchPrep(num_classes, MEAN, STD, dtype=torch.float32, seed=args.seed * 7919 + ctx.rank,
                     config=prep_config)

    steps_per_epoch = len(train_loader) // args.accumulation_steps
    global_batch = args.batch_size * ctx.world_size * args.accumulation_steps
    base_lr = args.lr if args.unscale_lr else args.lr * global_batch / 512.0
    fused = ctx.device.type == "cuda" or hasattr(torch.optim.AdamW, "_step_supports_amp_scaling")
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=base_lr, eps=args.opt_eps,
                                  betas=tuple(args.opt_betas or (0.9, 0.999)), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, steps_per_epoch, base_lr))
    # Loss scaling for fp16; for bf16/fp32 the same machinery at scale 1 skips non-finite steps on the device
    # (backing off by exact powers of two), so no step waits for the host.
    fp16 = ctx.dtype == torch.float16
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**16 if fp16 else 1.0,
                                  growth_interval=2000 if fp16 else 2**31 - 1)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)
    runner = model
    if ctx.distributed:
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if args.compile:
        runner = torch.compile(runner)

    start_epoch, start_step, global_step, best = 0, 0, 0, -1.0
    streak = torch.zeros((), dtype=torch.int64, device=ctx.device)
    if args.eval:
        # As DeiT's main.py: the model's own weights, from a deit_fast checkpoint, a DeiT-style {'model': ...} one or
        # a bare state_dict; the EMA's too when the checkpoint has them.
        checkpoint = read_checkpoint(args.resume)
        load_strict(model, model_state(checkpoint, args.resume), f"--resume {args.resume}")
        result = evaluate(model, val_loader, ctx, num_classes)
        ctx.log(f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% on {result['images']} images")
        if ema is not None and isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_ema"), dict):
            load_strict(ema.module, checkpoint["model_ema"], f"--resume {args.resume} (model_ema)")
            result["ema_top1"] = evaluate(ema.module, val_loader, ctx, num_classes)["top1"]
            ctx.log(f"EMA top-1 {result['ema_top1']:.2f}%")
        return result
    if args.resume:
        try:
            checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated or not a checkpoint
            raise SystemExit(f"cannot read --resume {args.resume}: {type(e).__name__}: {e}") from e
        missing = sorted({"model", "optimizer", "lr_scheduler", "scaler", "epoch", "step_in_epoch", "step",
                          "rng"} - set(checkpoint))
        if missing:
            raise SystemExit(f"--resume {args.resume} is not a deit_fast training checkpoint (no {missing})")
        load_strict(model, checkpoint["model"], f"--resume {args.resume}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            # A checkpoint written without EMA starts the average from the weights it holds.
            ema_state = checkpoint.get("model_ema") or checkpoint["model"]
            load_strict(ema.module, ema_state, f"--resume {args.resume} (model_ema)")
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        global_step, best = checkpoint["step"], checkpoint.get("best_top1", -1.0)
        set_rng_state(checkpoint["rng"], prep)
        ctx.log(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")
    if out is not None and ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=1, default=list))

    def checkpoint(epoch: int, step_in_epoch: int, name: str = "checkpoint.pth") -> None:
        if out is None or not ctx.main:
            return
        if int(streak) > 0:
            return  # never overwrite the last good checkpoint with a state reached through non-finite steps
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "model_ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
                     "step_in_epoch": step_in_epoch, "step": global_step, "best_top1": best, "args": vars(args),
                     "rng": rng_state(prep)}, out / name)

    logger = Logger(ctx, out, args.epochs * steps_per_epoch, global_step)
    result = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            train_loader.set_epoch(epoch, start_step * args.accumulation_steps)
            step_in_epoch = start_step
            start_step = 0
            t_epoch = time.perf_counter()
            # Figures since the last log line; every epoch starts afresh (its last step always logs).
            t_log, waited, images_since, loss_sum = time.perf_counter(), 0.0, 0, torch.zeros((), device=ctx.device)
            losses_since, steps_since = 0, 0
            micro = 0
            t_wait = time.perf_counter()
            for images, labels in train_loader:
                waited += time.perf_counter() - t_wait
                images = images.to(ctx.device, non_blocking=True)
                labels = labels.to(ctx.device, non_blocking=True)
                x, targets = prep(images, labels)
                if ctx.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                sync = contextlib.nullcontext()
                if ctx.distributed and micro + 1 < args.accumulation_steps:
                    sync = runner.no_sync()
                with sync, torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32):
                    outputs = runner(x)
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                    if isinstance(outputs, tuple):
                        cls_logits, dist_logits = outputs
                    else:
                        cls_logits, dist_logits = outputs, None
                    loss = distill_loss(cls_logits.float(), dist_logits.float() if dist_logits is not None else None,
                                        targets, teacher_logits.float() if teacher_logits is not None else None,
                                        args.distillation_type, args.distillation_alpha, args.distillation_tau)
                    scaler.scale(loss / args.accumulation_steps).backward()
                micro += 1
                images_since += images.shape[0]
                loss_sum += loss.detach()
                losses_since += 1
                finite = torch.isfinite(loss.detach())
                streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
                if micro < args.accumulation_steps:
                    t_wait = time.perf_counter()
                    continue
                micro = 0
                if args.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model, step=global_step)
                global_step += 1
                step_in_epoch += 1
                steps_since += 1
                if global_step % args.log_every == 0 or step_in_epoch == steps_per_epoch:
                    run_streak = int(streak)  # the host reads the device here only
                    if run_streak >= args.max_non_finite:
                        raise NonFiniteLoss(f"{run_streak} non-finite losses in a row (at step {global_step}); "
                                            "stopping with the last good checkpoint kept")
                    elapsed = time.perf_counter() - t_log
                    record = {"type": "step", "epoch": epoch, "step": global_step,
                              "loss": float(loss_sum) / max(1, losses_since),
                              "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_since / elapsed,
                              "data_wait": waited / elapsed, "non_finite_streak": run_streak}
                    if ctx.device.type == "cuda":
                        record["memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                    else:  # the process's peak resident memory (Linux reports KiB)
                        record["host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                    logger.write(record)
                    logger.progress(record, steps_since)
                    t_log, waited, images_since, losses_since, steps_since = time.perf_counter(), 0.0, 0, 0, 0
                    loss_sum.zero_()
                if args.checkpoint_every_steps and global_step % args.checkpoint_every_steps == 0:
                    checkpoint(epoch, step_in_epoch)
                if args.max_steps and global_step >= args.max_steps:
                    checkpoint(epoch, step_in_epoch)
                    ctx.log(f"stopped after --max-steps {args.max_steps}")
                    return {"stopped_at_step": global_step}
                if step_in_epoch >= steps_per_epoch:
                    break
                t_wait = time.perf_counter()
            result = evaluate(model, val_loader, ctx, num_classes)
            if ema is not None:
                result["ema_top1"] = evaluate(ema.module, val_loader, ctx, num_classes)["top1"]
            is_best = result["top1"] > best
            best = max(best, result["top1"])
            logger.write({"type": "epoch", "epoch": epoch, "val_top1": result["top1"], "val_top5": result["top5"],
                          "val_loss": result["loss"], "ema_top1": result.get("ema_top1"),
                          "seconds": time.perf_counter() - t_epoch, "step": global_step})
            ctx.log(f"epoch {epoch}: val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"
                    + (f" (EMA {result['ema_top1']:.2f}%)" if ema is not None else ""))
            checkpoint(epoch + 1, 0)
            if is_best:
                checkpoint(epoch + 1, 0, "best.pth")
    finally:
        logger.close()
    if out is not None and ctx.main:
        plot_curves(out)
    result["best_top1"] = best
    return result


class NonFiniteLoss(RuntimeError):
    pass


def default_job(distillation_type: str = "hard", output_dir: str = "output/digits") -> dict:
    """The embedded default: a convnet teacher (trained once, then reused), then the DeiT student with
    `distillation_type` distillation, on the built-in digits. Returns the teacher's and student's top-1 and the time."""
    out = Path(output_dir)
    ctx = Context(parse_args(["--data-set", "DIGITS"]))
    t0 = time.perf_counter()
    teacher_dir = out / "teacher"
    teacher_ckpt = teacher_dir / "best.pth"
    if teacher_ckpt.exists():
        ctx.log(f"teacher: using {teacher_ckpt}")
    else:
        ctx.log("teacher: training timm resnet18 on digits")
        train(parse_args(flags(DEFAULT_JOB_TEACHER, output_dir=str(teacher_dir))), ctx)
    teacher_args = parse_args(flags(DEFAULT_JOB_TEACHER, output_dir=str(teacher_dir), resume=str(teacher_ckpt),
                                    eval=True))
    teacher_top1 = train(teacher_args, ctx)["top1"]
    t_teacher = time.perf_counter() - t0
    name = "student" if distillation_type == "hard" else f"student-{distillation_type}"
    student_args = parse_args(flags(DEFAULT_JOB_STUDENT, output_dir=str(out / name), teacher_path=str(teacher_ckpt),
                                    distillation_type=distillation_type))
    student = train(student_args, ctx)
    total = time.perf_counter() - t0
    kind = "no distillation" if distillation_type == "none" else f"{distillation_type} distillation"
    ctx.log(f"\nteacher (resnet18) val top-1: {teacher_top1:.2f}%\n"
            f"student (DeiT, dim 128, depth 4, {kind}) val top-1: {student['top1']:.2f}% "
            f"(best epoch {student['best_top1']:.2f}%)\n"
            f"time: {total:.0f} s ({t_teacher:.0f} s teacher); outputs in {out}")
    return {"teacher_top1": teacher_top1, "student_top1": student["top1"], "seconds": total}


def flags(values: dict, **extra) -> list[str]:
    argv = []
    for key, value in {**values, **extra}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) and key in ("eval", "download", "compile", "throughput"):
            if value:
                argv.append(flag)
        elif isinstance(value, (tuple, list)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "--default-job":
        job = argparse.ArgumentParser(prog="python -m deit_fast.train --default-job",
                                      description="the embedded default job (what no arguments run)")
        job.add_argument("--default-job", default="hard", choices=DISTILLATION_TYPES,
                         help="the student's distillation ('none' trains the same student without the teacher)")
        job.add_argument("--output-dir", default="output/digits")
        job_args = job.parse_args(argv)
        default_job(job_args.default_job, job_args.output_dir)
        return 0
    args = parse_args(argv)
    ctx = Context(args)
    try:
        if args.throughput:
            model = build_model(args.model, 1000, args).to(ctx.device)
            ctx.log(f"{args.model}: {throughput(model, ctx, args.batch_size, args.input_size):.1f} images/s")
            return 0
        train(args, ctx)
    except NonFiniteLoss as e:
        ctx.log(f"error: {e}")
        return 2
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
