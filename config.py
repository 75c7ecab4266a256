"""The training configuration: every flag of train.py and train_conditional.py with its default and help,
the named presets, the checks a command line must pass, and the model and process configurations a run
builds. Defaults live in dataclasses (the maths modules' own for the network and the processes); the
wording of the flags lives here, with the command line."""
import argparse
import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass

import edm
from checkpoint import build_diffusion
from cli import ArgumentParser, add_speed_args, float_list
from conditional_ddpm import check_guidance_interval, check_guidance_scale
from ddpm_model import (
    ACTIVATIONS,
    BETA_SCHEDULES,
    PREDICTIONS,
    RANGE_LOSSES,
    TIMESTEP_SAMPLING,
    DiffusionConfig,
    LossConfig,
    ModelConfig,
    NoiseLevelConfig,
)
from ddpm_model import METHODS as DDPM_METHODS
from edm import KarrasConfig


@dataclass(frozen=True)
class TrainingConfig:
    """The run, the optimiser and the run's length, checkpoints and evaluations."""
    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    device: str = "auto"
    experiment_name: str | None = None
    output_dir: str = "checkpoints"
    data_dir: str = "./data"
    save_freq: int = 10
    eval_freq: int = 5
    save_every_minutes: float = 10.0
    resume: str | None = None
    seed: int = 0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_snr_gamma: float = 0.0
    max_steps: int | None = None
    time_budget: float | None = None
    log_every: int = 50
    eval_samples: int = 1000


@dataclass(frozen=True)
class FormulationConfig:
    formulation: str = "ddpm"


@dataclass(frozen=True)
class GridSamplerConfig:
    """How the run's sample grids and evaluations sample (sampling.SamplerSettings once the model is known)."""
    sample_method: str = "dpm_solver"
    sample_steps: int | None = None
    sample_eta: float | None = None


@dataclass(frozen=True)
class ConditioningConfig:
    """train_conditional.py only."""
    num_classes: int = 10
    p_uncond: float = 0.1


@dataclass(frozen=True)
class GuidanceConfig:
    """The guidance of the run's sample grids and evaluations, and the default of its checkpoints:
    classifier-free for a conditional run, away from the --guide_snapshot network when the run takes one
    (autoguidance, which an unconditional run needs for any guidance)."""
    guidance_scale: float = 0.5
    guidance_interval: tuple[float, ...] | None = None
    guide_snapshot: float = 0.0


FORMULATIONS = ("ddpm",) + edm.FORMULATIONS
HELP = {
    "batch_size": "the global batch (split among processes under torchrun)",
    "lr": "peak learning rate (AdamW)",
    "device": "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu",
    "experiment_name": "default: a timestamped name",
    "data_dir": "holds MNIST/raw/ (shipped with the repository)",
    "save_freq": "epochs between sample grids and last.pth",
    "eval_freq": "epochs between evaluations (best_model.pth)",
    "save_every_minutes": "also write last.pth after this much training time, mid-epoch too (0: only at --save_freq)",
    "resume": "a last.pth to continue exactly",
    "ema_decay": "with warm-up min(decay, (1+n)/(10+n))",
    "grad_clip": "max gradient norm; 0 disables",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear LR warm-up, then cosine to 0 at the end of the last epoch or of --time_budget",
    "min_snr_gamma": "ddpm: Min-SNR-gamma loss weighting (Hang et al. 2023); 0 is the plain loss",
    "max_steps": "stop after this many optimizer steps",
    "time_budget": "stop after this long",
    "log_every": "steps between loss reads (a host sync)",
    "eval_samples": "samples per evaluation",
    "model_channels": "width of the first level",
    "channel_mult": "channel multiplier per resolution, comma-separated",
    "num_res_blocks": "residual blocks per level",
    "attention_resolutions": "feature-map sizes with self-attention; '' for none",
    "image_size": "28 is native; larger even sizes pad the digits (32 to compare with 32x32-only models)",
    "norm_groups": "the most groups a GroupNorm has (it keeps at least 4 channels a group; 1 is a layer norm)",
    "formulation": "ddpm: the discrete process of --timesteps, --beta_schedule and --prediction; edm, flow: "
                   "continuous noise levels (edm.py) of --sigma_data, --p_mean and --p_std",
    "timesteps": "ddpm: diffusion steps T",
    "beta_schedule": "ddpm: the noise schedule",
    "prediction": "ddpm: what the network predicts",
    "logsnr_shift": "ddpm: added to the schedule's log-SNR at every step; > 0 is less noise (for small images)",
    "timestep_sampling": "ddpm: training timesteps uniform, or lognormal: at ln(sigma) ~ N(p_mean, p_std^2)",
    "sigma_data": "edm: the data's scale in its preconditioning",
    "range_loss": "one_sided leaves out the errors beyond the end of the data range a pixel's target sits at "
                  "(the samplers clamp them away); same minimiser as the mse",
    "p_mean": "edm, flow, ddpm's lognormal timesteps: training noise levels ln(sigma) ~ N(p_mean, p_std^2)",
    "p_std": "see --p_mean",
    "sample_method": "sampler for grids and evaluations (ddpm, ddim, dpm_solver; heun and dpm_solver_3m for edm "
                     "and flow)",
    "sample_steps": "its steps (default: the method's; ddpm takes all T)",
    "sample_eta": "its injected noise (default: the method's)",
    "p_uncond": "label dropout for classifier-free guidance",
    "guidance_scale": "w for sample grids and evaluations (an unconditional run guides only with --guide_snapshot)",
    "guidance_interval": "guide those only at noise levels sigma in (LO, HI] (default: all)",
    "guide_snapshot": "autoguidance (Karras et al. 2024): once this share of the run has passed (of its epochs' "
                      "steps, or of --time_budget), a copy of the EMA becomes the weaker network guidance steers "
                      "away from; every later checkpoint holds it (0: none)",
}
CHOICES = {"activation": tuple(ACTIVATIONS), "beta_schedule": BETA_SCHEDULES, "prediction": PREDICTIONS,
           "timestep_sampling": TIMESTEP_SAMPLING, "range_loss": RANGE_LOSSES,
           "formulation": FORMULATIONS, "sample_method": tuple(dict.fromkeys(DDPM_METHODS + edm.METHODS))}
