"""The configuration of a training run and the one factory of model and diffusion.

Every flag of train.py and train_conditional.py is a field of a dataclass, declared with its default and help
beside it: the run's own here, the network's (ModelConfig) in ddpm_model.py, the formulation's
(DiffusionConfig) and the sampler's (SamplingSpec) in diffusion.py. Here too: the named presets, the checks a
command line must pass (which build nothing), and create_model_and_diffusion, which builds a network and its
diffusion from a configuration as a checkpoint stores it.
"""
import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass

from cli import ArgumentParser, UserError, add_fields, add_speed_args, flag, flag_value, replaced
from conditional_ddpm import ConditionalUNet
from data import DIGITS, PADDED, ImageData
from ddpm_model import ModelConfig, UNet
from diffusion import DiffusionConfig, SamplingSpec, check_diffusion, check_sampling, create_diffusion
from runtime import DEVICE_HELP


@dataclass(frozen=True)
class TrainingConfig:
    """The run, the optimiser and the run's length, checkpoints and evaluations."""
    epochs: int = flag(100, "passes over the training set")
    batch_size: int = flag(128, "the global batch (split among processes under torchrun)")
    lr: float = flag(2e-4, "peak learning rate (AdamW)")
    device: str = flag("auto", DEVICE_HELP)
    experiment_name: str | None = flag(None, "the run's folder under --output_dir; None: a timestamped name")
    output_dir: str = flag("checkpoints", "where run folders go")
    dataset: str = flag("mnist", "mnist, fashion_mnist, kmnist, cifar10 (torchvision's files under --data_dir, "
                                 "downloaded if missing), or a folder of images: flat, or in class subfolders",
                        metavar="NAME|FOLDER")
    data_dir: str = flag("./data", "where the named datasets' files are (MNIST/raw/ ships with the repository)")
    random_flip: bool = flag(False, "mirror half of each batch left-right (DDPM's CIFAR-10 augmentation; not for digits)")
    save_freq: int = flag(10, "epochs between sample grids and last.pth")
    eval_freq: int = flag(5, "epochs between evaluations (best_model.pth)")
    save_every_minutes: float = flag(10.0, "also write last.pth after this much training time, mid-epoch too "
                                           "(0: only at --save_freq)")
    resume: str | None = flag(None, "a last.pth to continue exactly", metavar="PATH")
    seed: int = flag(0, "the random seed: weights, data order, noise")
    ema_decay: float = flag(0.9999, "with warm-up min(decay, (1+n)/(10+n))")
    grad_clip: float = 1.0  # the most gradient norm a step takes (0: unclipped)
    weight_decay: float = 0.0  # AdamW's
    warmup_steps: int = flag(500, "linear LR warm-up, then cosine to 0 at the end of the last epoch or of "
                                  "--time_budget")
    max_steps: int | None = flag(None, "stop after this many optimizer steps")
    time_budget: float | None = flag(None, "stop after this long", metavar="MINUTES")
    log_every: int = flag(50, "steps between loss reads (a host sync)")
    eval_samples: int = flag(1000, "samples per evaluation")


@dataclass(frozen=True)
class ConditioningConfig:
    """train_conditional.py only."""
    num_classes: int | None = flag(None, "classes of the conditional model; None: the dataset's")
    p_uncond: float = flag(0.1, "label dropout for classifier-free guidance")


@dataclass(frozen=True)
class GuideConfig:
    guide_snapshot: float = flag(0.0, "autoguidance (Karras et al. 2024): once this share of the run has passed (of "
                                      "its epochs' steps, or of --time_budget), a copy of the EMA becomes the weaker "
                                      "network --autoguidance_scale steers away from; every later checkpoint holds "
                                      "it (0: none)", metavar="SHARE")


