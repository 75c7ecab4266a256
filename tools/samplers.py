"""Samplers against network calls, and guidance against the headline metric: docs/sampler_table.md (rows in
docs/sampler_table.json), each row one eval.py run on a shipped model (or --model) at N images, beside the real
test split.

    python -m tools.samplers                                    # every group, 1,000 samples each
    python -m tools.samplers --only guidance --num_samples 1000
    python -m tools.samplers --only samplers --model checkpoints/NAME/last.pth --no_inception
    python -m tools.samplers --only none                        # rewrite the table from its JSON

A row already in the JSON is scored again only when its group is named with --only. A guidance row that
could become the default but reaches class accuracy 0.99 only within its standard error is drawn again at
--confirm_samples, without Inception, and judged by that count's accuracy.
"""
import argparse
import math
import os

from cli import ArgumentParser, UserError, guarded
from fileio import write_json, write_text
from sampling import add_sampling_args
from tools.results import METRICS, score, table_lines
from tools.tables import choose, fmt, load_rows, machines
from utils import plot_guidance_curves

CLASS_ACCURACY_GOAL = 0.99  # the guidance default must keep the digits of the asked-for class

# A row says what it guides with, so that the shipped file's default guidance (and its interval) does not
# leak into it: the samplers unguided, guidance "at every noise level" over all sigma > 0.
UNGUIDED = ["--autoguidance_scale", "0"]
EVERY_LEVEL = "0,inf"
# group: (the shipped model it samples, what it shows, [(row, eval.py flags), ...])
GROUPS = {
    "samplers": ("pretrained:unconditional", "the unconditional model: each sampler at 10 to 50 network calls", [
        (row, flags + UNGUIDED) for row, flags in [
        ("heun 6 levels, ODE", ["--method", "heun", "--steps", "6"]),
        ("heun 10 levels, ODE", ["--method", "heun", "--steps", "10"]),
        ("heun 18 levels, ODE", ["--method", "heun", "--steps", "18"]),
        ("heun 10 levels, churn 10", ["--method", "heun", "--steps", "10", "--eta", "10"]),
        ("heun 18 levels, churn 30", ["--method", "heun", "--steps", "18", "--eta", "30"]),
        ("dpm_solver 10, ODE", ["--method", "dpm_solver", "--steps", "10", "--eta", "0"]),
        ("dpm_solver 20, ODE", ["--method", "dpm_solver", "--steps", "20", "--eta", "0"]),
        ("dpm_solver 10, SDE", ["--method", "dpm_solver", "--steps", "10", "--eta", "1"]),
        ("dpm_solver 20, SDE", ["--method", "dpm_solver", "--steps", "20", "--eta", "1"]),
        ("dpm_solver 30, SDE", ["--method", "dpm_solver", "--steps", "30", "--eta", "1"]),
        ("dpm_solver 50, SDE", ["--method", "dpm_solver", "--steps", "50", "--eta", "1"]),
        ("dpm_solver_3m 10, ODE", ["--method", "dpm_solver_3m", "--steps", "10", "--eta", "0"]),
        ("dpm_solver_3m 20, ODE", ["--method", "dpm_solver_3m", "--steps", "20", "--eta", "0"]),
        ("dpm_solver_3m 10, SDE", ["--method", "dpm_solver_3m", "--steps", "10", "--eta", "1"]),
        ("dpm_solver_3m 20, SDE", ["--method", "dpm_solver_3m", "--steps", "20", "--eta", "1"]),
        ("dpm_solver_3m 30, SDE", ["--method", "dpm_solver_3m", "--steps", "30", "--eta", "1"]),
        ("ddim 20, ODE (Euler)", ["--method", "ddim", "--steps", "20"]),
        ("ddim 50, ODE (Euler)", ["--method", "ddim", "--steps", "50"]),
        ("ddim 50, eta 1", ["--method", "ddim", "--steps", "50", "--eta", "1"]),
    ]]),
    "guidance": ("pretrained:conditional", "the conditional model: classifier-free guidance of scale w, at every "
                 "noise level or in an interval of them (Kynkaanniemi et al. 2024), alone or beside autoguidance "
                 "by the weaker network the file holds, with the default sampler", [
        (row, ["--autoguidance_scale", autoguidance, "--guidance_scale", w, "--guidance_interval", interval])
        for row, autoguidance, w, interval in [
            ("unguided", "0", "0", EVERY_LEVEL),
            ("classifier-free w 0.1", "0", "0.1", EVERY_LEVEL),
            ("classifier-free w 0.3", "0", "0.3", EVERY_LEVEL),
            ("classifier-free w 0.5", "0", "0.5", EVERY_LEVEL),
            ("classifier-free w 1", "0", "1", EVERY_LEVEL),
            ("classifier-free w 0.3, sigma in (0.3, 5]", "0", "0.3", "0.3,5"),
            ("classifier-free w 1, sigma in (0.3, 5]", "0", "1", "0.3,5"),
            ("autoguidance w 1, sigma in (0.3, 5]", "1", "0", "0.3,5"),
            ("autoguidance w 1 + classifier-free w 0.1, sigma in (0.3, 5]", "1", "0.1", "0.3,5"),
            ("autoguidance w 1 + classifier-free w 0.2, sigma in (0.3, 5]", "1", "0.2", "0.3,5"),
            ("autoguidance w 1 + classifier-free w 0.3, sigma in (0.3, 5]", "1", "0.3", "0.3,5"),
        ]]),
    "autoguidance": ("pretrained:unconditional", "the unconditional model guided away from the weaker network its "
                     "file holds (autoguidance, Karras et al. 2024), with the default sampler", [
        ("w 0", ["--autoguidance_scale", "0"]),
        ("w 0.5", ["--autoguidance_scale", "0.5", "--guidance_interval", EVERY_LEVEL]),
        ("w 1", ["--autoguidance_scale", "1", "--guidance_interval", EVERY_LEVEL]),
        ("w 0.5, sigma in (0.3, 5]", ["--autoguidance_scale", "0.5", "--guidance_interval", "0.3,5"]),
        ("w 1, sigma in (0.3, 5]", ["--autoguidance_scale", "1", "--guidance_interval", "0.3,5"]),
        ("w 2, sigma in (0.3, 5]", ["--autoguidance_scale", "2", "--guidance_interval", "0.3,5"]),
    ]),
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", default=None, help="comma-separated groups to score (default: all; none: only rewrite "
                                                "the table): " + ", ".join(GROUPS))
    p.add_argument("--missing", action="store_true", help="score only the rows the table lacks (new rows, or the rest "
                                                          "of an interrupted run)")
    p.add_argument("--model", default=None, metavar="PATH", help="a checkpoint in place of each group's shipped model")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--no_inception", action="store_true", help="MNIST-domain metrics only (fast on the CPU)")
    p.add_argument("--confirm_samples", type=int, default=10_000,
                   help="images a guidance row within one standard error of the class accuracy goal is drawn again "
                        "with (0: none)")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--out", default=os.path.join("outputs", "samplers"), help="where eval.py's reports go")
    p.add_argument("--table", default=os.path.join("docs", "sampler_table.md"), help="the Markdown table (+ .json)")
    return p


def row_guidance(label: str) -> tuple:
    """(autoguidance scale, interval or None for every noise level, classifier-free scale) of a guidance row:
    the default guidance a shipped file takes from its best row."""
    parser = ArgumentParser()
    add_sampling_args(parser)
    args = parser.parse_known_args(dict(GROUPS["guidance"][2])[label])[0]
    interval = None if args.guidance_interval == (0, float("inf")) else args.guidance_interval
    return args.autoguidance_scale, interval, args.guidance_scale


def class_accuracy(row: dict) -> tuple:
    """(class accuracy, N) of a row: its confirmation's, at the larger N, where it has one."""
    measured = row.get("confirmed") or row
    return measured["class_accuracy"] or 0, measured["num_samples"]


def keeps_the_class(row: dict) -> bool:
    """Whether a row's class accuracy is CLASS_ACCURACY_GOAL or more by one standard error at its N: a default
    chosen at 1,000 images must keep the goal at the 10,000 of the results table, and at N=1,000 the
    standard error of an accuracy near 0.99 is 0.003 (at N=10,000, 0.001)."""
    accuracy, n = class_accuracy(row)
    return accuracy - math.sqrt(accuracy * (1 - accuracy) / n) >= CLASS_ACCURACY_GOAL


def best_guidance(rows: list) -> dict | None:
    """Of guidance rows, the one with the lowest fid_inception of those that keep the class."""
    fit = [r for r in rows if r["fid_inception"] is not None and keeps_the_class(r)]
    return min(fit, key=lambda r: r["fid_inception"], default=None)


def to_confirm(rows: list) -> list:
    """Unconfirmed guidance rows that would be the best but for their standard error: class accuracy at the
    goal, not by one standard error, and fid_inception below the best row's. Drawn again at more images,
    their accuracy decides."""
    best = best_guidance(rows)
    return [r for r in rows if r["fid_inception"] is not None and not r.get("confirmed") and not keeps_the_class(r)
            and (r["class_accuracy"] or 0) >= CLASS_ACCURACY_GOAL
            and (best is None or r["fid_inception"] < best["fid_inception"])]


def guidance_curves(rows: list) -> dict:
    """{curve label: [(classifier-free w, fid_inception, class accuracy), ...] by w} of guidance rows scored
    with Inception; a curve per interval and autoguidance scale."""
    curves = {}
    for r in rows:
        if r["fid_inception"] is None or r["model"] not in dict(GROUPS["guidance"][2]):
            continue
        autoguidance, interval, w = row_guidance(r["model"])
        label = ("every noise level" if interval is None else f"sigma in ({interval[0]:g}, {interval[1]:g}]")
        label = (f"autoguidance w {autoguidance:g} + classifier-free, " if autoguidance else "classifier-free, ") + label
        curves.setdefault(label, []).append((w, r["fid_inception"], r["class_accuracy"]))
    return {label: sorted(points) for label, points in curves.items()}


def write_table(rows: list, path: str, where: str) -> None:
    n = rows[0]["num_samples"]
    lines = ["# Samplers and guidance", "",
             f"`python -m tools.samplers` on {where}: each row draws {n:,} images from the model of its table with "
             "the sampler of its row, which `eval.py` scores against the MNIST training set, beside the real MNIST "
             f"test split at the same N. Network calls are counted per image (each guidance term calls the network "
             "once more, inside its interval only).", ""]
    for group, (_, what, _) in GROUPS.items():
        chosen = [r for r in rows if r["group"] == group]
        if chosen:
            lines += [f"## {group}: {what}", "", f"Model: `{chosen[0]['source']}`.", ""] + table_lines(chosen) + [""]
        confirmed = [r for r in chosen if r.get("confirmed")]
        if confirmed:
            n_confirm = confirmed[0]["confirmed"]["num_samples"]
            lines += [f"Drawn again at N={n_confirm:,} without Inception (`--confirm_samples`): the rows at class "
                      f"accuracy >= {CLASS_ACCURACY_GOAL} only within a standard error whose fid_inception would "
                      "otherwise make them the default. Their accuracy at that N decides.", "",
                      "| row | fid_mnist | precision | recall | class accuracy |", "|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {fmt(c['fid_mnist'], 2)} | {fmt(c['precision'], 3)} | {fmt(c['recall'], 3)} "
                      f"| {fmt(c['class_accuracy'], 4)} |" for r in confirmed for c in [r["confirmed"]]]
            floor = confirmed[0]["confirmed"]["floor"]
            lines += [f"| real MNIST test | {fmt(floor['fid_mnist'], 2)} | {fmt(floor['precision'], 3)} | "
                      f"{fmt(floor['recall'], 3)} | {fmt(floor['class_accuracy'], 4)} |", ""]
        best = best_guidance(chosen) if group == "guidance" else None
        if best:
            plot = os.path.splitext(path)[0] + "_guidance.png"
            plot_guidance_curves(guidance_curves(chosen), best["floor"]["fid_inception"], CLASS_ACCURACY_GOAL,
                                 best["num_samples"], plot)
            accuracy, n = class_accuracy(best)
            lines += [f"The lowest fid_inception at class accuracy >= {CLASS_ACCURACY_GOAL} by one standard error: "
                      f"{best['model']} "
                      f"({fmt(best['fid_inception'], 2)}, class accuracy {fmt(accuracy, 4)} at N={n:,}).", "",
                      f"![fid_inception and class accuracy against w]({os.path.basename(plot)})", ""]
    write_text(path, "\n".join(lines))


def confirm(rows: list, rows_path: str, args) -> list:
    """Draws the guidance rows to_confirm names again at args.confirm_samples, the lowest fid_inception
    first, until one keeps the class (the rest would then not be the best)."""
    again = argparse.Namespace(**dict(vars(args), num_samples=args.confirm_samples, no_inception=True))
    labels = [label for label, _ in GROUPS["guidance"][2]]
    while candidates := to_confirm([r for r in rows if r["group"] == "guidance"]):
        row = min(candidates, key=lambda r: r["fid_inception"])
        i = labels.index(row["model"])
        scored = score(f"guidance_{i:02d}_n{args.confirm_samples}", row["source"], again, GROUPS["guidance"][2][i][1])
        row["confirmed"] = {k: scored[k] for k in ("num_samples", "floor", "date", *METRICS)}
        write_json(rows_path, dict(rows=rows))
        print(f"guidance, {row['model']}: class accuracy {scored['class_accuracy']:.4f} at N={args.confirm_samples:,}",
              flush=True)
    return rows


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.confirm_samples and args.confirm_samples <= args.num_samples:
        raise UserError(f"--confirm_samples must be 0 (none) or more than --num_samples ({args.num_samples}), "
                        f"got {args.confirm_samples}")
    groups = choose(args.only, GROUPS, "groups")
    rows_path, rows = load_rows(args.table)
    for group in groups:
        source, _, specs = GROUPS[group]
        source = args.model or source
        # A group's table names one model and its rows: rows of another model, which this one may not re-score,
        # and rows the group no longer has (scored on a file since replaced) go.
        rows = [r for r in rows if r["group"] != group or (r["source"] == source and r["model"] in dict(specs))]
        for i, (label, flags) in enumerate(specs):
            if args.missing and any((r["group"], r["model"]) == (group, label) for r in rows):
                continue
            row = dict(score(f"{group}_{i:02d}", source, args, flags), model=label, group=group)
            rows = [r for r in rows if (r["group"], r["model"]) != (group, label)] + [row]
            write_json(rows_path, dict(rows=rows))
            print(f"{group}, {label}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if row[k] is not None),
                  flush=True)
        if group == "guidance" and args.confirm_samples:
            rows = confirm(rows, rows_path, args)
    if rows:
        write_table(rows, args.table, machines(rows))
        print(f"wrote {args.table}")


if __name__ == "__main__":
    main()
