"""python -m deit_fast.bench: FLOP counts against the DeiT paper's table, and a one-step CPU run writing its JSON,
Markdown and PNG."""

import json

import pytest
import timm

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
    assert list(tmp_path.glob("bench-*.md")) and list(tmp_path.glob("bench-*.png"))


def test_bad_arguments():
    """Bad counts are refused by the command line with the option's name."""
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])


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
                    "--modes", "infer", "--out", str(tmp_path)])
    (result_json,) = tmp_path.glob("bench-*.json")
    assert [r["provider"] for r in json.loads(result_json.read_text())["results"]] == ["timm"]
