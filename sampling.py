"""Batched image generation from a trained model: the one entry point that training (sample grids,
evaluation), inference.py and eval.py share; the model and sampling flags of the last two and the loading of
their model, whose own SamplingSpec each flag overrides field by field."""
import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from checkpoint import PRETRAINED, default_spec, guide_from_checkpoint, load_checkpoint, model_from_checkpoint, pretrained_path
from cli import UserError, add_fields, add_speed_args
from conditional_ddpm import ConditionalUNet, GuidedDenoiser
from diffusion import Diffusion, SamplingSpec, check_sampling, make_generator, sample
from runtime import DEVICE_HELP, amp_dtype, autocast, pick_device


def add_sampling_args(p: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """The model and sampling flags inference.py and eval.py share."""
    p.add_argument("--model_path", help="a checkpoint from train.py or train_conditional.py (or its sampling copy)")
    p.add_argument("--pretrained", choices=sorted(PRETRAINED), default=None,
                   help="a model shipped in assets/; without --model_path the unconditional one is used")
    add_fields(p.add_argument_group("sampling (unset: the model file's own default)"), SamplingSpec, unset=True)
    p.add_argument("--guide_model", default=None, metavar="PATH",
                   help="a weaker checkpoint of the same kind (fewer steps, or a smaller network) for "
                        "--autoguidance_scale to steer away from; default: the guide the file holds, if any")
    p.add_argument("--seed", type=int, default=0, help="the random seed of the noise")
    p.add_argument("--batch_size", type=int, default=batch_size, help="images per sampling batch" + (
        "" if batch_size else "; None: 256 on CUDA, 64 elsewhere (faster than larger batches on CPUs)"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_speed_args(p, "the network call")


@dataclass
class Loaded:
    """What inference.py and eval.py sample with, every flag checked: the model, its checkpoint, where it came
    from and where outputs go by default, the device and batch size, the complete spec of each method asked
    for, and the weaker network autoguidance steers away from (None: none)."""
    ckpt: dict
    model: torch.nn.Module
    diffusion: Diffusion
    model_path: str
    output_root: str
    device: torch.device
    batch_size: int
    specs: dict  # method: SamplingSpec
    guide_model: torch.nn.Module | None = None

    @property
    def conditional(self) -> bool:
        return is_conditional(self.model)


def load_model(args, methods=None, extra=(), want_conditional: bool = False) -> Loaded:
    """The model of --model_path, or of --pretrained (the shipped conditional one when `want_conditional`,
    else the unconditional one), with the spec of each of `methods` (None: the one --method asks for, else the
    file's) and of `extra`, in that order: the file's default spec, each sampling flag overriding its own
    field; UserError on any bad flag."""
    if args.model_path and args.pretrained:
        raise UserError("give --model_path or --pretrained, not both")
    if args.model_path:
        path, output_root = args.model_path, os.path.dirname(os.path.abspath(args.model_path))
    else:
        kind = args.pretrained or ("conditional" if want_conditional else "unconditional")
        path, output_root = pretrained_path(kind), os.path.join("outputs", f"pretrained_{kind}")
    ckpt = load_checkpoint(path)
    model, diffusion = model_from_checkpoint(ckpt)
    guide_model = guide_from_checkpoint(ckpt, args.guide_model)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingSpec)}
    specs = {}
    for method in dict.fromkeys([*(methods or [flags["method"] or default_spec(ckpt).method]), *extra]):
        given = dict(flags, method=method)
        if method == "ddpm" and flags["method"] != "ddpm":  # the ddpm half of --method both or --comparison
            given.update(steps=None, eta=None)  # visits every level, ancestrally, whatever the other half takes
        try:
            specs[method] = check_sampling(default_spec(ckpt).overridden(**given), diffusion.levels,
                                           ckpt["conditional"], guide_model is not None)
        except ValueError as e:
            raise UserError(str(e)) from None
    device = pick_device(args.device)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    batch_size = args.batch_size if args.batch_size is not None else 256 if device.type == "cuda" else 64
    amp_dtype(device, args.amp)  # --amp fp16 off CUDA fails here, before any work
    return Loaded(ckpt, model, diffusion, path, output_root, device, batch_size, specs, guide_model)


def is_conditional(model: torch.nn.Module) -> bool:
    return isinstance(model, ConditionalUNet)


def default_labels(model: torch.nn.Module, n: int) -> torch.Tensor | None:
    """What a conditional model samples unless told otherwise: the digits in turn (None if unconditional)."""
    return torch.arange(n) % model.num_classes if is_conditional(model) else None


def digit_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: one row of `per_class` images per digit in a grid."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(model, diffusion, num_samples: int, spec: SamplingSpec, labels: torch.Tensor | None = None,
             batch_size: int = 256, seed=0, device="cpu", progress: bool = False, amp: str = "auto",
             compile_mode: str | None = None, channels_last: bool = False, noise: torch.Tensor | None = None,
             return_intermediates: bool = False, stats: dict | None = None, guide_model=None):
    """`num_samples` images in model range [-1, 1], shape [N, C, H, W], on the CPU, with the complete `spec`.

    Conditional models sample `labels` (default_labels when None). `guide_model` is the weaker network of
    the spec's autoguidance. The same seed and batch size give the same images, and every method starts from
    the same noise (or from `noise`, [N, C, H, W], when given). With return_intermediates, also returns the
    (sigma, x) trajectory of the first batch. `amp` is an --amp choice, `compile_mode` a torch.compile mode
    for the network call (reduce-overhead adds CUDA graphs on CUDA), `channels_last` its layout. `stats`, if
    given, receives the network calls made per image (guidance and its interval included).
    """
    device = torch.device(device)
    diffusion = diffusion.to(device)
    conditional = is_conditional(model)
    evaluated = [0]

    def counted(network):
        """The network on `device`, in its layout, compiled if asked, counting the images it is called on."""
        network = network.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        compiled = torch.compile(network.eval(), mode=compile_mode) if compile_mode else network.eval()

        def call(x, t, *args, **kwargs):
            evaluated[0] += x.shape[0]
            return compiled(x, t, *args, **kwargs)
        return call
    denoiser = GuidedDenoiser(diffusion, counted(model), spec.guidance_scale, spec.autoguidance_scale,
                              spec.guidance_interval, None if guide_model is None else counted(guide_model),
                              model.null_class if conditional else None)
    if conditional:
        labels = default_labels(model, num_samples) if labels is None else labels
    config = model.config
    generator = make_generator(seed, device)
    out, trajectory = [], None
    batches = range(0, num_samples, batch_size)
    with torch.inference_mode(), autocast(device, amp):
        for start in tqdm(batches, desc=f"{spec.method} sampling", disable=not progress or len(batches) == 1):
            n = min(batch_size, num_samples - start)
            y = labels[start:start + n].to(device) if conditional else None
            result = sample(lambda x, sigma: denoiser(x, sigma, y), diffusion,
                            (n, config.in_channels, config.image_size, config.image_size), spec, generator,
                            noise=None if noise is None else noise[start:start + n].to(device),
                            progress=progress and len(batches) == 1, device=device,
                            return_intermediates=return_intermediates and trajectory is None)
            if isinstance(result, tuple):
                result, trajectory = result
            out.append(result.float().cpu())
    images = torch.cat(out)
    if stats is not None:
        stats["network_calls"] = evaluated[0] / num_samples
    return (images, [(sigma, x.float().cpu()) for sigma, x in trajectory]) if return_intermediates else images
