"""The models shipped in assets/, the sampling copy they are saved as, and the results table."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import inference
from checkpoint import PRETRAINED, CheckpointError, load_checkpoint, model_from_checkpoint, pretrained_path
from conftest import exits_2, grid_tiles, run_training
from data import to_uint8
from diffusion import SamplingSpec, check_sampling
from fileio import read_checksums, sha256_file
from metrics import classifier_outputs, load_classifier
from sampling import generate, load_model
from tools import results, samplers
from tools.tables import load_rows

SAMPLER_TABLE = os.path.join(os.path.dirname(checkpoint.ASSETS_DIR), "docs", "sampler_table.md")
RESULTS_TABLE = os.path.join(os.path.dirname(checkpoint.ASSETS_DIR), "docs", "results_10k.md")


def measured_best_guidance() -> tuple:
    """(autoguidance scale, interval, classifier-free scale) of the guidance row docs/sampler_table.md names
    the best: the shipped default."""
    best = samplers.best_guidance([r for r in load_rows(SAMPLER_TABLE)[1] if r["group"] == "guidance"])
    return samplers.row_guidance(best["model"])


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_shipped_model_is_the_checksummed_sampling_copy(kind):
    path = pretrained_path(kind)
    assert sha256_file(path) == read_checksums(os.path.join(checkpoint.ASSETS_DIR, "SHA256SUMS"))[PRETRAINED[kind]]
    assert os.path.getsize(path) <= 10 * 1000 * 1000
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["conditional"] == (kind == "conditional")
    assert "train_state" not in ckpt and "model" not in ckpt  # EMA weights and configuration only
    assert ckpt["version"] == checkpoint.VERSION and checkpoint.upgrade(ckpt) is ckpt  # written in today's format


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_shipped_model_draws_digits(kind):
    """Forty samples in 10 SDE-DPM-Solver++ steps: the MNIST classifier reads nearly all of them as a
    digit with confidence above one half, and the conditional model's as the digits asked for."""
    model, diffusion = model_from_checkpoint(load_checkpoint(pretrained_path(kind)))
    labels = torch.arange(40) % 10 if kind == "conditional" else None
    spec = check_sampling(SamplingSpec("dpm_solver", 10, guidance_scale=1.0 if labels is not None else 0.0),
                          diffusion.levels, labels is not None, has_guide=False)
    images = to_uint8(generate(model, diffusion, 40, spec, labels=labels, seed=0))
    _, probs = classifier_outputs(load_classifier(), images)
    assert (probs.max(axis=1) > 0.5).mean() >= 0.85
    if labels is not None:
        assert (probs.argmax(axis=1) == labels.numpy()).mean() >= 0.95


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_shipped_model_samples_by_default_as_its_results_row(kind):
    """The samples of docs/results_10k.md are what each file draws without flags: its default guidance is
    the one its row was scored with (each file's autoguidance by the earlier network it holds)."""
    ckpt = load_checkpoint(pretrained_path(kind))
    assert "guide" in ckpt and ckpt["guide"]["step"] < ckpt["step"]  # both guide by a network trained for fewer steps
    row = next(r for r in load_rows(RESULTS_TABLE)[1] if r["model"] == f"shipped_{kind}")
    assert row["source"] == f"pretrained:{kind}"
    assert checkpoint.default_spec(ckpt).describe() == row["sampler"]


