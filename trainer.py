"""The training loop behind train.py and train_conditional.py.

`Trainer` holds what a checkpoint carries: the network, its EMA, the optimiser, the diffusion process, the
training step and the run's progress, saved and resumed exactly. Around it, small pieces: `lr_factor`, the
`TrainingClock`, the `StopPolicy`, the `Batches` of each epoch, the `LossLog`, and the `TrainingLoop` that
runs epochs until the run stops and writes last.pth, sample grids and evaluations when they are due.
"""
import copy
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

import fileio
from artefacts import RunArtefacts
from checkpoint import guide_entry, guide_from_checkpoint, model_config_of, save_checkpoint
from cli import UserError
from config import create_model_and_diffusion, diffusion_config, model_config, sampling_spec
from data import DataError, ImageFiles, to_model_range
from diffusion import check_sampling
from runtime import amp_dtype, autocast

# What chooses best_model.pth: the first of these an evaluation has (MNIST; other data with the Inception
# network; without it)
BEST_BY = ("fid_mnist", "fid_inception", "test_loss")
# Why a run stops, in increasing strength: under DDP every rank adopts the strongest reason any rank has.
STOP_REASONS = (None, "max_steps", "time_budget", "SIGINT", "SIGTERM")
DISK_WORKERS = min(4, os.cpu_count() or 1)  # DataLoader workers decoding a folder read from disk


def lr_factor(step: int, total_steps: int, warmup_steps: int, seconds: float, budget_seconds: float | None) -> float:
    """Linear warm-up, then a cosine to 0 at the end of the last epoch -- or, with a time budget, at the end
    of the budget if that comes first, so that a run of unknown length still anneals fully. --max_steps and
    signals cut the schedule without changing it (a resumed run continues exactly)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if budget_seconds is not None:
        progress = max(progress, seconds / budget_seconds)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_share(step: int, total_steps: int, seconds: float, budget_seconds: float | None) -> float:
    """The share of the run done: of the epochs' steps, or of the time budget if that ends the run first."""
    return max(step / total_steps, 0.0 if budget_seconds is None else seconds / budget_seconds)


class TrainingClock:
    """Seconds of training over all sessions of a run. It runs only while the run trains (saving and
    evaluating do not count against --time_budget), and `agreed` is the reading every rank took at the
    last step, which drives the learning rate, the budget and the mid-epoch saves."""

    def __init__(self, seconds: float = 0.0):
        self.elapsed, self.since, self.agreed = seconds, None, seconds

    def start(self) -> None:
        self.since = time.perf_counter()

    def pause(self) -> None:
        self.elapsed, self.since = self.read(), None

    def read(self) -> float:
        return self.elapsed + (0.0 if self.since is None else time.perf_counter() - self.since)


