"""The diffusion maths of diffusion.py: schedules and preconditionings against the papers' closed forms, the
losses against their weightings, and every sampler, over every formulation, against the exact law of its chain
under a closed-form denoiser."""
import math

import pytest
import torch

from conditional_ddpm import GuidedDenoiser
from ddpm_model import ModelConfig, UNet
from diffusion import (
    DDPM,
    METHODS,
    SAMPLERS,
    DiffusionConfig,
    SamplingSpec,
    check_sampling,
    create_diffusion,
    ddim_steps,
    sample,
    select_timesteps,
)
from oracles import (
    GaussianOracle,
    SigmaGaussianOracle,
    TwoPointOracle,
    exact_dpm_solver_law,
    exact_heun_law,
    exact_output_law,
    linear_alphas_cumprod,
    to_target,
)

pytestmark = pytest.mark.unit

T = 1000
M, S = 0.3, 0.5          # the data law N(M, S^2) of the Gaussian oracle
SHAPE = (2000, 1, 4, 4)  # 32,000 independent scalars per run
N = math.prod(SHAPE)
FORMULATIONS = ("ddpm_eps", "ddpm_v", "edm", "flow")  # ddpm with two of its prediction targets


def diffusion_of(name: str, **settings):
    """The diffusion of a FORMULATIONS name, and the optimal network for data N(M, S^2) in its units."""
    if name.startswith("ddpm"):
        prediction = name.split("_")[1]
        return (DDPM(DiffusionConfig(prediction=prediction, **settings)),
                GaussianOracle([M], S, linear_alphas_cumprod(), prediction))
    return create_diffusion(DiffusionConfig(formulation=name, **settings)), SigmaGaussianOracle(M, S, name)


def complete(d, method, steps=None, eta=None, **guidance) -> SamplingSpec:
    return check_sampling(SamplingSpec(method, steps, eta, **guidance), d.levels, conditional=True, has_guide=True)


def draw(d, network, method, steps=None, eta=None, shape=SHAPE, generator=0, noise=None, clip=False, **kwargs):
    """Samples of `network` through the formulation `d`, unclipped: the oracles' laws are not bounded."""
    return sample(lambda x, sigma: d.denoise(network, x, sigma, kwargs), d, shape, complete(d, method, steps, eta),
                  generator, noise=noise, clip=clip)


def assert_matches_law(x, mu, var, label):
    """Empirical mean/std within 5 standard errors of the exact law of the discretised chain."""
    sd = math.sqrt(var)
    assert abs(x.mean().item() - mu) < 5 * sd / math.sqrt(N), f"{label}: mean {x.mean():.4f} vs exact {mu:.4f}"
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * N), f"{label}: std {x.std():.4f} vs exact {sd:.4f}"


def chain_law(d, method, steps, eta):
    """(mean, variance) of the chain `method` runs on d's grid, from oracles.py's independent computations,
    which work in DDPM's x_t = x / sqrt(1 + sigma^2) (alpha_bar = 1 / (1 + sigma^2) at each level)."""
    sigmas = d.sampling_sigmas(method, complete(d, method, steps, eta).steps)
    start = d.prior_std(sigmas[0])
    if method == "heun":
        return exact_heun_law(M, S, sigmas, churn=eta, init_std=start)
    alphas_cumprod = [1 / (1 + s ** 2) for s in sigmas[:-1]]
    levels, start_var = list(range(len(alphas_cumprod))), start ** 2 / (1 + sigmas[0] ** 2)
    law = exact_dpm_solver_law if method == "dpm_solver" else exact_output_law
    return law(alphas_cumprod, M, S, levels, 1.0 if method == "ddpm" else eta, init_var=start_var)


# ----------------------------------------------------------------------------- ddpm's schedule

def test_linear_schedule_matches_closed_form():
    d = DDPM()
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    ac = torch.tensor(betas, dtype=torch.float64).neg().add(1).cumprod(0)
    torch.testing.assert_close(d.alphas_cumprod.double(), ac, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-5, atol=1e-7)