METAVARS = {"resume": "PATH", "time_budget": "MINUTES", "guidance_interval": "LO,HI", "guide_snapshot": "SHARE"}

# A small model for machines without a GPU, the winner of tools/sweep.py (docs/cpu_recipe.md): flow matching
# with logit-normal t on a 1.06M SiLU U-Net, 9.5 minutes of training, as many epochs as that allows, the
# learning rate annealed to the budget's end.
PRESETS = {
    "cpu": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
                activation="silu", dropout=0.0, formulation="flow", p_mean=0.0, p_std=1.0, range_loss="one_sided",
                min_snr_gamma=0.0,
                batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                epochs=100, save_freq=1, eval_freq=1, eval_samples=200, time_budget=9.5),
}
# What train.py's presets add: autoguidance by the run's own EMA at a fifth of the run (docs/cpu_recipe.md);
# a conditional run guides classifier-free.
UNCONDITIONAL_PRESETS = {"cpu": dict(guide_snapshot=0.2, guidance_scale=1.0, guidance_interval=(0.3, 5.0))}
# What a resumed run may change; everything else comes from the checkpoint's config.
RESUME_OVERRIDES = ("epochs", "max_steps", "time_budget", "device", "save_freq", "eval_freq", "log_every",
                    "compile", "amp", "channels_last", "eval_samples", "save_every_minutes", "data_dir")
MNIST_CLASSES = 10


def int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


LIST_PARSERS = {int: int_list, float: float_list}


