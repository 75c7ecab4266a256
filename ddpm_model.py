"""The U-Net and the Gaussian diffusion process: schedules, training loss and samplers.

The network (`UNet`) and the maths (`GaussianDiffusion`) are independent: every sampler takes any
callable `model(x_t, t, **model_kwargs)` that returns the prediction target (eps, x0 or v), so the
same loops serve the unconditional model, the conditional one, classifier-free guidance and the
closed-form oracles in the tests.
"""
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}
PREDICTIONS = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "cosine")
TIMESTEP_SAMPLING = ("uniform", "lognormal")
RANGE_LOSSES = ("mse", "one_sided")
DATA_RANGE = (-1.0, 1.0)  # what the samplers clamp every denoised estimate to


class SamplerDefaults(NamedTuple):
    """What a sampler does unless told otherwise: its steps (None: all T) and its injected noise eta."""
    steps: int | None
    eta: float
    spacing: str | None = None  # of the timesteps, for select_timesteps


# The samplers of the discrete process. DDIM's eta 0 is the deterministic sampler of its paper; DPM-Solver++
# runs as its SDE (eta 1), the best per network call here (docs/samplers.md), on log-SNR spaced steps, since
# its second-order steps go unstable on the uneven log-SNR gaps of uniform spacing.
SAMPLERS = {"ddpm": SamplerDefaults(None, 1.0), "ddim": SamplerDefaults(50, 0.0, "uniform"),
            "dpm_solver": SamplerDefaults(20, 1.0, "logsnr")}
METHODS = tuple(SAMPLERS)


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's shape: UNet's keyword arguments and their defaults, the documented 35.7M network."""
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (14,)
    dropout: float = 0.1
    activation: str = "relu"
    image_size: int = 28
    norm_groups: int = 32


@dataclass(frozen=True)
class DiffusionConfig:
    """The discrete diffusion process: GaussianDiffusion's keyword arguments and their defaults (but for the
    noise-level distribution of NoiseLevelConfig)."""
    timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "eps"
    logsnr_shift: float = 0.0
    timestep_sampling: str = "uniform"


@dataclass(frozen=True)
class NoiseLevelConfig:
    """Training noise levels ln(sigma) ~ N(p_mean, p_std^2), EDM's for CIFAR-10 by default: for the continuous
    formulations (edm.py), and for GaussianDiffusion's lognormal timestep sampling."""
    p_mean: float = -1.2
    p_std: float = 1.2


@dataclass(frozen=True)
class LossConfig:
    """The training loss at the ends of the data range, for every formulation: mse, or one_sided, which
    leaves out the error of a pixel whose target is an end of the range (MNIST's background is exactly -1)
    when the denoised estimate passes that end. The samplers clamp such an error away, so it never reaches
    a sample; the population minimiser is still the posterior mean, which lies inside the range. What
    changes is where a finite network puts its error: with the mse it is symmetric, and the half above -1
    survives the clamp as faint speckle on the black background, which TF-Inception features weigh
    heavily (docs/results.md, "The loss at the ends of the data range")."""
    range_loss: str = "mse"


def check_range_loss(range_loss: str) -> None:
    if range_loss not in RANGE_LOSSES:
        raise ValueError(f"range_loss must be one of {RANGE_LOSSES}, got {range_loss!r}")


