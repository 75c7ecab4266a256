"""Turn a checkpoint into images: sample grids, class grids, interpolations, a DDPM-vs-DDIM comparison
and the denoising process. Everything about the model comes from the checkpoint.

    python inference.py --model_path checkpoints/NAME/best_model.pth --method ddim --ddim_steps 50
    python inference.py --model_path checkpoints/NAME/best_model.pth --comparison --denoising_process
"""
import argparse
import math
import os
import time

import numpy as np
import torch

import fileio
import utils
from data import to_uint8
from ddpm_model import METHODS, make_generator
from sampling import (
    ArgumentParser,
    UserError,
    add_sampling_args,
    check_output_dir,
    check_output_file,
    default_output_dir,
    generate,
    guarded,
    load_model,
    method_eta,
    method_steps,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Generate images from a trained DDPM checkpoint.")
    add_sampling_args(p, methods=METHODS + ("both",))
    p.add_argument("--num_samples", type=int, default=16,
                   help="images to generate; for conditional models, images per label (one grid row each)")
    p.add_argument("--conditional", action="store_true", help="class-conditional sampling (conditional checkpoints)")
    p.add_argument("--class_labels", default=None, help="comma-separated labels, one grid row each (default: every digit)")
    p.add_argument("--interpolation", action="store_true", help="spherical interpolation between noise vectors")
    p.add_argument("--comparison", action="store_true", help="DDPM vs DDIM from the same noise, with timings")
    p.add_argument("--denoising_process", action="store_true", help="x_t at about ten timesteps from T to 0")
    p.add_argument("--output_dir", default=None, help="default: inference/ beside the checkpoint")
    p.add_argument("--save_npz", default=None, metavar="PATH",
                   help="write images (uint8 N x 28 x 28) and labels (conditional) of the first method for eval.py")
    p.add_argument("--save_individual", action="store_true", help="also one PNG per sample (a folder FID tools read)")
    return p


def slerp(a: torch.Tensor, b: torch.Tensor, frac: float) -> torch.Tensor:
    """Spherical interpolation: keeps the norm a Gaussian sample should have, unlike a straight line."""
    a_flat, b_flat = a.flatten(), b.flatten()
    omega = torch.arccos((a_flat @ b_flat / (a_flat.norm() * b_flat.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - frac) * a + frac * b
    return (torch.sin((1 - frac) * omega) * a + torch.sin(frac * omega) * b) / torch.sin(omega)


def parse_labels(args, model) -> torch.Tensor:
    conditional = hasattr(model, "num_classes")
    if (args.conditional or args.class_labels) and not conditional:
        raise UserError("--conditional and --class_labels need a conditional checkpoint (train_conditional.py); "
                        f"{args.model_path} is unconditional")
    if not conditional:
        return None
    if args.class_labels is None:
        return torch.arange(model.num_classes)
    try:
        labels = torch.tensor([int(v) for v in args.class_labels.split(",") if v.strip()])
    except ValueError:
        raise UserError(f"--class_labels takes comma-separated integers, got {args.class_labels!r}") from None
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= model.num_classes:
        raise UserError(f"--class_labels must lie in 0..{model.num_classes - 1}, got {args.class_labels!r}")
    return labels


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    methods = ["ddpm", "ddim"] if args.method == "both" else [args.method]
    uses_ddim = args.interpolation or args.comparison
    ckpt, model, diffusion, device = load_model(args, methods + (["ddim"] if uses_ddim else []))
    row_labels = parse_labels(args, model)
    out_dir = args.output_dir or default_output_dir(args.model_path, "inference")
    if args.save_npz:
        check_output_file(args.save_npz, "--save_npz")
    check_output_dir(out_dir, "--output_dir", create=True)

    if row_labels is not None:  # one row of num_samples images per label
        labels, nrow = row_labels.repeat_interleave(args.num_samples), args.num_samples
    else:
        labels, nrow = None, math.ceil(math.sqrt(args.num_samples))
    n = args.num_samples * (len(row_labels) if row_labels is not None else 1)

    def sample(method, count=n, noise=None, y=labels, eta=None, **extra):
        return generate(model, diffusion, count, labels=y, guidance_scale=args.guidance_scale, method=method,
                        steps=method_steps(args, method), eta=method_eta(args, method) if eta is None else eta,
                        batch_size=args.batch_size,
                        seed=args.seed, device=device, progress=True, noise=noise, amp=args.amp,
                        compile_mode=args.compile, channels_last=args.channels_last, **extra)

    written = []
    for i, method in enumerate(methods):
        images = sample(method)
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
        rows, frames = min(args.num_samples, 8), 10
        g = make_generator(args.seed + 1, "cpu")
        shape = (rows, 1, model.config["image_size"], model.config["image_size"])
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        noise = torch.stack([slerp(a[r], b[r], f) for r in range(rows) for f in np.linspace(0, 1, frames)])
        y = None if row_labels is None else row_labels.repeat(rows)[:rows].repeat_interleave(frames)
        images = sample("ddim", count=rows * frames, noise=noise, y=y, eta=0.0)  # the deterministic DDIM map
        path = os.path.join(out_dir, "interpolation.png")
        utils.save_grid(images, path, nrow=frames)
        written.append(path)

    if args.comparison:
        timings, grids = {}, []
        for method in ("ddpm", "ddim"):
            start = time.perf_counter()
            grids.append(sample(method))
            timings[method] = time.perf_counter() - start
        path = os.path.join(out_dir, "comparison.png")
        utils.save_comparison(grids, [f"DDPM, {diffusion.timesteps} steps ({timings['ddpm']:.1f} s)",
                                      f"DDIM, {args.ddim_steps} steps, eta={method_eta(args, 'ddim')} ({timings['ddim']:.1f} s)"],
                              path, nrow)
        fileio.write_json(os.path.join(out_dir, "comparison.json"),
                         dict(ddpm_steps=diffusion.timesteps, ddim_steps=args.ddim_steps, eta=method_eta(args, "ddim"),
                              num_images=n, seconds=timings, speedup=timings["ddpm"] / timings["ddim"],
                              device=str(device)))
        print(f"DDPM {timings['ddpm']:.2f} s, DDIM {timings['ddim']:.2f} s "
              f"({timings['ddpm'] / timings['ddim']:.1f}x faster)")
        written += [path, os.path.join(out_dir, "comparison.json")]

    if args.denoising_process:
        rows = min(n, 4)
        _, trajectory = sample(methods[0], count=rows, y=None if labels is None else labels[:: max(n // rows, 1)][:rows],
                               return_intermediates=True)
        path = os.path.join(out_dir, "denoising_process.png")
        utils.plot_denoising_process(trajectory, path)
        written.append(path)

    print("wrote:\n  " + "\n  ".join(written))
    return written


if __name__ == "__main__":
    main()
