"""Batched image generation from a trained model: the one entry point that training (sample grids,
evaluation), inference.py and eval.py share; the Sampler that describes how; the model and sampler flags
of the last two and the loading of their model."""
import argparse
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import edm
from checkpoint import PRETRAINED, default_guidance, load_checkpoint, model_from_checkpoint, pretrained_path
from cli import UserError, add_speed_args
from conditional_ddpm import ConditionalUNet, GuidedModel
from ddpm_model import METHODS, GaussianDiffusion, make_generator
from runtime import amp_dtype, autocast, pick_device

DEFAULT_STEPS = {"ddim": 50, "dpm_solver": 20, "heun": 18, "euler": 50}  # ddpm always takes all T
ALL_METHODS = tuple(dict.fromkeys(METHODS + edm.METHODS))
MAX_CONTINUOUS_STEPS = 1000


@dataclass(frozen=True)
class Sampler:
    """One way to sample, complete: the method, its network-call steps (all T for ddpm), its noise eta
    (0: deterministic, the ODE; 1: DDPM-like, the SDE) and the classifier-free guidance scale."""
    method: str = "dpm_solver"
    steps: int = DEFAULT_STEPS["dpm_solver"]
    eta: float = 1.0
    guidance_scale: float = 0.0

    def describe(self) -> str:
        guidance = f", w={self.guidance_scale:g}" if self.guidance_scale else ""
        return f"{self.method}, {self.steps} steps, eta={self.eta:g}{guidance}"


def make_sampler(method: str, diffusion, steps: int | None = None, eta: float | None = None,
                 guidance_scale: float = 0.0) -> Sampler:
    """A checked Sampler for `diffusion` with the defaults filled in: steps from DEFAULT_STEPS, eta 0 for ddim
    (the deterministic DDIM of the paper) and 1 for dpm_solver (SDE-DPM-Solver++, the best fid_mnist per call)."""
    discrete = isinstance(diffusion, GaussianDiffusion)
    methods, timesteps = (METHODS, diffusion.timesteps) if discrete else (edm.METHODS, MAX_CONTINUOUS_STEPS)
    if method not in methods:
        raise UserError(f"--method {method} is not a sampler of this model (it takes {', '.join(methods)})")
    if method == "ddpm":
        if steps not in (None, timesteps):
            raise UserError(f"--method ddpm takes all of the model's {timesteps} steps; --steps {steps} is for "
                            "ddim and dpm_solver")
        steps = timesteps
    elif steps is None:
        steps = DEFAULT_STEPS[method]
    elif not 1 <= steps <= timesteps:
        raise UserError(f"--steps must be between 1 and {timesteps}, got {steps}")
    eta = (1.0 if method == "dpm_solver" else 0.0) if eta is None else eta
    if eta < 0:
        raise UserError(f"--eta must not be negative, got {eta}")
    if guidance_scale < 0:
        raise UserError(f"--guidance_scale must not be negative, got {guidance_scale}")
    return Sampler(method, steps, eta, guidance_scale)


def add_sampling_args(p: argparse.ArgumentParser, methods=ALL_METHODS, batch_size: int | None = None) -> None:
    """The model and sampler flags inference.py and eval.py share."""
    p.add_argument("--model_path", help="a checkpoint from train.py or train_conditional.py (or its sampling copy)")
    p.add_argument("--pretrained", choices=sorted(PRETRAINED), default=None,
                   help="a model shipped in assets/; without --model_path the unconditional one is used")
    p.add_argument("--method", choices=methods, default="dpm_solver",
                   help="ddpm: all T steps; ddim: DDIM; dpm_solver: DPM-Solver++(2M)")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=None,
                   help="network calls of ddim and dpm_solver (--ddim_steps is another name for it); "
                        "None: " + ", ".join(f"{v} for {k}" for k, v in DEFAULT_STEPS.items()))
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM and DPM-Solver++ noise: 0 deterministic (the ODE), 1 DDPM-like (the SDE); "
                        "None: 0 for ddim, 1 for dpm_solver")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance w (conditional models); default: the checkpoint's (a "
                        "sampling copy's own, else its training run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=batch_size, help="images per sampling batch" + (
        "" if batch_size else "; None: 256 on CUDA, 64 elsewhere (faster than larger batches on CPUs)"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no_ema", action="store_true", help="sample the raw weights instead of the EMA")
    add_speed_args(p, "the network call")


