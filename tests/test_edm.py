"""The continuous-noise formulations of edm.py: the preconditioning against the papers' definitions, and
every sampler against the exact law of its chain under a closed-form denoiser."""
import math

import pytest
import torch

from conditional_ddpm import GuidedModel
from edm import METHODS, KarrasDiffusion, karras_sigmas
from oracles import SigmaGaussianOracle, exact_dpm_solver_law, exact_heun_law, exact_output_law

M, S = 0.3, 0.5          # the data law N(M, S^2)
SHAPE = (2000, 1, 4, 4)  # 32,000 independent scalars per run
pytestmark = pytest.mark.unit
N = math.prod(SHAPE)


def assert_matches_law(x, mu, var, label):
    """Empirical mean/std within 5 standard errors of the exact law of the discretised chain."""
    sd = math.sqrt(var)
    assert abs(x.mean().item() - mu) < 5 * sd / math.sqrt(N), f"{label}: mean {x.mean():.4f} vs exact {mu:.4f}"
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * N), f"{label}: std {x.std():.4f} vs exact {sd:.4f}"


def test_karras_grid():
    sigmas = karras_sigmas(18, 0.002, 80.0)
    assert len(sigmas) == 19 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    roots = torch.tensor(sigmas[:-1]) ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(17), atol=1e-9)  # even in sigma^(1/rho)
    assert karras_sigmas(1, 0.002, 80.0) == [80.0, 0.0]


