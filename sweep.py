"""The CPU recipe sweep: train each candidate for the same wall-clock budget, sample N images with its
sampler, score them with eval.py, and write one table (docs/cpu_recipe.md, rows in docs/cpu_recipe.json).

    python sweep.py                          # every candidate: about 12 minutes each on 2 cores
    python sweep.py --only bf16,bf16_minsnr  # some of them
    python sweep.py --only none              # no training: rewrite the table from its JSON
    python sweep.py --minutes 1 --num_samples 200 --out /tmp/quick --table /tmp/quick/table.md   # a quick look

Each candidate is a full command line of train.py or train_conditional.py, so a row can be rerun by
hand. Candidates already in the table's JSON are kept (use --rerun to train them again), so an
interrupted sweep continues where it stopped. Every run also lands in TensorBoard's HParams tab:
`tensorboard --logdir checkpoints/sweep`.
"""
import json
import os
import subprocess
import sys
import time

from cli import ArgumentParser, choose, fail, guarded
from fileio import load_rows, write_json, write_text
from runtime import cpu_name

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

def flags(*groups: dict) -> list:
    """A command line from flag dicts, later ones overriding earlier ones (so each flag appears once)."""
    merged = {}
    for group in groups:
        merged.update(group)
    return [part for name, value in merged.items() for part in (f"--{name}", str(value))]


# The CPU preset before the sweep: 1.06M parameters, fp32, one epoch of batch 32.
OLD_PRESET = dict(model_channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="", dropout=0,
                  batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999)
# What every time-bound candidate shares: as many epochs as the budget allows, the LR annealed to the
# budget's end, one evaluation (at the end).
BF16 = dict(OLD_PRESET, epochs=100, save_freq=100, eval_freq=100, amp="bf16")
MIN_SNR = dict(BF16, min_snr_gamma=5)

# name: (script, flags, what it tries)
CANDIDATES = {
    "old_preset": ("train.py", flags(OLD_PRESET, dict(epochs=1, amp="none")),
                   "the previous preset: fp32, one epoch, which ends before the budget"),
    "bf16": ("train.py", flags(BF16), "bf16 autocast, epochs until the budget ends, LR annealed to it"),
    "bf16_minsnr": ("train.py", flags(MIN_SNR), "+ Min-SNR-5 loss weighting: now `--preset cpu`"),
    "bf16_v_minsnr": ("train.py", flags(MIN_SNR, dict(prediction="v")), "+ v-prediction with Min-SNR-5"),
    "bf16_124_attn7": ("train.py", flags(MIN_SNR, dict(channel_mult="1,2,4", attention_resolutions=7)),
                       "+ Min-SNR-5, channels 32/64/128, self-attention at 7x7 (2.7M parameters)"),
    "bf16_wide48": ("train.py", flags(MIN_SNR, dict(model_channels=48)),
                    "+ Min-SNR-5, 48 channels (2.4M parameters)"),
    "bf16_bs64": ("train.py", flags(MIN_SNR, dict(batch_size=64, lr=2e-3)), "+ Min-SNR-5, batch 64 at LR 2e-3"),
    "bf16_lr2e-3": ("train.py", flags(MIN_SNR, dict(lr=2e-3)), "+ Min-SNR-5, LR 2e-3"),
    "bf16_bs16": ("train.py", flags(MIN_SNR, dict(batch_size=16)), "+ Min-SNR-5, batch 16 (twice the steps)"),
    "conditional_bf16_minsnr": ("train_conditional.py", flags(MIN_SNR, dict(guidance_scale=1.0)),
                                "conditional, bf16, Min-SNR-5, guidance 1: now `train_conditional.py --preset cpu`"),
}
COLUMNS = ("candidate", "steps", "images seen", "train s", "train img/s", "fid_mnist", "floor", "precision", "recall",
           "class_accuracy", "sampling s")


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        subprocess.run(cmd, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, check=True)


