"""The one checkpoint format every script reads and writes.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(..., weights_only=True)`: no pickled objects, nothing executed on load.

    format, version        identify the file
    model_config           UNet / ConditionalUNet keyword arguments
    diffusion_config       GaussianDiffusion keyword arguments
    conditional            bool
    model, ema             state dicts (EMA weights are the ones to sample from)
    step, epoch            training progress
    train_state            optimizer, LR schedule, AMP scaler, RNG states (for exact resume)
    config                 the training run's full configuration
    guidance_scale         optional: the classifier-free guidance a conditional model samples with by
                           default, in place of the run's --guidance_scale (set by checkpoint.py)
    guidance_interval      optional: likewise for --guidance_interval
    class_guidance         optional: a conditional model with a guide: the w of the classifier-free term its
                           autoguidance adds by default (set by checkpoint.py)
    ema_dtype              optional: "bfloat16" when a sampling copy stores its EMA weights so (half the
                           size); they load back into the fp32 network
    guide                  optional: {model_config, ema, step}, a weaker network of the same kind that
                           guidance_scale steers away from (autoguidance) in place of the null class (an
                           unconditional model's guidance_scale needs one): the run's --guide_snapshot, or
                           the --guide_model of a sampling copy

A sampling copy (`python checkpoint.py last.pth model.pt`) keeps the same format without `model` and
`train_state`: a quarter of the size, enough for inference.py and eval.py, not for --resume. The two
trained models in assets/ are such copies; assets/SHA256SUMS holds their checksums.
"""
import dataclasses
import json
import os
import pickle

import torch

from cli import ArgumentParser, UserError, float_list, guarded
from conditional_ddpm import ConditionalUNet, check_guidance_interval, check_guidance_scale
from ddpm_model import GaussianDiffusion, LossConfig, NoiseLevelConfig, UNet
from edm import KarrasDiffusion
from fileio import atomic_write, read_checksums, sha256_file

FORMAT, VERSION = "ddpm-mnist-checkpoint", 1
REQUIRED_KEYS = ("model_config", "diffusion_config", "conditional", "ema", "step")
TRAINING_KEYS = ("model", "train_state")  # absent from a sampling copy
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PRETRAINED = {"unconditional": "ddpm_mnist_unconditional.pt", "conditional": "ddpm_mnist_conditional.pt"}
# What a network's output means is set by its diffusion_config less these, which only shape its training.
TRAINING_ONLY = {f.name for f in dataclasses.fields(NoiseLevelConfig) + dataclasses.fields(LossConfig)} | {
    "timestep_sampling"}


class CheckpointError(UserError):
    """A file that cannot be used as a checkpoint; the message names the file and the problem."""


def save_checkpoint(path: str, model: torch.nn.Module, ema: torch.nn.Module, diffusion: GaussianDiffusion,
                    step: int = 0, epoch: int = 0, train_state: dict | None = None,
                    config: dict | None = None, guide: dict | None = None) -> None:
    """`guide`: {model_config, ema, step} of the network autoguidance steers away from (None: none)."""
    state = dict(format=FORMAT, version=VERSION, model_config=dict(model.config),
                 diffusion_config=dict(diffusion.config), conditional=isinstance(model, ConditionalUNet),
                 model=model.state_dict(), ema=ema.state_dict(), step=int(step), epoch=int(epoch),
                 train_state=train_state or {},
                 config=json.loads(json.dumps(config or {})))  # plain types only, or weights_only loading fails
    if guide is not None:
        state["guide"] = guide
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, conditional: bool | None = None, map_location="cpu", training: bool = False) -> dict:
    """Load and validate a checkpoint. `conditional`, if given, is the kind the caller needs; `training`
    asks for a full checkpoint (weights and optimizer state), not a sampling copy."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if not is_zip:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint") from None
        if isinstance(e, pickle.UnpicklingError):
            found = next((line for line in lines if "GLOBAL" in line), "")  # names the refused global
            culprit = f" ({found.split('GLOBAL', 1)[1].split()[0]})" if found else ""
            raise CheckpointError(f"{path} holds code or objects that are not plain tensors and numbers{culprit}; "
                                  "it was not loaded, since loading it could run that code") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({lines[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a DDPM checkpoint of this repository")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    if conditional is not None and ckpt["conditional"] != conditional:
        kind = "a conditional" if ckpt["conditional"] else "an unconditional"
        script = "train_conditional.py" if ckpt["conditional"] else "train.py"
        raise CheckpointError(f"{path} is {kind} checkpoint; use it with {script}")
    if training and not all(ckpt.get(k) for k in TRAINING_KEYS):
        raise CheckpointError(f"{path} holds only the EMA weights for sampling; continuing a run needs its last.pth")
    return ckpt


def guide_entry(model_config: dict, ema: dict, step: int) -> dict:
    """A checkpoint's `guide`: the network autoguidance steers away from."""
    return dict(model_config=dict(model_config), ema=ema, step=int(step))