def test_cosine_schedule_matches_closed_form():
    d = DDPM(DiffusionConfig(beta_schedule="cosine"))
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    ok = d.betas < 0.999  # Nichol & Dhariwal clip beta at 0.999 in the last steps, where the closed form breaks
    assert ok[: T - 5].all()
    torch.testing.assert_close(d.alphas_cumprod.double()[ok], ac[ok], rtol=1e-5, atol=1e-7)


def test_every_timestep_is_its_own_noise_level():
    """sigma_t names t: the network of a ddpm model sees the integer timestep it was trained at, and a level
    between two timesteps goes to the nearer in log sigma."""
    d = DDPM(DiffusionConfig(timesteps=50, beta_schedule="cosine"))
    assert torch.equal(d.timestep(d.sigmas), torch.arange(50))
    between = (d.sigmas[:-1].log() + 0.4 * (d.sigmas[1:].log() - d.sigmas[:-1].log())).exp()
    assert torch.equal(d.timestep(between), torch.arange(49))


def test_training_noise_levels_follow_their_law():
    """ddpm: its timesteps uniformly, as the paper trains; edm and flow: ln(sigma) ~ N(p_mean, p_std^2)."""
    uniform = DDPM().draw_noise_levels(200_000, "cpu", torch.Generator().manual_seed(0))
    assert abs(DDPM().timestep(uniform).float().mean().item() - (T - 1) / 2) < 2  # timesteps uniform over 0..T-1
    flow = create_diffusion(DiffusionConfig(formulation="flow", p_mean=0.5, p_std=0.8))
    log_sigma = flow.draw_noise_levels(200_000, "cpu", torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(0.5, abs=0.01) and log_sigma.std().item() == pytest.approx(0.8, abs=0.01)


def test_the_network_sees_the_forward_marginal():
    """At sigma_t the network's input c_in x is DDPM's x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    d, seen = DDPM(), {}

    def record(x_in, t_in):
        seen["x"], seen["t"] = x_in, t_in
        return torch.zeros_like(x_in)
    d.training_loss(record, torch.full((200_000, 1, 1, 1), M), sigma=torch.full((200_000,), d.sigma_table[300]),
                    generator=torch.Generator().manual_seed(0))
    a = float(linear_alphas_cumprod()[300])
    assert abs(seen["x"].mean() - math.sqrt(a) * M) < 5 * math.sqrt((1 - a) / 200_000)
    assert abs(seen["x"].std() - math.sqrt(1 - a)) < 0.01 and (seen["t"] == 300).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_perfect_network_denoises_exactly(prediction):
    """The network that outputs its training target (eps, x0 or v of the true x0 and noise) makes D = x0."""
    d = DDPM(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 1, 2, 2, generator=g), torch.randn(64, 1, 2, 2, generator=g)
    t = torch.randint(0, T, (64,), generator=g)
    sigma, a = d.sigmas[t], linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = to_target(x0.double(), x_t.double(), a, prediction).float()
    torch.testing.assert_close(d.denoise(lambda x_in, t_in: target, x, sigma), x0, atol=2e-3, rtol=1e-3)


def test_timestep_spacings():
    assert select_timesteps(1000, 5, "uniform") == [999, 749, 500, 250, 0]
    assert select_timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))
    ac = DDPM().alphas_cumprod
    for timesteps, steps in ((1000, 20), (1000, 1000), (20, 3), (20, 20), (20, 1)):
        ts = select_timesteps(timesteps, steps, "logsnr", DDPM(DiffusionConfig(timesteps=timesteps)).alphas_cumprod)
        assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] <= timesteps - 1
    log_snr = (ac / (1 - ac)).log()
    gaps = (log_snr[select_timesteps(1000, 20, "logsnr", ac)]).diff()
    assert gaps.std() < 0.1 * gaps.abs().mean()  # evenly spaced in log-SNR
    for bad in (dict(steps=1001), dict(steps=5, spacing="leading")):
        with pytest.raises(ValueError):
            select_timesteps(1000, **bad)


def test_each_formulation_samples_on_its_own_grid():
    """ddpm: its own timesteps' sigma_t (uniform for ddpm and ddim, in log-SNR for the others), starting from
    x_T ~ N(0, I) as the paper does; edm and flow: EDM's grid, even in sigma^(1/7), from sigma_max z."""
    d = DDPM()
    assert d.sampling_sigmas("ddim", 5) == [d.sigma_table[t] for t in (999, 749, 500, 250, 0)] + [0.0]
    assert d.sampling_sigmas("dpm_solver", 20)[:-1] == [d.sigma_table[t] for t in
                                                       select_timesteps(T, 20, "logsnr", d.alphas_cumprod)]
    assert len(d.sampling_sigmas("ddpm", T)) == T + 1 and d.prior_std(3.0) == pytest.approx(math.sqrt(10))
    edm = create_diffusion(DiffusionConfig(formulation="edm"))
    sigmas = edm.sampling_sigmas("heun", 18)
    assert len(sigmas) == 19 and sigmas[-1] == 0.0 and edm.prior_std(80.0) == 80.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    roots = torch.tensor(sigmas[:-1]) ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(17), atol=1e-9)


