"""Stain normalisation of verifier crops (Macenko et al., ISBI 2009), estimated once per image.

An image's haematoxylin and eosin stain vectors and the 99th percentiles of their concentrations are estimated from
its own pixels (`image_stains`, a sample of at most `SAMPLE_PIXELS`, so a whole slide is never read); each crop is
then re-expressed with a fixed reference stain matrix and concentration scale (`normalise`). The crops of every
image thus look as if one lab had stained them, which a model trained on a few slides' stains cannot learn alone.

The estimate is Macenko's as implemented by torchstain (its numpy `MacenkoNormalizer`, the reference the tests
compare with, `Io` 240, `alpha` 1, `beta` 0.15, its reference matrix), with two differences: the stains are
estimated from a sample of the image and applied to crops of it (torchstain estimates and normalises one array),
and the plane's axes are oriented (positive sums) so that optical densities, all positive, project to angles inside
(0°, 180°): an eigenvector's sign is arbitrary, and a flipped principal axis would wrap the angles at ±180° and mix
the stains.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np

from midog.config import SHIPPED
from midog.roi_io import RoiImage

LOG = logging.getLogger(__name__)

LIGHT_INTENSITY = 240.0
"""Transmitted light intensity (Io): the brightness of background glass."""
TISSUE_OPTICAL_DENSITY = 0.15
"""Pixels with an optical density below this in any channel are background (beta)."""
ANGLE_PERCENTILE = 1.0
"""The extreme angles in the stain plane are taken at this percentile and its complement (alpha), robust to
outliers."""
REFERENCE_STAIN_MATRIX = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
"""Columns: haematoxylin, eosin optical density per RGB channel (torchstain's and staintools' reference)."""
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308])
NORMALISE_BLOCK_PIXELS = 1 << 16
"""Pixels normalised per step: small enough that the float64 temporaries stay in the CPU's cache."""
SAMPLE_PIXELS = 1 << 22
"""Pixels an image's stains are estimated from at most (4 Mpx): a MIDOG region of interest read in full at ~0.25
µm/px would be 30-40 Mpx, and a slide far more."""
SAMPLE_WINDOW_PX = 128
GUIDE_LEVEL_PIXELS = int(SHIPPED["tiling"]["thumbnail_megapixels"] * 1e6)
"""A slide's sampling windows go where its largest pyramid level within this many pixels shows tissue: the tiler's
budget (`tiling.thumbnail_megapixels` as shipped), so it is the level the tiler's tissue detection has already
decoded (`TiffRoi` keeps it)."""
MIN_TISSUE_PIXELS = 2000
"""Fewer tissue pixels than this in the sample: no estimate (the crops are left as they are)."""


@dataclass(frozen=True)
class ImageStains:
    """One image's stains: `matrix` (3, 2), unit columns haematoxylin and eosin in optical density; `max_concentrations`
    (2,), the 99th percentile of each stain's concentration over the image."""
    matrix: np.ndarray
    max_concentrations: np.ndarray


