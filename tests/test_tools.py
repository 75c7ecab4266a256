"""The tables the tools write: one row per run, each with the command or settings that reproduce it."""
import json
import shlex

import pytest

import config
from conftest import exits_2, run_training
from tools import samplers, sweep

pytestmark = pytest.mark.slow


def test_sweep_rows_reproduce_their_runs(tmp_path, data_dir, monkeypatch):
    """A run trains the preset with the candidate's changes for its budget and seed; its row holds the command
    that trains exactly that, the table lists it, and a second sweep skips what the JSON already has."""
    monkeypatch.setitem(sweep.CANDIDATES, "tiny_flow", sweep.Candidate(
        "test", dict(model_channels=8, channel_mult=(1, 2), formulation="flow", min_snr_gamma=0.0), "a tiny flow model"))
    table = tmp_path / "sweep.md"
    flags = ["--only", "tiny_flow", "--minutes", "0.02", "--seeds", "0,1", "--num_samples", "20", "--out",
             str(tmp_path / "runs"), "--table", str(table), "--data_dir", data_dir]
    sweep.main(flags)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["candidate"], r["minutes"], r["seed"]) for r in rows] == [("tiny_flow", 0.02, 0), ("tiny_flow", 0.02, 1)]
    for row in rows:
        argv = shlex.split(row["command"])[2:]  # python train.py ...
        args, _ = config.parse_args(argv, conditional=False)
        assert (args.model_channels, args.formulation, args.time_budget, args.seed) == (8, "flow", 0.02, row["seed"])
        assert args.lr == config.PRESETS["cpu"]["lr"] and row["fid_mnist"] > row["floor_fid_mnist"]
        saved = json.loads((tmp_path / "runs" / f"tiny_flow_0.02min_seed{row['seed']}" / "config.json").read_text())
        assert saved["args"]["model_channels"] == 8 and saved["args"]["seed"] == row["seed"]
    text = table.read_text()
    assert "| tiny_flow | test | 0.02 | 2 |" in text and rows[0]["command"] in text
    sweep.main(flags)  # nothing left to train: the table is the same
    assert table.read_text() == text


def test_sampler_table_scores_every_row_of_a_group(tmp_path, train_flags, data_dir, monkeypatch):
    run_training(train_flags + ["--experiment_name", "flow", "--max_steps", "2", "--formulation", "flow",
                                "--sample_method", "heun"])
    rows_of = dict(samplers.GROUPS["samplers"][2])
    three = [(label, rows_of[label]) for label in ("heun 18 levels, ODE", "dpm_solver 20, SDE", "ddim 50, eta 1")]
    monkeypatch.setitem(samplers.GROUPS, "samplers", samplers.GROUPS["samplers"][:2] + (three,))
    table = tmp_path / "samplers.md"
    samplers.main(["--only", "samplers", "--model", str(tmp_path / "runs" / "flow" / "last.pth"), "--num_samples", "20",
                   "--no_inception", "--data_dir", data_dir, "--out", str(tmp_path / "out"), "--table", str(table)])
    rows = json.loads((tmp_path / "samplers.json").read_text())["rows"]
    specs = samplers.GROUPS["samplers"][2]
    assert [r["model"] for r in rows] == [label for label, _ in specs]
    calls = {r["model"]: r["network_evaluations"] for r in rows}
    assert calls["heun 18 levels, ODE"] == 35 and calls["dpm_solver 20, SDE"] == 20 and calls["ddim 50, eta 1"] == 50
    assert table.read_text().count("| real MNIST test |") == 1