# ----------------------------------------------------------------------------- preconditionings and losses

def test_edm_preconditioning_gives_unit_variance_input_and_target():
    """Karras et al.'s design rule: for data of std sigma_data, the network's input and its training target
    both have unit variance at every noise level."""
    d = create_diffusion(DiffusionConfig(formulation="edm"))  # sigma_data 0.5
    g = torch.Generator().manual_seed(0)
    x0, noise = 0.5 * torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, _ = d.preconditioning(torch.tensor([sigma]))
        x = x0 + sigma * noise
        assert (c_in.flatten() * x).std().item() == pytest.approx(1.0, rel=0.01), sigma
        assert ((x0 - c_skip.flatten() * x) / c_out.flatten()).std().item() == pytest.approx(1.0, rel=0.01), sigma


@pytest.mark.parametrize("name", FORMULATIONS)
def test_the_optimal_network_is_the_closed_form_denoiser(name):
    """Each preconditioning turns the optimal network of its own units into E[x0 | x] = m + s^2 / (s^2 +
    sigma^2) (x - m), the same denoiser for all: what every sampler test below relies on."""
    d, network = diffusion_of(name)
    sigmas = torch.tensor([level for level in d.sampling_sigmas("ddim", 10)[:-1]])
    x = torch.linspace(-3, 3, 10).view(10, 1, 1, 1) * sigmas.view(-1, 1, 1, 1)
    expected = M + S ** 2 / (S ** 2 + sigmas.view(-1, 1, 1, 1) ** 2) * (x - M)
    torch.testing.assert_close(d.denoise(network, x, sigmas), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["edm", "flow"])
def test_loss_is_the_papers_weighting_of_the_denoiser_error(name):
    """A network whose denoiser is off by delta everywhere costs lambda(sigma) delta^2: EDM's
    (sigma^2 + sd^2) / (sigma sd)^2, and for flow matching ((1 + sigma) / sigma)^2, the unweighted velocity loss."""
    d = create_diffusion(DiffusionConfig(formulation=name))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 1, 2, 2, generator=g), torch.randn(64, 1, 2, 2, generator=g)
    sigma = d.draw_noise_levels(64, "cpu", g)
    delta = 0.1

    def off_by_delta(x_in, t_in):
        c_skip, c_out, c_in, _ = d.preconditioning(sigma)
        return (x0 + delta - c_skip * x_in / c_in) / c_out
    loss = d.training_loss(off_by_delta, x0, sigma=sigma, noise=noise)
    sd = 0.5
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2 if name == "edm" else ((1 + sigma) / sigma) ** 2
    assert loss.item() == pytest.approx((weight * delta ** 2).mean().item(), rel=1e-4)


