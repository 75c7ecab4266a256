"""The one checkpoint format every script reads and writes.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(..., weights_only=True)`: no pickled objects, nothing executed on load.

    format, version        identify the file
    model_config           the network: ModelConfig's fields, and num_classes for a conditional one
    diffusion_config       DiffusionConfig's fields: the formulation and its settings
    conditional            bool
    model, ema             state dicts (EMA weights are the ones to sample from)
    step, epoch            training progress
    train_state            optimizer, LR schedule, AMP scaler, RNG states (for exact resume)
    config                 the training run's full configuration; its `data` describes the training images
                           (dataset, image_size, channels, classes; absent before other datasets than MNIST)
    sampling               the SamplingSpec the file samples with by default: the run's sampler and guidance,
                           or what `python checkpoint.py` gave its copy
    ema_dtype              optional: "bfloat16" when a sampling copy stores its EMA weights so (half the
                           size); they load back into the fp32 network
    guide                  optional: {model_config, ema, step}, the weaker network of the same kind that
                           autoguidance steers away from: the run's --guide_snapshot, or the --guide_model of
                           a sampling copy

Files of version 1 have no `sampling`; `upgrade` gives them one in memory at every load.

A sampling copy (`python checkpoint.py last.pth model.pt`) keeps the same format without `model` and
`train_state`: a quarter of the size, enough for inference.py and eval.py, not for --resume. The two
trained models in assets/ are such copies; assets/SHA256SUMS holds their checksums.
"""
import dataclasses
import json
import os
import pickle

import torch

from cli import ArgumentParser, UserError, add_fields, guarded
from conditional_ddpm import ConditionalUNet
from config import create_model_and_diffusion, stored_configs
from data import MNIST_DESCRIPTION
from diffusion import SamplingSpec, check_sampling
from fileio import atomic_write, read_checksums, sha256_file

FORMAT, VERSION = "ddpm-mnist-checkpoint", 2
REQUIRED_KEYS = ("model_config", "diffusion_config", "conditional", "ema", "step")
TRAINING_KEYS = ("model", "train_state")  # absent from a sampling copy
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PRETRAINED = {"unconditional": "mnist_flow_unconditional.pt", "conditional": "mnist_flow_conditional.pt"}
# What a network's output means is its diffusion_config less these, which only shape its training.
TRAINING_ONLY = ("p_mean", "p_std", "range_loss", "timestep_sampling", "min_snr_gamma")


class CheckpointError(UserError):
    """A file that cannot be used as a checkpoint; the message names the file and the problem."""


def plain(value):
    """Lists, dicts and numbers only (tuples become lists), which weights_only loading and JSON both take."""
    return json.loads(json.dumps(value))


