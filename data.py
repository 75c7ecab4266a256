"""MNIST, offline first.

The repository ships the four gzip IDX files and their SHA256SUMS under data/MNIST/raw/. They are
checked, unpacked where torchvision.datasets.MNIST looks for them, and read through torchvision;
only when they are absent does torchvision download them. The whole split is returned as one
uint8 tensor: MNIST is small enough to index in memory (or on the GPU) instead of paying for
DataLoader workers.
"""
import gzip
import os

import torch
from torchvision import datasets

from cli import UserError
from fileio import WriteError, atomic_write, read_checksums, sha256_file

# torchvision looks for all four, whichever split is asked for
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(UserError):
    """A missing, corrupt or truncated data file; the message names it."""


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
    sums = read_checksums(os.path.join(raw_dir, "SHA256SUMS"))
    for name in FILES:
        gz = os.path.join(raw_dir, name + ".gz")
        if not os.path.isfile(gz):
            return False
        if name + ".gz" in sums and sha256_file(gz) != sums[name + ".gz"]:
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
