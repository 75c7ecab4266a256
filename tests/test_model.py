"""The U-Net, the conditional model and the checkpoint format."""
import os

import pytest
import torch

from checkpoint import CheckpointError, build_diffusion, load_checkpoint, model_from_checkpoint, save_checkpoint
from conditional_ddpm import ConditionalUNet, GuidedModel, drop_labels
from conftest import TINY_MODEL
from ddpm_model import GaussianDiffusion, UNet
from edm import KarrasDiffusion

pytestmark = pytest.mark.unit
TINY = {**TINY_MODEL, "channel_mult": (1, 2, 2, 2)}  # every level of the default network


@pytest.mark.parametrize("size,attn", [(28, (14,)), (32, (16,)), (28, (7, 4))])
@pytest.mark.parametrize("mult", [(1,), (1, 2), (1, 2, 2), (1, 2, 2, 2), (1, 1, 2, 2, 2)])
def test_unet_output_shape_equals_input(size, attn, mult):
    net = UNet(**{**TINY, "channel_mult": mult, "attention_resolutions": attn, "image_size": size})
    x = torch.randn(2, 1, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_attention_sits_where_asked():
    net = UNet(**{**TINY, "attention_resolutions": (14,)})
    n_attn = sum(type(m).__name__ == "SelfAttention" for m in net.modules())
    # level 1 (14x14): 1 down block + 2 up blocks, plus the one in the middle
    assert n_attn == 1 + 2 + 1


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = ConditionalUNet(num_classes=10, **TINY)
    for p in net.parameters():  # zero-initialised output layers would block gradients to everything before them
        torch.nn.init.normal_(p, std=0.05)
    net(torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 3, 9, 10])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_time_and_class_change_the_output():
    torch.manual_seed(0)
    net = ConditionalUNet(num_classes=10, **TINY).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28)
    out = lambda t, y: net(x, torch.tensor([t]), torch.tensor([y]))
    assert not torch.allclose(out(10, 3), out(500, 3))
    assert not torch.allclose(out(10, 3), out(10, 4))
    assert not torch.allclose(out(10, 3), out(10, 10))  # the null class is a class of its own


def test_activation_choice():
    assert any(isinstance(m, torch.nn.SiLU) for m in UNet(**TINY, activation="silu").modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in UNet(**TINY).modules())
    with pytest.raises(ValueError):
        UNet(**TINY, activation="gelu")


