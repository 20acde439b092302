"""Tile detections → one set of candidates in image coordinates, duplicates from overlapping tiles merged.

`to_image_coordinates` is the one place where tile coordinates become image coordinates. It also drops detections
that touch a tile side shared with a neighbour (`merging.tile_edge_px`): the neighbour overlaps by more than a
figure's width, so it sees the whole figure, and the truncated box would otherwise survive IoU-based merging as a
second point. The merge itself is a strategy chosen by name (`merging.strategy`) from `MERGE_STRATEGIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou, nms

from midog.config import MergingConfig
from midog.proposals import TileDetections


@dataclass
class Candidates:
    """Detector candidates in image pixel coordinates."""

    boxes: np.ndarray
    """(n, 4) float32 x1, y1, x2, y2."""
    scores: np.ndarray
    """(n,) float32 detector confidence."""
    classes: np.ndarray
    """(n,) int64 detector class."""

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def centres(self) -> np.ndarray:
        """(n, 2) box centres (x, y) in pixels."""
        return np.stack([(self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2], 1)

    def take(self, index: np.ndarray) -> "Candidates":
        return Candidates(self.boxes[index], self.scores[index], self.classes[index])

    @staticmethod
    def empty() -> "Candidates":
        return Candidates(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def interior_edge_mask(boxes: np.ndarray, origin: tuple[int, int], tile: int, width: int, height: int,
                       margin: int) -> np.ndarray:
    """True for boxes (tile coordinates) within `margin` px of a tile side that lies inside the image."""
    if margin <= 0 or len(boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    x, y = origin
    touches = np.zeros(len(boxes), dtype=bool)
    if x > 0:
        touches |= boxes[:, 0] <= margin
    if y > 0:
        touches |= boxes[:, 1] <= margin
    if x + tile < width:
        touches |= boxes[:, 2] >= tile - margin
    if y + tile < height:
        touches |= boxes[:, 3] >= tile - margin
    return touches


def to_image_coordinates(tiles: Sequence[TileDetections], tile: int, width: int, height: int,
                         edge_margin: int = 0) -> Candidates:
    """Shift every tile's boxes by its origin (clipped to the image), dropping boxes on shared tile sides."""
    boxes, scores, classes = [], [], []
    for detections in tiles:
        keep = ~interior_edge_mask(detections.boxes, detections.origin, tile, width, height, edge_margin)
        shifted = detections.boxes[keep] + np.array([*detections.origin, *detections.origin], dtype=np.float32)
        boxes.append(shifted)
        scores.append(detections.scores[keep])
        classes.append(detections.classes[keep])
    if not boxes:
        return Candidates.empty()
    merged = Candidates(np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32),
                        np.concatenate(classes).astype(np.int64))
    np.clip(merged.boxes[:, 0::2], 0, width, out=merged.boxes[:, 0::2])  # padding beyond a small image's border
    np.clip(merged.boxes[:, 1::2], 0, height, out=merged.boxes[:, 1::2])
    return merged


class MergeStrategy(Protocol):
    def merge(self, candidates: Candidates) -> Candidates:
        """Duplicates merged; the result is sorted by descending score."""
        ...


def _suppressing_threshold(iou: float) -> float:
    """torchvision suppresses IoU > threshold; the method merges IoU >= iou, so step just below it."""
    return float(np.nextafter(np.float32(iou), np.float32(0)))


@dataclass
class NmsMerge:
    """Non-maximum suppression: of boxes overlapping with IoU >= `iou`, only the most confident one stays."""

    iou: float = 0.5
    class_agnostic: bool = True

    def merge(self, candidates: Candidates) -> Candidates:
        if len(candidates) == 0:
            return candidates
        boxes = torch.from_numpy(candidates.boxes)
        scores = torch.from_numpy(candidates.scores)
        threshold = _suppressing_threshold(self.iou)
        if self.class_agnostic:
            keep = nms(boxes, scores, threshold)
        else:
            keep = batched_nms(boxes, scores, torch.from_numpy(candidates.classes), threshold)
        return candidates.take(keep.numpy())


@dataclass
class GreedyNmmMerge:
    """Greedy non-maximum merging (SAHI's GREEDYNMM): the most confident box absorbs every remaining box with
    IoU >= `iou`; the merged box is their union and keeps the highest score and its class."""

    iou: float = 0.5
    class_agnostic: bool = True

    def merge(self, candidates: Candidates) -> Candidates:
        if len(candidates) == 0:
            return candidates
        order = np.argsort(-candidates.scores, kind="stable")
        boxes = torch.from_numpy(candidates.boxes[order])
        overlaps = box_iou(boxes, boxes).numpy() >= self.iou
        if not self.class_agnostic:
            classes = candidates.classes[order]
            overlaps &= classes[:, None] == classes[None, :]
        taken = np.zeros(len(order), dtype=bool)
        out_boxes, out_index = [], []
        for i in range(len(order)):
            if taken[i]:
                continue
            group = np.flatnonzero(overlaps[i] & ~taken)
            taken[group] = True
            members = candidates.boxes[order[group]]
            out_boxes.append([members[:, 0].min(), members[:, 1].min(), members[:, 2].max(), members[:, 3].max()])
            out_index.append(order[i])
        index = np.asarray(out_index)
        return Candidates(np.asarray(out_boxes, dtype=np.float32), candidates.scores[index],
                          candidates.classes[index])


MERGE_STRATEGIES: dict[str, type] = {"nms": NmsMerge, "greedy_nmm": GreedyNmmMerge}


def build_merger(config: MergingConfig) -> MergeStrategy:
    if config.strategy not in MERGE_STRATEGIES:
        raise ValueError(f"unknown merging.strategy '{config.strategy}'; expected one of {sorted(MERGE_STRATEGIES)}")
    return MERGE_STRATEGIES[config.strategy](iou=config.iou, class_agnostic=config.class_agnostic)


def merge_tiles(tiles: Sequence[TileDetections], tile: int, width: int, height: int,
                config: MergingConfig) -> Candidates:
    """Tile detections → merged candidates in image coordinates, most confident first."""
    candidates = to_image_coordinates(tiles, tile, width, height, config.tile_edge_px)
    return build_merger(config).merge(candidates)
