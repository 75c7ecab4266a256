"""The diffusion maths: schedules against closed forms, and every sampler against closed-form oracles."""
import math

import pytest
import torch

from conditional_ddpm import GuidedModel
from ddpm_model import METHODS, GaussianDiffusion, UNet, select_timesteps
from oracles import GaussianOracle, TwoPointOracle, exact_dpm_solver_law, exact_output_law, linear_alphas_cumprod

pytestmark = pytest.mark.unit

T = 1000
M, S = 0.3, 0.5          # the data law N(M, S^2) of the Gaussian oracle
SHAPE = (2000, 1, 4, 4)  # 32,000 independent scalars per run
N = math.prod(SHAPE)


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule_matches_closed_form():
    d = GaussianDiffusion(T, "linear")
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    ac, ac_list = 1.0, []
    for b in betas:
        ac *= 1 - b
        ac_list.append(ac)
    ac = torch.tensor(ac_list, dtype=torch.float64)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    b = torch.tensor(betas, dtype=torch.float64)
    torch.testing.assert_close(d.alphas_cumprod.double(), ac, rtol=1e-5, atol=1e-7)
    # q(x_{t-1} | x_t, x_0): variance beta_t (1 - ac_{t-1}) / (1 - ac_t), Ho et al. eq. 7
    torch.testing.assert_close(d.posterior_variance.double(), b * (1 - ac_prev) / (1 - ac), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(d.posterior_mean_coef_x0.double(), ac_prev.sqrt() * b / (1 - ac), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d.posterior_mean_coef_xt.double(), (1 - b).sqrt() * (1 - ac_prev) / (1 - ac), rtol=1e-5, atol=1e-7)


def test_cosine_schedule_matches_closed_form():
    d = GaussianDiffusion(T, "cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    ok = d.betas < 0.999  # Nichol & Dhariwal clip beta at 0.999 in the last steps, where the closed form breaks
    assert ok[: T - 5].all()
    torch.testing.assert_close(d.alphas_cumprod.double()[ok], ac[ok], rtol=1e-5, atol=1e-7)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    b = 1 - ac / ac_prev
    torch.testing.assert_close(d.posterior_variance.double()[ok], (b * (1 - ac_prev) / (1 - ac))[ok], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(d.posterior_mean_coef_x0.double()[ok], (ac_prev.sqrt() * b / (1 - ac))[ok], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_shift_moves_every_step_by_the_same_amount(schedule):
    plain, shifted = GaussianDiffusion(T, schedule), GaussianDiffusion(T, schedule, logsnr_shift=2.0)
    logsnr = lambda d: torch.logit(d.alphas_cumprod.double())
    ok = plain.alphas_cumprod < 0.9999  # float32 buffers round alpha_bar near 1
    torch.testing.assert_close((logsnr(shifted) - logsnr(plain))[ok], torch.full((int(ok.sum()),), 2.0,
                                                                                 dtype=torch.float64), atol=2e-3, rtol=0)
    assert (shifted.alphas_cumprod > plain.alphas_cumprod).all()  # less noise at every step


def test_lognormal_timesteps_follow_their_sigma_law():
    d = GaussianDiffusion(T, timestep_sampling="lognormal", p_mean=0.5, p_std=0.8)
    t = d.draw_noise_levels(200_000, "cpu", torch.Generator().manual_seed(0))
    log_sigma = d.sigma_at(t).log()
    assert log_sigma.mean().item() == pytest.approx(0.5, abs=0.01) and log_sigma.std().item() == pytest.approx(0.8, abs=0.01)
    uniform = GaussianDiffusion(T).draw_noise_levels(200_000, "cpu", torch.Generator().manual_seed(0))
    assert abs(uniform.float().mean().item() - (T - 1) / 2) < 2


def test_q_sample_has_the_forward_marginal():
    d = GaussianDiffusion(T)
    x0 = torch.full((200_000,), M)
    t = torch.full((200_000,), 300)
    xt = d.q_sample(x0, t, torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    a = float(linear_alphas_cumprod()[300])
    assert abs(xt.mean() - math.sqrt(a) * M) < 5 * math.sqrt((1 - a) / 200_000)
    assert abs(xt.std() - math.sqrt(1 - a)) < 0.01


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_targets_invert(prediction):
    """predict_eps_x0 undoes target(): a perfect network recovers the true x0 and eps."""
    d = GaussianDiffusion(T, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, 1, 2, 2, generator=g), torch.randn(64, 1, 2, 2, generator=g)
    t = torch.randint(0, T, (64,), generator=g)
    eps, x0_hat = d.predict_eps_x0(d.target(x0, t, noise), d.q_sample(x0, t, noise), t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)  # x0 from eps at t~T divides by sqrt(a)~0.006
    torch.testing.assert_close(eps, noise, atol=2e-3, rtol=1e-3)


def test_timestep_spacings():
    assert select_timesteps(1000, 5, "uniform") == [999, 749, 500, 250, 0]
    assert select_timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))
    ac = GaussianDiffusion(1000).alphas_cumprod
    for T, steps in ((1000, 20), (1000, 1000), (20, 3), (20, 20), (20, 1)):
        ts = select_timesteps(T, steps, "logsnr", GaussianDiffusion(T).alphas_cumprod)
        assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] <= T - 1
    log_snr = (ac / (1 - ac)).log()
    gaps = (log_snr[select_timesteps(1000, 20, "logsnr", ac)]).diff()
    assert gaps.std() < 0.1 * gaps.abs().mean()  # evenly spaced in log-SNR
    for bad in (dict(steps=1001), dict(steps=5, spacing="leading")):
        with pytest.raises(ValueError):
            select_timesteps(1000, **bad)


# ----------------------------------------------------------------------------- oracle samplers

def assert_matches_law(x, mu, var, label):
    """Empirical mean/std within 5 standard errors of the exact law of the discretised chain."""
    sd = math.sqrt(var)
    assert abs(x.mean().item() - mu) < 5 * sd / math.sqrt(N), f"{label}: mean {x.mean():.4f} vs exact {mu:.4f}"
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * N), f"{label}: std {x.std():.4f} vs exact {sd:.4f}"


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_oracle_gaussian(prediction):
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T, prediction=prediction)
    x = d.sample(GaussianOracle([M], S, ac, prediction), SHAPE, "ddpm", generator=0, clip_denoised=False)
    mu, var = exact_output_law(ac, M, S, list(range(T - 1, -1, -1)), eta=1.0)
    # The 1000-step chain is exact only in the limit: with the posterior variance its own law has
    # the right mean and a std 0.8% low (computed exactly above), within 1% of N(M, S^2) ...
    assert abs(mu - M) < 0.01 * S and abs(math.sqrt(var) - S) < 0.01 * S
    # ... and the implementation draws from exactly that law.
    assert_matches_law(x, mu, var, f"ddpm/{prediction}")


