"""Write a named dataset's split as a folder of PNGs, one subfolder per class (torchvision's ImageFolder layout):
the folder that `--dataset FOLDER` reads, to check that a folder trains as well as the dataset by name.

    python -m tools.write_folder --dataset mnist --out data/mnist_png
    python train.py --preset cpu --dataset data/mnist_png
"""
import os

from PIL import Image
from tqdm.auto import tqdm

from cli import ArgumentParser, UserError, check_output_dir, guarded
from data import DATASETS, load_dataset


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write a dataset's split as a folder of PNGs in class subfolders.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    p.add_argument("--data_dir", default="./data", help="where the dataset's files are")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--out", required=True, help="the folder to create (it must not exist or be empty)")
    return p


@guarded
def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UserError(f"--out {args.out} is not empty")
    check_output_dir(args.out, "--out", create=True)
    data = load_dataset(args.dataset, args.data_dir, train=args.split == "train")
    folders = [name.replace("/", "-") for name in data.classes]  # Fashion-MNIST's T-shirt/top
    for name in folders:
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
    for i, (image, label) in enumerate(tqdm(list(zip(data.images, data.labels)), desc="PNGs")):
        Image.fromarray(image.numpy()).save(os.path.join(args.out, folders[label], f"{i:05d}.png"))
    print(f"wrote {len(data.images)} images of {args.dataset} ({args.split}) to {args.out}")


if __name__ == "__main__":
    main()