def test_sampler_table_scores_every_sampler_on_a_ddpm_model(tmp_path, train_flags, data_dir, monkeypatch):
    """Every sampler serves every formulation: on a ddpm model heun scores too (2 levels - 1 calls). Re-scoring
    a group drops its rows of another model and the rows it no longer has; --missing scores only the rows the
    table lacks, with the same seed as before."""
    run_training(train_flags + ["--experiment_name", "ddpm", "--max_steps", "1", "--formulation", "ddpm"])
    model = str(tmp_path / "runs" / "ddpm" / "last.pth")
    rows_of = dict(samplers.GROUPS["samplers"][2])
    two = [(label, rows_of[label]) for label in ("heun 6 levels, ODE", "ddim 50, eta 1")]
    monkeypatch.setitem(samplers.GROUPS, "samplers", samplers.GROUPS["samplers"][:2] + (two,))
    flags = ["--only", "samplers", "--model", model, "--num_samples", "10", "--no_inception", "--data_dir", data_dir,
             "--out", str(tmp_path / "out"), "--table", str(tmp_path / "samplers.md")]
    samplers.main(flags)
    rows = json.loads((tmp_path / "samplers.json").read_text())["rows"]
    assert [(r["model"], r["network_evaluations"]) for r in rows] == [("heun 6 levels, ODE", 11), ("ddim 50, eta 1", 50)]
    stale = dict(rows[0], model="heun 18 levels, ODE", source="elsewhere.pth")
    (tmp_path / "samplers.json").write_text(json.dumps(dict(rows=rows + [stale])))
    last_row = two[-1]  # "ddim 50, eta 1": the group's only row now
    monkeypatch.setitem(samplers.GROUPS, "samplers", samplers.GROUPS["samplers"][:2] + ([last_row],))
    samplers.main(flags)
    again = json.loads((tmp_path / "samplers.json").read_text())["rows"]
    assert [(r["model"], r["source"]) for r in again] == [(last_row[0], model)]

    def missing_run(rows):  # --missing scores only the rows the JSON lacks
        (tmp_path / "samplers.json").write_text(json.dumps(dict(rows=rows)))
        samplers.main(flags + ["--missing"])
        return {r["model"]: r for r in json.loads((tmp_path / "samplers.json").read_text())["rows"]}
    marked = [dict(r, fid_mnist=-1.0) if r["model"] == last_row[0] else r for r in again]
    assert missing_run(marked)[last_row[0]]["fid_mnist"] == -1.0
    rescored = missing_run([r for r in again if r["model"] != last_row[0]])[last_row[0]]["fid_mnist"]
    assert rescored == next(r["fid_mnist"] for r in again if r["model"] == last_row[0])  # the same seed, again


def test_the_guidance_table_names_the_best_scale_that_keeps_the_class(tmp_path):
    """Of the guidance rows, the lowest fid_inception at class accuracy >= 0.99 by one standard error is named
    and plotted, a curve per interval and autoguidance scale against the classifier-free w; a row with a
    lower fid_inception but fewer digits of the asked-for class is not chosen, nor one within the error."""
    floor = {k: 1.0 for k in samplers.METRICS}

    def row(label, fid, accuracy):
        return dict({k: 0.5 for k in samplers.METRICS}, model=label, group="guidance", source="pretrained:conditional",
                    num_samples=1000, sampler=label, network_evaluations=40, sampling_seconds=1.0, date="2026-12-04",
                    inception=True, floor=floor, fid_inception=fid, class_accuracy=accuracy)
    rows = [row("unguided", 5.0, 0.97), row("classifier-free w 0.3", 6.0, 0.996), row("classifier-free w 1", 9.0, 0.999),
            row("autoguidance w 1, sigma in (0.3, 5]", 4.0, 0.987),
            row("autoguidance w 1 + classifier-free w 0.1, sigma in (0.3, 5]", 4.5, 0.992),
            row("autoguidance w 1 + classifier-free w 0.2, sigma in (0.3, 5]", 5.5, 0.995)]
    best = "autoguidance w 1 + classifier-free w 0.2, sigma in (0.3, 5]"  # 0.992 - its standard error 0.003 < 0.99
    assert samplers.best_guidance(rows)["model"] == best
    assert samplers.row_guidance(best) == (1.0, (0.3, 5.0), 0.2)
    assert samplers.row_guidance("classifier-free w 0.3") == (0.0, None, 0.3)
    assert samplers.guidance_curves(rows) == {
        "classifier-free, every noise level": [(0, 5.0, 0.97), (0.3, 6.0, 0.996), (1, 9.0, 0.999)],
        "autoguidance w 1 + classifier-free, sigma in (0.3, 5]": [(0, 4.0, 0.987), (0.1, 4.5, 0.992), (0.2, 5.5, 0.995)]}
    table = tmp_path / "t.md"
    samplers.write_table(rows, str(table), "a test")
    assert f"by one standard error: {best} (5.50, class accuracy 0.9950 at N=1,000)" in table.read_text()
    assert (tmp_path / "t_guidance.png").read_bytes()[:4] == b"\x89PNG"
    assert samplers.best_guidance([row("unguided", 5.0, 0.97)]) is None