def test_flow_target_is_the_velocity():
    d = create_diffusion(DiffusionConfig(formulation="flow"))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0])
    seen = {}

    def record(x_in, t_in):
        seen["x_in"], seen["t_in"] = x_in, t_in
        return noise - x0  # the velocity of the straight path: a perfect network, so the loss is 0
    assert d.training_loss(record, x0, sigma=sigma, noise=noise).item() < 1e-10
    t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], (1 - t) * x0 + t * noise)  # the straight path x_t
    torch.testing.assert_close(seen["t_in"], 1000 * t.flatten())


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_is_the_same_x0_loss_for_every_target(gamma):
    """Min-SNR-gamma is min(SNR, gamma) * |x0_hat - x0|^2 whatever the network predicts: the same x0
    prediction, expressed as eps, x0 or v, gives the same weighted loss, computed here from that formula."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(256, 1, 2, 2, generator=g), torch.randn(256, 1, 2, 2, generator=g)
    t = torch.randint(0, T, (256,), generator=g)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)  # an imperfect network's x0 prediction
    ac = linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    snr = (ac / (1 - ac)).flatten()
    expected = (snr.clamp(max=gamma) * (x0_hat - x0).double().square().flatten(1).mean(1)).mean()
    for prediction in ("eps", "x0", "v"):
        d = DDPM(DiffusionConfig(prediction=prediction, min_snr_gamma=gamma))
        out = to_target(x0_hat.double(), x_t.double(), ac, prediction).float()
        loss = d.training_loss(lambda x, tt: out, x0, sigma=d.sigmas[t], noise=noise)
        assert loss.item() == pytest.approx(expected.item(), rel=2e-3), prediction
    plain = DDPM().training_loss(lambda x, tt: noise + 0.5, x0, sigma=DDPM().sigmas[t], noise=noise)
    assert plain.item() == pytest.approx(0.25, rel=1e-5)  # gamma 0: the unweighted MSE of the target


@pytest.mark.parametrize("name", ["ddpm_eps", "ddpm_x0", "ddpm_v", "edm", "flow"])
def test_one_sided_range_loss_drops_only_the_overshoot_at_the_range_ends(name):
    """Pixels at -1, at +1 and inside, each with a denoiser off by +delta or -delta: one_sided costs what the
    MSE costs except where D passes the end its target sits at (-1 - delta, 1 + delta), which cost nothing."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.2, 0.2]).view(1, 1, 1, 6).expand(32, 1, 1, 6).contiguous()
    delta = torch.tensor([-0.1, 0.1, -0.1, 0.1, -0.1, 0.1]).view(1, 1, 1, 6)
    noise, losses = torch.randn(x0.shape, generator=g), {}
    for range_loss in ("mse", "one_sided"):
        formulation, _, prediction = name.partition("_")
        d = create_diffusion(DiffusionConfig(formulation=formulation, prediction=prediction or "eps",
                                             range_loss=range_loss))
        sigma = d.draw_noise_levels(32, "cpu", torch.Generator().manual_seed(3))
        c_skip, c_out, c_in, _ = d.preconditioning(sigma)
        off_by_delta = lambda x_in, t_in: (x0 + delta - c_skip * x_in / c_in) / c_out  # noqa: E731
        losses[range_loss] = d.training_loss(off_by_delta, x0, sigma=sigma, noise=noise).item()
    lam = (1 / torch.as_tensor(c_out).flatten() ** 2).mean().item()  # the weight of the denoiser's squared error
    assert losses["mse"] == pytest.approx(lam * 0.1 ** 2, rel=1e-3)
    assert losses["one_sided"] == pytest.approx(losses["mse"] * 4 / 6, rel=1e-3)


# ----------------------------------------------------------------------------- the samplers, over every formulation

LAWS = [("ddpm", None, None), ("ddim", 50, 0.0), ("ddim", 50, 1.0), ("heun", 18, 0.0), ("heun", 18, 30.0),
        ("dpm_solver", 20, 0.0), ("dpm_solver", 20, 1.0)]