# The run's sampler, for its grids, its evaluations and its checkpoints' default: SamplingSpec's fields, the
# sampler's as --sample_method and --sample_steps (--steps would read as the run's length), its eta the method's.
SAMPLER_FIELDS = ("method", "steps", "eta")
SPEC_FLAGS = {f.name: ("sample_" if f.name in SAMPLER_FIELDS else "") + f.name for f in dataclasses.fields(SamplingSpec)}
CONDITIONAL_GUIDANCE = 0.5  # the classifier-free guidance of a conditional run's grids and checkpoints

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
UNCONDITIONAL_PRESETS = {"cpu": dict(guide_snapshot=0.2, autoguidance_scale=1.0, guidance_interval=(0.3, 5.0))}
# What a resumed run may change; everything else comes from the checkpoint's config.
RESUME_OVERRIDES = ("epochs", "max_steps", "time_budget", "device", "save_freq", "eval_freq", "log_every",
                    "compile", "amp", "channels_last", "eval_samples", "save_every_minutes", "data_dir")


def preset_values(name: str, conditional: bool) -> dict:
    """The flags a preset sets for train_conditional.py (`conditional`) or train.py."""
    return {**PRESETS[name], **({} if conditional else UNCONDITIONAL_PRESETS.get(name, {}))}


def build_parser(conditional: bool) -> argparse.ArgumentParser:
    kind = "a class-conditional" if conditional else "an unconditional"
    p = ArgumentParser(description=f"Train {kind} diffusion model on MNIST or another dataset.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration; flags given on the command line override it. cpu: " + " ".join(
                       f"--{k} {flag_value(v) or repr('')}" for k, v in preset_values("cpu", conditional).items()))
    add_fields(p.add_argument_group("training"), TrainingConfig)
    if conditional:
        add_fields(p.add_argument_group("conditioning"), ConditioningConfig)
    add_fields(p.add_argument_group("model"), ModelConfig, defaults={"image_size": None})  # None: the data's
    add_fields(p.add_argument_group("diffusion"), DiffusionConfig)
    sampling = p.add_argument_group("sampling: the run's sample grids and evaluations, and its checkpoints' default")
    add_fields(sampling, SamplingSpec, only=("method", "steps"), prefix="sample_")
    sampling.set_defaults(sample_eta=None)  # a fixed setting: a run resumed from a checkpoint keeps its eta
    add_fields(sampling, SamplingSpec, only=("guidance_scale",) if conditional else (),
               defaults={"guidance_scale": CONDITIONAL_GUIDANCE})
    add_fields(sampling, SamplingSpec, only=("autoguidance_scale", "guidance_interval"))
    add_fields(sampling, GuideConfig)
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
    return args, given


def check(args, conditional: bool) -> None:
    """ValueError naming the first flag out of range."""
    for name in ("epochs", "batch_size", "model_channels", "num_res_blocks", "save_freq", "eval_freq", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "warmup_steps", "save_every_minutes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("dropout", "ema_decay", "guide_snapshot"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time_budget must be positive, got {args.time_budget}")
    if not args.channel_mult or min(args.channel_mult) < 1 or min(args.attention_resolutions, default=1) < 1:
        raise ValueError("--channel_mult needs at least one level, and it and --attention_resolutions take positive "
                         "integers")
    if args.image_size is not None:
        check_image_size(args.image_size, args.channel_mult, args.dataset)
    if args.random_flip and args.dataset in DIGITS:
        raise ValueError(f"--random_flip mirrors images, which turns the characters of {args.dataset} into others or "
                         "none; it is for pictures such as CIFAR-10's")
    diffusion = DiffusionConfig(**fields_of(args, DiffusionConfig))
    check_diffusion(diffusion)
    check_sampling(sampling_spec(args), diffusion.levels, conditional, has_guide=args.guide_snapshot > 0,
                   flags={field: "--" + name for field, name in SPEC_FLAGS.items()})
    if conditional:
        if args.num_classes is not None and args.num_classes < 1:
            raise ValueError(f"--num_classes must be at least 1, got {args.num_classes}")
        if not 0 <= args.p_uncond <= 1:
            raise ValueError(f"--p_uncond must be in [0, 1], got {args.p_uncond}")


def check_image_size(size: int, channel_mult: tuple, dataset: str) -> None:
    """ValueError for an --image_size the network or the data cannot take."""
    smallest = 2 ** (len(channel_mult) - 1)  # each level halves the feature maps
    if size < smallest:
        raise ValueError(f"--image_size {size} is too small for a U-Net of {len(channel_mult)} levels (at least "
                         f"{smallest})")
    if dataset in PADDED and (size < 28 or size % 2):
        raise ValueError(f"--image_size must be an even number of at least 28 for {dataset}, whose 28x28 images are "
                         f"padded to it, got {size}")