# Exact std errors of the 50-step chains for this data law, from exact_output_law: DDIM is first order,
# and eta=1 adds the coarse-step variance error on top (uniform/logsnr spacing).
DDIM_STD_ERROR = {0.0: 0.06, 1.0: 0.12}  # measured -5.6%/-4.8% and -11.4%/-9.1%


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_oracle_gaussian(eta, prediction, spacing):
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T, prediction=prediction)
    x = d.sample(GaussianOracle([M], S, ac, prediction), SHAPE, "ddim", steps=50, eta=eta, spacing=spacing,
                 generator=0, clip_denoised=False)
    mu, var = exact_output_law(ac, M, S, select_timesteps(T, 50, spacing, d.alphas_cumprod), eta=eta)
    assert abs(mu - M) < 0.01 * S and abs(math.sqrt(var) - S) < DDIM_STD_ERROR[eta] * S
    assert_matches_law(x, mu, var, f"ddim eta={eta}/{prediction}/{spacing}")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_oracle_gaussian_20_steps(prediction):
    """Deterministic and linear in x_T for this oracle: x_T=0 gives the output mean, x_T=1 adds its std."""
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T, prediction=prediction)
    oracle = GaussianOracle([M], S, ac, prediction)
    run = lambda v: d.sample(oracle, (1, 1, 1, 1), "dpm_solver", steps=20, eta=0.0, x_T=torch.full((1, 1, 1, 1), v),
                             clip_denoised=False).item()
    b, a = run(0.0), run(1.0) - run(0.0)
    assert abs(b - M) < 0.01 * S, f"mean {b}"
    assert abs(a - S) < 0.02 * S, f"std {a}"  # +1.3% at 20 steps, against DDIM's -4.8% at 50
    x = d.sample(oracle, SHAPE, "dpm_solver", steps=20, eta=0.0, generator=0, clip_denoised=False)
    assert_matches_law(x, b, a * a, "dpm_solver")
    mu, var = exact_dpm_solver_law(ac, M, S, select_timesteps(T, 20, "logsnr", d.alphas_cumprod), eta=0.0)
    assert abs(mu - b) < 1e-4 and abs(math.sqrt(var) - a) < 1e-4  # the law's independent computation agrees


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sde_dpm_solver_oracle_gaussian(prediction):
    """eta=1 (SDE-DPM-Solver++(2M)) draws from the exact law of its chain, which converges to the data law."""
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T, prediction=prediction)
    laws = {n: exact_dpm_solver_law(ac, M, S, select_timesteps(T, n, "logsnr", d.alphas_cumprod), eta=1.0)
            for n in (20, 200)}
    for n, limit in ((20, 0.04), (200, 0.002)):  # std errors +2.9% and +0.03%
        assert abs(laws[n][0] - M) < 1e-3 * S and abs(math.sqrt(laws[n][1]) - S) < limit * S, n
    x = d.sample(GaussianOracle([M], S, ac, prediction), SHAPE, "dpm_solver", steps=20, eta=1.0, generator=0,
                 clip_denoised=False)
    assert_matches_law(x, *laws[20], f"sde dpm_solver/{prediction}")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samplers_survive_a_zero_snr_first_step(eta):
    """Short linear schedules end at alpha_bar = 0 (infinite log-SNR step): no NaN may come out."""
    d = GaussianDiffusion(20)
    assert d.alphas_cumprod[-1] == 0
    torch.manual_seed(0)
    net = UNet(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=())
    for method in METHODS:
        x = d.sample(net, (4, 1, 28, 28), method, steps=None if method == "ddpm" else 5, eta=eta, generator=0)
        assert torch.isfinite(x).all(), method


