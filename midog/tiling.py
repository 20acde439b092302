"""Tiling: tile origins and tissue detection (pure functions of sizes and pixels), and `read_tiles`, which reads
the tissue tiles of an image in batches on a background thread (no torch anywhere).

Tiles are `tile` px squares whose neighbours share `int(overlap * tile)` px, laid out as SAHI's slicer does (origins
0, step, 2·step, ...), except that the last row and column are shifted inward to end exactly on the border, so
every tile is full, and that no origin is ever repeated (SAHI repeats the last one when a tile already ends on the
border). An image smaller than a tile gets the single origin 0; its reader pads the missing pixels.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from midog.config import TilingConfig
    from midog.roi_io import RoiImage


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


_DONE = object()


def read_tiles(image: RoiImage, origins: Sequence[tuple[int, int]], tiling: TilingConfig,
              batch_size: int) -> Iterator[tuple[list[tuple[int, int]], np.ndarray, int]]:
    """Batches of (origins, tiles, number of tiles skipped for lack of tissue), read by a background thread.

    Decoding (tifffile/imagecodecs, numpy) releases the GIL, so reading the next batch overlaps with the model.
    When the image has a cheap thumbnail (a pyramid level of a streamed whole-slide image), tiles whose area in it
    holds less than half the minimum tissue share are skipped without being decoded; every other tile is checked
    on its own pixels.
    """
    size = tiling.tile_size
    thumbnail = None
    if tiling.tissue_min_fraction > 0 and tiling.thumbnail_megapixels > 0:
        thumbnail = image.thumbnail(int(tiling.thumbnail_megapixels * 1e6))

    def surely_empty(x: int, y: int) -> bool:
        if thumbnail is None:
            return False
        sy, sx = thumbnail.shape[0] / image.height, thumbnail.shape[1] / image.width
        y0, x0 = int(y * sy), int(x * sx)
        y1, x1 = max(y0 + 1, int(np.ceil((y + size) * sy))), max(x0 + 1, int(np.ceil((x + size) * sx)))
        region = thumbnail[y0:y1, x0:x1]
        share = tissue_fraction(region, tiling.tissue_saturation, subsample=1, gray_max=tiling.tissue_gray_max)
        return share < tiling.tissue_min_fraction / 2
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            kept: list[tuple[int, int]] = []
            tiles: list[np.ndarray] = []
            skipped = 0
            for x, y in origins:
                if stop.is_set():
                    return
                if surely_empty(x, y):
                    skipped += 1
                    continue
                tile = image.read_region(x, y, size, size)
                inside = tile[:image.height - y, :image.width - x]  # an image smaller than a tile: not the padding
                if not has_tissue(inside, tiling.tissue_saturation, tiling.tissue_min_fraction,
                                  tiling.tissue_gray_max):
                    skipped += 1
                    continue
                kept.append((x, y))
                tiles.append(tile)
                if len(kept) == batch_size:
                    items.put((kept, np.stack(tiles), skipped))
                    kept, tiles, skipped = [], [], 0
            if kept or skipped:
                items.put((kept, np.stack(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8), skipped))
            items.put(_DONE)
        except BaseException as err:  # handed to the consuming thread, which raises it
            items.put(err)

    worker = threading.Thread(target=produce, name="tile-reader", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()