_OPTICAL_DENSITY = -np.log((np.arange(256, dtype=np.float64) + 1.0) / LIGHT_INTENSITY)
"""The optical density of each uint8 level: a table lookup instead of a logarithm per pixel."""


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB → (n, 3) float64 optical density."""
    return _OPTICAL_DENSITY[pixels.reshape(-1, 3)]


def estimate_stains(pixels: np.ndarray) -> ImageStains | None:
    """The stains of (..., 3) uint8 RGB pixels, or None when they hold too little tissue to estimate them."""
    density = optical_density(pixels)
    tissue = density[np.all(density >= TISSUE_OPTICAL_DENSITY, axis=1)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        return None
    _, vectors = np.linalg.eigh(np.cov(tissue.T))
    plane = vectors[:, [1, 2]] * np.where(vectors[:, [1, 2]].sum(axis=0) < 0, -1.0, 1.0)
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    # haematoxylin absorbs red most: the vector with the larger red component is haematoxylin
    matrix = np.stack([first, second] if first[0] > second[0] else [second, first], axis=1)
    if np.linalg.matrix_rank(matrix) < 2:
        return None
    concentrations = np.linalg.lstsq(matrix, density.T, rcond=None)[0]
    max_concentrations = np.percentile(concentrations, 99, axis=1)
    if not np.all(max_concentrations > 0):
        return None
    return ImageStains(matrix, max_concentrations)


def sample_pixels(image: RoiImage, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
    """(n, 3) uint8 pixels of `image`, at most `max_pixels`: all of them when there are that few; else windows of
    `SAMPLE_WINDOW_PX` at full resolution. Where the file has a pyramid level within `GUIDE_LEVEL_PIXELS` (a
    slide), the windows are centred on tissue the level shows (`tissue_window_origins`), so a slide that is mostly
    glass is sampled where its tissue is; otherwise they lie on an even grid over the whole image (small and many,
    so that sparse tissue is hit: 64 windows of 256 px missed a 700 px patch of tissue on a 48 Mpx image that 256
    windows of 128 px hit). Only full-resolution pixels are sampled: a reduced level's averaged pixels are paler."""
    if image.width * image.height <= max_pixels:
        return image.read_region(0, 0, image.width, image.height).reshape(-1, 3)
    side = SAMPLE_WINDOW_PX
    windows = max(1, max_pixels // (side * side))
    origins = tissue_window_origins(image, windows, GUIDE_LEVEL_PIXELS)
    if origins is None:
        origins = grid_window_origins(image.width, image.height, windows)
    return np.concatenate([image.read_region(int(x), int(y), side, side).reshape(-1, 3) for x, y in origins])


def grid_window_origins(width: int, height: int, windows: int) -> np.ndarray:
    """(n, 2) top-left corners of at most `windows` sampling windows on an even grid over a `width` × `height`
    image."""
    side = SAMPLE_WINDOW_PX
    across = max(1, round(np.sqrt(windows * width / height)))
    down = max(1, windows // across)
    xs = np.linspace(0, max(width - side, 0), across).round().astype(int)
    ys = np.linspace(0, max(height - side, 0), down).round().astype(int)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def tissue_window_origins(image: RoiImage, windows: int, level_pixels: int) -> np.ndarray | None:
    """(n, 2) top-left corners of at most `windows` sampling windows centred on tissue pixels of `image`'s largest
    pyramid level within `level_pixels` (optical density above `TISSUE_OPTICAL_DENSITY` in every channel, Macenko's
    tissue test), evenly spaced through them in raster order; None without such a level or tissue in it."""
    level = image.thumbnail(level_pixels)
    if level is None:
        return None
    tissue = np.all(optical_density(level) >= TISSUE_OPTICAL_DENSITY, axis=1).reshape(level.shape[:2])
    ys, xs = np.nonzero(tissue)
    if not len(ys):
        return None
    picked = np.unique(np.linspace(0, len(ys) - 1, min(windows, len(ys))).round().astype(int))
    centres = (np.stack([xs[picked], ys[picked]], axis=1) + 0.5) * [image.width / level.shape[1],
                                                                    image.height / level.shape[0]]
    side = SAMPLE_WINDOW_PX
    high = np.maximum([image.width - side, image.height - side], 0)
    return np.clip(np.round(centres - side / 2), 0, high).astype(int)


_ESTIMATED: "weakref.WeakKeyDictionary[RoiImage, ImageStains | None]" = weakref.WeakKeyDictionary()


def image_stains(image: RoiImage) -> ImageStains | None:
    """`estimate_stains` of a sample of `image` (`sample_pixels`), estimated once per open image however many crop
    chunks ask; None, with one warning, for too little tissue."""
    if image in _ESTIMATED:
        return _ESTIMATED[image]
    stains = _ESTIMATED[image] = estimate_or_warn(sample_pixels(image), getattr(image, "path", None) or "image")
    return stains


def estimate_or_warn(pixels: np.ndarray, name: str) -> ImageStains | None:
    """`estimate_stains(pixels)`, with one warning naming `name` (an image, a slide) when there is too little
    tissue; the pixels may pool several images stained together (e.g. the crops of one slide)."""
    stains = estimate_stains(pixels)
    if stains is None:
        LOG.warning("%s: too little stained tissue to estimate its stains; its crops are not stain-normalised", name)
    return stains


def normalise(crops: np.ndarray, stains: ImageStains | None) -> np.ndarray:
    """(..., 3) uint8 RGB crops of an image with `stains`, re-expressed with the reference stains; unchanged when
    `stains` is None."""
    if stains is None or crops.size == 0:
        return crops
    # pixels as rows, in blocks that stay in cache: the same values as one pass over all of them
    to_concentrations = np.linalg.pinv(stains.matrix).T * (REFERENCE_MAX_CONCENTRATIONS / stains.max_concentrations)
    to_density = -REFERENCE_STAIN_MATRIX.T
    rows = crops.reshape(-1, 3)
    out = np.empty_like(rows)
    for start in range(0, len(rows), NORMALISE_BLOCK_PIXELS):
        density = optical_density(rows[start:start + NORMALISE_BLOCK_PIXELS])
        pixels = np.exp((density @ to_concentrations) @ to_density)
        pixels *= LIGHT_INTENSITY
        out[start:start + len(pixels)] = np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels)
    return out.reshape(crops.shape)
