"""The diffusion maths: the three formulations a model can be trained in, and the samplers, each written once.

All three add Gaussian noise of a level sigma to the data, x = x0 + sigma * eps, and differ only in how the
network F sees that: its input scale, its time input and its output target. EDM (Karras et al. 2022) writes
this as a preconditioning, which turns F into a denoiser, an estimate of x0:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t_in(sigma))

- ddpm, the discrete process of the DDPM paper (Ho et al. 2020): T timesteps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
  which is c_in x at sigma_t = sqrt((1 - abar_t) / abar_t), c_in = 1 / sqrt(1 + sigma^2). The network sees x_t
  and t, and predicts eps (D = x - sigma eps), x0 or v (k-diffusion's DiscreteEpsDDPMDenoiser).
- edm: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)
  for data of scale sd, and time input 250 ln(sigma) (EDM's c_noise, in the 0..1000 range of DDPM's timesteps).
- flow: flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): the straight path
  x_t = (1 - t) x0 + t eps, which is x / (1 + sigma) at t = sigma / (1 + sigma), and the velocity eps - x0 as the
  target: D = x_t - t F.

Training draws noise levels and fits F to the output that would make D exact: the target (x0 - c_skip x) / c_out.
That is DDPM's eps, x0 or v target, EDM's weighting of the denoiser's error, and flow matching's velocity loss.

The samplers only ever ask D: each is a plain function over a decreasing grid of noise levels that ends at 0,
and a formulation only says which grid (ddpm: its own timesteps; edm and flow: EDM's rho-7 spacing).
"""
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from cli import flag

FORMULATIONS = ("ddpm", "edm", "flow")
PREDICTIONS = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "cosine")
RANGE_LOSSES = ("mse", "one_sided")
DATA_RANGE = (-1.0, 1.0)  # what the samplers clamp every denoised estimate to
CONTINUOUS_LEVELS = 1000  # edm and flow: the levels `ddpm` visits, and the most any sampler takes
RHO = 7.0  # edm's and flow's grid is uniform in sigma^(1/rho), EDM's choice: more steps at low noise
CHURN_RANGE = (0.05, 50.0)  # noise levels where heun's churn adds noise (EDM's S_tmin, S_tmax)
MIN_ALPHA_BAR = 1e-12  # a zero-SNR last timestep (the linear schedule at T=20) is held at sigma 1e6, finite


@dataclass(frozen=True)
class DiffusionConfig:
    """The formulation and its settings; each applies to the formulations its help names."""
    formulation: str = flag("ddpm", "ddpm: the discrete process of --timesteps, --beta_schedule and --prediction; "
                                    "edm, flow: continuous noise levels of --sigma_data, --p_mean and --p_std",
                            choices=FORMULATIONS)
    timesteps: int = flag(1000, "ddpm: diffusion steps T")
    beta_schedule: str = flag("linear", "ddpm: the noise schedule", choices=BETA_SCHEDULES)
    prediction: str = flag("eps", "ddpm: what the network predicts", choices=PREDICTIONS)
    min_snr_gamma: float = flag(0.0, "ddpm: Min-SNR-gamma loss weighting (Hang et al. 2023); 0 is the plain loss")
    p_mean: float = flag(-1.2, "edm, flow: training noise levels ln(sigma) ~ N(p_mean, p_std^2)")
    p_std: float = flag(1.2, "see --p_mean")
    range_loss: str = flag("mse", "one_sided leaves out the errors beyond the end of the data range a pixel's "
                                  "target sits at (the samplers clamp them away); same minimiser as the mse",
                           choices=RANGE_LOSSES)
    sigma_data: float = 0.5  # edm: the data's scale in its preconditioning
    sigma_min: float = 0.002  # the ends of edm's and flow's sampling grid (EDM's)
    sigma_max: float = 80.0

    @property
    def levels(self) -> int:
        """The noise levels `ddpm` visits, and the most steps any sampler may take: ddpm's T, else 1000."""
        return self.timesteps if self.formulation == "ddpm" else CONTINUOUS_LEVELS


