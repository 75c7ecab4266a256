"""Class-conditional models and guidance: classifier-free guidance (Ho & Salimans 2022) and autoguidance
(Karras et al. 2024).

The conditional network is the U-Net plus a learnable class embedding added to the time embedding, so every
residual block sees the class. Label `num_classes` is the "null" class: training swaps it in with probability
p_uncond, so the same network also predicts without a class. `GuidedDenoiser` is the denoiser the samplers
ask when a model is guided.
"""

import torch
import torch.nn as nn

from ddpm_model import ModelConfig, UNet


class ConditionalUNet(UNet):
    """UNet whose embedding is time embedding + class embedding (num_classes + 1 rows, the last is null)."""

    def __init__(self, config: ModelConfig = ModelConfig(), num_classes: int = 10):
        super().__init__(config)
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, self.emb_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y: class labels; None (or null_class) for the unconditional prediction."""
        if y is None:
            y = torch.full_like(t, self.null_class, dtype=torch.long)
        return self.forward_with_embedding(x, self.time_embedding(t) + self.class_embed(y))


class GuidedDenoiser:
    """D(x, sigma) of a model, guided away from worse estimates of the same image:

        D = D(x | y) + w (D(x | y) - D(x | null)) + w_auto (D(x | y) - D_weak(x | y))

    w is classifier-free guidance (the same network without the class; `guidance_scale`), w_auto autoguidance
    (`weak_model`, a weaker network of the same kind at the same inputs; `autoguidance_scale`), which serves
    unconditional models too. Both 0 is plain sampling at one network call a step; each term adds one call
    (classifier-free: in the same batch). `interval` (lo, hi) guides only at noise levels lo < sigma <= hi
    (Kynkaanniemi et al. 2024): plain sampling elsewhere.

    D is affine in the network's output, so mixing the denoised estimates is mixing the outputs, whatever the
    network predicts (eps, x0, v or a velocity).
    """

    def __init__(self, diffusion, model, guidance_scale: float = 0.0, autoguidance_scale: float = 0.0,
                 interval: tuple | None = None, weak_model=None, null_class: int | None = None):
        if guidance_scale and null_class is None:
            raise ValueError("classifier-free guidance needs a conditional model's null class")
        if autoguidance_scale and weak_model is None:
            raise ValueError("autoguidance needs a weak model")
        self.diffusion, self.model, self.weak_model, self.null_class = diffusion, model, weak_model, null_class
        self.w, self.w_auto, self.interval = guidance_scale, autoguidance_scale, interval

    def __call__(self, x: torch.Tensor, sigma: float, y: torch.Tensor | None = None) -> torch.Tensor:
        denoise, labels = self.diffusion.denoise, {} if y is None else {"y": y}
        inside = self.interval is None or self.interval[0] < sigma <= self.interval[1]
        if not inside or not (self.w or self.w_auto):
            return denoise(self.model, x, sigma, labels)
        if self.w:
            null = torch.full_like(y, self.null_class)
            cond, uncond = denoise(self.model, torch.cat([x, x]), sigma, {"y": torch.cat([y, null])}).chunk(2)
            guided = cond + self.w * (cond - uncond)
        else:
            cond = guided = denoise(self.model, x, sigma, labels)
        if self.w_auto:
            guided = guided + self.w_auto * (cond - denoise(self.weak_model, x, sigma, labels))
        return guided
