"""End-to-end training runs on a tiny model with the real MNIST shipped in the repository."""
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
import inference
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import REPO, exits_2, grid_tiles, run_training
from data import DataError, load_mnist, to_uint8
from diffusion import Diffusion, SamplingSpec, check_sampling
from sampling import digit_rows, generate, load_model
from trainer import Trainer, TrainingLoop, lr_factor


def new_trainer(flags, conditional=False):
    """The Trainer train.py would build (its checkpoint's state when resumed), without the run's loop."""
    args, exp_dir, ckpt = train.setup(*config.parse_args(flags, conditional=conditional), conditional=conditional)
    args, data, _ = train.training_data(args, conditional)
    return Trainer(args, conditional, exp_dir, (data.images, data.labels),
                   train.run_config(args, conditional, 1, data.description()), ckpt)


def test_mnist_loads_offline_from_the_repository(data_dir):
    x, y = load_mnist(data_dir, train=True)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and set(y.unique().tolist()) == set(range(10))
    x, y = load_mnist(data_dir, train=False)
    assert x.shape == (10000, 28, 28)


def test_corrupt_data_file_is_named(tmp_path, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(os.path.join(data_dir, "MNIST", "raw"), raw, ignore=shutil.ignore_patterns("*-ubyte"))
    target = raw / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(str(tmp_path), train=True)
    (raw / "SHA256SUMS").unlink()  # without the checksums the gzip reader still catches it
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is corrupt or truncated"):
        load_mnist(str(tmp_path), train=True)


def test_a_finished_run_is_freed_without_the_collector(train_flags):
    """No reference cycle holds the trainer: freeing it frees DDP's process group at once (torchrun's
    teardown relies on that), with the cycle collector off."""
    args, given = config.parse_args(train_flags + ["--experiment_name", "free", "--max_steps", "2"], conditional=False)
    trainer, loop = train.start(args, given, False, rank=0, world=1, local_rank=0)
    loop.run()
    gc.collect()
    gc.disable()
    try:
        refs = weakref.ref(trainer), weakref.ref(loop), weakref.ref(trainer.model)
        del trainer, loop
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize("conditional", [False, True])
def test_end_to_end_artefacts(train_flags, tmp_path, conditional):
    summary = run_training(train_flags + ["--experiment_name", "e2e", "--max_steps", "6"], conditional)
    exp = tmp_path / "runs" / "e2e"
    assert summary["steps"] == 6 and summary["stopped_by"] == "max_steps"

    config = json.loads((exp / "config.json").read_text())
    assert config["args"]["max_steps"] == 6 and config["args"]["channel_mult"] == [1, 2]
    assert config["conditional"] == conditional and config["torch"] == torch.__version__

    for name in ("last.pth", "best_model.pth"):
        ckpt = load_checkpoint(str(exp / name), conditional=conditional)
        assert ckpt["step"] == 6 and ckpt["config"]["args"] == config["args"]
    summary_file = json.loads((exp / "summary.json").read_text())
    assert summary_file["best_model"]["metric"] == "fid_mnist" and summary_file["steps"] == 6

    # The grid is the EMA's samples with the run's sampler and seed: 10x10, one row per digit if conditional.
    ckpt = load_checkpoint(str(exp / "last.pth"))
    model, diffusion = model_from_checkpoint(ckpt)
    labels = digit_rows(10, 10) if conditional else None
    spec = check_sampling(SamplingSpec("dpm_solver", 2, guidance_scale=0.5 if conditional else 0.0), diffusion.levels,
                          conditional, has_guide=False)
    assert ckpt["sampling"] == dict(dataclasses.asdict(spec), guidance_interval=None)  # the grids' spec is the default
    expected = to_uint8(generate(model, diffusion, 100, spec, labels=labels, batch_size=100, seed=0)).numpy()
    assert np.abs(grid_tiles(exp / "samples" / "epoch_000.png").astype(int) - expected).max() <= 1
    for name in ("loss_curve.png", "noise_schedule.png"):
        plot = np.asarray(Image.open(exp / "visualizations" / name).convert("L"))
        assert plot.shape[1] > 500 and plot.std() > 10, name  # a drawn figure, not an empty canvas

    events = EventAccumulator(str(exp / "logs"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "eval/test_loss",
            "eval/fid_mnist", "eval/is_mnist_mean", "eval/precision", "eval/recall"} <= set(tags["scalars"])
    assert ("eval/class_accuracy" in tags["scalars"]) == conditional
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert "samples" in tags["images"]
    assert "config/text_summary" in tags["tensors"]  # the configuration, as text
    hparams = events.PluginTagToContent("hparams")  # and the HParams tab: flags against final metrics
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"fid_mnist" in hparams["_hparams_/experiment"] and b"model_channels" in hparams["_hparams_/experiment"]


@pytest.mark.parametrize("formulation", ["ddpm", "edm"])
def test_resume_is_exact(train_flags, formulation):
    flags = train_flags + ["--dropout", "0.1", "--save_freq", "1", "--formulation", formulation]
    run_training(flags + ["--experiment_name", "once", "--max_steps", "8"], conditional=True)
    run_training(flags + ["--experiment_name", "twice", "--max_steps", "4"], conditional=True)
    out = os.path.dirname(flags[flags.index("--output_dir") + 1] + "/")
    resumed = os.path.join(out, "twice", "last.pth")
    run_training(["--resume", resumed, "--max_steps", "8"], conditional=True)
    a = load_checkpoint(os.path.join(out, "once", "last.pth"))
    b = load_checkpoint(resumed)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["train_state"]["history"] == b["train_state"]["history"]


def test_guide_snapshot_is_the_ema_at_its_share_of_the_run(train_flags, tmp_path):
    """--guide_snapshot 0.5 of a 6-step run: the guide is the EMA of step 3, frozen from then on and held by
    every later checkpoint; a run resumed before the snapshot takes the same one, a run resumed after it
    keeps it; and the run's checkpoints sample with autoguidance at its --autoguidance_scale by default."""
    flags = train_flags + ["--formulation", "flow", "--guide_snapshot", "0.5", "--autoguidance_scale", "1.5",
                           "--guidance_interval", "0.2,20"]

    def train(max_steps, name=None, resume=None):
        run = ["--resume", resume] if resume else flags + ["--experiment_name", name]
        trainer = new_trainer(run + ["--max_steps", str(max_steps)])
        trainer.total_steps = 6  # the run's length, which the share is of (its epochs' steps otherwise)
        TrainingLoop(trainer).run()
        return trainer
    once, at_3 = train(6, "once"), train(3, "at_3")
    assert once.guide_step == at_3.guide_step == 3
    assert all(torch.equal(g, e) for g, e in zip(once.guide.parameters(), at_3.ema.parameters()))
    assert not all(torch.equal(g, e) for g, e in zip(once.guide.parameters(), once.ema.parameters()))
    runs = tmp_path / "runs"
    assert train(2, "resumed").guide is None
    train(4, resume=str(runs / "resumed" / "last.pth"))  # takes the guide at step 3, after the resume
    assert load_checkpoint(str(runs / "resumed" / "last.pth"))["guide"]["step"] == 3
    resumed = train(6, resume=str(runs / "resumed" / "last.pth"))  # restores it
    a, b = (load_checkpoint(str(runs / name / "last.pth"))["guide"] for name in ("once", "resumed"))
    assert a["step"] == b["step"] == 3 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert resumed.guide_step == 3
    loaded = load_model(inference.build_parser().parse_args(["--model_path", str(runs / "once" / "last.pth")]))
    assert loaded.guide_model is not None  # the run's sampler (--sample_steps 2), guided as the run was
    assert loaded.specs["dpm_solver"].describe() == "dpm_solver, 2 steps, eta 1, autoguidance w 1.5 at sigma (0.2, 20]"


def test_speed_flags_keep_the_training_step(train_flags):
    """Two steps from the same state (the output layer starts at zero, so the second step is the first
    whose loss and gradients involve the whole network): --channels_last changes only the layout,
    --amp bf16 is honoured on the CPU and changes them slightly."""
    results = {}
    for name, flags in (("plain", ["--amp", "none"]), ("nhwc", ["--channels_last", "--amp", "none"]),
                        ("bf16", ["--amp", "bf16"])):
        tr = new_trainer(train_flags + ["--experiment_name", name] + flags)
        out_conv = tr.model.out[-1].weight
        assert out_conv.is_contiguous(memory_format=torch.channels_last) == (name == "nhwc")
        tr.train_step(*tr.batches.take(torch.arange(16)))
        results[name] = [v.item() for v in tr.train_step(*tr.batches.take(torch.arange(16, 32)))]  # loss, gradient norm
    (loss, grad), (nhwc_loss, nhwc_grad) = results["plain"], results["nhwc"]
    assert nhwc_loss == pytest.approx(loss, rel=1e-5) and nhwc_grad == pytest.approx(grad, rel=1e-4)
    assert 0 < abs(results["bf16"][0] - loss) < 0.02 * loss and 0 < abs(results["bf16"][1] - grad) < 0.05 * grad


def test_sample_method_reaches_the_sampler_and_the_checkpoint(train_flags, tmp_path):
    grids = []
    for method in ("ddim", "heun"):
        run_training(train_flags + ["--experiment_name", method, "--max_steps", "2", "--sample_method", method])
        grids.append(Image.open(tmp_path / "runs" / method / "samples" / "epoch_000.png").tobytes())
        assert load_checkpoint(str(tmp_path / "runs" / method / "last.pth"))["sampling"]["method"] == method
    assert grids[0] != grids[1]  # the same weights and seed: only the sampler differs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(train_flags, tmp_path, monkeypatch):
    run_training(train_flags + ["--experiment_name", "nan", "--max_steps", "4"])
    last = tmp_path / "runs" / "nan" / "last.pth"
    good = load_checkpoint(str(last))
    real_loss = Diffusion.training_loss
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(Diffusion, "training_loss", poisoned)
    with pytest.raises(SystemExit) as exc:
        run_training(["--resume", str(last), "--max_steps", "10"])
    assert exc.value.code == 1
    after = load_checkpoint(str(last))
    assert after["step"] == 4
    assert all(torch.equal(after["ema"][k], v) for k, v in good["ema"].items())


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(tmp_path, tiny_flags):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_flags, "--output_dir", str(tmp_path),
           "--experiment_name", "sig", "--log_every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until it is really training
        lines.append(line)
        if "step 3 " in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    assert "SIGTERM received" in out and "--resume" in out
    ckpt = load_checkpoint(str(tmp_path / "sig" / "last.pth"))
    assert ckpt["step"] >= 3
    assert json.loads((tmp_path / "sig" / "summary.json").read_text())["stopped_by"] == "SIGTERM"


@pytest.mark.parametrize("bad,message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--preset", "gpu-huge"], "invalid choice"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--channel_mult", "1,x"], "comma-separated integers"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is not supported on cpu"),
    (["--compile", "fast"], "invalid choice"),
    (["--sample_steps", "0"], "--sample_steps must be between 1 and the model's 1000 noise levels, got 0"),
    (["--guide_snapshot", "1"], "--guide_snapshot must be in [0, 1)"),
    (["--guidance_scale", "1"], "unrecognized arguments: --guidance_scale 1"),  # classifier-free: conditional only
])
def test_bad_flags(capsys, train_flags, bad, message):
    exits_2(capsys, lambda: run_training(train_flags + bad), message)


