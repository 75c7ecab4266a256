"""What the tests share: the repository's MNIST behind a writable folder, one tiny model (as UNet arguments
and as train.py flags), the training entry point and the one-line-error check.

Tests marked `unit` read no MNIST and train nothing (`pytest -m unit` answers in seconds); the `data_dir`
fixture refuses them. `slow` ones start processes, compile, or compute reference statistics afresh.
"""
import os

import numpy as np
import pytest
from PIL import Image

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough to train a few steps in a second on the CPU.
TINY_MODEL = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,), dropout=0.0)
TINY_TRAINING = dict(batch_size=16, eval_samples=20, sample_steps=2, log_every=2, warmup_steps=2, lr=1e-3)


def as_flags(values: dict) -> list:
    """train.py flags for a dict of its arguments (tuples comma-separated)."""
    return [part for k, v in values.items() for part in (f"--{k}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v))]


def linked_data_dir(root) -> str:
    """A data folder under `root` whose MNIST files link to the repository's: tests read the shipped data
    but write (unpacked files, the evaluator's cache) only there."""
    raw = os.path.join(root, "data", "MNIST", "raw")
    os.makedirs(raw)
    source = os.path.join(REPO, "data", "MNIST", "raw")
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), os.path.join(raw, name))
    return os.path.join(root, "data")


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> str:
    """One for the whole session, so that the evaluator's cache is computed once."""
    return linked_data_dir(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def data_dir(request, shared_data_dir) -> str:
    if request.node.get_closest_marker("unit"):
        pytest.fail("a unit test reads no MNIST: drop the mark or the data")
    return shared_data_dir


def tiny_training_flags(data_dir: str) -> list:
    """The tiny model's training flags, reading `data_dir`; no output folder."""
    return as_flags({**TINY_MODEL, **TINY_TRAINING}) + ["--data_dir", data_dir]


@pytest.fixture
def tiny_flags(data_dir) -> list:
    return tiny_training_flags(data_dir)


@pytest.fixture
def train_flags(tiny_flags, tmp_path) -> list:
    """The tiny model's training flags, writing into tmp_path/runs."""
    return tiny_flags + ["--output_dir", str(tmp_path / "runs")]


@pytest.fixture
def data_copy(tmp_path, data_dir):
    """A data folder of the test's own, to break or fill without affecting other tests."""
    return linked_data_dir(tmp_path)


def run_training(flags, conditional=False):
    return train.main(flags, conditional=conditional)


def exits_2(capsys, call, message):
    """call() must exit with code 2 and one line on stderr that contains `message`."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    return err


def grid_tiles(path, size=28, padding=2) -> np.ndarray:
    """The images of a save_grid PNG, [N, size, size] uint8, row by row."""
    grid = np.asarray(Image.open(path).convert("L"))
    step = size + padding
    rows, cols = (grid.shape[0] - padding) // step, (grid.shape[1] - padding) // step
    return np.stack([grid[padding + r * step:padding + r * step + size, padding + c * step:padding + c * step + size]
                     for r in range(rows) for c in range(cols)])
