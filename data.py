"""The training images: MNIST (shipped), Fashion-MNIST, KMNIST, CIFAR-10, or any folder of images.

`load_dataset` returns a whole split as one uint8 tensor in the exchange format every script shares, [N, H, W]
for grey images and [N, H, W, 3] for colour (the layout of the sample archives FID tools read), with its labels
and class names. Datasets up to 1 GiB of pixels are indexed in memory (or on the GPU) instead of paying for
DataLoader workers: MNIST is 47 MB, CIFAR-10 150 MB. A larger folder is an ImageFiles, which reads its
images from disk when indexed; training reads it through a DataLoader with workers.

The named datasets are read through torchvision's classes from `--data_dir`, in torchvision's layout: the
four gzip IDX files of the MNIST family under <data_dir>/<ClassName>/raw/, CIFAR-10 under
<data_dir>/cifar-10-batches-py/. Files that are there are used as they are; missing ones are downloaded when
the machine is online. MNIST ships with the repository, checked against its SHA256SUMS. Any other
`--dataset` is a folder of PNG or JPEG images: flat, or in class subfolders (torchvision's ImageFolder
convention), which give the labels.
"""
import gzip
import os
import socket
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.datasets.utils import download_url
from torchvision.transforms.v2 import functional as TF

from cli import UserError
from fileio import WriteError, atomic_write, read_checksums, sha256_file

# torchvision looks for all four, whichever split is asked for
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST,
            "cifar10": datasets.CIFAR10}
DIGITS = ("mnist", "kmnist")  # handwritten characters: a mirrored one is another character or none
PADDED = ("mnist", "fashion_mnist", "kmnist")  # 28x28 on black: padded to a larger --image_size, never resized
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
DOWNLOAD_TIMEOUT = 15  # seconds without an answer before a download gives up: offline must not hang
HELD_OUT_SHARE, HELD_OUT_MAX = 0.05, 1000  # of a folder, kept out of training for the test loss
IN_MEMORY_BYTES = 2 ** 30  # a folder larger than this, as uint8 pixels, is read from disk during training


class DataError(UserError):
    """A missing, corrupt or unusable data file or folder; the message names it."""


@dataclass(frozen=True)
class ImageData:
    """One split: uint8 images [N, H, W] (grey) or [N, H, W, 3] (colour), int64 labels [N] (all 0 for a flat
    folder, which has none) and the class names (empty for a flat folder)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple
    dataset: str

    @property
    def channels(self) -> int:
        return 1 if self.images.dim() == 3 else self.images.shape[-1]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def description(self) -> dict:
        """What a run's configuration and its checkpoints record of their data."""
        return dict(dataset=self.dataset, image_size=self.image_size, channels=self.channels,
                    classes=list(self.classes))


# What a checkpoint written before datasets other than MNIST records of its data.
MNIST_DESCRIPTION = dict(dataset="mnist", image_size=28, channels=1, classes=list(datasets.MNIST.classes))


def is_named(dataset: str) -> bool:
    """A known name wins over a folder of that name; anything else is a path."""
    return dataset in DATASETS


def has_test_split(dataset: str) -> bool:
    return is_named(dataset)


# ----------------------------------------------------------------------------- the MNIST family and CIFAR-10

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
        raise DataError(f"{e}; the IDX files are unpacked beside their .gz files once, so "
                        f"{os.path.dirname(out_path)} must be writable the first time") from None


