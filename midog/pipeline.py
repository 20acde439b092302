"""The only module that knows the order of the stages. One function per track, called by process.py."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import logging
import time

import numpy as np
import torch

from midog.atypical import AtypicalClassifier, figure_crops, load_atypical
from midog.config import AtypicalConfig, PipelineConfig
from midog.devices import configure_torch, resolve_device
from midog.image_files import find_single_image
from midog.interfaces import TRACK1_IMAGE_FOLDER, TRACK2_IMAGE_FOLDER
from midog.merging import Candidates, build_merger, merge_tiles, suppress_close_points
from midog.outputs import (MITOTIC_FIGURE, TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME,
                           check_output_folder, track1_outputs, track2_classification, write_json_atomic)
from midog.progress import progress_bar
from midog.proposals import ProposalStats, YoloProposer
from midog.resampling import at_pixel_size, scale_boxes, view_scale
from midog.roi_io import ROI_SUFFIXES, RoiImage, open_roi
from midog.stack_io import PageStack, open_stack
from midog.tiling import tile_origins
from midog.verifier import Verifier, combine_probability
from midog.weights import (STAGE_SECTIONS, LoadedCheckpoint, find_stage_weights, find_weights, log_loaded,
                           require_in_given_dir, stage_checkpoints)

log = logging.getLogger(__name__)


@dataclass
class TrackRun:
    """What a track's run read, wrote and loaded: process.py's `--record` is made of it."""

    image: Path
    outputs: list[Path]
    checkpoints: list[LoadedCheckpoint]
    thresholds: dict[str, float]
    """The decision thresholds in force, by stage (`verifier`, `atypical`)."""


# ---- Track 2: atypical vs normal on a stack of crops -------------------------------------------------------------

def classify_pages(stack: PageStack, classifier: AtypicalClassifier, config: AtypicalConfig,
                   progress: bool = False) -> list[float]:
    """P(atypical) of every page in order, read `atypical.batch_size` pages and `atypical.max_batch_megapixels` at
    a time: Track 2's classification, for process.py and the batch runner alike."""
    probabilities: list[float] = []
    with progress_bar(stack.num_pages, "pages", "page", progress) as bar:
        for batch in stack.iter_batches(config.batch_size, config.max_batch_pixels):
            probabilities.extend(classifier.predict_proba(batch).tolist())
            bar.update(len(batch))
    return probabilities


def load_track2(config: PipelineConfig) -> tuple[AtypicalClassifier, list[LoadedCheckpoint]]:
    """Track 2's classifier as process.py loads it: the weights folder checked, torch set up, the checkpoints and
    the threshold in force logged."""
    require_in_given_dir({"atypical": config.atypical.weights})
    configure_torch(config.runtime)
    classifier = load_atypical(config.atypical, device=resolve_device(config.runtime.device),
                               foundation=config.foundation)
    checkpoints = stage_checkpoints("atypical", config.atypical.weights)
    log_loaded(checkpoints, {"atypical": classifier.threshold})
    return classifier, checkpoints


def run_track2(input_dir: Path, output_dir: Path, config: PipelineConfig, progress: bool = True) -> TrackRun:
    """The one stack in images/stacked-histopathology-roi-cropouts/ → one {class, confidence} per page, in order.

    The stack is opened (and checked) and the output folder checked before the weights are loaded, pages are
    classified in batches of `atypical.batch_size` pages and `atypical.max_batch_megapixels` pixels at most, and the
    output is written once, atomically, after the last page: a failure anywhere leaves no output file. `progress`: a
    bar of the pages classified (`midog.progress`).
    """
    image_path = find_single_image(input_dir / "images" / TRACK2_IMAGE_FOLDER)
    with open_stack(image_path) as stack:
        check_output_folder(output_dir)
        started = time.perf_counter()
        classifier, checkpoints = load_track2(config)  # after the input checks: a bad input prints one line only
        loaded = time.perf_counter()
        probabilities = classify_pages(stack, classifier, config.atypical, progress)
        log.info("track 2: %d pages of %s in %.2f s (model load %.2f s), threshold %.3f", stack.num_pages,
                 image_path.name, time.perf_counter() - loaded, loaded - started, classifier.threshold)
    pages = track2_classification(probabilities, classifier.threshold, config.atypical.confidence)
    output = write_json_atomic(output_dir / TRACK2_FILENAME, pages)
    return TrackRun(image_path, [output], checkpoints, {"atypical": classifier.threshold})


