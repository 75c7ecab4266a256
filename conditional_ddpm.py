"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022).

The conditional network is the U-Net plus a learnable class embedding added to the time embedding,
so every residual block sees the class. Label `num_classes` is the "null" class: training swaps it
in with probability p_uncond, and guided sampling contrasts the two predictions. Sampling goes
through GaussianDiffusion.sample like the unconditional model, with `GuidedModel` as the model;
GuidedModel also serves autoguidance, of either kind of model, by a weaker network, and both kinds at once.
"""

import torch
import torch.nn as nn

from ddpm_model import UNet


class ConditionalUNet(UNet):
    """UNet whose embedding is time embedding + class embedding (num_classes + 1 rows, the last is null)."""

    def __init__(self, num_classes: int = 10, **unet_kwargs):
        super().__init__(**unet_kwargs)
        self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, self.emb_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y: class labels; None (or null_class) for the unconditional branch of classifier-free guidance."""
        if y is None:
            y = torch.full_like(t, self.null_class)
        return self.forward_with_embedding(x, self.time_embedding(t) + self.class_embed(y))


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability p_uncond (the CFG training trick)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def check_guidance_scale(w: float, flag: str = "--guidance_scale") -> float:
    """w itself; ValueError if negative (w < 0 would steer away from the class asked for)."""
    if w < 0:
        raise ValueError(f"{flag} must not be negative, got {w}")
    return w


def check_guidance_interval(interval) -> tuple | None:
    """(lo, hi) as floats with 0 <= lo < hi, or None; ValueError otherwise."""
    if interval is None:
        return None
    if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
        raise ValueError(f"--guidance_interval takes two noise levels LO,HI with 0 <= LO < HI, got {interval}")
    return float(interval[0]), float(interval[1])


class GuidedModel:
    """A model callable for the samplers: out = f + w * (f - g) + w_class * (f - f_null), guidance away from
    worse predictions of the conditional prediction f = f(x, t, y).

    Classifier-free guidance: g is the same network at the null class, f_null. Autoguidance (Karras et al.
    2024): g is `weak_model`, a weaker network of the same kind (trained less, or smaller), at the same inputs;
    it works for unconditional models too (y None), and in place of the null class for conditional ones. A
    conditional model under autoguidance may add a classifier-free term, `class_scale`: autoguidance improves
    the images, and the class term makes them more clearly the digit asked for.

    Any prediction target works (eps, x0 or v, or a preconditioned network's output): each is affine in
    eps given x_t, so mixing the outputs is the same as mixing the eps predictions. No guidance is plain
    sampling and costs one network call; each term adds one (classifier-free: in the same batch as f).

    `guide(t)`, when given, says whether to guide a batch at the network's time input t: guidance limited
    to an interval of noise levels (Kynkaanniemi et al. 2024), which costs one call outside it.
    """

    def __init__(self, model: nn.Module, guidance_scale: float, null_class: int | None = None, guide=None,
                 weak_model: nn.Module | None = None, class_scale: float = 0.0):
        if weak_model is None and null_class is None:
            raise ValueError("guidance needs a null class (classifier-free) or a weak model (autoguidance)")
        if class_scale and (weak_model is None or null_class is None):
            raise ValueError("a classifier-free term beside autoguidance needs a conditional model and a weak model")
        self.model, self.w, self.null_class = model, check_guidance_scale(guidance_scale), null_class
        self.guide, self.weak_model, self.class_w = guide, weak_model, check_guidance_scale(class_scale, "class_scale")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        labels = {} if y is None else {"y": y}
        if self.w == self.class_w == 0 or (self.guide is not None and not self.guide(t[:1])):  # a batch shares its noise level
            return self.model(x, t, **labels)
        class_w = self.w if self.weak_model is None else self.class_w
        if class_w:
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
            strong, null = out.chunk(2)
            guided = strong + class_w * (strong - null)
        else:
            strong = guided = self.model(x, t, **labels)
        if self.weak_model is not None and self.w:
            guided = guided + self.w * (strong - self.weak_model(x, t, **labels))
        return guided
