"""Tile origins and tissue detection: pure functions of sizes and pixels (no torch).

Tiles are `tile` px squares whose neighbours share `int(overlap * tile)` px, laid out as SAHI's slicer does (origins
0, step, 2·step, ...), except that the last row and column are shifted inward to end exactly on the border, so
every tile is full, and that no origin is ever repeated (SAHI repeats the last one when a tile already ends on the
border). An image smaller than a tile gets the single origin 0; its reader pads the missing pixels.
"""

from __future__ import annotations

import numpy as np


def tile_step(tile: int, overlap: float) -> int:
    """Distance between neighbouring origins: the tile minus `int(overlap * tile)` shared pixels (SAHI's rounding)."""
    if tile < 1:
        raise ValueError(f"tile size must be >= 1, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    return tile - int(overlap * tile)


def axis_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Origins along one axis of `length` px: ascending, unique, >= 0, each tile inside the image (or at 0)."""
    step = tile_step(tile, overlap)
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, step))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def tile_origins(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(x, y) origins of every tile, row by row (y outer, x inner), covering every pixel of the image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    xs = axis_origins(width, tile, overlap)
    return [(x, y) for y in axis_origins(height, tile, overlap) for x in xs]


def tissue_fraction(rgb: np.ndarray, saturation: float, subsample: int = 4, gray_max: float = 0.85) -> float:
    """Share of pixels whose HSV saturation exceeds `saturation` (0..1), on every `subsample`-th pixel.

    Stained tissue is coloured; glass, white padding and grey dust are not. Black pixels (value < 20) do not count
    either: they are scanner borders and padding, never tissue. A region without any colour at all (a grayscale
    image: every pixel has R = G = B) is judged by brightness instead: pixels darker than `gray_max` (0..1) count.
    """
    pixels = rgb[::subsample, ::subsample].reshape(-1, rgb.shape[-1])[:, :3].astype(np.int16)
    if pixels.size == 0:
        return 0.0
    high = pixels.max(axis=1)
    low = pixels.min(axis=1)
    if not (high - low).any():
        tissue = high < gray_max * 255
    else:
        tissue = (high - low) > saturation * np.maximum(high, 1)
    return float(np.mean(tissue & (high >= 20)))


def has_tissue(rgb: np.ndarray, saturation: float, min_fraction: float, gray_max: float = 0.85) -> bool:
    """Whether a tile holds enough tissue to be worth running the detector on."""
    return min_fraction <= 0.0 or tissue_fraction(rgb, saturation, gray_max=gray_max) >= min_fraction
