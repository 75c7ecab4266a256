"""Diffusion in continuous noise levels, the framework of EDM (Karras et al. 2022): x = x0 + sigma * eps.

A preconditioning turns any network F(x_in, t_in) into a denoiser D(x, sigma) that estimates x0; training
draws ln(sigma) from N(p_mean, p_std^2) and fits F to the output that would make D exact; the samplers
are plain functions over a decreasing grid of noise levels. Two preconditionings ("formulations") share
all of it:

- edm: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2) for data of
  scale sd (sigma_data), and the network's time input 250 ln(s) (EDM's c_noise = ln(s) / 4, in the 0..1000
  range of timesteps the U-Net's sinusoidal embedding was built for).
- flow: rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023). The network sees the straight
  path x_t = (1 - t) x0 + t eps, which is x / (1 + s) at t = s / (1 + s), and predicts the velocity eps - x0:
  D = x_t - t F. ln(s) = logit(t), so a log-normal s is the logit-normal t of Esser et al. 2024.

In both the loss is the plain MSE between F and its target (x0 - c_skip x) / c_out: EDM's weighting
1 / c_out^2 of the denoiser's error, and flow matching's unweighted velocity loss.

LossConfig's range_loss applies to both as it does to the discrete process.
"""
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ddpm_model import (
    DATA_RANGE,
    LossConfig,
    NoiseLevelConfig,
    SamplerDefaults,
    check_range_loss,
    drop_clamped_errors,
    make_generator,
    resolve_eta,
    run_sampler,
)

FORMULATIONS = ("edm", "flow")
# The names of the discrete process's samplers mean the same here: ddpm is ancestral sampling over as many
# levels as DDPM's T, ddim its deterministic (eta 0) or noisy form. Heun's steps are noise levels (2 steps - 1
# network calls, EDM's 18 levels = 35 calls); the others' are network calls.
DDPM_LEVELS = 1000
SAMPLERS = {"ddpm": SamplerDefaults(DDPM_LEVELS, 1.0), "ddim": SamplerDefaults(50, 0.0), "heun": SamplerDefaults(18, 0.0),
            "dpm_solver": SamplerDefaults(20, 1.0), "dpm_solver_3m": SamplerDefaults(20, 1.0)}
METHODS = tuple(SAMPLERS)
MAX_STEPS = 1000
RHO = 7.0  # the sampling grid is uniform in sigma^(1/rho), EDM's choice: more steps at low noise
CHURN_RANGE = (0.05, 50.0)  # noise levels where heun's churn adds noise (EDM's S_tmin, S_tmax)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the ends of the sampling grid (EDM's)


@dataclass(frozen=True)
class KarrasConfig:
    """The preconditioning's data scale; with the formulation, NoiseLevelConfig and LossConfig, KarrasDiffusion's
    keyword arguments (EDM's defaults for CIFAR-10)."""
    sigma_data: float = 0.5


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> list:
    """`steps` noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist() + [0.0]


def gaussian_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


# ----------------------------------------------------------------------------------------------
# Samplers: generators of (sigma, x) over a grid that ends at 0, for any denoiser D(x, sigma).
# Each yields after every step; the last step returns D itself, the clean estimate.
# ----------------------------------------------------------------------------------------------

def ddim_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0):
    """DDIM (Song et al. 2021) over noise levels. eta 0 is Euler on the probability-flow ODE dx/dsigma =
    (x - D) / sigma, which is also flow matching's Euler sampler; eta 1 keeps only part of the noise estimate and
    draws the rest afresh, DDPM's ancestral step."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        if s_next == 0:
            x = d
        else:
            fresh = eta * s_next * math.sqrt(1 - (s_next / s) ** 2)  # DDIM's sigma_t, in these units
            x = d + math.sqrt(s_next ** 2 - fresh ** 2) / s * (x - d)
            if fresh > 0:
                x = x + fresh * gaussian_like(x, generator)
        yield s_next, x


