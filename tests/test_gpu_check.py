"""benchmarks/gpu_check: exits 0 with a notice without a GPU, and turns pytest-benchmark JSON into the results
table and target verdicts (checked here on a synthetic result, so the script cannot rot between GPU runs)."""

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check"


def load_gpu_check():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_without_gpu_exits_cleanly(tmp_path):
    """Without CUDA the check says so, writes nothing and exits 0."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_check_summarizes_benchmarks():
    """Speedups are computed within each group and targets judged on the best deit_fast provider."""
    gpu_check = load_gpu_check()

    def bench(provider, us, frac):
        return {"group": "layer_norm-fwdbwd-bfloat16-deit-b256-D384",
                "extra_info": {"provider": provider, "backend": provider, "op": "layer_norm", "mode": "fwdbwd",
                               "median_us": us, "gbs": 1.0, "roofline_fraction": frac}}

    raw = {"benchmarks": [bench("torch", 30.0, 0.3), bench("torch_compile", 20.0, 0.5), bench("triton", 12.0, 0.9),
                          bench("cuda", 15.0, 0.8), {"group": "x", "extra_info": {}}]}
    rows, by_group = gpu_check.summarize_benchmarks(raw)
    assert len(rows) == 4
    triton = by_group["layer_norm-fwdbwd-bfloat16-deit-b256-D384"]["triton"]
    assert triton["speedup_vs_torch"] == 2.5 and triton["speedup_vs_torch_compile"] == pytest.approx(1.667, 1e-3)
    (verdict,) = gpu_check.target_verdicts(by_group)
    assert verdict["best_provider"] == "triton" and verdict["fastest_kernel"] == "triton" and verdict["met"]
    assert verdict["speedups"] == {"torch eager": 2.5, "torch.compile": pytest.approx(1.667, 1e-3)}
    raw["benchmarks"][2]["extra_info"]["roofline_fraction"] = 0.7
    rows, by_group = gpu_check.summarize_benchmarks(raw)
    assert not gpu_check.target_verdicts(by_group)[0]["met"]
    meta = {"date": "2026-01-01", "gpu": "GPU", "commit": "abc", "torch": "2", "triton": "3", "cuda": "13"}
    text = gpu_check.markdown(meta, rows, gpu_check.target_verdicts(by_group), [{"name": "build", "ok": True,
                                                                                "seconds": 1.0}])
    assert "| layer_norm-fwdbwd-bfloat16-deit-b256-D384 | triton |" in text


def test_gpu_check_attention_targets():
    """Attention targets compare with the fastest SDPA backend present, with and without layout copies, at N=198."""
    gpu_check = load_gpu_check()

    def bench(provider, us, group="attention-fwdbwd-bfloat16-deit_small-N198"):
        return {"group": group, "extra_info": {"provider": provider, "backend": provider, "op": "attention",
                                               "mode": "fwdbwd", "median_us": us, "gbs": 1.0,
                                               "roofline_fraction": 0.5}}

    raw = {"benchmarks": [bench("sdpa_flash", 130.0), bench("sdpa_cudnn", 100.0), bench("sdpa_flash_nocopy", 90.0),
                          bench("triton", 80.0), bench("triton", 80.0, group="attention-fwdbwd-bfloat16-b-N577"),
                          bench("sdpa_flash", 60.0, group="attention-fwdbwd-bfloat16-b-N577")]}
    _, by_group = gpu_check.summarize_benchmarks(raw)
    verdicts = {v["group"]: v for v in gpu_check.target_verdicts(by_group)}
    n198 = verdicts["attention-fwdbwd-bfloat16-deit_small-N198"]
    assert n198["speedups"] == {"fastest SDPA with timm's copies": 1.25, "fastest SDPA without copies": 1.125}
    assert n198["met"]
    assert "met" not in verdicts["attention-fwdbwd-bfloat16-b-N577"]  # targets are for N=198 only


def test_gpu_check_model_targets():
    """Whole-model rows from deit_fast.bench get speedups over timm eager/compiled and the MFU target for their
    model."""
    gpu_check = load_gpu_check()

    def result(provider, images_per_s, peak=20.0):
        return {"provider": provider, "model": "deit_small_patch16_224", "mode": "train", "batch": 256,
                "step_ms": 256 / images_per_s * 1e3, "images_per_s": images_per_s, "flops_per_image": 27.6e9,
                "mfu": round(images_per_s * 27.6e9 / 989e12, 3), "peak_memory_gb": peak}

    def verdict_of(results):
        rows = gpu_check.model_rows(results)
        by_group = {}
        for r in rows:
            by_group.setdefault(r["group"], {})[r["provider"]] = r
        gpu_check.add_speedups(by_group)
        (verdict,) = gpu_check.target_verdicts(by_group)
        return verdict

    verdict = verdict_of([result("timm", 10000.0), result("timm_compile", 12000.0), result("deit_fast", 14000.0),
                          result("deit_fast_compile", 16000.0, peak=19.5)])
    assert verdict["best_provider"] == "deit_fast_compile"
    assert verdict["speedups"] == {"timm eager": 1.6, "timm under torch.compile": pytest.approx(1.333, 1e-3)}
    assert verdict["mfu"] == pytest.approx(0.447, 1e-3) and not verdict["met"]  # MFU 44.7% < 45%
    assert "MFU >= 45%" in verdict["target"] and verdict["peak_memory_gb"] == (19.5, 20.0)
    fast = [result("timm", 10000.0), result("timm_compile", 12000.0), result("deit_fast_compile", 16500.0)]
    assert verdict_of(fast)["met"]
    fast[-1]["peak_memory_gb"] = 20.5  # faster, but more memory than timm's: the target is missed
    assert not verdict_of(fast)["met"]


def test_gpu_check_saved_memory_target():
    """The MLP half must save no more for the backward than timm's (saved_mb from the benchmark)."""
    gpu_check = load_gpu_check()

    def bench(provider, us, saved):
        return {"group": "mlp_half-fwdbwd-bfloat16-deit_small", "extra_info": {
            "provider": provider, "backend": provider, "op": "mlp_half", "mode": "fwdbwd", "median_us": us,
            "saved_mb": saved}}

    for ours, met in ((100.0, True), (200.0, False)):
        raw = {"benchmarks": [bench("timm", 200.0, 180.0), bench("timm_compile", 120.0, 150.0),
                              bench("deit_fast", 100.0, ours)]}
        _, by_group = gpu_check.summarize_benchmarks(raw)
        (verdict,) = gpu_check.target_verdicts(by_group)
        assert verdict["saved_mb"] == (ours, 180.0) and verdict["met"] is met


def test_step_timeouts_share_the_budget():
    """Each step gets its weighted share of what is left (so the last benchmark suites still get time after a slow
    build), capped, and never under 10 s."""
    gpu_check = load_gpu_check()
    w = gpu_check.STEP_WEIGHTS
    plan = [w["build"], w["info"], w["gpu_tests"], w["models"]] + [w["suite"]] * 7
    build = gpu_check.step_timeout(520, plan[0], plan, cap=300)
    assert build == pytest.approx(520 * w["build"] / sum(plan)) and 100 < build < 300
    # After the build, the info step and the GPU tests used their whole shares, the last suite still gets a share.
    left = 520 - build
    for i in (1, 2, 3):
        used = gpu_check.step_timeout(left, plan[i], plan[i:], cap=300)
        left -= used
    assert gpu_check.step_timeout(left, w["suite"], plan[4:], cap=120) == pytest.approx(left / 7)
    assert gpu_check.step_timeout(1000, 1.0, [1.0], cap=120) == 120
    assert gpu_check.step_timeout(5, 1.0, [1.0, 1.0], cap=120) == 10
