"""Pictures: sample grids and the plots that training, inference and evaluation write.

Every writer goes through a temporary file and a rename, so an interrupted run never leaves a
half-written PNG behind.
"""
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from data import channels_first  # noqa: E402
from fileio import atomic_write  # noqa: E402


def as_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] (the exchange format), or model-range [N, C, H, W] -> float [N, C, H, W]
    in [0, 1]."""
    if images.dtype == torch.uint8:
        return channels_first(images).float() / 255
    return (images.float().clamp(-1, 1) + 1) / 2


def save_grid(images: torch.Tensor, path: str, nrow: int = 10, padding: int = 2) -> None:
    """A PNG grid, nrow images per row (grey images white-on-black, as MNIST is)."""
    grid = as_unit_range(images.detach().cpu())
    atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=nrow, padding=padding, format="png"))


def picture(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [0, 1] -> the first image as an HxW (grey) or HxWxC array, for matplotlib."""
    x = images[0]
    return (x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).numpy()


def grid_array(images: torch.Tensor, nrow: int) -> np.ndarray:
    """A grid as an HxW (grey) or HxWx3 float array, for matplotlib and TensorBoard."""
    unit = as_unit_range(images.detach().cpu())
    grid = make_grid(unit, nrow=nrow, padding=2)
    return picture(grid[None, :unit.shape[1]])


def save_comparison(grids: Sequence[torch.Tensor], titles: Sequence[str], path: str, nrow: int) -> None:
    """Several sample grids side by side, each under its title."""
    fig, axes = plt.subplots(1, len(grids), figsize=(4.5 * len(grids), 4.8), squeeze=False)
    for ax, images, title in zip(axes[0], grids, titles):
        ax.imshow(grid_array(images, nrow), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1, label="training loss")
    if len(losses) >= 10:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k})")
    ax.set(xlabel="step", ylabel="MSE loss", yscale="log", title="Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_noise_schedule(diffusion, path: str) -> None:
    """The discrete process's betas, alphas_cumprod and signal-to-noise ratio over t; for a continuous one,
    the training density of its noise levels and its preconditioning over sigma."""
    if diffusion.config.formulation != "ddpm":
        return plot_noise_levels(diffusion, path)
    t = np.arange(diffusion.levels)
    ac = diffusion.alphas_cumprod.double().cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(t, diffusion.betas.cpu().numpy())
    axes[0].set(title="beta_t", xlabel="t")
    axes[1].plot(t, ac, label="alpha_bar_t")
    axes[1].plot(t, np.sqrt(ac), label="sqrt(alpha_bar_t) (signal)")
    axes[1].plot(t, np.sqrt(1 - ac), label="sqrt(1 - alpha_bar_t) (noise)")
    axes[1].set(title="cumulative signal", xlabel="t")
    axes[1].legend(fontsize=8)
    axes[2].semilogy(t, ac / (1 - ac))
    axes[2].set(title="SNR = alpha_bar / (1 - alpha_bar)", xlabel="t")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{diffusion.config.beta_schedule} schedule, T={diffusion.levels}")
    save_figure(fig, path)


def plot_noise_levels(diffusion, path: str) -> None:
    c = diffusion.config
    sigma = np.geomspace(c.sigma_min, c.sigma_max, 400)
    log_sigma = np.log(sigma)
    density = np.exp(-0.5 * ((log_sigma - c.p_mean) / c.p_std) ** 2) / (c.p_std * np.sqrt(2 * np.pi))
    c_skip, c_out, c_in, _ = (c.flatten().numpy() for c in diffusion.preconditioning(torch.from_numpy(sigma).float()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].semilogx(sigma, density)
    axes[0].set(title=f"training noise levels: ln(sigma) ~ N({c.p_mean:g}, {c.p_std:g}^2)", xlabel="sigma")
    for values, name in ((c_skip, "c_skip"), (np.abs(c_out), "|c_out|"), (c_in, "c_in")):
        axes[1].loglog(sigma, values, label=name)
    axes[1].set(title="preconditioning", xlabel="sigma")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{c.formulation} formulation")
    save_figure(fig, path)


def plot_denoising_process(intermediates, path: str, describe_level, frames: int = 10, rows: int = 4) -> None:
    """The state at about `frames` of the (sigma, x) `intermediates`, from pure noise down to the sample, for the
    first `rows` samples; `describe_level(sigma)` titles each column (t=..., or sigma=...)."""
    picks = np.unique(np.linspace(0, len(intermediates) - 1, frames).round().astype(int))
    rows = min(rows, intermediates[0][1].shape[0])
    fig, axes = plt.subplots(rows, len(picks), figsize=(1.3 * len(picks), 1.4 * rows), squeeze=False)
    for col, i in enumerate(picks):
        sigma, x = intermediates[i]
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(picture(as_unit_range(x[row:row + 1].cpu())), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(describe_level(sigma) if sigma > 0 else "x_0", fontsize=9)
    fig.suptitle("Denoising process")
    save_figure(fig, path)


def plot_intensity_histograms(series: dict, path: str) -> None:
    """Pixel-intensity histograms (uint8 images) of several sets on one axis."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.arange(0, 257, 8)
    for name, images in series.items():
        ax.hist(images.reshape(-1).numpy(), bins=bins, density=True, histtype="step", lw=2, label=name)
    ax.set(xlabel="pixel value", ylabel="density", yscale="log", title="Pixel intensities")
    ax.legend()
    save_figure(fig, path)


def plot_class_histogram(counts: Sequence[int], path: str, title: str = "Predicted class") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = np.asarray(counts)
    ax.bar(np.arange(len(counts)), counts / max(counts.sum(), 1))
    ax.axhline(1 / len(counts), color="k", ls="--", lw=1, label="uniform")
    ax.set(xticks=np.arange(len(counts)), xlabel="digit", ylabel="fraction", title=title)
    ax.legend()
    save_figure(fig, path)


def plot_guidance_curves(curves: dict, floor_fid: float, accuracy_goal: float, n: int, path: str) -> None:
    """fid_inception and class accuracy against the guidance scale; curves: {label: [(w, fid, accuracy), ...]}."""
    fig, (fid_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in curves.items():
        w, fid, accuracy = zip(*points)
        fid_ax.plot(w, fid, "o-", label=label)
        acc_ax.plot(w, accuracy, "o-", label=label)
    fid_ax.axhline(floor_fid, color="k", ls=":", lw=1, label="real MNIST test")
    acc_ax.axhline(accuracy_goal, color="k", ls="--", lw=1, label=f"{accuracy_goal}")
    fid_ax.set(xlabel="classifier-free guidance scale w", ylabel="fid_inception (lower is better)", title=f"N = {n:,}")
    acc_ax.set(xlabel="classifier-free guidance scale w", ylabel="class accuracy", title="Samples of the asked-for class")
    for ax in (fid_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
