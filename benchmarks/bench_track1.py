"""Track 1 speed: our proposal stage against SAHI and against a plain per-tile ultralytics loop, plus the pipeline.

On one generated 7,215 x 5,412 px H&E-like ROI, with the same detector weights, the same tiles (512 px, 20 %
overlap), the same confidence (0.2), NMS IoU (0.3) and merge (NMS, IoU 0.5, by class), it times
  (a) our proposal stage: `YoloProposer.propose` (batched, reader thread) + `merge_tiles`,
  (b) SAHI's `get_sliced_prediction` with an ultralytics model (SAHI's defaults otherwise: one slice per call),
      without SAHI's extra full-image prediction, with NMS/IoU 0.5 instead of its GREEDYNMM/IOS default,
  (c) a plain loop of `YOLO.predict` per tile, shifted and merged with torchvision NMS (as the Track 1 paper's code),
and the whole pipeline (`Track1Detector.detect` on the TIFF: read, tile, propose, merge, verify, label atypical).
It checks that (a) finds SAHI's detections: matched_sahi is the share of SAHI's boxes whose centre has one of ours
within 2 px. Our tile-side rule (merging.tile_edge_px) is switched off for (a) so both merge the same boxes.

The detector is weights/detector.pt when it exists, else a random-initialised YOLO11n whose class logits are shifted
(--class-bias) so that it proposes a few boxes per tile at confidence 0.2 (a random model's prior bias proposes
nothing, which would make the comparison empty), after its BatchNorm statistics were computed on generated tiles. The verifier and atypical classifiers are the shipped ones when
present, else random ConvNeXt-Tiny models. SAHI is a benchmark-only dependency (benchmarks/requirements.txt).

    .venv/bin/python benchmarks/bench_track1.py [--weights detector.pt] [--threads N] [--device cpu|cuda]

The last line reads: seconds_per_roi=S speedup_vs_sahi=X speedup_vs_tile_loop=Y matched_sahi=F
(S: the whole pipeline on one ROI, the fastest run after the first with a loaded pipeline; X, Y: how many times
faster (a) is than (b) and (c)).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from roi_factory import he_roi, shift_class_bias, write_tiff  # noqa: E402

from midog.classifier import build_classifier  # noqa: E402
from midog.config import MergingConfig, resolve_config  # noqa: E402
from midog.pipeline import Track1Detector  # noqa: E402
from midog.proposals import YoloProposer  # noqa: E402
from midog.roi_io import ArrayRoi, PhysicalTransform  # noqa: E402
from midog.tiling import tile_origins  # noqa: E402
from midog.weights import checkpoint_names  # noqa: E402

WIDTH, HEIGHT = 7215, 5412
SAME_MERGE = MergingConfig(strategy="nms", iou=0.5, class_agnostic=False, tile_edge_px=0)


def random_detector(path: Path, class_bias: float, model_yaml: str = "yolo11n.yaml") -> Path:
    """Random YOLO (YOLO11n by default) whose BatchNorm statistics are computed on generated tiles (so its scores
    depend on the image, not only on the position, as they do with the untouched 0/1 statistics) and class logits
    shifted."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(model_yaml, nc=1, verbose=False)
    model.names = {0: "mitotic figure"}
    calibration = np.stack([he_roi(512, 512, seed=100 + s, figures=[(100, 300)]) for s in range(4)])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calibration).permute(0, 3, 1, 2).float() / 255)
    model.eval()
    shift_class_bias(model, class_bias)
    torch.save({"model": model.half(), "train_args": {}, "date": None, "version": None}, path)
    return path


def classifier_weights(name: str, folder: Path, input_size: int, positive: str, random: bool = False) -> Path | None:
    """None when the shipped checkpoint is there (the pipeline then runs as shipped: its `weights/pipeline.yaml`
    sections, e.g. the verifier's crops, TTA and threshold and the atypical pair, apply only to the shipped names),
    else a random ConvNeXt-Tiny stand-in saved in `folder`."""
    if (REPO / "weights" / name).is_file() and not random:
        return None
    torch.manual_seed(0)
    return build_classifier("convnext_tiny", input_size, positive=positive).save(folder / name)


