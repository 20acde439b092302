from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from roi_factory import he_roi, tiny_verifier

from midog.config import VerifierConfig
from midog.errors import ConfigError, WeightsError
from midog.roi_io import ArrayRoi, PhysicalTransform
import midog.verifier as verifier_module
from midog.verifier import Verifier, combine_probability, crop_boxes, region_crops, resize_crop


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Verifier:
    path = tiny_verifier(tmp_path_factory.mktemp("w") / "verifier.pt")
    return Verifier.from_weights(path, VerifierConfig(threshold=0.5), torch.device("cpu"))


def test_crop_regions_are_the_boxes_clipped_with_context_and_fallback():
    boxes = np.array([[10.2, 20.7, 60.0, 70.5], [-10, -5, 30, 25], [90, 90, 130, 130], [50, 50, 50, 50]])
    regions = crop_boxes(boxes, 100, 100, context_px=0, fallback_px=20)
    assert regions.tolist() == [[10, 20, 60, 71], [0, 0, 30, 25], [90, 90, 100, 100], [40, 40, 60, 60]]
    assert crop_boxes(boxes[:1], 100, 100, context_px=8, fallback_px=20).tolist() == [[2, 12, 68, 79]]


def test_crops_are_resized_boxes(verifier: Verifier):
    pixels = he_roi(300, 200, seed=1)
    roi = ArrayRoi(pixels, PhysicalTransform((0.00025, 0.00025)))
    crops = verifier.crops(roi, np.array([[100, 50, 164, 114], [0, 0, 32, 16]], np.float32))
    assert crops.shape == (2, 64, 64, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], pixels[50:114, 100:164])  # already 64 px: untouched
    np.testing.assert_array_equal(crops[1], resize_crop(pixels[0:16, 0:32], 64))
    probabilities = verifier.probabilities(roi, np.array([[100, 50, 164, 114]], np.float32))
    np.testing.assert_allclose(probabilities, verifier.classifiers[0].predict_proba(crops[:1]), rtol=1e-6)
    assert verifier.probabilities(roi, np.zeros((0, 4), np.float32)).shape == (0,)


def test_crops_cut_by_shape_equal_one_at_a_time(monkeypatch: pytest.MonkeyPatch):
    """Grouping regions by shape (and splitting a group at RESIZE_CALL_PIXELS) changes no pixel and no order."""
    pixels = he_roi(400, 300, seed=2)
    roi = ArrayRoi(pixels, PhysicalTransform((0.00025, 0.00025)))
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, [340, 240], size=(200, 2))
    boxes = np.concatenate([corners, corners + rng.choice([16.0, 24.5, 40.0, 64.0, 80.0], size=(200, 2))], 1)
    regions = crop_boxes(boxes, 400, 300, context_px=4, fallback_px=20)
    one_at_a_time = np.stack([resize_crop(pixels[y0:y1, x0:x1], 64) for x0, y0, x1, y1 in regions])
    assert len(np.unique(regions[:, 2:] - regions[:, :2], axis=0)) > 10       # many shapes, several crops each
    np.testing.assert_array_equal(region_crops(roi, regions, 64), one_at_a_time)
    monkeypatch.setattr(verifier_module, "RESIZE_CALL_PIXELS", 3000)          # a call holds one or two crops
    np.testing.assert_array_equal(region_crops(roi, regions, 64), one_at_a_time)
    assert region_crops(roi, regions[:0], 64).shape == (0, 64, 64, 3)


def test_labels_follow_the_threshold(verifier: Verifier):
    assert verifier.labels(np.array([0.2, 0.5, 0.9])) == ["non-mitotic figure", "mitotic figure", "mitotic figure"]


def test_probability_modes():
    detector, verified = np.array([0.5, 0.9]), np.array([0.8, 0.1])
    np.testing.assert_allclose(combine_probability(detector, verified, "verifier"), [0.8, 0.1])
    np.testing.assert_allclose(combine_probability(detector, verified, "product"), [0.4, 0.09])
    with pytest.raises(ValueError, match="verifier.probability"):
        combine_probability(detector, verified, "max")


