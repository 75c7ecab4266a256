"""Train an unconditional DDPM on MNIST.

    python train.py --preset cpu                              # a small model, ~10 minutes on 2 CPU cores
    python train.py --epochs 100 --batch_size 128 --lr 2e-4   # the documented model, on a GPU
    python train.py --resume checkpoints/NAME/last.pth        # continue exactly where it stopped
"""
from trainer import main

if __name__ == "__main__":
    main(conditional=False)
