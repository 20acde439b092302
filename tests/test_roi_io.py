from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import tifffile
from roi_factory import he_roi, write_mha, write_tiff

from midog.errors import InputError
from midog.roi_io import PhysicalTransform, TiffRoi, open_roi

STREAM = {"in_memory_max_megapixels": 0.0}
"""Force tile-by-tile reading, whatever the image size."""


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return he_roi(700, 500, seed=3)


def sitk_point(path: Path, xy: tuple[float, float]) -> tuple[float, float]:
    return sitk.ReadImage(str(path)).TransformContinuousIndexToPhysicalPoint(xy)


def test_tiff_non_square_spacing_matches_simpleitk(tmp_path: Path, pixels: np.ndarray):
    path = write_tiff(tmp_path / "roi.tif", pixels, spacing_um=(0.25, 0.5))
    with open_roi(path) as roi:
        assert (roi.width, roi.height) == (700, 500)
        assert roi.transform.spacing_um == pytest.approx((0.25, 0.5))
        assert not roi.spacing_is_fallback
        mm = roi.transform.to_mm(np.array([[100.0, 40.0], [699.5, 499.5]]))
    assert mm[0] == pytest.approx([0.025, 0.02])
    assert mm[1] == pytest.approx(sitk_point(path, (699.5, 499.5)))


def test_missing_spacing_falls_back_with_a_warning(tmp_path: Path, pixels: np.ndarray,
                                                   caplog: pytest.LogCaptureFixture):
    path = write_tiff(tmp_path / "roi.tif", pixels, spacing_um=None)  # tifffile writes 1/1 px per unit NONE
    mha = write_mha(tmp_path / "roi.mha", pixels, spacing_mm=None)  # SimpleITK's unset 1.0
    for image in (path, mha):
        with caplog.at_level(logging.WARNING), open_roi(image, fallback_spacing_um=0.25) as roi:
            assert roi.spacing_is_fallback
            assert roi.transform.spacing_mm == pytest.approx((0.00025, 0.00025))
            assert roi.transform.to_mm(np.array([[400.0, 4.0]]))[0] == pytest.approx([0.1, 0.001])
        assert "assuming 0.25 µm/px" in caplog.text
        caplog.clear()


@pytest.mark.parametrize("resolution, unit, placeholder_um", [
    ((10, 10), "CENTIMETER", 1000.0),   # libvips' default 1 px/mm, read by SimpleITK as its unset 1.0 mm
    ((72, 72), "INCH", 352.8),
    ((300, 300), "INCH", 84.67),
])
def test_placeholder_resolutions_fall_back_with_a_warning(tmp_path: Path, pixels: np.ndarray,
                                                          caplog: pytest.LogCaptureFixture, resolution, unit,
                                                          placeholder_um):
    path = tmp_path / "roi.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", resolution=resolution, resolutionunit=unit)
    assert sitk.ReadImage(str(path)).GetSpacing()[0] == pytest.approx(placeholder_um / 1000, rel=1e-3)
    with caplog.at_level(logging.WARNING), open_roi(path, fallback_spacing_um=0.25) as roi:
        assert roi.spacing_is_fallback
        assert roi.transform.spacing_um == pytest.approx((0.25, 0.25))
    assert "placeholder" in caplog.text and "assuming 0.25 µm/px" in caplog.text
    with open_roi(path, max_spacing_um=2000.0) as roi:           # the limit is a config value
        assert roi.transform.spacing_um[0] == pytest.approx(placeholder_um, rel=1e-3)


def test_coarse_but_plausible_spacing_is_kept(tmp_path: Path, pixels: np.ndarray):
    path = write_tiff(tmp_path / "roi.tif", pixels, spacing_um=(8.0, 8.0))   # a 1.25x overview
    with open_roi(path) as roi:
        assert not roi.spacing_is_fallback and roi.transform.spacing_um == pytest.approx((8.0, 8.0))


def test_mha_spacing_origin_and_pixels(tmp_path: Path, pixels: np.ndarray):
    path = write_mha(tmp_path / "roi.mha", pixels, spacing_mm=(0.00025, 0.0003), origin_mm=(1.0, 2.0))
    with open_roi(path) as roi:
        assert roi.transform.spacing_um == pytest.approx((0.25, 0.3))
        assert roi.transform.to_mm(np.array([[10.0, 20.0]]))[0] == pytest.approx(sitk_point(path, (10.0, 20.0)))
        np.testing.assert_array_equal(roi.read_region(100, 50, 64, 32), pixels[50:82, 100:164])
    with open_roi(path, **STREAM) as roi:  # region by region through SimpleITK's streaming reader
        assert roi._pixels is None
        np.testing.assert_array_equal(roi.read_region(100, 50, 64, 32), pixels[50:82, 100:164])


