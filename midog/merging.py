"""Tile detections → one set of candidates in image coordinates, duplicates from overlapping tiles merged.

`to_image_coordinates` is the one place where tile coordinates become image coordinates. It also drops detections
that touch a tile side shared with a neighbour (`merging.tile_edge_px`): the neighbour overlaps by more than a
figure's width, so it sees the whole figure, and the truncated box would otherwise survive IoU-based merging as a
second point. The merge itself is a strategy chosen by name (`merging.strategy`) from `MERGE_STRATEGIES`.

Both strategies look only at pairs of boxes that can overlap (`overlapping_pairs`, found through a grid of cells),
so merging costs time and memory in proportion to the number of candidates, not its square: a whole-slide image
gives hundreds of thousands of candidates, and torchvision's CPU NMS compares every kept box with every other one
(1.8 s for the 25,000 proposals of one 7,215 x 5,412 px ROI, 0.1 s here). The result is the same as torchvision's
`nms`/`batched_nms` (tests/test_merging.py compares them on random and tiled boxes).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

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


class RunTiles:
    """Origins of the tiles the detector ran on, to tell whether a tile side is shared with a neighbour that ran."""

    def __init__(self, origins: Sequence[tuple[int, int]]) -> None:
        self._xs_by_row: dict[int, list[int]] = {}
        self._ys_by_column: dict[int, list[int]] = {}
        for x, y in origins:
            self._xs_by_row.setdefault(int(y), []).append(int(x))
            self._ys_by_column.setdefault(int(x), []).append(int(y))
        for values in (*self._xs_by_row.values(), *self._ys_by_column.values()):
            values.sort()

    @staticmethod
    def _any_between(values: list[int], low: int, high: int) -> bool:
        i = bisect.bisect_right(values, low)
        return i < len(values) and values[i] < high

    def shared_sides(self, origin: tuple[int, int], tile: int) -> tuple[bool, bool, bool, bool]:
        """(left, top, right, bottom): whether a tile that ran overlaps this one across that side."""
        x, y = int(origin[0]), int(origin[1])
        row, column = self._xs_by_row.get(y, []), self._ys_by_column.get(x, [])
        return (self._any_between(row, x - tile, x), self._any_between(column, y - tile, y),
                self._any_between(row, x, x + tile), self._any_between(column, y, y + tile))


def interior_edge_mask(boxes: np.ndarray, origin: tuple[int, int], tile: int, width: int, height: int,
                       margin: int, run: RunTiles | None = None) -> np.ndarray:
    """True for boxes (tile coordinates) within `margin` px of a tile side that lies inside the image and, when
    `run` is given, that a neighbour which ran shares: a figure next to a tile skipped as glass stays."""
    if margin <= 0 or len(boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    x, y = origin
    left, top, right, bottom = run.shared_sides(origin, tile) if run is not None else (True,) * 4
    touches = np.zeros(len(boxes), dtype=bool)
    if x > 0 and left:
        touches |= boxes[:, 0] <= margin
    if y > 0 and top:
        touches |= boxes[:, 1] <= margin
    if x + tile < width and right:
        touches |= boxes[:, 2] >= tile - margin
    if y + tile < height and bottom:
        touches |= boxes[:, 3] >= tile - margin
    return touches


def to_image_coordinates(tiles: Sequence[TileDetections], tile: int, width: int, height: int,
                         edge_margin: int = 0) -> Candidates:
    """Shift every tile's boxes by its origin (clipped to the image), dropping boxes on tile sides shared with
    another tile in `tiles` (the tiles that ran: a side towards a tile skipped as glass keeps its boxes) and boxes
    centred in the padding of an image smaller than a tile (nothing of the image is there to point at)."""
    run = RunTiles([d.origin for d in tiles])
    boxes, scores, classes = [], [], []
    for detections in tiles:
        keep = ~interior_edge_mask(detections.boxes, detections.origin, tile, width, height, edge_margin, run)
        shifted = detections.boxes[keep] + np.array([*detections.origin, *detections.origin], dtype=np.float32)
        boxes.append(shifted)
        scores.append(detections.scores[keep])
        classes.append(detections.classes[keep])
    if not boxes:
        return Candidates.empty()
    merged = Candidates(np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32),
                        np.concatenate(classes).astype(np.int64))
    cx, cy = merged.centres.T
    inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    if not inside.all():
        merged = merged.take(inside)
    np.clip(merged.boxes[:, 0::2], 0, width, out=merged.boxes[:, 0::2])  # padding beyond a small image's border
    np.clip(merged.boxes[:, 1::2], 0, height, out=merged.boxes[:, 1::2])
    return merged


class MergeStrategy(Protocol):
    def merge(self, candidates: Candidates) -> Candidates:
        """Duplicates merged; the result is sorted by descending score."""
        ...


def overlapping_pairs(boxes: np.ndarray, iou: float, classes: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (first < second) of boxes whose IoU is at least `iou` (> 0), of the same class when `classes`.

    Two boxes can only overlap when they cover a common cell of a grid whose cells are about as large as most boxes,
    so only boxes that share a cell are compared. IoU is computed in float32 as torchvision's kernel computes it.
    """
    if iou <= 0:
        raise ValueError("overlapping_pairs needs an IoU threshold above 0")
    n = len(boxes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    boxes = np.asarray(boxes, dtype=np.float32)
    extent = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cell = float(max(16.0, np.percentile(extent, 90), extent.max() / 64))  # no box covers more than 65 x 65 cells
    low = np.floor((boxes[:, :2] - boxes[:, :2].min(0)) / cell).astype(np.int64)
    high = np.floor((boxes[:, 2:] - boxes[:, :2].min(0)) / cell).astype(np.int64)
    high = np.maximum(high, low)
    first, second = _pairs_sharing_a_cell(low, high)
    if classes is not None:
        same = classes[first] == classes[second]
        first, second = first[same], second[same]
    overlap = _iou(boxes[first], boxes[second]) >= np.float32(iou)
    return first[overlap], second[overlap]


def _pairs_sharing_a_cell(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair (i < j) of boxes that cover a common grid cell, once; box k covers cells low[k] to high[k]."""
    spans = high - low + 1
    counts = spans[:, 0] * spans[:, 1]
    box = np.repeat(np.arange(len(low)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cx = low[box, 0] + within % spans[box, 0]
    cy = low[box, 1] + within // spans[box, 0]
    cell_id = cy * (int(high[:, 0].max()) + 1) + cx
    order = np.argsort(cell_id, kind="stable")
    cell_id, box, cx, cy = cell_id[order], box[order], cx[order], cy[order]
    starts = np.flatnonzero(np.r_[True, cell_id[1:] != cell_id[:-1]])
    group_end = np.repeat(np.r_[starts[1:], len(box)], np.diff(np.r_[starts, len(box)]))
    later = group_end - np.arange(len(box)) - 1  # entries after this one in its cell
    entry = np.repeat(np.arange(len(box)), later)
    offset = np.arange(len(entry)) - np.repeat(np.cumsum(later) - later, later)
    first, second = box[entry], box[entry + 1 + offset]
    # a pair shares a rectangle of cells; count it once, in the rectangle's first cell
    once = ((cx[entry] == np.maximum(low[first, 0], low[second, 0]))
            & (cy[entry] == np.maximum(low[first, 1], low[second, 1])))
    first, second = first[once], second[once]
    return np.minimum(first, second), np.maximum(first, second)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of two (n, 4) float32 box arrays, as torchvision's NMS kernel computes it."""
    width = np.maximum(np.float32(0), np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]))
    height = np.maximum(np.float32(0), np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]))
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a + area_b - inter)


