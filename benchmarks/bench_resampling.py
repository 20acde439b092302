"""Speed and memory of reading a ROI at the models' pixel size (midog.resampling), against reading it as it is.

    python benchmarks/bench_resampling.py [--width 7215 --height 5412] [--rounds 2]

A generated H&E-like ROI held in memory at 0.2273 µm/px (a Hamamatsu x40 scan) is read tile by tile (512 px, 20 %
overlap) as the pipeline reads it: (a) as it is (no resampling: what a 0.25 µm/px image costs), (b) through
`ResampledRoi` at 0.25 µm/px (shrunk ×0.909), (c) a 0.5 µm/px x20 scan of the same field enlarged ×2 (4× the
tiles). Prints seconds per method (fastest of the rounds, interleaved), the ratio to (a), and the peak RSS growth
while reading, which must stay a few tiles' worth (no full-image copy).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from midog.resampling import ResampledRoi  # noqa: E402
from midog.roi_io import ArrayRoi, PhysicalTransform  # noqa: E402
from midog.tiling import tile_origins  # noqa: E402
from roi_factory import he_roi  # noqa: E402


def read_all_tiles(image) -> int:
    count = 0
    for x, y in tile_origins(image.width, image.height, 512, 0.2):
        np.array(image.read_region(x, y, 512, 512))  # a copy, as the tile batches are
        count += 1
    return count


class PeakRss:
    """Peak resident memory above the start, sampled every 5 ms while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.process, self.start, self.peak, self.running = psutil.Process(), 0, 0, True
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=7215)
    parser.add_argument("--height", type=int, default=5412)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    pixels = he_roi(args.width, args.height, seed=0)
    x40 = ArrayRoi(pixels, PhysicalTransform((0.2273e-3, 0.2273e-3)))
    x20 = ArrayRoi(pixels[::2, ::2], PhysicalTransform((0.5e-3, 0.5e-3)))
    methods = {"(a) as it is": lambda: x40, "(b) 0.2273 -> 0.25 um/px": lambda: ResampledRoi(x40, 0.25),
               "(c) 0.5 -> 0.25 um/px": lambda: ResampledRoi(x20, 0.25)}
    best = {name: float("inf") for name in methods}
    tiles, growth = {}, {}
    for _ in range(args.rounds):
        for name, view in methods.items():
            with PeakRss() as rss:
                started = time.perf_counter()
                tiles[name] = read_all_tiles(view())
                best[name] = min(best[name], time.perf_counter() - started)
            growth[name] = max(growth.get(name, 0.0), rss.growth_mb)
    print(f"ROI {args.width} x {args.height} px ({pixels.nbytes / 2**20:.0f} MB in memory), fastest of {args.rounds}")
    for name in methods:
        print(f"{name:28s} {tiles[name]:4d} tiles  {best[name]:6.2f} s  {best[name] / best['(a) as it is']:5.2f}x (a)  "
              f"{best[name] / tiles[name] * 1000:6.1f} ms/tile  peak RSS growth {growth[name]:6.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