@pytest.mark.parametrize("method,steps,eta", LAWS)
@pytest.mark.parametrize("name", FORMULATIONS)
def test_every_sampler_draws_the_exact_law_of_its_chain(name, method, steps, eta):
    """Under the optimal network for N(M, S^2) every step is affine in x plus fresh noise, so the chain's output
    law is Gaussian and known exactly (oracles.py): the samples follow it, and it is close to the data law."""
    d, network = diffusion_of(name)
    mu, var = chain_law(d, method, steps, eta)
    assert abs(mu - M) < 0.02 * S and abs(math.sqrt(var) - S) < 0.15 * S  # within 15%: first order at 50 steps
    assert_matches_law(draw(d, network, method, steps, eta), mu, var, f"{name} {method} {steps} {eta}")


def test_the_ddpm_chain_is_the_papers():
    """ddpm on a ddpm model: one step from x_t with a denoiser that knows x0 is q(x_{t-1} | x_t, x0) (Ho et al.
    eq. 7): mean coef_x0 x0 + coef_xt x_t, variance beta_t (1 - abar_{t-1}) / (1 - abar_t). Its 1000 steps draw
    within 1% of the data law, and DDIM at eta 1 over every level is the same chain, draw for draw."""
    d, x0 = DDPM(), 0.4
    ac = linear_alphas_cumprod()
    for t in (999, 500, 10):
        a, a_prev, beta = float(ac[t]), float(ac[t - 1]), 1 - float(ac[t] / ac[t - 1])
        x_t = torch.full((200_000,), 0.7)
        sigmas = [d.sigma_table[t], d.sigma_table[t - 1]]
        (_, x), = ddim_steps(lambda x, s: torch.full_like(x, x0), x_t / math.sqrt(a), sigmas,
                             torch.Generator().manual_seed(t), eta=1.0)
        x_prev = x * math.sqrt(a_prev)  # back to DDPM's units
        mean = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * 0.7
        assert x_prev.mean().item() == pytest.approx(mean, abs=5e-3), t
        assert x_prev.var().item() == pytest.approx(beta * (1 - a_prev) / (1 - a), rel=0.01), t
    mu, var = chain_law(d, "ddpm", None, None)
    assert abs(mu - M) < 0.01 * S and abs(math.sqrt(var) - S) < 0.01 * S
    network = GaussianOracle([M], S, ac)
    ddpm = draw(d, network, "ddpm", shape=(64, 1, 1, 1), generator=5)
    assert torch.equal(ddpm, draw(d, network, "ddim", T, 1.0, shape=(64, 1, 1, 1), generator=5))


@pytest.mark.parametrize("name", FORMULATIONS)
def test_first_order_chains_converge_and_third_order_faster(name):
    """More levels, less error: DDIM's ODE chain is first order (10x the levels, a fifth of the error or less);
    DPM-Solver++(3M) is third order, its ODE chain (linear in the start under this oracle: x_start = 0 gives the
    mean, 1 adds std / prior) more accurate than 2M's, and its SDE approaches the data law as levels are added."""
    d, network = diffusion_of(name)
    errors = {n: abs(math.sqrt(chain_law(d, "ddim", n, 0.0)[1]) - S) for n in (10, 100)}
    assert errors[100] < errors[10] / 5

    def law(method, steps):
        run = lambda v: draw(d, network, method, steps, 0.0, shape=(1, 1, 1, 1), noise=torch.full((1, 1, 1, 1), v))
        return run(0.0).item(), (run(1.0) - run(0.0)).item()
    for steps in (20, 40):
        assert abs(law("dpm_solver_3m", steps)[1] - S) < abs(law("dpm_solver", steps)[1] - S), steps
    mean, std = law("dpm_solver_3m", 20)
    assert abs(mean - M) < 0.01 * S and abs(std - S) < 0.02 * S
    assert_matches_law(draw(d, network, "dpm_solver_3m", 20, 0.0), mean, std ** 2, f"{name} dpm_solver_3m ODE")
    x = draw(d, network, "dpm_solver_3m", 200, 1.0)
    assert abs(x.mean().item() - M) < 0.01 * S and abs(x.std().item() - S) < 0.02 * S


