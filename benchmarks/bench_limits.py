"""Limits: process.py end to end on a 40,000 x 30,000 px pyramidal slide (Track 1) and a 2,000-page stack
(Track 2), each in a fresh process, with its wall time and peak resident memory against the 4 GB target.

Track 1 input: a generated whole-slide-like BigTIFF, 512 px JPEG tiles, SubIFD pyramid levels halving down to at
most 1,024 px, resolution tags (0.25 µm/px), mostly glass with a few tissue regions (lobed ellipses) of H&E-like
texture (tests/roi_factory.py's `he_roi`, one tile at a time). It is written tile by tile, level by level, so the
generator holds a few tiles at a time (about 40 MiB of growth for 40,000 x 30,000 px); it is cached in --cache-dir
under a name that encodes its parameters.
`--tissue-share` sets how much of the slide is tissue: glass tiles are skipped from the pyramid thumbnail without
being decoded (midog/proposals.py), so the run time follows the tissue, while the memory target is about the size.

Track 2 input: benchmarks/bench_track2.py's stack (50 generated 128 px pages repeated to --pages).

Peak RSS is the process.py process's own high-water mark (VmHWM in /proc/<pid>/status, polled every 50 ms; the
last value read is exact up to that interval), plus any child process's. The RUSAGE_CHILDREN ru_maxrss is not used:
Linux carries the parent's high-water mark into it at exec.

    .venv/bin/python benchmarks/bench_limits.py [--size 40000x30000] [--pages 2000] [--weights-dir weights]
        [--tissue-share 0.01] [--regions 4] [--threads 1] [--cache-dir /tmp/midog-bench-limits] [--keep]
        [--skip-track1] [--skip-track2]

The last lines read (GB = GiB; tiles_run: tiles the detector saw, the others held no tissue)
    track1_pyramid size=WxH seconds=S peak_rss_gb=G under_4gb=B tiles_total=N tiles_run=R tiles_skipped=K
        candidates=C mitotic_figures=F      (one line)
    track2_<pages> seconds=S peak_rss_gb=G under_4gb=B pages=P
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

os.environ.setdefault("YOLO_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tifffile  # noqa: E402
from roi_factory import he_roi, track1_input  # noqa: E402

import bench_track2  # noqa: E402

LIMIT_GB = 4.0
TILE = 512
GLASS_RGB = 242
"""Glass: light grey, faint noise (unsaturated, so tiling.tissue_fraction calls it background)."""
SPACING_UM = 0.25
MASK_STEP = 8
"""Tissue outlines are resolved to 8 px blocks of each level (cheap; a slide's outline needs no more)."""


# ---- the slide ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TissueRegion:
    """A lobed ellipse in level-0 pixels: inside where the normalised radius < 1 + lobes(angle)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    lobes: tuple[tuple[float, int, float], ...]
    """(amplitude, frequency, phase) of the boundary's radial modulation."""

    @property
    def reach(self) -> float:
        """Radius of a circle holding the whole region."""
        return max(self.rx, self.ry) * (1.0 + sum(a for a, _, _ in self.lobes))

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = ((xs - self.cx) * cos + (ys - self.cy) * sin) / self.rx
        v = (-(xs - self.cx) * sin + (ys - self.cy) * cos) / self.ry
        theta = np.arctan2(v, u)
        edge = 1.0 + sum(a * np.sin(f * theta + p) for a, f, p in self.lobes)
        return u * u + v * v < edge * edge


def tissue_regions(width: int, height: int, share: float, count: int, seed: int) -> list[TissueRegion]:
    """`count` regions covering about `share` of the slide (overlaps and borders make it a little less)."""
    rng = np.random.default_rng(seed)
    area = share * width * height / max(count, 1)
    regions = []
    for _ in range(count):
        aspect = rng.uniform(0.5, 1.0)
        rx = math.sqrt(area / (math.pi * aspect))
        ry = rx * aspect
        margin = min(rx, width / 2, height / 2)
        regions.append(TissueRegion(
            cx=float(rng.uniform(margin, width - margin)), cy=float(rng.uniform(margin, height - margin)),
            rx=rx, ry=ry, angle=float(rng.uniform(0, math.pi)),
            lobes=tuple((float(rng.uniform(0.04, 0.12)), int(f), float(rng.uniform(0, 2 * math.pi)))
                        for f in rng.choice([2, 3, 5, 7], size=3, replace=False))))
    return regions


def _glass_tile(seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 1.2, (TILE, TILE, 1))
    return np.clip(np.rint(GLASS_RGB + noise), 0, 255).astype(np.uint8).repeat(3, axis=2)


def level_tiles(width: int, height: int, scale: int, regions: list[TissueRegion],
                seed: int) -> Iterator[np.ndarray]:
    """The tiles of the level of `scale` (1 = full size), row by row; tissue where a region covers the tile's
    pixel centres (in level-0 coordinates), glass elsewhere. Edge tiles are full tiles, padded with glass."""
    glass = _glass_tile(seed)
    rows, cols = math.ceil(height / scale / TILE), math.ceil(width / scale / TILE)
    offsets = (np.arange(0, TILE, MASK_STEP) + MASK_STEP / 2) * scale  # the mask on a coarse grid, then repeated
    for row in range(rows):
        for col in range(cols):
            x0, y0 = col * TILE * scale, row * TILE * scale
            near = [r for r in regions if _overlaps(r, x0, y0, TILE * scale)]
            if not near:
                yield glass
                continue
            xs, ys = np.meshgrid(x0 + offsets, y0 + offsets)
            inside = (xs < width) & (ys < height) & np.logical_or.reduce([r.contains(xs, ys) for r in near])
            if not inside.any():
                yield glass
                continue
            tissue = he_roi(TILE, TILE, seed=seed + 7919 * (row * cols + col) + scale,
                            nuclei_per_mpx=2500 // (scale * scale))
            inside = inside.repeat(MASK_STEP, axis=0).repeat(MASK_STEP, axis=1)
            yield np.where(inside[..., None], tissue, glass)


def _overlaps(region: TissueRegion, x0: float, y0: float, side: float) -> bool:
    nearest_x = min(max(region.cx, x0), x0 + side)
    nearest_y = min(max(region.cy, y0), y0 + side)
    return math.hypot(region.cx - nearest_x, region.cy - nearest_y) <= region.reach


def pyramid_levels_for(width: int, height: int, smallest_px: int = 1024) -> int:
    """Halvings until the longer side is at most `smallest_px`."""
    levels, side = 0, max(width, height)
    while side > smallest_px:
        side = math.ceil(side / 2)
        levels += 1
    return levels


def write_slide(path: Path, width: int, height: int, levels: int | None = None, tissue_share: float = 0.1,
                regions: int = 5, seed: int = 0, compression: str = "jpeg", quality: int = 85) -> Path:
    """A pyramidal BigTIFF slide, written tile by tile (to `path`.partial, renamed when complete).

    Level 0 is the main IFD, the halved levels are its SubIFDs (NewSubfileType 1), all tiled 512 px and compressed
    with `compression` ("jpeg" or "zlib"); resolution tags in pixels per centimetre for 0.25 µm/px."""
    levels = pyramid_levels_for(width, height) if levels is None else levels
    shapes = tissue_regions(width, height, tissue_share, regions, seed)
    args = {"dtype": np.uint8, "photometric": "rgb", "tile": (TILE, TILE), "compression": compression,
            "compressionargs": {"level": quality if compression == "jpeg" else 6}, "maxworkers": 2}
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        tif.write(level_tiles(width, height, 1, shapes, seed), shape=(height, width, 3), subifds=levels or None,
                  resolution=(1e4 / SPACING_UM, 1e4 / SPACING_UM), resolutionunit="CENTIMETER",
                  software="midog benchmarks/bench_limits.py", **args)
        for level in range(1, levels + 1):
            scale = 2 ** level
            shape = (math.ceil(height / scale), math.ceil(width / scale), 3)
            tif.write(level_tiles(width, height, scale, shapes, seed), shape=shape, subfiletype=1, **args)
    partial.replace(path)
    return path


def cached_slide(cache_dir: Path, width: int, height: int, tissue_share: float, regions: int,
                 seed: int) -> tuple[Path, bool]:
    """(the slide for these parameters, whether it was generated now); generated only when not cached."""
    path = cache_dir / f"slide-{width}x{height}-tissue{tissue_share:g}-regions{regions}-seed{seed}-jpeg.tif"
    if path.is_file():
        print(f"slide: cached {path} ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
        return path, False
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with bench_track2.PeakRss() as peak:
        write_slide(path, width, height, tissue_share=tissue_share, regions=regions, seed=seed)
    print(f"slide: generated {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s, "
          f"generator RSS growth {(peak.peak - rss_before) / 2**20:.0f} MiB", flush=True)
    return path, True


def describe_slide(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        levels = " > ".join(f"{level.shape[1]}x{level.shape[0]}" for level in tif.series[0].levels)
        return (f"{'BigTIFF' if tif.is_bigtiff else 'TIFF'}, {page.compression.name}, tiles {page.tilewidth} px, "
                f"levels {levels}")


# ---- process.py in a fresh process --------------------------------------------------------------------------------

@dataclass
class ChildRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    log: str
    """process.py's stderr: its log lines (tqdm's bar stripped)."""

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss_bytes / 2**30


def _high_water_mark(process: psutil.Process) -> int:
    """The kernel's peak RSS of `process` (VmHWM) plus the current RSS of its children; 0 once it has exited."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, flags=re.MULTILINE)
        own = int(found.group(1)) * 1024 if found else process.memory_info().rss
        children = sum(child.memory_info().rss for child in process.children(recursive=True))
        return own + children
    except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
        return 0


def run_process_py(input_dir: Path, output_dir: Path, weights_dir: Path, threads: int, log_path: Path) -> ChildRun:
    """`python process.py --input … --output …` with the weights of `weights_dir`; wall time and peak RSS."""
    env = {**os.environ, "MIDOG_WEIGHTS_DIR": str(weights_dir), "MIDOG_RUNTIME__NUM_THREADS": str(threads),
           "YOLO_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "process.py"), "--input", str(input_dir), "--output", str(output_dir)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        watched, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, _high_water_mark(watched))
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    lines = re.split(r"[\r\n]+", log_path.read_text(errors="replace"))
    text = "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("tiles:"))
    return ChildRun(seconds, peak, child.returncode, text)


def _report_child(name: str, run: ChildRun) -> None:
    print(f"--- {name}: process.py log ---")
    print(run.log)
    print(f"--- {name}: exit code {run.returncode}, {run.seconds:.1f} s, peak RSS {run.peak_rss_gb:.2f} GB", flush=True)


# ---- the two runs -------------------------------------------------------------------------------------------------

def track1_limit(slide: Path, work: Path, weights_dir: Path, threads: int) -> str:
    input_dir, output_dir = work / "track1-input", work / "track1-output"
    input_dir.mkdir(parents=True)
    image = track1_input(input_dir, name="slide.tif")
    image.parent.mkdir(parents=True)
    image.symlink_to(slide.resolve())  # the slide stays where it is cached
    run = run_process_py(input_dir, output_dir, weights_dir, threads, work / "track1.log")
    _report_child("track 1", run)
    if run.returncode != 0:
        raise SystemExit(f"track 1: process.py failed with exit code {run.returncode}")
    tiles = re.search(r"(\d+)/(\d+) tiles with tissue", run.log)
    tiles_run, tiles_total = (int(tiles.group(1)), int(tiles.group(2))) if tiles else (-1, -1)
    points = json.loads((output_dir / "mitotic-figures.json").read_text())["points"]
    figures = sum(point["name"] == "mitotic figure" for point in points)
    with tifffile.TiffFile(slide) as tif:
        height, width = tif.series[0].levels[0].shape[:2]
    return (f"track1_pyramid size={width}x{height} seconds={run.seconds:.1f} peak_rss_gb={run.peak_rss_gb:.2f} "
            f"under_4gb={run.peak_rss_gb < LIMIT_GB} tiles_total={tiles_total} tiles_run={tiles_run} "
            f"tiles_skipped={tiles_total - tiles_run} candidates={len(points)} mitotic_figures={figures}")


def track2_limit(pages: int, work: Path, weights_dir: Path, threads: int) -> str:
    input_dir, output_dir = work / "track2-input", work / "track2-output"
    stack = bench_track2.large_stack_input(input_dir, pages)
    print(f"stack: {pages} pages, {stack.stat().st_size / 2**20:.0f} MiB", flush=True)
    run = run_process_py(input_dir, output_dir, weights_dir, threads, work / "track2.log")
    _report_child("track 2", run)
    if run.returncode != 0:
        raise SystemExit(f"track 2: process.py failed with exit code {run.returncode}")
    entries = len(json.loads((output_dir / "multiple-mitotic-figure-classification.json").read_text()))
    if entries != pages:
        raise SystemExit(f"track 2: {entries} entries for {pages} pages")
    return (f"track2_{pages} seconds={run.seconds:.1f} peak_rss_gb={run.peak_rss_gb:.2f} "
            f"under_4gb={run.peak_rss_gb < LIMIT_GB} pages={pages}")


def parse_size(text: str) -> tuple[int, int]:
    found = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(found.group(1)), int(found.group(2))


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{v:.1f}" for v in psutil.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, {memory:.0f} GiB RAM, "
            f"load average {load}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(40000, 30000), help="slide WIDTHxHEIGHT in pixels")
    parser.add_argument("--pages", type=int, default=2000, help="pages of the Track 2 stack")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "weights")
    parser.add_argument("--tissue-share", type=float, default=0.01,
                        help="share of the slide covered by tissue (the run time follows it)")
    parser.add_argument("--regions", type=int, default=4, help="tissue regions on the slide")
    parser.add_argument("--threads", type=int, default=1,
                        help="runtime.num_threads for process.py (0: the CPUs this process may use); 1 on a shared "
                             "machine, where more threads than free cores make every OpenMP barrier wait")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/midog-bench-limits"))
    parser.add_argument("--keep", action="store_true",
                        help="keep what this run generated (slide, stack, outputs, logs) in --cache-dir; a cached "
                             "slide is reused either way")
    parser.add_argument("--skip-track1", action="store_true")
    parser.add_argument("--skip-track2", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}; process.py with runtime.num_threads={args.threads}, weights {args.weights_dir}",
          flush=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    generated: Path | None = None
    results = []
    try:
        if not args.skip_track1:
            slide, fresh = cached_slide(args.cache_dir, *args.size, args.tissue_share, args.regions, args.seed)
            generated = slide if fresh else None
            print(f"slide: {describe_slide(slide)}", flush=True)
            results.append(track1_limit(slide, work, args.weights_dir, args.threads))
        if not args.skip_track2:
            results.append(track2_limit(args.pages, work, args.weights_dir, args.threads))
    finally:
        if args.keep:
            print(f"kept: {work}" + (f", {generated}" if generated else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
            if generated is not None:
                generated.unlink(missing_ok=True)
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
