"""Histology augmentation on uint8 CHW tensors (torchvision transforms v2).

Everything stays uint8 at the crop's own size: resizing and normalisation happen afterwards in
`BinaryClassifier.preprocess`, exactly as at inference, so training and serving see the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.transforms import v2

# Ruifrok & Johnston haematoxylin / eosin / DAB optical-density vectors (rows), as in skimage.color.rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass
class AugmentConfig:
    dihedral: bool = True
    """Random rotation by 90° steps and flip: mitotic figures have no orientation."""
    crop_scale: tuple[float, float] = (0.75, 1.0)
    """RandomResizedCrop area range (zoom-in only, the figure stays centred enough); (1, 1) turns it off."""
    hed_sigma: float = 0.05
    """Stain jitter: each HED channel's optical density is scaled by 1±sigma and shifted by ±sigma."""
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.2)
    erase_p: float = 0.25
    erase_scale: tuple[float, float] = (0.02, 0.1)

    def __post_init__(self) -> None:
        self.blur_sigma = blur_sigma_range(self.blur_sigma)


class RandomDihedral(torch.nn.Module):
    """One of the 8 rotations/reflections of a (..., H, W) tensor, uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return torch.rot90(image, k, dims=(-2, -1))


class HEDJitter(torch.nn.Module):
    """Stain augmentation in haematoxylin-eosin-DAB optical-density space (Tellez et al. 2018)."""

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return image
        dtype = image.dtype
        rgb = image.float() if dtype == torch.uint8 else image.float() * 255.0
        od = -torch.log((rgb + 1.0) / 256.0)                          # (3, H, W)
        hed = torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB)
        alpha = 1.0 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        beta = (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        od = torch.einsum("dhw,dc->chw", hed * alpha + beta, _RGB_FROM_HED)
        rgb = (256.0 * torch.exp(-od) - 1.0).clamp(0, 255)
        return rgb.round().to(torch.uint8) if dtype == torch.uint8 else rgb / 255.0


def blur_sigma_range(sigma: Sequence[float]) -> tuple[float, float]:
    """(low, high) of a blur's σ range; ValueError unless 0 < low <= high (a config's check, see __post_init__)."""
    low, high = (float(v) for v in sigma)
    if not 0 < low <= high:
        raise ValueError(f"blur_sigma must be [low, high] with 0 < low <= high, got {list(sigma)}")
    return low, high


def random_blur(p: float, sigma: Sequence[float]) -> v2.RandomApply:
    """With probability p, a Gaussian blur of σ ~ U(sigma) px: the focus of another scanner or another plane.

    The kernel spans ±2σ of the largest σ (5 px up to σ 1.2, 7 px up to 1.7).
    """
    low, high = blur_sigma_range(sigma)
    kernel = 2 * round(2 * high) + 1
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(low, high))], p=p)


def train_transform(cfg: AugmentConfig, size: int) -> v2.Compose:
    """uint8 (3, size, size) → augmented uint8 (3, size, size)."""
    steps: list[torch.nn.Module] = []
    if cfg.dihedral:
        steps.append(RandomDihedral())
    if tuple(cfg.crop_scale) != (1.0, 1.0):
        steps.append(v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=(0.9, 1.1), antialias=True))
    if cfg.hed_sigma > 0:
        steps.append(HEDJitter(cfg.hed_sigma))
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.blur_p > 0:
        steps.append(random_blur(cfg.blur_p, cfg.blur_sigma))
    if cfg.erase_p > 0:
        # erase to a tissue-like grey rather than black, which never occurs in H&E
        steps.append(v2.RandomErasing(p=cfg.erase_p, scale=tuple(cfg.erase_scale), value=[200, 170, 200]))
    return v2.Compose(steps)