def test_two_point_mixture_concentrates_in_right_proportions():
    ac = linear_alphas_cumprod()
    p = 0.7
    x = draw(DDPM(), TwoPointOracle(p, ac), "ddpm", shape=(10_000, 1, 1, 1))
    assert ((x.abs() - 1).abs() < 0.05).float().mean() > 0.999
    frac = (x > 0).float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / 10_000), frac


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samplers_survive_a_zero_snr_first_step(eta):
    """Short linear schedules end at alpha_bar = 0 (infinite log-SNR): the samplers start at the finite level
    the schedule holds it at, and no NaN may come out."""
    d = DDPM(DiffusionConfig(timesteps=20))
    assert d.alphas_cumprod[-1] == 0 and d.sigma_table[-1] == pytest.approx(1e6)
    torch.manual_seed(0)
    net = UNet(ModelConfig(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=()))
    for method in METHODS:
        x = draw(d, net, method, None if method == "ddpm" else 5, None if method == "ddpm" else eta,
                 shape=(4, 1, 28, 28), clip=True)
        assert torch.isfinite(x).all(), method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FORMULATIONS)
def test_last_step_returns_the_clipped_denoised_estimate(name, method):
    """The final step hands back the clipped estimate, so no leftover noise reaches the image: a network whose
    estimates are far outside [-1, 1] still yields images exactly in range."""
    d, _ = diffusion_of(name)
    wild = lambda x, t: 1e4 * torch.where(x > 0, 1.0, -1.0)  # |c_out| > 0 at every level: D far outside the range
    x = draw(d, wild, method, None if method == "ddpm" else 6, None if method == "ddpm" else 1.0, shape=(64, 1, 2, 2),
             clip=True)
    assert x.abs().max() <= 1 and (x.abs() == 1).float().mean() > 0.5


def test_sampler_defaults_come_from_one_table():
    """Omitted steps and eta are the SAMPLERS entry's, ddpm takes every level of the model, and heun's steps are
    levels (2 steps - 1 network calls)."""
    for name, levels in (("ddpm_eps", T), ("flow", 1000)):
        d, network = diffusion_of(name)
        for method in METHODS:
            spec, calls = complete(d, method), [0]

            def counted(x, sigma):
                calls[0] += 1
                return d.denoise(network, x, sigma)
            _, trajectory = sample(counted, d, (2, 1, 1, 1), spec, 0, return_intermediates=True)
            assert spec.steps == (SAMPLERS[method].steps or levels) and spec.eta == SAMPLERS[method].eta, method
            assert len(trajectory) - 1 == spec.steps and calls[0] == (2 * spec.steps - 1 if method == "heun" else
                                                                      spec.steps), method
    d, network = diffusion_of("ddpm_eps")
    default = draw(d, network, "dpm_solver", 5, shape=(64, 1, 1, 1), generator=3, clip=True)
    assert torch.equal(default, draw(d, network, "dpm_solver", 5, 1.0, shape=(64, 1, 1, 1), generator=3, clip=True))
    assert not torch.equal(default, draw(d, network, "dpm_solver", 5, 0.0, shape=(64, 1, 1, 1), generator=3, clip=True))


def test_same_seed_same_samples_bitwise():
    d, network = diffusion_of("edm")
    for method in ("ddpm", "heun"):
        runs = [draw(d, network, method, None if method == "ddpm" else 6, None if method == "ddpm" else 10.0,
                     shape=(4, 1, 3, 3), generator=g) for g in (1, 1, 2)]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_intermediates_run_from_the_noise_to_the_sample_over_the_grid():
    d, network = diffusion_of("ddpm_eps")
    noise = torch.randn(2, 1, 2, 2)
    x, trajectory = sample(lambda x, s: d.denoise(network, x, s), d, noise.shape, complete(d, "ddim", 10), 0,
                           noise=noise, return_intermediates=True)
    assert [sigma for sigma, _ in trajectory] == d.sampling_sigmas("ddim", 10)
    assert torch.equal(trajectory[0][1], noise) and torch.equal(trajectory[-1][1], x)


