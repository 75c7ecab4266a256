"""Closed-form noise predictors: the optimal network for data whose law we know.

For x0 ~ N(m, s^2) and x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alphas_cumprod[t]),
E[x0 | x_t] = m + k (x_t - sqrt(a) m) with k = sqrt(a) s^2 / (a s^2 + 1 - a). Every prediction
target follows from it. Written independently of diffusion.py, which is what the tests check.
"""
import math

import torch


def linear_alphas_cumprod(timesteps=1000):
    betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def to_target(x0_hat, x, a, prediction):
    """Express the optimal x0 prediction in the network's output parametrisation."""
    eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
    return {"eps": eps_hat, "x0": x0_hat, "v": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}[prediction]


class GaussianOracle:
    """Optimal predictor for x0 ~ N(means[y], s^2); y=None (or the null class) gives the mixture."""

    def __init__(self, means, s, alphas_cumprod, prediction="eps", weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.s, self.ac, self.prediction = s, alphas_cumprod, prediction
        n = len(self.means)
        self.weights = (torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None
                        else torch.as_tensor(weights, dtype=torch.float64))

    def posterior_mean(self, x, a, means):
        k = a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a)
        return means + k * (x - a.sqrt() * means)

    def __call__(self, x, t, y=None):
        xd = x.double()
        a = self.ac[t].view(-1, *([1] * (x.dim() - 1)))
        # mixture (unconditional, or the null class): weight each component by its likelihood of x_t
        var = a * self.s ** 2 + 1 - a
        logw = torch.stack([math.log(w) - (xd - a.sqrt() * m) ** 2 / (2 * var) for w, m in zip(self.weights, self.means)])
        resp = torch.softmax(logw, dim=0)
        x0_hat = sum(r * self.posterior_mean(xd, a, m) for r, m in zip(resp, self.means))
        if y is not None:
            known = (y < len(self.means)).view_as(a)
            cond = self.posterior_mean(xd, a, self.means[y.clamp(max=len(self.means) - 1)].view_as(a))
            x0_hat = torch.where(known, cond, x0_hat)
        return to_target(x0_hat, xd, a, self.prediction).to(x.dtype)


class TwoPointOracle:
    """Optimal predictor for x0 = +1 with probability p, else -1."""

    def __init__(self, p, alphas_cumprod, prediction="eps"):
        self.logit_p, self.ac, self.prediction = math.log(p / (1 - p)), alphas_cumprod, prediction

    def __call__(self, x, t, y=None):
        xd = x.double()
        a = self.ac[t].view(-1, *([1] * (x.dim() - 1)))
        log_odds = self.logit_p + 2 * a.sqrt() * xd / (1 - a)
        return to_target(torch.tanh(log_odds / 2), xd, a, self.prediction).to(x.dtype)


def exact_output_law(ac, mean0, s, ts, eta, init_var=1.0):
    """Exact mean and variance of a DDIM(eta) / DDPM chain's output under GaussianOracle(mean0, s).

    Every step is x_prev = A x + B + sigma z, so the law stays Gaussian: iterate its two moments.
    `ts` are the visited timesteps (all T for DDPM), the chain ends at a_prev = 1.
    With eta = 1 and every step visited this is DDPM ancestral sampling with the posterior variance.
    x_T ~ N(0, init_var).
    """
    mu, var = 0.0, init_var
    for i, t in enumerate(ts):
        a = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        k = math.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
        sigma2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        c_eps = math.sqrt(max(1 - a_prev - sigma2, 0.0))
        # x0_hat = mean0 + k (x - sqrt(a) mean0); eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a)
        A_x0, B_x0 = k, mean0 * (1 - k * math.sqrt(a))
        A = math.sqrt(a_prev) * A_x0 + c_eps * (1 - math.sqrt(a) * A_x0) / math.sqrt(1 - a)
        B = math.sqrt(a_prev) * B_x0 - c_eps * math.sqrt(a) * B_x0 / math.sqrt(1 - a)
        mu, var = A * mu + B, A * A * var + sigma2
    return mu, var