def test_edm_preconditioning_gives_unit_variance_input_and_target():
    """Karras et al.'s design rule: for data of std sigma_data, the network's input and its training target
    both have unit variance at every noise level."""
    d = KarrasDiffusion("edm", sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    x0, noise = 0.5 * torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, _ = d.preconditioning(torch.tensor([sigma]))
        x = x0 + sigma * noise
        assert (c_in.flatten() * x).std().item() == pytest.approx(1.0, rel=0.01), sigma
        assert ((x0 - c_skip.flatten() * x) / c_out.flatten()).std().item() == pytest.approx(1.0, rel=0.01), sigma


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_loss_is_the_papers_weighting_of_the_denoiser_error(formulation):
    """A network whose denoiser is off by delta everywhere costs lambda(sigma) delta^2: EDM's
    (sigma^2 + sd^2) / (sigma sd)^2, and for flow matching ((1 + sigma) / sigma)^2, the unweighted velocity loss."""
    d = KarrasDiffusion(formulation)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 1, 2, 2, generator=g), torch.randn(64, 1, 2, 2, generator=g)
    sigma = d.draw_noise_levels(64, "cpu", g)
    delta = 0.1

    def off_by_delta(x_in, t_in):
        c_skip, c_out, c_in, _ = d.preconditioning(sigma)
        x = x_in / c_in
        return (x0 + delta - c_skip * x) / c_out
    loss = d.training_loss(off_by_delta, x0, t=sigma, noise=noise)
    sd = 0.5
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2 if formulation == "edm" else ((1 + sigma) / sigma) ** 2
    assert loss.item() == pytest.approx((weight * delta ** 2).mean().item(), rel=1e-4)


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_one_sided_range_loss_drops_only_the_overshoot_at_the_range_ends(formulation):
    """Pixels at -1, at +1 and inside, each with a denoiser off by +delta or -delta: one_sided costs what the
    MSE costs except where D passes the end its target sits at (-1 - delta, 1 + delta), which cost nothing."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.2, 0.2]).view(1, 1, 1, 6).expand(32, 1, 1, 6).contiguous()
    delta = torch.tensor([-0.1, 0.1, -0.1, 0.1, -0.1, 0.1]).view(1, 1, 1, 6)
    noise = torch.randn(x0.shape, generator=g)
    sigma = KarrasDiffusion(formulation).draw_noise_levels(32, "cpu", g)
    losses = {}
    for range_loss in ("mse", "one_sided"):
        d = KarrasDiffusion(formulation, range_loss=range_loss)
        c_skip, c_out, c_in, _ = d.preconditioning(sigma)
        off_by_delta = lambda x_in, t_in: (x0 + delta - c_skip * x_in / c_in) / c_out  # noqa: E731
        losses[range_loss] = d.training_loss(off_by_delta, x0, t=sigma, noise=noise).item()
    lam = (1 / c_out.flatten() ** 2).mean().item()  # the weight of the denoiser's squared error
    assert losses["mse"] == pytest.approx(lam * 0.1 ** 2, rel=1e-4)
    assert losses["one_sided"] == pytest.approx(losses["mse"] * 4 / 6, rel=1e-4)


def test_flow_target_is_the_velocity():
    d = KarrasDiffusion("flow")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0])
    seen = {}

    def record(x_in, t_in):
        seen["x_in"], seen["t_in"] = x_in, t_in
        return noise - x0  # the velocity of the straight path: a perfect network, so the loss is 0
    assert d.training_loss(record, x0, t=sigma, noise=noise).item() < 1e-10
    t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], (1 - t) * x0 + t * noise)  # the straight path x_t
    torch.testing.assert_close(seen["t_in"], 1000 * t.flatten())


@pytest.mark.parametrize("formulation", ["edm", "flow"])
@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_heun_oracle_gaussian(formulation, churn):
    d = KarrasDiffusion(formulation)
    laws = {n: exact_heun_law(M, S, karras_sigmas(n, d.sigma_min, d.sigma_max), churn=churn) for n in (18, 100)}
    for n, limit in ((18, 0.13), (100, 0.012)):  # std errors +5.5% (churn 0) and +12.5% (churn 30) at 18 levels
        assert abs(laws[n][0] - M) < 0.01 * S and abs(math.sqrt(laws[n][1]) - S) < limit * S, n
    mu, var = laws[18]
    x = d.sample(SigmaGaussianOracle(M, S, formulation), SHAPE, "heun", steps=18, eta=churn, generator=0,
                 clip_denoised=False)
    assert_matches_law(x, mu, var, f"heun {formulation} churn={churn}")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_oracle_gaussian(eta):
    """DPM-Solver++(2M) over sigmas is the update of the discrete process's DPM-Solver++ with alpha_bar =
    1 / (1 + sigma^2): the exact law of that chain, from x_T = sigma_max z."""
    d = KarrasDiffusion("edm")

    def law(n):
        sigmas = karras_sigmas(n, d.sigma_min, d.sigma_max)[:-1]
        ac = torch.tensor([1 / (1 + s ** 2) for s in sigmas], dtype=torch.float64)
        return exact_dpm_solver_law(ac, M, S, list(range(n)), eta, init_var=sigmas[0] ** 2 / (1 + sigmas[0] ** 2))
    for n, limit in ((20, 0.12), (200, 0.01)):  # std errors +4.9% (ODE) and +11.2% (SDE) at 20 levels
        assert abs(law(n)[0] - M) < 0.01 * S and abs(math.sqrt(law(n)[1]) - S) < limit * S, n
    mu, var = law(20)
    x = d.sample(SigmaGaussianOracle(M, S, "edm"), SHAPE, "dpm_solver", steps=20, eta=eta, generator=0,
                 clip_denoised=False)
    assert_matches_law(x, mu, var, f"dpm_solver eta={eta}")


def test_dpm_solver_3m_converges_faster_than_2m_and_draws_its_law():
    """Third order: at 20 and 40 levels its deterministic chain's std error is under a third of 2M's. That
    chain is linear in the start (x_start = 0: the mean; 1: adds std / sigma_max), and the samples follow it;
    the SDE form approaches the data law as levels are added."""
    d = KarrasDiffusion("edm")
    oracle = SigmaGaussianOracle(M, S, "edm")

    def law(method, steps):
        run = lambda v: d.sample(oracle, (1, 1, 1, 1), method, steps=steps, eta=0.0, x_T=torch.full((1, 1, 1, 1), v),
                                 clip_denoised=False).item()
        return run(0.0), run(1.0) - run(0.0)
    for steps in (20, 40):
        assert abs(law("dpm_solver_3m", steps)[1] - S) < abs(law("dpm_solver", steps)[1] - S) / 3, steps
    mean, std = law("dpm_solver_3m", 20)
    assert abs(mean - M) < 0.01 * S and abs(std - S) < 0.015 * S
    x = d.sample(oracle, SHAPE, "dpm_solver_3m", steps=20, eta=0.0, generator=0, clip_denoised=False)
    assert_matches_law(x, mean, std ** 2, "dpm_solver_3m ODE")
    x = d.sample(oracle, SHAPE, "dpm_solver_3m", steps=200, eta=1.0, generator=0, clip_denoised=False)
    assert abs(x.mean().item() - M) < 0.01 * S and abs(x.std().item() - S) < 0.02 * S


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_over_sigmas_is_the_discrete_ddim_with_alpha_bar_from_sigma(eta):
    """DDIM over noise levels is the discrete process's DDIM with alpha_bar = 1 / (1 + sigma^2): the exact law
    of that chain (eta 0: Euler on the ODE, first order; eta 1: ancestral), from x_start = sigma_max z."""
    d = KarrasDiffusion("flow")
    oracle = SigmaGaussianOracle(M, S, "flow")

    def law(n):
        sigmas = karras_sigmas(n, d.sigma_min, d.sigma_max)[:-1]
        ac = torch.tensor([1 / (1 + s ** 2) for s in sigmas], dtype=torch.float64)
        return exact_output_law(ac, M, S, list(range(n)), eta, init_var=sigmas[0] ** 2 / (1 + sigmas[0] ** 2))
    errors = {n: abs(math.sqrt(law(n)[1]) - S) for n in (10, 100)}
    assert errors[100] < errors[10] / 5  # first order: 10x the levels, about a tenth of the error
    mu, var = law(50)
    x = d.sample(oracle, SHAPE, "ddim", steps=50, eta=eta, generator=0, clip_denoised=False)
    assert_matches_law(x, mu, var, f"ddim eta={eta}")


def test_ddpm_over_sigmas_is_ancestral_ddim_over_1000_levels():
    d = KarrasDiffusion("edm")
    oracle = SigmaGaussianOracle(M, S, "edm")
    ddpm = d.sample(oracle, (64, 1, 1, 1), "ddpm", generator=5, clip_denoised=False)
    assert torch.equal(ddpm, d.sample(oracle, (64, 1, 1, 1), "ddim", steps=1000, eta=1.0, generator=5, clip_denoised=False))
    with pytest.raises(ValueError, match="ddpm takes all 1000 levels"):
        d.sample(oracle, (1, 1, 1, 1), "ddpm", steps=20)


def test_guidance_pushes_each_class_apart_under_edm():
    d = KarrasDiffusion("edm")
    means, s = [-0.6, 0.6], 0.2
    oracles = [SigmaGaussianOracle(m, s, "edm") for m in means]
    mixture = SigmaGaussianOracle(0.0, math.sqrt(s ** 2 + 0.36), "edm")  # a Gaussian stand-in for the mixture

    def net(x, t, y):
        outs = torch.stack([oracles[0](x, t), oracles[1](x, t), mixture(x, t)])
        return outs.gather(0, y.view(1, -1, 1, 1, 1).expand(1, *x.shape))[0]
    y = torch.arange(2).repeat_interleave(4000)
    x = d.sample(GuidedModel(net, 2.0, null_class=2), (8000, 1, 1, 1), "heun", steps=18, model_kwargs={"y": y},
                 generator=0, clip_denoised=False).flatten()
    assert x[y == 0].mean() < -0.6 - 0.05 and x[y == 1].mean() > 0.6 + 0.05


def test_autoguidance_narrows_a_gaussian_by_its_closed_form():
    """Data N(0, a^2), a weak model fitted to N(0, b^2): the guided denoiser is (1 + w) D_a - w D_b, linear
    in x, so the probability-flow ODE from sigma_max = S scales its start by exp(-int (x - D) / (x sigma)):
    std = S ((a^2 + S^2) / a^2)^(-(1 + w) / 2) ((b^2 + S^2) / b^2)^(w / 2), about a (a / b)^w."""
    d = KarrasDiffusion("flow")
    a, b, w = 0.3, 0.6, 1.0
    guided = GuidedModel(SigmaGaussianOracle(0.0, a, "flow"), w, weak_model=SigmaGaussianOracle(0.0, b, "flow"))
    x = d.sample(guided, SHAPE, "heun", steps=64, generator=0, clip_denoised=False).double()
    big = d.sigma_max
    std = big * ((a ** 2 + big ** 2) / a ** 2) ** (-(1 + w) / 2) * ((b ** 2 + big ** 2) / b ** 2) ** (w / 2)
    assert abs(std - a * (a / b) ** w) < 1e-3  # half the data's spread
    assert abs(x.std().item() / std - 1) < 0.02 and abs(x.mean().item()) < 0.01


@pytest.mark.parametrize("method", METHODS)
def test_last_step_returns_the_clipped_denoised_estimate(method):
    d = KarrasDiffusion("edm")
    wild = lambda x, t: 10 * x  # denoised estimates far outside [-1, 1]
    x = d.sample(wild, (64, 1, 2, 2), method, steps=None if method == "ddpm" else 6, eta=1.0, generator=0)
    assert x.abs().max() <= 1 and (x.abs() == 1).float().mean() > 0.5


def test_same_seed_same_samples_bitwise():
    d = KarrasDiffusion("edm")
    oracle = SigmaGaussianOracle(M, S, "edm")
    a, b, c = (d.sample(oracle, (4, 1, 3, 3), "heun", steps=6, eta=10.0, generator=g) for g in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
