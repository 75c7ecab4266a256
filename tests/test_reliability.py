"""No run is lost, every bad input gets one line and exit code 2, and resume does what it says.

Faults are injected where they cannot be produced for real here (tests run as root, so a read-only
folder is simulated where the write fails: at mkstemp or torch.save)."""
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import artefacts
import eval as eval_script
import fileio
import inference
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import REPO, TINY_MODEL, exits_2, run_training
from data import DataError, load_mnist
from ddpm_model import ModelConfig, UNet
from diffusion import DDPM, Diffusion, DiffusionConfig, SamplingSpec


def no_temporaries(folder):
    return not [name for name in os.listdir(folder) if name.startswith(fileio.TMP_PREFIX)]


# ----------------------------------------------------------------------------- a run is never lost

def test_failing_evaluation_keeps_the_run(train_flags, tmp_path, capsys, monkeypatch):
    def broken(self, step):
        raise RuntimeError("metric exploded")
    monkeypatch.setattr(artefacts.RunArtefacts, "evaluate", broken)
    summary = run_training(train_flags + ["--experiment_name", "e", "--max_steps", "4"])
    assert summary["steps"] == 4
    assert load_checkpoint(str(tmp_path / "runs" / "e" / "last.pth"))["step"] == 4
    err = capsys.readouterr().err
    assert "warning: evaluation failed at step 4 and was skipped: RuntimeError: metric exploded" in err


@pytest.mark.slow  # computes the reference statistics afresh
def test_unwritable_statistics_cache_costs_only_time(train_flags, tmp_path, capsys, monkeypatch, data_copy):
    """A read-only data folder: the evaluator cannot cache its reference statistics, and still scores."""
    cache_dir = os.path.join(data_copy, "cache")
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir == cache_dir:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    run_training(train_flags + ["--experiment_name", "ro", "--max_steps", "2", "--data_dir", data_copy])
    assert "Permission denied; the statistics will be computed again next time" in capsys.readouterr().err
    ckpt = load_checkpoint(str(tmp_path / "runs" / "ro" / "best_model.pth"))  # fid_mnist was computed
    assert ckpt["train_state"]["best"]["value"] > 0 and not os.listdir(cache_dir)