def test_two_point_mixture_concentrates_in_right_proportions():
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T)
    p = 0.7
    x = d.sample(TwoPointOracle(p, ac), (10_000, 1, 1, 1), "ddpm", generator=0, clip_denoised=False)
    assert ((x.abs() - 1).abs() < 0.05).float().mean() > 0.999
    frac = (x > 0).float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / 10_000), frac


def test_conditional_oracle_with_guidance():
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T)
    means, s = [-0.6, 0.6], 0.2
    oracle = GaussianOracle(means, s, ac)  # label 2 is the null class: the 50/50 mixture
    y = torch.arange(2).repeat_interleave(8000)
    shape = (16000, 1, 1, 1)
    plain = d.sample(GuidedModel(oracle, 0.0, null_class=2), shape, "ddpm", model_kwargs={"y": y},
                     generator=0, clip_denoised=False).flatten()
    for c, m in enumerate(means):
        mu, var = exact_output_law(ac, m, s, list(range(T - 1, -1, -1)), eta=1.0)
        xc = plain[y == c]
        assert abs(xc.mean().item() - mu) < 5 * math.sqrt(var / 8000)
        assert abs(xc.std().item() - math.sqrt(var)) < 5 * math.sqrt(var / 16000)
    guided = d.sample(GuidedModel(oracle, 2.0, null_class=2), shape, "dpm_solver", eta=0.0, model_kwargs={"y": y},
                      generator=0, clip_denoised=False).flatten()
    # Guidance pushes each class away from the unconditional law: further from 0, and tighter.
    assert guided[y == 0].mean() < -0.6 - 0.05 and guided[y == 1].mean() > 0.6 + 0.05
    assert guided[y == 1].std() < s


def test_sampler_defaults_come_from_one_table():
    """Omitted steps and eta are the SAMPLERS entry's; ddpm takes all T; steps beyond T are refused."""
    from ddpm_model import SAMPLERS
    d = GaussianDiffusion(T)
    oracle = GaussianOracle([M], S, linear_alphas_cumprod())
    for method in METHODS:
        _, trajectory = d.sample(oracle, (2, 1, 1, 1), method, generator=0, return_intermediates=True)
        assert len(trajectory) - 1 == d.sampler_steps(method) == (SAMPLERS[method].steps or T), method
    default = d.sample(oracle, (64, 1, 1, 1), "dpm_solver", steps=5, generator=3)
    assert torch.equal(default, d.sample(oracle, (64, 1, 1, 1), "dpm_solver", steps=5, eta=1.0, generator=3))
    assert not torch.equal(default, d.sample(oracle, (64, 1, 1, 1), "dpm_solver", steps=5, eta=0.0, generator=3))
    for method, steps in (("ddpm", 5), ("ddim", T + 1), ("dpm_solver", 0)):
        with pytest.raises(ValueError):
            d.sampler_steps(method, steps)