def sampling_copy(ckpt: dict, guidance_scale: float | None = None, guidance_interval=None, bf16: bool = False,
                  guide: dict | None = None, class_guidance: float | None = None) -> dict:
    """The checkpoint without what only training needs: the raw weights and the optimizer state;
    `guidance_scale`, `guidance_interval` and `class_guidance`, if given, become the copy's default guidance
    (the run's record stays as it was); `bf16` stores the EMA's floating-point weights in bfloat16 (the
    guide's too); `guide`, a checkpoint from load_guide, goes in as the network autoguidance steers away from."""
    copy = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    if guide is not None:
        copy["guide"] = guide_entry(guide["model_config"], guide["ema"], guide["step"])
    if bf16:
        to_bf16 = lambda state: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
        copy["ema"] = to_bf16(copy["ema"])
        if "guide" in copy:
            copy["guide"] = dict(copy["guide"], ema=to_bf16(copy["guide"]["ema"]))
        copy["ema_dtype"] = "bfloat16"
    if (guidance_scale, guidance_interval) != (None, None) and not (ckpt["conditional"] or "guide" in copy):
        raise UserError("--guidance_scale and --guidance_interval are for conditional models, or a --guide_model")
    if class_guidance is not None and not (ckpt["conditional"] and "guide" in copy):
        raise UserError("--class_guidance is the classifier-free term beside autoguidance: it needs a conditional "
                        "model and the guide it holds (or --guide_model)")
    try:
        if guidance_scale is not None:
            copy["guidance_scale"] = float(check_guidance_scale(guidance_scale))
        if guidance_interval is not None:
            copy["guidance_interval"] = list(check_guidance_interval(guidance_interval))
        if class_guidance is not None:
            copy["class_guidance"] = float(check_guidance_scale(class_guidance, "--class_guidance"))
    except ValueError as e:
        raise UserError(str(e)) from None
    return copy


def load_guide(ckpt: dict, path: str) -> dict:
    """The checkpoint at `path`, checked as a guide for ckpt's model (CheckpointError if it cannot be one):
    autoguidance mixes the two networks' outputs, so both must be of the same kind and process and see the
    same images."""
    guide = load_checkpoint(path)
    shape = ("in_channels", "out_channels", "image_size", "num_classes")
    process = [{k: v for k, v in c["diffusion_config"].items() if k not in TRAINING_ONLY} for c in (ckpt, guide)]
    if (guide["conditional"] != ckpt["conditional"] or process[0] != process[1]
            or any(guide["model_config"].get(k) != ckpt["model_config"].get(k) for k in shape)):
        raise CheckpointError(f"{path} cannot guide this model: autoguidance needs a model of the same kind "
                              "(conditional or not), formulation, noise process and image shape")
    return guide


def guide_from_checkpoint(ckpt: dict, path: str | None = None) -> torch.nn.Module | None:
    """The autoguidance network: the EMA weights of the checkpoint at `path`, else the guide `ckpt` holds;
    None when there is neither. On the CPU, in eval mode."""
    guide = load_guide(ckpt, path) if path is not None else ckpt.get("guide")
    if guide is None:
        return None
    model = build_model(guide["model_config"], ckpt["conditional"])
    model.load_state_dict(guide["ema"])
    return model.eval()