def check_diffusion(c: DiffusionConfig) -> None:
    """ValueError naming the first setting out of range; builds nothing."""
    for name, allowed in (("formulation", FORMULATIONS), ("beta_schedule", BETA_SCHEDULES),
                          ("prediction", PREDICTIONS), ("range_loss", RANGE_LOSSES)):
        if getattr(c, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}")
    if c.timesteps < 1:
        raise ValueError(f"--timesteps must be at least 1, got {c.timesteps}")
    if c.formulation == "ddpm" and c.beta_schedule == "linear" and c.timesteps < 20:  # its last beta is 20 / T
        raise ValueError(f"the linear schedule needs --timesteps of at least 20 (its last beta, 20 / T, must not "
                         f"exceed 1), got {c.timesteps}; the cosine schedule takes any T")
    if c.p_std <= 0:
        raise ValueError(f"--p_std must be positive, got {c.p_std}")
    if not (c.sigma_data > 0 and 0 < c.sigma_min < c.sigma_max):
        raise ValueError("sigma_data must be positive, and sigma_min below sigma_max")
    if c.min_snr_gamma < 0:
        raise ValueError(f"--min_snr_gamma must not be negative, got {c.min_snr_gamma}")
    if c.formulation != "ddpm" and c.min_snr_gamma:
        raise ValueError("--min_snr_gamma weights the ddpm loss; edm and flow carry their own weighting")


def drop_clamped_errors(error: torch.Tensor, x0: torch.Tensor, x0_error: torch.Tensor) -> torch.Tensor:
    """`error` with zeros where the denoised estimate (off by `x0_error`) passes the end of DATA_RANGE that its
    target x0 sits at: range_loss one_sided. The samplers clamp such an error away, so it never reaches a
    sample, and the minimiser is still the posterior mean; what changes is where a finite network puts its
    error. With the mse, half of it lies above MNIST's black background and survives the clamp as faint
    speckle, which TF-Inception features weigh heavily (docs/results.md)."""
    lo, hi = DATA_RANGE
    return error.masked_fill(((x0 <= lo) & (x0_error < 0)) | ((x0 >= hi) & (x0_error > 0)), 0.0)


# ----------------------------------------------------------------------------------------------
# The formulations
# ----------------------------------------------------------------------------------------------

class Diffusion(nn.Module):
    """What a formulation gives the trainer and the samplers: its preconditioning (which makes the network a
    denoiser D(x, sigma)), its training noise levels and loss, and the noise levels to sample at.

    A module only so that `.to(device)` moves a schedule's tensors with it; it has no parameters.
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        check_diffusion(config)
        self.config = config
        self.levels = config.levels

    def preconditioning(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, t_in) at noise levels `sigma` [N]: the first three numbers or [N, 1, 1, 1]."""
        raise NotImplementedError

    def denoise(self, model: Callable, x: torch.Tensor, sigma, model_kwargs: dict | None = None) -> torch.Tensor:
        """D(x, sigma): the network's estimate of x0 from x = x0 + sigma eps, in x's dtype. `sigma` is one noise
        level for the whole batch, or one per image."""
        if not torch.is_tensor(sigma):  # a fill on x's device: no copy from the host, which would wait for it
            sigma = torch.full((x.shape[0],), sigma, device=x.device)
        c_skip, c_out, c_in, t_in = self.preconditioning(sigma)
        out = model((c_in * x).to(x.dtype), t_in, **(model_kwargs or {}))
        return (c_skip * x + c_out * out.float()).to(x.dtype)

    def draw_noise_levels(self, n: int, device, generator=None) -> torch.Tensor:
        """The training noise levels: ln(sigma) ~ N(p_mean, p_std^2), EDM's log-normal."""
        z = torch.randn(n, device=device, generator=generator)
        return (self.config.p_mean + self.config.p_std * z).exp()

    def loss_weight(self, sigma: torch.Tensor):
        """Each image's weight in the loss, beyond what the target itself gives."""
        return 1.0

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                      sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The MSE between the network's output and the output that makes D exact, (x0 - c_skip x) / c_out, at
        x = x0 + sigma noise: noise levels `sigma` (drawn by draw_noise_levels when None) and unit Gaussian
        `noise` (drawn when None)."""
        if sigma is None:
            sigma = self.draw_noise_levels(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        c_skip, c_out, c_in, t_in = self.preconditioning(sigma)
        out = model(c_in * x, t_in, **(model_kwargs or {}))
        error = out.float() - ((x0 - c_skip * x) / c_out).float()
        if self.config.range_loss == "one_sided":
            error = drop_clamped_errors(error, x0, c_out * error)  # c_out * error = D - x0
        return (error.square().flatten(1).mean(1) * self.loss_weight(sigma)).mean()

    def sampling_sigmas(self, method: str, steps: int) -> list:
        """The `steps` noise levels `method` visits, decreasing, then 0: EDM's grid from sigma_max to sigma_min."""
        c = self.config
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        hi, lo = c.sigma_max ** (1 / RHO), c.sigma_min ** (1 / RHO)
        return ((hi + ramp * (lo - hi)) ** RHO).tolist() + [0.0]

    def prior_std(self, sigma_max: float) -> float:
        """The scale of the first draw, unit noise times this: x at sigma_max is nearly all noise."""
        return sigma_max

    def describe_level(self, sigma: float) -> str:
        return f"sigma={sigma:.3g}"


