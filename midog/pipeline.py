"""The only module that knows the order of the stages. One function per track, called by process.py."""

from __future__ import annotations

from pathlib import Path

import logging
import time

import torch

from midog.atypical import load_atypical
from midog.cli import TRACK2_SLUG
from midog.config import PipelineConfig
from midog.devices import resolve_device
from midog.image_io import find_single_image, open_stack
from midog.outputs import TRACK2_FILENAME, track2_classification, write_json_atomic

log = logging.getLogger(__name__)


# ---- Track 2: atypical vs normal on a stack of crops -------------------------------------------------------------

def run_track2(input_dir: Path, output_dir: Path, config: PipelineConfig) -> Path:
    """The one stack in images/stacked-histopathology-roi-cropouts/ → one {class, confidence} per page, in order.

    The stack is opened (and checked) before the weights are loaded, pages are classified in batches of
    `atypical.batch_size`, and the output is written once, atomically, after the last page: a failure anywhere
    leaves no output file.
    """
    if config.runtime.num_threads > 0:
        torch.set_num_threads(config.runtime.num_threads)
    image_path = find_single_image(input_dir / "images" / TRACK2_SLUG)
    with open_stack(image_path) as stack:
        started = time.perf_counter()
        classifier = load_atypical(config.atypical, device=resolve_device(config.runtime.device),
                                   foundation=config.foundation)
        loaded = time.perf_counter()
        probabilities: list[float] = []
        for batch in stack.iter_batches(config.atypical.batch_size):
            probabilities.extend(classifier.predict_proba(batch).tolist())
        log.info("track 2: %d pages of %s in %.2f s (model load %.2f s), threshold %.3f", stack.num_pages,
                 image_path.name, time.perf_counter() - loaded, loaded - started, classifier.threshold)
    return write_json_atomic(output_dir / TRACK2_FILENAME, track2_classification(probabilities, classifier.threshold))


# ---- Track 1: detection on a region of interest ------------------------------------------------------------------

def run_track1(input_dir: Path, output_dir: Path, config: PipelineConfig) -> Path:
    raise NotImplementedError("Track 1 pipeline")