@pytest.mark.unit
def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    for name in PRETRAINED.values():
        (tmp_path / name).write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    (tmp_path / "SHA256SUMS").write_text("".join(f"{'0' * 64}  {name}\n" for name in PRETRAINED.values()))
    monkeypatch.setattr(checkpoint, "ASSETS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        pretrained_path("unconditional")


@pytest.mark.unit
def test_inference_without_a_model_path_samples_the_shipped_models(tmp_path, monkeypatch):
    """Without --model_path the shipped models sample into outputs/pretrained_KIND/, and the grid holds what
    the model itself draws with those settings (the conditional one: a digit per row, its own guidance)."""
    monkeypatch.chdir(tmp_path)  # the default output folder is relative to where the command runs
    for kind, flags, labels in (("unconditional", ["--num_samples", "4"], None),
                                ("conditional", ["--conditional", "--num_samples", "1"], torch.arange(10))):
        (written,) = inference.main(flags + ["--steps", "3"])
        assert written == os.path.join("outputs", f"pretrained_{kind}", "inference", "samples_dpm_solver.png")
        ckpt = load_checkpoint(pretrained_path(kind))
        model, diffusion = model_from_checkpoint(ckpt)
        spec = check_sampling(checkpoint.default_spec(ckpt).overridden(steps=3), diffusion.levels, kind == "conditional",
                              has_guide=True)
        expected = to_uint8(generate(model, diffusion, len(labels) if labels is not None else 4, spec, labels=labels,
                                     batch_size=64, seed=0, guide_model=checkpoint.guide_from_checkpoint(ckpt))).numpy()
        assert np.abs(grid_tiles(written).astype(int) - expected).max() <= 1, kind


def test_sampling_copy_samples_like_its_checkpoint_and_cannot_resume(tmp_path, train_flags, capsys):
    run_training(train_flags + ["--experiment_name", "run", "--max_steps", "3", "--epochs", "1"])
    last = tmp_path / "runs" / "run" / "last.pth"
    copy = tmp_path / "copy.pt"
    checkpoint.main([str(last), str(copy)])
    assert os.path.getsize(copy) < os.path.getsize(last) / 2  # no raw weights, no optimizer moments
    spec = SamplingSpec("ddim", 3, 0.0)
    samples = [generate(*model_from_checkpoint(load_checkpoint(str(p))), 4, spec, seed=5) for p in (last, copy)]
    assert torch.equal(samples[0], samples[1])
    exits_2(capsys, lambda: checkpoint.main([str(last), str(copy)]), "exists")  # never overwritten
    exits_2(capsys, lambda: run_training(["--resume", str(copy)]), "holds only the EMA weights")


def test_a_bf16_copy_is_half_the_size_and_samples_in_fp32_alike(tmp_path, train_flags):
    run_training(train_flags + ["--experiment_name", "run", "--max_steps", "3", "--formulation", "flow",
                                "--sample_method", "heun"])
    last = tmp_path / "runs" / "run" / "last.pth"
    checkpoint.main([str(last), str(tmp_path / "fp32.pt")])
    checkpoint.main([str(last), str(tmp_path / "bf16.pt"), "--bf16"])
    assert os.path.getsize(tmp_path / "bf16.pt") < 0.6 * os.path.getsize(tmp_path / "fp32.pt")
    ckpt = load_checkpoint(str(tmp_path / "bf16.pt"))
    assert ckpt["ema_dtype"] == "bfloat16" and all(v.dtype == torch.bfloat16 for v in ckpt["ema"].values()
                                                   if v.is_floating_point())
    model, diffusion = model_from_checkpoint(ckpt)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    spec = SamplingSpec("heun", 4, 0.0)
    bf16, fp32 = (generate(*model_from_checkpoint(load_checkpoint(str(tmp_path / f"{k}.pt"))), 8, spec, seed=1,
                           amp="none") for k in ("bf16", "fp32"))
    assert 0 < (bf16 - fp32).abs().max() < 0.05


def test_a_copy_holds_its_autoguidance_and_samples_as_its_run_with_the_guide_file(tmp_path, train_flags, capsys):
    """checkpoint.py --guide_model stores the weaker network in the copy beside its default guidance: the
    copy samples bit for bit as its run does with --guide_model and the same flags, not as the run alone;
    a network of another process cannot guide, an unguided model refuses autoguidance, and an unconditional
    one classifier-free guidance."""
    flow = ["--formulation", "flow", "--sample_method", "heun", "--epochs", "1"]
    for name, steps, extra in (("strong", "3", flow), ("weak", "1", flow), ("ddpm", "1", ["--epochs", "1"])):
        run_training(train_flags + ["--experiment_name", name, "--max_steps", steps, *extra])
    strong, weak, ddpm = (str(tmp_path / "runs" / name / "last.pth") for name in ("strong", "weak", "ddpm"))
    copy = str(tmp_path / "copy.pt")
    guidance = ["--autoguidance_scale", "1.5", "--guidance_interval", "0.1,10"]
    checkpoint.main([strong, copy, "--guide_model", weak, *guidance])

    def sample(*flags):
        args = inference.build_parser().parse_args([*flags, "--method", "heun", "--steps", "4"])
        loaded, stats = load_model(args), {}
        images = generate(loaded.model, loaded.diffusion, 6, loaded.specs["heun"], seed=3, stats=stats,
                          guide_model=loaded.guide_model)
        return images, loaded.specs["heun"], stats["network_calls"]
    held, given, plain = sample("--model_path", copy), sample("--model_path", strong, "--guide_model", weak,
                                                              *guidance), sample("--model_path", strong)
    assert held[1] == given[1] and held[1].describe() == "heun, 4 steps, eta 0, autoguidance w 1.5 at sigma (0.1, 10]"
    assert torch.equal(held[0], given[0]) and not torch.equal(held[0], plain[0])
    assert plain[2] == 7 and 7 < held[2] < 14  # heun's 4 levels: 7 calls, the guide's only inside (0.1, 10]
    half = str(tmp_path / "bf16.pt")
    checkpoint.main([strong, half, "--guide_model", weak, "--bf16"])
    stored = load_checkpoint(half)["guide"]["ema"]
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    loaded_guides = [checkpoint.guide_from_checkpoint(load_checkpoint(p)) for p in (copy, half)]
    for fp32, bf16 in zip(*(g.parameters() for g in loaded_guides)):
        assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32.to(torch.bfloat16).float())
    refusals = ((["--guide_model", ddpm], "cannot guide this model"),
                (["--autoguidance_scale", "1"], "--autoguidance_scale needs a weaker network to steer away from"),
                (["--guidance_scale", "1"], "--guidance_scale is classifier-free guidance: it needs a conditional model"))
    for flags, message in refusals:
        exits_2(capsys, lambda: checkpoint.main([strong, str(tmp_path / "refused.pt"), *flags]), message)
        assert not (tmp_path / "refused.pt").exists()
    for flags, message in refusals[1:]:
        exits_2(capsys, lambda: inference.main(["--model_path", strong, *flags, "--output_dir", str(tmp_path / "out")]),
                message)


