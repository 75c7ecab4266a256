"""inference.py and eval.py on tiny checkpoints made here."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import inference
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conditional_ddpm import ConditionalUNet
from conftest import TINY_MODEL, exits_2, grid_tiles
from data import to_uint8
from ddpm_model import ModelConfig, UNet
from diffusion import DDPM, DiffusionConfig, FlowMatching, SamplingSpec
from runtime import amp_dtype, cpu_has_native_bf16
from sampling import generate


def grid_size(rows, cols):
    return (cols * 30 + 2, rows * 30 + 2)  # 28 px images with 2 px padding


def is_drawn(path) -> bool:
    """A figure with something on it, not an empty canvas."""
    return np.asarray(Image.open(path).convert("L")).std() > 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An unconditional and a conditional checkpoint with T=20 and random weights, sampling by default with
    SDE-DPM-Solver++ (the conditional one with classifier-free guidance w 1)."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for conditional in (False, True):
        torch.manual_seed(0)
        model = ConditionalUNet(ModelConfig(**TINY_MODEL), 10) if conditional else UNet(ModelConfig(**TINY_MODEL))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
        exp = root / ("cond" if conditional else "uncond")
        path = exp / "best_model.pth"
        save_checkpoint(str(path), model, model, DDPM(DiffusionConfig(timesteps=20)),
                        SamplingSpec(guidance_scale=1.0 if conditional else 0.0), step=3)
        paths[conditional] = str(path)
    return paths


@pytest.mark.unit
def test_unconditional_modes(checkpoints, tmp_path):
    out = tmp_path / "out"
    written = inference.main(["--model_path", checkpoints[False], "--method", "both", "--ddim_steps", "5",
                              "--interpolation", "--comparison", "--denoising_process", "--output_dir", str(out),
                              "--save_npz", str(tmp_path / "s.npz"), "--save_individual"])
    assert Image.open(out / "samples_ddpm.png").size == grid_size(4, 4)  # 16 samples, 4 per row
    assert Image.open(out / "samples_ddim.png").size == grid_size(4, 4)
    assert Image.open(out / "interpolation.png").size == grid_size(8, 10)  # 8 pairs, 10 frames each
    assert is_drawn(out / "comparison.png") and is_drawn(out / "denoising_process.png")
    timing = json.loads((out / "comparison.json").read_text())
    assert timing["ddpm_steps"] == 20 and timing["ddim_steps"] == 5 and timing["num_images"] == 16
    assert len(os.listdir(out / "individual_ddpm")) == 16
    assert Image.open(out / "individual_ddpm" / "00000.png").size == (28, 28)
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (16, 28, 28) and "labels" not in f.files
        individual = np.asarray(Image.open(out / "individual_ddpm" / "00003.png").convert("L"))
        assert np.array_equal(individual, f["images"][3])
    assert str(out / "samples_ddpm.png") in written


@pytest.mark.unit
def test_the_papers_samplers_serve_a_flow_model(tmp_path):
    """--comparison (DDPM against DDIM) works on a model of a continuous formulation too: its ddpm is ancestral
    sampling over 1000 noise levels, its ddim the same map with eta 0."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(**TINY_MODEL))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "flow.pth"
    save_checkpoint(str(path), model, model, FlowMatching(DiffusionConfig(formulation="flow", p_mean=0.0, p_std=1.0)),
                    SamplingSpec())
    out = tmp_path / "out"
    inference.main(["--model_path", str(path), "--method", "ddim", "--ddim_steps", "5", "--comparison",
                    "--num_samples", "4", "--output_dir", str(out)])
    timing = json.loads((out / "comparison.json").read_text())
    assert timing["ddpm_steps"] == 1000 and timing["ddim_steps"] == 5 and timing["eta"] == 0
    assert is_drawn(out / "comparison.png") and grid_tiles(out / "samples_ddim.png").shape == (4, 28, 28)


@pytest.mark.unit
def test_conditional_rows_and_npz_labels(checkpoints, tmp_path):
    npz = tmp_path / "c.npz"
    inference.main(["--model_path", checkpoints[True], "--conditional", "--class_labels", "3,3,7", "--num_samples", "5",
                    "--method", "ddim", "--ddim_steps", "3", "--output_dir", str(tmp_path), "--save_npz", str(npz),
                    "--guidance_scale", "2"])
    assert Image.open(tmp_path / "samples_ddim.png").size == grid_size(3, 5)
    with np.load(npz) as f:
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == [3] * 10 + [7] * 5
        assert f["images"].shape == (15, 28, 28)
    inference.main(["--model_path", checkpoints[True], "--method", "dpm_solver", "--steps", "3", "--num_samples", "2",
                    "--output_dir", str(tmp_path / "all")])
    assert Image.open(tmp_path / "all" / "samples_dpm_solver.png").size == grid_size(10, 2)  # every digit


