"""Speed of the two loops users wait on: the training step and the sampling step.

    python -m tools.bench                         # the documented model and the CPU preset, on this machine
    python -m tools.bench --compare diffusers     # also HF diffusers' UNet2DModel of the same configuration
    python -m tools.bench --json bench.json
    python -m tools.bench --amp bf16 --compile    # autocast, torch.compile (and --channels_last) as train.py takes them
    python -m tools.bench --models cpu_preset --read_folder data/mnist_png   # a folder read from disk, against memory

For each model: parameters, forward FLOPs per image (torch.utils.flop_counter), training images/s of a
full step (noise, forward, loss, backward, AdamW, EMA: the trainer's own train_step), network
evaluations per second of the sampling network call and the images/s that gives DDPM (T steps), DDIM
(50) and DPM-Solver++ (20) -- checked against a real 5-step sampler loop (last column) --, peak memory,
and achieved FLOP/s against a matmul peak in the models' dtype, measured in the same run.
Warm-up first, then the median of --repeats timings.
"""
import dataclasses
import os
import resource
import shlex
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import config
from cli import ArgumentParser, add_speed_args, guarded, replaced
from data import load_folder
from diffusion import DDPM, SamplingSpec, check_sampling, sample
from fileio import write_json
from runtime import amp_dtype, pick_device
from tools.tables import choose
from trainer import DISK_WORKERS, Batches, Trainer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, dtype, repeats: int) -> float:
    """FLOP/s of a large square matmul in the dtype the models run in."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, device, repeats)


def forward_flops(net, x, t) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    return counter.get_total_flops()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_ours(flags, device, args, image_size=28):
    """Build the trainer exactly as train.py would and time its train_step (noise, forward, loss,
    backward, AdamW, EMA) on one global batch."""
    flags = flags + ["--device", str(device), "--batch_size", str(args.batch_size), "--image_size", str(image_size)]
    if image_size != 28:  # keep attention at the same level: 14x14 at 28 is 16x16 at 32
        sizes = {28: 28, 14: image_size // 2, 7: image_size // 4, 4: image_size // 8}
        at_28 = config.parse_args(flags, conditional=False)[0].attention_resolutions
        flags += ["--attention_resolutions", ",".join(str(sizes[r]) for r in at_28)]
    targs, _ = config.parse_args(flags, conditional=False)
    noise_digits = (torch.randint(0, 256, (args.batch_size, 28, 28), dtype=torch.uint8),
                    torch.zeros(args.batch_size, dtype=torch.long))  # the step's cost does not depend on them
    tr = Trainer(targs, False, exp_dir=None, data=noise_digits, device=device)  # writes nothing
    idx = torch.arange(args.batch_size, device=device)
    step_time = median_time(lambda: tr.train_step(*tr.batches.take(idx)), device, args.repeats)
    return tr.model, tr.ema, step_time, tr.autocast


def reading_speed(folder: str, device, batch_size: int, steps: int = 100) -> dict:
    """Images/s that training's batches (trainer.Batches) deliver from a folder read from disk by the DataLoader's
    workers, and from the same images in memory: reading keeps up when it outpaces the training step."""
    on_disk = load_folder(folder, None, in_memory_bytes=0)
    speeds = {}
    for where, images in (("disk", on_disk.images), ("memory", on_disk.images[:])):
        batches = Batches(images, on_disk.labels, batch_size, 0, device, seed=0).epoch(0, new_epoch=True)
        next(batches)  # the workers' start-up
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        sync(device)
        speeds[where] = steps * batch_size / (time.perf_counter() - start)
        batches.close()
    return speeds


def sampling_call_time(net, device, batch, image_size, repeats, autocast):
    with torch.inference_mode():  # inference tensors, as in the samplers (torch.compile guards on it)
        x = torch.randn(batch, 1, image_size, image_size, device=device)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)

    def call():
        with torch.inference_mode(), autocast():
            net(x, t)
    return median_time(call, device, repeats)


def sampler_overhead(net, device, batch, image_size, call_time, autocast, steps=5) -> float:
    """Wall time of a real DPM-Solver++ loop over `steps` steps / (steps x one network call): how far
    the images/s columns, derived from network evaluations per second, are from the full sampler."""
    diffusion = DDPM().to(device)
    spec = check_sampling(SamplingSpec("dpm_solver", steps), diffusion.levels, conditional=False, has_guide=False)

    def loop():
        with torch.inference_mode(), autocast():
            sample(lambda x, sigma: diffusion.denoise(net, x, sigma), diffusion, (batch, 1, image_size, image_size),
                   spec, generator=0, device=device)
    return median_time(loop, device, repeats=1, warmup=1) / (steps * call_time)


def bench_diffusers(config, device, args, autocast):
    """UNet2DModel with our channels, blocks and attention level, at 32x32 (its down/up path needs sizes
    divisible by 2^(levels-1))."""
    from diffusers import UNet2DModel  # requirements-bench.txt: optional, only for --compare diffusers
    mults, mc = config["channel_mult"], config["model_channels"]
    attn_levels, res = set(), config["image_size"]
    for level in range(len(mults)):  # the levels where ours has attention (32 -> 16 -> 8 -> 4)
        if res in config["attention_resolutions"]:
            attn_levels.add(level)
        res = (res + 1) // 2
    model = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=config["num_res_blocks"],
                        block_out_channels=tuple(mc * m for m in mults), norm_num_groups=min(32, mc),
                        down_block_types=tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D"
                                               for i in range(len(mults))),
                        up_block_types=tuple("AttnUpBlock2D" if i in attn_levels else "UpBlock2D"
                                             for i in reversed(range(len(mults)))),
                        act_fn=config["activation"], dropout=config["dropout"],
                        attention_head_dim=64).to(device)  # ours: heads of 64 channels
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, mode=args.compile) if args.compile else model
    net = lambda x, t: compiled(x, t).sample
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    x0 = torch.randn(args.batch_size, 1, 32, 32, device=device)

    def step():
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        noise = torch.randn_like(x0)
        with autocast():
            loss = torch.nn.functional.mse_loss(net(x0 + noise, t).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1e-4)
    return model, net, median_time(step, device, args.repeats)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=None, help="default: 128 on CUDA, 32 on the CPU")
    p.add_argument("--sample_batch", type=int, default=None, help="default: 256 on CUDA, 64 on the CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="default,cpu_preset", help="comma-separated: default, cpu_preset")
    p.add_argument("--compare", choices=["diffusers"], default=None)
    add_speed_args(p, "our network (as train.py --compile)")
    p.add_argument("--train_flags", default="", metavar="FLAGS",
                   help="train.py flags for every model, e.g. \"--activation silu --channel_mult 1,2,4\"")
    p.add_argument("--read_folder", default=None, metavar="FOLDER",
                   help="also time reading this folder's images from disk for training, against memory")
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def speed_row(name, model, size, flops, step_time, call_time, args, peak, note="", overhead=None) -> dict:
    """One table row: throughput from the measured step and network-call times."""
    nfe_per_s = args.sample_batch / call_time
    train_flops = 3 * flops * args.batch_size / step_time  # backward costs about twice the forward
    return dict(model=name, image_size=size, params=sum(p.numel() for p in model.parameters()),
                gflop_per_image=flops / 1e9, train_images_per_s=args.batch_size / step_time,
                sampling_nfe_per_s=nfe_per_s, ddpm_1000_images_per_s=nfe_per_s / 1000,
                ddim_50_images_per_s=nfe_per_s / 50, dpm_solver_20_images_per_s=nfe_per_s / 20,
                train_tflop_per_s=train_flops / 1e12, train_fraction_of_matmul_peak=train_flops / peak, note=note,
                sampler_loop_overhead=overhead)


def bench_model(name, flags, size, device, args, peak) -> list:
    """Our network of one --models entry at one image size, and diffusers' beside it when compared."""
    model, ema, step_time, autocast = bench_ours(flags, device, args, size)
    x1, t1 = torch.randn(1, 1, size, size, device=device), torch.tensor([500], device=device)
    sampler_net = torch.compile(ema, mode=args.compile) if args.compile else ema
    call = sampling_call_time(sampler_net, device, args.sample_batch, size, args.repeats, autocast)
    rows = [speed_row(f"ours/{name}", model, size, forward_flops(model, x1, t1), step_time, call, args, peak,
                      overhead=sampler_overhead(sampler_net, device, args.sample_batch, size, call, autocast))]
    if args.compare and size == 32:
        dmodel, dnet, dstep = bench_diffusers(dataclasses.asdict(model.config), device, args, autocast)
        dcall = sampling_call_time(dnet, device, args.sample_batch, 32, args.repeats, autocast)
        eager = lambda x, t: dmodel(x, t).sample  # FLOPs are counted outside torch.compile
        rows.append(speed_row("diffusers/UNet2DModel", dmodel, 32, forward_flops(eager, x1, t1), dstep, dcall, args,
                              peak, note="needs 32x32; ours runs 28x28 natively"))
    return rows