def flag_value(value) -> str:
    """A value as it is typed on the command line (and shown in --help): tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_fields(group, config_class) -> None:
    """One flag per field of a configuration dataclass, with its type, default, and the help and choices above."""
    for f in dataclasses.fields(config_class):
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        is_list = typing.get_origin(kind) is tuple
        default = flag_value(f.default) if is_list and f.default is not None else f.default  # parsed as if typed
        group.add_argument(f"--{f.name}", type=LIST_PARSERS[typing.get_args(kind)[0]] if is_list else kind,
                           default=default, help=HELP.get(f.name), choices=CHOICES.get(f.name),
                           metavar=METAVARS.get(f.name))


def preset_values(name: str, conditional: bool) -> dict:
    """The flags a preset sets for train_conditional.py (`conditional`) or train.py."""
    return {**PRESETS[name], **({} if conditional else UNCONDITIONAL_PRESETS.get(name, {}))}


def build_parser(conditional: bool) -> argparse.ArgumentParser:
    kind = "a class-conditional" if conditional else "an unconditional"
    p = ArgumentParser(description=f"Train {kind} diffusion model on MNIST.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration; flags given on the command line override it. cpu: " + " ".join(
                       f"--{k} {flag_value(v) or repr('')}" for k, v in preset_values("cpu", conditional).items()))
    groups = [("training", [TrainingConfig]), ("model", [ModelConfig]),
              ("diffusion", [FormulationConfig, DiffusionConfig, KarrasConfig, NoiseLevelConfig, LossConfig]),
              ("sample grids and evaluations", [GridSamplerConfig, GuidanceConfig])]
    if conditional:
        groups.append(("conditioning", [ConditioningConfig]))
    for title, config_classes in groups:
        group = p.add_argument_group(title)
        for config_class in config_classes:
            add_fields(group, config_class)
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
        parser.set_defaults(**preset_values(preset, conditional))
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if args.resume:
        refused = sorted(given - set(RESUME_OVERRIDES) - {"resume"})
        if refused:
            parser.error(f"a resumed run keeps the configuration of its checkpoint; {' '.join('--' + n for n in refused)} "
                         f"cannot change (what may: {' '.join('--' + n for n in RESUME_OVERRIDES)})")
    try:
        check(args, conditional)
    except ValueError as e:
        parser.error(str(e))
    typed_guidance = sorted(given & {"guidance_scale", "guidance_interval"})
    if typed_guidance and not conditional and not args.guide_snapshot:
        parser.error(f"--{typed_guidance[0]} needs a network to guide away from: an unconditional run guides only "
                     "with --guide_snapshot")
    return args, given


def check(args, conditional: bool) -> None:
    """ValueError naming the first flag out of range."""
    for name in ("epochs", "batch_size", "timesteps", "model_channels", "num_res_blocks", "save_freq",
                 "eval_freq", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "grad_clip", "weight_decay", "warmup_steps", "min_snr_gamma", "save_every_minutes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time_budget must be positive, got {args.time_budget}")
    if not args.channel_mult or min(args.channel_mult) < 1 or min(args.attention_resolutions, default=1) < 1:
        raise ValueError("--channel_mult needs at least one level, and it and --attention_resolutions take positive "
                         "integers")
    if args.image_size < 28 or args.image_size % 2:
        raise ValueError(f"--image_size must be an even number of at least 28, got {args.image_size}")
    if args.formulation != "ddpm" and args.min_snr_gamma:
        raise ValueError("--min_snr_gamma weights the ddpm loss; edm and flow carry their own weighting")
    process = build_diffusion(diffusion_config(args))  # checks the process's own flags
    try:
        process.sampler_steps(args.sample_method, args.sample_steps)
    except ValueError as e:
        raise ValueError(f"--sample_method {args.sample_method} --sample_steps {args.sample_steps}: {e}") from None
    if args.sample_eta is not None and args.sample_eta < 0:
        raise ValueError(f"--sample_eta must not be negative, got {args.sample_eta}")
    check_guidance_scale(args.guidance_scale)
    check_guidance_interval(args.guidance_interval)
    if not 0 <= args.guide_snapshot < 1:
        raise ValueError(f"--guide_snapshot must be in [0, 1), got {args.guide_snapshot}")
    if conditional:
        if args.num_classes < MNIST_CLASSES:
            raise ValueError(f"--num_classes must be at least {MNIST_CLASSES}: MNIST has labels 0-9, got "
                             f"{args.num_classes}")
        if not 0 <= args.p_uncond <= 1:
            raise ValueError(f"--p_uncond must be in [0, 1], got {args.p_uncond}")


def values(args, config_class) -> dict:
    """The fields of `config_class` as the parsed flags `args` set them."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}


def diffusion_config(args) -> dict:
    """The keyword arguments of the run's process: GaussianDiffusion's (ddpm), else KarrasDiffusion's."""
    noise_levels, loss = values(args, NoiseLevelConfig), values(args, LossConfig)
    if args.formulation == "ddpm":
        return {**values(args, DiffusionConfig), **(noise_levels if args.timestep_sampling == "lognormal" else {}), **loss}
    return dict(formulation=args.formulation, **values(args, KarrasConfig), **noise_levels, **loss)


def model_config(args) -> dict:
    """The keyword arguments of UNet, or of ConditionalUNet when the run is conditional."""
    config = values(args, ModelConfig)
    if getattr(args, "num_classes", None):
        config["num_classes"] = args.num_classes
    return config
