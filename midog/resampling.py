"""Views of a region of interest at a model's own pixel size, resampled tile by tile.

Scanners differ (0.2273 µm/px on a Hamamatsu NanoZoomer, 0.25 on the MIDOG++ scanners, 0.5 at x20): a model sees
pixels at the scale it was trained at. `at_pixel_size` returns the image itself when its pixel size is within a
tolerance of the model's, and otherwise a `ResampledRoi`: an `RoiImage` whose pixels are the source resampled to
the model's pixel size, computed only for the regions read (a 40,000 x 30,000 px slide is never copied whole).

Geometry: view pixel j covers source continuous coordinates [j / s, (j + 1) / s) with s = source µm / model µm per
axis, so a continuous view coordinate u is the source coordinate u / s and the view's millimetres are the source's
(`transform` keeps origin and direction, spacing becomes the model's). Each view pixel depends only on source
pixels near it (bilinear interpolation after a Gaussian anti-aliasing pre-filter when shrinking), read with a
margin, so a region reads the same alone or as part of a larger one.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from midog.roi_io import PhysicalTransform, RoiImage


def scale_factors(source_um: tuple[float, float], target_um: float) -> tuple[float, float]:
    """View pixels per source pixel, per axis (x, y)."""
    return (source_um[0] / target_um, source_um[1] / target_um)


def needs_resampling(source_um: tuple[float, float], target_um: float, tolerance: float) -> bool:
    """Whether either axis' pixel size differs from `target_um` by more than `tolerance` (a fraction)."""
    return any(abs(s / target_um - 1.0) > tolerance for s in source_um)


def antialias_sigma(scale: float) -> float:
    """Gaussian sigma (source px) applied before shrinking by `scale` < 1: 0.5 · sqrt(1/scale² - 1), the usual
    choice that matches the target's pixel footprint; 0 when enlarging."""
    return 0.5 * math.sqrt(1.0 / scale ** 2 - 1.0) if scale < 1.0 else 0.0


class ResampledRoi(RoiImage):
    """`source` resampled to `pixel_size_um`, read on demand (see the module docstring)."""

    def __init__(self, source: RoiImage, pixel_size_um: float) -> None:
        self.source = source
        self.pixel_size_um = float(pixel_size_um)
        self.scale = scale_factors(source.transform.spacing_um, self.pixel_size_um)
        self.width = max(1, int(round(source.width * self.scale[0])))
        self.height = max(1, int(round(source.height * self.scale[1])))
        t = source.transform
        self.transform = PhysicalTransform(spacing_mm=(t.spacing_mm[0] / self.scale[0], t.spacing_mm[1] / self.scale[1]),
                                           origin_mm=t.origin_mm, direction=t.direction)
        self.path = source.path
        self.spacing_is_fallback = source.spacing_is_fallback
        self.sigma = tuple(antialias_sigma(s) for s in self.scale)
        self.margin = tuple(2 + int(math.ceil(3 * sigma)) for sigma in self.sigma)

    def _read_inside(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        (sx, sy), (mx, my) = self.scale, self.margin
        # source pixel-centre coordinates of the first and last view pixel centres
        first_x, last_x = (x0 + 0.5) / sx - 0.5, (x1 - 0.5) / sx - 0.5
        first_y, last_y = (y0 + 0.5) / sy - 0.5, (y1 - 0.5) / sy - 0.5
        left, top = int(math.floor(first_x)) - mx, int(math.floor(first_y)) - my
        right, bottom = int(math.ceil(last_x)) + mx + 1, int(math.ceil(last_y)) + my + 1
        region = self.source.read_region(left, top, right - left, bottom - top)
        if any(self.sigma):
            region = cv2.GaussianBlur(region, (_kernel(self.sigma[0]), _kernel(self.sigma[1])),
                                      sigmaX=self.sigma[0] or 1e-6, sigmaY=self.sigma[1] or 1e-6,
                                      borderType=cv2.BORDER_REPLICATE)
        matrix = np.array([[1.0 / sx, 0.0, first_x - left], [0.0, 1.0 / sy, first_y - top]])
        out = cv2.warpAffine(region, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(out.reshape(y1 - y0, x1 - x0, 3))

    def thumbnail(self, max_pixels: int) -> np.ndarray | None:
        """The source's (a thumbnail covers the same area at any scale)."""
        return self.source.thumbnail(max_pixels)

    def close(self) -> None:
        """The source belongs to whoever opened it."""


def _kernel(sigma: float) -> int:
    return 2 * int(math.ceil(3 * sigma)) + 1 if sigma > 0 else 1


def at_pixel_size(image: RoiImage, pixel_size_um: float, tolerance: float) -> RoiImage:
    """`image` itself when its pixel size is within `tolerance` (a fraction) of `pixel_size_um` on both axes, else a
    `ResampledRoi` at `pixel_size_um`. An image without a pixel size of its own has `image.fallback_spacing_um`."""
    if not needs_resampling(image.transform.spacing_um, pixel_size_um, tolerance):
        return image
    return ResampledRoi(image, pixel_size_um)


def view_scale(image: RoiImage, view: RoiImage) -> tuple[float, float]:
    """View pixels per image pixel (x, y); (1, 1) when the view is the image."""
    return view.scale if isinstance(view, ResampledRoi) and view is not image else (1.0, 1.0)


def scale_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """(n, 4) x1, y1, x2, y2 multiplied by (sx, sy, sx, sy)."""
    factors = np.array([scale[0], scale[1], scale[0], scale[1]], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * factors)