def exact_dpm_solver_law(ac, mean0, s, ts, eta, init_var=1.0):
    """Exact mean and variance of a DPM-Solver++(2M) chain's output (SDE variant for eta > 0) under
    GaussianOracle(mean0, s), from the update in Lu et al.'s notation:

        x_next = (sigma_next / sigma) e^(-eta h) x + alpha_next (1 - e^(-(1 + eta) h)) D
                 + sigma_next sqrt(1 - e^(-2 eta h)) z,    h = lambda_next - lambda, lambda = log(alpha / sigma)

    with D = x0_hat + (x0_hat - previous x0_hat) h / (2 h_previous). Every quantity is an affine
    function of x_T and the injected z's: carry (constant, coefficients) and read off the moments.
    x_T ~ N(0, init_var).
    """
    n = len(ts)
    x = (0.0, torch.zeros(n, dtype=torch.float64))
    x[1][0] = math.sqrt(init_var)  # x_T is variable 0; step i injects variable i + 1
    affine = lambda c0, a, c1, b: (c0 * a[0] + c1 * b[0], c0 * a[1] + c1 * b[1])
    prev = None
    for i, t in enumerate(ts):
        a = float(ac[t])
        k = math.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
        x0_hat = (k * x[0] + mean0 * (1 - k * math.sqrt(a)), k * x[1])
        if i + 1 == n:
            return x0_hat[0], float((x0_hat[1] ** 2).sum())
        a_next = float(ac[ts[i + 1]])
        lam, lam_next = (0.5 * math.log(v / (1 - v)) for v in (a, a_next))
        h = lam_next - lam
        d = x0_hat if prev is None else affine(1 + h / (2 * prev[1]), x0_hat, -h / (2 * prev[1]), prev[0])
        x = affine(math.sqrt((1 - a_next) / (1 - a)) * math.exp(-eta * h), x,
                   math.sqrt(a_next) * (1 - math.exp(-(1 + eta) * h)), d)
        x[1][i + 1] = math.sqrt((1 - a_next) * (1 - math.exp(-2 * eta * h)))
        prev = (x0_hat, h)


# ----------------------------------------------------------------------------- continuous noise levels

def sigma_posterior_gain(s, sigma):
    """For x0 ~ N(m, s^2) and x = x0 + sigma eps: E[x0 | x] = m + gain (x - m)."""
    return s ** 2 / (s ** 2 + sigma ** 2)


class SigmaGaussianOracle:
    """The optimal network for x0 ~ N(m, s^2) under a preconditioning of edm.py, from the papers' definitions:
    edm (Karras et al. 2022, Table 1): input x / sqrt(sigma^2 + sd^2), time 250 ln(sigma), D = c_skip x + c_out F;
    flow: input x_t = x / (1 + sigma) at t = sigma / (1 + sigma), time 1000 t, F the velocity, D = x_t - t F."""

    def __init__(self, m, s, formulation, sigma_data=0.5):
        self.m, self.s, self.formulation, self.sd = m, s, formulation, sigma_data

    def __call__(self, x_in, t_in, y=None):
        xd, t_in = x_in.double(), t_in.double().view(-1, *([1] * (x_in.dim() - 1)))
        if self.formulation == "edm":
            sigma = torch.exp(t_in / 250)
            x = xd * (sigma ** 2 + self.sd ** 2).sqrt()
            d = self.m + sigma_posterior_gain(self.s, sigma) * (x - self.m)
            c_skip, c_out = self.sd ** 2 / (sigma ** 2 + self.sd ** 2), sigma * self.sd / (sigma ** 2 + self.sd ** 2).sqrt()
            return ((d - c_skip * x) / c_out).to(x_in.dtype)
        t = t_in / 1000
        sigma = t / (1 - t)
        d = self.m + sigma_posterior_gain(self.s, sigma) * (xd / (1 - t) - self.m)
        return ((xd - d) / t).to(x_in.dtype)  # the velocity that gives D = x_t - t v


def exact_heun_law(mean0, s, sigmas, churn=0.0, churn_range=(0.05, 50.0), init_std=None):
    """Mean and variance of EDM's Algorithm 2 output under the Gaussian oracle, x_start = init_std z
    (sigma_max z by default).

    With y = x - m, D - m = gain(sigma) y, so every step is y -> A (y + sqrt(s_hat^2 - s^2) z): iterate the moments.
    """
    n = len(sigmas) - 1
    mu, var = -mean0, (sigmas[0] if init_std is None else init_std) ** 2
    for sig, nxt in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(churn / n, math.sqrt(2) - 1) if churn_range[0] <= sig <= churn_range[1] else 0.0
        hat = sig * (1 + gamma)
        var += hat ** 2 - sig ** 2
        slope1 = (1 - sigma_posterior_gain(s, hat)) / hat  # dy/dsigma per unit y
        if nxt == 0:
            a = sigma_posterior_gain(s, hat)
        else:
            euler = 1 + (nxt - hat) * slope1
            slope2 = (1 - sigma_posterior_gain(s, nxt)) / nxt * euler
            a = 1 + (nxt - hat) * (slope1 + slope2) / 2
        mu, var = a * mu, a * a * var
    return mean0 + mu, var
