"""TIFF and MetaImage (.mha) files, opened the one way both image readers need: the Track 2 page stacks
(midog.stack_io) and the Track 1 regions of interest (midog.roi_io).

A missing, foreign, truncated or corrupt file is an InputError naming it, raised here before tifffile or SimpleITK
can log or print their own lines; a TIFF page's colour model (planar samples, palette, min-is-white) is resolved
into plain values here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import tifffile

from midog.errors import InputError, first_line

if TYPE_CHECKING:
    import SimpleITK

IMAGE_SUFFIXES = (".tif", ".tiff", ".mha")
"""What the image in an interface folder may be, in both tracks."""
TIFF_PHOTOMETRICS = {"MINISWHITE", "MINISBLACK", "RGB", "PALETTE", "YCBCR"}
"""The TIFF colour models the readers turn into RGB."""


def find_single_image(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
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


# ---- TIFF ----------------------------------------------------------------------------------------------------------

def open_tiff(path: Path) -> tifffile.TiffFile:
    """The TIFF at `path`, its header parsed; not a TIFF → InputError. Close it when done."""
    try:
        return tifffile.TiffFile(path)
    except (ValueError, OSError, struct.error) as err:  # TiffFileError is a ValueError
        raise InputError(f"{path.name} is not a readable TIFF: {first_line(err)}") from None


@contextlib.contextmanager
def tifffile_errors() -> Iterator[list[str]]:
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


def photometric_name(page: tifffile.TiffPage) -> str:
    """The page's colour model by name ("RGB", "PALETTE", ...; the number for one tifffile does not name)."""
    return getattr(page.photometric, "name", str(page.photometric))


def ends_past(page: tifffile.TiffPage, file_size: int) -> bool:
    """True when a segment of the page's pixel data ends past `file_size` bytes: the file is truncated."""
    return any(count and offset + count > file_size for offset, count in zip(page.dataoffsets, page.databytecounts))


def page_values(page: tifffile.TiffPage, pixels: np.ndarray) -> np.ndarray:
    """A decoded TIFF page as (H, W[, C]) values a crop is made of: samples last (planar configuration stores them
    first), leading size-1 axes dropped (a depth-1 volume page), palette indices looked up, MinIsWhite grayscale
    (0 = white; 1-bit pages decode as bool) turned MinIsBlack. Floats are left as they are."""
    if page.axes.startswith("S") and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)
    while pixels.ndim > 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    photometric = photometric_name(page)
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


# ---- MetaImage -----------------------------------------------------------------------------------------------------

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


def open_mha(path: Path) -> SimpleITK.ImageFileReader:
    """A SimpleITK reader of the MetaImage at `path`, its header read (size, spacing, ...) and checked
    (`check_mha_header`), no pixels yet; not a readable MetaImage → InputError."""
    check_mha_header(path)
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("MetaImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path.name} is not a readable MetaImage (.mha) file") from None
    return reader


def read_mha_region(reader: SimpleITK.ImageFileReader, index: list[int], size: list[int]) -> np.ndarray:
    """The pixels of the region at `index` of `size` (x, y[, z]) as stored, axes reversed ([z, ]y, x[, c]).

    SimpleITK's RuntimeError passes through: each reader names what it was reading.
    """
    reader.SetExtractIndex(index)
    reader.SetExtractSize(size)
    return _sitk().GetArrayFromImage(reader.Execute())