def _neighbours(n: int, first: np.ndarray, second: np.ndarray) -> list[list[int]]:
    """Adjacency lists of the overlap graph."""
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in zip(first.tolist(), second.tolist()):
        neighbours[i].append(j)
        neighbours[j].append(i)
    return neighbours


def _score_order(scores: np.ndarray) -> np.ndarray:
    """Most confident first; ties keep their input order (torchvision sorts stably too)."""
    return np.argsort(-scores, kind="stable")


def _greedy_keep(scores: np.ndarray, neighbours: list[list[int]]) -> np.ndarray:
    """Greedy suppression: most confident first, each kept item suppresses its neighbours; the kept indices in
    descending score."""
    suppressed = [False] * len(scores)
    keep = []
    for index in _score_order(scores).tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        for other in neighbours[index]:
            suppressed[other] = True
    return np.asarray(keep, dtype=np.int64)


def suppress_close_points(points_um: np.ndarray, scores: np.ndarray, radius_um: float) -> np.ndarray:
    """Indices (ascending) of the points kept by greedy point suppression: most probable first, every point closer
    than `radius_um` to a kept one dropped (`merging.final_radius_um`). Whatever threshold is applied afterwards,
    the kept points above it are the ones the same suppression among those points alone would keep, so scores can
    still be swept for AP and F1-optimal thresholds."""
    points_um = np.asarray(points_um, dtype=np.float64).reshape(-1, 2)
    if radius_um <= 0 or len(points_um) < 2:
        return np.arange(len(points_um))
    from scipy.spatial import cKDTree  # scikit-learn's dependency; imported here, as only this step needs it

    pairs = cKDTree(points_um).query_pairs(radius_um, p=2.0, output_type="ndarray")
    close = pairs[np.linalg.norm(points_um[pairs[:, 0]] - points_um[pairs[:, 1]], axis=1) < radius_um]
    return np.sort(_greedy_keep(np.asarray(scores), _neighbours(len(points_um), close[:, 0], close[:, 1])))


@dataclass
class NmsMerge:
    """Non-maximum suppression: of boxes overlapping with IoU >= `iou`, only the most confident one stays."""

    iou: float = 0.5
    class_agnostic: bool = True

    def merge(self, candidates: Candidates) -> Candidates:
        if len(candidates) == 0:
            return candidates
        first, second = overlapping_pairs(candidates.boxes, self.iou,
                                          None if self.class_agnostic else candidates.classes)
        return candidates.take(_greedy_keep(candidates.scores, _neighbours(len(candidates), first, second)))


@dataclass
class GreedyNmmMerge:
    """Greedy non-maximum merging (SAHI's GREEDYNMM): the most confident box absorbs every remaining box with
    IoU >= `iou`; the merged box is their union and keeps the highest score and its class."""

    iou: float = 0.5
    class_agnostic: bool = True

    def merge(self, candidates: Candidates) -> Candidates:
        if len(candidates) == 0:
            return candidates
        first, second = overlapping_pairs(candidates.boxes, self.iou,
                                          None if self.class_agnostic else candidates.classes)
        neighbours = _neighbours(len(candidates), first, second)
        taken = [False] * len(candidates)
        kept: list[int] = []
        groups: dict[int, list[int]] = {}  # position in `kept` → the boxes it absorbed, itself first
        for index in _score_order(candidates.scores).tolist():
            if taken[index]:
                continue
            group = [index] + [other for other in neighbours[index] if not taken[other]]
            for member in group:
                taken[member] = True
            if len(group) > 1:
                groups[len(kept)] = group
            kept.append(index)
        merged = candidates.take(np.asarray(kept, dtype=np.int64))
        for position, group in groups.items():
            members = candidates.boxes[group]
            merged.boxes[position] = [*members[:, :2].min(0), *members[:, 2:].max(0)]
        return merged


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