def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """Linear 1e-4..0.02 (Ho et al., scaled to T) or cosine (Nichol & Dhariwal 2021), in float64."""
    if schedule == "linear":
        scale = 1000 / timesteps  # keeps the total noise of the T=1000 schedule for other T
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    s = 0.008  # cosine
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def select_timesteps(timesteps: int, steps: int, spacing: str = "uniform", alphas_cumprod=None) -> list:
    """`steps` decreasing timesteps out of 0..T-1.

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


class DDPM(Diffusion):
    """The discrete process of the DDPM paper: T timesteps of a linear or cosine beta schedule, the network predicting eps,
    x0 or v from x_t and the integer t. Its noise levels are its timesteps' sigma_t, and its samplers visit
    those (uniformly spaced for ddpm and ddim, in log-SNR for the others)."""

    def __init__(self, config: DiffusionConfig = DiffusionConfig()):
        super().__init__(config)
        betas = make_betas(config.beta_schedule, config.timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod.clamp(min=MIN_ALPHA_BAR)).sqrt()  # increasing in t
        self.sigma_table = sigmas.tolist()  # float64, for the sampling grid
        for name, value in (("betas", betas), ("alphas_cumprod", alphas_cumprod), ("sigmas", sigmas),
                            ("log_sigmas", sigmas.float().log())):
            self.register_buffer(name, value.float(), persistent=False)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep whose sigma_t is nearest (in log sigma) to each noise level: t itself at every sigma_t."""
        log_sigma = sigma.float().log()
        upper = torch.searchsorted(self.log_sigmas, log_sigma).clamp(max=self.levels - 1)  # the first at or above
        lower = (upper - 1).clamp(min=0)
        return torch.where(log_sigma - self.log_sigmas[lower] < self.log_sigmas[upper] - log_sigma, lower, upper)

    def preconditioning(self, sigma: torch.Tensor) -> tuple:
        s = sigma.float().view(-1, 1, 1, 1)
        c_in = 1 / (1 + s ** 2).sqrt()  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps = c_in x
        if self.config.prediction == "eps":
            c_skip, c_out = 1.0, -s
        elif self.config.prediction == "x0":
            c_skip, c_out = 0.0, 1.0
        else:
            c_skip, c_out = c_in ** 2, -s * c_in
        return c_skip, c_out, c_in, self.timestep(sigma)

    def draw_noise_levels(self, n: int, device, generator=None) -> torch.Tensor:
        """sigma_t at training timesteps t uniform over 0..T-1, as the paper trains."""
        return self.sigmas[torch.randint(0, self.levels, (n,), device=device, generator=generator)]

    def loss_weight(self, sigma: torch.Tensor):
        """Min-SNR-gamma (Hang et al. 2023) for min_snr_gamma > 0: the loss in x0 terms, SNR-weighted but capped
        at gamma, so that the many easy low-noise steps stop dominating the gradient. Each target's MSE is the
        x0 MSE times SNR (eps), 1 (x0) or SNR + 1 (v), which the weight divides out."""
        gamma = self.config.min_snr_gamma
        if not gamma:
            return 1.0
        snr = sigma.float() ** -2
        return {"eps": (gamma / snr).clamp(max=1), "x0": snr.clamp(max=gamma),
                "v": snr.clamp(max=gamma) / (snr + 1)}[self.config.prediction]

    def sampling_sigmas(self, method: str, steps: int) -> list:
        spacing = "uniform" if method in ("ddpm", "ddim") else "logsnr"  # the second-order steps go unstable on
        ts = select_timesteps(self.levels, steps, spacing, self.alphas_cumprod)  # uniform spacing's log-SNR gaps
        return [self.sigma_table[t] for t in ts] + [0.0]

    def prior_std(self, sigma_max: float) -> float:
        """x_T ~ N(0, I), as the paper draws it: x = x_T / sqrt(abar_T) = x_T sqrt(1 + sigma^2)."""
        return math.sqrt(1 + sigma_max ** 2)

    def describe_level(self, sigma: float) -> str:
        return f"t={self.timestep(torch.tensor([sigma])).item()}"


