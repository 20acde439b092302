"""Image reading: pixels together with their metadata (spacing), RGB uint8 out, whatever came in."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import tifffile

from midog.errors import InputError


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


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C), C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA, any dtype → (H, W, 3) uint8; alpha dropped.

    Alpha is dropped rather than composited: cropouts are opaque, and writers that mislabel an extra sample as
    alpha would otherwise turn a page white.
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or not 1 <= pixels.shape[-1] <= 4:
        raise InputError(f"unsupported page layout {pixels.shape}: expected (H, W) or (H, W, 1..4 channels)")
    pixels = _scale_to_uint8(pixels[..., :1] if pixels.shape[-1] <= 2 else pixels[..., :3])
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit as is. Wider integers: divided by the smallest bit depth ≥ 8 that holds the page's maximum
    (2**bits - 1 → 255), so 16-bit data (x257) and 12-bit camera data both come out full range, and 8-bit data
    stored in a 16-bit container comes out unchanged. Floats: [0, 1] → [0, 255], otherwise clipped."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating):
        data = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if data.size and float(data.max()) <= 1.0:
            data = data * 255.0
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise InputError(f"unsupported pixel type {pixels.dtype}")
    data = np.clip(pixels, 0, None)
    bits = max(8, int(data.max()).bit_length() if data.size else 8)
    if bits == 8:
        return data.astype(np.uint8)
    return np.rint(data.astype(np.float32) * (255.0 / ((1 << bits) - 1))).astype(np.uint8)


class PageStack:
    """A multi-page image read lazily. Use `open_stack`; close it (or use it as a context manager)."""

    path: Path
    num_pages: int

    def read_pages(self, start: int, stop: int) -> list[np.ndarray]:
        """Pages [start, stop) as RGB uint8 (H, W, 3) arrays; sizes may differ between pages."""
        raise NotImplementedError

    def iter_batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Pages in order, `batch_size` at a time; only one batch is in memory."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.num_pages, batch_size):
            yield self.read_pages(start, min(start + batch_size, self.num_pages))

    def close(self) -> None:
        pass

    def __enter__(self) -> "PageStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreadable(self, what: str, err: BaseException) -> InputError:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return InputError(f"cannot read {what} of {self.path.name}: {first}")


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
            raise InputError(f"{path.name} is not a readable TIFF: {str(err).splitlines()[0]}") from None
        try:
            self._indices = self._index_pages()
        except BaseException:
            self._tif.close()
            raise
        self.num_pages = len(self._indices)

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

    def read_pages(self, start: int, stop: int) -> list[np.ndarray]:
        return [self._read(number) for number in range(start, stop)]

    def _read(self, number: int) -> np.ndarray:
        page = self._tif.pages[self._indices[number]]
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if photometric not in _TIFF_PHOTOMETRICS:
            raise InputError(f"page {number + 1} of {self.path.name} has unsupported colour model {photometric}")
        try:
            pixels = page.asarray()
        except (ValueError, OSError, RuntimeError, NotImplementedError, EOFError, struct.error) as err:
            raise self._unreadable(f"page {number + 1}", err) from None
        if page.axes.startswith("S") and pixels.ndim == 3:  # planar configuration: samples first
            pixels = np.moveaxis(pixels, 0, -1)
        while pixels.ndim > 3 and pixels.shape[0] == 1:  # e.g. a depth-1 volume page
            pixels = pixels[0]
        if photometric == "PALETTE" and page.colormap is not None:
            colormap = np.asarray(page.colormap)
            if colormap.dtype == np.uint16:
                colormap = np.rint(colormap / 257.0).astype(np.uint8)
            pixels = colormap[:, pixels].transpose(1, 2, 0)
        elif photometric == "MINISWHITE" and np.issubdtype(pixels.dtype, np.integer):
            pixels = ((1 << int(page.bitspersample)) - 1) - pixels
        return to_rgb_uint8(pixels)

    def close(self) -> None:
        self._tif.close()


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


class MhaStack(PageStack):
    """A MetaImage: a 2-D image is one page, a 3-D image is a stack of pages along z. Pages are streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = sitk.ImageFileReader()
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
        self._check_complete()

    def _check_complete(self) -> None:
        """An uncompressed MetaImage must hold every byte its header promises (a truncated one is refused now,
        before any page is read; SimpleITK would report it with a misleading message)."""
        with open(self.path, "rb") as handle:
            head = handle.read(1 << 16)
        marker = re.search(rb"ElementDataFile\s*=\s*LOCAL\r?\n", head)
        if marker is None:
            return
        fields = dict(re.findall(rb"^(\w+)\s*=\s*(.*?)\s*$", head[:marker.start()], flags=re.MULTILINE))
        value_size = _MET_SIZES.get(fields.get(b"ElementType", b"").decode())
        if fields.get(b"CompressedData", b"False").lower() == b"true" or value_size is None:
            return
        channels = int(fields.get(b"ElementNumberOfChannels", b"1"))
        expected = int(np.prod(self._size)) * channels * value_size
        if self.path.stat().st_size - marker.end() < expected:
            raise InputError(f"{self.path.name} is truncated: it holds less pixel data than its header declares")

    def read_pages(self, start: int, stop: int) -> list[np.ndarray]:
        if len(self._size) == 2:
            index, size = [0, 0], list(self._size)
        else:
            index, size = [0, 0, start], [self._size[0], self._size[1], stop - start]
        self._reader.SetExtractIndex(index)
        self._reader.SetExtractSize(size)
        try:
            pixels = sitk.GetArrayFromImage(self._reader.Execute())
        except RuntimeError as err:
            raise self._unreadable(f"pages {start + 1}-{stop}", err) from None
        if len(self._size) == 2:
            pixels = pixels[None]
        elif self._reader.GetNumberOfComponents() == 1 and pixels.ndim == 2:
            pixels = pixels[None]
        return [to_rgb_uint8(page) for page in pixels]


# ---- Track 1: regions of interest, read tile by tile ---------------------------------------------------------------
