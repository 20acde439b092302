"""Verification stage: each candidate's box crop, resized to `verifier.crop_size`, → P(mitotic figure).

One checkpoint, or a list of them (`verifier.weights`, an ensemble): the ensemble's P(mitotic figure) is the mean
of its members', so its members must be trained at one pixel size. Each member sees the crops it was trained on:
`verifier.context_px` is one number for all, or a list with one per member.

The crop is the candidate's box (grown by `verifier.context_px` on each side, clipped to the image) resized to a
square with antialiased bilinear interpolation, the same resize `BinaryClassifier.preprocess` applies. A degenerate
box (no area left after clipping) is replaced by a `merging.box_size_px` square around its centre. With
`verifier.stain_normalization: macenko` (one value, or one per member) the crops are then re-expressed with reference
H&E stains, the image's own stains estimated once (`midog.stain`), as the member's training crops were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from midog.classifier import BinaryClassifier, load_classifier, require_positive
from midog.config import CHOICES, STAIN_NORMALIZATIONS, FoundationConfig, VerifierConfig, per_member
from midog.errors import WeightsError
from midog.outputs import MITOTIC_FIGURE, NON_MITOTIC_FIGURE
from midog.resampling import at_pixel_size, scale_boxes, view_scale
from midog.roi_io import RoiImage
from midog.stain import ImageStains, image_stains, normalise

PROBABILITY_MODES = CHOICES["verifier.probability"]


def crop_boxes(boxes: np.ndarray, width: int, height: int, context_px: int, fallback_px: int) -> np.ndarray:
    """(n, 4) float boxes → (n, 4) int crop regions x0, y0, x1, y1 inside the image, each at least 1 px."""
    grown = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + np.array([-1, -1, 1, 1]) * context_px
    regions = np.stack([np.floor(grown[:, 0]), np.floor(grown[:, 1]), np.ceil(grown[:, 2]), np.ceil(grown[:, 3])], 1)
    regions = np.clip(regions, 0, [width, height, width, height]).astype(np.int64)
    degenerate = (regions[:, 2] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 1])
    if degenerate.any():
        centres = (grown[degenerate, :2] + grown[degenerate, 2:]) / 2
        half = fallback_px / 2
        square = np.concatenate([np.floor(centres - half), np.ceil(centres + half)], 1)
        regions[degenerate] = np.clip(square, 0, [width, height, width, height]).astype(np.int64)
        regions[:, 0] = np.minimum(regions[:, 0], width - 1)
        regions[:, 1] = np.minimum(regions[:, 1], height - 1)
        regions[:, 2] = np.maximum(regions[:, 2], regions[:, 0] + 1)
        regions[:, 3] = np.maximum(regions[:, 3], regions[:, 1] + 1)
    return regions


RESIZE_CALL_PIXELS = 1 << 22
"""Source pixels resized in one call at most (4 Mpx: 48 MB of float32), so a crowd of large boxes stays bounded."""


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 crops of one shape → (N, size, size, 3) uint8, antialiased bilinear (as
    `BinaryClassifier.preprocess`). Each plane is resized on its own, so a crop comes out the same alone or in a
    batch."""
    if crops.shape[1] == size and crops.shape[2] == size:
        return crops
    tensor = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_crop(crop: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8: `resize_crops` of one."""
    return resize_crops(crop[None], size)[0]


def region_crops(image: RoiImage, regions: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 crops of `regions` (from `crop_boxes`), in order.

    Regions of one shape are read and resized together, one resize call per shape (and per `RESIZE_CALL_PIXELS`)
    instead of one per candidate: the call's fixed cost, not the arithmetic, dominated with thousands of small
    crops (17,000 candidates on the 2-core development CPU: 13.9 s one at a time, 5.0-5.3 s by shape).
    """
    out = np.empty((len(regions), size, size, 3), dtype=np.uint8)
    if len(regions) == 0:
        return out
    shapes = regions[:, 2:] - regions[:, :2]                       # (width, height) per region
    shape_id = np.unique(shapes, axis=0, return_inverse=True)[1].reshape(-1)
    order = np.argsort(shape_id, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(shape_id[order])) + 1):
        width, height = (int(v) for v in shapes[group[0]])
        per_call = max(1, RESIZE_CALL_PIXELS // (width * height))
        for start in range(0, len(group), per_call):
            members = group[start:start + per_call]
            stack = np.stack([image.read_region(int(x0), int(y0), width, height) for x0, y0 in regions[members, :2]])
            out[members] = resize_crops(stack, size)
    return out


def box_crops(image: RoiImage, boxes: np.ndarray, size: int, context_px: int, fallback_px: int) -> np.ndarray:
    """(n, size, size, 3) uint8 crops of (n, 4) boxes as the verifier sees them (`crop_boxes`, `region_crops`): the
    one cutting of inference and of the verifier's training data."""
    regions = crop_boxes(np.asarray(boxes).reshape(-1, 4), image.width, image.height, context_px, fallback_px)
    return region_crops(image, regions, size)


def candidate_crops(image: RoiImage, boxes: np.ndarray, pixel_size_um: float, tolerance: float, size: int,
                    context_px: int, fallback_px: int, stain_normalization: str = "none") -> np.ndarray:
    """`box_crops` of (n, 4) boxes given in `image`'s pixels, cut from `image` seen at `pixel_size_um`
    (`midog.resampling.at_pixel_size`), stain-normalised with `image`'s own stains for "macenko"
    (`midog.stain`): how the pipeline's verifier, and the verifier's training data, cut candidates from an image of
    any scanner and lab."""
    view = at_pixel_size(image, pixel_size_um, tolerance)
    crops = box_crops(view, scale_boxes(boxes, view_scale(image, view)), size, context_px, fallback_px)
    return normalise(crops, stains_for(image, stain_normalization))


def stains_for(image: RoiImage, stain_normalization: str) -> ImageStains | None:
    """`image`'s stains where crops are normalised ("macenko"), None where they are not ("none")."""
    if stain_normalization == "none":
        return None
    if stain_normalization == "macenko":
        return image_stains(image)
    raise ValueError(f"unknown verifier.stain_normalization '{stain_normalization}'; expected "
                     f"{' or '.join(STAIN_NORMALIZATIONS)}")


def combine_probability(detector: np.ndarray, verifier: np.ndarray, mode: str) -> np.ndarray:
    """The output `probability`: the verifier's P(mitotic figure) ("verifier"), or detector confidence times it
    ("product", which ranks candidates the two stages agree on first)."""
    if mode == "verifier":
        return verifier.astype(np.float32)
    if mode == "product":
        return (detector * verifier).astype(np.float32)
    raise ValueError(f"unknown verifier.probability '{mode}'; expected one of {', '.join(PROBABILITY_MODES)}")


@dataclass
class Verifier:
    classifiers: list[BinaryClassifier]
    """One classifier, or an ensemble's members (their mean P(mitotic figure) is the verifier's)."""
    config: VerifierConfig
    fallback_box_px: int = 50
    """Side of the square cut for a degenerate box, in the verifier's pixels (`merging.box_size_px`)."""
    resample_tolerance: float = 0.02
    """`image.resample_tolerance`: crops are cut at the classifiers' `pixel_size_um` beyond it."""

    def __post_init__(self) -> None:
        if not self.classifiers:
            raise WeightsError("no verifier weights configured (verifier.weights is empty)")
        sizes = sorted({c.pixel_size_um for c in self.classifiers})
        if len(sizes) > 1:
            raise WeightsError(f"verifier.weights mix checkpoints trained at {', '.join(f'{s:g}' for s in sizes)} "
                               "µm/px: an ensemble averages crops of one scale")
        _ = self.member_context_px  # a list of another length than `classifiers` is refused at construction
        _ = self.member_stain_normalization

    @classmethod
    def from_weights(cls, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], config: VerifierConfig,
                     device: torch.device, fallback_box_px: int = 50, foundation: FoundationConfig | None = None,
                     resample_tolerance: float = 0.02) -> "Verifier":
        """One checkpoint file, or a list of them (an ensemble). `foundation`: where a foundation-model verifier's
        base weights are (see midog.foundation)."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        classifiers = [require_positive(load_classifier(path, device, foundation=foundation), MITOTIC_FIGURE,
                                        Path(path).name, "a verifier").use_backend(config.backend, path, "verifier")
                       for path in paths]
        return cls(classifiers, config, fallback_box_px, resample_tolerance)

    @property
    def pixel_size_um(self) -> float:
        """µm/px the crops are cut at: the members' own (one value, checked at construction)."""
        return self.classifiers[0].pixel_size_um

    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    @property
    def member_context_px(self) -> list[int]:
        """Each member's context around the box, in the order of `classifiers`."""
        return per_member(self.config.context_px, len(self.classifiers), "verifier.context_px", "values",
                          "verifier.weights")

    @property
    def member_stain_normalization(self) -> list[str]:
        """Each member's stain normalisation of its crops, in the order of `classifiers`."""
        return per_member(self.config.stain_normalization, len(self.classifiers), "verifier.stain_normalization",
                          "values", "verifier.weights")

    def crops(self, image: RoiImage, boxes: np.ndarray, context_px: int | None = None,
              stain_normalization: str | None = None) -> np.ndarray:
        """(n, crop_size, crop_size, 3) uint8 crops of the candidates' boxes (`image` pixels), at the classifier's
        pixel size, with `context_px` around each box and `stain_normalization` (None: the first member's)."""
        context = self.member_context_px[0] if context_px is None else context_px
        stain = self.member_stain_normalization[0] if stain_normalization is None else stain_normalization
        return candidate_crops(image, boxes, self.pixel_size_um, self.resample_tolerance,
                               self.config.crop_size, context, self.fallback_box_px, stain)

    def probabilities(self, image: RoiImage, boxes: np.ndarray) -> np.ndarray:
        """P(mitotic figure) per box, in order (an ensemble's: the mean of its members'); the crops of each
        context and stain normalisation are cut once."""
        if len(boxes) == 0:
            return np.zeros(0, dtype=np.float32)
        settings = list(zip(self.member_context_px, self.member_stain_normalization))
        crops_of = {setting: self.crops(image, boxes, *setting) for setting in dict.fromkeys(settings)}
        per_member = [c.predict_proba(crops_of[setting], tta=self.config.tta, batch_size=self.config.batch_size)
                      for c, setting in zip(self.classifiers, settings)]
        return np.mean(per_member, axis=0).astype(np.float32)

    def labels(self, probabilities: np.ndarray) -> list[str]:
        return [MITOTIC_FIGURE if p >= self.threshold else NON_MITOTIC_FIGURE for p in probabilities]
