"""The training configuration: every flag of train.py and train_conditional.py with its default, the
named presets, the checks a command line must pass, and the model configuration a run builds."""
import argparse
import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass

import edm
from cli import ArgumentParser, add_speed_args
from ddpm_model import METHODS, DiffusionConfig, ModelConfig, check_schedule, option
from metrics import MIN_SAMPLES
from sampling import ALL_METHODS


@dataclass(frozen=True)
class TrainingConfig:
    """The run, the optimiser and the run's length, checkpoints and evaluations."""
    epochs: int = option(100)
    batch_size: int = option(128, "the global batch (split among processes under torchrun)")
    lr: float = option(2e-4, "peak learning rate (AdamW)")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    experiment_name: str | None = option(None, "default: a timestamped name")
    output_dir: str = option("checkpoints")
    data_dir: str = option("./data", "holds MNIST/raw/ (shipped with the repository)")
    save_freq: int = option(10, "epochs between sample grids and last.pth")
    eval_freq: int = option(5, "epochs between evaluations (best_model.pth)")
    save_every_minutes: float = option(10.0, "also write last.pth after this much training time, mid-epoch too "
                                             "(0: only at --save_freq)")
    resume: str | None = option(None, "a last.pth to continue exactly", metavar="PATH")
    seed: int = option(0)
    ema_decay: float = option(0.9999, "with warm-up min(decay, (1+n)/(10+n))")
    grad_clip: float = option(1.0, "max gradient norm; 0 disables")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(500, "linear LR warm-up, then cosine to 0 at the end of the last epoch or of --time_budget")
    min_snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023); 0 is the plain loss")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    time_budget: float | None = option(None, "stop after this long", metavar="MINUTES")
    log_every: int = option(50, "steps between loss reads (a host sync)")
    eval_samples: int = option(1000, "samples per evaluation")


@dataclass(frozen=True)
class FormulationConfig:
    """Which diffusion the network learns: the discrete DDPM process, or a continuous-noise one of edm.py."""
    formulation: str = option("ddpm", "ddpm: the process of --timesteps, --beta_schedule and --prediction; edm, flow: "
                                      "continuous noise levels (edm.py)", choices=("ddpm",) + edm.FORMULATIONS)
    sigma_data: float = option(0.5, "edm: the data's scale in its preconditioning")
    p_mean: float = option(-1.2, "edm, flow: training noise levels ln(sigma) ~ N(p_mean, p_std^2)")
    p_std: float = option(1.2, "edm, flow: see --p_mean")



@dataclass(frozen=True)
class GridSamplerConfig:
    """How the run's sample grids and evaluations sample (a sampling.Sampler once the model is known)."""
    sample_method: str = option("dpm_solver", "sampler for grids and evaluation", choices=ALL_METHODS)
    sample_steps: int = option(20, "its steps (ddpm uses all T)")
    sample_eta: float = option(1.0, "its noise (ddim, dpm_solver): 0 the ODE, 1 the SDE")


@dataclass(frozen=True)
class ConditioningConfig:
    """train_conditional.py only."""
    num_classes: int = option(10)
    p_uncond: float = option(0.1, "label dropout for classifier-free guidance")
    guidance_scale: float = option(0.5, "w for sample grids and evaluation")


# A small model for machines without a GPU, the winner of sweep.py (docs/cpu_recipe.md): 9.5 minutes of
# training, as many epochs as that allows, the learning rate annealed to the budget's end.
PRESETS = {
    "cpu": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
                dropout=0.0, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, min_snr_gamma=5.0,
                epochs=100, save_freq=1, eval_freq=1, eval_samples=200, time_budget=9.5),
}
# What a resumed run may change; everything else comes from the checkpoint's config.
RESUME_OVERRIDES = ("epochs", "max_steps", "time_budget", "device", "save_freq", "eval_freq", "log_every",
                    "compile", "amp", "channels_last", "eval_samples", "save_every_minutes", "data_dir")
MNIST_CLASSES = 10