def drop_clamped_errors(error: torch.Tensor, x0: torch.Tensor, x0_error: torch.Tensor) -> torch.Tensor:
    """`error` (of the network's output, elementwise proportional to the denoised estimate's `x0_error`)
    with zeros where the estimate passes the end of DATA_RANGE that its target x0 sits at."""
    lo, hi = DATA_RANGE
    return error.masked_fill(((x0 <= lo) & (x0_error < 0)) | ((x0 >= hi) & (x0_error > 0)), 0.0)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Transformers and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """max_groups groups (DDPM's 32), but never fewer than 4 channels a group: with one channel a group the
    norm becomes an instance norm and erases each map's mean, which small models need (background level)."""
    groups = min(max_groups, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the (time [+ class]) embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, act: type, norm: Callable = group_norm):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_ch), act(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_proj = nn.Sequential(act(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), act(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_dim: int = 64, norm: Callable = group_norm):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks (each optionally followed by attention) and a resampler."""

    def __init__(self, blocks: Sequence[nn.Module], attns: Sequence[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class Upsample(nn.Module):
    """Nearest upsampling to an explicit size, then a 3x3 conv: 4 -> 7 -> 14 -> 28 lands on each skip exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020) for small grayscale images.

    Runs natively at any size, odd sizes included: downsampling is a stride-2 conv (28 -> 14 -> 7 -> 4)
    and upsampling returns to the size of the matching skip connection.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, model_channels: int = ModelConfig.model_channels,
                 channel_mult: Sequence[int] = ModelConfig.channel_mult, num_res_blocks: int = ModelConfig.num_res_blocks,
                 attention_resolutions: Sequence[int] = ModelConfig.attention_resolutions,
                 dropout: float = ModelConfig.dropout, activation: str = ModelConfig.activation,
                 image_size: int = ModelConfig.image_size, norm_groups: int = ModelConfig.norm_groups):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        self.config = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), dropout=dropout,
                           activation=activation, image_size=image_size, norm_groups=norm_groups)
        self.model_channels = model_channels
        norm = functools.partial(group_norm, max_groups=norm_groups)
        emb_dim = 4 * model_channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), act(), nn.Linear(emb_dim, emb_dim))

        def attention(ch: int, res: int) -> nn.Module:
            return SelfAttention(ch, norm=norm) if res in attention_resolutions else nn.Identity()

        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        ch, res = model_channels, image_size
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, mult * model_channels, emb_dim, dropout, act, norm))
                ch = mult * model_channels
                attns.append(attention(ch, res))
                skip_channels.append(ch)
            last = level == len(channel_mult) - 1
            self.down.append(Level(blocks, attns, None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
            if not last:
                skip_channels.append(ch)
                res = (res + 1) // 2

        self.mid_blocks = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, act, norm) for _ in range(2)])
        self.mid_attn = SelfAttention(ch, norm=norm)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_channels.pop(), mult * model_channels, emb_dim, dropout, act, norm))
                ch = mult * model_channels
                attns.append(attention(ch, res))
            if level > 0:
                res = image_size
                for _ in range(level - 1):  # the resolution of the level above
                    res = (res + 1) // 2
            self.up.append(Level(blocks, attns, Upsample(ch) if level > 0 else None))

        self.out = nn.Sequential(norm(ch), act(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x, self.time_embedding(t))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(timestep_embedding(t, self.model_channels))

    def forward_with_embedding(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network proper; `emb` is the embedding every residual block sees (time, and class if any)."""
        h = self.input_conv(x)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_blocks[1](self.mid_attn(self.mid_blocks[0](h, emb)), emb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------

def check_schedule(schedule: str, timesteps: int) -> None:
    """ValueError for a schedule that is not a diffusion: unknown, or with betas above 1."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    if schedule == "linear" and timesteps < 20:  # the scaled betas end at 0.02 * 1000 / T
        raise ValueError(f"the linear schedule needs --timesteps of at least 20 (its last beta, 20 / T, must not "
                         f"exceed 1), got {timesteps}; the cosine schedule takes any T")


def make_betas(schedule: str, timesteps: int, logsnr_shift: float = 0.0) -> torch.Tensor:
    """Linear 1e-4..0.02 (Ho et al., scaled to T) or cosine (Nichol & Dhariwal 2021), in float64.

    logsnr_shift adds a constant to log(alpha_bar / (1 - alpha_bar)) at every step: the resolution shift of
    Hoogeboom et al. 2023 ("simple diffusion"), where positive values mean less noise, the direction for
    images smaller than those the schedules were made for.
    """
    check_schedule(schedule, timesteps)
    if schedule == "linear":
        scale = 1000 / timesteps  # keeps the total noise of the T=1000 schedule for other T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    else:
        s = 0.008  # cosine
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if logsnr_shift == 0:
        return betas
    ac = torch.sigmoid(torch.logit(torch.cumprod(1 - betas, 0)) + logsnr_shift)
    return 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])