def heun_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0):
    """EDM's Algorithm 2: Heun's second-order step, Euler for the last one (2N - 1 network calls for N levels).

    eta is EDM's S_churn: within CHURN_RANGE each step first raises the noise by a factor 1 + gamma,
    gamma = min(eta / N, sqrt(2) - 1), with fresh noise; 0 is the deterministic ODE sampler.
    """
    n = len(sigmas) - 1
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(eta / n, math.sqrt(2) - 1) if CHURN_RANGE[0] <= s <= CHURN_RANGE[1] else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat ** 2 - s ** 2) * gaussian_like(x, generator)
        d = denoise(x, s_hat)
        if s_next == 0:
            x = d
        else:
            slope = (x - d) / s_hat
            x_euler = x + (s_next - s_hat) * slope
            x = x + (s_next - s_hat) * 0.5 * (slope + (x_euler - denoise(x_euler, s_next)) / s_next)
        yield s_next, x


def dpm_solver_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0):
    """DPM-Solver++(2M) (Lu et al. 2022) in lambda = -ln(sigma): second-order multistep on the denoised
    estimates; eta = 1 is its SDE form, which re-injects noise at every step. One network call a level."""
    prev_d, prev_h = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        if s_next == 0:
            x = d
        else:
            h = math.log(s / s_next)
            corrected = d if prev_d is None else d + (d - prev_d) * (h / (2 * prev_h))
            x = (s_next / s) * math.exp(-eta * h) * x - math.expm1(-(1 + eta) * h) * corrected
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * gaussian_like(x, generator)
            prev_d, prev_h = d, h
        yield s_next, x