def test_guidance_rows_within_the_error_are_confirmed_at_more_images(tmp_path, monkeypatch, capsys):
    """A row that would be the best but reaches 0.99 only within its standard error at N=1,000 is drawn again
    at --confirm_samples, the lowest fid_inception first; the accuracy at that N decides, and the search
    stops at the first confirmed row that keeps the class."""
    floor = {k: 1.0 for k in samplers.METRICS}

    def row(label, fid, accuracy, n=1000):
        return dict({k: 0.5 for k in samplers.METRICS}, model=label, group="guidance", source="pretrained:conditional",
                    num_samples=n, sampler=label, network_evaluations=40, sampling_seconds=1.0, date="2026-12-04",
                    inception=n == 1000, floor=floor, fid_inception=fid, class_accuracy=accuracy)
    cf = "autoguidance w 1 + classifier-free w {}, sigma in (0.3, 5]".format
    rows = [row("autoguidance w 1, sigma in (0.3, 5]", 4.0, 0.987), row(cf(0.1), 4.5, 0.992),
            row(cf(0.2), 4.8, 0.991), row(cf(0.3), 5.5, 0.995), row("classifier-free w 1", 9.0, 0.992)]
    assert [r["model"] for r in samplers.to_confirm(rows)] == [cf(0.1), cf(0.2)]  # not w 1: 9.0 is above 5.5
    at_10k = {cf(0.1): 0.988, cf(0.2): 0.9925}
    drawn = []

    def score(name, source, args, flags):
        label = next(label for label, f in samplers.GROUPS["guidance"][2] if f == flags)
        drawn.append((label, args.num_samples, args.no_inception))
        return row(label, None, at_10k[label], args.num_samples)
    monkeypatch.setattr(samplers, "score", score)
    args = samplers.build_parser().parse_args(["--table", str(tmp_path / "t.md")])
    rows = samplers.confirm(rows, str(tmp_path / "t.json"), args)
    assert drawn == [(cf(0.1), 10_000, True), (cf(0.2), 10_000, True)]
    assert samplers.best_guidance(rows)["model"] == cf(0.2) and samplers.to_confirm(rows) == []
    assert json.loads((tmp_path / "t.json").read_text())["rows"][2]["confirmed"]["class_accuracy"] == 0.9925
    samplers.write_table(rows, str(tmp_path / "t.md"), "a test")
    text = (tmp_path / "t.md").read_text()
    assert f"by one standard error: {cf(0.2)} (4.80, class accuracy 0.9925 at N=10,000)" in text
    assert f"| {cf(0.1)} | 0.50 | 0.500 | 0.500 | 0.9880 |" in text
    for bad in ("500", "-1"):  # a confirmation must draw more images than the row it confirms
        exits_2(capsys, lambda: samplers.main(["--only", "none", "--confirm_samples", bad, "--table",
                                               str(tmp_path / "t.md")]), "--confirm_samples must be 0")


@pytest.mark.unit
def test_sampler_table_rows_guide_as_labelled_whatever_the_shipped_default():
    """Both shipped files guide by default at sigma in (0.3, 5]; a row of tools.samplers samples with the
    guidance its label names, not that default: sampler rows unguided, 'w 0.5' at every noise level, the
    conditional rows with the autoguidance and classifier-free scales of their labels."""
    import eval as eval_script
    from sampling import load_model

    def sampler(source, flags):
        args = eval_script.build_parser().parse_args(["--pretrained", source.split(":")[1], *flags])
        return next(iter(load_model(args).specs.values()))
    for group, (source, _, rows) in samplers.GROUPS.items():
        for label, flags in rows:
            s = sampler(source, flags)
            if group == "guidance":
                autoguidance, _, class_scale = samplers.row_guidance(label)
                assert (s.autoguidance_scale, s.guidance_scale) == (autoguidance, class_scale), label
            if group == "samplers" or label in ("w 0", "unguided"):
                assert not (s.guidance_scale or s.autoguidance_scale), (group, label)
            elif "sigma in" in label:
                assert s.guidance_interval == tuple(map(float, label.split("(")[1].rstrip("]").split(","))), label
            else:
                assert s.guidance_interval == (0, float("inf")), label
