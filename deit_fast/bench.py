"""`python -m deit_fast.bench`: images/s of whole DeiT models, training and inference, timm vs deit_fast.

Providers: timm (timm.create_model, eager), timm_compile (the same under torch.compile), deit_fast
(deit_fast.create_model: the same architecture and weights layout on the fused layers), deit_fast_compile.
Training step: forward + cross-entropy (distilled models average their heads, as outside distilled training) +
backward + AdamW (fused on GPUs), under bf16 autocast on GPUs (float32 on CPUs). Inference: forward under
torch.inference_mode. MFU: model FLOPs (counted from the shapes: patch projection, the four linear layers and the two
attention products of each block, heads; a training step is 3x the forward) per second over the peak, which is
measured in the same run as the best of a few large matrix products in the same dtype.

On a GPU the default is DeiT-Ti/S/B and DeiT-S distilled at batch 256; on a CPU a small preset (DeiT-Ti, batch 4,
eager providers only; pass --providers to add the compiled ones). Writes a JSON, a Markdown table and a bar chart
(PNG, matplotlib) of the speedups over timm eager into --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROVIDERS = ("timm", "timm_compile", "deit_fast", "deit_fast_compile")
GPU_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
              "deit_small_distilled_patch16_224")
CPU_MODELS = ("deit_tiny_patch16_224",)


def model_flops(model: torch.nn.Module, img_size: int) -> int:
    """Forward FLOPs per image of a timm VisionTransformer (multiply-add = 2 FLOPs)."""
    embed = model.patch_embed
    ph, pw = embed.patch_size
    patches = (img_size // ph) * (img_size // pw)
    N = patches + model.num_prefix_tokens
    D = model.embed_dim
    flops = 2 * patches * D * embed.proj.in_channels * ph * pw
    for block in model.blocks:
        hidden = block.mlp.fc1.out_features
        flops += 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * hidden + 2 * 2 * N * N * D
    heads = [m for m in (getattr(model, "head", None), getattr(model, "head_dist", None))
             if isinstance(m, torch.nn.Linear)]
    return flops + sum(2 * h.in_features * h.out_features for h in heads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of a few large matrix products in `dtype`: the MFU denominator, measured here."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best


def _build(provider: str, name: str, device, compile_mode: str | None):
    import timm

    import deit_fast

    create = timm.create_model if provider.startswith("timm") else deit_fast.create_model
    model = create(name).to(device)
    runner = torch.compile(model, mode=compile_mode) if provider.endswith("_compile") else model
    return model, runner


def _loss(out, target):
    if isinstance(out, tuple):
        out = (out[0] + out[1]) / 2
    return F.cross_entropy(out.float(), target)


def measure(provider: str, name: str, mode: str, batch: int, device: torch.device, dtype: torch.dtype, steps: int,
            warmup: int, compile_mode: str | None) -> dict:
    """Seconds per step, images/s and peak memory of one provider on one model and mode."""
    torch._dynamo.reset()
    model, runner = _build(provider, name, device, compile_mode)
    img_size = model.patch_embed.img_size[0]
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, model.num_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast:
                loss = _loss(runner(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                runner(x)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    result = {"provider": provider, "model": name, "mode": mode, "batch": batch, "img_size": img_size,
              "step_ms": round(seconds * 1e3, 3), "images_per_s": round(batch / seconds, 1),
              "flops_per_image": model_flops(model, img_size) * (3 if mode == "train" else 1)}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def write_outputs(results: list[dict], meta: dict, out: Path) -> dict[str, Path]:
    """JSON, Markdown table and PNG bar chart of speedups over timm eager; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', meta['device']).strip('-')}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# deit_fast.bench, {meta['date']}, {meta['device']}", "",
             f"torch {meta['torch']}, dtype {meta['dtype']}, peak {meta['peak_tflops']} TFLOP/s (measured matmul), "
             f"steps {meta['steps']} after {meta['warmup']} warm-up", "",
             "| model | mode | batch | provider | ms/step | images/s | vs timm | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['provider']} | {r['step_ms']} | "
                     f"{r['images_per_s']} | {r.get('speedup_vs_timm', '')} | {r.get('mfu', '')} | "
                     f"{r.get('peak_memory_gb', '')} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        paths["md"].write_text(paths["md"].read_text() + "\n(matplotlib is not installed: no chart)\n")
        del paths["png"]
        return paths
    groups = sorted({(r["model"], r["mode"]) for r in results})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in results)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = [next((r.get("speedup_vs_timm", 0) for r in results if (r["model"], r["mode"]) == g
                        and r["provider"] == provider), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=provider)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{m.replace('_patch16_224', '')}\n{mode}" for m, mode in groups], fontsize=8)
    ax.set_ylabel("images/s relative to timm eager")
    ax.set_title(f"deit_fast.bench on {meta['device']} ({meta['dtype']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=list(GPU_MODELS if cuda else CPU_MODELS))
    parser.add_argument("--batch-size", type=int, default=256 if cuda else 4)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        default=list(PROVIDERS if cuda else ("timm", "deit_fast")))
    parser.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2, help="untimed steps first (compilation)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the *_compile providers (default: torch's default)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    args = parser.parse_args(argv)
    for name, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        parser.error("--device cuda, but CUDA is not available")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_flops(device, dtype)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({torch.get_num_threads()} threads)", "dtype": str(dtype).removeprefix("torch."),
            "peak_tflops": round(peak / 1e12, 2), "steps": args.steps, "warmup": args.warmup}
    results = []
    for name in args.models:
        for mode in args.modes:
            row = {}
            # The outputs are rewritten after every measurement, so a run cut short (the GPU check's time limit)
            # keeps what it measured.
            for provider in args.providers:
                r = measure(provider, name, mode, args.batch_size, device, dtype, args.steps, args.warmup,
                            args.compile_mode)
                gc.collect()  # the previous provider's model, optimizer and activations
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r["mfu"] = round(r["images_per_s"] * r["flops_per_image"] / peak, 3)
                row[provider] = r
                results.append(r)
                print(f"{name} {mode} {provider}: {r['images_per_s']} images/s, {r['step_ms']} ms/step, "
                      f"MFU {r['mfu']}", flush=True)
                write_outputs(results, meta, Path(args.out))
            if "timm" in row:
                for r in row.values():
                    r["speedup_vs_timm"] = round(r["images_per_s"] / row["timm"]["images_per_s"], 3)
            if "timm_compile" in row:
                for r in row.values():
                    r["speedup_vs_timm_compile"] = round(r["images_per_s"] / row["timm_compile"]["images_per_s"], 3)
            paths = write_outputs(results, meta, Path(args.out))
    print("\n" + paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