def test_bad_resume_and_existing_directory(capsys, train_flags, tmp_path):
    exits_2(capsys, lambda: run_training(["--resume", str(tmp_path / "nope.pth")]), "no such file")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    exits_2(capsys, lambda: run_training(["--resume", str(junk)]), "not a PyTorch checkpoint")
    run_training(train_flags + ["--experiment_name", "cond", "--max_steps", "2"], conditional=True)
    cond = tmp_path / "runs" / "cond" / "last.pth"
    exits_2(capsys, lambda: run_training(["--resume", str(cond)]), "is a conditional checkpoint")
    before = sorted(os.listdir(tmp_path / "runs" / "cond"))
    exits_2(capsys, lambda: run_training(train_flags + ["--experiment_name", "cond"], conditional=True),
            "already holds a run")
    assert sorted(os.listdir(tmp_path / "runs" / "cond")) == before


@pytest.mark.slow
def test_cli_help_shows_defaults():
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_conditional.py"), "--help"],
                         capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("--epochs", "--num_classes", "--p_uncond", "--preset", "--resume", "--time_budget"):
        assert flag in out
    for flag, default in (("--epochs EPOCHS", "100"), ("--lr LR", "0.0002"), ("--num_classes NUM_CLASSES", "None"),
                          ("--batch_size BATCH_SIZE", "128"), ("--save_freq SAVE_FREQ", "10")):
        assert re.search(re.escape(flag) + r"\s+(\S.*?)?\(default: " + re.escape(default) + r"\)", out), flag