def test_same_seed_same_samples_bitwise():
    ac = linear_alphas_cumprod()
    d = GaussianDiffusion(T)
    oracle = GaussianOracle([M], S, ac)
    for method in ("ddpm", "ddim"):
        a = d.sample(oracle, (4, 1, 3, 3), method, eta=1.0, generator=123)
        b = d.sample(oracle, (4, 1, 3, 3), method, eta=1.0, generator=123)
        c = d.sample(oracle, (4, 1, 3, 3), method, eta=1.0, generator=124)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_intermediates_run_from_noise_to_the_sample():
    d = GaussianDiffusion(T)
    x, inter = d.sample(GaussianOracle([M], S, linear_alphas_cumprod()), (2, 1, 2, 2), "ddim", steps=10,
                        generator=0, return_intermediates=True)
    assert [t for t, _ in inter] == [T] + select_timesteps(T, 10)
    assert torch.equal(inter[-1][1], x)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_is_the_same_x0_loss_for_every_target(gamma):
    """Min-SNR-gamma is min(SNR, gamma) * |x0_hat - x0|^2 whatever the network predicts: the same x0
    prediction, expressed as eps, x0 or v, gives the same weighted loss, computed here from that formula."""
    from oracles import to_target
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(256, 1, 2, 2, generator=g), torch.randn(256, 1, 2, 2, generator=g)
    t = torch.randint(0, T, (256,), generator=g)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)  # an imperfect network's x0 prediction
    ac = linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    snr = (ac / (1 - ac)).flatten()
    expected = (snr.clamp(max=gamma) * (x0_hat - x0).double().square().flatten(1).mean(1)).mean()
    for prediction in ("eps", "x0", "v"):
        d = GaussianDiffusion(T, prediction=prediction)
        x_t = d.q_sample(x0, t, noise)
        out = to_target(x0_hat.double(), x_t.double(), ac, prediction).float()
        loss = d.training_loss(lambda x, tt: out, x0, t=t, noise=noise, min_snr_gamma=gamma)
        assert loss.item() == pytest.approx(expected.item(), rel=2e-3), prediction
    plain = GaussianDiffusion(T).training_loss(lambda x, tt: noise + 0.5, x0, t=t, noise=noise)
    assert plain.item() == pytest.approx(0.25)  # gamma 0: the unweighted MSE of the target


def test_one_sided_range_loss_drops_only_the_overshoot_at_the_range_ends():
    """Pixels at -1, at +1 and inside, each with an x0 prediction off by -delta or +delta: with range_loss
    one_sided the Min-SNR x0 loss counts every error but the two past the end their target sits at
    (-1 - delta, 1 + delta), whatever the network predicts."""
    from oracles import to_target
    g = torch.Generator().manual_seed(4)
    x0 = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.2, 0.2]).view(1, 1, 1, 6).repeat(256, 1, 1, 1)
    delta = torch.tensor([-0.1, 0.1, -0.1, 0.1, -0.1, 0.1]).view(1, 1, 1, 6)
    kept = torch.tensor([0.0, 1, 1, 0, 1, 1])
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, T, (256,), generator=g)
    ac = linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    snr = (ac / (1 - ac)).flatten()
    for range_loss, share in (("mse", 1.0), ("one_sided", kept.mean().item())):
        expected = (snr.clamp(max=5.0) * 0.1 ** 2 * share).mean()
        for prediction in ("eps", "x0", "v"):
            d = GaussianDiffusion(T, prediction=prediction, range_loss=range_loss)
            x_t = d.q_sample(x0, t, noise)
            out = to_target((x0 + delta).double(), x_t.double(), ac, prediction).float()
            loss = d.training_loss(lambda x, tt: out, x0, t=t, noise=noise, min_snr_gamma=5.0)
            assert loss.item() == pytest.approx(expected.item(), rel=2e-3), (range_loss, prediction)


@pytest.mark.parametrize("method", METHODS)
def test_last_step_returns_the_clean_x0_prediction(method):
    """The final step hands back the (clipped) x0 prediction, so no leftover noise reaches the image: a
    network whose x0 predictions are far outside [-1, 1] still yields images exactly in range."""
    d = GaussianDiffusion(T)
    wild = lambda x, t: -10 * x  # eps predictions that put x0 far outside the data range
    x = d.sample(wild, (64, 1, 2, 2), method, steps=None if method == "ddpm" else 10, generator=0)
    assert x.abs().max() <= 1 and (x.abs() == 1).float().mean() > 0.5
