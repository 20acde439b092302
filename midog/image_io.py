"""Image reading: pixels together with their metadata (spacing), RGB uint8 out, whatever came in."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from midog.errors import InputError, first_line


# ---- Track 2: multi-page stacks -----------------------------------------------------------------------------------
#
# A Track 2 input is one .tif/.tiff/.mha holding N crops (pages). Pages are read lazily, a batch at a time, so a
# 2,000-page stack runs in bounded memory; every page comes out as RGB uint8 (H, W, 3), whatever went in.

STACK_SUFFIXES = (".tif", ".tiff", ".mha")
_TIFF_PHOTOMETRICS = {"MINISWHITE", "MINISBLACK", "RGB", "PALETTE", "YCBCR"}
_TIFF_SKIPPED_SUBFILETYPES = 0b101
"""NewSubfileType bits of pages that are not crops: 1 = reduced-resolution copy, 4 = transparency mask."""


def find_single_image(folder: Path, suffixes: tuple[str, ...] = STACK_SUFFIXES) -> Path:
    """The one image in an interface folder (hidden files ignored); none or several → InputError."""
    if not folder.is_dir():
        raise InputError(f"no image folder {folder}")
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
    if not images:
        raise InputError(f"no {'/'.join(suffixes)} image in {folder}")
    if len(images) > 1:
        raise InputError(f"expected one image in {folder}, found {len(images)}: {', '.join(p.name for p in images)}")
    return images[0]


def to_rgb_uint8(pixels: np.ndarray, maximum: float | None = None) -> np.ndarray:
    """(H, W) or (H, W, C), C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA, any dtype → (H, W, 3) uint8; alpha dropped.

    Alpha is dropped rather than composited: cropouts are opaque, and writers that mislabel an extra sample as
    alpha would otherwise turn a page white. `maximum`: the data maximum that fixes the scale of wide data (see
    `_scale_to_uint8`); by default this array's own. A streamed image or a stack passes the one of the whole file,
    so its tiles and pages are scaled alike.
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or not 1 <= pixels.shape[-1] <= 4:
        raise InputError(f"unsupported page layout {pixels.shape}: expected (H, W) or (H, W, 1..4 channels)")
    pixels = _scale_to_uint8(_colour_samples(pixels), maximum)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _colour_samples(pixels: np.ndarray) -> np.ndarray:
    """The samples `to_rgb_uint8` keeps of (H, W, C): gray or RGB, alpha left out."""
    return pixels[..., :1] if pixels.shape[-1] <= 2 else pixels[..., :3]


def _data_maximum(pixels: np.ndarray) -> float:
    """The maximum over the kept samples of (H, W) or (H, W, C) data (NaN ignored; 0 for no data)."""
    kept = _colour_samples(pixels if pixels.ndim != 2 else pixels[..., None])
    return float(np.nanmax(kept, initial=0)) if kept.size else 0.0


def _page_values(page: tifffile.TiffPage, pixels: np.ndarray) -> np.ndarray:
    """A decoded TIFF page as (H, W[, C]) values a crop is made of: samples last (planar configuration stores them
    first), leading size-1 axes dropped (a depth-1 volume page), palette indices looked up, MinIsWhite grayscale
    (0 = white; 1-bit pages decode as bool) turned MinIsBlack. Floats are left as they are."""
    if page.axes.startswith("S") and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)
    while pixels.ndim > 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    photometric = getattr(page.photometric, "name", "")
    if photometric == "PALETTE" and page.colormap is not None:
        colormap = np.asarray(page.colormap)
        if colormap.dtype == np.uint16:
            colormap = np.rint(colormap / 257.0).astype(np.uint8)
        pixels = colormap[:, pixels].transpose(1, 2, 0)
    elif photometric == "MINISWHITE" and pixels.dtype == np.bool_:
        pixels = ~pixels
    elif photometric == "MINISWHITE" and np.issubdtype(pixels.dtype, np.integer):
        pixels = ((1 << int(page.bitspersample)) - 1) - pixels
    return pixels


