"""Track 1 input: a region of interest (or a whole slide), read tile by tile.

A Track 1 input is one .tif/.tiff/.mha region of interest (about 7,000 x 5,000 px at 0.25 µm/px), or a whole slide
of 100,000 x 80,000 px. `open_roi` returns an `RoiImage`: its size, its physical transform (pixel → mm, exactly as
SimpleITK's TransformContinuousIndexToPhysicalPoint, which the MIDOG reference container uses), and
`read_region`, which returns RGB uint8 pixels on demand. Images up to `image.in_memory_max_megapixels` are decoded
once and kept (fastest); larger ones are decoded one TIFF tile/strip (or one MetaImage region) at a time, with a
small cache, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

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

from midog.config import SHIPPED
from midog.errors import InputError, first_line
from midog.image_files import (IMAGE_SUFFIXES, TIFF_PHOTOMETRICS, ends_past, open_mha, open_tiff, page_values,
                               photometric_name, read_mha_region, tifffile_errors)
from midog.pixels import data_maximum, to_rgb_uint8

ROI_SUFFIXES = IMAGE_SUFFIXES
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


_IMAGE_DEFAULTS = SHIPPED["image"]
"""`open_roi`'s defaults: the shipped `image` configuration (one home, default.yaml)."""


def open_roi(path: str | os.PathLike[str], fallback_spacing_um: float = _IMAGE_DEFAULTS["fallback_spacing_um"],
             in_memory_max_megapixels: float = _IMAGE_DEFAULTS["in_memory_max_megapixels"],
             segment_cache_mb: float = _IMAGE_DEFAULTS["segment_cache_mb"],
             max_spacing_um: float = _IMAGE_DEFAULTS["max_spacing_um"]) -> RoiImage:
    """Open a .tif/.tiff/.mha ROI or an Aperio .svs slide (level 0 of a pyramid); a missing, truncated or
    non-image file → InputError.

    A spacing coarser than `max_spacing_um` is a placeholder, not a scanner's (see `_plausible_spacing`), and is
    replaced by `fallback_spacing_um` with a warning, like a missing one. Defaults: the `image` section of
    midog/configs/default.yaml.
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
        raise InputError(f"unsupported image type '{path.suffix}' ({path.name}); "
                         f"expected {'/'.join(ROI_SUFFIXES)}/.svs")
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
        self._tif = open_tiff(path)
        try:
            self._open(fallback_spacing_um, max_pixels, cache_bytes)
        except BaseException:
            self._tif.close()
            raise

    def _open(self, fallback_spacing_um: float, max_pixels: int, cache_bytes: int) -> None:
        with tifffile_errors() as errors:
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
        photometric = photometric_name(self._page)
        if photometric not in TIFF_PHOTOMETRICS:
            raise InputError(f"{self.path.name} has unsupported colour model {photometric}")
        if ends_past(self._page, self.path.stat().st_size):
            raise InputError(f"{self.path.name} is truncated: its pixel data ends past the end of the file")
        streamable = shaped[0] == 1 and shaped[1] == 1 and photometric in ("RGB", "MINISBLACK", "YCBCR")
        self._pixels: np.ndarray | None = None
        self._levels: dict[int, np.ndarray | None] = {}
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
            return data_maximum(np.asarray(self._mapped[rows]))
        count = len(self._page.dataoffsets)
        wanted = np.unique(np.linspace(0, count - 1, min(count, STREAM_SAMPLE_SEGMENTS)).astype(int)).tolist()
        maximum = 0.0
        for _, segment in self._decoded(wanted):
            maximum = max(maximum, data_maximum(segment))
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
        photometric = photometric_name(page)
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

        levels = [k for k, level in enumerate(self._tif.series[0].levels) if k and 0 < pixels(level) <= max_pixels]
        if not levels:
            return None
        return self._decoded_level(levels[0])  # the largest level within the budget

    def _decoded_level(self, k: int) -> np.ndarray | None:
        """Pyramid level `k` decoded once per open image (tissue detection and the stain estimate both ask for
        one), read-only; None, with one warning, when it cannot be decoded."""
        if k not in self._levels:
            try:
                self._levels[k] = to_rgb_uint8(self._tif.series[0].levels[k].asarray())
                self._levels[k].flags.writeable = False
            except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error) as err:
                _log.warning("%s: no usable pyramid level (%s); tissue detection and the stain sample read "
                             "full-resolution pixels instead", self.path.name, err)
                self._levels[k] = None
        return self._levels[k]

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
        return to_rgb_uint8(page_values(self._page, pixels))

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
        self._reader = open_mha(path)
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
            self._maximum = max(data_maximum(self._extract(0, int(y), self.width, 1)) for y in rows)

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
        size = [width, height] + [1] * (dims - 2) if not whole else list(self._reader.GetSize())
        try:
            pixels = read_mha_region(self._reader, [x, y] + [0] * (dims - 2), size)
        except RuntimeError as err:
            raise InputError(f"cannot read {self.path.name}: {str(err).strip().splitlines()[-1]}") from None
        return pixels[0] if dims == 3 else pixels

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[y0:y1, x0:x1]
        with self._lock:
            return to_rgb_uint8(self._extract(x0, y0, x1 - x0, y1 - y0), self._maximum)
