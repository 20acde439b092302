from __future__ import annotations

import numpy as np
import pytest

from midog.config import MergingConfig
from midog.merging import (Candidates, GreedyNmmMerge, NmsMerge, build_merger, interior_edge_mask, merge_tiles,
                           overlapping_pairs, suppress_close_points, to_image_coordinates)
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


def test_a_figure_next_to_a_tile_skipped_as_glass_is_kept():
    # a figure on the left side of the tile at x 410, whose left neighbour (x 0) held no tissue and did not run
    alone = [tile((410, 0), (1, 100, 40, 150, 0.8))]
    assert len(merge_tiles(alone, TILE, 1000, 512, MergingConfig())) == 1
    # with the neighbour run, it sees the figure whole: the cut box goes, the whole one stays
    both = alone + [tile((0, 0), (395, 100, 450, 150, 0.9))]
    merged = merge_tiles(both, TILE, 1000, 512, MergingConfig())
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.9)


def test_boxes_on_the_image_border_are_kept():
    boxes = np.array([[0, 0, 20, 20], [492, 492, 512, 512], [200, 0, 250, 30]], np.float32)
    assert not interior_edge_mask(boxes, (0, 0), TILE, 512, 512, 4).any()  # the tile is the whole image
    assert interior_edge_mask(boxes, (0, 0), TILE, 1000, 1000, 4).tolist() == [False, True, False]
    assert interior_edge_mask(boxes, (410, 410), TILE, 922, 922, 4).tolist() == [True, False, True]


def test_shift_to_image_coordinates_happens_once_and_clips_padding():
    tiles = [tile((820, 410), (10, 20, 60, 70, 0.5)), tile((0, 0), (250, 250, 340, 400, 0.4), (256, 256, 512, 512, 0.3))]
    wide = to_image_coordinates(tiles, TILE, width=2000, height=1000)
    np.testing.assert_allclose(wide.boxes, [[830, 430, 880, 480], [250, 250, 340, 400], [256, 256, 512, 512]])
    # an image smaller than a tile: a box reaching into the padding is clipped, one centred there is dropped
    assert len(to_image_coordinates(tiles, TILE, width=300, height=200)) == 0  # every centre below row 200
    short = to_image_coordinates(tiles, TILE, width=300, height=1000)
    np.testing.assert_allclose(short.boxes, [[250, 250, 300, 400]])
    np.testing.assert_allclose(short.scores, [0.4])


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


