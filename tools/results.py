"""The results table: trained models scored by eval.py at one sample count (10,000 by default, the
standard protocol), each metric beside the real MNIST test images at the same count, written to
docs/results_10k.md (rows in docs/results_10k.json).

    python -m tools.results                                      # the two models shipped in assets/
    python -m tools.results --model preset_cpu=checkpoints/NAME/last.pth --no_inception
    python -m tools.results --only none                          # rewrite the table from its JSON

A model already in the JSON is scored again only when named; rows from earlier runs are kept, each with
its date and whether Inception features were computed. On 2 CPU cores sampling 10,000 images takes
about 4 (unconditional) and 6 (conditional, guided) minutes; Inception features 11 minutes more, and the
reference statistics the same once.
"""
import os
import time

import eval as eval_script
from checkpoint import PRETRAINED
from cli import ArgumentParser, UserError, guarded
from fileio import write_json, write_text
from tools.tables import choose, fmt, load_rows, machine, machines, percent

METRICS = ("fid_inception", "fid_mnist", "is_mnist_mean", "precision", "recall", "class_accuracy", "faint_pixels")


def pretrained_kind(source: str) -> str | None:
    """KIND of a pretrained:KIND source, None for a checkpoint path."""
    return source.split(":", 1)[1] if source.startswith("pretrained:") else None


def score(name: str, source: str, args, sampler_flags=()) -> dict:
    """eval.py on one model; source is a checkpoint path or pretrained:KIND; sampler_flags are eval.py's."""
    kind = pretrained_kind(source)
    model = ["--pretrained", kind] if kind else ["--model_path", source]
    flags = model + ["--num_samples", str(args.num_samples), "--save_dir", os.path.join(args.out, name),
                     "--data_dir", args.data_dir] + (["--no_inception"] if args.no_inception else []) + list(sampler_flags)
    report = eval_script.main(flags)
    s = report["settings"]
    return dict(model=name, source=source, num_samples=s["num_images"], sampler=s["sampler"],
                sampling=report["sampling"], network_evaluations=s["network_calls"],
                sampling_seconds=report["seconds"]["generation"], step=s["step"],
                **{k: report.get(k) for k in METRICS}, floor={k: (report["floor"] or {}).get(k) for k in METRICS},
                inception=not args.no_inception, date=time.strftime("%Y-%m-%d"), machine=machine())


def table_lines(rows: list) -> list:
    """A Markdown table of scored rows, the real test split at the same N as its last row."""
    floor = next((r["floor"] for r in reversed(rows) if r["inception"]), rows[-1]["floor"])
    lines = ["| model | sampler | network calls | sampling s | fid_inception | fid_mnist | is_mnist | precision | recall "
             "| class accuracy | faint px | date |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['network_evaluations']:g} | {r['sampling_seconds']:.0f} | "
                     f"{fmt(r['fid_inception'], 2)} | {fmt(r['fid_mnist'], 2)} | {fmt(r['is_mnist_mean'], 2)} | "
                     f"{fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | {fmt(r['class_accuracy'], 4)} | "
                     f"{percent(r.get('faint_pixels'))} | {r['date']} |")
    lines.append(f"| real MNIST test | | | | {fmt(floor['fid_inception'], 2)} | {fmt(floor['fid_mnist'], 2)} | "
                 f"{fmt(floor['is_mnist_mean'], 2)} | {fmt(floor['precision'], 3)} | {fmt(floor['recall'], 3)} | "
                 f"{fmt(floor['class_accuracy'], 4)} | {percent(floor.get('faint_pixels'))} | |")
    return lines


def write_table(rows: list, path: str, where: str) -> None:
    n = rows[0]["num_samples"]
    lines = [f"# Results at N = {n:,}", "",
             f"`python -m tools.results` on {where}: each model draws {n:,} images with the sampler of its row, which "
             "`eval.py` scores against the MNIST training set (fid_inception: TF-Inception pool3 features of "
             "10,000 training images; the rest: the repository's MNIST classifier; faint px: the share of pixels at "
             "grey levels 1-10, leftover noise on the black background). The last row is the real "
             f"MNIST test split, {n:,} images: the floor each metric is held to.", ""] + table_lines(rows)
    write_text(path, "\n".join(lines) + "\n")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a checkpoint to score besides the shipped models (repeatable)")
    p.add_argument("--only", default=None, help="comma-separated model names to score (default: all; none: only "
                                                "rewrite the table)")
    p.add_argument("--num_samples", type=int, default=10_000)
    p.add_argument("--no_inception", action="store_true", help="MNIST-domain metrics only (fast on the CPU)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="the guidance of the conditional models (default: each checkpoint's)")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--out", default=os.path.join("outputs", "results"), help="where eval.py's reports go")
    p.add_argument("--table", default=os.path.join("docs", "results_10k.md"), help="the Markdown table (+ .json)")
    return p


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    models = {f"shipped_{kind}": f"pretrained:{kind}" for kind in sorted(PRETRAINED, reverse=True)}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model takes NAME=PATH, got {item!r}")
        models[name] = path
    names = choose(args.only, models, "models")
    rows_path, rows = load_rows(args.table)
    sampler = [] if args.guidance_scale is None else ["--guidance_scale", str(args.guidance_scale)]
    for name in names:
        row = score(name, models[name], args, sampler)
        rows = [r for r in rows if r["model"] != name] + [row]
        write_json(rows_path, dict(rows=rows))
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if row[k] is not None), flush=True)
    if rows:
        write_table(rows, args.table, machines(rows))
        print(f"wrote {args.table}")


if __name__ == "__main__":
    main()