def _scale_to_uint8(pixels: np.ndarray, maximum: float | None = None) -> np.ndarray:
    """8-bit as is. Wider integers: divided by the smallest bit depth ≥ 8 that holds the data's maximum
    (2**bits - 1 → 255), so 16-bit data (x257) and 12-bit camera data both come out full range, and 8-bit data
    stored in a 16-bit container comes out unchanged. Floats: [0, 1] → [0, 255], otherwise clipped; NaN → 0."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {pixels.dtype}")
    if maximum is None:
        maximum = _data_maximum(pixels)
    floating = np.issubdtype(pixels.dtype, np.floating)
    if floating:
        scale = 255.0 if maximum <= 1.0 else 1.0
    else:
        bits = max(8, int(maximum).bit_length())
        scale = 1.0 if bits == 8 else 255.0 / ((1 << bits) - 1)
    data = pixels.astype(np.float32)  # the one float copy; everything below works in place
    if floating:
        np.nan_to_num(data, copy=False, nan=0.0)
    data *= scale
    np.rint(data, out=data)
    np.clip(data, 0, 255, out=data)
    return data.astype(np.uint8)


class PageStack:
    """A multi-page image read lazily. Use `open_stack`; close it (or use it as a context manager)."""

    path: Path
    num_pages: int
    _wide_maximum: float | None = None

    def read_pages(self, start: int, stop: int) -> list[np.ndarray]:
        """Pages [start, stop) as RGB uint8 (H, W, 3) arrays; sizes may differ between pages."""
        return [self._to_rgb(pixels) for pixels in self._raw_pages(start, stop)]

    def _raw_pages(self, start: int, stop: int) -> list[np.ndarray]:
        """Pages [start, stop) as stored, (H, W) or (H, W, C), colour model resolved (palette, min-is-white)."""
        raise NotImplementedError

    def _to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        """8-bit pages as they are; wider ones by one rule for the whole file, `to_rgb_uint8`'s rule applied to the
        maximum over all its wide pages (found in one extra pass on first use): per page, a dark 16-bit page would
        be brightened 2× or more beside its neighbours."""
        if pixels.dtype in (np.uint8, np.bool_):
            return to_rgb_uint8(pixels)
        if self._wide_maximum is None:
            self._wide_maximum = max(
                (_data_maximum(page) for start in range(0, self.num_pages, 16)
                 for page in self._raw_pages(start, min(start + 16, self.num_pages))
                 if page.dtype not in (np.uint8, np.bool_)), default=0.0)
        return to_rgb_uint8(pixels, self._wide_maximum)

    def page_pixels(self, number: int) -> int:
        """Height × width of page `number`, from its header (nothing decoded)."""
        raise NotImplementedError

    def iter_batches(self, batch_size: int, max_batch_pixels: int = 0) -> Iterator[list[np.ndarray]]:
        """Pages in order, at most `batch_size` at a time and, when `max_batch_pixels` > 0, no more pixels than that
        in one batch (but at least one page), so large pages cannot make a batch of gigabytes; only one batch is in
        memory."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        start = 0
        while start < self.num_pages:
            stop, pixels = start + 1, self.page_pixels(start) if max_batch_pixels > 0 else 0
            while stop < min(start + batch_size, self.num_pages):
                if max_batch_pixels > 0:
                    pixels += self.page_pixels(stop)
                    if pixels > max_batch_pixels:
                        break
                stop += 1
            yield self.read_pages(start, stop)
            start = stop

    def close(self) -> None:
        pass

    def __enter__(self) -> "PageStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreadable(self, what: str, err: BaseException) -> InputError:
        return InputError(f"cannot read {what} of {self.path.name}: {first_line(err)}")


