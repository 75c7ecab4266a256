"""Turn a checkpoint into images: sample grids, class grids, interpolations, a DDPM-vs-DDIM comparison
and the denoising process. Everything about the model comes from the checkpoint.

    python inference.py                                  # the shipped unconditional model (assets/)
    python inference.py --pretrained conditional         # the shipped conditional model, a row per digit
    python inference.py --model_path checkpoints/NAME/best_model.pth --method ddim --steps 50
    python inference.py --model_path checkpoints/NAME/best_model.pth --comparison --denoising_process
"""
import argparse
import dataclasses
import math
import os
import time

import numpy as np
import torch

import fileio
import utils
from checkpoint import data_of
from cli import ArgumentParser, UserError, check_output_dir, check_output_file, guarded
from data import to_uint8
from diffusion import make_generator
from sampling import add_sampling_args, generate, load_model


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Generate images from a trained diffusion checkpoint.")
    add_sampling_args(p)
    method = next(action for action in p._actions if action.dest == "method")
    method.choices, method.help = (*method.choices, "both"), method.help + "; both: ddpm and ddim, one grid each"
    p.add_argument("--num_samples", type=int, default=16,
                   help="images to generate; for conditional models, images per label (one grid row each)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional sampling: needs a conditional model (without --model_path, the shipped one)")
    p.add_argument("--class_labels", default=None,
                   help="comma-separated class indices or names, one grid row each (default: every class)")
    p.add_argument("--interpolation", action="store_true", help="spherical interpolation between noise vectors")
    p.add_argument("--comparison", action="store_true", help="DDPM vs DDIM from the same noise, with timings")
    p.add_argument("--denoising_process", action="store_true", help="x_t at about ten timesteps from T to 0")
    p.add_argument("--output_dir", default=None,
                   help="default: inference/ beside the checkpoint (outputs/pretrained_KIND/inference for --pretrained)")
    p.add_argument("--save_npz", default=None, metavar="PATH",
                   help="write images (uint8 N x H x W, or N x H x W x 3 in colour) and labels (conditional) of the "
                        "first method, for eval.py and other FID tools")
    p.add_argument("--save_individual", action="store_true", help="also one PNG per sample (a folder FID tools read)")
    return p


