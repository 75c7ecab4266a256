"""The U-Net, the conditional model and the checkpoint format."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint, upgrade
from conditional_ddpm import ConditionalUNet
from conftest import TINY_MODEL
from ddpm_model import ModelConfig, UNet
from diffusion import DDPM, DiffusionConfig, FlowMatching, SamplingSpec

pytestmark = pytest.mark.unit
TINY = ModelConfig(**{**TINY_MODEL, "channel_mult": (1, 2, 2, 2)})  # every level of the default network


@pytest.mark.parametrize("size,attn", [(28, (14,)), (32, (16,)), (28, (7, 4))])
@pytest.mark.parametrize("mult", [(1,), (1, 2), (1, 2, 2), (1, 2, 2, 2), (1, 1, 2, 2, 2)])
def test_unet_output_shape_equals_input(size, attn, mult):
    net = UNet(dataclasses.replace(TINY, channel_mult=mult, attention_resolutions=attn, image_size=size))
    x = torch.randn(2, 1, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_attention_sits_where_asked():
    net = UNet(dataclasses.replace(TINY, attention_resolutions=(14,)))
    n_attn = sum(type(m).__name__ == "SelfAttention" for m in net.modules())
    # level 1 (14x14): 1 down block + 2 up blocks, plus the one in the middle
    assert n_attn == 1 + 2 + 1


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = ConditionalUNet(TINY, num_classes=10)
    for p in net.parameters():  # zero-initialised output layers would block gradients to everything before them
        torch.nn.init.normal_(p, std=0.05)
    net(torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 3, 9, 10])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_time_and_class_change_the_output():
    torch.manual_seed(0)
    net = ConditionalUNet(TINY, num_classes=10).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28)
    out = lambda t, y: net(x, torch.tensor([t]), torch.tensor([y]))
    assert not torch.allclose(out(10, 3), out(500, 3))
    assert not torch.allclose(out(10, 3), out(10, 4))
    assert not torch.allclose(out(10, 3), out(10, 10))  # the null class is a class of its own


def test_activation_choice():
    assert any(isinstance(m, torch.nn.SiLU) for m in UNet(dataclasses.replace(TINY, activation="silu")).modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in UNet(TINY).modules())
    with pytest.raises(ValueError):
        UNet(dataclasses.replace(TINY, activation="gelu"))


def test_every_group_norm_has_at_most_32_groups_of_at_least_4_channels():
    norms = [m for m in UNet(TINY).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 10 and all(m.num_groups == min(32, m.num_channels // 4) for m in norms)


def test_default_model_size():
    assert sum(p.numel() for p in UNet().parameters()) == 35_741_697  # the count the README states


# ----------------------------------------------------------------------------- checkpoints

def make_checkpoint(path, conditional=False):
    model = ConditionalUNet(TINY, num_classes=10) if conditional else UNet(TINY)
    ema = ConditionalUNet(TINY, num_classes=10) if conditional else UNet(TINY)
    for p in ema.parameters():
        torch.nn.init.normal_(p)
    diffusion = DDPM(DiffusionConfig(timesteps=100, beta_schedule="cosine", prediction="v"))
    save_checkpoint(str(path), model, ema, diffusion, SamplingSpec("ddim", 10, 0.0), step=7, epoch=1,
                    config={"lr": 1e-3})
    return model, ema


@pytest.mark.parametrize("conditional", [False, True])
def test_checkpoint_round_trip(tmp_path, conditional):
    path = tmp_path / "ckpt.pth"
    model, ema = make_checkpoint(path, conditional)
    ckpt = load_checkpoint(str(path), conditional=conditional)
    assert ckpt["step"] == 7 and ckpt["config"] == {"lr": 1e-3}
    assert ckpt["sampling"] == dict(method="ddim", steps=10, eta=0.0, guidance_scale=0.0, autoguidance_scale=0.0,
                                    guidance_interval=None)
    loaded, diffusion = model_from_checkpoint(ckpt)
    assert type(loaded) is type(model) and not loaded.training and loaded.config == TINY
    assert diffusion.config == DiffusionConfig(timesteps=100, beta_schedule="cosine", prediction="v")
    for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(ckpt["model"][name], weights) for name, weights in model.state_dict().items())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # the atomic write cleaned up


def test_a_continuous_formulation_round_trips_and_the_first_format_still_loads(tmp_path):
    """A checkpoint records its formulation: a flow model's config comes back as FlowMatching, and a
    diffusion_config without a formulation (every checkpoint written before there was one) is the DDPM process."""
    model = UNet(TINY)
    flow = FlowMatching(DiffusionConfig(formulation="flow", p_mean=0.0, p_std=1.0, range_loss="one_sided"))
    save_checkpoint(str(tmp_path / "flow.pth"), model, model, flow, SamplingSpec())
    _, diffusion = model_from_checkpoint(load_checkpoint(str(tmp_path / "flow.pth")))
    assert isinstance(diffusion, FlowMatching) and diffusion.config == flow.config
    first_format = torch.load(tmp_path / "flow.pth", weights_only=True)
    first_format.update(version=1, diffusion_config=dict(timesteps=50, beta_schedule="cosine", prediction="x0"),
                       model_config=dict(out_channels=1, **{k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in dataclasses.asdict(TINY).items()}))
    del first_format["sampling"]
    torch.save(first_format, tmp_path / "first.pth")
    model, diffusion = model_from_checkpoint(load_checkpoint(str(tmp_path / "first.pth")))
    assert isinstance(diffusion, DDPM) and diffusion.levels == 50 and diffusion.config.prediction == "x0"
    assert model.config == TINY


def test_checkpoint_errors_name_the_problem(tmp_path):
    good = tmp_path / "good.pth"
    make_checkpoint(good, conditional=True)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(str(text))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(truncated))
    other = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a DDPM checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="is a conditional checkpoint"):
        load_checkpoint(str(good), conditional=False)
    future = torch.load(good, weights_only=True)
    future["diffusion_config"]["wavelets"] = True
    torch.save(future, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match="future.pth: unknown setting 'wavelets'"):
        load_checkpoint(str(tmp_path / "future.pth"))


# ----------------------------------------------------------------------------- files of earlier versions

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy")
# Each file's default guidance, as the code that wrote it sampled (tests/data/legacy/README.md).
LEGACY_DEFAULTS = {
    "ddpm_cond_last.pth": "ddim, 10 steps, eta 0, classifier-free w 0.5",
    "ddpm_cond_copy.pt": "ddim, 10 steps, eta 0, classifier-free w 1.5 at sigma (0.5, 20]",
    "flow_uncond_last.pth": "ddim, 10 steps, eta 0, autoguidance w 1 at sigma (0.3, 5]",
    "flow_uncond_copy.pt": "ddim, 10 steps, eta 0, autoguidance w 1 at sigma (0.3, 5]",
    "flow_cond_copy.pt": "ddim, 10 steps, eta 0, autoguidance w 1 + classifier-free w 0.2 at sigma (0.3, 5]",
}


@pytest.mark.parametrize("name", sorted(LEGACY_DEFAULTS))
def test_checkpoints_of_the_previous_format_draw_the_same_images(name):
    """Training checkpoints and sampling copies written before the sampling spec existed, ddpm and flow, each
    with its kind of default guidance: DDIM at eta 0 with the same seed draws the images that code drew
    (within two grey levels), guided as it was."""
    import inference
    from data import to_uint8
    from sampling import generate, load_model
    args = inference.build_parser().parse_args(["--model_path", os.path.join(LEGACY, name), "--method", "ddim",
                                                "--steps", "10", "--eta", "0", "--amp", "none"])
    loaded = load_model(args)
    spec = loaded.specs["ddim"]
    assert spec.describe() == LEGACY_DEFAULTS[name]
    images = to_uint8(generate(loaded.model, loaded.diffusion, 8, spec, batch_size=64, seed=0, amp="none",
                               guide_model=loaded.guide_model))
    with np.load(os.path.join(LEGACY, "ddim_samples.npz")) as f:
        drawn_then = torch.from_numpy(f[name.replace(".", "_")])
    assert (images.int() - drawn_then.int()).abs().max() <= 2


def test_upgrade_reads_the_old_guidance_flags_as_they_were_meant():
    """Version 1's guidance_scale meant autoguidance on a file holding a guide and classifier-free guidance on a
    conditional one without; class_guidance was the classifier-free term beside autoguidance; a file's own keys
    won over its run's flags, which counted only for a run that guided (every run recorded a 0.5)."""
    guide = dict(model_config=dict(dataclasses.asdict(TINY)), ema={}, step=1)

    def upgraded(conditional, run, **own):
        config = dict(dataclasses.asdict(TINY), **({"num_classes": 10} if conditional else {}))
        ckpt = dict(version=1, conditional=conditional, model_config=config, diffusion_config={},
                    config=dict(args=dict(sample_method="dpm_solver", **run)), **own)
        spec = upgrade(ckpt)["sampling"]
        return spec["guidance_scale"], spec["autoguidance_scale"], spec["guidance_interval"]
    unguided_run = dict(guidance_scale=0.5, guidance_interval=None, guide_snapshot=0.0)
    snapshot_run = dict(guidance_scale=1.5, guidance_interval=[0.2, 20.0], guide_snapshot=0.5)
    assert upgraded(False, unguided_run) == (0.0, 0.0, None)
    assert upgraded(False, unguided_run, guide=guide) == (0.0, 0.0, None)
    assert upgraded(False, snapshot_run, guide=guide) == (0.0, 1.5, [0.2, 20.0])
    assert upgraded(False, unguided_run, guide=guide, guidance_scale=0.7) == (0.0, 0.7, None)
    assert upgraded(True, unguided_run) == (0.5, 0.0, None)
    assert upgraded(True, unguided_run, guidance_scale=2.0, guidance_interval=[0.3, 5.0]) == (2.0, 0.0, [0.3, 5.0])
    assert upgraded(True, unguided_run, guide=guide, guidance_scale=1.0, class_guidance=0.2) == (0.2, 1.0, None)
    legacy = torch.load(os.path.join(LEGACY, "flow_cond_copy.pt"), weights_only=True)
    assert legacy["version"] == 1 and "sampling" not in legacy  # a user's file is upgraded in memory only
    assert not {"guidance_scale", "class_guidance", "guidance_interval"} & set(upgrade(legacy))
