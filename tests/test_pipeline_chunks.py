"""Track 1 memory on a whole slide: candidate crops are read a bounded chunk at a time, with one pass's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from roi_factory import he_roi, tiny_track1_weights

from midog.config import load_config
from midog.pipeline import Track1Detector, Track1Result, crop_chunks
from midog.roi_io import ArrayRoi, PhysicalTransform

BATCH = 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_track1_weights(tmp_path_factory.mktemp("weights"))


def detect(weights: Path, monkeypatch: pytest.MonkeyPatch,
           crop_chunk: int = 2048) -> tuple[Track1Result, list[int], list[int]]:
    """The chain on a generated ROI, with the number of crops of each verifier and atypical call."""
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(weights))
    config = load_config(overrides={"verifier.batch_size": BATCH, "atypical.batch_size": BATCH,
                                    "atypical.tta": False, "verifier.threshold": 0.0,  # all figures
                                    "runtime.crop_chunk": crop_chunk})
    detector = Track1Detector.from_config(config, device="cpu")
    verifier_calls: list[int] = []
    atypical_calls: list[int] = []
    crops, predict = detector.verifier.crops, detector.atypical.predict_proba
    monkeypatch.setattr(detector.verifier, "crops",
                        lambda image, boxes, *setting: verifier_calls.append(len(boxes))
                        or crops(image, boxes, *setting))
    monkeypatch.setattr(detector.atypical, "predict_proba",
                        lambda batch: atypical_calls.append(len(batch)) or predict(batch))
    image = ArrayRoi(he_roi(1100, 900, seed=5, figures=[(300, 300), (450, 600)]), PhysicalTransform((2.5e-4,) * 2))
    return detector.detect(image, progress=False), verifier_calls, atypical_calls


def test_crop_chunks_cover_everything_in_batch_multiples():
    assert crop_chunks(0, 4, 2048) == []
    assert crop_chunks(10, 4, chunk=9) == [slice(0, 8), slice(8, 10)]
    assert crop_chunks(10, 4, chunk=3) == [slice(0, 4), slice(4, 8), slice(8, 10)]  # never below one batch
    assert crop_chunks(5, 4, 2048) == [slice(0, 5)]


def test_candidate_crops_are_read_a_chunk_at_a_time_with_one_pass_results(weights: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    one_pass, verifier_calls, atypical_calls = detect(weights, monkeypatch)
    count = len(one_pass.detections)
    assert count > 3 * BATCH, "the biased tiny detector proposes plenty"
    assert verifier_calls == [count] and atypical_calls == [count]

    chunked, verifier_calls, atypical_calls = detect(weights, monkeypatch, crop_chunk=BATCH)
    assert sum(verifier_calls) == count and max(verifier_calls) == BATCH
    assert sum(atypical_calls) == count and max(atypical_calls) == BATCH
    key = lambda d: (d.x, d.y)  # noqa: E731
    for a, b in zip(sorted(one_pass.detections, key=key), sorted(chunked.detections, key=key), strict=True):
        assert (a.x, a.y, a.label, a.atypical) == (b.x, b.y, b.label, b.atypical)
        assert a.verifier_probability == pytest.approx(b.verifier_probability, abs=1e-6)
        assert a.atypical_probability == pytest.approx(b.atypical_probability, abs=1e-6)
    assert np.isfinite([d.atypical_probability for d in chunked.detections]).all()
