"""The training loop behind train.py and train_conditional.py.

One run = one experiment directory <output_dir>/<experiment_name>/ holding config.json, last.pth,
best_model.pth, samples/, logs/ (TensorBoard), visualizations/ and summary.json. Runs stop cleanly
on --epochs, --max_steps, --time_budget, SIGINT or SIGTERM, and --resume continues exactly.
"""
import copy
import datetime
import gc
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
from artefacts import RunArtefacts
from checkpoint import build_diffusion, build_model, load_checkpoint, save_checkpoint
from cli import UserError, check_output_dir, fail, replaced
from conditional_ddpm import drop_labels
from config import PRESETS, diffusion_config, model_config, parse_args
from data import load_mnist, to_model_range
from metrics import Evaluator
from runtime import amp_dtype, autocast, pick_device
from sampling import make_sampler

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

# Why a run stops, in increasing strength: under DDP every rank adopts the strongest reason any rank has.
STOP_REASONS = (None, "max_steps", "time_budget", "SIGINT", "SIGTERM")


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


class StopPolicy:
    """When a run stops: --max_steps, --time_budget on the training clock, or SIGINT/SIGTERM. The first
    signal lets the step finish and the run save and evaluate; a second stops as soon as last.pth holds
    the current step (`is_saved` says whether it does)."""

    def __init__(self, max_steps: int | None, time_budget: float | None, world: int, device, is_saved):
        self.max_steps, self.budget_seconds = max_steps, None if time_budget is None else 60 * time_budget
        self.world, self.device, self.is_saved = world, device, is_saved
        self.reason, self.hurry = None, False

    def request(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.reason in ("SIGINT", "SIGTERM"):
            self.hurry = True
            if self.is_saved():
                raise KeyboardInterrupt
            print(f"\n{name} again: stopping once last.pth is written", flush=True)
            return
        self.reason = name
        print(f"\n{name} received: finishing this step, then saving last.pth (again to stop sooner)", flush=True)

    def check(self, step: int, clock: float) -> float:
        """Decide after a step whether to stop (`reason`); returns the clock all ranks agree on. Under DDP
        every rank adopts the strongest reason any rank has and the slowest rank's clock, so that all of
        them set the same learning rate and stop at the same step."""
        if self.max_steps is not None and step >= self.max_steps:
            self.reason = self.reason or "max_steps"
        if self.world > 1:
            shared = torch.tensor([STOP_REASONS.index(self.reason), clock], device=self.device, dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            self.reason, clock = STOP_REASONS[int(shared[0])], shared[1].item()
        if self.budget_seconds is not None and clock >= self.budget_seconds:
            self.reason = self.reason or "time_budget"
        return clock


class Trainer:
    def __init__(self, args, conditional: bool, exp_dir: str | None, data: tuple, evaluator=None, ckpt=None,
                 rank: int = 0, world: int = 1, local_rank: int = 0):
        """`exp_dir`: where the run writes (None: nowhere, for a trainer that is only stepped); `data`: (uint8
        images [N, 28, 28], labels [N]) to train on; `evaluator`: the metrics.Evaluator of the run's
        evaluations (None: none); `ckpt`: a checkpoint to resume."""
        self.args, self.conditional, self.exp_dir, self.evaluator = args, conditional, exp_dir, evaluator
        self.rank, self.world, self.is_main = rank, world, rank == 0
        self.record = run_record(args, conditional, world)  # saved with every checkpoint
        if args.batch_size % world:
            raise UserError(f"--batch_size {args.batch_size} (the global batch) must divide among {world} processes")
        self.device = pick_device(args.device)
        if self.device.type == "cuda" and world > 1:
            self.device = torch.device("cuda", local_rank)
        amp = amp_dtype(self.device, args.amp)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank
        images, labels = data
        # The whole training set lives on the device as uint8 and is indexed per batch.
        self.pad = (args.image_size - images.shape[-1]) // 2  # centred in black, like MNIST's own 20 -> 28 padding
        self.images, self.labels = F.pad(images, (self.pad,) * 4).to(self.device), labels.to(self.device)
        self.steps_per_epoch = len(images) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch_size {args.batch_size} is larger than the training set ({len(images)})")
        self.total_steps = args.epochs * self.steps_per_epoch  # the LR schedule's length; --max_steps cuts it

        self.model = build_model(model_config(args), conditional).to(
            self.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model
        if world > 1:  # gradients averaged across ranks; checkpoints keep the bare model (no "module.")
            self.net = DistributedDataParallel(self.model, device_ids=[local_rank] if self.device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net, mode=args.compile)
        self.diffusion = build_diffusion(diffusion_config(args)).to(self.device)
        # Min-SNR is a weighting of the ddpm loss; the continuous formulations carry their own
        self.loss_options = {"min_snr_gamma": args.min_snr_gamma} if args.formulation == "ddpm" else {}
        self.sampler = make_sampler(args.sample_method, self.diffusion,  # of sample grids and evaluations
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
        self.clock = self.elapsed  # training seconds as all ranks agreed at the last step: drives the LR
        self.saved_step = self.step if ckpt is not None else None  # what last.pth holds
        self.saved_clock = self.clock
        self.last_metrics = {}
        self.stop = StopPolicy(args.max_steps, args.time_budget, world, self.device, lambda: self.saved_step == self.step)

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
                        config=self.record)
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
        t = self.diffusion.draw_noise_levels(len(idx), self.device, self.noise_gen)
        noise = torch.randn(x0.shape, device=self.device, generator=self.noise_gen)
        kwargs = {}
        if self.conditional:
            y = drop_labels(self.labels[idx], args.p_uncond, self.model.null_class, self.noise_gen)
            kwargs["y"] = y[share]
        with self.autocast():
            loss = self.diffusion.training_loss(self.net, x0[share], kwargs, t=t[share], noise=noise[share],
                                                **self.loss_options)
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

    # -------------------------------------------------------------------------- the loop

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

    def end_of_epoch(self, out, final: bool, finished_epoch: bool) -> None:
        """last.pth, then sample grid and evaluation (`out`, rank 0's RunArtefacts) when due; the other
        ranks wait. The checkpoint comes first and the rest cannot lose it: a failing evaluation or plot
        is reported and the run goes on (a bug in a metric must not cost a 100-epoch run)."""
        a = self.args
        if final or (finished_epoch and self.epoch % a.save_freq == 0):
            self.checkpoint()
            if self.stop.hurry:
                raise KeyboardInterrupt
            if out is not None:
                out.survive("sample grid", lambda: out.write_samples(self.step, self.epoch), self.step)
                out.survive("plots", lambda: out.write_plots(self.history), self.step)
        if out is not None and self.evaluator is not None and (final or (finished_epoch and self.epoch % a.eval_freq == 0)):
            metrics = out.survive("evaluation", lambda: out.evaluate(self.step), self.step)
            if metrics:
                print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
                self.last_metrics = metrics
                if self.best["value"] is None or metrics["fid_mnist"] < self.best["value"]:
                    self.best = {"metric": "fid_mnist", "value": metrics["fid_mnist"], "step": self.step}
                    self.save("best_model.pth")
        if self.world > 1:
            dist.barrier()

    def out_of_budget(self) -> bool:
        self.clock = self.stop.check(self.step, self.training_seconds())
        return self.stop.reason is not None

    def run_epoch(self, writer, interactive: bool) -> float | None:
        """Train to the end of the epoch, or to a stop; returns the last images/s read (None: no read)."""
        from tqdm.auto import tqdm
        a = self.args
        if self.step_in_epoch == 0:
            self.epoch_start_state = self.data_gen.get_state()
        self.data_gen.set_state(self.epoch_start_state)
        order = torch.randperm(len(self.images), generator=self.data_gen).to(self.device)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not interactive,
                   desc=f"epoch {self.epoch + 1}/{a.epochs}", dynamic_ncols=True)
        new_window = lambda: {"loss": torch.zeros((), device=self.device), "steps": 0, "t": time.perf_counter()}
        window, images_per_sec = new_window(), None
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
        return images_per_sec

    def train(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        a = self.args
        writer, out = None, None
        if self.is_main:
            writer = SummaryWriter(os.path.join(self.exp_dir, "logs"), purge_step=self.step or None)
            out = RunArtefacts(a, self.exp_dir, self.ema, self.diffusion, self.sampler, self.evaluator, writer,
                               self.device, self.pad)
            if self.step == 0:
                writer.add_text("config", "```\n" + json.dumps(self.record, indent=2) + "\n```")
        handlers = {s: signal.signal(s, self.stop.request) for s in (signal.SIGINT, signal.SIGTERM)}
        interactive = sys.stdout.isatty() and self.is_main
        self.session_start = time.perf_counter()
        images_per_sec, first_step = None, self.step
        try:
            if self.out_of_budget():
                print(f"nothing to train: the run is at step {self.step} ({self.stop.reason})", flush=True)
                return None
            while self.epoch < a.epochs and not self.out_of_budget():  # a stop during an epoch's evaluation too
                images_per_sec = self.run_epoch(writer, interactive) or images_per_sec
                finished_epoch = self.step_in_epoch == self.steps_per_epoch
                if finished_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.elapsed = self.training_seconds()
                self.end_of_epoch(out, self.stop.reason is not None or self.epoch >= a.epochs, finished_epoch)
                self.session_start = time.perf_counter()  # evaluation and saving do not count against the budget
            if self.saved_step != self.step:  # stopped while an epoch end that saved nothing was evaluating
                self.end_of_epoch(out, final=True, finished_epoch=False)
            summary = dict(stopped_by=self.stop.reason or "epochs", steps=self.step, epochs=self.epoch,
                           steps_this_session=self.step - first_step,
                           final_loss=self.history["loss"][-1] if self.history["loss"] else None,
                           best_loss=min(self.history["loss"], default=None),
                           best_model=dict(self.best), wall_time_s=round(self.elapsed, 1),
                           images_per_sec=images_per_sec, device=str(self.device), world_size=self.world)
            if self.is_main:
                fileio.write_json(os.path.join(self.exp_dir, "summary.json"), summary)
                if self.last_metrics:
                    out.log_hparams(self.record["args"], self.last_metrics)
                if self.stop.reason in ("SIGINT", "SIGTERM"):
                    print(f"stopped by {self.stop.reason}; resume with --resume {os.path.join(self.exp_dir, 'last.pth')}")
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


def setup(args, given: set, conditional: bool, world: int = 1, check_new: bool = True):
    """The run's arguments, directory and checkpoint to resume (None for a new run). A resumed run takes
    its checkpoint's values but for the flags `given`; a new one refuses to overwrite an existing run."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, conditional=conditional, training=True)
        saved = {k: v for k, v in ckpt["config"]["args"].items() if k in vars(args) and k != "resume" and k not in given}
        args = replaced(args, **saved)
        exp_dir = os.path.dirname(os.path.abspath(args.resume))
        fileio.remove_stale_temporaries(exp_dir)
    else:
        kind = "conditional" if conditional else "ddpm"
        args = replaced(args, experiment_name=args.experiment_name or f"{kind}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
        exp_dir = os.path.join(args.output_dir, args.experiment_name)
        if check_new:
            prepare_new_run_dir(exp_dir)
    return replaced(args, data_dir=os.path.abspath(args.data_dir)), exp_dir, ckpt  # resumable from another folder


def run_record(args, conditional: bool, world: int) -> dict:
    """The configuration a run saves in config.json and in every checkpoint."""
    return dict(args=dict(vars(args)), preset=PRESETS.get(args.preset), conditional=conditional, world_size=world,
                torch=torch.__version__, torchvision=__import__("torchvision").__version__, git_commit=git_commit(),
                command=" ".join(sys.argv))


def main(argv=None, conditional: bool = False) -> dict:
    """Train; under torchrun every process runs this, and rank 0 alone writes the experiment directory."""
    args, given = parse_args(argv, conditional)
    rank, world, local_rank = init_distributed()
    exp_dir = None
    try:
        error = None
        try:
            if rank == 0:
                args, exp_dir, ckpt = setup(args, given, conditional, world)
        except UserError as e:
            error = str(e)
        if world > 1:  # one decision for all: rank 0's error or experiment name
            shared = [error, args.experiment_name]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
            if rank > 0 and error is None:
                args, exp_dir, ckpt = setup(replaced(args, experiment_name=shared[1]), given, conditional, world,
                                            check_new=False)
        if error is not None:
            raise UserError(error)
        device = pick_device(args.device)
        amp_dtype(device, args.amp)  # a bad --device or --amp fails before the data loads
        data = load_mnist(args.data_dir, train=True)
        evaluator = Evaluator(args.data_dir, inception=False, device=device, train_images=data[0]) if rank == 0 else None
        trainer = Trainer(args, conditional, exp_dir, data, evaluator, ckpt, rank, world, local_rank)
        if trainer.is_main:
            fileio.write_json(os.path.join(exp_dir, "config.json"), trainer.record)  # once the run can start
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
        if world > 1:
            dist.barrier()  # every rank reaches the teardown together
    except (FloatingPointError, fileio.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"stopped at once by a second signal; last.pth holds step {trainer.saved_step}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            # DDP holds the process group: release it first, so that gloo's threads are joined now rather than
            # at interpreter exit, where a rank can abort ("terminate called without an active exception").
            trainer = None
            gc.collect()  # the trainer's stop policy refers back to it: a cycle that only the collector frees
            dist.destroy_process_group()
    if rank == 0 and summary is not None:
        print(json.dumps(summary, indent=2))
    return summary