@pytest.mark.parametrize("flags,message", [
    (["--timesteps", "10"], "the linear schedule needs --timesteps of at least 20"),
    (["--timesteps", "25", "--sample_steps", "30"], "--sample_steps must be between 1 and the model's 25 noise levels, "
                                                    "got 30"),
    (["--sample_method", "euler"], "argument --sample_method: invalid choice: 'euler'"),
    (["--formulation", "edm", "--sample_method", "ddpm", "--sample_steps", "20"],
     "--sample_steps 20: ddpm takes all 1000 noise levels of the model"),
    (["--formulation", "edm", "--min_snr_gamma", "5"], "--min_snr_gamma weights the ddpm loss"),
    (["--formulation", "flow", "--p_std", "0"], "--p_std must be positive, got 0.0"),
    (["--norm_groups", "1"], "unrecognized arguments: --norm_groups 1"),  # a setting this version no longer has
    (["--autoguidance_scale", "1"], "--autoguidance_scale needs a weaker network to steer away from"),
    (["--guidance_interval", "5,1"], "--guidance_interval takes two noise levels LO,HI with 0 <= LO < HI"),
    (["--eval_samples", "2"], "--eval_samples: 2 images, but the metrics need at least 10"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--channel_mult", "0"], "take positive integers"),
    (["--max_step", "8"], "unrecognized arguments: --max_step 8"),
])
def test_bad_training_flags_write_nothing(capsys, train_flags, tmp_path, flags, message):
    exits_2(capsys, lambda: run_training(train_flags + ["--experiment_name", "bad"] + flags), message)
    assert not (tmp_path / "runs").exists()


def test_conditional_flags_are_checked(capsys, train_flags):
    exits_2(capsys, lambda: run_training(train_flags + ["--num_classes", "5"], conditional=True),
            "--num_classes 5 is fewer than the 10 classes of --dataset mnist")
    exits_2(capsys, lambda: run_training(train_flags + ["--guidance_scale", "-1"], conditional=True),
            "--guidance_scale must not be negative")


def test_short_linear_schedule_trains(train_flags, tmp_path):
    """T=20 is the shortest linear schedule (its last beta is exactly 1: zero terminal SNR), and Min-SNR's
    weights and DPM-Solver++'s first step, which divide by the SNR, stay finite on it."""
    summary = run_training(train_flags + ["--experiment_name", "t20", "--timesteps", "20", "--max_steps", "2",
                                 "--min_snr_gamma", "5"])
    ckpt = load_checkpoint(str(tmp_path / "runs" / "t20" / "best_model.pth"))
    assert model_from_checkpoint(ckpt)[1].alphas_cumprod[-1] == 0
    assert np.isfinite(summary["final_loss"]) and 0 < summary["final_loss"] < 10
    assert np.isfinite(ckpt["train_state"]["best"]["value"])  # the evaluation's samples were scored


@pytest.mark.slow
def test_mid_epoch_checkpoint_survives_sigkill(tmp_path, tiny_flags):
    """--save_every_minutes writes last.pth inside the epoch; SIGKILL loses at most that much, and the
    run resumes from it."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_flags, "--output_dir", str(tmp_path),
           "--experiment_name", "kill", "--log_every", "1", "--save_every_minutes", "0.0005"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 8 " in line:
            break
    proc.kill()
    proc.communicate(timeout=60)
    last = tmp_path / "kill" / "last.pth"
    assert last.exists(), "".join(lines)
    ckpt = load_checkpoint(str(last))
    assert 1 <= ckpt["step"] < 3750 and ckpt["epoch"] == 0  # mid-epoch: 3,750 steps of 16 make an epoch
    summary = run_training(["--resume", str(last), "--max_steps", str(ckpt["step"] + 2), "--save_every_minutes", "0"])
    assert summary["steps"] == ckpt["step"] + 2


def test_crashed_run_without_checkpoint_starts_over(train_flags, tmp_path, capsys):
    exp = tmp_path / "runs" / "crashed"
    (exp / "logs").mkdir(parents=True)
    (exp / "config.json").write_text("{}")
    (exp / (fileio.TMP_PREFIX + "abclast.pth")).write_bytes(b"partial")
    run_training(train_flags + ["--experiment_name", "crashed", "--max_steps", "2"])
    assert "starting it over" in capsys.readouterr().out
    assert load_checkpoint(str(exp / "last.pth"))["step"] == 2 and no_temporaries(exp)
    # now there is something to resume: refused, and the message names the checkpoint
    exits_2(capsys, lambda: run_training(train_flags + ["--experiment_name", "crashed"]),
            f"--resume {exp / 'last.pth'}")


def test_resume_removes_stale_temporaries(train_flags, tmp_path):
    run_training(train_flags + ["--experiment_name", "tmp", "--max_steps", "2"])
    exp = tmp_path / "runs" / "tmp"
    (exp / (fileio.TMP_PREFIX + "xyzlast.pth")).write_bytes(b"partial")
    run_training(["--resume", str(exp / "last.pth"), "--max_steps", "3"])
    assert no_temporaries(exp)


@pytest.mark.parametrize("where,message", [
    (["--output_dir", "runs/FILE"], "is a file, not a folder"),
    (["--experiment_name", "FILE"], "is a file, not a folder"),
    (["--experiment_name", "x" * 300], "File name too long"),
])
def test_unusable_output_locations(capsys, train_flags, tmp_path, where, message):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "FILE").write_text("a file")
    flag, value = where
    value = str(tmp_path / value) if flag == "--output_dir" else value
    exits_2(capsys, lambda: run_training(train_flags + [flag, value]), message)


def test_full_disk_keeps_the_last_checkpoint(train_flags, tmp_path, capsys, monkeypatch):
    run_training(train_flags + ["--experiment_name", "full", "--max_steps", "2"])
    exp = tmp_path / "runs" / "full"

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as exc:
        run_training(["--resume", str(exp / "last.pth"), "--max_steps", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"could not write {exp / 'last.pth'}: " in err and "unexpected pos" in err
    monkeypatch.undo()
    assert load_checkpoint(str(exp / "last.pth"))["step"] == 2 and no_temporaries(exp)


def test_nan_message_is_true_without_a_checkpoint(train_flags, capsys, monkeypatch):
    real_loss = Diffusion.training_loss
    monkeypatch.setattr(Diffusion, "training_loss", lambda self, *a, **k: real_loss(self, *a, **k) * float("nan"))
    with pytest.raises(SystemExit) as exc:
        run_training(train_flags + ["--experiment_name", "nan", "--max_steps", "4"])
    assert exc.value.code == 1
    assert "no checkpoint had been written yet" in capsys.readouterr().err


@pytest.mark.slow
def test_second_signal_stops_once_the_checkpoint_is_safe(tmp_path, tiny_flags):
    """SIGINT, then SIGINT again: last.pth is written, the long final evaluation is skipped, exit 130."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_flags, "--output_dir", str(tmp_path),
           "--experiment_name", "twice", "--log_every", "1", "--eval_samples", "5000", "--sample_steps", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if "step 3 " in line:
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if "SIGINT received" in line:
            break
    time.sleep(1.0)
    start = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert time.time() - start < 30 and "evaluation:" not in out  # 5,000 samples would take minutes
    assert "last.pth holds step" in out
    assert load_checkpoint(str(tmp_path / "twice" / "last.pth"))["step"] >= 3


# ----------------------------------------------------------------------------- resume does what it says

def test_resume_refuses_changes_it_would_ignore(capsys, train_flags, tmp_path):
    run_training(train_flags + ["--experiment_name", "r", "--max_steps", "2"])
    last = str(tmp_path / "runs" / "r" / "last.pth")
    err = exits_2(capsys, lambda: run_training(["--resume", last, "--model_channels", "64", "--lr", "0.5"]),
                  "cannot change")
    assert "--lr --model_channels" in err
    exits_2(capsys, lambda: run_training(["--resume", last, "--max_step", "8"]), "unrecognized arguments: --max_step")


def test_resume_from_another_folder_finds_the_data(train_flags, tmp_path, monkeypatch, data_dir):
    (tmp_path / "a").mkdir()
    os.symlink(data_dir, tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "a")
    flags = [f for f in train_flags]
    flags[flags.index("--data_dir") + 1] = "data"  # relative, as the README's default ./data
    run_training(flags + ["--experiment_name", "moved", "--max_steps", "2"])
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    last = str(tmp_path / "runs" / "moved" / "last.pth")
    assert run_training(["--resume", last, "--max_steps", "3"])["steps"] == 3
    assert run_training(["--resume", last, "--max_steps", "4", "--data_dir", str(tmp_path / "a" / "data")])["steps"] == 4


def test_no_op_resume_keeps_the_summary(train_flags, tmp_path, capsys):
    run_training(train_flags + ["--experiment_name", "done", "--max_steps", "2"])
    summary_file = tmp_path / "runs" / "done" / "summary.json"
    before = summary_file.read_text()
    assert json.loads(before)["final_loss"] is not None
    assert run_training(["--resume", str(tmp_path / "runs" / "done" / "last.pth"), "--max_steps", "2"]) is None
    assert "nothing to train" in capsys.readouterr().out
    assert summary_file.read_text() == before


# ----------------------------------------------------------------------------- bad input for eval.py and inference.py

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    model = UNet(ModelConfig(**TINY_MODEL))
    save_checkpoint(str(path), model, model, DDPM(DiffusionConfig(timesteps=20)), SamplingSpec())
    return str(path)


def write_npz(path, data_dir, n=20, labels=None):
    images = load_mnist(data_dir, train=False)[0][:n].numpy()
    np.savez(path, images=images, **({} if labels is None else {"labels": np.asarray(labels)}))
    return str(path)


def test_eval_bad_inputs(capsys, tmp_path, tiny_checkpoint, monkeypatch, data_dir):
    ev = lambda *flags: lambda: eval_script.main(["--no_inception", "--data_dir", data_dir, "--save_dir",
                                                  str(tmp_path / "out"), *flags])
    (tmp_path / "empty.npz").write_bytes(b"")
    full = write_npz(tmp_path / "full.npz", data_dir)
    (tmp_path / "cut.npz").write_bytes(open(full, "rb").read()[:300])
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "0.png").write_bytes(b"not a png at all")
    exits_2(capsys, ev("--samples", str(tmp_path / "empty.npz")), "not a readable npz")
    exits_2(capsys, ev("--samples", str(tmp_path / "cut.npz")), "not a readable npz")
    exits_2(capsys, ev("--samples", str(tmp_path / "png")), "not a readable image")
    exits_2(capsys, ev("--samples", write_npz(tmp_path / "few.npz", data_dir, n=3)),
            "3 images, but the metrics need at least 10")
    exits_2(capsys, ev("--samples", write_npz(tmp_path / "lab.npz", data_dir, labels=[12] * 20)),
            "labels must lie in 0..9")
    exits_2(capsys, ev("--real", "test", "--num_samples", "3"), "--num_samples: 3 images, but the metrics need")
    exits_2(capsys, ev("--real", "test", "--max_sample", "3"), "unrecognized arguments")
    exits_2(capsys, ev("--real", "test", "--inception_logits", str(tmp_path / "nope.pth")),
            "is not pytorch-fid's pt_inception-2015-12-05 state dict")
    exits_2(capsys, ev("--model_path", tiny_checkpoint, "--guidance_scale", "-1"), "--guidance_scale must not be")
    monkeypatch.setattr(eval_script, "generate", lambda *a, **k: pytest.fail("sampled before checking"))
    (tmp_path / "a_file").write_text("x")
    exits_2(capsys, lambda: eval_script.main(["--model_path", tiny_checkpoint, "--save_dir", str(tmp_path / "a_file"),
                                              "--no_inception"]), "is a file, not a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [("missing", "MNIST/raw and could not be downloaded (no network)"),
                                            ("corrupt", "corrupt or truncated")])