def fit_to_data(args, data: ImageData, conditional: bool):
    """The run's flags that follow its training images: the input size (by default the images'), the channels
    and, for a conditional run, the classes (by default the dataset's; fewer is refused). UserError if the data
    cannot train this run."""
    size = args.image_size or data.image_size
    try:
        check_image_size(size, args.channel_mult, args.dataset)
    except ValueError as e:
        raise UserError(str(e)) from None
    changes = dict(image_size=size, in_channels=data.channels)
    if conditional:
        if not data.classes:
            raise UserError(f"--dataset {args.dataset} is a flat folder: train_conditional.py takes its labels from "
                            "class subfolders (FOLDER/CLASS/IMAGE.png)")
        changes["num_classes"] = args.num_classes or len(data.classes)
        if changes["num_classes"] < len(data.classes):
            raise UserError(f"--num_classes {args.num_classes} is fewer than the {len(data.classes)} classes of "
                            f"--dataset {args.dataset}")
    return replaced(args, **changes)


def fields_of(args, config_class) -> dict:
    """The fields of `config_class` that the parsed flags `args` set."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def sampling_spec(args) -> SamplingSpec:
    """The run's sampler, from its flags (an unconditional run's classifier-free scale is 0)."""
    return SamplingSpec(**{field: getattr(args, name) for field, name in SPEC_FLAGS.items() if hasattr(args, name)})


def spec_flags(spec: dict) -> dict:
    """The run's flags that a checkpoint's sampling spec sets: what a resumed run takes back."""
    return {SPEC_FLAGS[field]: tuple(value) if isinstance(value, list) else value for field, value in spec.items()}


def model_config(args, conditional: bool) -> dict:
    """The run's network, as checkpoints store it: ModelConfig's fields, and num_classes for a conditional one."""
    config = dataclasses.asdict(ModelConfig(**fields_of(args, ModelConfig)))
    return dict(config, num_classes=args.num_classes) if conditional else config


def diffusion_config(args) -> dict:
    return dataclasses.asdict(DiffusionConfig(**fields_of(args, DiffusionConfig)))


# Settings earlier versions had, at the value that is now the only one: a checkpoint that stored another
# value is refused. (norm_groups: the most groups a GroupNorm had; logsnr_shift: a shift of DDPM's log-SNR;
# timestep_sampling: lognormal drew DDPM's training timesteps at log-normal noise levels.)
RETIRED = {"norm_groups": 32, "logsnr_shift": 0.0, "timestep_sampling": "uniform"}


def stored_configs(model_config: dict, diffusion_config: dict) -> tuple:
    """(ModelConfig, num_classes or None, DiffusionConfig) of a configuration as checkpoints store it, those of
    earlier versions included; ValueError for a setting this version does not take. Builds nothing."""
    model_config, diffusion_config = dict(model_config), dict(diffusion_config)
    for config in (model_config, diffusion_config):
        for name, only in RETIRED.items():
            value = config.pop(name, only)
            if value != only:
                raise ValueError(f"it was made with {name} {value!r}, a setting this version no longer has (only "
                                 f"{only!r})")
    model_config = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}
    num_classes = model_config.pop("num_classes", None)
    if model_config.pop("out_channels", model_config.get("in_channels", 1)) != model_config.get("in_channels", 1):
        raise ValueError("a network whose output channels differ from its input's is not one of this repository")
    try:
        network, diffusion = ModelConfig(**model_config), DiffusionConfig(**diffusion_config)
    except TypeError as e:  # a field this version does not have
        raise ValueError(f"unknown setting {str(e).split('argument ')[-1]}") from None
    check_diffusion(diffusion)
    return network, num_classes, diffusion


def create_model_and_diffusion(model_config: dict, diffusion_config: dict):
    """(network, diffusion) of a configuration as checkpoints store it: a ConditionalUNet when the model's has
    num_classes, else a UNet (improved-diffusion's create_model_and_diffusion)."""
    network, num_classes, diffusion = stored_configs(model_config, diffusion_config)
    model = UNet(network) if num_classes is None else ConditionalUNet(network, num_classes)
    return model, create_diffusion(diffusion)
