"""Atypical vs normal mitotic figures: uint8 RGB crops (Track 2 stack pages, Track 1 figure crops) → P(atypical).

One checkpoint, or a list of them (a fold ensemble). An ensemble's P(atypical) is the mean of its members'
probabilities. Its decision threshold, unless `atypical.threshold` is set in the config, is the mean of the
thresholds stored with the members (with TTA on, their `tta_threshold` where they carry one): each was chosen on
its own fold's validation split for probabilities on the same scale as the ensemble mean, and no split is left
over to tune the ensemble itself. Set `atypical.threshold` to use one tuned for the ensemble (e.g. by
`midog.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from midog.classifier import BinaryClassifier, load_classifier, require_positive
from midog.config import AtypicalConfig, FoundationConfig, per_member
from midog.errors import WeightsError
from midog.outputs import ATYPICAL
from midog.roi_io import RoiImage
from midog.weights import checkpoint_names, find_weights


@dataclass
class AtypicalClassifier:
    """The atypical stage: one or more classifiers averaged, the decision threshold, and the TTA setting."""

    models: list[BinaryClassifier]
    threshold: float
    tta: bool = True
    batch_size: int = 64
    tta_views: int | list[int] = 8
    """Views per crop, for all members or (a list) for each."""

    def __post_init__(self) -> None:
        _ = self.member_views  # a list of another length than `models` is refused at construction

    @property
    def member_views(self) -> list[int]:
        """Each member's TTA views, in the order of `models`."""
        return per_member(self.tta_views, len(self.models), "atypical.tta_views", "view counts", "atypical.weights")

    def predict_proba(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """P(atypical) per crop, in order, as float32.

        `crops`: an (N, H, W, 3) uint8 array, or a sequence of (H, W, 3) uint8 arrays whose sizes may differ
        (each is resized to the model's input size by `BinaryClassifier.preprocess`).
        """
        probabilities = np.zeros(len(crops), dtype=np.float32)
        for indices, batch in _same_size_groups(crops):
            member_probs = [model.predict_proba(batch, tta=self.tta, batch_size=self.batch_size, tta_views=views)
                            for model, views in zip(self.models, self.member_views)]
            probabilities[indices] = np.mean(member_probs, axis=0)
        return probabilities

    @property
    def pixel_size_um(self) -> float:
        """µm/px of the crops the members were trained on (one value: `load_atypical` refuses a mixed ensemble)."""
        return self.models[0].pixel_size_um

    def is_atypical(self, probabilities: np.ndarray) -> np.ndarray:
        return np.asarray(probabilities) >= self.threshold


def figure_crops(image: RoiImage, centres: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 crops centred on (n, 2) pixel points (x, y) of `image`, as Track 1 hands figures to
    the atypical stage (outside the image is white, as `RoiImage.read_region` pads)."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    crops = [image.read_region(int(round(x)) - size // 2, int(round(y)) - size // 2, size, size) for x, y in centres]
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def _same_size_groups(crops: np.ndarray | Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split crops into (indices, stacked array) groups of one size, so each group runs as one batch."""
    if isinstance(crops, np.ndarray):
        _check_crop(crops[0] if len(crops) else np.zeros((1, 1, 3), np.uint8))
        return [(np.arange(len(crops)), crops)] if len(crops) else []
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, crop in enumerate(crops):
        _check_crop(crop)
        by_shape.setdefault(crop.shape, []).append(index)
    return [(np.asarray(indices), np.stack([crops[i] for i in indices])) for indices in by_shape.values()]


def _check_crop(crop: np.ndarray) -> None:
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[-1] != 3:
        raise ValueError(f"crops must be uint8 RGB (H, W, 3) arrays, got {crop.dtype} {crop.shape}")


def resolve_threshold(models: Sequence[BinaryClassifier], configured: float | None, tta: bool = False) -> float:
    """The configured threshold when set, else the mean of the thresholds stored with the weights for this TTA
    setting (a checkpoint may carry one chosen on TTA-averaged probabilities: `tta_threshold`)."""
    if configured is None:
        threshold = float(np.mean([m.decision_threshold(tta) for m in models]))
    else:
        threshold = float(configured)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"atypical threshold must lie in [0, 1], got {threshold}")
    return threshold


def load_atypical(config: AtypicalConfig, device: str | torch.device = "cpu",
                  foundation: FoundationConfig | None = None) -> AtypicalClassifier:
    """Find (/opt/ml/model, then weights/) and load strictly every checkpoint named in `config.weights`.

    `foundation` says where foundation-model base weights are, for checkpoints built on one (see midog.foundation).
    """
    names = checkpoint_names(config.weights)
    if not names:
        raise WeightsError("no atypical classifier weights configured (atypical.weights is empty)")
    models = []
    for name in names:
        path = find_weights(name)
        model = require_positive(load_classifier(path, device=device, foundation=foundation),
                                 ATYPICAL, name, "an atypical classifier")
        # channels-last convolutions: ~20 % faster on the CPU (oneDNN) and on tensor cores; same results to 1e-7
        model.model.to(memory_format=torch.channels_last)
        models.append(model.use_backend(config.backend, path, "atypical classifier"))
    sizes = sorted({m.pixel_size_um for m in models})
    if len(sizes) > 1:
        raise WeightsError(f"atypical.weights mix checkpoints trained at {', '.join(f'{s:g}' for s in sizes)} µm/px: "
                           "an ensemble averages crops of one scale")
    return AtypicalClassifier(models=models, threshold=resolve_threshold(models, config.threshold, config.tta),
                              tta=config.tta, batch_size=config.batch_size, tta_views=config.tta_views)