# ----------------------------------------------------------------------------- guidance

def test_conditional_oracle_with_guidance():
    ac = linear_alphas_cumprod()
    d = DDPM()
    means, s = [-0.6, 0.6], 0.2
    oracle = GaussianOracle(means, s, ac)  # label 2 is the null class: the 50/50 mixture
    y = torch.arange(2).repeat_interleave(8000)
    shape = (16000, 1, 1, 1)

    def guided(method, w, **spec):
        denoiser = GuidedDenoiser(d, oracle, guidance_scale=w, null_class=2)
        return sample(lambda x, sigma: denoiser(x, sigma, y), d, shape, complete(d, method, **spec), 0,
                      clip=False).flatten()
    plain = guided("ddpm", 0.0)
    for c, m in enumerate(means):
        mu, var = exact_output_law(ac, m, s, list(range(T - 1, -1, -1)), eta=1.0)
        xc = plain[y == c]
        assert abs(xc.mean().item() - mu) < 5 * math.sqrt(var / 8000)
        assert abs(xc.std().item() - math.sqrt(var)) < 5 * math.sqrt(var / 16000)
    x = guided("dpm_solver", 2.0, eta=0.0)
    # Guidance pushes each class away from the unconditional law: further from 0, and tighter.
    assert x[y == 0].mean() < -0.6 - 0.05 and x[y == 1].mean() > 0.6 + 0.05
    assert x[y == 1].std() < s


def test_autoguidance_narrows_a_gaussian_by_its_closed_form():
    """Data N(0, a^2), a weak model fitted to N(0, b^2): the guided denoiser is (1 + w) D_a - w D_b, linear
    in x, so the probability-flow ODE from sigma_max = S scales its start by exp(-int (x - D) / (x sigma)):
    std = S ((a^2 + S^2) / a^2)^(-(1 + w) / 2) ((b^2 + S^2) / b^2)^(w / 2), about a (a / b)^w."""
    d = create_diffusion(DiffusionConfig(formulation="flow"))
    a, b, w = 0.3, 0.6, 1.0
    denoiser = GuidedDenoiser(d, SigmaGaussianOracle(0.0, a, "flow"), autoguidance_scale=w,
                              weak_model=SigmaGaussianOracle(0.0, b, "flow"))
    x = sample(denoiser, d, SHAPE, complete(d, "heun", 64), 0, clip=False).double()
    big = d.config.sigma_max
    std = big * ((a ** 2 + big ** 2) / a ** 2) ** (-(1 + w) / 2) * ((b ** 2 + big ** 2) / b ** 2) ** (w / 2)
    assert abs(std - a * (a / b) ** w) < 1e-3  # half the data's spread
    assert abs(x.std().item() / std - 1) < 0.02 and abs(x.mean().item()) < 0.01


def test_guided_denoiser_mixes_the_estimates_inside_its_interval():
    """D = D(y) + w (D(y) - D(null)) + w_auto (D(y) - D_weak(y)): the class and its null twin in one batch,
    the weak network once with the same labels, and outside (lo, hi] the plain estimate at one call."""
    d, calls = create_diffusion(DiffusionConfig(formulation="edm")), []

    def network(value):
        def f(x_in, t_in, y=None):
            calls.append((value, None if y is None else y.tolist()))
            return x_in * 0 + value + (0 if y is None else y.view(-1, 1, 1, 1).float())
        return f
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    plain = lambda net, labels, sigma: d.denoise(net, x, sigma, {"y": labels})
    strong, null, weak = (plain(network(v), labels, 3.0) for v, labels in ((1.0, y), (1.0, torch.full_like(y, 10)),
                                                                           (4.0, y)))
    calls.clear()
    both = GuidedDenoiser(d, network(1.0), 0.5, 2.0, (1.0, 5.0), network(4.0), null_class=10)
    torch.testing.assert_close(both(x, 3.0, y), strong + 0.5 * (strong - null) + 2.0 * (strong - weak))
    assert calls == [(1.0, [1, 2, 10, 10]), (4.0, [1, 2])]
    calls.clear()
    torch.testing.assert_close(both(x, 5.5, y), plain(network(1.0), y, 5.5))
    assert calls == [(1.0, [1, 2]), (1.0, [1, 2])]  # one call each: the guided one outside, and the reference
    with pytest.raises(ValueError, match="null class"):
        GuidedDenoiser(d, network(1.0), guidance_scale=1.0)
    with pytest.raises(ValueError, match="weak model"):
        GuidedDenoiser(d, network(1.0), autoguidance_scale=1.0)


