"""Train the small MNIST CNN whose features and softmax give eval.py's MNIST-domain metrics
(fid_mnist, is_mnist, precision/recall, class accuracy). Its weights ship in assets/; rerun this
to reproduce them:

    python -m tools.train_classifier      # about 4 minutes on 2 CPU cores
"""
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cli import ArgumentParser
from data import load_mnist
from fileio import atomic_write, write_json
from metrics import CLASSIFIER_PATH, MnistClassifier, classifier_outputs


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--out", default=CLASSIFIER_PATH)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = load_mnist(args.data_dir, train=True)
    model = MnistClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(images) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images))
        bar = tqdm(range(len(images) // args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}")
        for i in bar:
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = images[idx].unsqueeze(1).float() / 255
            # small random shifts (up to 2 px) so that slightly off-centre samples are still read right
            shift = tuple(torch.randint(-2, 3, (2,)).tolist())
            x = torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=shift, dims=(2, 3))[..., 2:-2, 2:-2]
            loss = F.cross_entropy(model(x)[1], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    test_images, test_labels = load_mnist(args.data_dir, train=False)
    _, probs = classifier_outputs(model.eval(), test_images)
    accuracy = float((torch.from_numpy(probs).argmax(1) == test_labels).float().mean())
    atomic_write(args.out, lambda tmp: torch.save(model.state_dict(), tmp))
    info = dict(test_accuracy=accuracy, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    write_json(os.path.splitext(args.out)[0] + ".json", info)
    print(f"test accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
