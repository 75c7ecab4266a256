"""Batched image generation from a trained model: the one entry point that training (sample grids,
evaluation), inference.py and eval.py share; the Sampler that describes how; the model and sampler flags
of the last two and the loading of their model."""
import argparse
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import edm
from checkpoint import (
    PRETRAINED,
    default_guidance,
    guide_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    pretrained_path,
)
from cli import UserError, add_speed_args, float_list
from conditional_ddpm import ConditionalUNet, GuidedModel, check_guidance_interval, check_guidance_scale
from ddpm_model import METHODS, GaussianDiffusion, make_generator, resolve_eta
from runtime import amp_dtype, autocast, pick_device

ALL_METHODS = tuple(dict.fromkeys(METHODS + edm.METHODS))


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample, complete: the method, its steps (all T for ddpm; noise levels for heun, network calls
    for the others), its injected noise eta (0: deterministic), the guidance scale and the noise levels
    (lo, hi] it guides at (None: all), and `autoguided`: whether guidance steers away from a weaker network
    (autoguidance) instead of the null class (classifier-free), and class_guidance: the scale of a
    classifier-free term beside autoguidance (conditional models)."""
    method: str
    steps: int
    eta: float
    guidance_scale: float = 0.0
    guidance_interval: tuple | None = None
    autoguided: bool = False
    class_guidance: float = 0.0

    @property
    def guided(self) -> bool:
        return bool(self.guidance_scale or self.class_guidance)

    def describe(self) -> str:
        noise = "" if self.method == "ddpm" else f", eta {self.eta:g}"
        terms = [f"{'autoguidance ' if self.autoguided else ''}w {self.guidance_scale:g}"] if self.guidance_scale else []
        if self.class_guidance:
            terms.append(f"classifier-free w {self.class_guidance:g}")
        guidance = ", " + " + ".join(terms) if terms else ""
        if self.guided and self.guidance_interval:
            guidance += f" at sigma ({self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]"
        return f"{self.method}, {self.steps} steps{noise}{guidance}"


def sampler_settings(diffusion, method: str, steps: int | None = None, eta: float | None = None,
                     guidance_scale: float = 0.0, guidance_interval=None, autoguided: bool = False,
                     class_guidance: float = 0.0) -> SamplerSettings:
    """Checked settings for `diffusion`, defaults from its SAMPLERS table; UserError naming the bad flag."""
    if method not in diffusion.SAMPLERS:
        raise UserError(f"--method {method} is not a sampler of this model; it takes {', '.join(diffusion.SAMPLERS)}")
    try:
        steps = diffusion.sampler_steps(method, steps)
    except ValueError as e:
        raise UserError(f"--steps {steps}: {e}") from None
    try:
        eta = resolve_eta(method, diffusion.SAMPLERS, eta)
        check_guidance_scale(guidance_scale)
        check_guidance_scale(class_guidance, "--class_guidance")
        guidance_interval = check_guidance_interval(guidance_interval)
    except ValueError as e:
        raise UserError(str(e)) from None
    if class_guidance and not autoguided:
        raise UserError("--class_guidance is the classifier-free term beside autoguidance: it needs a conditional "
                        "model with a guide (without one, --guidance_scale is classifier-free)")
    return SamplerSettings(method, steps, eta, guidance_scale, guidance_interval, autoguided, class_guidance)


def add_sampling_args(p: argparse.ArgumentParser, methods=ALL_METHODS, batch_size: int | None = None) -> None:
    """The model and sampler flags inference.py and eval.py share."""
    p.add_argument("--model_path", help="a checkpoint from train.py or train_conditional.py (or its sampling copy)")
    p.add_argument("--pretrained", choices=sorted(PRETRAINED), default=None,
                   help="a model shipped in assets/; without --model_path the unconditional one is used")
    p.add_argument("--method", choices=methods, default="dpm_solver",
                   help="ddpm (all T steps), ddim, dpm_solver (DPM-Solver++(2M)); for edm and flow models also heun "
                        "(EDM's) and dpm_solver_3m (DPM-Solver++(3M))")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=None,
                   help="network calls (heun: noise levels, 2 steps - 1 calls; --ddim_steps is another name); "
                        "None: the method's (" + ", ".join(f"{k} {v.steps}" for k, v in edm.SAMPLERS.items()
                                                           if v.steps) + ")")
    p.add_argument("--eta", type=float, default=None,
                   help="injected noise: 0 deterministic (the ODE), 1 the SDE (heun: EDM's S_churn); None: the "
                        "method's (1 for dpm_solver, 0 for the others)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="guidance w: classifier-free (conditional models), or away from --guide_model; default: "
                        "the checkpoint's (a sampling copy's own, else its training run's)")
    p.add_argument("--class_guidance", type=float, default=None, metavar="W",
                   help="a conditional model under autoguidance: the w of a classifier-free term beside it, in the same "
                        "interval (one more network call there); default: the checkpoint's (0)")
    p.add_argument("--guidance_interval", type=float_list, default=None, metavar="LO,HI",
                   help="guide only at noise levels sigma in (LO, HI]; default: the checkpoint's (none: all)")
    p.add_argument("--guide_model", default=None, metavar="PATH",
                   help="autoguidance (Karras et al. 2024): a weaker checkpoint of the same kind (fewer steps, or a "
                        "smaller network) that --guidance_scale steers away from, in place of the null class; "
                        "default: the guide the checkpoint holds, if any")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=batch_size, help="images per sampling batch" + (
        "" if batch_size else "; None: 256 on CUDA, 64 elsewhere (faster than larger batches on CPUs)"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no_ema", action="store_true", help="sample the raw weights instead of the EMA")
    add_speed_args(p, "the network call")


@dataclass
class Loaded:
    """What inference.py and eval.py sample with, every flag checked: the model, its checkpoint, where
    it came from and where outputs go by default, the device and batch size, the settings of each method, and
    the weaker network autoguidance steers away from (None: none)."""
    ckpt: dict
    model: torch.nn.Module
    diffusion: GaussianDiffusion
    model_path: str
    output_root: str
    device: torch.device
    batch_size: int
    samplers: dict  # method: SamplerSettings
    guide_model: torch.nn.Module | None = None

    @property
    def conditional(self) -> bool:
        return is_conditional(self.model)

    @property
    def formulation(self) -> str:
        return self.diffusion.config.get("formulation", "ddpm")


def load_model(args, methods, want_conditional: bool = False) -> Loaded:
    """The model of --model_path, or of --pretrained (the shipped conditional one when `want_conditional`,
    else the unconditional one), with SamplerSettings for each of `methods`; UserError on any bad flag."""
    if args.model_path and args.pretrained:
        raise UserError("give --model_path or --pretrained, not both")
    if args.model_path:
        path, output_root = args.model_path, os.path.dirname(os.path.abspath(args.model_path))
    else:
        kind = args.pretrained or ("conditional" if want_conditional else "unconditional")
        path, output_root = pretrained_path(kind), os.path.join("outputs", f"pretrained_{kind}")
    ckpt = load_checkpoint(path)
    model, diffusion = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    guide_model = guide_from_checkpoint(ckpt, args.guide_model)
    scale, interval, class_scale = default_guidance(ckpt)
    guidance = dict(guidance_scale=scale if args.guidance_scale is None else args.guidance_scale,
                    guidance_interval=interval if args.guidance_interval is None else args.guidance_interval,
                    autoguided=guide_model is not None,
                    class_guidance=class_scale if args.class_guidance is None else args.class_guidance)
    samplers = {}
    for method in methods:  # --steps is for the few-step samplers: the ddpm half of --method both / --comparison takes all T
        steps = args.steps if method != "ddpm" or args.method == "ddpm" else None
        samplers[method] = sampler_settings(diffusion, method, steps, args.eta, **guidance)
    if guidance["guidance_scale"] and not ckpt["conditional"] and guide_model is None:  # after the value's own check
        raise UserError("--guidance_scale needs a conditional model, or a --guide_model to steer away from")
    if guidance["class_guidance"] and not ckpt["conditional"]:
        raise UserError("--class_guidance needs a conditional model (it is classifier-free guidance)")
    device = pick_device(args.device)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    batch_size = args.batch_size if args.batch_size is not None else 256 if device.type == "cuda" else 64
    amp_dtype(device, args.amp)  # --amp fp16 off CUDA fails here, before any work
    return Loaded(ckpt, model, diffusion, path, output_root, device, batch_size, samplers, guide_model)


def is_conditional(model: torch.nn.Module) -> bool:
    return isinstance(model, ConditionalUNet)


def default_labels(model: torch.nn.Module, n: int) -> torch.Tensor | None:
    """What a conditional model samples unless told otherwise: the digits in turn (None if unconditional)."""
    return torch.arange(n) % model.num_classes if is_conditional(model) else None


def digit_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: one row of `per_class` images per digit in a grid."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(model, diffusion, num_samples: int, sampler: SamplerSettings, labels: torch.Tensor | None = None,
             batch_size: int = 256, seed=0, device="cpu", progress: bool = False, amp: str = "auto",
             compile_mode: str | None = None, channels_last: bool = False, noise: torch.Tensor | None = None,
             return_intermediates: bool = False, stats: dict | None = None, guide_model=None):
    """`num_samples` images in model range [-1, 1], shape [N, 1, H, W], on the CPU.

    Conditional models sample `labels` (default_labels when None) with the sampler's guidance: away from
    `guide_model` when given (autoguidance, which unconditional models take too), else classifier-free.
    The same seed and batch size give the same images, and every method starts from the same noise
    (or from `noise`, [N, C, H, W], when given). With return_intermediates, also returns the
    (t, x_t) trajectory of the first batch. `amp` is an --amp choice, `compile_mode` a torch.compile
    mode for the network call (reduce-overhead adds CUDA graphs on CUDA), `channels_last` its layout.
    `stats`, if given, receives the network calls made per image (guidance and its interval included).
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
    net = counted(model)
    if conditional:
        labels = default_labels(model, num_samples) if labels is None else labels
    if sampler.guided and (conditional or guide_model is not None):
        guide = None
        if sampler.guidance_interval is not None:
            lo, hi = sampler.guidance_interval
            guide = lambda t: bool(lo < diffusion.sigma_at(t).item() <= hi)
        model_fn = GuidedModel(net, sampler.guidance_scale, getattr(model, "null_class", None), guide,
                               None if guide_model is None else counted(guide_model), sampler.class_guidance)
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
                                      steps=sampler.steps, eta=sampler.eta,
                                      model_kwargs=kwargs, generator=generator,
                                      progress=progress and len(batches) == 1, device=device,
                                      x_T=None if noise is None else noise[start:start + n].to(device),
                                      return_intermediates=return_intermediates and trajectory is None)
            if isinstance(result, tuple):
                result, trajectory = result
            out.append(result.float().cpu())
    images = torch.cat(out)
    if stats is not None:
        stats["network_calls"] = evaluated[0] / num_samples
    return (images, [(t, x.float().cpu()) for t, x in trajectory]) if return_intermediates else images
