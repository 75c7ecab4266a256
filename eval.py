"""Score samples against their dataset: FID in Inception features for any dataset; on MNIST also FID, IS,
precision/recall and class accuracy in the features of an MNIST classifier; pixel statistics; beside the
real-data floor (the dataset's test split).

    python eval.py                                # the shipped unconditional model (assets/)
    python eval.py --pretrained conditional --num_samples 10000
    python eval.py --model_path checkpoints/NAME/best_model.pth --num_samples 1000 --batch_size 50
    python eval.py --samples samples.npz          # an npz from inference.py --save_npz, or a PNG folder
    python eval.py --real test                    # the MNIST test split: the floor every model is held to
    python eval.py --model_path checkpoints/NAME/last.pth --dataset mnist   # score against another dataset
"""
import argparse
import dataclasses
import datetime
import json
import os
import time
import zipfile

import numpy as np
import torch

import fileio
import utils
from checkpoint import data_of
from cli import ArgumentParser, UserError, check_output_dir, guarded
from data import PADDED, channels_first, has_test_split, load_folder, load_splits, to_uint8
from metrics import TRAIN_SAMPLE, Evaluator, check_sample_count
from runtime import pick_device
from sampling import add_sampling_args, default_labels, generate, load_model

REPORT_KEYS = ("fid_inception", "is_inception_mean", "is_inception_std", "fid_mnist", "is_mnist_mean",
               "is_mnist_std", "precision", "recall", "class_accuracy", "faint_pixels")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Evaluate a checkpoint, a set of samples, or a real test split.")
    add_sampling_args(p, batch_size=50)
    p.add_argument("--num_samples", type=int, default=1000, help="samples to generate (or real images to take)")
    p.add_argument("--samples", default=None, metavar="PATH", help="evaluate an npz (images, labels) or a PNG folder")
    p.add_argument("--real", choices=["test"], default=None, help="evaluate the dataset's real test split: the floor")
    p.add_argument("--dataset", default=None, metavar="NAME|FOLDER",
                   help="what to score against (train.py --dataset); default: the checkpoint's, else mnist")
    p.add_argument("--save_dir", default=None,
                   help="default: eval/ beside the checkpoint (outputs/pretrained_KIND/eval for --pretrained, ./eval for "
                        "--samples and --real)")
    p.add_argument("--data_dir", default="./data", help="where the named datasets' files are")
    p.add_argument("--no_inception", action="store_true", help="skip the (slow on CPU) Inception FID")
    p.add_argument("--inception_logits", default=None, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05 weights (with the classifier head): adds the "
                        "Inception Score, is_inception")
    p.add_argument("--no_floor", action="store_true", help="skip the real-data floor in the report")
    return p


def to_uint8_images(array, source: str, size: int = 28, channels: int = 1) -> torch.Tensor:
    """uint8 images in the exchange format ([N, H, W], or [N, H, W, 3] in colour) from uint8, [0, 1] or [-1, 1]
    floats, channels first or last, of the `size` and `channels` of the dataset they are scored against."""
    x = torch.as_tensor(np.asarray(array))
    if x.dim() == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(0, 2, 3, 1)
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    expected = (size, size) + ((channels,) if channels > 1 else ())
    if tuple(x.shape[1:]) != expected:
        shape = " x ".join(map(str, ("N", *expected)))
        raise UserError(f"{source}: expected images of shape {shape} (or channels first), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise UserError(f"{source}: images must be uint8 or float, got {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo >= -1 - 1e-3 and hi <= 1 + 1e-3 and lo < 0:
        return to_uint8(channels_first(x))
    if lo >= 0 and hi <= 1 + 1e-3:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    raise UserError(f"{source}: float values in [{lo:.3g}, {hi:.3g}] are neither [0, 1] nor [-1, 1]; "
                    "save uint8 for 0..255")


def load_samples(path: str, size: int, channels: int, num_classes: int):
    """(uint8 images, labels or None) from an npz or a folder of images, checked against the dataset's image
    `size`, `channels` and `num_classes`."""
    if os.path.isdir(path):
        images = to_uint8_images(load_folder(path, None, "--samples").images[:], path, size, channels)
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
    images = to_uint8_images(images, path, size, channels)
    check_sample_count(len(images), path)
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(images),):
            raise UserError(f"{path}: {len(labels)} labels for {len(images)} images")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"{path}: labels must lie in 0..{num_classes - 1}, the dataset's classes, found "
                            f"{labels.min()}..{labels.max()}")
    return images, labels