@pytest.mark.unit
def test_same_seed_same_output(checkpoints, tmp_path):
    arrays = []
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        npz = tmp_path / f"{run}.npz"
        inference.main(["--model_path", checkpoints[False], "--method", "ddpm", "--num_samples", "4", "--seed", str(seed),
                        "--output_dir", str(tmp_path / run), "--save_npz", str(npz)])
        with np.load(npz) as f:
            arrays.append(f["images"])
    assert np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[0], arrays[2])


def tiny_model(checkpoints, conditional):
    return model_from_checkpoint(load_checkpoint(checkpoints[conditional]))


@pytest.mark.unit
def test_trajectory_runs_from_the_noise_to_the_samples(checkpoints):
    model, diffusion = tiny_model(checkpoints, False)
    spec = SamplingSpec("ddim", 4, 0.0)
    images, trajectory = generate(model, diffusion, 3, spec, seed=7, return_intermediates=True)
    noise = torch.randn((3, 1, 28, 28), generator=torch.Generator().manual_seed(7))
    sigma = diffusion.sigma_table  # DDIM's 4 uniform steps of T=20, then the clean image
    assert [s for s, _ in trajectory] == [sigma[19], sigma[13], sigma[6], sigma[0], 0.0]
    assert torch.equal(trajectory[0][1], noise) and torch.equal(trajectory[-1][1], images)
    assert torch.equal(images, generate(model, diffusion, 3, spec, seed=7))


@pytest.mark.unit
def test_guidance_interval_counts_and_changes_only_the_steps_inside(checkpoints):
    """DDIM's 4 steps visit t = 19, 13, 6, 0 of T=20; an interval holding the noise levels of the middle two
    guides those (2 calls each) and no others: 6 calls per image. An empty interval is plain sampling."""
    model, diffusion = tiny_model(checkpoints, True)
    sigma = diffusion.sigma_table
    interval = (sigma[0] + 1e-3, sigma[13])  # (sigma_0, sigma_13]: t = 13 and 6
    runs = {}
    for name, w, span in (("inside", 1.5, interval), ("nowhere", 1.5, (2e6, 3e6)), ("plain", 0.0, None)):
        stats = {}
        spec = SamplingSpec("ddim", 4, 0.0, guidance_scale=w, guidance_interval=span)
        runs[name] = generate(model, diffusion, 10, spec, seed=3, stats=stats), stats["network_calls"]
    assert [runs[k][1] for k in ("inside", "nowhere", "plain")] == [6, 4, 4]
    assert torch.equal(runs["nowhere"][0], runs["plain"][0]) and not torch.equal(runs["inside"][0], runs["plain"][0])


@pytest.mark.unit
@pytest.mark.parametrize("conditional", [False, True])
def test_speed_flags_keep_the_samples(checkpoints, conditional):
    model, diffusion = tiny_model(checkpoints, conditional)
    spec = SamplingSpec("ddim", 4, 0.0, guidance_scale=1.0 if conditional else 0.0)
    run = lambda amp, nhwc=False: generate(model, diffusion, 8, spec, seed=1, amp=amp, channels_last=nhwc)
    nhwc, fp32, bf16, auto = run("none", True), run("none"), run("bf16"), run("auto")
    assert torch.allclose(nhwc, fp32, atol=1e-5)
    native = cpu_has_native_bf16()  # auto is bf16 only where the CPU computes it natively
    assert amp_dtype(torch.device("cpu"), "auto") == (torch.bfloat16 if native else None)
    assert torch.equal(auto, bf16 if native else fp32)
    diff = (bf16 - fp32).abs()
    assert 0 < diff.max() and diff.mean() < 0.02  # bf16 really ran, and kept the images


