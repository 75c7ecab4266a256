"""The models shipped in assets/, the sampling copy they are saved as, and the results table."""
import json
import os

import pytest
import torch

import checkpoint
import inference
import results
import trainer
from checkpoint import PRETRAINED, CheckpointError, load_checkpoint, model_from_checkpoint, pretrained_path
from conftest import DATA_DIR
from data import to_uint8
from fileio import read_checksums, sha256_file
from metrics import classifier_outputs, load_classifier
from sampling import Sampler, generate, load_model


@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_shipped_model_is_the_checksummed_sampling_copy(kind):
    path = pretrained_path(kind)
    assert sha256_file(path) == read_checksums(os.path.join(checkpoint.ASSETS_DIR, "SHA256SUMS"))[PRETRAINED[kind]]
    assert os.path.getsize(path) <= 5 * 1024 * 1024
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["conditional"] == (kind == "conditional")
    assert "train_state" not in ckpt and "model" not in ckpt  # EMA weights and configuration only


@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_shipped_model_draws_digits(kind):
    """Forty samples in 10 SDE-DPM-Solver++ steps: the MNIST classifier reads nearly all of them as a
    digit with confidence above one half, and the conditional model's as the digits asked for."""
    model, diffusion = model_from_checkpoint(load_checkpoint(pretrained_path(kind)))
    labels = torch.arange(40) % 10 if kind == "conditional" else None
    images = to_uint8(generate(model, diffusion, 40, Sampler("dpm_solver", 10, 1.0, 1.0), labels=labels, seed=0))
    _, probs = classifier_outputs(load_classifier(), images)
    assert (probs.max(axis=1) > 0.5).mean() >= 0.85
    if labels is not None:
        assert (probs.argmax(axis=1) == labels.numpy()).mean() >= 0.95


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    for name in PRETRAINED.values():
        (tmp_path / name).write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    (tmp_path / "SHA256SUMS").write_text("".join(f"{'0' * 64}  {name}\n" for name in PRETRAINED.values()))
    monkeypatch.setattr(checkpoint, "ASSETS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        pretrained_path("unconditional")


def test_inference_without_a_model_path_samples_the_shipped_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder is relative to where the command runs
    written = inference.main(["--num_samples", "4", "--steps", "3"])
    assert written == [os.path.join("outputs", "pretrained_unconditional", "inference", "samples_dpm_solver.png")]
    written = inference.main(["--conditional", "--num_samples", "1", "--steps", "3"])
    assert written == [os.path.join("outputs", "pretrained_conditional", "inference", "samples_dpm_solver.png")]


def test_sampling_copy_samples_like_its_checkpoint_and_cannot_resume(tmp_path, train_flags, capsys):
    trainer.main(train_flags + ["--experiment_name", "run", "--max_steps", "3", "--epochs", "1"])
    last = tmp_path / "runs" / "run" / "last.pth"
    copy = tmp_path / "copy.pt"
    checkpoint.main([str(last), str(copy)])
    assert os.path.getsize(copy) < os.path.getsize(last) / 2  # no raw weights, no optimizer moments
    sampler = Sampler("ddim", 3)
    samples = [generate(*model_from_checkpoint(load_checkpoint(str(p))), 4, sampler, seed=5) for p in (last, copy)]
    assert torch.equal(samples[0], samples[1])
    with pytest.raises(SystemExit) as exit_:
        checkpoint.main([str(last), str(copy)])  # never overwritten
    assert exit_.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        trainer.main(["--resume", str(copy)])
    assert exit_.value.code == 2 and "holds only the EMA weights" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="--no_ema needs"):
        model_from_checkpoint(load_checkpoint(str(copy)), use_ema=False)


def test_a_sampling_copy_carries_its_own_guidance(tmp_path, train_flags, capsys):
    """checkpoint.py --guidance_scale sets the copy's default guidance; the flag of inference.py still
    wins, the run without a copy keeps its own, and an unconditional model refuses one."""
    trainer.main(train_flags + ["--experiment_name", "c", "--max_steps", "1", "--epochs", "1", "--guidance_scale",
                                "2"], conditional=True)
    last, copy = tmp_path / "runs" / "c" / "last.pth", tmp_path / "copy.pt"
    checkpoint.main([str(last), str(copy), "--guidance_scale", "0.25"])

    def guidance(path, *flags):
        args = inference.build_parser().parse_args(["--model_path", str(path), *flags])
        return load_model(args, ["dpm_solver"]).samplers["dpm_solver"].guidance_scale
    assert guidance(last) == 2.0 and guidance(copy) == 0.25 and guidance(copy, "--guidance_scale", "0") == 0.0
    assert load_checkpoint(str(copy))["config"] == load_checkpoint(str(last))["config"]  # the run's record as it was
    assert checkpoint.default_guidance(load_checkpoint(pretrained_path("conditional"))) == 0.5  # docs/samplers.md
    for source, w, message in ((pretrained_path("unconditional"), "1", "for conditional models"),
                               (last, "-1", "must not be negative")):
        with pytest.raises(SystemExit) as exit_:
            checkpoint.main([str(source), str(tmp_path / "refused.pt"), "--guidance_scale", w])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "refused.pt").exists()


def test_results_table_scores_each_model_beside_the_floor(tmp_path, train_flags):
    trainer.main(train_flags + ["--experiment_name", "run", "--max_steps", "2", "--epochs", "1"])
    table = tmp_path / "table.md"
    flags = ["--model", f"tiny={tmp_path / 'runs' / 'run' / 'last.pth'}", "--num_samples", "20", "--no_inception",
             "--data_dir", DATA_DIR, "--out", str(tmp_path / "out"), "--table", str(table)]
    results.main(flags + ["--only", "tiny"])
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny"] and rows[0]["num_samples"] == 20
    assert rows[0]["network_evaluations"] == 20 and rows[0]["fid_mnist"] > rows[0]["floor"]["fid_mnist"]
    lines = table.read_text().splitlines()
    assert lines[-2].startswith("| tiny | dpm_solver, 20 steps, eta 1 | 20 |") and lines[-1].startswith("| real MNIST test |")
    results.main(flags + ["--only", "none"])  # rewrites the table from the JSON alone
    assert table.read_text().splitlines() == lines
