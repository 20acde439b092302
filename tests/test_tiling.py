from __future__ import annotations

import numpy as np
import pytest
from roi_factory import he_roi

from midog.tiling import axis_origins, has_tissue, tile_origins, tissue_fraction


def test_midog_roi_origins_are_exact():
    xs = axis_origins(7215, 512, 0.2)
    ys = axis_origins(5412, 512, 0.2)
    assert xs == [410 * k for k in range(17)] + [6703]
    assert ys == [410 * k for k in range(12)] + [4900]
    origins = tile_origins(7215, 5412, 512, 0.2)
    assert len(origins) == 18 * 13
    assert origins[:3] == [(0, 0), (410, 0), (820, 0)]
    assert origins[17] == (6703, 0) and origins[18] == (0, 410) and origins[-1] == (6703, 4900)


@pytest.mark.parametrize("length, expected", [
    (300, [0]), (512, [0]), (513, [0, 1]), (922, [0, 410]), (923, [0, 410, 411]), (1000, [0, 410, 488]),
])
def test_axis_origins_small_and_boundary_cases(length: int, expected: list[int]):
    assert axis_origins(length, 512, 0.2) == expected


def test_image_smaller_than_a_tile_gets_one_origin_at_zero():
    assert tile_origins(300, 200, 512, 0.2) == [(0, 0)]
    assert tile_origins(1, 1, 512, 0.2) == [(0, 0)]


@pytest.mark.parametrize("width, height", [(7215, 5412), (1500, 1200), (513, 4000), (100, 700), (922, 922)])
@pytest.mark.parametrize("tile, overlap", [(512, 0.2), (256, 0.5), (640, 0.0)])
def test_every_pixel_covered_no_negative_or_duplicate_origins(width: int, height: int, tile: int, overlap: float):
    origins = tile_origins(width, height, tile, overlap)
    assert len(set(origins)) == len(origins)
    covered = np.zeros((height, width), dtype=bool)
    for x, y in origins:
        assert x >= 0 and y >= 0
        assert x + tile <= max(width, tile) and y + tile <= max(height, tile)  # full tiles, inside the image
        covered[y:y + tile, x:x + tile] = True
    assert covered.all()


def test_same_slices_as_sahi_without_its_duplicates():
    slicing = pytest.importorskip("sahi.slicing", reason="SAHI is a benchmark-only dependency")
    for width, height in [(7215, 5412), (1500, 1200), (922, 1000)]:
        boxes = slicing.get_slice_bboxes(height, width, 512, 512, overlap_height_ratio=0.2, overlap_width_ratio=0.2)
        sahi = list(dict.fromkeys((b[0], b[1]) for b in boxes))
        assert tile_origins(width, height, 512, 0.2) == sahi


def test_bad_tiling_settings_are_refused():
    with pytest.raises(ValueError):
        axis_origins(1000, 512, 1.0)
    with pytest.raises(ValueError):
        tile_origins(0, 10, 512, 0.2)


def test_tissue_detection_tells_stained_tissue_from_glass_and_black():
    tissue = he_roi(512, 512, seed=1)
    assert tissue_fraction(tissue, 0.07) > 0.9
    assert tissue_fraction(np.full((512, 512, 3), 255, np.uint8), 0.07) == 0.0
    assert tissue_fraction(np.zeros((512, 512, 3), np.uint8), 0.07) == 0.0
    half = tissue.copy()
    half[:, 256:] = 250
    assert 0.4 < tissue_fraction(half, 0.07) < 0.6
    assert has_tissue(tissue, 0.07, 0.02) and not has_tissue(np.full((64, 64, 3), 240, np.uint8), 0.07, 0.02)
    assert has_tissue(np.full((64, 64, 3), 240, np.uint8), 0.07, 0.0)  # 0 = never skip


def test_grayscale_tissue_is_judged_by_brightness():
    gray = np.repeat(he_roi(256, 256, seed=3).mean(axis=-1, keepdims=True).astype(np.uint8), 3, axis=-1)
    assert tissue_fraction(gray, 0.07) > 0.9  # no colour anywhere, yet darker than glass
    glass = np.full((256, 256, 3), 235, np.uint8)
    assert tissue_fraction(glass, 0.07) == 0.0 and not has_tissue(glass, 0.07, 0.02)
    half = gray.copy()
    half[:, 128:] = 240
    assert 0.4 < tissue_fraction(half, 0.07) < 0.6
    assert tissue_fraction(half, 0.07, gray_max=0.1) == 0.0  # the brightness limit is the config's


def test_a_side_one_pixel_longer_than_a_tile_gets_the_minimal_cover():
    """513 px: two tiles (origins 0 and 1) are the fewest that reach the last pixel without padding; the layout
    stays SAHI's (steps of the stride, the last tile moved in), so detections match SAHI's tile for tile."""
    assert [x for x, _ in tile_origins(513, 100, 512, 0.2)] == [0, 1]
    assert [x for x, _ in tile_origins(512, 100, 512, 0.2)] == [0]
    assert [x for x, _ in tile_origins(1000, 100, 512, 0.2)] == [0, 410, 488]