class StopPolicy:
    """When a run stops: --max_steps, --time_budget on the training clock, or SIGINT/SIGTERM. The first
    signal lets the step finish and the run save and evaluate; a second stops as soon as last.pth holds
    the current step (`checkpoint_is_current`, which the loop keeps up to date)."""

    def __init__(self, max_steps: int | None, time_budget: float | None, world: int, device):
        self.max_steps, self.budget_seconds = max_steps, None if time_budget is None else 60 * time_budget
        self.world, self.device = world, device
        self.reason, self.hurry, self.checkpoint_is_current = None, False, False

    def request(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.reason in ("SIGINT", "SIGTERM"):
            self.hurry = True
            if self.checkpoint_is_current:
                raise KeyboardInterrupt
            print(f"\n{name} again: stopping once last.pth is written", flush=True)
            return
        self.reason = name
        print(f"\n{name} received: finishing this step, then saving last.pth (again to stop sooner)", flush=True)

    def check(self, step: int, seconds: float) -> float:
        """Decide after a step whether to stop (`reason`); returns the training seconds all ranks agree on.
        Under DDP every rank adopts the strongest reason any rank has and the slowest rank's clock, so that
        all of them set the same learning rate and stop at the same step."""
        if self.max_steps is not None and step >= self.max_steps:
            self.reason = self.reason or "max_steps"
        if self.world > 1:
            shared = torch.tensor([STOP_REASONS.index(self.reason), seconds], device=self.device, dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            self.reason, seconds = STOP_REASONS[int(shared[0])], shared[1].item()
        if self.budget_seconds is not None and seconds >= self.budget_seconds:
            self.reason = self.reason or "time_budget"
        return seconds


class Batches:
    """The training images, batch by batch, in each epoch's order, drawn from a generator whose state at the
    epoch's start is saved so that a resumed run replays the same epoch. Each rank gets every world-th image
    of the global batch.

    A dataset in memory goes to the device as uint8 and is indexed there per batch (no loader workers); a
    folder too large for that (data.ImageFiles) is read from disk by a DataLoader whose workers decode the
    batches ahead of the step."""

    def __init__(self, images, labels: torch.Tensor, batch_size: int, pad: int, device, seed: int,
                 rank: int = 0, world: int = 1):
        self.on_disk = isinstance(images, ImageFiles)
        if self.on_disk:
            self.images = images  # folders are resized to --image_size, never padded
        else:  # centred in black, like MNIST's own 20 -> 28 padding (only grey images [N, H, W] are ever padded)
            self.images = (F.pad(images, (pad,) * 4) if pad else images).to(device)
        self.labels, self.batch_size, self.device = labels.to(device), batch_size, device
        self.share = slice(rank, None, world)
        self.per_epoch = len(images) // batch_size
        if self.per_epoch == 0:
            raise UserError(f"--batch_size {batch_size} is larger than the training set ({len(images)})")
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, so every device draws the same order
        self.epoch_start_state = self.generator.get_state()

    def epoch_order(self, new_epoch: bool) -> torch.Tensor:
        if new_epoch:
            self.epoch_start_state = self.generator.get_state()
        self.generator.set_state(self.epoch_start_state)
        return torch.randperm(len(self.images), generator=self.generator)

    def take(self, idx: torch.Tensor) -> tuple:
        """(uint8 images, labels) on the device: this rank's share of the global batch `idx`."""
        idx = idx[self.share]
        images = self.images[idx.cpu()].to(self.device) if self.on_disk else self.images[idx.to(self.device)]
        return images, self.labels[idx.to(self.device)]

    def epoch(self, first: int, new_epoch: bool):
        """The batches of the epoch from its step `first` on."""
        order = self.epoch_order(new_epoch)
        if not self.on_disk:
            order = order.to(self.device)  # one copy an epoch: the batches are indexed on the device
        steps = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(first, self.per_epoch)]
        if not self.on_disk:
            yield from map(self.take, steps)
            return
        shares = [idx[self.share] for idx in steps]
        reads = DataLoader(DiskReads(self.images), sampler=shares, batch_size=None, num_workers=DISK_WORKERS,
                           pin_memory=self.device.type == "cuda")
        for idx, images in zip(shares, reads):
            if isinstance(images, str):
                raise DataError(images)
            yield images.to(self.device, non_blocking=True), self.labels[idx.to(self.device)]


class DiskReads(Dataset):
    """ImageFiles for DataLoader workers, one batch of indices per item. An unreadable file comes back as its
    message, for the main process to raise as one line (a worker's exception would bring its traceback)."""

    def __init__(self, images: ImageFiles):
        self.images = images

    def __getitem__(self, idx: torch.Tensor):
        try:
            return self.images[idx]
        except DataError as e:
            return str(e)


class Trainer:
    """The network, its EMA, the optimiser, the diffusion and the training step, with the run's progress, all of
    which last.pth carries and resume restores; and the spec its grids, evaluations and checkpoints sample with."""

    def __init__(self, args, conditional: bool, exp_dir: str | None, data: tuple, run_config: dict | None = None,
                 ckpt: dict | None = None, rank: int = 0, world: int = 1, device=None):
        """`exp_dir`: where checkpoints go (None: nowhere, for a trainer that is only stepped); `data`: (uint8
        images [N, H, W] or [N, H, W, C], labels [N]), padded to --image_size if smaller; `run_config`: what
        every checkpoint records of the run; `ckpt`: a checkpoint to resume; `device`: this rank's device."""
        if args.batch_size % world:
            raise UserError(f"--batch_size {args.batch_size} (the global batch) must divide among {world} processes")
        self.args, self.conditional, self.exp_dir, self.run_config = args, conditional, exp_dir, run_config or {}
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.device = device or torch.device("cpu")
        amp = amp_dtype(self.device, args.amp)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        self.pad = (args.image_size - data[0].shape[1]) // 2
        self.batches = Batches(*data, args.batch_size, self.pad, self.device, args.seed, rank, world)
        self.total_steps = args.epochs * self.batches.per_epoch  # the LR schedule's length; --max_steps cuts it
        self.budget_seconds = None if args.time_budget is None else 60 * args.time_budget

        model, diffusion = create_model_and_diffusion(model_config(args, conditional), diffusion_config(args))
        self.model = model.to(self.device,
                              memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model
        if world > 1:  # gradients averaged across ranks; checkpoints keep the bare model (no "module.")
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        if args.compile:
            self.net = torch.compile(self.net, mode=args.compile)
        self.diffusion = diffusion.to(self.device)
        self.spec = check_sampling(sampling_spec(args), diffusion.levels, conditional, args.guide_snapshot > 0)
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           **({"fused": True} if cuda else {}))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.noise_gen = torch.Generator(self.device).manual_seed(args.seed + 1)  # noise levels, noise, label dropout
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.history = {"step": [], "loss": []}
        self.best = {"metric": None, "value": None, "step": None}
        self.guide, self.guide_step = None, None  # the --guide_snapshot network, once taken
        self.clock = TrainingClock()
        self.saved_step, self.saved_seconds = None, 0.0  # what last.pth holds
        if ckpt is not None:
            self.load_state(ckpt)

    # -------------------------------------------------------------------------- state

    def train_state(self) -> dict:
        state = dict(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                     step_in_epoch=self.step_in_epoch, epoch_start_state=self.batches.epoch_start_state,
                     order_state=self.batches.generator.get_state(),
                     noise_gen=self.noise_gen.get_state(), torch_rng=torch.get_rng_state(), history=self.history,
                     best=self.best, elapsed=self.clock.agreed)
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
        self.batches.epoch_start_state = s["epoch_start_state"]
        if "order_state" in s:  # where the next epoch's order comes from (absent before a run could resume at
            self.batches.generator.set_state(s["order_state"])  # an epoch's end and replay its first epoch)
        self.noise_gen.set_state(s["noise_gen"])
        torch.set_rng_state(s["torch_rng"])
        if "cuda_rng" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
        self.history, self.best = s["history"], s["best"]
        if "guide" in ckpt:
            self.guide, self.guide_step = guide_from_checkpoint(ckpt).to(self.device), ckpt["guide"]["step"]
        self.clock = TrainingClock(s["elapsed"])
        self.saved_step, self.saved_seconds = self.step, s["elapsed"]

    def save(self, name: str) -> None:
        guide = None if self.guide is None else guide_entry(model_config_of(self.guide), self.guide.state_dict(),
                                                            self.guide_step)
        save_checkpoint(os.path.join(self.exp_dir, name), self.model, self.ema, self.diffusion, self.spec, self.step,
                        self.epoch, self.train_state(), config=self.run_config, guide=guide)

    def checkpoint(self) -> None:
        """last.pth, written by rank 0; every rank notes what it now holds, so that all decide alike."""
        if self.is_main:
            self.save("last.pth")
        self.saved_step, self.saved_seconds = self.step, self.clock.agreed

    # -------------------------------------------------------------------------- the step

    def autocast(self):
        return autocast(self.device, self.args.amp)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """One optimizer step on this rank's share of the global batch (Batches.take): uint8 images and labels.

        Noise levels, noise, flips and label dropout are drawn for the whole global batch from one generator
        and sliced, so each rank gets its own draws and N ranks reproduce the single-process run.
        """
        args, share, n = self.args, self.batches.share, len(images) * self.world
        x0 = to_model_range(images)
        if args.random_flip:  # drawn only then, so that runs without flips keep their random stream
            flip = torch.rand(n, device=self.device, generator=self.noise_gen)[share] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        sigma = self.diffusion.draw_noise_levels(n, self.device, self.noise_gen)[share]
        noise = torch.randn((n,) + x0.shape[1:], device=self.device, generator=self.noise_gen)[share]
        kwargs = {}
        if self.conditional:
            # classifier-free guidance's training trick: the null class in place of the label, at rate p_uncond
            dropped = torch.rand(n, device=self.device, generator=self.noise_gen)[share] < args.p_uncond
            kwargs["y"] = labels.masked_fill(dropped, self.model.null_class)
        with self.autocast():
            loss = self.diffusion.training_loss(self.net, x0, kwargs, sigma=sigma, noise=noise)
        lr = args.lr * lr_factor(self.step, self.total_steps, args.warmup_steps, self.clock.agreed, self.budget_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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

    def take_guide_when_due(self) -> None:
        """--guide_snapshot: at the first step past its share of the run, a frozen copy of the EMA becomes the
        guide, the same network with less training (a weaker model for autoguidance at no extra cost)."""
        share = self.args.guide_snapshot
        if share and self.guide is None and run_share(
                self.step, self.total_steps, self.clock.agreed, self.budget_seconds) >= share:
            self.guide, self.guide_step = copy.deepcopy(self.ema), self.step
            if self.is_main:
                tqdm.write(f"step {self.step}: the EMA becomes the autoguidance network (--guide_snapshot {share:g})")


class LossLog:
    """The loss summed on the device between reads; a read (every --log_every steps, the loop's only host
    sync) averages it over the ranks and reports it with the learning rate, gradient norm and images/s."""

    def __init__(self, trainer: Trainer, writer, bar, interactive: bool):
        self.trainer, self.writer, self.bar, self.interactive = trainer, writer, bar, interactive
        self.reset()

    def reset(self) -> None:
        self.total, self.steps, self.since = torch.zeros((), device=self.trainer.device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def read(self, grad_norm: torch.Tensor) -> tuple[float, float]:
        """(mean loss, images/s) since the last read; FloatingPointError if the loss is not finite."""
        tr = self.trainer
        loss = self.total / self.steps
        if tr.world > 1:
            dist.all_reduce(loss)
            loss = loss / tr.world
        loss = loss.item()
        if not math.isfinite(loss):
            kept = (f"last.pth keeps step {tr.saved_step}, the last good state" if tr.saved_step is not None
                    else "no checkpoint had been written yet")
            raise FloatingPointError(f"loss became {loss} at step {tr.step}; {kept}")
        images_per_sec = self.steps * tr.args.batch_size / (time.perf_counter() - self.since)
        if tr.is_main:
            lr = tr.optimizer.param_groups[0]["lr"]
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm.item()),
                                ("images_per_sec", images_per_sec)):
                self.writer.add_scalar(f"train/{name}", value, tr.step)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}")
            if not self.interactive:
                print(f"epoch {tr.epoch + 1} step {tr.step} loss {loss:.4f} lr {lr:.2e} {images_per_sec:.0f} img/s",
                      flush=True)
        tr.history["step"].append(tr.step)
        tr.history["loss"].append(loss)
        self.reset()
        return loss, images_per_sec


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


