"""The training configuration: every flag of train.py and train_conditional.py with its default, the
named presets, the checks a command line must pass, and the model configuration a run builds."""
import argparse
import copy
import sys

from cli import ArgumentParser, add_speed_args
from ddpm_model import BETA_SCHEDULES, METHODS, PREDICTIONS, check_schedule
from metrics import MIN_SAMPLES

# A small model for machines without a GPU, the winner of sweep.py (docs/cpu_recipe.md): 9.5 minutes of
# training, as many epochs as that allows, the learning rate annealed to the budget's end.
PRESETS = {
    "cpu": dict(model_channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="",
                dropout=0.0, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, min_snr_gamma=5.0,
                epochs=100, save_freq=1, eval_freq=1, eval_samples=200, time_budget=9.5),
}
# What a resumed run may change; everything else comes from the checkpoint's config.
RESUME_OVERRIDES = ("epochs", "max_steps", "time_budget", "device", "save_freq", "eval_freq", "log_every",
                    "compile", "amp", "channels_last", "eval_samples", "save_every_minutes", "data_dir")
MNIST_CLASSES = 10


def int_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser(conditional: bool) -> argparse.ArgumentParser:
    kind = "a class-conditional" if conditional else "an unconditional"
    p = ArgumentParser(description=f"Train {kind} DDPM on MNIST.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration; flags given on the command line override it. "
                        "cpu: " + ", ".join(f"{k}={v}" for k, v in PRESETS["cpu"].items()))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--experiment_name", default=None, help="default: a timestamped name")
    p.add_argument("--output_dir", default="checkpoints")
    p.add_argument("--data_dir", default="./data", help="holds MNIST/raw/ (shipped with the repository)")
    p.add_argument("--save_freq", type=int, default=10, help="epochs between sample grids and last.pth")
    p.add_argument("--eval_freq", type=int, default=5, help="epochs between evaluations (best_model.pth)")
    p.add_argument("--save_every_minutes", type=float, default=10.0,
                   help="also write last.pth after this much training time, mid-epoch too (0: only at --save_freq)")
    p.add_argument("--resume", default=None, metavar="PATH", help="a last.pth to continue exactly")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--model_channels", type=int, default=128)
    g.add_argument("--channel_mult", default="1,2,2,2", help="channel multiplier per resolution")
    g.add_argument("--num_res_blocks", type=int, default=2)
    g.add_argument("--attention_resolutions", default="14", help="comma-separated feature-map sizes; '' for none")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--activation", choices=["relu", "silu"], default="relu")
    g.add_argument("--image_size", type=int, default=28,
                   help="28 is native; larger even sizes pad the digits (32 to compare with 32x32-only models)")
    g = p.add_argument_group("diffusion and optimisation")
    g.add_argument("--beta_schedule", choices=BETA_SCHEDULES, default="linear")
    g.add_argument("--prediction", choices=PREDICTIONS, default="eps", help="what the network predicts")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="with warm-up min(decay, (1+n)/(10+n))")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int, default=500,
                   help="linear LR warm-up, then cosine to 0 at the end of the last epoch or of --time_budget")
    g.add_argument("--min_snr_gamma", type=float, default=0.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023); 0 is the plain loss")
    add_speed_args(g, "the network (training step and sampling)")
    g = p.add_argument_group("run length, logging and evaluation")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--time_budget", type=float, default=None, metavar="MINUTES", help="stop after this long")
    g.add_argument("--log_every", type=int, default=50, help="steps between loss reads (a host sync)")
    g.add_argument("--eval_samples", type=int, default=1000, help="samples per evaluation")
    g.add_argument("--sample_method", choices=METHODS, default="dpm_solver", help="sampler for grids and evaluation")
    g.add_argument("--sample_steps", type=int, default=20, help="its steps (ddpm uses all T)")
    g.add_argument("--sample_eta", type=float, default=1.0, help="its noise (ddim, dpm_solver): 0 the ODE, 1 the SDE")
    if conditional:
        g = p.add_argument_group("conditioning")
        g.add_argument("--num_classes", type=int, default=10)
        g.add_argument("--p_uncond", type=float, default=0.1, help="label dropout for classifier-free guidance")
        g.add_argument("--guidance_scale", type=float, default=1.0, help="w for sample grids and evaluation")
    return p


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags on the command line itself (not defaults, not the preset's)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def parse_args(argv, conditional: bool) -> argparse.Namespace:
    parser = build_parser(conditional)
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)
    if args.resume:
        refused = sorted(args.given - set(RESUME_OVERRIDES) - {"resume"})
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
    try:
        args.channel_mult, args.attention_resolutions = int_list(args.channel_mult), int_list(args.attention_resolutions)
    except ValueError:
        parser.error("--channel_mult and --attention_resolutions take comma-separated integers")
    if not args.channel_mult or min(args.channel_mult) < 1 or min(args.attention_resolutions, default=1) < 1:
        parser.error("--channel_mult needs at least one level, and it and --attention_resolutions take positive "
                     "integers")
    if args.image_size < 28 or args.image_size % 2:
        parser.error(f"--image_size must be an even number of at least 28, got {args.image_size}")
    try:
        check_schedule(args.beta_schedule, args.timesteps)
    except ValueError as e:
        parser.error(str(e))
    if args.sample_method != "ddpm" and args.sample_steps > args.timesteps:
        parser.error(f"--sample_steps {args.sample_steps} is more than the {args.timesteps} --timesteps")
    if conditional and args.num_classes < MNIST_CLASSES:
        parser.error(f"--num_classes must be at least {MNIST_CLASSES}: MNIST has labels 0-9, got {args.num_classes}")
    if conditional and not 0 <= args.p_uncond <= 1:
        parser.error(f"--p_uncond must be in [0, 1], got {args.p_uncond}")
    return args


def model_config(args) -> dict:
    config = dict(model_channels=args.model_channels, channel_mult=args.channel_mult,
                  num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
                  dropout=args.dropout, activation=args.activation, image_size=args.image_size)
    if getattr(args, "num_classes", None):
        config["num_classes"] = args.num_classes
    return config