def test_padded_image_size(train_flags, tmp_path):
    run_training(train_flags + ["--experiment_name", "pad", "--max_steps", "2", "--image_size", "32",
                                "--attention_resolutions", "16"])
    ckpt = load_checkpoint(str(tmp_path / "runs" / "pad" / "last.pth"))
    assert ckpt["model_config"]["image_size"] == 32
    assert Image.open(tmp_path / "runs" / "pad" / "samples" / "epoch_000.png").size == (10 * 34 + 2, 10 * 34 + 2)


@pytest.mark.unit
def test_lr_schedule_ends_with_the_time_budget():
    """Warm-up by steps, then a cosine over the budget when a time budget ends the run before the epochs do."""
    assert lr_factor(1, 375_000, 2, 0.0, 600.0) == pytest.approx(1.0)  # (1 + 1) / 2: the end of the warm-up
    for seconds, factor in ((0, 1.0), (150, 0.5 * (1 + math.cos(math.pi / 4))), (300, 0.5), (600, 0.0), (900, 0.0)):
        assert lr_factor(10, 375_000, 2, seconds, 600.0) == pytest.approx(factor, abs=1e-3), seconds
    # without a budget the step count decides: 10 of 375,000 steps is still at the top, the last one at 0
    assert lr_factor(10, 375_000, 2, 900, None) == pytest.approx(1.0, abs=1e-6)
    assert lr_factor(375_000, 375_000, 2, 900, None) == pytest.approx(0.0, abs=1e-9)