class CpuForecast:
    """What a run of no preset on a CPU says: before the first step, what it trains and that --preset cpu
    trains a good model in minutes there; once the steps after the first (which warms up) are timed, the
    images/s measured and the time the rest of the run takes at that rate."""
    TIMED_STEPS = 3

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.times = [] if trainer.is_main and trainer.device.type == "cpu" and not trainer.args.preset else None

    def last_step(self) -> int:
        tr = self.trainer
        return tr.total_steps if tr.args.max_steps is None else min(tr.args.max_steps, tr.total_steps)

    def start(self) -> None:
        if self.times is not None:
            tr, steps = self.trainer, self.last_step() - self.trainer.step
            tqdm.write(f"this run trains a {sum(p.numel() for p in tr.model.parameters()):,}-parameter U-Net for "
                       f"{steps:,} step{'s' * (steps != 1)} of {tr.args.batch_size} images on the CPU; --preset cpu "
                       "trains a good model in about 10 minutes there")
            sys.stdout.flush()

    def step_done(self) -> None:
        if self.times is None:
            return
        self.times.append(time.perf_counter())
        if len(self.times) <= self.TIMED_STEPS:
            return
        tr = self.trainer
        seconds_per_step = (self.times[-1] - self.times[0]) / self.TIMED_STEPS
        left = (self.last_step() - tr.step) * seconds_per_step
        if tr.budget_seconds is not None:
            left = min(left, tr.budget_seconds - tr.clock.agreed)
        tqdm.write(f"{tr.args.batch_size / seconds_per_step:.1f} images/s measured: the rest of the run takes about "
                   f"{duration(left)} at this rate, sample grids and evaluations aside")
        sys.stdout.flush()
        self.times = None


