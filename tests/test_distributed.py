"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import inference
from checkpoint import load_checkpoint
from conftest import REPO, linked_data_dir, tiny_training_flags

pytestmark = pytest.mark.slow

# Dropout off: it is the one random draw each rank makes on its own, by design.
# fp32: bf16 rounds the half batches' gradients differently from the whole batch's.
SAME_DRAWS = ["--dropout", "0", "--save_freq", "1", "--amp", "none"]


def torchrun(args, cwd, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "train_conditional.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_weights(a, b, atol=1e-5):
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, atol=atol, rtol=1e-4, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    return tiny_training_flags(linked_data_dir(tmp_path_factory.mktemp("ddp-data"))) + SAME_DRAWS


@pytest.fixture(scope="module")
def runs(tmp_path_factory, flags):
    root = tmp_path_factory.mktemp("ddp")
    out = ["--output_dir", str(root)]
    torchrun(flags + out + ["--experiment_name", "two", "--max_steps", "6"], root)
    torchrun(flags + out + ["--experiment_name", "halves", "--max_steps", "3"], root)
    torchrun(["--resume", str(root / "halves" / "last.pth"), "--max_steps", "6"], root)
    subprocess.run([sys.executable, os.path.join(REPO, "train_conditional.py"), *flags, *out,
                    "--experiment_name", "one", "--max_steps", "6"], cwd=root, check=True, capture_output=True)
    return root


def test_two_processes_match_one_with_the_same_global_batch(runs):
    assert sorted(os.listdir(runs)) == ["halves", "one", "two"]  # exactly one directory per run
    two, one = load_checkpoint(str(runs / "two" / "last.pth")), load_checkpoint(str(runs / "one" / "last.pth"))
    assert two["step"] == one["step"] == 6 and two["config"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in two["model"])
    assert_same_weights(one, two)


def test_resume_of_a_two_process_run(runs):
    resumed, straight = load_checkpoint(str(runs / "halves" / "last.pth")), load_checkpoint(str(runs / "two" / "last.pth"))
    assert resumed["step"] == 6
    assert_same_weights(straight, resumed, atol=1e-6)


def test_distributed_checkpoint_samples_like_the_single_process_one(runs, tmp_path):
    """inference.py reads the two-process checkpoint, and draws what the one-process run's weights draw."""
    grids = []
    for run in ("two", "one"):
        inference.main(["--model_path", str(runs / run / "last.pth"), "--method", "ddim", "--ddim_steps", "2",
                        "--num_samples", "4", "--class_labels", "3", "--output_dir", str(tmp_path / run), "--amp", "none",
                        "--save_npz", str(tmp_path / f"{run}.npz")])
        with np.load(tmp_path / f"{run}.npz") as f:
            grids.append(f["images"].astype(int))
    assert grids[0].shape == (4, 28, 28) and np.abs(grids[0] - grids[1]).max() <= 2


def test_sigterm_on_one_rank_stops_every_rank_cleanly(tmp_path, flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"), *flags, "--output_dir", str(tmp_path), "--experiment_name", "sig",
           "--log_every", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    for line in proc.stdout:  # rank 0 prints the step lines
        seen.append(line)
        if "step 3 " in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, "".join(seen)
    os.kill(int(workers[-1]), signal.SIGTERM)  # one rank only: the other must follow at the same step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + out
    ckpt = load_checkpoint(str(tmp_path / "sig" / "last.pth"))
    assert ckpt["step"] >= 3
    summary = json.loads((tmp_path / "sig" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == ckpt["step"]
