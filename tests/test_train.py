"""python -m deit_fast.train end to end on CPU: a short teacher + distilled-student job, resume equal to an
uninterrupted run (bitwise), SIGKILL and resume, non-finite losses, 2-rank gloo DDP against 1 rank, teacher class-count
mismatch, checkpoint mismatch, finetuning, evaluation, throughput, and bad configuration values."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import timm
import torch

import deit_fast.ops
from deit_fast import train
from deit_fast.data import photos_dataset

TINY = json.dumps(dict(embed_dim=32, depth=1, num_heads=2, patch_size=8))


@pytest.fixture(scope="module")
def photos():
    return photos_dataset()


def tiny_args(photos, out, *extra, model="deit_tiny_distilled_patch16_224"):
    kwargs = TINY if model.startswith("deit") else "{}"
    return ["--data-set", "IMNET", "--data-path", str(photos), "--model", model, "--model-kwargs", kwargs,
            "--input-size", "32", "--batch-size", "8", "--epochs", "2", "--num-workers", "0", "--lr", "1e-3",
            "--warmup-epochs", "0.5", "--log-every", "1", "--data-pipeline", "torchvision", "--aa", "none",
            "--output-dir", str(out), *extra]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]


def test_help_lists_deits_arguments(capsys):
    """--help explains DeiT's arguments and ours."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--distillation-type", "--teacher-path", "--repeated-aug", "--model-ema-decay", "--data-pipeline",
                 "--checkpoint-every-steps", "--accumulation-steps", "--compile", "--backend", "--config"):
        assert flag in text


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--smoothing", "1.5"], "--smoothing must be in"),
    (["--crop-scale", "0.5", "0.2"], "--crop-scale"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    (["--data-set", "IMNET"], "needs --data-path"),
    (["--eval"], "--eval evaluates the checkpoint"),
    (["--distillation-type", "medium"], "invalid choice"),
    (["--distillation-type", "hard"], "needs --teacher-path"),
    (["--eval-crop-ratio", "0"], "--eval-crop-ratio must be in"),
    (["--opt-eps", "0"], "--opt-eps must be positive"),
    (["--opt-betas", "0.9", "1.5"], "--opt-betas must be in"),
    (["--drop", "2"], "--drop must be in"),
])
def test_bad_config_values(argv, message, capsys):
    """Bad values stop before anything runs, with the flag named."""
    with pytest.raises(SystemExit):
        train.parse_args(["--data-set", "DIGITS", *argv] if "--data-set" not in argv else argv)
    assert message in capsys.readouterr().err


def test_deits_command_line_spellings():
    """DeiT's main.py command lines parse: bare --model-ema/--repeated-aug flags and their --no- forms, the
    underscore spellings --output_dir/--num_workers, --unscale-lr, --opt-eps/--opt-betas, --drop, --eval-crop-ratio,
    --pin-mem/--no-pin-mem, --dist-eval."""
    args = train.parse_args(["--data-set", "DIGITS", "--model-ema", "--repeated-aug", "--output_dir", "out",
                             "--num_workers", "3", "--dist-eval"])
    assert args.model_ema and args.repeated_aug and args.output_dir == "out" and args.num_workers == 3
    args = train.parse_args(["--data-set", "DIGITS", "--no-model-ema", "--no-repeated-aug", "--unscale-lr",
                             "--opt-eps", "1e-6", "--opt-betas", "0.9", "0.95", "--drop", "0.1",
                             "--eval-crop-ratio", "1.0", "--no-pin-mem"])
    assert not args.model_ema and not args.repeated_aug and args.unscale_lr and args.opt_betas == [0.9, 0.95]
    assert (args.opt_eps, args.drop, args.eval_crop_ratio, args.pin_mem) == (1e-6, 0.1, 1.0, False)
    args = train.parse_args(["--data-set", "DIGITS", "--model-ema", "false", "--repeated-aug", "0"])
    assert not args.model_ema and not args.repeated_aug
    # --eval needs no teacher weights even for a distilled run's flags
    assert train.parse_args(["--data-set", "DIGITS", "--distillation-type", "hard", "--eval", "--resume", "c.pth"])


