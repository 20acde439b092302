from __future__ import annotations

import numpy as np
import pytest

from midog.config import MergingConfig
from midog.merging import (Candidates, GreedyNmmMerge, NmsMerge, build_merger, interior_edge_mask, merge_tiles,
                           to_image_coordinates)
from midog.proposals import TileDetections

TILE = 512


def tile(origin: tuple[int, int], *boxes: tuple[float, float, float, float, float], cls: int = 0) -> TileDetections:
    data = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    return TileDetections(origin, data[:, :4], data[:, 4], np.full(len(data), cls, np.int64))


def test_figure_inside_the_overlap_gives_one_point():
    # a 50 px figure at image x 440..490 lies in tile (0, 0) and in tile (410, 0), seen whole by both
    tiles = [tile((0, 0), (440, 100, 490, 150, 0.8)), tile((410, 0), (30.5, 101, 80.5, 151, 0.7))]
    merged = merge_tiles(tiles, TILE, 2000, 2000, MergingConfig())
    assert len(merged) == 1
    assert merged.centres[0] == pytest.approx([465.0, 125.0])
    assert merged.scores[0] == pytest.approx(0.8)


def test_figure_cut_by_a_tile_side_gives_one_point():
    # image x 495..545: tile (0, 0) sees only 495..512 (truncated by its right side), tile (410, 0) sees it whole
    tiles = [tile((0, 0), (495, 300, 512, 350, 0.9)), tile((410, 0), (85, 300, 135, 350, 0.6))]
    merged = merge_tiles(tiles, TILE, 2000, 2000, MergingConfig())
    assert len(merged) == 1
    assert merged.centres[0] == pytest.approx([520.0, 325.0])
    # IoU of the two boxes is 17/50 < 0.5: without the tile-side rule the figure would be counted twice
    assert len(merge_tiles(tiles, TILE, 2000, 2000, MergingConfig(tile_edge_px=0))) == 2


def test_boxes_on_the_image_border_are_kept():
    boxes = np.array([[0, 0, 20, 20], [492, 492, 512, 512], [200, 0, 250, 30]], np.float32)
    assert not interior_edge_mask(boxes, (0, 0), TILE, 512, 512, 4).any()  # the tile is the whole image
    assert interior_edge_mask(boxes, (0, 0), TILE, 1000, 1000, 4).tolist() == [False, True, False]
    assert interior_edge_mask(boxes, (410, 410), TILE, 922, 922, 4).tolist() == [True, False, True]


def test_shift_to_image_coordinates_happens_once_and_clips_padding():
    tiles = [tile((820, 410), (10, 20, 60, 70, 0.5)), tile((0, 0), (250, 250, 400, 400, 0.4))]
    wide = to_image_coordinates(tiles, TILE, width=2000, height=1000)
    np.testing.assert_allclose(wide.boxes, [[830, 430, 880, 480], [250, 250, 400, 400]])
    narrow = to_image_coordinates(tiles, TILE, width=300, height=1000)  # boxes reaching into padding are clipped
    np.testing.assert_allclose(narrow.boxes, [[300, 430, 300, 480], [250, 250, 300, 400]])


def test_merge_threshold_is_iou_at_least_half():
    # two 100 x 100 boxes shifted by 100/3 px overlap with IoU exactly 0.5
    shift = 100 / 3
    boxes = np.array([[0, 0, 100, 100], [shift, 0, 100 + shift, 100]], np.float32)
    candidates = Candidates(boxes, np.array([0.9, 0.8], np.float32), np.zeros(2, np.int64))
    assert len(NmsMerge(0.5).merge(candidates)) == 1
    assert len(NmsMerge(0.51).merge(candidates)) == 2


def test_strategies_are_swappable_and_class_awareness_is_configurable():
    boxes = np.array([[0, 0, 50, 50], [5, 0, 55, 50], [300, 300, 350, 350]], np.float32)
    candidates = Candidates(boxes, np.array([0.5, 0.9, 0.7], np.float32), np.array([0, 1, 0]))
    nms = build_merger(MergingConfig(strategy="nms")).merge(candidates)
    assert nms.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_array_equal(nms.boxes[0], boxes[1])
    greedy = build_merger(MergingConfig(strategy="greedy_nmm")).merge(candidates)
    assert isinstance(build_merger(MergingConfig(strategy="greedy_nmm")), GreedyNmmMerge)
    np.testing.assert_array_equal(greedy.boxes[0], [0, 0, 55, 50])  # union of the merged boxes
    assert greedy.scores.tolist() == pytest.approx([0.9, 0.7])
    assert len(NmsMerge(0.5, class_agnostic=False).merge(candidates)) == 3
    with pytest.raises(ValueError, match="merging.strategy"):
        build_merger(MergingConfig(strategy="wbf"))


def test_no_detections_merge_to_nothing():
    assert len(merge_tiles([], TILE, 100, 100, MergingConfig())) == 0
    assert len(merge_tiles([tile((0, 0))], TILE, 100, 100, MergingConfig())) == 0