# ---- Track 1: detection on a region of interest ------------------------------------------------------------------
#
# read (roi_io) → tile (tiling) → propose (proposals) → shift + merge (merging) → verify (verifier)
# → label atypical (atypical) → write (outputs). `Track1Detector` holds the loaded models and runs the chain on one
# image; training and evaluation code use it directly, `run_track1` wraps it for process.py.

def crop_chunks(count: int, batch_size: int, chunk: int) -> list[slice]:
    """Consecutive slices covering `count` items, each a multiple of `batch_size` long (but the last).

    Candidates' crops are read and classified `chunk` at a time (`runtime.crop_chunk`, rounded down to a multiple of
    the batch size, so the batches, and the results, are those of one pass): a whole slide can give hundreds of
    thousands of candidates, and holding all their crops at once would grow memory with the slide (12 KB per 64 px
    verifier crop, 48 KB per 128 px atypical crop).
    """
    size = max(1, chunk // batch_size) * batch_size
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class Detection:
    """One merged candidate. `probability` is what the output file carries (see `verifier.probability`)."""

    x: float
    """Box centre, pixels (continuous index, as the MIDOG reference container)."""
    y: float
    x_mm: float
    y_mm: float
    box: tuple[float, float, float, float]
    detector_confidence: float
    verifier_probability: float
    probability: float
    label: str
    """"mitotic figure" or "non-mitotic figure"."""
    atypical_probability: float | None = None
    """P(atypical), for mitotic figures only."""
    atypical: bool | None = None

    @property
    def is_mitotic_figure(self) -> bool:
        return self.label == MITOTIC_FIGURE


@dataclass
class Track1Result:
    detections: list[Detection]
    width: int
    height: int
    spacing_um: tuple[float, float]
    tiles_total: int
    tiles_run: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""

    @property
    def mitotic_figures(self) -> list[Detection]:
        return [d for d in self.detections if d.is_mitotic_figure]


class Track1Detector:
    """The Track 1 chain with its models loaded once; `detect(image)` runs it on one image."""

    def __init__(self, config: PipelineConfig, proposer: YoloProposer, verifier: Verifier | None,
                 atypical: AtypicalClassifier | None, checkpoints: list[LoadedCheckpoint] | None = None) -> None:
        """`verifier` None: only `candidates` runs (training's data mining); `atypical` None: no atypical labels.
        `checkpoints`: the files the models were loaded from (`from_config` fills it in)."""
        self.config = config
        self.proposer = proposer
        self.verifier = verifier
        self.atypical = atypical
        self.checkpoints = list(checkpoints or [])
        combine_probability(np.zeros(0), np.zeros(0), config.verifier.probability)  # reject a bad mode now
        build_merger(config.merging)

    @classmethod
    def from_config(cls, config: PipelineConfig, device: str | torch.device | None = None,
                    with_atypical: bool = True, with_verifier: bool = True) -> "Track1Detector":
        """Load the detector, verifier and atypical weights named by `config` (`midog.config.resolve_config`);
        `with_verifier` / `with_atypical` False leave those stages out."""
        device = torch.device(device) if device is not None else resolve_device(config.runtime.device)
        threads = configure_torch(config.runtime)
        proposer = YoloProposer.from_weights(find_weights(config.proposals.weights), device, config.proposals,
                                             config.tiling.tile_size, threads)
        checkpoints = stage_checkpoints("proposals", config.proposals.weights)
        verifier = atypical = None
        if with_verifier:
            verifier = Verifier.from_weights(find_stage_weights(config.verifier.weights), config.verifier, device,
                                             config.merging.box_size_px, foundation=config.foundation,
                                             resample_tolerance=config.image.resample_tolerance)
            checkpoints += stage_checkpoints("verifier", config.verifier.weights)
        if with_atypical:
            atypical = load_atypical(config.atypical, device=device, foundation=config.foundation)
            checkpoints += stage_checkpoints("atypical", config.atypical.weights)
        return cls(config, proposer, verifier, atypical, checkpoints)

    @property
    def thresholds(self) -> dict[str, float]:
        """The decision thresholds in force, by stage: the verifier's, and the atypical stage's (configured, or the
        one its checkpoints carry)."""
        found = {"verifier": self.verifier.threshold if self.verifier is not None else None,
                 "atypical": self.atypical.threshold if self.atypical is not None else None}
        return {stage: float(value) for stage, value in found.items() if value is not None}

    def detect(self, image: str | os.PathLike[str] | RoiImage, progress: bool = True,
               candidates: Candidates | None = None) -> Track1Result:
        """Every candidate of one ROI, most probable first, labelled; mitotic figures also atypical or normal.
        `progress`: a bar for each of tiles, verification and atypical labelling (`midog.progress`).
        `candidates`: this image's merged candidates (in its pixels) when they are already known, from this chain's
        own detector (`candidates()`, e.g. saved by `training.prepare_fields`): the detector is then not run."""
        if self.verifier is None:
            raise ValueError("this Track1Detector was built without a verifier: only candidates() runs")
        if isinstance(image, RoiImage):
            return self._detect(image, progress, candidates)
        cfg = self.config.image
        with open_roi(image, cfg.fallback_spacing_um, cfg.in_memory_max_megapixels, cfg.segment_cache_mb,
                      cfg.max_spacing_um) as roi:
            return self._detect(roi, progress, candidates)

    def candidates(self, image: RoiImage, progress: bool = False) -> tuple[Candidates, ProposalStats]:
        """The detector's merged candidates of one image, before verification: tile → propose → merge, at the
        detector's own pixel size (`at_pixel_size`), boxes returned in `image`'s pixels. The one proposal chain of
        the pipeline, training's data mining and the benchmarks."""
        cfg = self.config
        view = at_pixel_size(image, self.proposer.pixel_size_um, cfg.image.resample_tolerance)
        origins = tile_origins(view.width, view.height, cfg.tiling.tile_size, cfg.tiling.overlap)
        tiles, stats = self.proposer.propose(view, origins, cfg.tiling, progress=progress)
        merged = merge_tiles(tiles, cfg.tiling.tile_size, view.width, view.height, cfg.merging)
        sx, sy = view_scale(image, view)
        if (sx, sy) != (1.0, 1.0):
            merged = Candidates(scale_boxes(merged.boxes, (1 / sx, 1 / sy)).astype(np.float32), merged.scores,
                                merged.classes)
        return merged, stats

    def verify(self, image: RoiImage, boxes: np.ndarray, progress: bool = False) -> np.ndarray:
        """P(mitotic figure) per box (in `image`'s pixels), the crops cut at the verifier's own pixel size,
        `runtime.crop_chunk` candidates at a time."""
        chunks = crop_chunks(len(boxes), self.config.verifier.batch_size, self.config.runtime.crop_chunk)
        parts = []
        with progress_bar(len(boxes), "verification", "candidate", progress) as bar:
            for chunk in chunks:
                parts.append(self.verifier.probabilities(image, boxes[chunk]))
                bar.update(chunk.stop - chunk.start)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def _detect(self, image: RoiImage, progress: bool, known: Candidates | None = None) -> Track1Result:
        cfg = self.config
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = now - clock
            clock = now

        candidates, stats = self.candidates(image, progress) if known is None else (known, ProposalStats())
        lap("proposals")
        verified = self.verify(image, candidates.boxes, progress)
        probability = combine_probability(candidates.scores, verified, cfg.verifier.probability)
        centres = candidates.centres if len(candidates) else np.zeros((0, 2))
        millimetres = image.transform.to_mm(centres)
        if cfg.merging.final_radius_um > 0:  # in µm of the image, whatever its pixel size on either axis
            kept = suppress_close_points(millimetres * 1000.0, probability, cfg.merging.final_radius_um)
            candidates, centres, millimetres = candidates.take(kept), centres[kept], millimetres[kept]
            verified, probability = verified[kept], probability[kept]
        labels = self.verifier.labels(probability)  # the name follows the written probability in either mode
        lap("verification")
        detections = [
            Detection(x=float(cx), y=float(cy), x_mm=float(mx), y_mm=float(my),
                      box=tuple(float(v) for v in box), detector_confidence=float(score),
                      verifier_probability=float(pv), probability=float(p), label=label)
            for (cx, cy), (mx, my), box, score, pv, p, label
            in zip(centres, millimetres, candidates.boxes, candidates.scores, verified, probability, labels)
        ]
        self._label_atypical(image, [d for d in detections if d.is_mitotic_figure], progress)
        lap("atypical")
        detections.sort(key=lambda d: -d.probability)
        return Track1Result(detections, image.width, image.height, image.transform.spacing_um,
                            stats.tiles_total, stats.tiles_run, timings)

    def _label_atypical(self, image: RoiImage, figures: list[Detection], progress: bool = False) -> None:
        """P(atypical) and the label of each mitotic figure, its crop cut at the atypical model's pixel size."""
        if self.atypical is None or not figures:
            return
        view = at_pixel_size(image, self.atypical.pixel_size_um, self.config.image.resample_tolerance)
        sx, sy = view_scale(image, view)
        with progress_bar(len(figures), "atypical", "figure", progress) as bar:
            for chunk in crop_chunks(len(figures), self.config.atypical.batch_size, self.config.runtime.crop_chunk):
                part = figures[chunk]
                centres = np.array([(d.x * sx, d.y * sy) for d in part])
                probabilities = self.atypical.predict_proba(figure_crops(view, centres, self.config.atypical.crop_size))
                for detection, p, atypical in zip(part, probabilities, self.atypical.is_atypical(probabilities)):
                    detection.atypical_probability = float(p)
                    detection.atypical = bool(atypical)
                bar.update(len(part))


def load_track1(config: PipelineConfig) -> Track1Detector:
    """Track 1's models as process.py loads them: the weights folder checked, the checkpoints and the thresholds in
    force logged."""
    require_in_given_dir({stage: getattr(config, stage).weights for stage in STAGE_SECTIONS})
    detector = Track1Detector.from_config(config)
    log_loaded(detector.checkpoints, detector.thresholds)
    return detector


def run_track1(input_dir: Path, output_dir: Path, config: PipelineConfig, progress: bool = True) -> TrackRun:
    """The one ROI in images/histopathology-roi-cropout/ → mitotic-figures.json and atypical-mitotic-figures.json.

    The image is opened (and checked) and the output folder checked before the weights are loaded; both files are
    written atomically at the end, so a failure anywhere leaves no output file. `progress`: the bars of
    `Track1Detector.detect`.
    """
    started = time.perf_counter()
    image_path = find_single_image(input_dir / "images" / TRACK1_IMAGE_FOLDER, ROI_SUFFIXES)
    cfg = config.image
    with open_roi(image_path, cfg.fallback_spacing_um, cfg.in_memory_max_megapixels, cfg.segment_cache_mb,
                  cfg.max_spacing_um) as roi:
        check_output_folder(output_dir)
        opened = time.perf_counter()
        detector = load_track1(config)
        loaded = time.perf_counter()
        result = detector.detect(roi, progress=progress)
    figures, atypical = track1_outputs(result.detections)
    path = write_json_atomic(output_dir / TRACK1_FILENAME, figures)
    try:
        write_json_atomic(output_dir / TRACK1_ATYPICAL_FILENAME, atypical)
    except BaseException:  # both files or neither
        path.unlink(missing_ok=True)
        raise
    if result.tiles_total and not result.tiles_run:
        log.warning("track 1: no tile of %s holds tissue (tiling.tissue_saturation, tiling.tissue_gray_max): no "
                    "candidates", image_path.name)
    stages = " ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
    log.info("track 1: %s, %d x %d px at %.4g x %.4g µm/px, %d/%d tiles with tissue", image_path.name,
             result.width, result.height, *result.spacing_um, result.tiles_run, result.tiles_total)
    log.info("track 1: %d candidates, %d mitotic figures (%d atypical)", len(result.detections),
             len(result.mitotic_figures), sum(bool(d.atypical) for d in result.mitotic_figures))
    log.info("track 1 timings: open %.2f s, model load %.2f s, %s, total %.2f s", opened - started,
             loaded - opened, stages, time.perf_counter() - started)
    return TrackRun(image_path, [path, output_dir / TRACK1_ATYPICAL_FILENAME], detector.checkpoints,
                    detector.thresholds)
