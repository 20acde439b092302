"""Track 1 on a GPU: which runtime settings make YOLO11x + ConvNeXt-Tiny fast, and what each costs in agreement.

On the benchmark ROI of bench_track1.py (7,215 × 5,412 px, tiled zlib TIFF) with a random YOLO11x and random
ConvNeXt-Tiny verifier and atypical classifier (timing only), for each mode (runtime.deterministic,
proposals.half, proposals.batch_size) it loads the pipeline, runs it `--runs` times and prints the fastest run
after the first with its stages, and how far the last two runs differ (points and probabilities), so a
non-deterministic mode's run-to-run spread is measured, not guessed. Then a torch profile of one warm proposal
stage in the default mode (where the time goes: the model, NMS, copies).

    python benchmarks/gpu_modes.py [--device cuda] [--size 7215x5412] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_track1 import classifier_weights, he_roi, random_detector, write_tiff  # noqa: E402

from midog.config import resolve_config  # noqa: E402
from midog.pipeline import Track1Detector  # noqa: E402

MODES = [  # (deterministic, half, proposal batch size); the shipped default first
    (True, False, 32), (True, False, 8), (True, True, 8), (True, True, 32), (False, False, 32), (False, True, 32),
]


def run_spread(first, second) -> str:
    """Largest difference between two runs' detections, matched in order (same count expected)."""
    if len(first.detections) != len(second.detections):
        return f"counts differ: {len(first.detections)} vs {len(second.detections)}"
    if not first.detections:
        return "no detections"
    xy = np.array([[d.x, d.y] for d in first.detections]) - np.array([[d.x, d.y] for d in second.detections])
    prob = max(abs(a.probability - b.probability) for a, b in zip(first.detections, second.detections))
    atyp = [abs((a.atypical_probability or 0) - (b.atypical_probability or 0))
            for a, b in zip(first.detections, second.detections)]
    labels = sum(a.label != b.label or a.atypical != b.atypical for a, b in zip(first.detections, second.detections))
    return (f"max |Δxy| {np.abs(xy).max():.4f} px, max |Δprobability| {prob:.2e}, "
            f"max |ΔP(atypical)| {max(atyp):.2e}, labels changed {labels}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="7215x5412")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--detector-yaml", default="yolo11x.yaml")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        figures = [(int(x), int(y)) for x, y in rng.uniform(50, min(width, height) - 50, (60, 2))]
        roi = write_tiff(folder / "roi.tif", he_roi(width, height, seed=0, figures=figures), spacing_um=(0.25, 0.25),
                         tile=512, compression="zlib")
        weights = {"proposals.weights": str(random_detector(folder / "det.pt", 1.0, args.detector_yaml)),
                   "verifier.weights": str(classifier_weights("verifier.pt", folder, 64, "mitotic figure", True)),
                   "atypical.weights": str(classifier_weights("atypical.pt", folder, 128, "atypical", True))}
        for deterministic, half, batch in MODES:
            config = resolve_config(overrides={**weights, "runtime.device": args.device,
                                            "runtime.deterministic": deterministic, "proposals.half": half,
                                            "proposals.batch_size": batch})
            pipeline = Track1Detector.from_config(config, args.device)
            results, seconds = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                results.append(pipeline.detect(roi, False))
                seconds.append(time.perf_counter() - started)
            best = int(np.argmin(seconds[1:])) + 1 if len(seconds) > 1 else 0
            stages = ", ".join(f"{k} {v:.2f}" for k, v in results[best].timings.items())
            print(f"deterministic={deterministic} half={half} batch={batch}: first {seconds[0]:.2f} s, "
                  f"best later {seconds[best]:.2f} s ({stages}); {len(results[-1].detections)} candidates; "
                  f"last two runs: {run_spread(results[-2], results[-1]) if len(results) > 1 else '-'}", flush=True)
            del pipeline
        config = resolve_config(overrides={**weights, "runtime.device": args.device})
        pipeline = Track1Detector.from_config(config, args.device)
        pipeline.detect(roi, False)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.device(args.device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            pipeline.detect(roi, False)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
        if len(activities) > 1:
            print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
