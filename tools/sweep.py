"""The CPU recipe sweep: train each candidate for the same wall-clock budget, sample N images with its
sampler, score them with eval.py, and write one table (docs/cpu_recipe.md, rows in docs/cpu_recipe.json).

    python -m tools.sweep                          # every candidate: about 12 minutes each on 2 cores
    python -m tools.sweep --only preset,v_pred     # some of them
    python -m tools.sweep --only none              # no training: rewrite the table from its JSON
    python -m tools.sweep --minutes 1 --num_samples 200 --out /tmp/quick --table /tmp/quick/table.md   # a quick look

Each candidate is `--preset cpu` with some flags changed, written out as the full command line of train.py
or train_conditional.py it runs, so that a row can be rerun by hand (and still can after the preset moves
on). Candidates already in the table's JSON are kept (use --rerun to train them again), so an interrupted
sweep continues where it stopped. Every run also lands in TensorBoard's HParams tab:
`tensorboard --logdir checkpoints/sweep`.
"""
import json
import os
import subprocess
import sys
import time

from cli import ArgumentParser, fail, guarded
from config import PRESETS, flag_value
from fileio import write_json, write_text
from tools.tables import choose, load_rows, machine

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What every candidate changes in the preset: one evaluation, at the end, which the budget does not count.
SWEEP = dict(save_freq=100, eval_freq=100)

# name: (script, the flags it changes in --preset cpu, what it tries)
CANDIDATES = {
    "preset": ("train.py", {}, "`--preset cpu`: 1.06M U-Net, bf16, Min-SNR-5, eps-prediction"),
    "no_minsnr": ("train.py", dict(min_snr_gamma=0), "the preset without Min-SNR weighting"),
    "v_pred": ("train.py", dict(prediction="v"), "+ v-prediction"),
    "conditional": ("train_conditional.py", {}, "`train_conditional.py --preset cpu`"),
}


def command(name: str) -> list:
    """The candidate's full command line: the preset's values, the sweep's and its own, each flag once."""
    script, changes, _ = CANDIDATES[name]
    merged = {**PRESETS["cpu"], **SWEEP, **changes}
    return [script] + [part for key, value in merged.items() for part in (f"--{key}", flag_value(value))]


COLUMNS = ("candidate", "steps", "images seen", "train s", "train img/s", "fid_mnist", "floor", "precision", "recall",
           "class_accuracy", "sampling s")


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        subprocess.run(cmd, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, check=True)


def run_candidate(name, args):
    script, *flags = command(name)
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
    return dict(candidate=name, what=CANDIDATES[name][2], script=script, flags=flags, minutes=args.minutes,
                steps=summary["steps"],
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


def write_table(rows, path, where):
    lines = ["# CPU recipe sweep", "",
             f"Each candidate trained for the same wall-clock budget, then {rows[0]['num_samples']:,} samples "
             f"with the default sampler ({rows[0]['sampler']}) scored by `eval.py --no_inception`; `floor` is "
             "fid_mnist of as many real MNIST test images. Made by `python -m tools.sweep` on "
             f"{where}; the full command line of each candidate is in "
             f"`{os.path.splitext(os.path.basename(path))[0]}.json`.", "",
             "| " + " | ".join(COLUMNS) + " | what it tries | date |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        what = r.get("what") or CANDIDATES.get(r["candidate"], (None, None, ""))[2]
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
    for name in names:
        if any(r["candidate"] == name for r in rows) and not args.rerun:
            print(f"{name}: in the table already (--rerun to train it again)")
            continue
        row = run_candidate(name, args)
        rows = [r for r in rows if r["candidate"] != name] + [row]
        write_json(rows_path, dict(machine=machine(), rows=rows))
        print(f"{name}: fid_mnist {row['fid_mnist']:.1f} (floor {row['floor_fid_mnist']:.1f}), "
              f"{row['images_seen']:,} images", flush=True)
    if rows:
        write_table(rows, args.table, machine())


if __name__ == "__main__":
    main()