def random_candidates(seed: int) -> tuple[Candidates, float]:
    """Boxes of mixed sizes (2 to 400 px), crowded or sparse, with tied scores, two classes, and an IoU threshold."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 2500))
    corner = rng.uniform(0, rng.uniform(100, 3000), (n, 2))
    size = rng.uniform(2, rng.choice([20, 60, 400]), (n, 2))
    boxes = np.concatenate([corner, corner + size], 1).astype(np.float32)
    scores = rng.choice(np.linspace(0.2, 1, int(rng.choice([4, 1000]))), n).astype(np.float32)
    return Candidates(boxes, scores, rng.integers(0, 2, n)), float(rng.choice([0.05, 0.3, 0.5, 0.8]))


@pytest.mark.parametrize("seed", range(12))
def test_overlapping_pairs_are_exactly_the_pairs_above_the_threshold(seed):
    torch = pytest.importorskip("torch")
    from torchvision.ops import box_iou

    candidates, iou = random_candidates(seed)
    boxes = torch.from_numpy(candidates.boxes)
    expected = np.argwhere(np.triu(box_iou(boxes, boxes).numpy() >= iou, k=1))
    first, second = overlapping_pairs(candidates.boxes, iou)
    found = sorted(zip(first.tolist(), second.tolist()))
    # box_iou and the NMS kernel round differently: at most a pair sitting exactly on the threshold may differ
    assert len(set(found) ^ set(map(tuple, expected.tolist()))) <= 1
    assert len(found) == len(set(found))  # each pair once


@pytest.mark.parametrize("seed", range(12))
def test_nms_merge_keeps_what_torchvision_nms_keeps(seed):
    torch = pytest.importorskip("torch")
    from torchvision.ops import batched_nms, nms

    candidates, iou = random_candidates(seed)
    boxes, scores = torch.from_numpy(candidates.boxes), torch.from_numpy(candidates.scores)
    below = float(np.nextafter(np.float32(iou), np.float32(0)))  # torchvision suppresses IoU > its threshold
    np.testing.assert_array_equal(NmsMerge(iou).merge(candidates).boxes, candidates.boxes[nms(boxes, scores, below)])
    by_class = NmsMerge(iou, class_agnostic=False).merge(candidates)
    expected = batched_nms(boxes, scores, torch.from_numpy(candidates.classes), below).numpy()
    assert sorted(map(tuple, by_class.boxes.tolist())) == sorted(map(tuple, candidates.boxes[expected].tolist()))
    assert np.all(np.diff(by_class.scores) <= 0)


def test_merging_scales_with_the_number_of_candidates():
    """200,000 candidates (a whole-slide image's worth): an n x n IoU matrix would need 40 GB."""
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 100_000, (200_000, 2))
    boxes = np.concatenate([corner, corner + 50], 1).astype(np.float32)
    candidates = Candidates(boxes, rng.random(200_000).astype(np.float32), np.zeros(200_000, np.int64))
    for merger in (NmsMerge(0.5), GreedyNmmMerge(0.5)):
        merged = merger.merge(candidates)
        assert 0.99 * len(candidates) < len(merged) < len(candidates)  # a few random boxes do overlap


def test_merge_iou_must_be_positive():
    """IoU 0 would merge boxes that do not even touch (load_config refuses it too, see test_config)."""
    with pytest.raises(ValueError, match="IoU threshold above 0"):
        build_merger(MergingConfig(iou=0.0)).merge(random_candidates(0)[0])


def test_final_suppression_keeps_the_most_probable_of_close_points():
    # a chain: b is within 7.5 µm of a and of c, a and c are 12 µm apart; d stands alone
    points = np.array([[0.0, 0.0], [6.0, 0.0], [12.0, 0.0], [100.0, 100.0]])
    scores = np.array([0.5, 0.9, 0.4, 0.1])
    assert suppress_close_points(points, scores, 7.5).tolist() == [1, 3]  # b removes a and c, greedily
    scores = np.array([0.9, 0.5, 0.4, 0.1])
    assert suppress_close_points(points, scores, 7.5).tolist() == [0, 2, 3]  # a removes b; b then removes nothing
    assert suppress_close_points(points, scores, 6.0).tolist() == [0, 1, 2, 3]  # 6.0 apart is not closer than 6.0
    assert suppress_close_points(points, scores, 0).tolist() == [0, 1, 2, 3]
    assert suppress_close_points(np.zeros((0, 2)), np.zeros(0), 7.5).tolist() == []


@pytest.mark.parametrize("seed", [0, 1])
def test_final_suppression_commutes_with_any_threshold(seed):
    # the kept points above a threshold are what suppression among the points above it keeps, so AP and an
    # F1-optimal threshold can be swept over one suppressed output
    rng = np.random.default_rng(seed)
    points, scores = rng.uniform(0, 200, (400, 2)), rng.uniform(0, 1, 400)
    kept = suppress_close_points(points, scores, 7.5)
    for threshold in (0.2, 0.5, 0.8):
        above = np.flatnonzero(scores >= threshold)
        alone = above[suppress_close_points(points[above], scores[above], 7.5)]
        assert sorted(alone.tolist()) == sorted(kept[scores[kept] >= threshold].tolist())
    distances = np.linalg.norm(points[kept][:, None] - points[kept][None], axis=2)
    assert (distances[np.triu_indices(len(kept), 1)] >= 7.5).all()
    assert len(kept) < len(points)