class EDM(Diffusion):
    """EDM's preconditioned denoiser (Karras et al. 2022) over continuous noise levels."""

    def preconditioning(self, sigma: torch.Tensor) -> tuple:
        s, sd = sigma.float().view(-1, 1, 1, 1), self.config.sigma_data
        root = (s ** 2 + sd ** 2).sqrt()
        return sd ** 2 / root ** 2, s * sd / root, 1 / root, 250 * sigma.float().log()


class FlowMatching(Diffusion):
    """Flow matching on the straight path x_t = (1 - t) x0 + t eps, the network predicting the velocity eps - x0.
    ln(sigma) = logit(t), so EDM's log-normal sigma is the logit-normal t of Esser et al. 2024."""

    def preconditioning(self, sigma: torch.Tensor) -> tuple:
        t = sigma.float().view(-1, 1, 1, 1) / (1 + sigma.float().view(-1, 1, 1, 1))
        return 1 - t, -t, 1 - t, 1000 * t.flatten()  # x_t = (1 - t) x; D = x_t - t F


def create_diffusion(config: DiffusionConfig) -> Diffusion:
    return {"ddpm": DDPM, "edm": EDM, "flow": FlowMatching}[config.formulation](config)


# ----------------------------------------------------------------------------------------------
# How to sample: the specification every script, run and checkpoint shares
# ----------------------------------------------------------------------------------------------

class SamplerDefaults(NamedTuple):
    steps: int | None  # None: all of the formulation's levels
    eta: float


# DDIM's eta 0 is the deterministic sampler of its paper; DPM-Solver++ runs as its SDE (eta 1), the best per
# network call here (docs/samplers.md). heun's steps are noise levels: 2 steps - 1 network calls.
SAMPLERS = {"ddpm": SamplerDefaults(None, 1.0), "ddim": SamplerDefaults(50, 0.0), "heun": SamplerDefaults(18, 0.0),
            "dpm_solver": SamplerDefaults(20, 1.0), "dpm_solver_3m": SamplerDefaults(20, 1.0)}
