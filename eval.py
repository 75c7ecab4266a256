"""Score samples against MNIST: FID (Inception and MNIST-classifier features), IS, precision/recall,
class accuracy and pixel statistics, beside the real-data floor.

    python eval.py                                # the shipped unconditional model (assets/)
    python eval.py --pretrained conditional --num_samples 10000
    python eval.py --model_path checkpoints/NAME/best_model.pth --num_samples 1000 --batch_size 50
    python eval.py --samples samples.npz          # an npz from inference.py --save_npz, or a PNG folder
    python eval.py --real test                    # the MNIST test split: the floor every model is held to
"""
import argparse
import dataclasses
import datetime
import glob
import json
import os
import time
import zipfile

import numpy as np
import torch
from PIL import Image

import fileio
import utils
from cli import ArgumentParser, UserError, check_output_dir, guarded
from data import to_uint8
from metrics import Evaluator, check_sample_count
from runtime import pick_device
from sampling import add_sampling_args, default_labels, generate, load_model

REPORT_KEYS = ("fid_inception", "is_inception_mean", "is_inception_std", "fid_mnist", "is_mnist_mean",
               "is_mnist_std", "precision", "recall", "class_accuracy", "faint_pixels")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Evaluate a DDPM checkpoint, a set of samples, or real MNIST.")
    add_sampling_args(p, batch_size=50)
    p.add_argument("--num_samples", type=int, default=1000, help="samples to generate (or real images to take)")
    p.add_argument("--samples", default=None, metavar="PATH", help="evaluate an npz (images, labels) or a PNG folder")
    p.add_argument("--real", choices=["test"], default=None, help="evaluate the real MNIST test split: the floor")
    p.add_argument("--save_dir", default=None,
                   help="default: eval/ beside the checkpoint (outputs/pretrained_KIND/eval for --pretrained, ./eval for "
                        "--samples and --real)")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--no_inception", action="store_true", help="skip the (slow on CPU) Inception FID")
    p.add_argument("--inception_logits", default=None, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05 weights (with the classifier head): adds the "
                        "Inception Score, is_inception")
    p.add_argument("--no_floor", action="store_true", help="skip the real-data floor in the report")
    return p