@dataclass
class Loaded:
    """What inference.py and eval.py sample with, every flag checked: the model, its checkpoint, where
    it came from and where outputs go by default, the device and batch size, and a Sampler per method."""
    ckpt: dict
    model: torch.nn.Module
    diffusion: GaussianDiffusion
    model_path: str
    output_root: str
    device: torch.device
    batch_size: int
    samplers: dict

    @property
    def conditional(self) -> bool:
        return is_conditional(self.model)


def load_model(args, methods, want_conditional: bool = False) -> Loaded:
    """The model of --model_path, or of --pretrained (the shipped conditional one when `want_conditional`,
    else the unconditional one), with a Sampler for each of `methods`; UserError on any bad flag."""
    if args.model_path and args.pretrained:
        raise UserError("give --model_path or --pretrained, not both")
    if args.model_path:
        path, output_root = args.model_path, os.path.dirname(os.path.abspath(args.model_path))
    else:
        kind = args.pretrained or ("conditional" if want_conditional else "unconditional")
        path, output_root = pretrained_path(kind), os.path.join("outputs", f"pretrained_{kind}")
    ckpt = load_checkpoint(path)
    model, diffusion = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    guidance = default_guidance(ckpt) if args.guidance_scale is None else args.guidance_scale
    samplers = {}
    for method in methods:  # the ddpm half of --method both / --comparison takes all T; --steps is the ddim's
        steps = args.steps if method != "ddpm" or args.method == "ddpm" else None
        samplers[method] = make_sampler(method, diffusion, steps, args.eta, guidance)
    device = pick_device(args.device)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    batch_size = args.batch_size if args.batch_size is not None else 256 if device.type == "cuda" else 64
    amp_dtype(device, args.amp)  # --amp fp16 off CUDA fails here, before any work
    return Loaded(ckpt, model, diffusion, path, output_root, device, batch_size, samplers)


def is_conditional(model: torch.nn.Module) -> bool:
    return isinstance(model, ConditionalUNet)


def default_labels(model: torch.nn.Module, n: int) -> torch.Tensor | None:
    """What a conditional model samples unless told otherwise: the digits in turn (None if unconditional)."""
    return torch.arange(n) % model.num_classes if is_conditional(model) else None


def digit_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: one row of `per_class` images per digit in a grid."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(model, diffusion, num_samples: int, sampler: Sampler = Sampler(), labels: torch.Tensor | None = None,
             batch_size: int = 256, seed=0, device="cpu", progress: bool = False, amp: str = "auto",
             compile_mode: str | None = None, channels_last: bool = False, noise: torch.Tensor | None = None,
             return_intermediates: bool = False):
    """`num_samples` images in model range [-1, 1], shape [N, 1, H, W], on the CPU.

    Conditional models sample `labels` (default_labels when None) with the sampler's guidance.
    The same seed and batch size give the same images, and every method starts from the same noise
    (or from `noise`, [N, C, H, W], when given). With return_intermediates, also returns the
    (t, x_t) trajectory of the first batch. `amp` is an --amp choice, `compile_mode` a torch.compile
    mode for the network call (reduce-overhead adds CUDA graphs on CUDA), `channels_last` its layout.
    """
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    diffusion = diffusion.to(device)
    conditional = is_conditional(model)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    if conditional:
        labels = default_labels(model, num_samples) if labels is None else labels
        model_fn = GuidedModel(net, sampler.guidance_scale, model.null_class)
    else:
        model_fn = net
    size = model.config["image_size"]
    generator = make_generator(seed, device)
    out, trajectory = [], None
    batches = range(0, num_samples, batch_size)
    with torch.inference_mode(), autocast(device, amp):
        for start in tqdm(batches, desc=f"{sampler.method} sampling", disable=not progress or len(batches) == 1):
            n = min(batch_size, num_samples - start)
            kwargs = {"y": labels[start:start + n].to(device)} if conditional else {}
            result = diffusion.sample(model_fn, (n, model.config["in_channels"], size, size), method=sampler.method,
                                      steps=None if sampler.method == "ddpm" else sampler.steps, eta=sampler.eta,
                                      model_kwargs=kwargs, generator=generator,
                                      progress=progress and len(batches) == 1, device=device,
                                      x_T=None if noise is None else noise[start:start + n].to(device),
                                      return_intermediates=return_intermediates and trajectory is None)
            if isinstance(result, tuple):
                result, trajectory = result
            out.append(result.float().cpu())
    images = torch.cat(out)
    return (images, [(t, x.float().cpu()) for t, x in trajectory]) if return_intermediates else images
