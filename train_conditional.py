"""Train a class-conditional diffusion model with classifier-free guidance on MNIST.

    python train_conditional.py --preset cpu
    python train_conditional.py --epochs 100 --batch_size 128 --lr 2e-4 --num_classes 10

Every flag of train.py, and the conditioning ones (--num_classes, --p_uncond, --guidance_scale).
"""
from train import main

if __name__ == "__main__":
    main(conditional=True)