def to_uint8_images(array, source: str) -> torch.Tensor:
    """uint8 [N, 28, 28] from uint8, [0, 1] or [-1, 1] floats, N x 28 x 28 or N x 1 x 28 x 28."""
    x = torch.as_tensor(np.asarray(array))
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
        raise UserError(f"{source}: expected images of shape N x 28 x 28 or N x 1 x 28 x 28, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise UserError(f"{source}: images must be uint8 or float, got {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo >= -1 - 1e-3 and hi <= 1 + 1e-3 and lo < 0:
        return to_uint8(x.unsqueeze(1))
    if lo >= 0 and hi <= 1 + 1e-3:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    raise UserError(f"{source}: float values in [{lo:.3g}, {hi:.3g}] are neither [0, 1] nor [-1, 1]; "
                    "save uint8 for 0..255")


def load_samples(path: str):
    """(uint8 images, labels or None) from an npz or a folder of PNGs."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.png")))
        if not files:
            raise UserError(f"{path}: no PNG files")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("L")))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise UserError(f"{f}: not a readable PNG ({e})") from None
        if len({a.shape for a in arrays}) > 1:
            raise UserError(f"{path}: the PNGs differ in size")
        images = to_uint8_images(np.stack(arrays), path)
        check_sample_count(len(images), path)
        return images, None
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder")
    try:
        with np.load(path) as f:
            if "images" not in f.files:
                raise UserError(f"{path}: the npz has no 'images' array (it has {', '.join(f.files) or 'none'})")
            images, labels = f["images"], f["labels"] if "labels" in f.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable npz ({str(e) or type(e).__name__})") from None
    images = to_uint8_images(images, path)
    check_sample_count(len(images), path)
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(images),):
            raise UserError(f"{path}: {len(labels)} labels for {len(images)} images")
        if labels.min() < 0 or labels.max() >= 10:
            raise UserError(f"{path}: labels must be MNIST digits 0-9, found {labels.min()}..{labels.max()}")
    return images, labels


def format_value(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_report(save_dir: str, result: dict, floor, settings: dict) -> None:
    m, fm = result["metrics"], (floor or {}).get("metrics", {})
    lines = ["# Evaluation report", "", f"{settings['source']}, {settings['num_images']} images, "
             f"{settings['date']}", "", "| metric | this set | real MNIST test (floor) |", "|---|---|---|"]
    for key in REPORT_KEYS:
        if key in m:
            lines.append(f"| {key} | {format_value(m[key])} | {format_value(fm.get(key)) if floor else 'not run'} |")
    d, fd = result["details"], (floor or {}).get("details", {})
    for key in ("pixel_mean", "pixel_std", "mean_pairwise_distance", "nearest_train_distance_median"):
        if key in d:
            lines.append(f"| {key} | {format_value(d[key])} | {format_value(fd.get(key)) if floor else 'not run'} |")
    if result["unavailable"]:
        lines += ["", "Unavailable:"] + [f"- {k}: {v}" for k, v in result["unavailable"].items()]
    lines += ["", "Lower is better for FID; higher for IS, precision, recall and class accuracy. "
              "A nearest-training-image distance far below the floor's means memorised digits.", ""]
    fileio.write_text(os.path.join(save_dir, "report.md"), "\n".join(lines))


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    sources = [s for s in (args.model_path or args.pretrained, args.samples, args.real) if s]
    if len(sources) > 1 or (args.model_path and args.pretrained):
        raise UserError("give one of --model_path, --pretrained, --samples or --real")
    from_model = not (args.samples or args.real)
    check_sample_count(args.num_samples, "--num_samples")
    settings = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), source=args.samples)
    labels, generation_seconds = None, 0.0
    if from_model:  # every input is checked before the evaluator's setup
        loaded = load_model(args)
        spec = next(iter(loaded.specs.values()))
        device = loaded.device
    else:
        device = pick_device(args.device)
        if args.samples:
            images, labels = load_samples(args.samples)
    save_dir = args.save_dir or (os.path.join(loaded.output_root, "eval") if from_model else "eval")
    check_output_dir(save_dir, "--save_dir")
    try:
        evaluator = Evaluator(args.data_dir, inception=not args.no_inception, device=device, progress=True,
                              inception_logits=args.inception_logits)
    except ValueError as e:  # an unusable --inception_logits file
        raise UserError(str(e)) from None
    sampling = None
    if from_model:
        sampling = dataclasses.asdict(spec)
        settings.update(source=loaded.model_path, sampler=spec.describe(),
                        formulation=loaded.diffusion.config.formulation, seed=args.seed,
                        batch_size=loaded.batch_size, step=loaded.ckpt["step"], amp=args.amp)
        if loaded.guide_model is not None:
            settings["guide_model"] = args.guide_model or f"the guide held by {loaded.model_path}"
        start = time.perf_counter()
        labels = default_labels(loaded.model, args.num_samples)
        stats = {}
        x = generate(loaded.model, loaded.diffusion, args.num_samples, spec, labels=labels,
                     batch_size=loaded.batch_size, seed=args.seed, device=device, progress=True, amp=args.amp,
                     compile_mode=args.compile, channels_last=args.channels_last, stats=stats,
                     guide_model=loaded.guide_model)
        settings["network_calls"] = stats["network_calls"]
        images = to_uint8(x)
        generation_seconds = time.perf_counter() - start
    elif args.real:
        images = evaluator.test_images[:args.num_samples]
        settings["source"] = "MNIST test split"
    settings["num_images"] = len(images)

    result = evaluator.evaluate(images, labels)
    result["seconds"]["generation"] = generation_seconds
    floor = None if args.no_floor or args.real == "test" else evaluator.floor(len(images), inception=not args.no_inception)

    metrics = {k: result["metrics"][k] for k in REPORT_KEYS if k in result["metrics"]}  # the rest: "unavailable"
    report = dict(metrics, unavailable=result["unavailable"], sampling=sampling, settings=settings,
                  seconds=result["seconds"], details=result["details"], floor=floor["metrics"] if floor else None)
    fileio.write_json(os.path.join(save_dir, "metrics.json"), report)
    write_report(save_dir, result, floor, settings)
    utils.save_grid(images[:100], os.path.join(save_dir, "samples.png"), nrow=10)
    utils.plot_intensity_histograms({"samples": images, "MNIST test": evaluator.test_images},
                                    os.path.join(save_dir, "intensity_histogram.png"))
    utils.plot_class_histogram(result["details"]["class_histogram"], os.path.join(save_dir, "class_histogram.png"),
                               title="Class predicted by the MNIST classifier")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {save_dir}/metrics.json, report.md and plots")
    return report


if __name__ == "__main__":
    main()