def int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def flag_value(value) -> str:
    """A value as it is typed on the command line (and shown in --help): tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_fields(group, config_class) -> None:
    """One flag per field of a configuration dataclass, with its type, default, choices and help."""
    for f in dataclasses.fields(config_class):
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        is_list = typing.get_origin(kind) is tuple  # argparse parses a string default as if typed: shown as typed
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        group.add_argument(f"--{f.name}", type=int_list if is_list else kind,
                           default=flag_value(f.default) if is_list else f.default,
                           help=f.metadata.get("help") or None, **extra)


def build_parser(conditional: bool) -> argparse.ArgumentParser:
    kind = "a class-conditional" if conditional else "an unconditional"
    p = ArgumentParser(description=f"Train {kind} DDPM on MNIST.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration; flags given on the command line override it. cpu: "
                        + " ".join(f"--{k} {flag_value(v) or repr('')}" for k, v in PRESETS["cpu"].items()))
    groups = [("training", TrainingConfig), ("model", ModelConfig), ("diffusion", DiffusionConfig),
              ("formulation", FormulationConfig), ("sample grids and evaluations", GridSamplerConfig)]
    if conditional:
        groups.append(("conditioning", ConditioningConfig))
    for title, config_class in groups:
        add_fields(p.add_argument_group(title), config_class)
    add_speed_args(p.add_argument_group("speed"), "the network (training step and sampling)")
    return p


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags on the command line itself (not defaults, not the preset's)."""
    bare = copy.deepcopy(parser)
    bare._defaults.clear()  # the preset's values, which set_defaults keeps apart from the actions'
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv, conditional: bool) -> tuple[argparse.Namespace, set]:
    """The checked flags (the preset's values as defaults), and the names of those typed on the command
    line: a resumed run keeps its checkpoint's values for all others."""
    parser = build_parser(conditional)
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if args.resume:
        refused = sorted(given - set(RESUME_OVERRIDES) - {"resume"})
        if refused:
            parser.error(f"a resumed run keeps the configuration of its checkpoint; {' '.join('--' + n for n in refused)} "
                         f"cannot change (what may: {' '.join('--' + n for n in RESUME_OVERRIDES)})")
    for name in ("epochs", "batch_size", "timesteps", "model_channels", "num_res_blocks", "save_freq",
                 "eval_freq", "log_every", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "grad_clip", "weight_decay", "warmup_steps", "sample_eta", "min_snr_gamma",
                 "save_every_minutes") + (("guidance_scale",) if conditional else ()):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time_budget must be positive, got {args.time_budget}")
    if args.eval_samples < MIN_SAMPLES:
        parser.error(f"--eval_samples must be at least {MIN_SAMPLES} (the metrics need that many), "
                     f"got {args.eval_samples}")
    if not args.channel_mult or min(args.channel_mult) < 1 or min(args.attention_resolutions, default=1) < 1:
        parser.error("--channel_mult needs at least one level, and it and --attention_resolutions take positive "
                     "integers")
    if args.image_size < 28 or args.image_size % 2:
        parser.error(f"--image_size must be an even number of at least 28, got {args.image_size}")
    try:
        check_schedule(args.beta_schedule, args.timesteps)
    except ValueError as e:
        parser.error(str(e))
    methods = METHODS if args.formulation == "ddpm" else edm.METHODS
    if args.sample_method not in methods:
        parser.error(f"--sample_method {args.sample_method} is not a sampler of --formulation {args.formulation} "
                     f"({', '.join(methods)})")
    if args.formulation != "ddpm" and args.min_snr_gamma:
        parser.error("--min_snr_gamma weights the ddpm loss; edm and flow have their own weighting")
    if args.formulation == "ddpm" and args.sample_method != "ddpm" and args.sample_steps > args.timesteps:
        parser.error(f"--sample_steps {args.sample_steps} is more than the {args.timesteps} --timesteps")
    if conditional and args.num_classes < MNIST_CLASSES:
        parser.error(f"--num_classes must be at least {MNIST_CLASSES}: MNIST has labels 0-9, got {args.num_classes}")
    if conditional and not 0 <= args.p_uncond <= 1:
        parser.error(f"--p_uncond must be in [0, 1], got {args.p_uncond}")
    return args, given


def values(args, config_class) -> dict:
    """The fields of `config_class` as the parsed flags `args` set them."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}


def diffusion_config(args) -> dict:
    """The keyword arguments of the run's process: GaussianDiffusion's, or KarrasDiffusion's."""
    if args.formulation == "ddpm":
        return values(args, DiffusionConfig)
    return values(args, FormulationConfig)


def model_config(args) -> dict:
    """The keyword arguments of UNet, or of ConditionalUNet when the run is conditional."""
    config = values(args, ModelConfig)
    if getattr(args, "num_classes", None):
        config["num_classes"] = args.num_classes
    return config