def run_candidate(name, args):
    script, flags, _ = CANDIDATES[name]
    exp_dir = os.path.join(args.out, name)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, f"{name}.log")
    if not os.path.isfile(os.path.join(exp_dir, "summary.json")):
        if os.path.isdir(exp_dir):
            fail(f"{exp_dir} holds an unfinished run; remove it to train {name} again")
        run([sys.executable, script, *flags, "--time_budget", str(args.minutes), "--output_dir", args.out,
             "--experiment_name", name, "--data_dir", args.data_dir, "--seed", "0"], log)
    eval_dir = os.path.join(exp_dir, f"eval_{args.num_samples}")
    run([sys.executable, "eval.py", "--model_path", os.path.join(exp_dir, "last.pth"), "--num_samples",
         str(args.num_samples), "--no_inception", "--save_dir", eval_dir, "--data_dir", args.data_dir], log)
    with open(os.path.join(exp_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(exp_dir, "config.json")) as f:
        batch = json.load(f)["args"]["batch_size"]
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    settings = metrics["settings"]
    return dict(candidate=name, script=script, flags=flags, minutes=args.minutes, steps=summary["steps"],
                images_seen=summary["steps"] * batch, train_seconds=summary["wall_time_s"],
                train_images_per_s=summary["steps"] * batch / summary["wall_time_s"],
                fid_mnist=metrics["fid_mnist"], floor_fid_mnist=metrics["floor"]["fid_mnist"],
                precision=metrics["precision"], recall=metrics["recall"],
                class_accuracy=metrics.get("class_accuracy"), num_samples=args.num_samples,
                sampler=f"{settings['method']} {settings['steps']} steps, eta {settings['eta']}",
                guidance_scale=settings["guidance_scale"], sampling_seconds=metrics["seconds"]["generation"],
                date=time.strftime("%Y-%m-%d"))


def fmt(v, digits=3):
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_table(rows, path, machine):
    lines = ["# CPU recipe sweep", "",
             f"Each candidate trained for the same wall-clock budget, then {rows[0]['num_samples']:,} samples "
             f"with the default sampler ({rows[0]['sampler']}) scored by `eval.py --no_inception`; `floor` is "
             "fid_mnist of as many real MNIST test images. Made by `python sweep.py` on "
             f"{machine}; the full command line of each candidate is in `sweep.py` and "
             f"`{os.path.splitext(os.path.basename(path))[0]}.json`.", "",
             "| " + " | ".join(COLUMNS) + " | what it tries | date |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        what = CANDIDATES.get(r["candidate"], (None, None, ""))[2]
        lines.append(f"| {r['candidate']} | {r['steps']:,} | {r['images_seen']:,} | {r['train_seconds']:.0f} | "
                     f"{r['train_images_per_s']:.0f} | "
                     f"{r['fid_mnist']:.1f} | {r['floor_fid_mnist']:.1f} | {fmt(r['precision'])} | "
                     f"{fmt(r['recall'])} | {fmt(r['class_accuracy'])} | {r['sampling_seconds']:.0f} | {what} | "
                     f"{r['date']} |")
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", default=None, help="comma-separated candidates (default: all): " + ", ".join(CANDIDATES))
    p.add_argument("--minutes", type=float, default=9.5, help="training budget of each candidate")
    p.add_argument("--num_samples", type=int, default=1000, help="samples each candidate is scored on")
    p.add_argument("--out", default=os.path.join("checkpoints", "sweep"), help="where the runs go")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--table", default=os.path.join("docs", "cpu_recipe.md"), help="the Markdown table (+ .json)")
    p.add_argument("--rerun", action="store_true", help="train candidates again that the table already has")
    return p


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    names = choose(args.only, CANDIDATES, "candidates")
    rows_path, rows = load_rows(args.table)
    machine = f"{cpu_name()}, {os.cpu_count()} CPU threads"
    for name in names:
        if any(r["candidate"] == name for r in rows) and not args.rerun:
            print(f"{name}: in the table already (--rerun to train it again)")
            continue
        row = run_candidate(name, args)
        rows = [r for r in rows if r["candidate"] != name] + [row]
        write_json(rows_path, dict(machine=machine, rows=rows))
        print(f"{name}: fid_mnist {row['fid_mnist']:.1f} (floor {row['floor_fid_mnist']:.1f}), "
              f"{row['images_seen']:,} images", flush=True)
    if rows:
        write_table(rows, args.table, machine)


if __name__ == "__main__":
    main()