METHODS = tuple(SAMPLERS)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: the sampler, its steps and injected noise, and the guidance. A checkpoint holds the one it
    samples with by default, and each flag of inference.py and eval.py overrides its own field."""
    method: str = flag("dpm_solver", "the sampler: ddpm (ancestral over every noise level: the paper's chain), ddim, "
                                     "heun (EDM's second order), dpm_solver, dpm_solver_3m (DPM-Solver++ 2M, 3M)",
                       choices=METHODS)
    steps: int | None = flag(None, "network calls (heun: noise levels, 2 steps - 1 calls; ddpm takes every level); "
                                   "None: the method's (ddim 50, heun 18, dpm_solver 20, dpm_solver_3m 20)",
                             aliases=("--ddim_steps",))
    eta: float | None = flag(None, "injected noise: 0 deterministic (the ODE), 1 the SDE (heun: EDM's S_churn); "
                                   "None: the method's (1 for ddpm and the DPM-Solvers, 0 for ddim and heun)")
    guidance_scale: float = flag(0.0, "classifier-free guidance w, (1 + w) D(x | class) - w D(x) (Ho & Salimans "
                                      "2022); 0: none. diffusers' pipelines call 1 + w their guidance_scale")
    autoguidance_scale: float = flag(0.0, "autoguidance w, (1 + w) D - w D_guide, away from a weaker network of the "
                                          "same kind (Karras et al. 2024): the one the file holds, or --guide_model; "
                                          "0: none")
    guidance_interval: tuple[float, ...] | None = flag(None, "guide only at noise levels sigma in (LO, HI] "
                                                             "(Kynkaanniemi et al. 2024); None: at every level",
                                                       metavar="LO,HI")

    def overridden(self, **changes) -> "SamplingSpec":
        """This spec with each field of `changes` that is not None: each flag overrides its own field, and a
        method other than this one brings its own steps and eta unless those are given too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("method", self.method) != self.method:
            changes = {"steps": None, "eta": None, **changes}
        return replace(self, **changes)

    def describe(self) -> str:
        """One line: 'dpm_solver, 20 steps, eta 1, autoguidance w 1 + classifier-free w 0.2 at sigma (0.3, 5]'."""
        noise = "" if self.method == "ddpm" else f", eta {self.eta:g}"
        terms = ([f"autoguidance w {self.autoguidance_scale:g}"] if self.autoguidance_scale else []) + (
            [f"classifier-free w {self.guidance_scale:g}"] if self.guidance_scale else [])
        guidance = ", " + " + ".join(terms) if terms else ""
        if terms and self.guidance_interval:
            guidance += f" at sigma ({self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]"
        return f"{self.method}, {self.steps} steps{noise}{guidance}"


def check_sampling(spec: SamplingSpec, levels: int, conditional: bool, has_guide: bool,
                   flags: dict | None = None) -> SamplingSpec:
    """`spec` complete (the method's steps and eta where it leaves them out), or ValueError naming the flag of
    the first field that cannot be: the one check of every sampling setting. `levels` are the model's noise
    levels (DiffusionConfig.levels); `flags` maps a field to its flag where that is not --FIELD."""
    name = lambda field: (flags or {}).get(field, f"--{field}")
    if spec.method not in SAMPLERS:
        raise ValueError(f"{name('method')} must be one of {', '.join(METHODS)}, got {spec.method!r}")
    default = SAMPLERS[spec.method]
    if spec.method == "ddpm":
        if spec.steps not in (None, levels):
            raise ValueError(f"{name('steps')} {spec.steps}: ddpm takes all {levels} noise levels of the model")
        if spec.eta not in (None, 1.0):
            raise ValueError(f"{name('eta')} {spec.eta}: ddpm is ancestral sampling, eta 1")
    steps = levels if spec.method == "ddpm" else default.steps if spec.steps is None else spec.steps
    if not 1 <= steps <= levels:
        raise ValueError(f"{name('steps')} must be between 1 and the model's {levels} noise levels, got {steps}")
    eta = default.eta if spec.eta is None else spec.eta
    for field, value in (("eta", eta), ("guidance_scale", spec.guidance_scale),
                         ("autoguidance_scale", spec.autoguidance_scale)):
        if value < 0:
            raise ValueError(f"{name(field)} must not be negative, got {value}")
    if spec.guidance_scale and not conditional:
        raise ValueError(f"{name('guidance_scale')} is classifier-free guidance: it needs a conditional model")
    if spec.autoguidance_scale and not has_guide:
        raise ValueError(f"{name('autoguidance_scale')} needs a weaker network to steer away from: one the file "
                         "holds (a run's --guide_snapshot), or --guide_model")
    interval = spec.guidance_interval
    if interval is not None:
        if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
            raise ValueError(f"{name('guidance_interval')} takes two noise levels LO,HI with 0 <= LO < HI, "
                             f"got {interval}")
        interval = (float(interval[0]), float(interval[1]))
    return replace(spec, steps=steps, eta=float(eta), guidance_scale=float(spec.guidance_scale),
                   autoguidance_scale=float(spec.autoguidance_scale), guidance_interval=interval)


