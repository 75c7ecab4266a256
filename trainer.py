"""The training loop behind train.py and train_conditional.py.

One run = one experiment directory <output_dir>/<experiment_name>/ holding config.json, last.pth,
best_model.pth, samples/, logs/ (TensorBoard), visualizations/ and summary.json. Runs stop cleanly
on --epochs, --max_steps, --time_budget, SIGINT or SIGTERM, and --resume continues exactly.
"""
import argparse
import copy
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fileio
import utils
from checkpoint import build_model, load_checkpoint, save_checkpoint
from cli import ArgumentParser, UserError, add_speed_args, check_output_dir, fail
from conditional_ddpm import drop_labels
from data import load_mnist, to_model_range, to_uint8
from ddpm_model import BETA_SCHEDULES, METHODS, PREDICTIONS, GaussianDiffusion, check_schedule
from metrics import MIN_SAMPLES, Evaluator
from runtime import amp_dtype, autocast, pick_device
from sampling import default_labels, digit_rows, generate, make_sampler

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

# A small model for machines without a GPU, the winner of sweep.py (docs/cpu_recipe.md): 9.5 minutes of
# training, as many epochs as that allows, the learning rate annealed to the budget's end.
PRESETS = {
    "cpu": dict(model_channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="",
                dropout=0.0, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, min_snr_gamma=5.0,
                epochs=100, save_freq=1, eval_freq=1, eval_samples=200, time_budget=9.5),
}
# Why a run stops, in increasing strength: under DDP every rank adopts the strongest reason any rank has.
STOP_REASONS = (None, "max_steps", "time_budget", "SIGINT", "SIGTERM")
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


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def model_config(args) -> dict:
    config = dict(model_channels=args.model_channels, channel_mult=args.channel_mult,
                  num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
                  dropout=args.dropout, activation=args.activation, image_size=args.image_size)
    if getattr(args, "num_classes", None):
        config["num_classes"] = args.num_classes
    return config


def log_hparams(writer, run_args: dict, metrics: dict) -> None:
    """The run's flags and final evaluation in TensorBoard's HParams tab, which lines up the runs under one
    --logdir (a sweep, say) side by side. The metrics point at the eval/ scalars already logged."""
    from torch.utils.tensorboard.summary import hparams
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_args.items()}
    for summary in hparams(flat, {f"eval/{k}": v for k, v in metrics.items()}):
        writer.file_writer.add_summary(summary)


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


