import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "data")
# A model small enough to train a few steps in a second on the CPU.
TINY_FLAGS = ["--model_channels", "8", "--channel_mult", "1,2", "--num_res_blocks", "1",
              "--attention_resolutions", "14", "--batch_size", "16", "--eval_samples", "20",
              "--sample_steps", "2", "--log_every", "2", "--data_dir", DATA_DIR, "--warmup_steps", "2",
              "--lr", "1e-3"]


@pytest.fixture
def train_flags(tmp_path):
    """Tiny-model flags writing into a temporary output directory."""
    return TINY_FLAGS + ["--output_dir", str(tmp_path / "runs")]