def print_table(rows, device, dtype, args, peak) -> None:
    cuda = device.type == "cuda"
    print(f"\n{device} ({torch.cuda.get_device_name(device) if cuda else os.cpu_count()} {'GPU' if cuda else 'CPU threads'}), "
          f"torch {torch.__version__}, batch {args.batch_size} (train) / {args.sample_batch} (sampling), "
          f"{str(dtype)[6:]} matmul peak {peak / 1e12:.2f} TFLOP/s, peak memory {peak_memory_mb(device):.0f} MiB")
    header = ("model", "size", "params", "GFLOP/img", "train img/s", "NFE/s", "DDPM-1000 img/s", "DDIM-50 img/s",
              "DPM++-20 img/s", "% of matmul peak", "sampler loop / NFEs")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} | {r['params'] / 1e6:.2f}M | {r['gflop_per_image']:.2f} | "
              f"{r['train_images_per_s']:.1f} | {r['sampling_nfe_per_s']:.1f} | {r['ddpm_1000_images_per_s']:.3f} | "
              f"{r['ddim_50_images_per_s']:.2f} | {r['dpm_solver_20_images_per_s']:.2f} | "
              f"{100 * r['train_fraction_of_matmul_peak']:.0f}% | "
              f"{'n/a' if r['sampler_loop_overhead'] is None else format(r['sampler_loop_overhead'], '.2f')} |")
    if args.compare:
        theirs = next(r for r in rows if r["model"].startswith("diffusers"))
        for ours in (r for r in rows if r["model"] == "ours/default"):
            train, sample = (ours[k] / theirs[k] for k in ("train_images_per_s", "sampling_nfe_per_s"))
            print(f"ours@{ours['image_size']} / diffusers@32: training {train:.2f}x, sampling {sample:.2f}x")


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args = replaced(args, batch_size=args.batch_size or (128 if cuda else 32),
                    sample_batch=args.sample_batch or (256 if cuda else 64))
    if not cuda:
        torch.backends.mkldnn.enabled = True
    extra = (shlex.split(args.train_flags) + ["--amp", args.amp] + (["--compile", args.compile] if args.compile else [])
             + (["--channels_last"] if args.channels_last else []))
    flags = {"default": extra, "cpu_preset": ["--preset", "cpu"] + extra}
    names = choose(args.models, flags, "models")
    dtype = amp_dtype(device, args.amp) or torch.float32
    peak = matmul_peak(device, dtype, args.repeats)
    rows = []
    for name in names:
        for size in [28, 32] if args.compare and name == "default" else [28]:
            rows += bench_model(name, flags[name], size, device, args, peak)
            print(f"  {rows[-1]['model']}: {rows[-1]['train_images_per_s']:.1f} train img/s, "
                  f"{rows[-1]['sampling_nfe_per_s']:.1f} sampling NFE/s", flush=True)
    print_table(rows, device, dtype, args, peak)
    reading = None
    if args.read_folder:
        reading = reading_speed(args.read_folder, device, args.batch_size)
        print(f"reading {args.read_folder} for training, batch {args.batch_size}: {reading['disk']:.0f} images/s "
              f"from disk ({DISK_WORKERS} DataLoader workers), {reading['memory']:.0f} from memory")
    if args.json:
        write_json(args.json, dict(device=str(device), torch=torch.__version__, amp=args.amp, compile=args.compile,
                                   channels_last=args.channels_last, batch_size=args.batch_size,
                                   sample_batch=args.sample_batch, matmul_peak_flops=peak,
                                   peak_memory_mb=peak_memory_mb(device), rows=rows, reading=reading))


if __name__ == "__main__":
    main()
