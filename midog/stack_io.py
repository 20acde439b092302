"""Track 2 input: a multi-page stack of crops, read lazily.

A Track 2 input is one .tif/.tiff/.mha holding N crops (pages). Pages are read lazily, a batch at a time, so a
2,000-page stack runs in bounded memory; every page comes out as RGB uint8 (H, W, 3), whatever went in.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from midog.errors import InputError, first_line
from midog.image_files import (IMAGE_SUFFIXES, TIFF_PHOTOMETRICS, ends_past, open_mha, open_tiff, page_values,
                               photometric_name, read_mha_region, tifffile_errors)
from midog.pixels import data_maximum, to_rgb_uint8

STACK_SUFFIXES = IMAGE_SUFFIXES
_TIFF_SKIPPED_SUBFILETYPES = 0b101
"""NewSubfileType bits of pages that are not crops: 1 = reduced-resolution copy, 4 = transparency mask."""


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
                (data_maximum(page) for start in range(0, self.num_pages, 16)
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


class TiffStack(PageStack):
    """Every main page of a TIFF (reduced-resolution copies and masks skipped) is one crop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tif = open_tiff(path)
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
        with tifffile_errors() as errors:  # pages are parsed one at a time and not kept: only their indices
            try:
                for index, page in enumerate(self._tif.pages):
                    if int(getattr(page, "subfiletype", 0)) & _TIFF_SKIPPED_SUBFILETYPES:
                        continue
                    if ends_past(page, size):
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
        photometric = photometric_name(page)
        if photometric not in TIFF_PHOTOMETRICS:
            raise InputError(f"page {number + 1} of {self.path.name} has unsupported colour model {photometric}")
        try:
            pixels = page.asarray()
        except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error) as err:
            raise self._unreadable(f"page {number + 1}", err) from None
        return page_values(page, pixels)

    def close(self) -> None:
        self._tif.close()


class MhaStack(PageStack):
    """A MetaImage: a 2-D image is one page, a 3-D image is a stack of pages along z. Pages are streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = open_mha(path)
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
        try:
            pixels = read_mha_region(self._reader, index, size)
        except RuntimeError as err:
            raise self._unreadable(f"pages {start + 1}-{stop}", err) from None
        if len(self._size) == 2:
            pixels = pixels[None]
        elif self._reader.GetNumberOfComponents() == 1 and pixels.ndim == 2:
            pixels = pixels[None]
        return list(pixels)