@pytest.mark.slow  # torch.compile takes half a minute on the CPU
def test_compiled_network_call_matches_eager(checkpoints):
    from torch._dynamo.utils import counters
    model, diffusion = tiny_model(checkpoints, True)  # the guided model, two branches per call
    run = lambda mode: generate(model, diffusion, 6, SamplingSpec("dpm_solver", 3, 1.0, 1.5), seed=2, compile_mode=mode,
                                amp="none")
    torch._dynamo.reset()
    compiled = run("default")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the network
    assert torch.allclose(compiled, run(None), atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("flags,message", [
    (["--model_path", "missing.pth"], "no such file"),
    (["--conditional"], "need a conditional checkpoint"),
    (["--class_labels", "1,2"], "need a conditional checkpoint"),
    (["--method", "ddim", "--ddim_steps", "0"], "--steps must be between 1 and the model's 20 noise levels, got 0"),
    (["--method", "both", "--steps", "21"], "--steps must be between 1 and the model's 20 noise levels, got 21"),
    (["--comparison", "--ddim_steps", "21"], "--steps must be between 1 and the model's 20 noise levels, got 21"),
    (["--method", "ddpm", "--steps", "5"], "--steps 5: ddpm takes all 20 noise levels of the model"),
    (["--method", "heun", "--steps", "30"], "--steps must be between 1 and the model's 20 noise levels, got 30"),
    (["--method", "euler"], "argument --method: invalid choice: 'euler'"),
    (["--pretrained", "conditional"], "give --model_path or --pretrained, not both"),
    (["--method", "dpm_solver", "--steps", "0"], "--steps must be between 1"),
    (["--eta", "-0.5"], "--eta must not be negative, got -0.5"),
    (["--guidance_scale", "1"], "--guidance_scale is classifier-free guidance: it needs a conditional model"),
    (["--autoguidance_scale", "1"], "--autoguidance_scale needs a weaker network to steer away from"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 is not supported on cpu"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_input_exits_2_and_writes_nothing(checkpoints, tmp_path, capsys, flags, message):
    args = ["--model_path", checkpoints[False], "--output_dir", str(tmp_path / "out")] + flags
    exits_2(capsys, lambda: inference.main(args), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_bad_labels_and_non_checkpoint(checkpoints, tmp_path, capsys):
    for flags, message in ((["--model_path", checkpoints[True], "--class_labels", "3,10"], "'10' is neither a label in 0..9"),
                           (["--model_path", __file__], "not a PyTorch checkpoint")):
        exits_2(capsys, lambda: inference.main(flags + ["--output_dir", str(tmp_path / "out")]), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("conditional", [False, True])
def test_eval_on_a_checkpoint(checkpoints, tmp_path, conditional, data_dir):
    save = tmp_path / "eval"
    report = eval_script.main(["--model_path", checkpoints[conditional], "--num_samples", "60", "--method", "ddim",
                               "--ddim_steps", "2", "--no_inception", "--save_dir", str(save), "--data_dir", data_dir])
    metrics = json.loads((save / "metrics.json").read_text())
    for key in ("fid_mnist", "is_mnist_mean", "is_mnist_std", "precision", "recall"):
        assert key in metrics
    assert ("class_accuracy" in metrics) == conditional
    assert sorted(metrics["unavailable"]) == ["fid_inception", "is_inception"]  # each named once, with its reason
    assert not {"fid_inception", "is_inception_mean", "is_inception_std"} & set(metrics)
    assert metrics["fid_mnist"] > metrics["floor"]["fid_mnist"]  # random weights are worse than real digits
    assert metrics["settings"]["num_images"] == 60 and metrics["seconds"]["mnist_metrics"] > 0
    assert f"| fid_mnist | {metrics['fid_mnist']:.4f} | {metrics['floor']['fid_mnist']:.4f} |" in (save / "report.md").read_text()
    spec = SamplingSpec("ddim", 2, 0.0, guidance_scale=1.0 if conditional else 0.0)  # the file's guidance
    assert metrics["sampling"] == dict(dataclasses.asdict(spec), guidance_interval=None)
    model, diffusion = tiny_model(checkpoints, conditional)  # samples.png shows the very images scored
    labels = torch.arange(60) % 10 if conditional else None
    scored = to_uint8(generate(model, diffusion, 60, spec, labels=labels, batch_size=50, seed=0)).numpy()
    assert np.abs(grid_tiles(save / "samples.png")[:60].astype(int) - scored).max() <= 1
    assert is_drawn(save / "intensity_histogram.png") and is_drawn(save / "class_histogram.png")
    assert report["fid_mnist"] == metrics["fid_mnist"]


def test_eval_samples_npz_and_real(tmp_path, data_dir):
    from data import load_mnist
    images, labels = load_mnist(data_dir, train=False)
    npz = tmp_path / "real.npz"
    np.savez(npz, images=images[:300].numpy(), labels=labels[:300].numpy())
    report = eval_script.main(["--samples", str(npz), "--no_inception", "--save_dir", str(tmp_path / "e"),
                               "--data_dir", data_dir])
    assert report["class_accuracy"] > 0.97  # real digits with their true labels
    real = eval_script.main(["--real", "test", "--num_samples", "300", "--no_inception", "--save_dir",
                             str(tmp_path / "r"), "--data_dir", data_dir])
    assert real["fid_mnist"] == pytest.approx(report["fid_mnist"])
    with pytest.raises(SystemExit) as exc:
        eval_script.main(["--samples", str(npz), "--real", "test"])
    assert exc.value.code == 2