def test_tta_averages_the_eight_views_of_each_crop(verifier: Verifier):
    """`verifier.tta`: the probability is the mean over the crop's 8 rotations/reflections, so it is the same for a
    crop and its mirror image, and differs from the single view (an untrained net is not rotation-invariant)."""
    pixels = he_roi(300, 200, seed=3)
    roi = ArrayRoi(pixels, PhysicalTransform((0.00025, 0.00025)))
    mirrored = ArrayRoi(np.ascontiguousarray(pixels[:, ::-1]), PhysicalTransform((0.00025, 0.00025)))
    box, mirror_box = np.array([[40, 30, 104, 94]], np.float32), np.array([[196, 30, 260, 94]], np.float32)
    with_tta = Verifier(verifier.classifiers, VerifierConfig(threshold=0.5, tta=True))
    crops = verifier.crops(roi, box)
    views = [verifier.classifiers[0].predict_proba(np.ascontiguousarray(np.rot90(c, k, axes=(1, 2))))
             for c in (crops, crops[:, :, ::-1]) for k in range(4)]
    np.testing.assert_allclose(with_tta.probabilities(roi, box), np.mean(views, axis=0), rtol=1e-5)
    np.testing.assert_allclose(with_tta.probabilities(mirrored, mirror_box), with_tta.probabilities(roi, box), rtol=1e-5)
    assert not np.allclose(verifier.probabilities(roi, box), with_tta.probabilities(roi, box), rtol=1e-4)


def test_an_ensemble_averages_its_members_on_the_same_crops(tmp_path, verifier: Verifier):
    """`verifier.weights` as a list: the probability is the mean of the members', each on the crops cut once."""
    other = tiny_verifier(tmp_path / "other.pt", seed=1)
    first = tiny_verifier(tmp_path / "first.pt")
    ensemble = Verifier.from_weights([first, other], VerifierConfig(threshold=0.5), torch.device("cpu"))
    alone = Verifier.from_weights(other, VerifierConfig(threshold=0.5), torch.device("cpu"))
    roi = ArrayRoi(he_roi(300, 200, seed=4), PhysicalTransform((0.00025, 0.00025)))
    boxes = np.array([[40, 30, 104, 94], [150, 100, 190, 150]], np.float32)
    members = [verifier.probabilities(roi, boxes), alone.probabilities(roi, boxes)]
    assert not np.allclose(*members, rtol=1e-3)                                # two different members
    np.testing.assert_allclose(ensemble.probabilities(roi, boxes), np.mean(members, axis=0), rtol=1e-5)


def test_each_member_sees_the_crops_of_its_own_context(tmp_path):
    """`verifier.context_px` as a list: member i is scored on crops with context i, as if it ran alone with that
    context; a list of another length than `weights` is refused in one line."""
    paths = [tiny_verifier(tmp_path / "narrow.pt"), tiny_verifier(tmp_path / "wide.pt", seed=1)]
    roi = ArrayRoi(he_roi(300, 200, seed=5), PhysicalTransform((0.00025, 0.00025)))
    boxes = np.array([[60, 50, 110, 100], [150, 100, 200, 150]], np.float32)
    cpu = torch.device("cpu")
    ensemble = Verifier.from_weights(paths, VerifierConfig(threshold=0.5, context_px=[0, 20]), cpu)
    alone = [Verifier.from_weights(p, VerifierConfig(threshold=0.5, context_px=c), cpu).probabilities(roi, boxes)
             for p, c in zip(paths, (0, 20))]
    np.testing.assert_allclose(ensemble.probabilities(roi, boxes), np.mean(alone, axis=0), rtol=1e-5)
    one_context = Verifier.from_weights(paths, VerifierConfig(threshold=0.5, context_px=0), cpu)
    assert not np.allclose(ensemble.probabilities(roi, boxes), one_context.probabilities(roi, boxes), rtol=1e-4)
    with pytest.raises(ConfigError, match="lists 3 values for 2 verifier.weights") as err:
        Verifier.from_weights(paths, VerifierConfig(threshold=0.5, context_px=[0, 20, 5]), cpu)
    assert "\n" not in str(err.value)


def test_training_crops_need_one_context():
    assert VerifierConfig(context_px=15).single_crop_setting("context_px", "prepare_fields") == 15
    with pytest.raises(ConfigError, match="prepare_fields cuts one crop set: verifier.context_px must be one value"):
        VerifierConfig(context_px=[15, 31]).single_crop_setting("context_px", "prepare_fields")


def test_an_ensemble_of_two_pixel_sizes_is_refused(verifier: Verifier):
    coarse = dataclasses.replace(verifier.classifiers[0], pixel_size_um=0.5)
    with pytest.raises(WeightsError, match="mix checkpoints trained at 0.25, 0.5"):
        Verifier([verifier.classifiers[0], coarse], VerifierConfig(threshold=0.5))
    with pytest.raises(WeightsError, match="verifier.weights is empty"):
        Verifier([], VerifierConfig(threshold=0.5))