def test_eval_bad_data_folder(capsys, tmp_path, damage, message, monkeypatch, data_dir):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if damage == "corrupt":
        for name in os.listdir(os.path.join(data_dir, "MNIST", "raw")):
            if name.endswith(".gz"):
                (raw / name).write_bytes(b"\x1f\x8b garbage")
    def offline(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr("data.download_url", offline)
    exits_2(capsys, lambda: eval_script.main(["--real", "test", "--no_inception", "--data_dir", str(tmp_path / "data"),
                                              "--save_dir", str(tmp_path / "out")]), message)


def test_read_only_data_folder_is_not_called_corrupt(tmp_path, monkeypatch, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(os.path.join(data_dir, "MNIST", "raw")):
        if name.endswith(".gz") or name == "SHA256SUMS":
            os.symlink(os.path.join(data_dir, "MNIST", "raw", name), raw / name)
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(DataError) as exc:
        load_mnist(str(tmp_path), train=False)
    assert "Permission denied" in str(exc.value) and "writable" in str(exc.value)
    assert "corrupt" not in str(exc.value)


@pytest.mark.unit
def test_inference_checks_outputs_before_sampling(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(inference, "generate", lambda *a, **k: pytest.fail("sampled before checking"))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    base = ["--model_path", tiny_checkpoint, "--num_samples", "2"]
    exits_2(capsys, lambda: inference.main(base + ["--output_dir", str(tmp_path / "a_file")]), "is a file, not a folder")
    exits_2(capsys, lambda: inference.main(base + ["--output_dir", str(tmp_path / "o"), "--save_npz",
                                                   str(tmp_path / "a_dir")]), "is a folder; give a file name")
    exits_2(capsys, lambda: inference.main(base + ["--output_dir", str(tmp_path / "o"), "--save_npz",
                                                   str(tmp_path / "a_file" / "x.npz")]), "is a file, not a folder")
    exits_2(capsys, lambda: inference.main(base + ["--num_sample", "3"]), "unrecognized arguments")
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pth"
    torch.save({"format": "ddpm-mnist-checkpoint", "model": Payload()}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(str(path))
    assert "holds code or objects that are not plain tensors" in str(exc.value)
    assert not marker.exists()