def test_norm_groups_sets_every_group_norm():
    """At most norm_groups groups and at least 4 channels a group, in every norm of the network."""
    for max_groups, expected in ((32, lambda c: min(32, c // 4)), (1, lambda c: 1)):
        norms = [m for m in UNet(**TINY, norm_groups=max_groups).modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) > 10 and all(m.num_groups == expected(m.num_channels) for m in norms), max_groups


def test_default_model_size():
    assert sum(p.numel() for p in UNet().parameters()) == 35_741_697  # the count the README states


def test_drop_labels_rate():
    y = torch.zeros(100_000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, null_class=10, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.005
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_guided_model_formula():
    f = lambda x, t, y: x * 0 + y.view(-1, 1, 1, 1).float()  # returns its label
    x, t, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    out = GuidedModel(f, 2.0, null_class=10)(x, t, y)
    torch.testing.assert_close(out[:, 0, 0, 0], 3.0 * y.float() - 2.0 * 10)
    torch.testing.assert_close(GuidedModel(f, 0.0, null_class=10)(x, t, y)[:, 0, 0, 0], y.float())


def test_guidance_interval_guides_only_inside_it():
    """Outside the interval a batch costs one network call and is the plain conditional output; inside, the
    guided mix of both branches."""
    calls = []

    def f(x, t, y):
        calls.append(len(x))
        return x * 0 + y.view(-1, 1, 1, 1).float()
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    guided = GuidedModel(f, 2.0, null_class=10, guide=lambda t: bool(t.item() >= 500))
    inside, outside = guided(x, torch.full((3,), 700), y), guided(x, torch.full((3,), 100), y)
    torch.testing.assert_close(inside[:, 0, 0, 0], 3.0 * y.float() - 2.0 * 10)
    torch.testing.assert_close(outside[:, 0, 0, 0], y.float())
    assert calls == [6, 3]


def test_autoguidance_steers_away_from_the_weak_model_at_the_same_inputs():
    """Unconditional: out = (1 + w) f - w g, each network called once on the batch as it is, and only
    inside the interval; conditional: the weak model sees the same labels, not the null class."""
    calls = []

    def network(value):
        def f(x, t, y=None):
            calls.append((value, len(x), None if y is None else y.tolist()))
            return x * 0 + value + (0 if y is None else y.view(-1, 1, 1, 1).float())
        return f
    x = torch.zeros(3, 1, 2, 2)
    guided = GuidedModel(network(1.0), 2.0, guide=lambda t: bool(t.item() >= 500), weak_model=network(4.0))
    inside, outside = guided(x, torch.full((3,), 700)), guided(x, torch.full((3,), 100))
    torch.testing.assert_close(inside, torch.full_like(x, 3.0 * 1 - 2.0 * 4))
    torch.testing.assert_close(outside, torch.ones_like(x))
    assert calls == [(1.0, 3, None), (4.0, 3, None), (1.0, 3, None)]
    y = torch.tensor([1, 2, 3])
    out = GuidedModel(network(1.0), 2.0, null_class=10, weak_model=network(4.0))(x, torch.zeros(3), y)
    torch.testing.assert_close(out[:, 0, 0, 0], 3.0 * (1 + y.float()) - 2.0 * (4 + y.float()))
    assert calls[-1] == (4.0, 3, [1, 2, 3])
    with pytest.raises(ValueError, match="null class"):
        GuidedModel(network(1.0), 1.0)


def test_autoguidance_with_a_classifier_free_term():
    """out = f + w (f - g) + w_class (f - f_null): f and f_null in one batch, the weak network g once; w 0
    leaves classifier-free guidance alone, and the class term needs both a null class and a weak network."""
    calls = []

    def network(value):
        def f(x, t, y):
            calls.append((value, y.tolist()))
            return x * 0 + value + y.view(-1, 1, 1, 1).float()
        return f
    x, t, y = torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.tensor([1, 2])
    strong, null, weak = 1 + y.float(), 1 + 10.0, 4 + y.float()
    out = GuidedModel(network(1.0), 2.0, null_class=10, weak_model=network(4.0), class_scale=0.5)(x, t, y)
    torch.testing.assert_close(out[:, 0, 0, 0], strong + 2.0 * (strong - weak) + 0.5 * (strong - null))
    assert calls == [(1.0, [1, 2, 10, 10]), (4.0, [1, 2])]
    calls.clear()
    out = GuidedModel(network(1.0), 0.0, null_class=10, weak_model=network(4.0), class_scale=0.5)(x, t, y)
    torch.testing.assert_close(out[:, 0, 0, 0], strong + 0.5 * (strong - null))
    assert calls == [(1.0, [1, 2, 10, 10])]
    with pytest.raises(ValueError, match="conditional model and a weak model"):
        GuidedModel(network(1.0), 1.0, weak_model=network(4.0), class_scale=0.5)


# ----------------------------------------------------------------------------- checkpoints

def make_checkpoint(path, conditional=False):
    model = ConditionalUNet(num_classes=10, **TINY) if conditional else UNet(**TINY)
    ema = ConditionalUNet(num_classes=10, **TINY) if conditional else UNet(**TINY)
    for p in ema.parameters():
        torch.nn.init.normal_(p)
    diffusion = GaussianDiffusion(100, "cosine", "v")
    save_checkpoint(str(path), model, ema, diffusion, step=7, epoch=1, config={"lr": 1e-3})
    return model, ema


@pytest.mark.parametrize("conditional", [False, True])
def test_checkpoint_round_trip(tmp_path, conditional):
    path = tmp_path / "ckpt.pth"
    model, ema = make_checkpoint(path, conditional)
    ckpt = load_checkpoint(str(path), conditional=conditional)
    assert ckpt["step"] == 7 and ckpt["config"] == {"lr": 1e-3}
    loaded, diffusion = model_from_checkpoint(ckpt)
    assert type(loaded) is type(model) and not loaded.training
    assert diffusion.config == dict(timesteps=100, beta_schedule="cosine", prediction="v", logsnr_shift=0.0,
                                    timestep_sampling="uniform", range_loss="mse")
    for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    raw, _ = model_from_checkpoint(ckpt, use_ema=False)
    for a, b in zip(raw.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # the atomic write cleaned up


def test_a_continuous_formulation_round_trips_and_the_seeds_format_still_loads(tmp_path):
    """A checkpoint records its process: KarrasDiffusion's config comes back as KarrasDiffusion, and a
    diffusion_config without a formulation (every checkpoint written before there was one) is the DDPM process."""
    model = UNet(**TINY)
    flow = KarrasDiffusion("flow", p_mean=0.0, p_std=1.0, range_loss="one_sided")
    save_checkpoint(str(tmp_path / "edm.pth"), model, model, flow)
    _, diffusion = model_from_checkpoint(load_checkpoint(str(tmp_path / "edm.pth")))
    assert isinstance(diffusion, KarrasDiffusion) and diffusion.config["formulation"] == "flow"
    assert (diffusion.p_mean, diffusion.p_std, diffusion.range_loss) == (0.0, 1.0, "one_sided")
    seed_format = build_diffusion(dict(timesteps=50, beta_schedule="cosine", prediction="x0"))
    assert isinstance(seed_format, GaussianDiffusion) and seed_format.timesteps == 50


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