# ----------------------------------------------------------------------------------------------
# The samplers: generators of (sigma, x) over a decreasing grid that ends at 0, for any denoiser
# D(x, sigma). Each yields after every step; the last step returns D itself, the clean estimate.
# ----------------------------------------------------------------------------------------------

def gaussian_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


def ddim_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0):
    """DDIM (Song et al. 2021). eta 0 is Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma (flow
    matching's Euler sampler too); eta 1 keeps only part of the noise estimate and draws the rest afresh, which
    over every level of the DDPM grid is the paper's ancestral step with the posterior variance."""
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


def dpm_solver_steps(denoise: Callable, x: torch.Tensor, sigmas: Sequence[float], generator=None, eta: float = 0.0,
                     order: int = 2):
    """DPM-Solver++ (Lu et al. 2022), multistep in lambda = -ln(sigma): the exponential integrator of the denoised
    estimate's Taylor expansion, its derivatives from the last `order` estimates (the first steps use fewer).
    2M takes the first derivative by the midpoint rule; 3M adds the second. eta 1 is the SDE form, which
    re-injects noise at every step (its first-order step is DDIM at eta 1). One network call a level."""
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
            if history and order == 2:
                (d_1, h_1), = history
                x = x + 0.5 * phi_1 * (d - d_1) * (h / h_1)
            elif len(history) == 1:
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
            history = [(d, h)] + history[:order - 2]
        yield s_next, x


STEP_FUNCTIONS = {"ddpm": ddim_steps, "ddim": ddim_steps, "heun": heun_steps, "dpm_solver": dpm_solver_steps,
                  "dpm_solver_3m": functools.partial(dpm_solver_steps, order=3)}


def make_generator(seed_or_generator, device) -> torch.Generator | None:
    """A torch.Generator on `device` from a seed, or the generator itself, or None (global RNG)."""
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator(device=device).manual_seed(int(seed_or_generator))


@torch.no_grad()
def sample(denoise: Callable, diffusion: Diffusion, shape: Sequence[int], spec: SamplingSpec, generator=None,
           noise: torch.Tensor | None = None, clip: bool = True, progress: bool = False,
           return_intermediates: bool = False, device=None):
    """Draw samples with the sampler of `spec` (complete: check_sampling) over the noise levels `diffusion`
    gives it, asking `denoise(x, sigma)` for D; `clip` clamps every estimate to DATA_RANGE.

    noise: the unit Gaussian start, [N, C, H, W] (drawn from `generator`, a seed or a torch.Generator, when
    None). Returns x_0, or (x_0, [(sigma, x / sqrt(1 + sigma^2)), ...]) with return_intermediates: the start
    and the state after every step, scaled as DDPM's x_t, so that every formulation can be shown alike.
    """
    generator = make_generator(generator, device)
    noise = noise if noise is not None else torch.randn(tuple(shape), device=device, generator=generator)
    sigmas = diffusion.sampling_sigmas(spec.method, spec.steps)
    x = noise * diffusion.prior_std(sigmas[0])
    clamped = (lambda x, sigma: denoise(x, sigma).clamp(*DATA_RANGE)) if clip else denoise
    loop = STEP_FUNCTIONS[spec.method](clamped, x, sigmas, generator, spec.eta)
    trajectory = [(sigmas[0], noise)]
    for sigma, x in tqdm(loop, total=len(sigmas) - 1, desc=f"sampling ({spec.method})", leave=False,
                         disable=not progress):
        if return_intermediates:
            trajectory.append((sigma, x / math.sqrt(1 + sigma ** 2)))
    return (x, trajectory) if return_intermediates else x