def slerp(a: torch.Tensor, b: torch.Tensor, frac: float) -> torch.Tensor:
    """Spherical interpolation: keeps the norm a Gaussian sample should have, unlike a straight line."""
    a_flat, b_flat = a.flatten(), b.flatten()
    omega = torch.arccos((a_flat @ b_flat / (a_flat.norm() * b_flat.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - frac) * a + frac * b
    return (torch.sin((1 - frac) * omega) * a + torch.sin(frac * omega) * b) / torch.sin(omega)


def parse_labels(args, loaded) -> torch.Tensor:
    model = loaded.model
    if (args.conditional or args.class_labels) and not loaded.conditional:
        raise UserError("--conditional and --class_labels need a conditional checkpoint (train_conditional.py); "
                        f"{loaded.model_path} is unconditional")
    if not loaded.conditional:
        return None
    if args.class_labels is None:
        return torch.arange(model.num_classes)
    names = data_of(loaded.ckpt)["classes"]
    labels = []
    for value in (v.strip() for v in args.class_labels.split(",")):
        if value in names:
            labels.append(names.index(value))
        elif value.lstrip("-").isdigit() and 0 <= int(value) < model.num_classes:
            labels.append(int(value))
        elif value:
            known = f" or a class name ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else ""
            raise UserError(f"--class_labels: {value!r} is neither a label in 0..{model.num_classes - 1}{known}")
    if not labels:
        raise UserError(f"--class_labels names no class, got {args.class_labels!r}")
    return torch.tensor(labels)


def write_interpolation(sample, ddim, out_dir: str, rows: int, channels: int, size: int, seed: int, row_labels) -> str:
    """Each row walks, in ten frames, the sphere between two noise images through the DDIM map with
    eta 0: deterministic, so the path between the two digits is smooth."""
    frames = 10
    g = make_generator(seed, "cpu")
    shape = (rows, channels, size, size)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise = torch.stack([slerp(a[r], b[r], f) for r in range(rows) for f in np.linspace(0, 1, frames)])
    y = None if row_labels is None else row_labels.repeat(rows)[:rows].repeat_interleave(frames)
    images = sample(dataclasses.replace(ddim, eta=0.0), count=rows * frames, noise=noise, y=y)
    path = os.path.join(out_dir, "interpolation.png")
    utils.save_grid(images, path, nrow=frames)
    return path


def write_comparison(sample, specs: dict, out_dir: str, nrow: int, device: str) -> list:
    """DDPM (every noise level) and DDIM from the same noise, side by side, with their wall times."""
    timings, grids = {}, []
    for method in ("ddpm", "ddim"):
        start = time.perf_counter()
        grids.append(sample(specs[method]))
        timings[method] = time.perf_counter() - start
    path, json_path = os.path.join(out_dir, "comparison.png"), os.path.join(out_dir, "comparison.json")
    utils.save_comparison(grids, [f"{specs[m].describe()} ({timings[m]:.1f} s)" for m in ("ddpm", "ddim")], path, nrow)
    fileio.write_json(json_path, dict(ddpm_steps=specs["ddpm"].steps, ddim_steps=specs["ddim"].steps,
                                      eta=specs["ddim"].eta, num_images=len(grids[0]), seconds=timings,
                                      speedup=timings["ddpm"] / timings["ddim"], device=device))
    print(f"DDPM {timings['ddpm']:.2f} s, DDIM {timings['ddim']:.2f} s ({timings['ddpm'] / timings['ddim']:.1f}x faster)")
    return [path, json_path]


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    extra = (["ddim"] if args.interpolation else []) + (["ddpm", "ddim"] if args.comparison else [])
    loaded = load_model(args, ["ddpm", "ddim"] if args.method == "both" else None, extra,
                        want_conditional=bool(args.conditional or args.class_labels))
    model, diffusion, specs = loaded.model, loaded.diffusion, loaded.specs
    methods = ["ddpm", "ddim"] if args.method == "both" else list(specs)[:1]
    row_labels = parse_labels(args, loaded)
    out_dir = args.output_dir or os.path.join(loaded.output_root, "inference")
    if args.save_npz:
        check_output_file(args.save_npz, "--save_npz")
    check_output_dir(out_dir, "--output_dir", create=True)

    if row_labels is not None:  # one row of num_samples images per label
        labels, nrow = row_labels.repeat_interleave(args.num_samples), args.num_samples
    else:
        labels, nrow = None, math.ceil(math.sqrt(args.num_samples))
    n = args.num_samples * (len(row_labels) if row_labels is not None else 1)

    def sample(spec, count=n, noise=None, y=labels, **extra):
        return generate(model, diffusion, count, spec, labels=y, batch_size=loaded.batch_size, seed=args.seed,
                        device=loaded.device, progress=True, noise=noise, amp=args.amp, compile_mode=args.compile,
                        channels_last=args.channels_last, guide_model=loaded.guide_model, **extra)

    written = []
    for i, method in enumerate(methods):
        images = sample(specs[method])
        path = os.path.join(out_dir, f"samples_{method}.png")
        utils.save_grid(images, path, nrow=nrow)
        written.append(path)
        if args.save_individual:
            folder = os.path.join(out_dir, f"individual_{method}")
            os.makedirs(folder, exist_ok=True)
            for j, image in enumerate(images):
                utils.save_grid(image[None], os.path.join(folder, f"{j:05d}.png"), nrow=1, padding=0)
            written.append(folder + os.sep)
        if args.save_npz and i == 0:
            arrays = {"images": to_uint8(images).numpy()}
            if labels is not None:
                arrays["labels"] = labels.numpy().astype(np.int64)
            fileio.save_npz(args.save_npz, **arrays)
            written.append(args.save_npz)

    if args.interpolation:
        written.append(write_interpolation(sample, specs["ddim"], out_dir, min(args.num_samples, 8),
                                           model.config.in_channels, model.config.image_size, args.seed + 1,
                                           row_labels))
    if args.comparison:
        written += write_comparison(sample, specs, out_dir, nrow, str(loaded.device))
    if args.denoising_process:
        rows = min(n, 4)
        y = None if labels is None else labels[:: max(n // rows, 1)][:rows]
        _, trajectory = sample(specs[methods[0]], count=rows, y=y, return_intermediates=True)
        written.append(os.path.join(out_dir, "denoising_process.png"))
        utils.plot_denoising_process(trajectory, written[-1], diffusion.describe_level)
    print("wrote:\n  " + "\n  ".join(written))
    return written


if __name__ == "__main__":
    main()