class Trainer:
    def __init__(self, args, conditional: bool, exp_dir: str, ckpt=None, rank: int = 0, world: int = 1,
                 local_rank: int = 0):
        self.args, self.conditional, self.exp_dir = args, conditional, exp_dir
        self.rank, self.world, self.is_main = rank, world, rank == 0
        if args.batch_size % world:
            raise UserError(f"--batch_size {args.batch_size} (the global batch) must divide among {world} processes")
        self.device = pick_device(args.device)
        if self.device.type == "cuda" and world > 1:
            self.device = torch.device("cuda", local_rank)
        amp = amp_dtype(self.device, args.amp)  # checked before the data is loaded
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        images, labels = load_mnist(args.data_dir, train=True)
        # The whole training set lives on the device as uint8 and is indexed per batch.
        self.pad = (args.image_size - images.shape[-1]) // 2  # centred in black, like MNIST's own 20 -> 28 padding
        self.images, self.labels = F.pad(images, (self.pad,) * 4).to(self.device), labels.to(self.device)
        self.steps_per_epoch = len(images) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch_size {args.batch_size} is larger than the training set ({len(images)})")
        self.total_steps = args.epochs * self.steps_per_epoch  # the LR schedule's length; --max_steps cuts it
        self.evaluator = Evaluator(args.data_dir, inception=False, device=self.device, train_images=images)

        self.model = build_model(model_config(args), conditional).to(
            self.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model
        if world > 1:  # gradients averaged across ranks; checkpoints keep the bare model (no "module.")
            self.net = DistributedDataParallel(self.model, device_ids=[local_rank] if self.device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net, mode=args.compile)
        self.diffusion = GaussianDiffusion(args.timesteps, args.beta_schedule, args.prediction).to(self.device)
        self.sampler = make_sampler(args.sample_method, args.timesteps,  # of sample grids and evaluations
                                    None if args.sample_method == "ddpm" else args.sample_steps, args.sample_eta,
                                    getattr(args, "guidance_scale", 0.0))
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           **({"fused": True} if cuda else {}))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.data_gen = torch.Generator().manual_seed(args.seed)  # epoch order, on the CPU
        self.noise_gen = torch.Generator(self.device).manual_seed(args.seed + 1)  # timesteps, noise, label dropout
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.epoch_start_state = self.data_gen.get_state()
        self.history = {"step": [], "loss": []}
        self.best = {"metric": None, "value": None, "step": None}
        self.elapsed = 0.0  # training seconds over all sessions of this run, up to session_start
        self.session_start = time.perf_counter()
        if ckpt is not None:
            self.load_state(ckpt)
        self.last_metrics = {}
        self.clock = self.elapsed  # training seconds as all ranks agreed at the last step: drives the LR
        self.saved_step = self.step if ckpt is not None else None  # what last.pth holds
        self.saved_clock = self.clock
        self.stop_reason, self.hurry = None, False

    # -------------------------------------------------------------------------- schedule and state

    def training_seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.session_start

    def lr_factor(self) -> float:
        """Linear warm-up, then a cosine to 0 at the end of the last epoch -- or, with --time_budget, at
        the end of the budget if that comes first, so that a run of unknown length still anneals fully.
        --max_steps and signals cut the schedule without changing it (a resumed run continues exactly)."""
        warmup = self.args.warmup_steps
        if self.step < warmup:
            return (self.step + 1) / warmup
        progress = (self.step - warmup) / max(self.total_steps - warmup, 1)
        if self.args.time_budget is not None:
            progress = max(progress, self.clock / (60 * self.args.time_budget))
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def train_state(self) -> dict:
        state = dict(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step_in_epoch=self.step_in_epoch,
                     epoch_start_state=self.epoch_start_state, noise_gen=self.noise_gen.get_state(),
                     torch_rng=torch.get_rng_state(), history=self.history, best=self.best, elapsed=self.elapsed)
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        s = ckpt["train_state"]
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        self.step, self.epoch, self.step_in_epoch = ckpt["step"], ckpt["epoch"], s["step_in_epoch"]
        self.epoch_start_state = s["epoch_start_state"]
        self.noise_gen.set_state(s["noise_gen"])
        torch.set_rng_state(s["torch_rng"])
        if "cuda_rng" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
        self.history, self.best, self.elapsed = s["history"], s["best"], s["elapsed"]

    def save(self, name: str) -> str:
        path = os.path.join(self.exp_dir, name)
        save_checkpoint(path, self.model, self.ema, self.diffusion, self.step, self.epoch, self.train_state(),
                        config=self.args.saved_config)
        return path

    def checkpoint(self) -> None:
        """last.pth, written by rank 0; every rank notes what it now holds, so that all decide alike."""
        if self.is_main:
            self.save("last.pth")
        self.saved_step, self.saved_clock = self.step, self.clock

    # -------------------------------------------------------------------------- the step

    def autocast(self):
        return autocast(self.device, self.args.amp)

    def train_step(self, idx: torch.Tensor) -> tuple:
        """One optimizer step on the global batch `idx`; under DDP each rank takes every world-th image.

        Timesteps, noise and label dropout are drawn for the whole global batch from one generator and
        sliced, so each rank gets its own draws and N ranks reproduce the single-process run.
        """
        args, share = self.args, slice(self.rank, None, self.world)
        x0 = to_model_range(self.images[idx])
        t = torch.randint(0, args.timesteps, (len(idx),), device=self.device, generator=self.noise_gen)
        noise = torch.randn(x0.shape, device=self.device, generator=self.noise_gen)
        kwargs = {}
        if self.conditional:
            y = drop_labels(self.labels[idx], args.p_uncond, self.model.null_class, self.noise_gen)
            kwargs["y"] = y[share]
        with self.autocast():
            loss = self.diffusion.training_loss(self.net, x0[share], kwargs, t=t[share], noise=noise[share],
                                                min_snr_gamma=args.min_snr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = args.lr * self.lr_factor()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema()
        return loss.detach(), grad_norm.detach()

    @torch.no_grad()  # without it autograd would record the EMA into the next graph
    def update_ema(self) -> None:
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

    # -------------------------------------------------------------------------- evaluation and artefacts

    def sample_labels(self, n: int):
        return digit_rows(self.args.num_classes, n // self.args.num_classes) if self.conditional else None

    def generate(self, n: int, labels=None):
        a = self.args
        return generate(self.ema, self.diffusion, n, self.sampler, labels=labels, batch_size=max(a.batch_size, 100),
                        seed=a.seed, device=self.device, amp=a.amp, compile_mode=a.compile, channels_last=a.channels_last)

    def write_samples(self, writer) -> str:
        n = 10 * (self.args.num_classes if self.conditional else 10)
        images = self.generate(n, self.sample_labels(n))
        path = os.path.join(self.exp_dir, "samples", f"epoch_{self.epoch:03d}.png")
        utils.save_grid(images, path, nrow=10)
        writer.add_image("samples", utils.grid_array(images, 10), self.step, dataformats="HW")
        return path

    @torch.no_grad()
    def test_loss(self) -> float:
        """EMA loss on a fixed part of the MNIST test split, with fixed noise: comparable across evaluations."""
        images, labels = self.evaluator.test_images, self.evaluator.test_labels
        n = min(self.args.eval_samples, len(images))
        gen = torch.Generator(self.device).manual_seed(1234)
        total = 0.0
        for start in range(0, n, 500):
            x0 = to_model_range(F.pad(images[start:start + min(500, n - start)], (self.pad,) * 4).to(self.device))
            kwargs = {"y": labels[start:start + len(x0)].to(self.device)} if self.conditional else {}
            with self.autocast():
                total += self.diffusion.training_loss(self.ema, x0, kwargs, generator=gen).item() * len(x0)
        return total / n

    def evaluate(self, writer) -> dict:
        """Test loss, and the MNIST-domain sample metrics of eval.py; fid_mnist picks best_model.pth."""
        metrics = {"test_loss": self.test_loss()}
        n = self.args.eval_samples
        labels = default_labels(self.ema, n)
        images = to_uint8(self.generate(n, labels))
        images = images[:, self.pad:self.pad + 28, self.pad:self.pad + 28]  # the classifier reads 28x28
        result = self.evaluator.evaluate(images, labels, inception=False, sample_stats=False)["metrics"]
        metrics.update({k: v for k, v in result.items() if v is not None})
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, self.step)
        self.last_metrics = metrics
        key = "fid_mnist"
        if self.best["value"] is None or metrics[key] < self.best["value"]:
            self.best = {"metric": key, "value": metrics[key], "step": self.step}
            self.save("best_model.pth")
        return metrics

    def write_visualizations(self) -> None:
        vis = os.path.join(self.exp_dir, "visualizations")
        if self.history["step"]:
            utils.plot_loss_curve(self.history["step"], self.history["loss"], os.path.join(vis, "loss_curve.png"))
        utils.plot_noise_schedule(self.diffusion, os.path.join(vis, "noise_schedule.png"))

    # -------------------------------------------------------------------------- the loop

    def request_stop(self, signum, _frame) -> None:
        """First signal: finish the step, save, evaluate, exit 0. Second: stop as soon as last.pth is safe."""
        name = signal.Signals(signum).name
        if self.stop_reason in ("SIGINT", "SIGTERM"):
            self.hurry = True
            if self.saved_step == self.step:
                raise KeyboardInterrupt
            print(f"\n{name} again: stopping once last.pth is written", flush=True)
            return
        self.stop_reason = name
        print(f"\n{name} received: finishing this step, then saving last.pth (again to stop sooner)", flush=True)

    def out_of_budget(self) -> bool:
        """Whether to stop after this step; under DDP every rank adopts the strongest reason any rank has,
        and the slowest rank's clock, so that all of them set the same learning rate."""
        a = self.args
        self.clock = self.training_seconds()
        if a.max_steps is not None and self.step >= a.max_steps:
            self.stop_reason = self.stop_reason or "max_steps"
        if self.world > 1:
            shared = torch.tensor([STOP_REASONS.index(self.stop_reason), self.clock], device=self.device,
                                  dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            self.stop_reason, self.clock = STOP_REASONS[int(shared[0])], shared[1].item()
        if a.time_budget is not None and self.clock >= 60 * a.time_budget:
            self.stop_reason = self.stop_reason or "time_budget"
        return self.stop_reason is not None

    def log(self, writer, window: dict, grad_norm, bar, interactive: bool):
        """Read the loss (the only host sync of the loop), check it, and report it."""
        loss = window["loss"] / window["steps"]
        if self.world > 1:
            dist.all_reduce(loss)
            loss = loss / self.world
        loss = loss.item()
        if not math.isfinite(loss):
            kept = (f"last.pth keeps step {self.saved_step}, the last good state" if self.saved_step is not None
                    else "no checkpoint had been written yet")
            raise FloatingPointError(f"loss became {loss} at step {self.step}; {kept}")
        images_per_sec = window["steps"] * self.args.batch_size / (time.perf_counter() - window["t"])
        if self.is_main:
            lr = self.optimizer.param_groups[0]["lr"]
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm.item()),
                                ("images_per_sec", images_per_sec)):
                writer.add_scalar(f"train/{name}", value, self.step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}")
            if not interactive:
                print(f"epoch {self.epoch + 1} step {self.step} loss {loss:.4f} lr {lr:.2e} "
                      f"{images_per_sec:.0f} img/s", flush=True)
        self.history["step"].append(self.step)
        self.history["loss"].append(loss)
        return images_per_sec

    def end_of_epoch(self, writer, final: bool, finished_epoch: bool) -> None:
        """last.pth, then sample grid and evaluation, on rank 0 when due; the other ranks wait for it.

        The checkpoint comes first and the rest cannot lose it: a failing evaluation or plot is reported
        and the run goes on (a bug in a metric must not cost a 100-epoch run)."""
        a = self.args
        if final or (finished_epoch and self.epoch % a.save_freq == 0):
            self.checkpoint()
            if self.hurry:
                raise KeyboardInterrupt
            if self.is_main:
                self.survive("sample grid", lambda: self.write_samples(writer), writer)
                self.survive("plots", self.write_visualizations, writer)
        if self.is_main and (final or (finished_epoch and self.epoch % a.eval_freq == 0)):
            metrics = self.survive("evaluation", lambda: self.evaluate(writer), writer)
            if metrics:
                print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if self.world > 1:
            dist.barrier()

    def survive(self, what: str, work, writer):
        """work(), or None with a warning on stderr and in TensorBoard if it fails for any reason but a stop."""
        try:
            return work()
        except Exception as e:  # noqa: BLE001 -- whatever went wrong, the run and its checkpoint go on
            message = f"{what} failed at step {self.step} and was skipped: {type(e).__name__}: {e}"
            print(f"warning: {message}", file=sys.stderr, flush=True)
            writer.add_text("warnings", message, self.step)
            return None

    def train(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        a = self.args
        writer = SummaryWriter(os.path.join(self.exp_dir, "logs"), purge_step=self.step or None) if self.is_main else None
        if writer is not None and self.step == 0:
            writer.add_text("config", "```\n" + json.dumps(self.args.saved_config, indent=2) + "\n```")
        handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        interactive = sys.stdout.isatty() and self.is_main
        self.session_start = time.perf_counter()
        new_window = lambda: {"loss": torch.zeros((), device=self.device), "steps": 0, "t": time.perf_counter()}
        window, images_per_sec, first_step = new_window(), None, self.step
        try:
            if self.out_of_budget():
                print(f"nothing to train: the run is at step {self.step} ({self.stop_reason})", flush=True)
                return None
            while self.epoch < a.epochs and not self.out_of_budget():  # a stop during an epoch's evaluation too
                if self.step_in_epoch == 0:
                    self.epoch_start_state = self.data_gen.get_state()
                self.data_gen.set_state(self.epoch_start_state)
                order = torch.randperm(len(self.images), generator=self.data_gen).to(self.device)
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not interactive,
                           desc=f"epoch {self.epoch + 1}/{a.epochs}", dynamic_ncols=True)
                while self.step_in_epoch < self.steps_per_epoch:
                    i = self.step_in_epoch
                    loss, grad_norm = self.train_step(order[i * a.batch_size:(i + 1) * a.batch_size])
                    window["loss"] += loss
                    window["steps"] += 1
                    self.step += 1
                    self.step_in_epoch += 1
                    bar.update()
                    stopping = self.out_of_budget()
                    save_due = (a.save_every_minutes > 0 and not stopping
                                and self.clock - self.saved_clock >= 60 * a.save_every_minutes)
                    if (self.step % a.log_every == 0 or stopping or save_due
                            or self.step_in_epoch == self.steps_per_epoch):  # checks the loss before any save
                        images_per_sec = self.log(writer, window, grad_norm, bar, interactive)
                        window = new_window()
                    if save_due:
                        self.checkpoint()
                    if stopping:
                        break
                bar.close()
                finished_epoch = self.step_in_epoch == self.steps_per_epoch
                if finished_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.elapsed = self.training_seconds()
                self.end_of_epoch(writer, self.stop_reason is not None or self.epoch >= a.epochs, finished_epoch)
                self.session_start = time.perf_counter()  # evaluation and saving do not count against the budget
            if self.saved_step != self.step:  # stopped while an epoch end that saved nothing was evaluating
                self.end_of_epoch(writer, final=True, finished_epoch=False)
            summary = dict(stopped_by=self.stop_reason or "epochs", steps=self.step, epochs=self.epoch,
                           steps_this_session=self.step - first_step,
                           final_loss=self.history["loss"][-1] if self.history["loss"] else None,
                           best_loss=min(self.history["loss"], default=None),
                           best_model=dict(self.best), wall_time_s=round(self.elapsed, 1),
                           images_per_sec=images_per_sec, device=str(self.device), world_size=self.world)
            if self.is_main:
                fileio.write_json(os.path.join(self.exp_dir, "summary.json"), summary)
                if self.last_metrics:
                    log_hparams(writer, self.args.saved_config["args"], self.last_metrics)
                if self.stop_reason in ("SIGINT", "SIGTERM"):
                    print(f"stopped by {self.stop_reason}; resume with --resume {os.path.join(self.exp_dir, 'last.pth')}")
            return summary
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if writer is not None:
                writer.close()