def save_checkpoint(path: str, model: torch.nn.Module, ema: torch.nn.Module, diffusion, sampling: SamplingSpec,
                    step: int = 0, epoch: int = 0, train_state: dict | None = None, config: dict | None = None,
                    guide: dict | None = None) -> None:
    """`sampling`: the spec the file samples with by default; `guide`: {model_config, ema, step} of the network
    autoguidance steers away from (None: none)."""
    state = dict(format=FORMAT, version=VERSION, model_config=model_config_of(model),
                 diffusion_config=dataclasses.asdict(diffusion.config), conditional=isinstance(model, ConditionalUNet),
                 model=model.state_dict(), ema=ema.state_dict(), step=int(step), epoch=int(epoch),
                 train_state=train_state or {}, config=plain(config or {}),
                 sampling=plain(dataclasses.asdict(sampling)))
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
    try:
        return upgrade(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def model_config_entry(network, num_classes: int | None) -> dict:
    """A checkpoint's `model_config`: ModelConfig's fields, and num_classes for a conditional network."""
    return plain(dict(dataclasses.asdict(network), **({} if num_classes is None else {"num_classes": num_classes})))


def model_config_of(model: torch.nn.Module) -> dict:
    return model_config_entry(model.config, model.num_classes if isinstance(model, ConditionalUNet) else None)


def upgrade(ckpt: dict) -> dict:
    """A checkpoint of an earlier version as this version writes it, in memory (a file is never rewritten);
    ValueError for a setting this version does not take.

    Version 1 stored each configuration in the form of its day, and no `sampling`. Its default sampler was
    its run's --sample_method, --sample_steps and --sample_eta; its guidance the file's own guidance_scale,
    guidance_interval and class_guidance, else the flags of a run that guided (a conditional one, or one with
    --guide_snapshot); and its guidance_scale meant autoguidance on a file that holds a guide, classifier-free
    guidance on any other. The only code that reads those."""
    network, num_classes, diffusion = stored_configs(ckpt["model_config"], ckpt["diffusion_config"])
    if ckpt.get("version", 1) >= 2:
        return ckpt
    ckpt = dict(ckpt, version=VERSION, model_config=model_config_entry(network, num_classes),
                diffusion_config=dataclasses.asdict(diffusion))
    if "guide" in ckpt:
        guide_network, _, _ = stored_configs(ckpt["guide"]["model_config"], ckpt["diffusion_config"])
        ckpt["guide"] = dict(ckpt["guide"], model_config=model_config_entry(guide_network, num_classes))
    own = {k: ckpt.pop(k) for k in ("guidance_scale", "guidance_interval", "class_guidance") if k in ckpt}
    run = ckpt["config"].get("args", {})
    conditional, guided = ckpt["conditional"], "guide" in ckpt
    flags = run if conditional or run.get("guide_snapshot") else {}  # an unguided run's guidance_scale was unused
    scale = own.get("guidance_scale", flags.get("guidance_scale", 0.0)) if conditional or guided else 0.0
    interval = own.get("guidance_interval", flags.get("guidance_interval")) if conditional or guided else None
    method = run.get("sample_method", SamplingSpec.method)
    spec = SamplingSpec(method=method, steps=run.get("sample_steps"),
                        eta=None if method == "ddpm" else run.get("sample_eta"),  # ddpm took no eta then
                        guidance_scale=own.get("class_guidance", 0.0) if guided else scale,
                        autoguidance_scale=scale if guided else 0.0, guidance_interval=interval)
    ckpt["sampling"] = plain(dataclasses.asdict(check_sampling(spec, diffusion.levels, conditional, guided)))
    return ckpt


def data_of(ckpt: dict) -> dict:
    """What a checkpoint's model was trained on: {dataset, image_size, channels, classes}; a file written before
    other datasets than MNIST learned MNIST."""
    return ckpt.get("config", {}).get("data") or dict(MNIST_DESCRIPTION)


def guide_entry(model_config: dict, ema: dict, step: int) -> dict:
    """A checkpoint's `guide`: the network autoguidance steers away from."""
    return dict(model_config=dict(model_config), ema=ema, step=int(step))


def default_spec(ckpt: dict) -> SamplingSpec:
    """The spec a checkpoint samples with unless told otherwise."""
    spec = ckpt["sampling"]
    interval = spec["guidance_interval"]
    return SamplingSpec(**dict(spec, guidance_interval=None if interval is None else tuple(interval)))


def sampling_copy(ckpt: dict, overrides: dict | None = None, bf16: bool = False, guide: dict | None = None) -> dict:
    """The checkpoint without what only training needs: the raw weights and the optimizer state. `overrides`
    (SamplingSpec fields; None keeps the checkpoint's) set the copy's default spec; `bf16` stores the EMA's
    floating-point weights in bfloat16 (the guide's too); `guide`, a checkpoint from load_guide, goes in as the
    network autoguidance steers away from. ValueError for a spec the copy cannot sample with."""
    copy = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    if guide is not None:
        copy["guide"] = guide_entry(guide["model_config"], guide["ema"], guide["step"])
    if bf16:
        to_bf16 = lambda state: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
        copy["ema"] = to_bf16(copy["ema"])
        if "guide" in copy:
            copy["guide"] = dict(copy["guide"], ema=to_bf16(copy["guide"]["ema"]))
        copy["ema_dtype"] = "bfloat16"
    levels = stored_configs(ckpt["model_config"], ckpt["diffusion_config"])[2].levels
    spec = check_sampling(default_spec(ckpt).overridden(**(overrides or {})), levels, ckpt["conditional"],
                          "guide" in copy)
    copy["sampling"] = plain(dataclasses.asdict(spec))
    return copy


def sampled_process(ckpt: dict) -> dict:
    """What a network's output means: its diffusion configuration less the settings of its training."""
    config = dataclasses.asdict(stored_configs(ckpt["model_config"], ckpt["diffusion_config"])[2])
    return {k: v for k, v in config.items() if k not in TRAINING_ONLY}


def load_guide(ckpt: dict, path: str) -> dict:
    """The checkpoint at `path`, checked as a guide for ckpt's model (CheckpointError if it cannot be one):
    autoguidance mixes the two networks' outputs, so both must be of the same kind and process and see the
    same images."""
    guide = load_checkpoint(path)
    shape = ("in_channels", "image_size", "num_classes")
    if (guide["conditional"] != ckpt["conditional"] or sampled_process(guide) != sampled_process(ckpt)
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
    model, _ = create_model_and_diffusion(guide["model_config"], ckpt["diffusion_config"])
    model.load_state_dict(guide["ema"])
    return model.eval()


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


def model_from_checkpoint(ckpt: dict):
    """(model, diffusion) ready to sample from, with the EMA weights, on the CPU, in eval mode."""
    model, diffusion = create_model_and_diffusion(ckpt["model_config"], ckpt["diffusion_config"])
    model.load_state_dict(ckpt["ema"])  # into fp32 parameters, whatever the stored dtype
    return model.eval(), diffusion


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write the sampling copy of a checkpoint: EMA weights, model and diffusion "
                                   "config, the run's configuration and the default sampling spec; no optimizer "
                                   "state.")
    p.add_argument("checkpoint", help="a last.pth or best_model.pth")
    p.add_argument("output", help="the file to write (refused if it exists)")
    add_fields(p.add_argument_group("the copy's default sampling spec (unset: the checkpoint's)"), SamplingSpec,
               unset=True)
    p.add_argument("--guide_model", default=None, metavar="PATH",
                   help="a weaker checkpoint of the same kind (fewer steps, or a smaller network) for the copy to "
                        "hold: the network its autoguidance steers away from")
    p.add_argument("--bf16", action="store_true", help="store the EMA weights in bfloat16: half the size; they load "
                                                       "back into the fp32 network")
    return p


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.output):
        raise UserError(f"{args.output} exists; remove it or choose another name")
    ckpt = load_checkpoint(args.checkpoint)
    guide = load_guide(ckpt, args.guide_model) if args.guide_model else None
    try:
        copy = sampling_copy(ckpt, {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingSpec)},
                             args.bf16, guide)
    except ValueError as e:
        raise UserError(str(e)) from None
    atomic_write(args.output, lambda tmp: torch.save(copy, tmp))
    print(f"{args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB, sha256 {sha256_file(args.output)}")


if __name__ == "__main__":
    main()