@pytest.mark.parametrize("layout", [
    {"bigtiff": True},
    {"bigtiff": True, "tile": 128, "compression": "zlib"},
    {"tile": 64, "pyramid_levels": 2, "compression": "jpeg"},
    {"compression": "zlib"},  # strips
])
def test_tiff_layouts_read_the_same_in_memory_and_streamed(tmp_path: Path, pixels: np.ndarray, layout: dict):
    path = write_tiff(tmp_path / "roi.tif", pixels, **layout)
    expected = tifffile.imread(path, level=0) if layout.get("pyramid_levels") else tifffile.imread(path)
    with open_roi(path) as whole, open_roi(path, **STREAM) as streamed:
        assert isinstance(streamed, TiffRoi) and streamed._pixels is None
        assert (streamed.width, streamed.height) == (700, 500)
        assert streamed.transform.spacing_um == pytest.approx((0.25, 0.25))
        for x, y, w, h in [(0, 0, 512, 512), (300, 200, 512, 512), (650, 450, 100, 100), (-20, -10, 50, 40)]:
            a, b = whole.read_region(x, y, w, h), streamed.read_region(x, y, w, h)
            assert a.shape == (h, w, 3) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)
            x0, y0 = max(x, 0), max(y, 0)
            np.testing.assert_array_equal(a[y0 - y:y0 - y + 20, x0 - x:x0 - x + 20], expected[y0:y0 + 20, x0:x0 + 20])
        outside = whole.read_region(690, 490, 20, 20)
        assert (outside[10:, :] == 255).all() and (outside[:, 10:] == 255).all()  # padded with white glass
    if layout.get("compression") != "jpeg":
        np.testing.assert_array_equal(expected, pixels)


@pytest.mark.parametrize("kind", ["rgb", "gray16-big-endian", "rgba"])
def test_uncompressed_strips_are_memory_mapped_not_decoded_whole(tmp_path: Path, kind: str):
    """tifffile writes uncompressed data as one strip: streamed, a region must cost its own rows, not the image."""
    import tracemalloc

    rgb = he_roi(3000, 2000, seed=3, figures=[(1500, 1000)])
    if kind == "rgb":
        data, expected = rgb, rgb
    elif kind == "rgba":
        data, expected = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1), rgb
    else:
        data, expected = rgb[..., 0].astype(">u2") * 257, np.repeat(rgb[..., :1], 3, axis=-1)
    path = tmp_path / "roi.tif"
    tifffile.imwrite(path, data, photometric="rgb" if data.ndim == 3 else "minisblack",
                     extrasamples=["unassalpha"] if kind == "rgba" else None,
                     byteorder=">" if kind.endswith("big-endian") else "<")
    assert len(tifffile.TiffFile(path).pages[0].dataoffsets) == 1
    with open_roi(path, **STREAM) as roi:
        tracemalloc.start()
        region = roi.read_region(1200, 900, 512, 512)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(region, expected[900:1412, 1200:1712])
        np.testing.assert_array_equal(roi.read_region(2900, 1950, 200, 100)[:50, :100], expected[1950:, 2900:])
        assert peak < 12 * 512 * 512 * 3, f"{peak / 2**20:.0f} MB traced for a 0.75 MB region"


@pytest.mark.parametrize("layout", ["tiled", "strip", "mha"])
@pytest.mark.parametrize("data", ["16-bit", "12-bit in 16", "8-bit in 16", "float 0-1", "float 0-255"])
def test_wide_data_streamed_reads_as_in_memory(tmp_path: Path, pixels: np.ndarray, layout: str, data: str):
    """One rule for the whole file: a streamed image is scaled by its data's maximum, as it is in memory (by the
    declared depth, 12-bit or 8-bit data held in 16 bits read 16 or 257 times too dark when streamed)."""
    values = {"16-bit": pixels.astype(np.uint16) * 257, "12-bit in 16": pixels.astype(np.uint16) * 16,
              "8-bit in 16": pixels.astype(np.uint16), "float 0-1": pixels.astype(np.float32) / 255,
              "float 0-255": pixels.astype(np.float32)}[data]
    if layout == "mha":
        path = write_mha(tmp_path / "roi.mha", values)
    else:
        path = write_tiff(tmp_path / "roi.tif", values, tile=128 if layout == "tiled" else None)
    with open_roi(path) as whole, open_roi(path, **STREAM) as streamed:
        assert whole._pixels is not None and streamed._pixels is None
        for x, y, w, h in [(0, 0, 700, 500), (300, 200, 128, 96)]:
            np.testing.assert_array_equal(streamed.read_region(x, y, w, h), whole.read_region(x, y, w, h))
    expected = pixels if data != "12-bit in 16" else np.rint(pixels.astype(np.float32) * 16 * 255 / 4095)
    np.testing.assert_array_equal(whole.read_region(0, 0, 700, 500), expected.astype(np.uint8))


