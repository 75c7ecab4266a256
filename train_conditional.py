"""Train a class-conditional DDPM with classifier-free guidance on MNIST.

    python train_conditional.py --preset cpu
    python train_conditional.py --epochs 100 --batch_size 128 --lr 2e-4 --num_classes 10
"""
from trainer import main

if __name__ == "__main__":
    main(conditional=True)