def open_stack(path: str | os.PathLike[str]) -> PageStack:
    """Open a .tif/.tiff/.mha stack; a missing, truncated or non-image file → InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return TiffStack(path)
    if suffix == ".mha":
        return MhaStack(path)
    raise InputError(f"unsupported image type '{path.suffix}' ({path.name}); expected {'/'.join(STACK_SUFFIXES)}")


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """tifffile reports a broken IFD chain (a truncated stack) through its logger, not by raising: collect it."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.ERROR)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class TiffStack(PageStack):
    """Every main page of a TIFF (reduced-resolution copies and masks skipped) is one crop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except (ValueError, OSError, struct.error) as err:  # TiffFileError is a ValueError
            raise InputError(f"{path.name} is not a readable TIFF: {first_line(err)}") from None
        try:
            self._indices = self._index_pages()
            self._channels = self._ome_channels() if self._tif.is_ome else self._imagej_channels()
        except BaseException:
            self._tif.close()
            raise
        self.num_pages = len(self._indices) // self._channels

    def _imagej_channels(self) -> int:
        """TIFF pages per crop: 3 for an ImageJ colour hyperstack (a 16-bit composite, as Fiji saves colour that is
        not 8-bit RGB: one grayscale page per channel, channels varying fastest), 1 otherwise."""
        channels = int((self._tif.imagej_metadata or {}).get("channels", 1)) if self._tif.is_imagej else 1
        if channels == 1 or int(self._tif.pages[self._indices[0]].samplesperpixel) != 1:
            return 1
        if channels != 3:
            raise InputError(f"{self.path.name} is an ImageJ hyperstack with {channels} channels per crop; "
                             "expected 1 (grayscale) or 3 (RGB)")
        if len(self._indices) % channels:
            raise InputError(f"{self.path.name} is an ImageJ hyperstack with {channels} channels but "
                             f"{len(self._indices)} pages, not a multiple of {channels}")
        return channels

    def _page(self, index: int) -> tifffile.TiffPage:
        """Page `index` with its own tags (reading an OME series leaves lightweight TiffFrames in the page cache)."""
        page = self._tif.pages[index]
        return page if isinstance(page, tifffile.TiffPage) else page.aspage()

    def _ome_channels(self) -> int:
        """TIFF pages per crop for an OME-TIFF: 3 when its crops' channels are stored one grayscale page each, 1
        otherwise. Two layouts say so without doubt: a channel axis of 3 beside another plane axis (TCYX, CTYX,
        ZCYX..., in any order: the page list is regrouped so each crop's three pages follow each other), and one OME
        image per crop, each CYX with 3 channels. A lone C axis is tifffile's default name for the page axis of a
        plain grayscale stack, so it stays one crop per page."""
        series = self._tif.series
        axes, shape = series[0].axes, series[0].shape
        if "C" not in axes or "S" in axes or shape[axes.index("C")] == 1:
            return 1
        channels = shape[axes.index("C")]
        plane_axes = [axis for axis in axes if axis not in "YX"]
        if len(series) > 1:  # one OME image per crop
            same = all(s.axes == axes and tuple(s.shape) == tuple(shape) for s in series)
            if same and plane_axes == ["C"] and channels == 3 and len(self._indices) == 3 * len(series):
                return 3
            return 1
        if plane_axes == ["C"]:
            return 1
        if channels != 3:
            raise InputError(f"{self.path.name} is an OME-TIFF with {channels} channels per crop; "
                             "expected 1 (grayscale) or 3 (RGB)")
        planes = [size for axis, size in zip(axes, shape) if axis not in "YX"]
        if int(np.prod(planes)) != len(self._indices):
            raise InputError(f"{self.path.name}: its OME metadata ({axes} {tuple(shape)}) does not match its "
                             f"{len(self._indices)} pages")
        order = np.moveaxis(np.asarray(self._indices).reshape(planes), plane_axes.index("C"), -1)
        self._indices = order.reshape(-1).tolist()
        return channels

    def _index_pages(self) -> list[int]:
        size = self.path.stat().st_size
        indices = []
        with _tifffile_errors() as errors:  # pages are parsed one at a time and not kept: only their indices
            try:
                for index, page in enumerate(self._tif.pages):
                    if int(getattr(page, "subfiletype", 0)) & _TIFF_SKIPPED_SUBFILETYPES:
                        continue
                    for offset, count in zip(page.dataoffsets, page.databytecounts):
                        if count and offset + count > size:
                            raise InputError(
                                f"{self.path.name} is truncated: page {index + 1} ends past the end of the file")
                    indices.append(index)
            except (ValueError, OSError, struct.error, IndexError) as err:
                errors.append(str(err))
        if errors:
            detail = re.sub(r"^<[^>]*>\s*", "", errors[0].splitlines()[0])  # drop tifffile's object repr
            raise InputError(f"{self.path.name} is truncated or corrupt: {detail}")
        if not indices:
            raise InputError(f"{self.path.name} holds no image page")
        return indices

    def _raw_pages(self, start: int, stop: int) -> list[np.ndarray]:
        return [self._read(number) for number in range(start, stop)]

    def page_pixels(self, number: int) -> int:
        shaped = self._page(self._indices[number * self._channels]).shaped  # (planes, depth, h, w, samples)
        return int(shaped[2]) * int(shaped[3])

    def _read(self, number: int) -> np.ndarray:
        if self._channels == 1:
            return self._read_page(self._indices[number], number)
        first = number * self._channels
        planes = [self._read_page(index, number) for index in self._indices[first:first + self._channels]]
        if any(plane.shape != planes[0].shape or plane.ndim != 2 for plane in planes):
            raise InputError(f"the channels of crop {number + 1} of {self.path.name} are not grayscale planes of "
                             "one size")
        return np.stack(planes, axis=-1)

    def _read_page(self, index: int, number: int) -> np.ndarray:
        """TIFF page `index`, which belongs to crop `number`."""
        page = self._page(index)
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if photometric not in _TIFF_PHOTOMETRICS:
            raise InputError(f"page {number + 1} of {self.path.name} has unsupported colour model {photometric}")
        try:
            pixels = page.asarray()
        except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error) as err:
            raise self._unreadable(f"page {number + 1}", err) from None
        return _page_values(page, pixels)

    def close(self) -> None:
        self._tif.close()


def _sitk():
    """SimpleITK, imported on first use: only MetaImage (.mha) input needs it, and it is a large import."""
    import SimpleITK

    return SimpleITK


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def check_mha_header(path: Path) -> None:
    """Refuse a non-MetaImage, or an uncompressed one holding fewer bytes than its header promises, before
    SimpleITK sees it: its MetaIO layer prints several lines of its own to stderr and then reports a
    misleading reason."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    marker = re.search(rb"^ElementDataFile\s*=\s*(\S+)\s*?\r?\n", head, flags=re.MULTILINE)
    fields = dict(re.findall(rb"^(\w+)\s*=\s*(.*?)\s*$", head[:marker.start()] if marker else b"",
                             flags=re.MULTILINE))
    if marker is None or not {b"NDims", b"DimSize", b"ElementType"} <= fields.keys():
        raise InputError(f"{path.name} is not a readable MetaImage (.mha) file")
    if marker.group(1) != b"LOCAL":
        raise InputError(f"{path.name} keeps its pixels in another file; a self-contained .mha is needed")
    value_size = _MET_SIZES.get(fields[b"ElementType"].decode(errors="replace"))
    if fields.get(b"CompressedData", b"False").lower() == b"true":
        declared = fields.get(b"CompressedDataSize", b"").strip()
        if declared.isdigit() and path.stat().st_size - marker.end() < int(declared):
            raise InputError(f"{path.name} is truncated: it holds less compressed pixel data than its "
                             "header declares")
        return
    if value_size is None:
        return
    try:
        values = int(np.prod([int(v) for v in fields[b"DimSize"].split()]))
        values *= int(fields.get(b"ElementNumberOfChannels", b"1"))
    except ValueError:
        raise InputError(f"{path.name} is not a readable MetaImage (.mha) file") from None
    if path.stat().st_size - marker.end() < values * value_size:
        raise InputError(f"{path.name} is truncated: it holds less pixel data than its header declares")


class MhaStack(PageStack):
    """A MetaImage: a 2-D image is one page, a 3-D image is a stack of pages along z. Pages are streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        check_mha_header(path)
        self._reader = _sitk().ImageFileReader()
        self._reader.SetFileName(str(path))
        self._reader.SetImageIO("MetaImageIO")
        try:
            self._reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{path.name} is not a readable MetaImage (.mha) file") from None
        self._size = list(self._reader.GetSize())
        channels = self._reader.GetNumberOfComponents()
        if len(self._size) not in (2, 3) or not 1 <= channels <= 4:
            raise InputError(f"{path.name}: unsupported image of size {self._size} with {channels} channels")
        self.num_pages = 1 if len(self._size) == 2 else self._size[2]
        if self.num_pages < 1:
            raise InputError(f"{path.name} holds no image page")

    def page_pixels(self, number: int) -> int:
        return int(self._size[0]) * int(self._size[1])

    def _raw_pages(self, start: int, stop: int) -> list[np.ndarray]:
        if len(self._size) == 2:
            index, size = [0, 0], list(self._size)
        else:
            index, size = [0, 0, start], [self._size[0], self._size[1], stop - start]
        self._reader.SetExtractIndex(index)
        self._reader.SetExtractSize(size)
        try:
            pixels = _sitk().GetArrayFromImage(self._reader.Execute())
        except RuntimeError as err:
            raise self._unreadable(f"pages {start + 1}-{stop}", err) from None
        if len(self._size) == 2:
            pixels = pixels[None]
        elif self._reader.GetNumberOfComponents() == 1 and pixels.ndim == 2:
            pixels = pixels[None]
        return list(pixels)


# ---- Track 1: regions of interest, read tile by tile ---------------------------------------------------------------
#
# A Track 1 input is one .tif/.tiff/.mha region of interest (about 7,000 x 5,000 px at 0.25 µm/px), or a whole slide
# of 100,000 x 80,000 px. `open_roi` returns an `RoiImage`: its size, its physical transform (pixel → mm, exactly as
# SimpleITK's TransformContinuousIndexToPhysicalPoint, which the MIDOG reference container uses), and
# `read_region`, which returns RGB uint8 pixels on demand. Images up to `image.in_memory_max_megapixels` are decoded
# once and kept (fastest); larger ones are decoded one TIFF tile/strip (or one MetaImage region) at a time, with a
# small cache, so memory stays bounded whatever the image size.

ROI_SUFFIXES = (".tif", ".tiff", ".mha")
ROI_PAD_VALUE = 255
"""Pixels outside the image (a tile hanging over the border, a crop at the edge) read as white glass."""
_SITK_UNSET_SPACING = 1.0
_MM_PER_TIFF_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}
"""TIFF ResolutionUnit → mm: INCH and CENTIMETER (as ITK's TIFFImageIO), MILLIMETER and MICROMETER (tifffile)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhysicalTransform:
    """Pixel index → physical millimetres: origin + direction · (spacing ⊙ index), as ITK defines it."""

    spacing_mm: tuple[float, float]
    origin_mm: tuple[float, float] = (0.0, 0.0)
    direction: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)
    """Row-major 2 x 2 direction cosines."""

    @property
    def spacing_um(self) -> tuple[float, float]:
        return (self.spacing_mm[0] * 1000.0, self.spacing_mm[1] * 1000.0)

    def to_mm(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) continuous pixel coordinates (x, y) → (N, 2) millimetres."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(2, 2)
        return np.asarray(self.origin_mm, dtype=np.float64) + (xy * np.asarray(self.spacing_mm)) @ direction.T


class RoiImage:
    """A region-of-interest image read on demand. Use `open_roi`; close it (or use it as a context manager)."""

    path: Path
    width: int
    height: int
    transform: PhysicalTransform
    spacing_is_fallback: bool = False

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [y, y + height) x [x, x + width) as RGB uint8 (height, width, 3); outside the image is white."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read_inside(x0, y0, x1, y1)
        out = np.full((height, width, 3), ROI_PAD_VALUE, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_inside(x0, y0, x1, y1)
        return out

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_pixels: int) -> np.ndarray | None:
        """A reduced copy of at most `max_pixels` pixels, when one is cheap (a pyramid level of a streamed image),
        for deciding which tiles hold tissue without decoding them; None otherwise (reading tiles is cheap)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> "RoiImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArrayRoi(RoiImage):
    """An image held in memory: small ROIs, and tests."""

    def __init__(self, pixels: np.ndarray, transform: PhysicalTransform, path: Path | None = None,
                 spacing_is_fallback: bool = False) -> None:
        self.pixels = to_rgb_uint8(pixels)
        self.height, self.width = self.pixels.shape[:2]
        self.transform = transform
        self.path = path or Path("<array>")
        self.spacing_is_fallback = spacing_is_fallback

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.pixels[y0:y1, x0:x1]


def open_roi(path: str | os.PathLike[str], fallback_spacing_um: float = 0.25,
             in_memory_max_megapixels: float = 200.0, segment_cache_mb: float = 256.0,
             max_spacing_um: float = 20.0) -> RoiImage:
    """Open a .tif/.tiff/.mha ROI or an Aperio .svs slide (level 0 of a pyramid); a missing, truncated or
    non-image file → InputError.

    A spacing coarser than `max_spacing_um` is a placeholder, not a scanner's (see `_plausible_spacing`), and is
    replaced by `fallback_spacing_um` with a warning, like a missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    suffix = path.suffix.lower()
    max_pixels = int(in_memory_max_megapixels * 1e6)
    if suffix in (".tif", ".tiff", ".svs"):  # Aperio .svs (the MIDOG++ / MITOS_WSI slides) is a tiled TIFF
        roi: RoiImage = TiffRoi(path, fallback_spacing_um, max_pixels, int(segment_cache_mb * 2**20))
    elif suffix == ".mha":
        roi = MhaRoi(path, fallback_spacing_um, max_pixels)
    else:
        raise InputError(f"unsupported image type '{path.suffix}' ({path.name}); expected {'/'.join(ROI_SUFFIXES)}/.svs")
    return _plausible_spacing(roi, fallback_spacing_um, max_spacing_um)


def _plausible_spacing(roi: RoiImage, fallback_spacing_um: float, max_spacing_um: float) -> RoiImage:
    """`roi` with its spacing replaced by the fallback when it is coarser than `max_spacing_um`.

    Writers without a source resolution fill in a default: libvips' 1 px/mm (10 px/cm, which SimpleITK also reads
    as its unset 1.0 mm), 72, 96, 300 or 600 dpi (353, 265, 85, 42 µm/px). Taken at face value they put every point
    hundreds of times too far from the origin, so no figure would ever match its ground truth, without a word. A
    mitotic figure (about 10 µm) is a few pixels wide at 20 µm/px: nothing coarser is an image to detect them in.
    """
    if roi.spacing_is_fallback or max(roi.transform.spacing_um) <= max_spacing_um:
        return roi
    x_um, y_um = roi.transform.spacing_um
    roi.transform = _fallback_transform(
        roi.path, fallback_spacing_um, f"pixel spacing {x_um:.4g} x {y_um:.4g} µm/px is coarser than "
        f"image.max_spacing_um ({max_spacing_um:g}): a writer's placeholder, not a scanner's")
    roi.spacing_is_fallback = True
    return roi


def _fallback_transform(path: Path, fallback_spacing_um: float, why: str) -> PhysicalTransform:
    _log.warning("%s: %s; assuming %.4g µm/px", path.name, why, fallback_spacing_um)
    spacing = fallback_spacing_um / 1000.0
    return PhysicalTransform(spacing_mm=(spacing, spacing))


STREAM_SAMPLE_SEGMENTS = 64
"""Segments (tiles, strips, row bands) read once, spread over a streamed image, to find its data maximum: the
scale to uint8 is fixed once per image, as in memory (a per-tile maximum would make tiles disagree, the declared bit
depth would make 12-bit or 8-bit data held in 16 bits read dark)."""


class TiffRoi(RoiImage):
    """Level 0 of a plain, BigTIFF, tiled or pyramidal TIFF, through tifffile."""

    def __init__(self, path: Path, fallback_spacing_um: float, max_pixels: int, cache_bytes: int) -> None:
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except (ValueError, OSError, struct.error) as err:  # TiffFileError is a ValueError
            raise InputError(f"{path.name} is not a readable TIFF: {first_line(err)}") from None
        try:
            self._open(fallback_spacing_um, max_pixels, cache_bytes)
        except BaseException:
            self._tif.close()
            raise

    def _open(self, fallback_spacing_um: float, max_pixels: int, cache_bytes: int) -> None:
        with _tifffile_errors() as errors:
            try:
                page = self._tif.series[0].levels[0].pages[0]
            except (ValueError, OSError, struct.error, IndexError) as err:
                errors.append(str(err))
        if errors or page is None:
            raise InputError(f"{self.path.name} is truncated or corrupt: {(errors or ['no image page'])[0]}")
        self._page = page.keyframe if hasattr(page, "keyframe") else page
        shaped = self._page.shaped  # (separate samples, depth, length, width, contiguous samples)
        self.height, self.width = int(shaped[2]), int(shaped[3])
        self.transform, self.spacing_is_fallback = self._read_transform(fallback_spacing_um)
        photometric = getattr(self._page.photometric, "name", str(self._page.photometric))
        if photometric not in _TIFF_PHOTOMETRICS:
            raise InputError(f"{self.path.name} has unsupported colour model {photometric}")
        size = self.path.stat().st_size
        for offset, count in zip(self._page.dataoffsets, self._page.databytecounts):
            if count and offset + count > size:
                raise InputError(f"{self.path.name} is truncated: its pixel data ends past the end of the file")
        streamable = shaped[0] == 1 and shaped[1] == 1 and photometric in ("RGB", "MINISBLACK", "YCBCR")
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()
        if self.width * self.height <= max_pixels or not streamable:
            self._pixels = self._decode_whole()
            return
        self._mapped = self._memory_map()
        chunks = self._page.chunks
        self._seg_h, self._seg_w = int(chunks[0]), int(chunks[1])
        self._seg_cols = int(self._page.chunked[1])
        seg_bytes = self._seg_h * self._seg_w * 3
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(4, cache_bytes // max(seg_bytes, 1))
        self._decode_args: dict[str, object] = {"_fullsize": self._page.is_tiled}
        if self._page.compression in (6, 7, 34892, 33007):  # JPEG flavours need their tables
            self._decode_args["jpegtables"] = self._page.jpegtables
            self._decode_args["jpegheader"] = self._page.jpegheader
        self._maximum = None if self._page.dtype == np.uint8 else self._sample_maximum()

    def _sample_maximum(self) -> float:
        """The data maximum over rows or segments spread evenly over the image (see `STREAM_SAMPLE_SEGMENTS`)."""
        if self._mapped is not None:
            rows = np.unique(np.linspace(0, self.height - 1, STREAM_SAMPLE_SEGMENTS * 4).astype(int))
            return _data_maximum(np.asarray(self._mapped[rows]))
        count = len(self._page.dataoffsets)
        wanted = np.unique(np.linspace(0, count - 1, min(count, STREAM_SAMPLE_SEGMENTS)).astype(int)).tolist()
        maximum = 0.0
        for _, segment in self._decoded(wanted):
            maximum = max(maximum, _data_maximum(segment))
        return maximum

    def _decoded(self, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(index, raw decoded segment as (rows, columns, samples)) for the segments at `indices`, in file order."""
        offsets = [self._page.dataoffsets[i] for i in indices]
        counts = [self._page.databytecounts[i] for i in indices]
        try:
            for data, index in self._tif.filehandle.read_segments(offsets, counts, indices=indices, sort=True):
                segment, _, shape = self._page.decode(data, index, **self._decode_args)
                if segment is None:  # an empty segment: tifffile leaves it to the fill value
                    segment = np.zeros(shape, dtype=self._page.dtype)
                yield index, np.asarray(segment).reshape(shape[1:])
        except (ValueError, OSError, RuntimeError, EOFError, struct.error) as err:
            raise InputError(f"cannot read {self.path.name}: {first_line(err)}") from None

    def _memory_map(self) -> np.ndarray | None:
        """Uncompressed strips stored back to back (tifffile's default layout for uncompressed data is one strip
        for the whole image) as a read-only memory map, so a region reads only its own rows; None otherwise."""
        page = self._page
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if (page.is_tiled or photometric not in ("RGB", "MINISBLACK") or page.dtype is None
                or not (page.is_contiguous and page.is_memmappable)):
            return None
        samples = int(page.shaped[4])
        dtype = np.dtype(page.dtype).newbyteorder(self._tif.byteorder)
        try:
            return np.memmap(self.path, dtype=dtype, mode="r", offset=int(page.dataoffsets[0]),
                             shape=(self.height, self.width, samples))
        except (ValueError, OSError):
            return None

    def thumbnail(self, max_pixels: int) -> np.ndarray | None:
        if self._pixels is not None or max_pixels <= 0:
            return None
        def pixels(level: tifffile.TiffPageSeries) -> int:
            dims = dict(zip(level.axes, level.shape))
            return int(dims.get("Y", 0)) * int(dims.get("X", 0))

        levels = [level for level in self._tif.series[0].levels[1:] if 0 < pixels(level) <= max_pixels]
        if not levels:
            return None
        try:
            return to_rgb_uint8(levels[0].asarray())  # the largest level within the budget
        except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error) as err:
            _log.warning("%s: no usable pyramid level for tissue detection (%s)", self.path.name, err)
            return None

    def _read_transform(self, fallback_spacing_um: float) -> tuple[PhysicalTransform, bool]:
        tags = self._page.tags
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF default: inch
        try:
            xres = _rational(tags["XResolution"].value) if "XResolution" in tags else 0.0
            yres = _rational(tags["YResolution"].value) if "YResolution" in tags else 0.0
        except (TypeError, ValueError, ZeroDivisionError):
            xres = yres = 0.0
        if unit in _MM_PER_TIFF_UNIT and xres > 0 and yres > 0:
            return PhysicalTransform((_MM_PER_TIFF_UNIT[unit] / xres, _MM_PER_TIFF_UNIT[unit] / yres)), False
        mpp = re.search(r"\bMPP\s*=\s*([0-9.]+)", self._page.description or "")  # Aperio SVS-style description
        if mpp and float(mpp.group(1)) > 0:
            spacing = float(mpp.group(1)) / 1000.0
            return PhysicalTransform((spacing, spacing)), False
        return _fallback_transform(self.path, fallback_spacing_um, "no resolution tag"), True

    def _decode_whole(self) -> np.ndarray:
        try:
            pixels = self._page.asarray()
        except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error, MemoryError) as err:
            raise InputError(f"cannot read {self.path.name}: {first_line(err)}") from None
        return to_rgb_uint8(_page_values(self._page, pixels))

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[y0:y1, x0:x1]
        if self._mapped is not None:
            return to_rgb_uint8(np.asarray(self._mapped[y0:y1, x0:x1]), self._maximum)
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        rows = range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1)
        cols = range(x0 // self._seg_w, (x1 - 1) // self._seg_w + 1) if self._page.is_tiled else range(1)
        seg_w = self._seg_w if self._page.is_tiled else self.width
        wanted = [r * self._seg_cols + c for r in rows for c in cols]
        segments = self._segments(wanted)
        for index, segment in zip(wanted, segments):
            sy, sx = (index // self._seg_cols) * self._seg_h, (index % self._seg_cols) * seg_w
            ya, yb = max(y0, sy), min(y1, sy + segment.shape[0])
            xa, xb = max(x0, sx), min(x1, sx + segment.shape[1])
            out[ya - y0:yb - y0, xa - x0:xb - x0] = segment[ya - sy:yb - sy, xa - sx:xb - sx]
        return out

    def _segments(self, indices: list[int]) -> list[np.ndarray]:
        """Decoded segments (tiles or strips) as RGB uint8, through an LRU cache; thread-safe."""
        with self._lock:
            missing = [i for i in indices if i not in self._cache]
            for index, segment in self._decoded(missing) if missing else ():
                self._cache[index] = to_rgb_uint8(segment, self._maximum)
            result = []
            for i in indices:
                self._cache.move_to_end(i)
                result.append(self._cache[i])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return result

    def close(self) -> None:
        self._mapped = None
        self._tif.close()


def _rational(value: object) -> float:
    if isinstance(value, tuple):
        return float(value[0]) / float(value[1])
    return float(value)  # type: ignore[arg-type]


class MhaRoi(RoiImage):
    """A 2-D MetaImage through SimpleITK: decoded once when small or compressed, otherwise region by region."""

    def __init__(self, path: Path, fallback_spacing_um: float, max_pixels: int) -> None:
        self.path = path
        check_mha_header(path)
        self._reader = _sitk().ImageFileReader()
        self._reader.SetFileName(str(path))
        self._reader.SetImageIO("MetaImageIO")
        try:
            self._reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{path.name} is not a readable MetaImage (.mha) file") from None
        size = list(self._reader.GetSize())
        if len(size) == 3 and size[2] == 1:
            size = size[:2]
        channels = self._reader.GetNumberOfComponents()
        if len(size) != 2 or not 1 <= channels <= 4:
            raise InputError(f"{path.name}: expected a 2-D image, got size {size} with {channels} channels")
        self.width, self.height = int(size[0]), int(size[1])
        self.transform, self.spacing_is_fallback = self._read_transform(fallback_spacing_um)
        self._lock = threading.Lock()
        self._pixels: np.ndarray | None = None
        compressed = self._reader.GetMetaData("CompressedData").lower() == "true" \
            if self._reader.HasMetaDataKey("CompressedData") else False
        if self.width * self.height <= max_pixels or compressed:
            self._pixels = to_rgb_uint8(self._extract(0, 0, self.width, self.height, whole=True))
        else:
            rows = np.unique(np.linspace(0, self.height - 1, STREAM_SAMPLE_SEGMENTS).astype(int))
            self._maximum = max(_data_maximum(self._extract(0, int(y), self.width, 1)) for y in rows)

    def _read_transform(self, fallback_spacing_um: float) -> tuple[PhysicalTransform, bool]:
        spacing = tuple(float(s) for s in self._reader.GetSpacing()[:2])
        if all(s == _SITK_UNSET_SPACING for s in spacing) or min(spacing) <= 0:
            return _fallback_transform(self.path, fallback_spacing_um, "no pixel spacing (SimpleITK's unset 1.0)"), True
        origin = tuple(float(o) for o in self._reader.GetOrigin()[:2])
        direction = self._reader.GetDirection()
        dim = len(self._reader.GetSize())
        direction2 = (direction[0], direction[1], direction[dim], direction[dim + 1])
        return PhysicalTransform(spacing, origin, tuple(float(d) for d in direction2)), False  # type: ignore[arg-type]

    def _extract(self, x: int, y: int, width: int, height: int, whole: bool = False) -> np.ndarray:
        """A region's pixels as stored (H, W[, C])."""
        dims = len(self._reader.GetSize())
        self._reader.SetExtractIndex([x, y] + [0] * (dims - 2))
        self._reader.SetExtractSize([width, height] + [1] * (dims - 2) if not whole else list(self._reader.GetSize()))
        try:
            pixels = _sitk().GetArrayFromImage(self._reader.Execute())
        except RuntimeError as err:
            raise InputError(f"cannot read {self.path.name}: {str(err).strip().splitlines()[-1]}") from None
        return pixels[0] if dims == 3 else pixels

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[y0:y1, x0:x1]
        with self._lock:
            return to_rgb_uint8(self._extract(x0, y0, x1 - x0, y1 - y0), self._maximum)