def test_optimizer_flags_reach_the_run(photos, tmp_path):
    """--unscale-lr keeps --lr as given (else lr * global batch / 512), --opt-eps/--opt-betas reach AdamW, --drop
    reaches the model."""
    common = ["--max-steps", "1", "--epochs", "1", "--model-ema", "false", "--lr", "1e-3"]
    for extra, lr in ((["--unscale-lr"], 1e-3), ([], 1e-3 * 8 / 512)):
        out = tmp_path / f"run{len(extra)}"
        assert train.main(tiny_args(photos, out, *common, *extra, "--opt-eps", "1e-6", "--opt-betas", "0.8", "0.9",
                                    "--drop", "0.25")) == 0
        group = torch.load(out / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"][0]
        assert group["initial_lr"] == pytest.approx(lr) and group["eps"] == 1e-6 and group["betas"] == (0.8, 0.9)
    model = train.build_model("deit_tiny_patch16_224", 10, train.parse_args(["--data-set", "DIGITS", "--drop", "0.25",
                                                                            "--model", "deit_tiny_patch16_224"]))
    assert model.head_drop.p == 0.25  # timm's drop_rate, as DeiT's main.py passes it


def test_checkpoints_from_urls(monkeypatch):
    """An https:// --resume/--finetune/--teacher-path (DeiT's released weights) is fetched through torch.hub's cache
    and read with weights_only=True."""
    calls = []

    def fetch(url, **kwargs):
        calls.append((url, kwargs))
        return {"model": {"w": torch.ones(1)}}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetch)
    url = "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"
    assert train.load_weights(url)["w"].item() == 1.0
    assert calls[0][0] == url and calls[0][1]["weights_only"] is True