@pytest.mark.parametrize("kind", ["gray", "rgba", "16bit"])
def test_gray_rgba_and_16_bit_come_out_rgb_uint8(tmp_path: Path, pixels: np.ndarray, kind: str):
    if kind == "gray":
        data, expected = pixels[..., 0], np.repeat(pixels[..., :1], 3, axis=-1)
    elif kind == "rgba":
        data, expected = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], -1), pixels
    else:
        data, expected = pixels.astype(np.uint16) * 257, pixels
    path = write_tiff(tmp_path / "roi.tif", data, tile=128)
    for options in ({}, STREAM):
        with open_roi(path, **options) as roi:
            np.testing.assert_array_equal(roi.read_region(0, 0, 700, 500), expected)


def test_tiles_are_read_on_demand_in_bounded_memory(tmp_path: Path):
    """A 20,000 x 16,000 px (960 MB as RGB) tiled BigTIFF: streamed by default, memory grows by a cache at most."""
    width, height, tile = 20000, 16000, 512
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8)

    def tiles():
        for _ in range((height // tile + (height % tile > 0)) * (width // tile + (width % tile > 0))):
            yield patch

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), bigtiff=True,
                     photometric="rgb", compression="zlib", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    process = psutil.Process()
    before = process.memory_info().rss
    with open_roi(path, segment_cache_mb=64) as roi:
        assert roi._pixels is None  # above the default in-memory limit
        assert (roi.width, roi.height) == (width, height)
        for x, y in [(0, 0), (9000, 7000), (19488, 15488), (5000, 12000)]:
            region = roi.read_region(x, y, tile, tile)
            np.testing.assert_array_equal(region[:8, :8], patch[y % tile:y % tile + 8, x % tile:x % tile + 8])
        assert len(roi._cache) <= roi._cache_size
        grown = process.memory_info().rss - before
    assert grown < 200 * 2**20


def test_unreadable_inputs_are_refused(tmp_path: Path, pixels: np.ndarray):
    text = tmp_path / "roi.tif"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not a readable TIFF"):
        open_roi(text)
    path = write_tiff(tmp_path / "full.tif", pixels, compression="zlib")
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError):
        with open_roi(truncated) as roi:
            roi.read_region(0, 0, 700, 500)
    png = tmp_path / "roi.png"
    png.write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported image type"):
        open_roi(png)
    with pytest.raises(InputError, match="image not found"):
        open_roi(tmp_path / "absent.tif")


def test_physical_transform_applies_direction_and_origin():
    flipped = PhysicalTransform(spacing_mm=(0.001, 0.002), origin_mm=(5.0, 6.0), direction=(-1.0, 0.0, 0.0, 1.0))
    assert flipped.to_mm(np.array([[10.0, 10.0]]))[0] == pytest.approx([4.99, 6.02])


def test_a_1_bit_min_is_white_roi_reads_white(tmp_path: Path):
    tifffile.imwrite(tmp_path / "white1.tif", np.zeros((40, 48), bool), photometric="miniswhite")
    with open_roi(tmp_path / "white1.tif") as roi:
        assert (roi.read_region(0, 0, 48, 40) == 255).all()


def test_an_aperio_svs_slide_opens_as_a_tiff(tmp_path: Path, pixels: np.ndarray):
    """MIDOG++ and the MITOS_WSI datasets publish .svs slides (tiled TIFFs), which training reads directly."""
    write_tiff(tmp_path / "slide.svs", pixels)
    write_tiff(tmp_path / "slide.tif", pixels)
    with open_roi(tmp_path / "slide.svs") as svs, open_roi(tmp_path / "slide.tif") as tif:
        assert (svs.width, svs.height) == (tif.width, tif.height)
        assert np.array_equal(svs.read_region(0, 0, 64, 48), tif.read_region(0, 0, 64, 48))


@pytest.mark.parametrize("compress", [False, True])
def test_a_truncated_mha_roi_is_refused_before_simpleitk_prints(tmp_path: Path, pixels: np.ndarray, compress: bool,
                                                                 capfd: pytest.CaptureFixture[str]):
    path = tmp_path / "roi.mha"
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path), useCompression=compress)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="roi.mha is truncated"):
        open_roi(path)
    assert capfd.readouterr().err == ""


def test_a_pyramid_level_is_decoded_once_per_open_image(tmp_path: Path, tiff_decodes: list):
    """Tissue detection and the stain estimate both ask a streamed slide for a reduced level: decoded once, shared
    read-only, whatever budget each asks with, as long as it picks the same level."""
    path = write_tiff(tmp_path / "slide.tif", he_roi(1500, 1000, seed=2), tile=128, pyramid_levels=2,
                      compression="zlib")
    with open_roi(path, in_memory_max_megapixels=0.0) as slide:
        first, again = slide.thumbnail(1_000_000), slide.thumbnail(500_000)
        assert first is again and first.shape == (500, 750, 3) and not first.flags.writeable
        assert slide.thumbnail(200_000).shape == (250, 375, 3)  # a smaller budget: the next level
    assert len(tiff_decodes) == 2
