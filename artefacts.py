"""What a training run writes besides its checkpoints, on rank 0: sample grids, plots, TensorBoard
scalars and hyperparameters, and the evaluations that choose best_model.pth. None of it may cost the run:
`survive` reports a failure and lets training go on."""
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.tensorboard.summary import hparams

import utils
from data import to_model_range, to_uint8
from runtime import autocast
from sampling import default_labels, digit_rows, generate, is_conditional


class RunArtefacts:
    def __init__(self, args, exp_dir: str, ema, guide, diffusion, spec, evaluator, writer, device, pad: int):
        """`ema` is the network to sample (updated in place by the trainer) with the run's `spec`; `guide()` the
        network its autoguidance steers away from (None: not taken yet, and no autoguidance until it is);
        `evaluator` a metrics.Evaluator (None: no evaluations); `pad` the border training adds to the images."""
        self.args, self.exp_dir, self.ema, self.guide, self.diffusion = args, exp_dir, ema, guide, diffusion
        self.spec, self.evaluator, self.writer, self.device, self.pad = spec, evaluator, writer, device, pad

    def survive(self, what: str, work, step: int):
        """work(), or None with a warning on stderr and in TensorBoard if it fails for any reason but a stop."""
        try:
            return work()
        except Exception as e:  # noqa: BLE001 -- whatever went wrong, the run and its checkpoint go on
            message = f"{what} failed at step {step} and was skipped: {type(e).__name__}: {e}"
            print(f"warning: {message}", file=sys.stderr, flush=True)
            self.writer.add_text("warnings", message, step)
            return None

    def generate(self, n: int, labels=None) -> torch.Tensor:
        args, guide = self.args, self.guide()
        spec = self.spec if guide is not None else dataclasses.replace(self.spec, autoguidance_scale=0.0)
        return generate(self.ema, self.diffusion, n, spec, labels=labels, batch_size=max(args.batch_size, 100),
                        seed=args.seed, device=self.device, amp=args.amp, compile_mode=args.compile,
                        channels_last=args.channels_last, guide_model=guide)

    def write_samples(self, step: int, epoch: int) -> str:
        """A grid ten images wide: 10x10, or one row per class for a conditional model."""
        labels = digit_rows(self.ema.num_classes, 10) if is_conditional(self.ema) else None
        images = self.generate(100 if labels is None else len(labels), labels)
        path = os.path.join(self.exp_dir, "samples", f"epoch_{epoch:03d}.png")
        utils.save_grid(images, path, nrow=10)
        grid = utils.grid_array(images, 10)
        self.writer.add_image("samples", grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
        return path

    def write_plots(self, history: dict) -> None:
        vis = os.path.join(self.exp_dir, "visualizations")
        if history["step"]:
            utils.plot_loss_curve(history["step"], history["loss"], os.path.join(vis, "loss_curve.png"))
        utils.plot_noise_schedule(self.diffusion, os.path.join(vis, "noise_schedule.png"))

    @torch.no_grad()
    def test_loss(self) -> float:
        """EMA loss on a fixed part of the test split (or of the held-out share of a folder), with fixed noise:
        comparable across evaluations."""
        images, labels = self.evaluator.test_images, self.evaluator.test_labels
        n = min(self.args.eval_samples, len(images))
        gen = torch.Generator(self.device).manual_seed(1234)
        total = 0.0
        for start in range(0, n, 500):
            x0 = F.pad(to_model_range(images[start:start + min(500, n - start)]), (self.pad,) * 4, value=-1.0)
            x0 = x0.to(self.device)
            kwargs = {"y": labels[start:start + len(x0)].to(self.device)} if is_conditional(self.ema) else {}
            with autocast(self.device, self.args.amp):
                total += self.diffusion.training_loss(self.ema, x0, kwargs, generator=gen).item() * len(x0)
        return total / n

    def evaluate(self, step: int) -> dict:
        """Test loss, and eval.py's sample metrics with the run's sampler: on MNIST its classifier's, elsewhere
        fid_inception (none without the Inception network: then the test loss is all)."""
        metrics = {"test_loss": self.test_loss()}
        ev = self.evaluator
        if ev.mnist or ev.inception is not None:
            n = self.args.eval_samples
            labels = default_labels(self.ema, n)
            images = to_uint8(self.generate(n, labels))
            metrics.update(ev.evaluate(images, labels, inception=not ev.mnist, sample_stats=False)["metrics"])
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        return metrics

    def log_hparams(self, run_args: dict, metrics: dict) -> None:
        """The run's flags and final evaluation in TensorBoard's HParams tab, which lines up the runs under
        one --logdir (a sweep, say) side by side. The metrics point at the eval/ scalars already logged."""
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_args.items()}
        for summary in hparams(flat, {f"eval/{k}": v for k, v in metrics.items()}):
            self.writer.file_writer.add_summary(summary)