def test_config_file(tmp_path, capsys):
    """A YAML config sets values, flags override it, unknown keys are refused."""
    config = tmp_path / "c.yaml"
    config.write_text("batch-size: 32\nepochs: 7\ndata_set: DIGITS\n")
    args = train.parse_args(["--config", str(config), "--epochs", "9"])
    assert args.batch_size == 32 and args.epochs == 9 and args.data_set == "DIGITS"
    config.write_text("batch-sise: 32\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])
    assert "unknown keys batch_sise" in capsys.readouterr().err


def test_teacher_then_distilled_student(photos, tmp_path):
    """The default job's shape in miniature: a convnet teacher, then a hard-distilled DeiT student that loads it;
    logs, config, checkpoints and the curves plot are written; --eval reads the checkpoint back and evaluates its
    model weights and its EMA, and takes DeiT-style and bare state_dict files too."""
    teacher_out = tmp_path / "teacher"
    assert train.main(tiny_args(photos, teacher_out, "--model-ema", "false", "--epochs", "1",
                                model="resnet18")) == 0
    assert (teacher_out / "best.pth").exists() and (teacher_out / "config.json").exists()
    student_out = tmp_path / "student"
    assert train.main(tiny_args(photos, student_out, "--distillation-type", "hard", "--teacher-model", "resnet18",
                                "--teacher-path", str(teacher_out / "best.pth"))) == 0
    for name in ("checkpoint.pth", "best.pth", "log.jsonl", "curves.png", "config.json"):
        assert (student_out / name).exists(), name
    records = [json.loads(line) for line in (student_out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(0 <= r["val_top1"] <= 100 for r in epochs)
    steps = [r for r in records if r["type"] == "step"]
    assert all({"loss", "lr", "images_per_s", "data_wait", "host_memory_gb"} <= r.keys() for r in steps)
    assert all(0 < r["host_memory_gb"] < 24 and 0 <= r["data_wait"] <= 1 for r in steps)
    result = train.train(train.parse_args(tiny_args(photos, student_out, "--resume",
                                                    str(student_out / "checkpoint.pth"), "--eval")),
                         train.Context(train.parse_args(["--data-set", "DIGITS"])))
    assert result["images"] == 20
    # As DeiT's --eval: the model's own weights (the last epoch's figure), and the EMA's beside them.
    assert result["top1"] == pytest.approx(epochs[-1]["val_top1"]) and "ema_top1" in result
    # A DeiT-style {'model': state_dict} file and a bare state_dict evaluate the same weights.
    weights = torch.load(student_out / "checkpoint.pth", weights_only=True)["model"]
    for name, content in (("deit_style.pth", {"model": weights}), ("state_dict.pth", weights)):
        torch.save(content, tmp_path / name)
        other = train.train(train.parse_args(tiny_args(photos, student_out, "--resume", str(tmp_path / name),
                                                       "--eval")),
                            train.Context(train.parse_args(["--data-set", "DIGITS"])))
        assert other["top1"] == result["top1"] and "ema_top1" not in other


def test_teacher_class_count_mismatch(photos, tmp_path):
    """A teacher whose class count differs from the data's is refused before training starts."""
    import timm

    path = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("resnet18", num_classes=5).state_dict()}, path)
    with pytest.raises(SystemExit, match="predicts 5 classes but the data has 10"):
        train.main(tiny_args(photos, tmp_path / "s", "--distillation-type", "soft", "--teacher-model", "resnet18",
                             "--teacher-path", str(path)))


def test_resume_equals_uninterrupted_run(photos, tmp_path):
    """Stopping mid-epoch and resuming gives the same per-step losses, bit for bit, as one uninterrupted run (CPU;
    mixup, cutmix, erasing, drop path and EMA on, so every random state must come back)."""
    recipe = ["--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop-path", "0.1", "--model-ema", "true"]
    full = tmp_path / "full"
    assert train.main(tiny_args(photos, full, *recipe)) == 0
    parted = tmp_path / "parted"
    assert train.main(tiny_args(photos, parted, *recipe, "--max-steps", "13")) == 0
    checkpoint = torch.load(parted / "checkpoint.pth", weights_only=False)
    assert checkpoint["step"] == 13 and checkpoint["epoch"] == 1 and checkpoint["step_in_epoch"] == 3
    assert train.main(tiny_args(photos, parted, *recipe, "--resume", str(parted / "checkpoint.pth"))) == 0
    assert losses(parted) == losses(full) and len(losses(full)) == 20


def test_logged_loss_is_the_mean_since_the_last_line(photos, tmp_path):
    """With a line every 3 steps (10 steps an epoch, every epoch's last step also logs), each logged loss is the mean
    of exactly the per-step losses since the line before, across epoch boundaries too."""
    each = tmp_path / "each"
    assert train.main(tiny_args(photos, each)) == 0
    every3 = tmp_path / "every3"
    argv = tiny_args(photos, every3)
    argv[argv.index("--log-every") + 1] = "3"
    assert train.main(argv) == 0
    per_step = losses(each)
    records = [r for r in map(json.loads, (every3 / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert [r["step"] for r in records] == [3, 6, 9, 10, 12, 15, 18, 20]
    previous = 0
    for r in records:
        window = per_step[previous:r["step"]]
        assert r["loss"] == pytest.approx(sum(window) / len(window), rel=1e-5), r
        previous = r["step"]


def test_sigkill_loses_at_most_the_steps_since_the_checkpoint(photos, tmp_path):
    """A run killed with SIGKILL mid-epoch leaves a loadable checkpoint (atomic writes) and resumes from it."""
    out = tmp_path / "killed"
    argv = tiny_args(photos, out, "--checkpoint-every-steps", "2", "--epochs", "3")
    proc = subprocess.Popen([sys.executable, "-m", "deit_fast.train", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.jsonl").exists() or (
            (out / "log.jsonl").exists() and len(losses(out)) < 5 and time.time() < deadline):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = len(losses(out))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert steps_done - checkpoint["step"] <= 2
    assert train.main(argv + ["--resume", str(out / "checkpoint.pth")]) == 0
    final = torch.load(out / "checkpoint.pth", weights_only=False)
    assert final["epoch"] == 3 and final["step"] == 30


def test_non_finite_losses(photos, tmp_path, monkeypatch):
    """Non-finite losses skip their steps (the weights do not move) and the run goes on; K in a row stop it with a
    clear error, keeping the last good checkpoint."""
    real = deit_fast.ops.distill_loss
    calls = {"n": 0}
    bad_steps = {3, 4}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(deit_fast.ops, "distill_loss", flaky)
    out = tmp_path / "nan"
    assert train.main(tiny_args(photos, out, "--epochs", "1", "--max-non-finite", "3")) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["non_finite_streak"] for r in records if r["type"] == "step"][2:5] == [1, 2, 0]
    bad_steps.update(range(6, 1000))
    calls["n"] = 0
    out2 = tmp_path / "nan2"
    assert train.main(tiny_args(photos, out2, "--epochs", "1", "--max-non-finite", "3",
                                "--checkpoint-every-steps", "2")) == 2
    assert torch.load(out2 / "checkpoint.pth", weights_only=False)["step"] <= 5


def test_checkpoint_mismatch_names_keys(photos, tmp_path):
    """Resuming from a checkpoint of another architecture names the mismatched keys."""
    out = tmp_path / "a"
    assert train.main(tiny_args(photos, out, "--max-steps", "1")) == 0
    other = json.dumps(dict(embed_dim=48, depth=1, num_heads=2, patch_size=8))
    argv = tiny_args(photos, tmp_path / "b", "--resume", str(out / "checkpoint.pth"))
    argv[argv.index("--model-kwargs") + 1] = other
    with pytest.raises(SystemExit, match="mis-shaped .*cls_token"):
        train.main(argv)


def test_finetune_resamples_and_drops_heads(photos, tmp_path, capsys):
    """--finetune from a 32-px checkpoint at 48 px: the position embedding is resampled; a checkpoint with another
    class count loses its heads."""
    import deit_fast

    model = deit_fast.create_model("deit_tiny_distilled_patch16_224", num_classes=3, img_size=32,
                                   **json.loads(TINY))
    path = tmp_path / "pre.pth"
    torch.save({"model": model.state_dict()}, path)
    assert train.main(tiny_args(photos, tmp_path / "ft", "--finetune", str(path), "--input-size", "48",
                                "--max-steps", "1")) == 0
    text = capsys.readouterr().out
    assert "dropping head.weight" in text and "resampled from 4x4 to 6x6" in text


def test_throughput(capsys):
    """--throughput prints images/s of the model."""
    assert train.main(["--data-set", "DIGITS", "--throughput", "--model", "deit_tiny_patch16_224", "--model-kwargs",
                       TINY, "--input-size", "32", "--batch-size", "4"]) == 0
    assert "images/s" in capsys.readouterr().out


def test_two_rank_ddp_matches_one_rank(photos, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) at 4 images per rank ends with the weights of one rank at 8 images
    (no mixing or erasing, which draw per rank; the rest is per-sample deterministic)."""
    common = ["--mixup", "0", "--cutmix", "0", "--reprob", "0", "--drop-path", "0", "--repeated-aug", "false",
              "--model-ema", "false", "--max-steps", "3", "--epochs", "1"]
    one = tmp_path / "one"
    assert train.main(tiny_args(photos, one, *common)) == 0
    two = tmp_path / "two"
    argv = tiny_args(photos, two, *common)
    argv[argv.index("--batch-size") + 1] = "4"
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun's port 0 is not "any port")
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", "deit_fast.train", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(one / "checkpoint.pth", weights_only=False)["model"]
    b = torch.load(two / "checkpoint.pth", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_evaluation_over_ranks_counts_each_image_once(photos):
    """Evaluation shares are padded to the same length on every rank (20 images over 3 ranks: 7 each, 1 repeated);
    the padding is not counted, so the ranks' counts sum to the dataset's, and their correct predictions to those of
    one rank over all of it."""
    from deit_fast.data import build_loader

    ctx = train.Context(argparse.Namespace(device="cpu", dtype=None))
    common = dict(batch_size=3, img_size=32, train=False, pipeline="torchvision", num_workers=0)
    loader = build_loader(photos / "val", **common)
    k = len(loader.scan.classes)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=k)
    whole = train.evaluate(model, loader, ctx, k)
    parts = [train.evaluate(model, build_loader(photos / "val", rank=r, world_size=3, **common), ctx, k)
             for r in range(3)]
    assert [p["images"] for p in parts] == [7, 7, 6] and whole["images"] == 20
    assert sum(p["top1"] * p["images"] for p in parts) == pytest.approx(whole["top1"] * 20)
    assert sum(p["loss"] * p["images"] for p in parts) == pytest.approx(whole["loss"] * 20, rel=1e-5)


def test_default_job_short(tmp_path, monkeypatch, capsys):
    """The embedded default job end to end (digits tree, resnet18 teacher, hard-distilled student), cut to one epoch
    each; a second run reuses the cached teacher; --default-job none trains the student without it."""
    monkeypatch.setitem(train.DEFAULT_JOB_TEACHER, "epochs", 1)
    monkeypatch.setitem(train.DEFAULT_JOB_STUDENT, "epochs", 1)
    monkeypatch.setitem(train.DEFAULT_JOB_STUDENT, "model_kwargs",
                        json.dumps(dict(embed_dim=32, depth=1, num_heads=2, patch_size=4)))
    assert train.main(["--default-job", "hard", "--output-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "teacher: training timm resnet18" in text and "hard distillation) val top-1" in text
    assert (tmp_path / "teacher" / "best.pth").exists() and (tmp_path / "student" / "curves.png").exists()
    assert train.main(["--default-job", "none", "--output-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "teacher: using" in text and "no distillation) val top-1" in text
    assert (tmp_path / "student-none" / "log.jsonl").exists()