def test_a_sampling_copy_carries_its_own_guidance(tmp_path, train_flags, capsys):
    """checkpoint.py --guidance_scale sets the copy's default classifier-free guidance; the flag of inference.py
    still wins, the run without a copy keeps its own, and a negative scale is refused."""
    run_training(train_flags + ["--experiment_name", "c", "--max_steps", "1", "--epochs", "1", "--guidance_scale",
                                "2"], conditional=True)
    last, copy = tmp_path / "runs" / "c" / "last.pth", tmp_path / "copy.pt"
    checkpoint.main([str(last), str(copy), "--guidance_scale", "0.25"])

    def guidance(path, *flags):
        args = inference.build_parser().parse_args(["--model_path", str(path), *flags])
        return next(iter(load_model(args).specs.values())).guidance_scale
    assert guidance(last) == 2.0 and guidance(copy) == 0.25 and guidance(copy, "--guidance_scale", "0") == 0.0
    assert load_checkpoint(str(copy))["config"] == load_checkpoint(str(last))["config"]  # the run's record as it was
    shipped = checkpoint.default_spec(load_checkpoint(pretrained_path("conditional")))
    assert (shipped.autoguidance_scale, shipped.guidance_interval, shipped.guidance_scale) == measured_best_guidance()
    exits_2(capsys, lambda: checkpoint.main([str(last), str(tmp_path / "refused.pt"), "--guidance_scale", "-1"]),
            "must not be negative")
    assert not (tmp_path / "refused.pt").exists()


def test_a_conditional_copy_with_a_guide_takes_both_terms(tmp_path, train_flags, capsys):
    """A conditional copy that holds a guide samples by default with autoguidance and a classifier-free term,
    each set by its own flag: each guided level calls the network, its null-class twin (in the same batch) and
    the guide; --guidance_scale 0 leaves the autoguidance alone, one call fewer."""
    run_training(train_flags + ["--experiment_name", "c", "--max_steps", "1", "--epochs", "1"], conditional=True)
    last, copy = tmp_path / "runs" / "c" / "last.pth", tmp_path / "copy.pt"
    checkpoint.main([str(last), str(copy), "--guide_model", str(last), "--autoguidance_scale", "1",
                     "--guidance_scale", "0.1"])

    def loaded(path, *flags):
        args = inference.build_parser().parse_args(["--model_path", str(path), "--steps", "3", *flags])
        return load_model(args)
    both, autoguided = loaded(copy), loaded(copy, "--guidance_scale", "0")
    spec = both.specs["dpm_solver"]
    assert (spec.autoguidance_scale, spec.guidance_scale) == (1.0, 0.1)
    assert spec.describe().endswith("autoguidance w 1 + classifier-free w 0.1")
    calls = {}
    for which in (both, autoguided):
        stats = {}
        generate(which.model, which.diffusion, 2, which.specs["dpm_solver"], batch_size=2, stats=stats,
                 guide_model=which.guide_model)
        calls[which is both] = stats["network_calls"]
    assert calls == {True: 3 * 3, False: 2 * 3}  # f, its null-class twin and the guide; f and the guide


def test_results_table_scores_each_model_beside_the_floor(tmp_path, train_flags, data_dir):
    run_training(train_flags + ["--experiment_name", "run", "--max_steps", "2", "--epochs", "1"])
    table = tmp_path / "table.md"
    flags = ["--model", f"tiny={tmp_path / 'runs' / 'run' / 'last.pth'}", "--num_samples", "20", "--no_inception",
             "--data_dir", data_dir, "--out", str(tmp_path / "out"), "--table", str(table)]
    results.main(flags + ["--only", "tiny"])
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["tiny"] and rows[0]["num_samples"] == 20
    assert rows[0]["network_evaluations"] == 2 and rows[0]["fid_mnist"] > rows[0]["floor"]["fid_mnist"]
    assert rows[0]["sampling"]["steps"] == 2  # the run's own sampler (--sample_steps 2), its checkpoint's default
    lines = table.read_text().splitlines()
    assert lines[-2].startswith("| tiny | dpm_solver, 2 steps, eta 1 | 2 |") and lines[-1].startswith("| real MNIST test |")
    results.main(flags + ["--only", "none"])  # rewrites the table from the JSON alone
    assert table.read_text().splitlines() == lines