# What a run writes; a folder holding only these (and no checkpoint) is a run that died before its first
# save, which a new run may replace.
RUN_ARTEFACTS = ("config.json", "logs", "samples", "visualizations", "summary.json")


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


def setup(args, conditional: bool, world: int = 1, check_new: bool = True):
    """Resolve the experiment directory and configuration; refuse to overwrite an existing run."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, conditional=conditional, training=True)
        for name, value in ckpt["config"]["args"].items():
            if name in vars(args) and name != "resume" and name not in args.given:
                setattr(args, name, value)
        exp_dir = os.path.dirname(os.path.abspath(args.resume))
        fileio.remove_stale_temporaries(exp_dir)
    else:
        kind = "conditional" if conditional else "ddpm"
        args.experiment_name = args.experiment_name or f"{kind}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
        exp_dir = os.path.join(args.output_dir, args.experiment_name)
        if check_new:
            prepare_new_run_dir(exp_dir)
    args.data_dir = os.path.abspath(args.data_dir)  # a resumed run may start from another folder
    run_args = {k: v for k, v in vars(args).items() if k != "given"}
    args.saved_config = dict(args=run_args, preset=PRESETS.get(args.preset), conditional=conditional,
                             world_size=world, torch=torch.__version__,
                             torchvision=__import__("torchvision").__version__, git_commit=git_commit(),
                             command=" ".join(sys.argv))
    return exp_dir, ckpt


def main(argv=None, conditional: bool = False) -> dict:
    """Train; under torchrun every process runs this, and rank 0 alone writes the experiment directory."""
    args = parse_args(argv, conditional)
    rank, world, local_rank = init_distributed()
    exp_dir = None
    try:
        error = None
        try:
            if rank == 0:
                exp_dir, ckpt = setup(args, conditional, world)
        except UserError as e:
            error = str(e)
        if world > 1:  # one decision for all: rank 0's error or experiment name
            shared = [error, args.experiment_name]
            dist.broadcast_object_list(shared, src=0)
            error, args.experiment_name = shared
            if rank > 0 and error is None:
                exp_dir, ckpt = setup(args, conditional, world, check_new=False)
        if error is not None:
            raise UserError(error)
        trainer = Trainer(args, conditional, exp_dir, ckpt, rank, world, local_rank)
        if trainer.is_main:
            fileio.write_json(os.path.join(exp_dir, "config.json"), args.saved_config)  # once the run can start
    except (UserError, fileio.WriteError) as e:
        if rank == 0 and not args.resume and exp_dir and os.path.isdir(exp_dir) and not os.listdir(exp_dir):
            os.rmdir(exp_dir)  # nothing written when a run cannot start
        fail(str(e))
    try:
        if trainer.is_main:
            print(f"experiment: {exp_dir} ({trainer.device} x {world}, "
                  f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
                  f"{trainer.steps_per_epoch} steps/epoch)", flush=True)
        summary = trainer.train()
    except (FloatingPointError, fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"stopped at once by a second signal; last.pth holds step {trainer.saved_step}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main and summary is not None:
        print(json.dumps(summary, indent=2))
    return summary
