"""MNIST, offline first.

The repository ships the four gzip IDX files and their SHA256SUMS under data/MNIST/raw/. They are
checked, unpacked where torchvision.datasets.MNIST looks for them, and read through torchvision;
only when they are absent does torchvision download them. The whole split is returned as one
uint8 tensor: MNIST is small enough to index in memory (or on the GPU) instead of paying for
DataLoader workers.
"""
import gzip
import hashlib
import os

import torch
from torchvision import datasets

from fileio import WriteError, atomic_write

# torchvision looks for all four, whichever split is asked for
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(RuntimeError):
    """A missing, corrupt or truncated data file; the message names it."""


def _expected_checksums(raw_dir: str) -> dict:
    path = os.path.join(raw_dir, "SHA256SUMS")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unpack(gz_path: str, out_path: str) -> None:
    try:
        with gzip.open(gz_path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{gz_path} is corrupt or truncated ({e})") from None

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(raw)
    try:
        atomic_write(out_path, write)
    except WriteError as e:
        raise DataError(f"{e}; MNIST is unpacked beside its .gz files once, so {os.path.dirname(out_path)} "
                        "must be writable the first time") from None


def prepare_mnist(data_dir: str) -> bool:
    """Verify and unpack the shipped .gz files; False if they are not there."""
    raw_dir = os.path.join(data_dir, "MNIST", "raw")
    sums = _expected_checksums(raw_dir)
    for name in FILES:
        gz = os.path.join(raw_dir, name + ".gz")
        if not os.path.isfile(gz):
            return False
        if name + ".gz" in sums and _sha256(gz) != sums[name + ".gz"]:
            raise DataError(f"{gz} does not match its checksum in SHA256SUMS: the file is corrupt or truncated")
        if not os.path.isfile(os.path.join(raw_dir, name)):
            _unpack(gz, os.path.join(raw_dir, name))
    return True


def load_mnist(data_dir: str = "./data", train: bool = True):
    """(images uint8 [N, 28, 28], labels int64 [N]) of the train or test split."""
    shipped = prepare_mnist(data_dir)
    try:
        ds = datasets.MNIST(data_dir, train=train, download=not shipped)
    except Exception as e:
        where = os.path.join(data_dir, "MNIST", "raw")
        raise DataError(f"could not read MNIST from {where} ({type(e).__name__}: {e})") from None
    return ds.data, ds.targets.long()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [-1, 1]."""
    return images.unsqueeze(1).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range [N, 1, H, W] -> uint8 [N, H, W], the exchange format of inference.py and eval.py."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu()