def run_sampler(loop, steps: int, method: str, start: tuple, progress: bool, return_intermediates: bool, view=None):
    """Drive a sampler, a generator of (t, x) after each step, from `start` = (t, x): its progress bar, and
    the trajectory [(t, view(t, x)), ...] (view: how to show a state; default as it is) when asked."""
    trajectory, x = [start], start[1]
    if progress:
        loop = tqdm(loop, total=steps, desc=f"sampling ({method})", leave=False)
    for t, x in loop:
        if return_intermediates:
            trajectory.append((t, x if view is None else view(t, x)))
    return (x, trajectory) if return_intermediates else x


def resolve_eta(method: str, samplers: dict, eta: float | None) -> float:
    """`eta`, or the sampler's default; ValueError if negative."""
    eta = samplers[method].eta if eta is None else eta
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return eta


def make_generator(seed_or_generator, device) -> torch.Generator | None:
    """A torch.Generator on `device` from a seed, or the generator itself, or None (global RNG)."""
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator(device=device).manual_seed(int(seed_or_generator))


def select_timesteps(timesteps: int, steps: int, spacing: str = "uniform", alphas_cumprod=None) -> list:
    """`steps` decreasing timesteps out of 0..T-1 for the few-step samplers.

    uniform: evenly spaced from T-1 to 0 inclusive; logsnr: evenly spaced in log-SNR between T-1 and 0
    (Lu et al. 2022), which puts more steps at low noise, where small images get their detail.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    if spacing == "uniform":
        return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    if spacing != "logsnr":
        raise ValueError(f"spacing must be uniform or logsnr, got {spacing!r}")
    log_snr = torch.log(alphas_cumprod.double() / (1 - alphas_cumprod.double())).cpu()  # decreasing in t
    targets = torch.linspace(log_snr[-1].item(), log_snr[0].item(), steps, dtype=torch.float64)
    ts = torch.searchsorted(-log_snr, -targets).clamp(max=timesteps - 1).tolist()
    # Make them distinct where log-SNR is steep: strictly decreasing from the top, and never below
    # the room the remaining steps need at the bottom (the max of two decreasing sequences decreases).
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return [max(t, steps - 1 - i) for i, t in enumerate(ts)]


class GaussianDiffusion(nn.Module):
    """Forward process q(x_t | x_0), the training loss and the DDPM / DDIM / DPM-Solver++ samplers.

    A module only so that `.to(device)` moves the schedule tensors with it; it has no parameters.
    """

    SAMPLERS = SAMPLERS

    def __init__(self, timesteps: int = DiffusionConfig.timesteps, beta_schedule: str = DiffusionConfig.beta_schedule,
                 prediction: str = DiffusionConfig.prediction, logsnr_shift: float = DiffusionConfig.logsnr_shift,
                 timestep_sampling: str = DiffusionConfig.timestep_sampling, p_mean: float = NoiseLevelConfig.p_mean,
                 p_std: float = NoiseLevelConfig.p_std, range_loss: str = LossConfig.range_loss):
        """timestep_sampling: training timesteps uniform over 0..T-1, or lognormal: the timestep whose
        sigma = sqrt((1 - alpha_bar) / alpha_bar) is the first at or above a draw of ln(sigma) ~ N(p_mean, p_std^2)."""
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if timestep_sampling not in TIMESTEP_SAMPLING or p_std <= 0:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING} and p_std positive, got "
                             f"{timestep_sampling!r}, {p_std}")
        check_range_loss(range_loss)
        self.config = dict(timesteps=timesteps, beta_schedule=beta_schedule, prediction=prediction,
                           logsnr_shift=logsnr_shift, timestep_sampling=timestep_sampling, range_loss=range_loss)
        if timestep_sampling == "lognormal":
            self.config.update(p_mean=p_mean, p_std=p_std)
        self.timesteps, self.prediction, self.range_loss = timesteps, prediction, range_loss
        self.timestep_sampling, self.p_mean, self.p_std = timestep_sampling, p_mean, p_std
        betas = make_betas(beta_schedule, timesteps, logsnr_shift)
        alphas = 1 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        schedule = dict(
            betas=betas, alphas_cumprod=ac, sqrt_ac=ac.sqrt(), sqrt_one_minus_ac=(1 - ac).sqrt(),
            posterior_variance=betas * (1 - ac_prev) / (1 - ac),
            posterior_mean_coef_x0=betas * ac_prev.sqrt() / (1 - ac),
            posterior_mean_coef_xt=(1 - ac_prev) * alphas.sqrt() / (1 - ac),
        )
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped to broadcast against a batch x."""
        return arr[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_ac, t, x0) * x0 + self._at(self.sqrt_one_minus_ac, t, x0) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self._at(self.sqrt_ac, t, x0) * noise - self._at(self.sqrt_one_minus_ac, t, x0) * x0

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of x_t / sqrt(alpha_bar) at timesteps t."""
        ac = self.alphas_cumprod[t.long()].double()
        return ((1 - ac) / ac).sqrt()

    def draw_noise_levels(self, n: int, device, generator=None) -> torch.Tensor:
        """Training timesteps, by timestep_sampling."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.timesteps, (n,), device=device, generator=generator)
        sigma = (self.p_mean + self.p_std * torch.randn(n, device=device, generator=generator)).exp()
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        return torch.searchsorted(table, sigma).clamp(max=self.timesteps - 1)

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                      generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, min_snr_gamma: float = 0.0) -> torch.Tensor:
        """MSE between the network's output and the prediction target at uniformly drawn timesteps
        (or at the given t, with the given noise).

        min_snr_gamma > 0 weights each timestep as Min-SNR-gamma (Hang et al. 2023): the loss in x0
        terms, SNR-weighted but capped at gamma, so that the many easy low-noise steps stop dominating
        the gradient. 0 is the plain (unweighted) loss of the prediction target. range_loss: LossConfig.
        """
        if t is None:
            t = self.draw_noise_levels(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **(model_kwargs or {})).float()
        error = out - self.target(x0, t, noise).float()
        if self.range_loss == "one_sided":
            error = drop_clamped_errors(error, x0, self.predict_eps_x0(out, x_t.float(), t)[1] - x0)
        per_sample = error.square().flatten(1).mean(1)
        if min_snr_gamma > 0:
            per_sample = per_sample * self.min_snr_weight(t, min_snr_gamma)
        return per_sample.mean()

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR, gamma) expressed for this prediction target: each target's MSE is the x0 MSE times
        SNR (eps), 1 (x0) or SNR + 1 (v) up to a constant, so divide that factor out."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        if self.prediction == "eps":
            return (gamma / snr).clamp(max=1)  # min(SNR, gamma) / SNR, also 1 at SNR = 0
        capped = snr.clamp(max=gamma)
        return capped if self.prediction == "x0" else capped / (snr + 1)

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef_x0, t, x_t) * x0 + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t)

    def predict_eps_x0(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Turn the network's output, whatever its target, into (eps, x0) predictions."""
        a, s = self._at(self.sqrt_ac, t, x_t), self._at(self.sqrt_one_minus_ac, t, x_t)
        if self.prediction == "eps":
            return model_out, (x_t - s * model_out) / a
        if self.prediction == "x0":
            return (x_t - a * model_out) / s, model_out
        return s * x_t + a * model_out, a * x_t - s * model_out

    # ------------------------------------------------------------------------------------------
    # Samplers. Each is a generator of (t, x_t) pairs driven by `sample`, which owns the noise,
    # the progress bar and the intermediates.
    # ------------------------------------------------------------------------------------------

    def _eps_and_x0(self, model, x, t_int, model_kwargs, clip_denoised):
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        eps, x0 = self.predict_eps_x0(model(x, t, **model_kwargs).to(x.dtype), x, t)
        if clip_denoised:
            x0 = x0.clamp(*DATA_RANGE)
            eps = (x - self._at(self.sqrt_ac, t, x) * x0) / self._at(self.sqrt_one_minus_ac, t, x)
        return t, eps, x0

    def _ddpm_steps(self, model, x, model_kwargs, generator, clip_denoised, steps, eta, spacing):
        """Ancestral sampling over all T steps with the posterior variance (beta tilde)."""
        for t_int in reversed(range(self.timesteps)):
            t, _, x0 = self._eps_and_x0(model, x, t_int, model_kwargs, clip_denoised)
            mean, var = self.posterior_mean_variance(x0, x, t)
            if t_int > 0:
                x = mean + var.sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            else:
                x = mean
            yield t_int, x

    def _ddim_steps(self, model, x, model_kwargs, generator, clip_denoised, steps, eta, spacing):
        """DDIM (Song et al. 2021): eta=0 is deterministic, eta=1 matches DDPM's variance."""
        ts = select_timesteps(self.timesteps, steps, spacing, self.alphas_cumprod)
        for i, t_int in enumerate(ts):
            t, eps, x0 = self._eps_and_x0(model, x, t_int, model_kwargs, clip_denoised)
            ac = self.alphas_cumprod[t_int]
            ac_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ac)
            sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()
            x = ac_prev.sqrt() * x0 + (1 - ac_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            yield t_int, x

    def _dpm_solver_steps(self, model, x, model_kwargs, generator, clip_denoised, steps, eta, spacing):
        """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on x0 predictions.

        eta=0 solves the probability-flow ODE; eta=1 is SDE-DPM-Solver++(2M), the same step on the
        reverse SDE, which re-injects noise as DDPM does (its first-order step is DDIM with eta=1).
        The last step, to the clean image, is first order (it returns the x0 prediction).
        """
        ts = select_timesteps(self.timesteps, steps, spacing, self.alphas_cumprod)
        ac = self.alphas_cumprod
        lam = lambda t_int: 0.5 * (torch.log(ac[t_int]) - torch.log1p(-ac[t_int]))  # log(alpha/sigma)
        prev_x0, prev_h = None, None
        for i, t_int in enumerate(ts):
            _, _, x0 = self._eps_and_x0(model, x, t_int, model_kwargs, clip_denoised)
            if i + 1 == len(ts):
                x = x0
            else:
                t_next = ts[i + 1]
                h = lam(t_next) - lam(t_int)
                alpha_next, sigma_next = ac[t_next].sqrt(), (1 - ac[t_next]).sqrt()
                d = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * (h / (2 * prev_h))
                # h is infinite out of a zero-SNR first step (short linear schedules): no 0 * inf there.
                decay = sigma_next / (1 - ac[t_int]).sqrt() * (torch.exp(-eta * h) if eta > 0 else 1)
                x = decay * x - alpha_next * torch.expm1(-(1 + eta) * h) * d
                if eta > 0:
                    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                    x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * noise
                prev_x0, prev_h = x0, h
            yield t_int, x

    def sampler_steps(self, method: str, steps: int | None = None) -> int:
        """The steps `method` takes: `steps`, or its default; ddpm always takes all T. ValueError if out of range."""
        if method not in SAMPLERS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "ddpm":
            if steps not in (None, self.timesteps):
                raise ValueError(f"ddpm takes all of the model's {self.timesteps} steps, not {steps}")
            return self.timesteps
        steps = SAMPLERS[method].steps if steps is None else steps
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be between 1 and the model's {self.timesteps} timesteps, got {steps}")
        return steps

    @torch.no_grad()
    def sample(self, model: Callable, shape: Sequence[int], method: str = "ddpm", steps: int | None = None,
               eta: float | None = None, spacing: str | None = None, model_kwargs: dict | None = None,
               generator=None, x_T: torch.Tensor | None = None, clip_denoised: bool = True,
               progress: bool = False, return_intermediates: bool = False, device=None):
        """Draw samples with `method` in METHODS; steps, eta and spacing default to its SAMPLERS entry.

        generator: a seed or a torch.Generator (on the sampling device) for reproducible samples.
        steps: network evaluations of ddim and dpm_solver; ddpm takes all T.
        spacing: of the few-step samplers' timesteps, uniform or logsnr (select_timesteps).
        Returns x_0, or (x_0, [(t, x_t), ...]) over every step when return_intermediates is set.
        """
        steps, eta = self.sampler_steps(method, steps), resolve_eta(method, SAMPLERS, eta)
        device = device or self.betas.device
        generator = make_generator(generator, device)
        x = x_T if x_T is not None else torch.randn(tuple(shape), device=device, generator=generator)
        step_fns = {"ddpm": self._ddpm_steps, "ddim": self._ddim_steps, "dpm_solver": self._dpm_solver_steps}
        loop = step_fns[method](model, x, model_kwargs or {}, generator, clip_denoised, steps, eta,
                                spacing or SAMPLERS[method].spacing)
        return run_sampler(loop, steps, method, (self.timesteps, x), progress, return_intermediates)
