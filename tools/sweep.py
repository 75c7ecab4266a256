"""The CPU recipe sweep: train each candidate for a wall-clock budget, sample N images with its default
sampler, score them with eval.py, and write one table (docs/cpu_recipe.md, rows in docs/cpu_recipe.json).

    python -m tools.sweep --minutes 3 --seeds 0,1                  # rank every candidate cheaply: two seeds each
    python -m tools.sweep --only preset,ddpm_minsnr --minutes 9.5  # confirm the best at the preset's budget
    python -m tools.sweep --only none                              # no training: rewrite the table from its JSON

A candidate is the recipe both scripts' `--preset cpu` share (config.PRESETS) with some flags changed;
`preset` is train.py's, which adds autoguidance. It runs as the full command line of train.py or
train_conditional.py that it expands to, so that a row can be rerun by hand (and still can after the
preset moves on); the table lists each command. A run is one (candidate, minutes, seed); runs already in
the JSON are kept (--rerun trains them again), so an interrupted sweep continues where it stopped. Every
run also lands in TensorBoard's HParams tab: `tensorboard --logdir checkpoints/sweep`.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from statistics import mean
from typing import NamedTuple

from cli import ArgumentParser, fail, float_list, guarded
from config import PRESETS, UNCONDITIONAL_PRESETS, flag_value
from fileio import write_json, write_text
from tools.tables import choose, fmt, load_rows, machine, machines, percent

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What every candidate changes in the preset: one evaluation, at the end, which the budget does not count.
SWEEP = dict(save_freq=100, eval_freq=100)


class Candidate(NamedTuple):
    family: str
    changes: dict  # flags changed in --preset cpu
    what: str
    script: str = "train.py"


# The recipe of the first sweep: ddpm (linear betas, eps, uniform t), ReLU, Min-SNR-5, the plain MSE.
DDPM = dict(formulation="ddpm", activation="relu", min_snr_gamma=5.0, p_mean=-1.2, p_std=1.2, range_loss="mse")
AUTOGUIDE = UNCONDITIONAL_PRESETS["cpu"]
CANDIDATES = {
    "preset": Candidate("baseline", AUTOGUIDE, "`train.py --preset cpu`: flow matching (straight path, velocity "
                        "target, logit-normal t, one-sided loss at the range ends), 1.06M U-Net (32/64/64, SiLU), "
                        "bf16; autoguidance w 1 at sigma (0.3, 5] away from the run's EMA at 20% of it"),
    "flow_mse": Candidate("formulation", dict(range_loss="mse"), "the plain MSE at the ends of the data range "
                          "(`--range_loss mse`)"),
    "ddpm_minsnr": Candidate("formulation", DDPM, "ddpm, eps, Min-SNR-5, ReLU: the recipe of the first sweep"),
    # the formulation: how noise levels are drawn, weighted and fed to the network
    "edm": Candidate("formulation", dict(formulation="edm", p_mean=-1.2, p_std=1.2),
                     "EDM preconditioning and loss, ln(sigma) ~ N(-1.2, 1.2^2) (the paper's CIFAR-10 values)"),
    "edm_p0": Candidate("formulation", dict(formulation="edm", p_mean=0.0, p_std=1.6),
                        "EDM, ln(sigma) ~ N(0, 1.6^2): more training at the noise levels where digits take shape"),
    "flow_relu": Candidate("network", dict(activation="relu"), "flow matching on the ReLU U-Net"),
    # the discrete process's schedule
    "ddpm_cosine": Candidate("schedule", dict(DDPM, beta_schedule="cosine"), "ddpm, cosine schedule"),
    # the network at CPU scale
    "flow_attn7": Candidate("network", dict(attention_resolutions=(7,)), "self-attention at 7x7 (1.11M)"),
    "flow_124_attn7": Candidate("network", dict(channel_mult=(1, 2, 4), attention_resolutions=(7,)),
                                "channels 32/64/128 and attention at 7x7 (2.73M)"),
    "flow_16_64_128": Candidate("network", dict(model_channels=16, channel_mult=(1, 4, 8)),
                                "channels 16/64/128: parameters at low resolution (2.37M, 0.45 GFLOP)"),
    "flow_ema9995": Candidate("ema", dict(ema_decay=0.9995), "EMA decay 0.9995"),
    "flow_ema998": Candidate("ema", dict(ema_decay=0.998), "EMA decay 0.998"),
    # guidance by the run's own earlier EMA (autoguidance, Karras et al. 2024): no extra training
    "flow_unguided": Candidate("guidance", {}, "the preset unguided: the recipe both presets share"),
    "flow_autoguide_0.1": Candidate("guidance", dict(AUTOGUIDE, guide_snapshot=0.1),
                                    "autoguidance w 1 at sigma (0.3, 5] away from the run's EMA at 10% of it"),
    "flow_autoguide_0.4": Candidate("guidance", dict(AUTOGUIDE, guide_snapshot=0.4),
                                    "autoguidance w 1 at sigma (0.3, 5] away from the run's EMA at 40% of it"),
    "conditional": Candidate("baseline", {}, "`train_conditional.py --preset cpu` (guidance 0.5)", "train_conditional.py"),
    "conditional_mse": Candidate("conditional", dict(range_loss="mse"), "conditional, the plain MSE at the range ends "
                                 "(guidance 0.5)", "train_conditional.py"),
    "conditional_ddpm_minsnr": Candidate("conditional", DDPM, "conditional, ddpm_minsnr's recipe (guidance 0.5)",
                                         "train_conditional.py"),
    "conditional_16_64_128": Candidate("conditional", dict(model_channels=16, channel_mult=(1, 4, 8)),
                                       "conditional, channels 16/64/128 (guidance 0.5)", "train_conditional.py"),
}


def command(name: str, minutes: float, seed: int) -> list:
    """The run's full command line: the preset's values, the sweep's, the candidate's, each flag once."""
    candidate = CANDIDATES[name]
    merged = {**PRESETS["cpu"], **SWEEP, **candidate.changes, "time_budget": minutes, "seed": seed}
    return [candidate.script] + [part for key, value in merged.items() for part in (f"--{key}", flag_value(value))]


def run(cmd, log_path):
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        subprocess.run(cmd, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, check=True)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_candidate(name: str, minutes: float, seed: int, args) -> dict:
    """Train (unless a finished run is there), evaluate and return the row of one run."""
    cmd = command(name, minutes, seed)
    run_name = f"{name}_{minutes:g}min_seed{seed}"
    exp_dir = os.path.join(args.out, run_name)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, f"{run_name}.log")
    if not os.path.isfile(os.path.join(exp_dir, "summary.json")):
        if os.path.isdir(exp_dir):
            fail(f"{exp_dir} holds an unfinished run; remove it to train {run_name} again")
        run([sys.executable, *cmd, "--output_dir", args.out, "--experiment_name", run_name, "--data_dir",
             args.data_dir], log)
    eval_dir = os.path.join(exp_dir, f"eval_{args.num_samples}")
    run([sys.executable, "eval.py", "--model_path", os.path.join(exp_dir, "last.pth"), "--num_samples",
         str(args.num_samples), "--no_inception", "--save_dir", eval_dir, "--data_dir", args.data_dir], log)
    summary, metrics = read_json(os.path.join(exp_dir, "summary.json")), read_json(os.path.join(eval_dir, "metrics.json"))
    batch = read_json(os.path.join(exp_dir, "config.json"))["args"]["batch_size"]
    return dict(candidate=name, minutes=minutes, seed=seed, family=CANDIDATES[name].family, what=CANDIDATES[name].what,
                command=shlex.join(["python", *cmd]), steps=summary["steps"], images_seen=summary["steps"] * batch,
                train_seconds=summary["wall_time_s"], train_images_per_s=summary["steps"] * batch / summary["wall_time_s"],
                fid_mnist=metrics["fid_mnist"], floor_fid_mnist=metrics["floor"]["fid_mnist"],
                precision=metrics["precision"], recall=metrics["recall"], class_accuracy=metrics.get("class_accuracy"),
                faint_pixels=metrics["faint_pixels"],
                num_samples=args.num_samples, sampler=metrics["settings"]["sampler"],
                network_calls=metrics["settings"]["network_calls"], sampling_seconds=metrics["seconds"]["generation"],
                date=time.strftime("%Y-%m-%d"), machine=machine())


def write_table(rows: list, path: str, where: str) -> None:
    """One row per candidate and budget: the mean over its seeds, each seed's fid_mnist beside it."""
    groups = {}
    for r in rows:
        groups.setdefault((r["candidate"], r["minutes"]), []).append(r)
    ordered = sorted(groups.values(), key=lambda g: (-g[0]["minutes"], mean(r["fid_mnist"] for r in g)))
    n = rows[0]["num_samples"]
    lines = ["# CPU recipe sweep", "",
             f"Each run trains the recipe both scripts' `--preset cpu` share with the candidate's changes (`preset` is "
             f"train.py's, which adds autoguidance) for the budget of its row, then draws "
             f"{n:,} samples with the formulation's default sampler, which `eval.py --no_inception` scores; `floor` "
             f"is fid_mnist of {n:,} real MNIST test images. fid_mnist is the mean over the seeds, each seed's in "
             f"brackets. `faint px` is the share of pixels at grey levels 1-10 (`metrics.FAINT_LEVELS`): leftover "
             f"noise on the black background, which fid_mnist does not see and TF-Inception does (0.7% of the real "
             f"test pixels). Made by `python -m tools.sweep` on {where}; the commands are below the table.", "",
             "| candidate | family | minutes | seeds | fid_mnist | floor | faint px | precision | recall | class acc "
             "| images seen | train img/s | sampler | calls | sampling s | what it tries | date |", "|" + "---|" * 17]
    for group in ordered:
        r = group[0]
        fids = " / ".join(f"{g['fid_mnist']:.1f}" for g in group)
        avg = lambda key: None if group[0].get(key) is None else mean(g[key] for g in group)
        lines.append(f"| {r['candidate']} | {r['family']} | {r['minutes']:g} | {len(group)} | "
                     f"{avg('fid_mnist'):.1f} ({fids}) | {r['floor_fid_mnist']:.1f} | {percent(avg('faint_pixels'))} | "
                     f"{fmt(avg('precision'))} | "
                     f"{fmt(avg('recall'))} | {fmt(avg('class_accuracy'))} | {avg('images_seen'):,.0f} | "
                     f"{avg('train_images_per_s'):.0f} | {r['sampler']} | {r['network_calls']:g} | "
                     f"{avg('sampling_seconds'):.0f} | {r['what']} | {r['date']} |")
    lines += ["", "## Commands", "", "Each run of a row, with `--seed` and `--time_budget` as in the row:", ""]
    for group in ordered:
        lines += [f"- {group[0]['candidate']} ({group[0]['minutes']:g} min): `{group[0]['command']}`"]
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", default=None, help="comma-separated candidates (default: all): " + ", ".join(CANDIDATES))
    p.add_argument("--minutes", type=float, default=9.5, help="training budget of each run")
    p.add_argument("--seeds", type=float_list, default=(0,), help="comma-separated seeds: one run each")
    p.add_argument("--num_samples", type=int, default=1000, help="samples each run is scored on")
    p.add_argument("--out", default=os.path.join("checkpoints", "sweep"), help="where the runs go")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--table", default=os.path.join("docs", "cpu_recipe.md"), help="the Markdown table (+ .json)")
    p.add_argument("--rerun", action="store_true", help="train runs again that the table already has")
    return p


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    names = choose(args.only, CANDIDATES, "candidates")
    rows_path, rows = load_rows(args.table)
    for name in names:
        for seed in map(int, args.seeds):
            key = (name, args.minutes, seed)
            if any((r["candidate"], r["minutes"], r["seed"]) == key for r in rows) and not args.rerun:
                print(f"{name}, {args.minutes:g} min, seed {seed}: in the table already (--rerun to train it again)")
                continue
            row = run_candidate(name, args.minutes, seed, args)
            rows = [r for r in rows if (r["candidate"], r["minutes"], r["seed"]) != key] + [row]
            write_json(rows_path, dict(rows=rows))
            print(f"{name}, {args.minutes:g} min, seed {seed}: fid_mnist {row['fid_mnist']:.1f} "
                  f"(floor {row['floor_fid_mnist']:.1f}), {row['images_seen']:,} images", flush=True)
    if rows:
        write_table(rows, args.table, machines(rows))


if __name__ == "__main__":
    main()
