"""Batched image generation from a trained model: the one entry point that training (sample grids,
evaluation), inference.py and eval.py share, with the command-line pieces the last two have in common."""
import argparse
import contextlib
import copy
import os
import sys

import torch
from tqdm.auto import tqdm

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from conditional_ddpm import ConditionalUNet, GuidedModel
from data import DataError
from ddpm_model import METHODS, make_generator
from fileio import WriteError

AMP_MODES = ("auto", "none", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class UserError(Exception):
    """Bad input: reported as one line with exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and lists every flag's default, also for flags without help."""

    def _format_action(self, action):
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"  # argparse leaves flags without help bare
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script here uses it: each default in --help, no abbreviated flags (--max_step is
    not --max_steps), and a bad command line reported as one line with exit code 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name: str) -> torch.device:
    """auto = cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available")
    return device


def add_sampling_args(p: argparse.ArgumentParser, methods=METHODS, batch_size: int | None = None) -> None:
    """The sampler flags inference.py and eval.py share."""
    p.add_argument("--model_path", help="a checkpoint from train.py or train_conditional.py")
    p.add_argument("--method", choices=methods, default="dpm_solver",
                   help="ddpm: all T steps; ddim: --ddim_steps; dpm_solver: DPM-Solver++(2M) in --steps")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM and DPM-Solver++ noise: 0 deterministic (the ODE), 1 DDPM-like (the SDE); "
                        "None: 0 for ddim, 1 for dpm_solver (SDE-DPM-Solver++, the best fid_mnist per network call)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance w (conditional models); default: the training run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=batch_size, help="images per sampling batch" + (
        "" if batch_size else "; None: 256 on CUDA, 64 elsewhere (faster than larger batches on CPUs)"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no_ema", action="store_true", help="sample the raw weights instead of the EMA")
    add_speed_args(p, "the network call")


def add_speed_args(p: argparse.ArgumentParser, what: str) -> None:
    """--amp, --compile and --channels_last, shared by training, sampling and bench.py."""
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere "
                        "(fp16 is CUDA-only)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile {what}; MODE is one of {', '.join(COMPILE_MODES)} (default when given "
                        "bare; reduce-overhead adds CUDA graphs)")
    p.add_argument("--channels_last", action="store_true",
                   help="NHWC weights and activations (cuDNN's tensor-core layout; no gain on the CPUs measured)")


def load_model(args, methods):
    """(checkpoint, model, diffusion, device) for --model_path, or UserError/CheckpointError.

    `methods` are the samplers the command will run: only their step counts are checked.
    """
    if not args.model_path:
        raise UserError("--model_path is required")
    ckpt = load_checkpoint(args.model_path)
    model, diffusion = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    T = diffusion.timesteps
    for method, flag in (("ddim", "ddim_steps"), ("dpm_solver", "steps")):
        if method in methods and not 1 <= getattr(args, flag) <= T:
            raise UserError(f"--{flag} must be between 1 and the model's {T} timesteps, got {getattr(args, flag)}")
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must not be negative, got {args.eta}")
    device = pick_device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    amp_dtype(device, args.amp)  # --amp fp16 off CUDA fails here, before any work
    if args.guidance_scale is None:
        args.guidance_scale = ckpt["config"].get("args", {}).get("guidance_scale", 0.0)
    if args.guidance_scale < 0:
        raise UserError(f"--guidance_scale must not be negative, got {args.guidance_scale}")
    return ckpt, model, diffusion, device


def method_steps(args, method: str) -> int | None:
    return {"ddim": args.ddim_steps, "dpm_solver": args.steps}.get(method)


def method_eta(args, method: str) -> float:
    """--eta, or the method's default: the deterministic DDIM of the paper, the SDE form of DPM-Solver++."""
    if args.eta is not None:
        return args.eta
    return 1.0 if method == "dpm_solver" else 0.0


def default_output_dir(model_path: str, name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), name)


def guarded(main):
    """Run a CLI main(); bad input of any kind, missing data and unwritable outputs become one line on
    stderr and exit code 2."""
    def wrapper(argv=None):
        try:
            return main(argv)
        except (UserError, CheckpointError, DataError, WriteError) as e:
            fail(str(e))
    return wrapper


def check_output_dir(path: str, flag: str, create: bool = False) -> None:
    """Refuse, before any work, a folder to write into that is a file or cannot be made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from None


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, a file to write that is a folder or sits under a file."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype --amp asks for on `device`, or None for full fp32.

    auto is bf16 on CUDA and on CPUs with native bf16, where it trains the CPU preset 1.57x and samples
    1.8x faster than fp32 (docs/speed.md); fp32 on other CPUs, which emulate bf16, and on other devices.
    """
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        amp = "bf16" if native else "none"
    if amp == "none":
        return None
    if device.type not in ("cuda", "cpu") or (amp == "fp16" and device.type != "cuda"):
        raise UserError(f"--amp {amp} is not supported on {device.type}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp: str = "auto"):
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def digit_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,..: one row of `per_class` images per digit in a grid."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(model, diffusion, num_samples: int, labels: torch.Tensor | None = None,
             guidance_scale: float = 0.0, method: str = "ddpm", steps: int | None = None, eta: float = 0.0,
             batch_size: int = 256, seed=0, device="cpu", progress: bool = False, amp: str = "auto",
             compile_mode: str | None = None, channels_last: bool = False, noise: torch.Tensor | None = None,
             return_intermediates: bool = False):
    """`num_samples` images in model range [-1, 1], shape [N, 1, H, W], on the CPU.

    Conditional models sample `labels` (default: the digits in turn) with classifier-free guidance.
    The same seed and batch size give the same images, and every method starts from the same noise
    (or from `noise`, [N, C, H, W], when given). With return_intermediates, also returns the
    (t, x_t) trajectory of the first batch. `amp` is an --amp choice, `compile_mode` a torch.compile
    mode for the network call (reduce-overhead adds CUDA graphs on CUDA), `channels_last` its layout.
    """
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    diffusion = diffusion.to(device)
    conditional = isinstance(model, ConditionalUNet)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    if conditional:
        labels = torch.arange(num_samples) % model.num_classes if labels is None else labels
        model_fn = GuidedModel(net, guidance_scale, model.null_class)
    else:
        model_fn = net
    size = model.config["image_size"]
    generator = make_generator(seed, device)
    out, trajectory = [], None
    batches = range(0, num_samples, batch_size)
    with torch.inference_mode(), autocast(device, amp):
        for start in tqdm(batches, desc=f"{method} sampling", disable=not progress or len(batches) == 1):
            n = min(batch_size, num_samples - start)
            kwargs = {"y": labels[start:start + n].to(device)} if conditional else {}
            result = diffusion.sample(model_fn, (n, model.config["in_channels"], size, size), method=method,
                                      steps=steps, eta=eta, model_kwargs=kwargs, generator=generator,
                                      progress=progress and len(batches) == 1, device=device,
                                      x_T=None if noise is None else noise[start:start + n].to(device),
                                      return_intermediates=return_intermediates and trajectory is None)
            if isinstance(result, tuple):
                result, trajectory = result
            out.append(result.float().cpu())
    images = torch.cat(out)
    return (images, [(t, x.float().cpu()) for t, x in trajectory]) if return_intermediates else images
