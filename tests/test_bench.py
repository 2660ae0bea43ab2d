"""python -m deit_fast.bench: FLOP counts against the DeiT paper's table, and a one-step CPU run writing its JSON,
Markdown and PNG."""

import json

import pytest
import timm
import torch

from deit_fast import bench


@pytest.mark.parametrize("name, gflops", [("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6),
                                          ("deit_base_patch16_224", 17.6), ("deit_base_patch16_384", 55.5)])
def test_flops_match_the_paper(name, gflops):
    """Forward FLOPs per image (2 per multiply-add) are twice the DeiT paper's multiply-add 'FLOPs' (Table 1, given
    to one decimal)."""
    model = timm.create_model(name)
    assert bench.model_flops(model, model.patch_embed.img_size[0]) / 2e9 == pytest.approx(gflops, abs=0.05)


def test_cpu_run_writes_results(tmp_path):
    """A one-step CPU run of both eager providers writes JSON (images/s, MFU, speedup), Markdown and a PNG chart."""
    assert bench.main(["--models", "deit_tiny_patch16_224", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    (result_json,) = tmp_path.glob("bench-*.json")
    results = json.loads(result_json.read_text())["results"]
    assert {(r["provider"], r["mode"]) for r in results} == {(p, m) for p in ("timm", "deit_fast")
                                                             for m in ("train", "infer")}
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] and r["speedup_vs_timm"] > 0 for r in results)
    assert all(r["rounds"] == 3 and r["steps"] == 3 for r in results)  # the CPU default: 3 rounds
    assert list(tmp_path.glob("bench-*.md")) and list(tmp_path.glob("bench-*.png"))


def test_rounds_alternate_and_take_the_median(tmp_path, monkeypatch):
    """Rounds run the providers in alternating order; each figure is the median of all timed steps of all rounds
    (one stalled step does not move it) with the interquartile range beside it."""
    order, times = [], iter([[10.0, 11.0], [12.0, 13.0], [10.5, 500.0], [12.5, 12.0], [11.0, 10.0], [13.0, 12.0]])

    def fake_measure(provider, name, mode, batch, *args):
        order.append(provider)
        return {"provider": provider, "model": name, "mode": mode, "batch": batch, "img_size": 224,
                "step_times_ms": next(times), "flops_per_image": 1e9}

    monkeypatch.setattr(bench, "measure", fake_measure)
    assert bench.main(["--models", "deit_tiny_patch16_224", "--modes", "infer", "--rounds", "3", "--steps", "2",
                       "--no-interleave", "--out", str(tmp_path)]) == 0
    assert order == ["timm", "deit_fast", "deit_fast", "timm", "timm", "deit_fast"]
    (result_json,) = tmp_path.glob("bench-*.json")
    results = {r["provider"]: r for r in json.loads(result_json.read_text())["results"]}
    assert len(results) == 2
    # timm's steps: 10, 11, 12.5, 12, 11, 10 -> median 11.0; deit_fast's: 12, 13, 10.5, 500, 13, 12 -> 12.5
    assert results["timm"]["step_ms"] == 11.0 and results["deit_fast"]["step_ms"] == 12.5
    assert results["deit_fast"]["speedup_vs_timm"] == round(11.0 / 12.5, 3)
    assert results["timm"]["steps"] == 6 and results["timm"]["step_iqr_ms"] > 0


def test_bad_arguments():
    """Bad counts are refused by the command line with the option's name."""
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])


def test_results_survive_a_cut_run(tmp_path, monkeypatch):
    """The outputs are rewritten after every measurement, so a run stopped part-way (the GPU check's time limit)
    keeps what it measured."""
    measure = bench.measure

    def measure_then_stop(provider, *args):
        if provider == "deit_fast":
            raise KeyboardInterrupt
        return measure(provider, *args)

    monkeypatch.setattr(bench, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", "deit_tiny_patch16_224", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                    "--modes", "infer", "--no-interleave", "--out", str(tmp_path)])
    (result_json,) = tmp_path.glob("bench-*.json")
    assert [r["provider"] for r in json.loads(result_json.read_text())["results"]] == ["timm"]


def test_interleaved_steps_alternate(monkeypatch):
    """With --interleave (the CPU default) the providers' steps alternate A B, B A, ... inside a round, each timed on
    its own."""
    order = []

    def fake_prepare(provider, name, mode, batch, *args):
        def step():
            order.append(provider)
        return step, {"provider": provider, "model": name, "mode": mode, "batch": batch, "img_size": 224,
                      "flops_per_image": 1e9}

    monkeypatch.setattr(bench, "prepare", fake_prepare)
    results = bench.measure_interleaved(["timm", "deit_fast"], "deit_tiny_patch16_224", "infer", 1,
                                        torch.device("cpu"), torch.float32, 3, 0, None)
    assert order == ["timm", "deit_fast", "deit_fast", "timm", "timm", "deit_fast"]
    assert [len(r["step_times_ms"]) for r in results] == [3, 3] and [r["provider"] for r in results] == [
        "timm", "deit_fast"]