# ----------------------------------------------------------------------------- the sampling specification

def test_check_sampling_completes_a_spec_or_names_its_flag():
    spec = check_sampling(SamplingSpec("heun", guidance_interval=[0.3, 5]), 1000, conditional=False, has_guide=False)
    assert (spec.steps, spec.eta, spec.guidance_interval) == (18, 0.0, (0.3, 5.0))
    assert check_sampling(SamplingSpec("ddpm"), 20, False, False).steps == 20
    for spec, conditional, has_guide, message in [
        (SamplingSpec("ddim", 0), True, True, "--steps must be between 1 and the model's 20 noise levels, got 0"),
        (SamplingSpec("ddpm", 5), True, True, "--steps 5: ddpm takes all 20 noise levels of the model"),
        (SamplingSpec("ddpm", eta=0.0), True, True, "--eta 0.0: ddpm is ancestral sampling, eta 1"),
        (SamplingSpec("ddim", 5, eta=-0.5), True, True, "--eta must not be negative, got -0.5"),
        (SamplingSpec(guidance_scale=-1), True, True, "--guidance_scale must not be negative, got -1"),
        (SamplingSpec(guidance_scale=1), False, True, "--guidance_scale is classifier-free guidance: it needs a "
                                                      "conditional model"),
        (SamplingSpec(autoguidance_scale=1), True, False, "--autoguidance_scale needs a weaker network to steer "
                                                          "away from"),
        (SamplingSpec(guidance_interval=(5, 0.3)), True, True, "--guidance_interval takes two noise levels LO,HI"),
        (SamplingSpec("euler"), True, True, "--method must be one of ddpm, ddim, heun, dpm_solver, dpm_solver_3m"),
    ]:
        with pytest.raises(ValueError) as error:
            check_sampling(spec, 20, conditional, has_guide)
        assert str(error.value).startswith(message), str(error.value)
    with pytest.raises(ValueError, match="^--sample_steps must be between"):
        check_sampling(SamplingSpec("ddim", 0), 20, True, True, flags={"steps": "--sample_steps"})


def test_each_flag_overrides_only_its_own_field():
    """A file's spec with some fields given: the guidance flags each replace their own; another method brings
    its own steps and eta unless those are given too; the same method keeps the file's."""
    file = SamplingSpec("dpm_solver", 20, 1.0, guidance_scale=0.2, autoguidance_scale=1.0, guidance_interval=(0.3, 5))
    assert file.overridden(guidance_scale=2.0) == SamplingSpec("dpm_solver", 20, 1.0, 2.0, 1.0, (0.3, 5))
    assert file.overridden(autoguidance_scale=0.0, guidance_scale=None) == SamplingSpec("dpm_solver", 20, 1.0, 0.2,
                                                                                       0.0, (0.3, 5))
    assert file.overridden(method="ddim") == SamplingSpec("ddim", None, None, 0.2, 1.0, (0.3, 5))
    assert file.overridden(method="ddim", steps=7) == SamplingSpec("ddim", 7, None, 0.2, 1.0, (0.3, 5))
    assert file.overridden(method="dpm_solver", eta=0.0) == SamplingSpec("dpm_solver", 20, 0.0, 0.2, 1.0, (0.3, 5))