class TrainingLoop:
    """Epochs of Trainer steps until the run stops, with last.pth, sample grids, plots and evaluations when
    they are due (rank 0 writes, the other ranks wait), and summary.json at the end."""

    def __init__(self, trainer: Trainer, evaluator=None):
        """`evaluator`: the metrics.Evaluator of the run's evaluations (None: none)."""
        self.trainer, self.evaluator = trainer, evaluator
        args = trainer.args
        self.stop = StopPolicy(args.max_steps, args.time_budget, trainer.world, trainer.device)
        self.stop.checkpoint_is_current = trainer.saved_step == trainer.step
        self.out, self.last_metrics, self.images_per_sec = None, {}, None
        self.forecast = CpuForecast(trainer)

    def checkpoint(self) -> None:
        self.trainer.checkpoint()
        self.stop.checkpoint_is_current = True

    def out_of_budget(self) -> bool:
        tr = self.trainer
        tr.clock.agreed = self.stop.check(tr.step, tr.clock.read())
        return self.stop.reason is not None

    def run_epoch(self, writer, interactive: bool) -> None:
        """Train to the end of the epoch, or to a stop."""
        tr, args = self.trainer, self.trainer.args
        batches = tr.batches.epoch(tr.step_in_epoch, new_epoch=tr.step_in_epoch == 0)
        bar = tqdm(total=tr.batches.per_epoch, initial=tr.step_in_epoch, disable=not interactive,
                   desc=f"epoch {tr.epoch + 1}/{args.epochs}", dynamic_ncols=True)
        log = LossLog(tr, writer, bar, interactive)
        while tr.step_in_epoch < tr.batches.per_epoch:
            loss, grad_norm = tr.train_step(*next(batches))
            log.add(loss)
            tr.step, tr.step_in_epoch = tr.step + 1, tr.step_in_epoch + 1
            self.stop.checkpoint_is_current = False
            bar.update()
            self.forecast.step_done()
            stopping = self.out_of_budget()
            tr.take_guide_when_due()
            save_due = (args.save_every_minutes > 0 and not stopping
                        and tr.clock.agreed - tr.saved_seconds >= 60 * args.save_every_minutes)
            if (tr.step % args.log_every == 0 or stopping or save_due
                    or tr.step_in_epoch == tr.batches.per_epoch):  # checks the loss before any save
                self.images_per_sec = log.read(grad_norm)[1]
            if save_due:
                self.checkpoint()
            if stopping:
                break
        batches.close()  # a folder's DataLoader workers stop here
        bar.close()

    def end_of_epoch(self, final: bool, finished_epoch: bool) -> None:
        """last.pth, then sample grid and evaluation when due. The checkpoint comes first and the rest cannot
        lose it: a failing evaluation or plot is reported and the run goes on (a bug in a metric must not cost
        a 100-epoch run)."""
        tr, args, out = self.trainer, self.trainer.args, self.out
        if final or (finished_epoch and tr.epoch % args.save_freq == 0):
            self.checkpoint()
            if self.stop.hurry:
                raise KeyboardInterrupt
            if out is not None:
                out.survive("sample grid", lambda: out.write_samples(tr.step, tr.epoch), tr.step)
                out.survive("plots", lambda: out.write_plots(tr.history), tr.step)
        if out is not None and self.evaluator is not None and (final or (finished_epoch and tr.epoch % args.eval_freq == 0)):
            metrics = out.survive("evaluation", lambda: out.evaluate(tr.step), tr.step)
            if metrics:
                print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
                self.last_metrics = metrics
                key = next(k for k in BEST_BY if k in metrics)
                if tr.best["value"] is None or metrics[key] < tr.best["value"]:
                    tr.best = {"metric": key, "value": metrics[key], "step": tr.step}
                    tr.save("best_model.pth")
        if tr.world > 1:
            dist.barrier()

    def run(self) -> dict | None:
        """Train until the run stops; the summary, or None when there was nothing left to train."""
        tr, args = self.trainer, self.trainer.args
        writer = None
        if tr.is_main:
            writer = SummaryWriter(os.path.join(tr.exp_dir, "logs"), purge_step=tr.step or None)
            self.out = RunArtefacts(args, tr.exp_dir, tr.ema, lambda: tr.guide, tr.diffusion, tr.spec, self.evaluator,
                                    writer, tr.device, tr.pad)
            if tr.step == 0:
                writer.add_text("config", "```\n" + json.dumps(tr.run_config, indent=2) + "\n```")
        handlers = {s: signal.signal(s, self.stop.request) for s in (signal.SIGINT, signal.SIGTERM)}
        interactive = sys.stdout.isatty() and tr.is_main
        first_step = tr.step
        tr.clock.start()
        try:
            if self.out_of_budget():
                print(f"nothing to train: the run is at step {tr.step} ({self.stop.reason})", flush=True)
                return None
            self.forecast.start()
            while tr.epoch < args.epochs and not self.out_of_budget():  # a stop during an epoch's evaluation too
                self.run_epoch(writer, interactive)
                finished_epoch = tr.step_in_epoch == tr.batches.per_epoch
                if finished_epoch:
                    tr.epoch, tr.step_in_epoch = tr.epoch + 1, 0
                tr.clock.pause()  # saving and evaluating do not count against the budget
                self.end_of_epoch(self.stop.reason is not None or tr.epoch >= args.epochs, finished_epoch)
                tr.clock.start()
            if not self.stop.checkpoint_is_current:  # stopped while an epoch end that saved nothing was evaluating
                self.end_of_epoch(final=True, finished_epoch=False)
            return self.finish(first_step)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if writer is not None:
                writer.close()

    def finish(self, first_step: int) -> dict:
        tr = self.trainer
        losses = tr.history["loss"]
        summary = dict(stopped_by=self.stop.reason or "epochs", steps=tr.step, epochs=tr.epoch,
                       steps_this_session=tr.step - first_step, final_loss=losses[-1] if losses else None,
                       best_loss=min(losses, default=None), best_model=dict(tr.best),
                       wall_time_s=round(tr.clock.agreed, 1), images_per_sec=self.images_per_sec,
                       device=str(tr.device), world_size=tr.world)
        if tr.is_main:
            fileio.write_json(os.path.join(tr.exp_dir, "summary.json"), summary)
            if self.last_metrics:
                self.out.log_hparams(tr.run_config["args"], self.last_metrics)
            if self.stop.reason in ("SIGINT", "SIGTERM"):
                print(f"stopped by {self.stop.reason}; resume with --resume {os.path.join(tr.exp_dir, 'last.pth')}")
        return summary
