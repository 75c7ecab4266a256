"""Train an unconditional diffusion model (train_conditional.py: the class-conditional one).

    python train.py --preset cpu                              # a small model, ~10 minutes on 2 CPU cores
    python train.py --epochs 100 --batch_size 128 --lr 2e-4   # the documented model, on a GPU
    python train.py --resume checkpoints/NAME/last.pth        # continue exactly where it stopped
    python train.py --preset cpu --dataset fashion_mnist      # another dataset, or a folder of images

This file is the run: its folder, its configuration, the processes under torchrun and the error handling;
trainer.py is the loop. One run = one folder <output_dir>/<experiment_name>/ holding config.json, last.pth,
best_model.pth, samples/, logs/ (TensorBoard), visualizations/ and summary.json.
"""
import datetime
import json
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

import fileio
from checkpoint import load_checkpoint
from cli import UserError, check_output_dir, fail, replaced
from config import fit_to_data, parse_args, preset_values, spec_flags
from data import DataError, has_test_split, held_out, is_named, load_dataset
from metrics import TRAINING_REFERENCE_SIZE, Evaluator, check_sample_count
from runtime import amp_dtype, pick_device
from trainer import Trainer, TrainingLoop

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# What a run writes; a folder holding only these (and no checkpoint) is a run that died before its first
# save, which a new run may replace.
RUN_ARTEFACTS = ("config.json", "logs", "samples", "visualizations", "summary.json")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def init_distributed():
    """(rank, world size, local rank) from torchrun's environment; starts the process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, local_rank


def prepare_new_run_dir(exp_dir: str) -> None:
    """Create the experiment folder, refusing to overwrite a run that has something to resume."""
    check_output_dir(os.path.dirname(exp_dir), "--output_dir")
    if os.path.exists(exp_dir) and not os.path.isdir(exp_dir):
        raise UserError(f"{exp_dir} is a file, not a folder; choose another --experiment_name or --output_dir")
    if os.path.isdir(exp_dir):
        checkpoints = [name for name in ("last.pth", "best_model.pth") if os.path.isfile(os.path.join(exp_dir, name))]
        if checkpoints:
            raise UserError(f"{exp_dir} already holds a run; continue it with --resume "
                            f"{os.path.join(exp_dir, checkpoints[0])} or choose another --experiment_name")
        fileio.remove_stale_temporaries(exp_dir)
        others = sorted(set(os.listdir(exp_dir)) - set(RUN_ARTEFACTS))
        if others:
            raise UserError(f"{exp_dir} holds files that are not a run's ({', '.join(others[:3])}); "
                            "choose another --experiment_name")
        if os.listdir(exp_dir):
            print(f"{exp_dir} holds a run that stopped before its first checkpoint: starting it over", flush=True)
            for name in os.listdir(exp_dir):
                path = os.path.join(exp_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    try:
        os.makedirs(exp_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {exp_dir}: {e.strerror}") from None


def setup(args, given: set, conditional: bool, check_new: bool = True):
    """The run's arguments, directory and checkpoint to resume (None for a new run). A resumed run takes
    its checkpoint's values but for the flags `given`; a new one refuses to overwrite an existing run."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, conditional=conditional, training=True)
        saved = {**ckpt["config"]["args"], **spec_flags(ckpt["sampling"])}  # the spec: what the flags meant then
        args = replaced(args, **{k: v for k, v in saved.items() if k in vars(args) and k != "resume" and k not in given})
        exp_dir = os.path.dirname(os.path.abspath(args.resume))
        fileio.remove_stale_temporaries(exp_dir)
    else:
        kind = args.formulation + ("_conditional" if conditional else "")  # flow_conditional_20261207-101500, say
        args = replaced(args, experiment_name=args.experiment_name or f"{kind}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
        exp_dir = os.path.join(args.output_dir, args.experiment_name)
        if check_new:
            prepare_new_run_dir(exp_dir)
    dataset = args.dataset if is_named(args.dataset) else os.path.abspath(args.dataset)
    return replaced(args, data_dir=os.path.abspath(args.data_dir), dataset=dataset), exp_dir, ckpt  # from anywhere


def run_config(args, conditional: bool, world: int, data: dict | None = None) -> dict:
    """The configuration a run saves in config.json and in every checkpoint; `data`, ImageData.description()
    of its training images."""
    return dict(args=dict(vars(args)), data=data, preset=args.preset and preset_values(args.preset, conditional),
                conditional=conditional, world_size=world,
                torch=torch.__version__, torchvision=__import__("torchvision").__version__, git_commit=git_commit(),
                command=" ".join(sys.argv))


def training_data(args, conditional: bool, rank: int = 0) -> tuple:
    """(args, train, test) of a run: its flags that follow the data (config.fit_to_data) and the ImageData it
    trains on and tests on (rank 0 only): the dataset's test split, or a share of a folder held out."""
    data = load_dataset(args.dataset, args.data_dir, train=True, image_size=args.image_size)
    args = fit_to_data(args, data, conditional)
    if data.classes and not is_named(args.dataset) and not conditional and rank == 0:
        print(f"{args.dataset} has {len(data.classes)} class folders: train.py ignores them "
              "(train_conditional.py learns them)", flush=True)
    if not has_test_split(args.dataset):
        return (args, *held_out(data))  # every rank trains on the same images
    return args, data, load_dataset(args.dataset, args.data_dir, train=False, image_size=args.image_size) if rank == 0 else None


def start(args, given: set, conditional: bool, rank: int, world: int, local_rank: int):
    """(Trainer, TrainingLoop) of the run, every rank on the same experiment; UserError if it cannot start."""
    check_sample_count(args.eval_samples, "--eval_samples")  # every rank alike, before anything is written
    error, exp_dir, ckpt = None, None, None
    try:
        if rank == 0:
            args, exp_dir, ckpt = setup(args, given, conditional)
    except UserError as e:
        error = str(e)
    if world > 1:  # one decision for all: rank 0's error or experiment name
        shared = [error, args.experiment_name]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
        if rank > 0 and error is None:
            args, exp_dir, ckpt = setup(replaced(args, experiment_name=shared[1]), given, conditional, check_new=False)
    if error is not None:
        raise UserError(error)
    try:
        device = pick_device(args.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
        amp_dtype(device, args.amp)  # a bad --device or --amp fails before the data loads
        args, data, test = training_data(args, conditional, rank)
        evaluator = None
        if rank == 0:  # MNIST is scored by its classifier; other data by fid_inception, whose network is slow to load
            evaluator = Evaluator(args.data_dir, inception=args.dataset != "mnist", device=device, splits=(data, test),
                                  reference_size=TRAINING_REFERENCE_SIZE)
        trainer = Trainer(args, conditional, exp_dir, (data.images, data.labels),
                          run_config(args, conditional, world, data.description()), ckpt, rank, world, device)
        if trainer.is_main:
            fileio.write_json(os.path.join(exp_dir, "config.json"), trainer.run_config)  # once the run can start
    except (UserError, fileio.WriteError):
        if rank == 0 and not args.resume and os.path.isdir(exp_dir) and not os.listdir(exp_dir):
            os.rmdir(exp_dir)  # nothing written when a run cannot start
        raise
    return trainer, TrainingLoop(trainer, evaluator)


def main(argv=None, conditional: bool = False) -> dict | None:
    """Train; under torchrun every process runs this, and rank 0 alone writes the experiment directory."""
    args, given = parse_args(argv, conditional)
    rank, world, local_rank = init_distributed()
    try:
        trainer, loop = start(args, given, conditional, rank, world, local_rank)
    except (UserError, fileio.WriteError) as e:
        fail(str(e))
    try:
        if trainer.is_main:
            print(f"experiment: {trainer.exp_dir} ({trainer.device} x {world}, "
                  f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
                  f"{trainer.batches.per_epoch} steps/epoch)", flush=True)
        summary = loop.run()
        if world > 1:
            dist.barrier()  # every rank reaches the teardown together
    except (FloatingPointError, fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except DataError as e:  # an image of a folder read from disk that cannot be decoded
        saved = "nothing saved yet" if trainer.saved_step is None else f"last.pth holds step {trainer.saved_step}"
        fail(f"{e}; {saved}")
    except KeyboardInterrupt:
        print(f"stopped at once by a second signal; last.pth holds step {trainer.saved_step}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            # DDP holds the process group: free the trainer (and DDP with it) first, so that gloo's threads
            # are joined now rather than at interpreter exit, where a rank can abort.
            del trainer, loop
            dist.destroy_process_group()
    if rank == 0 and summary is not None:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(conditional=False)
