"""`python -m deit_fast.bench`: images/s of whole DeiT models, training and inference, timm vs deit_fast.

Providers: timm (timm.create_model, eager), timm_compile (the same under torch.compile), deit_fast
(deit_fast.create_model: the same architecture and weights layout on the fused layers), deit_fast_compile.
Training step: forward + cross-entropy (distilled models average their heads, as outside distilled training) +
backward + AdamW (fused on GPUs), under bf16 autocast on GPUs (float32 on CPUs). Inference: forward under
torch.inference_mode. MFU: model FLOPs (counted from the shapes: patch projection, the four linear layers and the two
attention products of each block, heads; a training step is 3x the forward) per second over the peak, which is
measured in the same run as the best of a few large matrix products in the same dtype.

On a GPU the default is DeiT-Ti/S/B and DeiT-S distilled at batch 256; on a CPU a small preset (DeiT-Ti, batch 4,
eager providers only; pass --providers to add the compiled ones). Every step is timed on its own; a figure is the
median step over --rounds rounds (1 on a GPU, 3 on a CPU, whose run-to-run noise is larger) that run the providers
in alternating order; on a CPU (--interleave) their steps alternate within a round as well, since a 2-core machine's
speed drifts by more than the differences measured (0.79x-1.13x in block-wise runs of the same two models). Writes
a JSON, a Markdown table and a bar chart (PNG, matplotlib) of the speedups over timm eager into --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import statistics
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


def prepare(provider: str, name: str, mode: str, batch: int, device: torch.device, dtype: torch.dtype,
            warmup: int, compile_mode: str | None):
    """One provider's model on one mode, warmed up: (step function, result fields without timings)."""
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
    fields = {"provider": provider, "model": name, "mode": mode, "batch": batch, "img_size": img_size,
              "flops_per_image": model_flops(model, img_size) * (3 if mode == "train" else 1)}
    return step, fields


def _timed(step, device) -> float:
    """Milliseconds of one synchronized step: a stall of the machine moves one sample, not the figure."""
    t0 = time.perf_counter()
    step()
    _sync(device)
    return round((time.perf_counter() - t0) * 1e3, 3)


def measure(provider: str, name: str, mode: str, batch: int, device: torch.device, dtype: torch.dtype, steps: int,
            warmup: int, compile_mode: str | None) -> dict:
    """Step times and peak memory of one provider on one model and mode, measured alone."""
    torch._dynamo.reset()
    step, result = prepare(provider, name, mode, batch, device, dtype, warmup, compile_mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["step_times_ms"] = [_timed(step, device) for _ in range(steps)]
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def measure_interleaved(providers, name: str, mode: str, batch: int, device: torch.device, dtype: torch.dtype,
                        steps: int, warmup: int, compile_mode: str | None) -> list[dict]:
    """Step times of several providers whose steps alternate (A B, B A, A B, ...), so a machine whose speed drifts
    over seconds (a busy or thermally throttled CPU) affects all of them alike. All models are alive at once, so no
    peak memory is reported: use measure() for that."""
    torch._dynamo.reset()
    prepared = [prepare(p, name, mode, batch, device, dtype, warmup, compile_mode) for p in providers]
    for _, result in prepared:
        result["step_times_ms"] = []
    for k in range(steps):
        for step, result in (prepared if k % 2 == 0 else prepared[::-1]):
            result["step_times_ms"].append(_timed(step, device))
    return [result for _, result in prepared]


def merge_rounds(rounds: list[dict]) -> dict:
    """One provider's measurements over several rounds as one result: the median of every timed step, its
    images/s, the spread (interquartile range of the steps, in ms) and the highest peak memory."""
    times = sorted(t for r in rounds for t in r["step_times_ms"])
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    merged = {k: v for k, v in rounds[0].items() if k not in ("step_times_ms", "peak_memory_gb")}
    merged.update(step_ms=round(median, 3), step_iqr_ms=round(quartiles[2] - quartiles[0], 3),
                  images_per_s=round(merged["batch"] / (median / 1e3), 1), rounds=len(rounds), steps=len(times))
    if "peak_memory_gb" in rounds[0]:
        merged["peak_memory_gb"] = max(r["peak_memory_gb"] for r in rounds)
    return merged


def write_outputs(results: list[dict], meta: dict, out: Path) -> dict[str, Path]:
    """JSON, Markdown table and PNG bar chart of speedups over timm eager; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{meta['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', meta['device']).strip('-')}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# deit_fast.bench, {meta['date']}, {meta['device']}", "",
             f"torch {meta['torch']}, dtype {meta['dtype']}, peak {meta['peak_tflops']} TFLOP/s (measured matmul), "
             f"{meta['rounds']} round(s) over the providers in alternating order"
             f"{' with their steps interleaved' if meta['interleave'] else ''}, each {meta['steps']} timed steps "
             f"after {meta['warmup']} warm-up; ms/step is the median step, IQR the interquartile range of the steps",
             "", "| model | mode | batch | provider | ms/step | IQR ms | images/s | vs timm | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['provider']} | {r['step_ms']} | "
                     f"{r['step_iqr_ms']} | {r['images_per_s']} | {r.get('speedup_vs_timm', '')} | "
                     f"{r.get('mfu', '')} | {r.get('peak_memory_gb', '')} |")
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
    parser.add_argument("--rounds", type=int, default=1 if cuda else 3,
                        help="rounds over the providers, in alternating order; each figure is the median step of all")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=not cuda,
                        help="alternate the providers' steps within a round (default on CPUs, whose speed drifts; "
                             "off on GPUs, where each provider runs alone so that its peak memory is its own)")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2, help="untimed steps first (compilation)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the *_compile providers (default: torch's default)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    args = parser.parse_args(argv)
    for name, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--rounds", args.rounds)):
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
            "peak_tflops": round(peak / 1e12, 2), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "interleave": args.interleave}
    results = []
    for name in args.models:
        for mode in args.modes:
            measured = {p: [] for p in args.providers}
            row = {}
            # Rounds alternate the providers' order (a machine that drifts, e.g. a CPU warming up, favours none),
            # with --interleave their steps alternate too, and the outputs are rewritten after every measurement, so
            # a run cut short (the GPU check's time limit) keeps what it measured.
            for k in range(args.rounds):
                order = args.providers if k % 2 == 0 else args.providers[::-1]
                if args.interleave:
                    batches = [measure_interleaved(order, name, mode, args.batch_size, device, dtype, args.steps,
                                                   args.warmup, args.compile_mode)]
                else:
                    batches = ([measure(p, name, mode, args.batch_size, device, dtype, args.steps, args.warmup,
                                        args.compile_mode)] for p in order)
                for measured_now in batches:
                    gc.collect()  # the previous provider's model, optimizer and activations
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    for m in measured_now:
                        provider = m["provider"]
                        measured[provider].append(m)
                        r = merge_rounds(measured[provider])
                        r["mfu"] = round(r["images_per_s"] * r["flops_per_image"] / peak, 3)
                        row[provider] = r
                        results = [x for x in results
                                   if (x["model"], x["mode"], x["provider"]) != (name, mode, provider)]
                        results.append(r)
                        print(f"{name} {mode} {provider} (round {k + 1}/{args.rounds}): {r['images_per_s']} "
                              f"images/s, {r['step_ms']} ms/step (median), MFU {r['mfu']}", flush=True)
                    write_outputs(results, meta, Path(args.out))
            results = [x for x in results if (x["model"], x["mode"]) != (name, mode)]
            results += [row[p] for p in args.providers]
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