def format_value(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_report(save_dir: str, result: dict, floor, settings: dict) -> None:
    m, fm = result["metrics"], (floor or {}).get("metrics", {})
    lines = ["# Evaluation report", "", f"{settings['source']}, {settings['num_images']} images, "
             f"{settings['date']}", "", f"| metric | this set | real {settings['dataset']} test (floor) |", "|---|---|---|"]
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
    labels, generation_seconds, image_size, splits = None, 0.0, None, None
    if from_model:  # every input is checked before the evaluator's setup
        loaded = load_model(args)
        spec = next(iter(loaded.specs.values()))
        device = loaded.device
        dataset, image_size = args.dataset or data_of(loaded.ckpt)["dataset"], loaded.model.config.image_size
    else:
        device, dataset = pick_device(args.device), args.dataset or "mnist"
        if args.real and not has_test_split(dataset):
            raise UserError(f"--real test: {dataset} is a folder, which has no test split")
        if args.samples:  # checked against the dataset's images, which the evaluator then scores against
            splits = load_splits(dataset, args.data_dir)
            train = splits[0]
            images, labels = load_samples(args.samples, train.image_size, train.channels, len(train.classes) or 1)
    if dataset in PADDED:
        image_size = None  # digits are scored at their own 28x28, samples of a larger model cropped to it
    settings["dataset"] = dataset
    save_dir = args.save_dir or (os.path.join(loaded.output_root, "eval") if from_model else "eval")
    check_output_dir(save_dir, "--save_dir")
    try:
        evaluator = Evaluator(args.data_dir, inception=not args.no_inception, device=device, progress=True,
                              inception_logits=args.inception_logits, dataset=dataset, image_size=image_size,
                              splits=splits)
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
        settings["source"] = f"{dataset} test split"
    settings["num_images"] = len(images)

    result = evaluator.evaluate(images, labels)
    result["seconds"]["generation"] = generation_seconds
    floor = None if args.no_floor or args.real == "test" else evaluator.floor(len(images), inception=not args.no_inception)
    if floor is None and not has_test_split(dataset):
        result["unavailable"]["floor"] = f"{dataset} is a folder, which has no test split to hold samples against"

    metrics = {k: result["metrics"][k] for k in REPORT_KEYS if k in result["metrics"]}  # the rest: "unavailable"
    report = dict(metrics, unavailable=result["unavailable"], sampling=sampling, settings=settings,
                  seconds=result["seconds"], details=result["details"], floor=floor["metrics"] if floor else None)
    fileio.write_json(os.path.join(save_dir, "metrics.json"), report)
    write_report(save_dir, result, floor, settings)
    utils.save_grid(images[:100], os.path.join(save_dir, "samples.png"), nrow=10)
    real = evaluator.test_images if evaluator.test_images is not None else evaluator.some_train_images(TRAIN_SAMPLE)
    utils.plot_intensity_histograms({"samples": images, f"{dataset} {'test' if has_test_split(dataset) else 'images'}": real},
                                    os.path.join(save_dir, "intensity_histogram.png"))
    if "class_histogram" in result["details"]:
        utils.plot_class_histogram(result["details"]["class_histogram"], os.path.join(save_dir, "class_histogram.png"),
                                   title="Class predicted by the MNIST classifier")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {save_dir}/metrics.json, report.md and plots")
    return report


if __name__ == "__main__":
    main()
