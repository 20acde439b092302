"""benchmarks/bench_limits.py's slide generator, at a tiny size: a pyramidal TIFF that midog streams as a slide."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile

from midog.roi_io import TiffRoi, open_roi
from midog.tiling import tissue_fraction

REPO_ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 3000, 2000


@pytest.fixture(scope="module")
def bench_limits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_limits", REPO_ROOT / "benchmarks" / "bench_limits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slide(bench_limits: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    return bench_limits.write_slide(path, WIDTH, HEIGHT, levels=2, tissue_share=0.3, regions=2, seed=3)


def test_slide_is_a_tiled_jpeg_bigtiff_with_subifd_levels_and_resolution(slide: Path):
    assert not slide.with_name(slide.name + ".partial").exists()
    with tifffile.TiffFile(slide) as tif:
        assert tif.is_bigtiff
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(2000, 3000, 3), (1000, 1500, 3), (500, 750, 3)]
        for level in levels:
            page = level.pages[0]
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (512, 512)
            assert page.compression == tifffile.COMPRESSION.JPEG
        assert [int(level.pages[0].subfiletype) for level in levels] == [0, 1, 1]
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tags["XResolution"].value == tags["YResolution"].value == (40000, 1)  # 0.25 µm/px


def test_midog_streams_level_0_with_its_spacing_and_a_thumbnail(slide: Path):
    with open_roi(slide, in_memory_max_megapixels=1) as roi:  # smaller than the slide: read tile by tile
        assert isinstance(roi, TiffRoi) and roi._pixels is None
        assert (roi.width, roi.height) == (WIDTH, HEIGHT)
        assert roi.transform.spacing_um == pytest.approx((0.25, 0.25)) and not roi.spacing_is_fallback
        expected = tifffile.imread(slide, level=0)
        np.testing.assert_array_equal(roi.read_region(700, 300, 1400, 900), expected[300:1200, 700:2100])
        assert roi.thumbnail(2_000_000).shape == (1000, 1500, 3)


def test_slide_is_mostly_glass_with_tissue_in_the_regions(slide: Path, bench_limits: ModuleType):
    level0 = tifffile.imread(slide, level=0)
    thumbnail = tifffile.imread(slide, level=2)
    share = tissue_fraction(level0, saturation=0.07)
    assert 0.1 < share < 0.45
    assert tissue_fraction(thumbnail, saturation=0.07) == pytest.approx(share, abs=0.05)
    glass = level0[~_tissue_mask(level0)]
    assert glass.std() < 3 and abs(float(glass.mean()) - bench_limits.GLASS_RGB) < 2
    regions = bench_limits.tissue_regions(WIDTH, HEIGHT, 0.3, 2, 3)
    for region in regions:  # the centre of every region is tissue
        y, x = int(region.cy), int(region.cx)
        assert tissue_fraction(level0[y - 32:y + 32, x - 32:x + 32], 0.07) > 0.9


def _tissue_mask(rgb: np.ndarray) -> np.ndarray:
    pixels = rgb.astype(np.int16)
    high, low = pixels.max(-1), pixels.min(-1)
    return (high - low) > 0.07 * np.maximum(high, 1)
