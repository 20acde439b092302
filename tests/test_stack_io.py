"""Track 2 stack reading: every odd format in, RGB uint8 (H, W, 3) pages out, lazily; bad files → InputError."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import shared_path
from stack_factory import he_pages, write_mha, write_tiff

from midog.errors import InputError
from midog.stack_io import open_stack


def read_all(path: Path, batch_size: int = 4) -> list[np.ndarray]:
    with open_stack(path) as stack:
        pages = [page for batch in stack.iter_batches(batch_size) for page in batch]
        assert len(pages) == stack.num_pages
    for page in pages:
        assert page.dtype == np.uint8 and page.ndim == 3 and page.shape[-1] == 3
    return pages


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return he_pages(6, size=40, seed=3)


def test_rgb_tiff_round_trips_exactly(tmp_path: Path, crops: np.ndarray):
    pages = read_all(write_tiff(tmp_path / "rgb.tiff", crops))
    np.testing.assert_array_equal(np.stack(pages), crops)


@pytest.mark.parametrize("compression", ["zlib", "lzw", "packbits"])
def test_compressed_tiff(tmp_path: Path, crops: np.ndarray, compression: str):
    pages = read_all(write_tiff(tmp_path / "c.tif", crops, compression=compression))
    np.testing.assert_array_equal(np.stack(pages), crops)


def test_jpeg_tiff_is_close(tmp_path: Path, crops: np.ndarray):
    pages = read_all(write_tiff(tmp_path / "j.tif", crops, compression="jpeg"))
    assert np.abs(np.stack(pages).astype(int) - crops).mean() < 6


def test_grayscale_becomes_three_equal_channels(tmp_path: Path, crops: np.ndarray):
    gray = crops[..., 1]
    pages = read_all(write_tiff(tmp_path / "gray.tif", gray))
    for page, expected in zip(pages, gray):
        for channel in range(3):
            np.testing.assert_array_equal(page[..., channel], expected)


def test_rgba_drops_alpha(tmp_path: Path, crops: np.ndarray):
    alpha = np.full(crops.shape[:-1] + (1,), 128, np.uint8)
    pages = read_all(write_tiff(tmp_path / "rgba.tif", np.concatenate([crops, alpha], axis=-1)))
    np.testing.assert_array_equal(np.stack(pages), crops)


def test_16bit_full_range_scales_back_to_8bit(tmp_path: Path, crops: np.ndarray):
    pages = read_all(write_tiff(tmp_path / "rgb16.tif", crops.astype(np.uint16) * 257))
    np.testing.assert_array_equal(np.stack(pages), crops)


def test_12bit_data_in_16bit_container_uses_its_range(tmp_path: Path):
    page = np.array([[0, 2048, 4095]], dtype=np.uint16).repeat(4, axis=0)
    (out,) = read_all(write_tiff(tmp_path / "gray12.tif", [page]))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_8bit_values_in_16bit_container_are_kept(tmp_path: Path, crops: np.ndarray):
    pages = read_all(write_tiff(tmp_path / "rgb16_8.tif", crops.astype(np.uint16)))
    np.testing.assert_array_equal(np.stack(pages), crops)


@pytest.mark.parametrize("suffix", [".tif", ".mha"])
def test_16bit_pages_share_one_scale_per_file(tmp_path: Path, crops: np.ndarray, suffix: str):
    """A dark page keeps its darkness beside a bright one, in whatever batch it is read: one rule for the file."""
    wide = crops.astype(np.uint16) * 257
    wide[1] //= 4  # every value below 2**15: a per-page rule would divide it by 2**14 - 1, brightening it 4x
    path = write_tiff(tmp_path / "s.tif", wide) if suffix == ".tif" else write_mha(tmp_path / "s.mha", wide)
    for batch_size in (1, 4):
        pages = read_all(path, batch_size=batch_size)
        np.testing.assert_array_equal(pages[0], crops[0])
        np.testing.assert_array_equal(pages[1], np.rint(wide[1] / 257.0).astype(np.uint8))


def test_planar_rgb(tmp_path: Path, crops: np.ndarray):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, crops.transpose(0, 3, 1, 2), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(np.stack(read_all(path)), crops)


def test_palette_and_miniswhite(tmp_path: Path):
    indices = np.arange(16, dtype=np.uint8).reshape(4, 4)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, :16] = np.arange(16) * 257 * 10  # red ramp
    tifffile.imwrite(tmp_path / "pal.tif", indices, photometric="palette", colormap=colormap)
    (pal,) = read_all(tmp_path / "pal.tif")
    assert pal[..., 0].ravel().tolist() == [10 * i for i in range(16)] and not pal[..., 1:].any()
    tifffile.imwrite(tmp_path / "white.tif", np.zeros((3, 3), np.uint8), photometric="miniswhite")
    (white,) = read_all(tmp_path / "white.tif")
    assert (white == 255).all()
    tifffile.imwrite(tmp_path / "white1.tif", np.zeros((8, 8), bool), photometric="miniswhite")  # 1-bit
    (white_1bit,) = read_all(tmp_path / "white1.tif")
    assert (white_1bit == 255).all()


@pytest.mark.parametrize("axes", ["TCYX", "ZCYX", "CYX"])
def test_imagej_colour_hyperstack_is_one_crop_per_channel_triple(tmp_path: Path, crops: np.ndarray, axes: str):
    """Fiji saves 16-bit colour as a composite hyperstack, one grayscale TIFF page per channel: 3 pages, one crop."""
    wide = crops.astype(np.uint16) * 257
    data = wide.transpose(0, 3, 1, 2) if axes != "CYX" else wide[0].transpose(2, 0, 1)
    tifffile.imwrite(tmp_path / "composite.tif", data, imagej=True, metadata={"axes": axes})
    pages = read_all(tmp_path / "composite.tif", batch_size=4)
    np.testing.assert_array_equal(np.stack(pages), crops if axes != "CYX" else crops[:1])


def test_imagej_hyperstack_with_other_channel_counts_is_refused(tmp_path: Path, crops: np.ndarray):
    tifffile.imwrite(tmp_path / "two.tif", crops[..., :2].transpose(0, 3, 1, 2), imagej=True,
                     metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match="2 channels per crop"):
        open_stack(tmp_path / "two.tif")
    single = tmp_path / "gray.tif"  # an ImageJ grayscale stack stays one crop per page
    tifffile.imwrite(single, crops[..., 0], imagej=True, metadata={"axes": "TYX"})
    assert len(read_all(single)) == len(crops)


def test_odd_and_mixed_page_sizes_and_one_page(tmp_path: Path):
    sizes = [(1, 1), (7, 13), (128, 128), (300, 97)]
    pages = [np.full(s + (3,), i * 40, np.uint8) for i, s in enumerate(sizes)]
    out = read_all(write_tiff(tmp_path / "mixed.tif", pages), batch_size=3)
    assert [p.shape[:2] for p in out] == sizes
    assert [int(p[0, 0, 0]) for p in out] == [0, 40, 80, 120]
    (single,) = read_all(write_tiff(tmp_path / "one.tif", pages[2:3]))
    np.testing.assert_array_equal(single, pages[2])


def test_reduced_resolution_pages_are_not_crops(tmp_path: Path, crops: np.ndarray):
    path = tmp_path / "with_thumbnails.tif"
    with tifffile.TiffWriter(path) as writer:
        for crop in crops[:3]:
            writer.write(crop, photometric="rgb", metadata=None)
            writer.write(crop[::2, ::2], photometric="rgb", subfiletype=1, metadata=None)
    np.testing.assert_array_equal(np.stack(read_all(path)), crops[:3])


def test_batches_are_in_order(tmp_path: Path):
    crops = he_pages(12, size=16, seed=1)
    with open_stack(write_tiff(tmp_path / "s.tif", crops)) as stack:
        batches = list(stack.iter_batches(5))
    assert [len(b) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.stack([p for b in batches for p in b]), crops)


@pytest.mark.parametrize("suffix", [".tif", ".mha"])
def test_batches_hold_at_most_the_pixel_budget_but_one_page_at_least(tmp_path: Path, suffix: str):
    if suffix == ".tif":  # pages of 30, 60, 30, 30, 90, 30 px
        sizes = [30, 60, 30, 30, 90, 30]
        path = tmp_path / "s.tif"
        with tifffile.TiffWriter(path) as writer:
            for i, size in enumerate(sizes):
                writer.write(he_pages(1, size=size, seed=i)[0], photometric="rgb", metadata=None)
        budget, expected = 60 * 60, [[30], [60], [30, 30], [90], [30]]  # 900 + 3,600 > 3,600: the 60 px page alone
    else:  # a 3-D MetaImage: every page 40 px
        path, sizes = write_mha(tmp_path / "s.mha", he_pages(7, size=40, seed=1)), [40] * 7
        budget, expected = 3 * 40 * 40, [[40] * 3, [40] * 3, [40]]
    with open_stack(path) as stack:
        assert [stack.page_pixels(i) for i in range(len(sizes))] == [s * s for s in sizes]
        batches = list(stack.iter_batches(64, max_batch_pixels=budget))
        assert [[page.shape[0] for page in batch] for batch in batches] == expected
        assert [len(b) for b in stack.iter_batches(2, max_batch_pixels=10**9)] == [2] * (len(sizes) // 2) + \
            [1] * (len(sizes) % 2)


def test_2000_pages_stream_in_bounded_memory(tmp_path: Path):
    page = he_pages(1, size=64, seed=2)[0]
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path) as writer:
        for i in range(2000):
            writer.write(np.roll(page, i, axis=1), photometric="rgb", metadata=None)  # 24 MB of pixels in all
    tracemalloc.start()
    count = 0
    with open_stack(path) as stack:
        for batch in stack.iter_batches(16):
            count += len(batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 2000
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB: pages are not streamed"


def test_mha_rgb_gray16_and_2d(tmp_path: Path, crops: np.ndarray):
    np.testing.assert_array_equal(np.stack(read_all(write_mha(tmp_path / "rgb.mha", crops))), crops)
    gray16 = crops[..., 0].astype(np.uint16) * 257
    pages = read_all(write_mha(tmp_path / "g16.mha", gray16, compress=True), batch_size=4)
    np.testing.assert_array_equal(np.stack(pages)[..., 2], crops[..., 0])
    (single,) = read_all(write_mha(tmp_path / "one.mha", crops[0], vector=True))
    np.testing.assert_array_equal(single, crops[0])


def test_real_grand_challenge_stack():
    path = shared_path("grand-challenge", "track2-input-example", "images", "stacked-histopathology-roi-cropouts",
                       "stack_5.tiff")
    pages = read_all(path, batch_size=5)
    assert len(pages) == 16 and all(p.shape == (128, 128, 3) for p in pages)
    np.testing.assert_array_equal(np.stack(pages), tifffile.imread(path))


# ---- bad files ----

def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_tiff(tmp_path: Path, crops: np.ndarray, keep: float):
    path = _truncate(write_tiff(tmp_path / "t.tif", crops), keep)
    with pytest.raises(InputError, match="truncated"):
        read_all(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_mha(tmp_path: Path, crops: np.ndarray, compress: bool, capfd: pytest.CaptureFixture[str]):
    path = write_mha(tmp_path / "t.mha", crops, compress=compress)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="is truncated: it holds less"):
        read_all(path)
    assert capfd.readouterr().err == ""  # refused before SimpleITK's MetaIO prints its own lines


@pytest.mark.parametrize("name, content", [("junk.tif", b"this is not an image" * 50), ("empty.tiff", b""),
                                           ("junk.mha", b"\x00\x01garbage" * 30)])
def test_non_image_files(tmp_path: Path, name: str, content: bytes):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=name):
        read_all(tmp_path / name)


def test_unsupported_suffix_and_missing_file(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(InputError, match="unsupported image type"):
        open_stack(tmp_path / "a.png")
    with pytest.raises(InputError, match="not found"):
        open_stack(tmp_path / "missing.tif")


@pytest.mark.parametrize("axes", ["TCYX", "CTYX"])
def test_ome_tiff_with_one_page_per_channel_is_one_crop_per_channel_triple(tmp_path: Path, axes: str):
    crops = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 12)).astype(np.uint16) * 257  # T, C, Y, X
    data = {"TCYX": crops, "CTYX": np.moveaxis(crops, 1, 0)}[axes]
    tifffile.imwrite(tmp_path / "s.ome.tif", data, photometric="minisblack", metadata={"axes": axes})
    pages = read_all(tmp_path / "s.ome.tif")
    expected = np.moveaxis(crops, 1, -1) // 257
    assert len(pages) == len(expected) and all(np.array_equal(p, e) for p, e in zip(pages, expected))


def test_ome_tiff_with_one_image_per_crop_reads_each_as_rgb(tmp_path: Path):
    crops = np.random.default_rng(1).integers(0, 256, (4, 3, 16, 12)).astype(np.uint8)  # crop, C, Y, X
    with tifffile.TiffWriter(tmp_path / "multi.ome.tif", ome=True) as writer:
        for crop in crops:
            writer.write(crop, photometric="minisblack", metadata={"axes": "CYX"})
    pages = read_all(tmp_path / "multi.ome.tif")
    assert len(pages) == 4 and all(np.array_equal(p, np.moveaxis(c, 0, -1)) for p, c in zip(pages, crops))


@pytest.mark.parametrize("count", [2, 3, 4, 16])
def test_a_plain_grayscale_ome_stack_is_one_crop_per_page(tmp_path: Path, count: int):
    """tifffile names a plain stack's page axis C (axes CYX): it is not a colour axis, even with 3 pages."""
    gray = np.random.default_rng(count).integers(0, 256, (count, 20, 20)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "g.ome.tif", gray, ome=True, photometric="minisblack")
    assert tifffile.TiffFile(tmp_path / "g.ome.tif").series[0].axes == "CYX"
    pages = read_all(tmp_path / "g.ome.tif")
    assert len(pages) == count and all(np.array_equal(p[..., 0], g) for p, g in zip(pages, gray))


def test_ome_tiff_with_four_channels_is_refused(tmp_path: Path):
    tifffile.imwrite(tmp_path / "s.ome.tif", np.zeros((2, 4, 8, 8), np.uint8), photometric="minisblack",
                     metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match="OME-TIFF with 4 channels per crop"):
        read_all(tmp_path / "s.ome.tif")