def test_budgeted_run_stops_near_zero_lr(train_flags, tmp_path):
    run_training(train_flags + ["--experiment_name", "anneal", "--time_budget", "0.15", "--log_every", "1"])
    events = EventAccumulator(str(tmp_path / "runs" / "anneal" / "logs"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert len(lrs) > 5 and max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)


@pytest.mark.unit
def test_cpu_preset_sets_the_swept_recipe_and_flags_override_it():
    args, given = config.parse_args(["--preset", "cpu", "--lr", "5e-4"], conditional=True)
    assert given == {"preset", "lr"}
    preset = config.PRESETS["cpu"]
    assert args.lr == 5e-4  # given on the command line: it wins
    assert args.time_budget == preset["time_budget"] and args.formulation == preset["formulation"] == "flow"
    assert args.p_mean == preset["p_mean"] != config.parse_args([], conditional=False)[0].p_mean  # not the default
    assert args.channel_mult == preset["channel_mult"] == (1, 2, 2)  # typed, as the preset holds it
    assert config.parse_args([], conditional=False)[0].time_budget is None  # no preset: the documented defaults


@pytest.mark.slow
def test_bench_times_the_preset_trainer_without_data(tmp_path):
    """bench.py builds the trainer train.py would build (the preset's exact network) and writes nothing but
    its report; the sampler columns follow from the measured network calls per second."""
    from config import create_model_and_diffusion
    from tools import bench
    bench.main(["--models", "cpu_preset", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    with open(tmp_path / "b.json") as f:
        (row,) = json.load(f)["rows"]
    preset_args, _ = config.parse_args(["--preset", "cpu", "--image_size", "28"], conditional=False)
    model, _ = create_model_and_diffusion(config.model_config(preset_args, False), config.diffusion_config(preset_args))
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["train_images_per_s"] > 0 and 0.5 < row["sampler_loop_overhead"] < 3
    assert os.listdir(tmp_path) == ["b.json"]


def test_the_readmes_python_snippet_trains_a_step_and_samples(data_dir, tmp_path, monkeypatch):
    """The README's snippet runs as printed, from a folder whose ./data is MNIST: a finite loss, and 16 images."""
    snippet = re.search(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S).group(1)
    os.symlink(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["samples"].shape == (16, 1, 28, 28)
    assert scope["samples"].abs().max() <= 1


def test_a_cpu_run_without_a_preset_says_what_it_trains_and_how_long_it_takes(train_flags, capsys):
    """Before its first step: what it trains and that --preset cpu trains a good model; once three steps after
    the first are timed: the images/s and the time the rest takes. A preset run says neither."""
    run_training(train_flags + ["--experiment_name", "long", "--max_steps", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"this run trains a [\d,]+-parameter U-Net for 6 steps of 16 images on the CPU; --preset cpu "
                     r"trains a good model in about 10 minutes", out), out
    measured = re.search(r"([\d.]+) images/s measured: the rest of the run takes about ([\d.]+) seconds", out)
    assert measured and float(measured.group(1)) > 0 and float(measured.group(2)) < 60, out
    run_training(train_flags + ["--experiment_name", "preset", "--preset", "cpu", "--max_steps", "5", "--device", "cpu",
                                "--model_channels", "8", "--eval_samples", "20"])
    out = capsys.readouterr().out
    assert "--preset cpu trains" not in out and "images/s measured" not in out