def centres(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def matched_share(reference: np.ndarray, ours: np.ndarray, tolerance: float = 2.0) -> float:
    """Share of `reference` centres with one of `ours` within `tolerance` px."""
    if len(reference) == 0:
        return 1.0
    if len(ours) == 0:
        return 0.0
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(ours).query(reference, k=1)  # a dense distance matrix would take GBs at 18,000 boxes
    return float(np.mean(distance <= tolerance))


def timed(label: str, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.2f} s", flush=True)
    return result, seconds


def best_of(rounds: int, methods: dict):
    """Run the methods in turn, `rounds` times (interleaved, so load from other processes hits all alike);
    each method's result and its fastest time."""
    results, times = {}, {name: [] for name in methods}
    for round_ in range(rounds):
        for name, fn in methods.items():
            results[name], seconds = timed(f"round {round_ + 1} {name}", fn)
            times[name].append(seconds)
    return results, {name: min(values) for name, values in times.items()}


def ours(proposer: YoloProposer, pixels: np.ndarray, config) -> np.ndarray:
    """The pipeline's own proposal chain (`Track1Detector.candidates`), merging as SAHI does."""
    roi = ArrayRoi(pixels, PhysicalTransform((0.00025, 0.00025)))
    chain = Track1Detector(replace(config, merging=SAME_MERGE), proposer, None, None)
    return chain.candidates(roi)[0].boxes


def sahi(model, pixels: np.ndarray) -> np.ndarray:
    from sahi.predict import get_sliced_prediction

    result = get_sliced_prediction(
        pixels, model, slice_height=512, slice_width=512, overlap_height_ratio=0.2, overlap_width_ratio=0.2,
        perform_standard_pred=False, postprocess_type="NMS", postprocess_match_metric="IOU",
        postprocess_match_threshold=0.5, postprocess_class_agnostic=False, verbose=0)
    return np.array([p.bbox.to_xyxy() for p in result.object_prediction_list], dtype=np.float64).reshape(-1, 4)


def tile_loop(yolo, pixels: np.ndarray, device: str) -> np.ndarray:
    from torchvision.ops import batched_nms

    boxes, scores, classes = [], [], []
    for x, y in tile_origins(WIDTH, HEIGHT, 512, 0.2):
        tile = pixels[y:y + 512, x:x + 512]
        result = yolo.predict(tile[..., ::-1], imgsz=512, conf=0.2, iou=0.3, verbose=False, device=device)[0]
        boxes.append(result.boxes.xyxy.cpu() + torch.tensor([x, y, x, y]))
        scores.append(result.boxes.conf.cpu())
        classes.append(result.boxes.cls.cpu())
    boxes_t, scores_t, classes_t = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
    keep = batched_nms(boxes_t, scores_t, classes_t, float(np.nextafter(np.float32(0.5), np.float32(0))))
    return boxes_t[keep].numpy()


def process_py_environment(detector: Path, verifier: Path | None, atypical: Path | None, device: str,
                           threads: int = 0) -> dict[str, str]:
    """process.py's environment for `process_py`: the shipped weights as shipped, as the pipeline timed in this
    process loads them. $MIDOG_WEIGHTS_DIR is the repository's weights/ itself, not a copy, so the model cards are
    checked and weights/pipeline.yaml is in force with every checkpoint it names (the verifier's crops, TTA and
    threshold, the atypical pair); each stand-in (None: the shipped checkpoint) is named by its path, which no
    pipeline.yaml section is tuned for, so it runs with the default settings."""
    stand_ins = {"proposals": None if detector == REPO / "weights" / "detector.pt" else detector,
                 "verifier": verifier, "atypical": atypical}
    return {**os.environ, "MIDOG_WEIGHTS_DIR": str(REPO / "weights"), "MIDOG_RUNTIME__DEVICE": device,
            "MIDOG_RUNTIME__NUM_THREADS": str(threads), "YOLO_OFFLINE": "1",
            **{f"MIDOG_{section.upper()}__WEIGHTS": str(path.resolve()) for section, path in stand_ins.items() if path}}


def process_py(folder: Path, pixels: np.ndarray, detector: Path, verifier: Path | None, atypical: Path | None,
               device: str, threads: int = 0) -> None:
    """process.py end to end in a fresh process (imports, model load, ONNX export if not cached, the ROI, both
    files), with the weights of `process_py_environment`: its wall time and its own peak RSS."""
    import subprocess

    from roi_factory import track1_input

    track1_input(folder / "input", pixels, tile=512, compression="zlib")
    env = process_py_environment(detector, verifier, atypical, device, threads)
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "process.py"), "--input", str(folder / "input"),
                              "--output", str(folder / "output")], env=env, stderr=subprocess.DEVNULL)
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:  # polled: Linux carries the parent's high-water mark into a forked child's rusage
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if child.wait() != 0:
        raise SystemExit(f"process.py failed with exit code {child.returncode}")
    wall = time.perf_counter() - started
    print(f"process.py end to end: {wall:.2f} s, peak RSS {peak / 2**30:.2f} GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="detector checkpoint (default: the shipped one)")
    parser.add_argument("--class-bias", type=float, default=1.0, help="for the random detector only")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads, in this process and process.py's (0: the CPUs this process may use)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the fastest counts")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--pipeline-runs", type=int, default=2,
                        help="whole-pipeline runs on the ROI with one loaded pipeline: the first pays one-off costs "
                             "(CUDA kernels loaded on first use), S in the last line is the fastest of the others")
    parser.add_argument("--random-detector", metavar="YAML",
                        help="time a random-initialised detector of this ultralytics model YAML instead of the shipped "
                             "weights, e.g. yolo11x.yaml (the issue's GPU target: YOLO11x + ConvNeXt-Tiny)")
    parser.add_argument("--random-classifiers", action="store_true",
                        help="random ConvNeXt-Tiny verifier and atypical classifier instead of the shipped ones")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name(device)
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {device}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pixels = he_roi(WIDTH, HEIGHT, seed=0, figures=[(int(x), int(y)) for x, y in
                                                       np.random.default_rng(0).uniform(50, 5000, (60, 2))])
        roi_path = write_tiff(folder / "roi.tif", pixels, spacing_um=(0.25, 0.25), tile=512, compression="zlib")
        shipped = REPO / "weights" / "detector.pt"
        if args.weights:
            detector = args.weights
        elif shipped.is_file() and not args.random_detector:
            detector = shipped
        else:
            detector = random_detector(folder / "det.pt", args.class_bias, args.random_detector or "yolo11n.yaml")
        random_name = f"random {args.random_detector or 'yolo11n.yaml'}, class bias {args.class_bias}"
        print(f"detector: {random_name if detector == folder / 'det.pt' else detector}")
        config = resolve_config(overrides={"runtime.device": str(device), "proposals.weights": str(detector)})

        # (a) ours: ONNX Runtime on the CPU (the default), and the PyTorch backend for reference
        started = time.perf_counter()
        proposer = YoloProposer.from_weights(detector, device, config.proposals, config.tiling.tile_size)
        print(f"our detector load ({proposer.backend}, ONNX export when not cached): "
              f"{time.perf_counter() - started:.2f} s")
        proposer.predict(np.stack([pixels[:512, :512]] * config.proposals.batch_size))  # warm-up
        torch_proposer = YoloProposer.from_weights(detector, device, replace(config.proposals, backend="torch"))
        torch_proposer.predict(np.stack([pixels[:512, :512]] * config.proposals.batch_size))

        # (b) SAHI, same ultralytics model
        from sahi.models.ultralytics import UltralyticsDetectionModel
        from ultralytics import YOLO

        yolo = YOLO(str(detector), task="detect")
        yolo.overrides["iou"] = config.proposals.nms_iou  # SAHI passes only conf; NMS IoU comes from the overrides
        sahi_model = UltralyticsDetectionModel(model=yolo, confidence_threshold=config.proposals.confidence,
                                               image_size=512, device=str(device))
        sahi_model.perform_inference(pixels[:512, :512])  # warm-up

        methods = {
            "(a) ours": lambda: ours(proposer, pixels, config),
            "(b) SAHI get_sliced_prediction": lambda: sahi(sahi_model, pixels),
            "(c) ultralytics predict per tile": lambda: tile_loop(yolo, pixels, str(device)),
        }
        if device.type == "cpu" and proposer.backend != "torch":
            methods["(a') ours, PyTorch backend"] = lambda: ours(torch_proposer, pixels, config)
        results, best = best_of(args.rounds, methods)
        boxes_a, boxes_b, boxes_c = (results[k] for k in list(methods)[:3])
        t_a, t_b, t_c = (best[k] for k in list(methods)[:3])
        print("fastest: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()))

        matched = matched_share(centres(boxes_b), centres(boxes_a))
        print(f"detections: ours {len(boxes_a)}, SAHI {len(boxes_b)}, tile loop {len(boxes_c)}; "
              f"SAHI's reproduced within 2 px: {matched:.4f}; "
              f"ours in SAHI's: {matched_share(centres(boxes_a), centres(boxes_b)):.4f}; "
              f"tile loop's reproduced: {matched_share(centres(boxes_c), centres(boxes_a)):.4f}")

        seconds = float("nan")
        if not args.skip_pipeline:
            verifier = classifier_weights("verifier.pt", folder, 64, "mitotic figure", args.random_classifiers)
            atypical = classifier_weights("atypical.pt", folder, 128, "atypical", args.random_classifiers)
            overrides = {"runtime.device": str(device), "proposals.weights": str(detector),
                         "runtime.num_threads": args.threads}  # the pipeline sets torch's threads from this
            overrides |= {f"{stage}.weights": str(path) for stage, path in (("verifier", verifier),
                                                                            ("atypical", atypical)) if path}
            config = resolve_config(overrides=overrides)
            print(f"pipeline: verifier {'stand-in' if verifier else 'shipped'} (crop {config.verifier.crop_size} px, "
                  f"tta {config.verifier.tta}, threshold {config.verifier.threshold:.3f}), atypical "
                  f"{'stand-in' if atypical else ', '.join(checkpoint_names(config.atypical.weights))}")
            pipeline, load = timed("pipeline model load", Track1Detector.from_config, config, device)
            runs = []
            for run in range(args.pipeline_runs):
                label = "first ROI after load" if run == 0 else f"ROI {run + 1}"
                result, run_seconds = timed(f"whole pipeline (read TIFF → points), {label}", pipeline.detect,
                                            roi_path, False)
                stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
                print(f"pipeline: {len(result.detections)} candidates, {len(result.mitotic_figures)} mitotic "
                      f"figures; {stages}")
                runs.append(run_seconds)
            seconds = min(runs[1:] or runs)
            process_py(folder, pixels, detector, verifier, atypical, str(device), args.threads)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak RSS of this benchmark process (all methods, SAHI's slices included): {peak:.2f} GB")
    print(f"seconds_per_roi={seconds:.2f} speedup_vs_sahi={t_b / t_a:.2f} speedup_vs_tile_loop={t_c / t_a:.2f} "
          f"matched_sahi={matched:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