def default_guidance(ckpt: dict) -> tuple:
    """(scale, interval, class scale) a checkpoint samples with unless told otherwise: its own, else its
    run's; (0, None, 0) for an unconditional model without a guide. The class scale (a classifier-free
    term beside autoguidance) is a sampling copy's only. An unconditional run's flags count only if it took a
    --guide_snapshot: otherwise its guidance_scale was never used (a guide given to its copy later starts at
    w 0). The interval is None (guide at every noise level) before there was one."""
    if not (ckpt["conditional"] or "guide" in ckpt):
        return 0.0, None, 0.0
    run = ckpt["config"].get("args", {})
    if not (ckpt["conditional"] or run.get("guide_snapshot")):
        run = {}
    interval = ckpt.get("guidance_interval", run.get("guidance_interval"))
    return (ckpt.get("guidance_scale", run.get("guidance_scale", 0.0)), None if interval is None else tuple(interval),
            ckpt.get("class_guidance", 0.0))


def pretrained_path(kind: str) -> str:
    """The path of a model shipped in assets/, after checking it against assets/SHA256SUMS (a clone
    without Git LFS or a damaged download fails here, with one line, instead of somewhere in torch.load)."""
    name = PRETRAINED[kind]
    path = os.path.join(ASSETS_DIR, name)
    expected = read_checksums(os.path.join(ASSETS_DIR, "SHA256SUMS")).get(name)
    if not os.path.isfile(path) or expected is None:
        raise CheckpointError(f"{path} or its line in {os.path.join(ASSETS_DIR, 'SHA256SUMS')} is missing")
    if sha256_file(path) != expected:
        raise CheckpointError(f"{path} does not match its checksum in assets/SHA256SUMS: the file is damaged")
    return path


def build_model(model_config: dict, conditional: bool) -> torch.nn.Module:
    config = dict(model_config)
    if conditional:
        return ConditionalUNet(**config)
    config.pop("num_classes", None)
    return UNet(**config)


def build_diffusion(diffusion_config: dict):
    """The process of a diffusion_config: KarrasDiffusion for the continuous formulations, else (the
    checkpoints of the seed included, which have no formulation) GaussianDiffusion."""
    if diffusion_config.get("formulation", "ddpm") == "ddpm":
        return GaussianDiffusion(**diffusion_config)
    return KarrasDiffusion(**diffusion_config)


def model_from_checkpoint(ckpt: dict, use_ema: bool = True):
    """(model, diffusion) ready to sample from, on the CPU, in eval mode."""
    if not use_ema and "model" not in ckpt:
        raise CheckpointError("this checkpoint holds only the EMA weights (a sampling copy); --no_ema needs a run's "
                              "last.pth or best_model.pth")
    model = build_model(ckpt["model_config"], ckpt["conditional"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])  # into fp32 parameters, whatever the stored dtype
    return model.eval(), build_diffusion(ckpt["diffusion_config"])


@guarded
def main(argv=None):
    p = ArgumentParser(description="Write the sampling copy of a checkpoint: EMA weights, model and diffusion "
                                   "config, the run's configuration; no optimizer state.")
    p.add_argument("checkpoint", help="a last.pth or best_model.pth")
    p.add_argument("output", help="the file to write (refused if it exists)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="the guidance the copy samples with by default (conditional models, or with "
                        "--guide_model; default: the run's)")
    p.add_argument("--guidance_interval", type=float_list, default=None, metavar="LO,HI",
                   help="the noise levels it guides at by default (default: the run's)")
    p.add_argument("--class_guidance", type=float, default=None, metavar="W",
                   help="a conditional model with a guide: the w of the classifier-free term its autoguidance adds by "
                        "default (default: none)")
    p.add_argument("--guide_model", default=None, metavar="PATH",
                   help="a weaker checkpoint of the same kind (fewer steps, or a smaller network) for the copy to hold: "
                        "its guidance then steers away from that network (autoguidance) instead of the null class")
    p.add_argument("--bf16", action="store_true", help="store the EMA weights in bfloat16: half the size; they load "
                                                       "back into the fp32 network")
    args = p.parse_args(argv)
    if os.path.exists(args.output):
        raise UserError(f"{args.output} exists; remove it or choose another name")
    ckpt = load_checkpoint(args.checkpoint)
    guide = load_guide(ckpt, args.guide_model) if args.guide_model else None
    copy = sampling_copy(ckpt, args.guidance_scale, args.guidance_interval, args.bf16, guide, args.class_guidance)
    atomic_write(args.output, lambda tmp: torch.save(copy, tmp))
    print(f"{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB, sha256 {sha256_file(args.output)}")


if __name__ == "__main__":
    main()