def dpm_solver_3m_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0):
    """DPM-Solver++(3M) (Lu et al. 2022; in its SDE form for eta > 0): the exponential integrator of the
    denoised estimate's Taylor expansion to second order, its derivatives from the last three estimates
    (the first two steps use fewer). One network call a level."""
    history = []  # (denoised, h) of the previous steps, newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        if s_next == 0:
            x = d
        else:
            h = math.log(s / s_next)
            h_eta = (1 + eta) * h
            phi_1 = -math.expm1(-h_eta)
            phi_2 = 1 - phi_1 / h_eta  # (e^-h_eta - 1 + h_eta) / h_eta
            x = math.exp(-h_eta) * x + phi_1 * d
            if len(history) == 1:
                (d_1, h_1), = history
                x = x + phi_2 * (d - d_1) * (h / h_1)
            elif len(history) == 2:
                (d_1, h_1), (d_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * gaussian_like(x, generator)
            history = [(d, h)] + history[:1]
        yield s_next, x


STEP_FUNCTIONS = {"ddpm": ddim_steps, "ddim": ddim_steps, "heun": heun_steps, "dpm_solver": dpm_solver_steps,
                  "dpm_solver_3m": dpm_solver_3m_steps}


# ----------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------

class KarrasDiffusion(nn.Module):
    """Preconditioning, training loss and samplers of a continuous-noise formulation (FORMULATIONS).

    A module, like GaussianDiffusion, so that both move with `.to(device)`; it has no parameters or buffers.
    """

    SAMPLERS = SAMPLERS

    def __init__(self, formulation: str = "edm", sigma_data: float = KarrasConfig.sigma_data,
                 p_mean: float = NoiseLevelConfig.p_mean, p_std: float = NoiseLevelConfig.p_std, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, range_loss: str = LossConfig.range_loss):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        check_range_loss(range_loss)
        if not (sigma_data > 0 and p_std > 0 and 0 < sigma_min < sigma_max):
            raise ValueError("sigma_data, p_std and sigma_min must be positive, and sigma_min below sigma_max")
        self.config = dict(formulation=formulation, sigma_data=sigma_data, p_mean=p_mean, p_std=p_std,
                           sigma_min=sigma_min, sigma_max=sigma_max, range_loss=range_loss)
        self.formulation, self.sigma_data, self.p_mean, self.p_std = formulation, sigma_data, p_mean, p_std
        self.range_loss = range_loss
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, t_in) for noise levels `sigma` [N], the first three shaped [N, 1, 1, 1]."""
        s = sigma.float().view(-1, 1, 1, 1)
        if self.formulation == "edm":
            sd2 = self.sigma_data ** 2
            root = (s ** 2 + sd2).sqrt()
            return sd2 / (s ** 2 + sd2), s * self.sigma_data / root, 1 / root, 250 * sigma.float().log()
        t = s / (1 + s)
        return 1 - t, -t, 1 - t, 1000 * t.flatten()  # x_t = (1 - t) x; D = x_t - t F

    def sigma_at(self, t_in: torch.Tensor) -> torch.Tensor:
        """The noise level behind the network's time input (the inverse of the preconditioning's t_in)."""
        t_in = t_in.double()
        if self.formulation == "edm":
            return (t_in / 250).exp()
        return (t_in / 1000) / (1 - t_in / 1000)

    def denoise(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, model_kwargs: dict | None = None):
        """D(x, sigma): the network's estimate of x0, in x's dtype."""
        c_skip, c_out, c_in, t_in = self.preconditioning(sigma)
        out = model((c_in * x).to(x.dtype), t_in, **(model_kwargs or {}))
        return (c_skip * x + c_out * out.float()).to(x.dtype)

    def draw_noise_levels(self, n: int, device, generator=None) -> torch.Tensor:
        """ln(sigma) ~ N(p_mean, p_std^2): the training noise levels."""
        z = torch.randn(n, device=device, generator=generator)
        return (self.p_mean + self.p_std * z).exp()

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                      generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of the network's output against the output that makes D(x0 + t noise, t) = x0, at noise
        levels t (sigmas; drawn by draw_noise_levels when None) and unit Gaussian `noise`; range_loss: LossConfig."""
        if t is None:
            t = self.draw_noise_levels(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x = x0 + t.view(-1, 1, 1, 1) * noise
        c_skip, c_out, c_in, t_in = self.preconditioning(t)
        out = model(c_in * x, t_in, **(model_kwargs or {}))
        target = (x0 - c_skip * x) / c_out
        error = out.float() - target.float()
        if self.range_loss == "one_sided":
            error = drop_clamped_errors(error, x0, c_out * error)  # c_out * error = D - x0
        return error.square().flatten(1).mean(1).mean()

    def sampler_steps(self, method: str, steps: int | None = None) -> int:
        """The steps `method` takes: `steps`, or its default; ddpm always takes its DDPM_LEVELS. ValueError if
        out of range."""
        if method not in SAMPLERS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "ddpm" and steps not in (None, DDPM_LEVELS):
            raise ValueError(f"ddpm takes all {DDPM_LEVELS} levels, not {steps}")
        steps = SAMPLERS[method].steps if steps is None else steps
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        return steps

    @torch.no_grad()
    def sample(self, model: Callable, shape: Sequence[int], method: str = "heun", steps: int | None = None,
               eta: float | None = None, model_kwargs: dict | None = None, generator=None,
               x_T: torch.Tensor | None = None, clip_denoised: bool = True, progress: bool = False,
               return_intermediates: bool = False, device=None):
        """Draw samples with `method` in METHODS over `steps` noise levels of the Karras grid; steps and
        eta default to its SAMPLERS entry.

        x_T: unit Gaussian noise (scaled to sigma_max here); generator: a seed or a torch.Generator.
        clip_denoised clamps every denoised estimate to the data range [-1, 1].
        Returns x_0, or (x_0, [(sigma, x / sqrt(1 + sigma^2)), ...]) with return_intermediates: the
        states scaled as a variance-preserving process would hold them, so they can be shown alike.
        """
        steps, eta = self.sampler_steps(method, steps), resolve_eta(method, SAMPLERS, eta)
        if method == "ddpm":
            eta = 1.0  # ancestral sampling, as the discrete process's ddpm has no eta to choose
        device = device or torch.device("cpu")
        generator = make_generator(generator, device)
        noise = x_T if x_T is not None else torch.randn(tuple(shape), device=device, generator=generator)
        x = noise * self.sigma_max
        kwargs = model_kwargs or {}

        def denoise(x, sigma: float):
            d = self.denoise(model, x, torch.full((x.shape[0],), sigma, device=x.device), kwargs)
            return d.clamp(*DATA_RANGE) if clip_denoised else d

        sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max)
        loop = STEP_FUNCTIONS[method](denoise, x, sigmas, generator, eta)
        return run_sampler(loop, steps, method, (self.sigma_max, noise), progress, return_intermediates,
                           view=lambda sigma, x: x / math.sqrt(1 + sigma ** 2))
