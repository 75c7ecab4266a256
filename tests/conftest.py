import atexit
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linked_data_dir(root: str) -> str:
    """A data folder under `root` whose MNIST files link to the repository's: tests read the shipped data
    but write (unpacked files, the evaluator's cache) only there."""
    raw = os.path.join(root, "data", "MNIST", "raw")
    os.makedirs(raw)
    source = os.path.join(REPO, "data", "MNIST", "raw")
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), os.path.join(raw, name))
    return os.path.join(root, "data")


_session_root = tempfile.mkdtemp(prefix="ddpm-tests-")
atexit.register(shutil.rmtree, _session_root, ignore_errors=True)
DATA_DIR = linked_data_dir(_session_root)  # shared by the whole session, so its cache is computed once
# A model small enough to train a few steps in a second on the CPU: as train.py flags, and as UNet arguments.
TINY_FLAGS = ["--model_channels", "8", "--channel_mult", "1,2", "--num_res_blocks", "1",
              "--attention_resolutions", "14", "--batch_size", "16", "--eval_samples", "20",
              "--sample_steps", "2", "--log_every", "2", "--data_dir", DATA_DIR, "--warmup_steps", "2",
              "--lr", "1e-3"]
TINY_MODEL = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,), dropout=0.0)


@pytest.fixture
def train_flags(tmp_path):
    """Tiny-model flags writing into a temporary output directory."""
    return TINY_FLAGS + ["--output_dir", str(tmp_path / "runs")]


@pytest.fixture
def data_copy(tmp_path):
    """A data folder of the test's own, to break or fill without affecting other tests."""
    return linked_data_dir(str(tmp_path))
