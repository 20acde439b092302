"""Track 1 verification speed: the shipped verifier on candidates of a generated ROI, with and without test-time
augmentation (`verifier.tta`), in PyTorch and in ONNX Runtime (`verifier.backend`), and the cost of stain
normalisation (`verifier.stain_normalization: macenko`: the image's stains estimated once from at most 4 Mpx of it,
then every crop normalised), timed side by side in one run so the ratios hold on a CPU whose speed drifts.

    python benchmarks/bench_verifier.py [--candidates 2000] [--rounds 3] [--threads 0]

Uses the shipped verifier and its `pipeline.yaml` crop settings (resolved as process.py resolves them): for TTA and
the backends the crops are cut once (`Verifier.crops`) and only classification is timed; for stain normalisation
the pipeline's whole verification (`Verifier.probabilities`: every member's crops cut, normalised or not, and
classified in ONNX Runtime) is timed with and without it, the estimate apart. Prints ms per candidate for each
setting and the TTA / plain ratio (the compute of 8 views, less what batching amortises), the PyTorch / ONNX
Runtime ratio and the normalised / plain ratio. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from midog.config import resolve_config  # noqa: E402
from midog.devices import usable_cpus  # noqa: E402
from midog.roi_io import ArrayRoi, PhysicalTransform  # noqa: E402
from midog.stain import image_stains  # noqa: E402
from midog.verifier import Verifier  # noqa: E402
from midog.weights import find_stage_weights  # noqa: E402
from roi_factory import he_roi  # noqa: E402


def candidate_boxes(width: int, height: int, count: int, side: float, seed: int = 0) -> np.ndarray:
    """`count` square boxes of `side` px at random places inside the image (as the detector's 50 px boxes)."""
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, [width - side, height - side], size=(count, 2))
    return np.concatenate([corners, corners + side], axis=1).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or usable_cpus())
    config = resolve_config(overrides={"runtime.device": "cpu"})
    paths = find_stage_weights(config.verifier.weights)
    roi = ArrayRoi(he_roi(2048, 2048, seed=0), PhysicalTransform((0.00025, 0.00025)))
    boxes = candidate_boxes(roi.width, roi.height, args.candidates, config.merging.box_size_px)
    settings = {f"{view} {backend}": dataclasses.replace(config.verifier, tta=tta, backend=backend)
                for view, tta in (("plain", False), ("tta", True)) for backend in ("torch", "onnxruntime")}
    verifiers = {name: Verifier.from_weights(paths, cfg, torch.device("cpu")) for name, cfg in settings.items()}
    crops = verifiers["plain torch"].crops(roi, boxes)
    best = {name: float("inf") for name in verifiers}
    for _ in range(args.rounds):
        for name, verifier in verifiers.items():
            started = time.perf_counter()
            for member in verifier.classifiers:                   # an ensemble: every member on the same crops
                member.predict_proba(crops, tta=verifier.config.tta, batch_size=verifier.config.batch_size)
            best[name] = min(best[name], time.perf_counter() - started)
    stain_seconds = {"estimate": float("inf"), "none": float("inf"), "macenko": float("inf")}
    chains = {mode: Verifier.from_weights(paths, dataclasses.replace(config.verifier, tta=False, backend="onnxruntime",
                                                                     stain_normalization=mode), torch.device("cpu"))
              for mode in ("none", "macenko")}
    for _ in range(args.rounds):
        for mode, verifier in chains.items():                     # as the pipeline verifies: cut, normalise, classify
            image = ArrayRoi(roi.pixels, roi.transform)           # a new image: its stains not yet estimated
            if mode == "macenko":                                 # a 4 Mpx image: the most an estimate reads
                started = time.perf_counter()
                image_stains(image)
                stain_seconds["estimate"] = min(stain_seconds["estimate"], time.perf_counter() - started)
            started = time.perf_counter()
            verifier.probabilities(image, boxes)
            stain_seconds[mode] = min(stain_seconds[mode], time.perf_counter() - started)
    members = ", ".join(f"{p.name} ({c.arch})" for p, c in zip(paths, verifiers["plain torch"].classifiers))
    print(f"{members}: crops {config.verifier.crop_size} px "
          f"(context {config.verifier.context_px} px), {args.candidates} candidates, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, fastest of {args.rounds}")
    for name, seconds in best.items():
        print(f"{name:17s} {seconds:7.2f} s  {seconds / args.candidates * 1000:6.2f} ms/candidate")
    for backend in ("torch", "onnxruntime"):
        print(f"ratio tta/plain ({backend}) = {best[f'tta {backend}'] / best[f'plain {backend}']:.2f}")
    for view in ("plain", "tta"):
        print(f"ratio torch/onnxruntime ({view}) = {best[f'{view} torch'] / best[f'{view} onnxruntime']:.2f}")
    print(f"stain estimate   {stain_seconds['estimate']:7.2f} s  once per image (4 Mpx sampled)")
    extra = stain_seconds["macenko"] - stain_seconds["none"]
    print(f"verification with normalised crops {stain_seconds['macenko']:7.2f} s, plain {stain_seconds['none']:7.2f} s "
          f"(the pipeline's path, every member's crops): normalisation {extra / args.candidates * 1000:6.2f} "
          f"ms/candidate, ratio normalised/plain = {stain_seconds['macenko'] / stain_seconds['none']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
