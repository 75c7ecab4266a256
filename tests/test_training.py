"""End-to-end training runs on a tiny model with the real MNIST shipped in the repository."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
import trainer
from checkpoint import load_checkpoint
from conftest import DATA_DIR, REPO, TINY_FLAGS
from data import DataError, load_mnist
from ddpm_model import GaussianDiffusion


def run(flags, conditional=False):
    return trainer.main(flags, conditional=conditional)


def test_mnist_loads_offline_from_the_repository():
    x, y = load_mnist(DATA_DIR, train=True)
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and set(y.unique().tolist()) == set(range(10))
    x, y = load_mnist(DATA_DIR, train=False)
    assert x.shape == (10000, 28, 28)


def test_corrupt_data_file_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(os.path.join(DATA_DIR, "MNIST", "raw"), raw, ignore=shutil.ignore_patterns("*-ubyte"))
    target = raw / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(str(tmp_path), train=True)
    (raw / "SHA256SUMS").unlink()  # without the checksums the gzip reader still catches it
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is corrupt or truncated"):
        load_mnist(str(tmp_path), train=True)


@pytest.mark.parametrize("conditional", [False, True])
def test_end_to_end_artefacts(train_flags, tmp_path, conditional):
    summary = run(train_flags + ["--experiment_name", "e2e", "--max_steps", "6"], conditional)
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

    grid = Image.open(exp / "samples" / "epoch_000.png")
    assert grid.size == (10 * 30 + 2, 10 * 30 + 2)  # 10x10 images of 28 px with 2 px padding
    for name in ("loss_curve.png", "noise_schedule.png"):
        Image.open(exp / "visualizations" / name).verify()

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


def test_resume_is_exact(train_flags):
    flags = train_flags + ["--dropout", "0.1", "--save_freq", "1"]
    run(flags + ["--experiment_name", "once", "--max_steps", "8"], conditional=True)
    run(flags + ["--experiment_name", "twice", "--max_steps", "4"], conditional=True)
    out = os.path.dirname(flags[flags.index("--output_dir") + 1] + "/")
    resumed = os.path.join(out, "twice", "last.pth")
    run(["--resume", resumed, "--max_steps", "8"], conditional=True)
    a = load_checkpoint(os.path.join(out, "once", "last.pth"))
    b = load_checkpoint(resumed)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["train_state"]["history"] == b["train_state"]["history"]


def test_speed_flags_keep_the_training_step(train_flags):
    """Two steps from the same state (the output layer starts at zero, so the second step is the first
    whose loss and gradients involve the whole network): --channels_last changes only the layout,
    --amp bf16 is honoured on the CPU and changes them slightly."""
    results = {}
    for name, flags in (("plain", ["--amp", "none"]), ("nhwc", ["--channels_last", "--amp", "none"]),
                        ("bf16", ["--amp", "bf16"])):
        args, exp_dir, _ = trainer.setup(*trainer.parse_args(train_flags + ["--experiment_name", name] + flags,
                                                             conditional=False), conditional=False)
        tr = trainer.Trainer(args, False, exp_dir, load_mnist(DATA_DIR))
        out_conv = tr.model.out[-1].weight
        assert out_conv.is_contiguous(memory_format=torch.channels_last) == (name == "nhwc")
        tr.train_step(torch.arange(16))
        results[name] = [v.item() for v in tr.train_step(torch.arange(16, 32))]  # loss, gradient norm
    (loss, grad), (nhwc_loss, nhwc_grad) = results["plain"], results["nhwc"]
    assert nhwc_loss == pytest.approx(loss, rel=1e-5) and nhwc_grad == pytest.approx(grad, rel=1e-4)
    assert 0 < abs(results["bf16"][0] - loss) < 0.02 * loss and 0 < abs(results["bf16"][1] - grad) < 0.05 * grad


def test_sample_eta_reaches_the_sampler(train_flags, tmp_path):
    grids = []
    for eta in ("0", "1"):
        run(train_flags + ["--experiment_name", f"eta{eta}", "--max_steps", "2", "--sample_eta", eta])
        grids.append(Image.open(tmp_path / "runs" / f"eta{eta}" / "samples" / "epoch_000.png").tobytes())
    assert grids[0] != grids[1]  # the same weights and seed: only the sampler's noise differs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(train_flags, tmp_path, monkeypatch):
    run(train_flags + ["--experiment_name", "nan", "--max_steps", "4"])
    last = tmp_path / "runs" / "nan" / "last.pth"
    good = load_checkpoint(str(last))
    real_loss = GaussianDiffusion.training_loss
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(GaussianDiffusion, "training_loss", poisoned)
    with pytest.raises(SystemExit) as exc:
        run(["--resume", str(last), "--max_steps", "10"])
    assert exc.value.code == 1
    after = load_checkpoint(str(last))
    assert after["step"] == 4
    assert all(torch.equal(after["ema"][k], v) for k, v in good["ema"].items())


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *TINY_FLAGS, "--output_dir", str(tmp_path),
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


def expect_exit_2(capsys, flags, conditional=False, message=""):
    with pytest.raises(SystemExit) as exc:
        run(flags, conditional)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


@pytest.mark.parametrize("bad,message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--preset", "gpu-huge"], "invalid choice"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--channel_mult", "1,x"], "comma-separated integers"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is not supported on cpu"),
    (["--compile", "fast"], "invalid choice"),
    (["--sample_eta", "-1"], "--sample_eta must not be negative"),
])
def test_bad_flags(capsys, train_flags, bad, message):
    expect_exit_2(capsys, train_flags + bad, message=message)


def test_bad_resume_and_existing_directory(capsys, train_flags, tmp_path):
    expect_exit_2(capsys, ["--resume", str(tmp_path / "nope.pth")], message="no such file")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    err = expect_exit_2(capsys, ["--resume", str(junk)], message="not a PyTorch checkpoint")
    assert len(err.strip().splitlines()) == 1
    run(train_flags + ["--experiment_name", "cond", "--max_steps", "2"], conditional=True)
    cond = tmp_path / "runs" / "cond" / "last.pth"
    expect_exit_2(capsys, ["--resume", str(cond)], conditional=False, message="is a conditional checkpoint")
    before = sorted(os.listdir(tmp_path / "runs" / "cond"))
    expect_exit_2(capsys, train_flags + ["--experiment_name", "cond"], conditional=True, message="already holds a run")
    assert sorted(os.listdir(tmp_path / "runs" / "cond")) == before


@pytest.mark.slow
def test_cli_help_shows_defaults():
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_conditional.py"), "--help"],
                         capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("--epochs", "--num_classes", "--p_uncond", "--preset", "--resume", "--time_budget"):
        assert flag in out
    for flag, default in (("--epochs EPOCHS", "100"), ("--lr LR", "0.0002"), ("--num_classes NUM_CLASSES", "10"),
                          ("--batch_size BATCH_SIZE", "128"), ("--save_freq SAVE_FREQ", "10")):
        assert re.search(re.escape(flag) + r"\s+(\S.*?)?\(default: " + re.escape(default) + r"\)", out), flag


def test_padded_image_size(train_flags, tmp_path):
    run(train_flags + ["--experiment_name", "pad", "--max_steps", "2", "--image_size", "32", "--attention_resolutions", "16"])
    ckpt = load_checkpoint(str(tmp_path / "runs" / "pad" / "last.pth"))
    assert ckpt["model_config"]["image_size"] == 32
    assert Image.open(tmp_path / "runs" / "pad" / "samples" / "epoch_000.png").size == (10 * 34 + 2, 10 * 34 + 2)


def test_lr_schedule_ends_with_the_time_budget(train_flags):
    """Warm-up by steps, then a cosine over the budget when --time_budget ends the run before the epochs do."""
    flags = train_flags + ["--experiment_name", "lr", "--time_budget", "10", "--warmup_steps", "2"]
    args, exp_dir, _ = trainer.setup(*trainer.parse_args(flags, conditional=False), conditional=False)
    tr = trainer.Trainer(args, False, exp_dir, load_mnist(DATA_DIR))
    tr.step = 1
    assert tr.lr_factor() == pytest.approx(1.0)  # (1 + 1) / 2: the end of the warm-up
    tr.step = 10  # far from the end of the 100 epochs: the clock decides
    for seconds, factor in ((0, 1.0), (150, 0.5 * (1 + math.cos(math.pi / 4))), (300, 0.5), (600, 0.0), (900, 0.0)):
        tr.clock = seconds
        assert tr.lr_factor() == pytest.approx(factor, abs=1e-3), seconds
    tr.args.time_budget = None  # without a budget the step count decides: 10 of 375,000 steps, still at the top
    assert tr.lr_factor() == pytest.approx(1.0, abs=1e-6)


def test_budgeted_run_stops_near_zero_lr(train_flags, tmp_path):
    run(train_flags + ["--experiment_name", "anneal", "--time_budget", "0.15", "--log_every", "1"])
    events = EventAccumulator(str(tmp_path / "runs" / "anneal" / "logs"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert len(lrs) > 5 and max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)


def test_cpu_preset_sets_the_swept_recipe_and_flags_override_it():
    args, given = trainer.parse_args(["--preset", "cpu", "--lr", "5e-4"], conditional=True)
    assert given == {"preset", "lr"}
    preset = config.PRESETS["cpu"]
    assert args.lr == 5e-4  # given on the command line: it wins
    assert args.time_budget == preset["time_budget"] and args.min_snr_gamma == preset["min_snr_gamma"] > 0
    assert args.channel_mult == preset["channel_mult"] == (1, 2, 2)  # typed, as the preset holds it
    assert trainer.parse_args([], conditional=False)[0].time_budget is None  # no preset: the documented defaults


@pytest.mark.slow
def test_bench_times_the_preset_trainer_without_data(tmp_path):
    """bench.py builds the trainer train.py would build (the preset's exact network) and writes nothing but
    its report; the sampler columns follow from the measured network calls per second."""
    import bench
    from checkpoint import build_model
    bench.main(["--models", "cpu_preset", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    with open(tmp_path / "b.json") as f:
        (row,) = json.load(f)["rows"]
    preset_args, _ = config.parse_args(["--preset", "cpu"], conditional=False)
    assert row["params"] == sum(p.numel() for p in build_model(config.model_config(preset_args), False).parameters())
    assert row["dpm_solver_20_images_per_s"] == pytest.approx(row["sampling_nfe_per_s"] / 20)
    assert row["train_images_per_s"] > 0 and 0.5 < row["sampler_loop_overhead"] < 3
    assert os.listdir(tmp_path) == ["b.json"]