def _download(what: str, folder: str, files: list, fetch) -> None:
    """fetch(), with a time limit on every connection; DataError naming the files to put in `folder` if it fails."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        fetch()
    except Exception as e:  # noqa: BLE001 -- offline, refused, timed out, a bad mirror: all mean the same here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:100]
        raise DataError(f"{what}: {', '.join(files)} missing from {folder} and could not be downloaded ({reason}); "
                        "put them there (torchvision's layout) or run once online") from None
    finally:
        socket.setdefaulttimeout(previous)


def prepare_idx_files(dataset: str, data_dir: str) -> None:
    """The four IDX files of an MNIST-family dataset unpacked where torchvision reads them: .gz files present
    are unpacked (MNIST's checked against the SHA256SUMS it ships with), missing ones downloaded."""
    cls = DATASETS[dataset]
    raw_dir = os.path.join(data_dir, cls.__name__, "raw")
    sums = read_checksums(os.path.join(raw_dir, "SHA256SUMS"))
    missing = [name + ".gz" for name in FILES
               if not os.path.isfile(os.path.join(raw_dir, name)) and not os.path.isfile(os.path.join(raw_dir, name + ".gz"))]
    if missing:
        def fetch():
            for filename, md5 in cls.resources:
                if filename in missing:
                    for mirror in cls.mirrors[:-1]:  # the last mirror's failure is the one reported
                        try:
                            return download_url(mirror + filename, raw_dir, filename, md5)
                        except Exception:  # noqa: BLE001 -- try the next mirror
                            continue
                    download_url(cls.mirrors[-1] + filename, raw_dir, filename, md5)
        _download(f"--dataset {dataset}", raw_dir, missing, fetch)
    for name in FILES:
        gz, raw = os.path.join(raw_dir, name + ".gz"), os.path.join(raw_dir, name)
        if os.path.isfile(gz) and name + ".gz" in sums and sha256_file(gz) != sums[name + ".gz"]:
            raise DataError(f"{gz} does not match its checksum in SHA256SUMS: the file is corrupt or truncated")
        if not os.path.isfile(raw):
            _unpack(gz, raw)


def load_named(dataset: str, data_dir: str, train: bool) -> ImageData:
    cls = DATASETS[dataset]
    if dataset in PADDED:
        prepare_idx_files(dataset, data_dir)
        where = os.path.join(data_dir, cls.__name__, "raw")
        read = lambda: cls(data_dir, train=train, download=False)
    else:
        where = os.path.join(data_dir, "cifar-10-batches-py")
        check = cls.__new__(cls)
        check.root = data_dir
        if not check._check_integrity():  # torchvision checks CIFAR-10's files against their MD5 sums
            _download(f"--dataset {dataset}", where, [cls.filename], lambda: cls(data_dir, train=train, download=True))
        read = lambda: cls(data_dir, train=train, download=False)
    try:
        ds = read()
    except Exception as e:  # noqa: BLE001 -- whatever torchvision says of a bad file, the user needs its folder
        raise DataError(f"could not read --dataset {dataset} from {where} ({type(e).__name__}: {e})") from None
    images = torch.as_tensor(np.asarray(ds.data))
    return ImageData(images, torch.as_tensor(ds.targets).long(), tuple(ds.classes), dataset)


def load_mnist(data_dir: str = "./data", train: bool = True):
    """(images uint8 [N, 28, 28], labels int64 [N]) of MNIST's train or test split."""
    data = load_named("mnist", data_dir, train)
    return data.images, data.labels


# ----------------------------------------------------------------------------- a folder of images

def image_files(folder: str, flag: str = "--dataset") -> tuple[list, tuple]:
    """([(path, class index)], class names) of a folder: class subfolders that hold images give the labels
    (ImageFolder's convention); else the images at its top level, without labels."""
    if not os.path.isdir(folder):
        known = f"neither a dataset this repository knows ({', '.join(DATASETS)}) nor" if flag == "--dataset" else "not"
        raise DataError(f"{flag} {folder}: {known} a folder")
    try:
        classes, class_to_idx = find_classes(folder)
    except FileNotFoundError:
        classes, class_to_idx = [], {}
    files = make_dataset(folder, class_to_idx, IMAGE_EXTENSIONS, allow_empty=True) if classes else []
    if files:
        used = sorted({i for _, i in files})  # subfolders without images are no class
        classes = [classes[i] for i in used]
        remap = {old: new for new, old in enumerate(used)}
        return [(path, remap[i]) for path, i in files], tuple(classes)
    flat = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
    if not flat:
        raise DataError(f"{flag} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its subfolders")
    return [(path, 0) for path in flat], ()


def open_image(path: str) -> Image.Image:
    """The image's header (size and mode); its pixels are read by `decode`."""
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: not a readable image ({e})") from None


def decode(path: str, mode: str, image_size: int) -> torch.Tensor:
    """One image file as uint8 [H, W] ("L") or [H, W, 3] ("RGB"), resized on its shorter side and
    centre-cropped to image_size."""
    try:
        with Image.open(path) as im:
            x = TF.pil_to_tensor(im.convert(mode))  # [C, H, W]
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if x.shape[1:] != (image_size, image_size):
        x = TF.center_crop(TF.resize(x, image_size, antialias=True), image_size)
    return x[0] if mode == "L" else x.permute(1, 2, 0)


class ImageFiles:
    """The images of a folder too large to hold in memory, read from disk when indexed. It stands for the
    uint8 tensor [N, H, W] or [N, H, W, 3] it would be: `len`, `shape`, `dim()`, and indexing by an int, a
    slice or a tensor of indices reads those images into one."""

    def __init__(self, paths: list, mode: str, image_size: int):
        self.paths, self.mode, self.image_size = paths, mode, image_size
        self.shape = torch.Size((len(paths), image_size, image_size) + ((3,) if mode == "RGB" else ()))

    def __len__(self) -> int:
        return len(self.paths)

    def dim(self) -> int:
        return len(self.shape)

    def read(self, i: int) -> torch.Tensor:
        return decode(self.paths[i], self.mode, self.image_size)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.read(index)
        picked = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        out = torch.empty((len(picked),) + self.shape[1:], dtype=torch.uint8)
        for k, i in enumerate(picked):
            out[k] = self.read(i)
        return out

    def subset(self, idx: torch.Tensor) -> "ImageFiles":
        return ImageFiles([self.paths[i] for i in idx.tolist()], self.mode, self.image_size)


def load_folder(folder: str, image_size: int | None, flag: str = "--dataset",
                in_memory_bytes: int | None = None) -> ImageData:
    """Every image of a folder at `image_size` (None: their own size, which must then be square and equal):
    one channel if all are grey, else all in RGB; resized on the shorter side and centre-cropped. Held in
    memory up to `in_memory_bytes` of pixels (default IN_MEMORY_BYTES), else read from disk as training asks
    for them (ImageFiles)."""
    files, classes = image_files(folder, flag)
    sizes, modes = set(), set()
    for path, _ in files:  # headers only: the pixels are read once, into their place
        with open_image(path) as im:
            sizes.add(im.size)
            modes.add(im.mode)
    if image_size is None:
        if len(sizes) > 1 or any(w != h for w, h in sizes):
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
            raise DataError(f"{flag} {folder}: the images are not all square and of one size ({shown}); give "
                            "--image_size to resize and centre-crop them")
        image_size = sizes.pop()[0]
    mode = "L" if modes <= set(GREY_MODES) else "RGB"
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    images = ImageFiles([path for path, _ in files], mode, image_size)
    if images.shape.numel() <= (IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes):
        images = images[:]
    return ImageData(images, labels, classes, folder)


# ----------------------------------------------------------------------------- any dataset

def load_dataset(dataset: str, data_dir: str, train: bool = True, image_size: int | None = None) -> ImageData:
    """A split of a named dataset, or a folder (train only: a folder has no test split), at `image_size`:
    MNIST-family images stay 28x28 (training pads them), others are resized and centre-cropped to it."""
    if not is_named(dataset):
        return load_folder(dataset, image_size)
    data = load_named(dataset, data_dir, train)
    if image_size is not None and dataset not in PADDED and image_size != data.image_size:
        resized = TF.center_crop(TF.resize(data.images.permute(0, 3, 1, 2), image_size, antialias=True), image_size)
        data = replace(data, images=resized.permute(0, 2, 3, 1).contiguous())
    return data


def load_splits(dataset: str, data_dir: str, image_size: int | None = None) -> tuple:
    """(train, test) ImageData of a dataset; test is None for a folder, which has no test split."""
    return (load_dataset(dataset, data_dir, True, image_size),
            load_dataset(dataset, data_dir, False, image_size) if has_test_split(dataset) else None)


def held_out(data: ImageData) -> tuple[ImageData, ImageData]:
    """(train, held out) of a dataset without a test split: a fixed 5% of it (at most 1,000 images, at least
    one) that training never sees, for the test loss. The held-out images are in memory in any case."""
    n = len(data.images)
    k = min(max(round(n * HELD_OUT_SHARE), 1), HELD_OUT_MAX, n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[k:].sort().values, order[:k].sort().values
    train_images = (data.images.subset(train_idx) if isinstance(data.images, ImageFiles)
                    else data.images[train_idx])
    return (replace(data, images=train_images, labels=data.labels[train_idx]),
            replace(data, images=data.images[test_idx], labels=data.labels[test_idx]))


def channels_first(images: torch.Tensor) -> torch.Tensor:
    """Exchange format [N, H, W] or [N, H, W, C] -> [N, C, H, W]."""
    return images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    return channels_first(images).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range [N, C, H, W] -> uint8 [N, H, W] (one channel) or [N, H, W, C], the exchange format of
    inference.py and eval.py."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.squeeze(1) if x.shape[1] == 1 else x.permute(0, 2, 3, 1).contiguous()
